"""Smoke level "env": every Plan package is installed at its pinned version (the lock's, else
the Plan's) and imports; every compiled extension in the image loads in a fresh interpreter.
The Plan's packages and the model's own extensions must load; a failure in a package something
else pulled in is reported as optional.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

from smoke_common import (checked_by, extension_targets, gpu_libraries, import_roots, native_packages, package_module,
                          result)

NOT_IMPORTED = {"setuptools", "wheel", "ninja", "psutil", "pip", "yapf"}


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
    notes = {}
    for target in targets:
        if outcome[target["load"]]:
            outcome.update(_load([target], workdir))
        # Alone too, when the module's own package imports its sibling build first (open3d's
        # __init__ loads cpu/pybind, then cuda/pybind registers the same types): the library
        # loaded and ran its init; pybind11 only refuses the types twice in one interpreter.
        if PYBIND_TWIN in (outcome[target["load"]] or ""):
            notes[target["load"]] = "its package loaded a sibling build of the same types (%s)" % outcome[target["load"]]
            outcome[target["load"]] = ""
    return [{k: v for k, v in dict(t, ok=not outcome[t["load"]], error=outcome[t["load"]] or None,
                                   **({"note": notes[t["load"]]} if t["load"] in notes else {})).items()
             if k != "root"} for t in targets]


PYBIND_TWIN = "is already registered!"  # pybind11's generic_type error for a type registered twice


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


def _distribution(name):
    """The installed distribution of this name (importlib.metadata), or None."""
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    for candidate in dict.fromkeys((name, name.replace("-", "_"))):
        try:
            return metadata.distribution(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None


def record_modules(record):
    """Top-level import names in a RECORD's file list: packages (foo/...), modules (foo.py) and
    extension modules (foo.cpython-38-x86_64-linux-gnu.so); not metadata, scripts or data."""
    names = []
    for line in record.splitlines():
        path = line.split(",", 1)[0].strip().strip('"')
        if not path or path.startswith(("/", "..")):
            continue
        top, _, rest = path.partition("/")
        if rest:
            if top.endswith((".dist-info", ".egg-info", ".data")) or top == "__pycache__":
                continue
            name = top
        elif top.endswith(".py"):
            name = top[:-3]
        elif top.endswith((".so", ".pyd")):
            name = top.split(".", 1)[0]
        else:
            continue
        if name.isidentifier() and name not in names:
            names.append(name)
    return names


def dist_modules(name):
    """The top-level import names a distribution installed, from its metadata: top_level.txt,
    else the top-level names in RECORD; [] when it is not installed or its metadata says none."""
    dist = _distribution(name)
    if dist is None:
        return []
    names = [n for n in (dist.read_text("top_level.txt") or "").split() if n.isidentifier()]
    return names or record_modules(dist.read_text("RECORD") or "")


def import_name(name, plan=None):
    """The module smoke imports for a distribution: the Plan's for a package with native code,
    else the one its installed metadata names (hydra-core -> hydra), preferring a public one
    that looks like the distribution; without metadata, the smoke_common guess."""
    if name in native_packages(plan):
        return package_module(name, plan)
    guess = package_module(name, plan)
    names = dist_modules(name)
    public = [n for n in names if not n.startswith("_")] or names
    if not public or guess in public:
        return guess
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return sorted(public, key=lambda n: (re.sub(r"[^a-z0-9]", "", n.lower()) not in key, n))[0]


def transitive_modules(dist_names):
    """Top-level modules of installed distributions (from their metadata, not imported)."""
    modules = set()
    for name in dist_names:
        if _distribution(name) is not None:
            modules.update(dist_modules(name) or [package_module(name)])
    return modules


def level_env(plan, args):
    lock = locked_versions(args.lock)
    packages = []
    wanted = [("torch", plan["torch"]["version"]), ("torchvision", plan["torchvision"]["version"])]
    if plan["torchaudio"]["version"]:  # "": no torchaudio pairs with this torch, none is installed
        wanted.append(("torchaudio", plan["torchaudio"]["version"]))
    wanted += [(p["name"], p["version"]) for p in plan["packages"]]
    # packages from git: installed and importable (no version to expect: the commit is the pin)
    wanted += [(name, "") for name in sorted(plan.get("git_packages") or {})]
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
        module = import_name(name, plan)
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
    covered = checked_by(plan)
    for ext in extensions:
        ext["required"] = covered.get(ext["package"], ext["package"]) not in pulled_in
    failed += sum(1 for e in extensions if not e["ok"] and e["required"])
    optional = ["%s (%s): %s" % (e["load"], e["package"], e["error"]) for e in extensions if not e["ok"] and not e["required"]]
    status = "passed" if not failed else "failed"
    return result(status, packages=packages, extensions=extensions, failed=failed, lock=bool(lock),
                  **({"optional_failures": optional} if optional else {}))
