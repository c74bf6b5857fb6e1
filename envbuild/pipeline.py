"""Glue between stages for the commands that chain them (render, lock, image).

Each function here calls stage modules in order; none decides anything a stage owns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import catalog, lock as lock_stage, render
from .config import Sources, load_sources
from .errors import BadInput
from .resolve import Plan, parse_overrides, resolve


@dataclass
class Request:
    model: str
    card: str
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
        parts = ["envbuild render", self.model, "--card", self.card]
        for flag, value in (("--cuda", self.cuda), ("--python", self.python), ("--base-image", self.base_image),
                            ("--runtime-image", self.runtime_image), ("--source", self.source and Path(self.source).name),
                            ("--torch-index", self.torch_index), ("--pypi-index", self.pypi_index)):
            if value:
                parts += [flag, str(value)]
        if self.strict:
            parts.append("--strict")
        for item in self.overrides:
            parts += ["--set", item]
        return " ".join(parts)


def plan_for(req: Request) -> tuple[Plan, Sources]:
    cat = catalog.load()
    sources = load_sources(torch_index=req.torch_index, pypi_index=req.pypi_index)
    plan = resolve(cat, req.model, req.card, cuda=req.cuda, python=req.python, strict=req.strict,
                   overrides=parse_overrides(req.overrides), sources=sources)
    return plan, sources


def default_context_dir(plan: Plan) -> Path:
    from .build import state_dir
    return state_dir() / "contexts" / f"{plan.model}-{plan.card}"


def prepare(req: Request, out: Path | None = None) -> tuple[Plan, Sources, Path]:
    """Resolve and write a full build context; use a lock there when it matches."""
    plan, sources = plan_for(req)
    out = Path(out) if out else default_context_dir(plan)
    source_dir = None
    if req.source:
        source_dir = Path(req.source).expanduser()
        if not source_dir.is_dir():
            raise BadInput(f"--source {req.source}: not a directory")
    ctx = render.make_context(plan, req.command(), base_image=req.base_image, runtime_image=req.runtime_image,
                              source="local" if source_dir else "git", pypi_index=sources.pypi_index)
    # A lock made from exactly this requirements.in switches the Dockerfile to hash-checked installs.
    ctx.locked = lock_stage.matches(out, render.requirements_in(ctx))
    if not ctx.locked:
        for stale in ("requirements.lock", "torch.lock"):
            (out / stale).unlink(missing_ok=True)
    render.write(ctx, out, source_dir)
    return plan, sources, out
