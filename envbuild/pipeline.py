"""Glue between stages: what each command does, as one call that runs the stages in order.

None of these functions decides anything a stage owns, and none prints: what a long call says
on the way goes through a Progress, and what it found is returned for show.py to present.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from . import audit as audit_stage
from . import bake as bake_stage
from . import build as build_stage
from . import compare as compare_stage
from . import export as export_stage
from . import fixers as fix_stage
from . import lock as lock_stage
from . import smoke as smoke_stage
from . import estimate as estimate_stage
from . import labels as label
from . import base_image, catalog, config, engine, host, ledger, outputs, render, ship
from .build import check_ref, image_ref
from .config import Sources, load_sources, setting
from .errors import BadInput, BuildStopped, EnvbuildError, OperationFailed, unknown
from .plan import Plan
from .resolve import FIXER_WHEN, PORTABLE, Conflict, grid, parse_cards, parse_overrides, resolve


@dataclass(kw_only=True)
class Request:
    """What a command asks for, by keyword: Request(model="maptr", card="h20", cuda="11.8")."""

    model: str
    card: str | None = None  # a card, a comma-separated list, or None: see choose_cards
    cuda: str | None = None
    python: str | None = None
    strict: bool = False
    overrides: tuple = ()  # --set PKG==VERSION items (a list, or None from typer, becomes a tuple)
    source: str | None = None  # local source tree (default: git at the pinned commit)
    base_image: str | None = None
    runtime_image: str | None = None
    torch_index: str | None = None
    pypi_index: str | None = None
    compile_only: bool = False  # --compile: no vendor wheels, every compiled package from its sdist
    trim_kernels: bool = False  # --trim-kernels: compiled packages build only the kernels the model calls

    def __post_init__(self):
        self.overrides = tuple(self.overrides or ())
        if self.source is not None:
            self.source = str(self.source)

    def command(self, verb: str = "render", out: Path | str | None = None) -> str:
        """The envbuild command line that makes this same Plan anywhere (file headers, hints): every
        flag that shaped it, --source as an absolute path, -o when given, values shell-quoted."""
        source = self.source and str(Path(self.source).expanduser().resolve())
        parts = ["envbuild", verb, self.model]
        for flag, value in (("--card", self.card), ("--cuda", self.cuda), ("--python", self.python), ("--base-image", self.base_image),
                            ("--runtime-image", self.runtime_image), ("--source", source),
                            ("--torch-index", self.torch_index), ("--pypi-index", self.pypi_index),
                            ("-o", out and str(Path(out).expanduser().resolve()))):
            if value:
                parts += [flag, shlex.quote(str(value))]
        if self.strict:
            parts.append("--strict")
        if self.compile_only:
            parts.append("--compile")
        if self.trim_kernels:
            parts.append("--trim-kernels")
        for item in self.overrides:
            parts += ["--set", shlex.quote(item)]
        return " ".join(parts)

    def pinned(self, plan: Plan, sources: Sources | None = None) -> "Request":
        """This request with what its Plan was made from, so that its command makes the same Plan
        on any host: cards that came from this host's GPUs or the config are named (a portable
        Plan says --card portable: elsewhere a GPU would be found), and so are indexes this host's
        config chose when they are not envbuild's defaults, and --compile when its config turned
        vendor wheels off."""
        card = self.card or (PORTABLE if plan.card == PORTABLE else ",".join(plan.cards))
        torch_index, pypi_index = self.torch_index, self.pypi_index
        if sources is not None and torch_index is None and sources.torch_index != config.TORCH_INDEX:
            torch_index = sources.torch_index or "none"
        if sources is not None and pypi_index is None and sources.pypi_index != config.PYPI:
            pypi_index = sources.pypi_index
        compile_only = self.compile_only or (sources is not None and not sources.vendor_wheels)
        return replace(self, card=card, torch_index=torch_index, pypi_index=pypi_index, compile_only=compile_only)


@dataclass(kw_only=True, frozen=True)
class Progress:
    """What a long call says while it runs; each is optional (None: nothing said)."""

    echo: Callable[[str], None] | None = None  # build and lock output, line by line
    say: Callable[[str], None] | None = None  # a step worth a line of its own (locking first, ...)
    planned: Callable[[Plan], None] | None = None  # the Plan, before the long steps start
    building: Callable[[str, Plan, Path], None] | None = None  # the build starts: (image ref, Plan, context)
    estimated: Callable[[dict], None] | None = None  # what the build will cost (estimate.estimate), before it starts


QUIET = Progress()


@dataclass(kw_only=True)
class Verification:
    """What `verify` recorded: the ledger file (None: a stopped build records nothing), the cell's
    status now, and the failure to report, if any."""

    plan: Plan
    record: Path | None
    status: str
    failure: EnvbuildError | None = None


def choose_cards(cat, card: str | None) -> tuple[str | None, str]:
    """The cards to build for, the same way for every command, and why: the --card given; else
    the GPUs on this host; else the config's `card`; else None (portable: every catalog card)."""
    if card and card.strip().lower() == PORTABLE:
        return None, "portable (--card portable): every catalog card this stack runs on"
    if card:
        return card, "--card"
    found = host.gpus()
    if found:
        cards = [host.match_card(cat, g["name"]) for g in found]
        missing = sorted({g["name"] for g, c in zip(found, cards) if c is None})
        if missing:
            raise BadInput(f"this host's GPU {', '.join(missing)} is not in the catalog",
                           "pass --card, or add it to your catalog's cards.toml (envbuild cards shows where)")
        ids = list(dict.fromkeys(c.id for c in cards))
        return ",".join(ids), f"the GPUs on this host ({', '.join(dict.fromkeys(g['name'] for g in found))})"
    configured = setting("card")
    if configured:
        return configured, "the config's card"
    return None, ("portable: no --card, no GPU on this host and no card in the config, so every catalog card "
                  "this stack runs on")


def card_here(cat, card: str | None):
    """The card a smoke run is for: the one named, else this host's first GPU, else None."""
    if card:
        cards = parse_cards(cat, card)
        if len(cards) != 1:
            raise BadInput("smoke runs on one card at a time: pass one --card", "run it once per card, then envbuild compare")
        return cards[0]
    gpus = host.gpus()
    return host.match_card(cat, gpus[0]["name"]) if gpus else None


def plan_for(req: Request) -> tuple[Plan, Sources]:
    cat = catalog.load()
    sources = load_sources(torch_index=req.torch_index, pypi_index=req.pypi_index,
                           vendor_wheels=False if req.compile_only else None)
    card, why = choose_cards(cat, req.card)
    plan = resolve(cat, req.model, card, cuda=req.cuda, python=req.python, strict=req.strict,
                   overrides=parse_overrides(req.overrides), sources=sources, cards_why=why,
                   trim_kernels=req.trim_kernels)
    return plan, sources


def ledger_request(plan: Plan, sources: Sources, req: Request) -> dict:
    """The request a ledger record is kept under: what verify writes and resolve looks up."""
    return {"model": plan.model, "card": ",".join(plan.cards), "python": req.python, "cuda": req.cuda,
            "torch_index": sources.torch_index or "none", **({"trim_kernels": True} if req.trim_kernels else {})}


def resolve_plan(req: Request) -> tuple[Plan, str]:
    """The Plan, and what the verified ledger says of it (verified, stale, FAILED or not verified)."""
    plan, sources = plan_for(req)
    return plan, ledger.status(plan, ledger_request(plan, sources, req))


def matrix(models: list[str] | None = None, cards: list[str] | None = None, *, cuda: str | None = None,
           torch_index: str | None = None) -> tuple[list, dict]:
    """Every (model, card) cell (upstream, port or impossible) and the ledger's marks {(model, card): mark}."""
    cat = catalog.load()
    sources = load_sources(torch_index=torch_index)
    cells = grid(cat, models, cards, sources, cuda)
    # a record marks a cell as such only when it covers the cell's exact request
    return cells, ledger.marks(cat, {"python": None, "cuda": cuda, "torch_index": sources.torch_index or "none"})


def default_context_dir(plan: Plan) -> Path:
    return build_stage.state_dir() / "contexts" / f"{plan.model}-{plan.card}"


def prepare(req: Request, out: Path | None = None, planned: tuple[Plan, Sources] | None = None
            ) -> tuple[Plan, Sources, Path]:
    """Resolve (unless `planned` holds the request's Plan and sources already) and write a full
    build context; use a lock there when it matches."""
    plan, sources = planned or plan_for(req)
    adopt = out is None  # envbuild's own state folder: everything there is envbuild's
    out = Path(out) if out else default_context_dir(plan)
    source_dir = None
    if req.source:
        source_dir = Path(req.source).expanduser()
        if not source_dir.is_dir():
            raise BadInput(f"--source {req.source}: not a directory", "point --source at a checkout of the model")
        outputs.check_apart(source_dir, out)
    ctx = render.make_context(plan, req.pinned(plan, sources).command(), base_image=req.base_image, runtime_image=req.runtime_image,
                              source="local" if source_dir else "git", pypi_index=sources.pypi_index,
                              git_mirror=sources.git_mirror)
    # A lock made from exactly this requirements.in switches the Dockerfile to hash-checked installs.
    render.use_lock(ctx, out)
    if sources.wheel_cache:  # wheels some builder already compiled and pushed: used, not compiled
        ctx.wheel_cache = sources.wheel_cache
        ctx.shared_wheels = {s.name: s.cache_ref for s in ctx.compiled_steps if s.cache_ref and ship.in_registry(s.cache_ref)}
    if not ctx.locked and out.is_dir():
        mine = outputs.owned(out, adopt)  # refuses a folder that is not envbuild's, touching nothing
        stale = [name for name in ("requirements.lock", "torch.lock") if name in mine]
        if stale:  # locks envbuild made for other pins (a user's own file stays)
            with outputs.folder_lock(out):  # not while another render writes there
                for name in stale:
                    (out / name).unlink(missing_ok=True)
    render.write(ctx, out, source_dir, adopt)
    return plan, sources, out


def render_context(req: Request, out: Path | None = None) -> tuple[Plan, dict]:
    """prepare(), and what it wrote: {dir, files, locked, mode}."""
    plan, sources, ctx = prepare(req, out)
    files = sorted(str(p.relative_to(ctx)) for p in ctx.iterdir())
    return plan, {"dir": str(ctx), "files": files, "locked": (ctx / "requirements.lock").exists(), "mode": plan.mode,
                  "lock_command": req.pinned(plan, sources).command("lock", out)}


def lock_context(req: Request, out: Path | None = None, progress: Progress = QUIET) -> tuple[Plan, Path, Path]:
    """pip-compile in the Plan's own Python, then the context rendered again to install from the lock.
    Returns (plan, lock file, context)."""
    plan, sources, ctx = prepare(req, out)
    path = lock_stage.lock(ctx, **sources.build_kwargs, echo=progress.echo)
    plan, sources, ctx = prepare(req, out)  # re-render: the Dockerfile now installs from the lock
    return plan, path, ctx


def prepare_locked(req: Request, out: Path | None = None, lock: bool = True, progress: Progress = QUIET,
                   planned: tuple[Plan, Sources] | None = None):
    """prepare(), and lock first when no lock matches the Plan: pip-compile runs in the image's own
    Python and the lock stays beside the context for the next build. Returns (plan, sources, ctx, note).
    The request is resolved once (or not at all, given `planned`): a lock changes the files, not the Plan."""
    plan, sources, ctx = prepare(req, out, planned)
    planned = (plan, sources)
    if not lock:
        return plan, sources, ctx, "not locked (--no-lock): pip resolves requirements.in during the build"
    wanted = (ctx / "requirements.in").read_text()
    if lock_stage.matches(ctx, wanted):
        return plan, sources, ctx, f"hash-locked by {ctx / 'requirements.lock'}"
    shared = lock_stage.find_matching(default_context_dir(plan).parent, wanted)
    if shared is not None:  # another card's context locked the same lines for the same Python
        lock_stage.copy_lock(shared, ctx)
        plan, sources, ctx = prepare(req, out, planned)
        return plan, sources, ctx, f"hash-locked by {ctx / 'requirements.lock'} (the lock of {shared.name})"
    if progress.say:
        progress.say(f"no lock matches this Plan yet: locking first with pip-compile in the image's Python ({ctx})")
    lock_stage.lock(ctx, **sources.build_kwargs, echo=progress.echo)
    plan, sources, ctx = prepare(req, out, planned)  # re-render: the Dockerfile now installs from the lock
    return plan, sources, ctx, f"locked first, hash-locked by {ctx / 'requirements.lock'} (kept for the next build)"


def prepare_image(req: Request, extra_tags=(), lock: bool = True, progress: Progress = QUIET,
                  planned: tuple[Plan, Sources] | None = None):
    """Everything before the build: engine reachable, context rendered and locked, tags decided.
    Returns (plan, sources, ctx, lock_note, tags); the Plan's own tag comes first."""
    extra_tags = [check_ref(t) for t in extra_tags or []]  # bad input is said before the engine is asked
    engine.client()  # the daemon first: a wedged one is not a missing buildx plugin
    engine.find_cli()
    planned = planned or plan_for(req)
    req = offline_base(req, planned[0], progress)  # another base image: the same Plan (resolve never sees it)
    plan, sources, ctx, lock_note = prepare_locked(req, lock=lock, progress=progress, planned=planned)
    tags = [image_ref(plan, sources.registry)] + [check_ref(t) for t in extra_tags or []]
    return plan, sources, ctx, lock_note, tags


def offline_base(req: Request, plan: Plan, progress: Progress = QUIET) -> Request:
    """Before anything long: when the Plan's base image is neither here nor pullable (Docker Hub
    blocked), use the base `envbuild base` made for its CUDA, or say which command makes one."""
    if req.base_image or base_image.have_image(plan.base_image):
        return req
    registry = base_image.registry_of(plan.base_image)
    if base_image.reachable(registry) or base_image.daemon_pulls_elsewhere(registry):
        return req
    cuda = ".".join(plan.cuda.split(".")[:2])
    made = base_image.find_base(cuda)
    python = plan.python.version
    if made and python == base_image.BASE_PYTHON:
        if progress.say:
            progress.say(f"{registry} is unreachable: building on {made}, made by envbuild base")
        return replace(req, base_image=made, runtime_image=base_image.recipe_for(cuda).debian_tag)
    how = (f"envbuild base --cuda {cuda}" if cuda in base_image.recipes() else
           f"a CUDA {cuda} devel image from a mirror you reach (--base-image)")
    also = "" if python == base_image.BASE_PYTHON else f" and --python {base_image.BASE_PYTHON} (its Python)"
    raise BadInput(f"{plan.base_image} is not here and {registry} is unreachable from this machine",
                   f"make an offline base with `{how}`, then pass --base-image{also}; or pass --base-image MIRROR/IMAGE")


def _build(plan: Plan, sources: Sources, ctx: Path, lock_note: str, tags: list[str], no_cache: bool = False,
           echo=None, time_limit: float | None = None, context=None) -> dict:
    """BuildKit build of a prepared context, tagged on success; the summary the CLI prints.
    context: its render.Context, whose wheel stages this host's BuildKit cache then holds."""
    on_stop = (lambda progress: estimate_stage.remember_stopped(context, progress)) if context is not None else None
    result = build_stage.build(ctx, tags, no_cache=no_cache, **sources.build_kwargs, echo=echo,
                               log_name=f"{plan.model}-{plan.card}", time_limit=time_limit, on_stop=on_stop)
    if context is not None:
        estimate_stage.remember_built(context)
    summary = result.summary()
    summary.update(cards=list(plan.cards), cards_why=plan.cards_why, lock=lock_note)
    return summary


def context_of(req: Request, plan: Plan, sources: Sources, ctx_dir: Path | None = None):
    """The render.Context of a request's Plan, written nowhere (the files stay as they are); with
    ctx_dir, reading its lock and the wheel cache as prepare() did."""
    context = render.make_context(plan, req.pinned(plan, sources).command(), base_image=req.base_image,
                                  runtime_image=req.runtime_image, source="local" if req.source else "git",
                                  pypi_index=sources.pypi_index, git_mirror=sources.git_mirror)
    if ctx_dir is not None:
        render.use_lock(context, ctx_dir)
        listing = ctx_dir / "wheel-cache.json"
        if sources.wheel_cache and listing.is_file():
            context.wheel_cache = sources.wheel_cache
            context.shared_wheels = {i["package"]: i["ref"] for i in json.loads(listing.read_text()) if i["shared"]}
    return context


def estimate_image(req: Request, *, no_cache: bool = False, planned: tuple[Plan, Sources] | None = None) -> dict:
    """What `envbuild image --dry-run` prints, nothing built, written or asked of an engine: the
    Plan, its Dockerfile's stages, its compiled wheel stages and what the build will cost."""
    plan, sources = planned or plan_for(req)
    ctx_dir = default_context_dir(plan)  # its lock, when one was made, is part of what a wheel stage is built from
    context = context_of(req, plan, sources, ctx_dir if ctx_dir.is_dir() else None)
    stages = re.findall(r"^FROM \S+ AS (\S+)", render.dockerfile(context), flags=re.M)
    cost = estimate_stage.estimate(context, ledger.load(), no_cache=no_cache)
    return {"plan": plan, "image": image_ref(plan, sources.registry), "stages": stages,
            "compiled": [s.stage for s in context.compiled_steps], "estimate": cost}


def build_image(req: Request, *, tags=(), lock: bool = True, no_cache: bool = False, smoke: bool = False,
                push: bool = False, progress: Progress = QUIET, time_limit: float | None = None) -> dict:
    """What `envbuild image` does: resolve (once), render, lock (first time), estimate, build, tag;
    then, when asked, smoke-test the image (its result recorded in a label every tag moves to) and
    push the tags that name a registry. Returns the build summary, with `smoke` and `pushed` when
    they ran. A build still running after time_limit seconds is stopped (BuildKit keeps what finished)."""
    planned = plan_for(req)
    if progress.planned:  # which cards, and why, before the (long) lock and build
        progress.planned(planned[0])
    plan, sources, ctx, lock_note, refs = prepare_image(req, tags, lock=lock, progress=progress, planned=planned)
    context = context_of(req, plan, sources, ctx)
    if progress.estimated:
        progress.estimated(estimate_stage.estimate(context, ledger.load(), no_cache=no_cache))
    # --push sends the tags that name a registry: the default one only when a registry is configured
    to_push = refs if sources.registry else refs[1:]
    if push and not to_push:
        raise BadInput("--push: no registry to push to", "set registry in the config (ENVBUILD_REGISTRY) "
                       "or add --tag REGISTRY/NAME:TAG")
    if progress.building:
        progress.building(refs[0], plan, ctx)
    summary = _build(plan, sources, ctx, lock_note, refs, no_cache=no_cache, echo=progress.echo, time_limit=time_limit,
                     context=context)
    summary.update(_share_wheels(ctx, sources, progress.echo))
    if smoke:
        _smoke_and_label(summary, refs)
    if push:
        summary["pushed"] = {t: ship.push(t, echo=progress.echo) for t in to_push}
    return summary


def _share_wheels(ctx: Path, sources: Sources, echo=None) -> dict:
    """After a build: push each wheel it compiled to the wheel cache (a stage holding only the
    wheel, a cache hit of the build just made), so no other builder compiles it again. Returns
    {"wheel_cache": {package: {"ref", "from": "cache" | "pushed"}}} when a cache is configured."""
    listing = ctx / "wheel-cache.json"
    if not sources.wheel_cache or not listing.is_file():
        return {}
    done = {}
    for item in json.loads(listing.read_text()):
        entry = {"ref": item["ref"], "from": "cache" if item["shared"] else "pushed"}
        if not item["shared"]:
            try:  # the image is built already: a cache that cannot take the wheel is reported, not fatal
                build_stage.build(ctx, [item["ref"]], target=item["pack"], **sources.build_kwargs, echo=echo,
                                  log_name=f"wheel-cache-{item['package']}")
                try:
                    ship.push(item["ref"], echo=echo)
                finally:
                    engine.client().images.remove(item["ref"], noprune=False)  # the registry keeps it, not this host
            except OperationFailed as exc:
                entry = {"ref": item["ref"], "from": "not shared", "why": exc.message.splitlines()[0]}
        done[item["package"]] = entry
    return {"wheel_cache": done}


def _smoke_and_label(summary: dict, refs: list[str]) -> None:
    """Smoke-test a fresh build on this host's card; its result becomes a label of the image every
    tag moves to (summary: `smoke`, `build_image_id`, and the labelled image's `image_id`)."""
    report = smoke_stage.run(refs[0], smoke_stage.parse_levels(None), card=card_here(catalog.load(), None))
    summary["smoke"] = smoke_stage.summary(report)
    summary["build_image_id"] = summary["image_id"]
    summary["image_id"] = smoke_stage.record(refs, report)  # every tag moves to the labelled image
    if not report["ok"]:
        raise OperationFailed(f"image built ({refs[0]}) but its smoke test failed: "
                              + ", ".join(k for k, v in summary["smoke"]["levels"].items() if v == "failed"))


def verify_cell(req: Request, *, time_limit: float | None = None, progress: Progress = QUIET) -> Verification:
    """What `envbuild verify` does: build the cell, audit it for each of its cards, smoke env + model
    without a GPU, and record the outcome (passed, or the first failure) in the verified ledger.
    A build still running after time_limit seconds is stopped and says what it was compiling and
    how far it got; that is no verdict on the cell, so the ledger stays as it was (a verified record
    of the cell is not replaced); a rerun continues from BuildKit's cache and ccache."""
    plan, sources, ctx, lock_note, refs = prepare_image(req, (), progress=progress)
    request = ledger_request(plan, sources, req)
    summary, audit_ok, report, failure = {}, None, None, ""
    try:
        summary = _build(plan, sources, ctx, lock_note, refs, echo=progress.echo, time_limit=time_limit,
                         context=context_of(req, plan, sources, ctx))
        summary.update(_share_wheels(ctx, sources, progress.echo))
        audits = _audit_all(refs[0], None, list(plan.cards))
        audit_ok = all(a["ok"] for a in audits)
        if not audit_ok:
            failure = "audit: " + "; ".join(f for a in audits for f in a["failures"])
        report = smoke_stage.run(refs[0], ["env", "model"], gpus="none")
        if not failure:
            failure = _smoke_failure(report)
    except BuildStopped as exc:
        return Verification(plan=plan, record=None, status=ledger.status(plan, request),
                            failure=OperationFailed(f"{plan.model} is not verified: {exc.message}", exc.hint, log=exc.log))
    except OperationFailed as exc:
        failure = exc.message.splitlines()[0] + (f" (log: {exc.log})" if exc.log else "")
    if summary:
        summary = ledger.with_cold_times(plan, summary)
    path = ledger.write(plan, request, summary, audit_ok, report, failure, model=catalog.load().model(plan.model))
    # the record is printed beside it; a build failure names its own log in the message
    error = OperationFailed(f"{plan.model} is not verified: {failure}") if failure else None
    return Verification(plan=plan, record=path, status=ledger.status(plan, request), failure=error)


def _smoke_failure(report: dict) -> str:
    """'' when every level passed, else each level that did not, with its first problem."""
    bad = {k: v for k, v in report["levels"].items() if v.get("status") != "passed"}
    return "; ".join(f"smoke {k}: {v.get('reason') or _first_problem(v)}" for k, v in bad.items())


def _first_problem(level: dict) -> str:
    found = [f"{p['name']}: {'; '.join(p['problems'])}" for p in level.get("packages", []) if not p.get("ok")]
    found += [f"{e['path']}: {e['error']}" for e in level.get("extensions", []) if e.get("ok") is False
              and e.get("required", True)]
    return (found or [level.get("reason") or level.get("status", "?")])[0][:300]


def _audit_all(ref: str, cat, cards, timeout: float = audit_stage.TIMEOUT) -> list[dict]:
    """One scan of the image, judged for each card (catalog names or ids)."""
    libs = audit_stage.scan(ref, timeout)
    return [audit_stage.audit(ref, c, libs) for c in parse_cards(cat or catalog.load(), cards)]


def audit_image(ref: str, card: str | None = None,
                timeout: float = audit_stage.TIMEOUT) -> tuple[list[dict], EnvbuildError | None]:
    """Every compiled library of the image judged for each card (the ones named, else the image's
    own): the reports, and the failure to report when a library cannot run on a card."""
    cat = catalog.load()
    export_stage.local_image(ref)  # a missing or unusable reference is said as such
    names = card or audit_stage.image_cards(ref)
    if not names:
        raise BadInput(f"{ref} has no {label.CARDS} label", "pass --card CARD[,CARD]")
    reports = _audit_all(ref, cat, names, timeout)
    failing = [r for r in reports if not r["ok"]]
    if not failing:
        return reports, None
    return reports, OperationFailed("; ".join(
        f"{len(r['failures'])} librar{'y' if len(r['failures']) == 1 else 'ies'} cannot run on {r['card_name']}"
        + (f" (torch's own build: {', '.join(sorted(r['torch_failures']))})" if r["torch_failures"] else "")
        for r in failing))


def smoke_image(target: str, *, card: str | None = None, cuda: str | None = None, python: str | None = None,
                level: str | None = None, gpus: str = "all", recipe: str = "synthetic", report: Path | None = None,
                force: bool = False, **options) -> tuple[dict, EnvbuildError | None]:
    """What `envbuild smoke` does: the levels run in an image, or in a model's image (the ref its Plan
    names), for the card; `options` go to smoke.run as they are. The report is written to `report`
    when given. Returns the report, and the failure to report when a level failed."""
    if recipe not in ("synthetic", "model", "both"):
        raise BadInput(f"--recipe {recipe!r} is not a recipe", "choose synthetic, model or both")
    if gpus != "all" and gpus != "none" and not gpus.isdigit():
        raise BadInput(f"--gpus {gpus!r} is not a GPU request", "all, N or none")
    cat = catalog.load()
    levels = smoke_stage.parse_levels(level)
    if report:  # before the run: a file envbuild did not write is not replaced (unless force)
        outputs.check_own_file(report, lambda text: force or smoke_stage.is_report(text))
    ref = target_ref(target, card=card, cuda=cuda, python=python, cat=cat)
    data = smoke_stage.run(ref, levels, gpus=gpus, recipe=recipe, card=card_here(cat, card), **options)
    if data.get("card") and label.PLAN in (engine.client().images.get(data["image_id"]).labels or {}):
        # an image envbuild made keeps the run in its label, per card (as image --smoke does): pull
        # then says on which cards it was validated. Images envbuild did not make stay untouched.
        data["recorded_in"] = smoke_stage.record([ref], data)
    if report:
        outputs.write_own_file(report, json.dumps(data, indent=2, sort_keys=True) + "\n",
                               lambda text: force or smoke_stage.is_report(text))
    if data["ok"]:
        return data, None
    failed = [k for k, v in data["levels"].items() if v["status"] == "failed"]
    return data, OperationFailed(f"smoke failed: {', '.join(failed)}", log=str(report) if report else "")


def pull_image(req: Request, *, registry: str | None = None) -> dict:
    """The image a Plan names, pulled after a driver check, from `registry` (default: the config's)."""
    plan, sources = plan_for(req)
    prefix = load_sources(registry=registry).registry if registry else sources.registry
    return ship.pull(image_ref(plan, prefix), plan.min_driver, plan.compat_driver, plan.cuda, plan.cards)


def export_wheels(req: Request, dest: Path | None = None, progress: Progress = QUIET) -> tuple[Plan, Path, list[dict]]:
    """The Plan's compiled wheels as a plain folder `pip install --find-links` can use: the wheel
    stages (cache hits once an image was built) exported without an image. Returns the wheels
    with what they were built for."""
    planned = plan_for(req)
    plan = planned[0]
    if not plan.compiled:
        raise BadInput(f"{plan.model} compiles no package from source: there are no wheels to export",
                       "its packages come as wheels from the index already")
    dest = Path(dest) if dest else build_stage.state_dir() / "wheels" / f"{plan.model}-{plan.card}"
    outputs.owned(dest, adopt=False)  # a folder that is not envbuild's is refused, touching nothing
    plan, sources, ctx, _ = prepare_locked(req, progress=progress, planned=planned)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".envbuild-wheels-") as tmp:
        steps = build_stage.export_stage(ctx, "wheels", Path(tmp), **sources.build_kwargs, echo=progress.echo,
                                         log_name=f"wheels-{plan.model}-{plan.card}")
        made = sorted(Path(tmp).glob("*.whl"))
        dest.mkdir(parents=True, exist_ok=True)
        outputs.record_owned(dest, [w.name for w in made])
        for wheel in made:
            os.replace(wheel, dest / wheel.name)
    facts = {"torch": plan.torch.version, "cuda": plan.torch_cuda, "python": plan.python.version,
             "arch_list": plan.arch_list}
    wheels = []
    for w in made:
        package = w.name.split("-")[0].replace("_", "-")
        # its wheel stage ran in this export, or every step of it was BuildKit's cache (an image built it)
        stage_steps = [st for st in steps if st.name.startswith(f"[{render.wheel_stage(package)} ")]
        wheels.append(dict(facts, file=str(dest / w.name), package=package, version=w.name.split("-")[1],
                           size_bytes=(dest / w.name).stat().st_size,
                           built_now=any(not st.cached for st in stage_steps)))
    return plan, dest, wheels


def fix_tree(path: str, *, only: list[str] | None = None, mmcv: str | None = None, cxx_std: str | None = None,
             plan_file: Path | None = None, dry_run: bool = False):
    """What `envbuild fix` does: the fixers a plan.json names, else those --only names (else all),
    detected (dry_run: a list of findings, nothing changed) or applied ({fixer: changed files})."""
    if not path.strip():
        raise BadInput("the source tree path is empty", "name the model's folder, e.g. envbuild fix ./MapTR")
    if not Path(path).is_dir():
        raise BadInput(f"{path} is not a directory", "name the model's source folder")
    chosen = _fixers_of_plan(plan_file) if plan_file else _fixers_named(only, mmcv, cxx_std)
    if dry_run:
        found = fix_stage.detect(str(path), chosen)
        if not plan_file:  # checked without a Plan: say which Plans would apply each finding
            for finding in found:
                finding.only_when = FIXER_WHEN.get(finding.fixer, "only the Plans that list this fixer")
        return found
    try:
        return fix_stage.apply(str(path), chosen)
    except fix_stage.FixerError as exc:
        raise OperationFailed(str(exc), "report it with the file; apply the other fixers with --only") from None


def _fixers_of_plan(plan_file: Path) -> list:
    try:
        from .inputs import read_text
        text = read_text(plan_file, "--plan", "pass the plan.json that envbuild render wrote")
        return fix_stage.fixers_from_plan(json.loads(text))
    except (OSError, ValueError, KeyError, UnicodeDecodeError, RecursionError) as exc:
        raise BadInput(f"cannot use plan {plan_file}: {exc}", "pass the plan.json that envbuild render wrote") from None


def _fixers_named(only: list[str] | None, mmcv: str | None, cxx_std: str | None) -> list:
    names = [n for item in (only or []) for n in item.split(",") if n.strip()]
    if only is not None and not names:
        raise BadInput("--only names no fixer", f"name one or more of {', '.join(fix_stage.FIXERS)}, or leave --only out for all")
    names = names or [n for n in fix_stage.FIXERS if not fix_stage.needs_args(n)]
    for name in names:
        if name not in fix_stage.FIXERS:
            raise unknown("fixer", name, list(fix_stage.FIXERS))
        if fix_stage.needs_args(name):
            raise BadInput(f"fixer {name} runs on a compiled package's sdist with the arguments a Plan gives it "
                           "(--trim-kernels), not on a model's tree", "leave it out of --only")
    args = {"mmcv-version-assert": {"mmcv": mmcv} if mmcv is not None else {},
            "cxx-standard": {"std": cxx_std} if cxx_std is not None else {}}
    try:
        return [fix_stage.make(n, args.get(n)) for n in names if not (n == "mmcv-version-assert" and mmcv is None)]
    except ValueError as exc:
        raise BadInput(str(exc).replace("mmcv=", "--mmcv ").replace("std=", "--cxx-std "),
                       "--mmcv takes a version like 1.7.2; --cxx-std one of c++14, c++17, c++20") from None


def target_ref(target: str, *, card: str | None = None, cuda: str | None = None, python: str | None = None,
               cat=None) -> str:
    """IMAGE|MODEL as smoke and export take it: a catalog model's name is the image its Plan for the
    card names (as `image` tagged it); anything else is an image reference."""
    if target.lower() not in (cat or catalog.load()).models:
        import re
        name, at, digest = target.partition("@")  # repo@sha256:... names an image too
        check_ref(name)  # never a string the daemon is left to refuse
        if at and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise BadInput(f"not a valid image reference: {target!r}", "a digest is @sha256: and 64 hex digits")
        return target
    plan, sources = plan_for(Request(model=target, card=card, cuda=cuda, python=python))
    return image_ref(plan, sources.registry)


def export_image(target: str, format_: str, out: Path, *, card: str | None = None, cuda: str | None = None,
                 python: str | None = None, force: bool = False) -> dict:
    """A compressed docker save (tar) or an Apptainer definition (apptainer) of a local image (or
    of a model's image for the card), in out. force: replace files there envbuild did not write."""
    if format_ not in ("tar", "apptainer"):
        raise BadInput(f"--format {format_!r} is not a format", "choose tar or apptainer")
    ref = target_ref(target, card=card, cuda=cuda, python=python)
    if format_ == "tar":
        return export_stage.export_tar(ref, out, force=force)
    return export_stage.export_apptainer(ref, out, force=force)


def compare_reports(reports: list[Path], out: Path, force: bool = False) -> Path:
    """One HTML page from smoke reports; replaces only a page envbuild wrote (or anything, with force)."""
    try:
        page = compare_stage.page(compare_stage.load(reports))
    except (AttributeError, TypeError, KeyError, IndexError) as exc:  # JSON, not shaped like a report
        raise BadInput(f"{', '.join(map(str, reports))}: not shaped like smoke reports ({type(exc).__name__}: {exc})",
                       "pass the files envbuild smoke --report wrote") from None
    outputs.write_own_file(out, page, lambda text: force or compare_stage.made_by_envbuild(text))
    return out


def bake_matrix(models: list[str] | None, cards: list[str] | None, *, out: Path, registry: str | None = None,
                builder_memory: int = 64, parallel: int = 4, base_image: str | None = None,
                runtime_image: str | None = None, torch_index: str | None = None, pypi_index: str | None = None,
                cuda: str | None = None, python: str | None = None, sources: tuple = (),
                for_here: bool = False, progress: Progress = QUIET) -> tuple[Path, dict, list[dict], Sources]:
    """The docker-bake file for models x cards, every context rendered beside it by prepare()
    as `image` renders its own. for_here: the bake builds on this host, so a base image
    Docker Hub would give and this host cannot reach is replaced by the one `envbuild base`
    made (as `image` does). Returns (file, bake, skipped cells, sources)."""
    cat = catalog.load()
    bake_stage.check_limits(builder_memory, parallel)
    models = [cat.model(m).name for m in models] if models else sorted(cat.models)
    cards = [cat.card(c).id for c in cards] if cards else list(cat.cards)  # the whole matrix by default
    trees = _model_sources(sources, models)
    registry = load_sources(torch_index=torch_index, pypi_index=pypi_index, registry=registry).registry  # checked first
    bake_stage.check(out)  # before any context is written beside it
    cells, skipped, found = [], [], None
    for m in models:
        for c in cards:
            req = Request(model=m, card=c, cuda=cuda, python=python, source=trees.get(m), base_image=base_image,
                          runtime_image=runtime_image, torch_index=torch_index, pypi_index=pypi_index)
            try:
                planned = plan_for(req)
            except Conflict as exc:
                skipped.append({"model": m, "card": c, "reason": exc.message})
                continue
            if for_here:
                req = offline_base(req, planned[0], progress)
            plan, found, ctx = prepare(req, out.parent / "contexts" / bake_stage.target_name(m, c), planned)
            cells.append(bake_stage.Cell(plan, ctx.resolve(), req.base_image or plan.base_image))
    if not cells:
        raise BadInput("no (model, card) pair can be built", "; ".join(s["reason"] for s in skipped)[:500])
    doc = bake_stage.bake_file(cells, found, registry, builder_memory, parallel)
    return bake_stage.write(doc, out), doc, skipped, found


def _model_sources(items: tuple, models: list[str]) -> dict:
    """--source MODEL=PATH (or a bare PATH when the bake has one model): {model: path}."""
    trees = {}
    for item in items or ():
        model, sep, path = item.partition("=")
        if not sep:
            if len(models) != 1:
                raise BadInput(f"--source {item}: name the model it is for when the bake has several",
                               f"--source {models[0]}=PATH")
            model, path = models[0], item
        if model not in models:
            raise BadInput(f"--source {item}: {model} is not among the baked models ({', '.join(models)})",
                           "--source MODEL=PATH for a model given to --models")
        trees[model] = path
    return trees


def bake_build(path: Path, doc: dict, sources: Sources, push: bool = False, progress: Progress = QUIET,
               time_limit: float | None = None) -> dict:
    """Build a bake file here (bake.run), each wave after the last."""
    engine.client()  # the daemon first: a wedged one is named before buildx is asked
    return bake_stage.run(path, doc, sources, push=push, echo=progress.echo, time_limit=time_limit)
