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

from .errors import OperationFailed


@dataclass(frozen=True)
class Cli:
    path: str
    version: str
    mode: str  # buildx | builtin

    def build_cmd(self) -> list[str]:
        return [self.path, "buildx", "build", "--load"] if self.mode == "buildx" else [self.path, "build"]

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
    if os.environ.get("ENVBUILD_DOCKER"):
        found.append(os.environ["ENVBUILD_DOCKER"])
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
        bx = _run([path, "buildx", "version"])
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
API_TIMEOUT = 600  # for calls that stream (pull, push, save, waiting on a container)


@lru_cache(maxsize=1)
def _connected():
    import docker

    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        docker.from_env(timeout=PING_TIMEOUT).ping()
    except Exception as exc:  # noqa: BLE001 - the SDK raises its own and requests' errors
        kind = type(exc).__name__
        if "Timeout" in kind or "timed out" in str(exc).lower():  # the SDK wraps the read timeout
            raise OperationFailed(f"the Docker daemon at {host} accepted the connection but did not answer "
                                  f"in {PING_TIMEOUT} s: it is wedged",
                                  "restart it (`systemctl restart docker`, or stop and start dockerd)") from None
        raise OperationFailed(f"no Docker daemon at {host} ({kind})",
                              "start it: `dockerd &` or `systemctl start docker`; install with "
                              "apt-get install docker.io") from None
    return docker.from_env(timeout=API_TIMEOUT)


_failed: list = []  # a daemon that failed is asked once per command, not once per call


def client():
    """The command's Docker SDK client (connected once), or one clear line saying what is wrong."""
    if _failed:
        raise _failed[0]
    try:
        return _connected()
    except OperationFailed as exc:
        _failed.append(exc)
        raise


def run_container(image: str, command: list[str], timeout: int = API_TIMEOUT, **kwargs) -> tuple[int, str, str]:
    """Create, start and wait for a container; (exit code, stdout, stderr). The container is
    removed whatever happens: a start that fails, a timeout, Ctrl-C."""
    container = client().containers.create(image, command, **kwargs)
    try:
        container.start()
        status = container.wait(timeout=timeout)
        out = container.logs(stdout=True, stderr=False).decode(errors="replace")
        err = container.logs(stdout=False, stderr=True).decode(errors="replace")
        return status.get("StatusCode", -1), out, err
    finally:
        try:
            container.remove(force=True)
        except Exception:  # noqa: BLE001 - already gone, or the daemon went away: nothing left to do
            pass


def available() -> str | None:
    """None when builds can run here, else the reason they cannot."""
    try:
        find_cli()
        client()
    except OperationFailed as exc:
        return exc.message
    return None
