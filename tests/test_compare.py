"""compare: reports from different cards -> one HTML page (pure logic, no Docker)."""

import json

import pytest

from envbuild import compare
from envbuild.errors import BadInput


def report(card, gpu, samples, losses, comm=None, compiled=None):
    runs = {"synthetic": {"status": "passed", "device": "cuda", "losses": losses, "first_loss": losses[0],
                          "last_loss": losses[-1], "samples_per_s": samples, "step_time_s": 4 / samples,
                          "data_wait_share": 0.02, "peak_gpu_mem_mb": 812.5}}
    if compiled:
        runs["synthetic_compiled"] = compiled
    levels = {"train": {"status": "passed", "runs": runs}}
    if comm:
        levels["comm"] = comm
    return {"card": card, "card_name": card.upper(), "model": "tinybev", "ok": True,
            "environment": {"gpus": [gpu], "torch": "2.0.1"}, "levels": levels}


def test_page_has_one_curve_per_card_and_the_gpu_figures(tmp_path):
    a = report("a800", "NVIDIA A800-SXM4-80GB", 410.0, [0.7, 0.6, 0.5],
               comm={"status": "passed", "works_with": "NCCL_P2P_DISABLE=1",
                     "attempts": [{"ok": False, "error": "timed out"}, {"ok": True, "bus_GBps": 88.5}]},
               compiled={"status": "passed", "speedup_vs_eager": 1.34})
    h = report("h20", "NVIDIA H20", 530.0, [0.7, 0.55, 0.45, 0.4])
    paths = []
    for i, r in enumerate((a, h)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(r))
    page = compare.page(compare.load(paths))
    assert page.count("<polyline") == 2 and "NVIDIA H20" in page and "A800-SXM4" in page
    assert "88.5 (NCCL_P2P_DISABLE=1)" in page and "1.34x" in page and "812.5" in page


def test_a_report_without_a_passed_train_run_is_bad_input(tmp_path):
    bad = report("a800", "x", 1.0, [1.0])
    bad["levels"]["train"]["runs"]["synthetic"]["status"] = "failed"
    (tmp_path / "r.json").write_text(json.dumps(bad))
    with pytest.raises(BadInput):
        compare.load([tmp_path / "r.json"])
