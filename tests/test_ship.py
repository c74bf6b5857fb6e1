"""doctor, bake, export/load."""

import io
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
from pathlib import Path

from conftest import ROOT
from envbuild import doctor, host


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "envbuild.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=1800, cwd=ROOT)


# ------------------------------------------------------------------ doctor

P2P_OK = """ \tGPU0\tGPU1\t\n GPU0\tX\tOK\t\n GPU1\tOK\tX\t\n\nLegend:\n  X    = Self\n  OK   = Status Ok\n"""
P2P_NS = """ \tGPU0\tGPU1\tGPU2\t\n GPU0\tX\tNS\tNS\t\n GPU1\tNS\tX\tOK\t\n GPU2\tNS\tOK\tX\t\n"""


def test_p2p_matrix_verdicts():
    assert doctor.p2p_verdict(P2P_OK).status == "ok"
    bad = doctor.p2p_verdict(P2P_NS)
    assert bad.status == "warn" and "NCCL_P2P_DISABLE=1" in bad.reason and "NS" in bad.reason
    assert doctor.p2p_verdict("garbage").status == "warn"


def test_card_matching_from_nvidia_smi_names(cat):
    assert host.match_card(cat, "NVIDIA H20").id == "h20"
    assert host.match_card(cat, "NVIDIA GeForce RTX 4090").id == "rtx4090"
    assert host.match_card(cat, "NVIDIA A100-SXM4-80GB").id == "a100"
    assert host.match_card(cat, "NVIDIA H200").id == "h200"
    assert host.match_card(cat, "Tesla V100-SXM2-32GB").id == "v100"


# `docker buildx inspect` as a builder with Docker's default GC policy prints it (Docker's docs,
# "Default policies"), and as one given .ci/run's records-first policy (seen on this machine)
GC_DEFAULT = """Name:   default\nDriver: docker\nGC Policy rule#0:
 All:            false
 Filters:        type==source.local,type==exec.cachemount,type==source.git.checkout
 Keep Duration:  48h0m0s
 Keep Bytes:     488.3MiB
GC Policy rule#1:\n All:            false\n Keep Duration:  1440h0m0s\n Keep Bytes:     3.725GiB
GC Policy rule#2:\n All:        true\n Keep Bytes: 3.725GiB
"""
GC_RECORDS_FIRST = """Name:   default\nDriver: docker\nGC Policy rule#0:\n All:        true\n Filters:    type==regular
 Keep Bytes: 38GiB\nGC Policy rule#1:\n All:        true\n Filters:    \n Keep Bytes: 38GiB\n"""


def test_doctor_says_whether_the_engine_keeps_a_stopped_compiles_ccache(monkeypatch):
    """Docker's default GC drops cache mounts unused for 48 h: a flash-attn compile stopped on one
    day restarts cold two days later. doctor reads the policy from buildx and warns."""
    from envbuild import build, engine
    assert doctor.gc_drops_cache_mounts(GC_DEFAULT) == "48h0m0s"
    assert doctor.gc_drops_cache_mounts(GC_RECORDS_FIRST) is None
    # a rule by age over every kind drops the mounts too (Docker's docs' own example, {"keepStorage":
    # "10GB", "filter": ["unused-for=2200h"]}, prints an empty Filters line); one over records does not
    assert doctor.gc_drops_cache_mounts("GC Policy rule#0:\n All: false\n Filters:    \n Keep Duration: 2200h0m0s\n"
                                        " Keep Bytes: 9.313GiB\n") == "2200h0m0s"
    assert doctor.gc_drops_cache_mounts("GC Policy rule#0:\n All: true\n Keep Duration: 720h0m0s\n") == "720h0m0s"
    for kinds in ("type==regular", "type!=exec.cachemount"):
        assert doctor.gc_drops_cache_mounts(f"GC Policy rule#0:\n Filters: {kinds}\n Keep Duration: 1h0m0s\n") is None

    class Engine:
        def __init__(self, cache):
            self.cache = cache

        def df(self):
            return {"BuildCache": self.cache}
    ccache = {"Type": "exec.cachemount", "Description": "cached mount /root/.ccache from exec /bin/sh -c pip wheel",
              "Size": 1_250_000_000, "LastUsedAt": "2026-12-05T05:45:33Z", "InUse": False}
    pip = dict(ccache, Description="cached mount /root/.cache/pip from exec /bin/sh -c pip install", Size=9e9)
    monkeypatch.setattr(engine, "find_cli", lambda: engine.Cli("/usr/bin/docker", "28", "buildx"))
    monkeypatch.setattr(engine, "client", lambda: Engine([ccache, pip]))
    for text, status in ((GC_DEFAULT, "warn"), (GC_RECORDS_FIRST, "ok")):
        monkeypatch.setattr(build, "buildx_inspect", lambda cli, text=text: subprocess.CompletedProcess([], 0, text, ""))
        result = doctor.build_cache()
        assert result.status == status and "ccache 1.25 GB (last used 2026-12-05)" in result.reason, result
        assert ("drops cache mounts unused for 48h0m0s" in result.reason) is (status == "warn")
    monkeypatch.setattr(build, "buildx_inspect", lambda cli: subprocess.CompletedProcess([], 0, "Driver: docker\n", ""))
    assert "reports no GC policy" in doctor.build_cache().reason
    monkeypatch.setattr(engine, "client", lambda: Engine([dict(ccache, InUse=True)]))
    assert "in use by a running build" in doctor.build_cache().reason
    monkeypatch.setattr(build, "buildx_inspect", lambda cli: subprocess.CompletedProcess([], 1, "", "unknown command"))
    assert doctor.build_cache().status == "skip"


@pytest.mark.parametrize("version, serial", [("20.10.24+dfsg1", True), ("28.2.2", False), ("", True)])
def test_doctor_says_when_bake_builds_one_target_at_a_time(monkeypatch, version, serial):
    """Debian 12's engine (20.10) crashes on concurrent inline-cache exports: doctor says bake builds
    targets one at a time there, before a user wonders why a wave of four runs like four waves."""
    from types import SimpleNamespace
    from envbuild import engine
    monkeypatch.setattr(engine, "client", lambda: SimpleNamespace(info=lambda: {"ServerVersion": version}))
    result = doctor.docker_engine()
    assert result.status == "ok" and ("one at a time" in result.reason) is serial, result


def test_doctor_never_crashes_without_tools(tmp_path):
    # No docker, no nvidia-smi on PATH and no daemon: every check still answers.
    env = {"PATH": str(tmp_path), "DOCKER_HOST": "unix:///nonexistent.sock", "ENVBUILD_DOCKER": str(tmp_path / "docker")}
    r = subprocess.run([sys.executable, "-m", "envbuild.cli", "doctor", "--json"], capture_output=True, text=True,
                       env={**os.environ, **env}, cwd=ROOT, timeout=120)
    assert "Traceback" not in r.stderr
    results = {c["name"]: c for c in json.loads(r.stdout)}
    assert results["docker engine"]["status"] == "fail" and "no Docker daemon" in results["docker engine"]["reason"]
    assert results["buildkit"]["status"] in ("ok", "fail")  # /usr/bin/docker may exist beside PATH
    assert results["gpus"]["status"] == "skip"
    assert all(c["status"] in ("ok", "warn", "fail", "skip") and c["reason"] for c in results.values())
    assert r.returncode == 1  # a failing check fails the command


# ------------------------------------------------------------------ bake

def test_bake_file_for_the_matrix(tmp_path):
    r = cli("bake", "--models", "maptr,sparsedrive,qcnet", "--cards", "a800,h20,v100", "-o", tmp_path / "docker-bake.json",
            "--registry", "registry.local:5000", "--builder-memory", "64", "--parallel", "2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "docker-bake.json").read_text())
    targets = doc["target"]
    images = {n: t for n, t in targets.items() if t["target"] == "runtime"}
    assert "maptr-h20" in images and "sparsedrive-v100" not in images  # impossible: skipped, with the reason
    skipped = json.loads(r.stdout)["skipped"]
    assert any(s["model"] == "sparsedrive" and s["card"] == "v100" and "flash-attn" in s["reason"] for s in skipped)
    for name, t in images.items():
        assert Path(t["context"]).is_absolute() and (Path(t["context"]) / "Dockerfile").exists()
        assert t["tags"][0].startswith("registry.local:5000/envbuild/")
        assert any("envbuild-cache" in c for c in t["cache-from"]) and t["cache-to"]
        assert t["labels"]["io.envbuild.card"] in ("a800", "h20", "v100")
    # flash-attn (9 GB/job) with 2 targets at once on 64 GB: at most 3 jobs each
    assert images["sparsedrive-a800"]["args"]["ENVBUILD_JOBS_CAP"] == "3"
    assert images["maptr-a800"]["args"]["ENVBUILD_JOBS_CAP"] == "16"
    bases = doc["group"]["bases"]["targets"]
    assert bases and all(targets[b]["target"] == "base" for b in bases)
    assert len(bases) < len(images)  # bases are shared
    waves = [g for g in doc["group"] if g.startswith("wave-")]
    assert all(len(doc["group"][w]["targets"]) <= 2 for w in waves)
    assert sorted(t for w in waves for t in doc["group"][w]["targets"]) == sorted(images)
    # the attributes buildx's bake file reference defines (docs.docker.com, "Bake file reference"):
    # an unknown one makes `docker buildx bake` refuse the file; Debian 12 has no buildx to ask
    target_keys = {"args", "annotations", "attest", "cache-from", "cache-to", "call", "context", "contexts",
                   "description", "dockerfile", "dockerfile-inline", "entitlements", "inherits", "labels", "matrix",
                   "name", "network", "no-cache", "no-cache-filter", "output", "platforms", "pull", "secret",
                   "shm-size", "ssh", "tags", "target", "ulimits"}
    assert set(doc) <= {"group", "target", "variable", "function"}
    assert all(set(t) <= target_keys for t in targets.values()), [set(t) - target_keys for t in targets.values()]
    assert all(set(g) <= {"targets", "description"} for g in doc["group"].values())
    assert all(isinstance(v, str) for t in targets.values() for v in t.get("args", {}).values())  # bake args are strings
    buildx = shutil.which("docker") and subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0
    if buildx:  # where buildx exists, it must accept the file
        p = subprocess.run(["docker", "buildx", "bake", "--print", "-f", str(tmp_path / "docker-bake.json"), "all"],
                           capture_output=True, text=True, cwd=tmp_path)
        assert p.returncode == 0, p.stderr


def test_bake_covers_every_catalog_card_by_default_and_passes_the_ca_as_a_file(tmp_path):
    ca = tmp_path / "corp-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    r = subprocess.run([sys.executable, "-m", "envbuild.cli", "bake", "--models", "qcnet", "-o", str(tmp_path / "b.json"),
                        "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "ENVBUILD_CA_BUNDLE": str(ca)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    images = {n for n, t in out["bake"]["target"].items() if t["target"] == "runtime"}
    from envbuild import catalog
    cards = set(catalog.load().cards)
    assert len(images) + len(out["skipped"]) == len(cards)  # every card: built or skipped with its reason
    assert all(s["reason"] for s in out["skipped"])
    secrets = {s for t in out["bake"]["target"].values() for s in t.get("secret", [])}
    assert secrets == {f"id=ca_bundle,src={ca}"}


def test_bake_bad_input():
    r = cli("bake", "--models", "nope")
    assert r.returncode == 2 and "unknown model" in r.stderr


# ------------------------------------------------------------------ export / load (real engine)

@pytest.fixture
def small_image(docker_engine, offline_base):
    tag = f"envbuild-test/export:{uuid.uuid4().hex[:8]}"
    dockerfile = (f"FROM {offline_base['runtime']}\nRUN echo envbuild > /hello.txt\n"
                  "LABEL io.envbuild.model=tinybev io.envbuild.card=a800 io.envbuild.mode=port\n"
                  "ENV NCCL_P2P_DISABLE=1\n")
    image, _ = docker_engine.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    yield tag, image.id
    for ref in (tag,):
        try:
            docker_engine.images.remove(ref, force=True)
        except Exception:
            pass


@pytest.mark.integration
def test_export_load_round_trip_same_id(small_image, docker_engine, tmp_path):
    tag, image_id = small_image
    r = cli("export", tag, "-o", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    archive = tmp_path / os.path.basename(info["archive"])
    assert archive.exists() and not list(tmp_path.glob(".*partial"))
    manifest = json.loads((tmp_path / (archive.name + ".json")).read_text())
    assert manifest["id"] == image_id and len(manifest["sha256"]) == 64
    docker_engine.images.remove(image_id, force=True)
    r = cli("load", archive, "--json")
    assert r.returncode == 0, r.stderr
    assert image_id in json.loads(r.stdout)["loaded"]
    assert docker_engine.images.get(tag).id == image_id


@pytest.mark.integration
def test_load_refuses_a_corrupt_archive(small_image, docker_engine, tmp_path):
    tag, image_id = small_image
    assert cli("export", tag, "-o", tmp_path).returncode == 0
    archive = next(tmp_path.glob("*.tar.gz"))
    docker_engine.images.remove(image_id, force=True)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    r = cli("load", archive)
    assert r.returncode == 1 and "checksum mismatch" in r.stderr and "Traceback" not in r.stderr
    import docker
    with pytest.raises(docker.errors.ImageNotFound):
        docker_engine.images.get(image_id)


@pytest.mark.integration
def test_load_of_a_truncated_archive_whose_checksum_matches_is_one_line(small_image, docker_engine, tmp_path):
    """A copy cut short whose manifest was made from it (the checksum passes): gzip ends early.
    One line, exit 1 (it once exited 130, 'interrupted'), nothing loaded."""
    import hashlib
    tag, image_id = small_image
    assert cli("export", tag, "-o", tmp_path).returncode == 0
    archive = next(tmp_path.glob("*.tar.gz"))
    docker_engine.images.remove(image_id, force=True)
    cut = archive.read_bytes()[: archive.stat().st_size // 2]
    archive.write_bytes(cut)
    manifest = tmp_path / (archive.name + ".json")
    manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), sha256=hashlib.sha256(cut).hexdigest())))
    r = cli("load", archive)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: cannot load") and "truncated" in r.stderr and "\nhint: " in r.stderr, r.stderr
    import docker
    with pytest.raises(docker.errors.ImageNotFound):
        docker_engine.images.get(image_id)


@pytest.mark.integration
def test_export_apptainer_definition(small_image, tmp_path):
    tag, _ = small_image
    r = cli("export", tag, "--format", "apptainer", "-o", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    definition = open(info["definition"]).read()
    assert "Bootstrap: docker-archive" in definition and "export NCCL_P2P_DISABLE=1\n" in definition
    archive = os.path.basename(info["archive"])  # the compressed save beside it; apptainer reads it gunzipped
    assert archive.endswith(".tar.gz") and os.path.exists(info["archive"])
    assert f"From: {archive[:-len('.gz')]}\n" in definition and f"after gunzip of {archive}" in definition
    assert "io.envbuild.model tinybev" in definition
    if not (shutil.which("apptainer") or shutil.which("singularity")):
        assert info["sif"] is None and "not installed" in info["sif_note"]
    else:
        assert os.path.exists(info["sif"])


@pytest.mark.integration
def test_export_of_a_model_takes_the_image_its_plan_for_the_card_names(docker_engine, tmp_path):
    """export MODEL --card CARD means the image `image MODEL --card CARD` tags (as smoke does): with
    none built, it names the one it looked for, per card, and writes nothing."""
    for card, tag_end in (("h20", "-py3.10-cu118-torch2.0.1-sm90'"), ("a800", "-py3.10-cu118-torch1.11.0-sm80'")):
        r = cli("export", "maptr", "--card", card, "--cuda", "11.8", "--python", "3.10", "-o", tmp_path / "out")
        assert r.returncode == 2 and "no local image 'envbuild/maptr:" in r.stderr and tag_end in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_export_unknown_image_is_bad_input(docker_engine):
    r = cli("export", "envbuild-test/does-not-exist:1")
    assert r.returncode == 2 and "no local image" in r.stderr


def test_bake_never_replaces_a_file_it_did_not_write(tmp_path):
    mine = tmp_path / "docker-bake.json"
    mine.write_text('{"target": {"app": {"context": "."}}}\n')  # the user's own bake file
    r = cli("bake", "--models", "qcnet", "--cards", "a800", "-o", mine)
    assert r.returncode == 2 and "envbuild did not write it" in r.stderr and "Traceback" not in r.stderr
    assert mine.read_text() == '{"target": {"app": {"context": "."}}}\n'
    ours = tmp_path / "ours.json"
    for _ in range(2):  # its own file: written, then replaced on the next run
        r = cli("bake", "--models", "qcnet", "--cards", "a800", "-o", ours)
        assert r.returncode == 0, r.stderr
    assert "qcnet-a800" in json.loads(ours.read_text())["target"]


def test_an_html_report_replaces_only_a_page_envbuild_wrote(tmp_path):
    from envbuild import compare, outputs
    from envbuild.errors import BadInput
    page = tmp_path / "compare.html"
    page.write_text("<html>my notes</html>")
    mine = lambda text: compare.GENERATOR in text  # noqa: E731
    with pytest.raises(BadInput, match="envbuild did not write it"):
        outputs.write_own_file(page, "<html>new</html>", mine)
    assert page.read_text() == "<html>my notes</html>"
    ours = tmp_path / "ours.html"
    outputs.write_own_file(ours, f"<html>{compare.GENERATOR}1</html>", mine)
    outputs.write_own_file(ours, f"<html>{compare.GENERATOR}2</html>", mine)
    assert ours.read_text().endswith("2</html>") and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(BadInput, match="is a folder"):
        outputs.write_own_file(tmp_path, "x", mine)


@pytest.mark.parametrize("free_gb, status", [(10, "fail"), (35, "warn"), (120, "ok")])
def test_doctor_free_disk_verdicts(monkeypatch, free_gb, status):
    """README: doctor checks free disk where images go (under 20 GB one CUDA build fails)."""
    from envbuild.errors import OperationFailed

    def no_daemon():
        raise OperationFailed("no daemon")
    monkeypatch.setattr(doctor.engine, "client", no_daemon)
    monkeypatch.setattr(doctor.os, "statvfs", lambda path: os.statvfs_result(
        (4096, 4096, 0, 0, free_gb * 2 ** 30 // 4096, 0, 0, 0, 0, 255)))
    result = doctor.free_disk()
    assert result.status == status and f"{free_gb} GB free" in result.reason


@pytest.mark.parametrize("shm_gb, status", [(0.06, "warn"), (8, "ok")])
def test_doctor_shared_memory_verdicts(monkeypatch, shm_gb, status):
    """README: /dev/shm under 1 GB kills DataLoader workers: a warning that says what to do."""
    monkeypatch.setattr(doctor.os, "statvfs", lambda path: os.statvfs_result(
        (4096, 4096, int(shm_gb * 2 ** 30 // 4096), 0, 0, 0, 0, 0, 0, 255)))
    result = doctor.shared_memory()
    assert result.status == status and ("DataLoader workers die" in result.reason) == (status == "warn")
    assert f"{shm_gb:.1f} GB" in result.reason or f"{shm_gb:.2f} GB" in result.reason


def test_pull_says_per_card_what_the_images_smoke_labels_validated():
    """What pull prints per card, from the image's io.envbuild.smoke label: a run for that card, a run
    for a multi-card set that includes it, a portable image's run, an older single-summary label,
    a failed run, and a card nobody ran it for."""
    from envbuild.smoke import validated_on
    run = lambda card, ok=True, gpu=None, levels=None: {"card": card, "ok": ok, "gpu": gpu,  # noqa: E731
                                                        "levels": levels or {"env": "passed"}}
    key = "io.envbuild.smoke"
    labels = {key: json.dumps({"a800": run("a800", gpu="NVIDIA A800", levels={"env": "passed", "ops": "passed", "comm": "failed"}),
                               "h20+l20": run("h20+l20", ok=False)})}
    assert validated_on(labels, "a800") == ("smoke passed on NVIDIA A800 for the requested card; GPU levels passed: ops")
    assert validated_on(labels, "l20") == ("smoke FAILED without a GPU (CPU levels only) for cards h20+l20, which "
                                           "include l20; GPU levels passed: none")
    assert validated_on(labels, "v100") == "not validated for v100: smoke recorded for a800, h20+l20 only"
    portable = {key: json.dumps({"portable": run("portable")})}
    assert validated_on(portable, "t4").startswith("smoke passed without a GPU (CPU levels only) for cards portable")
    legacy = {key: json.dumps(run("a800"))}  # one summary, as labels were before one per card
    assert validated_on(legacy, "a800").startswith("smoke passed without a GPU")
    for nothing in ({}, {key: "not json"}, {key: "[1, 2]"}):
        assert validated_on(nothing, "a800") == "not validated: no smoke report recorded with this image"


def test_doctor_on_a_gpu_host_judges_the_gpus_the_runtime_and_the_driver_against_local_images(monkeypatch):
    """An H20 plus a GPU the catalog lacks: gpus warns naming it; GPUs without a container toolkit
    or CDI spec fail the runtime check; each local image is judged against the driver (ok, warn
    through minor-version compatibility, fail), the worst one being the verdict."""
    gpu = {"index": "0", "name": "NVIDIA H20", "cc": "9.0", "driver": "470.82.01", "memory_mb": "97871"}
    monkeypatch.setattr(host, "gpus", lambda: (gpu, dict(gpu, index="1", name="NVIDIA B9000")))
    result = doctor.gpus()
    assert result.status == "warn" and "0: NVIDIA H20 (9.0) -> h20" in result.reason
    assert "not in the catalog: NVIDIA B9000" in result.reason
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    monkeypatch.setattr(doctor.os.path, "isdir", lambda path: False)
    monkeypatch.setattr(doctor.engine, "client", lambda: type("C", (), {"info": lambda self: {"Runtimes": {"runc": {}}}})())
    runtime = doctor.nvidia_runtime()
    assert runtime.status == "fail" and "install nvidia-container-toolkit" in runtime.reason
    monkeypatch.setattr(doctor.ship, "local_images", lambda: [{"tags": ["envbuild/maptr:x-cu118"], "id": "sha256:1", "cuda": "11.8.0"},
                                                              {"tags": ["envbuild/qcnet:y-cu111"], "id": "sha256:2", "cuda": "11.1.1"}])
    verdict = doctor.driver_vs_images()  # driver 470: CUDA 11.1 natively, 11.8 only through minor-version compat
    assert verdict.status == "warn", verdict
    assert "envbuild/maptr:x-cu118: warn: driver 470.82.01 < 520.61.05" in verdict.reason
    assert "envbuild/qcnet:y-cu111: ok: driver 470.82.01 >= 455.32" in verdict.reason
    gpu["driver"] = "418.87.01"  # older than either image's CUDA allows
    verdict = doctor.driver_vs_images()
    assert verdict.status == "fail" and "envbuild/qcnet:y-cu111: fail" in verdict.reason, verdict


def test_audit_of_a_multi_card_image_scans_it_once_and_judges_each_card(cat, monkeypatch):
    from envbuild import pipeline
    scans, judged = [], []
    monkeypatch.setattr(pipeline.audit_stage, "scan", lambda ref, timeout=None: scans.append(ref) or ["lib"])
    monkeypatch.setattr(pipeline.audit_stage, "audit", lambda ref, card, libs: judged.append((card.id, libs)) or {"ok": True})
    assert len(pipeline._audit_all("envbuild/x:1", cat, "a800,h20")) == 2
    assert scans == ["envbuild/x:1"] and judged == [("a800", ["lib"]), ("h20", ["lib"])]


def test_audit_of_a_multi_card_image_names_the_card_it_fails_and_the_one_it_passes(monkeypatch, capsys):
    """The audit's verdict per card, on a synthetic scan of an a800+h20 image (the scan container
    is the only stand-in): an extension compiled for sm_80 only runs on the A800 and not on the
    H20; torch's own wheel runs on both; a CUDA library without code for a card is a warning, not
    a failure. The verdict names the failing card, its library and what it lacks, and not the other."""
    from envbuild import pipeline, show
    ext = "/opt/venv/lib/python3.11/site-packages/mmcv/_ext.cpython-311-x86_64-linux-gnu.so"
    scanned = [
        {"path": "/opt/venv/lib/python3.11/site-packages/torch/lib/libtorch_cuda.so", "sass": ["8.0", "9.0"], "ptx": []},
        {"path": ext, "sass": ["8.0"], "ptx": []},
        {"path": "/opt/venv/lib/python3.11/site-packages/nvidia/cublas/lib/libnvblas.so.11", "sass": ["5.2"], "ptx": []},
    ]
    monkeypatch.setattr(pipeline.export_stage, "local_image", lambda ref: None)
    monkeypatch.setattr(pipeline.audit_stage, "image_cards", lambda ref: "a800,h20")  # the image's label
    monkeypatch.setattr(pipeline.audit_stage, "scan", lambda ref, timeout=None: [dict(lib) for lib in scanned])
    reports, failure = pipeline.audit_image("envbuild/mmcvnet:x")
    by_card = {r["card"]: r for r in reports}
    assert list(by_card) == ["a800", "h20"]
    a800, h20 = by_card["a800"], by_card["h20"]
    assert a800["ok"] and a800["failures"] == [] and a800["torch_failures"] == []
    assert {lib["path"]: lib["via"] for lib in a800["libraries"]}[ext] == "sm_80 SASS"
    assert not h20["ok"] and h20["torch_failures"] == []
    assert h20["failures"] == [f"{ext}: has SASS 8.0, PTX none; NVIDIA H20 needs sm_9x SASS with minor <= 0 or PTX <= 9.0"]
    assert {lib["path"]: lib["runs"] for lib in h20["libraries"]} == {scanned[0]["path"]: True, ext: False,
                                                                      scanned[2]["path"]: False}
    for report in (a800, h20):  # NVIDIA's shim: reported, never the verdict
        assert report["warnings"] == [f"{scanned[2]['path']} (NVIDIA CUDA library) has no code for {report['cc']}"]
    assert str(failure) == "1 library cannot run on NVIDIA H20"
    show.audit("envbuild/mmcvnet:x", reports)
    out = capsys.readouterr().out
    assert "all 3 libraries with GPU code run on NVIDIA A800" in out
    assert "FAILS on NVIDIA H20: " in out and "FAILS on NVIDIA A800" not in out
    # an explicit --card judges only that card: the A800 alone passes
    reports, failure = pipeline.audit_image("envbuild/mmcvnet:x", "a800")
    assert [r["card"] for r in reports] == ["a800"] and failure is None


def test_bake_build_on_a_remote_builder_reports_pushed_images_without_asking_the_local_daemon(monkeypatch, tmp_path):
    """docker-container, kubernetes and remote builders push and load nothing here: the bake is done
    when buildx is, each image named by its tag (only the docker driver's images are inspected here)."""
    from envbuild import bake, build, engine
    from envbuild.config import Sources
    doc = {"group": {"wave-1": {"targets": ["m-a800"]}, "wave-2": {"targets": ["m-h20"]}},
           "target": {n: {"tags": [f"reg:5000/envbuild/m:{n}"], "labels": {"io.envbuild.card": n[2:]}}
                      for n in ("m-a800", "m-h20")}}
    ran = []
    monkeypatch.setattr(engine, "find_cli", lambda: engine.Cli("/usr/bin/docker", "28.0", "buildx"))
    monkeypatch.setattr(build, "builder_driver", lambda cli: "docker-container")
    monkeypatch.setattr(build, "run_bake", lambda cli, cmd, name, echo, left, env: ran.append(cmd) or
                        {"seconds": 1.0, "log": "x", "run_steps": []})
    monkeypatch.setattr(engine, "client", lambda *a, **k: (_ for _ in ()).throw(AssertionError("asked the daemon")))
    out = bake.run(tmp_path / "b.json", doc, Sources(), push=True)
    assert [c[-1] for c in ran] == ["wave-1", "wave-2"] and all("--push" in c for c in ran)
    assert not any("--set" in c for c in ran)  # these drivers export the registry cache as written
    assert out["images"]["m-h20"] == {"tag": "reg:5000/envbuild/m:m-h20", "image_id": None,
                                      "labels": {"io.envbuild.card": "h20"}}


@pytest.mark.parametrize("major", [20, 28])
def test_bake_on_an_old_engines_docker_driver_builds_one_target_at_a_time(monkeypatch, tmp_path, major):
    """Docker 20.10's BuildKit crashed the engine when two targets of a wave exported inline caches at
    once (CI's bake); there each target is a bake run of its own, with the memory its wave shared."""
    from types import SimpleNamespace
    from envbuild import bake, build, engine
    from envbuild.config import Sources
    names = ("m-a800", "m-h20", "m-l20")
    doc = {"group": {"wave-1": {"targets": list(names[:2])}, "wave-2": {"targets": [names[2]]}},
           "target": {n: {"tags": [f"reg:5000/envbuild/m:{n}"], "labels": {}, "args": {"ENVBUILD_JOBS_CAP": "3"}}
                      for n in names}}
    ran = []
    monkeypatch.setattr(engine, "find_cli", lambda: engine.Cli("/usr/bin/docker", "28.0", "buildx"))
    monkeypatch.setattr(build, "builder_driver", lambda cli: "docker")
    monkeypatch.setattr(bake, "engine_major", lambda: major)
    monkeypatch.setattr(build, "run_bake", lambda cli, cmd, name, echo, left, env: ran.append(cmd) or
                        {"seconds": 1.0, "log": name, "run_steps": [{"step": cmd[-1], "cached": False}]})
    image = SimpleNamespace(id="sha256:1", labels={})
    monkeypatch.setattr(engine, "client", lambda *a, **k: SimpleNamespace(images=SimpleNamespace(get=lambda t: image)))
    out = bake.run(tmp_path / "b.json", doc, Sources(), push=True)
    assert all("*.cache-to=type=inline" in c and "--push" in c for c in ran)
    if major < engine.CONCURRENT_INLINE_CACHE_ENGINE:
        assert [c[-1] for c in ran] == list(names) and "moby/buildkit#2889" in out["one_at_a_time"]
        assert "m-a800.args.ENVBUILD_JOBS_CAP=6" in ran[0] and not any("ENVBUILD_JOBS_CAP" in a for a in ran[2])
        assert [(w["group"], w["seconds"], len(w["run_steps"])) for w in out["waves"]] == [("wave-1", 2.0, 2), ("wave-2", 1.0, 1)]
    else:
        assert [c[-1] for c in ran] == ["wave-1", "wave-2"] and "one_at_a_time" not in out
    assert set(out["images"]) == set(names)


def test_the_wheel_export_never_asks_buildx_to_load_an_image_too(monkeypatch, tmp_path):
    """buildx refuses --load beside the local exporter ("multiple outputs currently unsupported"):
    `envbuild wheels` failed wherever the buildx plugin was installed."""
    from envbuild import build, engine
    ran = []
    monkeypatch.setattr(engine, "client", lambda *a, **k: object())
    monkeypatch.setattr(engine, "find_cli", lambda: engine.Cli("/usr/bin/docker", "28.0", "buildx"))
    monkeypatch.setattr(build, "_run", lambda cli, cmd, log, echo, *a, **k: ran.append(cmd) or (0, []))
    monkeypatch.setenv("ENVBUILD_HOME", str(tmp_path))
    build.export_stage(tmp_path, "wheels", tmp_path / "out")
    (cmd,) = ran
    assert cmd[:3] == ["/usr/bin/docker", "buildx", "build"] and "--load" not in cmd
    assert cmd[cmd.index("--output") + 1] == f"type=local,dest={tmp_path / 'out'}"
    assert "--load" in engine.Cli("/usr/bin/docker", "28.0", "buildx").build_cmd()  # an image build still loads
