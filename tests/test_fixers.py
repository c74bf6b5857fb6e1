"""Fixers on small snippets written here (never code from the model repos)."""

import os
import subprocess
import sys
import textwrap

import pytest

from envbuild import fixers

TRAIN = textwrap.dedent('''\
    import argparse
    import os

    def parse_args():
        parser = argparse.ArgumentParser()
        parser.add_argument("config")
        parser.add_argument("--local_rank", type=int, default=0)
        args = parser.parse_args()
        if "LOCAL_RANK" not in os.environ:
            os.environ["LOCAL_RANK"] = str(args.local_rank)
        return args
    ''')

OP_CU = textwrap.dedent('''\
    #include <torch/extension.h>
    #include <THC/THC.h>
    #include <THC/THCAtomics.cuh>
    #include "THC/THCDeviceUtils.cuh"

    extern THCState *state;

    void launch(at::Tensor x) {
      AT_CHECK(x.type().is_cuda(), "x must be CUDA");
      float* p = x.data<float>();
      int blocks = THCCeilDiv(x.numel(), 256);
      void* tmp = THCudaMalloc(state, 1024);
      kernel<<<blocks, 256, 0, THCState_getCurrentStream(state)>>>(p);
      THCudaCheck(cudaGetLastError());
      THCudaFree(state, tmp);
      AT_DISPATCH_FLOATING_TYPES(x.type(), "launch", ([&] {}));
    }
    ''')

SETUP = textwrap.dedent('''\
    import torch
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    def make_ext():
        if torch.cuda.is_available():
            return CUDAExtension("op_ext", ["op.cu"], extra_compile_args={"cxx": ["-std=c++14"], "nvcc": ["-std=c++14"]})
        else:
            raise NotImplementedError("Cuda is not available")

    setup(name="op", ext_modules=[make_ext()], cmdclass={"build_ext": BuildExtension})
    ''')

MMDET_INIT = textwrap.dedent('''\
    import mmcv
    from .version import __version__, short_version

    def digit_version(version_str):
        return [int(x) for x in version_str.split('.')[:3]]

    mmcv_minimum_version = '1.3.8'
    mmcv_maximum_version = '1.4.0'
    mmcv_version = digit_version(mmcv.__version__)

    assert (mmcv_version >= digit_version(mmcv_minimum_version)
            and mmcv_version <= digit_version(mmcv_maximum_version))
    ''')

NUMBA = textwrap.dedent('''\
    import numba
    from numba.errors import NumbaPerformanceWarning
    import warnings

    warnings.filterwarnings("ignore", category=numba.errors.NumbaWarning)
    ''')


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "model"
    (root / "tools").mkdir(parents=True)
    (root / "ops" / "src").mkdir(parents=True)
    (root / "mmdet").mkdir()
    (root / "tools" / "train.py").write_text(TRAIN)
    (root / "ops" / "src" / "op.cu").write_text(OP_CU)
    (root / "ops" / "setup.py").write_text(SETUP)
    (root / "mmdet" / "__init__.py").write_text(MMDET_INIT)
    (root / "tools" / "iou.py").write_text(NUMBA)
    return root


def all_fixers():
    return [fixers.make(n, a) for n, a in [("local-rank", {}), ("thc-to-aten", {}), ("numba-errors", {}),
                                            ("mmcv-version-assert", {"mmcv": "1.7.1"}),
                                            ("setup-without-gpu", {}), ("cxx-standard", {"std": "c++17"})]]


def snapshot(root):
    return {p: (root / p).read_text() for p in fixers.iter_files(str(root))}


def test_detect_changes_nothing_and_names_each_file(tree):
    before = snapshot(tree)
    findings = fixers.detect(str(tree), all_fixers())
    assert snapshot(tree) == before
    got = {(f.path, f.fixer) for f in findings}
    assert ("tools/train.py", "local-rank") in got
    assert ("ops/src/op.cu", "thc-to-aten") in got
    assert ("tools/iou.py", "numba-errors") in got
    assert ("mmdet/__init__.py", "mmcv-version-assert") in got
    assert ("ops/setup.py", "setup-without-gpu") in got and ("ops/setup.py", "cxx-standard") in got
    assert all(f.line >= 1 for f in findings)


def test_apply_is_idempotent(tree):
    report = fixers.apply(str(tree), all_fixers())
    assert report["local-rank"] == ["tools/train.py"]
    once = snapshot(tree)
    again = fixers.apply(str(tree), all_fixers())
    assert all(files == [] for files in again.values())
    assert snapshot(tree) == once
    assert fixers.detect(str(tree), all_fixers()) == []


def test_local_rank_accepts_both_spellings(tree):
    fixers.apply(str(tree), [fixers.make("local-rank")])
    src = tree / "tools"
    for flag in ("--local-rank=3", "--local_rank=3"):
        out = subprocess.run([sys.executable, "-c", "import train; print(train.parse_args().local_rank)"],
                             cwd=src, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(src)},
                             input="", timeout=30)
        assert out.returncode == 0 or "config" in out.stderr
        code = ("import sys, train; sys.argv=['t','cfg','%s']; a=train.parse_args(); "
                "import os; print(a.local_rank, os.environ['LOCAL_RANK'])" % flag)
        env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
        run = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, env=env, timeout=30)
        assert run.stdout.split() == ["3", "3"], run.stderr


def test_thc_mapped_to_aten(tree):
    fixers.apply(str(tree), [fixers.make("thc-to-aten")])
    cu = (tree / "ops" / "src" / "op.cu").read_text()
    for gone in ("THC", "AT_CHECK", ".type().is_cuda()", ".data<float>", "x.type(),"):
        assert gone not in cu, gone
    for present in ("#include <ATen/cuda/CUDAContext.h>", "#include <ATen/cuda/Atomic.cuh>", "TORCH_CHECK(x.is_cuda()",
                    "x.data_ptr<float>()", "at::ceil_div(", "C10_CUDA_CHECK(cudaGetLastError())",
                    "at::cuda::getCurrentCUDAStream()", "raw_alloc(1024)", "raw_delete(tmp)", "x.scalar_type()",
                    "#include <ATen/ceil_div.h>", "#include <c10/cuda/CUDACachingAllocator.h>"):
        assert present in cu, present
    assert cu.count("ATen/cuda/CUDAContext.h") == 1


def test_numba_errors_works_on_both_layouts(tree):
    fixers.apply(str(tree), [fixers.make("numba-errors")])
    src = (tree / "tools" / "iou.py").read_text()
    compile(src, "iou.py", "exec")
    assert "from numba.core.errors import NumbaPerformanceWarning" in src
    assert "numba.core.errors.NumbaWarning" in src
    assert "except ImportError:  # numba < 0.49" in src


def test_mmcv_assert_relaxed_exactly_to_the_plan(tree, tmp_path):
    fixers.apply(str(tree), [fixers.make("mmcv-version-assert", {"mmcv": "1.7.1"})])
    text = (tree / "mmdet" / "__init__.py").read_text()
    assert "mmcv_maximum_version = '1.7.1'" in text and "mmcv_minimum_version = '1.3.8'" in text
    other = tmp_path / "mmdet3x"
    other.mkdir()
    strict = "mmcv_maximum_version = '2.1.0'\nassert v < digit_version(mmcv_maximum_version)\n"
    (other / "__init__.py").write_text(strict)
    fixers.apply(str(other), [fixers.make("mmcv-version-assert", {"mmcv": "2.1.0"})])
    assert "'2.1.1'" in (other / "__init__.py").read_text()  # strict '<' needs one patch more
    # never lowers a maximum
    fixers.apply(str(tree), [fixers.make("mmcv-version-assert", {"mmcv": "1.5.0"})])
    assert "mmcv_maximum_version = '1.7.1'" in (tree / "mmdet" / "__init__.py").read_text()


def test_setup_builds_without_gpu(tree):
    fixers.apply(str(tree), [fixers.make("setup-without-gpu"), fixers.make("cxx-standard", {"std": "c++17"})])
    text = (tree / "ops" / "setup.py").read_text()
    compile(text, "setup.py", "exec")
    assert "os.getenv('FORCE_CUDA', '0') == '1'" in text and text.startswith("import os\n")
    assert "-std=c++17" in text and "c++14" not in text


def test_cxx_standard_without_a_plan_leaves_the_standard_to_torch(tree):
    # No standard named: the old pin goes, so torch's BuildExtension adds the one its headers need.
    fixers.apply(str(tree), [fixers.make("cxx-standard")])
    text = (tree / "ops" / "setup.py").read_text()
    compile(text, "setup.py", "exec")
    assert "-std=" not in text and 'extra_compile_args={"cxx": [], "nvcc": []}' in text


@pytest.mark.parametrize("before, after", [
    ('a = ["-O3", "-std=c++14"]\n', 'a = ["-O3"]\n'),
    ("a = ['-std=c++11', '-O3', '-g']\n", "a = ['-O3', '-g']\n"),
    ('a = "-O3 -std=c++14"\n', 'a = "-O3"\n'),
    ('a = ["-std=c++17"]\n', 'a = ["-std=c++17"]\n'),  # a current standard stays
])
def test_cxx_standard_drops_only_old_pins(tmp_path, before, after):
    (tmp_path / "setup.py").write_text(before)
    fixers.apply(str(tmp_path), [fixers.make("cxx-standard")])
    assert (tmp_path / "setup.py").read_text() == after


def test_fix_cli_drops_the_pin_by_default_and_sets_it_when_asked(tree):
    import subprocess
    import sys
    run = lambda *a: subprocess.run([sys.executable, "-m", "envbuild.cli", "fix", str(tree), "--only", "cxx-standard", *a],
                                    capture_output=True, text=True)
    assert run("--cxx-std", "c++20").returncode == 0
    assert (tree / "ops" / "setup.py").read_text().count("-std=c++20") == 2
    (tree / "ops" / "setup.py").write_text(SETUP)
    assert run().returncode == 0
    assert "-std=" not in (tree / "ops" / "setup.py").read_text()


def test_a_fix_that_would_break_python_is_not_made(tmp_path):
    # A pin inside a string that a naive edit would leave unbalanced: the fixer must leave the file alone.
    text = 'x = "-std=c++14\\\n"\n'
    (tmp_path / "setup.py").write_text(text)
    fixer = fixers.make("cxx-standard", {"std": "c++17\""})
    assert fixer.changes(str(tmp_path)) == {}
    assert (tmp_path / "setup.py").read_text() == text


def test_never_follows_symlinks_out_of_the_tree(tree, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "train.py"
    victim.write_text(TRAIN)
    os.symlink(victim, tree / "tools" / "linked.py")
    os.symlink(outside, tree / "linked_dir")
    fixers.apply(str(tree), [fixers.make("local-rank")])
    assert victim.read_text() == TRAIN
    assert "linked.py" not in " ".join(fixers.iter_files(str(tree)))


def test_failure_leaves_nothing_half_applied(tree, monkeypatch):
    before = snapshot(tree)
    calls = {"n": 0}
    real = fixers._atomic_write

    def flaky(full, text):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real(full, text)

    monkeypatch.setattr(fixers, "_atomic_write", flaky)
    with pytest.raises(OSError):
        fixers.apply(str(tree), all_fixers())
    monkeypatch.setattr(fixers, "_atomic_write", real)
    assert snapshot(tree) == before


def test_runs_standalone_inside_an_image(tree, tmp_path):
    """The build runs this file directly (python fixers.py apply --plan ...)."""
    plan = tmp_path / "plan.json"
    plan.write_text('{"fixers": [{"name": "local-rank", "why": "", "args": {}}]}')
    report = tmp_path / "fixes.json"
    r = subprocess.run([sys.executable, fixers.__file__, "apply", str(tree), "--plan", str(plan),
                        "--report", str(report)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--local-rank" in (tree / "tools" / "train.py").read_text()
    assert '"tools/train.py"' in report.read_text()


def test_fixer_code_runs_on_python38():
    vermin = os.path.join(os.path.dirname(sys.executable), "vermin")
    r = subprocess.run([vermin, "-t=3.8-", "--no-tips", "--violations",
                        fixers.__file__], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
