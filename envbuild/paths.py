"""Where things live inside an envbuild image: one place for every path that the Dockerfile
(render passes them to the template as `p`) and the host commands that run in images agree on.

envbuild/incontainer/ runs inside images (Python 3.8, stdlib only, without this package) and
keeps its own copies: smoke.py's SCAN_ROOTS and --workdir default, audit_scan.py's roots.
"""

VENV = "/opt/venv"  # the image's Python environment: PATH, VIRTUAL_ENV
HELPERS = "/opt/envbuild"  # envbuild's files: in-image helpers, plan.json, locks, stamps, fix reports
MODEL = "/workspace/model"  # the model's source tree; the runtime's WORKDIR
VENV_DELTA = "/opt/venv-delta"  # builder only: what it added to the venv, a tree rooted like /
LAUNCHER = HELPERS + "/launch.py"  # the ENTRYPOINT: host settings (host-settings.json beside it), then the command
OPS_CHECK = "/opt/envbuild-ops-check.py"  # `envbuild smoke --ops-check FILE`: the file, bound read-only
