"""The Docker engine: a docker CLI that drives BuildKit, and the Docker SDK for the rest.

The Docker SDK for Python cannot drive BuildKit, so builds go through a CLI: `docker
buildx build`, or `DOCKER_BUILDKIT=1 docker build` with a CLI that has BuildKit built in
(20.10; from 23.0 the CLI needs the buildx plugin). Everything else (daemon check,
inspect, run, push, pull, save) uses the SDK.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache

from .errors import BadInput, EnvbuildError, OperationFailed


@dataclass(frozen=True)
class Cli:
    path: str
    version: str
    mode: str  # buildx | builtin

    def build_cmd(self, load: bool = True) -> list[str]:
        """The build command; load: the image goes into the daemon's store (buildx refuses --load
        beside another --output, e.g. the local exporter `wheels` uses)."""
        if self.mode != "buildx":
            return [self.path, "build"]
        return [self.path, "buildx", "build"] + (["--load"] if load else [])

    def env(self) -> dict:
        env = dict(os.environ)
        if self.mode == "builtin":
            env["DOCKER_BUILDKIT"] = "1"
        return env


def _run(args, timeout=20) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _candidates() -> list[str]:
    found = []
    chosen = os.environ.get("ENVBUILD_DOCKER")
    if chosen:
        # the CLI asked for by name is used or refused, never silently replaced by another one
        if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
            raise BadInput(f"ENVBUILD_DOCKER={chosen}: not an executable file",
                           "point ENVBUILD_DOCKER at a docker CLI (e.g. /usr/bin/docker), or unset it")
        return [chosen]
    on_path = shutil.which("docker")
    for path in (on_path, "/usr/bin/docker", "/usr/local/bin/docker"):
        if path and os.path.exists(path) and path not in found:
            found.append(path)
    return found


@lru_cache(maxsize=None)
def find_cli() -> Cli:
    """The first docker CLI that can run a BuildKit build, or a clear error."""
    tried = []
    for path in _candidates():
        # `docker --version` never talks to the daemon (`docker version` waits on a wedged one)
        ver = _run([path, "--version"])
        found = re.search(r"version (\d+\.\d+[^\s,]*)", ver.stdout if ver and ver.stdout else "")
        version = found.group(1) if found else "unknown"
        try:
            bx = subprocess.run([path, "buildx", "version"], capture_output=True, text=True, timeout=engine_timeout())
        except subprocess.TimeoutExpired:
            # the plugin asks the daemon first: a daemon that does not answer is not a missing plugin
            raise stalled(f"`{path} buildx version`") from None
        except OSError:
            bx = None
        if bx and bx.returncode == 0:
            return Cli(path, version, "buildx")
        major = version.split(".")[0]
        if major.isdigit() and int(major) < 23:
            return Cli(path, version, "builtin")
        tried.append(f"{path} ({version}: no buildx plugin, and CLIs from 23.0 need it for BuildKit)")
    if not tried:
        raise OperationFailed("no docker CLI found",
                              "install one: apt-get install docker.io (Debian/Ubuntu), or Docker Engine with buildx")
    raise OperationFailed("no docker CLI that can drive BuildKit: " + "; ".join(tried),
                          "install the buildx plugin (docker-buildx-plugin) or point ENVBUILD_DOCKER at a "
                          "CLI with BuildKit built in, e.g. Debian's /usr/bin/docker 20.10")


PING_TIMEOUT = 10  # seconds a healthy daemon needs to answer /_ping; a wedged one never does
ENGINE_TIMEOUT = 60  # seconds any other call may wait for the daemon's answer (ENVBUILD_ENGINE_TIMEOUT)
STREAM_TIMEOUT = 600  # the same for calls that stream (pull, push, save, load): ENVBUILD_ENGINE_STREAM_TIMEOUT


def _seconds(var: str, default: float) -> float:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1
    if not 0 < value <= 7 * 86400:
        raise BadInput(f"{var}={raw!r} is not a number of seconds", f"e.g. {var}={default:g}, or unset it")
    return value


def engine_timeout() -> float:
    """How long envbuild waits for the daemon to answer one call (or a build to start)."""
    return _seconds("ENVBUILD_ENGINE_TIMEOUT", ENGINE_TIMEOUT)


def stream_timeout() -> float:
    """How long a streaming call (pull, push, save, load) may go without a word from the daemon."""
    return _seconds("ENVBUILD_ENGINE_STREAM_TIMEOUT", STREAM_TIMEOUT)


# BuildKit before 0.9, inside every Docker 20.10 engine (Debian 12's docker.io), crashes the whole
# engine when two builds export inline caches at once ("fatal error: concurrent map writes" in its
# remotecache; moby/buildkit#2889, locked in 0.9 by #2051; Docker 23 is the first engine after it).
# It crashed CI's bake. On such an engine the docker driver builds a wave's targets one at a time.
CONCURRENT_INLINE_CACHE_ENGINE = 23


def major(version) -> int:
    """A Docker engine's major version (20 for "20.10.24+dfsg1"); 0 where it does not say."""
    found = re.match(r"(\d+)\.", str(version or ""))
    return int(found.group(1)) if found else 0


def inline_caches_one_at_a_time(major_version: int) -> bool:
    """Whether builds on this engine must export inline caches one at a time (see above)."""
    return major_version < CONCURRENT_INLINE_CACHE_ENGINE


def host() -> str:
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


HINT = ("check the daemon: `docker info`, `systemctl status docker` / `journalctl -u docker`; restart it if it "
        "hangs; or raise ENVBUILD_ENGINE_TIMEOUT if it is only slow")


def stalled(what: str, seconds: float | None = None) -> OperationFailed:
    """The one line for a daemon that stopped answering: which daemon, which call, how long."""
    seconds = engine_timeout() if seconds is None else seconds
    return OperationFailed(f"the Docker daemon at {host()} did not answer {what} in {seconds:g} s", HINT)


def failure(exc: BaseException) -> OperationFailed | None:
    """The clear line for an engine error that reached a command unhandled (a stream that stalled
    halfway, a closed connection, a refused request), or None when exc is not the engine's."""
    import subprocess as sp
    if isinstance(exc, sp.TimeoutExpired):
        cmd = exc.cmd if isinstance(exc.cmd, str) else " ".join(map(str, exc.cmd or []))
        return OperationFailed(f"`{cmd[:200]}` did not finish in {exc.timeout:g} s", HINT)
    names = {f"{c.__module__}.{c.__name__}" for c in type(exc).__mro__}
    text = str(exc)
    if any(n.startswith(("requests.", "urllib3.")) for n in names) or "socket.timeout" in names \
            or isinstance(exc, (TimeoutError, ConnectionError)):
        if "timeout" in text.lower() or "timed out" in text.lower() or isinstance(exc, TimeoutError):
            return stalled("a streaming call", stream_timeout())
        return OperationFailed(f"lost the connection to the Docker daemon at {host()}: {text[:300]}", HINT)
    if any(n.startswith("docker.errors.") for n in names):
        explanation = getattr(exc, "explanation", None) or text
        return OperationFailed(f"the Docker daemon at {host()} refused the request: {str(explanation)[:300]}",
                               "check the image reference and the daemon's log (`journalctl -u docker`)")
    return None


_failed: list = []  # a daemon that failed is asked once per command, not once per call


def _guard(client, timeout: float):
    """Every HTTP call of this client is bounded by `timeout` (the SDK's default is per read) and a
    daemon that does not answer becomes one line naming it and the call; once it failed, the
    command's later calls fail at once instead of waiting again."""
    import requests

    api = client.api
    api.timeout = timeout
    send = api.send

    def guarded(request, **kwargs):
        if _failed:
            raise _failed[0]
        path = request.path_url.split("?", 1)[0]
        path = re.sub(r"^/v[0-9.]+/", "/", path)
        try:
            return send(request, **kwargs)
        except requests.exceptions.Timeout:
            if path.endswith("/wait"):  # a container still running: its caller names the limit
                raise
            exc = stalled(f"{request.method} {path[:120]}", timeout)
        except requests.exceptions.ConnectionError as err:
            exc = OperationFailed(f"lost the connection to the Docker daemon at {host()} during "
                                  f"{request.method} {path[:120]}: {str(err)[:200]}", HINT)
        _failed.append(exc)
        raise exc from None

    api.send = guarded
    return client


@lru_cache(maxsize=2)
def _connected(stream: bool = False):
    import docker

    if _failed:
        raise _failed[0]
    ping = min(PING_TIMEOUT, engine_timeout())
    try:
        docker.from_env(timeout=ping).ping()
    except Exception as exc:  # noqa: BLE001 - the SDK raises its own and requests' errors
        kind = type(exc).__name__
        if "Timeout" in kind or "timed out" in str(exc).lower():  # the SDK wraps the read timeout
            raise OperationFailed(f"the Docker daemon at {host()} accepted the connection but did not answer "
                                  f"in {ping:g} s: it is wedged",
                                  "restart it (`systemctl restart docker`, or stop and start dockerd)") from None
        raise OperationFailed(f"no Docker daemon at {host()} ({kind})",
                              "start it: `dockerd &` or `systemctl start docker`; install with "
                              "apt-get install docker.io") from None
    timeout = stream_timeout() if stream else engine_timeout()
    try:
        return _guard(docker.from_env(timeout=timeout), timeout)
    except Exception as exc:  # noqa: BLE001 - it answered /_ping a moment ago, but not /version
        raise failure(exc) or stalled("GET /version", timeout) from None


def client(stream: bool = False):
    """The command's Docker SDK client (connected once), or one clear line saying what is wrong.
    stream: the client for pull, push, save and load, whose reads may wait stream_timeout()."""
    if _failed:
        raise _failed[0]
    try:
        return _connected(stream)
    except OperationFailed as exc:
        _failed.append(exc)
        raise


def run_container(image: str, command: list[str], timeout: float = STREAM_TIMEOUT, what: str = "the container",
                  limit_hint: str = "", **kwargs) -> tuple[int, str, str]:
    """Create, start and wait for a container; (exit code, stdout, stderr). The container is
    removed whatever happens: a start that fails, a timeout, Ctrl-C. Past `timeout` seconds it is
    stopped and OperationFailed says so (with limit_hint: how to give it longer)."""
    import requests

    container = client().containers.create(image, command, **kwargs)
    try:
        container.start()
        try:
            status = container.wait(timeout=timeout)
        except requests.exceptions.RequestException as exc:
            if "timed out" not in str(exc).lower() and not isinstance(exc, requests.exceptions.Timeout):
                raise
            raise OperationFailed(f"{what} did not finish in {timeout:g} s; it was stopped and removed",
                                  limit_hint or "it may be hung: run it again, or look at the image") from None
        out = container.logs(stdout=True, stderr=False).decode(errors="replace")
        err = container.logs(stdout=False, stderr=True).decode(errors="replace")
        return status.get("StatusCode", -1), out, err
    finally:
        try:
            container.remove(force=True)
        except Exception:  # noqa: BLE001 - already gone, or the daemon went away: nothing left to do
            pass


def remove_tag(ref: str) -> None:
    """Take the tag ref off its image; the image goes with it when no other tag holds it. Best
    effort: a tag already gone, an image a container still uses (the engine refuses; the tag
    stays), or a daemon that went away, leaves nothing to do."""
    try:
        client().images.remove(ref, noprune=False)
    except Exception:  # noqa: BLE001 - see above
        pass


def available() -> str | None:
    """None when builds can run here, else the reason they cannot."""
    try:
        client()  # the daemon first: a CLI plugin that waits on a wedged one is not a missing plugin
        find_cli()
    except EnvbuildError as exc:
        return exc.message
    return None
