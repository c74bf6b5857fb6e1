import shutil
from pathlib import Path

import pytest

from envbuild import catalog

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cat():
    return catalog.load()


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
    """The Debian 12 + CUDA 11.8 base made from Debian packages (scripts/bootstrap-base.sh)."""
    import subprocess
    r = subprocess.run([str(ROOT / "scripts" / "bootstrap-base.sh")], capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"devel": "envbuild/cuda:11.8-devel-debian12", "runtime": "envbuild/debian:12"}


@pytest.fixture(scope="session")
def fixture_env(tmp_path_factory):
    """Environment for running envbuild on the tinybev fixture: catalog + fixture, sandbox sources."""
    import os
    matrices = tmp_path_factory.mktemp("matrices")
    shutil.copytree(ROOT / "matrices", matrices, dirs_exist_ok=True)
    shutil.copy(FIXTURE / "tinybev.toml", matrices / "models" / "tinybev.toml")
    env = dict(os.environ)
    env.update({"ENVBUILD_MATRICES": str(matrices), "ENVBUILD_TORCH_INDEX": "none",
                "ENVBUILD_HOME": str(tmp_path_factory.mktemp("envbuild-home")),
                "ENVBUILD_DOCKER": env.get("ENVBUILD_DOCKER", "/usr/bin/docker")})
    if Path(CA_BUNDLE).exists():
        env["ENVBUILD_CA_BUNDLE"] = CA_BUNDLE  # TLS-intercepting proxies: the host's trust store
    return env
