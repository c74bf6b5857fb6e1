import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from envbuild import catalog

ROOT = Path(__file__).resolve().parent.parent


# A test that uses one of these reaches for the Docker engine: it is an integration test whether
# its file says so or not, so `-m 'not integration'` (make test-unit) never needs Docker.
ENGINE_FIXTURES = {"docker_engine", "offline_base", "built", "registry"}

# `make test` runs two workers (pytest-xdist): while one compiles, the other exports, pushes or
# runs unit tests. A module runs whole on one worker, so its module fixtures are made once; the
# modules that use the fixture image (`built`) or assert cache hits on its stages share one
# worker, and so do the compile-once and bake modules (they build and push the same twin tags
# through one mirror). The longest groups start first.
WORKER_OF = {"test_e2e": "fixture-image", "test_multicard_e2e": "fixture-image", "test_wheel_e2e": "fixture-image",
             "test_git_packages_e2e": "fixture-image", "test_bake_e2e": "twins", "test_compile_once_e2e": "twins"}
FIRST = ["twins", "fixture-image", "test_blackwell_e2e"]


def module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


def worker_group(nodeid: str) -> str:
    module = module_of(nodeid)
    return WORKER_OF.get(module, module)


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkerGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return worker_group(nodeid)

    config.option.loadscopereorder = False  # the collection's order: FIRST, then the rest
    return ByWorkerGroup(config, log)


@pytest.hookimpl(tryfirst=True)  # the integration mark before -m reads it
def pytest_collection_modifyitems(items):
    for item in items:
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    first = {group: n for n, group in enumerate(FIRST)}
    items.sort(key=lambda item: first.get(worker_group(item.nodeid), len(FIRST)))  # stable: the rest keep their order


def assert_no_container_left(engine, before: set, grace: float = 300):
    """No container is left of those that appeared since `before`. Another worker's containers may
    be running meanwhile: they end on their own within `grace` seconds; one left behind stays."""
    left = {c.id for c in engine.containers.list(all=True)} - before
    deadline = time.monotonic() + grace
    while left and time.monotonic() < deadline:
        time.sleep(2)
        left &= {c.id for c in engine.containers.list(all=True)}
    assert not left, [c.attrs.get("Config", {}).get("Image") for c in engine.containers.list(all=True)
                      if c.id in left]


# Where CI's minutes and disk go: each module's time (its fixtures' setup included, so a shared
# base is charged to the first module that asks for it; with two workers the modules' times add
# up to more than the run's), the disk used when it ends, and the slowest phases (a module
# fixture's setup shows as the setup of its first test), written to the file
# ENVBUILD_TEST_TIMINGS names (benchmarks/bench_ci.py sets it). xdist hands every worker's
# reports to the main process, which writes the file.
_modules: dict = {}
_slowest: list = []


def pytest_runtest_logreport(report):
    entry = _modules.setdefault(module_of(report.nodeid), {"seconds": 0.0, "tests": 0})
    entry["seconds"] += report.duration
    entry["tests"] += report.when == "call"
    entry["disk_used_gb"] = round(shutil.disk_usage("/").used / 1e9, 1)
    if report.duration >= 20:
        _slowest.append({"test": report.nodeid, "phase": report.when, "seconds": round(report.duration)})


def pytest_sessionfinish(session):
    path = os.environ.get("ENVBUILD_TEST_TIMINGS")
    if path and not hasattr(session.config, "workerinput"):  # the main process, not an xdist worker
        Path(path).write_text(json.dumps({
            "modules": {m: dict(e, seconds=round(e["seconds"])) for m, e in _modules.items()},
            "slowest": sorted(_slowest, key=lambda e: -e["seconds"])[:40]}, indent=1) + "\n")


@pytest.fixture(scope="session")
def cat():
    return catalog.load()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """envbuild's state folder and an empty user catalog of the test's own (envbuild add writes there)."""
    user = tmp_path / "usercat"
    user.mkdir()
    monkeypatch.setenv("ENVBUILD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ENVBUILD_MATRICES", str(user))
    monkeypatch.setenv("ENVBUILD_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    return user


@pytest.fixture
def matrices_copy(tmp_path):
    """A writable copy of matrices/ for tests that break or extend the catalog."""
    dst = tmp_path / "matrices"
    shutil.copytree(ROOT / "matrices", dst)
    return dst


FIXTURE = ROOT / "tests" / "fixture"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _engine_reason():
    import os
    os.environ.setdefault("ENVBUILD_DOCKER", "/usr/bin/docker")
    from envbuild import engine
    return engine.available()


@pytest.fixture(scope="session")
def docker_engine():
    """A Docker engine with BuildKit, or a skip; in CI (CI=true) a missing engine fails."""
    import os
    reason = _engine_reason()
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI needs a Docker engine for integration tests: {reason}")
        pytest.skip(f"no Docker engine: {reason}")
    import docker
    return docker.from_env(timeout=600)


@pytest.fixture(scope="session")
def offline_base(docker_engine):
    """The Debian 12 + CUDA 11.8 base made from Debian packages (`envbuild base --cuda 11.8`)."""
    return _base("11.8")


@pytest.fixture(scope="session")
def offline_base13(docker_engine):
    """The Debian 12 + CUDA 13.0 base made from PyPI's NVIDIA wheels (`envbuild base --cuda 13.0`)."""
    return _base("13.0")


def _base(cuda):
    env = dict(os.environ, ENVBUILD_DOCKER=os.environ.get("ENVBUILD_DOCKER", "/usr/bin/docker"))
    if Path(CA_BUNDLE).exists():
        env["ENVBUILD_CA_BUNDLE"] = CA_BUNDLE
    r = cli(env, "base", "--cuda", cuda, "--json", timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    made = json.loads(r.stdout)
    return {"devel": made["tag"], "runtime": made["debian"], "made": made}


@pytest.fixture(scope="session")
def fixture_env(tmp_path_factory):
    """Environment for running envbuild on the tinybev fixture: a user catalog that adds it to the
    built-in one, sandbox sources."""
    matrices = tmp_path_factory.mktemp("matrices")
    (matrices / "models").mkdir()
    shutil.copy(FIXTURE / "tinybev.toml", matrices / "models" / "tinybev.toml")
    env = dict(os.environ)
    env.update({"ENVBUILD_MATRICES": str(matrices), "ENVBUILD_TORCH_INDEX": "none",
                "ENVBUILD_HOME": str(tmp_path_factory.mktemp("envbuild-home")),
                "ENVBUILD_DOCKER": env.get("ENVBUILD_DOCKER", "/usr/bin/docker")})
    if Path(CA_BUNDLE).exists():
        env["ENVBUILD_CA_BUNDLE"] = CA_BUNDLE  # TLS-intercepting proxies: the host's trust store
    return env


# ---------------------------------------------------------------- the fixture image, built once per run

TIMEOUT = 3600


def cli(env, *args, timeout=TIMEOUT):
    return subprocess.run([sys.executable, "-m", "envbuild.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def image_args(base, source=FIXTURE / "tinybev"):
    return ["tinybev", "--card", "a800", "--cuda", "11.8", "--python", "3.11", "--source", source,
            "--base-image", base["devel"], "--runtime-image", base["runtime"]]


@pytest.fixture(scope="session")
def built(docker_engine, offline_base, fixture_env):
    r = cli(fixture_env, "image", *image_args(offline_base), "--json", "--quiet")
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout)
    summary["ref"] = summary["tags"][0]
    return summary


@pytest.fixture(scope="session")
def registry(docker_engine, tmp_path_factory):
    """A real registry on loopback: the one .ci/run started, or one started here."""
    addr = os.environ.get("ENVBUILD_TEST_REGISTRY", "127.0.0.1:5000")

    def up():
        try:
            urllib.request.urlopen(f"http://{addr}/v2/", timeout=2)
            return True
        except Exception:
            return False

    proc = None
    if not up():
        exe = shutil.which("docker-registry")
        if not exe:
            if os.environ.get("CI"):
                pytest.fail("CI needs docker-registry (apt-get install docker-registry)")
            pytest.skip("no registry and no docker-registry binary")
        d = tmp_path_factory.mktemp("registry")
        (d / "config.yml").write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {d}/data\n"
                                      f"http:\n  addr: {addr}\n")
        proc = subprocess.Popen([exe, "serve", str(d / "config.yml")], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        for _ in range(50):
            if up():
                break
            time.sleep(0.2)
    assert up(), f"registry at {addr} is not answering"
    yield addr
    if proc:
        proc.terminate()
        proc.wait(timeout=10)
