"""The CLI as a user runs it: a real subprocess, exit codes, no tracebacks."""

import json
import os
import subprocess
import sys

import pytest


def envbuild(*args, env=None):
    return subprocess.run([sys.executable, "-m", "envbuild.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_models_and_cards_json():
    models = json.loads(envbuild("models", "--json").stdout)
    assert {m["name"] for m in models} >= {"maptr", "sparsedrive", "qcnet", "gaussianformer"}
    cards = json.loads(envbuild("cards", "--json").stdout)
    assert any(c["id"] == "h20" and c["cc"] == "9.0" for c in cards)


def test_resolve_prints_the_plan_with_reasons():
    r = envbuild("resolve", "maptr", "--card", "h20")
    assert r.returncode == 0, r.stderr
    assert "PORT" in r.stdout and "TORCH_CUDA_ARCH_LIST=9.0" in r.stdout and "local-rank" in r.stdout
    data = json.loads(envbuild("resolve", "maptr", "--card", "h20", "--json").stdout)
    assert data["mode"] == "port" and data["deviations"]


@pytest.mark.parametrize("args,needle", [
    (["resolve", "maptr", "--card", "h2"], "did you mean h20"),
    (["resolve", "mapt", "--card", "a100"], "did you mean maptr"),
    (["resolve", "maptr", "--card", "a100", "--cuda", "9.9"], "unknown CUDA version"),
    (["resolve", "maptr", "--card", "h20", "--strict"], "impossible with upstream pins"),
    (["resolve", "sparsedrive", "--card", "v100"], "flash-attn"),
    (["resolve", "maptr", "--set", "torch>=2"], "expected PKG==VERSION"),
    (["resolve", "maptr", "--torch-index", "ftp://x"], "not an http(s) URL"),
])
def test_bad_input_is_one_clear_line_exit_2(args, needle):
    r = envbuild(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_malformed_matrix_exit_2(tmp_path):
    (tmp_path / "cards.toml").write_text("[cards]\n")
    r = envbuild("cards", env={"ENVBUILD_MATRICES": str(tmp_path)})
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_matrix_grid():
    r = envbuild("matrix", "--models", "maptr,sparsedrive", "--cards", "a100,h20,v100", "--json")
    cells = {(c["model"], c["card"]): c for c in json.loads(r.stdout)}
    assert cells[("maptr", "a100")]["status"] == "upstream"
    assert cells[("maptr", "h20")]["status"] == "port" and "torch 2.0" in cells[("maptr", "h20")]["summary"]
    assert cells[("sparsedrive", "v100")]["status"] == "impossible"


def test_sources_from_config_file_and_env(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('torch_index = "none"\n')
    r = envbuild("resolve", "qcnet", "--card", "a800", "--json", env={"ENVBUILD_CONFIG": str(cfg)})
    assert json.loads(r.stdout)["torch_index"] is None
    r = envbuild("resolve", "qcnet", "--card", "a800", "--json",
                 env={"ENVBUILD_CONFIG": str(cfg), "ENVBUILD_TORCH_INDEX": "https://mirror.example/whl"})
    assert json.loads(r.stdout)["torch_index"] == "https://mirror.example/whl/cu118"


@pytest.mark.parametrize("args, says", [
    (["resolve"], "Missing argument 'model'"),
    (["resolve", "maptr", "--bogus"], "No such option: --bogus"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
    (["smoke", "img", "--steps", "1"], "Invalid value for '--steps'"),
])
def test_usage_errors_are_one_line_and_exit_2(args, says):
    r = envbuild(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    first, hint = r.stderr.strip().splitlines()
    assert first.startswith("error: ") and says in first and hint.startswith("hint: envbuild")


def test_help_and_no_arguments_exit_0():
    for args in ([], ["--help"], ["smoke", "--help"]):
        r = envbuild(*args)
        assert r.returncode == 0 and "Usage" in r.stdout, args
