"""Glue between stages for the commands that chain them (render, lock, image).

Each function here calls stage modules in order; none decides anything a stage owns.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import catalog, lock as lock_stage, render
from .config import Sources, load_sources
from .errors import BadInput
from .resolve import Plan, parse_overrides, resolve


@dataclass
class Request:
    model: str
    card: str | None = None  # a card, a comma-separated list, or None: see choose_cards
    cuda: str | None = None
    python: str | None = None
    strict: bool = False
    overrides: tuple = ()
    source: str | None = None  # local source tree (default: git at the pinned commit)
    base_image: str | None = None
    runtime_image: str | None = None
    torch_index: str | None = None
    pypi_index: str | None = None

    def command(self) -> str:
        """The envbuild command line that regenerates this render (for file headers)."""
        parts = ["envbuild render", self.model]
        for flag, value in (("--card", self.card), ("--cuda", self.cuda), ("--python", self.python), ("--base-image", self.base_image),
                            ("--runtime-image", self.runtime_image), ("--source", self.source and Path(self.source).name),
                            ("--torch-index", self.torch_index), ("--pypi-index", self.pypi_index)):
            if value:
                parts += [flag, str(value)]
        if self.strict:
            parts.append("--strict")
        for item in self.overrides:
            parts += ["--set", item]
        return " ".join(parts)


def choose_cards(cat, card: str | None) -> tuple[str | None, str]:
    """The cards to build for, the same way for every command, and why: the --card given; else
    the GPUs on this host; else the config's `card`; else None (portable: every catalog card)."""
    from . import host
    from .config import setting
    if card:
        return card, "--card"
    found = host.gpus()
    if found:
        cards = [host.match_card(cat, g["name"]) for g in found]
        unknown = sorted({g["name"] for g, c in zip(found, cards) if c is None})
        if unknown:
            raise BadInput(f"this host's GPU {', '.join(unknown)} is not in the catalog",
                           "pass --card, or add it to your catalog's cards.toml (envbuild cards shows where)")
        ids = list(dict.fromkeys(c.id for c in cards))
        return ",".join(ids), f"the GPUs on this host ({', '.join(dict.fromkeys(g['name'] for g in found))})"
    configured = setting("card")
    if configured:
        return configured, "the config's card"
    return None, ("portable: no --card, no GPU on this host and no card in the config, so every catalog card "
                  "this stack runs on")


def plan_for(req: Request) -> tuple[Plan, Sources]:
    cat = catalog.load()
    sources = load_sources(torch_index=req.torch_index, pypi_index=req.pypi_index)
    card, why = choose_cards(cat, req.card)
    plan = resolve(cat, req.model, card, cuda=req.cuda, python=req.python, strict=req.strict,
                   overrides=parse_overrides(req.overrides), sources=sources, cards_why=why)
    return plan, sources


def default_context_dir(plan: Plan) -> Path:
    from .build import state_dir
    return state_dir() / "contexts" / f"{plan.model}-{plan.card}"


def prepare(req: Request, out: Path | None = None) -> tuple[Plan, Sources, Path]:
    """Resolve and write a full build context; use a lock there when it matches."""
    plan, sources = plan_for(req)
    adopt = out is None  # envbuild's own state folder: everything there is envbuild's
    out = Path(out) if out else default_context_dir(plan)
    source_dir = None
    if req.source:
        source_dir = Path(req.source).expanduser()
        if not source_dir.is_dir():
            raise BadInput(f"--source {req.source}: not a directory", "point --source at a checkout of the model")
        render.check_apart(source_dir, out)
    ctx = render.make_context(plan, req.command(), base_image=req.base_image, runtime_image=req.runtime_image,
                              source="local" if source_dir else "git", pypi_index=sources.pypi_index)
    # A lock made from exactly this requirements.in switches the Dockerfile to hash-checked installs.
    render.use_lock(ctx, out)
    if not ctx.locked and out.is_dir():
        mine = render.owned(out, adopt)  # refuses a folder that is not envbuild's, touching nothing
        stale = [name for name in ("requirements.lock", "torch.lock") if name in mine]
        if stale:  # locks envbuild made for other pins (a user's own file stays)
            with render.folder_lock(out):  # not while another render writes there
                for name in stale:
                    (out / name).unlink(missing_ok=True)
    render.write(ctx, out, source_dir, adopt)
    return plan, sources, out


def prepare_locked(req: Request, out: Path | None = None, lock: bool = True, echo=None, say=None):
    """prepare(), and lock first when no lock matches the Plan: pip-compile runs in the image's own
    Python and the lock stays beside the context for the next build. Returns (plan, sources, ctx, note)."""
    plan, sources, ctx = prepare(req, out)
    if not lock:
        return plan, sources, ctx, "not locked (--no-lock): pip resolves requirements.in during the build"
    wanted = (ctx / "requirements.in").read_text()
    if lock_stage.matches(ctx, wanted):
        return plan, sources, ctx, f"hash-locked by {ctx / 'requirements.lock'}"
    shared = lock_stage.find_matching(default_context_dir(plan).parent, wanted)
    if shared is not None:  # another card's context locked the same lines for the same Python
        lock_stage.copy_lock(shared, ctx)
        plan, sources, ctx = prepare(req, out)
        return plan, sources, ctx, f"hash-locked by {ctx / 'requirements.lock'} (the lock of {shared.name})"
    if say:
        say(f"no lock matches this Plan yet: locking first with pip-compile in the image's Python ({ctx})")
    lock_stage.lock(ctx, ca_bundle=sources.ca_bundle, echo=echo)
    plan, sources, ctx = prepare(req, out)  # re-render: the Dockerfile now installs from the lock
    return plan, sources, ctx, f"locked first, hash-locked by {ctx / 'requirements.lock'} (kept for the next build)"


def prepare_image(req: Request, extra_tags=(), lock: bool = True, echo=None, say=None):
    """Everything before the build: engine reachable, context rendered and locked, tags decided.
    Returns (plan, sources, ctx, lock_note, tags); the Plan's own tag comes first."""
    from . import build as build_stage
    build_stage.engine.find_cli()
    build_stage.engine.client()
    plan, sources, ctx, lock_note = prepare_locked(req, lock=lock, echo=echo, say=say)
    tags = [build_stage.image_ref(plan, sources.registry)] + [build_stage.check_ref(t) for t in extra_tags or []]
    return plan, sources, ctx, lock_note, tags


def build_image(plan: Plan, sources: Sources, ctx: Path, lock_note: str, tags: list[str], no_cache: bool = False,
                echo=None) -> dict:
    """BuildKit build of a prepared context, tagged on success; the summary the CLI prints."""
    from . import build as build_stage
    result = build_stage.build(ctx, tags, no_cache=no_cache, ca_bundle=sources.ca_bundle, echo=echo,
                               log_name=f"{plan.model}-{plan.card}")
    summary = result.summary()
    summary.update(cards=list(plan.cards), cards_why=plan.cards_why, lock=lock_note)
    return summary


def export_wheels(req: Request, dest: Path | None = None, echo=None, say=None) -> tuple[Plan, Path, list[dict]]:
    """The Plan's compiled wheels as a plain folder `pip install --find-links` can use: the wheel
    stages (cache hits once an image was built) exported without an image. Returns the wheels
    with what they were built for."""
    from . import build as build_stage
    plan, _ = plan_for(req)
    if not plan.compiled:
        raise BadInput(f"{plan.model} compiles no package from source: there are no wheels to export",
                       "its packages come as wheels from the index already")
    dest = Path(dest) if dest else build_stage.state_dir() / "wheels" / f"{plan.model}-{plan.card}"
    render.owned(dest, adopt=False)  # a folder that is not envbuild's is refused, touching nothing
    plan, sources, ctx, _ = prepare_locked(req, echo=echo, say=say)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".envbuild-wheels-") as tmp:
        build_stage.export_stage(ctx, "wheels", Path(tmp), ca_bundle=sources.ca_bundle, echo=echo,
                                 log_name=f"wheels-{plan.model}-{plan.card}")
        made = sorted(Path(tmp).glob("*.whl"))
        dest.mkdir(parents=True, exist_ok=True)
        render.record_owned(dest, [w.name for w in made])
        for wheel in made:
            os.replace(wheel, dest / wheel.name)
    facts = {"torch": plan.torch.version, "cuda": plan.torch_cuda, "python": plan.python.version,
             "arch_list": plan.arch_list}
    wheels = [dict(facts, file=str(dest / w.name), package=w.name.split("-")[0].replace("_", "-"),
                   version=w.name.split("-")[1], size_bytes=(dest / w.name).stat().st_size) for w in made]
    return plan, dest, wheels
