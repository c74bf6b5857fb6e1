"""envbuild smoke test, run inside the image: does this stack work on this card?

Levels: env (every Plan package imports at its pinned version), arch (torch and the
compiled extensions carry code for the card), ops (compiled ops forward/backward on the
GPU against a reference), comm (NCCL all-reduce over the visible GPUs, bounded, with a
P2P-off retry), train (N steps of a synthetic perception net or the model's own recipe),
io (checkpoint write/read bandwidth). GPU levels are reported as skipped, with the
reason, when there is no GPU; never as passed.

Python 3.8+, stdlib and torch only. Prints one JSON report on stdout.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
LEVELS = ("env", "model", "arch", "ops", "comm", "train", "io")
# distribution name -> module to import (when they differ)
IMPORT_NAMES = {
    "mmcv-full": "mmcv", "opencv-python": "cv2", "opencv-python-headless": "cv2", "pyyaml": "yaml",
    "pillow": "PIL", "scikit-image": "skimage", "scikit-learn": "sklearn", "nuscenes-devkit": "nuscenes",
    "torch-geometric": "torch_geometric", "pytorch-lightning": "pytorch_lightning", "flash-attn": "flash_attn",
    "torch-scatter": "torch_scatter", "torch-sparse": "torch_sparse", "torch-cluster": "torch_cluster",
    "mmsegmentation": "mmseg", "ipython": "IPython", "lyft-dataset-sdk": "lyft_dataset_kit",
}
NOT_IMPORTED = {"setuptools", "wheel", "ninja", "psutil", "pip", "yapf"}


def result(status, **fields):
    fields["status"] = status
    return fields


def cc_key(cc):
    major, minor = cc.split(".")
    return int(major), int(minor)


def runs_on(sass, ptx, cc):
    """The arch whose code runs on cc: same-major SASS with minor <= card's, else older PTX."""
    fit = [a for a in sass if cc_key(a)[0] == cc_key(cc)[0] and cc_key(a)[1] <= cc_key(cc)[1]]
    if fit:
        return "sm_" + max(fit, key=cc_key).replace(".", "")
    jit = [a for a in ptx if cc_key(a) <= cc_key(cc)]
    return ("compute_" + max(jit, key=cc_key).replace(".", "")) if jit else None


def load_plan(path):
    with open(path) as fh:
        return json.load(fh)


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


def host_driver():
    try:
        with open("/proc/driver/nvidia/version") as fh:
            m = re.search(r"Kernel Module\s+(\S+)", fh.read())
            return m.group(1) if m else None
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


# ------------------------------------------------------------------ env


def dist_version(name):
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def locked_versions(path):
    pins = {}
    if path and os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\]+)", line)
                if m:
                    pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


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
        root = next((r for r in roots if path.startswith(r + "/")), None)
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


LOAD_EXTENSIONS = """
import importlib, json, sys
import torch  # extensions bind to the libtorch this import loads
sys.path.insert(0, sys.argv[2])
for kind, target in json.loads(sys.argv[1]):
    print(json.dumps([target, None]), flush=True)
    try:
        importlib.import_module(target) if kind == "module" else torch.ops.load_library(target)
        print(json.dumps([target, ""]), flush=True)
    except BaseException as exc:
        print(json.dumps([target, "%s: %s" % (type(exc).__name__, str(exc)[:300])]), flush=True)
"""


def load_extensions(targets, workdir):
    """Load each compiled extension in a fresh interpreter: undefined symbols, ABI and
    torch-version mismatches show here, without a GPU. A crash names the one it hit."""
    if not targets:
        return []
    outcome = _load(targets, workdir)
    # A failure can come from an earlier load in the same interpreter (two builds of one package,
    # like open3d's cpu and cuda modules, registering the same types; a crash that ended the
    # run): each failure gets an interpreter of its own before it counts.
    for target in targets:
        if outcome[target["load"]]:
            outcome.update(_load([target], workdir))
    return [{k: v for k, v in dict(t, ok=not outcome[t["load"]], error=outcome[t["load"]] or None).items()
             if k != "root"} for t in targets]


def _load(targets, workdir):
    """{target: "" when it loaded, else the error}, loading them in order in one interpreter."""
    todo = [[t["kind"], t["load"]] for t in targets]
    proc = subprocess.run([sys.executable, "-c", LOAD_EXTENSIONS, json.dumps(todo), workdir],
                          cwd=workdir if os.path.isdir(workdir) else None,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
    outcome = {}
    for line in proc.stdout.decode(errors="replace").splitlines():
        if line.startswith("["):
            name, error = json.loads(line)
            outcome[name] = error
    for target in targets:
        error = outcome.get(target["load"], "not reached: the loader died before it (exit %d)" % proc.returncode)
        if error is None:
            error = "the interpreter crashed importing it (exit %d): %s" % (
                proc.returncode, proc.stderr.decode(errors="replace").strip()[-200:])
        outcome[target["load"]] = error
    return outcome


def dotted(path):
    """The object a dotted path names: the longest importable module, then attributes
    ("mmengine.Config.fromfile")."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            if cut == 1:
                raise
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj


def write_arrays(specs):
    """Zero float32 .npy files ("path.npy=AxB", relative to the working folder) where none exists:
    inputs the network reads when it is built. Written with the stdlib (the .npy v1.0 layout)."""
    made = []
    for spec in specs:
        path, dims = spec.split("=")
        shape = tuple(int(d) for d in dims.split("x"))
        if os.path.exists(path):
            continue  # the model's own file: never replaced
        header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }" % "".join("%d," % d for d in shape)
        header += " " * (63 - (10 + len(header)) % 64) + "\n"  # pad so the data starts on a 64-byte boundary
        count = 1
        for d in shape:
            count *= d
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))
            fh.write(bytes(4 * count))
        made.append(spec)
    return made


def construct_argparse(recipe):
    """(network, what built it), or (None, why not)."""
    cls = getattr(importlib.import_module(recipe["module"]), recipe["object"])
    parser = argparse.ArgumentParser(prog=recipe["object"])
    getattr(cls, recipe["args_hook"])(parser)
    try:
        ns = parser.parse_args(list(recipe.get("args") or []))
    except SystemExit:  # argparse exits on arguments it does not take; its message went to stderr
        return None, "%s's parser refused the catalog's construct args %s" % (recipe["object"], recipe.get("args"))
    return cls(**vars(ns)), "%s.%s" % (recipe["module"], recipe["object"])


def construct_from_config(recipe):
    """The network the training config describes, built by the model's own builder."""
    if not os.path.isfile(recipe["config"]):
        return None, "no config %s in the model source" % recipe["config"]
    cfg = dotted(recipe["loader"])(recipe["config"])
    kwargs = dict((key, cfg.get(key)) for key in recipe.get("cfg_kwargs") or [])
    return dotted(recipe["builder"])(cfg["model"], **kwargs), "%s(%s: model)" % (recipe["builder"], recipe["config"])


def level_model(plan, args):
    """Import the model's own code the way its train script does and build its network from
    its own arguments (the catalog's construct recipe); report the parameter count."""
    recipe = plan.get("construct")
    if not recipe:
        return result("skipped", reason="the catalog has no construct recipe for %s" % plan["model"])
    root = args.workdir
    if not os.path.isdir(root):
        return result("failed", reason="no model source at %s" % root)
    if root not in sys.path:
        sys.path.insert(0, root)
    here = os.getcwd()
    os.chdir(root)  # repos read configs and assets relative to their root, as their train script runs
    try:
        made = write_arrays(recipe.get("arrays") or [])
        for name in recipe.get("imports") or []:
            importlib.import_module(name)
        if recipe["kind"] == "argparse":
            net, built = construct_argparse(recipe)
        elif recipe["kind"] == "config":
            net, built = construct_from_config(recipe)
        else:
            return result("failed", reason="unknown construct kind %r" % recipe["kind"])
        if net is None:
            return result("failed", reason=built)
    finally:
        os.chdir(here)
    params = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    out = dict(object=built, parameters=params, trainable=trainable, imports=list(recipe.get("imports") or []))
    if made:
        out["synthetic_arrays"] = made
    if params <= 0:
        return result("failed", reason="the network has no parameters", **out)
    if recipe.get("step"):
        out["step"] = train_step(recipe["step"], net, root)
        if out["step"].get("problem"):
            return result("failed", reason="training step %s: %s" % (recipe["step"], out["step"]["problem"]), **out)
    return result("passed", **out)


def train_step(name, net, root):
    """One synthetic training step (train_steps.py beside this file) with the model's root as
    the working folder; what it measured, plus "problem" when forward/backward did not work."""
    import torch
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import train_steps
    here = os.getcwd()
    os.chdir(root)
    try:
        measured = train_steps.STEPS[name](net, torch)
    finally:
        os.chdir(here)
    if not math.isfinite(measured["loss"]):
        measured["problem"] = "the loss is %s" % measured["loss"]
    elif measured["nonfinite_grads"]:
        measured["problem"] = "%d parameter(s) got a non-finite gradient" % measured["nonfinite_grads"]
    elif not measured["grads"]:
        measured["problem"] = "backward reached no parameter"
    return measured


def transitive_modules(dist_names):
    """Top-level modules of installed distributions (from their metadata, not imported)."""
    from importlib import metadata
    modules = set()
    for name in dist_names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        modules.update((dist.read_text("top_level.txt") or "").split() or [package_module(name)])
    return modules


def level_env(plan, args):
    lock = locked_versions(args.lock)
    packages = []
    wanted = [("torch", plan["torch"]["version"]), ("torchvision", plan["torchvision"]["version"]),
              ("torchaudio", plan["torchaudio"]["version"])]
    wanted += [(p["name"], p["version"]) for p in plan["packages"]]
    failed = 0
    for name, pin in wanted:
        item = {"name": name}
        expected = lock.get(name) or (pin if re.match(r"^\d[\w.+!]*$", pin or "") else None)
        installed = dist_version(name)
        item["version"], item["expected"] = installed, expected
        problems = []
        if installed is None:
            problems.append("not installed")
        elif expected and installed != expected and installed.split("+")[0] != expected.split("+")[0]:
            problems.append("version %s, expected %s" % (installed, expected))
        module = package_module(name)
        if name not in NOT_IMPORTED and installed is not None:
            try:
                importlib.import_module(module)
                item["import"] = module
            except Exception as exc:  # noqa: BLE001 - any import failure is the finding
                problems.append("import %s: %s: %s" % (module, type(exc).__name__, str(exc)[:200]))
        item["ok"] = not problems
        if problems:
            item["problems"] = problems
            failed += 1
        packages.append(item)
    targets = extension_targets(gpu_libraries(), import_roots(args.workdir))
    extensions = load_extensions(targets, args.workdir)
    # The Plan's packages and the model's own extensions must all load. A library of a package
    # something else pulled in (open3d's CUDA 12 torch ops, via mmdet3d) is reported, not fatal:
    # nothing the Plan names loads it.
    pulled_in = transitive_modules(set(lock) - set(name.lower().replace("_", "-") for name, _ in wanted))
    for ext in extensions:
        ext["required"] = CHECKED_BY.get(ext["package"], ext["package"]) not in pulled_in
    failed += sum(1 for e in extensions if not e["ok"] and e["required"])
    optional = ["%s (%s): %s" % (e["load"], e["package"], e["error"]) for e in extensions if not e["ok"] and not e["required"]]
    status = "passed" if not failed else "failed"
    return result(status, packages=packages, extensions=extensions, failed=failed, lock=bool(lock),
                  **({"optional_failures": optional} if optional else {}))


# ------------------------------------------------------------------ arch


def level_arch(plan, args):
    import torch
    ccs = plan["cc"].split(",")  # a multi-card image is for each of its cards
    flags = torch._C._cuda_getArchFlags() if hasattr(torch._C, "_cuda_getArchFlags") else ""
    sass = sorted({"%s.%s" % (m[:-1], m[-1]) for m in re.findall(r"sm_(\d+)", flags or "")}, key=cc_key)
    ptx = sorted({"%s.%s" % (m[:-1], m[-1]) for m in re.findall(r"compute_(\d+)", flags or "")}, key=cc_key)
    via = dict((cc, runs_on(sass, ptx, cc)) for cc in ccs)
    out = {"card_cc": plan["cc"], "torch_cuda": torch.version.cuda, "torch_archs": sass, "torch_ptx": ptx,
           "torch_runs_via": via[ccs[0]] if len(ccs) == 1 else via}
    problems = ["torch %s ships %s: nothing runs on %s" % (torch.__version__, sass, cc) for cc in ccs if not via[cc]]
    libs = gpu_libraries()
    if libs:
        ext = [dict(l) for l in libs if not CUDA_LIBRARY.search(l["path"])]
        for lib in ext:
            lib_via = dict((cc, runs_on(lib["sass"], lib["ptx"], cc)) for cc in ccs)
            lib["runs_via"] = lib_via[ccs[0]] if len(ccs) == 1 else lib_via
            for cc in ccs:
                if not lib_via[cc]:
                    problems.append("%s has SASS %s PTX %s: nothing for %s" % (lib["path"], lib["sass"], lib["ptx"], cc))
        out["extensions"] = ext
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_capability(0)
        out["device_cc"] = "%d.%d" % dev
        out["device_name"] = torch.cuda.get_device_name(0)
        out["device_arch_list"] = torch.cuda.get_arch_list()
        # The image is for the Plan's card; what matters here is whether its code runs on this GPU.
        here = out["device_cc"]
        if not runs_on(sass, ptx, here):
            problems.append("torch ships %s: nothing runs on this GPU, %s (%s)" % (sass, out["device_name"], here))
        for lib in out.get("extensions", []):
            if not runs_on(lib["sass"], lib["ptx"], here):
                problems.append("%s has nothing for this GPU, %s (%s)" % (lib["path"], out["device_name"], here))
        if here not in ccs:
            out["note"] = "the image was built for %s (%s); this GPU is %s" % (plan["card"], plan["cc"], here)
    else:
        state, detail = gpu_state()
        out["device"] = "no GPU visible: static check only" if state == "none" else detail
        if state == "unusable":
            problems.append(detail)
    out["problems"] = problems
    return result("failed" if problems else "passed", **out)


# ------------------------------------------------------------------ ops


def package_module(name):
    """The module a distribution is imported as (spconv-cu117 -> spconv, mmcv-full -> mmcv)."""
    return IMPORT_NAMES.get(name, re.sub(r"^spconv-cu\d+$", "spconv", name).replace("-", "_"))


# Compiled files whose top-level name is not the package their check imports.
CHECKED_BY = {"flash_attn_2_cuda": "flash_attn", "flash_attn_cuda": "flash_attn", "cumm": "spconv"}


def op_checks():
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import op_checks as module
    return module.OP_CHECKS


def level_ops(plan, args):
    state, detail = gpu_state()
    if state != "ok":
        return result("failed", reason=detail) if state == "unusable" else \
            result("skipped", reason="%s: CUDA ops need one" % detail)
    names = {package_module(p["name"]) for p in plan["packages"]}
    if importlib.util.find_spec("torchvision") is not None:
        names.add("torchvision")
    checks = [(module, [module]) for module in sorted(op_checks()) if module in names]
    hook = args.ops_check or (plan.get("train") or {}).get("ops_check")
    if hook:
        path = hook if os.path.isabs(hook) else os.path.join(args.workdir, hook)
        checks.append(("model: " + os.path.basename(path), ["hook", path]))
    out = []
    for name, what in checks:
        # Each check in a fresh interpreter: a crashing op or a sticky CUDA error (illegal
        # address) fails that check alone, and the report still gets written.
        code, stdout, stderr = run_bounded([sys.executable, os.path.abspath(__file__), "op-check"] + what,
                                           args.ops_timeout, cwd=args.workdir if os.path.isdir(args.workdir) else None)
        lines = [l for l in stdout.splitlines() if l.startswith("{")]
        if code is None:
            item = {"ok": False, "detail": "timed out after %ds" % args.ops_timeout}
        elif lines:
            item = json.loads(lines[-1])
        else:
            item = {"ok": False, "detail": "crashed (exit %d): %s" % (code, " ".join(stderr.split()[-40:]))}
        out.append(dict(item, op=name))
    # Compiled code no check ran on, said plainly rather than counted as checked.
    model_ops = {e["name"] for e in plan.get("extensions") or []}
    checked = {m for m, _ in checks}
    unchecked = sorted({t["path"] for t in extension_targets(gpu_libraries(), import_roots(args.workdir))
                        if CHECKED_BY.get(t["package"], t["package"]) not in checked and t["package"] != "torchaudio"
                        and not (hook and (t["package"] in model_ops or t["root"] == args.workdir.rstrip("/")))})
    if not checks:
        return result("skipped", reason="no compiled ops with a known check in this Plan", unchecked=unchecked)
    failed = [c for c in out if not c["ok"]]
    return result("failed" if failed else "passed", checks=out, unchecked=unchecked)


def op_check(name, hook_path=None):
    """One op check, in this (fresh) interpreter; prints {"ok", "detail"}."""
    try:
        if name == "hook":
            detail = _run_hook(hook_path)
        else:
            detail = op_checks()[name]()
        print(json.dumps({"ok": True, "detail": detail}))
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        print(json.dumps({"ok": False, "detail": "%s: %s" % (type(exc).__name__, str(exc)[:300])}))
    return 0


def _run_hook(path):
    """A model's own op check: a file defining check(device) -> str."""
    namespace = {"__file__": path, "__name__": "envbuild_ops_check"}
    sys.path.insert(0, os.path.dirname(path))
    with open(path) as fh:
        exec(compile(fh.read(), path, "exec"), namespace)  # noqa: S102 - the model's own check file
    return namespace["check"]("cuda")


# ------------------------------------------------------------------ comm


def comm_worker(backend, timeout):
    """One rank of the all-reduce check: the sum must be exact, then 5 timed rounds."""
    import datetime
    import torch
    import torch.distributed as dist
    on_gpu = backend == "nccl"
    if on_gpu:  # before init: NCCL binds each rank to the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Ranks also give up on their own (where NCCL's watchdog runs) rather than wait forever.
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    t = torch.full((1 << 20,), float(rank + 1), device="cuda" if on_gpu else "cpu")
    dist.all_reduce(t)  # the first call sets up rings and P2P: where a broken topology hangs
    sync()
    expected = float(world * (world + 1) // 2)
    ok = bool((t == expected).all())
    start = time.time()
    for _ in range(5):
        dist.all_reduce(t)
    sync()
    secs = (time.time() - start) / 5
    if rank == 0:
        print(json.dumps({"backend": backend, "world": world, "ok": ok, "allreduce_4MB_ms": round(secs * 1000, 3),
                          "bus_GBps": round(2.0 * (world - 1) / world * 4 / 1024 / secs, 2) if world > 1 else None}))
    dist.destroy_process_group()
    return 0 if ok else 1


def _torchrun(nproc, backend, env, timeout):
    """Run the all-reduce on nproc ranks; a hang is killed at timeout, every rank with it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=%d" % nproc,
           os.path.abspath(__file__), "comm-worker", backend, str(timeout)]
    code, out, err = run_bounded(cmd, timeout, env=env)
    if code is None:
        return {"ok": False, "error": "timed out after %ds (hang)" % timeout}
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if code != 0 or not lines:
        return {"ok": False, "error": err[-600:] or "exit %d" % code}
    return json.loads(lines[-1])


def comm_attempts(nproc, backend, timeout, run=_torchrun):
    """The all-reduce as the environment has it, then, for NCCL, once more with P2P off.

    Nodes without working P2P (no NVLink, ACS on, some VMs) hang or fail in the first
    all-reduce; NCCL_P2P_DISABLE=1 routes through host memory instead.
    """
    env = dict(os.environ)
    first = run(nproc, backend, env, timeout)
    attempts = [first]
    if backend != "nccl":
        return attempts, None
    first["setting"] = "NCCL_P2P_DISABLE=%s" % env.get("NCCL_P2P_DISABLE", "unset")
    if not first["ok"] and env.get("NCCL_P2P_DISABLE") != "1":
        env["NCCL_P2P_DISABLE"] = "1"
        retry = run(nproc, backend, env, timeout)
        retry["setting"] = "NCCL_P2P_DISABLE=1"
        attempts.append(retry)
    return attempts, next((a["setting"] for a in attempts if a["ok"]), None)


def level_comm(plan, args):
    state, detail = gpu_state()
    if state == "unusable":
        return result("failed", reason=detail)
    if state == "none":
        # Still run the launcher, the rendezvous and the timeout bound, on CPU with gloo, so a
        # broken torch.distributed shows up before a GPU host does. It decides nothing.
        rehearsal = comm_attempts(2, "gloo", args.comm_timeout)[0][0]
        said = "ok" if rehearsal["ok"] else "FAILED: " + rehearsal["error"].strip().splitlines()[-1][:200]
        return result("skipped", reason="no GPU visible: NCCL needs GPUs (CPU rehearsal with gloo: %s)" % said,
                      cpu_rehearsal=rehearsal)
    attempts, works = comm_attempts(detail, "nccl", args.comm_timeout)
    return result("passed" if works else "failed", gpus=detail, attempts=attempts, works_with=works)


# ------------------------------------------------------------------ train


def loader_knobs(tuned, device):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not tuned:
        return {"num_workers": 0, "pin_memory": False, "persistent_workers": False, "prefetch_factor": None}
    workers = max(1, min(8, cores - 1))
    return {"num_workers": workers, "pin_memory": device == "cuda", "persistent_workers": True, "prefetch_factor": 4}


def sharing_strategy(knobs):
    """How worker processes hand batches to the trainer: torch's shared memory (file descriptors
    or files in /dev/shm), which is why /dev/shm's size matters."""
    if not knobs["num_workers"]:
        return "none: batches are made in the training process"
    import torch.multiprocessing as tmp
    return "shared memory (%s)" % tmp.get_sharing_strategy()


def shm_bytes():
    try:
        st = os.statvfs("/dev/shm")
        return st.f_frsize * st.f_blocks
    except OSError:
        return None


class SyntheticCameras(object):
    """Generated multi-camera batches with CPU preprocessing (normalize + flip), like a real loader."""

    def __init__(self, n, cameras=6, size=96, seed=0):
        self.n, self.cameras, self.size, self.seed = n, cameras, size, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch
        g = torch.Generator().manual_seed(self.seed + i)
        img = torch.rand(self.cameras, 3, self.size, self.size, generator=g) * 255.0
        img = (img - 127.5) / 58.0  # the per-sample CPU work data loaders spend their time on
        if i % 2:
            img = img.flip(-1)
        occ = (img.mean(dim=(0, 1)) > 0).float()
        target = torch.nn.functional.adaptive_avg_pool2d(occ[None, None], 24)[0, 0].round().long()
        return img, target


def perception_net():
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self, cameras=6, ch=32, bev=24, classes=2):
            super().__init__()
            self.cameras, self.bev = cameras, bev
            self.backbone = nn.Sequential(
                nn.Conv2d(3, ch, 3, 2, 1), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
                nn.Conv2d(ch, ch, 3, 2, 1), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
                nn.Conv2d(ch, ch * 2, 3, 2, 1), nn.BatchNorm2d(ch * 2), nn.ReLU(inplace=True))
            self.pool = nn.AdaptiveAvgPool2d(bev)
            self.neck = nn.Sequential(nn.Conv2d(ch * 2 * cameras, ch * 2, 1), nn.ReLU(inplace=True),
                                      nn.Conv2d(ch * 2, ch * 2, 3, padding=1), nn.ReLU(inplace=True))
            self.head = nn.Conv2d(ch * 2, classes, 1)

        def forward(self, x):
            b, n = x.shape[:2]
            f = self.pool(self.backbone(x.flatten(0, 1)))
            return self.head(self.neck(f.reshape(b, n * f.shape[1], self.bev, self.bev)))

    return Net()


def train_synthetic(args, device, tuned=True, compile_model=False):
    import torch
    from torch.utils.data import DataLoader
    torch.manual_seed(0)
    knobs = loader_knobs(tuned, device)
    kwargs = {k: v for k, v in knobs.items() if v is not None and not (k != "pin_memory" and knobs["num_workers"] == 0 and k != "num_workers")}
    loader = DataLoader(SyntheticCameras(args.batch_size * (args.steps + 2)), batch_size=args.batch_size, shuffle=False, **kwargs)
    model = perception_net().to(device)
    if compile_model and hasattr(torch, "compile"):
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, step_times, wait = [], [], 0.0
    it = iter(loader)
    start = time.time()
    for step in range(args.steps):
        t0 = time.time()
        images, target = next(it)
        t1 = time.time()
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        loss = torch.nn.functional.cross_entropy(model(images), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = loss.item()
        if device == "cuda":
            torch.cuda.synchronize()
        t2 = time.time()
        if not math.isfinite(value):
            return result("failed", reason="loss is %s at step %d" % (value, step), losses=losses)
        losses.append(value)
        if step > 0:  # the first step pays for worker start-up and lazy init
            wait += t1 - t0
            step_times.append(t2 - t0)
    total = sum(step_times) or 1e-9
    out = {
        "recipe": "synthetic", "device": device, "steps": args.steps, "batch_size": args.batch_size,
        "step_time_s": round(total / max(1, len(step_times)), 4),
        "samples_per_s": round(args.batch_size * len(step_times) / total, 2),
        "data_wait_share": round(wait / total, 3), "first_loss": losses[0], "last_loss": losses[-1],
        "losses": [round(l, 5) for l in losses], "wall_s": round(time.time() - start, 2),
        "knobs": dict(knobs, compile=bool(compile_model), shm_bytes=shm_bytes(), worker_transport=sharing_strategy(knobs)),
    }
    if device == "cuda":
        out["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return result("passed", **out)


def train_compiled(plan, args, device, eager):
    """The synthetic run again under torch.compile (inductor), with its speed-up over eager.

    The Plan says whether this torch x Python has torch.compile; where it should work and
    does not (no compiler in the image, an inductor bug), the run fails and says why."""
    import torch
    can = plan.get("torch_compile", hasattr(torch, "compile"))
    if not can:
        return result("skipped", reason=plan.get("torch_compile_why") or "torch %s has no torch.compile" % torch.__version__)
    try:
        run = train_synthetic(args, device, tuned=args.loader == "tuned", compile_model=True)
    except Exception as exc:  # noqa: BLE001 - the compile error is the finding
        lines = str(exc).strip().splitlines() or [""]
        return result("failed", reason="torch.compile: %s: %s" % (type(exc).__name__, lines[0][:300]))
    if run["status"] == "passed" and eager.get("status") == "passed":
        run["speedup_vs_eager"] = round(run["samples_per_s"] / max(eager["samples_per_s"], 1e-9), 2)
        # Same seed, same batches: the compiled net must start from the same loss as eager.
        gap = abs(run["first_loss"] - eager["first_loss"]) / max(abs(eager["first_loss"]), 1e-9)
        run["first_loss_gap_vs_eager"] = round(gap, 6)
        if gap > 1e-2:  # room for TF32 convolutions on Ampere and newer
            run["status"], run["reason"] = "failed", "compiled first loss differs from eager by %.2g (relative)" % gap
    return run


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_recipe(plan, args, device):
    """The model's own entry point, launched the way the catalog says, with --local-rank handled."""
    train = plan.get("train") or {}
    entry = train.get("entry")
    if not entry:
        return result("skipped", reason="the catalog has no train entry for this model")
    cmd = [sys.executable]
    launcher = train.get("launcher")
    nproc = max(1, gpu_count()) if device == "cuda" else 1
    if launcher == "torch.distributed.launch":  # its default port 29500 may be taken on a shared host
        cmd += ["-m", "torch.distributed.launch", "--nproc_per_node=%d" % nproc, "--master_port=%d" % free_port()]
    elif launcher == "torchrun":
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=%d" % nproc]
    cmd.append(entry)
    if train.get("config"):
        cmd.append(train["config"])
    cmd += list(train.get("extra_args") or [])
    steps_args = [a.replace("{steps}", str(args.steps)) for a in train.get("steps_args") or []]
    cmd += steps_args
    if args.recipe_args:
        cmd += args.recipe_args.split()
    if device == "cpu":
        cmd += list(train.get("cpu_args") or [])  # how the model's script runs without a GPU
    env = dict(os.environ)
    if args.data:
        env["ENVBUILD_DATA"] = args.data
        # The repos here read their data from data/ under the repo root (data/nuscenes, data/infos).
        link = os.path.join(args.workdir, "data")
        if not os.path.lexists(link):
            os.symlink(args.data, link)
    start = time.time()
    code, out, err = run_bounded(cmd, args.train_timeout, env=env, cwd=args.workdir)
    if code is None:
        return result("failed", recipe="model", command=cmd, reason="timed out after %ds" % args.train_timeout,
                      stderr_tail=err[-1500:])
    status = "passed" if code == 0 else "failed"
    lines = [l for l in out.splitlines() if l.startswith("{")]
    report = {"recipe": "model", "command": cmd, "returncode": code, "wall_s": round(time.time() - start, 2),
              "steps": args.steps if steps_args else "the recipe's own (the catalog has no steps_args for it)"}
    if lines:
        try:
            report["metrics"] = json.loads(lines[-1])
        except ValueError:
            pass
    if re.search(r"\bnan\b|\binf\b", out.lower() + err.lower()) and "loss" in (out + err).lower():
        status, report["reason"] = "failed", "NaN/Inf in the training output"
    if status == "failed":
        report["stderr_tail"] = err[-1500:]
    return result(status, **report)


def level_train(plan, args):
    state, detail = gpu_state()
    if state == "unusable":  # training on the CPU instead would hide it
        return result("failed", reason=detail)
    device = "cuda" if state == "ok" else "cpu"
    runs = {}
    if args.recipe in ("synthetic", "both"):
        runs["synthetic"] = train_synthetic(args, device, tuned=args.loader == "tuned")
        if args.compile:
            runs["synthetic_compiled"] = train_compiled(plan, args, device, runs["synthetic"])
    if args.recipe in ("model", "both"):
        runs["model"] = train_recipe(plan, args, device)
    statuses = [r["status"] for r in runs.values()]
    status = "failed" if "failed" in statuses else ("passed" if "passed" in statuses else "skipped")
    return result(status, device=device, runs=runs)


# ------------------------------------------------------------------ io


def level_io(plan, args):
    import torch
    directory = args.ckpt_dir or tempfile.gettempdir()
    if not os.path.isdir(directory):
        return result("failed", reason="--ckpt-dir %s is not a directory" % directory)
    size_mb = args.ckpt_mb
    state = {"w%d" % i: torch.randn(size_mb * 2 ** 20 // 4 // 8) for i in range(8)}
    path = os.path.join(directory, "envbuild-smoke-%d.pt" % os.getpid())
    try:
        t0 = time.time()
        torch.save(state, path)
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        t1 = time.time()
        back = torch.load(path)
        t2 = time.time()
        ok = all(torch.equal(state[k], back[k]) for k in state)
        nbytes = os.path.getsize(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    mb = nbytes / 2 ** 20
    return result("passed" if ok else "failed", dir=directory, size_mb=round(mb, 1),
                  write_MBps=round(mb / max(t1 - t0, 1e-9), 1), read_MBps=round(mb / max(t2 - t1, 1e-9), 1),
                  write_latency_s=round(t1 - t0, 3), read_latency_s=round(t2 - t1, 3), roundtrip_equal=ok)


# ------------------------------------------------------------------ main


def environment():
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "hostname": platform.node(), "cpus": os.cpu_count(), "shm_bytes": shm_bytes()}
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    info["driver"] = host_driver()
    return info


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["comm-worker"]:
        return comm_worker(argv[1], int(argv[2]))
    if argv[:1] == ["op-check"]:
        return op_check(argv[1], argv[2] if len(argv) > 2 else None)
    ap = argparse.ArgumentParser(prog="envbuild-smoke")
    ap.add_argument("--plan", default=os.path.join(HERE, "plan.json"))
    ap.add_argument("--lock", default=os.path.join(HERE, "requirements.lock"))
    ap.add_argument("--level", default=",".join(LEVELS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--recipe", choices=["synthetic", "model", "both"], default="synthetic")
    ap.add_argument("--recipe-args", default="")
    ap.add_argument("--data")
    ap.add_argument("--ckpt-dir")
    ap.add_argument("--ckpt-mb", type=int, default=64)
    ap.add_argument("--ops-check")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--loader", choices=["tuned", "untuned"], default="tuned")
    ap.add_argument("--comm-timeout", type=int, default=120)
    ap.add_argument("--ops-timeout", type=int, default=300)
    ap.add_argument("--train-timeout", type=int, default=900)
    ap.add_argument("--workdir", default="/workspace/model")
    ap.add_argument("--scan-roots", help="comma-separated folders holding compiled code (default: the image's)")
    args = ap.parse_args(argv)
    if args.scan_roots:
        SCAN_ROOTS[:] = [r for r in args.scan_roots.split(",") if r]
    levels = [l.strip() for l in args.level.split(",") if l.strip()]
    unknown = [l for l in levels if l not in LEVELS]
    if unknown:
        print("unknown level(s): %s (choose from %s)" % (", ".join(unknown), ", ".join(LEVELS)), file=sys.stderr)
        return 2
    if not os.path.exists(args.plan):
        print("no Plan at %s: run this in an envbuild image, or pass --plan" % args.plan, file=sys.stderr)
        return 2
    plan = load_plan(args.plan)
    report = {"model": plan["model"], "card": plan["card"], "card_name": plan["card_name"], "cc": plan["cc"],
              "environment": environment(), "levels": {}}
    runners = {"env": level_env, "model": level_model, "arch": level_arch, "ops": level_ops, "comm": level_comm,
               "train": level_train, "io": level_io}
    for level in levels:
        start = time.time()
        try:
            out = runners[level](plan, args)
        except Exception as exc:  # noqa: BLE001 - a crash in a level is that level failing
            out = result("failed", reason="%s: %s" % (type(exc).__name__, str(exc)[:500]))
        out["seconds"] = round(time.time() - start, 2)
        report["levels"][level] = out
    statuses = [v["status"] for v in report["levels"].values()]
    report["ok"] = "failed" not in statuses
    print(json.dumps(report, indent=1, sort_keys=True))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
