"""Helpers the smoke levels share (smoke.py and level_*.py beside it, run inside the image).

The result record, the Plan, distribution -> module names, the GPU state, bounded subprocesses
that leave no stray rank behind, and the one scan of the image's compiled code.

Python 3.8+, stdlib and torch only. Imported by plain name: this folder is on sys.path when
smoke.py runs as a script.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ENTRY = os.path.join(HERE, "smoke.py")  # the entry point; subcommands (op-check, comm-worker) rerun it

# The smoke levels in the order they run; the host's `envbuild smoke` reads this one list too.
LEVELS = ("env", "model", "arch", "ops", "comm", "train", "io")

# distribution name -> module to import, where they differ, for packages without native code
# (for the rest the Plan's native_packages say it: envbuild's building blocks decide)
IMPORT_NAMES = {
    "opencv-python": "cv2", "opencv-python-headless": "cv2", "pyyaml": "yaml",
    "pillow": "PIL", "scikit-image": "skimage", "scikit-learn": "sklearn", "nuscenes-devkit": "nuscenes",
    "torch-geometric": "torch_geometric", "pytorch-lightning": "pytorch_lightning",
    "mmsegmentation": "mmseg", "ipython": "IPython",
}


def result(status, **fields):
    fields["status"] = status
    return fields


def load_plan(path):
    with open(path) as fh:
        return json.load(fh)


def native_packages(plan):
    """The Plan's packages with native code -> {"module", "op_check", "also_covers"}."""
    return (plan or {}).get("native_packages") or {}


def package_module(name, plan=None):
    """The module a distribution is imported as (spconv-cu117 -> spconv, mmcv-full -> mmcv)."""
    native = native_packages(plan).get(name)
    return native["module"] if native else IMPORT_NAMES.get(name, name.replace("-", "_"))


def checked_by(plan):
    """Compiled modules whose top-level name is not the package whose check exercises them
    (flash_attn_2_cuda -> flash_attn, cumm -> spconv)."""
    return dict((covered, info["module"]) for info in native_packages(plan).values()
                for covered in info.get("also_covers") or ())


def gpu_count():
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_state():
    """("ok", n GPUs) | ("none", why) | ("unusable", why).

    A GPU that is there but that torch cannot use (a driver older than the image's CUDA, a
    missing device library) fails the GPU levels; only a host with no GPU skips them."""
    import torch
    if torch.cuda.is_available():
        return "ok", torch.cuda.device_count()
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*"))
    if not nodes:
        return "none", "no GPU visible"
    try:  # torch says why, e.g. "The NVIDIA driver on your system is too old"
        getattr(torch.cuda, "init", getattr(torch.cuda, "_lazy_init", lambda: None))()
        why = "torch.cuda.is_available() is False"
    except Exception as exc:  # noqa: BLE001 - the message is the finding
        why = " ".join(str(exc).split())[:300]
    return "unusable", ("%d GPU device(s) visible (%s, driver %s) but torch %s (CUDA %s) cannot use them: %s; "
                        "update the NVIDIA driver or build the image for an older --cuda (envbuild doctor checks)") % (
        len(nodes), ", ".join(nodes), host_driver() or "unknown", torch.__version__, torch.version.cuda, why)


def driver_version(proc_text):
    """The driver version in /proc/driver/nvidia/version's text. The open kernel module says
    'Open Kernel Module for x86_64  580.159.04', the proprietary one 'Kernel Module  535.104.05':
    the version is the first dotted number after 'Kernel Module', not the next word."""
    m = re.search(r"Kernel Module\b.*?\s(\d+\.\d+(?:\.\d+)*)\s", proc_text + " ")
    return m.group(1) if m else None


def host_driver():
    try:
        with open("/proc/driver/nvidia/version") as fh:
            return driver_version(fh.readline())
    except OSError:
        return None


def shm_bytes():
    try:
        st = os.statvfs("/dev/shm")
        return st.f_frsize * st.f_blocks
    except OSError:
        return None


def run_bounded(cmd, timeout, env=None, cwd=None):
    """Run cmd and everything it starts, bounded by timeout: (returncode or None on timeout, out, err).

    torchrun (torch >= 2.2) starts each worker in a session of its own, so killing the launcher's
    process group can leave a rank hung in NCCL. Every process started here carries a tag in its
    environment and is found by it; output goes to files, not pipes, that a stray rank could
    hold open."""
    tag = uuid.uuid4().hex
    env = dict(os.environ if env is None else env, ENVBUILD_RUN_TAG=tag)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            os.killpg(proc.pid, signal.SIGTERM)  # torchrun passes it on to its workers
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        _kill_tagged(tag)  # ranks that outlived their launcher, whatever happened
        proc.wait()
        out.seek(0)
        err.seek(0)
        return code, out.read().decode(errors="replace"), err.read().decode(errors="replace")


def _kill_tagged(tag):
    marker = ("ENVBUILD_RUN_TAG=%s" % tag).encode()
    killed = []
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]:
        try:
            with open("/proc/%d/environ" % pid, "rb") as fh:
                if marker in fh.read().split(b"\0"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        except OSError:
            continue
    # SIGKILL is delivered asynchronously: return only once they are gone (or zombies), so a
    # rank cannot still hold a GPU or a port when the next run starts.
    deadline = time.time() + 10
    while killed and time.time() < deadline:
        killed = [pid for pid in killed if _running(pid)]
        if killed:
            time.sleep(0.05)


def _running(pid):
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


# Compiled code that comes with torch's own wheel (importing torch covers it) and NVIDIA's
# redistributed CUDA libraries: not the image's extensions.
SHIPPED_WITH_TORCH = {"torch", "nvfuser", "triton", "nvidia", "functorch"}
CUDA_LIBRARY = re.compile(r"/site-packages/nvidia/|/lib(cu|nv|cudnn|nccl|nvrtc|nvjpeg)[^/]*\.so[^/]*$")
_SCAN = {}


SCAN_ROOTS = ["/opt/venv", "/workspace"]  # where an envbuild image keeps compiled code


def gpu_libraries():
    """Every shared library with GPU code in the venv and the workspace (audit_scan.py), scanned once."""
    if "libs" not in _SCAN:
        scan, libs = os.path.join(HERE, "audit_scan.py"), []
        if os.path.exists(scan):
            proc = subprocess.run([sys.executable, scan] + SCAN_ROOTS, stdout=subprocess.PIPE, timeout=900)
            libs = json.loads(proc.stdout.decode() or '{"libraries": []}')["libraries"]
        _SCAN["libs"] = libs
    return _SCAN["libs"]


def import_roots(workdir):
    return [p for p in sys.path if p and os.path.isdir(p) and p != HERE] + [workdir]


def package_root(path):
    """The folder above the outermost regular package (folders with __init__.py) holding path,
    when Python imports that package from exactly there: a sys.path entry, or an editable
    install's finder (setuptools >= 64 maps a package to its folder without a sys.path entry).
    None otherwise. Named from any other root, the package would be imported a second time
    under another name (mmdet3d as mmdetection3d.mmdet3d: its registries refuse the twin)."""
    top, folder = None, os.path.dirname(path)
    while os.path.isfile(os.path.join(folder, "__init__.py")):
        top, folder = folder, os.path.dirname(folder)
    if top is None or not os.path.basename(top).isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(os.path.basename(top))
    except (ImportError, ValueError):
        return None
    found = (spec.submodule_search_locations or []) if spec else []
    return folder if any(os.path.realpath(f) == os.path.realpath(top) for f in found) else None


def extension_targets(libs, roots):
    """What to load for each compiled extension: kind "module" (a Python extension module, named
    from the import root it lies under so it imports the way the model does it, parent packages
    first) or "library" (an op library for torch.ops.load_library: torchvision's _C,
    libtorchaudio), and the top-level package it belongs to. Build leftovers under
    non-identifier folders (build/lib.linux-...) are skipped: nobody imports them."""
    roots = sorted({r.rstrip("/") for r in roots if r}, key=len, reverse=True)
    found = []
    for lib in libs:
        path = lib["path"]
        root = package_root(path) or next((r for r in roots if path.startswith(r + "/")), None)
        if root is None or CUDA_LIBRARY.search(path):
            continue
        rel = os.path.relpath(path, root).split(os.sep)
        if rel[0] in SHIPPED_WITH_TORCH or not all(p.isidentifier() for p in rel[:-1]):
            continue
        module = lib.get("python_module")
        package = rel[0] if len(rel) > 1 else (module or rel[0].split(".")[0])
        load = ".".join(rel[:-1] + [module]) if module else path
        found.append({"kind": "module" if module else "library", "load": load, "path": path, "package": package,
                      "root": root})
    return found
