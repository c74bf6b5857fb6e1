"""Porting compiled packages past their torch range, and the offline bases they compile on."""

from dataclasses import replace

import pytest

from envbuild import base_image, packages, render, resolve as rs
from envbuild import fixers
from envbuild.catalog import Compiled
from envbuild.config import Sources
from envbuild.errors import BadInput
from envbuild.resolve import resolve


def _mmcv2(cat, **facts):
    """The catalog with mmcv's releases replaced by the given ones (version -> Compiled)."""
    return replace(cat, compiled={**cat.compiled, "mmcv": facts})


def _newest(cat):
    return max(cat.torch, key=lambda v: tuple(map(int, v.split("."))))


def _target(cat, strict=False, card="b200"):
    rel = cat.torch[_newest(cat)]
    return packages.Target(cat, rel, rel.pypi, cat.toolkits["13.0"], cat.cards[card], "3.11", strict)


def test_a_compiled_package_past_its_torch_range_is_ported_with_the_catalogs_fixers(cat):
    block = packages.block_for(cat, "mmcv")
    pin = block.choose(_target(cat), "mmcv", "2.0.1", None)
    assert pin.version == "2.0.1" and pin.source == "port"
    assert "cxx-standard" in pin.why and _newest(cat) in pin.why
    fixers_for = block.sdist_fixers(cat, pin, _newest(cat))
    assert [f["name"] for f in fixers_for] == ["cxx-standard"]
    assert "2.1" in fixers_for[0]["why"]  # names where its range ended
    # within its range the sdist is upstream's: nothing to fix
    assert block.sdist_fixers(cat, pin, "2.0.1") == []


def test_strict_refuses_the_port_and_says_why(cat):
    reason = packages.block_for(cat, "mmcv").choose(_target(cat, strict=True), "mmcv", "2.0.1", None)
    assert isinstance(reason, str) and "builds only with torch [1.8, 2.1)" in reason


def test_a_later_release_that_builds_is_preferred_to_a_port(cat):
    cat2 = _mmcv2(cat, **{
        "2.0.1": Compiled("mmcv", "2.0.1", "mmcv2", ("1.8", "2.1"), 14, "c++14", ("cxx-standard",)),
        "2.9.0": Compiled("mmcv", "2.9.0", "mmcv2", ("2.0", "3.0"), 20, "current"),
    })
    pin = packages.block_for(cat2, "mmcv").choose(_target(cat2), "mmcv", "2.0.1", None)
    assert pin.version == "2.9.0" and "smallest release that can" in pin.why


def test_the_newest_portable_release_of_the_series_is_ported(cat):
    cat2 = _mmcv2(cat, **{
        "2.0.1": Compiled("mmcv", "2.0.1", "mmcv2", ("1.8", "2.1"), 14, "c++14", ("cxx-standard",)),
        "2.1.0": Compiled("mmcv", "2.1.0", "mmcv2", ("1.8", "2.2"), 17, "no port known"),
        "2.2.0": Compiled("mmcv", "2.2.0", "mmcv2", ("2.0", "2.5"), 17, "c++17", ("cxx-standard",)),
        "3.0.0": Compiled("mmcv", "3.0.0", "mmcv3", ("2.0", "2.5"), 17, "another series", ("cxx-standard",)),
    })
    pin = packages.block_for(cat2, "mmcv").choose(_target(cat2), "mmcv", "2.0.1", None)
    assert pin.version == "2.2.0" and "newest portable release of its series" in pin.why


def test_without_a_port_the_reason_says_so(cat):
    cat2 = _mmcv2(cat, **{"2.0.1": Compiled("mmcv", "2.0.1", "mmcv2", ("1.8", "2.1"), 14, "c++14")})
    reason = packages.block_for(cat2, "mmcv").choose(_target(cat2), "mmcv", "2.0.1", None)
    assert isinstance(reason, str) and "none has a port" in reason


def test_a_port_fixer_the_fixers_do_not_know_is_refused_at_load(matrices_copy):
    from envbuild import catalog
    from envbuild.errors import CatalogError
    path = matrices_copy / "toolchains" / "packages.toml"
    path.write_text(path.read_text().replace('port = ["cxx-standard"]', 'port = ["cxx-standrad"]', 1))
    with pytest.raises(CatalogError, match="unknown fixer 'cxx-standrad'"):
        catalog.load(matrices_copy)


@pytest.mark.parametrize("card", ["b200", "b300", "rtx5090"])
@pytest.mark.parametrize("model", ["maptr", "sparsedrive", "qcnet", "gaussianformer"])
def test_every_seed_model_has_a_blackwell_plan(cat, model, card):
    plan = resolve(cat, model, card)
    assert plan.mode == "port" and plan.deviations
    for name in plan.compiled:
        facts = cat.compiled.get(name, {}).get(plan.pin(name).version)
        torch = plan.torch.version.split("+")[0]
        if facts is not None and not facts.builds_with(torch):  # past its range: the Plan ports its sdist
            assert plan.native_packages[name]["sdist_fixers"], (model, name)
            assert any(d.startswith(f"{name}: sdist fixer") for d in plan.deviations)


def test_the_wheel_stage_of_a_ported_package_runs_its_fixers_and_is_keyed_by_them(cat):
    plan = resolve(cat, "gaussianformer", "h20,b200", python="3.11", cuda="13.0")
    ctx = render.make_context(plan, "test")
    step = next(s for s in ctx.compiled_steps if s.name == "mmcv")
    assert step.fixers == ("cxx-standard",)
    text = render.dockerfile(ctx)
    stage = text[text.index("FROM compile AS wheel-mmcv"):text.index("FROM scratch AS wheels")]
    assert "COPY envbuild/fixers.py" in stage
    assert stage.index("unpack_archive") < stage.index("fixers.py apply /src/tree/*/ --fixers cxx-standard") \
        < stage.index("pip wheel")
    ctx.wheel_cache = "127.0.0.1:5000/wheels"
    keyed = ctx.wheel_ref(step)
    assert keyed != ctx.wheel_ref(replace(step, fixers=())), "the fixers must be an input of the wheel's key"


def test_a_ported_torch_moves_the_era_cutoff_to_its_release(cat):
    plan = resolve(cat, "gaussianformer", "b200", python="3.11", cuda="13.0")
    rel = cat.torch[plan.torch.version.split("+")[0]]
    assert rel.released and plan.index_cutoff > rel.released
    assert rel.version in plan.index_cutoff_why
    assert "requested CUDA 13.0" in plan.torch.why  # --cuda excluded the smaller upgrades, and it says so
    upstream = resolve(cat, "gaussianformer", "a800")  # torch 2.0.0: the model's own era
    assert upstream.index_cutoff < "2025-06-01"
    maptr = resolve(cat, "maptr", "b200")  # torch 2.7.1 (2025) for a 2023 model: its deps as of 2025
    assert maptr.index_cutoff > cat.torch[maptr.torch.version.split("+")[0]].released > "2025"


def test_torch_without_a_torchaudio_is_installed_without_one(cat):
    plan = resolve(cat, "gaussianformer", "b200", python="3.11", cuda="13.0", sources=Sources(torch_index=None))
    torch = plan.torch.version
    cat2 = replace(cat, torch={**cat.torch, torch: replace(cat.torch[torch], torchaudio="")})
    plan = resolve(cat2, "gaussianformer", "b200", python="3.11", cuda="13.0", sources=Sources(torch_index=None))
    assert plan.torchaudio.version == "" and "no torchaudio release pairs" in plan.torchaudio.why
    reqs = render.make_context(plan, "test").torch_requirements
    assert not any(r.startswith("torchaudio") for r in reqs) and any(r.startswith("torchvision==") for r in reqs)


def test_spconv_without_a_build_for_torchs_cuda_major_takes_the_newest_bundled_runtime(cat):
    plan = resolve(cat, "gaussianformer", "b200", python="3.11", cuda="13.0")
    spconv = next(p for p in plan.packages if p.name.startswith("spconv-cu"))
    newest = max(cat.spconv_builds, key=lambda b: tuple(map(int, b.split("."))))
    assert spconv.name == "spconv-cu" + newest.replace(".", "") and "bundles its own CUDA" in spconv.why


def test_fixers_cli_takes_fixer_names_instead_of_a_plan(tmp_path):
    tree = tmp_path / "pkg"
    tree.mkdir()
    (tree / "setup.py").write_text("from setuptools import setup\nargs = {'cxx': ['-O3', '-std=c++14']}\nsetup()\n")
    assert fixers.main(["apply", str(tree), "--fixers", "cxx-standard"]) == 0
    assert (tree / "setup.py").read_text() == "from setuptools import setup\nargs = {'cxx': ['-O3']}\nsetup()\n"
    with pytest.raises(SystemExit):
        fixers.main(["apply", str(tree)])  # neither a Plan nor names
    assert fixers.main(["apply", str(tree), "--fixers", "no-such-fixer"]) == 2


# ---------------------------------------------------------------- envbuild base


def test_base_recipes_render_a_dockerfile_per_toolkit_source():
    debian = base_image.dockerfile(base_image.recipe_for("11.8"))
    assert "apt-get install -y --no-install-recommends nvidia-cuda-toolkit gcc-11 g++-11" in debian
    assert "CC=gcc-11" in debian and "pip" not in debian.split("apt-get install")[0]
    pypi = base_image.dockerfile(base_image.recipe_for("13.0"), "https://mirror.example/simple")
    assert "'cuda-toolkit[nvcc,cudart,cccl,crt,nvvm," in pypi and "==13.0.2'" in pypi
    assert "--index-url https://mirror.example/simple" in pypi
    assert "--mount=type=secret,id=ca_bundle" in pypi and "ca-certificates.crt" not in pypi
    assert "cp -a /tmp/cuda/nvidia/cu13/. /usr/local/cuda-13.0/" in pypi
    assert base_image.recipe_for("13.0").tag == "envbuild/cuda:13.0-devel-debian12"


def test_a_misspelled_key_in_bases_toml_is_refused(tmp_path):
    from envbuild.errors import CatalogError
    path = tmp_path / "bases.toml"
    path.write_text('[base."13.0"]\nsource = "pypi"\nsuite = "bookworm"\ntoolkit = "13.0.2"\nextra = ["nvcc"]\n'
                    'extras = ["nvcc"]\ncuobjdump = "13.5.37"\n')
    with pytest.raises(CatalogError, match="extra: unknown key"):
        base_image.recipes(path)
    path.write_text(path.read_text().replace('extra = ["nvcc"]\n', ""))
    assert base_image.recipes(path)["13.0"].extras == ("nvcc",)


def test_base_refuses_bad_input_with_one_line():
    with pytest.raises(BadInput, match="unknown offline base CUDA '12.2'"):
        base_image.recipe_for("12.2")
    with pytest.raises(BadInput, match="not an http"):
        base_image.dockerfile(base_image.recipe_for("13.0"), "https://x/simple; rm -rf /")


def test_a_second_base_maker_for_one_tag_waits_for_the_first(tmp_path, monkeypatch):
    """Two `envbuild base` at once (two terminals, two test workers): the second waits, says so,
    and only then looks for the images, so debootstrap and the CUDA build run once."""
    import threading
    monkeypatch.setattr(base_image.tempfile, "gettempdir", lambda: str(tmp_path))
    said, order = [], []
    first_in, release = threading.Event(), threading.Event()

    def first():
        with base_image._one_maker("envbuild/cuda:9.9-devel", said.append):
            first_in.set()
            release.wait(10)
            order.append("first done")

    def second():
        with base_image._one_maker("envbuild/cuda:9.9-devel", said.append):
            order.append("second in")

    t1 = threading.Thread(target=first)
    t1.start()
    assert first_in.wait(10)
    t2 = threading.Thread(target=second)
    t2.start()
    t2.join(0.5)
    assert t2.is_alive() and said == [">> another envbuild base is making envbuild/cuda:9.9-devel: waiting for it"]
    release.set()
    t1.join(10)
    t2.join(10)
    assert order == ["first done", "second in"]
    with base_image._one_maker("envbuild/cuda:other", said.append):  # another tag never waits
        assert len(said) == 1


def test_base_says_which_cards_its_nvcc_targets(cat):
    sass, ptx = base_image.targets(cat, "13.0")
    assert {"h20", "b200", "a800"} <= set(sass) and "v100" not in sass  # CUDA 13 dropped Volta
    sass118, ptx118 = base_image.targets(cat, "11.8")
    assert "h20" in sass118 and "b200" not in sass118 and "b200" in ptx118


@pytest.fixture
def offline(monkeypatch):
    """A machine without the Plan's nvidia/cuda image and without Docker Hub; which bases exist is set per test."""
    monkeypatch.setattr(base_image, "have_image", lambda ref: False)
    monkeypatch.setattr(base_image, "reachable", lambda registry: False)
    monkeypatch.setattr(base_image, "daemon_pulls_elsewhere", lambda registry: False)
    made = {}
    monkeypatch.setattr(base_image, "find_base", lambda cuda: made.get(cuda))
    return made


def test_image_builds_on_the_base_envbuild_base_made_when_docker_hub_is_unreachable(offline):
    from envbuild import pipeline
    offline["13.0"] = "envbuild/cuda:13.0-devel-debian12"
    req = pipeline.Request(model="gaussianformer", card="b200", python="3.11", cuda="13.0")
    said = []
    got = pipeline.offline_base(req, pipeline.plan_for(req)[0], pipeline.Progress(say=said.append))
    assert got.base_image == "envbuild/cuda:13.0-devel-debian12" and got.runtime_image == "envbuild/debian:12"
    assert said and "registry-1.docker.io is unreachable" in said[0]


def test_without_such_a_base_it_names_the_command_before_anything_long_starts(offline):
    from envbuild import pipeline
    req = pipeline.Request(model="gaussianformer", card="b200", cuda="13.0")
    with pytest.raises(BadInput) as exc:
        pipeline.offline_base(req, pipeline.plan_for(req)[0])
    assert "registry-1.docker.io is unreachable" in exc.value.message
    assert "envbuild base --cuda 13.0" in exc.value.hint and "--python 3.11" in exc.value.hint


def test_a_given_base_image_or_a_reachable_hub_is_left_alone(offline, monkeypatch):
    from envbuild import pipeline
    req = pipeline.Request(model="qcnet", card="a800", base_image="mirror.local/nvidia/cuda:11.8.0-devel")
    assert pipeline.offline_base(req, pipeline.plan_for(req)[0]) is req
    monkeypatch.setattr(base_image, "reachable", lambda registry: registry == "registry-1.docker.io")
    req = pipeline.Request(model="qcnet", card="a800")
    assert pipeline.offline_base(req, pipeline.plan_for(req)[0]) is req
    # the host cannot reach Docker Hub, but the daemon pulls through a mirror: its pull is tried
    monkeypatch.setattr(base_image, "reachable", lambda registry: False)
    monkeypatch.setattr(base_image, "daemon_pulls_elsewhere", lambda registry: True)
    assert pipeline.offline_base(req, pipeline.plan_for(req)[0]) is req


@pytest.mark.parametrize("info, pulls", [({"RegistryConfig": {"Mirrors": ["https://mirror.corp/"]}}, True),
                                         ({"HttpsProxy": "http://proxy.corp:3128"}, True),
                                         ({"RegistryConfig": {"Mirrors": []}}, False)])
def test_a_daemon_with_a_mirror_or_proxy_is_asked_to_pull(monkeypatch, info, pulls):
    monkeypatch.setattr(base_image.engine, "client", lambda: type("C", (), {"info": lambda self: info})())
    assert base_image.daemon_pulls_elsewhere("registry-1.docker.io") is pulls
    assert base_image.daemon_pulls_elsewhere("mirror.local:5000") is False  # not Docker Hub: the host's answer stands
    assert base_image.registry_of("nvidia/cuda:12.8.1-devel") == "registry-1.docker.io"
    assert base_image.registry_of("mirror.local:5000/nvidia/cuda:12.8.1-devel") == "mirror.local:5000"


# ---------------------------------------------------------------- what a current torch breaks in the model's code


@pytest.mark.parametrize("before, after", [
    ("import torch\nckpt = torch.load(path, map_location='cpu')\n",
     "import torch\nckpt = torch.load(path, map_location='cpu', weights_only=False)\n"),
    ("import torch as T\nx = T.load(f)\ny = T.load(f, weights_only=True)\n",
     "import torch as T\nx = T.load(f, weights_only=False)\ny = T.load(f, weights_only=True)\n"),
    ("from torch import load\nstate = load(\n    f,  # the file\n)\n",
     "from torch import load\nstate = load(\n    f, weights_only=False,  # the file\n)\n"),
    ("import torch\r\nz = torch.load(f)\r\n", "import torch\r\nz = torch.load(f, weights_only=False)\r\n"),
    # an argument in parentheses of its own: the keyword goes after them, not inside
    ("import torch\nx = torch.load((f), map_location=('cpu'))\n",
     "import torch\nx = torch.load((f), map_location=('cpu'), weights_only=False)\n"),
    ("import torch.nn\nx = torch.load(io.BytesIO(torch.load(f)))\n",
     "import torch.nn\nx = torch.load(io.BytesIO(torch.load(f, weights_only=False)), weights_only=False)\n"),
])
def test_torch_load_gets_the_weights_only_old_torch_had(before, after):
    fx = fixers.make("torch-load-weights-only")
    assert fx.fixed("m.py", before) == after
    assert fx.fixed("m.py", after) == after  # idempotent


@pytest.mark.parametrize("source", [
    "import torch\nkw = {}\nz = torch.load(f, **kw)\n",  # **kwargs may carry it
    "import numpy as np\nnp.load(f)\n",  # not torch's
    "def load(x):\n    pass\nload(1)\n",  # the file's own load
    "import torch\nz = torch.load(f, None, pickle, True)\n",  # positional beyond the map_location
    "import torch\nz = torch.load(p for p in ps)\n",  # a bare generator takes no keyword beside it
])
def test_torch_load_calls_that_say_it_or_are_not_torchs_are_left_alone(source):
    assert fixers.make("torch-load-weights-only").fixed("m.py", source) == source


def test_a_port_past_torch_2_6_fixes_the_model_and_the_packages_that_load_checkpoints(cat):
    plan = resolve(cat, "gaussianformer", "b200", python="3.11", cuda="13.0", sources=Sources(torch_index=None))
    fx = next(f for f in plan.fixers if f.name == "torch-load-weights-only")
    assert "weights_only=True" in fx.why and "mmengine" in fx.installed
    assert set(fx.installed) <= set(cat.torch_load) | {"mmengine"}
    old = resolve(cat, "gaussianformer", "a800")  # upstream's torch 2.0: nothing to fix
    assert not any(f.name == "torch-load-weights-only" for f in old.fixers)


def _wrapper_line(cat):
    """The builder's RUN line that puts nvcc_archs.py in front of nvcc, as rendered."""
    plan = resolve(cat, "gaussianformer", "b200", python="3.11", cuda="13.0", sources=Sources(torch_index=None))
    text = render.dockerfile(render.make_context(plan, "test"))
    start = text.index('RUN nvcc="${CUDA_HOME')
    return text[start + 4:text.index("\n", text.index("--version >/dev/null", start))]


@pytest.mark.parametrize("layout", ["nvidia", "debian"])
def test_the_nvcc_wrapper_keeps_the_real_nvcc_whatever_links_lead_to_it(cat, tmp_path, layout):
    """nvidia/cuda images (and the CUDA 13 base) reach nvcc through /usr/local/cuda -> cuda-X.Y:
    removing bin/nvcc there removed nvcc itself, and the wrapper exec'd itself forever."""
    import subprocess
    import sys
    from pathlib import Path
    real_dir = tmp_path / ("cuda-13.0/bin" if layout == "nvidia" else "usr/bin")
    real_dir.mkdir(parents=True)
    (real_dir / "nvcc").write_text("#!/bin/sh\necho real nvcc \"$@\"\n")
    (real_dir / "nvcc").chmod(0o755)
    if layout == "nvidia":
        (tmp_path / "cuda").symlink_to(tmp_path / "cuda-13.0")
    else:
        (tmp_path / "cuda" / "bin").mkdir(parents=True)
        (tmp_path / "cuda" / "bin" / "nvcc").symlink_to(real_dir / "nvcc")
    (tmp_path / "ccache").write_text('#!/bin/sh\nexec "$@"\n')
    (tmp_path / "ccache").chmod(0o755)
    script = Path(render.__file__).parent / "incontainer" / "nvcc_archs.py"
    line = _wrapper_line(cat).replace("/opt/venv/bin/python", sys.executable) \
        .replace("/opt/envbuild/nvcc_archs.py", str(script))
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "CUDA_HOME": str(tmp_path / "cuda")}
    r = subprocess.run(["sh", "-c", line], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(tmp_path / "cuda" / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.stdout.strip() == "real nvcc --version", r.stderr


def test_a_wrapper_that_would_exec_itself_stops_with_a_reason(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    script = Path(render.__file__).parent / "incontainer" / "nvcc_archs.py"
    loop = tmp_path / "nvcc"
    loop.write_text(f'#!/bin/sh\nexec {sys.executable} {script} {loop} "$@"\n')
    loop.chmod(0o755)
    r = subprocess.run([str(loop), "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "is this wrapper, not nvcc" in r.stderr


def test_base_dry_run_prints_what_it_would_build_without_docker(tmp_path):
    import subprocess
    import sys
    env = {"PATH": "/usr/bin:/bin", "ENVBUILD_DOCKER": "/nope", "ENVBUILD_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "envbuild.cli", "base", "--cuda", "13.0", "--dry-run"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("envbuild/cuda:13.0-devel-debian12") and "FROM envbuild/debian:12 AS cuda" in r.stdout
    assert "b200" in r.stdout.splitlines()[1]


def test_set_to_a_release_past_its_range_is_ported_like_the_resolvers_choice(cat):
    plan = resolve(cat, "maptr", "b200", overrides={"mmcv-full": "1.7.2"})
    pin = plan.pin("mmcv-full")
    assert pin.version == "1.7.2" and pin.source == "override" and "ported" in pin.why
    assert [f["name"] for f in plan.native_packages["mmcv-full"]["sdist_fixers"]] == ["cxx-standard"]
    with pytest.raises(rs.Conflict, match="--set"):
        resolve(cat, "maptr", "b200", overrides={"mmcv-full": "1.6.2"})  # no port known for it


def test_trim_kernels_compiles_only_the_head_dims_the_model_calls(cat):
    """--trim-kernels: SparseDrive's catalog entry names head dims 32 and 64: its flash-attn sdist
    gets the fixer with them (after nothing else), the Plan says why and how much, the wheel stage
    runs it with its argument and is keyed by it; without the flag nothing changes."""
    plain = resolve(cat, "sparsedrive", "h20,b200", python="3.11", cuda="13.0")
    plan = resolve(cat, "sparsedrive", "h20,b200", python="3.11", cuda="13.0", trim_kernels=True)
    assert "sdist_fixers" not in plain.native_packages["flash-attn"]
    (fx,) = plan.native_packages["flash-attn"]["sdist_fixers"]
    assert fx["name"] == "flash-attn-head-dims" and fx["args"] == {"dims": "32+64"}
    assert "25 of its 85 objects" in fx["why"] and "256 and 512" in fx["why"]
    assert plan.native_packages["mmcv-full"] == plain.native_packages["mmcv-full"]
    assert any(d.startswith("flash-attn: sdist fixer flash-attn-head-dims") for d in plan.deviations)
    ctx = render.make_context(plan, "test")
    step = next(s for s in ctx.compiled_steps if s.name == "flash-attn")
    assert step.fixers == ("flash-attn-head-dims:dims=32+64",)
    text = render.dockerfile(ctx)
    stage = text[text.index("FROM compile AS wheel-flash-attn"):text.index("FROM scratch AS wheels")]
    assert stage.index("unpack_archive") < stage.index("--fixers flash-attn-head-dims:dims=32+64") < stage.index("pip wheel")
    ctx.wheel_cache = "127.0.0.1:5000/wheels"
    assert ctx.wheel_ref(step) != ctx.wheel_ref(replace(step, fixers=("flash-attn-head-dims:dims=32",)))


def test_trim_kernels_rounds_to_the_releases_kernels_and_refuses_where_nothing_trims(cat):
    """flash-attn 2.6 dropped head dim 224's kernels: a model calling 224 runs 256's there. A Plan
    whose model names no head dims, or takes a vendor's wheel, has nothing to trim: one clear error."""
    model = replace(cat.models["sparsedrive"], flash_attn_head_dims=(32, 224))
    block = packages.block_for(cat, "flash-attn")
    new, old = (block.trim_fixers(cat, packages.base.Pin("flash-attn", v, ""), model) for v in ("2.7.4.post1", "2.3.2"))
    assert new[0]["args"] == {"dims": "32+256"} and old[0]["args"] == {"dims": "32+224"}
    assert "13 of its 49 objects" in old[0]["why"]
    with pytest.raises(BadInput, match="nothing to trim in maptr's Plan"):
        resolve(cat, "maptr", "h20", python="3.11", cuda="13.0", trim_kernels=True)


def test_a_trimmed_sdist_fixers_arguments_are_checked_before_they_reach_a_run_line(cat):
    plan = resolve(cat, "sparsedrive", "h20,b200", python="3.11", cuda="13.0", trim_kernels=True)
    for args in ({"dims": "32+64 && curl x"}, {"dims": "32,64"}, {"std": "c++17"}):
        native = {**plan.native_packages, "flash-attn": {**plan.native_packages["flash-attn"], "sdist_fixers": [
            {"name": "flash-attn-head-dims", "args": args, "why": "w"}]}}
        with pytest.raises(BadInput, match="refusing to render sdist fixer"):
            render.make_context(replace(plan, native_packages=native), "test").compiled_steps
