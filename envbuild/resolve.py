"""Resolve stage: (model, card, cuda?, python?, overrides, strict/port) -> Plan.

A pure function: no network, no Docker. Every pin carries why it was chosen, and
every deviation from upstream is marked. Binary compatibility follows
research/compat: a cubin for X.y runs on X.z only when z >= y; PTX JIT-compiles
forward; no 8.x cubin runs on 9.x.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from datetime import date, timedelta

from packaging.specifiers import SpecifierSet

from . import packages
from .catalog import PKG_RE, V, Card, Catalog, Model, TorchRelease, Toolkit, is_exact, minor_key, requirement_parts
from .config import Sources
from .errors import BadInput, unknown
from .incontainer.archrules import code_name, extension_arch, runs_on, union_arch_list
from .plan import Fixer, Pin, Plan

PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12")


class Conflict(BadInput):
    """No stack satisfies the request; `chain` holds the constraints that failed."""

    def __init__(self, message: str, chain: list[str], hint: str = "", reason: str = ""):
        super().__init__(message, hint)
        self.chain = chain
        self.reason = reason or message  # the one constraint that decided it, for one-line summaries


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
        elif block := packages.block_for(cat, name):
            block.check_override(cat, name, version)


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
            sources: Sources | None = None, cards_why: str = "", trim_kernels: bool = False) -> Plan:
    """The Plan for one card, for several (`a800,h20`: one stack that runs on each), or, with no
    card, a portable one: the stack that runs on the most catalog cards, for all of them.
    trim_kernels: compiled packages build only the kernels the model calls (where the catalog says)."""
    model = cat.model(model_name)
    plan = _resolve(cat, model, card_name, cuda, python, strict, overrides, sources, cards_why)
    return _trimmed(cat, model, plan) if trim_kernels else plan


def _trimmed(cat: Catalog, model: Model, plan: Plan) -> Plan:
    """--trim-kernels: each compiled package whose block can leave out kernels the model never
    calls gets the fixer that does, after any porting fixers; nothing to trim is a mistake said."""
    native, trimmed = dict(plan.native_packages), []
    for name in plan.compiled:
        block, pin = packages.block_for(cat, name), plan.pin(name)
        fixers = block.trim_fixers(cat, pin, model) if block and pin and name in native else []
        if fixers and (native[name].get("build") or {}).get("from") != "vendor":
            native[name] = {**native[name], "sdist_fixers": list(native[name].get("sdist_fixers", ())) + fixers}
            trimmed.append(name)
    if not trimmed:
        raise BadInput(f"--trim-kernels: nothing to trim in {model.name}'s Plan: only flash-attn's kernels can be, where "
                       "the Plan compiles it and the model's catalog entry names its head dims ([flash_attn] head_dims)",
                       "drop --trim-kernels, or add [flash_attn] to the model's entry (envbuild catalog schema)")
    return replace(plan, native_packages=native)


def _resolve(cat, model, card_name, cuda, python, strict, overrides, sources, cards_why) -> Plan:
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
    if first.torch.source == "port" and first.torch.why == UPGRADE_WHY:
        # upstream's torch runs on the first card: name the cards whose constraint moved it
        forced: dict[str, list[str]] = {}  # reason -> the cards it stops
        for cid, p in plans.items():
            if p.torch.why != UPGRADE_WHY:
                forced.setdefault(p.torch.why, []).append(cid)
        if forced:
            why = "one torch for every card; " + "; ".join(f"{', '.join(ids)}: {r}" for r, ids in forced.items())
            first = replace(first, torch=replace(first.torch, why=why))
    # Only what every card of the image needs is baked into it: a setting some of its cards need
    # and others not (P2P off for an RTX 4090, not for an NVLink H100) depends on the host the
    # image runs on, and the image's launcher decides it there (host_env).
    runtime_env: dict = {}
    for name, item in plans[cards[0].id].runtime_env.items():
        if all(plans[c.id].runtime_env.get(name, {}).get("value") == item["value"] for c in cards):
            whys = dict.fromkeys(plans[c.id].runtime_env[name]["why"] for c in cards)
            runtime_env[name] = {"value": item["value"], "why": "; ".join(whys)}
    notes = tuple(dict.fromkeys(n for p in plans.values() for n in p.notes))
    arch_list = union_arch_list([plans[c.id].arch_list for c in cards], ptx_for_newest=portable)
    arch_why = "; ".join(f"{c.id}: {plans[c.id].arch_why}" for c in cards)
    if portable:
        arch_why += "; PTX of the newest arch so later cards can JIT-compile it"
    mode = "port" if any(p.mode == "port" for p in plans.values()) or any(p.is_port for p in pins) else "upstream"
    ids = tuple(c.id for c in cards)
    return replace(first, card=PORTABLE if portable else "+".join(ids), cards=ids,
                   native_packages=_merged_native(plans),
                   card_name=(f"{len(cards)} cards (portable)" if portable else " + ".join(c.name for c in cards)),
                   cc=",".join(c.cc for c in cards), mode=mode, packages=pins, arch_list=arch_list,
                   arch_why=arch_why, runtime_env=runtime_env, host_env=host_env(cat, runtime_env), notes=notes)


def _merged_native(plans: dict) -> dict:
    """A vendor wheel serves a multi-card image only when it serves every card; else it compiles."""
    merged = {name: dict(info) for name, info in next(iter(plans.values())).native_packages.items()}
    for name, info in merged.items():
        builds = {cid: p.native_packages[name].get("build") for cid, p in plans.items() if name in p.native_packages}
        source = next(((cid, b) for cid, b in builds.items() if b and b["from"] == "source"), None)
        if source and info.get("build", {}).get("from") == "vendor":
            info["build"] = {"from": "source", "why": f"{source[0]}: {source[1]['why']}"}
    return merged


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


@dataclass
class _Candidate:
    """One (Python, torch build) stack on one card, filled in gate by gate."""
    cat: Catalog
    model: Model
    card: Card
    stack: _Stack
    toolkit_req: Toolkit | None
    strict: bool
    overrides: dict
    sources: Sources
    python_req: str | None
    toolkit: Toolkit | None = None
    runs: str | None = None  # the torch wheel's arch whose code runs on the card
    arch: str = ""  # TORCH_CUDA_ARCH_LIST for extensions
    arch_why: str = ""
    pins: list = field(default_factory=list)
    blocks: dict = field(default_factory=dict)  # pin name -> its building block (native code)
    origins: dict = field(default_factory=dict)  # compiled pin name -> where its wheel comes from (Block.origin)
    fixers: list = field(default_factory=list)
    cxx: int = 0
    base: tuple = ()  # (ubuntu, image, why)
    deviates: bool = False
    runtime_env: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def tag(self) -> str:
        return "cu" + self.stack.cuda.replace(".", "")

    @property
    def label(self) -> str:
        return f"python {self.stack.python}, torch {self.stack.torch.version}+{self.tag}"

    @property
    def upstream_torch(self) -> bool:
        return V(self.stack.torch.version) == V(self.model.torch) and self.stack.cuda == self.model.cuda

    @property
    def compiled(self) -> list[str]:
        return [name for name, block in self.blocks.items() if block.compiled]


# Each gate answers one compatibility question for a candidate: None when it holds (filling in
# what it found), else the reason. A failing gate's index is how far the candidate got.


def _torch_wheel_exists(c: _Candidate) -> str | None:
    rel, py = c.stack.torch, c.stack.python
    if not rel.supports_python(py):
        return f"torch {rel.version} has wheels for Python {rel.python[0]}-{rel.python[1]}, not {py}"
    if c.stack.from_index and c.sources.torch_index is None:
        return (f"torch {rel.version}+{c.tag} is only on the PyTorch index; PyPI carries its "
                f"CUDA {rel.pypi} build (configure torch_index to use it)")
    return None


def _toolkit_matches(c: _Candidate) -> str | None:
    """A CUDA toolkit (nvcc, devel image) whose major matches the torch build."""
    cu = c.stack.cuda
    c.toolkit = c.toolkit_req or c.cat.toolkits.get(cu)
    if c.toolkit is None:
        return f"no nvidia/cuda devel image survives for CUDA {cu} (EOL tags are deleted)"
    if V(c.toolkit.version).major != V(cu).major:
        return (f"torch {c.stack.torch.version}+{c.tag} needs nvcc {V(cu).major}.x to build extensions; "
                f"CUDA {c.toolkit.version} was requested")
    return None


def _card_runs_torch(c: _Candidate) -> str | None:
    archs, ptx = c.cat.wheel_code(c.stack.torch, c.stack.cuda)
    c.runs = runs_on(archs, c.card.cc, ptx)
    if c.runs is None:
        return (f"torch {c.stack.torch.version}+{c.tag} ships SASS for {', '.join(archs)} and "
                f"{'PTX for ' + ', '.join(ptx) if ptx else 'no PTX'}: "
                f"none runs on {c.card.name} (compute capability {c.card.cc})")
    return None


def _extensions_compile_for_card(c: _Candidate) -> str | None:
    c.arch, c.arch_why = extension_arch(c.card.cc, c.toolkit.archs, c.stack.torch.ext_max_arch)
    return None if c.arch else f"CUDA {c.toolkit.version}: {c.arch_why}"


def _model_pins(c: _Candidate) -> str | None:
    """Every package the model pins: native ones by their building block, the rest as pinned
    (or corrected, or moved to a release that runs on this Python)."""
    model, py = c.model, c.stack.python
    target = packages.Target(c.cat, c.stack.torch, c.stack.cuda, c.toolkit, c.card, py, c.strict,
                             c.sources.vendor_wheels)
    # what a package from git needs at run time (it is installed with --no-deps): unpinned, the lock decides
    required, ranges = {}, {}
    for g in model.git_packages.values():
        for name, spec in map(requirement_parts, g.requires):
            if name not in model.packages and name not in model.git_packages:
                required.setdefault(name, []).append(g.name)
                if spec != "*":
                    ranges[name] = ",".join(filter(None, (ranges.get(name, ""), spec)))
    wanted = {**model.packages, **{name: ranges.get(name, "*") for name in required}}
    for name, spec in wanted.items():
        forced = c.overrides.get(name)
        block = packages.block_for(c.cat, name)
        if block:
            pin = block.choose(target, name, spec, forced)
            if isinstance(pin, str):
                return pin
            c.blocks[pin.name] = block
            if block.compiled:
                c.origins[pin.name] = block.origin(target, pin)
        elif forced:
            pin = Pin(name, forced, "set with --set", spec, "override")
        elif spec == "*":
            pin = Pin(name, "", (f"required by {', '.join(required[name])} (from git, installed without its dependencies); "
                                 "the lock picks a version") if name in required else
                      "unpinned upstream; the lock picks a version", spec)
        elif name in model.corrections:
            fixed, why = model.corrections[name]
            pin = (_python_port(c.cat, name, fixed, py, model.python, upstream=spec)
                   or Pin(name, fixed, f"catalog correction: {why}", spec, "fix"))
        elif name in required:
            pin = _python_port(c.cat, name, spec, py, model.python) or \
                Pin(name, spec, f"required by {', '.join(required[name])} (from git, installed without its "
                                "dependencies): its own range", spec)
        else:
            pin = _python_port(c.cat, name, spec, py, model.python) or Pin(name, spec, "upstream pin", spec)
        c.pins.append(pin)
    return None


def _mmcv_asserts(c: _Candidate) -> str | None:
    """Packages that assert the mmcv range at import: a fixer for a port, a failure when strict."""
    mmcv = packages.by_family("mmcv")
    mmcv_pin = next((p for p in c.pins if c.blocks.get(p.name) is mmcv), None)
    asserting, installed = [], []
    for name in sorted(set(c.model.packages) | set(c.model.vendored)):
        facts = c.cat.assert_facts(name, c.model.pinned(name))
        if not (facts and mmcv_pin and V(mmcv_pin.version) > V(facts.mmcv[1])):
            continue
        if c.strict:
            return f"{name} {facts.version} asserts mmcv <= {facts.mmcv[1]}"
        asserting.append(f"{name} {facts.version} (mmcv <= {facts.mmcv[1]})")
        if name not in c.model.vendored:  # a vendored copy is in the model tree; the rest is in the venv
            installed.append(name)
    if asserting:
        c.fixers.append(Fixer("mmcv-version-assert", f"{', '.join(asserting)} assert at import; the port uses "
                              f"{mmcv_pin.name} {mmcv_pin.version}", {"mmcv": mmcv_pin.version}, tuple(installed)))
    c.fixers += _mmcv_layer_clash(c, mmcv_pin)
    return None


def _mmcv_layer_clash(c: _Candidate, mmcv_pin: Pin | None) -> list[Fixer]:
    """Packages that register layers the port's mmcv-full registers too: their registration forced."""
    clashing, installed = [], []
    for name in sorted(set(c.model.packages) | set(c.model.vendored)):
        facts = c.cat.assert_facts(name, c.model.pinned(name))
        since = facts and facts.layers_clash_from
        if since and mmcv_pin and V(mmcv_pin.version) >= V(since):
            clashing.append(f"{name} {facts.version}")
            if name not in c.model.vendored:
                installed.append(name)
    if not clashing:
        return []
    return [Fixer("mmcv-layer-clash", f"{mmcv_pin.name} {mmcv_pin.version} registers the sparse conv layers "
                  f"{', '.join(clashing)} registers too (KeyError at import); theirs are registered with force=True",
                  {}, tuple(installed))]


def _collections_abc(c: _Candidate) -> str | None:
    """Pinned packages that take the container ABCs from collections, which Python 3.10 removed:
    their code is fixed in the venv (the pin stays: the catalog says why it may matter)."""
    py = c.stack.python
    if V(py) < V("3.10"):
        return None
    fixed_in = c.cat.collections_abc
    # an exact pin below the release that stopped, or a range the lock may fill with one
    old = [p for p in c.pins if p.name.lower() in fixed_in
           and (not is_exact(p.version) or V(p.version) < V(fixed_in[p.name.lower()]))]
    if old and c.strict:
        return f"{old[0].name} {old[0].version} imports ABCs from collections, which Python {py} removed"
    if old:
        named = ", ".join(f"{p.name} {p.version or '(unpinned)'}" for p in old)
        c.fixers.append(Fixer("collections-abc", f"{named} import(s) Iterable/Mapping from collections, which "
                              f"Python {py} no longer has", {}, tuple(p.name for p in old)))
    return None


def _mmcv_parallel(c: _Candidate) -> str | None:
    """torch 2.1 changed the nn.parallel internals mmcv-full 1.x's MMDataParallel and
    MMDistributedDataParallel call: a port from an older torch gets them fixed in the venv."""
    if not (V(c.model.torch) < V("2.1") <= V(c.stack.torch.version)):
        return None
    pin = next((p for p in c.pins if p.name.lower() == "mmcv-full"), None)
    if pin is not None:
        c.fixers.append(Fixer("mmcv-parallel", f"torch >= 2.1 changed the nn.parallel internals mmcv-full "
                              f"{pin.version}'s data-parallel wrappers call, which upstream's torch {c.model.torch} "
                              f"still had: AttributeError at the first training step on {c.stack.torch.version}",
                              {}, (pin.name,)))
    return None


def _package_api_ports(c: _Candidate) -> str | None:
    """A compiled package ported past an API change of the upstream pin: the model's own code
    gets the fixers its building block names (flash-attn 2.7's unpad_input)."""
    for pin in c.pins:
        block = c.blocks.get(pin.name)
        for name, why in block.model_fixers(pin) if block else ():
            c.fixers.append(Fixer(name, why))
    return None


def _torch_load(c: _Candidate) -> str | None:
    """torch 2.6 made torch.load default to weights_only=True: a port from an older torch passes
    weights_only=False where the model's code and its checkpoint-loading packages call it."""
    if not (V(c.model.torch) < V("2.6") <= V(c.stack.torch.version)):
        return None
    loaders = tuple(p.name for p in c.pins if p.name.lower() in c.cat.torch_load)
    c.fixers.append(Fixer("torch-load-weights-only", f"torch {c.stack.torch.version} loads checkpoints with "
                          f"weights_only=True (since 2.6); upstream's torch {c.model.torch} loaded anything",
                          {}, loaders))
    return None


def _compiled_deps_and_era(c: _Candidate) -> str | None:
    """Runtime deps of what is compiled with --no-deps, then era pins for what is left open."""
    have = {p.name for p in c.pins}
    for name in c.compiled:
        for dep in c.cat.requires.get(name, ()):
            dep = dep.lower()
            if dep not in have and not (dep == "opencv-python-headless" and "opencv-python" in have):
                c.pins.append(Pin(dep, "", f"needed by {name} (compiled without its dependencies)", None, "era"))
                have.add(dep)
    c.pins = _era_pins(c.cat, c.pins, c.stack.torch, c.model)
    return None


def _base_image_fits(c: _Candidate) -> str | None:
    """An OS whose gcc nvcc accepts, for the C++ standard of everything compiled."""
    c.cxx = max([c.stack.torch.cxx] + [c.blocks[p.name].cxx(c.cat, p) for p in c.pins if p.name in c.blocks])
    c.base = _base_image(c.cat, c.toolkit, c.stack.python, c.cxx, c.sources)
    if c.base is None:
        return (f"no nvidia/cuda:{c.toolkit.full} devel image has a gcc nvcc {c.toolkit.version} accepts "
                f"(max gcc {c.toolkit.max_gcc}) for C++{c.cxx}")
    return None


def _port_allowed(c: _Candidate) -> str | None:
    """The port's fixers; strict mode takes upstream pins only."""
    rel, model = c.stack.torch, c.model
    c.deviates = not c.upstream_torch or c.stack.python != model.python or any(p.is_port for p in c.pins)
    c.fixers = _fixers(model, rel, c.cat.torch[model.torch], c.deviates) + c.fixers
    return "strict mode allows upstream pins only" if c.strict and c.deviates else None


def _runtime_env(c: _Candidate) -> str | None:
    """What the card needs at run time, and notes on how the stack reaches it.

    An image for one card that has no P2P keeps NCCL_P2P_DISABLE=1 as an ENV: every host it runs
    on has that card, and the ENV holds where the launcher is bypassed (a Kubernetes `command:`,
    `apptainer exec`, `docker run --entrypoint`). Images for several cards bake it only when every
    card lacks P2P (_merge); otherwise the launcher decides it on the host (host_env)."""
    if not c.card.p2p:
        c.runtime_env["NCCL_P2P_DISABLE"] = {
            "value": "1", "why": f"{c.card.name} has no peer-to-peer between GPUs; NCCL all-reduce hangs without it"}
    if c.runs != c.card.cc:
        c.notes.append(f"torch runs on {c.card.cc} through its {code_name(c.runs)} code")
    if c.toolkit.version != c.stack.cuda:
        c.notes.append(f"nvcc {c.toolkit.version} builds extensions for torch's CUDA {c.stack.cuda} build "
                       f"(same major: accepted)")
    return None


# The settings that depend on the host an image runs on, not on the image: the rule the image's
# launcher (incontainer/launch.py) applies at start, and which environment variables, set by the
# user, mean the user decided already.
HOST_RULES = {
    "NCCL_P2P_DISABLE": {
        "value": "1", "rule": "no-p2p", "respects": ["NCCL_P2P_DISABLE", "NCCL_P2P_LEVEL"],
        "why": "whether GPUs reach each other peer-to-peer is a property of the host (NVLink, PCIe switches, "
               "ACS, VMs): the launcher reads nvidia-smi topo at start and turns P2P off only where a pair of "
               "GPUs cannot do it or a card has none"},
}


def host_env(cat: Catalog, runtime_env: dict) -> dict:
    """What the image's launcher decides on the host, for the settings the image does not bake.
    The cards the catalog marks without P2P are all of them, not only the image's own: an image
    may run on a host whose cards it was not built for, and the names cost nothing."""
    from .host import name_tokens
    no_p2p = [{"id": card.id, "name": card.name, "match": name_tokens(card)}
              for card in sorted(cat.cards.values(), key=lambda card: card.id) if not card.p2p]
    out = {}
    for name, rule in HOST_RULES.items():
        if name not in runtime_env:
            out[name] = {**rule, "respects": list(rule["respects"]), "cards": no_p2p}
    return out


GATES = (_torch_wheel_exists, _toolkit_matches, _card_runs_torch, _extensions_compile_for_card, _model_pins,
         _mmcv_asserts, _collections_abc, _compiled_deps_and_era, _torch_load, _mmcv_parallel, _package_api_ports, _base_image_fits, _port_allowed, _runtime_env)


def _try(cat: Catalog, model: Model, card: Card, stack: _Stack, toolkit_req: Toolkit | None,
         strict: bool, overrides: dict, sources: Sources, python_req: str | None = None):
    """The Plan for one stack on one card, or the _Attempt that says which gate stopped it."""
    c = _Candidate(cat, model, card, stack, toolkit_req, strict, overrides, sources, python_req)
    for depth, gate in enumerate(GATES):
        reason = gate(c)
        if reason:
            return _Attempt(c.label, [reason], depth)
    return _assemble(c)


def _assemble(c: _Candidate) -> Plan:
    """The Plan, from a candidate every gate passed: the one place a Plan is made."""
    model, rel, py, toolkit = c.model, c.stack.torch, c.stack.python, c.toolkit
    pins = {p.name: p for p in c.pins}
    ubuntu, base_image, base_why = c.base
    why_py = ("upstream pin" if py == model.python else "requested with --python" if c.python_req
              else f"torch {rel.version} has no wheels for Python {model.python}")
    torch_compile, torch_compile_why = rel.compiles_on(py)
    return Plan(
        model=model.name, repo=model.repo, commit=model.commit,
        card=c.card.id, card_name=c.card.name, cc=c.card.cc,
        mode="port" if c.deviates else "upstream", strict=c.strict,
        python=Pin("python", py, why_py, model.python, "upstream" if py == model.python else "port"),
        python_source="system" if c.cat.ubuntu[ubuntu].python == py else "deadsnakes",
        cuda=toolkit.full,
        cuda_why=("requested with --cuda" if c.toolkit_req else f"the CUDA of the torch build (+{c.tag})"),
        base_image=base_image, base_why=base_why, os=f"ubuntu{ubuntu}",
        gcc=c.cat.ubuntu[ubuntu].gcc, gcc_max=toolkit.max_gcc,
        **_torch_pins(c),
        torch_cuda=c.stack.cuda,
        torch_index=c.sources.torch_index_for(rel.version, c.stack.cuda) if c.stack.from_index else None,
        packages=tuple(c.pins), compiled=tuple(c.compiled),
        arch_list=c.arch, arch_why=c.arch_why,
        extensions=model.extensions,
        fixers=tuple(c.fixers), runtime_env=c.runtime_env, host_env=host_env(c.cat, c.runtime_env),
        min_driver=toolkit.min_driver, compat_driver=toolkit.compat_driver, cxx=c.cxx,
        train={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.train).items()},
        torch_compile=torch_compile, torch_compile_why=torch_compile_why,
        notes=tuple(c.notes), construct=model.construct.to_dict() if model.construct else None,
        source_builds=_source_builds(c.cat, py) if py != model.python else {},
        runtime_apt={name: list(apt) for name, apt in sorted(c.cat.runtime_apt.items())},
        native_packages={name: {"family": block.family, **block.in_image(name),
                                **({"build": c.origins[name]} if name in c.origins else {}),
                                **({"sdist_fixers": fx} if (fx := block.sdist_fixers(c.cat, pins[name], rel.version)) else {})}
                         for name, block in c.blocks.items()},
        stdlib_modules=dict(model.stdlib_modules),
        git_packages={name: {"url": g.url, "commit": g.commit, "subdirectory": g.subdirectory, "build": g.build,
                             "requires": list(g.requires)} for name, g in sorted(model.git_packages.items())},
        **_index_cutoff(model, rel),
    )


def _torch_pins(c: _Candidate) -> dict:
    """torch and its companions, as upstream pinned them or as the port moves them."""
    model, rel, cat = c.model, c.stack.torch, c.cat
    source, why = ("upstream", "upstream pin") if c.upstream_torch else ("port", _torch_why(c))
    if "torch" in c.overrides:
        source, why = "override", "set with --set"
    up_local = f"+cu{model.cuda.replace('.', '')}" if model.cuda != cat.torch[model.torch].pypi else ""
    local = f"+{c.tag}" if c.stack.from_index else ""
    upstream = cat.torch[model.torch]
    return {
        "torch": Pin("torch", rel.version + local, why, model.torch + up_local, source),
        "torchvision": Pin("torchvision", rel.torchvision + local, f"pairs with torch {rel.version}",
                           upstream.torchvision + up_local, source),
        "torchaudio": Pin("torchaudio", rel.torchaudio,
                          f"pairs with torch {rel.version}" if rel.torchaudio else
                          f"no torchaudio release pairs with torch {rel.version}: not installed",
                          upstream.torchaudio, source),
    }


def _index_cutoff(model: Model, rel) -> dict:
    """What the model left unpinned resolves as of its era: its commit date plus a grace period;
    never before the Plan's torch came out (a port's torch needs what was current then)."""
    if not model.era:
        return {"index_cutoff": None, "index_cutoff_why": "the catalog gives no era for this model: today's index"}
    day = date.fromisoformat(model.era) + timedelta(days=model.era_grace_days)
    if rel.released and date.fromisoformat(rel.released) > date.fromisoformat(model.era):
        day = date.fromisoformat(rel.released) + timedelta(days=model.era_grace_days)
        return {"index_cutoff": day.isoformat(),
                "index_cutoff_why": f"upstream's pins date from {model.era}, but the port's torch {rel.version} came "
                                    f"out on {rel.released}: unpinned and transitive packages resolve as of "
                                    f"{model.era_grace_days} days after that (exact pins win)"}
    return {"index_cutoff": day.isoformat(),
            "index_cutoff_why": f"upstream's pins date from {model.era}; unpinned and transitive packages resolve as "
                                f"of {model.era_grace_days} days later (exact pins win)"}


UPGRADE_WHY = "smallest torch upgrade that satisfies every other constraint"


def _torch_why(c: _Candidate) -> str:
    """Why the Plan's torch is not upstream's: the constraint that stopped upstream's torch for
    this card, Python and request (not the CUDA of the build that was chosen instead)."""
    model, rel, cu = c.model, c.stack.torch, c.stack.cuda
    sass, ptx = c.cat.wheel_code(c.cat.torch[model.torch], model.cuda)
    if runs_on(sass, c.card.cc, ptx) is None:
        asked = f" built with the requested CUDA {c.toolkit_req.version}" if c.toolkit_req else ""
        return (f"torch {model.torch}+cu{model.cuda.replace('.', '')} has no code for {c.card.cc}; "
                f"{rel.version}+cu{cu.replace('.', '')} is the smallest upgrade{asked} that has")
    stopped = _upstream_stopped(c)
    if stopped is None:  # upstream's torch would do on this card: another card of the image needs more
        return UPGRADE_WHY
    build, reason = stopped
    if V(rel.version) == V(model.torch):
        return f"upstream's build {model.torch}+cu{build.replace('.', '')} cannot be used: {reason}"
    return f"smallest torch upgrade: upstream's {model.torch}+cu{build.replace('.', '')} cannot be used: {reason}"


def _upstream_stopped(c: _Candidate) -> tuple[str, str] | None:
    """(CUDA build, reason) of the gate that stops upstream's torch for this candidate's card,
    Python and request: upstream's own CUDA build when the Plan keeps its version, else the build
    that got furthest; None when one of them passes every gate."""
    up = c.cat.torch[c.model.torch]
    builds = {cu: True for cu in up.index}
    builds[up.pypi] = False
    if V(c.stack.torch.version) == V(up.version):  # same release, another build: why not upstream's own
        builds = {cu: f for cu, f in builds.items() if cu == c.model.cuda} or builds
    found = []
    for cu, from_index in builds.items():
        trial = _Candidate(c.cat, c.model, c.card, _Stack(c.stack.python, up, cu, from_index), c.toolkit_req,
                           c.strict, c.overrides, c.sources, c.python_req)
        for depth, gate in enumerate(GATES):  # the gates only: nothing assembled, no recursion
            reason = gate(trial)
            if reason:
                found.append((depth, cu == c.model.cuda, cu, reason))
                break
        else:
            return None
    if not found:
        return None
    _, _, cu, reason = max(found)
    return cu, reason


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
    cutoff = _index_cutoff(model, rel)["index_cutoff"]  # None: today's index, which sees every release
    for era in cat.era:
        if era.torch_max and V(rel.version) >= V(era.torch_max):
            continue
        if era.from_date and cutoff and cutoff < era.from_date:
            continue
        if era.when_package and era.when_package not in by_name:
            continue
        if era.when_version:  # only an exact pin inside the range is known to need it (a spec: the lock decides)
            pinned = by_name[era.when_package].version
            if not (is_exact(pinned) and SpecifierSet(era.when_version).contains(pinned, prereleases=True)):
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


# The Plans each fixer is part of (the gates and _fixers below decide it): `fix --list` without a
# plan.json checks every fixer on a tree and says which Plans would apply what it found.
FIXER_WHEN = {
    "setup-without-gpu": "only Plans of a model whose catalog entry says an extension's setup.py refuses to build "
                         "without a visible GPU",
    "thc-to-aten": "only a port from torch < 1.11 to >= 1.11 of a model with CUDA extensions",
    "cxx-standard": "only a port whose torch headers need a newer C++ standard than upstream's",
    "local-rank": "only a port from torch < 2.0 to >= 2.0 of a model launched by torch.distributed.launch "
                  "with --local_rank",
    "numba-errors": "only a port of a model that installs numba",
    "mmcv-version-assert": "only a port whose mmcv-full is newer than a package's import-time assert allows",
    "mmcv-layer-clash": "only a port whose mmcv-full registers layers a pinned package registers too",
    "collections-abc": "only Plans on Python >= 3.10 that keep a package taking the ABCs from collections",
    "torch-load-weights-only": "only a port from torch < 2.6 to >= 2.6",
    "mmcv-parallel": "only a port from torch < 2.1 to >= 2.1 of a model that pins mmcv-full",
    "flash-attn-unpad-input": "only a Plan whose flash-attn is >= 2.7 where upstream's pin is older or open",
    "flash-attn-head-dims": "only on flash-attn's sdist, with --trim-kernels, for a model whose catalog entry "
                            "names its head dims",
}


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
        if any(runs_on(sass, card.cc, ptx) for sass, ptx in (cat.wheel_code(rel, cu) for cu in cus)):
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
        return Conflict(f"{target} is impossible with upstream pins: " + "; ".join(first.reasons), chain, hint,
                        reason=first.reasons[-1])
    best = max(attempts, key=lambda a: a.depth)
    if best is not first:
        chain.append(f"closest port {best.label}: {'; '.join(best.reasons)}")
    return Conflict(f"{target} is impossible: {best.reasons[-1]}", chain,
                    f"tried {len(attempts)} stacks from torch {model.torch} upward", reason=best.reasons[-1])


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
                reason = exc.reason.split("; ")[0]
                cells.append(Cell(m, c, "impossible", reason))
                continue
            main = [f"{p.name} {p.version}" for p in plan.pins if p.deviation and p.name not in ("torchvision", "torchaudio")]
            cells.append(Cell(m, c, plan.mode, ", ".join(main)))
    return cells
