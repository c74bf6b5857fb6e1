"""The envbuild command line: a thin layer over the pipeline modules."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import catalog, show
from .config import load_sources
from .errors import EnvbuildError
from .resolve import grid

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
CARD = typer.Option(None, "--card", help="Card, or cards for one image (a800,h20). Default: this host's GPUs, "
                    "else the config's card, else a portable image for every catalog card the stack runs on.")


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
                # Cleanups ran on the way up (no tag, no container, no temp file). Exit now: a
                # worker thread still waiting on a busy daemon must not hold the exit (it did,
                # past two minutes, with the daemon cancelling a build).
                show.err.print("interrupted")
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(130)
        return app.command(*args, **kwargs)(inner)
    return wrap


@command()
def models(json_: bool = JSON):
    """List the models in the catalog."""
    cat = catalog.load()
    rows = []
    for m in cat.models.values():
        rows.append({"name": m.name, "title": m.title, "python": m.python, "torch": f"{m.torch}",
                     "cuda": m.cuda, "repo": m.repo, "commit": m.commit,
                     "extensions": [e.name for e in m.extensions], "launcher": m.train.launcher,
                     "description": m.description, "from": m.origin})
    if json_:
        return show.emit_json(rows)
    show.table("models", ["name", "python", "torch", "CUDA", "extensions", "launcher", "description", "from"],
               [[r["name"], r["python"], r["torch"], r["cuda"], ", ".join(r["extensions"]) or "-",
                 r["launcher"], r["description"], r["from"]] for r in rows])


@command()
def cards(json_: bool = JSON):
    """List the GPU cards in the catalog."""
    cat = catalog.load()
    rows = [{"id": c.id, "name": c.name, "cc": c.cc, "memory_gb": c.memory_gb, "p2p": c.p2p,
             "aliases": list(c.aliases), "from": c.origin} for c in cat.cards.values()]
    if json_:
        return show.emit_json(rows)
    show.table("cards", ["id", "name", "compute capability", "memory GB", "P2P", "aliases", "from"],
               [[r["id"], r["name"], r["cc"], r["memory_gb"], "yes" if r["p2p"] else "NO",
                 ", ".join(r["aliases"]), r["from"]] for r in rows])


@command()
def resolve(model: str, card: Optional[str] = CARD,
            cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON, strict: bool = STRICT,
            set_: Optional[List[str]] = SET, torch_index: Optional[str] = TORCH_INDEX,
            pypi_index: Optional[str] = PYPI_INDEX, json_: bool = JSON):
    """Print the Plan: what runs on the card, and why."""
    from .pipeline import plan_for
    from . import ledger
    plan, sources = plan_for(_request(model, card, cuda, python, strict, set_, torch_index=torch_index,
                                      pypi_index=pypi_index))
    verified = ledger.status(plan, {"model": plan.model, "card": ",".join(plan.cards), "python": python,
                                    "cuda": cuda, "torch_index": sources.torch_index or "none"})
    if json_:
        return show.emit_json({**plan.to_dict(), "verified": verified})
    show.plan(plan)
    show.out.print(f"  ledger      {verified}", markup=False)


@command()
def matrix(models_: Optional[List[str]] = typer.Option(None, "--models", help="Models (repeatable or comma-separated)."),
           cards_: Optional[List[str]] = typer.Option(None, "--cards", help="Cards (repeatable or comma-separated)."),
           cuda: Optional[str] = CUDA, torch_index: Optional[str] = TORCH_INDEX, json_: bool = JSON):
    """Models x cards: upstream, port (main upgrades) or impossible (reason)."""
    cat = catalog.load()
    split = lambda vals: [v for item in vals or [] for v in item.split(",") if v] or None  # noqa: E731
    from . import ledger
    cells = grid(cat, split(models_), split(cards_), load_sources(torch_index=torch_index), cuda)
    marks = ledger.marks(cat)
    if json_:
        return show.emit_json([{**c.__dict__, "verified": marks.get((c.model, c.card), "")} for c in cells])
    names = list(dict.fromkeys(c.model for c in cells))
    ids = list(dict.fromkeys(c.card for c in cells))
    by = {(c.model, c.card): c for c in cells}
    rows = []
    for cid in ids:
        row = [cid]
        for m in names:
            c = by[(m, cid)]
            mark = f" [{marks[(m, cid)]}]" if (m, cid) in marks else ""
            row.append((c.status if c.status == "upstream" else f"{c.status}: {c.summary}") + mark)
        rows.append(row)
    show.table("models x cards", ["card", *names], rows)


SOURCE = typer.Option(None, "--source", help="Local model source tree (forks, offline builds) instead of git.")
BASE_IMAGE = typer.Option(None, "--base-image", help="Base image override (mirror, offline base).")
RUNTIME_IMAGE = typer.Option(None, "--runtime-image", help="Runtime-stage image override.")


def _request(model, card, cuda=None, python=None, strict=False, set_=None, source=None, base_image=None,
             runtime_image=None, torch_index=None, pypi_index=None):
    from .pipeline import Request
    return Request(model, card, cuda, python, strict, tuple(set_ or ()), source, base_image, runtime_image,
                   torch_index, pypi_index)


@command()
def render(model: str, card: Optional[str] = CARD, cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON,
           strict: bool = STRICT, set_: Optional[List[str]] = SET, source: Optional[Path] = SOURCE,
           base_image: Optional[str] = BASE_IMAGE, runtime_image: Optional[str] = RUNTIME_IMAGE,
           out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output folder (default: envbuild's cache)."),
           torch_index: Optional[str] = TORCH_INDEX, pypi_index: Optional[str] = PYPI_INDEX, json_: bool = JSON):
    """Write Dockerfile, requirements.in, requirements.lock (when locked) and plan.json."""
    from .pipeline import prepare
    req = _request(model, card, cuda, python, strict, set_, source and str(source), base_image, runtime_image,
                   torch_index, pypi_index)
    plan, _, ctx = prepare(req, out)
    files = sorted(str(p.relative_to(ctx)) for p in ctx.iterdir())
    locked = (ctx / "requirements.lock").exists()
    if json_:
        return show.emit_json({"dir": str(ctx), "files": files, "locked": locked, "mode": plan.mode})
    show.out.print(f"rendered {plan.model} for {plan.card_name} ({plan.mode}) into {ctx}", markup=False)
    _print_cards(plan)
    for name in files:
        show.out.print(f"  {name}", markup=False)
    if not locked:
        show.out.print(f"not locked yet: envbuild lock {plan.model} --card {','.join(plan.cards)} "
                       "(envbuild image locks first by itself)", markup=False)


@command()
def fix(path: str = typer.Argument(..., help="Model source tree."),
        list_: bool = typer.Option(False, "--list", help="Report findings, change nothing."),
        only: Optional[List[str]] = typer.Option(None, "--only", help="Run only these fixers (repeatable)."),
        mmcv: Optional[str] = typer.Option(None, "--mmcv", help="mmcv version the port uses (mmcv-version-assert)."),
        cxx_std: Optional[str] = typer.Option(None, "--cxx-std", help="C++ standard for cxx-standard (default: drop the "
                                              "old -std pin and let torch's extension builder choose)."),
        plan_file: Optional[Path] = typer.Option(None, "--plan", help="Apply exactly the fixers of a plan.json."),
        json_: bool = JSON):
    """Find and apply porting fixers on a model's source tree."""
    import json as _json
    from . import fixers as fx
    from .errors import BadInput
    if not path.strip():
        raise BadInput("the source tree path is empty", "name the model's folder, e.g. envbuild fix ./MapTR")
    if not Path(path).is_dir():
        raise BadInput(f"{path} is not a directory", "name the model's source folder")
    if plan_file:
        try:
            chosen = fx.fixers_from_plan(_json.loads(plan_file.read_text()))
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
            raise BadInput(f"cannot use plan {plan_file}: {exc}",
                           "pass the plan.json that envbuild render wrote") from None
    else:
        names = [n for item in (only or []) for n in item.split(",") if n] or list(fx.FIXERS)
        for name in names:
            if name not in fx.FIXERS:
                from .errors import unknown
                raise unknown("fixer", name, list(fx.FIXERS))
        args = {"mmcv-version-assert": {"mmcv": mmcv} if mmcv is not None else {},
                "cxx-standard": {"std": cxx_std} if cxx_std is not None else {}}
        try:
            chosen = [fx.make(n, args.get(n)) for n in names if not (n == "mmcv-version-assert" and mmcv is None)]
        except ValueError as exc:
            raise BadInput(str(exc).replace("mmcv=", "--mmcv ").replace("std=", "--cxx-std "),
                           "--mmcv takes a version like 1.7.2; --cxx-std one of c++14, c++17, c++20") from None
    if list_:
        findings = fx.detect(str(path), chosen)
        if json_:
            return show.emit_json([f.to_dict() for f in findings])
        for f in findings:
            show.out.print(f"{f.path}:{f.line}: {f.fixer}: {f.why}", markup=False)
        show.out.print(f"{len(findings)} finding(s); nothing changed", markup=False)
        return
    try:
        report = fx.apply(str(path), chosen)
    except fx.FixerError as exc:
        from .errors import OperationFailed
        raise OperationFailed(str(exc), "report it with the file; apply the other fixers with --only") from None
    if json_:
        return show.emit_json(report)
    for name, files in report.items():
        show.out.print(f"{name}: {len(files)} file(s) changed", markup=False)
        for f in files:
            show.out.print(f"  {f}", markup=False)


@command()
def lock(model: str, card: Optional[str] = CARD, cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON,
         strict: bool = STRICT, set_: Optional[List[str]] = SET, base_image: Optional[str] = BASE_IMAGE,
         out: Optional[Path] = typer.Option(None, "-o", "--out", help="Context folder (default: envbuild's cache)."),
         torch_index: Optional[str] = TORCH_INDEX, pypi_index: Optional[str] = PYPI_INDEX, json_: bool = JSON):
    """pip-compile --generate-hashes inside a container of the Plan's Python."""
    from .lock import lock as run_lock
    from .pipeline import prepare
    req = _request(model, card, cuda, python, strict, set_, None, base_image, None, torch_index, pypi_index)
    plan, sources, ctx = prepare(req, out)
    path = run_lock(ctx, ca_bundle=sources.ca_bundle, echo=None if json_ else _echo_dim)
    plan, sources, ctx = prepare(req, out)  # re-render: the Dockerfile now installs from the lock
    if json_:
        return show.emit_json({"lock": str(path), "torch_lock": str(ctx / "torch.lock"), "dir": str(ctx)})
    show.out.print(f"locked {plan.model} for {plan.card_name}: {path}", markup=False)


@command()
def wheels(model: str, card: Optional[str] = CARD, cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON,
           set_: Optional[List[str]] = SET, base_image: Optional[str] = BASE_IMAGE,
           out: Optional[Path] = typer.Option(None, "-o", "--out", help="Folder for the wheels (default: envbuild's cache)."),
           torch_index: Optional[str] = TORCH_INDEX, pypi_index: Optional[str] = PYPI_INDEX, json_: bool = JSON):
    """Export the packages envbuild compiles for a Plan (mmcv, flash-attn, PyG ops) as wheels, for
    `pip install --find-links DIR` on a host without envbuild."""
    from .pipeline import export_wheels
    req = _request(model, card, cuda, python, False, set_, None, base_image, None, torch_index, pypi_index)
    plan, dest, made = export_wheels(req, out, echo=None if json_ else _echo_dim, say=None if json_ else _say)
    if json_:
        return show.emit_json({"dir": str(dest), "wheels": made})
    show.out.print(f"{len(made)} wheel(s) for {plan.model} on {', '.join(plan.cards)} in {dest}", markup=False)
    for w in made:
        show.out.print(f"  {w['package']} {w['version']}  torch {w['torch']}, CUDA {w['cuda']}, Python {w['python']}, "
                       f"arch {w['arch_list']}, {w['size_bytes'] / 1e6:.1f} MB", markup=False)
    show.out.print(f"install: pip install --find-links {dest} <package>==<version>", markup=False)


def _echo_dim(line: str) -> None:
    show.err.print(line, markup=False, style="dim")


def _say(line: str) -> None:
    show.err.print(line, markup=False)


def _print_cards(plan) -> None:
    show.out.print(f"for     {', '.join(plan.cards)}  ({plan.cards_why})", markup=False)


@command()
def image(model: str, card: Optional[str] = CARD, cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON,
          strict: bool = STRICT, set_: Optional[List[str]] = SET, tag: Optional[List[str]] = typer.Option(
              None, "--tag", help="Extra tag(s) for the image."),
          push_: bool = typer.Option(False, "--push", help="Push the tags after the build."),
          source: Optional[Path] = SOURCE, base_image: Optional[str] = BASE_IMAGE,
          runtime_image: Optional[str] = RUNTIME_IMAGE,
          no_cache: bool = typer.Option(False, "--no-cache", help="Build every step again."),
          torch_index: Optional[str] = TORCH_INDEX, pypi_index: Optional[str] = PYPI_INDEX,
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not stream BuildKit progress."),
          smoke_: bool = typer.Option(False, "--smoke", help="Smoke-test the image and record the result in it."),
          no_lock: bool = typer.Option(False, "--no-lock", help="Install requirements.in unlocked (pip resolves at build time)."),
          json_: bool = JSON):
    """Resolve, render, lock (first time), build (BuildKit), tag, optionally smoke-test and push."""
    from . import ship
    from .pipeline import build_image, prepare_image
    req = _request(model, card, cuda, python, strict, set_, source and str(source), base_image, runtime_image,
                   torch_index, pypi_index)
    echo = None if (json_ or quiet) else _echo_dim
    if not json_:  # which cards, and why, before the (long) lock and build
        from .pipeline import plan_for
        _print_cards(plan_for(req)[0])
    plan, sources, ctx, lock_note, tags = prepare_image(req, tag, lock=not no_lock, echo=echo,
                                                        say=None if json_ else _say)
    # --push sends the tags that name a registry: the default one only when a registry is configured
    to_push = tags if sources.registry else tags[1:]
    if push_ and not to_push:
        from .errors import BadInput
        raise BadInput("--push: no registry to push to", "set registry in the config (ENVBUILD_REGISTRY) "
                       "or add --tag REGISTRY/NAME:TAG")
    if not json_:
        show.out.print(f"building {tags[0]} ({plan.mode}) from {ctx}", markup=False)
    summary = build_image(plan, sources, ctx, lock_note, tags, no_cache=no_cache, echo=echo)
    if smoke_:
        from . import smoke as smoke_stage
        report = smoke_stage.run(tags[0], smoke_stage.parse_levels(None), card=_card_here(catalog.load(), None))
        summary["smoke"] = smoke_stage.summary(report)
        summary["build_image_id"] = summary["image_id"]
        summary["image_id"] = smoke_stage.record(tags, report)  # every tag moves to the labelled image
        if not report["ok"]:
            from .errors import OperationFailed
            raise OperationFailed(f"image built ({tags[0]}) but its smoke test failed: "
                                  + ", ".join(k for k, v in summary["smoke"]["levels"].items() if v == "failed"))
    if push_:
        summary["pushed"] = {t: ship.push(t, echo=echo) for t in to_push}
    if json_:
        return show.emit_json(summary)
    show.out.print(f"image   {summary['image_id']}", markup=False)
    for t in tags:
        show.out.print(f"tag     {t}", markup=False)
    show.out.print(f"size    {summary['size_bytes'] / 1e9:.2f} GB   build {summary['build_seconds']:.0f}s   "
                   f"cache hits {summary['cached_steps']}/{summary['steps']} steps", markup=False)
    for step in summary["run_steps"]:
        state = "cached" if step["cached"] else f"{step['seconds'] or 0:.1f}s"
        show.out.print(f"  {state:>8}  {step['step'][:110]}", markup=False)
    for ref, digest in summary.get("pushed", {}).items():
        show.out.print(f"pushed  {ref}@{digest}", markup=False)
    show.out.print(f"lock    {lock_note}", markup=False)
    show.out.print(f"log     {summary['log']}", markup=False)


@command()
def verify(model: str, card: Optional[str] = CARD, cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON,
           source: Optional[Path] = SOURCE, base_image: Optional[str] = BASE_IMAGE,
           runtime_image: Optional[str] = RUNTIME_IMAGE, torch_index: Optional[str] = TORCH_INDEX,
           pypi_index: Optional[str] = PYPI_INDEX, json_: bool = JSON):
    """Build a cell from the model's real source, audit it, smoke env + model, and record the result
    (passed, or the exact failure) in the verified ledger."""
    from . import audit as audit_stage, ledger, smoke as smoke_stage
    from .errors import OperationFailed
    from .pipeline import build_image, prepare_image
    from .resolve import parse_cards
    req = _request(model, card, cuda, python, False, None, source and str(source), base_image, runtime_image,
                   torch_index, pypi_index)
    echo = None if json_ else _echo_dim
    plan, sources, ctx, lock_note, tags = prepare_image(req, (), echo=echo, say=None if json_ else _say)
    request = {"model": plan.model, "card": ",".join(plan.cards), "python": python, "cuda": cuda,
               "torch_index": sources.torch_index or "none"}
    summary, audit_ok, report, failure = {}, None, None, ""
    try:
        summary = build_image(plan, sources, ctx, lock_note, tags, echo=echo)
        libs = audit_stage.scan(tags[0])
        audits = [audit_stage.audit(tags[0], c, libs) for c in parse_cards(catalog.load(), list(plan.cards))]
        audit_ok = all(a["ok"] for a in audits)
        if not audit_ok:
            failure = "audit: " + "; ".join(f for a in audits for f in a["failures"])
        report = smoke_stage.run(tags[0], ["env", "model"], gpus="none")
        bad = {k: v for k, v in report["levels"].items() if v.get("status") != "passed"}
        if bad and not failure:
            failure = "; ".join(f"smoke {k}: {v.get('reason') or _first_problem(v)}" for k, v in bad.items())
    except OperationFailed as exc:
        failure = exc.message.splitlines()[0] + (f" (log: {exc.log})" if exc.log else "")
    if summary:
        summary = ledger.with_cold_times(plan, summary)
    path = ledger.write(plan, request, summary, audit_ok, report, failure, model=catalog.load().model(plan.model))
    status = ledger.status(plan, request)
    if json_:
        show.emit_json({"record": str(path), "status": status})
    else:
        show.out.print(f"{plan.model} on {', '.join(plan.cards)}: {status}", markup=False)
        show.out.print(f"record  {path}", markup=False)
    if failure:
        raise OperationFailed(f"{plan.model} is not verified: {failure}", log=str(path))


def _first_problem(level: dict) -> str:
    found = [f"{p['name']}: {'; '.join(p['problems'])}" for p in level.get("packages", []) if not p.get("ok")]
    found += [f"{e['path']}: {e['error']}" for e in level.get("extensions", []) if e.get("ok") is False
              and e.get("required", True)]
    return (found or [level.get("reason") or level.get("status", "?")])[0][:300]


@command()
def push(ref: str = typer.Argument(..., help="Local image reference."), json_: bool = JSON):
    """Push an image to its registry."""
    from . import build as build_stage
    from . import ship
    digest = ship.push(build_stage.check_ref(ref), echo=None if json_ else _echo_dim)
    if json_:
        return show.emit_json({"image": ref, "digest": digest})
    show.out.print(f"pushed {ref}@{digest}", markup=False)


@command()
def pull(model: str, card: Optional[str] = CARD, cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON,
         strict: bool = STRICT, set_: Optional[List[str]] = SET,
         registry: Optional[str] = typer.Option(None, "--registry", help="Registry prefix, e.g. 127.0.0.1:5000/"),
         torch_index: Optional[str] = TORCH_INDEX, json_: bool = JSON):
    """Pull the image for a model and card (tag derived from the Plan), after a driver check."""
    from . import build as build_stage
    from . import ship
    from .pipeline import plan_for
    plan, sources = plan_for(_request(model, card, cuda, python, strict, set_, torch_index=torch_index))
    prefix = load_sources(registry=registry).registry if registry else sources.registry
    ref = build_stage.image_ref(plan, prefix)
    result = ship.pull(ref, plan.min_driver, plan.compat_driver, plan.cuda, plan.cards)
    if json_:
        return show.emit_json(result)
    show.out.print(f"pulled {ref} ({result['id']})", markup=False)
    show.out.print(f"driver: {result['driver']}: {result['driver_reason']}", markup=False)
    for card_id, verdict in result["validated"].items():
        show.out.print(f"validated for {card_id}: {verdict}", markup=False)


@command()
def images(json_: bool = JSON):
    """Local envbuild images, with a Plan summary read from their labels."""
    from . import ship
    rows = ship.local_images()
    if json_:
        return show.emit_json(rows)
    show.table("envbuild images", ["id", "tags", "model", "card", "mode", "torch", "CUDA", "arch", "size GB"],
               [[r["id"], "\n".join(r["tags"]) or "<untagged>", r["model"], r["card"], r["mode"], r["torch"],
                 r["cuda"], r["arch_list"], f"{r['size_bytes'] / 1e9:.2f}"] for r in rows])


@command()
def audit(image_ref: str = typer.Argument(..., metavar="IMAGE"),
          card: Optional[str] = typer.Option(None, "--card", help="Card(s) to judge against, a800,h20 (default: the image's)."),
          json_: bool = JSON):
    """Every compiled extension's SASS/PTX archs; exit 1 when any cannot run on the card."""
    from . import audit as audit_stage
    from .errors import BadInput, OperationFailed
    from .resolve import parse_cards
    cat = catalog.load()
    from .export import local_image
    local_image(image_ref)  # a missing or unusable reference is said as such
    names = card or audit_stage.image_cards(image_ref)
    if not names:
        raise BadInput(f"{image_ref} has no io.envbuild.cards label", "pass --card CARD[,CARD]")
    libs = audit_stage.scan(image_ref)
    reports = [audit_stage.audit(image_ref, c, libs) for c in parse_cards(cat, names)]
    if json_:
        show.emit_json(reports[0] if len(reports) == 1 else reports)
    for report in reports if not json_ else []:
        show.table(f"{image_ref} on {report['card_name']} ({report['cc']})", ["library", "kind", "SASS", "PTX", "runs via"],
                   [[lib["path"], lib["kind"], " ".join(lib["sass"]) or "-", " ".join(lib["ptx"]) or "-", lib["via"] or "NOTHING"]
                    for lib in report["libraries"]])
        for warning in report["warnings"]:
            show.err.print(f"warning: {warning}", markup=False)
        verdict = (f"all {len(report['libraries'])} libraries with GPU code run on {report['card_name']}" if report["ok"]
                   else f"FAILS on {report['card_name']}: " + "; ".join(report["failures"]))
        show.out.print(verdict, markup=False)
    failing = [r for r in reports if not r["ok"]]
    if failing:
        raise OperationFailed("; ".join(
            f"{len(r['failures'])} librar{'y' if len(r['failures']) == 1 else 'ies'} cannot run on {r['card_name']}"
            + (f" (torch's own build: {', '.join(sorted(r['torch_failures']))})" if r["torch_failures"] else "")
            for r in failing))


@command()
def smoke(target: str = typer.Argument(..., metavar="IMAGE|MODEL"),
          card: Optional[str] = typer.Option(None, "--card", help="The card this run is for (default: this host's GPU); "
                                             "with MODEL, also picks its image like image --card."),
          cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON,
          gpus: str = typer.Option("all", "--gpus", help="all, N, or none."),
          level: Optional[str] = typer.Option(None, "--level", help="env,model,arch,ops,comm,train,io (default: all)."),
          steps: int = typer.Option(20, "--steps", min=2, help="Training steps."),
          recipe: str = typer.Option("synthetic", "--recipe", help="synthetic, model (the catalog's recipe) or both."),
          data: Optional[Path] = typer.Option(None, "--data", help="Data folder for the model's recipe (e.g. nuScenes-mini)."),
          ckpt_dir: Optional[Path] = typer.Option(None, "--ckpt-dir", help="Where the io level writes a checkpoint (NAS, CPFS)."),
          ops_check: Optional[Path] = typer.Option(None, "--ops-check", help="A file defining check(device) for the model's ops."),
          compile_: bool = typer.Option(False, "--compile", help="torch.compile the synthetic net (torch >= 2.0)."),
          ipc_host: bool = typer.Option(False, "--ipc-host", help="Share the host's IPC namespace instead of a sized /dev/shm."),
          comm_timeout: int = typer.Option(120, "--comm-timeout", min=1, help="Seconds before an all-reduce counts as hung."),
          ckpt_mb: int = typer.Option(64, "--ckpt-mb", min=1, help="Checkpoint size for the io level; size it like the model's (weights + optimizer)."),
          report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report here."),
          json_: bool = JSON):
    """Prove the image works on the card: env, arch, ops, comm, train, io."""
    from . import build as build_stage
    from . import smoke as smoke_stage
    from .errors import BadInput, OperationFailed
    if recipe not in ("synthetic", "model", "both"):
        raise BadInput(f"--recipe {recipe!r} is not a recipe", "choose synthetic, model or both")
    if gpus != "all" and gpus != "none" and not gpus.isdigit():
        raise BadInput(f"--gpus {gpus!r} is not a GPU request", "all, N or none")
    image_ref = target
    cat = catalog.load()
    if target.lower() in cat.models:
        from .pipeline import plan_for
        plan, sources = plan_for(_request(target, card, cuda, python))
        image_ref = build_stage.image_ref(plan, sources.registry)
    data_ = smoke_stage.run(image_ref, smoke_stage.parse_levels(level), gpus=gpus, steps=steps, recipe=recipe,
                            data=str(data) if data else None, ckpt_dir=str(ckpt_dir) if ckpt_dir else None,
                            ops_check=str(ops_check) if ops_check else None, compile_model=compile_, ipc_host=ipc_host,
                            comm_timeout=comm_timeout, ckpt_mb=ckpt_mb, card=_card_here(cat, card))
    if report:
        report.write_text(json.dumps(data_, indent=2, sort_keys=True) + "\n")
    if json_:
        show.emit_json(data_)
    else:
        _print_smoke(data_, report)
    if not data_["ok"]:
        failed = [k for k, v in data_["levels"].items() if v["status"] == "failed"]
        raise OperationFailed(f"smoke failed: {', '.join(failed)}", log=str(report) if report else "")


def _card_here(cat, card: str | None):
    """The card a smoke run is for: the one named, else this host's first GPU, else None."""
    from . import host
    if card:
        from .resolve import parse_cards
        cards = parse_cards(cat, card)
        if len(cards) != 1:
            from .errors import BadInput
            raise BadInput("smoke runs on one card at a time: pass one --card", "run it once per card, then envbuild compare")
        return cards[0]
    gpus = host.gpus()
    return host.match_card(cat, gpus[0]["name"]) if gpus else None


def _print_smoke(data_, report):
    env = data_.get("environment", {})
    show.out.print(f"{data_['image']} on {', '.join(env.get('gpus') or []) or 'no GPU (CPU levels only)'}", markup=False)
    from .smoke import LEVELS
    for name in [l for l in LEVELS if l in data_["levels"]]:
        lvl = data_["levels"][name]
        detail = lvl.get("reason", "")
        if name == "train" and lvl.get("runs"):
            detail = "; ".join(_train_summary(rname, lvl["runs"][rname])
                               for rname in ("synthetic", "synthetic_compiled", "model") if rname in lvl["runs"])
        if name == "io" and lvl.get("status") == "passed":
            detail = f"checkpoint {lvl['size_mb']} MB: write {lvl['write_MBps']} MB/s, read {lvl['read_MBps']} MB/s"
        if name == "env" and "packages" in lvl:
            detail = (f"{len(lvl['packages'])} packages, {len(lvl.get('extensions', []))} compiled extensions loaded; "
                      f"{lvl.get('failed', 0)} failed")
            if lvl.get("optional_failures"):
                detail += f"; {len(lvl['optional_failures'])} outside the Plan did not load (not needed by it)"
        if name == "model" and lvl.get("status") == "passed":
            detail = f"{lvl['object']} built from the model's own code: {lvl['parameters']:,} parameters"
            if lvl.get("step"):
                detail += (f"; training step on a synthetic batch: loss {lvl['step']['loss']:.4g}, "
                           f"{lvl['step']['grads']} parameters got gradients")
        if name == "comm" and lvl.get("works_with"):
            detail = f"all-reduce over {lvl['gpus']} GPU(s) works with {lvl['works_with']}"
        if name == "ops" and lvl.get("checks"):
            detail = f"{sum(c['ok'] for c in lvl['checks'])}/{len(lvl['checks'])} op checks match their reference"
        show.out.print(f"  {name:6} {lvl['status']:8} {detail}", markup=False)
        for problem in _smoke_findings(name, lvl):
            show.out.print(f"         {problem}", markup=False)
    if report:
        show.out.print(f"report: {report}", markup=False)


def _train_summary(name: str, run: dict) -> str:
    label = {"synthetic": "synthetic", "synthetic_compiled": "torch.compile", "model": "model recipe"}[name]
    if run.get("status") != "passed":
        return f"{label}: {run.get('status')}" + (f" ({run['reason']})" if run.get("reason") else "")
    if name == "synthetic":
        return (f"synthetic: {run['samples_per_s']} samples/s, step {run['step_time_s']}s, "
                f"data wait {run['data_wait_share']:.0%}, loss {run['first_loss']:.3f} -> {run['last_loss']:.3f}")
    if name == "synthetic_compiled":
        return f"torch.compile: {run.get('speedup_vs_eager')}x eager samples/s"
    return f"model recipe: passed in {run.get('wall_s')}s ({run.get('steps')} steps)"


def _smoke_findings(name: str, lvl: dict) -> list[str]:
    """The lines under a level that say what went wrong, or what was not checked."""
    found = [f"{p['name']}: {'; '.join(p['problems'])}" for p in lvl.get("packages", []) if not p.get("ok")]
    found += [f"{e['path']}: {e['error']}" + ("" if e.get("required", True) else " (outside the Plan: reported only)")
              for e in lvl.get("extensions", []) if e.get("ok") is False]
    found += list(lvl.get("problems") or [])
    found += [f"{c['op']}: {c['detail']}" for c in lvl.get("checks", []) if not c["ok"]]
    found += [f"{a['setting']}: {a.get('error', '').strip()[-200:]}" for a in lvl.get("attempts", []) if not a["ok"]]
    if lvl.get("unchecked"):
        found.append(f"no op check ran on: {', '.join(lvl['unchecked'])}")
    return found


@command()
def compare(reports: List[Path] = typer.Argument(..., help="Smoke reports (JSON) from different cards."),
            out: Path = typer.Option(Path("compare.html"), "-o", "--out", help="HTML file to write.")):
    """One HTML page comparing cards: loss curves, throughput, step time."""
    from . import compare as compare_stage
    from .render import write_own_file
    page = compare_stage.page(compare_stage.load(reports))
    write_own_file(out, page, lambda text: compare_stage.GENERATOR in text)
    show.out.print(f"wrote {out}", markup=False)


@command()
def doctor(json_: bool = JSON):
    """Host checks: engine, BuildKit, NVIDIA runtime, GPUs vs catalog, driver vs images, shm, disk, P2P."""
    from . import doctor as doctor_stage
    results = doctor_stage.run_all()
    if json_:
        show.emit_json([r.__dict__ for r in results])
    else:
        show.table("envbuild doctor", ["check", "status", "reason"], [[r.name, r.status, r.reason] for r in results])
    if any(r.status == "fail" for r in results):
        raise typer.Exit(1)


@command()
def export(image_ref: str = typer.Argument(..., metavar="IMAGE"),
           format_: str = typer.Option("tar", "--format", help="tar (compressed docker save) or apptainer."),
           out: Path = typer.Option(Path("."), "-o", "--out", help="Output folder."), json_: bool = JSON):
    """Export an image for hosts without Docker or without a registry."""
    from . import export as export_stage
    from .errors import BadInput
    if format_ not in ("tar", "apptainer"):
        raise BadInput(f"--format {format_!r} is not a format", "choose tar or apptainer")
    result = export_stage.export_tar(image_ref, out) if format_ == "tar" else export_stage.export_apptainer(image_ref, out)
    if json_:
        return show.emit_json(result)
    show.out.print(f"archive   {result['archive']} ({result['bytes'] / 1e9:.2f} GB, sha256 {result['sha256'][:16]}...)", markup=False)
    show.out.print(f"manifest  {result['manifest']}", markup=False)
    if format_ == "apptainer":
        show.out.print(f"apptainer {result['definition']}", markup=False)
        show.out.print(f"sif       {result['sif'] or result.get('sif_note')}", markup=False)


@command()
def load(file: Path = typer.Argument(..., help="An archive from envbuild export."), json_: bool = JSON):
    """Verify an exported archive's checksum, then load it into the local engine."""
    from . import export as export_stage
    result = export_stage.load(file)
    if json_:
        return show.emit_json(result)
    show.out.print(f"checksum ok; loaded {', '.join(result['loaded'])} ({', '.join(result['tags'])})", markup=False)


@command()
def bake(models_: Optional[List[str]] = typer.Option(None, "--models", help="Models (default: all)."),
         cards_: Optional[List[str]] = typer.Option(None, "--cards", help="Cards (default: every catalog card)."),
         out: Path = typer.Option(Path("bake/docker-bake.json"), "-o", "--out", help="Bake file to write."),
         registry: Optional[str] = typer.Option(None, "--registry", help="Registry for tags and the build cache."),
         builder_memory: int = typer.Option(64, "--builder-memory", help="GB of memory per builder."),
         parallel: int = typer.Option(4, "--parallel", help="Targets built at once per builder."),
         base_image: Optional[str] = BASE_IMAGE, torch_index: Optional[str] = TORCH_INDEX,
         print_: bool = typer.Option(False, "--print", help="Print the resolved bake plan."), json_: bool = JSON):
    """A docker-bake file for the models x cards matrix (docker buildx bake on remote builders)."""
    from . import bake as bake_stage
    split = lambda vals: [v for item in vals or [] for v in item.split(",") if v] or None  # noqa: E731
    sources = load_sources(torch_index=torch_index, registry=registry)
    doc, skipped = bake_stage.bake_file(split(models_), split(cards_), out.parent, sources, sources.registry,
                                        builder_memory, parallel, base_image)
    path = bake_stage.write(doc, out)
    if print_ or json_:
        show.emit_json({"file": str(path), "bake": doc, "skipped": skipped})
        return
    targets = [n for n, t in doc["target"].items() if t.get("target") == "runtime"]
    show.out.print(f"wrote {path}: {len(targets)} image target(s), {len(doc['group']['bases']['targets'])} shared base(s), "
                   f"{len([g for g in doc['group'] if g.startswith('wave-')])} wave(s) of <= {parallel}", markup=False)
    for s_ in skipped:
        show.out.print(f"  skipped {s_['model']} on {s_['card']}: {s_['reason']}", markup=False)
    show.out.print(f"build: docker buildx bake -f {path} wave-1 (then wave-2, ...), or `all` on a big builder", markup=False)


def main() -> None:
    """Bad options and arguments are bad input like any other: one line, a hint, exit 2."""
    from .errors import BadInput
    try:
        code = app(standalone_mode=False, prog_name="envbuild")
    except Exception as exc:
        # Matched by class name: typer raises click's exceptions or, from 0.2x, its own copies.
        kinds = {c.__name__ for c in type(exc).__mro__}
        ctx = getattr(exc, "ctx", None)
        if "NoArgsIsHelpError" in kinds:
            print(ctx.get_help() if ctx else "envbuild --help")
            raise SystemExit(0) from None
        if "Abort" in kinds:  # Ctrl-C outside a command's own handling
            show.err.print("interrupted")
            raise SystemExit(130) from None
        if "UsageError" not in kinds:
            raise
        show.error(BadInput(" ".join(exc.format_message().split()), f"{ctx.command_path if ctx else 'envbuild'} --help"))
        raise SystemExit(2) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
