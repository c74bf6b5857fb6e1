"""Compile once: two models that pin the same compiled package on the same torch, Python and card
share its wheel stage, so the second image does not compile it again (real builds, a real
local index serving the package's sdist)."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import compile_once as co

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mirror():
    """One index for every build of this module: their base and torch stages are shared."""
    with co.mirror() as served:
        yield served


@pytest.fixture(scope="module")
def twins(docker_engine, offline_base, fixture_env, registry, mirror, tmp_path_factory):
    version = co.fresh_version()
    env = dict(fixture_env, ENVBUILD_MATRICES=str(co.twin_catalog(tmp_path_factory.mktemp("twins"), version)))
    index = mirror.add(version)
    first = co.build(env, "twina", offline_base, index)
    second = co.build(env, "twinb", offline_base, index)
    exported = co.export_wheels(env, "twinb", offline_base, index, tmp_path_factory.mktemp("wheels") / "out")
    pushed = [co.push(registry, s["tags"][0]) for s in (first, second)]
    yield version, first, second, pushed, exported
    co.remove(first["tags"][0], second["tags"][0], *pushed)
    co.cleanup_contexts(env)


def test_the_second_model_reuses_the_first_ones_compiled_wheel(twins):
    version, first, second, _, _ = twins
    compiled, reused = co.wheel_step(first, version), co.wheel_step(second, version)
    assert not compiled["cached"] and compiled["seconds"] > 0  # a version no builder had: compiled here
    # its compiles went through ccache, and the step said how many ccache served (the ledger keeps it)
    assert sum(compiled["ccache"].values()) >= 1, compiled
    assert reused["cached"]  # same base, Python, torch, arch list and version: BuildKit's cache
    # the images do differ where the models do (twinb pins one more package): not one image twice
    # (not "twinb's lock step is uncached": the mirror's port is fixed, so a warm run's twinb
    # finds its lock layer from the run before; measured so)
    assert first["image_id"] != second["image_id"]


def test_the_shared_wheel_is_installed_and_its_op_loads(twins):
    version, _, second, _, _ = twins
    r = subprocess.run(["/usr/bin/docker", "run", "--rm", second["tags"][0], "python", "-c",
                        "import importlib.metadata as m, tinyscale, torch; from tinyscale import _C; "
                        "print(m.version('tinyscale'), tinyscale.scale(torch.ones(3), 2.0).tolist())"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [version, "[2.0,", "2.0,", "2.0]"]


def test_a_host_with_the_first_image_pulls_little_of_the_second(twins, registry):
    """torch is a runtime layer of its own, identical in both images: the registry stores it once
    and a host that has the first image pulls only the rest of the second."""
    _, _, _, (ref_a, ref_b), _ = twins
    layers_a, layers_b = co.manifest_layers(registry, ref_a), co.manifest_layers(registry, ref_b)
    new = sum(size for digest, size in layers_b.items() if digest not in layers_a)
    total = sum(layers_b.values())
    biggest = max(layers_b, key=layers_b.get)
    assert biggest in layers_a, "the biggest layer (torch's venv) is not shared"
    assert new / total <= 0.25, (new, total)


def test_envbuild_wheels_exports_the_compiled_wheel_for_pip(twins):
    """`envbuild wheels` hands out what the wheel stage compiled (a cache hit: no compile), as a
    folder pip --find-links can install from, with what it was built for."""
    version, _, _, _, (listing, folder) = twins
    wheel = listing["wheels"][0]
    assert [w["package"] for w in listing["wheels"]] == ["tinyscale"] and wheel["version"] == version
    assert (wheel["torch"], wheel["python"], wheel["arch_list"]) == ("2.0.1", "3.11", "8.0")
    assert wheel["built_now"] is False  # the images built it: its wheel stage was BuildKit's cache
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".whl") == [f"tinyscale-{version}-cp311-cp311-linux_x86_64.whl"]
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-index", "--find-links", str(folder),
                        "--python-version", "3.11", "--platform", "linux_x86_64", "--only-binary", ":all:",
                        "-d", str(folder / "got"), f"tinyscale=={version}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]  # pip finds it there by name and version
    # tinyscale's setup.py hard-codes sm_80 and sm_90: the builder's nvcc compiled only what a800 runs
    from envbuild.incontainer.audit_scan import wheel_problems
    checked, problems = wheel_problems(str(folder), ["8.0"])
    assert not problems and [(c["sass"], c["ptx"]) for c in checked] == [(["8.0"], [])], checked


# ---------------------------------------------------------------- a vendor's prebuilt wheel

@pytest.fixture(scope="module")
def vendored(twins, offline_base, fixture_env, mirror, tmp_path_factory):
    """The wheel twinb's stage compiled, served as a vendor would serve it (a find-links page);
    a third copy of the fixture, twinc, whose catalog says that wheel carries sm_80."""
    version, _, _, _, (_, folder) = twins
    cat = co.vendor_catalog(tmp_path_factory.mktemp("vendor"), version, mirror.find_links(folder), "8.0", "twinc")
    env = dict(fixture_env, ENVBUILD_MATRICES=str(cat))
    plan = subprocess.run([sys.executable, "-m", "envbuild.cli", "resolve", "twinc", "--card", "a800", "--cuda",
                           "11.8", "--python", "3.11", "--json"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=co.ROOT)
    summary = co.build(env, "twinc", offline_base, mirror.index)
    yield version, json.loads(plan.stdout), summary
    co.remove(summary["tags"][0])
    co.cleanup_contexts(env)


def test_a_vendor_wheel_that_covers_the_card_is_downloaded_audited_and_not_compiled(vendored):
    version, plan, summary = vendored
    build = plan["native_packages"]["tinyscale"]["build"]
    assert build["from"] == "vendor" and "sm_80" in build["why"], build
    steps = [s["step"] for s in summary["run_steps"] if f"tinyscale=={version}" in s["step"]]
    assert any("--only-binary :all:" in s and "audit_scan.py --wheels /wheels --cc 8.0" in s for s in steps), steps
    assert not any("pip wheel" in s for s in steps)  # nothing compiled for it
    r = subprocess.run(["/usr/bin/docker", "run", "--rm", summary["tags"][0], "python", "-c",
                        "import importlib.metadata as m, tinyscale, torch; "
                        "print(m.version('tinyscale'), tinyscale.scale(torch.ones(2), 3.0).tolist())"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.split() == [version, "[3.0,", "3.0]"], r.stderr[-2000:]


def test_a_vendor_wheel_whose_kernels_miss_the_card_fails_the_build_at_its_audit(
        offline_base, fixture_env, mirror, tmp_path_factory, docker_engine):
    """The catalog claims sm_80; the wheel served carries only sm_90 code: the build stops in the
    wheel's stage, says which library lacks what, and tags nothing."""
    from fakecuda import elf_with_fatbin, fatbin_bytes
    version = co.fresh_version() + "1"
    folder = tmp_path_factory.mktemp("lying-vendor")
    with zipfile.ZipFile(folder / f"tinyscale-{version}-cp311-cp311-linux_x86_64.whl", "w") as whl:
        whl.writestr("tinyscale/_C.cpython-311-x86_64-linux-gnu.so", elf_with_fatbin(fatbin_bytes(90)))
        whl.writestr("tinyscale/__init__.py", "")
        whl.writestr(f"tinyscale-{version}.dist-info/METADATA",
                     f"Metadata-Version: 2.1\nName: tinyscale\nVersion: {version}\n")
        whl.writestr(f"tinyscale-{version}.dist-info/WHEEL",
                     "Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp311-cp311-linux_x86_64\n")
        whl.writestr(f"tinyscale-{version}.dist-info/RECORD", "")
    cat = co.vendor_catalog(tmp_path_factory.mktemp("lying"), version, mirror.find_links(folder), "8.0", "twind")
    env = dict(fixture_env, ENVBUILD_MATRICES=str(cat))
    r = co.build(env, "twind", offline_base, mirror.add(version), check=False)
    co.cleanup_contexts(env)
    assert r.returncode != 0
    said = " ".join(r.stderr.split())  # the terminal may wrap the excerpt's long lines
    assert "vendor wheel refused" in said and "has SASS 9.0, PTX none: nothing runs on 8.0" in said, r.stderr[-3000:]
    assert not [t for i in docker_engine.images.list() for t in i.tags if "/twind:" in t or t.startswith("envbuild/twind")]


# ---------------------------------------------------------------- the wheel cache: builders that share a registry

@pytest.fixture(scope="module")
def cached(offline_base, fixture_env, registry, mirror, tmp_path_factory):
    """A first build compiles tinyscale and pushes the wheel to the registry's wheel cache (its
    local copy removed); a second build, of another model, finds it there."""
    version = co.fresh_version() + "2"
    env = dict(fixture_env, ENVBUILD_MATRICES=str(co.twin_catalog(tmp_path_factory.mktemp("cache"), version)),
               ENVBUILD_WHEEL_CACHE=f"{registry}/envbuild-wheel-cache-test")
    index = mirror.add(version)
    first = co.build(env, "twina", offline_base, index)
    second = co.build(env, "twinb", offline_base, index)
    yield version, first, second, env
    co.remove(first["tags"][0], second["tags"][0])
    co.cleanup_contexts(env)


def test_a_compiled_wheel_goes_to_the_wheel_cache_and_not_onto_the_host(cached, registry, docker_engine):
    version, first, _, _ = cached
    shared = first["wheel_cache"]["tinyscale"]
    assert shared["from"] == "pushed" and shared["ref"].startswith(f"{registry}/envbuild-wheel-cache-test:wheel-tinyscale-")
    assert not co.wheel_step(first, version)["cached"]  # compiled by this build (a fresh version)
    assert co.manifest_layers(registry, shared["ref"])  # the registry has it
    assert not [t for i in docker_engine.images.list() for t in i.tags if t == shared["ref"]]


def test_another_build_takes_the_wheel_from_the_registry_and_compiles_nothing(cached, fixture_env):
    version, first, second, env = cached
    shared = second["wheel_cache"]["tinyscale"]
    assert shared == {"ref": first["wheel_cache"]["tinyscale"]["ref"], "from": "cache"}
    assert not [s for s in second["run_steps"] if "pip wheel" in s["step"]]  # nothing compiled at all
    dockerfile = (Path(env["ENVBUILD_HOME"]) / "contexts" / "twinb-a800" / "Dockerfile").read_text()
    assert f"FROM {shared['ref']} AS wheel-tinyscale" in dockerfile
    r = subprocess.run(["/usr/bin/docker", "run", "--rm", second["tags"][0], "python", "-c",
                        "import importlib.metadata as m, tinyscale, torch; "
                        "print(m.version('tinyscale'), tinyscale.scale(torch.ones(2), 4.0).tolist())"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.split() == [version, "[4.0,", "4.0]"], r.stderr[-2000:]
