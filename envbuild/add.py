"""Add stage: a model's repository -> a drafted catalog entry (models/NAME.toml in the user catalog).

`envbuild add REPO|PATH` reads the repository itself, with no network beyond cloning a URL and
asking the package index for the releases of the versions it pins:
- pins from its install guide (README, docs/install*.md: pip/mim/conda lines, torch and CUDA),
  requirements*.txt, environment*.yml, setup.py install_requires and pyproject dependencies,
  each with the file and line it came from;
- every setup.py that builds CUDAExtensions, the command its guide builds it with, and whether
  it refuses to build without a visible GPU (the setup-without-gpu fixer's detection);
- vendored packages, and packages installed from git as [git_packages] facts (URL, full commit,
  subdirectory; a tag or branch resolved to its commit with `git ls-remote` unless --offline);
- standard-library modules the OS packs apart (catalog.STDLIB_APART);
- a construct recipe guess from the train script's builder and the first training config;
- the era (the last commit that touched code) and the fixers `fix --list` finds.
What it cannot decide becomes a question naming the file and key to edit. The draft is loaded
by the catalog loader before it is written: what is written always loads.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from . import catalog, creds, fixers
from .errors import BadInput, EnvbuildError

HEADER = "# Drafted by envbuild add"  # the first line of every file add writes: what it may replace
SKIP_DIRS = {".git", "__pycache__", "build", "dist", ".eggs", "node_modules", ".tox", ".venv", "venv"}
TORCH_NAMES = {"torch", "pytorch"}
# Installed with torch itself (the catalog pairs them with the torch release), or tools, not packages.
NOT_PACKAGES = {"torchvision", "torchaudio", "cudatoolkit", "cudatoolkit-dev", "pytorch-cuda", "python", "pip",
                "openmim", "mim", "cuda", "cudnn", "conda"}
GUIDE_RE = re.compile(r"(install|get_started|getting_started|quick_start|quickstart|setup|environment|prepare)",
                      re.IGNORECASE)
CODE_SUFFIXES = ("*.py", "*.cu", "*.cuh", "*.cpp", "*.cc", "*.c", "*.h", "*.hpp", "*.sh", "*.txt", "*.yml", "*.yaml",
                 "*.toml", "*.cfg")
CONFIG_DIRS = ("projects/configs", "configs", "config")
TRAIN_ENTRIES = ("tools/train.py", "train.py", "tools/train_net.py", "scripts/train.py")
# builder names a train script calls on the config's model (OpenMMLab style)
BUILDERS = ("build_model", "build_detector", "build_segmentor", "build_backbone", "build_network")
# detectron2's launch() spawns one process per GPU (torch.multiprocessing), as mp.spawn does
DETECTRON2_LAUNCH = re.compile(r"^from detectron2\.engine import \(?[^)]*?\blaunch\b", re.M)
# A train script that joins a process group (or reads its rank) needs a distributed launcher.
DISTRIBUTED = re.compile(r"init_process_group|DistributedDataParallel|local[_-]rank|LOCAL_RANK|\bdist\.init|\bAccelerator\(")
# a guide section whose packages are not needed to train (visualization, demos)
OPTIONAL_RE = re.compile(r"\b(optional|visuali[sz]|demo|deploy|onnx|tensorrt)", re.IGNORECASE)
CUDA_OF_TAG = re.compile(r"cu(\d{2,3})\b")
# modules the OS packs apart that the catalog cannot install yet: a question each
OS_APART_UNKNOWN = {"distutils": "python3-distutils", "lib2to3": "python3-lib2to3", "venv": "python3-venv"}


@dataclass
class Found:
    """One pin as a file states it."""
    name: str
    spec: str  # "*", an exact version, or a specifier set
    file: str
    line: int
    text: str
    kind: str  # guide, requirements, environment, setup, pyproject, conda

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class GitPackage:
    name: str
    url: str
    ref: str  # a commit, tag or branch ("" when none is named)
    file: str
    line: int
    subdirectory: str = ""
    # the catalog fact ([git_packages]): its https URL and full commit, "" where they are not known
    https: str = ""
    commit: str = ""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Question:
    key: str  # the key of the entry to edit
    question: str
    found: str = ""  # where the evidence is (file:line), "" when nothing was found

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Draft:
    name: str
    source: str  # what the user gave
    tree: str  # the checkout that was read
    repo: str
    commit: str
    era: str | None
    era_why: str
    python: str
    torch: str
    cuda: str
    packages: dict  # name -> (spec, Found | None)
    git_packages: list
    vendored: dict  # name -> (version, path, where)
    extensions: list  # dicts: name, path, build, needs_visible_gpu, setup, build_from
    stdlib_modules: dict  # module -> why
    train: dict
    construct: dict | None
    fixers: list  # dicts: fixer, why, files, first, only_when
    questions: list
    title: str = ""
    description: str = ""
    path: str = ""  # the file written ("" for a dry run)
    text: str = ""
    next_command: str = ""
    dry_run: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["packages"] = {n: {"spec": s, **({"from": f.where, "text": f.text} if f else {})}
                         for n, (s, f) in self.packages.items()}
        d["vendored"] = {n: {"version": v, "path": p, "from": w} for n, (v, p, w) in self.vendored.items()}
        d["questions"] = [q.to_dict() for q in self.questions]
        return d


# ---------------------------------------------------------------- the repository


def _git(args: list[str], cwd: Path | None = None, check: bool = True) -> str:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvbuildError(f"git {args[0]} failed: {exc}", "is git installed, and the repository reachable?") from None
    if check and r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise BadInput(f"git {' '.join(args[:2])} failed: {last}", "check the repository address and --commit")
    return r.stdout.strip() if r.returncode == 0 else ""


def is_url(source: str) -> bool:
    return bool(re.match(r"^(https?|ssh|git|file)://", source) or re.match(r"^[\w.-]+@[\w.-]+:", source))


def _is_git(path: Path) -> bool:
    return bool(_git(["-C", str(path), "rev-parse", "--is-inside-work-tree"], check=False)) and \
        Path(_git(["-C", str(path), "rev-parse", "--show-toplevel"], check=False) or "/").resolve() == path.resolve()


def _https_remote(url: str) -> str:
    """The entry's repo field: an https URL without .git and credentials, or "" when there is none."""
    url = url.strip()
    m = re.match(r"^git@([\w.-]+):(.+)$", url)
    if m:
        url = f"https://{m.group(1)}/{m.group(2)}"
    url = re.sub(r"^https://[^/@]+@", "https://", url)
    url = url[:-4] if url.endswith(".git") else url
    return url if catalog.URL_RE.match(url) else ""


def default_name(source: str) -> str:
    base = source.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    base = base[:-4] if base.endswith(".git") else base
    name = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-._")
    return name


# ---------------------------------------------------------------- reading files


def _rel(tree: Path, path: Path) -> str:
    return path.relative_to(tree).as_posix()


def _walk(tree: Path, skip: set[str] = frozenset()):
    """Every regular file under tree (no links followed), sorted, minus SKIP_DIRS and `skip` (relative dirs)."""
    for root, dirs, files in os.walk(tree):
        rel_root = Path(root).relative_to(tree).as_posix()
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")
                         and (f"{rel_root}/{d}" if rel_root != "." else d) not in skip
                         and not os.path.islink(os.path.join(root, d)))
        for f in sorted(files):
            p = Path(root) / f
            if p.is_file() and not p.is_symlink():
                yield p


def _read(path: Path) -> str:
    try:
        if path.stat().st_size > 2_000_000:
            return ""
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _spec_of(req: Requirement) -> str:
    spec = str(req.specifier)
    if not spec:
        return "*"
    if len(req.specifier) == 1:
        only = next(iter(req.specifier))
        if only.operator in ("==", "===") and "*" not in only.version:
            return only.version
    return ",".join(sorted(str(s) for s in req.specifier))


def parse_requirement(text: str, file: str, line: int, kind: str) -> Found | GitPackage | None:
    """One requirement as pip takes it (name, name==1.0, name>=1,<2, git+URL@ref#egg=name)."""
    text = text.strip().strip("'\"")
    if not text or text.startswith(("-", "#")):
        return None
    git = re.match(r"^(?:([A-Za-z0-9._-]+)\s*@\s*)?git\+([^\s#@]+(?:@[^\s#@/]+)?(?:[^\s#]*))(?:#(\S+))?$", text)
    if git:
        url = git.group(2)
        ref = ""
        m = re.match(r"^(.*?\.git|[^@]*?)(?:@([^@/]+))?$", url)
        if m and m.group(2):
            url, ref = m.group(1), m.group(2)
        frag = dict(p.split("=", 1) for p in (git.group(3) or "").split("&") if "=" in p)
        name = git.group(1) or frag.get("egg") or default_name(url)
        return GitPackage(name, url, ref, file, line, frag.get("subdirectory", ""))
    text = text.split(" #", 1)[0].strip()
    try:
        req = Requirement(text)
    except InvalidRequirement:
        return None
    if req.url:
        return None
    return Found(req.name, _spec_of(req), file, line, text, kind)


def _logical_lines(text: str):
    """(line number, text) with backslash continuations joined."""
    pending, start = "", 0
    for i, raw in enumerate(text.splitlines(), 1):
        if not pending:
            start = i
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        yield start, pending + raw
        pending = ""
    if pending:
        yield start, pending


def _commands(line: str) -> list[list[str]]:
    line = line.strip()
    line = re.sub(r"^\s*(\$|>>>|#\s*\$)\s+", "", line)
    if line.startswith("#"):
        return []
    out = []
    for part in re.split(r"&&|\|\||;", line):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:
            words = part.split()
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # FORCE_CUDA=1 pip install ...
            words = words[1:]
        if words and words[0] == "sudo":
            words = words[1:]
        if words:
            out.append(words)
    return out


def _shell_script(words: list[str]) -> str:
    """The script of `sh make.sh`, `bash ./make.sh` or `./make.sh` ("" for any other command)."""
    if words[0] in ("sh", "bash") and len(words) > 1 and words[1].endswith(".sh"):
        return words[1]
    return words[0] if words[0].startswith("./") and words[0].endswith(".sh") else ""


class Reader:
    """Everything read from one checkout; a method per kind of file."""

    def __init__(self, tree: Path):
        self.tree = tree
        self.found: list[Found] = []
        self.git: list[GitPackage] = []
        self.builds: dict[str, tuple[list[str], str]] = {}  # rel dir -> (command, where)
        self.followed: set[Path] = set()  # the shell scripts the guide runs, read once each
        self.python: list[tuple[str, str]] = []  # (X.Y, where)
        self.cuda: list[tuple[str, str]] = []  # (X.Y, where)
        self.train_lines: list[tuple[list[str], str]] = []  # commands that run python X.py
        self.requirement_files: set[str] = set()
        self.section = ""  # the guide's heading above the line being read

    # -- install guides

    def guides(self) -> list[Path]:
        out = [p for p in sorted(self.tree.iterdir()) if p.is_file() and p.suffix.lower() in (".md", ".rst", ".txt", "")
               and (re.match(r"^(readme|install)", p.name, re.I) or GUIDE_RE.search(p.stem))]
        docs = self.tree / "docs"
        if docs.is_dir():
            out += [p for p in _walk(docs) if p.suffix.lower() in (".md", ".rst") and GUIDE_RE.search(p.stem)]
        return out

    def read_guide(self, path: Path) -> None:
        rel = _rel(self.tree, path)
        text = _read(path)
        fenced = "```" in text or "~~~" in text
        in_code, cwd = False, ""
        self.section = ""
        for no, line in _logical_lines(text):
            stripped = line.strip()
            if stripped.startswith(("```", "~~~")):
                in_code, cwd = not in_code, ""
                continue
            if not in_code and (stripped.startswith("#") or re.match(r"^\*\*.+\*\*$", stripped)):
                self.section = stripped
                continue
            if fenced and not in_code and not stripped.startswith(("$ ", "pip ", "conda ", "mim ")):
                continue
            for words in _commands(stripped.strip("`")):
                cwd = self._guide_command(words, rel, no, cwd)

    def _cd(self, cwd: str, target: str) -> str:
        if target in ("-", "~") or target.startswith("$"):
            return cwd
        for base in (cwd, ""):
            cand = os.path.normpath(os.path.join(base, target)) if not target.startswith("/") else ""
            if cand and not cand.startswith("..") and (self.tree / cand).is_dir():
                return "" if cand == "." else cand
        parts = [p for p in target.strip("/").split("/") if p]  # /path/to/Repo/sub: the longest tail that exists
        for i in range(len(parts)):
            tail = "/".join(parts[i:])
            if tail and (self.tree / tail).is_dir():
                return tail
        return cwd

    def _guide_command(self, words: list[str], rel: str, no: int, cwd: str) -> str:
        where = f"{rel}:{no}"
        if words[0] == "cd" and len(words) > 1:
            return self._cd(cwd, words[1])
        if words[0] in ("python", "python3") and words[1:3] == ["-m", "pip"]:
            words = ["pip", *words[3:]]
        if words[0] in ("pip", "pip3", "mim") and len(words) > 1 and words[1] == "install":
            self._pip_install(words, rel, no, cwd)
        elif words[0] == "conda" and len(words) > 1 and words[1] in ("install", "create"):
            self._conda(words[2:], rel, no)
        elif words[0] in ("python", "python3") and len(words) > 1 and words[1] == "setup.py":
            self.builds.setdefault(cwd, (words, where))
        elif words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
            self.train_lines.append((words[1:], where))
        elif words[0].endswith(".sh") and "train" in words[0]:
            self.train_lines.append((words, where))
        elif (script := _shell_script(words)) and (self.tree / cwd / script).is_file():
            self._follow(self.tree / cwd / script, cwd)  # `cd ops && sh make.sh`: its lines are the guide's
        elif words[0] == "git" and len(words) > 2 and words[1] == "clone":
            url = next((w for w in words[2:] if "://" in w or w.startswith("git@")), "")
            if url:
                self.git.append(GitPackage(default_name(url), url, "", rel, no))
        elif words[0] == "git" and len(words) > 2 and words[1] == "checkout" and self.git and not self.git[-1].ref:
            self.git[-1].ref = words[2]
        return cwd

    def _follow(self, script: Path, cwd: str) -> None:
        """A build script the guide runs: each of its lines as a guide line run where the guide ran it."""
        if script in self.followed or not script.resolve().is_relative_to(self.tree):
            return
        self.followed.add(script)
        rel = _rel(self.tree, script)
        for no, line in enumerate(_read(script).splitlines(), 1):
            for words in _commands(line):
                cwd = self._guide_command(words, rel, no, cwd)

    def _pip_install(self, words: list[str], rel: str, no: int, cwd: str) -> None:
        args, i = words[2:], 0
        editable_here = False
        while i < len(args):
            w = args[i]
            if w in ("-r", "--requirement"):
                if i + 1 < len(args):
                    self.requirement_files.add(os.path.normpath(os.path.join(cwd, args[i + 1])))
                i += 2
                continue
            if w in ("-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-c", "--constraint"):
                if i + 1 < len(args):
                    self._cuda_hint(args[i + 1], f"{rel}:{no}")
                i += 2
                continue
            if w.startswith("--index-url=") or w.startswith("--extra-index-url=") or w.startswith("--find-links="):
                self._cuda_hint(w.split("=", 1)[1], f"{rel}:{no}")
            elif w in ("-e", "--editable") and i + 1 < len(args) and not args[i + 1].startswith("git+"):
                editable_here = editable_here or args[i + 1] in (".", "./")
                i += 2
                continue
            elif w in (".", "./"):
                editable_here = True
            elif not w.startswith("-"):
                got = parse_requirement(w, rel, no, "optional" if OPTIONAL_RE.search(self.section) else "guide")
                if isinstance(got, GitPackage):
                    self.git.append(got)
                elif got is not None:
                    self.found.append(got)
                    self._cuda_hint(got.spec, f"{rel}:{no}")
            i += 1
        if editable_here:
            self.builds.setdefault(cwd, (words, f"{rel}:{no}"))

    def _conda(self, args: list[str], rel: str, no: int) -> None:
        skip = {"-n", "--name", "-c", "--channel", "-p", "--prefix"}
        i = 0
        while i < len(args):
            w = args[i]
            if w in skip:
                i += 2
                continue
            if not w.startswith("-"):
                self._conda_spec(w.split("::")[-1], rel, no)
            i += 1

    def _conda_spec(self, spec: str, rel: str, no: int, kind: str = "conda") -> None:
        m = re.match(r"^([A-Za-z0-9._-]+)\s*(?:(==|=|>=|<=|>|<)\s*([0-9][^\s=]*))?(?:=[^\s]*)?$", spec.strip())
        if not m:
            return
        name, op, ver = m.group(1).lower(), m.group(2), m.group(3)
        where = f"{rel}:{no}"
        if name == "python":
            if ver:
                self.python.append((".".join(ver.split(".")[:2]), where))
            return
        if name in ("cudatoolkit", "pytorch-cuda", "cuda-toolkit", "cuda"):
            if ver:
                self.cuda.append((".".join(ver.split(".")[:2]), where))
            return
        name = "torch" if name == "pytorch" else name
        spec_text = "*" if not ver else (ver.rstrip(".*") if op in ("=", "==") else f"{op}{ver}")
        if op in ("=", "==") and ver.endswith(".*"):
            spec_text = f"=={ver}"
        self.found.append(Found(name, spec_text, rel, no, spec.strip(), kind))

    def _cuda_hint(self, text: str, where: str) -> None:
        m = CUDA_OF_TAG.search(text)
        if m and ("torch" in text or "+cu" in text or "/whl/" in text or text.startswith("cu")):
            digits = m.group(1)
            self.cuda.append((f"{digits[:-1]}.{digits[-1]}", where))

    # -- requirements, environment, setup.py, pyproject

    def read_requirements(self, path: Path, seen: set | None = None) -> None:
        seen = seen if seen is not None else set()
        if path in seen or not path.is_file():
            return
        seen.add(path)
        rel = _rel(self.tree, path)
        for no, line in _logical_lines(_read(path)):
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            words = line.split()
            if words[0] in ("-r", "--requirement") and len(words) > 1:
                self.read_requirements((path.parent / words[1]).resolve(), seen)
                continue
            if words[0] in ("-f", "--find-links", "-i", "--index-url", "--extra-index-url") and len(words) > 1:
                self._cuda_hint(words[1], f"{rel}:{no}")
                continue
            if words[0] in ("-e", "--editable") and len(words) > 1:
                line = words[1]
            self._take(parse_requirement(line, rel, no, "requirements"), f"{rel}:{no}")

    def _take(self, got, where: str) -> None:
        """A parsed requirement line: a package from git, a pin (its CUDA hint noted), or nothing."""
        if isinstance(got, GitPackage):
            self.git.append(got)
        elif got is not None:
            self.found.append(got)
            self._cuda_hint(got.spec, where)

    def read_environment(self, path: Path) -> None:
        """conda's environment.yml, read line by line: `- name=ver` and the `- pip:` list."""
        rel = _rel(self.tree, path)
        in_deps, pip_indent = False, None
        for no, raw in enumerate(_read(path).splitlines(), 1):
            line = raw.split(" #", 1)[0].rstrip()
            if not line.strip() or line.strip().startswith("#"):
                continue
            indent = len(line) - len(line.lstrip())
            if indent == 0:
                in_deps, pip_indent = line.startswith("dependencies:"), None
                continue
            if not in_deps:
                continue
            item = line.strip()
            if not item.startswith("- "):
                continue
            item = item[2:].strip().strip("'\"")
            if item == "pip:":
                pip_indent = indent
                continue
            if pip_indent is not None and indent > pip_indent:
                if item.startswith(("-r ", "--requirement ")):
                    self.read_requirements((path.parent / item.split(None, 1)[1]).resolve())
                    continue
                if item.startswith(("-f ", "--find-links ", "--extra-index-url ", "--index-url ")):
                    self._cuda_hint(item, f"{rel}:{no}")
                    continue
                self._take(parse_requirement(item, rel, no, "environment"), f"{rel}:{no}")
            else:
                pip_indent = None
                self._conda_spec(item.split("::")[-1], rel, no, "environment")

    def read_setup_requires(self, path: Path) -> None:
        rel = _rel(self.tree, path)
        tree = _parse(_read(path))
        if tree is None:
            return
        assigned = {t.id: node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)}
        for call in _calls(tree, "setup"):
            for kw in call.keywords:
                if kw.arg in ("install_requires",):
                    value = assigned.get(kw.value.id) if isinstance(kw.value, ast.Name) else kw.value
                    for elt in getattr(value, "elts", []) or []:
                        if isinstance(elt, ast.Constant) and isinstance(elt.value, str):
                            got = parse_requirement(elt.value, rel, elt.lineno, "setup")
                            if isinstance(got, GitPackage):
                                self.git.append(got)
                            elif got is not None:
                                self.found.append(got)
                if kw.arg == "python_requires" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                    m = re.search(r">=\s*(3\.\d+)", kw.value.value)
                    if m:
                        self.python.append((m.group(1), f"{rel}:{kw.value.lineno}"))

    def read_pyproject(self, path: Path) -> None:
        rel = _rel(self.tree, path)
        text = _read(path)
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            return
        lines = text.splitlines()
        for dep in (doc.get("project") or {}).get("dependencies") or []:
            if not isinstance(dep, str):
                continue
            no = next((i for i, ln in enumerate(lines, 1) if dep in ln), 0)
            got = parse_requirement(dep, rel, no, "pyproject")
            if isinstance(got, GitPackage):
                self.git.append(got)
            elif got is not None:
                self.found.append(got)


def _parse(text: str):
    try:
        return ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return None


def _callee(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _calls(tree, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _callee(n) == name]


def _str_kw(call: ast.Call, key: str, pos: int | None = None) -> str:
    for kw in call.keywords:
        if kw.arg == key and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
            return kw.value.value
    if pos is not None and len(call.args) > pos and isinstance(call.args[pos], ast.Constant) \
            and isinstance(call.args[pos].value, str):
        return call.args[pos].value
    return ""


# ---------------------------------------------------------------- the draft


def draft(source: str, *, commit: str | None = None, name: str | None = None, pypi=None,
          cat: catalog.Catalog | None = None, tree: Path | None = None, ls_remote=None) -> Draft:
    """Read a checkout (tree; else the local path `source`) and draft its entry. pypi(name) ->
    {version: YYYY-MM-DD} or None (no such project); None: the index is not asked.
    ls_remote(url) -> [(commit, ref name)] of a git repository, to turn a tag or branch of a
    package from git into its commit; None: not asked."""
    cat = cat or catalog.load()
    tree = Path(tree or source).resolve()
    questions: list[Question] = []
    model_name = name or default_name(source)
    if not catalog.NAME_RE.match(model_name or ""):
        raise BadInput(f"{model_name!r} cannot be a model name (lowercase letters, digits, '.', '_', '-')",
                       "choose one with --name")
    git = _is_git(tree)
    head = _git(["-C", str(tree), "rev-parse", "HEAD"], check=False) if git else ""
    remote = _git(["-C", str(tree), "remote", "get-url", "origin"], check=False) if git else ""
    repo = _https_remote(source) or _https_remote(remote)
    r = Reader(tree)
    for guide in r.guides():
        r.read_guide(guide)
    # The guide's `git clone` of this very repository says where it is published; it is no package
    own = [g for g in r.git if canonicalize_name(default_name(g.url)) in
           {canonicalize_name(n) for n in (model_name, tree.name, *_setup_names(tree))}]
    r.git = [g for g in r.git if g not in own]
    repo = repo or next((_https_remote(git_https(g.url)) for g in own if git_https(g.url)), "")
    if not repo:
        repo = f"https://example.invalid/{model_name}"
        questions.append(Question("model.repo", "no https address of the repository was found: where is it published?",
                                  remote or source))
    if not head:
        head = "0" * 40
        questions.append(Question("model.commit", "not a git checkout: which commit of the repository is this?"))

    vendored, vendor_dirs = _vendored(tree)
    for path in _walk(tree, vendor_dirs):
        rel = _rel(tree, path)
        if re.match(r"^requirements?([_-][\w.-]+)?\.txt$", path.name, re.I) or \
                (path.parent.name == "requirements" and path.suffix == ".txt"):
            r.read_requirements(path)
        elif re.match(r"^environment[\w.-]*\.ya?ml$", path.name, re.I):
            r.read_environment(path)
        elif rel == "setup.py":
            r.read_setup_requires(path)
        elif rel == "pyproject.toml":
            r.read_pyproject(path)
    for rel in sorted(r.requirement_files):
        if (tree / rel).is_file() and not any(f.file == rel for f in r.found):
            r.read_requirements(tree / rel)

    extensions = _extensions(tree, r, questions)
    local = {canonicalize_name(e["name"]) for e in extensions} | {canonicalize_name(n) for n in vendored}
    local |= {canonicalize_name(n) for n in _setup_names(tree)}
    torch, cuda, python = _torch_cuda_python(cat, r, questions)
    packages = _packages(r.found, local, questions)
    git_packages = _git_packages(r.git, {canonicalize_name(n) for n in vendored}, ls_remote, questions)
    for g in git_packages:
        packages.pop(canonicalize_name(g.name), None)
    if pypi is not None:
        _check_pypi(packages, pypi, questions)
    era, era_why = _era(tree, head if git else "", packages, pypi, questions)
    stdlib = _stdlib_modules(tree, vendor_dirs, questions)
    _unlisted_imports(tree, vendor_dirs, cat, [*packages, *vendored, *(g.name for g in git_packages)], questions)
    _flash_attn_head_dims(tree, vendor_dirs, questions)
    train = _train(tree, r, questions)
    construct = _construct(tree, train, r, questions)
    fixes = _fixers(tree)
    for ext in extensions:
        if ext["needs_visible_gpu"]:
            questions.append(Question(f"extensions.{ext['name']}.needs_visible_gpu",
                                      f"{ext['setup']} refuses to build without a visible GPU: the setup-without-gpu "
                                      "fixer lets it build with FORCE_CUDA=1 (kept true)", ext["setup"]))
    title, description = _title(tree, model_name)
    return Draft(model_name, source, str(tree), repo, head, era, era_why, python, torch, cuda, packages, git_packages,
                 vendored, extensions, stdlib, train, construct, fixes, questions, title, description)


def git_https(url: str) -> str:
    """A pip VCS URL (git+https://, git+ssh://git@host/..., git@host:...) as the https address the
    catalog fetches from, without credentials; "" when it has none."""
    url = re.sub(r"^git\+", "", url.strip())
    m = re.match(r"^(?:ssh://)?git@([\w.-]+)[:/](.+)$", url)
    if m:
        url = f"https://{m.group(1)}/{m.group(2)}"
    url = re.sub(r"^(https?://)[^/@]+@", r"\1", url)
    return url if catalog.GIT_URL_RE.match(url) else ""


def resolve_ref(refs: list[tuple[str, str]], ref: str) -> str:
    """The full commit a tag, a branch or a short hash names among a repository's refs ("" when
    none): a tag's peeled commit first."""
    if catalog.COMMIT_RE.match(ref):
        return ref
    by_name = dict((name, sha) for sha, name in refs)
    for name in (f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}", f"refs/heads/{ref}", ref):
        if name in by_name:
            return by_name[name]
    if re.match(r"^[0-9a-f]{7,39}$", ref):  # a short hash: only where it is the tip of a ref
        hits = {sha for sha, _ in refs if sha.startswith(ref)}
        if len(hits) == 1:
            return hits.pop()
    return ""


def _git_packages(found: list[GitPackage], vendored: set[str], ls_remote, questions: list) -> list[GitPackage]:
    """Packages installed from git as catalog facts: https URL and full commit; what is missing a question."""
    out: dict[str, GitPackage] = {}
    for g in found:
        key = canonicalize_name(g.name)
        if key in vendored or not catalog.PKG_RE.match(g.name):
            continue
        g.https = git_https(g.url)
        g.commit = g.ref if catalog.COMMIT_RE.match(g.ref) else ""
        if g.https and g.ref and not g.commit and ls_remote is not None:
            try:
                g.commit = resolve_ref(ls_remote(g.https), g.ref)
            except EnvbuildError:
                g.commit = ""
        if g.subdirectory and (not catalog.RELPATH_RE.match(g.subdirectory) or ".." in g.subdirectory.split("/")):
            g.subdirectory = ""
        if key not in out or (g.commit and not out[key].commit):  # one fact per package, the pinned one first
            out[key] = g
    for key, g in sorted(out.items()):
        at = f"git_packages.{_key(g.name)}"
        if not g.https:
            questions.append(Question(f"{at}.url", f"{g.name} is installed from {g.url}, which has no https address "
                                      "the build can fetch: give one, then uncomment its lines", g.where))
        elif not g.commit:
            said = (f"{g.ref!r} is not a full commit" + ("" if ls_remote is not None else " (--offline: not asked)")
                    if g.ref else "no commit is named")
            questions.append(Question(f"{at}.commit", f"{g.name} is installed from git at {g.url}: {said}; give the "
                                      f"full 40-hex commit upstream used (git ls-remote {g.https}), then uncomment its "
                                      "lines", g.where))
        questions.append(Question(f"{at}.build", f"{g.name} from git builds as pip (a guess): cuda-extension if its "
                                  "setup.py compiles CUDA code against torch", g.where))
    return list(out.values())


def _ls_remote(url: str) -> list[tuple[str, str]]:
    """The refs of a repository (git ls-remote): [(commit, ref name)]."""
    out = _git(["ls-remote", "--", url])
    return [tuple(line.split("\t", 1)) for line in out.splitlines() if "\t" in line]


def _setup_names(tree: Path) -> set[str]:
    names = set()
    for rel in ("setup.py",):
        t = _parse(_read(tree / rel)) if (tree / rel).is_file() else None
        for call in _calls(t, "setup") if t else []:
            if _str_kw(call, "name"):
                names.add(_str_kw(call, "name"))
    doc = {}
    if (tree / "pyproject.toml").is_file():
        try:
            doc = tomllib.loads(_read(tree / "pyproject.toml"))
        except tomllib.TOMLDecodeError:
            pass
    if isinstance((doc.get("project") or {}).get("name"), str):
        names.add(doc["project"]["name"])
    return names


def _vendored(tree: Path) -> tuple[dict, set[str]]:
    """Sub-folders that are whole packages of their own (a setup.py naming a package that has a
    version): name -> (version, path, where)."""
    out, dirs = {}, set()
    for setup in sorted(tree.rglob("setup.py")):
        if setup.parent == tree or any(p in SKIP_DIRS for p in setup.relative_to(tree).parts):
            continue
        t = _parse(_read(setup))
        calls = _calls(t, "setup") if t else []
        pkg = next((_str_kw(c, "name") for c in calls if _str_kw(c, "name")), "")
        if not pkg or not catalog.PKG_RE.match(pkg):
            continue
        rel_dir = _rel(tree, setup.parent)
        version, where = "", ""
        literal = next((_str_kw(c, "version") for c in calls if _str_kw(c, "version")), "")
        candidates = [setup.parent / pkg.replace("-", "_") / "version.py", setup.parent / "version.py",
                      setup.parent / "VERSION", setup.parent / "version.txt"]
        for cand in candidates:
            if cand.is_file():
                m = re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", _read(cand)) if cand.suffix == ".py" \
                    else re.match(r"^\s*(\S+)", _read(cand))
                if m:
                    version, where = m.group(1), _rel(tree, cand)
                    break
        if not version and literal:
            version, where = literal, _rel(tree, setup)
        try:
            Version(version)
        except InvalidVersion:
            continue
        # a package of its own has more than the extension: its own package folder with modules
        if not (setup.parent / pkg.replace("-", "_")).is_dir():
            continue
        out[pkg] = (version, rel_dir, where)
        dirs.add(rel_dir)
    return out, dirs


def _extensions(tree: Path, r: Reader, questions: list) -> list[dict]:
    """Every setup.py that builds CUDAExtensions (the root one too: path "."): path, build command, GPU refusal."""
    gpu = {f.path for f in fixers.detect(str(tree), [fixers.make("setup-without-gpu")])}
    out = []
    for setup in sorted(tree.rglob("setup.py")):
        rel = _rel(tree, setup)
        if any(p in SKIP_DIRS for p in setup.relative_to(tree).parts):
            continue
        text = _read(setup)
        if "CUDAExtension" not in text:
            continue
        t = _parse(text)
        calls = _calls(t, "setup") if t else []
        ext_calls = _calls(t, "CUDAExtension") if t else []
        name = next((_str_kw(c, "name") for c in calls if _str_kw(c, "name")), "") or \
            next((_str_kw(c, "name", 0).split(".")[0] for c in ext_calls if _str_kw(c, "name", 0)), "") or setup.parent.name
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "ext"
        if any(e["name"] == name for e in out):
            name = f"{name}-{len(out)}"
        rel_dir = _rel(tree, setup.parent)
        words, where = r.builds.get("" if rel_dir == "." else rel_dir, (None, ""))
        build = _build_words(words, "import torch" in text or "torch.utils" in text) if words else None
        if build is None:
            build = ["python", "setup.py", "develop"]
            questions.append(Question(f"extensions.{name}.build", f"no install guide line builds {rel_dir}: "
                                      "`python setup.py develop` is a guess", rel))
            where = ""
        out.append({"name": name, "path": rel_dir, "build": build, "needs_visible_gpu": rel in gpu,
                    "setup": rel, "build_from": where})
    return out


def _build_words(words: list[str], needs_torch: bool) -> list[str] | None:
    """The guide's build command as the catalog takes it: plain words, no package source of its
    own; pip builds without isolation where setup.py imports torch (isolation would hide it)."""
    words = [w for w in words if w not in ("sudo",)]
    if words and words[0] in ("python3",):
        words = ["python", *words[1:]]
    if words and words[0] in ("pip3", "mim"):
        words = ["pip", *words[1:]]
    if any(not catalog.WORD_RE.match(w) or "://" in w or w.split("=", 1)[0] in catalog.SOURCE_OPTIONS for w in words):
        return None
    if words[:2] == ["pip", "install"] and needs_torch and "--no-build-isolation" not in words:
        words = words[:2] + ["--no-build-isolation"] + words[2:]
    return words


def _best(items: list[tuple[str, str]]) -> tuple[str, str] | None:
    return items[0] if items else None


def _torch_cuda_python(cat: catalog.Catalog, r: Reader, questions: list) -> tuple[str, str, str]:
    pins = [f for f in r.found if canonicalize_name(f.name) in TORCH_NAMES]
    exact = [f for f in pins if catalog.is_exact(f.spec)]
    torch, where = "", ""
    if exact:
        f = exact[0]
        version, _, local = f.spec.partition("+")
        where = f.where
        if local:
            r._cuda_hint(local, where)
        torch = version
        if len({e.spec.split("+")[0] for e in exact}) > 1:
            questions.append(Question("torch.version", "the repository pins torch differently in "
                                      + ", ".join(f"{e.where} ({e.spec})" for e in exact) + f": took {torch}", where))
    known = cat.torch_versions()
    if torch and torch not in cat.torch:
        same_minor = [v for v in known if catalog.minor_key(v) == catalog.minor_key(torch)]
        later = [v for v in known if catalog.V(v) >= catalog.V(torch)]
        chosen = (same_minor or later or known)[-1 if same_minor else 0]
        questions.append(Question("torch.version", f"torch {torch} is not in the catalog's toolchains/torch.toml: "
                                  f"took {chosen}; add torch {torch} to a user toolchains/torch.toml to keep it", where))
        torch = chosen
    if not torch:
        torch = "2.0.1" if "2.0.1" in cat.torch else known[-1]
        spec = next((f for f in pins), None)
        questions.append(Question("torch.version", f"no exact torch pin was found"
                                  f"{' (only ' + spec.spec + ')' if spec else ''}: {torch} is a guess",
                                  spec.where if spec else ""))
    rel = cat.torch[torch]
    builds = [*rel.index, rel.pypi]
    cuda_found = _best(r.cuda)
    cuda = ""
    if cuda_found:
        cuda = cuda_found[0]
        if len({c for c, _ in r.cuda}) > 1:
            questions.append(Question("torch.cuda", "the repository names several CUDA versions: "
                                      + ", ".join(f"{c} ({w})" for c, w in r.cuda) + f": took {cuda}", cuda_found[1]))
        if cuda not in builds:
            same_major = [c for c in builds if c.split(".")[0] == cuda.split(".")[0]]
            chosen = max(same_major or builds, key=catalog.V)
            questions.append(Question("torch.cuda", f"torch {torch} has no CUDA {cuda} build in the catalog: took {chosen}",
                                      cuda_found[1]))
            cuda = chosen
    if not cuda:
        cuda = max(rel.index, key=catalog.V) if rel.index else rel.pypi
        questions.append(Question("torch.cuda", f"the repository names no CUDA version: took {cuda}, the newest "
                                  f"build of torch {torch}"))
    python = ""
    if r.python:
        python, where = r.python[0]
    if not python or not catalog.PYTHON_RE.match(python):
        python = "3.8" if rel.supports_python("3.8") else rel.python[0]
        questions.append(Question("model.python", f"the repository names no Python version: took {python}"))
    elif not rel.supports_python(python):
        questions.append(Question("model.python", f"Python {python} ({where}) is outside torch {torch}'s range "
                                  f"{rel.python[0]}-{rel.python[1]}", where))
    return torch, cuda, python


KIND_ORDER = {"guide": 0, "conda": 0, "requirements": 1, "environment": 2, "setup": 3, "pyproject": 3}


def _packages(found: list[Found], local: set[str], questions: list) -> dict:
    """name -> (spec, Found): the guide's pin first, then requirements, environment, setup/pyproject;
    an exact pin over a range, a range over "*"."""
    by_name: dict[str, list[Found]] = {}
    optional: dict[str, Found] = {}
    for f in found:
        key = canonicalize_name(f.name)
        if key in TORCH_NAMES or key in NOT_PACKAGES or key in local:
            continue
        if f.kind == "optional":
            optional.setdefault(key, f)
            continue
        by_name.setdefault(key, []).append(f)
    left_out = [f for key, f in sorted(optional.items()) if key not in by_name]
    if left_out:
        first = left_out[0]
        questions.append(Question("packages", "left out, from a section of the guide that is optional ("
                                  + ", ".join(f.text for f in left_out) + "): add them to [packages] if training "
                                  "needs them", first.where))
    out = {}
    for key in sorted(by_name):
        items = by_name[key]
        rank = lambda f: (0 if catalog.is_exact(f.spec) else 1 if f.spec != "*" else 2, KIND_ORDER.get(f.kind, 4))
        items.sort(key=rank)
        best = items[0]
        spec = best.spec
        try:
            if spec != "*" and not catalog.is_exact(spec):
                SpecifierSet(spec)
        except InvalidSpecifier:
            questions.append(Question(f"packages.{key}", f"{best.text!r} is not a version spec the catalog takes: left "
                                      "unpinned", best.where))
            spec = "*"
        exact = {f.spec for f in items if catalog.is_exact(f.spec)}
        if len(exact) > 1:
            questions.append(Question(f"packages.{key}", f"pinned differently: " + ", ".join(
                f"{f.spec} ({f.where})" for f in items if catalog.is_exact(f.spec)) + f": took {spec}", best.where))
        if best.kind in ("conda",) or (best.kind == "environment" and "==" not in best.text and "=" in best.text):
            questions.append(Question(f"packages.{key}", f"{best.text!r} is a conda package: is {key} its PyPI name?",
                                      best.where))
        out[key] = (spec, best)
    return out


def _check_pypi(packages: dict, pypi, questions: list) -> None:
    for key, (spec, f) in list(packages.items()):
        try:
            dates = pypi(key)
        except Exception as exc:  # noqa: BLE001 - the index unreachable: one question, the draft still made
            questions.append(Question("packages", f"the package index could not be asked ({exc}): pins not checked"))
            return
        if dates is None:
            questions.append(Question(f"packages.{key}", f"{key} is not on the package index: a typo, a conda-only "
                                      "package, or one to install from elsewhere?", f.where if f else ""))
        elif catalog.is_exact(spec) and not any(_same(v, spec) for v in dates):
            questions.append(Question(f"packages.{key}", f"{key} {spec} has no release on the package index",
                                      f.where if f else ""))


def _same(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def _era(tree: Path, head: str, packages: dict, pypi, questions: list) -> tuple[str | None, str]:
    """The last commit that touched code (not docs or images); without git, the newest release
    the repository pins exactly (the index's upload dates)."""
    if head:
        day = _git(["-C", str(tree), "log", "-1", "--format=%cs", head, "--", *CODE_SUFFIXES], check=False)
        if day and catalog.DATE_RE.match(day):
            last = _git(["-C", str(tree), "log", "-1", "--format=%cs", head], check=False)
            why = "the last commit that touched code" + (f" (later ones, to {last}, touch only docs)" if last != day else "")
            return day, why
    if pypi is not None:
        best = ""
        for key, (spec, _) in packages.items():
            if catalog.is_exact(spec):
                try:
                    dates = pypi(key) or {}
                except Exception:  # noqa: BLE001 - said by _check_pypi already
                    break
                best = max(best, next((d for v, d in dates.items() if _same(v, spec) and d), ""))
        if best:
            questions.append(Question("model.era", f"no git history: {best} is the release date of the newest exact pin; "
                                      "the repository's own date is better"))
            return best, "the newest release the repository pins exactly (no git history)"
    questions.append(Question("model.era", "no git history and no dated pin: what date do the pins reflect? "
                              "(without an era, what the model leaves open resolves against PyPI as of today)"))
    return None, ""


def _imports(tree: Path, skip: set[str]):
    """(top-level module, file, line) of every import in the repository's Python files."""
    for path in _walk(tree, skip):
        if path.suffix != ".py":
            continue
        t = _parse(_read(path))
        if t is None:
            continue
        for node in ast.walk(t):
            if isinstance(node, ast.Import):
                for a in node.names:
                    yield a.name.split(".")[0], _rel(tree, path), node.lineno
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                yield node.module.split(".")[0], _rel(tree, path), node.lineno


def _stdlib_modules(tree: Path, skip: set[str], questions: list) -> dict:
    out, asked = {}, set()
    for module, file, line in _imports(tree, skip):
        if module in catalog.STDLIB_APART and module not in out:
            out[module] = f"{file}:{line} imports {module}"
        elif module in OS_APART_UNKNOWN and module not in asked and file != "setup.py" and not file.endswith("/setup.py"):
            asked.add(module)
            questions.append(Question("stdlib_modules", f"{file}:{line} imports {module}, which the OS packs apart "
                                      f"({OS_APART_UNKNOWN[module]}) and the catalog cannot install yet", f"{file}:{line}"))
    return out


def _flash_attn_head_dims(tree: Path, skip: set[str], questions: list) -> None:
    """Code that calls flash-attn: the head dims its attention uses are a question (they live in
    configs as embed dims over heads); answered, --trim-kernels compiles those kernels alone."""
    hit = next((f"{file}:{line}" for module, file, line in _imports(tree, skip) if module == "flash_attn"), None)
    if hit:
        questions.append(Question("flash_attn.head_dims", f"{hit} imports flash_attn: which head dims does its attention "
                                  "call (embed dims over heads, in its configs)? Written as [flash_attn] head_dims and why, "
                                  "--trim-kernels compiles flash-attn's kernels for those alone (SparseDrive's 32 and 64: "
                                  "25 of flash-attn 2.7.4.post1's 85 objects)", hit))


def _unlisted_imports(tree: Path, skip: set[str], cat, names: list[str], questions: list) -> None:
    """One question naming the modules the code imports that no install file provides for."""
    import sys
    from . import packages as blocks
    from .incontainer.smoke_common import IMPORT_NAMES
    provided = {"torch", "torchvision", "torchaudio", "setuptools", "pkg_resources"}
    for n in names:
        block = blocks.block_for(cat, n)
        provided |= {m.lower() for m in (n, n.replace("-", "_"), IMPORT_NAMES.get(n, n), block.import_name(n) if block else n)}
    local = set()
    for path in _walk(tree):
        local.add(path.stem)
        local.update(path.relative_to(tree).parts[:-1])
        if path.name == "setup.py":
            for m in re.finditer(r"""(?:CUDA|Cpp)Extension\(\s*(?:name\s*=\s*)?['"]([\w.]+)['"]""", _read(path)):
                local.add(m.group(1).split(".")[0])
    missing: dict[str, str] = {}
    for module, file, line in _imports(tree, skip):
        # the index's names are case-blind (SharedArray is installed as sharedarray, imported as SharedArray)
        if module in sys.stdlib_module_names or module in local or module.lower() in provided or module in missing \
                or module.startswith("_") or Path(file).name == "setup.py":
            continue
        missing[module] = f"{file}:{line}"
    if missing:
        shown = sorted(missing.items())[:20]
        first = shown[0][1]
        questions.append(Question("packages", "imported, but no install file names a package for them (some come "
                                  "with another package): " + ", ".join(f"{m} ({w})" for m, w in shown)
                                  + (f" and {len(missing) - len(shown)} more" if len(missing) > len(shown) else "")
                                  + ": add the ones training needs to [packages]", first))


# -- training and the network


def _train(tree: Path, r: Reader, questions: list) -> dict:
    entry = next((e for e in TRAIN_ENTRIES if (tree / e).is_file()), "")
    for words, where in r.train_lines:  # the guide's own training command
        script = next((w for w in words if w.endswith(".py") and "train" in Path(w).name and (tree / w.lstrip("./")).is_file()), "")
        if script and not entry:
            entry = os.path.normpath(script)
    if not entry:
        cands = sorted(p for p in tree.glob("train*.py"))
        entry = _rel(tree, cands[0]) if cands else ""
    if not entry:
        questions.append(Question("train.entry", "no train script was found (tools/train.py, train*.py): which is it?"))
        entry = "train.py"
    text = _read(tree / entry)
    launcher, local_rank, extra = "", None, []
    scripts = [p for p in _walk(tree) if p.suffix == ".sh" and "train" in p.name]
    for sh in scripts:
        body = _read(sh)
        if "torch.distributed.launch" in body or "torchrun" in body:
            launcher = "torch.distributed.launch" if "torch.distributed.launch" in body else "torchrun"
            extra = _extra_args(body, Path(entry).name)
            break
    if not launcher:
        if re.search(r"\b(mp|multiprocessing)\.spawn\(", text) or DETECTRON2_LAUNCH.search(text):
            launcher = "mp.spawn"
        elif re.search(r"\b(pytorch_lightning|lightning)\b", text) and "Trainer(" in text:
            launcher = "lightning"
        elif not DISTRIBUTED.search(text):
            launcher = "python"  # no process group, no rank: one process, as `python train.py` runs it
        else:
            launcher = "torchrun"
            questions.append(Question("train.launcher", f"{entry}: how is training launched? torchrun is a guess "
                                      f"(one of {', '.join(catalog.LAUNCHERS)})", entry))
    m = re.search(r"""add_argument\(\s*['"](--local[_-]rank)['"]""", text)
    if m:
        local_rank = m.group(1)
    config = _first_config(tree, r)
    out = {"launcher": launcher, "entry": entry}
    if config:
        out["config"] = config
    if local_rank and launcher == "torch.distributed.launch":
        out["local_rank_arg"] = local_rank
    if extra:
        out["extra_args"] = extra
    return out


def _extra_args(script: str, entry_name: str) -> list[str]:
    """The plain arguments a launch script passes after the train script and its config."""
    for line in script.splitlines():
        if entry_name not in line:
            continue
        words = line.split()
        at = next((i for i, w in enumerate(words) if w.endswith(entry_name)), None)
        if at is None:
            continue
        rest = words[at + 1:]
        out = [w for w in rest if catalog.WORD_RE.match(w) and not w.startswith("$") and not w.isdigit()]
        # a flag whose value was a shell variable goes with it
        return [w for i, w in enumerate(out) if w.startswith("--") or (i and out[i - 1].startswith("--"))]
    return []


def _is_config(rel: str) -> bool:
    """A training config: an OpenMMLab .py or a detectron2/yacs .yaml, not a base others inherit."""
    return rel.endswith((".py", ".yaml", ".yml")) and "_base_" not in rel.split("/") \
        and not Path(rel).name.startswith(("Base-", "_base"))


def _first_config(tree: Path, r: Reader) -> str:
    for words, _ in r.train_lines:
        for w in words:
            w = w.lstrip("./") if w.startswith("./") else w
            if _is_config(w) and any(w.startswith(d + "/") for d in CONFIG_DIRS) and (tree / w).is_file():
                return w
    for guide in r.guides():  # a config the guide names (in a link or a command)
        for m in re.finditer(r"((?:projects/)?configs?/[\w./-]+\.(?:py|ya?ml))", _read(guide)):
            if (tree / m.group(1)).is_file() and _is_config(m.group(1)):
                return m.group(1)
    for d in CONFIG_DIRS:
        if (tree / d).is_dir():
            found = sorted((p for p in _walk(tree / d) if _is_config(_rel(tree, p)) and p.name != "__init__.py"),
                           key=lambda p: (p.suffix != ".py", len(p.relative_to(tree).parts), str(p)))
            if found:
                return _rel(tree, found[0])
    return ""


def _construct(tree: Path, train: dict, r: Reader, questions: list) -> dict | None:
    text = _read(tree / train["entry"])
    t = _parse(text)
    if t is None:
        return None
    imported = {}  # name -> module it comes from
    for node in ast.walk(t):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                imported[a.asname or a.name] = node.module
    where = train["entry"]
    hooks = [n for n in ast.walk(t) if isinstance(n, ast.Attribute) and n.attr == "add_model_specific_args"
             and isinstance(n.value, ast.Name)]
    if hooks:
        obj = hooks[0].value.id
        module = imported.get(obj, "")
        if not module:
            questions.append(Question("construct.module", f"{where} calls {obj}.add_model_specific_args: from which "
                                      "module does it import the class?", where))
            module = obj.lower()
        out = {"kind": "argparse", "module": module, "object": obj, "args_hook": "add_model_specific_args"}
        args = next(([w for w in words[1:] if catalog.WORD_RE.match(w)] for words, _ in r.train_lines
                     if words and Path(words[0]).name == Path(train["entry"]).name), [])
        if args:
            out["args"] = args
        questions.append(Question("construct.args", f"the network is built from {module}.{obj}'s argument hook with "
                                  "the guide's training arguments: check construct.args", where))
        return out
    if imported.get("get_cfg") == "detectron2.config":
        return _detectron2_construct(t, imported, train.get("config", ""), where, questions)
    builder = next((c for c in ast.walk(t) if isinstance(c, ast.Call) and _callee(c) in BUILDERS), None)
    if builder is None and (own := _own_class_construct(tree, t, imported, where, questions)):
        return own
    if builder is None:
        questions.append(Question("construct", f"{where} calls none of {', '.join(BUILDERS)} and no argument hook: "
                                  "how does it build the network? (smoke's model level is skipped without [construct])",
                                  where))
        return None
    fname = _callee(builder)
    module = imported.get(fname, "")
    if isinstance(builder.func, ast.Attribute):
        dotted = ast.unparse(builder.func.value)
        module = imported.get(dotted.split(".")[0], dotted) if "." not in dotted else dotted
    if not module:
        questions.append(Question("construct.builder", f"{where}:{builder.lineno} calls {fname}: from which module?",
                                  f"{where}:{builder.lineno}"))
        module = "mmdet3d.models"
    loader_mod = imported.get("Config", "")
    if not loader_mod:
        questions.append(Question("construct.loader", f"{where} reads its config without mmcv's or mmengine's Config: "
                                  "mmcv.Config.fromfile is a guess", where))
        loader_mod = "mmcv"
    cfg_kwargs = [kw.arg for kw in builder.keywords if kw.arg and catalog.IDENT_RE.match(kw.arg)
                  and kw.arg.endswith("cfg")]
    config = train.get("config", "")
    if not config:
        questions.append(Question("construct.config", "no training config was found: which config does training use?"))
        return None
    out = {"kind": "config", "config": config, "loader": f"{loader_mod}.Config.fromfile", "builder": f"{module}.{fname}"}
    if cfg_kwargs:
        out["cfg_kwargs"] = cfg_kwargs
    imports = _plugin_imports(tree, config, t, imported)
    if imports:
        out["imports"] = imports
    questions.append(Question("construct.config", f"the network is built from {config} (the first config found) "
                              f"through {module}.{fname}: is that the config to verify with?", where))
    return out


def _own_class_construct(tree: Path, t, imported: dict, where: str, questions: list) -> dict | None:
    """`net = Net(...)` (maybe `.cuda()`), a class from the repository's own package whose
    parameters the script trains: the same call as [construct] kind python, each `args.X` taken
    from its argparse default."""
    trained = {n.func.value.id for n in ast.walk(t) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
               and n.func.attr == "parameters" and isinstance(n.func.value, ast.Name)}
    defaults = {}
    for c in _calls(t, "add_argument"):
        flag = next((a.value for a in c.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")), None)
        default = next((kw.value for kw in c.keywords if kw.arg == "default"), None)
        if flag and isinstance(default, ast.Constant):
            defaults[flag[2:].replace("-", "_")] = default.value
    for node in ast.walk(t):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in trained):
            continue
        call = node.value
        while isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr in ("cuda", "to"):
            call = call.func.value  # Net(...).cuda(): the constructor is the inner call
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
            continue
        module = imported.get(call.func.id, "")
        if not module or not (tree / module.split(".")[0]).is_dir():
            continue

        def value(v):
            if isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name) and v.value.id == "args" \
                    and v.attr in defaults:
                return repr(defaults[v.attr])
            return ast.unparse(v) if isinstance(v, ast.Constant) else None
        values = [value(a) for a in call.args] + [value(kw.value) for kw in call.keywords]
        if None in values or any(kw.arg is None for kw in call.keywords):
            continue  # an argument only the running script knows (or **kwargs)
        names = [""] * len(call.args) + [f"{kw.arg}=" for kw in call.keywords]
        parts = [n + v for n, v in zip(names, values)]
        questions.append(Question("construct.code", f"the network is built as {where}:{node.lineno} builds it "
                                  "(args.* from their argparse defaults): check construct.code", f"{where}:{node.lineno}"))
        return {"kind": "python", "code": f"from {module} import {call.func.id}\n"
                                          f"model = {call.func.id}({', '.join(parts)})\n"}
    return None


def _detectron2_construct(t, imported: dict, config: str, where: str, questions: list) -> dict | None:
    """A detectron2 train script's setup(): get_cfg(), the add_*_config hooks it imports, the yaml,
    build_model, as lines of [construct] kind python (on the CPU: smoke has no GPU to build on)."""
    if not config:
        questions.append(Question("construct.code", f"{where} builds a detectron2 cfg: no training config (.yaml) was "
                                  "found: which config does training use?", where))
        return None
    hooks = sorted({c.func.id for c in ast.walk(t) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
                    and re.match(r"^add_\w*config$", c.func.id) and c.func.id in imported})
    lines = ["from detectron2.config import get_cfg", "from detectron2.modeling import build_model"]
    lines += [f"from {imported[h]} import {h}" for h in hooks]
    lines += ["cfg = get_cfg()", *(f"{h}(cfg)" for h in hooks), f"cfg.merge_from_file({json.dumps(config)})",
              'cfg.MODEL.DEVICE = "cpu"', "model = build_model(cfg)"]
    questions.append(Question("construct.code", f"the network is built as {where}'s setup() builds its cfg, from "
                              f"{config} (the first config found): is that the config to verify with?", where))
    return {"kind": "python", "code": "\n".join(lines) + "\n"}


def _plugin_imports(tree: Path, config: str, t, imported: dict) -> list[str]:
    """What the train script imports first to fill the registries: the config's plugin_dir, else
    a local package it imports that registers modules."""
    cfg_text = _read(tree / config)
    for path in [tree / config, *sorted((tree / config).parent.rglob("*.py"))][:50]:
        m = re.search(r"""plugin_dir\s*=\s*['"]([\w./-]+)['"]""", _read(path) if path != tree / config else cfg_text)
        if m:
            return [m.group(1).strip("/").replace("/", ".")]
    local = []
    for node in ast.walk(t):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        for n in names:
            top = n.split(".")[0]
            if (tree / top / "__init__.py").is_file() and top not in local:
                local.append(top)
    registers = [m for m in local if any("register_module" in _read(p) for p in _walk(tree / m) if p.suffix == ".py")]
    preferred = [m for m in registers if m in ("model", "models", "projects", "plugin")]
    return preferred[:1] or registers[:1]


def _fixers(tree: Path) -> list[dict]:
    """What `envbuild fix --list` finds (every fixer that needs no Plan), per fixer."""
    from .resolve import FIXER_WHEN
    chosen = [fixers.make(n) for n in fixers.FIXERS if n != "mmcv-version-assert" and not fixers.needs_args(n)]
    out: dict[str, dict] = {}
    for f in fixers.detect(str(tree), chosen):
        item = out.setdefault(f.fixer, {"fixer": f.fixer, "why": f.why, "files": 0, "first": f"{f.path}:{f.line}",
                                        "only_when": FIXER_WHEN.get(f.fixer, "")})
        item["files"] += 1
    return list(out.values())


def _title(tree: Path, name: str) -> tuple[str, str]:
    readme = next((p for p in sorted(tree.iterdir()) if p.is_file() and p.name.lower().startswith("readme")), None)
    title = tree.name if tree.name and tree.name != name else name
    description = ""
    for line in _read(readme).splitlines() if readme else []:
        s = re.sub(r"<[^>]+>|!\[[^\]]*\]\([^)]*\)|\[([^\]]*)\]\([^)]*\)", r"\1", line).strip(" #*_>")
        s = s.replace("`", "")  # markdown's code marks, not the words
        if len(s) > 15 and not s.startswith(("http", "|", "-")):
            description = s[:160]
            break
    description = "".join(c for c in description if c.isprintable())
    return title, description or f"{title} (drafted by envbuild add)"


# ---------------------------------------------------------------- writing


def _q(value) -> str:
    """A TOML value: strings through JSON's escapes (a subset of TOML's basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_q(v) for v in value) + "]"
    if "\n" in str(value) and '"""' not in str(value) and "\\" not in str(value):
        return '"""\n' + str(value) + '"""'  # lines of code stay lines
    return json.dumps(str(value), ensure_ascii=False)


def _key(name: str) -> str:
    return name if re.match(r"^[A-Za-z0-9_-]+$", name) else _q(name)


def render(d: Draft, command: str) -> str:
    """The entry as TOML: each pin with the file and line it came from, each question beside its key."""
    lines = [f"{HEADER} from {d.source} at {d.commit[:12]}: {command}",
             "# Edit the keys the questions below name, then: envbuild catalog check",
             "[model]",
             f"name = {_q(d.name)}", f"title = {_q(d.title)}", f"description = {_q(d.description)}",
             f"repo = {_q(d.repo)}", f"commit = {_q(d.commit)}"]
    if d.era:
        lines.append(f"era = {_q(d.era)}  # {d.era_why}")
    lines += [f"python = {_q(d.python)}", "", "[torch]", f"version = {_q(d.torch)}", f"cuda = {_q(d.cuda)}", "",
              "[packages]"]
    for name, (spec, f) in sorted(d.packages.items()):
        lines.append(f"{_key(name)} = {_q(spec)}" + (f"  # {f.where}: {f.text}" if f else ""))
    for g in sorted(d.git_packages, key=lambda g: g.name):
        done = bool(g.https and g.commit)  # else commented out: the questions say what is missing
        mark = "" if done else "# "
        lines += ["", f"{mark}[git_packages.{_key(g.name)}]  # {g.where}: {g.url}{'@' + g.ref if g.ref else ''}",
                  f"{mark}url = {_q(g.https or g.url)}", f"{mark}commit = {_q(g.commit or g.ref or '?')}"]
        if g.subdirectory:
            lines.append(f"{mark}subdirectory = {_q(g.subdirectory)}")
        lines.append(f"{mark}build = \"pip\"  # a guess: cuda-extension if it compiles CUDA code")
    for name, (version, path, where) in sorted(d.vendored.items()):
        lines += ["", f"[vendored.{_key(name)}]  # {where}", f"version = {_q(version)}", f"path = {_q(path)}"]
    if d.stdlib_modules:
        lines += ["", "[stdlib_modules]"] + [f"{_key(m)} = {_q(why)}" for m, why in sorted(d.stdlib_modules.items())]
    for ext in d.extensions:
        lines += ["", "[[extensions]]" + (f"  # built as {ext['build_from']} does" if ext["build_from"] else
                                          "  # no guide line builds it: the command is a guess"),
                  f"name = {_q(ext['name'])}", f"path = {_q(ext['path'])}", f"build = {_q(' '.join(ext['build']))}"]
        if ext["needs_visible_gpu"]:
            lines.append(f"needs_visible_gpu = true  # {ext['setup']} refuses to build without a visible GPU")
    lines += ["", "[train]"] + [f"{k} = {_q(v)}" for k, v in d.train.items()]
    if d.construct:
        lines += ["", "# smoke's model level builds the network as the train script does (a guess: check it)",
                  "[construct]"]
        for k, v in d.construct.items():  # code keeps its lines (_q writes it as a multi-line string)
            lines += f"{k} = {_q(v)}".split("\n")
    if d.fixers:
        lines += ["", "# envbuild fix --list finds (each applies only to the Plans named):"]
        lines += [f"#   {f['fixer']}: {f['files']} file(s), first {f['first']}" for f in d.fixers]
    if d.questions:
        lines += ["", "# Questions envbuild add could not decide:"]
        lines += [f"#   {q.key}: {q.question}" for q in d.questions]
    return "\n".join("".join(c if c.isprintable() or c == "\t" else " " for c in ln) for ln in lines) + "\n"


def user_catalog(folder: Path | None = None) -> tuple[Path, bool]:
    """The user catalog folder (the argument, catalog_dir / ENVBUILD_MATRICES, else envbuild's own
    state folder's catalog/), and whether the configuration already reads it."""
    from .config import setting
    if folder is not None:
        configured = setting("catalog_dir")
        return Path(folder), bool(configured) and Path(configured).resolve() == Path(folder).resolve()
    configured = setting("catalog_dir")
    if configured:
        return Path(configured), True
    from .build import state_dir
    return state_dir() / "catalog", False


def _overlay(user: Path | None, root: Path) -> Path:
    """A copy of the user catalog's cards and toolchains (not its models: the file add replaces
    may be the one that does not load) in root."""
    (root / "models").mkdir(exist_ok=True)
    if user is not None and user.is_dir():
        if (user / "cards.toml").is_file():
            shutil.copy(user / "cards.toml", root / "cards.toml")
        if (user / "toolchains").is_dir():
            shutil.copytree(user / "toolchains", root / "toolchains", dirs_exist_ok=True)
    return root


def _validate(text: str, name: str, user: Path | None) -> None:
    """Load the draft with the catalog loader, on top of the user catalog's own cards and
    toolchains: what is written always loads (a CatalogError otherwise, as one line)."""
    with tempfile.TemporaryDirectory(prefix="envbuild-add-") as tmp:
        root = _overlay(user, Path(tmp))
        (root / "models" / f"{name}.toml").write_text(text)
        catalog.load(root).model(name)


def _materialize(source: str, commit: str | None, keep_in: Path | None) -> tuple[Path, Path | None]:
    """The checkout to read: a local path as it is (or a clone of it at --commit), a URL cloned.
    Returns (tree, temporary folder to remove or keep)."""
    if is_url(source):
        tmp = Path(tempfile.mkdtemp(prefix=".add-", dir=keep_in)) if keep_in else Path(tempfile.mkdtemp(prefix="envbuild-add-"))
        tree = tmp / "src"
        try:
            _git(["clone", "--quiet", source, str(tree)])
            if creds.without_credentials(source) != source:  # the kept clone keeps no token either
                _git(["-C", str(tree), "remote", "set-url", "origin", creds.without_credentials(source)])
            if commit:
                _git(["-C", str(tree), "checkout", "--quiet", commit])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tree, tmp
    path = Path(source).expanduser()
    if not path.exists():
        raise BadInput(f"{source}: no such repository folder", "give a local checkout or a git URL")
    if not path.is_dir():
        raise BadInput(f"{source} is not a folder", "give a local checkout or a git URL")
    if not commit:
        return path.resolve(), None
    if not _is_git(path):
        raise BadInput(f"--commit {commit}: {source} is not a git checkout", "leave --commit out, or give a git checkout")
    head = _git(["-C", str(path), "rev-parse", "HEAD"], check=False)
    want = _git(["-C", str(path), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"], check=False)
    if not want:
        raise BadInput(f"--commit {commit}: no such commit in {source}", "git -C PATH log shows its commits")
    if want == head:
        return path.resolve(), None
    tmp = Path(tempfile.mkdtemp(prefix=".add-", dir=keep_in)) if keep_in else Path(tempfile.mkdtemp(prefix="envbuild-add-"))
    try:
        _git(["clone", "--quiet", "--no-checkout", str(path.resolve()), str(tmp / "src")])
        _git(["-C", str(tmp / "src"), "checkout", "--quiet", want])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp / "src", tmp


def add_model(source: str, *, commit: str | None = None, name: str | None = None, force: bool = False,
              dry_run: bool = False, offline: bool = False, catalog_dir: Path | None = None, card: str | None = None,
              pypi=None) -> Draft:
    """`envbuild add`: draft the entry, validate it, write it into the user catalog (not on a dry
    run). Bad input (no such path, not a repository, a built-in model's name, a file envbuild did
    not write) is refused before anything is written."""
    from .outputs import check_own_file, write_own_file
    if not source or not source.strip():
        raise BadInput("no repository given", "envbuild add PATH or envbuild add https://host/owner/repo")
    if commit is not None and not re.match(r"^[0-9a-fA-F]{4,40}$|^[\w.][\w./-]*$", commit):  # never a git option
        raise BadInput(f"--commit {commit!r} is not a commit or tag", "a commit hash or a tag")
    model_name = name or default_name(source)
    if not catalog.NAME_RE.match(model_name or ""):
        raise BadInput(f"{model_name!r} cannot be a model name (lowercase letters, digits, '.', '_', '-')",
                       "choose one with --name")
    builtin = catalog.load(catalog.builtin_root())
    if model_name in builtin.models:
        raise BadInput(f"{model_name!r} is a built-in model", f"choose another name with --name (e.g. {model_name}-mine)")
    user, configured = user_catalog(catalog_dir)
    target = user / "models" / f"{model_name}.toml"
    if not dry_run and not force:
        check_own_file(target, lambda text: text.startswith(HEADER))
    if not is_url(source) and Path(source).expanduser().is_dir() and not commit:
        path = Path(source).expanduser()
        if not _is_git(path) and not any((path / f).exists() for f in ("setup.py", "pyproject.toml")) \
                and not list(path.glob("*.py")) and not list(path.glob("*/*.py")):
            raise BadInput(f"{source} holds no Python code and no git checkout: not a model repository",
                           "point it at the root of a model's checkout")
    from .build import state_dir
    sources_dir = state_dir() / "sources"
    if not dry_run:
        sources_dir.mkdir(parents=True, exist_ok=True)
    tree, tmp = _materialize(source, commit, None if dry_run else sources_dir)
    try:
        if pypi is None and not offline:
            pypi = _index_dates()
        with tempfile.TemporaryDirectory(prefix="envbuild-add-") as facts:
            cat = catalog.load(_overlay(user, Path(facts)))
        d = draft(source, commit=commit, name=model_name, pypi=pypi, cat=cat, tree=tree,
                  ls_remote=None if offline else _ls_remote)
        command = f"envbuild add {source}" + (f" --commit {commit}" if commit else "") + \
            (f" --name {model_name}" if name else "")
        d.text = creds.redact(render(d, command))  # a token in a URL never reaches the catalog file
        _validate(d.text, model_name, user)
        src_path = tree
        if tmp is not None and not dry_run:  # keep the clone where envbuild keeps its own files
            kept = sources_dir / model_name
            if kept.exists():
                shutil.rmtree(kept)
            tree.rename(kept)
            src_path = kept
        env = "" if configured else f"ENVBUILD_MATRICES={shlex.quote(str(user))} "
        d.next_command = (f"{env}envbuild verify {model_name} --card {card or 'a800'} "
                          f"--source {shlex.quote(str(src_path))}")
        d.dry_run = dry_run
        if not dry_run:
            (user / "models").mkdir(parents=True, exist_ok=True)
            write_own_file(target, d.text, (lambda text: True) if force else (lambda text: text.startswith(HEADER)))
            d.path = str(target)
        return d
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _index_dates():
    """pypi(name) -> {version: date} or None, through the configured index (mirror, CA bundle)."""
    from . import config
    from .era import release_dates
    sources = config.load_sources()
    cache: dict = {}
    auth = creds.auth_header(sources.pypi_index, sources.credentials) if sources.credentials else {}

    def ask(name: str):
        if name not in cache:
            cache[name] = release_dates(sources.pypi_index, name, sources.ca_bundle, auth=auth)
        return cache[name]
    return ask
