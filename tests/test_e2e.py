"""The fixture model the whole way, for real: resolve -> render -> build (BuildKit, real nvcc
for sm_80) -> cuobjdump/audit -> CPU smoke-train in the container -> push -> rmi -> pull.

No mocks. Needs a Docker engine (.ci/run starts one); skips without one, except in CI."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

from fakecuda import fatbin_bytes
from conftest import CA_BUNDLE, FIXTURE, ROOT, assert_no_container_left, cli, image_args  # the fixtures built and registry live in conftest

pytestmark = pytest.mark.integration


def test_image_records_plan_and_fixers(built, docker_engine, fixture_env):
    image = docker_engine.images.get(built["ref"])
    labels = image.labels
    assert labels["io.envbuild.model"] == "tinybev" and labels["io.envbuild.arch-list"] == "8.0"
    assert set(labels["io.envbuild.fixers"].split(",")) == {"setup-without-gpu", "thc-to-aten", "local-rank"}
    plan = json.loads(labels["io.envbuild.plan"])
    assert plan["torch"] == "2.0.1" and plan["mode"] == "port" and plan["deviations"]
    assert "py3.11-cu118-torch2.0.1-sm80" in built["ref"]
    fixes = docker_engine.containers.run(built["ref"], ["cat", "/opt/envbuild/fixes.json"], remove=True)
    report = {f["name"]: f["files"] for f in json.loads(fixes)["fixers"]}
    assert report["thc-to-aten"] == ["ops/src/scale_add.cpp", "ops/src/scale_add_cuda.cu"]
    assert report["local-rank"] == ["train.py"]
    # `envbuild images` lists it with its Plan, read back from those labels
    r = cli(fixture_env, "images", "--json")
    row = next(i for i in json.loads(r.stdout) if built["ref"] in i["tags"])
    assert (row["model"], row["card"], row["torch"], row["python"], row["arch_list"]) == ("tinybev", "a800", "2.0.1", "3.11", "8.0")
    assert row["cuda"].startswith("11.8") and set(row["fixers"]) == {"setup-without-gpu", "thc-to-aten", "local-rank"}


def _copy_out(client, image, path, dest: Path) -> Path:
    container = client.containers.create(image, ["true"])
    try:
        stream, _ = container.get_archive(path)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.getmembers()[0]
            dest.write_bytes(tar.extractfile(member).read())
    finally:
        container.remove(force=True)
    return dest


def test_extension_holds_sm80_sass(built, docker_engine, offline_base, tmp_path):
    find = docker_engine.containers.run(built["ref"], ["sh", "-c", "find /opt/venv -name 'tinybev_ops*.so'"],
                                        remove=True).decode().split()
    assert len(find) == 1, find
    _copy_out(docker_engine, built["ref"], find[0], tmp_path / "tinybev_ops.so")
    out = docker_engine.containers.run(offline_base["devel"], ["cuobjdump", "--list-elf", "--list-ptx", "/x/tinybev_ops.so"],
                                       volumes={str(tmp_path): {"bind": "/x", "mode": "ro"}}, remove=True).decode()
    assert "sm_80.cubin" in out, out
    assert "sm_86" not in out and "sm_90" not in out  # the card's arch only


def test_audit_passes_on_the_card_and_fails_on_hopper(built, fixture_env):
    r = cli(fixture_env, "audit", built["ref"], "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    ops = [lib for lib in report["libraries"] if "tinybev_ops" in lib["path"]]
    assert ops and ops[0]["sass"] == ["8.0"] and ops[0]["runs"]
    assert any("libtorch_cuda" in lib["path"] and lib["kind"] == "extension" for lib in report["libraries"])
    # NVIDIA's own shims with a token sm_52 kernel are reported, not fatal
    assert all(w.count("NVIDIA CUDA library") for w in report["warnings"])
    bad = cli(fixture_env, "audit", built["ref"], "--card", "h20")
    assert bad.returncode == 1
    verdict = next(line for line in bad.stdout.splitlines() if line.startswith("FAILS on NVIDIA H20"))
    assert "tinybev_ops" in verdict and "9.0" in verdict
    # torch's own PyPI wheel is named apart from what envbuild compiled
    assert "cannot run on NVIDIA H20 (torch's own build: libtorch_cuda.so" in bad.stderr


def test_cpu_smoke_train_through_the_old_launcher(built, docker_engine):
    # torch 2.0's launcher passes --local-rank=0: only the fixed parser accepts it.
    out = docker_engine.containers.run(
        built["ref"], ["python", "-m", "torch.distributed.launch", "--nproc_per_node=1", "train.py",
                       "--steps", "5", "--device", "cpu"], remove=True, stderr=True).decode()
    result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert result["steps"] == 5 and result["local_rank"] == 0
    assert 0 < result["first_loss"] < 100 and 0 < result["last_loss"] < 100


def _remove_untagged_descendants(docker_engine, image_id):
    """Untagged images committed on top of image_id (smoke labels), deepest first: a child that
    has children of its own cannot go before them (409 Conflict)."""
    import docker
    for child in docker_engine.images.list(all=True):
        if child.attrs.get("Parent") == image_id and not child.tags:
            _remove_untagged_descendants(docker_engine, child.id)
            try:
                docker_engine.images.remove(child.id, force=True)
            except docker.errors.ImageNotFound:  # pruned with its last child: untagged parents go too
                pass


def test_push_remove_pull_same_id(built, docker_engine, registry, fixture_env):
    import docker
    ref = f"{registry}/envbuild-test/tinybev:{uuid.uuid4().hex[:8]}"
    image = docker_engine.images.get(built["ref"])
    image.tag(ref)
    r = cli(fixture_env, "push", ref, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["digest"].startswith("sha256:")
    # Remove the image locally for real (every tag), then pull it back. Images committed on top of it
    # (smoke labels of earlier runs on this machine) would keep it: they go first.
    _remove_untagged_descendants(docker_engine, image.id)
    docker_engine.images.remove(image.id, force=True)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_engine.images.get(image.id)
    pulled = docker_engine.images.pull(ref)
    assert pulled.id == image.id
    pulled.tag(built["ref"])
    docker_engine.images.remove(ref)


def test_pull_command_derives_the_tag_from_the_plan(built, docker_engine, registry, fixture_env):
    ref = f"{registry}/envbuild/tinybev:{built['ref'].split(':', 1)[1]}"
    docker_engine.images.get(built["ref"]).tag(ref)
    assert cli(fixture_env, "push", ref).returncode == 0
    docker_engine.images.remove(ref)
    r = cli(fixture_env, "pull", "tinybev", "--card", "a800", "--cuda", "11.8", "--python", "3.11",
            "--registry", registry + "/", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["image"] == ref and data["id"] == docker_engine.images.get(built["ref"]).id
    from envbuild import host
    if host.driver() is None:
        assert data["driver"] == "skip"  # no GPU here, said so
    else:
        assert data["driver"] in ("ok", "warn") and host.driver() in data["driver_reason"]
    docker_engine.images.remove(ref)


def test_push_to_an_unreachable_registry_says_so(built, docker_engine, fixture_env):
    ref = "127.0.0.1:1/envbuild-test/tinybev:nowhere"
    docker_engine.images.get(built["ref"]).tag(ref)
    try:
        r = cli(fixture_env, "push", ref)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "127.0.0.1:1" in r.stderr
    finally:
        docker_engine.images.remove(ref)


def test_rebuild_is_all_cache_hits(built, offline_base, fixture_env):
    r = cli(fixture_env, "image", *image_args(offline_base), "--json", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads(r.stdout)
    assert again["image_id"] == built["image_id"]
    assert all(step["cached"] for step in again["run_steps"]), again["run_steps"]


def test_failed_build_names_the_step_and_keeps_the_log(built, offline_base, fixture_env, tmp_path):
    src = tmp_path / "tinybev"
    shutil.copytree(FIXTURE / "tinybev", src)
    cu = src / "ops" / "src" / "scale_add_cuda.cu"
    cu.write_text(cu.read_text() + "\nthis is not C++;\n")
    tag = f"envbuild-test/broken:{uuid.uuid4().hex[:8]}"
    r = cli(fixture_env, "image", *image_args(offline_base, src), "--tag", tag, "--quiet")
    assert r.returncode == 1
    assert "build failed" in r.stderr and "pip install --no-build-isolation" in r.stderr
    assert "scale_add_cuda.cu" in r.stderr  # the last lines of the failing step's output
    log = r.stderr.split("full log: ")[-1].strip().splitlines()[0]
    text = Path(log).read_text()
    # setuptools releases spell the name tinybev-ops or tinybev_ops
    assert re.search(r"Building wheel for tinybev[-_]ops", text) and "scale_add_cuda.cu" in text and "error" in text
    assert "Traceback" not in r.stderr
    import docker
    with pytest.raises(docker.errors.ImageNotFound):
        docker.from_env().images.get(tag)


def test_interrupted_build_leaves_no_tag_and_no_container(built, offline_base, fixture_env, docker_engine, tmp_path):
    # The interrupt must land during a build step, every time: this copy's setup.py is unique (never
    # a cache hit) and, while building the wheel, sleeps far longer than the test waits.
    src = tmp_path / "tinybev"
    shutil.copytree(FIXTURE / "tinybev", src)
    setup_py = src / "ops" / "setup.py"
    setup_py.write_text(f"# {uuid.uuid4().hex}\nimport sys, time\nif 'bdist_wheel' in sys.argv:\n    time.sleep(900)\n"
                        + setup_py.read_text())
    tag = f"envbuild-test/interrupted:{uuid.uuid4().hex[:8]}"
    before = {c.id for c in docker_engine.containers.list(all=True)}
    # Ctrl-C as a terminal delivers it: a suite started in the background (CI) inherits SIGINT
    # ignored, and so would envbuild, which then rightly keeps building (seen: a 120 s timeout).
    proc = subprocess.Popen([sys.executable, "-m", "envbuild.cli", "image", *map(str, image_args(offline_base, src)),
                             "--tag", tag], env=fixture_env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Building wheel for tinybev" in line:
            break
    assert proc.poll() is None, "the build ended before the interrupt:\n" + "".join(seen[-30:])
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in rest
    assert "Traceback" not in rest
    import docker
    with pytest.raises(docker.errors.ImageNotFound):
        docker_engine.images.get(tag)
    assert_no_container_left(docker_engine, before)


def test_no_daemon_is_one_line_exit_1(fixture_env):
    env = {**fixture_env, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    r = cli(env, "image", *image_args({"devel": "envbuild/cuda:11.8-devel-debian12", "runtime": "envbuild/debian:12"}))
    assert r.returncode == 1 and "no Docker daemon" in r.stderr and "Traceback" not in r.stderr


def test_a_training_loss_that_turns_nan_fails_the_run_at_that_step(built, docker_engine):
    """README: NaN/Inf fails a train run. The image's own synthetic run, with its loss made NaN
    from the third step on (the loss function wrapped, nothing else changed)."""
    code = ("import json, sys, types; sys.path.insert(0, '/opt/envbuild'); import torch, level_train\n"
            "real, calls = torch.nn.functional.cross_entropy, []\n"
            "def ce(*a, **k):\n"
            "    calls.append(1)\n"
            "    return real(*a, **k) * (float('nan') if len(calls) >= 3 else 1.0)\n"
            "torch.nn.functional.cross_entropy = ce\n"
            "print(json.dumps(level_train.train_synthetic(types.SimpleNamespace(steps=6, batch_size=2), 'cpu', tuned=False)))\n")
    out = docker_engine.containers.run(built["ref"], ["python", "-c", code], remove=True).decode()
    run = json.loads(out.strip().splitlines()[-1])
    assert run["status"] == "failed" and run["reason"] == "loss is nan at step 2", run
    assert len(run["losses"]) == 2 and all(v == v for v in run["losses"])  # the finite steps before it


def test_smoke_of_an_image_records_each_card_in_its_label(built, fixture_env, docker_engine):
    """`smoke IMAGE --card C` keeps the run in the image's label per card (what pull reads): a
    second card's run adds to the first's; the tag moves to the labelled image, others stay."""
    import docker
    from envbuild import smoke as smoke_stage
    ref = f"envbuild-test/smoke-record:{uuid.uuid4().hex[:8]}"
    original = docker_engine.images.get(built["ref"])
    original.tag(*ref.split(":"))
    try:
        for card in ("a800", "a100"):
            r = cli(fixture_env, "smoke", ref, "--card", card, "--level", "env", "--gpus", "none")
            assert r.returncode == 0, r.stdout + r.stderr
            assert f"recorded for {card} in the image's label" in r.stdout
        records = smoke_stage.records(docker_engine.images.get(ref).labels)
        assert sorted(records) == ["a100", "a800"] and all(v["levels"] == {"env": "passed"} for v in records.values())
        assert docker_engine.images.get(ref).id != original.id  # the tag moved to the labelled image
        assert docker_engine.images.get(built["ref"]).id == original.id  # the other tag stayed put
    finally:  # the labelled images (one per card, each on the last) go with the tag: removing
        # the tag prunes the untagged images below it, and whatever is left goes deepest first
        try:
            docker_engine.images.remove(ref)
        except docker.errors.ImageNotFound:
            pass
        _remove_untagged_descendants(docker_engine, original.id)


def test_smoke_cpu_levels_and_gpu_levels_skipped(built, fixture_env, tmp_path):
    """Every level with no GPU given to the container (--gpus none), for the image's card: the
    same on a host with GPUs (of any card) as without. GPU hosts run the GPU levels in
    make smoke-gpu / selftest-gpu."""
    report_path = tmp_path / "smoke.json"
    data = tmp_path / "nuscenes-mini"
    data.mkdir()
    (data / "v1.0-mini").write_text("")
    r = cli(fixture_env, "smoke", built["ref"], "--recipe", "both", "--steps", "6", "--ckpt-dir", tmp_path,
            "--compile", "--ckpt-mb", "8", "--data", data, "--report", report_path, "--gpus", "none", "--card", "a800")
    assert r.returncode == 0, r.stdout + r.stderr
    train_line = next(line for line in r.stdout.splitlines() if line.strip().startswith("train"))
    assert "synthetic:" in train_line and "torch.compile: skipped" in train_line and "model recipe: passed" in train_line
    report = json.loads(report_path.read_text())
    levels = report["levels"]
    assert levels["env"]["status"] == "passed" and levels["env"]["failed"] == 0
    assert {p["name"] for p in levels["env"]["packages"]} >= {"torch", "numpy"}
    assert levels["arch"]["status"] == "passed" and "8.0" in levels["arch"]["torch_archs"]
    assert any("tinybev_ops" in e["path"] and e["runs_via"] == "sm_80" for e in levels["arch"]["extensions"])
    loaded = {e["load"]: e for e in levels["env"]["extensions"]}
    assert loaded["tinybev_ops"]["ok"] and loaded["tinybev_ops"]["kind"] == "module"
    assert any(e["package"] == "torchvision" and e["kind"] == "library" and e["ok"] for e in loaded.values())
    for gpu_level in ("ops", "comm"):  # no GPU in the container: skipped with the reason, never passed
        assert levels[gpu_level]["status"] == "skipped" and "no GPU" in levels[gpu_level]["reason"]
    rehearsal = levels["comm"]["cpu_rehearsal"]  # the launcher and rendezvous still ran, on gloo
    assert rehearsal["ok"] and rehearsal["world"] == 2 and rehearsal["backend"] == "gloo"
    synthetic = levels["train"]["runs"]["synthetic"]
    assert synthetic["steps"] == 6 and synthetic["samples_per_s"] > 0 and 0 <= synthetic["data_wait_share"] <= 1
    assert all(v == v and abs(v) < 1e6 for v in synthetic["losses"])  # finite
    assert synthetic["knobs"]["num_workers"] >= 1 and synthetic["knobs"]["shm_bytes"] > 64 << 20
    assert synthetic["knobs"]["worker_transport"].startswith("shared memory")
    compiled = levels["train"]["runs"]["synthetic_compiled"]  # the fixture is torch 2.0 on Python 3.11
    assert compiled["status"] == "skipped" and "Python <= 3.10, not 3.11" in compiled["reason"]
    model = levels["train"]["runs"]["model"]
    assert model["status"] == "passed" and "torch.distributed.launch" in model["command"]
    assert model["metrics"]["steps"] == 6 == model["steps"]  # --steps reaches the recipe (steps_args)
    assert model["metrics"]["data_files"] == ["v1.0-mini"]  # --data is where the repo reads data/
    io = levels["io"]
    assert io["status"] == "passed" and io["roundtrip_equal"] and io["write_MBps"] > 0
    assert 7.5 <= io["size_mb"] <= 8.5
    assert not list(tmp_path.glob("envbuild-smoke-*"))  # the checkpoint is cleaned up


def test_smoke_rejects_bad_levels_and_leaves_no_container(built, fixture_env, docker_engine, tmp_path):
    before = {c.id for c in docker_engine.containers.list(all=True)}
    r = cli(fixture_env, "smoke", built["ref"], "--level", "train", "--recipe", "model", "--steps", "3",
            "--report", tmp_path / "r.json", "--gpus", "none", "--card", "a800")
    # the model recipe runs; now break it: ask for a level set with a bad level
    bad = cli(fixture_env, "smoke", built["ref"], "--level", "env,gpu-magic")
    assert bad.returncode == 2 and "gpu-magic" in bad.stderr
    assert r.returncode == 0
    assert_no_container_left(docker_engine, before)


def test_smoke_summary_recorded_with_the_image(built, docker_engine, fixture_env, tmp_path):
    from envbuild import smoke
    os.environ["ENVBUILD_DOCKER"] = fixture_env["ENVBUILD_DOCKER"]
    ref = f"envbuild-test/smoked:{uuid.uuid4().hex[:8]}"
    docker_engine.images.get(built["ref"]).tag(ref)
    try:
        _check_smoke_record(smoke, ref, docker_engine)
    finally:  # the labelled image is a child of the built one: never leave it behind
        docker_engine.images.remove(ref, force=True)


def _check_smoke_record(smoke, ref, docker_engine):
    report = smoke.run(ref, ["env", "arch"], steps=2, gpus="none")  # the image's card, on any host
    new_id = smoke.record(ref, report)
    labels = docker_engine.images.get(ref).labels
    assert docker_engine.images.get(ref).id == new_id
    summary = json.loads(labels["io.envbuild.smoke"])["a800"]  # one summary per card smoke-tested
    assert summary["ok"] is True and summary["levels"] == {"env": "passed", "arch": "passed"}
    text = smoke.validated_on(labels, "a800")
    assert "passed without a GPU" in text and "requested card" in text
    assert "not validated for h20: smoke recorded for a800 only" == smoke.validated_on(labels, "h20")


def test_compare_two_reports(built, fixture_env, tmp_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"r{i}.json"
        r = cli(fixture_env, "smoke", built["ref"], "--level", "train", "--steps", str(4 + i), "--report", p,
                "--gpus", "none", "--card", "a800")  # the same on any host
        assert r.returncode == 0, r.stderr
        paths.append(p)
    out = tmp_path / "compare.html"
    r = cli(fixture_env, "compare", *paths, "-o", out)
    assert r.returncode == 0, r.stderr
    page = out.read_text()
    assert page.count("<svg") == 3 and page.count("<polyline") == 2 and "samples/s" in page


def test_smoke_comm_is_bounded_by_its_timeout(built, fixture_env, docker_engine, tmp_path):
    before = {c.id for c in docker_engine.containers.list(all=True)}
    # --gpus none: the CPU rehearsal is what runs without GPUs, on any host
    r = cli(fixture_env, "smoke", built["ref"], "--level", "comm", "--comm-timeout", "1", "--json", "--gpus", "none",
            "--card", "a800", timeout=300)
    assert r.returncode == 0, r.stderr  # skipped (no GPU) is not a failure
    comm = json.loads(r.stdout)["levels"]["comm"]
    # torchrun cannot even start in 1 s: the attempt is killed and reported, never waited on
    assert comm["cpu_rehearsal"] == {"ok": False, "error": "timed out after 1s (hang)"}
    assert "FAILED: timed out" in comm["reason"] and comm["seconds"] < 60
    assert_no_container_left(docker_engine, before)


BROKEN_EXTENSION = r"""
/* A torch extension as a mismatched build leaves it: GPU code inside, and a symbol the
   loaded libtorch does not have. */
__attribute__((section(".nv_fatbin"), used, aligned(8)))
static const unsigned char fatbin[] = {%s};
extern void at_symbol_from_another_torch(void);
void *PyInit_envbuild_broken_ext(void) { at_symbol_from_another_torch(); return 0; }
"""


def test_env_level_names_the_extension_that_does_not_load(built, offline_base, docker_engine, tmp_path):
    code = BROKEN_EXTENSION % ", ".join(str(b) for b in fatbin_bytes(80))
    (tmp_path / "broken.c").write_text(code)
    name = "envbuild_broken_ext.cpython-311-x86_64-linux-gnu.so"
    docker_engine.containers.run(offline_base["devel"], ["gcc", "-shared", "-fPIC", "-o", f"/x/{name}", "/x/broken.c"],
                                 volumes={str(tmp_path): {"bind": "/x", "mode": "rw"}}, remove=True)
    site = "/opt/venv/lib/python3.11/site-packages"
    container = docker_engine.containers.run(
        built["ref"], ["python", "/opt/envbuild/smoke.py", "--level", "env"], detach=True,
        volumes={str(tmp_path / name): {"bind": f"{site}/{name}", "mode": "ro"}})
    try:
        exit_code = container.wait(timeout=300)["StatusCode"]
        out = container.logs(stdout=True, stderr=False)
    finally:
        container.remove(force=True)
    env = json.loads(out)["levels"]["env"]
    assert exit_code == 1 and env["status"] == "failed"
    loaded = {e["load"]: e for e in env["extensions"]}
    broken = loaded["envbuild_broken_ext"]
    assert not broken["ok"] and "at_symbol_from_another_torch" in broken["error"]
    assert loaded["tinybev_ops"]["ok"]  # one bad extension does not hide the others


def test_a_failed_smoke_exits_1_naming_the_level_and_records_the_failure(built, fixture_env, docker_engine):
    """An image whose venv lost a package of the Plan (numpy): `envbuild smoke` exits 1 with
    "smoke failed: env", leaves no container, and the image's label says it FAILED for the card."""
    import docker
    from envbuild import smoke as smoke_stage
    ref = f"envbuild-test/broken-env:{uuid.uuid4().hex[:8]}"
    parent = docker_engine.images.get(built["ref"]).id
    dockerfile = f"FROM {built['ref']}\nRUN rm -rf /opt/venv/lib/python3.11/site-packages/numpy*\n"
    docker_engine.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=ref, rm=True, forcerm=True)
    before = {c.id for c in docker_engine.containers.list(all=True)}
    try:
        r = cli(fixture_env, "smoke", ref, "--level", "env", "--gpus", "none", "--card", "a800")
        assert r.returncode == 1 and "smoke failed: env" in r.stderr and "Traceback" not in r.stderr, r.stdout + r.stderr
        assert "numpy" in r.stdout  # the report names what is missing
        assert_no_container_left(docker_engine, before)
        record = smoke_stage.records(docker_engine.images.get(ref).labels)["a800"]
        assert record["ok"] is False and record["levels"] == {"env": "failed"}
        assert smoke_stage.validated_on(docker_engine.images.get(ref).labels, "a800").startswith("smoke FAILED")
    finally:  # the tag's labelled image, then the image it was made from (untagged now)
        try:
            docker_engine.images.remove(ref)
        except docker.errors.ImageNotFound:
            pass
        _remove_untagged_descendants(docker_engine, parent)


def _run_in(docker_engine, image, cmd, **kwargs):
    container = docker_engine.containers.run(image, cmd, detach=True, **kwargs)
    try:
        code = container.wait(timeout=600)["StatusCode"]
        return code, container.logs(stdout=True, stderr=False).decode()
    finally:
        container.remove(force=True)


def test_a_gpu_torch_cannot_use_fails_the_gpu_levels_instead_of_skipping(built, docker_engine):
    # A device node with no usable driver behind it: what a driver older than the image's CUDA
    # looks like from inside. Skipping here would report a broken host as fine.
    code, out = _run_in(docker_engine, built["ref"], ["python", "/opt/envbuild/smoke.py", "--level",
                                                      "arch,ops,comm,train", "--steps", "2"],
                        devices=["/dev/null:/dev/nvidia0:rwm"])
    levels = json.loads(out)["levels"]
    assert code == 1
    for name in ("ops", "comm", "train"):
        assert levels[name]["status"] == "failed" and "cannot use them" in levels[name]["reason"], levels[name]
    assert levels["arch"]["status"] == "failed" and any("cannot use them" in p for p in levels["arch"]["problems"])
    # the device it saw, the driver (none answers here), torch and its CUDA, torch's own error, what to do
    reason = levels["ops"]["reason"]
    assert "1 GPU device(s) visible (/dev/nvidia0, driver unknown) but torch 2.0.1" in reason and "(CUDA 11." in reason
    assert "cannot use them: " in reason and "update the NVIDIA driver or build the image for an older --cuda" in reason


def test_each_op_check_runs_in_a_fresh_interpreter_and_reports_json(built, docker_engine):
    code, out = _run_in(docker_engine, built["ref"], ["python", "/opt/envbuild/smoke.py", "op-check", "hook",
                                                      "/workspace/model/smoke_ops.py"])
    hook = json.loads(out.strip().splitlines()[-1])  # the model's check ran: no GPU here, so CUDA fails
    assert code == 0 and hook["ok"] is False and hook["detail"].startswith("RuntimeError: Found no NVIDIA driver")
    code, out = _run_in(docker_engine, built["ref"], ["python", "/opt/envbuild/smoke.py", "op-check", "torchvision"])
    tv = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and tv["ok"] is False and "no NVIDIA driver" in tv["detail"]


def test_default_build_is_hash_locked(built, fixture_env):
    # No lock existed: image locked first in the image's own Python, kept it, and installed with hashes.
    assert "hash-locked by" in built["lock"]
    ctx = Path(built["lock"].split("hash-locked by ", 1)[1].split()[0]).parent
    assert (ctx / "requirements.lock").read_text().count("--hash=sha256:") > 10
    steps = [s["step"] for s in built["run_steps"]]
    assert any("pip install --require-hashes --no-deps" in s and "torch.lock" in s for s in steps), steps
    assert any("pip install --require-hashes" in s and "requirements.lock" in s for s in steps), steps
    assert not any("requirements.in" in s for s in steps)


def test_no_lock_is_the_explicit_escape(offline_base, fixture_env, tmp_path):
    r = cli(fixture_env, "render", *image_args(offline_base), "-o", tmp_path / "ctx", "--json")
    assert json.loads(r.stdout)["locked"] is False  # a fresh folder: nothing locked there
    dockerfile = (tmp_path / "ctx" / "Dockerfile").read_text()
    assert "-r /opt/envbuild/requirements.in" in dockerfile and "Not locked: `envbuild image` locks first" in dockerfile


def test_image_smoke_labels_every_tag_and_pushes_them(built, offline_base, fixture_env, docker_engine, registry):
    import docker
    tags = [f"{registry}/envbuild-test/smoked:{uuid.uuid4().hex[:8]}" for _ in range(2)]
    try:
        r = cli(fixture_env, "image", *image_args(offline_base), "--smoke", "--tag", tags[0], "--tag", tags[1],
                "--push", "--json", "--quiet")
        # image --smoke runs on this host's card (none here: the image's own, a800, without a GPU)
        from envbuild import catalog, pipeline
        from envbuild.incontainer.archrules import sass_runs_on
        here = pipeline.card_here(catalog.load(), None)
        if here is not None and not sass_runs_on("8.0", here.cc):  # e.g. a Hopper host: sm_80 cannot run there
            assert r.returncode == 1 and "smoke test failed" in r.stderr and "arch" in r.stderr, r.stderr[-3000:]
            return
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads(r.stdout)
        assert summary["image_id"] != summary["build_image_id"]  # the labelled image, not the built one
        for ref in [built["ref"], *tags]:
            image = docker_engine.images.get(ref)
            assert image.id == summary["image_id"], ref
            assert json.loads(image.labels["io.envbuild.smoke"])[here.id if here else "a800"]["ok"] is True
        assert set(summary["pushed"]) == set(tags)
        # what the registry holds is the labelled image
        docker_engine.images.remove(tags[1])
        pulled = docker_engine.images.pull(*tags[1].rsplit(":", 1))
        assert pulled.id == summary["image_id"] and "io.envbuild.smoke" in pulled.labels
    finally:
        for ref in tags:
            try:
                docker_engine.images.remove(ref)
            except docker.errors.ImageNotFound:
                pass
        docker_engine.images.get(built["image_id"]).tag(*built["ref"].rsplit(":", 1))  # as the other tests found it
        try:  # the labelled image is a child of the built one: left behind, it would pin it on this machine
            docker_engine.images.remove(summary["image_id"], force=True)
        except (docker.errors.ImageNotFound, NameError):
            pass


def test_image_push_with_a_configured_registry_pushes_the_default_tag(built, offline_base, fixture_env,
                                                                      docker_engine, registry):
    """`registry` in the config (here ENVBUILD_REGISTRY) names the image under it, and `image --push`
    pushes that default tag, which the registry then serves; with no registry configured and no
    --tag naming one, --push is refused before anything is built."""
    import urllib.request
    prefix = f"{registry}/envbuild-test-{uuid.uuid4().hex[:8]}/"
    expected = prefix + built["ref"]  # REGISTRY/PREFIX/envbuild/tinybev:<commit>-py3.11-cu118-...
    r = cli(dict(fixture_env, ENVBUILD_REGISTRY=prefix), "image", *image_args(offline_base), "--push", "--json", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    try:
        assert summary["tags"] == [expected] and list(summary["pushed"]) == [expected]
        repo, tag = expected[len(registry) + 1:].rsplit(":", 1)
        manifest = urllib.request.Request(f"http://{registry}/v2/{repo}/manifests/{tag}", method="HEAD", headers={
            "Accept": "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(manifest, timeout=30) as resp:
            assert resp.status == 200
    finally:
        docker_engine.images.remove(expected)
    plain = {k: v for k, v in fixture_env.items() if k != "ENVBUILD_REGISTRY"}
    r = cli(plain, "image", *image_args(offline_base), "--push", "--json", "--quiet")
    assert r.returncode == 2 and "--push: no registry to push to" in r.stderr and "Traceback" not in r.stderr


def _tinybev_parameters(cameras=6, channels=8, classes=4):
    """TinyBEV's parameter count from its layers (tests/fixture/tinybev/tinybev/model.py)."""
    conv = lambda cin, cout, k: cin * cout * k * k + cout  # noqa: E731 - weights + bias
    return (conv(3, channels, 3) + 2 * channels + conv(channels, channels, 3) + 2 * channels
            + conv(channels * cameras, channels, 1) + conv(channels, channels, 3) + conv(channels, classes, 1))


def test_model_level_builds_the_network_from_the_models_own_code(built, fixture_env, tmp_path):
    report = tmp_path / "model.json"
    r = cli(fixture_env, "smoke", built["ref"], "--level", "env,model", "--report", report)
    assert r.returncode == 0, r.stdout + r.stderr
    level = json.loads(report.read_text())["levels"]["model"]
    assert level["status"] == "passed" and level["object"] == "tinybev.TinyBEV"
    assert level["parameters"] == _tinybev_parameters(channels=8)  # the catalog's --channels 8 reached the class
    assert f"{_tinybev_parameters(channels=8):,} parameters" in r.stdout


def test_a_container_that_cannot_start_is_not_left_behind(docker_engine, fixture_env):
    # An image with envbuild's labels and nothing to run: every command that starts a container fails
    # cleanly and removes it.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = (b'FROM scratch\nLABEL io.envbuild.model="tinybev" io.envbuild.cards="a800" io.envbuild.plan="[1,2]" '
                b'io.envbuild.smoke="not json"\nCOPY marker /marker\n')
        for name, body in (("Dockerfile", data), ("marker", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    buf.seek(0)
    ref = f"envbuild-test/nostart:{uuid.uuid4().hex[:8]}"
    docker_engine.images.build(fileobj=buf, custom_context=True, tag=ref, rm=True, forcerm=True)
    before = {c.id for c in docker_engine.containers.list(all=True)}
    try:
        for args in (["smoke", ref, "--level", "env"], ["audit", ref]):
            r = cli(fixture_env, *args)
            assert r.returncode == 1 and "Traceback" not in r.stderr, (args, r.stderr)
            assert "cannot start" in r.stderr, r.stderr
        assert_no_container_left(docker_engine, before)
        # labels anyone could set, malformed: images still lists it
        r = cli(fixture_env, "images", "--json")
        assert r.returncode == 0 and "Traceback" not in r.stderr
        assert any(ref in row["tags"] for row in json.loads(r.stdout))
    finally:
        docker_engine.images.remove(ref, force=True)


def test_verify_records_the_cell_beside_its_catalog_and_resolve_shows_it(built, offline_base, fixture_env):
    args = image_args(offline_base)
    r = cli(fixture_env, "verify", *args, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    record = json.loads(Path(out["record"]).read_text())
    # a user catalog's model is verified into that catalog, not into envbuild's own
    assert Path(out["record"]).parent == Path(fixture_env["ENVBUILD_MATRICES"]) / "verified"
    assert record["verdict"] == "passed" and record["levels"] == {"env": "passed", "model": "passed"}
    assert record["audit"] == "passed" and record["image_id"] == built["image_id"] and record["parameters"] > 0
    assert out["status"].startswith("verified on ")
    r = cli(fixture_env, "resolve", "tinybev", "--card", "a800", "--cuda", "11.8", "--python", "3.11", "--json")
    assert json.loads(r.stdout)["verified"].startswith("verified on ")
    # another request for the same model is not covered by that record
    r = cli(fixture_env, "resolve", "tinybev", "--card", "h20", "--cuda", "11.8", "--python", "3.11", "--json")
    assert r.returncode == 2 or json.loads(r.stdout)["verified"] == "not verified"


def test_the_builders_nvcc_is_cached_by_ccache_even_with_torch_1x_dependency_flags(built, fixture_env, docker_engine):
    """torch < 2.0 compiles each .cu with `--generate-dependencies-with-compile --dependency-output`,
    which the builder's ccache (4.7) cannot cache: every rebuild compiled every kernel again. Run
    through the builder's own nvcc twice, that compile is a cache hit the second time and the
    depfile ninja reads is still written."""
    from envbuild import build
    os.environ["ENVBUILD_DOCKER"] = fixture_env["ENVBUILD_DOCKER"]
    ctx = Path(fixture_env["ENVBUILD_HOME"]) / "contexts" / "tinybev-a800"
    builder = build.build(ctx, [], target="builder", ca_bundle=fixture_env.get("ENVBUILD_CA_BUNDLE"))
    compile_ = ("${CUDA_HOME:-/usr/local/cuda}/bin/nvcc --generate-dependencies-with-compile --dependency-output k.o.d "
                "-c k.cu -o k.o -gencode arch=compute_80,code=sm_80")
    script = ("set -e; export CCACHE_DIR=$(mktemp -d); cd $(mktemp -d); "
              "printf '__global__ void k(float *a) { a[threadIdx.x] *= 2.f; }\\n' > k.cu; "
              f"{compile_}; rm k.o k.o.d; {compile_}; cat k.o.d; ccache --print-stats")
    code, out = _run_in(docker_engine, builder.image_id, ["bash", "-c", script])
    assert code == 0, out[-3000:]
    stats = dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)
    assert int(stats["direct_cache_hit"]) == 1 and int(stats["cache_miss"]) == 1, out
    assert "k.o: k.cu" in out  # the depfile, from the cache too


def test_what_a_stopped_build_compiled_is_a_ccache_hit_when_the_build_runs_again(built, fixture_env, docker_engine, tmp_path):
    """`verify --time-limit` stops a long build (flash-attn: hours on 2 cores); the rerun must not
    compile again what the stopped one finished. BuildKit keeps a cancelled step's cache mount,
    and ccache serves it: a build on the fixture's builder compiles one kernel through the
    builder's nvcc, is stopped by its time limit while still running, and the rerun's compile of
    the same kernel is a hit (the step fails unless it is)."""
    from envbuild import build
    from envbuild.errors import OperationFailed
    os.environ["ENVBUILD_DOCKER"] = fixture_env["ENVBUILD_DOCKER"]
    fixture_ctx = Path(fixture_env["ENVBUILD_HOME"]) / "contexts" / "tinybev-a800"
    nonce = uuid.uuid4().hex[:12]  # a kernel no earlier run compiled, and a step no layer cache holds
    builder_ref = f"envbuild-test/builder:{nonce}"  # FROM needs a name, not an image id
    build.build(fixture_ctx, [builder_ref], target="builder", ca_bundle=fixture_env.get("ENVBUILD_CA_BUNDLE"))
    compile_ = ("cd /tmp && printf '__global__ void k(float *a) { a[threadIdx.x] += 1.f; } // %s\\n' \"$NONCE\" > k.cu "
                "&& ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc -c k.cu -o k.o -gencode arch=compute_80,code=sm_80")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    mount = "--mount=type=cache,id=envbuild-test-stopped-build,target=/cc"
    hits = "$(ccache --print-stats | grep ^direct_cache_hit | cut -f2)"
    (ctx / "Dockerfile").write_text(
        f"FROM {builder_ref} AS b\nENV CCACHE_DIR=/cc\n"
        # the first build: an empty cache, one compile, then still running when its limit stops it
        f"FROM b AS first\nARG NONCE\nRUN {mount} rm -rf /cc/* && {compile_} && echo compiled-$NONCE && sleep 600\n"
        # the rerun: the same compile must come from the cache the stopped build left
        f"FROM b AS rerun\nARG NONCE\nRUN {mount} ccache -z && {compile_} && test \"{hits}\" = 1\n")
    try:
        with pytest.raises(OperationFailed) as stopped:
            build.build(ctx, [], target="first", build_args={"NONCE": nonce}, time_limit=45)
        assert "stopped at its time limit" in stopped.value.message
        assert f"compiled-{nonce}" in Path(stopped.value.log).read_text(), "the compile did not finish within the limit"
        rerun = build.build(ctx, [], target="rerun", build_args={"NONCE": nonce})
        docker_engine.images.remove(rerun.image_id)
    finally:
        docker_engine.images.remove(builder_ref)  # the tag only: the builder stays in BuildKit's cache


def test_the_gpu_selftest_script_rehearses_on_a_cpu_in_the_fixtures_builder(built, fixture_env, docker_engine, tmp_path):
    """`make selftest-gpu` has no GPU here, so REHEARSE=1 runs scripts/gpu-selftest.sh in the
    fixture's builder stage (torch + nvcc, as a GPU host without Docker would have them): it
    resolves the fixture for the card, applies the fixers, compiles the op for sm_80 and runs the
    levels; the GPU ones say skipped. This is what catches the script breaking before a GPU is lent
    (it first ran on a GPU, an H200, on 2026-12-04: benchmarks/results/gpu_selftest.json)."""
    import shutil as sh
    from envbuild import build
    os.environ["ENVBUILD_DOCKER"] = fixture_env["ENVBUILD_DOCKER"]
    ctx = Path(fixture_env["ENVBUILD_HOME"]) / "contexts" / "tinybev-a800"
    builder = build.build(ctx, [], target="builder", ca_bundle=fixture_env.get("ENVBUILD_CA_BUNDLE"))
    src = tmp_path / "src"
    for part in ("envbuild", "scripts", "tests/fixture"):  # what the script reads, from this working tree
        sh.copytree(ROOT / part, src / part, ignore=sh.ignore_patterns("__pycache__"))
    (tmp_path / "out").mkdir()
    script = ("set -e; cp -r /src /work && cd /work && /opt/venv/bin/python -m venv /tmp/tool "
              "&& /tmp/tool/bin/pip install -q typer rich jinja2 packaging docker "
              "&& PYTHON=/opt/venv/bin/python RESOLVE_PY=/tmp/tool/bin/python bash scripts/gpu-selftest.sh")
    volumes = {str(src): {"bind": "/src", "mode": "ro"}, str(tmp_path / "out"): {"bind": "/out", "mode": "rw"}}
    if os.path.exists(CA_BUNDLE):  # a TLS-intercepting proxy: pip in the container trusts what the host does
        volumes[CA_BUNDLE] = {"bind": "/etc/ssl/certs/ca-certificates.crt", "mode": "ro"}
    code, out = _run_in(docker_engine, builder.image_id, ["bash", "-c", script], network_mode="host", volumes=volumes,
                        environment={"REHEARSE": "1", "PLAN_PYTHON": "3.11", "CARD": "a800",  # TORCH_PIN: the image's 2.0.1
                                     "OUT": "/out", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert code == 0, out[-3000:]
    levels = json.loads((tmp_path / "out" / "gpu-selftest.json").read_text())["levels"]
    assert sorted(levels) == ["arch", "comm", "io", "ops", "train"]
    assert levels["arch"]["status"] == "passed"
    assert [(e["path"].rsplit("/", 1)[-1].split(".")[0], e["runs_via"]) for e in levels["arch"]["extensions"]] == [("tinybev_ops", "sm_80")]
    assert levels["ops"]["status"] == "skipped" and levels["comm"]["cpu_rehearsal"]["ok"]
    assert levels["train"]["status"] == "passed" and levels["train"]["runs"]["model"]["status"] == "passed"
    assert "arch   passed" in out and "train  passed" in out  # the per-level summary it prints
