"""Porting fixers: small, idempotent source transformations for old model repos.

Each fixer has a name, a one-line reason, detect(root) -> findings and apply(root).
A fixer never writes outside the tree it was given and never follows a symlink.
All new contents are computed first and then written (atomically, file by file, with
rollback), so a failure leaves no half-applied fix.

This file also runs inside images (the build applies the Plan's fixers), so it must
work on Python 3.8 with only the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

PY = (".py",)
CXX = (".c", ".cc", ".cpp", ".cxx", ".cu", ".cuh", ".h", ".hpp")
SKIP_DIRS = {".git", "__pycache__", "build", "dist", ".eggs", "node_modules"}


class Finding(object):
    def __init__(self, path, line, fixer, why, text=""):
        self.path, self.line, self.fixer, self.why, self.text = path, line, fixer, why, text

    def to_dict(self):
        return {"path": self.path, "line": self.line, "fixer": self.fixer, "why": self.why, "text": self.text}


class Fixer(object):
    """Base: subclasses implement fix_text(path, text) -> new text (same text = nothing to do)."""

    name = ""
    why = ""
    suffixes = PY
    filenames = None  # restrict to these basenames (e.g. setup.py)

    def __init__(self, **args):
        self.args = args

    def wants(self, relpath):
        base = os.path.basename(relpath)
        if self.filenames is not None:
            return base in self.filenames
        return relpath.endswith(self.suffixes)

    def fix_text(self, relpath, text):
        raise NotImplementedError

    def changes(self, root):
        """{relpath: (old, new)} for every file this fixer would change."""
        out = {}
        for relpath in iter_files(root):
            if not self.wants(relpath):
                continue
            old = read_text(root, relpath)
            if old is None:
                continue
            new = self.fix_text(relpath, old)
            if new != old and not (relpath.endswith(".py") and _compiles(old) and not _compiles(new)):
                out[relpath] = (old, new)  # a change that would break Python that compiled is never made
        return out

    def detect(self, root):
        findings = []
        for relpath, (old, new) in sorted(self.changes(root).items()):
            old_lines, new_lines = old.splitlines(), new.splitlines()
            for i, line in enumerate(old_lines):
                if i >= len(new_lines) or new_lines[i] != line:
                    findings.append(Finding(relpath, i + 1, self.name, self.why, line.strip()))
                    break
        return findings


# ------------------------------------------------------------------ file walking


def iter_files(root):
    """Relative paths of regular files under root; symlinks are never followed."""
    root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            yield os.path.relpath(full, root)


def _inside(root, relpath):
    root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root, relpath))
    return full.startswith(root + os.sep), full


def read_text(root, relpath):
    ok, full = _inside(root, relpath)
    if not ok:
        return None
    try:
        with open(full, "r", encoding="utf-8", newline="") as fh:
            return fh.read()
    except (UnicodeDecodeError, OSError):
        return None


def write_all(root, changes):
    """Write {relpath: new_text} atomically per file; roll back everything on failure."""
    written = []
    try:
        for relpath, (old, new) in sorted(changes.items()):
            ok, full = _inside(root, relpath)
            if not ok or os.path.islink(full):
                raise OSError("refusing to write outside the tree: %s" % relpath)
            _atomic_write(full, new)
            written.append((full, old))
    except BaseException:
        for full, old in written:
            _atomic_write(full, old)
        raise


def _atomic_write(full, text):
    mode = os.stat(full).st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(full), prefix=".envbuild-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, full)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------ helpers


def _compiles(text):
    try:
        compile(text, "<fixed>", "exec", dont_inherit=True)
        return True
    except (SyntaxError, ValueError):
        return False


def _call_end(text, start):
    """Index just past the ')' closing the call whose '(' is at text[start-1]."""
    depth = 1
    i = start
    while i < len(text) and depth:
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
        i += 1
    return i


def _ensure_import_os(text):
    if re.search(r"^\s*import os\b|^\s*import .*\bos\b|^from os import", text, re.M):
        return text
    lines = text.splitlines(True)
    i = 0
    # after a shebang, encoding line, docstring-free module header and __future__ imports
    while i < len(lines) and (lines[i].startswith("#!") or lines[i].startswith("# -*-")
                              or lines[i].startswith("from __future__")):
        i += 1
    lines.insert(i, "import os\n")
    return "".join(lines)


# ------------------------------------------------------------------ fixers


class LocalRank(Fixer):
    name = "local-rank"
    why = "torch >= 2.0 launch passes --local-rank; accept it beside --local_rank (LOCAL_RANK env kept)"
    _re = re.compile(r"add_argument\(\s*(['\"])--local_rank\1")

    def fix_text(self, relpath, text):
        out, pos = [], 0
        for m in self._re.finditer(text):
            end = _call_end(text, m.start() + len("add_argument("))
            call = text[m.start():end]
            if "--local-rank" in call:
                continue
            q = m.group(1)
            out.append(text[pos:m.end()])
            out.append(", %s--local-rank%s" % (q, q))
            pos = m.end()
        out.append(text[pos:])
        return "".join(out)


class NumbaErrors(Fixer):
    name = "numba-errors"
    why = "numba >= 0.49 moved numba.errors to numba.core.errors"
    _re = re.compile(r"^([ \t]*)from numba\.errors import (.+)$", re.M)
    _marker = "except ImportError:  # numba < 0.49"

    def fix_text(self, relpath, text):
        def repl(m):
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            if before.strip() == self._marker:
                return m.group(0)
            ind, names = m.group(1), m.group(2)
            return ("%stry:\n%s    from numba.core.errors import %s\n%s%s\n%s    from numba.errors import %s"
                    % (ind, ind, names, ind, self._marker, ind, names))
        text = self._re.sub(repl, text)
        text = re.sub(r"^([ \t]*)import numba\.errors\b.*$",
                      lambda m: m.group(1) + "import numba.core.errors  # was numba.errors (numba >= 0.49)",
                      text, flags=re.M)
        return re.sub(r"(?<![\w.])numba\.errors\.", "numba.core.errors.", text)


class ThcToAten(Fixer):
    name = "thc-to-aten"
    why = "THC was removed in torch 1.11: map its headers and helpers to ATen/c10"
    suffixes = CXX
    _includes = [
        (re.compile(r'^[ \t]*#include\s*[<"]THC/THC\.h[>"][^\n]*\n', re.M), "#include <ATen/cuda/CUDAContext.h>\n"),
        (re.compile(r'^[ \t]*#include\s*[<"]THC/THCAtomics\.cuh[>"][^\n]*\n', re.M), "#include <ATen/cuda/Atomic.cuh>\n"),
        (re.compile(r'^[ \t]*#include\s*[<"]THC/THCDeviceUtils\.cuh[>"][^\n]*\n', re.M), "#include <ATen/cuda/DeviceUtils.cuh>\n"),
        (re.compile(r'^[ \t]*#include\s*[<"]THC/[A-Za-z]+\.h[>"][^\n]*\n', re.M), "#include <ATen/cuda/CUDAContext.h>\n"),
    ]
    _subs = [
        (re.compile(r"^[ \t]*extern\s+THCState\s*\*\s*state\s*;[^\n]*\n", re.M), ""),
        (re.compile(r"^[ \t]*THCState\s*\*\s*state\s*=[^;]*;[^\n]*\n", re.M), ""),
        (re.compile(r"THCState_getCurrentStream\s*\(\s*state\s*\)"), "at::cuda::getCurrentCUDAStream()"),
        (re.compile(r"\bTHCudaCheck\s*\("), "C10_CUDA_CHECK("),
        (re.compile(r"\bTHCCeilDiv\s*\("), "at::ceil_div("),
        (re.compile(r"\bTHCudaMalloc\s*\(\s*state\s*,\s*"), "c10::cuda::CUDACachingAllocator::raw_alloc("),
        (re.compile(r"\bTHCudaFree\s*\(\s*state\s*,\s*"), "c10::cuda::CUDACachingAllocator::raw_delete("),
        (re.compile(r"\bAT_CHECK\s*\("), "TORCH_CHECK("),
        (re.compile(r"\.type\(\)\s*\.is_cuda\(\)"), ".is_cuda()"),
        (re.compile(r"\.data<"), ".data_ptr<"),
        (re.compile(r"(AT_DISPATCH_[A-Z_]+\s*\(\s*[\w.\->\[\]]+?)\.type\(\)"), r"\1.scalar_type()"),
    ]

    def fix_text(self, relpath, text):
        new = text
        for pattern, repl in self._includes:
            new = pattern.sub(repl, new)
        for pattern, repl in self._subs:
            new = pattern.sub(repl, new)
        extra = []
        if "at::ceil_div(" in new and "ATen/ceil_div.h" not in new:
            extra.append("#include <ATen/ceil_div.h>\n")
        if "CUDACachingAllocator::raw_" in new and "c10/cuda/CUDACachingAllocator.h" not in new:
            extra.append("#include <c10/cuda/CUDACachingAllocator.h>\n")
        if "C10_CUDA_CHECK(" in new and "c10/cuda/CUDAException.h" not in new and "ATen/cuda/CUDAContext.h" not in new:
            extra.append("#include <c10/cuda/CUDAException.h>\n")
        if "at::cuda::getCurrentCUDAStream" in new and "ATen/cuda/CUDAContext.h" not in new:
            extra.append("#include <ATen/cuda/CUDAContext.h>\n")
        if extra:
            new = _insert_after_includes(new, "".join(extra))
        # one CUDAContext include is enough
        first = new.find("#include <ATen/cuda/CUDAContext.h>\n")
        if first >= 0:
            head, tail = new[:first + 35], new[first + 35:]
            new = head + tail.replace("#include <ATen/cuda/CUDAContext.h>\n", "")
        return new


def _insert_after_includes(text, block):
    matches = list(re.finditer(r"^[ \t]*#include[^\n]*\n", text, re.M))
    at = matches[-1].end() if matches else 0
    return text[:at] + block + text[at:]


class MmcvVersionAssert(Fixer):
    name = "mmcv-version-assert"
    why = "mmdet/mmseg/mmdet3d assert an mmcv maximum below the version the port uses"
    _re = re.compile(r"""^([ \t]*mmcv_maximum_version\s*=\s*)(['"])([0-9][0-9a-z.]*)\2""", re.M)

    def fix_text(self, relpath, text):
        target = self.args.get("mmcv")
        if not target:
            return text
        strict_lt = re.search(r"<\s*digit_version\(\s*mmcv_maximum_version\s*\)", text) is not None

        def repl(m):
            current = m.group(3)
            want = _bump_patch(target) if strict_lt else target
            if _vkey(current) >= _vkey(want):
                return m.group(0)
            return "%s%s%s%s" % (m.group(1), m.group(2), want, m.group(2))
        return self._re.sub(repl, text)


def _vkey(version):
    parts = []
    for p in re.split(r"[.]", version):
        num = re.match(r"\d+", p)
        parts.append(int(num.group(0)) if num else -1)
    return tuple(parts + [0] * (4 - len(parts)))


def _bump_patch(version):
    parts = version.split(".")
    while len(parts) < 3:
        parts.append("0")
    parts[2] = str(int(re.match(r"\d+", parts[2]).group(0)) + 1)
    return ".".join(parts[:3])


class SetupWithoutGpu(Fixer):
    name = "setup-without-gpu"
    why = "setup.py refuses to build CUDA ops without a visible GPU; image builds have none (FORCE_CUDA=1)"
    filenames = ("setup.py",)
    _re = re.compile(r"torch\.cuda\.is_available\(\)")

    def fix_text(self, relpath, text):
        lines = text.splitlines(True)
        changed = False
        for i, line in enumerate(lines):
            stripped = line.lstrip()
            if not (stripped.startswith("if ") or stripped.startswith("elif ")) or "FORCE_CUDA" in line:
                continue
            if self._re.search(line):
                lines[i] = self._re.sub("(torch.cuda.is_available() or os.getenv('FORCE_CUDA', '0') == '1')", line)
                changed = True
        if not changed:
            return text
        return _ensure_import_os("".join(lines))


class CxxStandard(Fixer):
    """With a Plan's standard (args std=c++17): raise an old -std pin to it. Without one: drop the
    pin, so torch's extension builder passes the standard its own headers need (C++17 for
    torch 2.x, C++20 for the newest)."""
    name = "cxx-standard"
    why = "newer torch headers need a newer C++ standard than setup.py asks for"
    filenames = ("setup.py",)
    _re = re.compile(r"-std=c\+\+(11|14|0x|1y)\b")
    # a list element that is only the flag, with the comma that joins it to its neighbour
    _element = re.compile(r"""(?:(['"])-std=c\+\+(?:11|14|0x|1y)\1[ \t]*,[ \t]*|[ \t]*,[ \t]*(['"])-std=c\+\+(?:11|14|0x|1y)\2(?=[ \t]*[\])])|(['"])-std=c\+\+(?:11|14|0x|1y)\3)""")
    _inline = re.compile(r"[ \t]*-std=c\+\+(11|14|0x|1y)\b")

    def fix_text(self, relpath, text):
        std = self.args.get("std")
        if std:
            return self._re.sub("-std=" + std, text)
        return self._inline.sub("", self._element.sub("", text))


FIXERS = {cls.name: cls for cls in (LocalRank, ThcToAten, NumbaErrors, MmcvVersionAssert, SetupWithoutGpu, CxxStandard)}


def make(name, args=None):
    if name not in FIXERS:
        raise KeyError(name)
    return FIXERS[name](**(args or {}))


def detect(root, fixers):
    findings = []
    for fx in fixers:
        findings.extend(fx.detect(root))
    return findings


def apply(root, fixers):
    """Apply fixers in order; returns {fixer: [changed files]}. All or nothing."""
    if not os.path.isdir(root):
        raise OSError("not a directory: %s" % root)
    report = {}
    # Compute every change first (fixers see the results of the ones before them).
    staged = {}
    for fx in fixers:
        changed = []
        for relpath in iter_files(root):
            if not fx.wants(relpath):
                continue
            current = staged[relpath][1] if relpath in staged else read_text(root, relpath)
            if current is None:
                continue
            new = fx.fix_text(relpath, current)
            if new != current:
                original = staged[relpath][0] if relpath in staged else current
                staged[relpath] = (original, new)
                changed.append(relpath)
        report[fx.name] = changed
    pending = {p: v for p, v in staged.items() if v[0] != v[1]}
    write_all(root, pending)
    return report


def fixers_from_plan(plan):
    return [make(f["name"], f.get("args") or {}) for f in plan.get("fixers", [])]


def main(argv=None):
    """In-image entry point: python fixers.py apply --plan plan.json --report out.json TREE"""
    ap = argparse.ArgumentParser(prog="envbuild-fix")
    ap.add_argument("action", choices=["apply", "list"])
    ap.add_argument("tree")
    ap.add_argument("--plan", required=True)
    ap.add_argument("--report")
    ns = ap.parse_args(argv)
    with open(ns.plan) as fh:
        plan = json.load(fh)
    fixers = fixers_from_plan(plan)
    if ns.action == "list":
        for f in detect(ns.tree, fixers):
            print("%s:%d: %s: %s" % (f.path, f.line, f.fixer, f.why))
        return 0
    report = apply(ns.tree, fixers)
    summary = {"fixers": [{"name": fx.name, "args": fx.args, "files": report[fx.name]} for fx in fixers]}
    for item in summary["fixers"]:
        print("fixer %s: %d file(s) changed" % (item["name"], len(item["files"])))
    if ns.report:
        with open(ns.report, "w") as fh:
            json.dump(summary, fh, indent=2, sort_keys=True)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
