"""Catalog stage: matrices/*.toml -> typed, validated objects.

Every value that may later reach a Dockerfile or a shell line is checked here
(versions through `packaging`, names and paths against strict patterns), so a
malformed or malicious entry fails at load with file, key and reason.
"""

from __future__ import annotations

import ast
import difflib
import os
import re
from datetime import date
import tomllib
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from . import schema
from .errors import CatalogError, unknown

BUILTIN = "built-in"


def builtin_root() -> Path:
    """The catalog shipped inside the package (a wheel carries it as package data)."""
    return Path(str(resources.files("envbuild") / "matrices"))

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
PKG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CC_RE = re.compile(r"^\d{1,2}\.\d$")
CUDA_RE = re.compile(r"^\d{2}\.\d$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
URL_RE = re.compile(r"^https://[A-Za-z0-9.-]+(/[A-Za-z0-9._~-]+)*/?$")
RELPATH_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$")
# An extension's folder may be the repository itself (OpenPCDet's root setup.py builds its ops)
EXT_PATH_RE = re.compile(r"^(\.|[A-Za-z0-9_][A-Za-z0-9._/-]*)$")
# Build commands and train arguments are rendered into RUN lines: plain words only.
WORD_RE = re.compile(r"^[A-Za-z0-9_.-][A-Za-z0-9._/=,:+-]*$")
STEPS_ARG_RE = re.compile(r"^(?:[A-Za-z0-9_.=,:+/-]|\{steps\})+$")  # a WORD that may hold {steps}
LAUNCHERS = ("torch.distributed.launch", "torchrun", "lightning", "mp.spawn", "python")  # python: one process, one GPU
# Each construct kind and the recipe fields it takes (schema.py declares them).
CONSTRUCT_FIELDS = schema.construct_fields()
ARRAY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]*\.npy=[1-9][0-9]{0,5}(x[1-9][0-9]{0,5}){0,5}$")  # PATH.npy=AxBxC
CONSTRUCT_KINDS = tuple(CONSTRUCT_FIELDS)
APT_RE = re.compile(r"^[a-z0-9][a-z0-9.+-]+$")  # a Debian package name
FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a plain file name, no folders
ENV_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
ENV_VALUE_RE = re.compile(r"^[A-Za-z0-9._:/,=-]*$")
PYTHON_RE = re.compile(r"^3\.\d{1,2}$")
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# a vendor's find-links page: {cu} (cu118) and {torch} (2.0) are filled in per build; http for mirrors
FIND_LINKS_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:\d{1,5})?(/([A-Za-z0-9._~+-]|\{cu\}|\{torch\})+)*/?$")
TORCH_MINOR_RE = re.compile(r"^\d\.\d{1,2}$")
DOTTED_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A package from git ([git_packages]): where it is fetched from (https; http for an in-house mirror,
# safe because the fetch is by full commit id, which git checks), and how it builds.
GIT_URL_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:\d{1,5})?(/[A-Za-z0-9._~+-]+)+/?$")
GIT_BUILDS = ("pip", "cuda-extension")


@lru_cache(maxsize=None)
def V(version: str) -> Version:
    """Parsed version, cached: the resolver compares the same few strings many times."""
    return Version(version)


@lru_cache(maxsize=None)
@lru_cache(maxsize=None)
def minor_key(version: str) -> tuple[int, int]:
    v = V(version)
    return v.major, v.minor


# ---------------------------------------------------------------- objects


@dataclass(frozen=True)
class Card:
    id: str
    name: str
    cc: str
    memory_gb: int
    p2p: bool
    aliases: tuple[str, ...]
    origin: str = BUILTIN  # built-in, or the user catalog file that added or replaced it


@dataclass(frozen=True)
class Toolkit:
    version: str  # "11.8"
    full: str  # "11.8.0"
    archs: tuple[str, ...]
    max_gcc: int
    min_driver: str
    compat_driver: str
    cudnn: str
    ubuntu: tuple[str, ...]


@dataclass(frozen=True)
class Ubuntu:
    version: str
    gcc: int
    python: str


@dataclass(frozen=True)
class TorchRelease:
    version: str
    torchvision: str
    torchaudio: str  # "" when no torchaudio release pairs with it
    python: tuple[str, str]
    index: tuple[str, ...]
    pypi: str
    cxx: int
    ext_max_arch: str
    compile_python_max: str | None = None  # None: no torch.compile in this release
    released: str | None = None  # YYYY-MM-DD its wheels reached PyPI: a port's era floor
    # GPU code its PyPI build carries, measured from the wheel (scripts/measure-torch.py):
    # generic SASS and PTX archs; () when not measured ([wheel_archs] then stands for it)
    sass: tuple[str, ...] = ()
    ptx: tuple[str, ...] = ()

    def supports_python(self, python: str) -> bool:
        return minor_key(self.python[0]) <= minor_key(python) <= minor_key(self.python[1])

    def compiles_on(self, python: str) -> tuple[bool, str]:
        """Whether torch.compile (inductor) runs with this Python, and why."""
        if self.compile_python_max is None:
            return False, f"torch {self.version} has no torch.compile (it came in 2.0)"
        if minor_key(python) > minor_key(self.compile_python_max):
            return False, f"torch {self.version}'s torch.compile runs on Python <= {self.compile_python_max}, not {python}"
        return True, f"torch {self.version} compiles on Python {python}"


@dataclass(frozen=True)
class Compiled:
    name: str
    version: str
    series: str
    torch: tuple[str, str]  # [min, max)
    cxx: int
    notes: str
    # Porting fixers that carry its sdist past the top of its torch range (fixers.FIXERS names),
    # run in its wheel stage before `pip wheel`; empty: no port known.
    port: tuple[str, ...] = ()

    def builds_with(self, torch: str) -> bool:
        return V(self.torch[0]) <= V(torch) and minor_key(torch) < minor_key(self.torch[1])


@dataclass(frozen=True)
class MmcvAssert:
    name: str
    version: str
    mmcv: tuple[str, str]  # inclusive
    # mmcv-full from this version registers layers this package also registers (sparse conv):
    # importing both raises KeyError unless the package's registration is forced
    layers_clash_from: str | None = None


@dataclass(frozen=True)
class FlashAttn:
    version: str
    min_nvcc: str
    min_torch: str
    python: tuple[str, str]
    sass: dict  # arch -> min nvcc
    runtime: tuple[str, ...]
    objects: int = 0  # what its wheel stage compiles (0: not counted)
    head_dims: tuple[int, ...] = ()  # the head dims it has kernel files for


@dataclass(frozen=True)
class VendorBuild:
    """One matrix of prebuilt wheels a vendor publishes, and the GPU code they carry."""
    versions: tuple[str, ...]
    torch: tuple[str, ...]  # torch major.minor
    cuda: tuple[str, ...]  # CUDA of the torch build
    python: tuple[str, str]  # inclusive
    sass: tuple[str, ...]
    ptx: tuple[str, ...] = ()

    def serves(self, version: str, torch: str, cuda: str, python: str) -> bool:
        return (version in self.versions and ".".join(torch.split("+")[0].split(".")[:2]) in self.torch
                and cuda in self.cuda and minor_key(self.python[0]) <= minor_key(python) <= minor_key(self.python[1]))


@dataclass(frozen=True)
class VendorWheels:
    """Where a vendor publishes prebuilt wheels of a compiled package (a page pip's --find-links reads)."""
    name: str
    find_links: str  # {cu} -> cu118, {torch} -> 2.0
    builds: tuple[VendorBuild, ...]

    def url(self, torch: str, cuda: str) -> str:
        return self.find_links.replace("{cu}", "cu" + cuda.replace(".", "")).replace(
            "{torch}", ".".join(torch.split("+")[0].split(".")[:2]))


@dataclass(frozen=True)
class EraPin:
    name: str
    spec: str
    why: str
    torch_max: str | None = None
    when_package: str | None = None
    when_version: str | None = None  # applies only while when_package's exact pin is in this range
    from_date: str | None = None  # applies only to Plans whose index cutoff can see a release of that day
    replaces: str | None = None
    always: bool = False


@dataclass(frozen=True)
class SourceBuild:
    """How to build a package from its sdist without downloads from outside PyPI (a Python port
    whose locked version has no wheel for that Python): OS libraries instead of bundled ones."""
    name: str
    build_apt: tuple[str, ...]  # installed in the deps stage, before pip builds it
    runtime_apt: tuple[str, ...]  # the shared libraries the built package then loads
    build_env: dict  # NAME -> value for the pip install that builds it
    build_files: tuple[str, ...] = ()  # files from envbuild/incontainer/ the build_env points at


@dataclass(frozen=True)
class Extension:
    name: str
    path: str
    build: tuple[str, ...]
    needs_visible_gpu: bool = False


@dataclass(frozen=True)
class GitPackage:
    """A package upstream installs from git at one commit ([git_packages]): fetched in a stage of
    its own at build time and built into a wheel there (render.py)."""
    name: str
    url: str
    commit: str  # full 40-hex: the pin
    subdirectory: str = ""  # inside that repository; "" = its root
    build: str = "pip"  # pip | cuda-extension
    requires: tuple[str, ...] = ()  # runtime dependencies: into requirements.in (it installs with --no-deps)


@dataclass(frozen=True)
class Train:
    launcher: str
    entry: str
    config: str | None
    local_rank_arg: str | None
    extra_args: tuple[str, ...]
    ops_check: str | None = None  # a file in the repo defining check(device) for the smoke ops level
    cpu_args: tuple[str, ...] = ()  # arguments that make the train script run on the CPU
    steps_args: tuple[str, ...] = ()  # arguments that stop it after {steps} steps (smoke --steps)


@dataclass(frozen=True)
class Construct:
    """How smoke's model level builds the network from the model's own code, as its train
    script does.
    kind "argparse": the class's own argument hook (Lightning-style add_model_specific_args),
    the train script's arguments, then cls(**vars(args)).
    kind "config": the model's training config read by its loader (mmcv's or mmengine's
    Config.fromfile), then builder(cfg.model, **{k: cfg.get(k) for k in cfg_kwargs}).
    kind "python": the catalog's own lines (code), which bind the network to `model`."""
    kind: str
    module: str = ""  # argparse: where the class lives
    object: str = ""
    args_hook: str = ""
    args: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()  # modules the train script imports first (plugins, registries)
    config: str = ""  # config: the training config, relative to the repository
    loader: str = ""  # config: dotted callable that reads it
    builder: str = ""  # config: dotted callable that builds the network from cfg.model
    cfg_kwargs: tuple[str, ...] = ()  # config: top-level config keys the train script also passes
    code: str = ""  # python: lines that bind the network to `model`
    step: str = ""  # a training step on a synthetic batch (incontainer/train_steps.py STEPS), run on the CPU
    # PATH.npy=AxB: float32 arrays the network reads when it is built, which the model's scripts
    # make from the dataset (SparseDrive's k-means anchors); smoke writes zeros where none is
    arrays: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """The fields this kind uses (what reaches the image and the ledger's digest)."""
        return {k: v for k, v in asdict(self).items() if v not in ("", ())}


@dataclass(frozen=True)
class Model:
    name: str
    title: str
    description: str
    repo: str
    commit: str
    python: str
    torch: str
    cuda: str
    packages: dict  # name -> spec ("*" = unpinned, "1.2.3" exact, or a specifier set)
    vendored: dict  # name -> (version, path)
    extensions: tuple[Extension, ...]
    train: Train
    path: str = ""
    origin: str = BUILTIN
    construct: Construct | None = None
    era: str | None = None  # YYYY-MM-DD: the upstream commit whose pins the entry reflects
    era_grace_days: int = 30  # releases this long after the era still count as of the era
    corrections: dict = field(default_factory=dict)  # name -> (spec, why): upstream pins that cannot work
    # stdlib modules the OS packs apart from Python (tkinter) that the model imports -> why
    stdlib_modules: dict = field(default_factory=dict)
    git_packages: dict = field(default_factory=dict)  # name -> GitPackage
    # [flash_attn]: the kernel head dims the model calls and why (--trim-kernels compiles only those)
    flash_attn_head_dims: tuple = ()
    flash_attn_why: str = ""

    def pinned(self, name: str) -> str | None:
        spec = self.packages.get(name)
        if spec and is_exact(spec):
            return spec
        if name in self.vendored:
            return self.vendored[name][0]
        return None


def is_exact(spec: str) -> bool:
    try:
        Version(spec)
        return True
    except InvalidVersion:
        return False


# ---------------------------------------------------------------- loading


@dataclass
class _Overlay:
    """A user's toolchains file merged into the built-in one: the key paths whose values it gave."""
    path: Path
    owned: set

    def owns(self, at: tuple) -> bool:
        return any(at[:i] in self.owned for i in range(1, len(at) + 1))


class _Reader:
    """Typed access to one TOML table, raising CatalogError with file and key.

    With a schema node (schema.py: the file's description, then one node per table under it),
    unread() refuses every key the schema does not declare for this table, a misspelled field
    or table, naming the closest declared one; reading a key the schema lacks is a bug of the
    loader and fails loudly. A table whose keys are names the user chooses (packages, versions,
    card ids: schema.Names) is read by name. Without a schema node, the keys something asked
    for (get, has, sub, rows) are the known ones."""

    def __init__(self, path: Path, table: dict, prefix: str, at: tuple = (), overlay: _Overlay | None = None,
                 node=None):
        self.path, self.table, self.prefix = path, table, prefix
        self.at, self.overlay = at, overlay  # the key path from the file's root; a merged user file
        self.node = node  # schema.Table or schema.Names this table follows; None: no schema
        self.asked: set = set()
        self.subs: dict[str, _Reader] = {}

    @classmethod
    def of_file(cls, path: Path, table: dict, kind: str, overlay: _Overlay | None = None) -> "_Reader":
        """The reader of a whole catalog file; kind is its key in schema.FILES ("models/*.toml")."""
        return cls(path, table, "", overlay=overlay, node=schema.FILES[kind])

    def _declared(self, key):
        """The schema node or field of one key of this table (None without a schema)."""
        node = self.node
        if node is None:
            return None
        if isinstance(node, schema.Names):
            return node.of
        if key not in node.fields:
            raise AssertionError(f"catalog loader reads {self.prefix}{key}, which schema.py does not declare "
                                 f"(add it there with its type, meaning and example)")
        return node.fields[key]

    def _known(self) -> set | None:
        if isinstance(self.node, schema.Table):
            return set(self.node.fields)
        return None if isinstance(self.node, schema.Names) else self.asked

    def fail(self, key: str, reason: str) -> CatalogError:
        path = self.overlay.path if self.overlay is not None and self.overlay.owns((*self.at, key)) else self.path
        return CatalogError(_rel(path), f"{self.prefix}{key}", reason)

    def has(self, key) -> bool:
        self._declared(key)
        self.asked.add(key)
        return key in self.table

    def names(self) -> list[str]:
        """The keys of a table of user-chosen names (package -> spec): all of them are read."""
        self.asked.update(self.table)
        return list(self.table)

    def unread(self) -> None:
        """Refuse a key or table the schema does not declare (else: nothing read), here and in
        every table under it, with a hint."""
        known = self._known()
        for key, value in self.table.items() if known is not None else ():
            if key in known:
                only = getattr(self.node.fields[key], "only", "") if self.node is not None else ""
                if only and self.table.get(self.node.by) != only:
                    raise self.fail(key, f"not a field of {self.node.by} {self.table.get(self.node.by)!r} "
                                         f"(only of {self.node.by} {only!r})")
                continue
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = (f"did you mean {close[0]!r}?" if close else
                    f"known here: {', '.join(sorted(known))}" if known else "nothing is expected here")
            raise self.fail(key, f"unknown {'table' if isinstance(value, dict) else 'key'} ({hint})")
        for reader in self.subs.values():
            reader.unread()

    def get(self, key, kind, default=..., pattern: re.Pattern | None = None, lines: bool = False):
        declared = self._declared(key)
        if isinstance(declared, schema.Field) and declared.kind is not kind:
            raise AssertionError(f"catalog loader reads {self.prefix}{key} as {kind.__name__}; schema.py says "
                                 f"{declared.kind.__name__}")
        self.asked.add(key)
        if key not in self.table:
            if default is ...:
                raise self.fail(key, "missing")
            return default
        value = self.table[key]
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(key, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        if pattern is not None and isinstance(value, str) and not pattern.match(value):
            raise self.fail(key, f"invalid value {value!r}")
        if pattern is RELPATH_RE and isinstance(value, str) and ".." in value.split("/"):
            raise self.fail(key, f"must stay inside the repository: {value!r}")
        if isinstance(value, str) and any((ord(c) < 32 and not (lines and c == "\n")) or ord(c) == 127 for c in value):
            # names, reasons and notes reach Dockerfile comments and the terminal: one line each
            # (code, which goes to the image in plan.json only, may have lines)
            raise self.fail(key, "control characters are not allowed" if lines else
                            f"control characters (newlines included) are not allowed: {value!r}")
        return value

    def number(self, key, kind, low, high, default=...):
        """An int or float within [low, high]: a negative memory or a grace of a million days is a typo."""
        value = self.get(key, kind, default)
        if value is not None and value is not default and not low <= value <= high:
            raise self.fail(key, f"{value!r} is out of range ({low} to {high})")
        return value

    def day(self, key, default=...):
        """A YYYY-MM-DD date that exists on the calendar."""
        value = self.get(key, str, default, pattern=DATE_RE)
        if isinstance(value, str):
            try:
                date.fromisoformat(value)
            except ValueError:
                raise self.fail(key, f"not a date: {value!r} (YYYY-MM-DD)") from None
        return value

    def version(self, key, default=...):
        value = self.get(key, str, default)
        if value is default and default is not ...:
            return value
        try:
            Version(value)
        except InvalidVersion:
            raise self.fail(key, f"not a version: {value!r}") from None
        if "\n" in value or " " in value:
            raise self.fail(key, f"not a version: {value!r}")
        return value

    def strings(self, key, pattern: re.Pattern, default=...) -> tuple[str, ...]:
        values = self.get(key, list, default)
        if values is default and default is not ...:
            return tuple(values)
        for item in values:
            if not isinstance(item, str) or not pattern.match(item):
                raise self.fail(key, f"invalid entry {item!r}")
        return tuple(values)

    def sub(self, key) -> "_Reader":
        if key not in self.subs:
            node = self._declared(key)
            self.subs[key] = _Reader(self.path, self.get(key, dict), f"{self.prefix}{key}.", (*self.at, key),
                                     self.overlay, node if not isinstance(node, schema.Field) else None)
        return self.subs[key]

    def rows(self, key, default=...) -> list["_Reader"]:
        """An array of tables ([[era]], builds = [{...}]): a reader per row."""
        out = []
        node = self._declared(key)
        for i, row in enumerate(self.get(key, list, default)):
            if not isinstance(row, dict):
                raise self.fail(f"{key}[{i}]", "expected a table")
            reader = _Reader(self.path, row, f"{self.prefix}{key}[{i}].", (*self.at, key, i), self.overlay,
                             node.of if isinstance(node, schema.Rows) else None)
            self.subs[f"{key}[{i}]"] = reader
            out.append(reader)
        return out


def train_step_names() -> tuple[str, ...]:
    """The synthetic training steps smoke's model level can run (in-container, stdlib at import)."""
    from .incontainer import train_steps
    return tuple(train_steps.STEPS)


def _rel(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _load_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(_rel(path), "(file)", f"not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise CatalogError(_rel(path), "(file)", "not UTF-8 text (TOML files are UTF-8)") from None
    except RecursionError:
        raise CatalogError(_rel(path), "(file)", "nested too deeply to be a catalog file") from None
    except OSError as exc:
        raise CatalogError(_rel(path), "(file)", exc.strerror or str(exc)) from None


def check_spec(reader: _Reader, key: str, spec: str, unpinned: bool = True) -> str:
    """A version or a specifier set ("*" = unpinned, where the field allows it), as pip and
    packaging take it: refused here rather than in the resolver."""
    if (spec == "*" and unpinned) or is_exact(spec):
        return spec
    allowed = " (\"*\" means unpinned: not a value here)" if spec == "*" else ""
    try:
        if not spec.strip():
            raise InvalidSpecifier(spec)
        SpecifierSet(spec)
    except InvalidSpecifier:
        raise reader.fail(key, f"not a version or specifier: {spec!r}{allowed}") from None
    if any(c in spec for c in "\n;'\"$`\\ "):
        raise reader.fail(key, f"not a version or specifier: {spec!r}")
    return spec


def check_version_key(reader: _Reader, key: str) -> str:
    """A fact's key: an exact version, or a range of releases (">=0.17,<0.18") it holds for."""
    if is_exact(key):
        return key
    try:
        return check_spec(reader, key, key, unpinned=False)
    except CatalogError:
        raise reader.fail(key, f"not a version or a range of versions (\">=0.17,<0.18\"): {key!r}") from None


def version_keyed(facts: dict, version: str | None):
    """The fact for one release in a table keyed by versions: its exact key, else the first range
    key (in file order) that contains it, carrying the release's own version; None when none."""
    if not version or not is_exact(version):
        return None
    if version in facts:
        return facts[version]
    for key, fact in facts.items():
        if is_exact(key) and V(key) == V(version):
            return fact
    for key, fact in facts.items():
        if not is_exact(key) and SpecifierSet(key).contains(version, prereleases=True):
            return replace(fact, version=version)
    return None


def _load_cards(path: Path, origin: str = BUILTIN) -> dict[str, Card]:
    root = _Reader.of_file(path, _load_toml(path), "cards.toml")
    cards = {}
    for cid in root.get("cards", dict):
        r = root.sub("cards").sub(cid)
        if not NAME_RE.match(cid):
            raise root.fail(f"cards.{cid}", "card id must be lowercase letters, digits, '.', '_' or '-'")
        cards[cid] = Card(
            id=cid,
            name=r.get("name", str),
            cc=r.get("cc", str, pattern=CC_RE),
            memory_gb=r.number("memory_gb", int, 1, 100_000),
            p2p=r.get("p2p", bool),
            aliases=tuple(a.lower() for a in r.strings("aliases", NAME_RE, [])),
            origin=origin,
        )
    root.unread()
    return cards


def _check_card_names(cards: dict[str, Card]) -> None:
    """A name (id or alias) means one card: a new card cannot take over another's name."""
    owner: dict[str, Card] = {}
    for card in cards.values():
        for name in dict.fromkeys((card.id, card.id.replace("rtx", ""), *card.aliases)):
            other = owner.get(name)
            if other is not None and other.id != card.id:
                raise CatalogError(card.origin, f"cards.{card.id}", f"name {name!r} already means card {other.id!r} ({other.origin})")
            owner[name] = card


def _date(r: _Reader, key: str) -> str | None:
    """An optional YYYY-MM-DD that is a real day."""
    value = r.get(key, str, None, pattern=re.compile(r"^\d{4}-\d{2}-\d{2}$"))
    if value is not None:
        try:
            date.fromisoformat(value)
        except ValueError:
            raise r.fail(key, f"not a real day: {value!r}") from None
    return value


def _range(r: _Reader, key: str) -> tuple[str, str]:
    lo_hi = r.strings(key, re.compile(r"^[0-9][0-9a-z.]*$"))
    if len(lo_hi) != 2:
        raise r.fail(key, "expected [min, max]")
    for v in lo_hi:
        try:
            Version(v)
        except InvalidVersion:
            raise r.fail(key, f"not a version: {v!r}") from None
    return lo_hi[0], lo_hi[1]


@dataclass
class Catalog:
    cards: dict[str, Card]
    toolkits: dict[str, Toolkit]
    ubuntu: dict[str, Ubuntu]
    torch: dict[str, TorchRelease]
    wheel_archs: dict[str, tuple[str, ...]]
    compiled: dict[str, dict[str, Compiled]]
    asserts: dict[str, dict[str, MmcvAssert]]
    flash_attn: dict[str, FlashAttn]
    spconv_builds: tuple[str, ...]
    era: tuple[EraPin, ...]
    models: dict[str, Model]
    requires: dict[str, tuple[str, ...]] = field(default_factory=dict)
    python_floors: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {python: first release}
    collections_abc: dict[str, str] = field(default_factory=dict)  # name -> first release without the old imports
    source_builds: dict[str, SourceBuild] = field(default_factory=dict)
    vendor: dict[str, VendorWheels] = field(default_factory=dict)  # compiled package -> its prebuilt wheels
    root: Path = field(default_factory=builtin_root)
    overlay: Path | None = None  # the user catalog on top of the built-in one
    torch_load: tuple[str, ...] = ()  # packages that torch.load checkpoints without weights_only
    runtime_apt: dict[str, tuple[str, ...]] = field(default_factory=dict)  # wheel -> OS libraries it loads

    # -- lookups with clear errors
    @cached_property
    def _card_names(self) -> dict[str, str]:
        names = {}
        for card in self.cards.values():
            names[card.id] = card.id
            names[card.id.replace("rtx", "")] = card.id
            for alias in card.aliases:
                names[alias] = card.id
        return names

    def card(self, name: str) -> Card:
        key = name.strip().lower().replace("_", "-").replace(" ", "-")
        key = key.removeprefix("nvidia-").removeprefix("geforce-")
        if key in self._card_names:
            return self.cards[self._card_names[key]]
        raise unknown("card", name, sorted(self._card_names))

    def assert_facts(self, name: str, version: str | None) -> MmcvAssert | None:
        """[asserts] for this release of a package: its exact key, else a range that contains it."""
        return version_keyed(self.asserts.get(name, {}), version)

    def python_floor(self, name: str, python: str) -> str | None:
        """The first release of a package that runs on this Python (the floor listed for the
        newest Python not above it), or None when the catalog knows none."""
        floors = self.python_floors.get(name.lower(), {})
        fits = [py for py in floors if Version(py) <= Version(python)]
        return floors[max(fits, key=Version)] if fits else None

    def model(self, name: str) -> Model:
        key = name.strip().lower()
        if key in self.models:
            return self.models[key]
        raise unknown("model", name, sorted(self.models))

    def toolkit(self, cuda: str) -> Toolkit:
        key = ".".join(cuda.strip().split(".")[:2])
        if key in self.toolkits:
            return self.toolkits[key]
        raise unknown("CUDA version", cuda, sorted(self.toolkits))

    def torch_release(self, version: str) -> TorchRelease:
        if version in self.torch:
            return self.torch[version]
        raise unknown("torch version", version, sorted(self.torch, key=Version))

    def torch_versions(self) -> list[str]:
        return sorted(self.torch, key=Version)

    def wheel_code(self, release: TorchRelease, cuda: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(SASS, PTX) the release's CUDA build carries: measured from the wheel for its PyPI
        build when the catalog has that, else the [wheel_archs] entry of the CUDA (no PTX)."""
        if cuda == release.pypi and (release.sass or release.ptx):
            return release.sass, release.ptx
        if cuda not in self.wheel_archs:
            raise unknown(f"CUDA build of torch {release.version}", cuda, sorted({release.pypi, *release.index}))
        return self.wheel_archs[cuda], ()


def load(user: Path | str | None = None) -> Catalog:
    """The built-in catalog, with a user catalog on top (argument, ENVBUILD_MATRICES or the
    config's catalog_dir): its cards.toml adds or replaces cards, its models/*.toml add or
    replace models, and a toolchains/*.toml of its own merges into the built-in file per key
    (a table it names is merged key by key, any other value replaced; [[era]] rows by name).
    Every file refuses keys and tables it does not know."""
    from .config import setting
    base = builtin_root()
    user = Path(user) if user else (Path(p) if (p := setting("catalog_dir")) else None)
    if user is not None and not user.is_dir():
        raise CatalogError(_rel(user), "(dir)", "user catalog folder not found")
    if user is not None and user.resolve() == base.resolve():
        user = None

    def toolchain(rel: str) -> _Reader:
        return _toolchain(base, user, rel)

    # Files and sections are read in this order, so the first error a broken catalog
    # reports stays the same.
    cards = _load_cards(base / "cards.toml")
    if user is not None and (user / "cards.toml").exists():  # a folder there is an error, not no file
        cards.update(_load_cards(user / "cards.toml", str(user / "cards.toml")))
    _check_card_names(cards)
    ubuntu, toolkits = _load_cuda(toolchain("toolchains/cuda.toml"))
    torch, wheel_archs = _load_torch(toolchain("toolchains/torch.toml"))
    pkg = toolchain("toolchains/packages.toml")
    compiled = _load_compiled(pkg)
    asserts = _load_asserts(pkg)
    flash = _load_flash_attn(pkg)
    spconv = pkg.sub("spconv").strings("builds", CUDA_RE)
    era = _load_era(pkg)
    requires = _load_requires(pkg)
    python_floors = _load_python_floors(pkg)
    collections_abc = _load_collections_abc(pkg)
    source_builds = _load_source_builds(pkg, python_floors)
    vendor = _load_vendor(pkg)
    models = _load_models(base, user, torch)
    torch_load = tuple(n.lower() for n in pkg.sub("torch_load").strings("packages", PKG_RE)) \
        if pkg.has("torch_load") else ()
    runtime_apt = _load_runtime_apt(pkg)
    pkg.unread()
    return Catalog(cards, toolkits, ubuntu, torch, wheel_archs, compiled, asserts, flash,
                   spconv, tuple(era), models, requires, python_floors, collections_abc, source_builds, vendor, base, user,
                   torch_load, runtime_apt)


def _merge(base: dict, user: dict, at: tuple, owned: set) -> dict:
    """A user's toolchains table merged into the built-in one: tables key by key, [[...]] rows
    that all have a name row by row (same name replaced, new ones added), any other value
    replaced. owned collects the key paths whose values came from the user's file."""
    out = dict(base)
    for key, value in user.items():
        here, old = (*at, key), base.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = _merge(old, value, here, owned)
        elif _named_rows(value) and _named_rows(old):
            rows = list(old)
            index = {row["name"]: i for i, row in enumerate(rows)}
            for row in value:
                i = index.setdefault(row["name"], len(rows))
                rows[i:i + 1] = [row]
                owned.add((*here, i))
            out[key] = rows
        else:
            out[key] = value
            owned.add(here)
    return out


def _named_rows(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(row, dict) and isinstance(row.get("name"), str) for row in value)


def _toolchain(base: Path, user: Path | None, rel: str) -> _Reader:
    """A built-in toolchains file with the user catalog's file of the same name merged into it."""
    path = base / rel
    table = _load_toml(path)
    if user is None or not (user / rel).exists():  # a folder there is an error, not no file
        return _Reader.of_file(path, table, rel)
    owned: set = set()
    table = _merge(table, _load_toml(user / rel), (), owned)
    return _Reader.of_file(path, table, rel, overlay=_Overlay(user / rel, owned))


TOOLCHAIN_FILES = ("cuda.toml", "torch.toml", "packages.toml")  # the ones a user catalog merges into


def check(user: Path | str | None = None) -> dict:
    """`envbuild catalog check [DIR]`: the built-in catalog with this user catalog on top (else
    the configured one), every file validated as `load` does, and no .toml file in the folder
    that the catalog would not read (a misspelled folder or file name). What it holds, with a
    one-line summary; a CatalogError (exit 2) at the first mistake."""
    from .config import setting
    folder = Path(user) if user else (Path(p) if (p := setting("catalog_dir")) else None)
    cat = load(folder)
    user_dir = cat.overlay
    if user_dir is None:
        summary = f"built-in catalog OK: {len(cat.models)} models, {len(cat.cards)} cards"
        return {"catalog": BUILTIN, "models": sorted(cat.models), "cards": len(cat.cards), "summary": summary}
    read = {"cards.toml", *(f"models/{f.name}" for f in user_dir.glob("models/*.toml")),
            *(f"toolchains/{name}" for name in TOOLCHAIN_FILES)}
    for path in sorted(user_dir.rglob("*.toml")):
        rel = path.relative_to(user_dir).as_posix()
        if rel not in read:
            close = difflib.get_close_matches(rel, sorted(read | {f"models/{path.name}", f"toolchains/{path.name}"}), n=1)
            hint = f"did you mean {close[0]}?" if close else \
                "a user catalog reads cards.toml, models/*.toml and toolchains/{cuda,torch,packages}.toml"
            raise CatalogError(_rel(path), "(file)", f"not a file the catalog reads ({hint})")
    models = sorted(name for name, m in cat.models.items() if m.origin != BUILTIN)
    cards = sorted(cid for cid, c in cat.cards.items() if c.origin != BUILTIN)
    merged = [name for name in TOOLCHAIN_FILES if (user_dir / "toolchains" / name).is_file()]
    parts = [f"{len(cat.models)} models ({len(models)} from it)", f"{len(cat.cards)} cards ({len(cards)} from it)"]
    if merged:
        parts.append(f"toolchains merged: {', '.join(merged)}")
    return {"catalog": str(user_dir), "models": sorted(cat.models), "user_models": models, "cards": len(cat.cards),
            "user_cards": cards, "toolchains": merged, "summary": f"{_rel(user_dir)}: catalog OK: {'; '.join(parts)}"}


def _load_vendor(pkg: _Reader) -> dict[str, VendorWheels]:
    """[vendor.NAME]: find_links and [[vendor.NAME.builds]] (versions, torch, cuda, python, sass, ptx)."""
    out = {}
    for name in pkg.get("vendor", dict, {}):
        if not PKG_RE.match(name):
            raise pkg.sub("vendor").fail(name, "not a package name")
        r = pkg.sub("vendor").sub(name)
        builds = []
        for b in r.rows("builds"):
            builds.append(VendorBuild(
                versions=_versions(b, "versions"),
                torch=b.strings("torch", TORCH_MINOR_RE), cuda=b.strings("cuda", CUDA_RE),
                python=_range(b, "python"), sass=b.strings("sass", CC_RE), ptx=b.strings("ptx", CC_RE, [])))
        out[name] = VendorWheels(name, r.get("find_links", str, pattern=FIND_LINKS_RE), tuple(builds))
    return out


# -- toolchains/cuda.toml


def _load_cuda(cuda_doc: _Reader) -> tuple[dict[str, Ubuntu], dict[str, Toolkit]]:
    """[ubuntu] then [cuda]: every toolkit's ubuntu releases must be listed under [ubuntu]."""
    ubuntu = {}
    for ver in cuda_doc.get("ubuntu", dict):
        if not re.match(r"^\d\d\.\d\d$", ver):
            raise cuda_doc.sub("ubuntu").fail(ver, "an Ubuntu release looks like 22.04")
        r = cuda_doc.sub("ubuntu").sub(ver)
        ubuntu[ver] = Ubuntu(ver, r.get("gcc", int), r.version("python"))
    toolkits = {}
    for ver in cuda_doc.get("cuda", dict):
        if not CUDA_RE.match(ver):
            raise cuda_doc.sub("cuda").fail(ver, "CUDA key must look like 11.8")
        r = cuda_doc.sub("cuda").sub(ver)
        tk = Toolkit(
            version=ver,
            full=r.version("full"),
            archs=r.strings("archs", CC_RE),
            max_gcc=r.get("max_gcc", int),
            min_driver=r.get("min_driver", str, pattern=re.compile(r"^\d+(\.\d+)*$")),
            compat_driver=r.get("compat_driver", str, pattern=re.compile(r"^\d+(\.\d+)*$")),
            cudnn=r.get("cudnn", str, pattern=re.compile(r"^cudnn\d*$")),
            ubuntu=r.strings("ubuntu", re.compile(r"^\d\d\.\d\d$")),
        )
        for u in tk.ubuntu:
            if u not in ubuntu:
                raise r.fail("ubuntu", f"unknown ubuntu release {u} (add it under [ubuntu])")
        toolkits[ver] = tk
    cuda_doc.unread()
    return ubuntu, toolkits


# -- toolchains/torch.toml


def _load_torch(torch_doc: _Reader) -> tuple[dict[str, TorchRelease], dict[str, tuple[str, ...]]]:
    """[wheel_archs] then [torch]: every CUDA build a release lists needs its wheel_archs entry."""
    wheel_archs = {}
    wa = torch_doc.sub("wheel_archs")
    for cu in wa.names():
        if not CUDA_RE.match(cu):
            raise wa.fail(cu, "CUDA key must look like 11.8")
        wheel_archs[cu] = wa.strings(cu, CC_RE)
    torch = {}
    for ver in torch_doc.get("torch", dict):
        if not is_exact(ver):
            raise torch_doc.sub("torch").fail(ver, "not a version")
        r = torch_doc.sub("torch").sub(ver)
        rel = TorchRelease(
            version=ver,
            torchvision=r.version("torchvision"),
            torchaudio=r.version("torchaudio", ""),  # "": none pairs (torchaudio stopped at 2.9)
            python=_range(r, "python"),
            index=r.strings("index", CUDA_RE),
            pypi=r.get("pypi", str, pattern=CUDA_RE),
            cxx=r.get("cxx", int),
            ext_max_arch=r.get("ext_max_arch", str, pattern=CC_RE),
            compile_python_max=r.get("compile_python_max", str, None, pattern=re.compile(r"^3\.\d{1,2}$")),
            released=_date(r, "released"),
            sass=r.strings("sass", CC_RE, []),
            ptx=r.strings("ptx", CC_RE, []),
        )
        if "ptx" in r.table and "sass" not in r.table:
            raise r.fail("ptx", "measured PTX without the SASS beside it (measure both: scripts/measure-torch.py)")
        if "sass" in r.table and not rel.sass and not rel.ptx:
            raise r.fail("sass", "a measured CUDA build carries some GPU code: an empty list is not a measurement")
        for key, archs in (("sass", rel.sass), ("ptx", rel.ptx)):
            if len(set(archs)) != len(archs):
                raise r.fail(key, f"an arch listed twice: {list(archs)}")
        for cu in (*rel.index, rel.pypi):
            if cu not in wheel_archs and not (cu == rel.pypi and "sass" in r.table):
                raise r.fail("index", f"no [wheel_archs] entry for CUDA {cu}")
        torch[ver] = rel
    torch_doc.unread()
    return torch, wheel_archs


# -- toolchains/packages.toml, one function per section


def _load_compiled(pkg: _Reader) -> dict[str, dict[str, Compiled]]:
    compiled: dict[str, dict[str, Compiled]] = {}
    for name in pkg.get("compiled", dict):
        if not PKG_RE.match(name):
            raise pkg.sub("compiled").fail(name, "not a package name")
        for ver in pkg.sub("compiled").get(name, dict):
            if not is_exact(ver):
                raise pkg.sub("compiled").sub(name).fail(ver, "not a version (a release envbuild compiles)")
            r = pkg.sub("compiled").sub(name).sub(ver)
            compiled.setdefault(name, {})[ver] = Compiled(
                name, ver, r.get("series", str, pattern=NAME_RE), _range(r, "torch"),
                _cxx(r), r.get("notes", str, ""), _fixer_names(r, "port"),
            )
    return compiled


CXX_STANDARDS = (11, 14, 17, 20, 23)


def _cxx(r: _Reader) -> int:
    value = r.get("cxx", int)
    if value not in CXX_STANDARDS:
        raise r.fail("cxx", f"{value} is not a C++ standard ({', '.join(map(str, CXX_STANDARDS))})")
    return value


def _versions(r: _Reader, key: str) -> tuple[str, ...]:
    values = r.strings(key, re.compile(r"^[0-9][0-9A-Za-z.+!]*$"))
    bad = [v for v in values if not is_exact(v)]
    if bad:
        raise r.fail(key, f"not a version: {bad[0]!r}")
    return values


def _fixer_names(r: _Reader, key: str) -> tuple[str, ...]:
    from .fixers import FIXERS, needs_args
    names = r.strings(key, NAME_RE, [])
    for name in names:
        if name not in FIXERS:
            raise r.fail(key, f"unknown fixer {name!r} (known: {', '.join(sorted(FIXERS))})")
        if needs_args(name):
            raise r.fail(key, f"fixer {name!r} takes arguments a port cannot give (the resolver names it itself)")
    return names


def _load_asserts(pkg: _Reader) -> dict[str, dict[str, MmcvAssert]]:
    """[asserts.NAME."VERSION"] or [asserts.NAME.">=0.17,<0.18"]: a range holds for every release in it."""
    asserts: dict[str, dict[str, MmcvAssert]] = {}
    for name in pkg.get("asserts", dict):
        if not PKG_RE.match(name):
            raise pkg.sub("asserts").fail(name, "not a package name")
        for ver in pkg.sub("asserts").get(name, dict):
            check_version_key(pkg.sub("asserts").sub(name), ver)
            r = pkg.sub("asserts").sub(name).sub(ver)
            asserts.setdefault(name, {})[ver] = MmcvAssert(name, ver, _range(r, "mmcv"),
                                                           r.version("layers_clash_from", None))
    return asserts


def _load_flash_attn(pkg: _Reader) -> dict[str, FlashAttn]:
    flash = {}
    for ver in pkg.get("flash_attn", dict):
        if not is_exact(ver):
            raise pkg.sub("flash_attn").fail(ver, "not a version")
        r = pkg.sub("flash_attn").sub(ver)
        sass = r.get("sass", dict)
        for arch, nvcc in sass.items():
            if not CC_RE.match(arch) or not isinstance(nvcc, str) or not CUDA_RE.match(nvcc):
                raise r.fail("sass", f"invalid entry {arch!r} = {nvcc!r}")
        if r.get("objects", int, 0) < 0:
            raise r.fail("objects", "must be a count (>= 0)")
        dims = r.get("head_dims", list, [])
        if any(d not in FLASH_ATTN_HEAD_DIMS for d in dims):
            raise r.fail("head_dims", f"expected head dims among {', '.join(map(str, FLASH_ATTN_HEAD_DIMS))}, got {dims!r}")
        flash[ver] = FlashAttn(
            ver, r.get("min_nvcc", str, pattern=CUDA_RE), r.version("min_torch"),
            _range(r, "python"), dict(sass), r.strings("runtime", CC_RE), r.get("objects", int, 0), tuple(sorted(dims)),
        )
    return flash


def _load_era(pkg: _Reader) -> list[EraPin]:
    era = []
    for r in pkg.rows("era"):
        when_package = r.get("when_package", str, None, pattern=PKG_RE)
        when_version = r.get("when_version", str, None)
        if when_version is not None and when_package is None:
            raise r.fail("when_version", "needs when_package: the package whose pinned version it is about")
        era.append(EraPin(
            name=r.get("name", str, pattern=PKG_RE),
            spec=check_spec(r, "spec", r.get("spec", str), unpinned=False),
            why=r.get("why", str),
            torch_max=r.version("torch_max", None),
            when_package=when_package,
            when_version=when_version and check_spec(r, "when_version", when_version, unpinned=False),
            from_date=r.day("from_date", None),
            replaces=r.get("replaces", str, None, pattern=PKG_RE),
            always=r.get("always", bool, False),
        ))
    return era


def _load_requires(pkg: _Reader) -> dict[str, tuple[str, ...]]:
    requires = {}
    if pkg.has("requires"):
        rq = pkg.sub("requires")
        for name in rq.names():
            if not PKG_RE.match(name):
                raise rq.fail(name, "not a package name")
            requires[name] = rq.strings(name, PKG_RE)
    return requires


def _load_runtime_apt(pkg: _Reader) -> dict[str, tuple[str, ...]]:
    """[runtime_apt]: package -> the Debian packages of the libraries its wheel loads at import."""
    out = {}
    if pkg.has("runtime_apt"):
        rows = pkg.sub("runtime_apt")
        for name in rows.names():
            if not PKG_RE.match(name):
                raise rows.fail(name, "not a package name")
            out[canonicalize_name(name)] = rows.strings(name, APT_RE)
    return out


def _load_python_floors(pkg: _Reader) -> dict[str, dict[str, str]]:
    python_floors = {}
    if pkg.has("python_floor"):
        fl = pkg.sub("python_floor")
        for name in fl.table:
            if not PKG_RE.match(name):
                raise fl.fail(name, "not a package name")
            row = fl.sub(name)
            bad = [py for py in row.table if not PYTHON_RE.match(py)]
            if bad:
                raise row.fail(bad[0], "not a Python version (X.Y)")
            python_floors[name] = {py: row.version(py) for py in row.table}
    return python_floors


def _load_collections_abc(pkg: _Reader) -> dict[str, str]:
    """[collections_abc]: package -> the first release that no longer takes ABCs from collections."""
    if not pkg.has("collections_abc"):
        return {}
    rows = pkg.sub("collections_abc")
    for name in rows.table:
        if not PKG_RE.match(name):
            raise rows.fail(name, "not a package name")
    return {name.lower(): rows.version(name) for name in rows.table}


def _load_source_builds(pkg: _Reader, python_floors: dict[str, dict[str, str]]) -> dict[str, SourceBuild]:
    """[source_build]: only for packages with a python_floor (that says when they build from source)."""
    source_builds = {}
    if pkg.has("source_build"):
        sb = pkg.sub("source_build")
        for name in sb.table:
            if name not in python_floors:
                raise sb.fail(name, "has no python_floor: nothing says when it builds from source")
            row = sb.sub(name)
            env = row.get("build_env", dict, {})
            for key, value in env.items():
                if not ENV_NAME_RE.match(key) or not isinstance(value, str) or not ENV_VALUE_RE.match(value):
                    raise row.fail("build_env", f"invalid entry {key}={value!r}")
            files = row.strings("build_files", FILE_RE, [])
            missing = [f for f in files if not (Path(__file__).parent / "incontainer" / f).is_file()]
            if missing:
                raise row.fail("build_files", f"{missing[0]} is not a file in envbuild/incontainer/")
            source_builds[name] = SourceBuild(name, row.strings("build_apt", APT_RE, []), row.strings("runtime_apt", APT_RE, []),
                                              env, files)
    return source_builds


# -- models/*.toml, one function per section


def _load_models(base: Path, user: Path | None, torch: dict[str, TorchRelease]) -> dict[str, Model]:
    """Every models/*.toml; a user file replaces the built-in one of the same name."""
    files = {path.stem: path for path in sorted((base / "models").glob("*.toml"))}
    if user is not None:
        files.update({path.stem: path for path in sorted((user / "models").glob("*.toml"))})
    models = {}
    for stem, path in sorted(files.items()):
        m = _load_model(path, torch)
        if user is not None and path.parent.parent == user:
            m = replace(m, origin=str(path))
        models[m.name] = m
    return models


def _load_model(path: Path, torch: dict) -> Model:
    # The sections are read in this order (and [model]'s name is checked after them) so the
    # first error a broken file reports stays the same.
    doc = _Reader.of_file(path, _load_toml(path), "models/*.toml")
    m = doc.sub("model")
    torch_version, cuda = _model_torch(doc, torch)
    packages = _model_packages(doc, path)
    corrections = _model_corrections(doc, packages)
    vendored = _model_vendored(doc)
    git_packages = _model_git_packages(doc, packages, vendored)
    extensions = _model_extensions(doc, path)
    train = _model_train(doc)
    # [data] (the dataset a person needs: documentation only) stays accepted and must be a
    # table, as before, but nothing reads it, so it is not kept.
    doc.get("data", dict, {})
    construct = _model_construct(doc) if doc.has("construct") else None
    stdlib_modules = _model_stdlib_modules(doc)
    head_dims, head_dims_why = _model_flash_attn(doc)
    name = m.get("name", str, pattern=NAME_RE)
    if name != path.stem:
        raise m.fail("name", f"must match the file name {path.stem!r}")
    model = Model(
        name=name,
        title=m.get("title", str),
        description=m.get("description", str),
        repo=m.get("repo", str, pattern=URL_RE),
        commit=m.get("commit", str, pattern=COMMIT_RE),
        python=m.version("python"),
        torch=torch_version,
        cuda=cuda,
        packages=packages,
        corrections=corrections,
        vendored=vendored,
        extensions=tuple(extensions),
        train=train,
        path=str(path),
        construct=construct,
        era=m.day("era", None),
        era_grace_days=m.number("era_grace_days", int, 0, 3650, 30),
        stdlib_modules=stdlib_modules,
        git_packages=git_packages,
        flash_attn_head_dims=head_dims,
        flash_attn_why=head_dims_why,
    )
    doc.unread()
    return model


# Modules of Python's standard library that Debian and Ubuntu ship in a package of their own
# (python3-tk, or python3.X-tk beside a deadsnakes Python): module -> the package's suffix.
STDLIB_APART = {"tkinter": "tk"}


def _model_stdlib_modules(doc: _Reader) -> dict:
    """[stdlib_modules]: module = "why the model needs it", for modules the OS packs apart."""
    if not doc.has("stdlib_modules"):
        return {}
    section = doc.sub("stdlib_modules")
    out = {}
    for module in doc.get("stdlib_modules", dict):
        if module not in STDLIB_APART:
            raise section.fail(module, f"not a module the OS packs apart from Python (known: {', '.join(STDLIB_APART)})")
        out[module] = section.get(module, str)
    return out


# The head dims flash-attn 2.x has kernels for (one file per dim, dtype and direction); a call's
# head dim runs the kernel of the next one up.
FLASH_ATTN_HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256)


def _model_flash_attn(doc: _Reader) -> tuple[tuple, str]:
    """[flash_attn]: head_dims the model's attention calls (kernel dims) and why."""
    if not doc.has("flash_attn"):
        return (), ""
    fa = doc.sub("flash_attn")
    dims = fa.get("head_dims", list)
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise fa.fail("head_dims", f"expected a non-empty array of integers, got {dims!r}")
    wrong = [d for d in dims if d not in FLASH_ATTN_HEAD_DIMS]
    if wrong:
        raise fa.fail("head_dims", f"{wrong[0]} is not a head dim flash-attn has kernels for "
                                   f"({', '.join(map(str, FLASH_ATTN_HEAD_DIMS))}; a call rounds up to the next)")
    return tuple(sorted(set(dims))), fa.get("why", str)


def _model_torch(doc: _Reader, torch: dict) -> tuple[str, str]:
    """[torch]: a release in toolchains/torch.toml and one of its CUDA builds."""
    t = doc.sub("torch")
    torch_version = t.version("version")
    if torch_version not in torch:
        raise t.fail("version", f"torch {torch_version} is not in toolchains/torch.toml")
    cuda = t.get("cuda", str, pattern=CUDA_RE)
    rel = torch[torch_version]
    if cuda not in rel.index and cuda != rel.pypi:
        raise t.fail("cuda", f"torch {torch_version} has no CUDA {cuda} build")
    return torch_version, cuda


def _model_packages(doc: _Reader, path: Path) -> dict[str, str]:
    packages = {}
    pk = doc.sub("packages") if doc.has("packages") else _Reader(path, {}, "packages.")
    for name in pk.names():
        spec = pk.table[name]
        if not PKG_RE.match(name):
            raise pk.fail(name, "invalid package name")
        if not isinstance(spec, str):
            raise pk.fail(name, f"expected a version string, got {spec!r}")
        packages[name.lower()] = check_spec(pk, name, spec)
    return packages


def _model_corrections(doc: _Reader, packages: dict[str, str]) -> dict[str, tuple[str, str]]:
    corrections = {}
    if doc.has("corrections"):
        cr = doc.sub("corrections")
        for name in cr.table:
            if name.lower() not in packages:
                raise cr.fail(name, "corrects a package the model does not pin in [packages]")
            row = cr.sub(name)
            corrections[name.lower()] = (check_spec(row, "version", row.get("version", str), unpinned=False),
                                         row.get("why", str))
    return corrections


def _model_vendored(doc: _Reader) -> dict[str, tuple[str, str]]:
    vendored = {}
    if doc.has("vendored"):
        for name in doc.get("vendored", dict):
            if not PKG_RE.match(name):
                raise doc.sub("vendored").fail(name, "not a package name")
            v = doc.sub("vendored").sub(name)
            vendored[name] = (v.version("version"), v.get("path", str, pattern=RELPATH_RE))
    return vendored


def _model_git_packages(doc: _Reader, packages: dict, vendored: dict) -> dict[str, GitPackage]:
    """[git_packages.NAME]: an https repository, a full commit, a folder inside it, a build kind."""
    out: dict[str, GitPackage] = {}
    if not doc.has("git_packages"):
        return out
    section = doc.sub("git_packages")
    for name in doc.get("git_packages", dict):
        if not PKG_RE.match(name):
            raise section.fail(name, "not a package name")
        key = name.lower()
        # one project however it is spelt (foo-bar, foo_bar, Foo.Bar): pip would install both
        same = lambda names: canonicalize_name(name) in {canonicalize_name(n) for n in names}  # noqa: E731
        if same(packages) or same(vendored) or same(out):
            where = "[packages]" if same(packages) else "[vendored]" if same(vendored) else "[git_packages]"
            raise section.fail(name, f"{name} is in {where} too: a package comes from one place (remove one of them)")
        g = section.sub(name)
        url = g.get("url", str)
        if re.match(r"^(ssh://|git@|[\w.-]+@[\w.-]+:)", url):
            raise g.fail("url", f"{url!r}: ssh is not supported (builds get no SSH agent): give the https address")
        if re.match(r"^[a-z+]+://[^/]*@", url):
            raise g.fail("url", f"{url!r} carries credentials: give the address without them (a mirror's "
                                "credentials come from index_auth, never from the catalog)")
        if url.startswith("git+"):
            raise g.fail("url", f"{url!r}: the repository's address without pip's git+ prefix")
        if not GIT_URL_RE.match(url):
            raise g.fail("url", f"not an https URL of a repository: {url!r}")
        commit = g.get("commit", str)
        if not COMMIT_RE.match(commit):
            short = re.match(r"^[0-9a-fA-F]{4,39}$", commit)
            hint = ("a short hash cannot be fetched: give the full 40-hex commit (git rev-parse " + commit + ")"
                    if short else "a tag or branch can move: give the full 40-hex commit it points at "
                    "(git ls-remote URL " + commit + ")" if re.match(r"^[\w./-]+$", commit) else "40 hex digits")
            raise g.fail("commit", f"{commit!r} is not a full commit id: {hint}")
        sub = g.get("subdirectory", str, "")
        if sub and (sub.startswith("/") or ".." in sub.split("/")):
            raise g.fail("subdirectory", f"must stay inside the repository: {sub!r}")
        if sub and not RELPATH_RE.match(sub):
            raise g.fail("subdirectory", f"invalid value {sub!r}")
        build = g.get("build", str, "pip")
        if build not in GIT_BUILDS:
            close = difflib.get_close_matches(build, GIT_BUILDS, n=1, cutoff=0.5) or \
                [b for b in GIT_BUILDS if b.startswith(build)]
            raise g.fail("build", f"{build!r} is not one of {', '.join(GIT_BUILDS)}"
                                  + (f" (did you mean {close[0]!r}?)" if close else ""))
        requires = tuple(_requirement(g, r) for r in g.get("requires", list, []))
        out[key] = GitPackage(key, url, commit, sub.rstrip("/"), build, requires)
    return out


def _requirement(g: _Reader, item) -> str:
    """One of a git package's requires: "name" or "name" plus a version range ("fvcore>=0.1.5,<0.1.6")."""
    m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*([<>=!~].*)?$", item) if isinstance(item, str) else None
    if not m or not PKG_RE.match(m.group(1)):
        raise g.fail("requires", f"invalid entry {item!r}: a package name, optionally with a version range")
    spec = (m.group(2) or "").replace(" ", "")
    try:
        SpecifierSet(spec)
    except InvalidSpecifier:
        raise g.fail("requires", f"invalid version range in {item!r}") from None
    return m.group(1).lower() + spec


def requirement_parts(requirement: str) -> tuple[str, str]:
    """("fvcore", ">=0.1.5,<0.1.6") of a git package's requires entry; "*" when it names no range."""
    name = re.match(r"^[a-z0-9._-]+", requirement).group(0)
    return name, requirement[len(name):] or "*"


SOURCE_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--trusted-host", "--index",
                  "--cert", "--client-cert", "--proxy"}


def _model_extensions(doc: _Reader, path: Path) -> list[Extension]:
    extensions = []
    for e in doc.rows("extensions", []):
        ext_path = e.get("path", str, pattern=EXT_PATH_RE)
        if ".." in ext_path.split("/"):
            raise e.fail("path", "must stay inside the repository")
        build = e.get("build", str)
        words = tuple(build.split(" "))
        if not words or any(not WORD_RE.match(w) for w in words):
            raise e.fail("build", f"only plain words are allowed: {build!r}")
        # packages come from the Plan's indexes only: no word may point pip (or a download) elsewhere
        elsewhere = [w for w in words if "://" in w or w.split("=", 1)[0] in SOURCE_OPTIONS]
        if elsewhere:
            raise e.fail("build", f"{elsewhere[0]!r} points the build at another package source; "
                                  "indexes come from the config (pypi_index, torch_index)")
        extensions.append(Extension(e.get("name", str, pattern=PKG_RE), ext_path, words,
                                    e.get("needs_visible_gpu", bool, False)))
    return extensions


def _model_train(doc: _Reader) -> Train:
    tr = doc.sub("train")
    launcher = tr.get("launcher", str)
    if launcher not in LAUNCHERS:
        raise tr.fail("launcher", f"{launcher!r} is not one of {', '.join(LAUNCHERS)}")
    return Train(
        launcher=launcher,
        entry=tr.get("entry", str, pattern=RELPATH_RE),
        config=tr.get("config", str, None, pattern=RELPATH_RE),
        local_rank_arg=tr.get("local_rank_arg", str, None, pattern=re.compile(r"^--local[_-]rank$")),
        extra_args=tr.strings("extra_args", WORD_RE, []),
        ops_check=tr.get("ops_check", str, None, pattern=RELPATH_RE),
        cpu_args=tr.strings("cpu_args", WORD_RE, []),
        steps_args=tr.strings("steps_args", STEPS_ARG_RE, []),
    )


def _construct_code(c: _Reader) -> str:
    """[construct] code: Python that parses and binds `model` at its top level, checked at load."""
    code = c.get("code", str, lines=True)
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        raise c.fail("code", f"not Python: {e.msg} (line {e.lineno} of the code)") from None
    bound = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    if "model" not in bound:
        raise c.fail("code", "binds no `model` at its top level: end with `model = ...` (the network)")
    return code


def _model_construct(doc: _Reader) -> Construct:
    """[construct]: the fields of its kind only, a known training step, arrays inside the repo."""
    c = doc.sub("construct")
    kind = c.get("kind", str)
    if kind not in CONSTRUCT_KINDS:
        raise c.fail("kind", f"{kind!r} is not one of {', '.join(CONSTRUCT_KINDS)}")
    if kind == "argparse":
        construct = Construct(kind, module=c.get("module", str, pattern=DOTTED_RE),
                              object=c.get("object", str, pattern=IDENT_RE),
                              args_hook=c.get("args_hook", str, pattern=IDENT_RE),
                              args=c.strings("args", WORD_RE, []), imports=c.strings("imports", DOTTED_RE, []))
    elif kind == "python":
        construct = Construct(kind, code=_construct_code(c), imports=c.strings("imports", DOTTED_RE, []))
    else:
        construct = Construct(kind, config=c.get("config", str, pattern=RELPATH_RE),
                              loader=c.get("loader", str, pattern=DOTTED_RE),
                              builder=c.get("builder", str, pattern=DOTTED_RE),
                              cfg_kwargs=c.strings("cfg_kwargs", IDENT_RE, []),
                              imports=c.strings("imports", DOTTED_RE, []))
    step = c.get("step", str, "")
    if step and step not in train_step_names():
        raise c.fail("step", f"{step!r} is not one of {', '.join(train_step_names())}")
    arrays = c.strings("arrays", ARRAY_RE, [])
    if any(".." in a.split("=")[0].split("/") for a in arrays):
        raise c.fail("arrays", "must stay inside the repository")
    construct = replace(construct, step=step, arrays=arrays)
    unknown = set(c.table) - {"kind", *CONSTRUCT_FIELDS[kind]}
    if unknown:
        raise c.fail(sorted(unknown)[0], f"not a field of construct kind {kind!r}")
    return construct
