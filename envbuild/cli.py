"""The envbuild command line: a thin layer over the pipeline modules.

Each command parses its options, makes one call into pipeline.py (or a stage module) and hands
the result to show.py.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import base_image, catalog, config, engine, pipeline, ship, show
from . import doctor as doctor_stage
from . import export as export_stage
from .errors import BadInput, EnvbuildError
from .pipeline import Request

def _plain_help(param) -> None:
    """Help without type noise: a flag shows no `<bool>`, a value its name (--card CARD, MODEL),
    not `<str>` or `<list[str]>`."""
    if param.metavar is None:
        param.metavar = "" if getattr(param, "is_flag", False) else param.name.strip("_").upper()
    if param.param_type_name == "argument":  # typer shows an argument's type beside its name
        param.display_type_rich = lambda ctx: None
        name = param.metavar + ("..." if param.nargs != 1 else "")
        param._usage_display_name = lambda: name if param.required else f"[{name}]"


class _PlainHelp:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the command list shows the docstring's first paragraph: one flowing line, not its source line breaks
        if self.help and not self.short_help:
            self.short_help = " ".join(inspect.cleandoc(self.help).split("\n\n")[0].split())

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            _plain_help(option)
        return option


class _Command(_PlainHelp, typer.core.TyperCommand):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            _plain_help(param)


class _Group(_PlainHelp, typer.core.TyperGroup):
    pass


app = typer.Typer(
    help="Build card-targeted container images for old GPU model stacks.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, cls=_Group,
)


def _version(value: bool) -> None:
    if value:
        from . import __version__
        print(f"envbuild {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version, metavar="",
                                       help="Print envbuild's version and exit.")):
    """Build card-targeted container images for old GPU model stacks."""

def _path(value) -> Path:
    """Every path option and argument: '' is an error, never the current folder (click makes it '.')."""
    if isinstance(value, Path):
        return value
    if not str(value).strip():
        raise typer.BadParameter("an empty path: name a file or folder ('.' for this one)")
    return Path(value)


JSON = typer.Option(False, "--json", help="Machine-readable output.")
TORCH_INDEX = typer.Option(None, "--torch-index", help="PyTorch wheel index (or mirror); 'none' = plain PyPI only.")
PYPI_INDEX = typer.Option(None, "--pypi-index", help="PyPI index URL (or mirror).")
CUDA = typer.Option(None, "--cuda", help="CUDA toolkit X.Y for the image.")
PYTHON = typer.Option(None, "--python", help="Python X.Y (default: the model's).")
STRICT = typer.Option(False, "--strict", help="Upstream pins only; fail with the reason if the card cannot run them.")
SET = typer.Option(None, "--set", help="Force a pin, PKG==VERSION (repeatable).")
COMPILE = typer.Option(False, "--compile", help="Compile every compiled package from source, even where a vendor's "
                       "prebuilt wheel covers the card.")
TRIM = typer.Option(False, "--trim-kernels", help="Compile only the kernels the model calls, where its catalog entry "
                    "says which (flash-attn: [flash_attn] head_dims): a fraction of the compile; other calls raise a "
                    "clear error.")
CARD = typer.Option(None, "--card", help="Card, or cards for one image (a800,h20), or 'portable'. Default: this host's "
                    "GPUs, else the config's card, else a portable image for every catalog card the stack runs on.")
SOURCE = typer.Option(None, "--source", parser=_path, help="Local model source tree (forks, offline builds) instead of git.")
BASE_IMAGE = typer.Option(None, "--base-image", help="Base image override (mirror, offline base).")
RUNTIME_IMAGE = typer.Option(None, "--runtime-image", help="Runtime-stage image override.")


def command(*args, on: typer.Typer | None = None, **kwargs):
    """Register a command (on app, or on a sub-app) whose expected errors become one line + exit code."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **kw):
            try:
                return fn(*a, **kw)
            except EnvbuildError as exc:
                show.error(exc)
                raise typer.Exit(exc.exit_code) from None
            except OSError as exc:  # a path given that cannot be used as one: still one line, no traceback
                if not exc.filename:
                    raise
                where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else exc.filename
                show.error(BadInput(f"{where}: {exc.strerror or exc}",
                                    "check the paths given (-o, --source, ENVBUILD_HOME) and what is at them"))
                raise typer.Exit(2) from None
            except Exception as exc:  # the engine's own errors (a stream that stalled, a closed socket)
                found = engine.failure(exc)
                if found is None:
                    raise
                show.error(found)
                raise typer.Exit(found.exit_code) from None
            except KeyboardInterrupt:
                # Cleanups ran on the way up (no tag, no container, no temp file). Exit now: a
                # worker thread still waiting on a busy daemon must not hold the exit (it did,
                # past two minutes, with the daemon cancelling a build).
                show.err.print("interrupted")
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(130)
        return (on or app).command(*args, cls=_Command, **kwargs)(inner)
    return wrap


def _progress(json_: bool, quiet: bool = False) -> pipeline.Progress:
    """Nothing with --json (stdout is the JSON); else the build's output dimmed on stderr (not with
    --quiet), notes on stderr, and the Plan's cards and the build's start on stdout."""
    if json_:
        return pipeline.QUIET
    return pipeline.Progress(echo=None if quiet else show.dim, say=show.note, planned=show.plan_cards,
                             building=show.building, estimated=show.estimate)


def _split(values: list[str] | None) -> list[str] | None:
    """Repeatable and comma-separated at once: --models a,b --models c."""
    return [v for item in values or [] for v in item.split(",") if v] or None


def _fail(failure: EnvbuildError | None) -> None:
    """After the result is shown: what the call found wrong (a failed level, card or check) decides the exit."""
    if failure is not None:
        raise failure


@command()
def models(json_: bool = JSON):
    """List the models in the catalog."""
    show.catalog_models(catalog.load(), as_json=json_)


@command()
def cards(json_: bool = JSON):
    """List the GPU cards in the catalog."""
    show.catalog_cards(catalog.load(), as_json=json_)


@command()
def add(source: str = typer.Argument(..., metavar="REPO|PATH", help="A git URL (cloned) or a local checkout."),
        commit: Optional[str] = typer.Option(None, "--commit", help="Read the repository at this commit (default: HEAD)."),
        name: Optional[str] = typer.Option(None, "--name", help="Model name (default: the repository folder's, lowercased)."),
        catalog_dir: Optional[Path] = typer.Option(None, "--catalog", parser=_path, help="User catalog folder to write "
                                                   "into (default: catalog_dir / ENVBUILD_MATRICES, else ENVBUILD_HOME/catalog)."),
        card: Optional[str] = typer.Option(None, "--card", help="Card for the verify command it prints (default: a800)."),
        force: bool = typer.Option(False, "--force", help="Replace a models/NAME.toml envbuild did not write."),
        offline: bool = typer.Option(False, "--offline", help="Do not ask the package index about the pins."),
        dry_run: bool = typer.Option(False, "--dry-run", "--print", help="Print the entry; write nothing."),
        json_: bool = JSON):
    """Draft a catalog entry from a model's repository (pins, CUDA extensions, vendored and git
    packages, construct recipe, era, fixers) into the user catalog, with questions for what it
    could not decide and the verify command to run next."""
    from . import add as add_stage
    show.added(add_stage.add_model(source, commit=commit, name=name, force=force, dry_run=dry_run, offline=offline,
                                   catalog_dir=catalog_dir, card=card), as_json=json_)


catalog_app = typer.Typer(help="Check a user catalog before using it; the field reference.", no_args_is_help=True, cls=_Group)
app.add_typer(catalog_app, name="catalog")


@command("check", on=catalog_app)
def catalog_check(folder: Optional[Path] = typer.Argument(None, parser=_path, help="User catalog folder "
                                                          "(default: ENVBUILD_MATRICES or catalog_dir)."),
                  json_: bool = JSON):
    """Validate a user catalog on top of the built-in one: a summary, or its first mistake (exit 2)."""
    result = catalog.check(folder)
    show.emit_json(result) if json_ else show.line(result["summary"])


@command("schema", on=catalog_app)
def catalog_schema(json_: bool = JSON):
    """The field reference, from the schema loading validates against: every file, table and field (markdown)."""
    from . import schema
    show.emit_json(schema.reference()) if json_ else sys.stdout.write(schema.markdown())


@command()
def base(cuda: str = typer.Option("13.0", "--cuda", help="CUDA toolkit of the base (toolchains/bases.toml)."),
         debian_mirror: str = typer.Option(base_image.DEBIAN_MIRROR, "--debian-mirror", help="Debian mirror for debootstrap."),
         pypi_index: Optional[str] = PYPI_INDEX,
         rebuild: bool = typer.Option(False, "--rebuild", help="Build again even when the images exist."),
         dry_run: bool = typer.Option(False, "--dry-run", help="Print the Dockerfile and the cards; build nothing."),
         json_: bool = JSON):
    """Build a CUDA devel base without Docker Hub: Debian from a Debian mirror, the toolkit from
    Debian non-free (11.8) or NVIDIA's PyPI wheels (13.x). Pass it to other commands with --base-image."""
    sources = pipeline.load_sources(pypi_index=pypi_index)
    index = None if sources.pypi_index == config.PYPI else sources.pypi_index
    if dry_run:
        show.base_plan(base_image.plan(catalog.load(), cuda, debian_mirror, index), as_json=json_)
        return
    result = base_image.build_base(catalog.load(), cuda, debian_mirror, index, sources.ca_bundle, rebuild,
                                   echo=(lambda _: None) if json_ else show.dim, index_auth=sources.netrc,
                                   network=sources.build_network)
    show.based(result, as_json=json_)


@command()
def resolve(model: str, card: Optional[str] = CARD,
            cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON, strict: bool = STRICT,
            set_: Optional[List[str]] = SET, compile_: bool = COMPILE, trim: bool = TRIM, torch_index: Optional[str] = TORCH_INDEX,
            pypi_index: Optional[str] = PYPI_INDEX,
            check: bool = typer.Option(False, "--check", help="Ask pip (dry run, the era's index, wheels only) whether "
                                       "the pins install together; a clash exits 2 naming the pin and the requirement."),
            json_: bool = JSON):
    """Print the Plan: what runs on the card, and why."""
    plan, verified = pipeline.resolve_plan(Request(model=model, compile_only=compile_, trim_kernels=trim, card=card, cuda=cuda, python=python, strict=strict,
                                                   overrides=set_, torch_index=torch_index, pypi_index=pypi_index))
    if not check:
        return show.resolved(plan, verified, as_json=json_)
    from . import pincheck
    sources = config.load_sources(torch_index=torch_index, pypi_index=pypi_index)
    if not json_:
        show.resolved(plan, verified)
    result = pincheck.check(plan, sources.pypi_index, sources.ca_bundle, sources.netrc,
                            echo=None if json_ else show.dim)
    show.emit_json({**plan.to_dict(), "verified": verified, "pin_check": result}) if json_ else show.line(result["line"])
    pincheck.raise_for(result)


@command()
def matrix(models_: Optional[List[str]] = typer.Option(None, "--models", help="Models (repeatable or comma-separated)."),
           cards_: Optional[List[str]] = typer.Option(None, "--cards", help="Cards (repeatable or comma-separated)."),
           cuda: Optional[str] = CUDA, torch_index: Optional[str] = TORCH_INDEX, json_: bool = JSON):
    """Models x cards: upstream, port (main upgrades) or impossible (reason)."""
    cells, marks = pipeline.matrix(_split(models_), _split(cards_), cuda=cuda, torch_index=torch_index)
    show.matrix(cells, marks, as_json=json_)


@command()
def render(model: str, card: Optional[str] = CARD, cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON,
           strict: bool = STRICT, set_: Optional[List[str]] = SET, source: Optional[Path] = SOURCE,
           base_image: Optional[str] = BASE_IMAGE, runtime_image: Optional[str] = RUNTIME_IMAGE,
           out: Optional[Path] = typer.Option(None, "-o", "--out", parser=_path, help="Output folder (default: envbuild's cache)."),
           compile_: bool = COMPILE, trim: bool = TRIM, torch_index: Optional[str] = TORCH_INDEX, pypi_index: Optional[str] = PYPI_INDEX, json_: bool = JSON):
    """Write Dockerfile, requirements.in, requirements.lock (when locked) and plan.json."""
    req = Request(model=model, compile_only=compile_, trim_kernels=trim, card=card, cuda=cuda, python=python, strict=strict, overrides=set_, source=source,
                  base_image=base_image, runtime_image=runtime_image, torch_index=torch_index, pypi_index=pypi_index)
    plan, listing = pipeline.render_context(req, out)
    show.rendered(plan, listing, as_json=json_)


@command()
def fix(path: str = typer.Argument(..., help="Model source tree."),
        list_: bool = typer.Option(False, "--list", help="Report findings, change nothing."),
        only: Optional[List[str]] = typer.Option(None, "--only", help="Run only these fixers (repeatable)."),
        mmcv: Optional[str] = typer.Option(None, "--mmcv", help="mmcv version the port uses (mmcv-version-assert)."),
        cxx_std: Optional[str] = typer.Option(None, "--cxx-std", help="C++ standard for cxx-standard (default: drop the "
                                              "old -std pin and let torch's extension builder choose)."),
        plan_file: Optional[Path] = typer.Option(None, "--plan", parser=_path, help="Apply exactly the fixers of a plan.json."),
        json_: bool = JSON):
    """Find and apply porting fixers on a model's source tree."""
    result = pipeline.fix_tree(path, only=only, mmcv=mmcv, cxx_std=cxx_std, plan_file=plan_file, dry_run=list_)
    (show.findings if list_ else show.fixes)(result, as_json=json_)
    if any(what == "could not write" for _, what, _ in result.problems):
        raise EnvbuildError("a file that needs a fix could not be written (named above); it was left as it was",
                            "make it writable (chmod u+w) and run envbuild fix again")


@command()
def lock(model: str, card: Optional[str] = CARD, cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON,
         strict: bool = STRICT, set_: Optional[List[str]] = SET, source: Optional[Path] = SOURCE,
         base_image: Optional[str] = BASE_IMAGE, runtime_image: Optional[str] = RUNTIME_IMAGE,
         out: Optional[Path] = typer.Option(None, "-o", "--out", parser=_path, help="Context folder (default: envbuild's cache)."),
         compile_: bool = COMPILE, trim: bool = TRIM, torch_index: Optional[str] = TORCH_INDEX, pypi_index: Optional[str] = PYPI_INDEX, json_: bool = JSON):
    """pip-compile --generate-hashes inside a container of the Plan's Python (the context is
    rendered again to install from the lock: pass the flags render had)."""
    req = Request(model=model, compile_only=compile_, trim_kernels=trim, card=card, cuda=cuda, python=python, strict=strict, overrides=set_,
                  source=source, base_image=base_image, runtime_image=runtime_image, torch_index=torch_index,
                  pypi_index=pypi_index)
    plan, path, ctx = pipeline.lock_context(req, out, progress=_progress(json_))
    show.locked(plan, path, ctx, as_json=json_)


@command()
def wheels(model: str, card: Optional[str] = CARD, cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON,
           set_: Optional[List[str]] = SET, base_image: Optional[str] = BASE_IMAGE,
           out: Optional[Path] = typer.Option(None, "-o", "--out", parser=_path, help="Folder for the wheels (default: envbuild's cache)."),
           compile_: bool = COMPILE, trim: bool = TRIM, torch_index: Optional[str] = TORCH_INDEX, pypi_index: Optional[str] = PYPI_INDEX, json_: bool = JSON):
    """Export the packages envbuild compiles for a Plan (mmcv, flash-attn, PyG ops) as wheels, for
    `pip install --find-links DIR` on a host without envbuild."""
    req = Request(model=model, compile_only=compile_, trim_kernels=trim, card=card, cuda=cuda, python=python, overrides=set_, base_image=base_image,
                  torch_index=torch_index, pypi_index=pypi_index)
    plan, dest, made = pipeline.export_wheels(req, out, progress=_progress(json_))
    show.wheels(plan, dest, made, as_json=json_)


@command()
def image(model: str, card: Optional[str] = CARD, cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON,
          strict: bool = STRICT, set_: Optional[List[str]] = SET, tag: Optional[List[str]] = typer.Option(
              None, "--tag", help="Extra tag(s) for the image."),
          push_: bool = typer.Option(False, "--push", help="Push the tags after the build."),
          source: Optional[Path] = SOURCE, base_image: Optional[str] = BASE_IMAGE,
          runtime_image: Optional[str] = RUNTIME_IMAGE,
          no_cache: bool = typer.Option(False, "--no-cache", help="Build every step again."),
          compile_: bool = COMPILE, trim: bool = TRIM, torch_index: Optional[str] = TORCH_INDEX, pypi_index: Optional[str] = PYPI_INDEX,
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not stream BuildKit progress."),
          smoke_: bool = typer.Option(False, "--smoke", help="Smoke-test the image and record the result in it."),
          no_lock: bool = typer.Option(False, "--no-lock", help="Install requirements.in unlocked (pip resolves at build time)."),
          dry_run: bool = typer.Option(False, "--dry-run", help="Print the Plan, its cards, stages and the build's "
                                       "estimated time and disk; build, lock and write nothing."),
          time_limit: Optional[int] = typer.Option(None, "--time-limit", min=60, help=(
              "Stop the build after this many seconds and say what it was still compiling "
              "(a rerun continues from the cache).")),
          json_: bool = JSON):
    """Resolve, render, lock (first time), build (BuildKit), tag, optionally smoke-test and push.
    The build's estimated time (from the verified ledger) is printed before it starts."""
    req = Request(model=model, compile_only=compile_, trim_kernels=trim, card=card, cuda=cuda, python=python, strict=strict, overrides=set_, source=source,
                  base_image=base_image, runtime_image=runtime_image, torch_index=torch_index, pypi_index=pypi_index)
    if dry_run:
        show.dry_run(pipeline.estimate_image(req, no_cache=no_cache), as_json=json_)
        return
    summary = pipeline.build_image(req, tags=tag or (), lock=not no_lock, no_cache=no_cache, smoke=smoke_,
                                   push=push_, progress=_progress(json_, quiet), time_limit=time_limit)
    show.image(summary, as_json=json_)


@command()
def verify(model: str, card: Optional[str] = CARD, cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON,
           source: Optional[Path] = SOURCE, base_image: Optional[str] = BASE_IMAGE,
           runtime_image: Optional[str] = RUNTIME_IMAGE, compile_: bool = COMPILE, trim: bool = TRIM, torch_index: Optional[str] = TORCH_INDEX,
           pypi_index: Optional[str] = PYPI_INDEX, json_: bool = JSON,
           time_limit: Optional[int] = typer.Option(None, "--time-limit", min=60, help=(
               "Stop the build after this many seconds and record what it was still compiling "
               "(a rerun continues from the cache)."))):
    """Build a cell from the model's real source, audit it, smoke env + model, and record the result
    (passed, or the exact failure) in the verified ledger."""
    req = Request(model=model, compile_only=compile_, trim_kernels=trim, card=card, cuda=cuda, python=python, source=source, base_image=base_image,
                  runtime_image=runtime_image, torch_index=torch_index, pypi_index=pypi_index)
    result = pipeline.verify_cell(req, time_limit=time_limit, progress=_progress(json_))
    show.verified(result, as_json=json_)
    _fail(result.failure)


@command()
def push(ref: str = typer.Argument(..., help="Local image reference."), json_: bool = JSON):
    """Push an image to its registry."""
    digest = ship.push(ref, echo=_progress(json_).echo)
    show.pushed(ref, digest, as_json=json_)


@command()
def pull(model: str, card: Optional[str] = CARD, cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON,
         strict: bool = STRICT, set_: Optional[List[str]] = SET,
         registry: Optional[str] = typer.Option(None, "--registry", help="Registry prefix, e.g. 127.0.0.1:5000/"),
         compile_: bool = COMPILE, trim: bool = TRIM, torch_index: Optional[str] = TORCH_INDEX, json_: bool = JSON):
    """Pull the image for a model and card (tag derived from the Plan), after a driver check."""
    req = Request(model=model, compile_only=compile_, trim_kernels=trim, card=card, cuda=cuda, python=python, strict=strict, overrides=set_,
                  torch_index=torch_index)
    show.pulled(pipeline.pull_image(req, registry=registry), as_json=json_)


@command()
def images(json_: bool = JSON):
    """Local envbuild images, with a Plan summary read from their labels."""
    show.images(ship.local_images(), as_json=json_)


@command()
def audit(image_ref: str = typer.Argument(..., metavar="IMAGE"),
          card: Optional[str] = typer.Option(None, "--card", help="Card(s) to judge against, a800,h20 (default: the image's)."),
          timeout: int = typer.Option(1800, "--timeout", min=1, help="Seconds the scan container may run (default 1800)."),
          json_: bool = JSON):
    """Every compiled extension's SASS/PTX archs; exit 1 when any cannot run on the card."""
    reports, failure = pipeline.audit_image(image_ref, card, timeout=timeout)
    show.audit(image_ref, reports, as_json=json_)
    _fail(failure)


@command()
def smoke(target: str = typer.Argument(..., metavar="IMAGE|MODEL"),
          card: Optional[str] = typer.Option(None, "--card", help="The card this run is for (default: this host's GPU); "
                                             "with MODEL, also picks its image like image --card."),
          cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON,
          gpus: str = typer.Option("all", "--gpus", help="all, N, or none."),
          level: Optional[str] = typer.Option(None, "--level", help="env,model,arch,ops,comm,train,io (default: all)."),
          steps: int = typer.Option(20, "--steps", min=2, help="Training steps."),
          recipe: str = typer.Option("synthetic", "--recipe", help="synthetic, model (the catalog's recipe) or both."),
          data: Optional[Path] = typer.Option(None, "--data", parser=_path, help="Data folder for the model's recipe (e.g. nuScenes-mini)."),
          ckpt_dir: Optional[Path] = typer.Option(None, "--ckpt-dir", parser=_path, help="Where the io level writes a checkpoint (NAS, CPFS)."),
          ops_check: Optional[Path] = typer.Option(None, "--ops-check", parser=_path, help="A file defining check(device) for the model's ops."),
          compile_: bool = typer.Option(False, "--compile", help="torch.compile the synthetic net (torch >= 2.0)."),
          ipc_host: bool = typer.Option(False, "--ipc-host", help="Share the host's IPC namespace instead of a sized /dev/shm."),
          comm_timeout: int = typer.Option(120, "--comm-timeout", min=1, help="Seconds before an all-reduce counts as hung."),
          ckpt_mb: int = typer.Option(64, "--ckpt-mb", min=1, help="Checkpoint size for the io level; size it like the model's (weights + optimizer)."),
          report: Optional[Path] = typer.Option(None, "--report", parser=_path, help="Write the JSON report here."),
          force: bool = typer.Option(False, "--force", help="Replace a --report file envbuild did not write."),
          timeout: int = typer.Option(3600, "--timeout", min=1, help="Seconds the smoke container may run (default 3600)."),
          json_: bool = JSON):
    """Prove the image works on the card: env, arch, ops, comm, train, io."""
    data_, failure = pipeline.smoke_image(
        target, card=card, cuda=cuda, python=python, level=level, gpus=gpus, recipe=recipe, report=report,
        steps=steps, data=str(data) if data else None, ckpt_dir=str(ckpt_dir) if ckpt_dir else None,
        ops_check=str(ops_check) if ops_check else None, compile_model=compile_, ipc_host=ipc_host,
        comm_timeout=comm_timeout, ckpt_mb=ckpt_mb, force=force, timeout=timeout)
    show.smoke(data_, report, as_json=json_)
    _fail(failure)


@command()
def compare(reports: List[Path] = typer.Argument(..., help="Smoke reports (JSON) from different cards."),
            out: Path = typer.Option(Path("compare.html"), "-o", "--out", parser=_path, help="HTML file to write."),
            force: bool = typer.Option(False, "--force", help="Replace an -o file envbuild did not write.")):
    """One HTML page comparing cards: loss curves, throughput, step time."""
    show.line(f"wrote {pipeline.compare_reports(reports, out, force=force)}")


@command()
def doctor(json_: bool = JSON):
    """Host checks: engine, BuildKit, NVIDIA runtime, GPUs vs catalog, driver vs images, shm, disk, P2P."""
    results = doctor_stage.run_all()
    show.doctor(results, as_json=json_)
    if any(r.status == "fail" for r in results):
        raise typer.Exit(1)


@command()
def export(target: str = typer.Argument(..., metavar="IMAGE|MODEL"),
           card: Optional[str] = typer.Option(None, "--card", help="With MODEL: its image for this card, as image --card."),
           cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON,
           format_: str = typer.Option("tar", "--format", help="tar (compressed docker save) or apptainer."),
           out: Path = typer.Option(Path("."), "-o", "--out", parser=_path, help="Output folder."),
           force: bool = typer.Option(False, "--force", help="Replace files in -o that envbuild did not export."),
           json_: bool = JSON):
    """Export an image for hosts without Docker or without a registry."""
    show.exported(pipeline.export_image(target, format_, out, card=card, cuda=cuda, python=python, force=force),
                  format_, as_json=json_)


@command()
def load(file: Path = typer.Argument(..., parser=_path, help="An archive from envbuild export."), json_: bool = JSON):
    """Verify an exported archive's checksum, then load it into the local engine."""
    show.loaded(export_stage.load(file), as_json=json_)


@command()
def bake(models_: Optional[List[str]] = typer.Option(None, "--models", help="Models (default: all)."),
         cards_: Optional[List[str]] = typer.Option(None, "--cards", help="Cards (default: every catalog card)."),
         out: Path = typer.Option(Path("bake/docker-bake.json"), "-o", "--out", parser=_path, help="Bake file to write."),
         registry: Optional[str] = typer.Option(None, "--registry", help="Registry for tags and the build cache."),
         builder_memory: int = typer.Option(64, "--builder-memory", help="GB of memory per builder."),
         parallel: int = typer.Option(4, "--parallel", help="Targets built at once per builder."),
         cuda: Optional[str] = CUDA, python: Optional[str] = PYTHON,
         source: Optional[List[str]] = typer.Option(None, "--source", help=(
             "MODEL=PATH: a local source tree for that model (a bare PATH when one model is baked).")),
         base_image: Optional[str] = BASE_IMAGE, runtime_image: Optional[str] = RUNTIME_IMAGE,
         torch_index: Optional[str] = TORCH_INDEX, pypi_index: Optional[str] = PYPI_INDEX,
         build_: bool = typer.Option(False, "--build", help="Build the file here with docker buildx bake, wave by wave."),
         push_: bool = typer.Option(False, "--push", help="With --build: push every image (and its cache) to --registry."),
         time_limit: Optional[int] = typer.Option(None, "--time-limit", min=60, help="With --build: stop after this many seconds."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not stream BuildKit progress."),
         print_: bool = typer.Option(False, "--print", help="Print the resolved bake plan."), json_: bool = JSON):
    """A docker-bake file for the models x cards matrix (docker buildx bake here with --build, or on remote builders)."""
    if push_ and not build_:
        raise BadInput("--push pushes what --build builds", "add --build, or run docker buildx bake --push yourself")
    progress = _progress(json_, quiet)
    path, doc, skipped, sources = pipeline.bake_matrix(
        _split(models_), _split(cards_), out=out, registry=registry, builder_memory=builder_memory, parallel=parallel,
        base_image=base_image, runtime_image=runtime_image, torch_index=torch_index, pypi_index=pypi_index,
        cuda=cuda, python=python, sources=tuple(source or ()), for_here=build_, progress=progress)
    built = pipeline.bake_build(path, doc, sources, push=push_, progress=progress, time_limit=time_limit) if build_ else None
    show.baked(path, doc, skipped, parallel, built, as_json=print_ or json_)


def _terminated(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    """Bad options and arguments are bad input like any other: one line, a hint, exit 2."""
    from .creds import RedactingStream  # no password of an index URL is ever printed
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    # `kill` (SIGTERM: a CI timeout, a supervisor) cleans up like Ctrl-C: no container, tag or temp
    # file is left behind (a killed lock left its pip-compile container running).
    signal.signal(signal.SIGTERM, _terminated)
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
