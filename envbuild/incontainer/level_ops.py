"""Smoke level "ops": the compiled ops (op_checks.py, plus the model's own check hook) run
forward/backward on the GPU against a reference, each in a fresh interpreter (smoke.py
op-check); compiled code no check covers is listed as unchecked. Skipped without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from smoke_common import (ENTRY, HERE, checked_by, extension_targets, gpu_libraries, gpu_state, import_roots,
                          native_packages, result, run_bounded)


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
    names = {info["op_check"] for info in native_packages(plan).values() if info.get("op_check")}
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
        code, stdout, stderr = run_bounded([sys.executable, ENTRY, "op-check"] + what,
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
    covered = checked_by(plan)
    unchecked = sorted({t["path"] for t in extension_targets(gpu_libraries(), import_roots(args.workdir))
                        if covered.get(t["package"], t["package"]) not in checked and t["package"] != "torchaudio"
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
