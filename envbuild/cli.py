"""The envbuild command line: a thin layer over the pipeline modules."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import catalog, show
from .config import load_sources
from .errors import EnvbuildError
from .resolve import grid, parse_overrides, resolve as resolve_plan

app = typer.Typer(
    help="Build card-targeted container images for old GPU model stacks.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

JSON = typer.Option(False, "--json", help="Machine-readable output.")
TORCH_INDEX = typer.Option(None, "--torch-index", help="PyTorch wheel index (or mirror); 'none' = plain PyPI only.")
PYPI_INDEX = typer.Option(None, "--pypi-index", help="PyPI index URL (or mirror).")
CUDA = typer.Option(None, "--cuda", help="CUDA toolkit X.Y for the image.")
PYTHON = typer.Option(None, "--python", help="Python X.Y (default: the model's).")
STRICT = typer.Option(False, "--strict", help="Upstream pins only; fail with the reason if the card cannot run them.")
SET = typer.Option(None, "--set", help="Force a pin, PKG==VERSION (repeatable).")


def command(*args, **kwargs):
    """Register a command whose expected errors become one line + exit code."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **kw):
            try:
                return fn(*a, **kw)
            except EnvbuildError as exc:
                show.error(exc)
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                show.err.print("interrupted")
                raise typer.Exit(130) from None
        return app.command(*args, **kwargs)(inner)
    return wrap


def _plan(model, card, cuda, python, strict, set_, torch_index, pypi_index):
    cat = catalog.load()
    sources = load_sources(torch_index=torch_index, pypi_index=pypi_index)
    return resolve_plan(cat, model, card, cuda=cuda, python=python, strict=strict,
                        overrides=parse_overrides(set_), sources=sources), sources


@command()
def models(json_: bool = JSON):
    """List the models in the catalog."""
    cat = catalog.load()
    rows = []
    for m in cat.models.values():
        rows.append({"name": m.name, "title": m.title, "python": m.python, "torch": f"{m.torch}",
                     "cuda": m.cuda, "repo": m.repo, "commit": m.commit,
                     "extensions": [e.name for e in m.extensions], "launcher": m.train.launcher,
                     "description": m.description})
    if json_:
        return show.emit_json(rows)
    show.table("models", ["name", "python", "torch", "CUDA", "extensions", "launcher", "description"],
               [[r["name"], r["python"], r["torch"], r["cuda"], ", ".join(r["extensions"]) or "-",
                 r["launcher"], r["description"]] for r in rows])


@command()
def cards(json_: bool = JSON):
    """List the GPU cards in the catalog."""
    cat = catalog.load()
    rows = [{"id": c.id, "name": c.name, "cc": c.cc, "memory_gb": c.memory_gb, "p2p": c.p2p,
             "aliases": list(c.aliases)} for c in cat.cards.values()]
    if json_:
        return show.emit_json(rows)
    show.table("cards", ["id", "name", "compute capability", "memory GB", "P2P", "aliases"],
               [[r["id"], r["name"], r["cc"], r["memory_gb"], "yes" if r["p2p"] else "NO",
                 ", ".join(r["aliases"])] for r in rows])


@command()
def resolve(model: str, card: str = typer.Option("a100", "--card", help="Target card (name or alias)."),
            cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON, strict: bool = STRICT,
            set_: Optional[List[str]] = SET, torch_index: Optional[str] = TORCH_INDEX,
            pypi_index: Optional[str] = PYPI_INDEX, json_: bool = JSON):
    """Print the Plan: what runs on the card, and why."""
    plan, _ = _plan(model, card, cuda, python, strict, set_, torch_index, pypi_index)
    if json_:
        return show.emit_json(plan.to_dict())
    show.plan(plan)


@command()
def matrix(models_: Optional[List[str]] = typer.Option(None, "--models", help="Models (repeatable or comma-separated)."),
           cards_: Optional[List[str]] = typer.Option(None, "--cards", help="Cards (repeatable or comma-separated)."),
           cuda: Optional[str] = CUDA, torch_index: Optional[str] = TORCH_INDEX, json_: bool = JSON):
    """Models x cards: upstream, port (main upgrades) or impossible (reason)."""
    cat = catalog.load()
    split = lambda vals: [v for item in vals or [] for v in item.split(",") if v] or None  # noqa: E731
    cells = grid(cat, split(models_), split(cards_), load_sources(torch_index=torch_index), cuda)
    if json_:
        return show.emit_json([c.__dict__ for c in cells])
    names = list(dict.fromkeys(c.model for c in cells))
    ids = list(dict.fromkeys(c.card for c in cells))
    by = {(c.model, c.card): c for c in cells}
    rows = []
    for cid in ids:
        row = [cid]
        for m in names:
            c = by[(m, cid)]
            row.append(c.status if c.status == "upstream" else f"{c.status}: {c.summary}")
        rows.append(row)
    show.table("models x cards", ["card", *names], rows)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
