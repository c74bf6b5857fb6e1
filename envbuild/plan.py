"""The Plan: what the resolver decided for one image, every pin with its reason. Data only; the
decisions are resolve.py's and packages/'s."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .catalog import Extension, is_exact
from .incontainer.archrules import cc_key


@dataclass(frozen=True)
class Pin:
    name: str
    version: str  # exact version, or a specifier ("" = unpinned; the lock decides)
    why: str
    upstream: str | None = None  # what upstream pins; None when envbuild added it
    source: str = "upstream"  # upstream | port | era | override | fix (a catalog correction)

    @property
    def deviation(self) -> bool:
        """Differs from what upstream pinned (era pins on unpinned packages do not)."""
        if self.source in ("port", "override", "fix"):
            return self.version != self.upstream
        return self.source == "era" and self.upstream not in (None, "*")

    @property
    def is_port(self) -> bool:
        """An upgrade the card forces (or the user set), which makes the Plan a port. A catalog
        correction (upstream pins that cannot install) is a deviation, not a port: strict keeps it."""
        return self.source in ("port", "override") and self.version != self.upstream

    @property
    def requirement(self) -> str:
        if not self.version:
            return self.name
        if is_exact(self.version):
            return f"{self.name}=={self.version}"
        return f"{self.name}{self.version}"


@dataclass(frozen=True)
class Fixer:
    name: str
    why: str
    args: dict = field(default_factory=dict)
    # installed distributions (pip names) whose own code needs the fixer too, beside the model tree
    installed: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    model: str
    repo: str
    commit: str
    card: str
    card_name: str
    cc: str
    mode: str  # upstream | port
    strict: bool
    python: Pin
    python_source: str  # system | deadsnakes
    cuda: str  # full toolkit version, e.g. 11.8.0
    cuda_why: str
    base_image: str
    base_why: str
    os: str
    gcc: int
    gcc_max: int
    torch: Pin
    torchvision: Pin
    torchaudio: Pin
    torch_cuda: str  # CUDA of the torch build, e.g. 11.8
    torch_index: str | None  # None = plain PyPI
    packages: tuple[Pin, ...]
    compiled: tuple[str, ...]  # packages compiled from source in the builder stage
    arch_list: str  # TORCH_CUDA_ARCH_LIST for extension builds
    arch_why: str
    extensions: tuple[Extension, ...]  # the model's own ops, as the catalog gives them
    fixers: tuple[Fixer, ...]
    runtime_env: dict  # name -> {"value":..., "why":...}: baked into the image as ENV
    min_driver: str
    compat_driver: str
    cxx: int
    train: dict
    torch_compile: bool = False  # torch.compile (inductor) runs on this torch x Python
    torch_compile_why: str = ""
    notes: tuple[str, ...] = ()
    construct: dict | None = None  # smoke's model level: how to build the network (catalog [construct])
    index_cutoff: str | None = None  # YYYY-MM-DD: the lock sees PyPI as it was then (exact pins excepted)
    index_cutoff_why: str = ""
    # Packages installed from git at a commit (catalog [git_packages]): name -> {"url", "commit",
    # "subdirectory", "build" (pip | cuda-extension), "requires"}; each is a wheel stage of its own.
    git_packages: dict = field(default_factory=dict)
    cards: tuple[str, ...] = ()  # every card the image is for (one, a list, or the portable set)
    cards_why: str = ""  # how the cards were chosen (--card, the host's GPUs, config, portable)
    # Packages that build from their sdist when the lock's version is below "below" (no wheel
    # for this Python), and how (catalog source_build): the lock decides which apply.
    source_builds: dict = field(default_factory=dict)
    # Package -> the OS libraries its wheel loads at import (catalog runtime_apt): the lock decides
    # which the runtime installs.
    runtime_apt: dict = field(default_factory=dict)
    # Each package with native code -> its building block's family and what the in-image checks
    # need (import name, op check, compiled modules the check covers): packages/ decides.
    native_packages: dict = field(default_factory=dict)
    stdlib_modules: dict = field(default_factory=dict)  # module the OS packs apart (tkinter) -> why
    # Settings the image's launcher decides on the host at start (not baked): name -> {"value",
    # "rule", "why", "respects" (variables a user sets to decide it), "cards" (catalog facts the rule reads)}
    host_env: dict = field(default_factory=dict)

    @property
    def ccs(self) -> list[str]:
        return self.cc.split(",")

    @property
    def cc_text(self) -> str:
        """The distinct compute capabilities, for people: '8.0, 9.0'."""
        return ", ".join(sorted(set(self.ccs), key=cc_key))

    @property
    def pins(self) -> list[Pin]:
        return [self.python, self.torch, self.torchvision, self.torchaudio, *self.packages]

    @property
    def deviations(self) -> list[str]:
        out = []
        for pin in self.pins:
            if pin.deviation:
                out.append(f"{pin.name}: {pin.upstream or '(unpinned)'} -> {pin.version}: {pin.why}")
        for name, info in sorted(self.native_packages.items()):
            for fx in info.get("sdist_fixers", ()):  # a ported sdist differs from upstream's even at its version
                out.append(f"{name}: sdist fixer {fx['name']}: {fx['why']}")
        return out

    def pin(self, name: str) -> Pin | None:
        return next((p for p in self.pins if p.name == name), None)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["deviations"] = self.deviations
        if not data["git_packages"]:  # absent when none: plan.json and digests of Plans without one stay as they were
            del data["git_packages"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
