"""The whole models x cards matrix as a docker-bake file, for `docker buildx bake` here or on
remote or Kubernetes builders, and the run of that file here (`envbuild bake --build`).

One target per (model, card) building the runtime stage of its rendered context, shared
base targets (one per distinct base image + Python, so every model on that base reuses
one cached OS/Python/venv layer set), registry cache-from/cache-to, labels, and a
per-target cap on compile jobs: with N targets building at once, each gets
builder_memory / N, so mmcv and flash-attn compiles do not run the builder out of memory.
The contexts are rendered by pipeline.prepare(), the same function `image` uses.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from . import labels as label
from . import build as build_stage
from . import creds, engine, outputs, packages, render
from .build import image_ref
from .estimate import arch_count
from .config import Sources
from .errors import BadInput, OperationFailed
from .plan import Plan

NETRC_ENV = "ENVBUILD_INDEX_NETRC"  # bake: the index credentials (a netrc's text) come from this variable
INLINE_CACHE = "type=inline"  # the cache every driver can write: it travels in the image it describes


def target_name(model: str, card: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in f"{model}-{card}").strip("-")


@dataclass(frozen=True)
class Cell:
    """One (model, card) target: its Plan, its rendered context and the base image it starts from."""

    plan: Plan
    context: Path
    base_image: str

    @property
    def name(self) -> str:
        return target_name(self.plan.model, self.plan.card)

    @property
    def base_target(self) -> str:
        return target_name(f"base-{self.base_image.split('/')[-1]}-py{self.plan.python.version}", "")


def bake_file(cells: list[Cell], sources: Sources, registry: str = "", builder_memory_gb: int = 64,
              parallel: int = 4) -> dict:
    """The bake document for rendered cells (absolute contexts: buildx resolves relative ones
    from where it runs, not from the bake file)."""
    check_limits(builder_memory_gb, parallel)
    if not cells:
        raise BadInput("no (model, card) pair can be built")
    # Secrets as files or variables named, never their values: the CA bundle's path, and the index
    # credentials from the variable NETRC_ENV (a netrc's text) of whoever runs the bake.
    secrets = [f"id=ca_bundle,src={Path(sources.ca_bundle).resolve()}"] if sources.ca_bundle else []
    secrets += [f"id={creds.SECRET_ID},env={NETRC_ENV}"] if sources.credentials else []
    runs = {**({"secret": secrets} if secrets else {}), **({"network": sources.build_network} if sources.build_network else {})}
    cache = (registry.rstrip("/") + "/envbuild-cache") if registry else ""
    targets, bases = {}, {}
    for cell in cells:
        bases.setdefault(cell.base_target, {
            "context": str(cell.context), "dockerfile": "Dockerfile", "target": "base", **runs,
            **({"cache-from": [f"type=registry,ref={cache}:{cell.base_target}"],
                "cache-to": [f"type=registry,ref={cache}:{cell.base_target},mode=max"]} if cache else {}),
        })
        plan = cell.plan
        archs = arch_count(plan.arch_list)
        gb = max([render.compiled_block(plan, n).job_gb(archs) for n in plan.compiled] + [packages.DEFAULT_GB_PER_JOB])
        tag = image_ref(plan, registry)
        target = {
            "context": str(cell.context), "dockerfile": "Dockerfile", "target": "runtime",
            "tags": [tag], "labels": {label.MODEL: plan.model, label.CARD: plan.card, label.CARDS: plan.card,
                                      label.MODE: plan.mode},
            "args": {"ENVBUILD_JOBS_CAP": str(max(1, builder_memory_gb // (gb * parallel)))},
            **runs,
        }
        if cache:  # its own cache, its base's, and the image itself (a docker-driver build's inline cache)
            target["cache-from"] = [f"type=registry,ref={cache}:{cell.name}",
                                    f"type=registry,ref={cache}:{cell.base_target}", f"type=registry,ref={tag}"]
            target["cache-to"] = [f"type=registry,ref={cache}:{cell.name},mode=max"]
        targets[cell.name] = target
    names = sorted(targets)
    # Groups of at most `parallel` targets: `docker buildx bake wave-1`, then wave-2, ... keeps
    # concurrent compiles within the builder's memory; `all` builds everything at once.
    waves = {f"wave-{n + 1}": {"targets": names[i:i + parallel]}
             for n, i in enumerate(range(0, len(names), parallel))}  # wave-1, wave-2, ...: consecutive
    return {
        "group": {"default": {"targets": sorted(bases) + names}, "bases": {"targets": sorted(bases)},
                  "all": {"targets": names}, **waves},
        "target": {**bases, **targets},
    }


def check_limits(builder_memory_gb: int, parallel: int) -> None:
    if not (1 <= parallel <= 256 and 1 <= builder_memory_gb <= 65536):
        raise BadInput("--parallel must be 1-256 and --builder-memory 1-65536 (GB)", "e.g. --builder-memory 64 --parallel 4")


def waves(doc: dict) -> list[str]:
    return sorted((g for g in doc["group"] if g.startswith("wave-")), key=lambda g: int(g.split("-")[1]))


def run(path: Path, doc: dict, sources: Sources, push: bool = False, echo=None,
        time_limit: float | None = None) -> dict:
    """`docker buildx bake` the file here, one wave after another, through the current builder.
    Returns {driver, waves: [{group, seconds, logs, run_steps}], images: {target: {tag, image_id, labels}}}
    and, where the targets were built one at a time, one_at_a_time: why.

    The default `docker` driver cannot export a cache to a registry (buildx refuses the file):
    there each target writes an inline cache instead (its own layers, not the stages it copies
    from), which its pushed image carries and the next bake's cache-from can read back; on an
    engine older than engine.CONCURRENT_INLINE_CACHE_ENGINE, one target at a time (see there)."""
    cli = engine.find_cli()
    if cli.mode != "buildx":
        raise OperationFailed(f"bake --build needs the docker buildx plugin; {cli.path} has none",
                              "install docker-buildx (Debian 13's package installs on Debian 12) or docker-buildx-plugin")
    driver = build_stage.builder_driver(cli)
    options = ["--set", f"*.cache-to={INLINE_CACHE}"] if driver == "docker" else []
    options += ["--push"] if push else ["--load"] if driver != "docker" else []
    version = engine_major() if driver == "docker" else None
    serial = version is not None and engine.inline_caches_one_at_a_time(version)
    deadline = time.monotonic() + time_limit if time_limit else None
    env = {NETRC_ENV: sources.netrc} if sources.credentials else {}
    result = {"driver": driver, "waves": [], "images": {}}
    if serial:
        result["one_at_a_time"] = (f"Docker {version}'s BuildKit crashes on two inline-cache exports at once "
                                   f"(moby/buildkit#2889): each wave's targets built one at a time")
    for group in waves(doc):
        runs, targets = [], doc["group"][group]["targets"]
        for what in targets if serial else [group]:
            left = deadline - time.monotonic() if deadline else None
            if left is not None and left <= 0:
                raise OperationFailed(f"bake stopped at its time limit before {what}", log=None)
            alone = []  # built alone, a target has the memory its wave shared: its compile jobs' cap times the wave's size
            if serial and len(targets) > 1:
                cap = int(doc["target"][what]["args"]["ENVBUILD_JOBS_CAP"]) * len(targets)
                alone = ["--set", f"{what}.args.ENVBUILD_JOBS_CAP={cap}"]
            cmd = [cli.path, "buildx", "bake", "-f", str(path), "--progress=plain", *options, *alone, what]
            runs.append(build_stage.run_bake(cli, cmd, f"bake-{what}", echo, left, env))
        result["waves"].append({"group": group, "seconds": round(sum(r["seconds"] for r in runs), 1),
                                "logs": [r["log"] for r in runs], "run_steps": [s for r in runs for s in r["run_steps"]]})
    names = [t for g in waves(doc) for t in doc["group"][g]["targets"]]
    if push and driver != "docker":  # a remote builder pushed them; nothing came back to this daemon
        result["images"] = {n: {"tag": doc["target"][n]["tags"][0], "image_id": None, "labels": doc["target"][n]["labels"]}
                            for n in names}
        return result
    client = engine.client()
    for name in names:
        tag = doc["target"][name]["tags"][0]
        image = client.images.get(tag)
        result["images"][name] = {"tag": tag, "image_id": image.id,
                                  "labels": {k: v for k, v in (image.labels or {}).items() if k.startswith(label.PREFIX)}}
    return result


def engine_major() -> int:
    return engine.major(engine.client().version().get("Version"))


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
