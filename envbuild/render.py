"""Render stage: Plan -> build context (Dockerfile, requirements.in, plan.json, helpers).

All decisions are made here in Python (the context below); the Jinja template only
formats. Every value that reaches the Dockerfile is validated again and shell-quoted,
so a Plan loaded from anywhere cannot inject an instruction. Same Plan, same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import jinja2
from packaging.utils import canonicalize_name as canonical

from . import labels as label
from . import creds, outputs, packages, paths
from . import __version__
from .catalog import CC_RE, FIND_LINKS_RE, STDLIB_APART, APT_RE, ENV_NAME_RE, ENV_VALUE_RE, FILE_RE, PKG_RE, V, is_exact
from .catalog import COMMIT_RE, EXT_PATH_RE, GIT_BUILDS, GIT_URL_RE, RELPATH_RE
from .errors import BadInput
from .lock import has_package, locked_version, matches
from .plan import Plan

TEMPLATES = Path(__file__).resolve().parent / "templates"
INCONTAINER = Path(__file__).resolve().parent / "incontainer"
FIXERS_SRC = Path(__file__).resolve().parent / "fixers.py"
IMAGE_RE = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*"
                      r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$")
SPEC_RE = re.compile(r"^(==|>=|<=|~=|!=|<|>)?[0-9][0-9A-Za-z.+!*]*(,(==|>=|<=|~=|!=|<|>)[0-9][0-9A-Za-z.+!*]*)*$")
URL_RE = re.compile(r"^https?://[A-Za-z0-9.:@_-]+(/[A-Za-z0-9._~%+-]+)*/?$")
ARCH_RE = re.compile(r"^\d{1,2}\.\d(\+PTX)?(;\d{1,2}\.\d(\+PTX)?)*$")
WORD_RE = re.compile(r"^[A-Za-z0-9_.-][A-Za-z0-9._/=,:+-]*$")
FIXER_RE = re.compile(r"^[a-z][a-z0-9-]*$")
# Part of every wheel cache tag: bump it when the compile or wheel stages change how a wheel is made.
WHEEL_STAGE_FORMAT = "wheel-stage/1"
BUILD_TOOLS = ["ninja", "wheel", "psutil"]
# The compile stage's own tools, fixed so that every model's wheel stages share it (the lock's
# versions differ per model). Each runs on Python 3.8-3.13; setuptools < 70 keeps old setup.py working.
COMPILE_TOOLS = ["ninja==1.11.1.1", "packaging==24.0", "psutil==5.9.8", "setuptools==69.5.1", "wheel==0.43.0"]
# OS packages beside Python: the builder needs git (model source), ninja and ccache;
# the runtime only the shared libraries wheels of this era expect from the OS.
BUILDER_APT = ["ca-certificates", "git", "ninja-build", "ccache"]
# (what a wheel loads beyond these is the catalog's runtime_apt, per package)
RUNTIME_APT = ["ca-certificates", "libgomp1", "libglib2.0-0"]
# The image's paths by name, for the template: {{ p.venv }} (envbuild/paths.py holds them).
IMAGE_PATHS = SimpleNamespace(venv=paths.VENV, helpers=paths.HELPERS, model=paths.MODEL, venv_delta=paths.VENV_DELTA,
                              launcher=paths.LAUNCHER)


def _check(value: str, pattern: re.Pattern, what: str) -> str:
    if not isinstance(value, str) or not pattern.match(value) or "\n" in value:
        raise BadInput(f"refusing to render {what} {value!r}: not a valid value",
                       "fix the catalog entry, flag or config that set it")
    return value


def _sdist_fixer(fx: dict) -> str:
    """A wheel stage's fixer as fixers.py's --fixers takes it: name, then :key=value per argument,
    each checked against the one shape fixers.py allows for it."""
    from .fixers import ARGS
    name = _check(fx["name"], FIXER_RE, "sdist fixer")
    args = fx.get("args") or {}
    for key, value in sorted(args.items()):
        pattern = ARGS.get(name, {}).get(key)
        if pattern is None:
            raise BadInput(f"refusing to render sdist fixer {name}: it takes no argument {key!r}",
                           "fix the catalog entry, flag or config that set it")
        _check(value, pattern, f"sdist fixer {name}'s {key}")
    return "".join([name] + [f":{k}={v}" for k, v in sorted(args.items())])


def requirement(name: str, version: str) -> str:
    """A validated pip requirement: name plus exact version or specifier."""
    _check(name, PKG_RE, "package name")
    if not version:
        return name
    if is_exact(version):
        return f"{name}=={_check(version, SPEC_RE, f'version of {name}')}"
    return name + _check(version.replace(" ", ""), SPEC_RE, f"specifier of {name}")


def without_deps(command: list[str]) -> list[str]:
    """A model extension's build command that installs only the extension: the lock decided
    every dependency, and `setup.py develop` or `pip install` would otherwise re-resolve the
    repo's own requirements (MapTR's vendored mmdetection3d asks numba==0.48.0, numpy<1.20)."""
    words = list(command)
    if "--no-deps" in words or "-N" in words:
        return words
    if "develop" in words:  # setuptools' develop installs install_requires with easy_install
        at = words.index("develop")
    elif "install" in words and words[words.index("install") - 1] in ("pip", "pip3"):
        at = words.index("install")
    else:
        return words
    return words[:at + 1] + ["--no-deps"] + words[at + 1:]


def compiled_block(plan: Plan, name: str) -> packages.Block:
    """The building block the resolver chose for a compiled package of the Plan."""
    return packages.by_family(plan.native_packages[name]["family"])


@dataclass
class Step:
    """One compiled package's wheel stage: compiled from its sdist, or a vendor's prebuilt wheel
    (vendor: its find-links page and why it serves the card), audited before it is used."""
    name: str
    requirement: str
    gb_per_job: int
    env: dict = field(default_factory=dict)
    vendor: dict | None = None
    fixers: tuple[str, ...] = ()  # fixers its sdist gets before it is compiled (a port, --trim-kernels): name[:key=value]
    shared_ref: str | None = None  # the wheel cache's image of this stage: used instead of compiling
    cache_ref: str | None = None  # where this stage's wheel goes in the wheel cache (compiled here)

    @property
    def pack(self) -> str:
        """The stage that holds only the wheel: what the wheel cache stores."""
        return self.stage + "-pack"

    @property
    def stage(self) -> str:
        return wheel_stage(self.name)


@dataclass
class GitStep:
    """One package from git ([git_packages]): fetched by its commit and built into a wheel in a
    stage of its own (from base with pip's build isolation, or from compile for a CUDA extension)."""
    name: str
    url: str
    commit: str
    subdirectory: str
    build: str
    gb_per_job: int = packages.DEFAULT_GB_PER_JOB
    fetch_url: str = ""  # where the build fetches it from: url, or its copy on the git mirror

    @property
    def stage(self) -> str:
        return "git-" + self.name.lower()

    @property
    def cuda(self) -> bool:
        return self.build == "cuda-extension"

    @property
    def path(self) -> str:
        """The folder pip builds, inside the stage's checkout."""
        return "/src/" + self.subdirectory if self.subdirectory else "/src"

    @property
    def label(self) -> str:
        """name=URL@COMMIT[#subdirectory=DIR], as pip would spell the requirement's source."""
        return f"{self.name}={self.url}@{self.commit}" + (f"#subdirectory={self.subdirectory}" if self.subdirectory else "")


# "numpy==1.23.5": a build constraint line (it reaches a RUN line)
BUILD_PIN_RE = re.compile(r"^[A-Za-z0-9._-]+==[0-9][0-9A-Za-z.+!-]*$")


def wheel_stage(package: str) -> str:
    """The Dockerfile stage that makes a compiled package's wheel."""
    return "wheel-" + package.lower()


@dataclass
class Context:
    """Every decision the Dockerfile template formats."""

    plan: Plan
    command: str
    base_image: str
    runtime_image: str
    source: str  # git | local
    pypi_index: str
    locked: bool
    # The packages of the Plan's runtime_apt that the lock installs; None (unlocked): any may arrive.
    with_os_libs: list | None = None
    # Which of the Plan's source_builds the deps stage does: the lock says; unlocked, all may.
    # Pins the deps stage's isolated sdist builds must use (the lock's numpy, whose C ABI an
    # extension compiles against): "name==version" lines, from the lock.
    build_constraints: list = field(default_factory=list)
    source_built: list | None = None
    wheel_cache: str = ""  # registry repository of compiled wheels (Sources.wheel_cache)
    git_mirror: str = ""  # Sources.git_mirror: git repositories are fetched from their copy there
    torch_lock_text: str = ""  # the torch.lock the torch stage installs (locked contexts)
    # compiled package -> its image in the wheel cache, for those some builder already pushed
    shared_wheels: dict = field(default_factory=dict)

    pip = "pip==24.0"  # the newest pip that still runs on Python 3.7/3.8

    @property
    def python(self) -> str:
        return self.plan.python.version

    @property
    def python_bin(self) -> str:
        return f"python{self.python}"

    @property
    def python_apt(self) -> list[str]:
        py = self.python
        return [f"python{py}", f"python{py}-dev", f"python{py}-venv"]

    @property
    def python_probe(self) -> str:
        """The apt package the base and runtime stages look for before they install Python: where
        the image's apt sources lack it, they add the deadsnakes PPA first.

        Probed at build time on purpose, though the Plan says where Python comes from
        (plan.python_source): the Plan knows only the OS of its own base image (Ubuntu), while
        --base-image/--runtime-image (the integration tests' Debian 12 images) and the
        BASE_IMAGE/RUNTIME_IMAGE build args name images it never saw. Debian 12 has Python 3.11
        itself, which the Plan takes from deadsnakes on Ubuntu 22.04, and a PPA cannot be added
        on Debian: following the Plan there would break the build."""
        return self.python_apt[0]

    @property
    def python_extras(self) -> list[str]:
        """Suffixes of the OS packages holding stdlib modules the model imports (tk: tkinter). The
        package is python3.X-tk beside a deadsnakes Python, python3-tk beside the OS's: which one,
        the runtime stage asks apt, as it does for Python itself (python_probe)."""
        return sorted({STDLIB_APART[m] for m in self.plan.stdlib_modules})

    @property
    def python_origin(self) -> list[str]:
        """Comment lines: where the Plan takes Python from, and that the build checks (python_probe)."""
        if self.deadsnakes:
            return [f"Python {self.python} is not in this OS: it comes from the deadsnakes PPA (Ubuntu)."]
        return [f"Python {self.python} comes from the OS; a base image given with --base-image may lack it,",
                "and then it comes from the deadsnakes PPA (Ubuntu)."]

    @property
    def pip_env(self) -> list[tuple[str, str]]:
        """The base stage's pip settings beside PIP_DISABLE_PIP_VERSION_CHECK."""
        env = [("PIP_INDEX_URL", self.pypi_index)]
        if self.trusted_hosts:
            env.append(("PIP_TRUSTED_HOST", self.trusted_hosts))
        return env

    @property
    def builder_apt(self) -> list[str]:
        return self.python_apt + BUILDER_APT

    @property
    def deps_from(self) -> str:
        """What the deps stage installs from (its header says)."""
        return "hash-checked lock" if self.locked else "requirements.in, not locked yet"

    @property
    def source_builds(self) -> list[dict]:
        """The catalog's recipes for the packages pip builds from source in the deps stage."""
        chosen = self.plan.source_builds if self.source_built is None else self.source_built
        return [dict(self.plan.source_builds[name], name=name) for name in sorted(chosen)]

    build_tools = COMPILE_TOOLS

    @property
    def fixes_installed(self) -> list[str]:
        """Installed distributions a fixer patches (validated names: they reach a comment)."""
        return sorted({_check(d, PKG_RE, "package name") for f in self.plan.fixers for d in f.installed})

    def _source_build_apt(self, key: str) -> list[str]:
        """The OS packages the chosen source builds need ("build_apt" or "runtime_apt"), validated."""
        return sorted({_check(a, APT_RE, "apt package") for sb in self.source_builds for a in sb[key]})

    @property
    def deps_apt(self) -> list[str]:
        return self._source_build_apt("build_apt")

    @property
    def deps_env(self) -> list[tuple[str, str]]:
        return [(_check(k, ENV_NAME_RE, "env name"), _check(v, ENV_VALUE_RE, "env value"))
                for sb in self.source_builds for k, v in sorted(sb["build_env"].items())]

    @property
    def deps_files(self) -> list[str]:
        return sorted({_check(f, FILE_RE, "build file") for sb in self.source_builds for f in sb["build_files"]})

    @property
    def runtime_apt(self) -> list[str]:
        apt = [f"python{self.python}", f"python{self.python}-venv"] + RUNTIME_APT
        for name in sorted(self.plan.runtime_apt if self.with_os_libs is None else self.with_os_libs):
            apt += [_check(a, APT_RE, "apt package") for a in self.plan.runtime_apt[name] if a not in apt]
        apt += self._source_build_apt("runtime_apt")
        if self.plan.torch_compile:
            # torch.compile builds code at run time: inductor's C++ kernels on CPU, triton's
            # launcher module on GPU. Both need a compiler and Python's headers.
            apt += [f"python{self.python}-dev", "g++"]
        return apt

    @property
    def deadsnakes(self) -> bool:
        return self.plan.python_source == "deadsnakes"

    @property
    def torch_requirements(self) -> list[str]:
        p = self.plan
        trio = [requirement("torch", p.torch.version), requirement("torchvision", p.torchvision.version)]
        return trio + ([requirement("torchaudio", p.torchaudio.version)] if p.torchaudio.version else [])

    @property
    def trusted_hosts(self) -> str:
        """Hosts of plain-http indexes (an in-house mirror): pip ignores those unless trusted.
        Loopback is trusted by pip already."""
        from urllib.parse import urlsplit
        hosts = []
        vendor = [s.vendor["find_links"] for s in self.compiled_steps if s.vendor]
        for url in (self.pypi_index, self.plan.torch_index or "", *vendor):
            parts = urlsplit(url)
            if parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1", None):
                hosts.append(parts.hostname)
        return ",".join(dict.fromkeys(hosts))

    @property
    def torch_index_args(self) -> list[str]:
        url = self.plan.torch_index
        if not url:
            return []
        url = creds.without_credentials(_check(url, URL_RE, "torch index"))  # credentials go as a secret
        return ["-f", url] if url.endswith(".html") else ["--extra-index-url", url]

    @property
    def packages(self) -> list[str]:
        """requirements.in entries: the Plan's pins except the compiled ones, plus build tools."""
        compiled = set(self.plan.compiled)
        reqs = [requirement(p.name, p.version) for p in self.plan.packages if p.name not in compiled]
        pinned = {canonical(p.name) for p in self.plan.packages}  # a pin of a build tool wins; never both
        return sorted(reqs + [t for t in BUILD_TOOLS if canonical(t) not in pinned], key=str.lower)

    @property
    def compiled_steps(self) -> list[Step]:
        """One wheel stage per compiled package: its building block says how it builds."""
        by_name = {p.name: p for p in self.plan.packages}
        steps = []
        for name in self.plan.compiled:
            block, build = compiled_block(self.plan, name), self.plan.native_packages[name].get("build") or {}
            vendor = None
            if build.get("from") == "vendor":
                vendor = {"find_links": _check(build["find_links"], FIND_LINKS_RE, "vendor find-links"),
                          "why": _comment(build["why"])}
            fixers = tuple(_sdist_fixer(f) for f in self.plan.native_packages[name].get("sdist_fixers", ()))
            step = Step(name, requirement(name, by_name[name].version), block.job_gb(self.arch_count), dict(block.build_env), vendor,
                        fixers)
            if self.wheel_cache and not vendor:
                ref = self.wheel_ref(step)
                step.shared_ref, step.cache_ref = (ref, None) if name in self.shared_wheels else (None, ref)
            steps.append(step)
        return steps

    @property
    def git_steps(self) -> list[GitStep]:
        """One stage per package from git, every value validated (they reach RUN lines)."""
        out = []
        for name, g in sorted(self.plan.git_packages.items()):
            sub = g.get("subdirectory", "")
            if sub:
                _check(sub, RELPATH_RE, f"subdirectory of {name}")
                if ".." in sub.split("/"):
                    raise BadInput(f"refusing to render the subdirectory {sub!r} of {name}: leaves its repository",
                                   "fix the catalog entry")
            if g.get("build", "pip") not in GIT_BUILDS:
                raise BadInput(f"refusing to render {name}: build {g.get('build')!r} is not one of {', '.join(GIT_BUILDS)}",
                               "fix the catalog entry")
            url = _check(g["url"], GIT_URL_RE, f"git URL of {name}")
            out.append(GitStep(_check(name, PKG_RE, "package name"), url, _check(g["commit"], COMMIT_RE, f"commit of {name}"),
                               sub, g.get("build", "pip"), fetch_url=self.fetch_url(url)))
        return out

    def fetch_url(self, url: str) -> str:
        """Where a build fetches this git repository: the URL itself, or its copy on the git mirror
        (https://github.com/a/b -> MIRROR/github.com/a/b). Labels and plan.json keep the URL."""
        if not self.git_mirror:
            return url
        return _check(self.git_mirror + url.split("://", 1)[1], GIT_URL_RE, "git mirror URL")

    @property
    def compile_stage(self) -> bool:
        """Whether the Dockerfile has the compile stage: compiled packages, or a CUDA extension from git."""
        return bool(self.compiled_steps) or any(g.cuda for g in self.git_steps)

    @property
    def wheel_stages(self) -> list[str]:
        """The stages whose /wheels the builder installs (compiled packages, then packages from git)."""
        return [s.stage for s in self.compiled_steps] + [g.stage for g in self.git_steps]

    def wheel_ref(self, step: Step) -> str:
        """The wheel cache's tag for a compiled stage: a digest of exactly what the wheel is built
        from (base, Python, torch, build tools, arch list, the package and its build environment),
        so two builders that would compile the same wheel name the same image."""
        torch = self.torch_lock_text or " ".join(self.torch_requirements)
        inputs = [WHEEL_STAGE_FORMAT, self.base_image, self.python, torch, " ".join(COMPILE_TOOLS), self.arch_list,
                  step.requirement, json.dumps(step.env, sort_keys=True)]
        if step.fixers:  # the fixers' names and their code: a change to either is another wheel
            inputs += [",".join(step.fixers), FIXERS_SRC.read_text()]
        digest = hashlib.sha256("\n".join(inputs).encode()).hexdigest()[:20]
        return f"{self.wheel_cache}:{step.stage}-{digest}"

    @property
    def card_ccs(self) -> str:
        """The compute capabilities a vendor wheel's kernels must run on, for its audit."""
        return ",".join(_check(cc, CC_RE, "compute capability") for cc in sorted(set(self.plan.ccs)))

    @property
    def arch_list(self) -> str:
        return _check(self.plan.arch_list, ARCH_RE, "TORCH_CUDA_ARCH_LIST")

    @property
    def arch_count(self) -> int:
        from .estimate import arch_count
        return arch_count(self.plan.arch_list)

    @property
    def local_source(self) -> bool:
        """The model's source comes in the build context (src/, --source), copied into the builder;
        else a source stage fetches it from git and a model stage on the builder takes it in."""
        return self.source == "local"

    @property
    def model_stage(self) -> str:
        """The stage that ends with the model and its extensions built: the runtime copies from it."""
        return "builder" if self.local_source else "model"

    @property
    def repo(self) -> str:
        return _check(self.plan.repo, URL_RE, "repository URL")

    @property
    def commit(self) -> str:
        return _check(self.plan.commit, re.compile(r"^[0-9a-f]{40}$"), "commit")

    @property
    def repo_fetch_url(self) -> str:
        return self.fetch_url(self.repo)

    @property
    def extensions(self):
        out = []
        for ext in self.plan.extensions:
            _check(ext.path, EXT_PATH_RE, "extension path")
            if ".." in ext.path.split("/"):
                raise BadInput(f"refusing to render extension path {ext.path!r}: leaves the source tree",
                               "fix the catalog entry")
            cmd = without_deps([_check(w, WORD_RE, "build command word") for w in ext.build])
            folder = paths.MODEL if ext.path == "." else f"{paths.MODEL}/{ext.path}"  # "." is the repository itself
            out.append({"name": ext.name, "path": ext.path, "folder": folder, "command": cmd,
                        "gb_per_job": packages.DEFAULT_GB_PER_JOB})
        return out

    @property
    def runtime_env(self) -> list[tuple[str, str, str]]:
        out = []
        for name, item in sorted(self.plan.runtime_env.items()):
            out.append((_check(name, ENV_NAME_RE, "env name"), _check(item["value"], ENV_VALUE_RE, "env value"),
                        item["why"]))
        return out

    @property
    def host_env(self) -> list[tuple[str, str]]:
        """The settings the image's launcher decides on the host at start: (name, what it reads)."""
        out = []
        for name, item in sorted(self.plan.host_env.items()):
            cards = ", ".join(_check(c["id"], WORD_RE, "card id") for c in item.get("cards", ()))
            reads = f"the GPUs' P2P matrix; cards without P2P in the catalog: {cards or 'none'}"
            out.append((_check(name, ENV_NAME_RE, "env name"), reads if item.get("rule") == "no-p2p" else _comment(item["why"])))
        return out

    @property
    def entrypoint(self) -> str:
        """The image's ENTRYPOINT (exec form): the launcher under the venv's Python without site
        (-S: stdlib only, no .pth file of the venv runs before the user's command)."""
        return json.dumps([f"{paths.VENV}/bin/python", "-S", paths.LAUNCHER])

    @property
    def host_settings(self) -> str:
        """host-settings.json: what the launcher reads (the Plan's host_env, and what is baked as ENV)."""
        data = {"format": 1,
                "image": {name: {"value": value, "why": why} for name, value, why in self.runtime_env},
                "host": [{"name": name, **{k: v for k, v in sorted(self.plan.host_env[name].items())}}
                         for name, _ in self.host_env]}
        for item in data["host"]:  # values the launcher puts into the environment, as ENV values would be
            _check(item["value"], ENV_VALUE_RE, "env value")
            for key in item.get("respects", ()):
                _check(key, ENV_NAME_RE, "env name")
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @property
    def labels(self) -> list[tuple[str, str]]:
        p = self.plan
        fixers = ",".join(f.name for f in p.fixers)
        return [
            ("org.opencontainers.image.title", f"{p.model} for {p.card_name}"),
            ("org.opencontainers.image.source", p.repo),
            ("org.opencontainers.image.revision", p.commit),
            ("org.opencontainers.image.description", f"{p.model} {p.mode} on {p.card_name} (sm {p.cc_text}), built by envbuild"),
            ("org.opencontainers.image.base.name", self.runtime_image),
            (label.VERSION, __version__),
            (label.MODEL, p.model),
            (label.CARD, p.card),
            (label.CARDS, ",".join(p.cards)),
            (label.MODE, p.mode),
            (label.ARCH_LIST, p.arch_list),
            (label.FIXERS, fixers),
            (label.DEVIATIONS, str(len(p.deviations))),
            (label.PLAN, json.dumps(plan_summary(p), sort_keys=True, separators=(",", ":"))),
        ] + ([(label.GIT_PACKAGES, ",".join(g.label for g in self.git_steps))] if self.git_steps else [])

    @property
    def plan_lines(self) -> list[str]:
        """The Plan as comment lines at the top of the Dockerfile."""
        p = self.plan
        lines = [f"{p.model} on {p.card_name} (compute capability {p.cc_text}): {p.mode}",
                 f"torch {p.torch.version}, CUDA {p.cuda}, Python {self.python}, TORCH_CUDA_ARCH_LIST={p.arch_list}"]
        lines += [f"deviation: {d}" for d in p.deviations]
        lines += [f"fixer: {f.name}: {f.why}" for f in p.fixers]
        lines += [f"from git: {g.name} {g.url} at {g.commit}" + (f", folder {g.subdirectory}" if g.subdirectory else "")
                  + f", built as {g.build}" for g in self.git_steps]
        return [_comment(line) for line in lines]


def _comment(text: str) -> str:
    return " ".join(text.split())


def plan_summary(p: Plan) -> dict:
    """What images carry as a label: enough to say what is inside and why."""
    return {
        "model": p.model, "commit": p.commit, "card": p.card, "cards": list(p.cards), "cc": p.cc, "mode": p.mode,
        "python": p.python.version, "cuda": p.cuda, "torch": p.torch.version,
        "pins": {pin.name: pin.version for pin in p.packages},
        "compiled": list(p.compiled), "arch_list": p.arch_list,
        "fixers": [f.name for f in p.fixers], "deviations": p.deviations,
        "runtime_env": {k: v["value"] for k, v in p.runtime_env.items()},
        "host_env": {k: "decided on the host at start" for k in sorted(p.host_env)},
        "min_driver": p.min_driver,
        # packages from git, when there are any (absent otherwise: the label of a Plan without one is as it was)
        **({"git_packages": {n: f"{g['url']}@{g['commit']}" + (f"#subdirectory={g['subdirectory']}" if g.get("subdirectory")
                                                               else "") for n, g in sorted(p.git_packages.items())}}
           if p.git_packages else {}),
    }


def _label_value(text: str) -> str:
    # Dockerfile LABEL values are double-quoted and $-expanded: escape both.
    return json.dumps(text).replace("$", "\\$")


def _env():
    env = jinja2.Environment(loader=jinja2.FileSystemLoader([str(TEMPLATES)]), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters["sh"] = shlex.quote
    env.filters["shjoin"] = lambda words: " ".join(shlex.quote(w) for w in words)
    env.filters["label"] = _label_value
    env.filters["rel"] = lambda path: path.lstrip("/")  # an image path relative to /
    return env


def runtime_image_for(base_image: str) -> str:
    """nvidia/cuda devel -> the matching runtime image (no compilers, ~half the size)."""
    if "-devel-" in base_image:
        return base_image.replace("-devel-", "-runtime-")
    return base_image


def make_context(plan: Plan, command: str, base_image: str | None = None, runtime_image: str | None = None,
                 source: str = "git", pypi_index: str = "https://pypi.org/simple", locked: bool = False,
                 git_mirror: str = "") -> Context:
    base = _check(base_image or plan.base_image, IMAGE_RE, "base image")
    runtime = _check(runtime_image or (runtime_image_for(base) if not base_image else base), IMAGE_RE, "runtime image")
    # The header's command and the index name no password: it reaches builds as a secret (creds.py).
    pypi_index = creds.without_credentials(_check(pypi_index, URL_RE, "PyPI index"))
    ctx = Context(plan, _comment(creds.redact(command)), base, runtime, source, pypi_index, locked, git_mirror=git_mirror)
    # Validate every value that reaches the Dockerfile or requirements.in now, before any file is written.
    for prop in ("torch_requirements", "torch_index_args", "packages", "compiled_steps", "git_steps", "arch_list", "repo",
                 "repo_fetch_url", "commit", "extensions", "runtime_env", "host_settings", "deps_apt", "deps_env",
                 "deps_files", "runtime_apt", "fixes_installed"):
        getattr(ctx, prop)
    return ctx


def use_lock(ctx: Context, folder: Path) -> None:
    """Install from the folder's lock when it was made from exactly this requirements.in."""
    ctx.locked = matches(folder, requirements_in(ctx))
    if ctx.locked:
        lock = folder / "requirements.lock"
        ctx.with_os_libs = [name for name in ctx.plan.runtime_apt if has_package(lock, name)]
        numpy = locked_version(lock, "numpy")
        ctx.build_constraints = [_check(f"numpy=={numpy}", BUILD_PIN_RE, "build constraint")] if numpy else []
        # a locked version older than the first with a wheel for this Python builds from its sdist
        ctx.source_built = [name for name, sb in ctx.plan.source_builds.items()
                            if (v := locked_version(lock, name)) and V(v) < V(sb["below"])]
        if (folder / "torch.lock").is_file():
            ctx.torch_lock_text = (folder / "torch.lock").read_text()


def dockerfile(ctx: Context) -> str:
    return _env().get_template("Dockerfile.j2").render(c=ctx, p=IMAGE_PATHS)


def requirements_in(ctx: Context) -> str:
    # No command line in this header: the file is COPYed into the image, and a cosmetic
    # difference in how envbuild was invoked must not invalidate the layers after it.
    # Nor the card: a lock made for these exact lines (and this Python) serves every card.
    lines = [f"# Generated by envbuild for {ctx.plan.model}, Python {ctx.python} (see plan.json).",
             "# Everything the image installs with pip except torch (own layer) and the packages",
             "# compiled from source in the builder stage. `envbuild lock` turns this into requirements.lock.",
             f"--index-url {ctx.pypi_index}"]
    if ctx.plan.index_cutoff:  # part of what the lock is made from: a new cutoff makes a new lock
        lines.append(f"# resolved as of {ctx.plan.index_cutoff}: {ctx.plan.index_cutoff_why}")
    lines += [f"{' '.join(ctx.torch_index_args)}"] if ctx.torch_index_args else []
    lines += ctx.torch_requirements + ctx.packages
    return "\n".join(lines) + "\n"


def write(ctx: Context, out: Path, source_dir: Path | None = None, adopt: bool = False) -> list[Path]:
    """Write a complete build context to out/ (Dockerfile, requirements, plan, helpers), replacing
    only what envbuild wrote there before; nothing is written when anything would be clobbered."""
    out = Path(out)
    if source_dir is not None:
        outputs.check_apart(source_dir, out)
        outputs.check_source(source_dir)  # a tree that cannot be copied whole writes no Dockerfile
    files = {  # redact: no password from any source reaches a file the image copies in
        "Dockerfile": creds.redact(dockerfile(ctx)),
        "requirements.in": creds.redact(requirements_in(ctx)),
        "plan.json": creds.redact(ctx.plan.to_json()) + "\n",
        # beside the in-image helpers: the runtime stage copies envbuild/ to the launcher's folder
        "envbuild/host-settings.json": ctx.host_settings,
    }
    if ctx.wheel_cache:  # what this build takes from the wheel cache, and what it pushes there after
        files["wheel-cache.json"] = json.dumps(
            [{"package": s.name, "stage": s.stage, "pack": s.pack, "ref": s.shared_ref or s.cache_ref,
              "shared": bool(s.shared_ref)} for s in ctx.compiled_steps if s.shared_ref or s.cache_ref],
            indent=1) + "\n"
    helpers = {f"envbuild/{src.name}": src for src in [FIXERS_SRC, *sorted(INCONTAINER.glob("*"))] if src.is_file()}
    names = [*files, *helpers, "envbuild"] + (["src"] if source_dir is not None else [])
    with outputs.folder_lock(out):
        mine = outputs.owned(out, adopt)
        clash = [n for n in names if n not in mine and (out / n).exists() and not (n == "envbuild" and (out / n).is_dir()
                                                                                   and not any((out / n).iterdir()))]
        if clash:
            raise BadInput(f"{out / clash[0]} exists and envbuild did not write it",
                           "move it away or choose another folder for -o")
        # the manifest first: whoever looks in without the lock never sees envbuild's files unclaimed
        outputs.record_owned(out, names)
        written = []
        (out / "envbuild").mkdir(exist_ok=True)
        for name, text in files.items():
            outputs.write_if_changed(out / name, text)
            written.append(out / name)
        for name, src in helpers.items():
            dst = out / name
            outputs.write_if_changed(dst, src.read_text())
            dst.chmod(0o755 if src.suffix == ".sh" else 0o644)  # not the install's modes: a wheel may drop x bits
            written.append(dst)
        if source_dir is not None:
            outputs.copy_source(source_dir, out / "src")
            written.append(out / "src")
    return written


# ---------------------------------------------------------------- dockerfiles/ for the catalog

DEFAULT_CARDS = ("a800", "h20")


def catalog_targets(cat):
    for model in sorted(cat.models):
        for card in DEFAULT_CARDS:
            yield model, card


def render_catalog(out: Path) -> list[Path]:
    """dockerfiles/<model>-<card>/: Dockerfile, requirements.in, plan.json for the catalog defaults."""
    from . import catalog
    from .config import Sources
    from .resolve import resolve

    cat = catalog.load()
    written = []
    for model, card in catalog_targets(cat):
        plan = resolve(cat, model, card, sources=Sources(), cards_why="--card")
        ctx = make_context(plan, f"envbuild render {model} --card {card} (make dockerfiles)")
        d = out / f"{model}-{card}"
        d.mkdir(parents=True, exist_ok=True)
        use_lock(ctx, d)  # a cell `make locks` locked installs from its lock
        for name, text in (("Dockerfile", dockerfile(ctx)), ("requirements.in", requirements_in(ctx)),
                           ("plan.json", plan.to_json() + "\n")):
            outputs.write_if_changed(d / name, text)
            written.append(d / name)
    return written


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--regenerate":
        for path in render_catalog(Path(argv[1])):
            print(path)
        return 0
    print("usage: python -m envbuild.render --regenerate DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
