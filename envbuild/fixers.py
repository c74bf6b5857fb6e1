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
import ast
import json
import os
import re
import sys
import tempfile

PY = (".py",)
CXX = (".c", ".cc", ".cpp", ".cxx", ".cu", ".cuh", ".h", ".hpp")
SKIP_DIRS = {".git", "__pycache__", "build", "dist", ".eggs", "node_modules"}


class FixerError(Exception):
    """A fixer cannot make this change safely (the file is named); nothing is written."""


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
            new = self.fixed(relpath, old)
            if new != old:
                out[relpath] = (old, new)
        return out

    def fixed(self, relpath, text):
        """fix_text, checked: Python that compiled must still compile, or nothing of the fix is written."""
        new = self.fix_text(relpath, text)
        if new != text and relpath.endswith(".py") and _parse(text) is not None and _parse(new) is None:
            raise FixerError("%s: %s would leave code that does not compile; nothing was changed"
                             % (relpath, self.name))
        return new

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


def _parse(text):
    """The module's syntax tree, or None when it does not parse (Python 2 code, say)."""
    try:
        return ast.parse(text)
    except (SyntaxError, ValueError):
        return None


class _Source(object):
    """Character offsets for ast positions (which count UTF-8 bytes within a line)."""

    def __init__(self, text):
        self.text = text
        self.lines = text.splitlines(True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def offset(self, lineno, col_bytes):
        line = self.lines[lineno - 1] if lineno - 1 < len(self.lines) else ""
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col_bytes].decode("utf-8", "replace"))

    def span(self, node):
        return self.offset(node.lineno, node.col_offset), self.offset(node.end_lineno, node.end_col_offset)

    def whole_lines(self, node):
        """(start, end) of the lines a statement occupies, when nothing else shares them."""
        start, end = self.span(node)
        line_start = self.starts[node.lineno - 1]
        line_end = self.starts[node.end_lineno] if node.end_lineno < len(self.starts) else len(self.text)
        before, after = self.text[line_start:start], self.text[end:line_end]
        if before.strip() or (after.strip() and not after.strip().startswith("#")):
            return None
        return line_start, line_end


def _still_a_string(literal):
    try:
        return isinstance(ast.literal_eval(literal.strip()), str)
    except (SyntaxError, ValueError):
        return False


def _edit(text, edits):
    """Apply [(start, end, replacement)] (non-overlapping) in one linear pass."""
    out, pos = [], 0
    for start, end, repl in sorted(edits):
        out.append(text[pos:start])
        out.append(repl)
        pos = end
    out.append(text[pos:])
    return "".join(out)


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
    """Add `import os` where Python allows it: after the module docstring and any
    `from __future__` imports (which must come first), or after a shebang/encoding line."""
    tree = _parse(text)
    if tree is None:
        return text
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name == "os" and not a.asname for a in node.names):
            return text
    src = _Source(text)
    after = None
    for i, node in enumerate(tree.body):
        docstring = i == 0 and isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant) \
            and isinstance(node.value.value, str)
        if docstring or (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
            after = node
            continue
        break
    if after is not None:
        at = src.starts[after.end_lineno] if after.end_lineno < len(src.starts) else len(text)
        prefix = "" if text[:at].endswith("\n") else "\n"
        return text[:at] + prefix + "import os\n" + text[at:]
    i = 0
    while i < len(src.lines) and (src.lines[i].startswith("#!") or re.match(r"^#.*coding[:=]", src.lines[i])):
        i += 1
    return text[:src.starts[i]] + "import os\n" + text[src.starts[i]:]


# ------------------------------------------------------------------ fixers


class LocalRank(Fixer):
    name = "local-rank"
    why = "torch >= 2.0 launch passes --local-rank; accept it beside --local_rank (LOCAL_RANK env kept)"

    def fix_text(self, relpath, text):
        tree = _parse(text) if "--local_rank" in text else None
        if tree is None:
            return text
        src, edits = _Source(text), []
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_argument"):
                continue
            flags = [a for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            values = [a.value for a in flags]
            if "--local_rank" in values and "--local-rank" not in values:
                arg = flags[values.index("--local_rank")]
                start, end = src.span(arg)
                quote = text[start] if text[start] in "'\"" else "'"
                edits.append((end, end, ", %s--local-rank%s" % (quote, quote)))
        return _edit(text, edits)


class NumbaErrors(Fixer):
    """Imports from numba.errors become a try/except that works on both layouts, and attribute
    uses (numba.errors.X) go through a module bound by that same try/except, so the fixed code
    runs on numba < 0.49 (numba.errors) and >= 0.49 (numba.core.errors)."""
    name = "numba-errors"
    why = "numba >= 0.49 moved numba.errors to numba.core.errors"
    _marker = "except ImportError:  # numba < 0.49"
    _alias = "_numba_errors"

    def fix_text(self, relpath, text):
        tree = _parse(text) if "numba.errors" in text else None
        if tree is None:
            return text
        src, edits = _Source(text), []
        guarded = set()  # imports already inside our try/except
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(isinstance(h.type, ast.Name) and h.type.id == "ImportError"
                                                 for h in node.handlers):
                for sub in ast.walk(node):
                    guarded.add(id(sub))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "numba.errors" and node.level == 0 \
                    and id(node) not in guarded:
                lines = src.whole_lines(node)
                if lines is None:
                    continue  # shares its line with other code (`a; from numba.errors import X`): leave it
                ind = " " * node.col_offset
                names = _import_names(node.names)
                comment = text[src.span(node)[1]:lines[1]].strip()  # a trailing comment stays with it
                edits.append((lines[0], lines[1], "%stry:\n%s    from numba.core.errors import %s%s\n%s%s\n"
                              "%s    from numba.errors import %s\n" % (ind, ind, names, "  " + comment if comment else "",
                                                                       ind, self._marker, ind, names)))
        import_at = None  # the module-level `import numba` / `import numba.errors` that binds numba
        for node in tree.body:
            if isinstance(node, ast.Import) and any(a.name in ("numba", "numba.errors") and not a.asname
                                                    for a in node.names):
                import_at = node
                break
        uses = _dotted_uses(text, "numba", ("errors",))
        lines = src.whole_lines(import_at) if import_at is not None else None
        if uses and lines is not None and not isinstance(_parent_try(tree, import_at), ast.Try):
            binding = ("try:\n    from numba.core import errors as %s\n%s\n    from numba import errors as %s\n"
                       % (self._alias, self._marker, self._alias))
            names = list(dict.fromkeys("numba" if a.name == "numba.errors" and not a.asname else
                                       _import_names([a]) for a in import_at.names))
            edits.append((lines[0], lines[1], "import %s\n%s" % (", ".join(names), binding)))
            edits += [(start, end, self._alias) for start, end in uses]
        return _edit(text, edits)


def _import_names(aliases):
    """`a, b as c`: the names of an import statement as it spells them."""
    return ", ".join(a.name + (" as " + a.asname if a.asname else "") for a in aliases)


def _parent_try(tree, target):
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and target in node.body:
            return node
    return None


def _dotted_uses(text, first, seconds, prefix_only=True):
    """Spans of `first.second` (numba.errors; collections.X for any X of seconds) where it is used
    in code (strings and comments are skipped, and `import numba.errors` lines are left as they
    are): as an expression prefix (numba.errors.X), or, with prefix_only=False, anywhere
    (collections.Iterable). One tokenize pass, whatever the number of seconds."""
    import io
    import tokenize
    src = _Source(text)
    try:
        toks = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
                if t.type not in (tokenize.NL, tokenize.COMMENT)]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return []
    spans = []
    for i in range(len(toks) - 3):
        a, dot, b, dot2 = toks[i:i + 4]
        if (a.type == tokenize.NAME and a.string == first and dot.string == "." and b.string in seconds
                and (dot2.string == "." or not prefix_only)
                and not (i and toks[i - 1].string in (".", "import", "from"))):
            start = src.starts[a.start[0] - 1] + a.start[1]
            end = src.starts[b.end[0] - 1] + b.end[1]
            spans.append((start, end))
    return spans


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
    # mmdet/mmdet3d name the maximum mmcv_maximum_version, mmseg 0.x MMCV_MAX
    _re = re.compile(r"""^([ \t]*(mmcv_maximum_version|MMCV_MAX)\s*=\s*)(['"])([0-9][0-9a-z.]*)\3""", re.M)

    def fix_text(self, relpath, text):
        target = self.args.get("mmcv")
        if not target:
            return text

        def repl(m):
            strict_lt = re.search(r"<\s*digit_version\(\s*%s\s*\)" % m.group(2), text) is not None
            current = m.group(4)
            want = _bump_patch(target) if strict_lt else target
            if _vkey(current) >= _vkey(want):
                return m.group(0)
            return "%s%s%s%s" % (m.group(1), m.group(3), want, m.group(3))
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


class MmcvLayerClash(Fixer):
    name = "mmcv-layer-clash"
    why = "mmcv-full >= 1.4.6 registers the sparse conv layers mmdet3d 0.x registers too: KeyError at import"
    # Only the registrations of sparse conv classes (SparseConv3d, SubMConv3d, ...) are forced,
    # so the package's own classes keep the names its configs build; other layers stay as they are.
    _classes = re.compile(r"^(Sparse|SubM)\w*$")

    def fix_text(self, relpath, text):
        if "CONV_LAYERS" not in text:
            return text
        tree = _parse(text)
        if tree is None:
            return text
        src, edits = _Source(text), []
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ClassDef) and self._classes.match(node.name)):
                continue
            for deco in node.decorator_list:
                if (isinstance(deco, ast.Call) and not deco.args and not deco.keywords
                        and isinstance(deco.func, ast.Attribute) and deco.func.attr == "register_module"
                        and isinstance(deco.func.value, ast.Name) and deco.func.value.id == "CONV_LAYERS"):
                    end = src.span(deco)[1]  # just after ")": the argument goes before it
                    edits.append((end - 1, end - 1, "force=True"))
        return _edit(text, edits)


class SetupWithoutGpu(Fixer):
    name = "setup-without-gpu"
    why = "setup.py refuses to build CUDA ops without a visible GPU; image builds have none (FORCE_CUDA=1)"
    filenames = ("setup.py",)
    _re = re.compile(r"torch\.cuda\.is_available\(\)")

    def fix_text(self, relpath, text):
        if _parse(text) is None:
            return text
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
    torch 2.x, C++20 for the newest). Works on string literals of the parsed setup.py: a list
    element that is only the flag goes with its comma; a flag inside a longer string is cut out."""
    name = "cxx-standard"
    why = "newer torch headers need a newer C++ standard than setup.py asks for"
    filenames = ("setup.py",)
    _flag = re.compile(r"-std=c\+\+(11|14|0x|1y)\b")
    _inline = re.compile(r"[ \t]*-std=c\+\+(11|14|0x|1y)\b")

    def fix_text(self, relpath, text):
        if not self._flag.search(text):
            return text
        tree = _parse(text)
        if tree is None:
            return text
        std, src, edits, done = self.args.get("std"), _Source(text), [], set()
        if not std:
            for node in ast.walk(tree):
                if not isinstance(node, ast.List):
                    continue
                elts = node.elts
                gone = [i for i, e in enumerate(elts) if isinstance(e, ast.Constant) and isinstance(e.value, str)
                        and self._flag.fullmatch(e.value)]
                if not gone:
                    continue
                done.update(id(elts[i]) for i in gone)
                kept = [i for i in range(len(elts)) if i not in gone]
                if not kept:
                    edits.append((src.span(elts[0])[0], src.span(elts[-1])[1], ""))
                    continue
                for i in gone:  # an element before the last kept one goes with the comma after it
                    if i < kept[-1]:
                        edits.append((src.span(elts[i])[0], src.span(elts[i + 1])[0], ""))
                if gone[-1] > kept[-1]:  # trailing ones go with the comma before them
                    edits.append((src.span(elts[kept[-1]])[1], src.span(elts[-1])[1], ""))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in done \
                    and self._flag.search(node.value):
                start, end = src.span(node)
                literal = text[start:end]
                new = self._flag.sub("-std=" + std, literal) if std else self._inline.sub("", literal)
                if _still_a_string(new):  # implicitly joined literals ('a''b') can merge into nonsense
                    edits.append((start, end, new))
        return _edit(text, edits)


class CollectionsAbc(Fixer):
    """`from collections import Iterable` and `collections.Mapping` become collections.abc's,
    which every Python 3 has: the fixed code runs on 3.8 as on 3.10+. A from-import that mixes
    ABCs with other names (OrderedDict) is split in two; an `import collections` that attribute
    uses need gets `import collections.abc` beside it."""
    name = "collections-abc"
    why = "Python 3.10 removed the container ABCs (Iterable, Mapping, ...) from collections"
    # the names Python 3.3-3.9 still served from collections, with a deprecation warning
    ABCS = frozenset(("Awaitable", "Coroutine", "AsyncIterable", "AsyncIterator", "AsyncGenerator", "Hashable",
                      "Iterable", "Iterator", "Generator", "Reversible", "Sized", "Container", "Callable",
                      "Collection", "Set", "MutableSet", "Mapping", "MutableMapping", "MappingView", "KeysView",
                      "ItemsView", "ValuesView", "Sequence", "MutableSequence", "ByteString"))

    def fix_text(self, relpath, text):
        tree = _parse(text) if "collections" in text else None
        if tree is None:
            return text
        src, edits = _Source(text), []
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.module == "collections" and node.level == 0):
                continue
            abcs = [a for a in node.names if a.name in self.ABCS]
            lines = src.whole_lines(node) if abcs else None
            if lines is None:
                continue  # no ABC, or it shares its line with other code: left as it is
            rest = [a for a in node.names if a.name not in self.ABCS]
            ind = " " * node.col_offset
            comment = text[src.span(node)[1]:lines[1]].strip()
            new = ("%sfrom collections import %s\n" % (ind, _import_names(rest)) if rest else "")
            new += "%sfrom collections.abc import %s%s\n" % (ind, _import_names(abcs), "  " + comment if comment else "")
            edits.append((lines[0], lines[1], new))
        uses = _dotted_uses(text, "collections", self.ABCS, prefix_only=False) if "collections." in text else []
        import_at = next((n for n in tree.body if isinstance(n, ast.Import)
                          and any(a.name == "collections" and not a.asname for a in n.names)), None)
        import_lines = src.whole_lines(import_at) if import_at is not None else None
        if uses and import_lines is not None:
            edits += [(start, start + len("collections"), "collections.abc") for start, _ in uses]
            if not any(isinstance(n, ast.Import) and any(a.name == "collections.abc" for a in n.names)
                       for n in ast.walk(tree)):
                edits.append((import_lines[1], import_lines[1], "import collections.abc\n"))
        return _edit(text, edits)


FIXERS = {cls.name: cls for cls in (LocalRank, ThcToAten, NumbaErrors, MmcvVersionAssert, MmcvLayerClash, SetupWithoutGpu,
                                                CxxStandard, CollectionsAbc)}


# The arguments a fixer takes, each with the only shape it may have: they end up inside source
# files (a setup.py flag, a version string in mmdet's __init__), so nothing else gets through,
# whether it came from a flag, a plan.json or the resolver.
ARGS = {
    "mmcv-version-assert": {"mmcv": re.compile(r"^[0-9]+(\.[0-9]+){1,3}$")},  # ASCII digits: \d takes ١.٧
    "cxx-standard": {"std": re.compile(r"^c\+\+(14|17|20)$")},
}


def make(name, args=None):
    """A fixer by name, its arguments validated; ValueError names what is wrong."""
    if name not in FIXERS:
        raise KeyError(name)
    args = dict(args or {})
    allowed = ARGS.get(name, {})
    for key, value in args.items():
        pattern = allowed.get(key)
        if pattern is None:
            raise ValueError("fixer %s takes no argument %r" % (name, key))
        if not isinstance(value, str) or not pattern.match(value) or "\n" in value:
            raise ValueError("fixer %s: %s=%r is not allowed (expected %s)" % (name, key, value, pattern.pattern))
    return FIXERS[name](**args)


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
            new = fx.fixed(relpath, current)
            if new != current:
                original = staged[relpath][0] if relpath in staged else current
                staged[relpath] = (original, new)
                changed.append(relpath)
        report[fx.name] = changed
    pending = {p: v for p, v in staged.items() if v[0] != v[1]}
    write_all(root, pending)
    return report


def installed_roots(dist_name):
    """The package folders an installed distribution put in site-packages, found from its
    metadata without importing it (an import may be what fails)."""
    from importlib import metadata
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise FixerError("%s: not installed, so its code cannot be fixed" % dist_name)
    tops = (dist.read_text("top_level.txt") or "").split()
    if not tops:
        tops = sorted({str(f).split("/")[0] for f in dist.files or [] if str(f).endswith(".py") and "/" in str(f)})
    roots = [str(dist.locate_file(t)) for t in tops if os.path.isdir(str(dist.locate_file(t)))]
    if not roots:
        raise FixerError("%s: no package folder found in its installed files" % dist_name)
    return roots


def apply_installed(plan_fixers, fixers):
    """Run each fixer over the installed distributions the Plan names for it; {fixer: [files]}."""
    report = {}
    for item, fx in zip(plan_fixers, fixers):
        changed = []
        for dist_name in item.get("installed") or []:
            for root in installed_roots(dist_name):
                changed += [os.path.join(root, f) for f in apply(root, [fx])[fx.name]]
        report[fx.name] = changed
    return report


def fixers_from_plan(plan):
    """The Plan's fixers; ValueError (or KeyError for an unknown name) when it is malformed."""
    items = plan.get("fixers", []) if isinstance(plan, dict) else None
    if not isinstance(items, list) or not all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in items):
        raise ValueError("plan.json has no list of fixers with names")
    return [make(f["name"], f.get("args") or {}) for f in items]


def main(argv=None):
    """In-image entry point: python fixers.py apply --plan plan.json --report out.json TREE"""
    ap = argparse.ArgumentParser(prog="envbuild-fix")
    ap.add_argument("action", choices=["apply", "list", "apply-installed"])
    ap.add_argument("tree", nargs="?", help="the model tree (not for apply-installed: the Plan names the packages)")
    ap.add_argument("--plan", required=True)
    ap.add_argument("--report")
    ns = ap.parse_args(argv)
    try:
        with open(ns.plan) as fh:
            plan = json.load(fh)
        fixers = fixers_from_plan(plan)
    except (OSError, ValueError, KeyError) as exc:
        print("envbuild-fix: error: cannot use plan %s: %s" % (ns.plan, exc), file=sys.stderr)
        return 2
    if ns.action != "apply-installed" and not ns.tree:
        ap.error("%s needs the model tree" % ns.action)
    if ns.action == "list":
        for f in detect(ns.tree, fixers):
            print("%s:%d: %s: %s" % (f.path, f.line, f.fixer, f.why))
        return 0
    try:
        report = apply_installed(plan["fixers"], fixers) if ns.action == "apply-installed" else apply(ns.tree, fixers)
    except FixerError as exc:
        print("envbuild-fix: error: %s" % exc, file=sys.stderr)
        return 1
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
