"""Compiled-package building blocks and the resolver's gates."""

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from envbuild import packages, render, resolve as rs
from envbuild.catalog import Compiled
from envbuild.config import Sources
from envbuild.resolve import resolve

OP_CHECKS_PY = Path(rs.__file__).parent / "incontainer" / "op_checks.py"


def _op_check_names() -> set:
    """The keys of op_checks.OP_CHECKS, read without importing it (it needs torch on a GPU)."""
    tree = ast.parse(OP_CHECKS_PY.read_text())
    table = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "OP_CHECKS")
    return {k.value for k in table.keys}


def test_every_native_package_of_the_catalog_has_a_block_whose_op_check_exists(cat):
    checks = _op_check_names()
    seen = {}
    for model in cat.models.values():
        for card in ("a800", "h20"):
            try:
                plan = resolve(cat, model.name, card)
            except rs.Conflict:
                continue
            seen.update(plan.native_packages)
            for name in plan.compiled:
                assert name in plan.native_packages, (model.name, name)
    assert {"mmcv-full", "mmcv", "flash-attn", "torch-scatter", "torch-sparse", "torch-cluster"} <= set(seen)
    assert any(n.startswith("spconv-cu") for n in seen)
    missing = {name: info["op_check"] for name, info in seen.items() if info["op_check"] not in checks}
    assert not missing, f"op checks named by blocks but absent from op_checks.py: {missing}"


def test_blocks_say_how_they_build(cat):
    plan = resolve(cat, "sparsedrive", "h20")
    steps = {s.name: s for s in render.make_context(plan, "test").compiled_steps}
    assert steps["flash-attn"].gb_per_job == 9 and steps["flash-attn"].env == {"FLASH_ATTENTION_FORCE_BUILD": "TRUE"}
    assert steps["mmcv-full"].env == {"MMCV_WITH_OPS": "1"} and steps["mmcv-full"].gb_per_job == 2
    # flash-attn's nvcc compiles two archs at once (--threads 2): a job of an H20 + B200 image needs
    # twice the memory (two such jobs beside mmcv-full's ran a 24 GB builder out of memory);
    # mmcv-full's nvcc compiles one arch at a time whatever the image's archs
    two = {s.name: s for s in render.make_context(resolve(cat, "sparsedrive", "h20,b200", python="3.11", cuda="13.0"),
                                                  "test").compiled_steps}
    assert two["flash-attn"].gb_per_job == 18 and two["mmcv-full"].gb_per_job == 2
    assert packages.block_for(cat, "flash-attn").job_gb(3) == 18  # two at once, however many archs
    spconv = packages.block_for(cat, "spconv-cu117")
    assert spconv.family == "spconv" and not spconv.compiled and spconv.import_name("spconv-cu117") == "spconv"


def test_a_new_compiled_package_needs_only_catalog_facts(cat):
    """A package the catalog describes under [compiled] is chosen, built in a wheel stage of its
    own and imported by the in-image checks, with no code for it anywhere."""
    facts = {"0.3.0": Compiled("bev-pool", "0.3.0", "0.3", ("1.9", "2.0"), 14, "built against torch's ABI"),
             "0.4.0": Compiled("bev-pool", "0.4.0", "0.3", ("2.0", "2.5"), 17, "torch 2.x")}
    model = cat.models["qcnet"]
    cat2 = replace(cat, compiled={**cat.compiled, "bev-pool": facts},
                   models={**cat.models, "qcnet": replace(model, packages={**model.packages, "bev-pool": "0.3.0"})})
    plan = resolve(cat2, "qcnet", "h20")  # a port to torch 2.x: 0.3.0 cannot build, 0.4.0 can
    pin = plan.pin("bev-pool")
    assert "bev-pool" in plan.compiled and pin.version == "0.4.0" and pin.source == "port"
    assert plan.cxx == 17  # its C++ standard reaches the base image's choice
    assert plan.native_packages["bev-pool"]["module"] == "bev_pool"
    dockerfile = render.dockerfile(render.make_context(plan, "test"))
    assert "AS wheel-bev-pool" in dockerfile and "bev-pool==0.4.0" in dockerfile


def test_set_spconv_is_honoured(cat):
    plan = resolve(cat, "gaussianformer", "a800", overrides={"spconv-cu117": "2.3.6"})
    pin = plan.pin("spconv-cu117")
    assert pin.version == "2.3.6" and pin.source == "override"


def _attempt(cat, model, card, overrides, strict=True):
    m = cat.model(model)
    stack = next(rs._stacks(cat, m, strict, None, None, overrides))
    return rs._try(cat, m, cat.card(card), stack, None, strict, overrides, Sources(), None)


@pytest.mark.parametrize("model, card, overrides, gate", [
    ("maptr", "h20", {}, rs._card_runs_torch),
    ("maptr", "a800", {"mmcv-full": "1.7.2"}, rs._mmcv_asserts),
    ("sparsedrive", "a800", {"mmcv-full": "1.7.2"}, rs._port_allowed),
])
def test_a_failed_candidate_reports_the_gate_that_stopped_it(cat, model, card, overrides, gate):
    attempt = _attempt(cat, model, card, overrides)
    assert isinstance(attempt, rs._Attempt), attempt
    assert attempt.depth == rs.GATES.index(gate), (attempt.depth, attempt.reasons)


def test_conflict_carries_its_deciding_reason(cat):
    with pytest.raises(rs.Conflict) as exc:
        resolve(cat, "maptr", "h20", strict=True)
    assert exc.value.reason and exc.value.reason in exc.value.message
    cell = next(c for c in rs.grid(cat, ["maptr"], ["h20"]) if c.card == "h20")
    assert cell.status in ("port", "upstream", "impossible")


# ---------------------------------------------------------------- vendors' prebuilt wheels

def _with_vendor(cat, sass=("8.0", "8.6"), ptx=()):
    from envbuild.catalog import VendorBuild, VendorWheels
    # like OpenMMLab's index: mmcv-full 1.7.1 for torch 1.13 + CUDA 11.7 (SparseDrive upstream on
    # A800); here also the 2.1 + 12.1 stack its H20 port takes from PyPI
    build = VendorBuild(("1.7.1", "1.7.2"), ("1.13", "2.1"), ("11.7", "12.1"), ("3.8", "3.11"), tuple(sass), tuple(ptx))
    links = "https://download.example.org/mmcv/dist/{cu}/torch{torch}/index.html"
    return replace(cat, vendor={"mmcv-full": VendorWheels("mmcv-full", links, (build,))})


def test_a_vendor_wheel_that_carries_code_for_the_card_is_used_and_says_why(cat):
    plan = resolve(_with_vendor(cat), "sparsedrive", "a800", sources=Sources(torch_index=None))
    build = plan.native_packages["mmcv-full"]["build"]
    assert build["from"] == "vendor" and "sm_80" in build["why"] and "audited" in build["why"]
    assert build["find_links"] == "https://download.example.org/mmcv/dist/cu117/torch1.13/index.html"
    assert plan.native_packages["flash-attn"]["build"]["from"] == "source"  # no vendor facts for it
    text = render.dockerfile(render.make_context(plan, "test"))
    stage = text[text.index("AS wheel-mmcv-full"):text.index("AS wheel-flash-attn")]
    assert "pip download --no-deps --only-binary :all: -f " + build["find_links"] in stage
    assert "audit_scan.py --wheels /wheels --cc 8.0" in stage and "pip wheel" not in stage
    assert "FROM compile AS wheel-flash-attn" in text  # the other one still compiles


@pytest.mark.parametrize("card, sources, expect", [
    ("h20", Sources(torch_index=None), "nothing runs on NVIDIA H20 (9.0)"),  # no sm_90, no PTX
    ("a800", Sources(torch_index=None, vendor_wheels=False), "vendor wheels are off"),
    ("a800,h20", Sources(torch_index=None), "h20: "),  # one image for both: the wheel must serve each
])
def test_otherwise_it_compiles_and_says_why(cat, card, sources, expect):
    plan = resolve(_with_vendor(cat), "sparsedrive", card, sources=sources)
    build = plan.native_packages["mmcv-full"]["build"]
    assert build["from"] == "source" and expect in build["why"], build
    assert "pip wheel" in render.dockerfile(render.make_context(plan, "test")).split("AS wheel-mmcv-full")[1]


def test_ptx_in_a_vendor_wheel_serves_a_newer_card(cat):
    plan = resolve(_with_vendor(cat, sass=("8.0",), ptx=("8.0",)), "sparsedrive", "h20", sources=Sources(torch_index=None))
    assert plan.native_packages["mmcv-full"]["build"]["from"] == "vendor"
    assert "compute_80" in plan.native_packages["mmcv-full"]["build"]["why"]


def test_the_wheel_audit_refuses_kernels_that_do_not_run_on_the_card(tmp_path):
    import zipfile
    from fakecuda import elf_with_fatbin, fatbin_bytes
    from envbuild.incontainer import audit_scan
    with zipfile.ZipFile(tmp_path / "ops-1.0-cp311-cp311-linux_x86_64.whl", "w") as whl:
        whl.writestr("ops/_C.cpython-311-x86_64-linux-gnu.so", elf_with_fatbin(fatbin_bytes(80)))
        whl.writestr("ops/__init__.py", "")
    checked, problems = audit_scan.wheel_problems(str(tmp_path), ["8.0", "8.6"])
    assert [c["sass"] for c in checked] == [["8.0"]] and problems == []
    checked, problems = audit_scan.wheel_problems(str(tmp_path), ["8.0", "9.0"])
    assert len(problems) == 1 and "nothing runs on 9.0" in problems[0] and "ops/_C" in problems[0]
    cpu_only = tmp_path / "cpu"
    cpu_only.mkdir()
    with zipfile.ZipFile(cpu_only / "ops-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("ops/__init__.py", "")
    assert audit_scan.wheel_problems(str(cpu_only), ["8.0"])[1] == ["ops-1.0-py3-none-any.whl carries no GPU code"]


def test_the_scanner_reads_gpu_code_a_library_keeps_in_its_large_data_section(tmp_path):
    """cuFFT 12 (CUDA 13's wheel) keeps one sm_75 stub in .nv_fatbin and its real kernels, SASS
    7.5-12.0, in .ldata among other data, at offsets that are not 8-aligned in the section; the
    audit said it had no code for 9.0 or 10.0. A section with no bytes in the file is not read
    though its offset points at another's (as .lbss's points at .ldata's)."""
    import struct
    from fakecuda import elf_with_sections, fatbin_bytes
    from envbuild.incontainer import audit_scan
    stray_magic = struct.pack("<IHHQ", 0xBA55ED50, 7, 3, 1 << 40)  # the magic's bytes in other data
    ldata = (b"data" + fatbin_bytes(90) + b"other data" + stray_magic + fatbin_bytes(100, flags=0x1008011)
             + fatbin_bytes(75, kind=8) + fatbin_bytes(80, kind=1))
    lib = tmp_path / "libcufft.so.12"
    lib.write_bytes(elf_with_sections([(".nv_fatbin", fatbin_bytes(75)), (".ldata", ldata)]))
    found = audit_scan.scan_file(str(lib))
    assert (found["sass"], found["ptx"]) == (["7.5", "9.0", "10.0"], ["8.0"])
    only_bss = tmp_path / "libbss.so"
    only_bss.write_bytes(elf_with_sections([(".nv_fatbin", fatbin_bytes(75)), (".data", fatbin_bytes(120))],
                                           nobits={".lrodata": (1, 4096)}))
    assert audit_scan.scan_file(str(only_bss))["sass"] == ["7.5"]


def test_the_scanner_keeps_arch_and_family_specific_cubins_apart(tmp_path):
    """nvcc marks sm_XYa / sm_XYf code only in the fatbin entry's flags (bit 20 / bit 21 of the u64
    at offset 40, measured with nvcc 13.0: see fakecuda); the SM number is the same as sm_XY's. The
    scanner names them 10.0a / 10.0f, so a wheel whose Blackwell code is sm_100a only is refused
    for a B300 (10.3) and accepted for a B200 (10.0); sm_100f serves both."""
    import zipfile
    from fakecuda import ARCH_SPECIFIC, FAMILY_SPECIFIC, elf_with_fatbin, fatbin_bytes
    from envbuild.incontainer import audit_scan
    data = (fatbin_bytes(100, flags=0x1100011) + fatbin_bytes(90) + fatbin_bytes(90, flags=0x100011)
            + fatbin_bytes(100, flags=0x1000011) + fatbin_bytes(100, kind=1, flags=0x208011)
            + fatbin_bytes(120, kind=1, flags=0x8011))
    assert audit_scan.fatbin_archs(data) == (["9.0", "9.0a", "10.0", "10.0a"], ["10.0f", "12.0"])
    assert audit_scan.fatbin_archs(fatbin_bytes(100, flags=FAMILY_SPECIFIC)) == (["10.0f"], [])
    for flags, archs, refused in ((ARCH_SPECIFIC, ["10.0a"], ["10.3"]), (FAMILY_SPECIFIC, ["10.0f"], []), (0, ["10.0"], [])):
        folder = tmp_path / str(flags)
        folder.mkdir()
        with zipfile.ZipFile(folder / "ops-1.0-cp311-cp311-linux_x86_64.whl", "w") as whl:
            whl.writestr("ops/_C.cpython-311-x86_64-linux-gnu.so", elf_with_fatbin(fatbin_bytes(100, flags=flags)))
        checked, problems = audit_scan.wheel_problems(str(folder), ["10.0", "10.3"])
        assert [c["sass"] for c in checked] == [archs]
        assert [p.rsplit(" ", 1)[-1] for p in problems] == refused, problems


def test_vendor_entries_in_the_catalog_are_validated(matrices_copy):
    from envbuild import catalog
    from envbuild.errors import CatalogError
    path = matrices_copy / "toolchains" / "packages.toml"
    good = ('\n[vendor.mmcv-full]\nfind_links = "https://download.example.org/mmcv/dist/{cu}/torch{torch}/index.html"\n'
            '[[vendor.mmcv-full.builds]]\nversions = ["1.7.1"]\ntorch = ["2.0"]\ncuda = ["11.8"]\n'
            'python = ["3.8", "3.11"]\nsass = ["8.0", "8.6"]\n')
    path.write_text(path.read_text() + good)
    assert catalog.load(matrices_copy).vendor["mmcv-full"].builds[0].sass == ("8.0", "8.6")
    path.write_text(path.read_text().replace('sass = ["8.0", "8.6"]', 'sass = ["sm_80"]'))
    with pytest.raises(CatalogError) as exc:
        catalog.load(matrices_copy)
    assert "vendor.mmcv-full.builds[0].sass" in exc.value.message


def test_a_wheel_cache_that_cannot_take_the_wheel_does_not_fail_the_built_image(tmp_path, monkeypatch):
    import json as _json
    from envbuild import pipeline
    from envbuild.errors import OperationFailed
    (tmp_path / "wheel-cache.json").write_text(_json.dumps(
        [{"package": "tinyscale", "stage": "wheel-tinyscale", "pack": "wheel-tinyscale-pack",
          "ref": "127.0.0.1:5000/w:wheel-tinyscale-abc", "shared": False},
         {"package": "mmcv-full", "stage": "wheel-mmcv-full", "pack": "wheel-mmcv-full-pack",
          "ref": "127.0.0.1:5000/w:wheel-mmcv-full-def", "shared": True}]))

    def refuse(*args, **kwargs):
        raise OperationFailed("build failed: no space left on device\nstep ...")
    monkeypatch.setattr(pipeline.build_stage, "build", refuse)
    out = pipeline._share_wheels(tmp_path, Sources(wheel_cache="127.0.0.1:5000/w"))["wheel_cache"]
    assert out["tinyscale"] == {"ref": "127.0.0.1:5000/w:wheel-tinyscale-abc", "from": "not shared",
                                "why": "build failed: no space left on device"}
    assert out["mmcv-full"]["from"] == "cache"
    assert pipeline._share_wheels(tmp_path, Sources()) == {}  # no cache configured: nothing to do


# ---------------------------------------------------------------- the builder's nvcc: archs a package hard-codes

FLASH_ATTN_GENCODES = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


@pytest.mark.parametrize("arch_list, kept, dropped", [
    ("8.0", ["arch=compute_80,code=sm_80"], ["sm_90"]),  # A800: flash-attn's sm_90 half goes
    ("9.0", ["arch=compute_90,code=sm_90"], ["sm_80"]),  # H20: its sm_80 half goes
    ("8.6", ["arch=compute_80,code=sm_80"], ["sm_90"]),  # A10: sm_80 SASS runs on 8.6, stays
    ("8.0;9.0", ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90"], []),  # both cards of an image
    ("7.5", ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90"], []),  # nothing would be left: unchanged
])
def test_nvcc_drops_the_hard_coded_archs_no_card_of_the_list_runs(arch_list, kept, dropped):
    from envbuild.incontainer import nvcc_archs
    args, gone = nvcc_archs.trim(["-c", "k.cu", *FLASH_ATTN_GENCODES, "-O3"], nvcc_archs.list_archs(arch_list))
    assert [a for a in args if a.startswith("arch=")] == kept and gone == dropped
    assert args[:2] == ["-c", "k.cu"] and args[-1] == "-O3"  # nothing else touched


def test_nvcc_keeps_what_torch_made_from_the_list_and_ptx_that_runs_forward():
    from envbuild.incontainer import nvcc_archs
    torch_made = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=compute_90"]
    assert nvcc_archs.trim(torch_made, nvcc_archs.list_archs("8.0;9.0+PTX")) == (torch_made, [])
    fat = ["--generate-code", "arch=compute_80,code=[sm_80,compute_80]", "-gencode=arch=compute_70,code=\"sm_70\""]
    args, gone = nvcc_archs.trim(fat, ["9.0"])  # compute_80 PTX JIT-compiles on 9.0: that target stays
    assert args == fat[:2] and gone == ["sm_70"]


@pytest.mark.parametrize("args, short", [
    (["--generate-dependencies-with-compile", "--dependency-output", "a.o.d", "-c", "a.cu"],
     ["-MD", "-MF", "a.o.d", "-c", "a.cu"]),
    (["--generate-nonsystem-dependencies-with-compile", "--dependency-output=a.o.d"], ["-MMD", "-MF", "a.o.d"]),
    (["-MD", "-MF", "a.o.d", "--dependency-drive-prefix", "x", "-odir", "o"],  # other flags stay as they are
     ["-MD", "-MF", "a.o.d", "--dependency-drive-prefix", "x", "-odir", "o"]),
])
def test_nvcc_dependency_flags_reach_ccache_in_the_short_form_it_can_cache(args, short):
    from envbuild.incontainer import nvcc_archs
    assert nvcc_archs.short_dep_flags(args) == short


def test_the_nvcc_wrapper_runs_ccache_with_the_trimmed_arguments(tmp_path):
    """What the builder's nvcc script runs: nvcc_archs.py execs ccache with the real nvcc."""
    import subprocess
    import sys
    fake = tmp_path / "ccache"
    fake.write_text("#!/bin/sh\necho \"$@\"\n")
    fake.chmod(0o755)
    script = Path(rs.__file__).parent / "incontainer" / "nvcc_archs.py"
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "TORCH_CUDA_ARCH_LIST": "8.0"}
    r = subprocess.run([sys.executable, str(script), "/usr/lib/cuda/bin/nvcc", "-c", "k.cu", *FLASH_ATTN_GENCODES],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["/usr/lib/cuda/bin/nvcc", "-c", "k.cu", "-gencode", "arch=compute_80,code=sm_80"]
    assert "not compiling sm_90" in r.stderr and "TORCH_CUDA_ARCH_LIST=8.0" in r.stderr
    # torch < 2.0's cuda_compile rule: the long dependency flags reach ccache in their short form
    r = subprocess.run([sys.executable, str(script), "/usr/lib/cuda/bin/nvcc", "--generate-dependencies-with-compile",
                        "--dependency-output", "k.o.d", "-c", "k.cu", "-o", "k.o"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.stdout.split() == ["/usr/lib/cuda/bin/nvcc", "-MD", "-MF", "k.o.d", "-c", "k.cu", "-o", "k.o"]
    r = subprocess.run([sys.executable, str(script), "/usr/lib/cuda/bin/nvcc", "--version"],
                       capture_output=True, text=True, env={"PATH": env["PATH"]}, timeout=60)
    assert r.stdout.split() == ["/usr/lib/cuda/bin/nvcc", "--version"] and r.stderr == ""


def test_compile_turns_vendor_wheels_off_and_the_shipped_catalog_names_none(cat, matrices_copy):
    """`--compile` builds every compiled package from its sdist even where a catalog's vendor wheel
    fits; the catalog envbuild ships records no vendor wheel (none proven here), so by default
    nothing is downloaded prebuilt unless a user's catalog says so."""
    import json
    import os
    import subprocess
    import sys
    assert cat.vendor == {}
    path = matrices_copy / "toolchains" / "packages.toml"
    path.write_text(path.read_text() + '\n[vendor.mmcv-full]\nfind_links = "https://download.example.org/mmcv/{cu}/torch{torch}/index.html"\n'
                    '[[vendor.mmcv-full.builds]]\nversions = ["1.7.1"]\ntorch = ["1.13"]\ncuda = ["11.7"]\n'
                    'python = ["3.8", "3.8"]\nsass = ["8.0", "8.6"]\n')  # what sparsedrive on a800 resolves to
    env = {**os.environ, "ENVBUILD_MATRICES": str(matrices_copy), "ENVBUILD_TORCH_INDEX": "none"}
    builds = {}
    for flags in ([], ["--compile"]):
        r = subprocess.run([sys.executable, "-m", "envbuild.cli", "resolve", "sparsedrive", "--card", "a800", "--json", *flags],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        builds[bool(flags)] = json.loads(r.stdout)["native_packages"]["mmcv-full"]["build"]
    assert builds[False]["from"] == "vendor"
    assert builds[True]["from"] == "source" and "vendor wheels are off" in builds[True]["why"], builds[True]
