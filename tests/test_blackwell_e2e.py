"""Hopper and Blackwell for real, without Docker Hub: `envbuild base --cuda 13.0` makes a CUDA 13
devel base from PyPI's NVIDIA wheels, the fixture is ported to a CUDA 13 torch from PyPI and its
op compiled for H20 (sm_90), B200 (sm_100) and RTX 5090 (sm_120) in one image, and the audit finds
each card's code."""

import json

import pytest

from conftest import FIXTURE, cli

pytestmark = pytest.mark.integration
CARDS = "h20,b200,rtx5090"


@pytest.fixture(scope="module")
def blackwell(docker_engine, offline_base13, fixture_env):
    args = ["tinybev", "--card", CARDS, "--cuda", "13.0", "--python", "3.11", "--source", FIXTURE / "tinybev",
            "--base-image", offline_base13["devel"], "--runtime-image", offline_base13["runtime"]]
    r = cli(fixture_env, "image", *args, "--json", "--quiet")
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout)
    summary["ref"] = summary["tags"][0]
    return summary


def test_the_cuda13_base_says_its_nvcc_targets_hopper_and_blackwell(offline_base13):
    made = offline_base13["made"]
    assert made["tag"] == "envbuild/cuda:13.0-devel-debian12" and made["source"] == "pypi"
    assert {"h20", "h100", "b200", "b300", "rtx5090"} <= set(made["sass_cards"])
    assert "v100" not in made["sass_cards"]  # CUDA 13 compiles nothing for Volta


def test_the_op_is_compiled_for_sm90_sm100_and_sm120_and_the_audit_finds_each(blackwell, fixture_env, docker_engine):
    labels = docker_engine.images.get(blackwell["ref"]).labels
    assert labels["io.envbuild.cards"] == CARDS and labels["io.envbuild.arch-list"] == "9.0;10.0;12.0"
    r = cli(fixture_env, "audit", blackwell["ref"], "--json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    reports = {rep["card"]: rep for rep in json.loads(r.stdout)}
    assert set(reports) == {"h20", "b200", "rtx5090"}
    for card, via in (("h20", "sm_90 SASS"), ("b200", "sm_100 SASS"), ("rtx5090", "sm_120 SASS")):
        ops = [lib for lib in reports[card]["libraries"] if "tinybev_ops" in lib["path"]]
        assert ops and ops[0]["sass"] == ["9.0", "10.0", "12.0"] and ops[0]["via"] == via, ops
        torch_cuda = [lib for lib in reports[card]["libraries"] if "libtorch_cuda" in lib["path"]]
        assert torch_cuda and torch_cuda[0]["via"] == via  # PyPI's CUDA 13 torch carries all three


def test_the_ported_fixture_imports_and_builds_its_network_on_the_cpu(blackwell, fixture_env, tmp_path):
    report = tmp_path / "smoke.json"
    r = cli(fixture_env, "smoke", blackwell["ref"], "--level", "env,model", "--report", report, "--gpus", "none",
            "--card", "b200")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    levels = json.loads(report.read_text())["levels"]
    assert levels["env"]["status"] == "passed" and levels["model"]["status"] == "passed", levels
    loaded = {e["load"]: e for e in levels["env"]["extensions"]}
    assert loaded["tinybev_ops"]["ok"]  # the THC-era op, fixed and compiled against torch's C++17 headers
