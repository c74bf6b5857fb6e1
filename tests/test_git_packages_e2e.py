"""A package from git, for real: a repository the test writes, served over git's smart HTTP protocol
on Docker's bridge, named by a [git_packages] entry of a copy of the tinybev fixture. The image
build fetches it by commit in its git stage, builds its wheel and installs it; a new commit builds
that stage again, the old one comes from BuildKit's cache; a host no build can reach is fetched
from its copy on a git mirror (ENVBUILD_GIT_MIRROR)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from compile_once import bridge_gateway
from conftest import FIXTURE, cli, image_args
from git_server import GitServer, git

pytestmark = pytest.mark.integration

MODEL = "tinygitbev"  # its own image name: the fixture's image (envbuild/tinybev) stays as it is
PACKAGE = "tinygit"
FOLDER = "python"  # the package is in a folder of its repository, as [git_packages] allows
UNREACHABLE = "https://git.envbuild.invalid/tests/tinygit"  # .invalid: no such host, ever (RFC 2606)
DOCKER = "/usr/bin/docker"
PYPROJECT = f"""[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{PACKAGE}"
version = "0.1.0"

[tool.setuptools]
packages = ["{PACKAGE}"]
"""


def write_catalog(folder: Path, url: str, commit: str) -> None:
    """The tinybev fixture under another name, plus tinygit from git at this commit. Everything
    else is the fixture's, so the base, torch and deps stages are the ones its image built."""
    text = (FIXTURE / "tinybev.toml").read_text().replace('name = "tinybev"', f'name = "{MODEL}"')
    text += f'\n[git_packages.{PACKAGE}]\nurl = "{url}"\ncommit = "{commit}"\nsubdirectory = "{FOLDER}"\n'
    (folder / "models").mkdir(parents=True, exist_ok=True)
    (folder / "models" / f"{MODEL}.toml").write_text(text)


def git_step(summary: dict) -> dict:
    steps = [s for s in summary["run_steps"] if s["step"].startswith(f"[git-{PACKAGE} ")]
    assert len(steps) == 1, [s["step"][:100] for s in summary["run_steps"]]
    return steps[0]


def run_in(ref: str, code: str) -> str:
    r = subprocess.run([DOCKER, "run", "--rm", ref, "python", "-c", code],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


@pytest.fixture(scope="module")
def git_server(docker_engine, tmp_path_factory):
    """Served on Docker's bridge gateway: build containers reach it there."""
    server = GitServer(tmp_path_factory.mktemp("git"), host=bridge_gateway())
    yield server
    server.close()


@pytest.fixture(scope="module")
def builds(docker_engine, offline_base, fixture_env, git_server, tmp_path_factory):
    """Four builds: at the first commit, at a second one, at the first again, and at the second
    from a host no build can reach, through the git mirror setting (a copy of the repository on
    the server under that host's name). Each image is inspected right after its build (they
    share a tag) and removed at the end."""
    repo = git_server.repository(PACKAGE)
    files = {"README": "tinygit, written by envbuild's tests\n", f"{FOLDER}/pyproject.toml": PYPROJECT,
             f"{FOLDER}/{PACKAGE}/__init__.py": "VALUE = 42\n"}
    first = git_server.commit(repo, files, "tinygit 42")
    second = git_server.commit(repo, {f"{FOLDER}/{PACKAGE}/__init__.py": "VALUE = 43\n"}, "tinygit 43")
    url = git_server.url(PACKAGE)
    copy = git_server.root / UNREACHABLE.split("://", 1)[1]
    copy.parent.mkdir(parents=True)
    git(copy.parent, "clone", "-q", "--bare", str(repo), copy.name)
    git(copy, "config", "uploadpack.allowAnySHA1InWant", "true")
    matrices = tmp_path_factory.mktemp("git-matrices")
    env = dict(fixture_env, ENVBUILD_MATRICES=str(matrices))
    images, out = [], {"url": url, "first": first, "second": second}
    mirrored = dict(env, ENVBUILD_GIT_MIRROR=git_server.base + "/")
    try:
        for key, at, commit, with_env in (("a", url, first, env), ("b", url, second, env), ("a_again", url, first, env),
                                          ("mirrored", UNREACHABLE, second, mirrored)):
            write_catalog(matrices, at, commit)
            served = len(git_server.requests)
            r = cli(with_env, "image", MODEL, *image_args(offline_base)[1:], "--json", "--quiet", timeout=5400)
            assert r.returncode == 0, r.stderr[-6000:]
            summary = json.loads(r.stdout)
            images.append(summary["image_id"])
            ref = summary["tags"][0]
            summary["value"] = run_in(ref, f"import {PACKAGE}; print({PACKAGE}.VALUE)")
            summary["labels"] = json.loads(subprocess.run(
                [DOCKER, "image", "inspect", "-f", "{{json .Config.Labels}}", summary["image_id"]],
                capture_output=True, text=True, timeout=120).stdout)
            summary["git_requests"] = git_server.requests[served:]
            out[key] = summary
        yield out
    finally:
        subprocess.run([DOCKER, "image", "rm", "-f", *dict.fromkeys(images)], capture_output=True, timeout=600)
        shutil.rmtree(Path(env["ENVBUILD_HOME"]) / "contexts" / f"{MODEL}-a800", ignore_errors=True)


def test_the_build_fetches_the_commit_from_the_git_server_and_installs_it(builds):
    a = builds["a"]
    assert a["value"] == "42"
    assert any("git-upload-pack" in r for r in a["git_requests"]), a["git_requests"]  # fetched over smart HTTP
    step = git_step(a)
    assert not step["cached"] and builds["first"] in step["step"]
    # installed as a wheel of its own, its metadata in the venv (the builder's pip install --no-deps)
    assert run_in(a["tags"][0], f"import importlib.metadata as m; print(m.version('{PACKAGE}'))") == "0.1.0"


def test_the_image_label_names_url_at_commit(builds):
    a, b = builds["a"], builds["b"]
    pin = f"{builds['url']}@{{}}#subdirectory={FOLDER}"
    assert a["labels"]["io.envbuild.git-packages"] == f"{PACKAGE}=" + pin.format(builds["first"])
    assert b["labels"]["io.envbuild.git-packages"] == f"{PACKAGE}=" + pin.format(builds["second"])
    plan = json.loads(a["labels"]["io.envbuild.plan"])
    assert plan["git_packages"] == {PACKAGE: pin.format(builds["first"])}


def test_it_shares_the_fixtures_torch_stage(builds):
    """Same base images and index as the fixture image: the GBs of torch are BuildKit's cache."""
    torch = [s for s in builds["a"]["run_steps"] if "pip install" in s["step"] and "torch" in s["step"]
             and "[torch " in s["step"]]
    assert torch and all(s["cached"] for s in torch), torch


def test_a_new_commit_builds_the_git_stage_again(builds):
    b = builds["b"]
    assert b["value"] == "43"
    step = git_step(b)
    assert not step["cached"] and builds["second"] in step["step"]
    assert b["git_requests"], "the second commit was not fetched"


def test_the_old_commit_comes_from_the_cache(builds):
    again = builds["a_again"]
    assert again["value"] == "42"
    step = git_step(again)
    assert step["cached"] and builds["first"] in step["step"]
    assert again["git_requests"] == []  # nothing fetched: BuildKit had that stage
    assert again["image_id"] == builds["a"]["image_id"]


def test_the_git_mirror_serves_a_host_the_build_cannot_reach(builds):
    """ENVBUILD_GIT_MIRROR: the build fetched MIRROR/HOST/PATH; the label and Plan keep upstream's URL."""
    m = builds["mirrored"]
    assert m["value"] == "43"
    assert any(r.startswith("POST /git.envbuild.invalid/tests/tinygit/git-upload-pack") for r in m["git_requests"]), \
        m["git_requests"]
    assert m["labels"]["io.envbuild.git-packages"] == f"{PACKAGE}={UNREACHABLE}@{builds['second']}#subdirectory={FOLDER}"
    assert "git.envbuild.invalid" in git_step(m)["step"] and "http://" in git_step(m)["step"]
