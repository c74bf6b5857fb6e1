"""envbuild lock for real: pip-compile inside the image's own Python, then a hash-checked build."""

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "envbuild.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=3600, cwd=ROOT)


def test_lock_then_hash_checked_build(docker_engine, offline_base, fixture_env, tmp_path):
    env = {**fixture_env, "ENVBUILD_HOME": str(tmp_path / "home")}
    args = ["tinybev", "--card", "a800", "--cuda", "11.8", "--python", "3.11",
            "--base-image", offline_base["devel"]]
    ctx = tmp_path / "ctx"
    r = cli(env, "lock", *args, "-o", ctx, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    # pip-compile ran in the base stage built under a name of this lock's own, removed after it:
    # neither that name nor an untagged image is left behind (other workers' locks hold their own names)
    log = next((tmp_path / "home" / "logs").glob("lock-base-*.log")).read_text()
    name = re.search(r"naming to (?:docker\.io/)?(envbuild/lock-base:[0-9a-f]+)", log).group(1)
    assert not docker_engine.images.list(name=name)
    # the image's id as the engine wrote it (the classic store says "writing image", the containerd
    # store "exporting config")
    written = re.search(r"(?:writing image|exporting config) (sha256:[0-9a-f]+)", log)
    assert written, log[-2000:]
    left = [i for i in docker_engine.images.list(all=True) if i.id == written.group(1)]
    assert not left or left[0].tags, "the lock left its base stage as an untagged image"
    lock = (ctx / "requirements.lock").read_text()
    pins = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", lock, re.M)
    names = {n.lower() for n, _ in pins}
    assert {"torch", "torchvision", "torchaudio", "numpy", "ninja"} <= names
    assert dict((n.lower(), v) for n, v in pins)["torch"] == "2.0.1"
    assert int(dict((n.lower(), v) for n, v in pins)["numpy"].split(".")[0]) < 2  # the era pin held
    # the fixture's era (2023-06-01 + 30 days): numpy as PyPI had it then (1.26.0 came in September 2023)
    numpy = tuple(int(x) for x in dict((n.lower(), v) for n, v in pins)["numpy"].split(".")[:2])
    assert (1, 24) <= numpy < (1, 26), numpy
    blocks = re.split(r"\n(?=[A-Za-z0-9])", lock.split("\n", 2)[2].strip())
    assert all("--hash=sha256:" in b for b in blocks if not b.startswith("#"))
    torch_lock = (ctx / "torch.lock").read_text()
    assert "torch==2.0.1" in torch_lock and "--hash=sha256:" in torch_lock and "numpy" not in torch_lock
    # the CUDA libraries torch pins exactly share its layer; what it leaves open (sympy) does not
    assert "nvidia-cudnn-cu11==8.5.0.96" in torch_lock and "triton==2.0.0" in torch_lock and "sympy" not in torch_lock
    # The lock was made by the image's Python 3.11, not the host's: the cp311 wheels' hashes are there.
    dockerfile = (ctx / "Dockerfile").read_text()
    # both the torch stage and the deps stage install their lock with hash checking
    flat = dockerfile.replace("\\\n", " ")  # one line per instruction
    assert re.search(r"pip install --require-hashes +--no-deps [^\n]*?-r /opt/envbuild/torch\.lock", flat)
    assert re.search(r"pip install --require-hashes +[^\n]*?-r /opt/envbuild/requirements\.lock", flat)
    assert "COPY requirements.lock" in dockerfile and "-r /opt/envbuild/requirements.in" not in dockerfile
    # rendering again keeps the lock (it still matches requirements.in)
    r = cli(env, "render", *args, "-o", ctx, "--json")
    assert json.loads(r.stdout)["locked"] is True
    # and the image builds with hash checking, up to the compiled extensions
    from envbuild import build
    import os
    os.environ["ENVBUILD_DOCKER"] = env["ENVBUILD_DOCKER"]
    result = build.build(ctx, [], target="deps", ca_bundle=env.get("ENVBUILD_CA_BUNDLE"))
    assert result.image_id.startswith("sha256:")
    out = docker_engine.containers.run(result.image_id, ["python", "-c", "import torch, numpy; print(torch.__version__, numpy.__version__)"],
                                       remove=True).decode().split()
    assert out[0].split("+")[0] == "2.0.1" and int(out[1].split(".")[0]) < 2
