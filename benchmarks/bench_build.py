"""Build performance of the fixture model through the real pipeline (issue 4 targets).

Reports, from one run (ratios; these machines are noisy):
  - rebuild after changing one Python file / one CUDA file of the model vs a cold build
    (goal <= 10 %), and which layers were cache hits (torch and deps must be);
  - no-op rebuild time (goal <= 3 s);
  - compiling the fixture's CUDA op for the card's arch only vs CUDA 11.8's full arch list;
  - runtime image size vs builder image size.
The cold build prunes BuildKit's cache first (`--keep-cache` skips that); `--no-arch-list`
skips the (slow, ~10 min on 2 cores) full-arch-list compile.
Usage: python benchmarks/bench_build.py [--keep-cache] [--no-arch-list]
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("ENVBUILD_DOCKER", "/usr/bin/docker")

import results  # noqa: E402 - benchmarks/results.py, beside this file

# Every arch nvcc 11.8 emits that torch 2.0's extension builder accepts (it rejects 8.7, Jetson).
FULL_118 = "3.5;3.7;5.0;5.2;6.0;6.1;7.0;7.5;8.0;8.6;8.9;9.0"


def cli(env, *args):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "envbuild.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"envbuild {' '.join(map(str, args[:2]))} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout), time.monotonic() - t0


def main():
    keep = "--keep-cache" in sys.argv
    subprocess.run([sys.executable, "-m", "envbuild.cli", "base", "--cuda", "11.8"], check=True, capture_output=True)
    work = Path(tempfile.mkdtemp(prefix="envbuild-bench-"))
    matrices = work / "matrices"
    shutil.copytree(ROOT / "matrices", matrices)
    shutil.copy(ROOT / "tests" / "fixture" / "tinybev.toml", matrices / "models")
    src = work / "tinybev"
    shutil.copytree(ROOT / "tests" / "fixture" / "tinybev", src)
    env = {**os.environ, "ENVBUILD_MATRICES": str(matrices), "ENVBUILD_TORCH_INDEX": "none",
           "ENVBUILD_HOME": str(work / "home")}
    if Path("/etc/ssl/certs/ca-certificates.crt").exists():
        env["ENVBUILD_CA_BUNDLE"] = "/etc/ssl/certs/ca-certificates.crt"
    args = ["image", "tinybev", "--card", "a800", "--cuda", "11.8", "--python", "3.11", "--source", src,
            "--base-image", "envbuild/cuda:11.8-devel-debian12", "--runtime-image", "envbuild/debian:12",
            "--json", "--quiet"]
    docker = os.environ["ENVBUILD_DOCKER"]
    if not keep:
        subprocess.run([docker, "builder", "prune", "-af"], capture_output=True)
    out = {}
    cold, cold_s = cli(env, *args)
    out["cold_build_s"] = round(cold_s, 1)
    noop, noop_s = cli(env, *args)
    out["noop_rebuild_s"] = round(noop_s, 1)
    (src / "train.py").write_text((src / "train.py").read_text() + "\n# bench edit\n")
    py_edit, py_s = cli(env, *args)
    out["rebuild_after_py_edit_s"] = round(py_s, 1)
    cu = src / "ops" / "src" / "scale_add_cuda.cu"
    cu.write_text(cu.read_text() + "\n// bench edit\n")
    cu_edit, cu_s = cli(env, *args)
    out["rebuild_after_cu_edit_s"] = round(cu_s, 1)
    out["ratio_py_edit_to_cold"] = round(py_s / cold_s, 3)
    out["ratio_cu_edit_to_cold"] = round(cu_s / cold_s, 3)
    out["layers_cached_after_py_edit"] = [s["step"][:60] for s in py_edit["run_steps"] if s["cached"]]
    out["layers_rebuilt_after_py_edit"] = [s["step"][:60] for s in py_edit["run_steps"] if not s["cached"]]
    out["torch_and_deps_cached"] = all(s["cached"] for s in py_edit["run_steps"]
                                       if s["step"].startswith(("[torch", "[deps", "[base")))

    # arch-only vs full arch list, in the builder stage, ccache off
    from envbuild import build
    ctx = Path(env["ENVBUILD_HOME"]) / "contexts" / "tinybev-a800"
    os.environ.update({k: v for k, v in env.items() if k.startswith("ENVBUILD_")})
    builder = build.build(ctx, [], target="builder", ca_bundle=env.get("ENVBUILD_CA_BUNDLE"))
    times = {}
    lists = (("card_arch_only", "8.0"), ("full_cuda_11_8_list", FULL_118))
    for name, archs in lists[:1] if "--no-arch-list" in sys.argv else lists:
        cmd = [docker, "run", "--rm", "-e", f"TORCH_CUDA_ARCH_LIST={archs}", "-e", "CCACHE_DISABLE=1",
               "-w", "/workspace/model/ops", builder.image_id, "bash", "-c",
               "set -o pipefail; rm -rf build && MAX_JOBS=2 python setup.py -q build_ext 2>&1 | tail -5"]
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"compiling for {archs} failed:\n{(r.stdout + r.stderr)[-2000:]}")
        times[name] = round(time.monotonic() - t0, 1)
    out["compile_op_s"] = times
    if "full_cuda_11_8_list" in times:
        out["ratio_arch_only_to_full_list"] = round(times["card_arch_only"] / times["full_cuda_11_8_list"], 3)
    out["builder_image_bytes"] = builder.size
    out["runtime_image_bytes"] = cold["size_bytes"]
    out["ratio_runtime_to_builder_size"] = round(cold["size_bytes"] / builder.size, 3)
    out["goals"] = {"py_edit_rebuild_ratio": 0.10, "noop_rebuild_s": 3.0}
    print(json.dumps(out, indent=2))
    results.write("build", out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
