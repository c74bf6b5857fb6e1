"""Build stage: build context -> image, through BuildKit (docker CLI), tagged only on success.

The image is built untagged (--iidfile) and tagged through the SDK after the build
succeeded, so a failed or interrupted build never leaves a half-tagged image.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import creds, engine
from .errors import BadInput, BuildStopped, OperationFailed
from .resolve import Plan

TAG_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
REF_RE = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$")
STEP_RE = re.compile(r"^#(\d+) (\[.+?\] .*)$")
CACHED_RE = re.compile(r"^#(\d+) CACHED$")
DONE_RE = re.compile(r"^#(\d+) DONE ([\d.]+)s$")
ERROR_RE = re.compile(r"^#(\d+) ERROR: (.*)$")


def state_dir() -> Path:
    base = os.environ.get("ENVBUILD_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "envbuild")
    path = Path(base)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"ENVBUILD_HOME {path}: {exc.strerror or exc}", "point ENVBUILD_HOME at a folder envbuild may write") from None
    return path


def image_ref(plan: Plan, registry: str = "") -> str:
    """The Plan's image reference, the one place it is composed: envbuild/MODEL (under `registry`,
    a prefix such as 127.0.0.1:5000/, when given) and a tag encoding model ref, Python, CUDA, torch
    and target archs."""
    torch = plan.torch.version.split("+")[0]
    cuda = "".join(plan.cuda.split(".")[:2])
    arch = plan.arch_list.replace(".", "").replace("+PTX", "ptx").replace(";", "-")
    tag = f"{plan.commit[:7]}-py{plan.python.version}-cu{cuda}-torch{torch}-sm{arch}"
    tag = TAG_CHARS.sub("-", tag)[:128]
    repo = f"{registry.rstrip('/')}/envbuild/{plan.model}" if registry else f"envbuild/{plan.model}"
    ref = f"{repo}:{tag}"
    if not REF_RE.match(ref):
        raise OperationFailed(f"cannot make a valid image reference from {ref!r}")
    return ref


def split_ref(ref: str) -> tuple[str, str]:
    """(repository, tag) of an image reference; a registry port is not a tag."""
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return repo, tag


def check_ref(ref: str) -> str:
    if len(ref) > 255 or not REF_RE.match(ref):  # Docker's limit for a reference's name
        shown = f"{ref[:120]!r}... ({len(ref)} characters)" if len(ref) > 120 else repr(ref)
        raise BadInput(f"not a valid image reference: {shown}", "e.g. registry.local:5000/team/maptr:h20")
    return ref


@dataclass
class Step:
    number: int
    name: str
    cached: bool = False
    seconds: float | None = None
    error: str | None = None
    output: list = field(default_factory=list)


@dataclass
class BuildResult:
    image_id: str
    tags: list
    size: int
    seconds: float
    steps: list
    log: str

    @property
    def cache_hits(self) -> list:
        return [s for s in self.steps if s.cached]

    def summary(self) -> dict:
        return {
            "image_id": self.image_id, "tags": self.tags, "size_bytes": self.size,
            "build_seconds": round(self.seconds, 1), "log": self.log,
            "steps": len(self.steps), "cached_steps": len(self.cache_hits),
            "run_steps": run_steps(self.steps),
        }


def run_steps(steps: list[Step]) -> list[dict]:
    """The RUN steps of a build, each with its cache hit and seconds (and, for a step that
    compiled, how many compiles ccache served): what summaries and ledger records report."""
    out = []
    for s in steps:
        if "] RUN " in s.name:
            served = ccache_counts(s.output)
            out.append({"step": s.name, "cached": s.cached, "seconds": s.seconds,
                        **({"ccache": served} if served else {})})
    return out


CCACHE_RE = re.compile(r"^envbuild-ccache: (\d+) hits, (\d+) misses$")


def ccache_counts(output: list[str]) -> dict | None:
    """{hits, misses} that incontainer/ccache_stats.py printed at the end of a compiling step."""
    for line in reversed(output):
        m = CCACHE_RE.match(line.strip())
        if m:
            return {"hits": int(m.group(1)), "misses": int(m.group(2))}
    return None


def parse_progress(lines) -> list[Step]:
    """Steps of a BuildKit --progress=plain log: name, cache hit, time, error, output."""
    steps: dict[int, Step] = {}
    for line in lines:
        line = line.rstrip("\n")
        m = STEP_RE.match(line)
        if m:
            n = int(m.group(1))
            steps.setdefault(n, Step(n, m.group(2)))
            continue
        m = CACHED_RE.match(line)
        if m and int(m.group(1)) in steps:
            steps[int(m.group(1))].cached = True
            continue
        m = DONE_RE.match(line)
        if m and int(m.group(1)) in steps:
            steps[int(m.group(1))].seconds = float(m.group(2))
            continue
        m = ERROR_RE.match(line)
        if m and int(m.group(1)) in steps:
            steps[int(m.group(1))].error = m.group(2)
            continue
        m = re.match(r"^#(\d+) [\d.]+ (.*)$", line)
        if m and int(m.group(1)) in steps:
            steps[int(m.group(1))].output.append(m.group(2))
    return [steps[k] for k in sorted(steps)]


def failure_excerpt(output: list[str], errors: int = 12, tail: int = 12) -> list[str]:
    """The lines a person needs: compiler/pip error lines first, then the last lines."""
    marked = [l for l in output if re.search(r"\berror\b|Error:|fatal", l)][:errors]
    last = [l for l in output[-tail:] if l not in marked]
    return marked + (["..."] if marked and last else []) + last


def _log_path(name: str) -> Path:
    logs = state_dir() / "logs"
    logs.mkdir(exist_ok=True)
    return logs / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def _run(cli, cmd, log_path: Path, echo, time_limit: float | None = None, env: dict | None = None
         ) -> tuple[int, list[str]]:
    """Run a docker build command, teeing its plain progress into the log. Past time_limit
    seconds the client is stopped (BuildKit cancels the build) and
    OperationFailed names the steps that were still running. env: variables added for the CLI."""
    lines = []
    with open(log_path, "w") as log:
        log.write(creds.redact("$ " + " ".join(cmd)) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**cli.env(), **(env or {})}, bufsize=1, start_new_session=True)
        # Its own flag: Timer.cancel() sets the timer's `finished` event too, so that event cannot
        # tell a build the limit stopped from one that failed on its own.
        limit_hit = threading.Event()
        timer = threading.Timer(time_limit, lambda: (limit_hit.set(), _stop(proc))) if time_limit else None
        if timer:
            timer.start()
        # A daemon that answers /_ping but not the build leaves the CLI silent: BuildKit prints its
        # first step within seconds of the daemon taking the build, so a silent start is stopped.
        started, silent = threading.Event(), threading.Event()
        start_wait = engine.engine_timeout()
        watchdog = threading.Timer(start_wait, lambda: None if started.is_set() else (silent.set(), _signal(proc, signal.SIGKILL)))
        watchdog.daemon = True
        watchdog.start()
        # Once started, a daemon that stalls mid-build leaves the CLI silent too. Compiles print
        # (ninja's [k/n], pip -v), so silence past the bound means nobody is building.
        last, quiet, done = [time.monotonic()], threading.Event(), threading.Event()
        bound = silence_bound()
        threading.Thread(target=_silence_watch, args=(proc, last, bound, quiet, done), daemon=True).start()
        try:
            for line in proc.stdout:
                last[0] = time.monotonic()
                if line.startswith("#"):  # a BuildKit step: the daemon took the build
                    started.set()
                line = creds.redact(line)  # what the build printed is kept and shown without a password
                log.write(line)
                lines.append(line)
                if echo:
                    echo(line.rstrip("\n"))
            rc = proc.wait()
        except KeyboardInterrupt:
            _stop(proc)
            raise
        finally:
            watchdog.cancel()
            done.set()
            if timer:
                timer.cancel()
    if silent.is_set():
        raise engine.stalled("the build (docker build printed nothing)", start_wait)
    if quiet.is_set():
        raise OperationFailed(f"the build printed nothing for {bound:g} s while running: {still_running(lines)}; the "
                              f"Docker daemon at {engine.host()} may have stopped answering",
                              f"{engine.HINT}; a step that is only slow and silent: raise {SILENCE_ENV}",
                              log=str(log_path))
    if limit_hit.is_set() and rc != 0:
        raise BuildStopped(f"build stopped at its time limit ({time_limit:.0f} s) while running: "
                              + still_running(lines),
                              "run it again to continue: BuildKit's cache keeps the finished steps and ccache "
                              "(a cache mount) the objects a stopped compile finished", log=str(log_path))
    return rc, lines


SILENCE_ENV = "ENVBUILD_BUILD_SILENCE"
SILENCE = 3600.0  # seconds a started build may print nothing before it counts as stalled


def silence_bound() -> float:
    return engine._seconds(SILENCE_ENV, SILENCE)


def _silence_watch(proc, last: list, bound: float, quiet: threading.Event, done: threading.Event) -> None:
    """Stop the build client when it has printed nothing for `bound` seconds (BuildKit cancels)."""
    while not done.wait(min(5.0, bound / 4)):
        if time.monotonic() - last[0] > bound:
            quiet.set()
            _stop(proc)
            return


def _unfinished_runs(lines) -> list[Step]:
    """The RUN steps of a plain-progress log that had not finished (FROM and [internal] steps often
    print no DONE: they are not work)."""
    return [s for s in parse_progress(lines) if "] RUN " in s.name and not (s.cached or s.seconds or s.error)]


def still_running(lines) -> str:
    """The RUN steps that had not finished, with ninja's count where there is one."""
    return "; ".join(_progress_of(s) for s in _unfinished_runs(lines)) or "nothing (it was finishing)"


def compiled_so_far(lines) -> dict[str, tuple[int, int]]:
    """{stage: (objects ninja finished, of how many)} for each compile of a build that did not
    finish, the ones it left running and the ones that finished (of, of): ccache (a cache mount
    BuildKit keeps) holds those objects, so a rerun compiles only the rest."""
    found = {}
    for step in parse_progress(lines):
        if "] RUN " not in step.name or step.cached or step.error:
            continue
        counts = _ninja_count(step)
        if counts:
            found[step.name[1:].split(" ", 1)[0]] = (counts[1], counts[1]) if step.seconds else counts
    return found


def _ninja_count(step: Step) -> tuple[int, int] | None:
    """ninja's last [finished/total] in a step's output (printed as each object finishes); None where
    the step ran ninja more than once (torch builds each extension of a package with its own ninja,
    the count starting again: the last count is not the package's)."""
    counts = [(int(m.group(1)), int(m.group(2))) for line in step.output
              if (m := re.match(r"\s*\[(\d+)/(\d+)\]", line))]
    if not counts or any(b[0] < a[0] or b[1] != a[1] for a, b in zip(counts, counts[1:])):
        return None
    return counts[-1]


def _stopped(log_path: Path, on_stop) -> None:
    """Tell on_stop how far the compiles got, from the build's log (what an interrupted run saw)."""
    if on_stop is None:
        return
    try:
        on_stop(compiled_so_far(log_path.read_text(errors="replace").splitlines()))
    except Exception:  # noqa: BLE001 - a hint for the next estimate must not hide why the build stopped
        pass


def _signal(proc, sig) -> None:
    """Signal the client and what it started: `docker buildx` runs as a plugin child of `docker`,
    which keeps the output pipe open when only its parent is stopped."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc) -> None:
    _signal(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _signal(proc, signal.SIGKILL)


def _progress_of(step: Step) -> str:
    """A running step's name, with how far its compile got where ninja counts ([12/96])."""
    counts = _ninja_count(step)
    done = f" (ninja: {counts[0]} of {counts[1]} compiled)" if counts else ""
    return step.name.split("] ", 1)[0] + "]" + done


# BuildKit's words when its cache names a layer the engine's image store no longer has (seen after
# `docker image prune` removed untagged images whose layers cached steps still pointed at)
LOST_LAYER = "layer does not exist"
# and when a record names a layer the engine never unpacked (seen after dockerd crashed mid-export)
BROKEN_RECORD = "extract requires an applier"
# the client's words when the engine closed the build's stream (seen when dockerd crashed mid-bake)
ENGINE_GONE = "error reading from server: EOF"


# A step BuildKit reports with ERROR and then goes on from: a cache-from ref the registry lacks
# (the first build of a cell, or a cache another builder never pushed) costs cache, not the build
NON_FATAL_STEPS = ("importing cache manifest from ",)


def _fail(rc: int, steps, lines, log_path: Path):
    failed = next((s for s in steps if s.error and not any(n in s.name for n in NON_FATAL_STEPS)), None)
    if failed:
        detail = f"step {failed.name} failed: {failed.error}\n" + "\n".join(failure_excerpt(failed.output))
    else:  # the client's own last words ("ERROR: failed to solve: ...") first, then the tail
        said = [line for line in lines if line.startswith("ERROR")][-3:]
        detail = "".join(said + [line for line in lines[-25:] if line not in said])
    hint = ""
    if any(ENGINE_GONE in line for line in lines[-5:]):
        hint = "the Docker engine dropped the build mid-way (it may have crashed: its log says why); " + engine.HINT
    if any(LOST_LAYER in line or BROKEN_RECORD in line for line in lines[-40:]):
        hint = ("BuildKit's cache points at layers the engine no longer has: `docker builder prune -af --filter "
                "type=regular` drops those records (the next build runs those steps again; the ccache and pip "
                "cache mounts stay, so compiles are fast)")
    raise OperationFailed(f"build failed (exit {rc})\n{detail}".rstrip(), hint, log=str(log_path))


def _options(ca_bundle: str | None, netrc: str | None, network: str = "") -> list[str]:
    """The build's secrets (each mounted only for the RUN steps that name it, never in a layer) and network."""
    cmd = []
    if ca_bundle:
        cmd += ["--secret", f"id=ca_bundle,src={ca_bundle}"]
    if netrc:  # the index credentials: a file outside the context, deleted after the build
        cmd += ["--secret", f"id={creds.SECRET_ID},src={netrc}"]
    if network:
        cmd += ["--network", network]
    return cmd


def buildx_inspect(cli) -> subprocess.CompletedProcess:
    """`docker buildx inspect`: the current builder's driver, nodes and GC policy."""
    try:
        return subprocess.run([cli.path, "buildx", "inspect"], capture_output=True, text=True,
                              timeout=engine.engine_timeout(), env=cli.env())
    except subprocess.TimeoutExpired:
        raise engine.stalled(f"`{cli.path} buildx inspect`") from None


def builder_driver(cli) -> str:
    """The driver of buildx's current builder (docker, docker-container, kubernetes, remote)."""
    out = buildx_inspect(cli)
    found = re.search(r"^Driver:\s*(\S+)", out.stdout, re.M)
    if out.returncode != 0 or not found:
        raise OperationFailed(f"`{cli.path} buildx inspect` did not name its builder's driver: "
                              + (out.stderr.strip().splitlines() or ["no output"])[-1], engine.HINT)
    return found.group(1)


def run_bake(cli, cmd: list[str], log_name: str, echo=None, time_limit: float | None = None,
             env: dict | None = None) -> dict:
    """One `docker buildx bake` run, watched like a build: {seconds, log, run_steps}."""
    log_path = _log_path(log_name)
    start = time.monotonic()
    rc, lines = _run(cli, cmd, log_path, echo, time_limit, env)
    steps = parse_progress(lines)
    if rc != 0:
        _fail(rc, steps, lines, log_path)
    return {"seconds": round(time.monotonic() - start, 1), "log": str(log_path),
            "run_steps": run_steps(steps)}


def export_stage(context: Path, target: str, dest: Path, ca_bundle: str | None = None, echo=None,
                 log_name: str = "export", index_auth: str = "", network: str = "") -> list:
    """Build one stage and write its files to dest (BuildKit's local exporter): no image.
    index_auth: a netrc file's text with the package indexes' credentials (Sources.netrc)."""
    engine.client()
    cli = engine.find_cli()
    log_path = _log_path(log_name)
    with creds.secret_file(index_auth) as netrc:
        cmd = cli.build_cmd(load=False) + ["--progress=plain", "--target", target, "--output", f"type=local,dest={dest}"]
        cmd += _options(ca_bundle, netrc, network)
        cmd.append(str(context))
        rc, lines = _run(cli, cmd, log_path, echo)
    steps = parse_progress(lines)
    if rc != 0:
        _fail(rc, steps, lines, log_path)
    return steps


def build(context: Path, tags: list[str], target: str = "runtime", no_cache: bool = False,
          ca_bundle: str | None = None, build_args: dict | None = None, echo=None,
          log_name: str = "build", time_limit: float | None = None, index_auth: str = "",
          network: str = "", on_stop=None) -> BuildResult:
    """index_auth: a netrc file's text with the package indexes' credentials (Sources.netrc), handed
    to the build as the secret index_auth; network: docker build --network (Sources.build_network);
    on_stop: called with compiled_so_far() when the build does not finish (stopped, failed, Ctrl-C)."""
    client = engine.client()  # the daemon first: a wedged one is named as such, not as a missing plugin
    cli = engine.find_cli()
    log_path = _log_path(log_name)
    iidfile = log_path.with_suffix(".iid")
    cmd = cli.build_cmd() + ["--progress=plain", "--target", target, "--iidfile", str(iidfile)]
    for ref in tags:  # applied by the engine as the image is written (a failed build tags nothing), so
        cmd += ["-t", ref]  # no other envbuild process can remove the image between its build and its tag
    if no_cache:
        cmd.append("--no-cache")
    for key, value in sorted((build_args or {}).items()):
        cmd += ["--build-arg", f"{key}={value}"]
    start = time.monotonic()
    try:
        with creds.secret_file(index_auth) as netrc:
            rc, lines = _run(cli, cmd + _options(ca_bundle, netrc, network) + [str(context)], log_path, echo, time_limit)
    except (KeyboardInterrupt, OperationFailed):
        iidfile.unlink(missing_ok=True)
        _stopped(log_path, on_stop)
        raise
    seconds = time.monotonic() - start
    steps = parse_progress(lines)
    if rc != 0 or not iidfile.exists():
        _stopped(log_path, on_stop)
        _fail(rc, steps, lines, log_path)
    image_id = iidfile.read_text().strip()
    iidfile.unlink(missing_ok=True)
    image = client.images.get(image_id)
    return BuildResult(image_id, list(tags), image.attrs.get("Size", 0), seconds, steps, str(log_path))
