"""Porting fixers: small, idempotent source transformations for old model repos.

Each fixer has a name, a one-line reason, detect(root) -> findings and apply(root).
A fixer never writes outside the tree it was given and never follows a symlink.
All new contents are computed first and then written (atomically, file by file, with
rollback), so a failure leaves no half-applied fix.

Fixers edit by the positions the parser gives, and count lines as Python's tokenizer does
(at \r\n, \r and \n only: _lines). A file keeps its line endings (an inserted line takes the
file's own), its UTF-8 BOM and its declared encoding; a file a fixer wants but cannot read
(not UTF-8, nor its declared coding) or must change but cannot write (read-only) is named in
the result's .problems, never skipped without a word.

This file also runs inside images (the build applies the Plan's fixers), so it must
work on Python 3.8 with only the standard library.
"""

from __future__ import annotations

import argparse
import ast
import collections
import io
import json
import os
import re
import sys
import tempfile
import tokenize

PY = (".py",)
CXX = (".c", ".cc", ".cpp", ".cxx", ".cu", ".cuh", ".h", ".hpp")
SKIP_DIRS = {".git", "__pycache__", "build", "dist", ".eggs", "node_modules"}


class FixerError(Exception):
    """A fixer cannot make this change safely (the file is named); nothing is written."""


class Report(dict):
    """apply's result: {fixer: [changed files]}, and .problems: [(path, what, why)] for each file
    a fixer wanted but could not read ("could not read") or had to change but could not write
    ("could not write"); such a file is left as it was."""

    def __init__(self, *args, **kwargs):
        dict.__init__(self, *args, **kwargs)
        self.problems = []


class Findings(list):
    """detect's result: [Finding], and .problems as in Report (the files no fixer could read)."""

    def __init__(self, *args):
        list.__init__(self, *args)
        self.problems = []


def _note(problems, item):
    if problems is not None and item not in problems:
        problems.append(item)


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

    def prepare(self, root):
        """Read what the fix of one file needs from others in the tree (before any fix_text)."""

    def changes(self, root, problems=None):
        """{relpath: (old, new)} for every file this fixer would change (unreadable ones go to problems)."""
        self.prepare(root)
        out = {}
        for relpath in iter_files(root, problems):
            if not self.wants(relpath):
                continue
            old = _load_or_note(root, relpath, problems)
            if old is None:
                continue
            old = old[0]
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

    def detect(self, root, problems=None):
        findings = []
        for relpath, (old, new) in sorted(self.changes(root, problems).items()):
            old_lines, new_lines = _lines(old), _lines(new)
            for i, line in enumerate(old_lines):
                if i >= len(new_lines) or new_lines[i] != line:
                    findings.append(Finding(relpath, i + 1, self.name, self.why, line.strip()))
                    break
        return findings


# ------------------------------------------------------------------ file walking


def iter_files(root, problems=None):
    """Relative paths of regular files under root; symlinks are never followed. A folder that
    cannot be listed goes to problems (when given) as "could not read"."""
    root = os.path.realpath(root)

    def unlistable(exc):
        _note(problems, (os.path.relpath(exc.filename or root, root), "could not read", exc.strerror or str(exc)))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable, followlinks=False):
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


BOM = b"\xef\xbb\xbf"


def load(root, relpath):
    """(text, fmt, data): the file's text (without a UTF-8 BOM), how to write it back and its
    bytes. Python files are read in their declared coding (PEP 263), other files as UTF-8.
    OSError or ValueError says why the file cannot be read as source."""
    ok, full = _inside(root, relpath)
    if not ok:
        raise OSError("outside the tree")
    with open(full, "rb") as fh:
        data = fh.read()
    bom = data.startswith(BOM)
    body = data[len(BOM):] if bom else data
    encoding = "utf-8"
    if relpath.endswith(".py"):
        try:
            encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        except SyntaxError as exc:  # not UTF-8 without a coding line, or a coding Python does not know
            raise ValueError("not UTF-8 text, nor in a coding it declares: %s" % exc)
        encoding = "utf-8" if encoding == "utf-8-sig" else encoding
    try:
        text = body.decode(encoding)
    except (UnicodeDecodeError, LookupError) as exc:
        raise ValueError("not %s text: %s" % ("UTF-8" if encoding == "utf-8" else encoding, exc))
    if _encode(text, (encoding, bom)) != data:
        raise ValueError("its %s text does not read back byte for byte" % encoding)
    return text, (encoding, bom), data


def _encode(text, fmt):
    encoding, bom = fmt
    return (BOM if bom else b"") + text.encode(encoding)


def _load_or_note(root, relpath, problems):
    try:
        return load(root, relpath)
    except (OSError, ValueError) as exc:
        _note(problems, (relpath, "could not read", getattr(exc, "strerror", None) or str(exc)))
        return None


def read_text(root, relpath):
    """The file's text as the fixers see it, or None when it cannot be read (see load)."""
    try:
        return load(root, relpath)[0]
    except (OSError, ValueError):
        return None


def _unwritable(root, relpath):
    """Why the file cannot be replaced, or None. A read-only file (no write bit) is never
    rewritten, even by root: its owner made it so."""
    ok, full = _inside(root, relpath)
    if not ok or os.path.islink(os.path.join(os.path.realpath(root), relpath)):
        return "outside the tree"
    try:
        mode = os.stat(full).st_mode
    except OSError as exc:
        return exc.strerror or str(exc)
    if not mode & 0o222:
        return "read-only (mode %03o)" % (mode & 0o777)
    if not os.access(full, os.W_OK):
        return "no write permission"
    if not os.access(os.path.dirname(full), os.W_OK | os.X_OK):
        return "its folder is not writable"
    return None


def write_all(root, changes):
    """Write {relpath: (old_bytes, new_bytes)} atomically per file; roll back everything on failure."""
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


def _atomic_write(full, data):
    mode = os.stat(full).st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(full), prefix=".envbuild-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
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
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


def _lines(text):
    """The lines of text, each with its ending, split exactly where Python's tokenizer (and so
    ast's line numbers) splits them: at \\r\\n, \\r and \\n only. str.splitlines also splits at
    \\f, \\v, \\x1c-\\x1e, \\x85, \\u2028 and \\u2029, which Python takes as part of a line."""
    return _LINE.findall(text)


def _ending(line):
    """The line's ending: \\r\\n, \\r, \\n or '' (the last line of a file without one)."""
    return "\r\n" if line.endswith("\r\n") else line[-1:] if line[-1:] in ("\r", "\n") else ""


def _newline(text):
    """The line ending the file mostly uses (\\n when it has none): the one inserted lines get."""
    crlf = text.count("\r\n")
    return max((text.count("\n") - crlf, 2, "\n"), (crlf, 1, "\r\n"), (text.count("\r") - crlf, 0, "\r"))[2]


class _Source(object):
    """Character offsets for ast positions (which count UTF-8 bytes within a line)."""

    def __init__(self, text):
        self.text = text
        self.lines = _lines(text)
        self.nl = _newline(text)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def offset(self, lineno, col_bytes):
        if lineno - 1 >= len(self.lines):
            return len(self.text)
        line = self.lines[lineno - 1]
        if line.isascii():
            return self.starts[lineno - 1] + min(col_bytes, len(line))
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col_bytes].decode("utf-8", "replace"))

    def line_end(self, lineno):
        """Offset just past line lineno (1-based), its ending included."""
        return self.starts[min(lineno, len(self.lines))]

    def indent(self, node):
        """The text before a statement on its first line (its indentation, as the file spells it)."""
        return self.text[self.starts[node.lineno - 1]:self.offset(node.lineno, node.col_offset)]

    def rest_of_line(self, node):
        """What follows a node on its last line, without the line ending (a comment, spaces)."""
        tail = self.text[self.span(node)[1]:self.line_end(node.end_lineno)]
        return tail[:len(tail) - len(_ending(tail))]

    def span(self, node):
        return self.offset(node.lineno, node.col_offset), self.offset(node.end_lineno, node.end_col_offset)

    def whole_lines(self, node):
        """(start, end) of the lines a statement occupies, when nothing else shares them."""
        start, end = self.span(node)
        line_start = self.starts[node.lineno - 1]
        line_end = self.line_end(node.end_lineno)
        before, after = self.text[line_start:start], self.text[end:line_end]
        if before.strip(" \t\f") or (after.strip() and not after.strip().startswith("#")):
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
        at = src.line_end(after.end_lineno)
    else:
        i = 0
        while i < len(src.lines) and (src.lines[i].startswith("#!") or re.match(r"^#.*coding[:=]", src.lines[i])):
            i += 1
        at = src.starts[i]
    prefix = "" if at == 0 or _ending(text[:at]) else src.nl  # after a last line that has no ending
    return text[:at] + prefix + "import os" + src.nl + text[at:]


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
                ind, nl, end = src.indent(node), src.nl, _ending(text[lines[0]:lines[1]])
                names = _import_names(node.names)
                comment = src.rest_of_line(node).lstrip(" \t\f")  # a trailing comment stays with it
                edits.append((lines[0], lines[1], "%stry:%s%s    from numba.core.errors import %s%s%s%s%s%s"
                              "%s    from numba.errors import %s%s"
                              % (ind, nl, ind, names, "  " + comment if comment else "", nl, ind, self._marker, nl,
                                 ind, names, end)))
        import_at = None  # the module-level `import numba` / `import numba.errors` that binds numba
        for node in tree.body:
            if isinstance(node, ast.Import) and any(a.name in ("numba", "numba.errors") and not a.asname
                                                    for a in node.names):
                import_at = node
                break
        uses = _dotted_uses(tree, src, "numba", ("errors",))
        lines = src.whole_lines(import_at) if import_at is not None else None
        if uses and lines is not None and not isinstance(_parent_try(tree, import_at), ast.Try):
            ind, nl, end = src.indent(import_at), src.nl, _ending(text[lines[0]:lines[1]])
            binding = ("%stry:%s%s    from numba.core import errors as %s%s%s%s%s%s    from numba import errors as %s%s"
                       % (ind, nl, ind, self._alias, nl, ind, self._marker, nl, ind, self._alias, end))
            names = list(dict.fromkeys("numba" if a.name == "numba.errors" and not a.asname else
                                       _import_names([a]) for a in import_at.names))
            edits.append((lines[0], lines[1], "%simport %s%s%s" % (ind, ", ".join(names), nl, binding)))
            edits += [(span[0], span[1], self._alias) for span, _ in uses]
        return _edit(text, edits)


def _import_names(aliases):
    """`a, b as c`: the names of an import statement as it spells them."""
    return ", ".join(a.name + (" as " + a.asname if a.asname else "") for a in aliases)


def _parent_try(tree, target):
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and target in node.body:
            return node
    return None


def _dotted_uses(tree, src, first, seconds, prefix_only=True):
    """(span of `first.second`, span of `first`) for each use of numba.errors (collections.X for
    any X of seconds) in code, as the parser found it, so strings, comments and `import
    numba.errors` are never touched: as an expression prefix (numba.errors.X), or, with
    prefix_only=False, anywhere (collections.Iterable)."""
    prefixes = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)} if prefix_only else None
    spans = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in seconds and isinstance(node.value, ast.Name)
                and node.value.id == first and (prefixes is None or id(node) in prefixes)):
            spans.append((src.span(node), src.span(node.value)))
    return sorted(spans)


# C and C++ lines end at \\r\\n, \\r or \\n (re's ^ and $ know only \\n): the start of a line, and
# the rest of one with its ending (none on a last line without one).
_BOL = r"(?:(?<=[\r\n])|\A)"
_EOL = r"[^\r\n]*(?P<eol>\r\n|\r|\n|\Z)"


def _scope_nodes(scope):
    """The nodes of one module, class or function body, not those of the functions, classes and
    lambdas it defines (their names are their own)."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def _dotted(node):
    """`a.b.c` for a Name or an Attribute chain on one; None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


class TorchLoadWeightsOnly(Fixer):
    """`torch.load(f)` without weights_only gets weights_only=False: what every torch before 2.6
    did. Old checkpoints pickle more than tensors (numpy scalars, config objects, mmcv's meta), and
    torch >= 2.6 refuses those by default. Calls that pass weights_only, or **kwargs that may,
    are left alone; so is a torch.load the file defines or imports from elsewhere."""
    name = "torch-load-weights-only"
    why = "torch >= 2.6 loads checkpoints with weights_only=True; old checkpoints hold more than tensors"

    def fix_text(self, relpath, text):
        tree = _parse(text) if "load" in text and "torch" in text else None
        if tree is None:
            return text
        loads = self._load_names(tree)
        src, edits = _Source(text), []
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and _dotted(node.func) in loads):
                continue
            if any(k.arg in ("weights_only", None) for k in node.keywords) or len(node.args) >= 4:
                continue  # said already, maybe through **kwargs; or passed positionally (pickle_module, ...)
            if any(isinstance(a, ast.Starred) for a in node.args) or not (node.args or node.keywords):
                continue
            if len(node.args) == 1 and not node.keywords and isinstance(node.args[0], ast.GeneratorExp):
                continue  # a bare generator argument cannot take a keyword beside it
            # right after the last argument and any parentheses of its own (keyword nodes have no
            # position on Python 3.8: their value's), inside the call's parentheses
            lo = text.index("(", src.span(node.func)[1])
            hi = src.span(node)[1]
            last = max((src.span(a) for a in node.args + [k.value for k in node.keywords]), key=lambda s: s[1])
            end = _widen(text, last, lo, hi)[1]
            edits.append((end, end, ", weights_only=False"))
        return _edit(text, edits)

    @staticmethod
    def _load_names(tree):
        """How this module spells torch.load: torch.load, an alias of torch, or a from-import."""
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update((a.asname + ".load") if a.asname else "torch.load" for a in node.names
                             if a.name == "torch" or (a.name.startswith("torch.") and not a.asname))
            elif isinstance(node, ast.ImportFrom) and node.module == "torch" and not node.level:
                names.update(a.asname or a.name for a in node.names if a.name == "load")
        return names


class ThcToAten(Fixer):
    name = "thc-to-aten"
    why = "THC was removed in torch 1.11: map its headers and helpers to ATen/c10"
    suffixes = CXX
    # A line starts after \\r\\n, \\r or \\n and keeps its own ending (CRLF files stay CRLF).
    _includes = [
        (re.compile(_BOL + r'[ \t]*#include\s*[<"]THC/THC\.h[>"]' + _EOL), r"#include <ATen/cuda/CUDAContext.h>\g<eol>"),
        (re.compile(_BOL + r'[ \t]*#include\s*[<"]THC/THCAtomics\.cuh[>"]' + _EOL), r"#include <ATen/cuda/Atomic.cuh>\g<eol>"),
        (re.compile(_BOL + r'[ \t]*#include\s*[<"]THC/THCDeviceUtils\.cuh[>"]' + _EOL),
         r"#include <ATen/cuda/DeviceUtils.cuh>\g<eol>"),
        (re.compile(_BOL + r'[ \t]*#include\s*[<"]THC/[A-Za-z]+\.h[>"]' + _EOL), r"#include <ATen/cuda/CUDAContext.h>\g<eol>"),
    ]
    _subs = [
        (re.compile(_BOL + r"[ \t]*extern\s+THCState\s*\*\s*state\s*;" + _EOL), ""),
        (re.compile(_BOL + r"[ \t]*THCState\s*\*\s*state\s*=[^;]*;" + _EOL), ""),
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
        extra, nl = [], _newline(text)
        if "at::ceil_div(" in new and "ATen/ceil_div.h" not in new:
            extra.append("#include <ATen/ceil_div.h>" + nl)
        if "CUDACachingAllocator::raw_" in new and "c10/cuda/CUDACachingAllocator.h" not in new:
            extra.append("#include <c10/cuda/CUDACachingAllocator.h>" + nl)
        if "C10_CUDA_CHECK(" in new and "c10/cuda/CUDAException.h" not in new and "ATen/cuda/CUDAContext.h" not in new:
            extra.append("#include <c10/cuda/CUDAException.h>" + nl)
        if "at::cuda::getCurrentCUDAStream" in new and "ATen/cuda/CUDAContext.h" not in new:
            extra.append("#include <ATen/cuda/CUDAContext.h>" + nl)
        if extra:
            new = _insert_after_includes(new, "".join(extra))
        # one CUDAContext include is enough
        again = list(self._context.finditer(new))[1:]
        return _edit(new, [(m.start(), m.end(), "") for m in again])

    _context = re.compile(_BOL + r"#include <ATen/cuda/CUDAContext\.h>(?:\r\n|\r|\n)")


def _insert_after_includes(text, block):
    matches = list(re.finditer(_BOL + r"[ \t]*#include" + _EOL, text))
    if not matches:
        return block + text
    last = matches[-1]
    return text[:last.end()] + ("" if last.group("eol") else _newline(text)) + block + text[last.end():]


class MmcvVersionAssert(Fixer):
    name = "mmcv-version-assert"
    why = "mmdet/mmseg/mmdet3d assert an mmcv maximum below the version the port uses"
    # mmdet/mmdet3d name the maximum mmcv_maximum_version, mmseg 0.x MMCV_MAX: `NAME = '1.4.0'`
    _names = ("mmcv_maximum_version", "MMCV_MAX")
    _literal = re.compile(r"""([uU]?)(['"])([0-9][0-9a-z.]*)\2""")

    def fix_text(self, relpath, text):
        target = self.args.get("mmcv")
        tree = _parse(text) if target and any(n in text for n in self._names) else None
        if tree is None:
            return text
        src, edits = _Source(text), []
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id in self._names and isinstance(node.value, ast.Constant)):
                continue
            start, end = src.span(node.value)
            m = self._literal.fullmatch(text[start:end])
            if not m:
                continue
            strict_lt = re.search(r"<\s*digit_version\(\s*%s\s*\)" % node.targets[0].id, text) is not None
            want = _bump_patch(target) if strict_lt else target
            if _vkey(m.group(3)) < _vkey(want):
                edits.append((start, end, "%s%s%s%s" % (m.group(1), m.group(2), want, m.group(2))))
        return _edit(text, edits)


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
    _new = "(torch.cuda.is_available() or os.getenv('FORCE_CUDA', '0') == '1')"

    def fix_text(self, relpath, text):
        """Each torch.cuda.is_available() in the condition of an if/elif that does not already
        mention FORCE_CUDA (a fixed one does) also accepts FORCE_CUDA=1."""
        tree = _parse(text) if "is_available" in text else None
        if tree is None:
            return text
        src, edits = _Source(text), []
        for node in ast.walk(tree):
            if not isinstance(node, ast.If) or "FORCE_CUDA" in text[slice(*src.span(node.test))]:
                continue
            for sub in ast.walk(node.test):
                if (isinstance(sub, ast.Call) and not sub.args and not sub.keywords and isinstance(sub.func, ast.Attribute)
                        and sub.func.attr == "is_available" and isinstance(sub.func.value, ast.Attribute)
                        and sub.func.value.attr == "cuda" and isinstance(sub.func.value.value, ast.Name)
                        and sub.func.value.value.id == "torch"):
                    edits.append(src.span(sub) + (self._new,))
        return _ensure_import_os(_edit(text, edits)) if edits else text


class CxxStandard(Fixer):
    """With a Plan's standard (args std=c++17): raise an old -std pin to it. Without one: drop the
    pin, so torch's extension builder passes the standard its own headers need (C++17 for
    torch 2.x, C++20 for the newest). Works on string literals of the parsed setup.py: a list,
    tuple or set element that is only the flag goes with its comma (a tuple keeps the comma a
    1-tuple needs; ('-std=c++14',) becomes ()); a flag inside a longer string is cut out. A
    string that is only the flag never becomes '' (gcc takes an empty argument for a file
    name): as a dict value or an extra_*_args keyword it becomes [] (torch's BuildExtension
    appends its own flags to that list), elsewhere a flag that does nothing (_HARMLESS)."""
    name = "cxx-standard"
    why = "newer torch headers need a newer C++ standard than setup.py asks for"
    filenames = ("setup.py",)
    _flag = re.compile(r"-std=c\+\+(11|14|0x|1y)\b")
    _inline = re.compile(r"[ \t]*-std=c\+\+(11|14|0x|1y)\b")
    _HARMLESS = "-DENVBUILD_STD_LEFT_TO_TORCH"  # a macro nobody reads: gcc, clang and nvcc accept it
    _quote = re.compile(r"""([A-Za-z]*)('\'\'|\"\"\"|'|\")""")

    def fix_text(self, relpath, text):
        if not self._flag.search(text):
            return text
        tree = _parse(text)
        if tree is None:
            return text
        std, src, edits, done = self.args.get("std"), _Source(text), [], set()
        # the parts of an f-string carry the f-string's position (before 3.12): never edited
        formatted = {id(n) for f in ast.walk(tree) if isinstance(f, ast.JoinedStr) for n in ast.walk(f)}
        strings = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                   and id(n) not in formatted and self._flag.search(n.value)]
        if not std:
            only = {id(n) for n in strings if self._flag.fullmatch(n.value.strip())}
            for node in ast.walk(tree):
                if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
                    gone = [i for i, e in enumerate(node.elts) if id(e) in only]
                    if gone:
                        done.update(id(node.elts[i]) for i in gone)  # dropped, or left as they are
                        edits += self._drop(text, src, node, gone)
        as_list = set()  # where a list of flags is expected: dict values, extra_compile_args=...
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                as_list.update(id(v) for v in node.values)
            elif isinstance(node, ast.keyword) and node.arg in ("extra_compile_args", "extra_link_args"):
                as_list.add(id(node.value))
        for node in strings:
            if id(node) in done:
                continue
            start, end = src.span(node)
            literal = text[start:end]
            new = self._flag.sub("-std=" + std, literal) if std else self._inline.sub("", literal)
            if not _still_a_string(new):  # implicitly joined literals ('a''b') can merge into nonsense
                continue
            if not ast.literal_eval(new.strip()).strip():  # nothing left: never an empty argument
                quote = self._quote.match(literal)
                if id(node) in as_list:
                    new = "[]"
                elif quote:
                    new = quote.group(1) + quote.group(2) + self._HARMLESS + quote.group(2)
                else:
                    continue
            edits.append((start, end, new))
        return _edit(text, edits)

    @staticmethod
    def _drop(text, src, node, gone):
        """Edits that take the elements `gone` out of a list, tuple or set display with their
        commas, checked: the display must still parse to one of its kind with the rest of its
        elements, or it is left as it is (no edit)."""
        elts = node.elts
        kept = [i for i in range(len(elts)) if i not in gone]
        node_start, node_end = src.span(node)
        span = [_widen(text, src.span(e), node_start, node_end) for e in elts]
        comma = _past_comma(text, span[-1][1], node_end)  # past a trailing comma, if there is one
        if not kept:
            if isinstance(node, ast.List):
                edits = [(span[0][0], comma, "")]
            else:
                edits = [(node_start, node_end, "()" if isinstance(node, ast.Tuple) else "set()")]
        else:
            edits = [(span[i][0], span[i + 1][0], "") for i in gone if i < kept[-1]]
            needs_comma = isinstance(node, ast.Tuple) and len(kept) == 1 and comma == span[-1][1]
            if gone[-1] > kept[-1]:  # trailing ones go with the comma before them
                edits.append((span[kept[-1]][1], span[-1][1], "," if needs_comma else ""))
            elif needs_comma:
                edits.append((span[-1][1], span[-1][1], ","))
        shifted = [(a - node_start, b - node_start, r) for a, b, r in edits]
        try:
            after = ast.parse("(" + _edit(text[node_start:node_end], shifted) + "\n)", mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return []
        if not kept and not isinstance(node, ast.List):
            ok = isinstance(after, ast.Tuple) and not after.elts if isinstance(node, ast.Tuple) else \
                isinstance(after, ast.Call) and not after.args
        else:
            ok = type(after) is type(node) and len(after.elts) == len(kept)
        return edits if ok else []


def _widen(text, span, lo, hi):
    """An element's span with the parentheses around it (`('-O3')`), within lo:hi but never
    the display's own."""
    start, end = span
    while True:
        b, a = start - 1, end
        while b > lo and text[b] in " \t\f\r\n\\":
            b -= 1
        while a < hi - 1 and text[a] in " \t\f\r\n\\":
            a += 1
        if not (lo <= b and a < hi and text[b] == "(" and text[a] == ")") or (b == lo and a == hi - 1):
            return start, end
        start, end = b, a + 1


def _past_comma(text, pos, limit):
    """The offset just past a comma that follows pos with only blanks, line breaks, backslash
    continuations and comments between (before limit), or pos when none does."""
    i = pos
    while i < limit:
        c = text[i]
        if c == ",":
            return i + 1
        if c == "#":
            while i < limit and text[i] not in "\r\n":
                i += 1
        elif c in " \t\f\r\n\\":
            i += 1
        else:
            break
    return pos


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
            ind, nl, end = src.indent(node), src.nl, _ending(text[lines[0]:lines[1]])
            comment = src.rest_of_line(node).lstrip(" \t\f")
            new = ("%sfrom collections import %s%s" % (ind, _import_names(rest), nl) if rest else "")
            new += "%sfrom collections.abc import %s%s%s" % (ind, _import_names(abcs), "  " + comment if comment else "", end)
            edits.append((lines[0], lines[1], new))
        uses = _dotted_uses(tree, src, "collections", self.ABCS, prefix_only=False) if "collections" in text else []
        import_at = next((n for n in tree.body if isinstance(n, ast.Import)
                          and any(a.name == "collections" and not a.asname for a in n.names)), None)
        import_lines = src.whole_lines(import_at) if import_at is not None else None
        if uses and import_lines is not None:
            edits += [(name[0], name[1], "collections.abc") for _, name in uses]
            if not any(isinstance(n, ast.Import) and any(a.name == "collections.abc" for a in n.names)
                       for n in ast.walk(tree)):
                at, nl = import_lines[1], src.nl
                line = src.indent(import_at) + "import collections.abc"
                ended = _ending(text[import_lines[0]:at])
                edits.append((at, at, line + nl if ended else nl + line))
        return _edit(text, edits)


class MmcvParallel(Fixer):
    """mmcv-full 1.x's MMDataParallel and MMDistributedDataParallel reach into torch.nn.parallel,
    whose internals torch 2.1 changed: `_get_stream` takes a torch.device where it took a GPU
    index, and DistributedDataParallel no longer has `_use_replicated_tensor_module`. A module
    that imports `_get_stream` from torch.nn.parallel._functions and imports torch passes
    torch.device("cuda", index); the flag is read with getattr(..., False), what it held on every
    torch that had it unless replicated tensors were switched on. Only mmcv's parallel files."""
    name = "mmcv-parallel"
    why = ("torch 2.1 changed the nn.parallel internals mmcv-full 1.x's data-parallel wrappers call "
           "(_get_stream takes a device; DDP dropped _use_replicated_tensor_module): AttributeError at "
           "the first training step")
    FLAG = "_use_replicated_tensor_module"
    FILES = ("parallel/_functions.py", "parallel/distributed.py")

    def wants(self, relpath):
        return relpath.replace(os.sep, "/").endswith(self.FILES)

    def fix_text(self, relpath, text):
        tree = _parse(text) if ("_get_stream" in text or self.FLAG in text) else None
        if tree is None:
            return text
        src, edits = _Source(text), []
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == self.FLAG and isinstance(node.ctx, ast.Load)
                    and isinstance(node.value, ast.Name)):
                start, end = src.span(node)
                edits.append((start, end, "getattr(%s, %r, False)" % (node.value.id, self.FLAG)))
        streams, torch_name = self._imports(tree)
        for node in ast.walk(tree):
            if not (torch_name and isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in streams and len(node.args) == 1 and not node.keywords):
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Starred) or _dotted(getattr(arg, "func", None)) == torch_name + ".device":
                continue  # a device already (a fixed file, or code written for torch >= 2.1)
            start, end = src.span(arg)
            edits.append((start, end, "%s.device('cuda', %s)" % (torch_name, text[start:end])))
        return _edit(text, edits)

    @staticmethod
    def _imports(tree):
        """The names this module gives torch.nn.parallel._functions._get_stream, and torch's name."""
        streams, torch_name = set(), None
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module == "torch.nn.parallel._functions" and not node.level:
                streams.update(a.asname or a.name for a in node.names if a.name == "_get_stream")
            elif isinstance(node, ast.Import):
                torch_name = next((a.asname or a.name for a in node.names if a.name == "torch"), torch_name)
        return streams, torch_name


class FlashAttnUnpadInput(Fixer):
    """`x, idx, cu, n = unpad_input(x, mask)` keeps the first four values: flash-attn 2.7 made
    flash_attn.bert_padding.unpad_input return a fifth (the used sequence lengths, beside its new
    unused_mask argument), so code written for 2.0-2.6 stops with "too many values to unpack" at
    its first forward with a padding mask. `[:4]` is a no-op on the older four-value return, so the
    fixed code runs with either. Only unpad_input imported from flash_attn is touched: unpacked
    where it is called, or through a name assigned once in its function (`out = unpad_input(...)`,
    then `x, idx, cu, n = out`)."""
    name = "flash-attn-unpad-input"
    why = "flash-attn >= 2.7's unpad_input returns five values; code for 2.0-2.6 unpacks four"

    def fix_text(self, relpath, text):
        tree = _parse(text) if "unpad_input" in text and "flash_attn" in text else None
        if tree is None:
            return text
        names = self._unpad_names(tree)
        src, edits = _Source(text), []
        for scope in ast.walk(tree):
            if not isinstance(scope, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            nodes = list(_scope_nodes(scope))
            stores = collections.Counter(n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
            unpacked = {n.value.id for n in nodes
                        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Name) and self._four(n.targets)}
            for node in nodes:
                if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                        and _dotted(node.value.func) in names):
                    continue
                through = [t.id for t in node.targets if isinstance(t, ast.Name)]
                if self._four(node.targets) or (
                        len(node.targets) == len(through) == 1 and through[0] in unpacked and stores[through[0]] == 1):
                    end = src.span(node.value)[1]
                    edits.append((end, end, "[:4]"))
        return _edit(text, edits)

    @staticmethod
    def _four(targets) -> bool:
        """Every target unpacks exactly four names (no starred one)."""
        return all(isinstance(t, (ast.Tuple, ast.List)) and len(t.elts) == 4
                   and not any(isinstance(e, ast.Starred) for e in t.elts) for t in targets)

    @staticmethod
    def _unpad_names(tree):
        """How this module spells flash_attn.bert_padding.unpad_input; a bare name the module also
        binds otherwise (a def, an assignment, a parameter, another import) is not sure: left out."""
        names, others = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if not node.level and node.module == "flash_attn.bert_padding" and a.name in ("unpad_input", "*"):
                        names.add(a.asname or "unpad_input")
                    elif not node.level and node.module == "flash_attn" and a.name == "bert_padding":
                        names.add((a.asname or a.name) + ".unpad_input")
                    else:
                        others.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "flash_attn.bert_padding" and a.asname:
                        names.add(a.asname + ".unpad_input")
                    elif a.name == "flash_attn" and a.asname:
                        names.add(a.asname + ".bert_padding.unpad_input")
                    elif a.name == "flash_attn" or a.name.startswith("flash_attn."):
                        names.add("flash_attn.bert_padding.unpad_input")
                    else:
                        others.add((a.asname or a.name).split(".")[0])
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                others.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                others.add(node.id)
            elif isinstance(node, ast.arg):
                others.add(node.arg)
        return names - others


class FlashAttnHeadDims(Fixer):
    """flash-attn 2.x compiles one kernel file per head dim, dtype and direction (85 objects in
    2.7.4, hours for two archs on a small builder); a model calls one or two head dims. This keeps
    the files of the head dims given (dims="32+64": the kernels' dims, a call's head dim rounds up
    to the next) in setup.py's sources, and gives every kernel it drops a stand-in in
    flash_api.cpp that raises a clear error, so the module still links and imports, and a call with
    another head dim says what was left out instead of crashing. Signatures of the stand-ins are
    read from the dropped files themselves (their template arguments differ between releases)."""
    name = "flash-attn-head-dims"
    why = "compile flash-attn's kernels only for the head dims the model calls"
    API = "csrc/flash_attn/flash_api.cpp"
    KERNEL = re.compile(r"""(?P<q>["'])(?P<path>csrc/flash_attn/src/flash_(?:fwd|bwd|fwd_split)_hdim(?P<dim>[0-9]+)_"""
                        r"""[a-z0-9_]*\.cu)(?P=q)""")
    SPECIALIZATION = re.compile(r"template\s*(?:<\s*>)?\s*void\s+(run_mha_\w+)\s*<([^<>;{}()]*)>\s*\(([^(){};]*)\)")
    NAMESPACE = re.compile(r"^namespace\s+(\w+)\s*\{", re.M)
    MARK = "envbuild flash-attn-head-dims"

    def __init__(self, dims):
        Fixer.__init__(self, dims=dims)
        self.keep = sorted({int(d) for d in dims.split("+")})
        self.dropped = []  # [(path, dim)] of kernel files setup.py lists that are not kept
        self.stubs = ""

    def wants(self, relpath):
        return relpath in ("setup.py", self.API)

    def prepare(self, root):
        setup = read_text(root, "setup.py") or ""
        listed = [(m.group("path"), int(m.group("dim"))) for m in self.KERNEL.finditer(setup)]
        dims = sorted({d for _, d in listed})
        if not listed:
            self.dropped, self.stubs = [], ""
            return
        missing = [d for d in self.keep if d not in dims]
        if missing:
            raise FixerError("setup.py: flash-attn compiles kernels for head dims %s; %s %s not among them "
                             "(give the kernels' dims: a call's head dim rounds up to the next)"
                             % (", ".join(map(str, dims)), ", ".join(map(str, missing)),
                                "is" if len(missing) == 1 else "are"))
        self.dropped = [(path, d) for path, d in listed if d not in self.keep]
        self.stubs = self._stubs(root) if self.dropped else ""

    def _stubs(self, root):
        """Stand-in definitions of every dropped kernel's specialization, in its namespace."""
        namespaces, lines = set(), []
        for path, dim in self.dropped:
            text = read_text(root, path)
            found = self.SPECIALIZATION.findall(text or "")
            if not found:
                raise FixerError("%s: no kernel specialization found to stand in for; nothing was changed" % path)
            namespaces.update(self.NAMESPACE.findall(text))
            for func, targs, params in found:
                lines.append("template<> void %s<%s>(%s) { envbuild_head_dim_not_compiled(%d); }"
                             % (func, " ".join(targs.split()), " ".join(params.split()), dim))
        if len(namespaces) > 1:
            raise FixerError("%s: the kernel files use several namespaces (%s); nothing was changed"
                             % (self.API, ", ".join(sorted(namespaces))))
        kept = ", ".join(map(str, self.keep))
        body = ["// %s: this build compiles the kernels of head dims %s only; the others raise here." % (self.MARK, kept),
                "static void envbuild_head_dim_not_compiled(int head_dim) {",
                '    TORCH_CHECK(false, "flash-attn was compiled by envbuild for head dims %s only (the model\'s); '
                'head dim ", head_dim, " needs a build without the flash-attn-head-dims fixer");' % kept,
                "}"] + sorted(set(lines), key=lines.index)
        if namespaces:
            body = ["namespace %s {" % namespaces.pop()] + body + ["}"]
        return "\n".join(body) + "\n"

    def fix_text(self, relpath, text):
        if not self.dropped:
            return text
        if relpath == "setup.py":
            edits = []
            for path, _ in self.dropped:
                line = re.compile(_BOL + r"[ \t]*([\"'])" + re.escape(path) + r"\1[ \t]*,?[ \t]*(?:#[^\r\n]*)?(?:\r\n|\r|\n|\Z)")
                found = list(line.finditer(text))
                if len(found) != 1:
                    raise FixerError("setup.py: %s is not listed once on a line of its own; nothing was changed" % path)
                edits.append((found[0].start(), found[0].end(), ""))
            return _edit(text, edits)
        if self.MARK in text:
            raise FixerError("%s: already has stand-ins, but setup.py still lists dropped kernels; nothing was changed"
                             % relpath)
        if "TORCH_CHECK" not in text or not re.search(_BOL + r"[ \t]*#include" + _EOL, text):
            raise FixerError("%s: no #include and TORCH_CHECK to build stand-ins on; nothing was changed" % relpath)
        return _insert_after_includes(text, self.stubs.replace("\n", _newline(text)))


FIXERS = {cls.name: cls for cls in (LocalRank, ThcToAten, NumbaErrors, MmcvVersionAssert, MmcvLayerClash, SetupWithoutGpu,
                                                CxxStandard, CollectionsAbc, TorchLoadWeightsOnly,
                                                MmcvParallel, FlashAttnUnpadInput, FlashAttnHeadDims)}


# The arguments a fixer takes, each with the only shape it may have: they end up inside source
# files (a setup.py flag, a version string in mmdet's __init__), so nothing else gets through,
# whether it came from a flag, a plan.json or the resolver.
ARGS = {
    "mmcv-version-assert": {"mmcv": re.compile(r"^[0-9]+(\.[0-9]+){1,3}$")},  # ASCII digits: \d takes ١.٧
    "cxx-standard": {"std": re.compile(r"^c\+\+(14|17|20)$")},
    "flash-attn-head-dims": {"dims": re.compile(r"^[1-9][0-9]{0,3}(\+[1-9][0-9]{0,3}){0,7}$")},
}
REQUIRED_ARGS = {"flash-attn-head-dims": ("dims",)}  # arguments a fixer cannot run without


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
    needed = [key for key in REQUIRED_ARGS.get(name, ()) if key not in args]
    if needed:
        raise ValueError("fixer %s needs %s" % (name, ", ".join("%s=..." % key for key in needed)))
    return FIXERS[name](**args)


def needs_args(name):
    """A fixer that cannot run without arguments (flash-attn-head-dims: which dims): left out of
    "every fixer" runs; the Plan names it with them."""
    return bool(REQUIRED_ARGS.get(name))


def parse_items(text):
    """--fixers "a,b:key=value": names, each with its arguments after colons."""
    items = []
    for item in text.split(","):
        name, _, rest = item.partition(":")
        args = dict(kv.partition("=")[::2] for kv in rest.split(":")) if rest else {}
        items.append({"name": name, "args": args})
    return items


def detect(root, fixers):
    """Findings of every fixer (nothing is written); .problems names the files none could read."""
    findings = Findings()
    for fx in fixers:
        findings.extend(fx.detect(root, findings.problems))
    return findings


def apply(root, fixers):
    """Apply fixers in order; returns a Report, {fixer: [changed files]}. All or nothing, except
    that a file that cannot be read or written is left as it is and named in .problems."""
    if not os.path.isdir(root):
        raise OSError("not a directory: %s" % root)
    report = Report()
    files = list(iter_files(root, report.problems))
    loaded, staged = {}, {}  # relpath: (text, fmt, bytes) or None; relpath: new text
    # Compute every change first (fixers see the results of the ones before them).
    for fx in fixers:
        changed = []
        fx.prepare(root)
        for relpath in files:
            if not fx.wants(relpath):
                continue
            if relpath not in loaded:
                loaded[relpath] = _load_or_note(root, relpath, report.problems)
            if loaded[relpath] is None:
                continue
            current = staged.get(relpath, loaded[relpath][0])
            new = fx.fixed(relpath, current)
            if new != current:
                staged[relpath] = new
                changed.append(relpath)
        report[fx.name] = changed
    pending, unwritten = {}, set()
    for relpath, new in sorted(staged.items()):
        text, fmt, data = loaded[relpath]
        if new == text:
            continue
        why = _unwritable(root, relpath)
        if why is None:
            try:
                pending[relpath] = (data, _encode(new, fmt))
            except UnicodeEncodeError as exc:
                why = "the fixed text cannot be written in its %s coding (%s)" % (fmt[0], exc)
        if why is not None:
            _note(report.problems, (relpath, "could not write", why))
            unwritten.add(relpath)
    write_all(root, pending)
    for name, changed in report.items():
        report[name] = [f for f in changed if f not in unwritten]
    return report


def problem_lines(problems):
    """One line per file a fixer could not read or write: "could not write a.py: read-only (mode 444)"."""
    return ["%s %s: %s" % (what, path, why) for path, what, why in problems]


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
    """Run each fixer over the installed distributions the Plan names for it; a Report."""
    report = Report()
    for item, fx in zip(plan_fixers, fixers):
        changed = []
        for dist_name in item.get("installed") or []:
            for root in installed_roots(dist_name):
                done = apply(root, [fx])
                changed += [os.path.join(root, f) for f in done[fx.name]]
                for path, what, why in done.problems:
                    _note(report.problems, (os.path.join(root, path), what, why))
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
    ap.add_argument("--plan", help="the Plan whose fixers to run")
    ap.add_argument("--fixers", help="instead of a Plan: fixer names, comma-separated, each with its arguments as "
                    "name:key=value (a compiled package's sdist port)")
    ap.add_argument("--report")
    ns = ap.parse_args(argv)
    if bool(ns.plan) == bool(ns.fixers):
        ap.error("give --plan or --fixers (one of them)")
    try:
        if ns.fixers:
            plan = {"fixers": parse_items(ns.fixers)}
        else:
            with open(ns.plan) as fh:
                plan = json.load(fh)
        fixers = fixers_from_plan(plan)
    except (OSError, ValueError, KeyError) as exc:
        print("envbuild-fix: error: cannot use %s: %s" % ("--fixers" if ns.fixers else "plan " + ns.plan, exc),
              file=sys.stderr)
        return 2
    if ns.action != "apply-installed" and not ns.tree:
        ap.error("%s needs the model tree" % ns.action)
    if ns.action == "list":
        found = detect(ns.tree, fixers)
        for f in found:
            print("%s:%d: %s: %s" % (f.path, f.line, f.fixer, f.why))
        for text in problem_lines(found.problems):
            print("envbuild-fix: %s" % text, file=sys.stderr)
        return 0
    try:
        report = apply_installed(plan["fixers"], fixers) if ns.action == "apply-installed" else apply(ns.tree, fixers)
    except FixerError as exc:
        print("envbuild-fix: error: %s" % exc, file=sys.stderr)
        return 1
    summary = {"fixers": [{"name": fx.name, "args": fx.args, "files": report[fx.name]} for fx in fixers],
               "problems": [{"path": path, "problem": what, "why": why} for path, what, why in report.problems]}
    for item in summary["fixers"]:
        print("fixer %s: %d file(s) changed" % (item["name"], len(item["files"])))
    for text in problem_lines(report.problems):
        print("envbuild-fix: %s" % text, file=sys.stderr)
    if ns.report:
        with open(ns.report, "w") as fh:
            json.dump(summary, fh, indent=2, sort_keys=True)
            fh.write("\n")
    if any(what == "could not write" for _, what, _ in report.problems):
        print("envbuild-fix: error: a file that needs a fix could not be written (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
