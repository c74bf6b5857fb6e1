"""benchmarks/results.py: the README's measured table is made from the committed results."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import results  # noqa: E402 - benchmarks/results.py


def test_the_readme_measured_table_is_the_one_made_from_the_results():
    text = (ROOT / "README.md").read_text()
    assert results.readme_with_table(text) == text, "README's measured table is stale: python benchmarks/results.py --write"


def test_every_row_reads_its_results_file_and_a_changed_number_changes_the_table(tmp_path, monkeypatch):
    """Each committed results file fills its rows; a number changed in a file shows in the table
    (the table is not typed), and a missing file is named instead of its rows."""
    names = {name for name, _, _ in results.ROWS}
    present = {p.stem for p in results.RESULTS.glob("*.json")} & names
    assert present, "no results committed"
    before = results.table()
    monkeypatch.setattr(results, "RESULTS", tmp_path)
    for name in present:
        data = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    assert results.table() == before
    data = json.loads((tmp_path / "resolve.json").read_text())
    data["total_s"] = 123.25
    (tmp_path / "resolve.json").write_text(json.dumps(data))
    assert "123.25 s in all" in results.table()
    (tmp_path / "resolve.json").unlink()
    table = results.table()
    assert "resolve every model" not in table and "no `resolve.json`" in table


def test_a_result_records_when_where_and_how_it_was_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "bench_resolve.py")])
    data = json.loads(results.write("resolve", {"total_s": 0.5}).read_text())
    meta = data.pop("meta")
    assert data == {"total_s": 0.5}
    assert meta["command"] == "python benchmarks/bench_resolve.py" and len(meta["date"]) == 10
    assert meta["machine"]["cores"] >= 1 and meta["machine"]["memory_gb"] >= 1 and isinstance(meta["machine"]["gpus"], list)


def test_a_readme_without_the_markers_is_refused():
    with pytest.raises(SystemExit, match="no <!-- measured"):
        results.readme_with_table("# README\n")


def _bench_archs_on(records: dict, tmp_path, monkeypatch) -> dict:
    """Run bench_archs over a ledger folder holding these records ({file name: record}); what it would write."""
    import json
    import bench_archs
    folder = tmp_path / "verified"
    folder.mkdir()
    for name, rec in records.items():
        (folder / name).write_text(json.dumps(rec))
    monkeypatch.setattr(bench_archs.ledger, "folders", lambda: [folder])
    written = {}
    monkeypatch.setattr(bench_archs.results, "write", lambda name, data: written.update(data))
    assert bench_archs.main() == 0
    return written


def test_bench_archs_pairs_one_package_version_across_arch_counts(tmp_path, monkeypatch):
    """Only the same package at the same version is compared; each side keeps its toolchain."""
    from envbuild import ledger

    def record(card, version, seconds, cuda, cached=False, verdict=ledger.PASSED):
        step = f"[wheel-mmcv 2/2] RUN mkdir -p /src && pip download mmcv=={version} && pip wheel ."
        return {"verdict": verdict, "request": {"card": card}, "plan": {"torch": "2.11.0", "cuda": cuda},
                "stages": [{"step": step, "seconds": seconds, "cached": cached}]}
    records = {"a.json": record("a800", "2.0.1", 1200.0, "11.8.0"), "b.json": record("h20,b200", "2.0.1", 2600.0, "13.0.2"),
               "c.json": record("h20,b200", "2.2.0", 100.0, "13.0.2"),
               # served from BuildKit's cache: no compile measured; a failed cell measures nothing
               "d.json": record("h20,b200", "2.0.1", 49.8, "13.0.2", cached=True),
               "e.json": record("h20,b200", "2.0.1", 30.0, "13.0.2", verdict="failed"),
               # ccache served objects an earlier, stopped build compiled: not a cold compile
               "f.json": record("h20,b200", "2.0.1", 9000.0, "13.0.2")}
    records["f.json"]["stages"][0]["ccache"] = {"hits": 3, "misses": 40}
    (pair,) = _bench_archs_on(records, tmp_path, monkeypatch)["pairs"]
    assert pair["fewer_archs"]["version"] == pair["more_archs"]["version"] == "2.0.1"
    assert pair["ratio_more_to_fewer"] == round(2600 / 1200, 2) and pair["same_toolchain"] is False


def test_bench_archs_pairs_two_archs_with_three_on_one_toolchain(tmp_path, monkeypatch):
    """A two-card and a three-card image of one wheel pair too (the cost of one more card); a
    one-card and a two-card image of different versions do not."""
    from envbuild import ledger

    def record(card, version, seconds):
        step = f"[wheel-mmcv-full 1/1] RUN pip download mmcv-full=={version} && pip wheel ."
        return {"verdict": ledger.PASSED, "request": {"card": card}, "plan": {"torch": "2.11.0", "cuda": "13.0.2"},
                "stages": [{"step": step, "seconds": seconds}]}
    written = _bench_archs_on({"a.json": record("h20,b200", "1.7.2", 1800.0),
                               "b.json": record("h20,b200,rtx5090", "1.7.2", 2500.0),
                               "c.json": record("a800", "1.7.1", 1100.0)}, tmp_path, monkeypatch)
    (pair,) = written["pairs"]
    assert (pair["fewer_archs"]["archs"], pair["more_archs"]["archs"]) == (["9.0", "10.0"], ["9.0", "10.0", "12.0"])
    assert pair["ratio_more_to_fewer"] == round(2500 / 1800, 2) and pair["same_toolchain"] is True
    row = next(r for r in results.ROWS if r[0] == "archs")
    assert "9.0+10.0+12.0" in row[1](written) and "2500 s / 1800 s = 1.39" in row[2](written)


def test_bench_archs_counts_a_cold_compile_a_later_build_found_cached(tmp_path, monkeypatch):
    """A verify that reran (its first try failed after the compile) finds the wheel stage in
    BuildKit's cache; its record carries the time and ccache counts of the build that compiled it
    (from_log). That is a cold compile when those counts say no hits, and nothing to go by without them."""
    from envbuild import ledger

    def record(card, seconds, **step):
        run = "[wheel-mmcv-full 2/2] RUN pip download mmcv-full==1.7.2 && pip wheel ."
        return {"verdict": ledger.PASSED, "request": {"card": card}, "plan": {"torch": "2.11.0", "cuda": "13.0.2"},
                "stages": [{"step": run, "seconds": seconds, "cached": False, **step}]}
    log = {"cached": True, "from_log": "/root/.cache/envbuild/logs/maptr-h20+b200-1.log"}
    written = _bench_archs_on({
        "a.json": record("h20,b200", 2347.0, **log, ccache={"hits": 0, "misses": 129}),
        "b.json": record("h20,b200,rtx5090", 3300.0, ccache={"hits": 0, "misses": 129}),
        "c.json": record("a800", 900.0, **log),  # carried, no counts: cannot tell
        "d.json": record("a800", 60.0, **log, ccache={"hits": 120, "misses": 9})}, tmp_path, monkeypatch)
    (pair,) = written["pairs"]
    assert (pair["fewer_archs"]["seconds"], pair["more_archs"]["seconds"]) == (2347.0, 3300.0)
    assert {r["record"] for r in written["stages_seen"]} == {"a.json", "b.json"}


def test_bench_ci_calls_a_stopped_engine_with_data_warm_and_a_new_machine_cold(tmp_path, monkeypatch):
    """.ci/run starts the engine: before it, an engine that does not answer is cold only when its
    data folder is absent or empty (a new machine, a wiped one); images and cache on disk make it warm."""
    import subprocess
    import bench_ci
    monkeypatch.setattr(bench_ci.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no engine"))
    monkeypatch.setattr(bench_ci, "DOCKER_DATA", tmp_path / "docker")
    assert bench_ci.docker_state() == {"images": None, "build_cache": None}
    (tmp_path / "docker").mkdir()  # wiped, or a mount point: still cold
    assert bench_ci.docker_state() == {"images": 0, "build_cache": "0B"}
    for n in range(3):
        config = tmp_path / "docker" / "image" / "overlay2" / "imagedb" / "content" / "sha256" / f"{n:064x}"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text("{}")
    (tmp_path / "docker" / "buildkit").mkdir()
    (tmp_path / "docker" / "buildkit" / "cache.db").write_bytes(b"x" * 2_000_000)
    state = bench_ci.docker_state()
    assert state["images"] == 3 and state["build_cache"].startswith("0.0GB (engine stopped")


def test_a_cold_ci_row_says_new_machine_only_when_ci_run_installed_the_tools():
    """A wiped Docker on a machine that kept its packages is cold, not new: the row says which."""
    import bench_ci
    new = ">> apt-get install docker.io debootstrap docker-registry\n>> installing docker-buildx from Debian 13\n"
    assert bench_ci.installed(new) == ["docker.io", "debootstrap", "docker-registry", "docker-buildx"]
    assert bench_ci.installed(">> disk: 20 GB free, 0 GB of BuildKit cache\n") == []
    describe = next(r for r in results.ROWS if r[0] == "ci_cold")[1]
    cold = {"cold": True, "at_start": {"images": 0, "build_cache": "0B"}}
    assert "a new machine" not in describe(cold) and "no BuildKit cache" in describe(cold)
    assert "a new machine (.ci/run installed docker.io, debootstrap)" in describe(dict(cold, installed=["docker.io", "debootstrap"]))


def test_ci_sizes_buildkits_cache_on_a_new_machine_and_a_warm_one(tmp_path):
    """.ci/run asks .ci/buildkit-keep how much build cache its engine keeps. A new machine has no
    Docker data folder: `du` failing there once stopped .ci/run under `set -e` before any test."""
    import subprocess

    def keep(data):
        r = subprocess.run(["bash", "-euo", "pipefail", str(ROOT / ".ci" / "buildkit-keep"), str(data)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        kept, room = map(int, r.stdout.split())
        assert 15 <= kept <= 40 and kept in (15, 40, room - 33)
        return room
    assert keep(tmp_path / "new-machine" / "docker") > 0
    held = tmp_path / "docker"
    held.mkdir()
    (held / "layer").write_bytes(b"\0" * 1024)
    assert keep(held) > 0  # what Docker holds counts as room (at least 1 GB, du rounds up)
