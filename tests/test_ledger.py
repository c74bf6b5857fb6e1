"""The verified ledger: committed records parse, and each still matches today's Plan."""

import json

import pytest

from conftest import ROOT

from envbuild import ledger
from envbuild.config import Sources
from envbuild.resolve import resolve

REQUEST = {"model": "qcnet", "card": "a800", "python": "3.11", "cuda": "11.8", "torch_index": "none"}


def plan(cat, **kw):
    return resolve(cat, "qcnet", "a800", python="3.11", cuda="11.8", sources=Sources(torch_index=None), **kw)


def test_committed_records_parse_and_match_todays_plans(cat):
    for rec in ledger.load():
        today = ledger.plan_for_record(cat, rec)
        assert ledger.digest(today) == rec["digest"], \
            f"{rec['_file']} is stale: the Plan changed since {rec['date']}; rerun make verify for that cell"
        assert rec["verdict"] in ("passed", "failed") and (rec["verdict"] == "passed" or rec["failure"])


def test_status_verified_failed_and_stale(cat, tmp_path):
    p = plan(cat)
    image = {"image_id": "sha256:" + "1" * 64, "size_bytes": 6_330_000_000, "build_seconds": 2868.0,
             "run_steps": [{"step": "[builder 3/9] RUN pip install torch-cluster", "seconds": 1109.0, "cached": False}]}
    report = {"levels": {"env": {"status": "passed"}, "model": {"status": "passed", "parameters": 7660673}}}
    ledger.write(p, REQUEST, image, True, report, path=tmp_path)
    records = ledger.load(tmp_path)
    assert records[0]["parameters"] == 7660673 and records[0]["stages"][0]["seconds"] == 1109.0
    assert ledger.status(p, REQUEST, records).startswith("verified on ")
    other = {**REQUEST, "python": "3.10"}
    # another request of the same cell: not verified, and the request the record covers is named
    assert ledger.status(plan(cat), other, records) == ("not verified; the ledger holds only verified "
                                                        f"{records[0]['date']} as the port of --card a800 "
                                                        "--python 3.11 --cuda 11.8 --torch-index none")
    assert ledger.status(plan(cat), {**REQUEST, "model": "maptr"}, records) == "not verified"
    # a Plan that changed since (another pin) makes the record stale
    changed = resolve(cat, "qcnet", "a800", python="3.11", cuda="11.8", sources=Sources(torch_index=None),
                      overrides={"numpy": "1.24.4"})
    assert ledger.status(changed, REQUEST, records).startswith("stale")
    # a failure is recorded with its reason, not dropped
    ledger.write(p, REQUEST, image, True, {"levels": {"env": {"status": "failed"}}}, "smoke env: cv2: libGL.so.1",
                 path=tmp_path)
    assert ledger.status(p, REQUEST, ledger.load(tmp_path)).startswith("FAILED on ")


def test_digest_ignores_how_the_plan_explains_itself(cat):
    p = plan(cat)
    from dataclasses import replace
    assert ledger.digest(p) == ledger.digest(replace(p, cards_why="the config's card", notes=("x",)))
    assert ledger.digest(p) != ledger.digest(replace(p, arch_list="8.0;9.0"))


def test_a_malformed_record_is_one_clear_error(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"request": {}}))
    from envbuild.errors import BadInput
    with pytest.raises(BadInput, match="bad.json: not a ledger record"):
        ledger.load(tmp_path)


def test_cached_steps_record_what_they_took_in_the_build_that_ran_them(cat, tmp_path, monkeypatch):
    """A re-verify that recompiles nothing still records the cell's cold cost: each cached step
    takes its time from the newest log that ran it, matched by command (stage numbers shift)."""
    monkeypatch.setenv("ENVBUILD_HOME", str(tmp_path))
    logs = tmp_path / "logs"
    logs.mkdir()
    p = plan(cat)
    old = ("#7 [builder 3/12] RUN pip install torch-cluster==1.6.1\n#7 1569.0 envbuild-ccache: 0 hits, 38 misses\n"
           "#7 DONE 1569.2s\n"
           "#8 [deps 2/3] RUN pip install -r requirements.lock\n#8 DONE 91.6s\n")
    older = "#7 [builder 3/12] RUN pip install torch-cluster==1.6.1\n#7 DONE 9999.0s\n"
    (logs / f"{p.model}-{p.card}-20261129-100000.log").write_text(older)
    (logs / f"{p.model}-{p.card}-20261129-120000.log").write_text(old)
    summary = {"run_steps": [{"step": "[builder 3/16] RUN pip install torch-cluster==1.6.1", "cached": True, "seconds": None},
                             {"step": "[deps 2/5] RUN pip install -r requirements.lock", "cached": False, "seconds": 95.0},
                             {"step": "[runtime 2/8] RUN apt-get install x", "cached": True, "seconds": None}]}
    out = ledger.with_cold_times(p, summary)
    steps = out["run_steps"]
    assert steps[0]["seconds"] == 1569.2 and steps[0]["from_log"].endswith("120000.log")  # the newest that ran it
    assert steps[0]["ccache"] == {"hits": 0, "misses": 38}  # and what ccache served in that run
    assert steps[1]["seconds"] == 95.0 and "from_log" not in steps[1]  # ran in this build: its own time
    assert steps[2]["seconds"] is None  # no log ran it: unknown, not made up
    assert out["build_seconds"] == 1664.2


def test_a_build_past_its_time_limit_is_stopped_and_names_what_it_was_compiling(tmp_path):
    """verify --time-limit: the build client is stopped at the limit, and the error (the ledger's
    failure) names the step still running and how far its ninja count got; finished steps are not named."""
    import sys
    import time

    from envbuild import build, engine
    from envbuild.errors import OperationFailed
    builder = tmp_path / "builder.py"  # prints BuildKit's plain progress, then compiles "forever"
    builder.write_text(
        "import sys, time\n"
        "print('#4 [compile 3/3] RUN pip install ninja'); print('#4 DONE 0.5s')\n"
        "print('#3 [runtime 1/10] FROM docker.io/envbuild/debian:12')\n"  # no DONE: not work
        "print('#5 [wheel-flash-attn 1/1] RUN pip wheel flash-attn==2.3.2')\n"
        "print('#5 12.0 [3/96] nvcc flash_fwd_hdim32_fp16_sm80.cu')\n"
        "print('#5 95.1   [7/96] nvcc flash_bwd_hdim64_bf16_sm80.cu'); sys.stdout.flush()\n"  # pip -v indents it
        "time.sleep(60)\n")
    started = time.monotonic()
    with pytest.raises(OperationFailed) as err:
        build._run(engine.Cli("docker", "28", "builtin"), [sys.executable, str(builder)], tmp_path / "build.log", None, time_limit=2)
    assert time.monotonic() - started < 30  # stopped, not waited out
    assert err.value.message == ("build stopped at its time limit (2 s) while running: "
                                 "[wheel-flash-attn 1/1] (ninja: 7 of 96 compiled)")
    assert err.value.log == str(tmp_path / "build.log") and "[7/96]" in (tmp_path / "build.log").read_text()
    assert err.value.hint.startswith("run it again to continue")
    assert build.compiled_so_far((tmp_path / "build.log").read_text().splitlines()) == {"wheel-flash-attn": (7, 96)}


@pytest.mark.parametrize("how", ["failed", "interrupted"])
def test_a_build_that_fails_or_is_interrupted_tells_how_far_its_compiles_got(tmp_path, monkeypatch, how):
    """on_stop hears ninja's count from the build's log on every way a build ends unfinished, not only
    the time limit: a sibling stage failing (BuildKit cancels the compile) and Ctrl-C."""
    from envbuild import build, engine
    from envbuild.errors import OperationFailed
    monkeypatch.setenv("ENVBUILD_HOME", str(tmp_path))
    monkeypatch.setattr(engine, "client", lambda: None)
    monkeypatch.setattr(engine, "find_cli", lambda: engine.Cli("docker", "28", "builtin"))
    printed = ["#5 [wheel-flash-attn 1/1] RUN pip wheel flash-attn==2.7.4.post1\n", "#5 900.0   [12/85] nvcc a.cu\n",
               "#6 [deps 2/2] RUN pip install -r requirements.lock\n", "#6 ERROR: exit code: 1\n", "#5 CANCELED\n"]

    def run(cli, cmd, log_path, echo, time_limit):
        log_path.write_text("".join(printed))
        if how == "interrupted":
            raise KeyboardInterrupt
        return 1, printed
    monkeypatch.setattr(build, "_run", run)
    heard = []
    with pytest.raises(OperationFailed if how == "failed" else KeyboardInterrupt):
        build.build(tmp_path, [], on_stop=heard.append)
    assert heard == [{"wheel-flash-attn": (12, 85)}]


def test_a_build_that_finishes_within_its_time_limit_is_not_stopped(tmp_path):
    import sys

    from envbuild import build, engine
    rc, lines = build._run(engine.Cli("docker", "28", "builtin"), [sys.executable, "-c", "print('#1 [base 1/1] FROM x'); print('#1 DONE 0.1s')"],
                           tmp_path / "build.log", None, time_limit=30)
    assert rc == 0 and lines[-1].strip() == "#1 DONE 0.1s"


def test_a_build_that_fails_or_is_stopped_by_someone_else_within_its_limit_is_not_called_a_time_limit_stop(tmp_path):
    """A compile error (or a client killed by hand) in a build with --time-limit keeps its own
    exit code: the ledger must record the real failure, not 'stopped at its time limit'."""
    import sys

    from envbuild import build, engine
    cli = engine.Cli("docker", "28", "builtin")
    failing = "print('#5 [wheel-x 1/1] RUN pip wheel .'); print('#5 ERROR: exit code: 1'); raise SystemExit(1)"
    rc, lines = build._run(cli, [sys.executable, "-c", failing], tmp_path / "build.log", None, time_limit=60)
    assert rc == 1 and "ERROR" in lines[-1]
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    rc, _ = build._run(cli, [sys.executable, "-c", killed], tmp_path / "build.log", None, time_limit=60)
    assert rc == -15


def test_matrix_marks_the_cells_the_ledger_holds_verified_failed_or_stale(tmp_path):
    """README: matrix marks the cells (verified / FAILED / stale) from the committed records; a
    record whose Plan changed since is stale."""
    import os
    import shutil
    import subprocess
    import sys

    def matrix(env):
        r = subprocess.run([sys.executable, "-m", "envbuild.cli", "matrix", "--models", "qcnet,sparsedrive,maptr",
                            "--cards", "a800,h20", "--json"], capture_output=True, text=True,
                           env={**os.environ, "ENVBUILD_TORCH_INDEX": "none", **env}, timeout=120)
        assert r.returncode == 0, r.stderr
        return {(c["model"], c["card"]): c.get("verified") for c in json.loads(r.stdout)}
    cells = matrix({})
    by_record = {rec["request"]["model"]: rec["verdict"] for rec in ledger.load()}
    # the matrix's cells are the default request (no --python): a record of the Python 3.11 port is
    # named as exactly that, never as the cell's upstream (issue 24)
    covers = "only as the port of --card a800 --python 3.11 --cuda 11.8 --torch-index none"
    assert by_record["qcnet"] == "passed" and cells[("qcnet", "a800")] == f"verified {covers}"
    assert by_record["sparsedrive"] == "passed" and cells[("sparsedrive", "a800")] == f"verified {covers}"
    # a record for several cards covers each of them, named as the request it was made for
    assert cells[("qcnet", "h20")] == "verified only as the port of --card h20,b200 --python 3.11 --cuda 13.0 --torch-index none"
    assert cells[("sparsedrive", "h20")] == ("verified only as the port of --card h20,b200 --python 3.11 --cuda 13.0 "
                                             "--torch-index none --trim-kernels")
    # a user catalog whose qcnet pins another lightning: the same request now makes another Plan
    user = tmp_path / "mine"
    (user / "models").mkdir(parents=True)
    text = (ledger.folders()[0].parent / "models" / "qcnet.toml").read_text()
    assert 'lightning = "2.0.3"' in text
    (user / "models" / "qcnet.toml").write_text(text.replace('lightning = "2.0.3"', 'lightning = "2.0.2"'))
    # ... and a later record of the same sparsedrive Plan that failed: the newest record decides
    (user / "verified").mkdir()
    record = json.loads((ledger.folders()[0] / "sparsedrive-a800-py3.11.json").read_text())
    record.update(verdict="failed", date="2099-01-01", failure="smoke env: import motmetrics: ImportError")
    (user / "verified" / "sparsedrive-a800-py3.11.json").write_text(json.dumps(record))
    cells = matrix({"ENVBUILD_MATRICES": str(user)})
    assert cells[("qcnet", "a800")].startswith("stale") and cells[("sparsedrive", "a800")] == f"FAILED {covers}"


def test_the_readme_table_says_what_each_record_says():
    """README's verified table: one row per record, with its verdict, date and parameter count."""
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text().splitlines()
    for rec in ledger.load():
        req = rec["request"]
        rows = [line for line in readme if line.startswith(f"| {req['model']}, {req['card'].upper()}, Python {req['python']}")]
        assert len(rows) == 1, (rec["_file"], rows)
        word = "verified" if rec["verdict"] == "passed" else "FAILED"
        assert f"| {word} {rec['date']}" in rows[0], (rec["_file"], rows[0][:200])
        if rec.get("parameters"):
            assert f"{rec['parameters']:,} parameters" in rows[0], rec["_file"]


def test_a_record_keeps_the_verdict_levels_parameters_and_training_step(cat, tmp_path):
    """What the ledger keeps of a verification: passed only when the audit, env and model all
    passed; the model level's parameter count and its training step (loss, gradients) as they were."""
    p = plan(cat)
    step = {"loss": 48.0, "parameter_tensors": 935, "finite_grads": True}
    report = {"levels": {"env": {"status": "passed"}, "model": {"status": "passed", "parameters": 7660673, "step": step}}}
    image = {"image_id": "sha256:abc", "size_bytes": 6_330_000_000, "build_seconds": 3909.0,
             "run_steps": [{"step": "[wheel-x 1/1] RUN pip wheel", "seconds": 1569.2, "cached": False}]}
    request = {"model": p.model, "card": "a800", "python": "3.11", "cuda": "11.8", "torch_index": "none"}
    rec = json.loads(ledger.write(p, request, image, True, report, path=tmp_path).read_text())
    assert rec["verdict"] == "passed" and rec["levels"] == {"env": "passed", "model": "passed"}
    assert rec["parameters"] == 7660673 and rec["train_step"] == step and rec["audit"] == "passed"
    assert rec["stages"] == [{"step": "[wheel-x 1/1] RUN pip wheel", "seconds": 1569.2, "cached": False}]
    assert rec["digest"] == ledger.digest(p) and rec["image_size_bytes"] == 6_330_000_000
    for audit_ok, levels in ((False, report["levels"]), (True, dict(report["levels"], model={"status": "failed"}))):
        rec = json.loads(ledger.write(p, request, image, audit_ok, {"levels": levels}, path=tmp_path).read_text())
        assert rec["verdict"] == "failed", (audit_ok, levels)


def test_a_record_marks_its_cell_plainly_only_for_the_exact_request(cat):
    request = {"python": "3.11", "cuda": "11.8", "torch_index": "none"}
    assert ledger.marks(cat, request)[("qcnet", "a800")] == "verified"
    assert "upstream" not in ledger.marks(cat, {"python": None, "cuda": None, "torch_index": "none"})[("maptr", "a800")]


def test_a_record_keeps_what_ccache_served_in_each_compiling_step(cat, tmp_path):
    """ccache_stats.py, run last in a compiling step, counts the step's compiles from ccache's stats
    log; its line reaches the step in the record, so the estimate can tell a cold compile from one
    an earlier, stopped build fed."""
    import subprocess
    import sys
    from envbuild.build import parse_progress, run_steps
    statslog = tmp_path / "ccache.log"  # ccache 4.x's stats_log: one block per compiler call
    statslog.write_text("# /src/a.cu\ncache_miss\ndirect_cache_miss\npreprocessed_cache_miss\n"
                        "# /src/b.cpp\ndirect_cache_hit\nlocal_storage_hit\n"
                        "# /src/c.cpp\npreprocessed_cache_hit\n"
                        "# /src/ext.so\ncalled_for_link\n")
    said = subprocess.run([sys.executable, "envbuild/incontainer/ccache_stats.py"], capture_output=True, text=True,
                          env={"CCACHE_STATSLOG": str(statslog), "PATH": "/usr/bin:/bin"}, cwd=ROOT, check=True).stdout
    assert said.strip() == "envbuild-ccache: 2 hits, 1 misses"
    assert not statslog.exists()  # the next step counts its own compiles
    log = ("#5 [wheel-mmcv 1/1] RUN pip wheel mmcv==2.0.1\n#5 12.0 building 'mmcv._ext'\n"
           f"#5 900.1 {said.strip()}\n#5 DONE 900.4s\n"
           "#6 [deps 2/3] RUN pip install -r requirements.lock\n#6 DONE 9.0s\n")
    steps = run_steps(parse_progress(log.splitlines()))
    assert steps[0]["ccache"] == {"hits": 2, "misses": 1} and "ccache" not in steps[1]
    out = ledger.write(plan(cat), {"model": "qcnet", "card": "a800"}, {"run_steps": steps}, True, None,
                       path=tmp_path)
    stages = json.loads(out.read_text())["stages"]
    assert stages[0]["ccache"] == {"hits": 2, "misses": 1} and "ccache" not in stages[1]


def test_a_trimmed_build_is_its_own_request_and_its_own_image(cat):
    """--trim-kernels builds another image (fewer kernels): its record is kept under a request that
    says so, the digest differs, and a plain request does not take it for its own."""
    from envbuild.resolve import resolve
    plain = resolve(cat, "sparsedrive", "h20,b200", python="3.11", cuda="13.0")
    trimmed = resolve(cat, "sparsedrive", "h20,b200", python="3.11", cuda="13.0", trim_kernels=True)
    assert ledger.digest(plain) != ledger.digest(trimmed)
    req = {"model": "sparsedrive", "card": "h20,b200", "python": "3.11", "cuda": "13.0", "torch_index": "none"}
    assert ledger._same_request(req, dict(req)) and not ledger._same_request(req, dict(req, trim_kernels=True))
    assert ledger.request_flags(dict(req, trim_kernels=True)).endswith("--torch-index none --trim-kernels")
    rec = {"request": dict(req, trim_kernels=True), "digest": ledger.digest(trimmed), "verdict": "passed",
           "date": "2026-12-05", "levels": {"env": "passed", "model": "passed"}}
    assert ledger.status(trimmed, dict(req, trim_kernels=True), [rec]).startswith("verified on 2026-12-05")
    assert "--trim-kernels" in ledger.status(plain, req, [rec])  # not verified; names what the ledger holds
    assert ledger.plan_for_record(cat, rec).native_packages["flash-attn"]["sdist_fixers"][0]["args"] == {"dims": "32+64"}
