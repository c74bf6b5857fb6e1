#!/usr/bin/env bash
# The GPU levels of `envbuild smoke`, run once on a GPU machine that has torch and nvcc but
# no container engine. It checks the in-image smoke script itself (envbuild/incontainer/smoke.py)
# against this machine's own torch:
#   1. resolve the test fixture (tinybev) for CARD with envbuild's resolver, on this torch's line;
#   2. copy the fixture, apply the Plan's porting fixers, build its CUDA op for the card's arch;
#   3. run the levels arch, ops, comm, train (+ torch.compile and the model's own recipe), io.
# Output: $OUT/gpu-selftest.json (or ./gpu-selftest.json) and one line per level; exit 1 when
# a level fails. With Docker and a built image, `make smoke-gpu IMAGE=...` is the usual route.
#
# Usage: CARD=h200 PYTHON=python3 scripts/gpu-selftest.sh
#   REHEARSE=1 TORCH_PIN=2.0.1 PLAN_PYTHON=3.11: a dry run on a CPU, e.g. in a builder image
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARD=${CARD:-h200}
OUT_DIR=${OUT:-$PWD}
# envbuild itself needs Python >= 3.11 with typer: the repo's venv (make setup) where there is
# one, else the torch interpreter.
RESOLVE_PY=${RESOLVE_PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo "$PY")}
# The Plan pins the catalog's release of the host's own torch line (2.11.0a0+git..., an NGC
# 2.6.0a0 or a 2.5.0 the catalog skips: the nearest release of that major.minor), so the Plan's
# C++ standard and arch rules are the ones the extension is really built with; its Python is the
# host's where envbuild knows it.
HOST_TORCH=$("$PY" -c 'import re, torch; print(re.match(r"\d+\.\d+", torch.__version__).group(0))')
TORCH_PIN=${TORCH_PIN:-$("$RESOLVE_PY" -c 'import sys; from envbuild import catalog
line = [v for v in catalog.load().torch_versions() if v.startswith(sys.argv[1] + ".")]
print(line[-1] if line else "")' "$HOST_TORCH")}
[ -n "$TORCH_PIN" ] || { echo "torch $HOST_TORCH: no release of that line in the catalog; set TORCH_PIN" >&2; exit 2; }
HOST_PYTHON=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PLAN_PYTHON=${PLAN_PYTHON:-$("$RESOLVE_PY" -c 'import sys; from envbuild.resolve import PYTHONS
print(sys.argv[1] if sys.argv[1] in PYTHONS else PYTHONS[-1])' "$HOST_PYTHON")}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# REHEARSE=1 runs it all without a GPU (the GPU levels then say skipped): a dry run of the script.
"$PY" -c 'import os, torch; ok = torch.cuda.is_available(); assert ok or os.environ.get("REHEARSE"), "no GPU visible to torch"; print("torch", torch.__version__, "on", torch.cuda.get_device_name(0) if ok else "CPU (rehearsal)")'

# 1. The Plan, from the built-in catalog plus the fixture model (a user catalog on top of it).
mkdir -p "$work/matrices/models"
cp tests/fixture/tinybev.toml "$work/matrices/models/"
# No level reads the Plan's Python: PLAN_PYTHON only has to be one the pinned torch line supports.
ENVBUILD_MATRICES="$work/matrices" ENVBUILD_TORCH_INDEX=none "$RESOLVE_PY" -m envbuild.cli resolve tinybev \
    --card "$CARD" --python "$PLAN_PYTHON" --set "torch==$TORCH_PIN" --json > "$work/plan.json"
# Extensions are built against this host's torch, so its C++ standard wins over the Plan's.
"$PY" - "$work/plan.json" <<'EOF'
import json, sys, torch
std = "c++20" if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13) else "c++17"
plan = json.load(open(sys.argv[1]))
for fixer in plan["fixers"]:
    if fixer["name"] == "cxx-standard":
        fixer["args"]["std"] = std
json.dump(plan, open(sys.argv[1], "w"))
EOF

# 2. The fixture as an image would hold it: fixed, with its op compiled for the card.
cp -r tests/fixture/tinybev "$work/model"
"$PY" envbuild/fixers.py apply "$work/model" --plan "$work/plan.json"
arch=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["arch_list"])' "$work/plan.json")
(cd "$work/model/ops" && TORCH_CUDA_ARCH_LIST="$arch" FORCE_CUDA=1 MAX_JOBS=8 \
    "$PY" -m pip install -q --no-build-isolation --no-deps --target "$work/site" .)

# 3. The smoke levels, against this torch (env is left out: the Plan's pins are not what is
# installed here).
set +e
PYTHONPATH="$work/site:$work/model${PYTHONPATH:+:$PYTHONPATH}" "$PY" envbuild/incontainer/smoke.py \
    --plan "$work/plan.json" --lock "$work/no-lock" --workdir "$work/model" --scan-roots "$work/site" \
    --level arch,ops,comm,train,io --recipe both --compile --steps 30 --ckpt-dir "$work" \
    > "$OUT_DIR/gpu-selftest.json"
rc=$?
set -e
"$PY" - "$OUT_DIR/gpu-selftest.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
print("GPUs:", report["environment"].get("gpus"), "driver", report["environment"].get("driver"))
for name, level in report["levels"].items():
    print("%-6s %-8s %s" % (name, level["status"], level.get("reason", "")))
    for check in level.get("checks", []):
        print("         %s %s: %s" % ("ok  " if check["ok"] else "FAIL", check["op"], check["detail"]))
    for attempt in level.get("attempts", []):
        print("         %s %s" % (attempt.get("setting"), {k: v for k, v in attempt.items() if k != "setting"}))
    for run_name, run in (level.get("runs") or {}).items():
        keep = ("status", "reason", "samples_per_s", "step_time_s", "data_wait_share", "peak_gpu_mem_mb",
                "first_loss", "last_loss", "speedup_vs_eager", "first_loss_gap_vs_eager", "returncode")
        print("         %s: %s" % (run_name, {k: run[k] for k in keep if k in run}))
        if run.get("stderr_tail"):
            print(run["stderr_tail"][-800:])
    for ext in level.get("extensions", []):
        print("         %s: SASS %s PTX %s -> %s" % (ext["path"], ext["sass"], ext["ptx"], ext.get("runs_via")))
    for problem in level.get("problems", []):
        print("         problem:", problem)
EOF
exit $rc
