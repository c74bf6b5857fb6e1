"""The pure logic of the in-image smoke script (envbuild/incontainer/smoke.py, its levels in
level_*.py and their shared helpers in smoke_common.py beside it), on the host.

Its torch-using levels run in containers (test_e2e); these are the decisions around them:
which compiled files get loaded and how, and when NCCL is retried with P2P off.
"""

import ast
import json
import importlib.util
import os
import subprocess
import sys
import time
import uuid

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("incontainer_smoke", ROOT / "envbuild" / "incontainer" / "smoke.py")
smoke = importlib.util.module_from_spec(spec)
spec.loader.exec_module(smoke)  # puts its folder on sys.path, as running it as a script does
import level_arch as arch_level  # noqa: E402 - importable only once smoke.py has run
import level_comm as comm_level  # noqa: E402
import level_env as env_level  # noqa: E402
import level_model as model_level  # noqa: E402
import smoke_common as common  # noqa: E402

SITE = "/opt/venv/lib/python3.8/site-packages"


def lib(path, module=None):
    return {"path": path, "sass": ["8.0"], "ptx": [], "python_module": module}


def test_extension_targets_name_modules_from_their_import_root():
    libs = [
        lib(f"{SITE}/mmcv/_ext.cpython-38-x86_64-linux-gnu.so", "_ext"),
        lib(f"{SITE}/flash_attn_2_cuda.cpython-38-x86_64-linux-gnu.so", "flash_attn_2_cuda"),
        lib(f"{SITE}/torchvision/_C.so"),  # an op library: no PyInit
        lib("/workspace/model/mmdet3d/ops/iou3d/iou3d_cuda.cpython-38-x86_64-linux-gnu.so", "iou3d_cuda"),
        lib("/workspace/model/build/lib.linux-x86_64-cpython-38/iou3d_cuda.cpython-38-x86_64-linux-gnu.so",
            "iou3d_cuda"),  # a build leftover
        lib(f"{SITE}/torch/lib/libtorch_cuda.so"),  # torch's own
        lib(f"{SITE}/nvidia/cublas/lib/libcublas.so.11"),  # NVIDIA's
        lib(f"{SITE}/torchvision.libs/libcudart.782fcab0.so.11.0"),
        lib("/elsewhere/x.so", "x"),  # under no import root
    ]
    targets = common.extension_targets(libs, [SITE, "/workspace/model/"])
    got = {(t["kind"], t["load"], t["package"]) for t in targets}
    assert got == {
        ("module", "mmcv._ext", "mmcv"),
        ("module", "flash_attn_2_cuda", "flash_attn_2_cuda"),
        ("library", f"{SITE}/torchvision/_C.so", "torchvision"),
        ("module", "mmdet3d.ops.iou3d.iou3d_cuda", "mmdet3d"),
    }


def test_an_editable_package_is_named_as_its_finder_imports_it_not_from_the_repo_root(tmp_path, monkeypatch):
    """MapTR's vendored mmdet3d installed editable by setuptools >= 64: a finder maps `mmdet3d` to
    its folder, no sys.path entry. Named from the repo root (mmdetection3d.mmdet3d...), the smoke
    imported a second mmdet3d whose registry refused its layers ('already registered')."""
    import importlib.machinery
    repo = tmp_path / "model"
    ops = repo / "mmdetection3d" / "mmdet3d" / "ops" / "iou3d"
    ops.mkdir(parents=True)
    for folder in (ops, ops.parent, ops.parent.parent):
        (folder / "__init__.py").write_text("")
    so = lib(str(ops / "iou3d_cuda.cpython-311-x86_64-linux-gnu.so"), "iou3d_cuda")
    target = common.extension_targets([so], [str(repo)])[0]
    assert target["load"] == "mmdetection3d.mmdet3d.ops.iou3d.iou3d_cuda"  # no finder: the repo root names it

    class EditableFinder:  # what setuptools' __editable__ finder does: a name mapped to a folder
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "mmdet3d":
                return importlib.machinery.PathFinder.find_spec(name, [str(repo / "mmdetection3d")])
            return None
    monkeypatch.setattr(sys, "meta_path", sys.meta_path + [EditableFinder])
    target = common.extension_targets([so], [str(repo)])[0]
    assert (target["load"], target["package"]) == ("mmdet3d.ops.iou3d.iou3d_cuda", "mmdet3d")


def test_nccl_is_retried_with_p2p_off_and_the_working_setting_reported(monkeypatch):
    monkeypatch.delenv("NCCL_P2P_DISABLE", raising=False)
    seen = []

    def run(nproc, backend, env, timeout):
        seen.append(env.get("NCCL_P2P_DISABLE"))
        return {"ok": env.get("NCCL_P2P_DISABLE") == "1"} if seen[-1] == "1" else {"ok": False, "error": "timed out"}

    attempts, works = comm_level.comm_attempts(8, "nccl", 5, run=run)
    assert seen == [None, "1"] and works == "NCCL_P2P_DISABLE=1"
    assert [a["setting"] for a in attempts] == ["NCCL_P2P_DISABLE=unset", "NCCL_P2P_DISABLE=1"]


@pytest.mark.parametrize("preset, calls, works", [("1", 1, None), (None, 1, "NCCL_P2P_DISABLE=unset")])
def test_no_retry_when_p2p_is_already_off_or_the_first_try_works(monkeypatch, preset, calls, works):
    if preset:
        monkeypatch.setenv("NCCL_P2P_DISABLE", preset)
    else:
        monkeypatch.delenv("NCCL_P2P_DISABLE", raising=False)
    seen = []

    def run(nproc, backend, env, timeout):
        seen.append(1)
        return {"ok": not preset}

    attempts, got = comm_level.comm_attempts(2, "nccl", 5, run=run)
    assert len(seen) == calls and got == works


def test_gloo_rehearsal_is_one_attempt_without_nccl_settings():
    attempts, works = comm_level.comm_attempts(2, "gloo", 5, run=lambda *a: {"ok": False, "error": "x"})
    assert attempts == [{"ok": False, "error": "x"}] and works is None


@pytest.mark.parametrize("sass, ptx, cc, via", [
    (["8.0"], [], "8.6", "sm_80"),         # same major, older minor SASS runs
    (["8.0", "8.6"], [], "8.9", "sm_86"),
    (["8.0"], [], "9.0", None),            # sm_80 SASS never runs on Hopper
    (["8.0"], ["8.0"], "9.0", "compute_80"),  # PTX JIT does
    (["9.0"], [], "8.0", None),
])
def test_runs_on(sass, ptx, cc, via):
    assert arch_level.runs_on(sass, ptx, cc) == via


def test_smoke_runs_as_a_script_with_its_levels_beside_it(tmp_path):
    # As the image runs it (python /opt/envbuild/smoke.py): the levels import by plain name from
    # the script's folder, whatever the working folder; an unknown level is refused before torch.
    script = ROOT / "envbuild" / "incontainer" / "smoke.py"
    r = subprocess.run([sys.executable, str(script), "--level", "nope"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "unknown level(s): nope" in r.stderr, r.stderr


def test_in_image_code_is_python_3_8():
    for path in sorted((ROOT / "envbuild" / "incontainer").glob("*.py")):
        ast.parse(path.read_text(), str(path), feature_version=(3, 8))


def test_op_checks_cover_the_compiled_libraries_the_catalog_uses(monkeypatch, cat):
    monkeypatch.syspath_prepend(smoke.HERE)  # as level_ops.py imports it, from beside smoke.py
    import op_checks
    from envbuild.resolve import resolve
    # every package with native code any catalog model installs has a GPU op check, found the
    # way level_ops finds it: through the Plan's native_packages, as plan.json carries them
    seen = set()
    for model in cat.models:
        plan = json.loads(resolve(cat, model, "a800").to_json())
        for name, info in plan["native_packages"].items():
            seen.add(name)
            assert info["op_check"] in op_checks.OP_CHECKS, (model, name, info)
            assert common.package_module(name, plan) == info["module"]
    assert {"mmcv-full", "torch-cluster", "torch-sparse", "torch-scatter"} <= seen
    assert any(name.startswith("spconv-cu") for name in seen)


def test_compiled_modules_are_attributed_to_the_package_whose_check_covers_them():
    plan = {"native_packages": {"flash-attn": {"module": "flash_attn", "op_check": "flash_attn",
                                               "also_covers": ["flash_attn_2_cuda"]}}}
    assert common.checked_by(plan) == {"flash_attn_2_cuda": "flash_attn"}
    assert common.package_module("flash-attn", plan) == "flash_attn"
    assert common.package_module("scikit-image", plan) == "skimage"  # pure Python: the stdlib table


def _alive_with(marker):
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def test_run_bounded_kills_workers_that_left_the_launchers_session():
    # Like torchrun >= 2.2: the launcher starts its worker in a session of its own, and the
    # worker holds the launcher's stdout. Killing the launcher's group alone would leave it.
    marker = f"envbuild-test-{uuid.uuid4().hex}"
    worker = f"import time; time.sleep(120)  # {marker}"
    launcher = ("import subprocess, sys, time; "
                f"subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True); "
                "print('started', flush=True); time.sleep(120)")
    start = time.monotonic()
    code, out, err = common.run_bounded([sys.executable, "-c", launcher], timeout=2)
    assert code is None and "started" in out
    assert time.monotonic() - start < 60  # bounded: not the 120 s the processes wanted
    assert not _alive_with(marker)


def test_run_bounded_returns_output_and_exit_code():
    code, out, err = common.run_bounded([sys.executable, "-c", "import sys; print('x'); sys.exit(3)"], timeout=30)
    assert (code, out.strip()) == (3, "x")


class _Args:
    def __init__(self, workdir):
        self.workdir = str(workdir)


def _fake_repo(tmp_path):
    pkg = tmp_path / "repo" / "nets"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "class P:\n    def __init__(self, n): self.n, self.requires_grad = n, True\n    def numel(self): return self.n\n"
        "class Net:\n"
        "    @staticmethod\n"
        "    def add_args(parser):\n"
        "        parser.add_argument('--width', type=int, required=True)\n"
        "        return parser\n"
        "    def __init__(self, width): self.width = width\n"
        "    def parameters(self): return [P(self.width), P(3)]\n")
    return tmp_path / "repo"


def test_model_level_builds_from_the_recipe_and_counts_parameters(tmp_path):
    repo = _fake_repo(tmp_path)
    plan = {"model": "fake", "construct": {"kind": "argparse", "module": "nets", "object": "Net", "args_hook": "add_args",
                                           "args": ["--width", "7"], "imports": []}}
    out = model_level.level_model(plan, _Args(repo))
    assert out["status"] == "passed" and out["parameters"] == 10 and out["object"] == "nets.Net"


def _fake_config_repo(tmp_path):
    """A repo in the OpenMMLab shape: a registry filled by importing the plugin package, a config
    file, a loader and a builder that looks the type up in the registry."""
    repo = _fake_repo(tmp_path)
    (repo / "registry.py").write_text(
        "NETS = {}\n"
        "def build(cfg, train_cfg=None, test_cfg=None):\n"
        "    cfg = dict(cfg)\n"
        "    return NETS[cfg.pop('type')](train_cfg=train_cfg, test_cfg=test_cfg, **cfg)\n"
        "class Config(dict):\n"
        "    @classmethod\n"
        "    def fromfile(cls, path):\n"
        "        scope = {}\n"
        "        exec(open(path).read(), scope)\n"
        "        return cls((k, v) for k, v in scope.items() if not k.startswith('__'))\n")
    plugin = repo / "plugin"
    plugin.mkdir()
    (plugin / "__init__.py").write_text(
        "import registry, nets\n"
        "class Det(nets.Net):\n"
        "    def __init__(self, width, train_cfg, test_cfg):\n"
        "        assert train_cfg == {'lr': 1}, train_cfg\n"
        "        nets.Net.__init__(self, width)\n"
        "registry.NETS['Det'] = Det\n")
    (repo / "configs").mkdir()
    (repo / "configs" / "det.py").write_text("model = dict(type='Det', width=5)\ntrain_cfg = dict(lr=1)\n")
    return repo


def test_model_level_builds_from_the_training_config_through_the_models_builder(tmp_path):
    for name in ("registry", "plugin", "nets"):
        sys.modules.pop(name, None)
    repo = _fake_config_repo(tmp_path)
    recipe = {"kind": "config", "config": "configs/det.py", "loader": "registry.Config.fromfile",
              "builder": "registry.build", "cfg_kwargs": ["train_cfg", "test_cfg"], "imports": ["plugin"]}
    out = model_level.level_model({"model": "fake", "construct": recipe}, _Args(repo))
    assert out["status"] == "passed" and out["parameters"] == 8, out
    assert out["object"] == "registry.build(configs/det.py: model)"
    # without the plugin import the registry is empty: the builder's KeyError is the finding
    for name in ("registry", "plugin", "nets"):
        sys.modules.pop(name, None)
    with pytest.raises(KeyError):
        model_level.level_model({"model": "fake", "construct": dict(recipe, imports=[])}, _Args(repo))
    out = model_level.level_model({"model": "fake", "construct": dict(recipe, config="configs/none.py")}, _Args(repo))
    assert out["status"] == "failed" and "no config configs/none.py" in out["reason"]


def test_model_level_runs_the_catalogs_own_lines_from_the_models_root(tmp_path):
    """kind python: the lines run in the model's root (relative files read as its scripts do) and bind `model`."""
    for name in ("registry", "plugin", "nets"):
        sys.modules.pop(name, None)
    repo = _fake_config_repo(tmp_path)
    code = ("import registry, plugin\n"
            "cfg = registry.Config.fromfile('configs/det.py')\n"
            "model = registry.NETS['Det'](width=cfg['model']['width'] * 2, train_cfg=cfg['train_cfg'], test_cfg=None)\n")
    out = model_level.level_model({"model": "fake", "construct": {"kind": "python", "code": code}}, _Args(repo))
    assert out["status"] == "passed" and out["parameters"] == 13 and out["object"] == "[construct] code", out
    out = model_level.level_model({"model": "fake", "construct": {"kind": "python", "code": "model = 3\n"}}, _Args(repo))
    assert out["status"] == "failed" and "bound int to `model`, not a network" in out["reason"]


def test_dotted_paths_reach_attributes_past_the_module():
    assert model_level.dotted("os.path.join") is __import__("os").path.join
    assert model_level.dotted("json.JSONDecoder.decode") is __import__("json").JSONDecoder.decode
    with pytest.raises(ImportError):
        model_level.dotted("no_such_module_here.x")


def test_model_level_fails_clearly_when_the_parser_refuses_the_args(tmp_path):
    repo = _fake_repo(tmp_path)
    plan = {"model": "fake", "construct": {"kind": "argparse", "module": "nets", "object": "Net", "args_hook": "add_args",
                                           "args": ["--depth", "7"], "imports": []}}
    out = model_level.level_model(plan, _Args(repo))
    assert out["status"] == "failed" and "refused the catalog's construct args" in out["reason"]
    assert model_level.level_model({"model": "fake"}, _Args(repo))["status"] == "skipped"


def test_the_model_level_runs_the_recipes_training_step_and_judges_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(smoke.HERE)
    import train_steps
    repo = _fake_repo(tmp_path)
    seen = {}

    def step(net, torch):
        seen["cwd"], seen["net"] = os.getcwd(), net
        return dict(outcomes.pop(0))
    outcomes = [{"loss": 0.5, "grads": 3, "nonfinite_grads": 0},
                {"loss": float("nan"), "grads": 3, "nonfinite_grads": 0},
                {"loss": 0.5, "grads": 3, "nonfinite_grads": 1},
                {"loss": 0.5, "grads": 0, "nonfinite_grads": 0}]
    monkeypatch.setitem(train_steps.STEPS, "fake-step", step)
    monkeypatch.setitem(sys.modules, "torch", type(sys)("torch"))
    plan = {"model": "fake", "construct": {"kind": "argparse", "module": "nets", "object": "Net", "args_hook": "add_args",
                                           "args": ["--width", "7"], "imports": [], "step": "fake-step"}}
    out = model_level.level_model(plan, _Args(repo))
    assert out["status"] == "passed" and out["step"] == {"loss": 0.5, "grads": 3, "nonfinite_grads": 0}
    assert seen["cwd"] == str(repo) and seen["net"].width == 7  # the constructed network, run from the repo root
    for says in ("the loss is nan", "1 parameter(s) got a non-finite gradient", "backward reached no parameter"):
        out = model_level.level_model(plan, _Args(repo))
        assert out["status"] == "failed" and says in out["reason"], out


def test_catalog_steps_name_real_training_steps(matrices_copy):
    from envbuild import catalog
    from envbuild.errors import CatalogError
    assert catalog.load(matrices_copy).model("qcnet").construct.step == "qcnet-argoverse2"
    path = matrices_copy / "models" / "qcnet.toml"
    path.write_text(path.read_text().replace('step = "qcnet-argoverse2"', 'step = "os.system"'))
    with pytest.raises(CatalogError, match="'os.system' is not one of qcnet-argoverse2"):
        catalog.load(matrices_copy)


def _read_npy(path):
    """(shape, dtype, values) of a .npy v1.0 file, read by the format's spec (numpy is not here)."""
    import ast
    import struct as st
    raw = path.read_bytes()
    assert raw[:8] == b"\x93NUMPY\x01\x00"
    (length,) = st.unpack("<H", raw[8:10])
    assert (10 + length) % 64 == 0  # numpy aligns the data
    header = ast.literal_eval(raw[10:10 + length].decode("latin1"))
    data = raw[10 + length:]
    return header["shape"], header["descr"], st.unpack("<%df" % (len(data) // 4), data)


def test_synthetic_arrays_are_real_npy_files_and_never_replace_the_models_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.npy").write_bytes(b"the model's own")
    made = model_level.write_arrays(["data/kmeans/det_900.npy=900x11", "data/map.npy=100x20x2", "data/mine.npy=3x3"])
    assert made == ["data/kmeans/det_900.npy=900x11", "data/map.npy=100x20x2"]
    shape, dtype, values = _read_npy(tmp_path / "data" / "kmeans" / "det_900.npy")
    assert shape == (900, 11) and dtype == "<f4" and len(values) == 9900 and not any(values)
    assert _read_npy(tmp_path / "data" / "map.npy")[0] == (100, 20, 2)
    assert (tmp_path / "data" / "mine.npy").read_bytes() == b"the model's own"  # never replaced
    assert model_level.write_arrays(["v.npy=7"]) == ["v.npy=7"] and _read_npy(tmp_path / "v.npy")[0] == (7,)


def test_an_extension_that_fails_only_beside_another_gets_its_own_interpreter(tmp_path):
    """open3d ships a cpu and a cuda build of one module; loading both in one interpreter fails
    ("type already registered") though each loads alone. A failure counts only when it also
    fails alone; a real failure still does."""
    (tmp_path / "torch.py").write_text("class ops:\n    load_library = staticmethod(lambda path: None)\n")  # stand-in
    (tmp_path / "types_registry.py").write_text("SEEN = set()\n")
    register = ("import types_registry\nif 'Vector3d' in types_registry.SEEN:\n"
                "    raise ImportError('generic_type: type Vector3d is already registered!')\n"
                "types_registry.SEEN.add('Vector3d')\n")
    (tmp_path / "cpu_pybind.py").write_text(register)
    (tmp_path / "cuda_pybind.py").write_text(register)
    (tmp_path / "broken_ops.py").write_text("raise OSError('libcudart.so.12: cannot open shared object file')\n")
    targets = [{"kind": "module", "load": name, "path": f"/x/{name}.so", "package": "p", "root": str(tmp_path)}
               for name in ("cpu_pybind", "cuda_pybind", "broken_ops")]
    out = {i["load"]: i for i in env_level.load_extensions(targets, str(tmp_path))}
    assert out["cpu_pybind"]["ok"] and out["cuda_pybind"]["ok"], out
    assert not out["broken_ops"]["ok"] and "libcudart.so.12" in out["broken_ops"]["error"]


def test_a_sibling_build_that_its_own_package_loads_first_is_not_a_failure(tmp_path):
    """open3d's __init__ imports open3d.cpu.pybind on a host without a GPU; loading
    open3d.cuda.pybind then fails even alone (PointPillars' verify: 'type "Vector3dVector" is
    already registered!'). Its library loaded; only the second registration is refused."""
    (tmp_path / "torch.py").write_text("class ops:\n    load_library = staticmethod(lambda path: None)\n")
    pkg = tmp_path / "o3d"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("SEEN = set()\nfrom o3d import cpu_pybind\n")
    register = ("import o3d\nif 'Vector3dVector' in o3d.SEEN:\n"
                "    raise ImportError('generic_type: type \"Vector3dVector\" is already registered!')\n"
                "o3d.SEEN.add('Vector3dVector')\n")
    (pkg / "cpu_pybind.py").write_text(register)
    (pkg / "cuda_pybind.py").write_text(register)
    (pkg / "missing_lib.py").write_text("raise ImportError('libX11.so.6: cannot open shared object file')\n")
    targets = [{"kind": "module", "load": f"o3d.{name}", "path": f"/x/{name}.so", "package": "open3d",
                "root": str(tmp_path)} for name in ("cpu_pybind", "cuda_pybind", "missing_lib")]
    out = {i["load"]: i for i in env_level.load_extensions(targets, str(tmp_path))}
    assert out["o3d.cpu_pybind"]["ok"] and "note" not in out["o3d.cpu_pybind"]
    assert out["o3d.cuda_pybind"]["ok"] and "sibling build" in out["o3d.cuda_pybind"]["note"]
    assert not out["o3d.missing_lib"]["ok"] and "libX11" in out["o3d.missing_lib"]["error"]


def test_env_requires_the_plans_and_the_models_extensions_and_reports_the_rest(tmp_path, monkeypatch):
    """open3d (pulled in by mmdet3d, not in the Plan) ships torch ops for a CUDA the image does
    not have: reported as optional, the level passes. The same failure in a package the Plan
    names, or in the model's own extension (not in the lock), fails it."""
    site = tmp_path / "site"
    for dist, module in (("open3d", "open3d"), ("mmcv", "mmcv")):
        info = site / f"{dist}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "top_level.txt").write_text(module + "\n")
    monkeypatch.syspath_prepend(str(site))
    lock = tmp_path / "requirements.lock"
    lock.write_text("open3d==1.0 \\\n    --hash=sha256:aa\nmmcv==1.0 \\\n    --hash=sha256:bb\n")
    libs = [{"path": f"{site}/{pkg}/{name}.so", "python_module": name} for pkg, name in
            (("open3d", "torch_ops"), ("mmcv", "_ext"), ("local_aggregate", "_C"))]
    monkeypatch.setattr(env_level, "gpu_libraries", lambda: libs)
    monkeypatch.setattr(env_level, "import_roots", lambda workdir: [str(site)])
    monkeypatch.setattr(env_level, "dist_version", lambda name: "1.0")
    monkeypatch.setattr(env_level.importlib, "import_module", lambda name: None)
    failing = {"open3d.torch_ops"}
    monkeypatch.setattr(env_level, "load_extensions", lambda targets, workdir: [
        dict(t, ok=t["load"] not in failing, error="OSError: libcudart.so.12" if t["load"] in failing else None)
        for t in targets])

    class Args:
        workdir = str(tmp_path)
    Args.lock = str(lock)
    plan = {"torch": {"version": "1.0"}, "torchvision": {"version": "1.0"}, "torchaudio": {"version": "1.0"},
            "packages": [{"name": "mmcv", "version": "1.0"}]}
    out = env_level.level_env(plan, Args)
    assert out["status"] == "passed" and out["optional_failures"] == ["open3d.torch_ops (open3d): OSError: libcudart.so.12"]
    for broken in ("mmcv._ext", "local_aggregate._C"):  # the Plan's package; the model's extension
        failing = {broken}
        out = env_level.level_env(plan, Args)
        assert out["status"] == "failed" and out["failed"] == 1, broken


def _fake_torch(capability, name, flags="sm_80 sm_86"):
    """torch as the arch level sees it on a GPU host: the archs the build carries and the GPU present."""
    import types
    torch = types.ModuleType("torch")
    torch.__version__, torch.version = "2.0.1", types.SimpleNamespace(cuda="11.8")
    torch._C = types.SimpleNamespace(_cuda_getArchFlags=lambda: flags)
    torch.cuda = types.SimpleNamespace(is_available=lambda: True, get_device_capability=lambda i: capability,
                                       get_device_name=lambda i: name, get_arch_list=lambda: flags.split())
    return torch


def test_arch_judges_the_gpu_actually_present_not_only_the_plans_card(monkeypatch):
    """The image is for an A800 (sm_80 torch and extension). On an A10 (8.6) the sm_80 SASS runs;
    on an H20 (9.0) nothing does, and the level fails naming that GPU, though the Plan's card passes."""
    plan = {"cc": "8.0", "card": "a800"}
    ext = {"path": "/opt/venv/lib/python3.8/site-packages/mmcv/_ext.so", "sass": ["8.0"], "ptx": [], "python_module": "_ext"}
    monkeypatch.setattr(arch_level, "gpu_libraries", lambda: [ext])
    monkeypatch.setitem(sys.modules, "torch", _fake_torch((8, 6), "NVIDIA A10"))
    out = arch_level.level_arch(plan, None)
    assert out["status"] == "passed" and out["device_cc"] == "8.6" and out["extensions"][0]["runs_via"] == "sm_80"
    assert "this GPU is 8.6" in out["note"]
    monkeypatch.setitem(sys.modules, "torch", _fake_torch((9, 0), "NVIDIA H20"))
    out = arch_level.level_arch(plan, None)
    assert out["status"] == "failed" and out["torch_runs_via"] == "sm_80"  # fine for the Plan's card...
    assert out["problems"] == ["torch ships ['8.0', '8.6']: nothing runs on this GPU, NVIDIA H20 (9.0)",
                               f"{ext['path']} has nothing for this GPU, NVIDIA H20 (9.0)"]  # ...not for this GPU


def test_env_fails_a_package_that_is_not_at_its_locked_version(tmp_path, monkeypatch):
    """Each package of the Plan must be installed at the version the lock (else the Plan's exact pin)
    says: a build that drifted fails env naming both versions; a local suffix (+cu118) is the same."""
    lock = tmp_path / "requirements.lock"
    lock.write_text("mmcv==1.0 \\\n    --hash=sha256:bb\n")
    installed = {"torch": "2.0.1+cu118", "torchvision": "0.15.2", "torchaudio": "2.0.2", "mmcv": "0.9", "numpy": "1.23.5"}
    monkeypatch.setattr(env_level, "dist_version", lambda name: installed.get(name))
    monkeypatch.setattr(env_level.importlib, "import_module", lambda name: None)
    monkeypatch.setattr(env_level, "gpu_libraries", lambda: [])

    class Args:
        workdir = str(tmp_path)
    Args.lock = str(lock)
    plan = {"torch": {"version": "2.0.1"}, "torchvision": {"version": "0.15.2"}, "torchaudio": {"version": "2.0.2"},
            "packages": [{"name": "mmcv", "version": "1.0"}, {"name": "numpy", "version": "1.23.5"}]}
    out = env_level.level_env(plan, Args)
    bad = [p for p in out["packages"] if not p["ok"]]
    assert out["status"] == "failed" and [(p["name"], p["problems"]) for p in bad] == [("mmcv", ["version 0.9, expected 1.0"])]
    installed["mmcv"] = "1.0"
    assert env_level.level_env(plan, Args)["status"] == "passed"
    # a torch no torchaudio pairs with: the Plan says "" and none is installed, which is no failure
    del installed["torchaudio"]
    plan["torchaudio"]["version"] = ""
    out = env_level.level_env(plan, Args)
    assert out["status"] == "passed" and "torchaudio" not in [p["name"] for p in out["packages"]]


def test_ptx_newer_than_the_card_is_judged_not_runnable_by_the_audit_and_the_arch_level(monkeypatch):
    """PTX JIT-compiles forward only: compute_90 PTX does not run on an 8.0 card (A800), compute_80
    PTX does run on a 9.0 one. The audit, the in-image arch level (and the builder's nvcc choice)
    all rely on that one rule (archrules.runs_on): each must refuse the newer PTX."""
    from envbuild import audit
    from envbuild.catalog import Card
    from envbuild.incontainer import archrules
    assert archrules.runs_on([], "8.0", ["9.0"]) is None and archrules.runs_on(["9.0"], "8.0", ["9.0"]) is None
    assert archrules.runs_on([], "9.0", ["8.0"]) == "8.0+PTX" and archrules.runs_on([], "8.6", ["8.0", "9.0"]) == "8.0+PTX"
    # the audit (host side): an extension with only compute_90 PTX fails an A800, passes an H20
    ext = {"path": "/opt/venv/lib/python3.8/site-packages/op/_ext.so", "sass": [], "ptx": ["9.0"]}
    a800 = Card(id="a800", name="A800", cc="8.0", memory_gb=80, p2p=True, aliases=())
    h20 = Card(id="h20", name="H20", cc="9.0", memory_gb=96, p2p=True, aliases=())
    assert audit.judge(ext, "8.0")["runs"] is False
    verdict = audit.audit("img", a800, scanned=[ext])
    assert not verdict["ok"] and verdict["failures"] == [f"{ext['path']}: has SASS none, PTX 9.0; A800 needs sm_8x SASS "
                                                         "with minor <= 0 or PTX <= 8.0"]
    assert audit.audit("img", h20, scanned=[ext])["ok"]  # the same PTX runs where it is not newer than the card
    # the arch level (in the image): torch and the extension carry only compute_90 PTX
    monkeypatch.setattr(arch_level, "gpu_libraries", lambda: [dict(ext, python_module="_ext")])
    monkeypatch.setitem(sys.modules, "torch", _fake_torch((8, 0), "NVIDIA A800", flags="compute_90"))
    out = arch_level.level_arch({"cc": "8.0", "card": "a800"}, None)
    assert out["status"] == "failed" and out["torch_runs_via"] is None and out["extensions"][0]["runs_via"] is None
    assert "torch 2.0.1 ships []: nothing runs on 8.0" in out["problems"]
    assert f"{ext['path']} has nothing for this GPU, NVIDIA A800 (8.0)" in out["problems"]
    monkeypatch.setitem(sys.modules, "torch", _fake_torch((9, 0), "NVIDIA H20", flags="compute_90"))
    out = arch_level.level_arch({"cc": "9.0", "card": "h20"}, None)
    assert out["status"] == "passed" and out["torch_runs_via"] == "compute_90", out["problems"]


def test_an_sm_100a_cubin_is_no_pass_for_a_b300(monkeypatch):
    """sm_100a (what the scanner names 10.0a) runs only on 10.0: the audit and the arch level pass an
    extension that has only it on a B200 (10.0) and fail it on a B300 (10.3), saying why; torch's own
    sm_100 code runs on both, and its sm_90a flag is read as 9.0a, not 9.0."""
    from envbuild import audit
    from envbuild.catalog import Card
    ext = {"path": "/opt/venv/lib/python3.8/site-packages/op/_ext.so", "sass": ["9.0", "10.0a"], "ptx": []}
    b200 = Card(id="b200", name="B200", cc="10.0", memory_gb=180, p2p=True, aliases=())
    b300 = Card(id="b300", name="B300", cc="10.3", memory_gb=270, p2p=True, aliases=())
    assert audit.judge(ext, "10.0")["via"] == "sm_100a SASS" and audit.audit("img", b200, scanned=[ext])["ok"]
    verdict = audit.audit("img", b300, scanned=[ext])
    assert not verdict["ok"] and verdict["failures"] == [
        f"{ext['path']}: has SASS 9.0, 10.0a, PTX none; B300 needs sm_10x SASS with minor <= 3 or PTX <= 10.3 "
        "(sm_100a is arch-specific: it runs only on 10.0)"]
    assert audit.judge(dict(ext, sass=["10.0f"]), "10.3")["via"] == "sm_100f SASS"  # family-specific: 10.x >= 10.0
    monkeypatch.setattr(arch_level, "gpu_libraries", lambda: [dict(ext, python_module="_ext")])
    monkeypatch.setitem(sys.modules, "torch", _fake_torch((10, 3), "NVIDIA B300", flags="sm_90a sm_100 compute_100a"))
    out = arch_level.level_arch({"cc": "10.3", "card": "b300"}, None)
    assert out["torch_archs"] == ["9.0a", "10.0"] and out["torch_ptx"] == ["10.0a"] and out["torch_runs_via"] == "sm_100"
    assert out["status"] == "failed" and out["extensions"][0]["runs_via"] is None
    assert out["problems"] == [f"{ext['path']} has SASS ['9.0', '10.0a'] PTX []: nothing for 10.3",
                               f"{ext['path']} has nothing for this GPU, NVIDIA B300 (10.3)"]
    monkeypatch.setitem(sys.modules, "torch", _fake_torch((10, 0), "NVIDIA B200", flags="sm_90a sm_100 compute_100a"))
    out = arch_level.level_arch({"cc": "10.0", "card": "b200"}, None)
    assert out["status"] == "passed" and out["extensions"][0]["runs_via"] == "sm_100a", out["problems"]


def _dist(site, dist, version, top_level=None, record=None):
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    if top_level is not None:
        (info / "top_level.txt").write_text(top_level)
    if record is not None:
        (info / "RECORD").write_text(record)


def test_env_imports_a_distribution_by_the_names_its_metadata_gives(tmp_path, monkeypatch):
    """hydra-core imports as hydra (its top_level.txt), a wheel without top_level.txt by the
    top-level names in its RECORD: no table entry, no '-' -> '_' guess (hydra_core)."""
    site = tmp_path / "site"
    _dist(site, "hydra-core", "1.3.2", top_level="hydra\n")
    _dist(site, "fancy-widgets", "2.0", record="fancy_widgets_impl-2.0.dist-info/METADATA,,\n"
          "widgetlib/__init__.py,sha256=x,10\nwidgetlib/core.py,sha256=y,20\n_widgetlib_speedups.cpython-38-x86_64-linux-gnu.so,,\n"
          "../../bin/widgets,,\n__pycache__/x.pyc,,\n")
    _dist(site, "pyyaml", "6.0", top_level="_yaml\nyaml\n")
    monkeypatch.syspath_prepend(str(site))
    assert env_level.dist_modules("hydra-core") == ["hydra"]
    assert env_level.dist_modules("fancy-widgets") == ["widgetlib", "_widgetlib_speedups"]
    assert env_level.dist_modules("not-installed") == []
    assert env_level.import_name("pyyaml") == "yaml" and env_level.import_name("not-installed") == "not_installed"
    imported = []
    monkeypatch.setattr(env_level.importlib, "import_module", imported.append)
    monkeypatch.setattr(env_level, "dist_version", lambda name: {"hydra-core": "1.3.2", "fancy-widgets": "2.0"}.get(name, "1.0"))
    monkeypatch.setattr(env_level, "gpu_libraries", lambda: [])

    class Args:
        workdir = str(tmp_path)
        lock = None
    plan = {"torch": {"version": "1.0"}, "torchvision": {"version": "1.0"}, "torchaudio": {"version": "1.0"},
            "packages": [{"name": "hydra-core", "version": "1.3.2"}, {"name": "fancy-widgets", "version": "2.0"}]}
    out = env_level.level_env(plan, Args)
    assert out["status"] == "passed", out
    assert {p["name"]: p["import"] for p in out["packages"]}["hydra-core"] == "hydra"
    assert "hydra" in imported and "widgetlib" in imported and "hydra_core" not in imported


@pytest.mark.parametrize("line, version", [
    # the open kernel module's first line, as an H200 host printed it (driver 580.159.04)
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (dvs-builder@U22)  Thu Oct  2 2026", "580.159.04"),
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023", "535.104.05"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for aarch64  570.86", "570.86"),
    ("no driver here", None),
])
def test_driver_version_is_the_dotted_number_after_kernel_module(line, version):
    assert common.driver_version(line) == version
