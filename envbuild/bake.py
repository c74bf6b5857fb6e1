"""The whole models x cards matrix as a docker-bake file, for `docker buildx bake` on
remote or Kubernetes builders.

One target per (model, card) building the runtime stage of its rendered context, shared
base targets (one per distinct base image + Python, so every model on that base reuses
one cached OS/Python/venv layer set), registry cache-from/cache-to, labels, and a
per-target cap on compile jobs: with N targets building at once, each gets
builder_memory / N, so mmcv and flash-attn compiles do not run the builder out of memory.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from . import labels as label
from . import catalog, creds, outputs, packages, render
from .build import image_ref
from .config import Sources
from .errors import BadInput
from .resolve import Conflict, resolve

NETRC_ENV = "ENVBUILD_INDEX_NETRC"  # bake: the index credentials (a netrc's text) come from this variable


def _key(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def bake_file(models=None, cards=None, out_dir: Path = Path("bake"), sources: Sources | None = None,
              registry: str = "", builder_memory_gb: int = 64, parallel: int = 4, base_image: str | None = None):
    """Render every context under out_dir/contexts and return (bake dict, skipped cells)."""
    cat = catalog.load()
    sources = sources or Sources()
    models = [cat.model(m).name for m in models] if models else sorted(cat.models)
    cards = [cat.card(c).id for c in cards] if cards else list(cat.cards)  # the whole matrix by default
    if not (1 <= parallel <= 256 and 1 <= builder_memory_gb <= 65536):
        raise BadInput("--parallel must be 1-256 and --builder-memory 1-65536 (GB)", "e.g. --builder-memory 64 --parallel 4")
    targets, bases, skipped = {}, {}, []
    # Secrets as files or variables named, never their values: the CA bundle's path, and the index
    # credentials from the variable NETRC_ENV (a netrc's text) of whoever runs the bake.
    secrets = [f"id=ca_bundle,src={Path(sources.ca_bundle).resolve()}"] if sources.ca_bundle else []
    secrets += [f"id={creds.SECRET_ID},env={NETRC_ENV}"] if sources.credentials else []
    runs = {**({"secret": secrets} if secrets else {}), **({"network": sources.build_network} if sources.build_network else {})}
    cache = (registry.rstrip("/") + "/envbuild-cache") if registry else ""
    for m in models:
        for c in cards:
            try:
                plan = resolve(cat, m, c, sources=sources)
            except Conflict as exc:
                skipped.append({"model": m, "card": c, "reason": exc.message})
                continue
            name = _key(f"{m}-{c}")
            # absolute: buildx resolves a relative context from where it runs, not from the bake file
            ctx_dir = (out_dir / "contexts" / name).resolve()
            # every flag that shaped this context, so its header regenerates it anywhere
            command = f"envbuild bake --models {m} --cards {c}" + "".join(
                f" {flag} {shlex.quote(value)}" for flag, value in (("--base-image", base_image),
                                                                    ("--torch-index", sources.torch_index or "none"))
                if value)
            ctx = render.make_context(plan, command, base_image=base_image,
                                      pypi_index=sources.pypi_index)
            render.write(ctx, ctx_dir)
            base_name = _key(f"base-{ctx.base_image.split('/')[-1]}-py{plan.python.version}")
            bases.setdefault(base_name, {
                "context": str(ctx_dir), "dockerfile": "Dockerfile", "target": "base", **runs,
                **({"cache-from": [f"type=registry,ref={cache}:{base_name}"],
                    "cache-to": [f"type=registry,ref={cache}:{base_name},mode=max"]} if cache else {}),
            })
            gb = max([render.compiled_block(plan, n).gb_per_job for n in plan.compiled] + [packages.DEFAULT_GB_PER_JOB])
            jobs_cap = max(1, builder_memory_gb // (gb * parallel))
            tag = image_ref(plan, registry)
            target = {
                "context": str(ctx_dir), "dockerfile": "Dockerfile", "target": "runtime",
                "tags": [tag], "labels": {label.MODEL: m, label.CARD: c, label.CARDS: c, label.MODE: plan.mode},
                "args": {"ENVBUILD_JOBS_CAP": str(jobs_cap)},
            }
            target.update(runs)
            if cache:
                target["cache-from"] = [f"type=registry,ref={cache}:{name}", f"type=registry,ref={cache}:{base_name}"]
                target["cache-to"] = [f"type=registry,ref={cache}:{name},mode=max"]
            targets[name] = target
    if not targets:
        raise BadInput("no (model, card) pair can be built", "; ".join(s["reason"] for s in skipped)[:500])
    names = sorted(targets)
    # Groups of at most `parallel` targets: `docker buildx bake wave-1`, then wave-2, ... keeps
    # concurrent compiles within the builder's memory; `all` builds everything at once.
    waves = {f"wave-{n + 1}": {"targets": names[i:i + parallel]}
             for n, i in enumerate(range(0, len(names), parallel))}  # wave-1, wave-2, ...: consecutive
    doc = {
        "group": {"default": {"targets": sorted(bases) + names}, "bases": {"targets": sorted(bases)},
                  "all": {"targets": names}, **waves},
        "target": {**bases, **targets},
    }
    return doc, skipped


def _made_by_envbuild(text: str) -> bool:
    """A bake file envbuild wrote: its targets build envbuild's rendered contexts."""
    try:
        old = json.loads(text)
        return bool(old["target"]) and all(
            (Path(t["context"]) / outputs.MANIFEST).is_file() for t in old["target"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def check(path: Path) -> None:
    """Refuse a bake file path envbuild may not write before any context is rendered beside it."""
    outputs.check_own_file(path, _made_by_envbuild)


def write(doc: dict, path: Path) -> Path:
    """The bake file; an existing file is replaced only when it is one envbuild wrote."""
    outputs.write_own_file(path, json.dumps(doc, indent=2, sort_keys=True) + "\n", _made_by_envbuild)
    return path
