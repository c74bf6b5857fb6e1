"""envbuild as a newcomer installs it: the wheel, in a fresh venv outside the checkout (what pip
and pipx do). The catalog and the in-image helpers must come from the package itself."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import FIXTURE, ROOT, image_args

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(ROOT)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next((work / "dist").glob("envbuild-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True, timeout=300)
    r = subprocess.run([str(work / "venv" / "bin" / "pip"), "install", "-q", str(wheel)], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    outside = work / "elsewhere"
    outside.mkdir()
    return work / "venv" / "bin" / "envbuild", outside


def run(exe, cwd, env, *args):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=3600)


def test_the_installed_package_is_not_the_checkout(installed):
    exe, cwd = installed
    where = subprocess.run([str(exe.parent / "python"), "-c", "import envbuild, os; print(os.path.dirname(envbuild.__file__))"],
                           capture_output=True, text=True, cwd=cwd).stdout.strip()
    assert "site-packages" in where and not where.startswith(str(ROOT))
    # every in-image helper (smoke.py imports its level_*.py and smoke_common.py from beside it)
    incontainer = [f"incontainer/{p.name}" for p in sorted((ROOT / "envbuild" / "incontainer").iterdir()) if p.is_file()]
    for rel in ("matrices/cards.toml", "matrices/models/maptr.toml", *incontainer, "templates/Dockerfile.j2"):
        assert os.path.isfile(os.path.join(where, rel)), rel
    # the ledger ships too: an installed envbuild says what was verified, as the checkout does
    verified = sorted(p.name for p in (ROOT / "envbuild" / "matrices" / "verified").glob("*.json"))
    assert verified and sorted(os.listdir(os.path.join(where, "matrices", "verified"))) == verified


def test_resolve_render_fix_from_the_wheel(installed, tmp_path):
    exe, cwd = installed
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVBUILD_")}
    env["ENVBUILD_HOME"] = str(tmp_path / "home")
    r = run(exe, cwd, env, "resolve", "maptr", "--card", "h20", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["arch_list"] == "9.0"
    r = run(exe, cwd, env, "render", "maptr", "--card", "h20", "-o", tmp_path / "ctx")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ctx" / "envbuild" / "with-ca.sh").stat().st_mode & 0o111
    # the same bytes as the checkout renders
    subprocess.run([sys.executable, "-m", "envbuild.cli", "render", "maptr", "--card", "h20", "-o", str(tmp_path / "ctx2")],
                   check=True, capture_output=True, cwd=ROOT, env=env, timeout=300)
    for name in ("Dockerfile", "requirements.in", "plan.json", "envbuild/smoke.py", "envbuild/smoke_common.py",
                 "envbuild/fixers.py"):
        assert (tmp_path / "ctx" / name).read_bytes() == (tmp_path / "ctx2" / name).read_bytes(), name
    src = tmp_path / "src"
    shutil.copytree(FIXTURE / "tinybev", src)
    r = run(exe, cwd, env, "fix", src, "--only", "local-rank,thc-to-aten")
    assert r.returncode == 0, r.stderr
    assert "--local-rank" in (src / "train.py").read_text() and "THC" not in (src / "ops" / "src" / "scale_add.cpp").read_text()


def test_a_real_build_from_the_wheel_is_the_same_image(installed, built, offline_base, fixture_env):
    # The wheel renders byte-identical contexts: the build is all cache hits and gives the same image.
    exe, cwd = installed
    r = run(exe, cwd, fixture_env, "image", *image_args(offline_base), "--json", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["image_id"] == built["image_id"]
    assert all(step["cached"] for step in summary["run_steps"]), summary["run_steps"]


def test_the_wheel_ships_envbuild_base(installed, offline_base13, tmp_path):
    """`envbuild base` from the installed package: the recipe and template come with it (the same
    Dockerfile as the checkout's), and it finds the CUDA 13 base the suite made."""
    exe, cwd = installed
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVBUILD_")}
    env.update(ENVBUILD_HOME=str(tmp_path / "home"), ENVBUILD_DOCKER=os.environ.get("ENVBUILD_DOCKER", "/usr/bin/docker"))
    r = run(exe, cwd, env, "base", "--cuda", "13.0", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    mine = subprocess.run([sys.executable, "-m", "envbuild.cli", "base", "--cuda", "13.0", "--dry-run", "--json"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert json.loads(r.stdout)["dockerfile"] == json.loads(mine.stdout)["dockerfile"]
    r = run(exe, cwd, env, "base", "--cuda", "13.0", "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["tag"] == offline_base13["devel"] and made["reused"] and "b200" in made["sass_cards"]
