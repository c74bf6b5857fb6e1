"""envbuild bake --build: the fixture matrix (two models that share a compiled package, two
cards) built by `docker buildx bake` through the local builder, pushed to the local registry
that holds its cache. Real buildx, real BuildKit, a real registry."""

import json
import subprocess
import urllib.request

import pytest

import compile_once as co
from envbuild import bake, engine
from conftest import FIXTURE, cli

pytestmark = pytest.mark.integration

MODELS, CARDS = ("twina", "twinb"), ("a800", "l20")
MANIFEST_TYPES = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"


def pushed_config(registry: str, repo: str, tag: str) -> dict:
    """The image config the registry holds for repo:tag (where BuildKit puts an inline cache)."""
    ask = urllib.request.Request(f"http://{registry}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_TYPES})
    with urllib.request.urlopen(ask, timeout=30) as answer:
        manifest = json.loads(answer.read())
    assert "config" in manifest, f"{repo}:{tag} was pushed as an index, not one image: {manifest}"
    digest = manifest["config"]["digest"]
    with urllib.request.urlopen(f"http://{registry}/v2/{repo}/blobs/{digest}", timeout=30) as answer:
        return json.loads(answer.read())


def test_bake_builds_the_fixture_matrix_with_buildx(docker_engine, offline_base, fixture_env, registry, tmp_path):
    has_buildx = subprocess.run(["/usr/bin/docker", "buildx", "version"], capture_output=True).returncode == 0
    assert has_buildx, "bake needs docker buildx: .ci/run installs Debian 13's docker-buildx"
    version = co.fresh_version()  # no builder has compiled it: the first wave must
    env = dict(fixture_env, ENVBUILD_MATRICES=str(co.twin_catalog(tmp_path / "catalog", version)))
    out = tmp_path / "bake" / "docker-bake.json"
    with co.mirror() as mirror:
        index = mirror.add(version)
        r = cli(env, "bake", "--models", ",".join(MODELS), "--cards", ",".join(CARDS), "--cuda", "11.8",
                "--python", "3.11", *[a for m in MODELS for a in ("--source", f"{m}={FIXTURE / 'tinybev'}")],
                "--base-image", offline_base["devel"], "--runtime-image", offline_base["runtime"],
                "--pypi-index", index, "--registry", registry, "--parallel", "2", "--build", "--push",
                "-o", out, "--json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout)
    built = result["built"]
    names = {f"{m}-{c}" for m in MODELS for c in CARDS}
    try:
        assert set(built["images"]) == names  # every target built
        assert [w["group"] for w in built["waves"]] == ["wave-1", "wave-2"]  # consecutive, run in order
        if built["driver"] == "docker" and engine.inline_caches_one_at_a_time(bake.engine_major()):
            # Debian 12's engine crashes on two inline-cache exports at once: one target per bake run
            assert [len(w["logs"]) for w in built["waves"]] == [2, 2] and "one_at_a_time" in built, built["waves"]
        # the shared wheel stage compiles once per card (its arch list), never once per model
        steps = [s for w in built["waves"] for s in w["run_steps"]
                 if f"tinyscale=={version}" in s["step"] and "pip wheel" in s["step"]]
        assert len([s for s in steps if not s["cached"]]) == len(CARDS), steps
        assert len(steps) == len(names)  # the other model's targets found it in BuildKit's cache
        for name, image in built["images"].items():
            model, card = name.split("-")
            assert image["tag"].startswith(f"{registry}/envbuild/{model}:")
            assert image["labels"]["io.envbuild.model"] == model and image["labels"]["io.envbuild.card"] == card
            assert image["labels"]["io.envbuild.mode"] == "port"
            repo, tag = image["tag"][len(registry) + 1:].rsplit(":", 1)
            with urllib.request.urlopen(f"http://{registry}/v2/{repo}/tags/list", timeout=30) as answer:
                assert tag in json.loads(answer.read())["tags"]  # pushed
            if built["driver"] == "docker":  # the cache it wrote travels in the pushed image
                assert "moby.buildkit.cache.v0" in pushed_config(registry, repo, tag), name
        # the op the shared wheel carries loads in an image of the second wave
        ref = built["images"]["twinb-l20"]["tag"]
        run = subprocess.run(["/usr/bin/docker", "run", "--rm", ref, "python", "-c",
                              "import tinyscale, torch; print(tinyscale.scale(torch.ones(2), 3.0).tolist())"],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0 and run.stdout.split() == ["[3.0,", "3.0]"], run.stderr[-2000:]
    finally:
        co.remove(*(i["tag"] for i in built["images"].values()))
