"""`envbuild base`: a CUDA devel base image made without Docker Hub.

Two steps, each reused when its image exists:
  1. debootstrap a Debian rootfs from a Debian mirror and `docker import` it  -> envbuild/debian:12
  2. add a CUDA toolkit on top: Debian non-free's (11.8) or NVIDIA's PyPI wheels (13.x)
                                                                              -> envbuild/cuda:X.Y-devel-debian12
Builders that reach only a Debian mirror and a PyPI mirror (Docker Hub blocked) get the same
kind of base nvidia/cuda gives everyone else. The recipes are catalog facts
(toolchains/bases.toml); the Dockerfile is a template that only formats them.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import engine, labels
from .catalog import Catalog, _load_toml, _Reader, builtin_root, CUDA_RE
from .errors import BadInput, OperationFailed, unknown
from .incontainer.archrules import cc_key

DEBIAN_MIRROR = "http://deb.debian.org/debian"
SUITES = {"bookworm": "12", "trixie": "13"}
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")  # Debian package names, pip extras
VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+){1,3}$")
URL_RE = re.compile(r"^https?://[A-Za-z0-9.:@_~%/+-]+$")
BASE_PYTHON = "3.11"  # Debian 12's python3: what models built on these bases run (no deadsnakes on Debian)
DEBOOTSTRAP_SECONDS = 1200  # a slow mirror: minbase is ~40 MB of packages


@dataclass(frozen=True)
class Recipe:
    cuda: str
    source: str  # debian | pypi
    suite: str
    packages: tuple[str, ...] = ()  # debian: the toolkit's packages
    host_gcc: int = 0  # debian: the gcc that toolkit's nvcc accepts (0: the suite's default)
    toolkit: str = ""  # pypi: the cuda-toolkit metapackage release
    extras: tuple[str, ...] = ()  # pypi: its components
    cuobjdump: str = ""  # pypi: the nvidia-cuda-cuobjdump release

    @property
    def debian_tag(self) -> str:
        return f"envbuild/debian:{SUITES[self.suite]}"

    @property
    def tag(self) -> str:
        return f"envbuild/cuda:{self.cuda}-devel-debian{SUITES[self.suite]}"


def recipes(path: Path | None = None) -> dict[str, Recipe]:
    """toolchains/bases.toml, validated like every catalog file."""
    path = path or builtin_root() / "toolchains" / "bases.toml"
    doc = _Reader.of_file(path, _load_toml(path), "toolchains/bases.toml")
    out, bases = {}, doc.sub("base")
    for cuda in bases.names():
        if not CUDA_RE.match(cuda):
            raise doc.fail(f"base.{cuda}", "not a CUDA X.Y version")
        r = bases.sub(cuda)
        source = r.get("source", str, pattern=re.compile(r"^(debian|pypi)$"))
        suite = r.get("suite", str, pattern=re.compile("^(" + "|".join(SUITES) + ")$"))
        if source == "debian":
            out[cuda] = Recipe(cuda, source, suite, packages=r.strings("packages", NAME_RE),
                               host_gcc=r.get("host_gcc", int, 0))
        else:
            out[cuda] = Recipe(cuda, source, suite, toolkit=r.version("toolkit"),
                               extras=r.strings("extras", NAME_RE), cuobjdump=r.version("cuobjdump"))
    doc.unread()  # a misspelled key is an error, not a default
    return out


def recipe_for(cuda: str) -> Recipe:
    known = recipes()
    if cuda not in known:
        raise unknown("offline base CUDA", cuda, sorted(known, key=cc_key))
    return known[cuda]


def targets(cat: Catalog, cuda: str) -> tuple[list[str], list[str]]:
    """(cards its nvcc emits SASS for, cards that run only its newest PTX, JIT-compiled)."""
    tk = cat.toolkits.get(cuda)
    if tk is None:
        return [], []
    newest = max(tk.archs, key=cc_key)
    sass = [c.id for c in cat.cards.values() if c.cc in tk.archs]
    ptx = [c.id for c in cat.cards.values() if c.cc not in tk.archs and cc_key(c.cc) > cc_key(newest)]
    return sass, ptx


def dockerfile(recipe: Recipe, pypi_index: str | None = None) -> str:
    from .render import _env  # the one Jinja environment (its filters quote for the shell)
    if pypi_index is not None and not URL_RE.match(pypi_index):
        raise BadInput(f"--pypi-index {pypi_index!r} is not an http(s) URL")
    return _env().get_template("base.Dockerfile.j2").render(r=recipe, pypi_index=pypi_index,
                                                                   label_cuda=labels.BASE_CUDA)


def _have(cli: engine.Cli, ref: str) -> bool:
    try:
        done = subprocess.run([cli.path, "image", "inspect", ref], capture_output=True, timeout=engine.engine_timeout())
    except subprocess.TimeoutExpired:  # a daemon that does not answer is not an absent image
        raise engine.stalled(f"`docker image inspect {ref}`") from None
    return done.returncode == 0


def _debian(cli: engine.Cli, recipe: Recipe, mirror: str, echo) -> None:
    """debootstrap + docker import; nothing is tagged unless the import finished."""
    if shutil.which("debootstrap") is None:
        raise BadInput("debootstrap is missing", "apt-get install debootstrap (it runs as root)")
    with tempfile.TemporaryDirectory(prefix="envbuild-rootfs-") as rootfs:
        echo(f">> debootstrap {recipe.suite} from {mirror}")
        try:
            done = subprocess.run(["debootstrap", "--variant=minbase",
                                   "--components=main,contrib,non-free,non-free-firmware",
                                   recipe.suite, rootfs, mirror], capture_output=True, text=True,
                                  timeout=DEBOOTSTRAP_SECONDS)
        except subprocess.TimeoutExpired:
            raise OperationFailed(f"debootstrap from {mirror} did not finish in {DEBOOTSTRAP_SECONDS} s",
                                  "check the mirror (--debian-mirror) and the network") from None
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise OperationFailed(f"debootstrap failed (exit {done.returncode}):\n{tail}",
                                  "check the mirror (--debian-mirror); debootstrap needs root")
        root = Path(rootfs)
        # No docs or recommends in any image made from it; no package cache in the layer.
        (root / "etc/apt/apt.conf.d/90envbuild").write_text(
            'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n')
        for leftover in [*root.glob("var/cache/apt/archives/*.deb"), *root.glob("var/lib/apt/lists/*")]:
            if leftover.is_file():
                leftover.unlink()
        echo(f">> docker import -> {recipe.debian_tag}")
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        try:
            imp = subprocess.run([cli.path, "import", "--change", "ENV LANG=C.UTF-8", "--change",
                                  'CMD ["/bin/bash"]', "-", recipe.debian_tag], stdin=tar.stdout,
                                 capture_output=True, text=True, timeout=DEBOOTSTRAP_SECONDS)
        finally:
            tar.stdout.close()
            tar.wait()
        if imp.returncode != 0 or tar.returncode != 0:
            raise OperationFailed(f"docker import of the rootfs failed: {imp.stderr.strip()[-300:]}")


def plan(cat: Catalog, cuda: str, mirror: str = DEBIAN_MIRROR, pypi_index: str | None = None) -> dict:
    """What `envbuild base` would build, without Docker: tags, the Dockerfile, the cards."""
    recipe = recipe_for(cuda)
    if not URL_RE.match(mirror):
        raise BadInput(f"--debian-mirror {mirror!r} is not an http(s) URL")
    sass, ptx = targets(cat, cuda)
    return {"tag": recipe.tag, "debian": recipe.debian_tag, "cuda": cuda, "source": recipe.source, "mirror": mirror,
            "dockerfile": dockerfile(recipe, pypi_index), "sass_cards": sass, "ptx_cards": ptx}


def build_base(cat: Catalog, cuda: str, mirror: str = DEBIAN_MIRROR, pypi_index: str | None = None,
               ca_bundle: str | None = None, rebuild: bool = False, echo=print, index_auth: str = "",
               network: str = "") -> dict:
    """Make (or reuse) the offline base for a CUDA version; what it is and which cards it targets."""
    recipe, planned = recipe_for(cuda), plan(cat, cuda, mirror, pypi_index)
    cli = engine.find_cli()
    with _one_maker(recipe.tag, echo):
        made = _make(cli, recipe, planned, rebuild, echo, ca_bundle=ca_bundle, index_auth=index_auth,
                     network=network)
    shown = {k: v for k, v in planned.items() if k not in ("dockerfile", "mirror")}
    return {**shown, "made": made, "reused": [t for t in (recipe.debian_tag, recipe.tag) if t not in made]}


@contextlib.contextmanager
def _one_maker(tag: str, echo):
    """One `envbuild base` per base tag on this host at a time: a second one waits, then finds the
    first one's images and reuses them instead of running debootstrap and the CUDA build twice."""
    path = Path(tempfile.gettempdir()) / f"envbuild-base-{re.sub(r'[^A-Za-z0-9_.-]', '_', tag)}.lock"
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo(f">> another envbuild base is making {tag}: waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _make(cli: engine.Cli, recipe: Recipe, planned: dict, rebuild: bool, echo, **build_options) -> list[str]:
    """The tags built now; a tag that exists is kept (unless rebuild). build_options: build.build's."""
    from . import build
    made = []
    if rebuild or not _have(cli, recipe.debian_tag):
        _debian(cli, recipe, planned["mirror"], echo)
        made.append(recipe.debian_tag)
    if rebuild or not _have(cli, recipe.tag):
        with tempfile.TemporaryDirectory(prefix="envbuild-base-") as ctx:
            Path(ctx, "Dockerfile").write_text(planned["dockerfile"])
            helper = Path(__file__).parent / "incontainer" / "with-ca.sh"
            shutil.copy(helper, Path(ctx, "with-ca.sh"))
            build.build(Path(ctx), [recipe.tag], target="cuda", echo=echo, log_name=f"base-cuda{planned['cuda']}",
                        **build_options)
        made.append(recipe.tag)
    return made


def find_base(cuda: str) -> str | None:
    """The tag of an offline base `envbuild base` made for this CUDA, when it exists here."""
    known = recipes()
    return known[cuda].tag if cuda in known and have_image(known[cuda].tag) else None


def registry_of(ref: str) -> str:
    """The registry host an image reference pulls from (Docker Hub for a bare name)."""
    first = ref.split("/", 1)[0]
    if "/" in ref and ("." in first or ":" in first or first == "localhost"):
        return first
    return "registry-1.docker.io"


def reachable(registry: str, timeout: float = 5.0) -> bool:
    """Whether a registry answers at all (401 counts: it is there, it wants a token)."""
    import urllib.error
    import urllib.request
    scheme = "http" if registry.startswith(("127.", "localhost")) else "https"
    try:
        urllib.request.urlopen(f"{scheme}://{registry}/v2/", timeout=timeout)
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def daemon_pulls_elsewhere(registry: str) -> bool:
    """Whether the daemon reaches Docker Hub another way than this host does: its registry mirrors
    or its own proxy (common where Docker Hub is blocked). Then its pull is worth trying."""
    if registry != "registry-1.docker.io":
        return False
    try:
        info = engine.client().info()
    except Exception:  # no answer: the build will say so; this question only decides the base
        return False
    mirrors = (info.get("RegistryConfig") or {}).get("Mirrors") or []
    return bool(mirrors or info.get("HttpsProxy") or info.get("HttpProxy"))


def have_image(ref: str) -> bool:
    try:
        cli = engine.find_cli()
    except OperationFailed:
        return False
    return _have(cli, ref)
