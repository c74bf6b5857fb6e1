"""Resolve stage: (model, card, cuda?, python?, overrides, strict/port) -> Plan.

A pure function: no network, no Docker. Every pin carries why it was chosen, and
every deviation from upstream is marked. Binary compatibility follows
research/compat: a cubin for X.y runs on X.z only when z >= y; PTX JIT-compiles
forward; no 8.x cubin runs on 9.x.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from datetime import date, timedelta
from functools import lru_cache

from packaging.specifiers import SpecifierSet


from .catalog import (
    PKG_RE, V, Card, Catalog, FlashAttn, Model, TorchRelease, Toolkit, cc_key, is_exact, minor_key,
)
from .config import Sources
from .errors import BadInput, unknown

PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12")
MMCV = ("mmcv-full", "mmcv")
SPCONV_RE = re.compile(r"^spconv-cu(\d+)$")


class Conflict(BadInput):
    """No stack satisfies the request; `chain` holds the constraints that failed."""

    def __init__(self, message: str, chain: list[str], hint: str = ""):
        super().__init__(message, hint)
        self.chain = chain


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
class ExtensionBuild:
    name: str
    path: str
    build: tuple[str, ...]
    needs_visible_gpu: bool


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
    extensions: tuple[ExtensionBuild, ...]
    fixers: tuple[Fixer, ...]
    runtime_env: dict  # name -> {"value":..., "why":...}
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
    cards: tuple[str, ...] = ()  # every card the image is for (one, a list, or the portable set)
    cards_why: str = ""  # how the cards were chosen (--card, the host's GPUs, config, portable)
    # Packages that build from their sdist when the lock's version is below "below" (no wheel
    # for this Python), and how (catalog source_build): the lock decides which apply.
    source_builds: dict = field(default_factory=dict)

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
        return out

    def pin(self, name: str) -> Pin | None:
        return next((p for p in self.pins if p.name == name), None)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["deviations"] = self.deviations
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ------------------------------------------------------------ binary rules


def sass_runs_on(sass: str, cc: str) -> bool:
    """A cubin for X.y runs on X.z only when z >= y."""
    (smaj, smin), (cmaj, cmin) = cc_key(sass), cc_key(cc)
    return smaj == cmaj and smin <= cmin


@lru_cache(maxsize=None)
def _wheel_runs_on(archs: tuple, cc: str, ptx: tuple) -> str | None:
    """The arch whose code runs on cc (SASS first, then PTX JIT), or None."""
    fitting = [a for a in archs if sass_runs_on(a, cc)]
    if fitting:
        return max(fitting, key=cc_key)
    jit = [a for a in ptx if cc_key(a) <= cc_key(cc)]
    return f"{max(jit, key=cc_key)}+PTX" if jit else None


def wheel_runs_on(archs, cc: str, ptx=()) -> str | None:
    return _wheel_runs_on(tuple(archs), cc, tuple(ptx))


@lru_cache(maxsize=None)
def _extension_arch(cc: str, nvcc_archs: tuple, torch_max: str) -> tuple[str | None, str]:
    """Arch to compile extensions for: native, else same-major SASS, else PTX."""
    usable = [a for a in nvcc_archs if cc_key(a) <= cc_key(torch_max)]
    if cc in usable:
        return cc, f"native SASS for compute capability {cc}"
    same_major = [a for a in usable if sass_runs_on(a, cc)]
    limit = []
    if cc not in nvcc_archs:
        limit.append(f"nvcc cannot emit sm_{cc.replace('.', '')}")
    elif cc_key(cc) > cc_key(torch_max):
        limit.append(f"torch's extension builder knows archs only up to {torch_max}")
    if same_major:
        best = max(same_major, key=cc_key)
        return best, f"{'; '.join(limit)}: sm_{best.replace('.', '')} SASS runs on {cc} (same major, lower minor)"
    lower = [a for a in usable if cc_key(a) < cc_key(cc)]
    if lower:
        best = max(lower, key=cc_key)
        return f"{best}+PTX", f"{'; '.join(limit)}: compute_{best.replace('.', '')} PTX JIT-compiles forward on {cc}"
    return None, f"no arch this nvcc can emit runs on {cc}"


def extension_arch(cc: str, nvcc_archs, torch_max: str) -> tuple[str | None, str]:
    return _extension_arch(cc, tuple(nvcc_archs), torch_max)


# ------------------------------------------------------------ resolver


@dataclass
class _Attempt:
    label: str
    reasons: list[str]
    depth: int


@dataclass(frozen=True)
class _Stack:
    python: str
    torch: TorchRelease
    cuda: str  # CUDA of the torch build
    from_index: bool


def parse_overrides(values) -> dict[str, str]:
    out = {}
    for item in values or ():
        name, sep, version = item.partition("==")
        name = name.strip().lower()
        if not sep or not PKG_RE.match(name) or not is_exact(version.strip()) or "\n" in item:
            raise BadInput(f"bad --set {item!r}: expected PKG==VERSION", "e.g. --set mmcv-full==1.7.2")
        out[name] = version.strip()
    return out


PORTABLE = "portable"


def _strict_cuda(cat: Catalog, cuda: str) -> str:
    """'11.8' or the toolkit's own '11.8.0'; anything else (11.8.99, 11.8.0.1, ' 11.8x') is refused."""
    value = cuda.strip()
    key = ".".join(value.split(".")[:2])
    tk = cat.toolkits.get(key)
    if tk is None:
        raise unknown("CUDA version", cuda, sorted(cat.toolkits))
    if value not in (tk.version, tk.full):
        raise BadInput(f"--cuda {cuda!r}: the catalog's CUDA {tk.version} is {tk.full}", f"use --cuda {tk.version}")
    return key


def _check_overrides(cat: Catalog, model: Model, overrides: dict) -> None:
    """--set must change something this model installs, to a version the catalog knows where it
    matters: a pin that would be ignored, or skip every check, is refused."""
    for name, version in overrides.items():
        if name == "torch":
            cat.torch_release(version)
        elif name in ("torchvision", "torchaudio"):
            raise BadInput(f"--set {name}=={version}: {name} pairs with torch", "set torch instead: --set torch==X")
        elif name == "python":
            raise BadInput("--set python is not a pin", "use --python X.Y")
        elif name not in model.packages:
            raise BadInput(f"--set {name}=={version}: {model.name} does not install {name}",
                           f"its packages: {', '.join(sorted(model.packages))}")
        elif name in cat.compiled and version not in cat.compiled[name]:
            raise unknown(f"{name} version", version, sorted(cat.compiled[name], key=V))
        elif name == "flash-attn" and version not in cat.flash_attn:
            raise unknown("flash-attn version", version, sorted(cat.flash_attn, key=V))


def parse_cards(cat: Catalog, cards) -> list[Card] | None:
    """--card a800,h20 (or a list) -> the catalog's cards; None or empty -> None (portable)."""
    if cards is None:
        return None
    names = [n for item in ([cards] if isinstance(cards, str) else cards) for n in item.split(",") if n.strip()]
    if not names:
        return None
    out = list({c.id: c for c in (cat.card(n) for n in names)}.values())
    return out


def resolve(cat: Catalog, model_name: str, card_name=None, cuda: str | None = None,
            python: str | None = None, strict: bool = False, overrides=None,
            sources: Sources | None = None, cards_why: str = "") -> Plan:
    """The Plan for one card, for several (`a800,h20`: one stack that runs on each), or, with no
    card, a portable one: the stack that runs on the most catalog cards, for all of them."""
    model = cat.model(model_name)
    cards = parse_cards(cat, card_name)
    sources = sources or Sources()
    overrides = dict(overrides or {})
    toolkit = cat.toolkit(_strict_cuda(cat, cuda)) if cuda is not None else None
    if python is not None:
        if not re.match(r"^3\.\d{1,2}(\.\d{1,2})?$", python.strip()):
            raise BadInput(f"--python {python!r} is not a Python version", f"choose one of {', '.join(PYTHONS)}")
        python = ".".join(python.strip().split(".")[:2])
        if python not in PYTHONS:
            raise BadInput(f"unsupported Python {python!r}", f"choose one of {', '.join(PYTHONS)}")
    _check_overrides(cat, model, overrides)
    if cards is not None and len(cards) == 1:
        card = cards[0]
        attempts: list[_Attempt] = []
        for stack in _stacks(cat, model, strict, python, toolkit, overrides):
            result = _try(cat, model, card, stack, toolkit, strict, overrides, sources, python)
            if isinstance(result, Plan):
                return replace(result, cards=(card.id,), cards_why=cards_why)
            attempts.append(result)
        raise _conflict(cat, model, card, cuda, python, strict, overrides, sources, attempts)
    return _resolve_many(cat, model, cards, toolkit, strict, overrides, sources, python, cuda, cards_why)


def _resolve_many(cat, model, cards, toolkit, strict, overrides, sources, python, cuda, cards_why) -> Plan:
    portable = cards is None
    candidates = list(cat.cards.values()) if portable else cards
    best: tuple[Plan, dict] | None = None
    attempts: list[_Attempt] = []
    for stack in _stacks(cat, model, strict, python, toolkit, overrides):
        plans, failed = {}, {}
        for card in candidates:
            result = _try(cat, model, card, stack, toolkit, strict, overrides, sources, python)
            (plans if isinstance(result, Plan) else failed)[card.id] = result
        if failed and not portable:
            worst = min(failed.values(), key=lambda a: a.depth)
            attempts.append(_Attempt(worst.label, [f"{cid}: {a.reasons[-1]}" for cid, a in failed.items()],
                                     worst.depth))
            continue
        merged = _merge(cat, model, [cat.cards[c] for c in plans], plans, stack, toolkit, strict, overrides,
                        sources, python, portable) if plans else None
        if merged is None:
            continue
        if not portable:
            return replace(merged, cards_why=cards_why)
        if best is None or len(merged.cards) > len(best[0].cards):
            best = (merged, failed)
        if not failed:
            break
    if portable:
        if best is None:
            raise Conflict(f"{model.name} runs on no catalog card" + (f" with CUDA {cuda}" if cuda else ""), [],
                           "pass --card to see why for one card")
        plan, failed = best
        left_out = [f"not for {cid}: {a.reasons[-1]}" for cid, a in failed.items()]
        why = f"{cards_why or 'portable'}: {len(plan.cards)} of {len(candidates)} catalog cards"
        return replace(plan, cards_why=why, notes=plan.notes + tuple(left_out))
    names = ", ".join(c.id for c in cards)
    if not attempts:
        raise Conflict(f"{model.name} on {names}: no candidate stack", [])
    best_attempt = max(attempts, key=lambda a: a.depth)
    raise Conflict(f"{model.name} has no stack that runs on every one of {names}: " + "; ".join(best_attempt.reasons),
                   [f"{a.label}: {'; '.join(a.reasons)}"
                    for a in sorted(attempts, key=lambda a: -a.depth)[:3]],
                   "build one image per card, or drop the card that needs a different stack")


def _merge(cat, model, cards: list[Card], plans: dict, stack, toolkit, strict, overrides, sources, python,
           portable: bool) -> Plan | None:
    """One Plan that runs on every card: the strictest pins of each, the union of their archs."""
    versions: dict[str, set] = {}
    for plan in plans.values():
        for pin in plan.packages:
            versions.setdefault(pin.name, set()).add(pin.version)
    differ = {name: vs for name, vs in versions.items() if len(vs) > 1}
    if differ:
        if strict or any(not is_exact(v) for vs in differ.values() for v in vs):
            return None
        # The strictest: the highest version any card needs, tried again on every card.
        floors = {name: max(vs, key=V) for name, vs in differ.items()}
        plans = {}
        for card in cards:
            result = _try(cat, model, card, stack, toolkit, strict, {**overrides, **floors}, sources, python)
            if not isinstance(result, Plan):
                return None
            plans[card.id] = result
        ids = ", ".join(c.id for c in cards)
        pins = tuple(replace(p, why=f"the strictest of {ids}: some need {p.version}", source="port")
                     if p.name in floors and p.name not in overrides else p for p in next(iter(plans.values())).packages)
    else:
        pins = next(iter(plans.values())).packages
    first = next(iter(plans.values()))
    runtime_env: dict = {}
    for card in cards:
        for name, item in plans[card.id].runtime_env.items():
            runtime_env.setdefault(name, {"value": item["value"], "why": item["why"]})
    notes = tuple(dict.fromkeys(n for p in plans.values() for n in p.notes))
    arch_list = union_arch_list([plans[c.id].arch_list for c in cards], ptx_for_newest=portable)
    arch_why = "; ".join(f"{c.id}: {plans[c.id].arch_why}" for c in cards)
    if portable:
        arch_why += "; PTX of the newest arch so later cards can JIT-compile it"
    mode = "port" if any(p.mode == "port" for p in plans.values()) or any(p.is_port for p in pins) else "upstream"
    ids = tuple(c.id for c in cards)
    return replace(first, card=PORTABLE if portable else "+".join(ids), cards=ids,
                   card_name=(f"{len(cards)} cards (portable)" if portable else " + ".join(c.name for c in cards)),
                   cc=",".join(c.cc for c in cards), mode=mode, packages=pins, arch_list=arch_list,
                   arch_why=arch_why, runtime_env=runtime_env, notes=notes)


def union_arch_list(entries, ptx_for_newest: bool = False) -> str:
    """'8.0' + '9.0' -> '8.0;9.0'; an arch with +PTX anywhere keeps its PTX."""
    archs: dict[str, bool] = {}
    for entry in entries:
        for item in entry.split(";"):
            arch, _, ptx = item.partition("+")
            archs[arch] = archs.get(arch, False) or bool(ptx)
    order = sorted(archs, key=cc_key)
    if ptx_for_newest and order:
        archs[order[-1]] = True
    return ";".join(a + ("+PTX" if archs[a] else "") for a in order)


def _stacks(cat, model: Model, strict, python, toolkit, overrides):
    """Candidate (python, torch build) stacks, smallest upgrade from upstream first."""
    pythons = [python] if python else [model.python]
    if not strict and not python:
        pythons += [p for p in PYTHONS if minor_key(p) > minor_key(model.python)]
    if "torch" in overrides:
        versions = [overrides["torch"]]
    elif strict:
        versions = [model.torch]
    else:
        newer = [v for v in cat.torch_versions() if V(v) >= V(model.torch)]
        # Within a minor release prefer upstream's patch, else the newest patch.
        by_minor: dict = {}
        for v in newer:
            by_minor.setdefault(minor_key(v), []).append(v)
        versions = []
        for key in sorted(by_minor):
            group = sorted(by_minor[key], key=V, reverse=True)
            if model.torch in group:
                group.remove(model.torch)
                group.insert(0, model.torch)
            versions += group
    want = toolkit.version if toolkit else model.cuda
    for py in pythons:
        for version in versions:
            rel = cat.torch[version]
            builds = {cu: True for cu in rel.index}
            builds[rel.pypi] = False  # same CUDA on PyPI: no extra index needed
            order = sorted(builds, key=lambda cu: (
                cu != want,
                strict and cu != model.cuda,
                minor_key(cu) < minor_key(want),
                minor_key(cu),
            ))
            for cu in order:
                yield _Stack(py, rel, cu, builds[cu])


def _try(cat: Catalog, model: Model, card: Card, stack: _Stack, toolkit_req: Toolkit | None,
         strict: bool, overrides: dict, sources: Sources, python_req: str | None = None):
    rel, cu, py = stack.torch, stack.cuda, stack.python
    tag = "cu" + cu.replace(".", "")
    label = f"python {py}, torch {rel.version}+{tag}"
    reasons: list[str] = []
    depth = 0

    def fail(reason: str):
        reasons.append(reason)
        return _Attempt(label, reasons, depth)

    # 1. the torch wheel must exist for this Python and in the configured sources
    if not rel.supports_python(py):
        return fail(f"torch {rel.version} has wheels for Python {rel.python[0]}-{rel.python[1]}, not {py}")
    if stack.from_index and sources.torch_index is None:
        return fail(f"torch {rel.version}+{tag} is only on the PyTorch index; PyPI carries its "
                    f"CUDA {rel.pypi} build (configure torch_index to use it)")
    depth += 1
    # 2. a CUDA toolkit (nvcc, devel image) whose major matches the torch build
    toolkit = toolkit_req or cat.toolkits.get(cu)
    if toolkit is None:
        return fail(f"no nvidia/cuda devel image survives for CUDA {cu} (EOL tags are deleted)")
    if V(toolkit.version).major != V(cu).major:
        return fail(f"torch {rel.version}+{tag} needs nvcc {V(cu).major}.x to build extensions; "
                    f"CUDA {toolkit.version} was requested")
    depth += 1
    # 3. the torch wheel must carry code for the card
    archs = cat.wheel_archs[cu]
    runs = wheel_runs_on(archs, card.cc)
    if runs is None:
        return fail(f"torch {rel.version}+{tag} ships SASS for {', '.join(archs)} and no PTX: "
                    f"none runs on {card.name} (compute capability {card.cc})")
    depth += 1
    # 4. extensions must be compilable for the card
    arch, arch_why = extension_arch(card.cc, toolkit.archs, rel.ext_max_arch)
    if arch is None:
        return fail(f"CUDA {toolkit.version}: {arch_why}")
    depth += 1
    # 5. model packages
    upstream_torch = V(rel.version) == V(model.torch) and cu == model.cuda
    pins: list[Pin] = []
    compiled: list[str] = []
    fixers: list[Fixer] = []
    notes: list[str] = []
    mmcv_pin: Pin | None = None
    for name, spec in model.packages.items():
        forced = overrides.get(name)
        if name in cat.compiled:
            pin = _choose_compiled(cat, name, spec, forced, rel, strict, reasons)
            if pin is None:
                return _Attempt(label, reasons, depth)
            compiled.append(name)
            if name in MMCV:
                mmcv_pin = pin
        elif name == "flash-attn":
            pin = _choose_flash_attn(cat, spec, forced, rel, toolkit, card, py, strict, reasons)
            if pin is None:
                return _Attempt(label, reasons, depth)
            compiled.append(name)
        elif SPCONV_RE.match(name):
            pin = _choose_spconv(cat, name, spec, cu, strict, reasons)
            if pin is None:
                return _Attempt(label, reasons, depth)
        elif forced:
            pin = Pin(name, forced, "set with --set", spec, "override")
        elif spec == "*":
            pin = Pin(name, "", "unpinned upstream; the lock picks a version", spec)
        elif name in model.corrections:
            fixed, why = model.corrections[name]
            pin = (_python_port(cat, name, fixed, py, model.python, upstream=spec)
                   or Pin(name, fixed, f"catalog correction: {why}", spec, "fix"))
        else:
            pin = _python_port(cat, name, spec, py, model.python) or Pin(name, spec, "upstream pin", spec)
        pins.append(pin)
    depth += 1
    # 6. packages that assert the mmcv range at import
    asserting, installed = [], []
    for name in sorted(set(model.packages) | set(model.vendored)):
        facts = cat.asserts.get(name, {}).get(model.pinned(name) or "")
        if facts and mmcv_pin and V(mmcv_pin.version) > V(facts.mmcv[1]):
            if strict:
                return fail(f"{name} {facts.version} asserts mmcv <= {facts.mmcv[1]}")
            asserting.append(f"{name} {facts.version} (mmcv <= {facts.mmcv[1]})")
            if name not in model.vendored:  # a vendored copy is in the model tree; the rest is in the venv
                installed.append(name)
    if asserting:
        fixers.append(Fixer("mmcv-version-assert",
                            f"{', '.join(asserting)} assert at import; the port uses "
                            f"{mmcv_pin.name} {mmcv_pin.version}", {"mmcv": mmcv_pin.version}, tuple(installed)))
    # 7. runtime deps of what is compiled with --no-deps, then era pins for what is left open
    have = {p.name for p in pins}
    for name in compiled:
        for dep in cat.requires.get(name, ()):
            dep = dep.lower()
            if dep not in have and not (dep == "opencv-python-headless" and "opencv-python" in have):
                pins.append(Pin(dep, "", f"needed by {name} (compiled without its dependencies)", None, "era"))
                have.add(dep)
    pins = _era_pins(cat, pins, rel, model)
    # 8. base image: OS whose gcc nvcc accepts and whose C++ suits torch's headers
    cxx = max([rel.cxx] + [cat.compiled[n][p.version].cxx for n in compiled for p in pins
                           if p.name == n and n in cat.compiled and p.version in cat.compiled[n]])
    base = _base_image(cat, toolkit, py, cxx, sources)  # the standard of everything compiled
    if base is None:
        return fail(f"no nvidia/cuda:{toolkit.full} devel image has a gcc nvcc {toolkit.version} accepts "
                    f"(max gcc {toolkit.max_gcc}) for C++{cxx}")
    ubuntu, base_image, base_why = base
    # 9. the port's fixers, and the runtime environment for the card
    deviates = not upstream_torch or py != model.python or any(p.is_port for p in pins)
    fixers = _fixers(model, rel, cat.torch[model.torch], deviates) + fixers
    if strict and deviates:
        return fail("strict mode allows upstream pins only")
    runtime_env = {}
    if not card.p2p:
        runtime_env["NCCL_P2P_DISABLE"] = {
            "value": "1", "why": f"{card.name} has no peer-to-peer between GPUs; NCCL all-reduce hangs without it"}
    if runs != card.cc:
        notes.append(f"torch runs on {card.cc} through its sm_{runs.replace('.', '')} code")
    if toolkit.version != cu:
        notes.append(f"nvcc {toolkit.version} builds extensions for torch's CUDA {cu} build (same major: accepted)")

    why_py = ("upstream pin" if py == model.python else "requested with --python" if python_req
              else f"torch {rel.version} has no wheels for Python {model.python}")
    torch_source = "port" if not upstream_torch else "upstream"
    torch_why = ("upstream pin" if upstream_torch else
                 _torch_why(cat, model, card, rel, cu))
    if "torch" in overrides:
        torch_source, torch_why = "override", "set with --set"
    up_local = f"+cu{model.cuda.replace('.', '')}" if model.cuda != cat.torch[model.torch].pypi else ""
    upstream_tag = model.torch + up_local
    local = f"+{tag}" if stack.from_index else ""
    torch_compile, torch_compile_why = rel.compiles_on(py)
    return Plan(
        model=model.name, repo=model.repo, commit=model.commit,
        card=card.id, card_name=card.name, cc=card.cc,
        mode="port" if deviates else "upstream", strict=strict,
        python=Pin("python", py, why_py, model.python, "upstream" if py == model.python else "port"),
        python_source="system" if cat.ubuntu[ubuntu].python == py else "deadsnakes",
        cuda=toolkit.full,
        cuda_why=("requested with --cuda" if toolkit_req else f"the CUDA of the torch build (+{tag})"),
        base_image=base_image, base_why=base_why, os=f"ubuntu{ubuntu}",
        gcc=cat.ubuntu[ubuntu].gcc, gcc_max=toolkit.max_gcc,
        torch=Pin("torch", rel.version + local, torch_why, upstream_tag, torch_source),
        torchvision=Pin("torchvision", rel.torchvision + local, f"pairs with torch {rel.version}",
                        cat.torch[model.torch].torchvision + up_local, torch_source),
        torchaudio=Pin("torchaudio", rel.torchaudio, f"pairs with torch {rel.version}",
                       cat.torch[model.torch].torchaudio, torch_source),
        torch_cuda=cu,
        torch_index=sources.torch_index_for(rel.version, cu) if stack.from_index else None,
        packages=tuple(pins), compiled=tuple(compiled),
        arch_list=arch, arch_why=arch_why,
        extensions=tuple(ExtensionBuild(e.name, e.path, e.build, e.needs_visible_gpu) for e in model.extensions),
        fixers=tuple(fixers), runtime_env=runtime_env,
        min_driver=toolkit.min_driver, compat_driver=toolkit.compat_driver, cxx=cxx,
        train={"launcher": model.train.launcher, "entry": model.train.entry, "config": model.train.config,
               "local_rank_arg": model.train.local_rank_arg, "extra_args": list(model.train.extra_args),
               "ops_check": model.train.ops_check, "cpu_args": list(model.train.cpu_args),
               "steps_args": list(model.train.steps_args)},
        torch_compile=torch_compile, torch_compile_why=torch_compile_why,
        notes=tuple(notes), construct=model.construct.to_dict() if model.construct else None,
        source_builds=_source_builds(cat, py) if py != model.python else {},
        **_index_cutoff(model),
    )


def _index_cutoff(model: Model) -> dict:
    """What the model left unpinned resolves as of its era: its commit date plus a grace period."""
    if not model.era:
        return {"index_cutoff": None, "index_cutoff_why": "the catalog gives no era for this model: today's index"}
    day = date.fromisoformat(model.era) + timedelta(days=model.era_grace_days)
    return {"index_cutoff": day.isoformat(),
            "index_cutoff_why": f"upstream's pins date from {model.era}; unpinned and transitive packages resolve as "
                                f"of {model.era_grace_days} days later (exact pins win)"}


def _torch_why(cat, model: Model, card: Card, rel: TorchRelease, cu: str) -> str:
    up = cat.torch[model.torch]
    up_archs = cat.wheel_archs[model.cuda]
    if wheel_runs_on(up_archs, card.cc) is None:
        return (f"torch {up.version}+cu{model.cuda.replace('.', '')} has no code for {card.cc}; "
                f"{rel.version}+cu{cu.replace('.', '')} is the smallest upgrade that has")
    return f"smallest torch upgrade that satisfies every other constraint (CUDA {cu})"


def _choose_compiled(cat, name, spec, forced, rel: TorchRelease, strict, reasons) -> Pin | None:
    known = cat.compiled.get(name, {})
    upstream = spec if is_exact(spec) else None
    if forced:
        facts = known.get(forced)
        if facts and not facts.builds_with(rel.version):
            reasons.append(f"{name} {forced} (--set) builds only with torch [{facts.torch[0]}, {facts.torch[1]}): {facts.notes}")
            return None
        return Pin(name, forced, "set with --set", upstream, "override")
    if upstream is None:
        # Unpinned upstream: take the newest known release that builds with this torch.
        fits = [c for c in known.values() if c.builds_with(rel.version)]
        if not fits:
            reasons.append(f"no {name} release in the catalog builds with torch {rel.version}")
            return None
        best = max(fits, key=lambda c: V(c.version))
        return Pin(name, best.version, f"newest {name} that builds with torch {rel.version}", spec, "era")
    facts = known.get(upstream)
    if facts is None:
        reasons.append(f"no facts about {name} {upstream} in toolchains/packages.toml")
        return None
    if facts.builds_with(rel.version):
        return Pin(name, upstream, f"upstream pin; builds with torch {rel.version}", upstream)
    chain = f"{name} {upstream} builds only with torch [{facts.torch[0]}, {facts.torch[1]}): {facts.notes}"
    if strict:
        reasons.append(chain)
        return None
    later = sorted((c for c in known.values() if c.series == facts.series
                    and V(c.version) > V(upstream) and c.builds_with(rel.version)),
                   key=lambda c: V(c.version))
    if not later:
        reasons.append(f"{chain}; no later {name} of the same series builds with torch {rel.version}")
        return None
    return Pin(name, later[0].version,
               f"{name} {upstream} cannot build with torch {rel.version} ({facts.notes}); "
               f"{later[0].version} is the smallest release that can", upstream, "port")


def _flash_attn_problem(fa: FlashAttn, rel: TorchRelease, toolkit: Toolkit, card: Card, py: str) -> str | None:
    if card.cc not in fa.runtime:
        return (f"flash-attn {fa.version} runs only on compute capability "
                f"{fa.runtime[0]}-{fa.runtime[-1]}; {card.name} is {card.cc}")
    if V(rel.version) < V(fa.min_torch):
        return f"flash-attn {fa.version} needs torch >= {fa.min_torch}"
    if minor_key(toolkit.version) < minor_key(fa.min_nvcc):
        return f"flash-attn {fa.version} needs nvcc >= {fa.min_nvcc}"
    if not (minor_key(fa.python[0]) <= minor_key(py) <= minor_key(fa.python[1])):
        return f"flash-attn {fa.version} supports Python {fa.python[0]}-{fa.python[1]}"
    sass = [a for a, nvcc in fa.sass.items() if minor_key(toolkit.version) >= minor_key(nvcc)]
    if wheel_runs_on(sass, card.cc) is None:
        need = [f"sm_{a.replace('.', '')} (nvcc >= {n})" for a, n in fa.sass.items()]
        return (f"flash-attn {fa.version} compiles {', '.join(need)} and ignores TORCH_CUDA_ARCH_LIST; "
                f"with nvcc {toolkit.version} none runs on {card.cc}")
    return None


def _choose_flash_attn(cat, spec, forced, rel, toolkit, card, py, strict, reasons) -> Pin | None:
    upstream = spec if is_exact(spec) else None
    versions = sorted(cat.flash_attn, key=V)
    if forced:
        fa = cat.flash_attn.get(forced)
        problem = fa and _flash_attn_problem(fa, rel, toolkit, card, py)
        if problem:
            reasons.append(problem + " (--set)")
            return None
        return Pin("flash-attn", forced, "set with --set", upstream, "override")
    start = upstream or versions[0]
    if start not in cat.flash_attn:
        reasons.append(f"no facts about flash-attn {start} in toolchains/packages.toml")
        return None
    problem = _flash_attn_problem(cat.flash_attn[start], rel, toolkit, card, py)
    if problem is None:
        return Pin("flash-attn", start, f"upstream pin; has sm_{card.cc.replace('.', '')}-compatible kernels", upstream)
    if strict:
        reasons.append(problem)
        return None
    for v in versions:
        if V(v) > V(start) and _flash_attn_problem(cat.flash_attn[v], rel, toolkit, card, py) is None:
            return Pin("flash-attn", v, f"{problem}; {v} is the smallest release that works", upstream, "port")
    reasons.append(f"{problem}; no flash-attn 2.x release in the catalog fixes it")
    return None


def _choose_spconv(cat, name, spec, cu, strict, reasons) -> Pin | None:
    have = SPCONV_RE.match(name).group(1)
    have_cu = f"{have[:-1]}.{have[-1]}"
    version = "" if spec == "*" else spec
    if V(have_cu).major == V(cu).major:
        return Pin(name, version, f"{name} bundles its CUDA {have_cu} runtime; same major as torch's {cu}", spec)
    if strict:
        reasons.append(f"{name} is a CUDA {have_cu} build; torch uses CUDA {cu}")
        return None
    same = [b for b in cat.spconv_builds if V(b).major == V(cu).major and minor_key(b) <= minor_key(cu)]
    if not same:
        reasons.append(f"no spconv build for CUDA {V(cu).major}.x at or below {cu}")
        return None
    best = max(same, key=minor_key)
    new = "spconv-cu" + best.replace(".", "")
    return Pin(new, version, f"{name} is a CUDA {have_cu} build; torch uses CUDA {cu}", f"{name} {spec}", "port")


def _python_port(cat: Catalog, name: str, spec: str, py: str, upstream_py: str, upstream: str | None = None
                 ) -> Pin | None:
    """A pin that no release for this Python satisfies, moved to the first release that runs on
    it (the catalog's python_floor); None when the pin stands."""
    floor = cat.python_floor(name, py)
    if floor is None or py == upstream_py:
        return None
    if is_exact(spec):
        if V(spec) >= V(floor):
            return None
        return Pin(name, floor, f"{name} {spec} does not run on Python {py}; {floor} is the first release that does",
                   upstream or spec, "port")
    allowed = SpecifierSet(spec)
    caps = [s for s in allowed if s.operator in ("<", "<=", "==", "~=", "===")]
    if allowed.contains(floor, prereleases=True) or not any(V(s.version.rstrip(".*")) < V(floor) for s in caps):
        return None
    return Pin(name, f">={floor}", f"every release {spec} allows predates Python {py}; {floor} is the first that "
               f"runs on it", upstream or spec, "port")


def _source_builds(cat: Catalog, py: str) -> dict:
    out = {}
    for name, sb in sorted(cat.source_builds.items()):
        floor = cat.python_floor(name, py)
        if floor:
            out[name] = {"below": floor, "build_apt": list(sb.build_apt), "runtime_apt": list(sb.runtime_apt),
                         "build_env": dict(sb.build_env), "build_files": list(sb.build_files)}
    return out


def _era_pins(cat: Catalog, pins: list[Pin], rel: TorchRelease, model: Model) -> list[Pin]:
    by_name = {p.name: p for p in pins}
    for era in cat.era:
        if era.torch_max and V(rel.version) >= V(era.torch_max):
            continue
        if era.when_package and era.when_package not in by_name:
            continue
        if era.replaces and era.replaces in by_name:
            old = by_name.pop(era.replaces)
            version = old.version or era.spec
            by_name[era.name] = Pin(era.name, version, f"replaces {old.name}: {era.why}",
                                    old.requirement, "era")
            continue
        current = by_name.get(era.name)
        if current is None and not era.always:
            continue
        if current is None or not current.version:
            by_name[era.name] = Pin(era.name, era.spec, era.why, current.upstream if current else None, "era")
    return sorted(by_name.values(), key=lambda p: p.name)


def _fixers(model: Model, rel: TorchRelease, upstream: TorchRelease, deviates: bool) -> list[Fixer]:
    """Source fixers the build must run, each with its reason."""
    out = []
    has_ops = bool(model.extensions)
    if any(e.needs_visible_gpu for e in model.extensions):
        out.append(Fixer("setup-without-gpu", "an extension's setup.py refuses to build without a visible GPU; "
                         "image builds have none"))
    if not deviates:
        return out
    t, up = V(rel.version), V(upstream.version)
    if has_ops and up < V("1.11") <= t:
        out.append(Fixer("thc-to-aten", f"THC was removed in torch 1.11; upstream targets {upstream.version}"))
    if has_ops and rel.cxx > upstream.cxx:
        out.append(Fixer("cxx-standard", f"torch {rel.version} headers need C++{rel.cxx}; setup.py asks for C++{upstream.cxx}",
                         {"std": f"c++{rel.cxx}"}))
    if model.train.local_rank_arg == "--local_rank" and model.train.launcher == "torch.distributed.launch" \
            and up < V("2.0") <= t:
        out.append(Fixer("local-rank", "torch >= 2.0 launch passes --local-rank; the train script accepts only --local_rank"))
    if "numba" in model.packages:
        out.append(Fixer("numba-errors", "numba >= 0.49 moved numba.errors to numba.core.errors; "
                         "the port's dependencies may bring a newer numba"))
    return out


def _base_image(cat: Catalog, toolkit: Toolkit, python: str, cxx: int, sources: Sources):
    # gcc >= 9 for C++17; a distro whose python is the Plan's saves building Python.
    fits = [u for u in toolkit.ubuntu if cat.ubuntu[u].gcc <= toolkit.max_gcc
            and (cxx < 17 or cat.ubuntu[u].gcc >= 9)]
    if not fits:
        return None
    native = [u for u in fits if cat.ubuntu[u].python == python]
    ubuntu = max(native or fits, key=minor_key)
    tag = f"{sources.registry_mirror}nvidia/cuda:{toolkit.full}-{toolkit.cudnn}-devel-ubuntu{ubuntu}"
    u = cat.ubuntu[ubuntu]
    why = (f"CUDA {toolkit.full} devel; ubuntu {ubuntu} has gcc {u.gcc} (nvcc {toolkit.version} accepts <= "
           f"{toolkit.max_gcc})" + (f" and Python {python}" if native else f"; Python {python} from deadsnakes"))
    return ubuntu, tag, why


def _blockers(cat: Catalog, model: Model, card: Card, sources: Sources) -> list[str]:
    """Upstream pins that would still block once torch were upgraded to run on the card."""
    first = None
    for version in cat.torch_versions():
        rel = cat.torch[version]
        if V(version) <= V(model.torch):
            continue
        cus = list(rel.index if sources.torch_index else ()) + [rel.pypi]
        if any(wheel_runs_on(cat.wheel_archs[cu], card.cc) for cu in cus):
            first = rel
            break
    if first is None:
        return []
    out = [f"the first torch with code for {card.cc} is {first.version}"]
    for name, spec in model.packages.items():
        facts = cat.compiled.get(name, {}).get(spec)
        if facts and not facts.builds_with(first.version):
            out.append(f"{name} {spec} caps torch below {facts.torch[1]} ({facts.notes})")
    return out if len(out) > 1 else []


def _conflict(cat, model, card, cuda, python, strict, overrides, sources, attempts) -> Conflict:
    target = f"{model.name} on {card.name} ({card.cc})" + (f" with CUDA {cuda}" if cuda else "")
    if not attempts:
        return Conflict(f"{target}: no candidate stack", [])
    first = attempts[0]
    chain = [f"upstream {first.label}: {r}" for r in first.reasons]
    if strict:
        chain += _blockers(cat, model, card, sources)
        try:
            port = resolve(cat, model.name, card.id, cuda, python, False, overrides, sources)
            hint = "a port would change: " + ("; ".join(port.deviations) or "nothing") + \
                (f"; fixers: {', '.join(f.name for f in port.fixers)}" if port.fixers else "")
        except Conflict as exc:
            hint = "a port cannot run it either: " + exc.chain[-1]
        return Conflict(f"{target} is impossible with upstream pins: " + "; ".join(first.reasons), chain, hint)
    best = max(attempts, key=lambda a: a.depth)
    if best is not first:
        chain.append(f"closest port {best.label}: {'; '.join(best.reasons)}")
    return Conflict(f"{target} is impossible: {best.reasons[-1]}", chain,
                    f"tried {len(attempts)} stacks from torch {model.torch} upward")


@dataclass(frozen=True)
class Cell:
    model: str
    card: str
    status: str  # upstream | port | impossible
    summary: str  # main upgrades, or the one-line reason


def grid(cat: Catalog, models=None, cards=None, sources: Sources | None = None, cuda: str | None = None) -> list[Cell]:
    """models x cards: what runs as upstream, what needs a port, what cannot run."""
    models = [cat.model(m).name for m in models] if models else sorted(cat.models)
    cards = [cat.card(c).id for c in cards] if cards else list(cat.cards)
    cells = []
    for m in models:
        for c in cards:
            try:
                plan = resolve(cat, m, c, cuda=cuda, sources=sources)
            except Conflict as exc:
                reason = exc.message.split(" is impossible: ", 1)[-1].split("; ")[0]
                cells.append(Cell(m, c, "impossible", reason))
                continue
            main = [f"{p.name} {p.version}" for p in plan.pins if p.deviation and p.name not in ("torchvision", "torchaudio")]
            cells.append(Cell(m, c, plan.mode, ", ".join(main)))
    return cells
