"""What a build will cost before it starts, from what earlier builds measured.

The verified ledger's records hold each stage's time (envbuild/matrices/verified/*.json:
"[wheel-flash-attn 1/1]" 4178 s on one arch); cold, unless ccache served objects an earlier,
stopped build compiled: records written since say how many compiles ccache served (the step's
"ccache" counts), and such a time is scaled up to all of its compiles (a step ccache served whole
is no measurement). Older records cannot tell, so a compiled package's time is the slowest any
record measured for the same version (else for any version of it, scaled by the objects each
release compiles where the catalog counts them: flash-attn 2.7.4.post1 85, 2.3.2 49), preferring
measurements ccache served at most half of (a few objects scaled up overshoot), then scaled:

- by archs: each arch of TORCH_CUDA_ARCH_LIST past the first (a +PTX counts as one more) adds
  EXTRA_ARCH of the one-arch time (benchmarks/results/build.json: one CUDA op for 8.0 in 60.8 s,
  for CUDA 11.8's 12 archs in 431.7 s);
- by parallel compile jobs: min(cores, memory / the package's GB per job), as max_jobs.py gives
  the build, here against the machine the records were measured on (LEDGER_MACHINE: their
  benchmarks' meta says 2 cores and 24 GB; records written since carry their own "machine");
- by cache state: a vendor's wheel, a wheel the wheel cache holds, or a wheel stage this host
  built before (BuildKit's cache keeps it unless pruned) costs ~0; one a stopped build left part
  compiled costs the objects ninja had not finished (ccache, a cache mount, holds the others).

The rest of the build (base, torch, deps, runtime stages) is what the record measured beside its
compiles. Disk: the image's size measured, plus its builder stages (build.json's ratio).
No network, no Docker: a pure function of the Plan's context, the records and the machine.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from datetime import date
from pathlib import Path

# The machine the committed records were built on (benchmarks/results/*.json "meta.machine").
LEDGER_MACHINE = {"cores": 2, "memory_gb": 24}
# benchmarks/results/build.json compile_op_s: 60.8 s for one arch, 431.7 s for 12: each further
# arch costs (431.7 / 60.8 - 1) / 11 of the first (tests/test_estimate.py checks it against the file).
EXTRA_ARCH = 0.55
# benchmarks/results/build.json ratio_runtime_to_builder_size: the builder stages are ~2x the image.
RUNTIME_TO_BUILDER = 0.506
UNMEASURED_ONE_ARCH_S = 60.8  # a package no record compiled: like the benchmark's op, said as a guess
DEFAULT_REST_S = 300.0  # no record at all: base, torch and deps stages as the fixture build measured
DEFAULT_GB_PER_JOB = 2

_WHEEL_STEP = re.compile(r"^\[wheel-([A-Za-z0-9_.-]+) \d+/\d+\] RUN ")
_PIP_STEP = re.compile(r"--no-build-isolation --no-deps (?:-v )?([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+!-]+)")
_SDIST = re.compile(r"-d /src/sdist ([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+!-]+)")
_JOBS = re.compile(r"max_jobs\.py (\d+)")


def arch_count(arch_list: str) -> int:
    """'8.0' -> 1, '8.0;9.0+PTX' -> 3: each arch compiled, and PTX as one more."""
    items = [a for a in (arch_list or "").split(";") if a.strip()]
    return max(1, len(items) + sum(1 for a in items if a.endswith("+PTX")))


def arch_factor(archs: int) -> float:
    return 1 + EXTRA_ARCH * (archs - 1)


def jobs(cores: int, memory_gb: float, gb_per_job: int) -> int:
    """Parallel compile jobs, as max_jobs.py decides them in the build."""
    return max(1, min(int(cores), int(memory_gb // max(1, gb_per_job))))


def this_machine() -> dict:
    """Cores and memory here (the builder is this host's engine, as envbuild image uses it)."""
    memory_gb = 0.0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    memory_gb = int(line.split()[1]) / (1024 * 1024)
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"cores": cores, "memory_gb": round(memory_gb or 4.0, 1)}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def measured(records: list[dict]) -> list[dict]:
    """Every compile stage the records timed: {package, version, seconds, archs, gb_per_job,
    model, machine}; and each record's rest (its other stages) as package None."""
    out = []
    for rec in records:
        machine = rec.get("machine") or LEDGER_MACHINE
        archs = arch_count((rec.get("plan") or {}).get("arch_list", ""))
        compiled = 0.0
        for stage in rec.get("stages") or []:
            step, seconds = stage.get("step", ""), stage.get("seconds")
            if seconds is None:
                continue
            wheel, pip = _WHEEL_STEP.match(step), _PIP_STEP.search(step)
            if not (wheel or pip):
                continue
            named = _SDIST.search(step) or pip
            package = _canonical(named.group(1) if named else wheel.group(1))
            version = named.group(2) if named else ""
            gb = _JOBS.search(step)
            compiled += float(seconds)
            served = stage.get("ccache") or {}
            hits, misses = served.get("hits", 0), served.get("misses", 0)
            if hits and not misses:
                continue  # ccache served every compile: says nothing of what a cold one costs
            trim = _HEAD_DIMS.search(step)
            out.append({"package": package, "version": version, "archs": archs,
                        "head_dims": _dims(trim.group(1)) if trim else (),
                        # ccache's hits took ~0 s: the step's time is what its misses cost
                        "seconds": float(seconds) * (hits + misses) / misses if hits else float(seconds),
                        "ccache_hits": hits, "compiles": hits + misses,
                        "gb_per_job": int(gb.group(1)) if gb else DEFAULT_GB_PER_JOB,
                        "model": rec["request"]["model"], "machine": machine})
        if rec.get("build_seconds") and rec.get("verdict") == "passed":
            out.append({"package": None, "seconds": max(0.0, float(rec["build_seconds"]) - compiled),
                        "model": rec["request"]["model"], "machine": machine})
    return out


def _work(m: dict) -> float:
    """A measurement as one arch on one compile job: what makes records of different archs and
    machines comparable."""
    machine = m["machine"]
    return m["seconds"] / arch_factor(m["archs"]) * jobs(machine["cores"], machine["memory_gb"], m["gb_per_job"])


def _pick(found: list[dict], package: str, version: str, scale=lambda m: 1.0) -> dict | None:
    """The measurement to price a package by: the slowest of its version, else of any version
    (scale: another release's factor to this one, its objects), among those ccache served at most
    half of (else among all).
    The slowest, because a compile ccache served from an earlier, stopped build is timed too short
    (maptr's mmcv-full 1.7.1: 55 s, where sparsedrive's mostly cold one took 1131 s); which model
    compiled it does not matter, the package's sdist is the same."""
    mine = [m for m in found if m["package"] == package]
    # A step ccache mostly served (diffusiondrive's flash-attn: 45 of 49 objects) is a few objects
    # plus the step's fixed costs (download, link); scaled to all it overshoots threefold. Such a
    # measurement prices a package only when nothing measured it mostly cold.
    colder = [m for m in mine if m.get("ccache_hits", 0) <= m.get("compiles", 0) / 2]
    for pool in ([m for m in colder if m["version"] == version], colder,
                 [m for m in mine if m["version"] == version], mine):
        if pool:
            return max(pool, key=lambda m: _work(m) * scale(m))
    return None


def built_here_file() -> Path:
    from .build import state_dir
    return state_dir() / "wheel-stages.json"


def built_here() -> dict:
    """{wheel stage key: date} of the wheel stages this host built (BuildKit's cache has them)."""
    try:
        data = json.loads(built_here_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remember_built(ctx) -> None:
    """After a build: its compiled wheel stages are in this host's BuildKit cache now."""
    done = built_here()
    keys = {stage_key(ctx, s) for s in ctx.compiled_steps if not s.vendor}
    done.update({key: date.today().isoformat() for key in keys})
    _write(built_here_file(), done)
    _write(stopped_file(), {k: v for k, v in stopped_here().items() if k not in keys})


def stopped_file() -> Path:
    from .build import state_dir
    return state_dir() / "stopped-compiles.json"


def stopped_here() -> dict:
    """{wheel stage key: {"done", "of", "date"}}: how far a stopped build's compile got (ccache has those)."""
    try:
        data = json.loads(stopped_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("done"), int)
            and isinstance(v.get("of"), int) and 0 < v["done"] <= v["of"] and isinstance(v.get("date"), str)}


def remember_stopped(ctx, progress: dict) -> None:
    """After a build that did not finish: progress is build.compiled_so_far(), {stage: (done, of)}.
    A rerun that stopped sooner (a sibling stage failed first) does not undo what ccache holds."""
    stopped = stopped_here()
    for step in ctx.compiled_steps:
        if step.stage in progress:
            done, of = progress[step.stage]
            key = stage_key(ctx, step)
            if key in stopped and stopped[key]["of"] == of:
                done = max(done, stopped[key]["done"])
            if done:
                stopped[key] = {"done": done, "of": of, "date": date.today().isoformat()}
    _write(stopped_file(), stopped)


def _write(path: Path, data: dict) -> None:
    """Whole or not at all (another envbuild may read it meanwhile)."""
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a hint for the next estimate, never a reason to fail a build


def stage_key(ctx, step) -> str:
    """What a wheel stage is built from (the wheel cache's digest of its inputs)."""
    saved = ctx.wheel_cache
    try:
        ctx.wheel_cache = "local"
        return ctx.wheel_ref(step).split(":", 1)[1]
    finally:
        ctx.wheel_cache = saved


# --trim-kernels' fixer in a wheel step (its RUN line, or render.Step.fixers): the head dims compiled
_HEAD_DIMS = re.compile(r"flash-attn-head-dims:dims=([0-9+]+)")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split("+") if d.isdigit())


def step_head_dims(step) -> tuple[int, ...]:
    """The head dims a wheel stage compiles alone (--trim-kernels), () for all."""
    trim = next((m for m in map(_HEAD_DIMS.match, step.fixers) if m), None)
    return _dims(trim.group(1)) if trim else ()


def _block(package: str):
    """(the catalog, the building block of a package or None): what counts its objects."""
    from . import catalog
    from .packages import block_for
    cat = catalog.load()
    return cat, block_for(cat, package)


def _objects(package: str, version: str, m: dict, head_dims=()) -> tuple[int, int] | None:
    """(objects this stage compiles, objects the measurement m compiled) where the catalog counts
    both and they differ: another release, or other head dims (--trim-kernels)."""
    theirs = tuple(m.get("head_dims") or ())
    if not m["version"] or (m["version"] == version and theirs == tuple(head_dims)):
        return None
    cat, block = _block(package)
    counts = (block.objects(cat, version, head_dims), block.objects(cat, m["version"], theirs)) if block else (0, 0)
    return counts if min(counts) > 0 and counts[0] != counts[1] else None


def _trimmable(plan, name: str, version: str) -> tuple[int, int] | None:
    """(objects, of all) a --trim-kernels build of this package would compile for the Plan's model,
    where its catalog entry says which kernels it calls; None where it cannot trim."""
    from .plan import Pin
    cat, block = _block(name)
    model = cat.models.get(plan.model)
    fixers = block.trim_fixers(cat, Pin(name, version, ""), model) if model and block else []
    dims = next((_dims(fx["args"]["dims"]) for fx in fixers if "dims" in fx.get("args", {})), ())
    counts = (block.objects(cat, version, dims), block.objects(cat, version)) if dims else (0, 0)
    return counts if 0 < counts[0] < counts[1] else None


def _per_object(package: str, version: str, head_dims=()):
    """A measurement's factor to this stage: its objects over the measured one's (1: not counted)."""
    def factor(m: dict) -> float:
        counts = _objects(package, version, m, head_dims)
        return counts[0] / counts[1] if counts else 1.0
    return factor


def _basis(m: dict, version: str) -> str:
    """Where a package's price comes from, in words; a time measured for another release says so
    (flash-attn 2.7.4.post1 compiles 85 objects where 2.3.2's measured time compiled 49)."""
    said = f"{m['seconds']:.0f} s for {m['archs']} arch(s) in {m['model']}'s record on {m['machine']['cores']} cores"
    if m["version"] and m["version"] != version:
        said = f"{said} ({m['package']} {m['version']}'s time; {version} has no cold measurement)"
    if m.get("ccache_hits"):
        said += f" (ccache served {m['ccache_hits']} of its {m['compiles']} compiles: scaled to all)"
    return said


def estimate(ctx, records: list[dict], machine: dict | None = None, built: dict | None = None,
             no_cache: bool = False, stopped: dict | None = None) -> dict:
    """The build's cost: {seconds, stages: [{package, seconds, why}], rest_seconds, disk_bytes, machine,
    basis}. ctx: the rendered context (render.Context) the build would use; built, stopped: what
    this host's earlier builds left (built_here(), stopped_here())."""
    plan = ctx.plan
    machine = machine or this_machine()
    built = built_here() if built is None else built
    stopped = stopped_here() if stopped is None else stopped
    found = measured(records)
    archs = arch_count(plan.arch_list)
    stages = []
    for step in ctx.compiled_steps:
        package = _canonical(step.name)
        version = step.requirement.split("==", 1)[-1]
        if step.vendor:
            stages.append({"package": step.name, "seconds": 0.0, "why": "a vendor's prebuilt wheel: downloaded"})
            continue
        if step.shared_ref and not no_cache:
            stages.append({"package": step.name, "seconds": 0.0, "why": f"in the wheel cache ({step.shared_ref})"})
            continue
        if not no_cache and stage_key(ctx, step) in built:
            stages.append({"package": step.name, "seconds": 0.0,
                           "why": f"built on this host on {built[stage_key(ctx, step)]}: BuildKit's cache "
                                  "(unless pruned since)"})
            continue
        head_dims = step_head_dims(step)
        m = _pick(found, package, version, _per_object(package, version, head_dims))
        if m is None:
            one, basis_archs = UNMEASURED_ONE_ARCH_S, 1
            basis, there = "not in the ledger: guessed like benchmarks' CUDA op", LEDGER_MACHINE
        else:
            one, basis_archs = m["seconds"] / arch_factor(m["archs"]), m["archs"]
            basis = _basis(m, version)
            there = m["machine"]
            objects = _objects(package, version, m, head_dims)
            if objects:  # another release or head dims: its time per object, for this stage's objects
                one *= objects[0] / objects[1]
                basis += f"; x{objects[0] / objects[1]:.2f} for {objects[0]} objects, not {objects[1]}"
        gb = step.gb_per_job or DEFAULT_GB_PER_JOB
        speed = jobs(there["cores"], there["memory_gb"], gb) / jobs(machine["cores"], machine["memory_gb"], gb)
        seconds = one * arch_factor(archs) * speed
        # the factor from the basis's archs to these (2347 s for 2 archs is x1.00 for 2)
        why = (f"{basis}; x{arch_factor(archs) / arch_factor(basis_archs):.2f} for {archs} arch(s), "
               f"x{speed:.2f} for {jobs(machine['cores'], machine['memory_gb'], gb)} job(s) here")
        left = stopped.get(stage_key(ctx, step))  # --no-cache too: it reruns steps, cache mounts stay
        if left:  # done == of: ccache has every object, what is left is the link
            seconds *= 1 - left["done"] / left["of"]
            why += (f"; x{1 - left['done'] / left['of']:.2f}: a build stopped on {left['date']} compiled "
                    f"{left['done']} of {left['of']} objects, which ccache keeps (unless pruned since)")
        stage = {"package": step.name, "seconds": round(seconds, 1), "why": why}
        fewer = None if head_dims else _trimmable(plan, step.name, version)
        if fewer:  # what --trim-kernels would save: said before hours go into a full compile
            stage["trim"] = {"seconds": round(seconds * fewer[0] / fewer[1], 1), "objects": fewer[0], "of": fewer[1]}
        stages.append(stage)
    rests = [m for m in found if m["package"] is None]
    own = [m["seconds"] for m in rests if m["model"] == plan.model]
    rest = max(own) if own else (statistics.median(m["seconds"] for m in rests) if rests else DEFAULT_REST_S)
    sizes = [r.get("image_size_bytes") for r in records if r.get("image_size_bytes")]
    own_sizes = [r["image_size_bytes"] for r in records
                 if r.get("image_size_bytes") and r["request"]["model"] == plan.model]
    image_bytes = max(own_sizes or sizes or [8 * 10**9])
    disk = int(image_bytes + image_bytes / RUNTIME_TO_BUILDER)
    total = round(rest + sum(s["seconds"] for s in stages), 1)
    return {"seconds": total, "stages": stages, "rest_seconds": round(rest, 1), "disk_bytes": disk,
            "image_bytes": image_bytes, "machine": machine, "archs": archs,
            "basis": "the verified ledger's stage times (envbuild/matrices/verified), scaled by archs, "
                     "compile jobs and cache state; the rest of the build as the ledger measured it"}
