"""Fixers on small snippets written here (never code from the model repos)."""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from envbuild import fixers
from conftest import ROOT

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


def _numba_layout(root, new_layout):
    """A stand-in numba package: errors in numba.errors (< 0.49) or only in numba.core.errors (>= 0.49)."""
    errors = ("class NumbaWarning(Warning): pass\n"
              "class NumbaPerformanceWarning(NumbaWarning): pass\n"
              "class TypingError(Exception): pass\n")
    pkg = root / "numba"
    pkg.mkdir(parents=True)
    if new_layout:
        (pkg / "__init__.py").write_text("from . import core\n")
        (pkg / "core").mkdir()
        (pkg / "core" / "__init__.py").write_text("from . import errors\n")
        (pkg / "core" / "errors.py").write_text(errors)
    else:
        (pkg / "__init__.py").write_text("from . import errors\n")
        (pkg / "errors.py").write_text(errors)
    return root


NUMBA_FORMS = textwrap.dedent('''\
    """Tools."""
    import numba.errors
    from numba.errors import (NumbaPerformanceWarning,
                              NumbaWarning as NW)  # kept
    from numba.errors import \\
        TypingError

    def check():
        from numba.errors import TypingError as TE
        return TE

    assert issubclass(NumbaPerformanceWarning, NW) and check() is TypingError
    assert numba.errors.TypingError is TypingError
    print("ok", "numba.errors.X in a string stays")
    ''')


@pytest.mark.parametrize("text", [NUMBA, NUMBA_FORMS])
@pytest.mark.parametrize("new_layout", [False, True])
def test_numba_errors_fixed_code_runs_on_both_layouts(tmp_path, text, new_layout):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "iou.py").write_text(text)
    fixers.apply(str(tmp_path / "model"), [fixers.make("numba-errors")])
    fixed = (tmp_path / "model" / "iou.py").read_text()
    assert fixed != text and "numba.errors.X in a string stays" in fixed or text is NUMBA
    if text is NUMBA_FORMS:
        assert "NumbaWarning as NW)  # kept" not in fixed and "NumbaWarning as NW  # kept" in fixed
    site = _numba_layout(tmp_path / "site", new_layout)
    r = subprocess.run([sys.executable, str(tmp_path / "model" / "iou.py")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
    # the unfixed code fails on the new layout: the test can tell
    if new_layout:
        (tmp_path / "orig.py").write_text(text)
        r = subprocess.run([sys.executable, str(tmp_path / "orig.py")], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(site)})
        assert r.returncode != 0


def test_numba_fix_is_idempotent_and_leaves_shared_lines_alone(tmp_path):
    (tmp_path / "a.py").write_text(NUMBA_FORMS + "x = 1; from numba.errors import TypingError\n")
    fixers.apply(str(tmp_path), [fixers.make("numba-errors")])
    once = (tmp_path / "a.py").read_text()
    fixers.apply(str(tmp_path), [fixers.make("numba-errors")])
    assert (tmp_path / "a.py").read_text() == once
    assert "x = 1; from numba.errors import TypingError" in once
    compile(once, "a.py", "exec")


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


def test_mmcv_assert_fix_lets_an_mmseg_style_package_import(tmp_path):
    """mmseg 0.x keeps its range in MMCV_MIN/MMCV_MAX and compares lists; the fixed package must
    import beside an mmcv the port uses, and still refuse one below its minimum."""
    (tmp_path / "mmcv").mkdir()
    (tmp_path / "mmcv" / "__init__.py").write_text("import os\n__version__ = os.environ['FAKE_MMCV']\n")
    pkg = tmp_path / "segpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""\
        import mmcv

        MMCV_MIN = '1.3.1'
        MMCV_MAX = '1.4.0'


        def as_list(text):
            return [int(part) for part in text.split('.')]


        assert as_list(MMCV_MIN) <= as_list(mmcv.__version__) <= as_list(MMCV_MAX), mmcv.__version__
        """))

    def imports(version):
        r = subprocess.run([sys.executable, "-c", "import segpkg"], cwd=tmp_path, capture_output=True, text=True,
                           env={**os.environ, "FAKE_MMCV": version, "PYTHONPATH": str(tmp_path)})
        return r.returncode == 0

    assert not imports("1.7.1")
    fixers.apply(str(tmp_path), [fixers.make("mmcv-version-assert", {"mmcv": "1.7.1"})])
    assert imports("1.7.1") and imports("1.4.0") and not imports("1.2.0")


def test_layer_clash_fix_lets_both_registrations_import(tmp_path):
    """A stand-in mmcv whose registry refuses a second registration of a name, as mmcv 1.x does:
    a package that registers SparseConv3d again fails at import until the fixer forces its own."""
    (tmp_path / "mmcv" / "cnn").mkdir(parents=True)
    (tmp_path / "mmcv" / "__init__.py").write_text("")
    (tmp_path / "mmcv" / "cnn" / "__init__.py").write_text(textwrap.dedent("""\
        class Registry:
            def __init__(self):
                self.modules = {}

            def register_module(self, force=False):
                def add(cls):
                    if cls.__name__ in self.modules and not force:
                        raise KeyError(cls.__name__ + " is already registered")
                    self.modules[cls.__name__] = cls
                    return cls
                return add


        CONV_LAYERS = Registry()


        @CONV_LAYERS.register_module()
        class SparseConv3d:
            origin = "mmcv"
        """))
    ops = tmp_path / "det3d" / "ops"
    ops.mkdir(parents=True)
    (tmp_path / "det3d" / "__init__.py").write_text("")
    (ops / "__init__.py").write_text("from .conv import SparseConv3d, Plain\n")
    (ops / "conv.py").write_text(textwrap.dedent("""\
        from mmcv.cnn import CONV_LAYERS


        @CONV_LAYERS.register_module()
        class SparseConv3d:
            origin = "det3d"


        @CONV_LAYERS.register_module()
        class Plain:
            pass
        """))
    probe = "import det3d.ops; from mmcv.cnn import CONV_LAYERS; print(CONV_LAYERS.modules['SparseConv3d'].origin)"

    def run():
        return subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(tmp_path)})

    assert "KeyError" in run().stderr
    fixers.apply(str(tmp_path), [fixers.make("mmcv-layer-clash")])
    r = run()
    assert r.returncode == 0 and r.stdout.strip() == "det3d", r.stderr
    text = (ops / "conv.py").read_text()
    assert text.count("register_module(force=True)") == 1  # the unrelated layer keeps its registration
    before = text
    fixers.apply(str(tmp_path), [fixers.make("mmcv-layer-clash")])
    assert (ops / "conv.py").read_text() == before


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
    ("a = ['-std=c++14', '-O3', '-std=c++14']\n", "a = ['-O3']\n"),
    ("a = ['-std=c++14', '-std=c++11']\n", "a = []\n"),
    # never an empty argument (gcc reads '' as a file: "linker input file not found")
    ('a = "-std=c++14"\n', 'a = "-DENVBUILD_STD_LEFT_TO_TORCH"\n'),
    ("e = {'cxx': ('-std=c++14',)}\n", "e = {'cxx': ()}\n"),
    ("e = {'cxx': '-std=c++14', 'nvcc': ' -std=c++11 '}\n", "e = {'cxx': [], 'nvcc': []}\n"),
    ("Extension('x', extra_compile_args='-std=c++14')\n", "Extension('x', extra_compile_args=[])\n"),
    ("a = ('-O3', '-std=c++14')\n", "a = ('-O3',)\n"),
    ("a = ('-std=c++14', '-O3')\n", "a = ('-O3',)\n"),
    ("a = ('-std=c++14', '-O3', '-std=c++14',)\n", "a = ('-O3',)\n"),
    ("a = ('-g', '-std=c++14', '-O3')\n", "a = ('-g', '-O3')\n"),
    ("a = '-std=c++14',\n", "a = ()\n"),
    ("a = '-O3', '-std=c++14'\n", "a = '-O3',\n"),
    ("a = ['-std=c++14',]\n", "a = []\n"),
    ("a = [\n    '-std=c++14',  # old, pinned\n]\n", "a = [\n      # old, pinned\n]\n"),
    ("a = {'-std=c++14'}\n", "a = set()\n"),
    ("a = ['-O3', ' -std=c++14']\n", "a = ['-O3']\n"),
    ("a = [('-std=c++14'), '-O3']\n", "a = ['-O3']\n"),
    ("a = (('-O3'), ('-std=c++14'))\n", "a = (('-O3'),)\n"),
    ("a = f'-std=c++14 {x}'\n", "a = f'-std=c++14 {x}'\n"),  # an f-string is not cut (its parts have no place)
])
def test_cxx_standard_drops_only_old_pins(tmp_path, before, after):
    (tmp_path / "setup.py").write_text(before)
    fixers.apply(str(tmp_path), [fixers.make("cxx-standard")])
    assert (tmp_path / "setup.py").read_text() == after
    empty = lambda text: [n.value for n in ast.walk(ast.parse(text))  # noqa: E731
                          if isinstance(n, ast.Constant) and isinstance(n.value, str) and not n.value.strip()]
    assert empty(after) == empty(before) == []


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
    class Breaker(fixers.Fixer):  # a fixer with a bug: it unbalances a string
        name = "breaker"
        filenames = ("setup.py",)

        def fix_text(self, relpath, text):
            return text.replace("x = ", "x = (")

    text = 'x = "-std=c++14"\n'
    (tmp_path / "setup.py").write_text(text)
    (tmp_path / "other.py").write_text("y = 1\n")
    with pytest.raises(fixers.FixerError, match="setup.py: breaker would leave code that does not compile"):
        fixers.apply(str(tmp_path), [fixers.make("cxx-standard"), Breaker()])
    assert (tmp_path / "setup.py").read_text() == text  # the whole fix rolled back, the earlier fixer's part too


@pytest.mark.parametrize("name, args", [
    ("mmcv-version-assert", {"mmcv": "1.7.2\n"}), ("mmcv-version-assert", {"mmcv": "1.7.2'; import os; '"}),
    ("cxx-standard", {"std": 'c++17"'}), ("cxx-standard", {"std": "c++98"}), ("local-rank", {"x": "1"}),
    ("mmcv-version-assert", {"mmcv": 172}),
])
def test_fixer_arguments_are_validated_wherever_they_come_from(tmp_path, tree, name, args):
    with pytest.raises(ValueError):
        fixers.make(name, args)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"fixers": [{"name": name, "args": args}]}))
    before = (tree / "mmdet" / "__init__.py").read_text(), (tree / "ops" / "setup.py").read_text()
    r = subprocess.run([sys.executable, "-m", "envbuild.cli", "fix", str(tree), "--plan", str(plan)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is not allowed" in r.stderr or "takes no argument" in r.stderr
    assert ((tree / "mmdet" / "__init__.py").read_text(), (tree / "ops" / "setup.py").read_text()) == before
    # the in-image entry point refuses it the same way
    r = subprocess.run([sys.executable, fixers.__file__, "apply", str(tree), "--plan", str(plan)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "cannot use plan" in r.stderr


def test_fix_cli_refuses_an_empty_path_and_a_bad_mmcv(tmp_path, tree):
    r = subprocess.run([sys.executable, "-m", "envbuild.cli", "fix", ""], capture_output=True, text=True, cwd=tree)
    assert r.returncode == 2 and "path is empty" in r.stderr
    r = subprocess.run([sys.executable, "-m", "envbuild.cli", "fix", str(tree), "--mmcv", "1.7.2\n"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--mmcv" in r.stderr and "Traceback" not in r.stderr
    assert "'1.4.0'" in (tree / "mmdet" / "__init__.py").read_text()
    # an sdist fixer that needs a Plan's arguments: not on a model tree, and not in "every fixer"
    r = subprocess.run([sys.executable, "-m", "envbuild.cli", "fix", str(tree), "--only", "flash-attn-head-dims"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not on a model's tree" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "envbuild.cli", "fix", str(tree), "--list"], capture_output=True, text=True)
    assert r.returncode == 0 and "flash-attn-head-dims" not in r.stdout + r.stderr


def test_local_rank_is_linear_on_a_big_file(tmp_path):
    import time
    body = "".join("p%d.add_argument('--local_rank', type=int, default=0)\n" % i for i in range(3000))
    body += "x = " + "(" * 50 + "1" + ")" * 50 + "\n"
    (tmp_path / "big.py").write_text(body * 2)  # ~ 250 KB, 6000 parsers
    start = time.monotonic()
    fixers.apply(str(tmp_path), [fixers.make("local-rank")])
    text = (tmp_path / "big.py").read_text()
    assert text.count("'--local_rank', '--local-rank'") == 6000
    assert time.monotonic() - start < 30  # the quadratic version took minutes here


def test_setup_without_gpu_puts_import_os_where_python_allows_it(tmp_path):
    text = '"""Build the ops."""\nfrom __future__ import annotations\nimport torch\nif torch.cuda.is_available():\n    pass\n'
    (tmp_path / "setup.py").write_text(text)
    fixers.apply(str(tmp_path), [fixers.make("setup-without-gpu")])
    fixed = (tmp_path / "setup.py").read_text()
    compile(fixed, "setup.py", "exec")
    assert fixed.startswith('"""Build the ops."""\nfrom __future__ import annotations\nimport os\n')


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


def _installed(site, dist, version, package, files):
    """A distribution installed into `site` the way pip leaves it: its package folder and a
    dist-info with METADATA and top_level.txt."""
    pkg = site / package
    pkg.mkdir(parents=True)
    for name, text in files.items():
        (pkg / name).write_text(text)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(package + "\n")


def test_fixers_reach_installed_packages_named_by_the_plan_without_importing_them(tmp_path):
    """mmsegmentation 0.14.1 from PyPI asserts mmcv <= 1.4.0 in its own __init__; a port to
    mmcv-full 1.7.1 must relax it in site-packages, found from the metadata (importing it is what fails)."""
    site = tmp_path / "site"
    _installed(site, "mmsegmentation", "0.14.1", "mmseg", {"__init__.py": MMDET_INIT, "version.py": "__version__ = short_version = '0.14.1'\n"})
    _installed(site, "unrelated", "1.0", "unrelated", {"__init__.py": "mmcv_maximum_version = '1.4.0'\n"})
    plan = {"fixers": [{"name": "mmcv-version-assert", "why": "w", "args": {"mmcv": "1.7.1"}, "installed": ["mmsegmentation"]}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    code = ("import sys; sys.path.insert(0, %r); sys.argv[1:] = ['apply-installed', '--plan', %r, '--report', %r];"
            "from envbuild import fixers; raise SystemExit(fixers.main())"
            % (str(site), str(tmp_path / "plan.json"), str(tmp_path / "report.json")))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "mmcv_maximum_version = '1.7.1'" in (site / "mmseg" / "__init__.py").read_text()
    assert (site / "unrelated" / "__init__.py").read_text() == "mmcv_maximum_version = '1.4.0'\n"  # not named: untouched
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fixers"][0]["files"] == [str(site / "mmseg" / "__init__.py")]
    # a package the Plan names but the image lacks is an error, not a silent pass
    plan["fixers"][0]["installed"] = ["mmdet"]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1 and "mmdet: not installed" in r.stderr


def test_the_plan_names_installed_packages_that_assert_the_mmcv_range():
    from envbuild import catalog
    from envbuild.resolve import resolve
    plan = resolve(catalog.load(), "maptr", "h20")
    fx = next(f for f in plan.fixers if f.name == "mmcv-version-assert")
    assert fx.installed == ("mmdet", "mmsegmentation")  # mmdet3d is vendored: the tree pass fixes it


def test_the_build_runs_the_installed_pass_only_where_the_plan_names_installed_packages(tmp_path):
    """maptr on H20 relaxes mmdet's and mmseg's asserts in site-packages: its Dockerfile runs
    apply-installed after the tree pass and says for which; qcnet on A800 names none: no such step."""
    for model, card, wanted in (("maptr", "h20", True), ("qcnet", "a800", False)):
        r = subprocess.run([sys.executable, "-m", "envbuild.cli", "render", model, "--card", card, "-o", tmp_path / model],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        dockerfile = (tmp_path / model / "Dockerfile").read_text()
        step = "fixers.py apply-installed --plan /opt/envbuild/plan.json"
        assert (step in dockerfile) is wanted, model
        if wanted:
            assert "installed packages whose own code the port breaks (mmdet, mmsegmentation)" in dockerfile
            assert dockerfile.index("fixers.py apply /workspace/model") < dockerfile.index(step)


def test_fix_list_reports_each_finding_and_changes_nothing(tmp_path):
    """`envbuild fix --list PATH`: path:line: fixer: why, one per finding, then "nothing changed";
    the tree is byte for byte what it was. Without --list the same finding is fixed."""
    tree = tmp_path / "model"
    (tree / "tools").mkdir(parents=True)
    script = tree / "tools" / "train.py"
    script.write_text('import argparse\np = argparse.ArgumentParser()\np.add_argument("--local_rank", type=int, default=0)\n'
                      "args = p.parse_args()\n")
    before = script.read_bytes()
    cli = lambda *a: subprocess.run([sys.executable, "-m", "envbuild.cli", "fix", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=120, cwd=ROOT)
    r = cli("--list", tree)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:2] == ["tools/train.py:3: local-rank: torch >= 2.0 launch passes --local-rank; accept it "
                                         "beside --local_rank (LOCAL_RANK env kept)  [only a port from torch < 2.0 to "
                                         ">= 2.0 of a model launched by torch.distributed.launch with --local_rank]",
                                         "1 finding(s); nothing changed"]
    assert script.read_bytes() == before and sorted(p.name for p in tree.rglob("*")) == ["tools", "train.py"]
    r = cli(tree)
    assert r.returncode == 0 and script.read_bytes() != before and "--local-rank" in script.read_text()


# ---------------------------------------------------------------- collections-abc (Python 3.10 removed the aliases)

OLD_COLLECTIONS = '''"""Stand-in for an old package's metrics module (written for this test)."""
from collections import OrderedDict, Iterable as It  # both used below
import collections
from collections import (
    Mapping,
    defaultdict,
)


def flat(x):
    if isinstance(x, It) and issubclass(list, collections.Iterable):
        return list(x)
    return [x]


note = "collections.Mapping in a string stays"
assert isinstance({}, Mapping) and isinstance({}, collections.Mapping)
print(flat((1, 2)), list(OrderedDict(a=1)), defaultdict(int)["k"], note)
'''


def test_collections_abc_fixed_code_runs_where_collections_has_no_abcs(tmp_path):
    """This Python (>= 3.10) has no collections.Iterable: the unfixed stand-in fails to import,
    the fixed one runs, with OrderedDict/defaultdict still from collections and the string kept."""
    assert sys.version_info >= (3, 10)
    (tmp_path / "orig.py").write_text(OLD_COLLECTIONS)
    r = subprocess.run([sys.executable, str(tmp_path / "orig.py")], capture_output=True, text=True)
    assert r.returncode != 0 and "cannot import name 'Iterable' from 'collections'" in r.stderr
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "metrics.py").write_text(OLD_COLLECTIONS)
    report = fixers.apply(str(tmp_path / "pkg"), [fixers.make("collections-abc")])
    assert report == {"collections-abc": ["metrics.py"]}
    fixed = (tmp_path / "pkg" / "metrics.py").read_text()
    r = subprocess.run([sys.executable, str(tmp_path / "pkg" / "metrics.py")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[1, 2] ['a'] 0 collections.Mapping in a string stays"
    assert "from collections import OrderedDict\nfrom collections.abc import Iterable as It  # both used below\n" in fixed
    assert "import collections\nimport collections.abc\n" in fixed and "collections.abc.Iterable)" in fixed
    assert "from collections import defaultdict\nfrom collections.abc import Mapping\n" in fixed
    # idempotent; a statement sharing its line with other code is left as it is
    (tmp_path / "pkg" / "shared.py").write_text("x = 1; from collections import Iterable\n")
    fixers.apply(str(tmp_path / "pkg"), [fixers.make("collections-abc")])
    assert (tmp_path / "pkg" / "metrics.py").read_text() == fixed
    assert (tmp_path / "pkg" / "shared.py").read_text() == "x = 1; from collections import Iterable\n"


def test_the_plan_fixes_motmetrics_in_the_venv_on_a_port_to_python_3_10_or_later():
    """SparseDrive pins motmetrics 1.1.3 (the last that nuScenes' tracking eval accepts), whose
    metrics.py takes Iterable from collections: its Python 3.11 port names the fixer for the
    installed package; on its own Python 3.8 there is nothing to fix."""
    from envbuild import catalog
    from envbuild.resolve import resolve
    cat = catalog.load()
    plan = resolve(cat, "sparsedrive", "a800", python="3.11", cuda="11.8")
    fx = next(f for f in plan.fixers if f.name == "collections-abc")
    assert fx.installed == ("motmetrics",) and "motmetrics 1.1.3" in fx.why and "3.11" in fx.why
    assert not [f for f in resolve(cat, "sparsedrive", "a800").fixers if f.name == "collections-abc"]


# ---------------------------------------------------------------- line endings, encodings, files it cannot read or write

ODD_SEPARATORS = ["\f", "\v", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]  # str.splitlines splits here, Python not


def test_lines_are_split_where_python_splits_them():
    text = "a = 1  # \f\v\x1c\x1d\x1e\x85\u2028\u2029 end\r\nb = 's\u2028t'\rc = 3\nd = 4"
    assert fixers._lines(text) == ["a = 1  # \f\v\x1c\x1d\x1e\x85\u2028\u2029 end\r\n", "b = 's\u2028t'\r", "c = 3\n", "d = 4"]
    assert [n.lineno for n in ast.parse(text).body] == [1, 2, 3, 4]
    assert len(text.splitlines()) == 13  # what the fixers used to count with


@pytest.mark.parametrize("sep", ODD_SEPARATORS)
def test_a_separator_python_does_not_split_at_cannot_move_an_edit_to_another_line(tmp_path, sep):
    """`import os / form feed / x = 1 / from collections import Iterable` once had `x = 1` replaced by
    the new import, and a --local_rank script got `p = argparse.ArgumentParser(), '--local-rank'`."""
    files = {"m.py": (f"import os\n\f\ns = 'a{sep}b'  # c{sep}d\nx = 1\nfrom collections import Iterable\n",
                      f"import os\n\f\ns = 'a{sep}b'  # c{sep}d\nx = 1\nfrom collections.abc import Iterable\n"),
             "t.py": (f"import argparse  # {sep}\np = argparse.ArgumentParser()\np.add_argument('--local_rank', type=int)\n",
                      f"import argparse  # {sep}\np = argparse.ArgumentParser()\n"
                      "p.add_argument('--local_rank', '--local-rank', type=int)\n")}
    for name, (before, _) in files.items():
        (tmp_path / name).write_text(before, newline="")
    chosen = [fixers.make("collections-abc"), fixers.make("local-rank")]
    assert [(f.path, f.line) for f in fixers.detect(str(tmp_path), chosen)] == [("m.py", 5), ("t.py", 3)]
    for _ in range(2):  # and a rerun changes nothing
        fixers.apply(str(tmp_path), chosen)
        for name, (_, after) in files.items():
            assert (tmp_path / name).read_bytes() == after.encode(), name


def test_crlf_and_cr_files_keep_their_line_endings(tmp_path):
    """No fixer writes a LF line into a CRLF (or old-Mac CR) file: an inserted line takes the file's ending."""
    sources = {
        "n.py": "import numba\nfrom numba.errors import NumbaWarning  # kept\nx = numba.errors.TypingError\n",
        "c.py": '"""Doc."""\nimport collections\nfrom collections import OrderedDict, Mapping\ny = collections.Iterable\n',
        "setup.py": '"""Build."""\nimport torch\nif torch.cuda.is_available():\n    pass\n',
        "op.cu": "#include <torch/extension.h>\n#include <THC/THC.h>\nint n = THCCeilDiv(a, b);\nvoid* p = THCudaMalloc(state, 8);\n",
        "t.py": TRAIN,
    }
    chosen = [fixers.make(n) for n in ("numba-errors", "collections-abc", "setup-without-gpu", "thc-to-aten", "local-rank")]
    for nl in ("\r\n", "\r"):
        root = tmp_path / repr(nl).strip("'\\")
        root.mkdir()
        for name, text in sources.items():
            (root / name).write_bytes(text.replace("\n", nl).encode())
        report = fixers.apply(str(root), chosen)
        assert sorted(f for files in report.values() for f in files) == sorted(sources)
        for name in sources:
            data = (root / name).read_bytes()
            assert data != sources[name].replace("\n", nl).encode(), name
            if nl == "\r\n":
                assert data.count(b"\n") == data.count(b"\r\n"), (name, data)
            else:
                assert b"\n" not in data, (name, data)
            if name.endswith(".py"):
                compile(data, name, "exec")
        assert b"import os" + nl.encode() in (root / "setup.py").read_bytes()
        assert (b"#include <ATen/ceil_div.h>" + nl.encode()) in (root / "op.cu").read_bytes()
        once = {name: (root / name).read_bytes() for name in sources}
        fixers.apply(str(root), chosen)
        assert {name: (root / name).read_bytes() for name in sources} == once


def test_a_bom_hides_nothing_from_a_fixer_and_is_kept(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "t.py").write_bytes(bom + b"import argparse\np = argparse.ArgumentParser()\np.add_argument('--local_rank')\n")
    (tmp_path / "op.cu").write_bytes(bom + b"#include <THC/THC.h>\n")
    report = fixers.apply(str(tmp_path), [fixers.make("local-rank"), fixers.make("thc-to-aten")])
    assert report == {"local-rank": ["t.py"], "thc-to-aten": ["op.cu"]}
    assert (tmp_path / "t.py").read_bytes() == bom + (b"import argparse\np = argparse.ArgumentParser()\n"
                                                      b"p.add_argument('--local_rank', '--local-rank')\n")
    assert (tmp_path / "op.cu").read_bytes() == bom + b"#include <ATen/cuda/CUDAContext.h>\n"


def test_a_declared_coding_is_read_and_written_back_in_it(tmp_path):
    text = "# -*- coding: latin-1 -*-\nname = 'caf\xe9'\nfrom collections import Iterable\n"
    (tmp_path / "m.py").write_bytes(text.encode("latin-1"))
    report = fixers.apply(str(tmp_path), [fixers.make("collections-abc")])
    assert report == {"collections-abc": ["m.py"]} and not report.problems
    assert (tmp_path / "m.py").read_bytes() == text.replace("collections import", "collections.abc import").encode("latin-1")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "envbuild.cli", "fix", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_files_the_fixers_cannot_read_or_write_are_named_not_skipped(tmp_path):
    """A file not in UTF-8 (nor its declared coding) is reported as unreadable; a read-only file
    that needs a fix is left as it is (mode and text) and reported; the others are fixed."""
    tree = tmp_path / "model"
    tree.mkdir()
    old = "from collections import Iterable\n"
    (tree / "latin.py").write_bytes(b"s = 'caf\xe9'\n" + old.encode())
    (tree / "op.cu").write_bytes(b"// caf\xe9\n#include <THC/THC.h>\n")
    ro = tree / "ro.py"
    ro.write_text(old)
    ro.chmod(0o444)
    ok = tree / "ok.py"
    ok.write_text(old)
    found = fixers.detect(str(tree), [fixers.make("collections-abc"), fixers.make("thc-to-aten")])
    assert sorted((f.path, f.fixer) for f in found) == [("ok.py", "collections-abc"), ("ro.py", "collections-abc")]
    assert [(p, what) for p, what, _ in found.problems] == [("latin.py", "could not read"), ("op.cu", "could not read")]
    report = fixers.apply(str(tree), [fixers.make("collections-abc")])
    assert report == {"collections-abc": ["ok.py"]} and ok.read_text() == "from collections.abc import Iterable\n"
    assert [(p, what, why.split(":")[0]) for p, what, why in report.problems] == [
        ("latin.py", "could not read", "not UTF-8 text, nor in a coding it declares"),
        ("ro.py", "could not write", "read-only (mode 444)")]
    assert ro.read_text() == old and ro.stat().st_mode & 0o777 == 0o444
    # the CLI prints them; a fix it could not write is a failure
    ok.write_text(old)
    r = _cli(tree, "--only", "collections-abc")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "could not read latin.py: not UTF-8 text" in r.stdout and "could not write ro.py: read-only (mode 444)" in r.stdout
    assert r.stderr.startswith("error: a file that needs a fix could not be written") and "hint: " in r.stderr
    r = _cli(tree, "--list", "--only", "collections-abc")
    assert r.returncode == 0 and "could not read latin.py: not UTF-8 text" in r.stdout
    # and so does the in-image entry point, in its report too
    plan, out = tmp_path / "plan.json", tmp_path / "fixes.json"
    plan.write_text('{"fixers": [{"name": "collections-abc", "args": {}}]}')
    r = subprocess.run([sys.executable, fixers.__file__, "apply", str(tree), "--plan", str(plan), "--report", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "could not write ro.py: read-only (mode 444)" in r.stderr
    assert [(p["path"], p["problem"]) for p in json.loads(out.read_text())["problems"]] == [
        ("latin.py", "could not read"), ("ro.py", "could not write")]


def test_a_file_it_may_not_read_is_named(tmp_path):
    """Mode 000 stops everyone but root: as root (CI), the in-image entry point runs as nobody,
    in a folder nobody may enter and write, so the test runs everywhere instead of skipping."""
    import tempfile
    tree = Path(tempfile.mkdtemp(prefix="envbuild-unreadable-"))
    try:
        tree.chmod(0o777)
        (tree / "a.py").write_text("from collections import Iterable\n")
        (tree / "a.py").chmod(0)
        (tree / "plan.json").write_text('{"fixers": [{"name": "collections-abc", "args": {}}]}')
        (tree / "plan.json").chmod(0o644)
        shutil.copy(fixers.__file__, tree / "fixers.py")  # where nobody reads it; and the OS's Python
        python = sys.executable if os.geteuid() else "/usr/bin/python3"
        r = subprocess.run([python, str(tree / "fixers.py"), "apply", str(tree), "--plan", str(tree / "plan.json"),
                            "--report", str(tree / "fixes.json")], capture_output=True, text=True, timeout=60,
                           user=65534 if os.geteuid() == 0 else None, cwd="/")
        report = json.loads((tree / "fixes.json").read_text())
        assert [(p["path"], p["problem"]) for p in report["problems"]] == [("a.py", "could not read")], r.stderr
        assert (tree / "a.py").stat().st_mode & 0o777 == 0  # left as it was
    finally:
        (tree / "a.py").chmod(0o644)
        shutil.rmtree(tree)


# ---------------------------------------------------------------- property: only the intended tokens change

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_ODD = st.sampled_from(ODD_SEPARATORS)
_WORD = st.text(st.sampled_from(ODD_SEPARATORS + ["a", "Z", " ", "\t", "é", "字", "#", "(", ")", "'"]), max_size=8)
# what the three fixers aim at, each on its own line, and what it must become
_TARGETS = [("from collections import Iterable", "from collections.abc import Iterable"),
            ("p.add_argument('--local_rank', type=int)", "p.add_argument('--local_rank', '--local-rank', type=int)"),
            ("e = {'cxx': ['-O3', '-std=c++14'], 'nvcc': ('-std=c++14',)}", "e = {'cxx': ['-O3'], 'nvcc': ()}")]


@st.composite
def _filler(draw):
    """A line of code around the targets, full of separators Python does not split at."""
    word = draw(_WORD)
    kind = draw(st.sampled_from(["comment", "string", "formfeed", "code", "triple", "empty"]))
    if kind == "comment":
        return "# " + word
    if kind == "string":
        return "s = '%s'  # %s" % (word.replace("'", ""), word)
    if kind == "formfeed":
        return "\f" + draw(st.sampled_from(["", "z = 1", "# " + word]))
    if kind == "code":
        return "v = [1,\f 2]  # " + word  # a form feed is a blank inside a line
    if kind == "triple":
        return 'd = """%s%s%s"""' % (word.replace('"', ""), draw(st.sampled_from(["\n", "\r\n", "\r"])), draw(_ODD))
    return ""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.lists(_filler(), max_size=6), after=st.lists(_filler(), max_size=6),
       between=st.lists(_filler(), max_size=3), order=st.permutations(range(len(_TARGETS))),
       endings=st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=20, max_size=20),
       last_ending=st.booleans(), bom=st.booleans())
def test_fixers_change_only_their_tokens_whatever_the_separators(before, after, between, order, endings, last_ending, bom):
    """Sources mixing every Unicode line separator with LF, CRLF and CR line endings, the targets
    after them: the fixed file is the same bytes but for the targets' tokens; twice is once; it parses."""
    import tempfile
    lines_old, lines_new = list(before), list(before)
    for i in order:
        lines_old += [_TARGETS[i][0]] + between
        lines_new += [_TARGETS[i][1]] + between
    lines_old += after
    lines_new += after
    ends = [endings[i % len(endings)] for i in range(len(lines_old))]
    if not last_ending:
        ends[-1] = ""
    old = "".join(line + end for line, end in zip(lines_old, ends))
    new = "".join(line + end for line, end in zip(lines_new, ends))
    assert ast.dump(ast.parse(old)) != ast.dump(ast.parse(new))
    head = b"\xef\xbb\xbf" if bom else b""
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "setup.py")
        with open(path, "wb") as fh:
            fh.write(head + old.encode())
        chosen = [fixers.make(n) for n in ("collections-abc", "local-rank", "cxx-standard", "setup-without-gpu",
                                           "numba-errors", "mmcv-layer-clash")]
        report = fixers.apply(root, chosen)
        with open(path, "rb") as fh:
            got = fh.read()
        assert got == head + new.encode()
        assert not report.problems
        assert fixers.apply(root, chosen) == {fx.name: [] for fx in chosen}
        with open(path, "rb") as fh:
            assert fh.read() == got
    compile(head + new.encode(), "setup.py", "exec")


# ---------------------------------------------------------------- mmcv-parallel (torch 2.1 changed nn.parallel's internals)

# A stand-in torch with torch 2.1's internals: _get_stream takes a device, DDP has no replicated flag.
STANDIN_TORCH = {
    "torch/__init__.py": "class device(object):\n"
                         "    def __init__(self, type, index=None):\n"
                         "        self.type, self.index = type, index\n",
    "torch/nn/__init__.py": "",
    "torch/nn/parallel/__init__.py": "class DistributedDataParallel(object):\n"
                                     "    def __init__(self, module):\n"
                                     "        self.module = module\n",
    "torch/nn/parallel/_functions.py": "def _get_stream(device):\n"
                                       "    return 'stream on %s:%s' % (device.type, device.index)\n",
}
# Stand-ins for an old wrapper package's two files (written for this test), and a caller.
OLD_FUNCTIONS = '''import torch
from torch.nn.parallel._functions import _get_stream as get_stream


def streams_for(gpus):
    return [get_stream(gpu) for gpu in gpus]


def already(gpu):
    return get_stream(torch.device("cuda", gpu))
'''
OLD_DISTRIBUTED = '''from torch.nn.parallel import DistributedDataParallel


class Wrapper(DistributedDataParallel):
    def run(self, x):
        module = self._replicated_tensor_module if \\
            self._use_replicated_tensor_module else self.module
        return module(x)
'''
CALLER = '''from wrappers.parallel._functions import streams_for, already
from wrappers.parallel.distributed import Wrapper
print(streams_for([0, 1]), already(2), Wrapper(lambda x: x + 1).run(1))
'''


def _standin(root, files):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_mmcv_parallel_fixed_wrappers_run_on_torch_2_1s_internals(tmp_path):
    """Unfixed, the wrappers fail against torch >= 2.1's nn.parallel (an int has no .type; DDP has
    no _use_replicated_tensor_module); fixed, they run, and a call that already passes a device
    is left as it is. Idempotent; other files are not touched."""
    _standin(tmp_path, {**STANDIN_TORCH, "wrappers/__init__.py": "", "wrappers/parallel/__init__.py": "",
                        "wrappers/parallel/_functions.py": OLD_FUNCTIONS,
                        "wrappers/parallel/distributed.py": OLD_DISTRIBUTED,
                        "wrappers/other/_functions.py": OLD_FUNCTIONS, "caller.py": CALLER})
    run = lambda: subprocess.run([sys.executable, "caller.py"], cwd=tmp_path, capture_output=True, text=True)
    r = run()
    assert r.returncode != 0 and "AttributeError" in r.stderr and "'int' object has no attribute 'type'" in r.stderr
    report = fixers.apply(str(tmp_path / "wrappers"), [fixers.make("mmcv-parallel")])
    assert report == {"mmcv-parallel": ["parallel/_functions.py", "parallel/distributed.py"]}
    r = run()
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['stream on cuda:0', 'stream on cuda:1'] stream on cuda:2 2"
    fixed = (tmp_path / "wrappers/parallel/_functions.py").read_text()
    assert "get_stream(torch.device('cuda', gpu)) for gpu" in fixed and 'get_stream(torch.device("cuda", gpu))' in fixed
    assert "getattr(self, '_use_replicated_tensor_module', False)" in (tmp_path / "wrappers/parallel/distributed.py").read_text()
    assert (tmp_path / "wrappers/other/_functions.py").read_text() == OLD_FUNCTIONS  # not mmcv's parallel package
    assert fixers.apply(str(tmp_path / "wrappers"), [fixers.make("mmcv-parallel")]) == {"mmcv-parallel": []}


def test_mmcv_parallel_leaves_a_module_without_torch_or_the_torch_import_alone():
    fx = fixers.make("mmcv-parallel")
    no_torch = OLD_FUNCTIONS.replace("import torch\n", "")
    assert fx.fix_text("parallel/_functions.py", no_torch) == no_torch  # torch.device would not resolve
    own = OLD_FUNCTIONS.replace("from torch.nn.parallel._functions import _get_stream as get_stream",
                                "from .streams import get_stream")
    assert fx.fix_text("parallel/_functions.py", own) == own  # not torch's _get_stream


def test_the_plan_fixes_mmcv_full_in_the_venv_on_a_port_to_torch_2_1_or_later():
    """MapTR on the B200 is ported to a torch >= 2.1 with mmcv-full 1.7.2: the installed mmcv-full
    is fixed. On the A800 (torch 2.0.1) its wrappers still match torch: nothing to fix."""
    from envbuild import catalog
    from envbuild.resolve import resolve
    cat = catalog.load()
    plan = resolve(cat, "maptr", "b200", python="3.11")
    fx = next(f for f in plan.fixers if f.name == "mmcv-parallel")
    assert fx.installed == ("mmcv-full",) and "mmcv-full 1.7.2" in fx.why and "1.9.1" in fx.why
    assert not [f for f in resolve(cat, "maptr", "a800", python="3.11").fixers
                if f.name == "mmcv-parallel"]


# ---------------------------------------------------------------- flash-attn-unpad-input (flash-attn 2.7's five values)

UNPAD_MODULE = '''import torch
from flash_attn.bert_padding import unpad_input, pad_input


def attend(x, mask, h):
    x_unpad, indices, cu_seqlens, max_s = unpad_input(x, mask)  # four, as 2.0-2.6 returned
    return x_unpad.view(-1, h), indices, cu_seqlens, max_s
'''


def _run_with_unpad_returning(source, values):
    """Run the module's attend() with a stand-in flash_attn.bert_padding whose unpad_input returns
    `values` items (the first one a tensor-like with .view)."""
    import types

    class Unpadded:
        def view(self, *shape):
            return shape
    fake = types.ModuleType("flash_attn.bert_padding")
    fake.unpad_input = lambda x, mask: (Unpadded(),) + tuple(range(1, values))
    fake.pad_input = None
    pkg = types.ModuleType("flash_attn")
    pkg.bert_padding = fake
    saved = {k: sys.modules.get(k) for k in ("flash_attn", "flash_attn.bert_padding", "torch")}
    sys.modules.update({"flash_attn": pkg, "flash_attn.bert_padding": fake, "torch": types.ModuleType("torch")})
    try:
        scope = {}
        exec(compile(source, "attention.py", "exec"), scope)
        return scope["attend"](None, None, 8)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_flash_attn_unpad_input_keeps_four_values_so_code_runs_on_2_7_and_before():
    """SparseDrive's FlashAttention (and DiffusionDrive's copy) unpacks four values from unpad_input;
    flash-attn 2.7.4.post1, the release a port to B200 takes, returns five: ValueError at the first
    forward. The fixed call keeps four and runs with either release's return."""
    fx = fixers.make("flash-attn-unpad-input")
    with pytest.raises(ValueError, match="too many values to unpack"):
        _run_with_unpad_returning(UNPAD_MODULE, 5)
    fixed = fx.fixed("models/attention.py", UNPAD_MODULE)
    assert "= unpad_input(x, mask)[:4]  # four, as" in fixed
    assert _run_with_unpad_returning(fixed, 5) == ((-1, 8), 1, 2, 3)
    assert _run_with_unpad_returning(fixed, 4) == ((-1, 8), 1, 2, 3)
    assert fx.fixed("models/attention.py", fixed) == fixed  # idempotent
    # the same unpacking through a name first: it runs after the fix as well
    through = UNPAD_MODULE.replace("x_unpad, indices, cu_seqlens, max_s = unpad_input(x, mask)",
                                   "out = unpad_input(x, mask)\n    x_unpad, indices, cu_seqlens, max_s = out")
    with pytest.raises(ValueError, match="too many values to unpack"):
        _run_with_unpad_returning(through, 5)
    assert _run_with_unpad_returning(fx.fixed("models/attention.py", through), 5) == ((-1, 8), 1, 2, 3)


@pytest.mark.parametrize("source, expected", [
    # an alias, a module import, a multi-line parenthesized call, a list target
    ("from flash_attn.bert_padding import unpad_input as unpad\na, b, c, d = unpad(x, m)\n",
     "from flash_attn.bert_padding import unpad_input as unpad\na, b, c, d = unpad(x, m)[:4]\n"),
    ("import flash_attn.bert_padding as bp\n(a, b, c, d) = (bp.unpad_input(\n    x,\n    m,\n))\n",
     "import flash_attn.bert_padding as bp\n(a, b, c, d) = (bp.unpad_input(\n    x,\n    m,\n)[:4])\n"),
    ("from flash_attn import bert_padding\n[a, b, c, d] = bert_padding.unpad_input(x, m)\n",
     "from flash_attn import bert_padding\n[a, b, c, d] = bert_padding.unpad_input(x, m)[:4]\n"),
    ("import flash_attn as fa\na, b, c, d = fa.bert_padding.unpad_input(x, m)\n",
     "import flash_attn as fa\na, b, c, d = fa.bert_padding.unpad_input(x, m)[:4]\n"),
    ("from flash_attn.bert_padding import *\na, b, c, d = unpad_input(x, m)\n",
     "from flash_attn.bert_padding import *\na, b, c, d = unpad_input(x, m)[:4]\n"),
    # through a name assigned once in its function and unpacked into four there
    ("from flash_attn.bert_padding import unpad_input\ndef f(x, m):\n    out = unpad_input(x, m)\n"
     "    a, b, c, d = out\n    return a\n",
     "from flash_attn.bert_padding import unpad_input\ndef f(x, m):\n    out = unpad_input(x, m)[:4]\n"
     "    a, b, c, d = out\n    return a\n"),
    # left alone: that name assigned twice in the function, or unpacked only in another function (its own
    # `out`), or into five
    ("from flash_attn.bert_padding import unpad_input\ndef f(x, m):\n    out = unpad_input(x, m)\n"
     "    out = out if m is None else out\n    a, b, c, d = out\n", None),
    ("from flash_attn.bert_padding import unpad_input\nout = unpad_input(x, m)\n"
     "def g(out):\n    a, b, c, d = out\n", None),
    ("from flash_attn.bert_padding import unpad_input\ndef f(x, m):\n    out = unpad_input(x, m)\n"
     "    a, b, c, d, e = out\n", None),
    # left alone: five names (written for 2.7), a starred or a single name, another module's unpad_input,
    # a module that binds unpad_input itself too (its own def may return an iterator), flash_attn_2_cuda
    ("from flash_attn.bert_padding import unpad_input\na, b, c, d, e = unpad_input(x, m)\n", None),
    ("from flash_attn.bert_padding import unpad_input\na, *rest = unpad_input(x, m)\nout = unpad_input(x, m)\n", None),
    ("from flash_attn import flash_attn_func\nfrom .padding import unpad_input\na, b, c, d = unpad_input(x, m)\n", None),
    ("from flash_attn.bert_padding import unpad_input\ndef unpad_input(x, m):\n    return iter((1, 2, 3, 4))\n"
     "a, b, c, d = unpad_input(x, m)\n", None),
    ("import flash_attn_2_cuda\nfrom .bert_padding import unpad_input\na, b, c, d = flash_attn.bert_padding.unpad_input(x, m)\n", None),
])
def test_flash_attn_unpad_input_touches_only_four_name_unpacking_of_flash_attns_function(source, expected):
    fx = fixers.make("flash-attn-unpad-input")
    assert fx.fixed("m.py", source) == (expected or source)


def test_the_plan_fixes_unpad_input_only_where_its_flash_attn_returns_five():
    """SparseDrive pins flash-attn 2.3.2: on the A800 it keeps it; for the B200 it takes 2.7.4.post1."""
    from envbuild import catalog
    from envbuild.resolve import resolve
    cat = catalog.load()
    fx = [f for f in resolve(cat, "sparsedrive", "b200", python="3.11").fixers if f.name == "flash-attn-unpad-input"]
    assert len(fx) == 1 and "2.7.4.post1" in fx[0].why and "upstream's 2.3.2" in fx[0].why
    assert not [f for f in resolve(cat, "sparsedrive", "a800", python="3.11").fixers if f.name == "flash-attn-unpad-input"]


# ---------------------------------------------------------------- flash-attn-head-dims (--trim-kernels)
# A small flash-attn-like sdist written for these tests: the shapes of 2.3.2 (no namespace, a
# two-argument template) and 2.7 (FLASH_NAMESPACE, Is_causal), one file per head dim and kind.

def _flash_sdist(root, dims=(32, 64, 96), namespace=True):
    src = root / "csrc" / "flash_attn" / "src"
    src.mkdir(parents=True)
    ns_open, ns_close = ("namespace FLASH_NAMESPACE {\n", "}\n") if namespace else ("", "")
    targs = (lambda t, d: f"{t}, {d}, false") if namespace else (lambda t, d: f"{t}, {d}")
    listed = []
    for d in dims:
        for t, dt in (("cutlass::half_t", "fp16"), ("cutlass::bfloat16_t", "bf16")):
            fwd, split = f"flash_fwd_hdim{d}_{dt}_sm80.cu", f"flash_fwd_split_hdim{d}_{dt}_sm80.cu"
            (src / fwd).write_text(f'#include "flash_fwd_launch_template.h"\n{ns_open}template<>\n'
                                   f"void run_mha_fwd_<{targs(t, d)}>(Flash_fwd_params &params, cudaStream_t stream) {{\n"
                                   f"    run_mha_fwd_hdim{d}<{t}>(params, stream);\n}}\n{ns_close}")
            (src / split).write_text(f'#include "flash_fwd_launch_template.h"\n{ns_open}template void '
                                     f"run_mha_fwd_splitkv_dispatch<{targs(t, d)}>(Flash_fwd_params &params, "
                                     f"cudaStream_t stream);\n{ns_close}")
            listed += [fwd, split]
    entries = "".join(f'                "csrc/flash_attn/src/{f}",\n' for f in listed)
    (root / "setup.py").write_text(
        "from setuptools import setup\nsources = [\n"
        '                "csrc/flash_attn/flash_api.cpp",\n' + entries + "]\nsetup(name='flash_attn', sources=sources)\n")
    (root / "csrc" / "flash_attn" / "flash_api.cpp").write_text(
        '#include <torch/python.h>\n#include "flash.h"\n\n' + ns_open
        + "void run(Flash_fwd_params &params) {\n    TORCH_CHECK(params.d > 0, \"d\");\n}\n" + ns_close)
    return listed


def test_flash_attn_head_dims_keeps_the_models_kernels_and_stands_in_for_the_rest(tmp_path):
    """setup.py compiles only the kept dims' files; each dropped kernel gets a definition with its
    exact signature, in its namespace, that raises: the module links, and another dim says why."""
    listed = _flash_sdist(tmp_path)
    report = fixers.apply(str(tmp_path), [fixers.make("flash-attn-head-dims", {"dims": "32+64"})])
    assert sorted(report["flash-attn-head-dims"]) == ["csrc/flash_attn/flash_api.cpp", "setup.py"]
    setup = (tmp_path / "setup.py").read_text()
    assert all((f in setup) == ("hdim96" not in f) for f in listed)
    ast.parse(setup)
    api = (tmp_path / "csrc" / "flash_attn" / "flash_api.cpp").read_text()
    stubs = [line for line in api.splitlines() if line.startswith("template<> void run_mha")]
    assert stubs == [
        "template<> void run_mha_fwd_<cutlass::half_t, 96, false>(Flash_fwd_params &params, cudaStream_t stream) "
        "{ envbuild_head_dim_not_compiled(96); }",
        "template<> void run_mha_fwd_splitkv_dispatch<cutlass::half_t, 96, false>(Flash_fwd_params &params, "
        "cudaStream_t stream) { envbuild_head_dim_not_compiled(96); }",
        "template<> void run_mha_fwd_<cutlass::bfloat16_t, 96, false>(Flash_fwd_params &params, cudaStream_t stream) "
        "{ envbuild_head_dim_not_compiled(96); }",
        "template<> void run_mha_fwd_splitkv_dispatch<cutlass::bfloat16_t, 96, false>(Flash_fwd_params &params, "
        "cudaStream_t stream) { envbuild_head_dim_not_compiled(96); }"]
    # the stand-ins come after the includes (before any use) and inside the kernels' namespace
    assert api.index('#include "flash.h"') < api.index("namespace FLASH_NAMESPACE {") < api.index(stubs[0]) \
        < api.index("void run(Flash_fwd_params")
    assert "head dims 32, 64 only" in api
    # again: nothing left to do
    assert fixers.apply(str(tmp_path), [fixers.make("flash-attn-head-dims", {"dims": "32+64"})])[
        "flash-attn-head-dims"] == []


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")
def test_flash_attn_head_dims_stand_ins_compile_and_raise_for_a_dropped_head_dim(tmp_path):
    """The fixed flash_api.cpp compiles against declarations shaped like flash-attn's (flash.h's
    templates, cutlass's types, TORCH_CHECK), links with the kept kernels alone, and a dropped dim's
    call throws the error that names it."""
    _flash_sdist(tmp_path, namespace=False)
    fixers.apply(str(tmp_path), [fixers.make("flash-attn-head-dims", {"dims": "64"})])
    inc = tmp_path / "inc"
    (inc / "torch").mkdir(parents=True)
    (inc / "torch" / "python.h").write_text(
        "#pragma once\n#include <stdexcept>\n#include <sstream>\n"
        "template<typename... A> std::string envbuild_cat(A... a) { std::ostringstream o; (o << ... << a); return o.str(); }\n"
        "#define TORCH_CHECK(c, ...) do { if (!(c)) throw std::runtime_error(envbuild_cat(__VA_ARGS__)); } while (0)\n")
    (inc / "flash.h").write_text(
        "#pragma once\nnamespace cutlass { struct half_t {}; struct bfloat16_t {}; }\ntypedef void *cudaStream_t;\n"
        "struct Flash_fwd_params { int d; };\n"
        "template<typename T, int D> void run_mha_fwd_(Flash_fwd_params &params, cudaStream_t stream);\n"
        "template<typename T, int D> void run_mha_fwd_splitkv_dispatch(Flash_fwd_params &params, cudaStream_t stream);\n")
    kept = tmp_path / "kept.cpp"  # the kernels setup.py still compiles, as definitions that return
    kept.write_text('#include "flash.h"\n' + "".join(
        f"template<> void run_mha_fwd_<cutlass::{t}, 64>(Flash_fwd_params &, cudaStream_t) {{}}\n"
        f"template<> void run_mha_fwd_splitkv_dispatch<cutlass::{t}, 64>(Flash_fwd_params &, cudaStream_t) {{}}\n"
        for t in ("half_t", "bfloat16_t")))
    main = tmp_path / "main.cpp"
    main.write_text('#include <cstdio>\n#include <stdexcept>\n#include "flash.h"\nint main() {\n'
                    "    Flash_fwd_params p{64};\n    run_mha_fwd_<cutlass::half_t, 64>(p, nullptr);\n"
                    "    for (int i = 0; i < 2; i++) try {\n"
                    "        if (i) run_mha_fwd_<cutlass::bfloat16_t, 96>(p, nullptr);\n"
                    "        else run_mha_fwd_splitkv_dispatch<cutlass::half_t, 32>(p, nullptr);\n"
                    '    } catch (const std::runtime_error &e) { std::printf("%s\\n", e.what()); }\n}\n')
    exe = tmp_path / "a.out"
    subprocess.run(["g++", "-std=c++17", "-I", str(inc), str(tmp_path / "csrc" / "flash_attn" / "flash_api.cpp"),
                    str(kept), str(main), "-o", str(exe)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert [line.split("; ")[1] for line in out] == [
        "head dim 32 needs a build without the flash-attn-head-dims fixer",
        "head dim 96 needs a build without the flash-attn-head-dims fixer"]
    assert all("compiled by envbuild for head dims 64 only" in line for line in out)


def test_flash_attn_head_dims_refuses_what_it_cannot_do_and_changes_nothing(tmp_path):
    _flash_sdist(tmp_path)
    before = {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(fixers.FixerError, match=r"head dims 32, 64, 96; 128 is not among them"):
        fixers.apply(str(tmp_path), [fixers.make("flash-attn-head-dims", {"dims": "32+128"})])
    setup = tmp_path / "setup.py"  # two entries on one line: dropping that line would drop a kept kernel
    setup.write_text(setup.read_text().replace('flash_fwd_hdim96_fp16_sm80.cu",\n',
                                               'flash_fwd_hdim96_fp16_sm80.cu", "csrc/flash_attn/src/keep.cu",\n'))
    before[setup] = setup.read_text()
    with pytest.raises(fixers.FixerError, match="not listed once on a line of its own"):
        fixers.apply(str(tmp_path), [fixers.make("flash-attn-head-dims", {"dims": "32+64"})])
    assert {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file()} == before
    for bad in ("32,64", "0", "32+", "64; rm -rf /", ""):
        with pytest.raises(ValueError):
            fixers.make("flash-attn-head-dims", {"dims": bad})
    with pytest.raises(ValueError, match="needs dims="):
        fixers.make("flash-attn-head-dims")


def test_flash_attn_head_dims_runs_from_the_in_image_entry_point_with_its_argument(tmp_path):
    """The wheel stage's RUN line: --fixers NAME:dims=A+B, after another fixer; a missing argument
    is one line and exit 2."""
    _flash_sdist(tmp_path)
    r = subprocess.run([sys.executable, fixers.__file__, "apply", str(tmp_path), "--fixers",
                        "cxx-standard,flash-attn-head-dims:dims=64"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "fixer flash-attn-head-dims: 2 file(s) changed" in r.stdout
    assert "hdim32" not in (tmp_path / "setup.py").read_text()
    r = subprocess.run([sys.executable, fixers.__file__, "apply", str(tmp_path), "--fixers", "flash-attn-head-dims"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "needs dims=" in r.stderr and "Traceback" not in r.stderr
