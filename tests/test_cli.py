"""The CLI as a user runs it: a real subprocess, exit codes, no tracebacks."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from pathlib import Path

from conftest import ROOT


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


def test_malformed_user_cards_file_exit_2_names_file_and_key(tmp_path):
    (tmp_path / "cards.toml").write_text('[cards.x9]\nname = "X9"\ncc = "nine"\nmemory_gb = 80\np2p = true\n')
    r = envbuild("cards", env={"ENVBUILD_MATRICES": str(tmp_path)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cards.toml" in r.stderr and "cards.x9.cc" in r.stderr and "'nine'" in r.stderr


def test_user_catalog_adds_and_replaces_on_top_of_the_builtin(tmp_path):
    (tmp_path / "cards.toml").write_text('[cards.x9]\nname = "NVIDIA X9"\ncc = "9.0"\nmemory_gb = 96\np2p = false\n'
                                         '[cards.a800]\nname = "NVIDIA A800 (ours)"\ncc = "8.0"\nmemory_gb = 40\n'
                                         'p2p = true\naliases = ["a800-40g"]\n')
    (tmp_path / "models").mkdir()
    from conftest import ROOT
    text = (ROOT / "matrices" / "models" / "qcnet.toml").read_text().replace('name = "qcnet"', 'name = "qcnet2"')
    (tmp_path / "models" / "qcnet2.toml").write_text(text)
    env = {"ENVBUILD_MATRICES": str(tmp_path)}
    cards = {c["id"]: c for c in json.loads(envbuild("cards", "--json", env=env).stdout)}
    assert cards["x9"]["from"] == str(tmp_path / "cards.toml") and cards["h20"]["from"] == "built-in"
    assert cards["a800"]["name"] == "NVIDIA A800 (ours)" and cards["a800"]["from"].endswith("cards.toml")
    models = {m["name"]: m for m in json.loads(envbuild("models", "--json", env=env).stdout)}
    assert models["qcnet2"]["from"] == str(tmp_path / "models" / "qcnet2.toml")
    assert models["maptr"]["from"] == "built-in" and "sparsedrive" in models
    # The same folder as the config's catalog_dir; the table output names the origin too.
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'catalog_dir = "{tmp_path}"\n')
    r = envbuild("models", env={"ENVBUILD_CONFIG": str(cfg), "COLUMNS": "400"})
    assert r.returncode == 0 and "qcnet2" in r.stdout and "built-in" in r.stdout
    r = envbuild("resolve", "qcnet2", "--card", "x9", "--json", env={"ENVBUILD_CONFIG": str(cfg)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["runtime_env"]["NCCL_P2P_DISABLE"]["value"] == "1"


def test_a_new_card_cannot_take_over_another_cards_name(tmp_path):
    (tmp_path / "cards.toml").write_text('[cards.mine]\nname = "Mine"\ncc = "9.0"\nmemory_gb = 96\np2p = true\n'
                                         'aliases = ["h20"]\n')
    r = envbuild("resolve", "maptr", "--card", "h20", env={"ENVBUILD_MATRICES": str(tmp_path)})
    assert r.returncode == 2 and "'h20' already means card 'h20'" in r.stderr


def test_missing_config_file_named_in_environment_is_an_error(tmp_path):
    r = envbuild("resolve", "maptr", "--card", "h20", env={"ENVBUILD_CONFIG": str(tmp_path / "nope.toml")})
    assert r.returncode == 2 and "nope.toml: no such file" in r.stderr


def test_matrix_grid():
    r = envbuild("matrix", "--models", "maptr,sparsedrive", "--cards", "a100,h20,v100", "--json")
    cells = {(c["model"], c["card"]): c for c in json.loads(r.stdout)}
    # MapTR's published pins cannot install together: the catalog's correction is the one deviation
    assert cells[("maptr", "a100")]["status"] == "upstream" and cells[("maptr", "a100")]["summary"] == "numpy 1.23.5"
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
    # config file < environment < flag
    r = envbuild("resolve", "qcnet", "--card", "a800", "--json", "--torch-index", "https://flag.example/whl",
                 env={"ENVBUILD_CONFIG": str(cfg), "ENVBUILD_TORCH_INDEX": "https://mirror.example/whl"})
    assert json.loads(r.stdout)["torch_index"] == "https://flag.example/whl/cu118"


@pytest.mark.parametrize("args, says", [
    (["resolve"], "Missing argument 'MODEL'"),
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


def _fake_nvidia_smi(tmp_path, lines):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    exe.write_text("#!/bin/sh\ncat <<'EOF'\n" + "\n".join(lines) + "\nEOF\n")
    exe.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _no_gpu(tmp_path):
    """A PATH without nvidia-smi, as on a host with no GPU (this test must not depend on the host)."""
    path = [d for d in os.environ["PATH"].split(":") if not os.path.exists(os.path.join(d, "nvidia-smi"))]
    return {"PATH": ":".join(path), "ENVBUILD_CONFIG": str(_empty_config(tmp_path))}


def _empty_config(tmp_path):
    cfg = tmp_path / "empty.toml"
    cfg.write_text("")
    return cfg


def test_no_card_and_no_gpu_gives_a_portable_plan_and_says_which_cards(tmp_path):
    r = envbuild("resolve", "sparsedrive", "--cuda", "11.8", "--json", env=_no_gpu(tmp_path))
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["card"] == "portable" and {"a800", "h20"} <= set(plan["cards"]) and "v100" not in plan["cards"]
    assert plan["cards_why"].startswith("portable: no --card, no GPU on this host")
    # exactly the cards the README's example output lists (14 of 17)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    listed = readme.split("for     ", 1)[1].split("  (portable", 1)[0]
    assert sorted(plan["cards"]) == sorted(c.strip() for c in listed.split(",")) and len(plan["cards"]) == 14
    r = envbuild("resolve", "sparsedrive", "--cuda", "11.8", env={**_no_gpu(tmp_path), "COLUMNS": "400"})
    assert "cards       " in r.stdout and "h20" in r.stdout and "not for v100" in r.stdout


def test_the_gpus_on_the_host_decide_the_card(tmp_path):
    env = {**_no_gpu(tmp_path), **_fake_nvidia_smi(tmp_path, ["0, NVIDIA H20, 9.0, 550.54.15, 97871",
                                                              "1, NVIDIA H20, 9.0, 550.54.15, 97871"])}
    plan = json.loads(envbuild("resolve", "maptr", "--json", env=env).stdout)
    assert plan["cards"] == ["h20"] and "the GPUs on this host (NVIDIA H20)" in plan["cards_why"]
    assert plan["arch_list"] == "9.0"
    # a flag still wins over the host
    assert json.loads(envbuild("resolve", "maptr", "--card", "a800", "--json", env=env).stdout)["cards"] == ["a800"]


def test_a_host_gpu_missing_from_the_catalog_is_one_clear_error(tmp_path):
    env = {**_no_gpu(tmp_path), **_fake_nvidia_smi(tmp_path, ["0, NVIDIA Z9000, 12.0, 600.1, 200000"])}
    r = envbuild("resolve", "maptr", env=env)
    assert r.returncode == 2 and "NVIDIA Z9000 is not in the catalog" in r.stderr and "hint:" in r.stderr


def test_with_no_gpu_the_configs_card_decides(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('card = "a800,h20"\n')
    env = {**_no_gpu(tmp_path), "ENVBUILD_CONFIG": str(cfg)}
    plan = json.loads(envbuild("resolve", "maptr", "--json", env=env).stdout)
    assert plan["cards"] == ["a800", "h20"] and plan["cards_why"] == "the config's card"
    assert plan["arch_list"] == "8.0;9.0"


def test_render_without_a_card_writes_a_portable_context(tmp_path):
    out = tmp_path / "ctx"
    r = envbuild("render", "qcnet", "--cuda", "11.8", "-o", str(out), env=_no_gpu(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "for     v100, t4" in r.stdout
    dockerfile = (out / "Dockerfile").read_text()
    assert 'TORCH_CUDA_ARCH_LIST="7.0;7.5;8.0;8.6;8.9;9.0+PTX"' in dockerfile or \
        "TORCH_CUDA_ARCH_LIST=7.0;7.5;8.0;8.6;8.9;9.0+PTX" in dockerfile
    assert 'io.envbuild.cards="v100,t4,' in dockerfile


def test_make_lint_runs_hadolint_on_the_committed_dockerfiles():
    import pathlib
    from conftest import ROOT
    venv = pathlib.Path(sys.executable).parent.parent
    r = subprocess.run(["make", "-s", "lint", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "hadolint" in subprocess.run(["make", "-n", "lint", f"VENV={venv}"], cwd=ROOT, capture_output=True,
                                        text=True).stdout


def test_a_wedged_daemon_is_named_as_such_and_does_not_hang(tmp_path):
    import socket
    import threading
    import time
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    stop = threading.Event()

    def accept():  # accept every connection and never answer
        server.settimeout(0.5)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        env = {"DOCKER_HOST": f"tcp://127.0.0.1:{server.getsockname()[1]}"}
        for args in (["images"], ["doctor"]):
            start = time.monotonic()
            r = envbuild(*args, env=env)
            took = time.monotonic() - start
            assert "Traceback" not in r.stderr, r.stderr
            assert took < 60, (args, took)
            assert "did not answer" in r.stderr + r.stdout and "wedged" in r.stderr + r.stdout, (args, r.stdout, r.stderr)
        assert r.returncode == 1
    finally:
        stop.set()
        t.join(5)
        for c in held:
            c.close()
        server.close()


def test_the_mission_command_runs_as_written_and_says_which_cards(tmp_path):
    # No GPU, no card in the config: a portable image, and the output says which cards and why before
    # anything long starts. (The daemon here is absent on purpose: the build itself is tested in e2e.)
    env = {**_no_gpu(tmp_path), "DOCKER_HOST": "unix:///nonexistent/docker.sock", "COLUMNS": "400",
           "ENVBUILD_HOME": str(tmp_path / "home")}
    r = envbuild("image", "sparsedrive", "--cuda", "11.8", env=env)
    assert "Missing option" not in r.stderr and "Traceback" not in r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("for ") and "a800" in first and "h20" in first and "v100" not in first
    assert "portable" in first and "no GPU on this host" in first
    assert r.returncode == 1 and "no Docker daemon" in r.stderr


def test_wheels_refuses_a_model_without_compiled_packages_and_a_folder_it_did_not_write(tmp_path):
    env = {"ENVBUILD_MATRICES": str(tmp_path / "m"), "ENVBUILD_HOME": str(tmp_path / "home")}
    (tmp_path / "m" / "models").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "fixture" / "tinybev.toml", tmp_path / "m" / "models")
    r = envbuild("wheels", "tinybev", "--card", "a800", env=env)
    assert r.returncode == 2 and "compiles no package from source" in r.stderr and "Traceback" not in r.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    r = envbuild("wheels", "qcnet", "--card", "a800", "-o", str(mine), env=env)
    assert r.returncode == 2 and "envbuild did not write it" in r.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("driver, status", [("550.54.15", "ok"), ("470.82.01", "warn"), ("418.40", "fail")])
def test_pull_checks_the_hosts_driver_first_and_refuses_one_too_old(tmp_path, driver, status):
    """README: pull checks the host driver first. CUDA 11.8 needs >= 520.61.05, runs on >= 450.80.02
    through minor-version compatibility, and not at all on older drivers: refused before any pull
    (no daemon is needed to refuse)."""
    from envbuild import ship
    assert ship.driver_check(driver, "520.61.05", "450.80.02", "11.8")[0] == status
    if status != "fail":
        return
    env = {**_no_gpu(tmp_path), **_fake_nvidia_smi(tmp_path, [f"0, NVIDIA H20, 9.0, {driver}, 97871"]),
           "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    r = envbuild("pull", "maptr", "--card", "h20", "--cuda", "11.8", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: not pulling ") and f"driver {driver} is older than 450.80.02" in r.stderr, r.stderr
    assert "update the NVIDIA driver" in r.stderr


@pytest.mark.parametrize("make_args, expected", [
    (["image", "MODEL=sparsedrive", "CARD=h20", "CUDA=11.8"], ["envbuild image sparsedrive --card h20 --cuda 11.8"]),
    (["verify", "MODEL=qcnet", "CARD=a800", "SOURCE=../QCNet", "TIME_LIMIT=600"],
     ["envbuild base --cuda 11.8", "envbuild verify qcnet --card a800 --python 3.11 --cuda 11.8", "--source ../QCNet",
      "--base-image envbuild/cuda:11.8-devel-debian12 --runtime-image envbuild/debian:12", "--time-limit 600"]),
    (["smoke-gpu", "IMAGE=reg/envbuild/maptr:x"], ["envbuild smoke reg/envbuild/maptr:x --gpus all --level env,model,arch,ops,comm,train,io --compile"]),
    (["smoke", "MODEL=maptr", "CARD=h20"], ["envbuild smoke maptr --card h20 --report smoke-report.json"]),
    (["selftest-gpu", "CARD=h200"], ["CARD=h200 scripts/gpu-selftest.sh"]),
    (["export", "MODEL=maptr", "CARD=h20", "FORMAT=apptainer"], ["envbuild export maptr --card h20  --format apptainer -o export/"]),
    (["export", "IMAGE=reg/x:1"], ["envbuild export reg/x:1  --format tar -o export/"]),
    (["bench"], ["benchmarks/bench_resolve.py", "benchmarks/bench_dataloader.py", "benchmarks/bench_archs.py",
                 "benchmarks/results.py --write"]),
    (["bench-build"], ["benchmarks/bench_build.py", "benchmarks/bench_compile_once.py", "benchmarks/results.py --write"]),
    (["bench-ci"], ["benchmarks/bench_ci.py", "benchmarks/results.py --write"]),
    (["dockerfiles"], ["-m envbuild.render --regenerate dockerfiles"]),
    (["locks"], ["envbuild lock ${cell%-*} --card ${cell##*-}", "cp $tmp/ctx/requirements.lock $tmp/ctx/torch.lock $d",
                 "--regenerate dockerfiles"]),
    (["test"], ["pytest -q -rs"]),
    (["test-unit"], ["pytest -q -m 'not integration'"]),
])
def test_the_make_targets_the_readme_names_run_the_commands_it_says(make_args, expected):
    """`make -n` (nothing runs) of each target the README and the Makefile's header show, with the
    variables they take: the envbuild command each expands to."""
    import pathlib
    from conftest import ROOT
    venv = pathlib.Path(sys.executable).parent.parent
    r = subprocess.run(["make", "-n", *make_args, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for text in expected:
        assert text in r.stdout, (text, r.stdout)


def test_every_make_target_the_readme_names_exists():
    import re
    from conftest import ROOT
    named = set(re.findall(r"`make ([a-z][a-z-]*)", (ROOT / "README.md").read_text()))
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    assert named and named <= targets, named - targets


def test_make_smoke_gpu_runs_every_smoke_level():
    """README: `make smoke-gpu` runs every level; the levels are smoke.LEVELS, not a copy kept by hand."""
    import pathlib
    import re
    from conftest import ROOT
    from envbuild.smoke import LEVELS
    venv = pathlib.Path(sys.executable).parent.parent
    out = subprocess.run(["make", "-n", "smoke-gpu", "IMAGE=x:1", f"VENV={venv}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60).stdout
    assert re.search(r"--level (\S+)", out).group(1).split(",") == list(LEVELS)


@pytest.mark.parametrize("version, buildx, expected", [
    ("24.0.7", True, ("buildx", None)),
    ("20.10.24", False, ("builtin", None)),  # Debian's 20.10: BuildKit built into the CLI
    ("24.0.7", False, (None, "no buildx plugin, and CLIs from 23.0 need it for BuildKit")),
    (None, None, (None, "no docker CLI found")),
])
def test_which_docker_cli_drives_buildkit_and_what_to_install_when_none_can(tmp_path, monkeypatch, version, buildx, expected):
    from envbuild import engine
    from envbuild.errors import OperationFailed
    paths = []
    if version:
        fake = tmp_path / "docker"
        fake.write_text("#!/bin/sh\n"
                        f'[ "$1" = --version ] && echo "Docker version {version}, build 1" && exit 0\n'
                        f'[ "$1" = buildx ] && exit {0 if buildx else 1}\nexit 3\n')
        fake.chmod(0o755)
        paths.append(str(fake))
    monkeypatch.setattr(engine, "_candidates", lambda: paths)
    engine.find_cli.cache_clear()
    try:
        kind, problem = expected
        if kind:
            found = engine.find_cli()
            assert (found.path, found.version, found.mode) == (paths[0], version, kind)
        else:
            with pytest.raises(OperationFailed) as err:
                engine.find_cli()
            assert problem in err.value.message
            assert ("docker-buildx-plugin" if version else "apt-get install docker.io") in err.value.hint
    finally:
        engine.find_cli.cache_clear()


def test_the_default_config_file_its_home_relative_catalog_and_the_pypi_index_order(tmp_path):
    """With no ENVBUILD_CONFIG, ~/.config/envbuild/config.toml is read; its catalog_dir may start
    with ~; the PyPI index goes config file < ENVBUILD_PYPI_INDEX < --pypi-index into requirements.in."""
    home = tmp_path / "home"
    (home / ".config" / "envbuild").mkdir(parents=True)
    (home / "mycatalog").mkdir()
    (home / "mycatalog" / "cards.toml").write_text('[cards.x9]\nname = "X9"\ncc = "8.0"\nmemory_gb = 80\np2p = true\n')
    (home / ".config" / "envbuild" / "config.toml").write_text(
        'pypi_index = "https://cfg.example/simple"\ncatalog_dir = "~/mycatalog"\n')
    base = {k: v for k, v in os.environ.items() if not k.startswith("ENVBUILD_") and k != "XDG_CONFIG_HOME"}
    env = {**base, "HOME": str(home), "ENVBUILD_HOME": str(tmp_path / "state")}

    def index(*flags, **extra):
        out = tmp_path / f"ctx{len(list(tmp_path.glob('ctx*')))}"
        r = subprocess.run([sys.executable, "-m", "envbuild.cli", "render", "qcnet", "--card", "x9", "-o", str(out), *flags],
                           capture_output=True, text=True, env={**env, **extra}, timeout=120)
        assert r.returncode == 0, r.stderr  # x9 exists only in ~/mycatalog: the config file was read
        return next(line for line in (out / "requirements.in").read_text().splitlines() if line.startswith("--index-url"))
    assert index() == "--index-url https://cfg.example/simple"
    assert index(ENVBUILD_PYPI_INDEX="https://env.example/simple") == "--index-url https://env.example/simple"
    assert index("--pypi-index", "https://flag.example/simple",
                 ENVBUILD_PYPI_INDEX="https://env.example/simple") == "--index-url https://flag.example/simple"


def test_envbuild_card_picks_the_cards_where_no_flag_and_no_gpu_do(tmp_path):
    """ENVBUILD_CARD (the config's `card`) is the card(s) to build for when --card is absent and the
    host has no GPU; --card still wins; a name it does not know is one clear error."""
    env = _no_gpu(tmp_path)
    plan = lambda *a, **e: json.loads(envbuild("resolve", "maptr", "--json", *a, env={**env, **e}).stdout)  # noqa: E731
    got = plan(ENVBUILD_CARD="a800,h20")
    assert got["cards"] == ["a800", "h20"] and got["cards_why"] == "the config's card"
    assert plan("--card", "l20", ENVBUILD_CARD="a800,h20")["cards"] == ["l20"]
    assert plan()["cards_why"].startswith("portable: no --card, no GPU on this host and no card in the config")
    r = envbuild("resolve", "maptr", env={**env, "ENVBUILD_CARD": "b9000"})
    assert r.returncode == 2 and "b9000" in r.stderr and "Traceback" not in r.stderr


def test_resolve_prints_every_decision_of_the_plan_with_its_reason():
    """What README says `resolve` shows: base image and why, gcc, driver floor, the era cutoff,
    each pin with upstream and why (* deviations, + era pins), the arch list and why, how each
    compiled package builds, the extensions, fixers and runtime settings (RTX 4090: no P2P)."""
    r = envbuild("resolve", "maptr", "--card", "rtx4090", env={"COLUMNS": "400"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    row = lambda start: next((l for l in lines if l.startswith(start)), "")  # noqa: E731
    assert row("  base image").split()[2].startswith("nvidia/cuda:11.1.1-cudnn8-devel") and "gcc 9" in row("  base image")
    assert "nvcc accepts <= 10" in row("  gcc") and row("  driver").split()[1:3] == [">=", "455.32"]
    assert "PyPI as of" in r.stdout and "exact pins win" in row("  PyPI as of")
    numpy = row("*  numpy").split()
    assert numpy[2:4] == ["1.23.5", "<1.20.0"] and "catalog correction" in row("*  numpy")
    assert row("+  setuptools").split()[2:4] == ["<70", "-"]  # an era pin upstream never wrote
    assert row("  TORCH_CUDA_ARCH_LIST=8.6") and "sm_86 SASS runs on 8.9" in row("  TORCH_CUDA_ARCH_LIST")
    assert row("  source build mmcv-full").endswith("the catalog knows no vendor wheels of mmcv-full")
    assert "geometric_kernel_attn" in r.stdout and row("  fixer       setup-without-gpu")
    assert "NCCL_P2P_DISABLE=1" in row("  runtime") and "no peer-to-peer" in row("  runtime")
    assert lines[-1] == "  ledger      not verified" and "1 deviation(s) from upstream" in r.stdout


def test_on_a_gpu_host_the_cards_and_the_smoke_card_are_this_hosts_gpu(cat, monkeypatch):
    """With no --card, a host's GPUs choose the cards (an H20 host builds for h20) and image --smoke
    runs for that GPU; smoke takes one card at a time; a GPU the catalog lacks is one clear error."""
    from envbuild import host, pipeline
    from envbuild.errors import BadInput
    gpu = {"index": "0", "name": "NVIDIA H20", "cc": "9.0", "driver": "550.54.15", "memory_mb": "97871"}
    monkeypatch.setattr(host, "gpus", lambda: (gpu, dict(gpu, index="1")))
    cards, why = pipeline.choose_cards(cat, None)
    assert cards == "h20" and why == "the GPUs on this host (NVIDIA H20)"
    assert pipeline.choose_cards(cat, "a800") == ("a800", "--card")
    assert pipeline.card_here(cat, None).id == "h20" and pipeline.card_here(cat, "l20").id == "l20"
    with pytest.raises(BadInput, match="one card at a time"):
        pipeline.card_here(cat, "a800,h20")
    seen = {}
    monkeypatch.setattr(pipeline.smoke_stage, "run", lambda ref, levels, card=None, **k: seen.setdefault("card", card) and
                        {"ok": True, "card": card.id, "levels": {"env": {"status": "passed"}}})
    monkeypatch.setattr(pipeline.smoke_stage, "summary", lambda report: {"levels": {"env": "passed"}})
    monkeypatch.setattr(pipeline.smoke_stage, "record", lambda refs, report: "sha256:labelled")
    summary = {"image_id": "sha256:built"}
    pipeline._smoke_and_label(summary, ["envbuild/maptr:x"])
    assert seen["card"].id == "h20" and summary["image_id"] == "sha256:labelled" and summary["build_image_id"] == "sha256:built"
    monkeypatch.setattr(host, "gpus", lambda: (dict(gpu, name="NVIDIA B9000"),))
    with pytest.raises(BadInput, match="this host's GPU NVIDIA B9000 is not in the catalog"):
        pipeline.choose_cards(cat, None)


# ---------------------------------------------------------------- issue 24: hints, output for pipes and people

def test_piped_output_is_not_wrapped_at_80_columns():
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    r = subprocess.run([sys.executable, "-m", "envbuild.cli", "models"], capture_output=True, text=True, env=env,
                       timeout=120)
    rows = [line for line in r.stdout.splitlines() if "built-in" in line]
    assert len(rows) >= 4 and any(len(line) > 80 for line in rows)
    assert any("maptr" in line and "built-in" in line for line in rows)  # one row, one line


def test_help_has_no_type_noise_and_version_is_an_option():
    for args in (["--help"], ["image", "--help"], ["compare", "--help"], ["fix", "--help"]):
        r = envbuild(*args)
        assert r.returncode == 0 and "<bool>" not in r.stdout and "<list[str]>" not in r.stdout, args
        assert "<str>" not in r.stdout and "<Path>" not in r.stdout and "{" not in r.stdout, args
    assert "--card" in envbuild("image", "--help").stdout and "MODEL" in envbuild("image", "--help").stdout
    r = envbuild("--version")
    from envbuild import __version__
    assert r.returncode == 0 and r.stdout.strip() == f"envbuild {__version__}"


def test_the_command_list_flows_each_summary_as_one_paragraph():
    """A docstring's source line breaks do not reach `--help`'s command list (rows cut short mid-sentence)."""
    import typer.main
    from envbuild import cli as cli_module
    group = typer.main.get_command(cli_module.app)
    summaries = {name: cmd.short_help for name, cmd in group.commands.items() if cmd.help}
    assert len(summaries) >= 10
    assert all(s and "\n" not in s for s in summaries.values()), summaries
    assert summaries["add"].startswith("Draft a catalog entry") and "user catalog, with" in summaries["add"]


def test_an_empty_image_list_says_so(capsys):
    from envbuild import show
    show.images([])
    assert "no envbuild images" in capsys.readouterr().out


def test_render_hint_carries_every_flag_that_shaped_the_plan(tmp_path):
    out = tmp_path / "ctx"
    r = envbuild("render", "qcnet", "--card", "a800", "--python", "3.11", "--torch-index", "none", "--cuda", "11.8",
                 "--base-image", "envbuild/cuda:11.8-devel-debian12", "--runtime-image", "envbuild/debian:12", "-o", out)
    assert r.returncode == 0, r.stderr
    hint = next(line for line in r.stdout.splitlines() if line.startswith("not locked yet:"))
    assert (f"envbuild lock qcnet --card a800 --cuda 11.8 --python 3.11 --base-image envbuild/cuda:11.8-devel-debian12 "
            f"--runtime-image envbuild/debian:12 --torch-index none -o {out.resolve()}") in hint
    # lock takes every flag render took, so that the hint re-renders the same context
    lock_help = envbuild("lock", "--help").stdout
    assert "--source" in lock_help and "--runtime-image" in lock_help


def test_the_dockerfile_regenerate_line_reproduces_the_plan_anywhere(cat, tmp_path, monkeypatch):
    """--source as its absolute path, and the cards when the host's GPUs chose them."""
    from envbuild import host, pipeline
    from envbuild.pipeline import Request
    gpu = {"index": "0", "name": "NVIDIA H20", "cc": "9.0", "driver": "550.54.15", "memory_mb": "97871"}
    monkeypatch.setattr(host, "gpus", lambda: (gpu,))
    monkeypatch.setenv("ENVBUILD_HOME", str(tmp_path / "home"))
    src = tmp_path / "BEVFormer"
    src.mkdir()
    monkeypatch.chdir(tmp_path)
    req = Request(model="maptr", source="BEVFormer", torch_index="none")
    _, _, ctx = pipeline.prepare(req, tmp_path / "out")
    head = (ctx / "Dockerfile").read_text().splitlines()[0]
    assert f"envbuild render maptr --card h20 --source {src} --torch-index none" in head
    # a portable Plan (no GPU, no card): --card portable, which a GPU host also makes portable
    monkeypatch.setattr(host, "gpus", lambda: ())
    plan, _ = pipeline.plan_for(Request(model="qcnet"))
    assert Request(model="qcnet").pinned(plan).command() == "envbuild render qcnet --card portable"
    monkeypatch.setattr(host, "gpus", lambda: (gpu,))
    assert pipeline.plan_for(Request(model="qcnet", card="portable"))[0].cards == plan.cards
    # a config that turned vendor wheels off made a Plan that compiles: the line says --compile
    monkeypatch.setenv("ENVBUILD_VENDOR_WHEELS", "false")
    plan, sources = pipeline.plan_for(Request(model="qcnet", card="a800"))
    assert Request(model="qcnet", card="a800").pinned(plan, sources).command().endswith(" --compile")


def test_bake_names_its_waves_consecutively(tmp_path):
    r = envbuild("bake", "--models", "maptr,qcnet", "--cards", "a800,h20", "-o", tmp_path / "bake.json",
                 "--parallel", "1")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "bake.json").read_text())
    assert sorted(g for g in doc["group"] if g.startswith("wave-")) == ["wave-1", "wave-2", "wave-3", "wave-4"]
    assert "wave-1 (then wave-2, ...)" in r.stdout


def test_fix_list_without_a_plan_says_which_plans_apply_each_finding(tmp_path):
    (tmp_path / "op.cu").write_text("#include <THC/THC.h>\n")
    r = envbuild("fix", str(tmp_path), "--list")
    assert r.returncode == 0, r.stderr
    assert "thc-to-aten" in r.stdout and "only a port from torch < 1.11 to >= 1.11" in r.stdout
    assert "without --plan" in r.stdout
    data = json.loads(envbuild("fix", str(tmp_path), "--list", "--json").stdout)
    assert data[0]["only_when"].startswith("only")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"fixers": [{"name": "thc-to-aten"}]}))
    assert "only_when" not in json.loads(envbuild("fix", str(tmp_path), "--list", "--plan", plan, "--json").stdout)[0]
