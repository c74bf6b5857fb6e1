"""Compile once (issue 14), from one run (ratios; these machines are noisy):
  (a) two fixture models sharing a compiled package (tinyscale, served from a local index): the
      second image's compile seconds over the first's (goal <= 5 %);
  (b) a builder that shares only the registry's wheel cache with the one that compiled the
      package (another version, so no local cache can help): its compile seconds over the cold one's;
  (c) bytes a host that has the first image must pull for the second (same torch), over the
      second image's size, as the registry stores them (goal <= 25 %).
Needs a Docker engine, the offline base (envbuild base --cuda 11.8) and a registry on
127.0.0.1:5000 (.ci/run starts one; or ENVBUILD_TEST_REGISTRY).
Usage: python benchmarks/bench_compile_once.py
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("ENVBUILD_DOCKER", "/usr/bin/docker")

import compile_once as co  # noqa: E402 - after the path setup above
import results  # noqa: E402 - benchmarks/results.py, beside this file


def main():
    subprocess.run([sys.executable, "-m", "envbuild.cli", "base", "--cuda", "11.8"], check=True, capture_output=True)
    base = {"devel": "envbuild/cuda:11.8-devel-debian12", "runtime": "envbuild/debian:12"}
    registry = os.environ.get("ENVBUILD_TEST_REGISTRY", "127.0.0.1:5000")
    work = Path(tempfile.mkdtemp(prefix="envbuild-bench-"))
    version = co.fresh_version()
    env = {**os.environ, "ENVBUILD_MATRICES": str(co.twin_catalog(work / "matrices", version)),
           "ENVBUILD_TORCH_INDEX": "none", "ENVBUILD_HOME": str(work / "home")}
    if Path("/etc/ssl/certs/ca-certificates.crt").exists():
        env["ENVBUILD_CA_BUNDLE"] = "/etc/ssl/certs/ca-certificates.crt"
    with co.mirror() as mirror:
        first = co.build(env, "twina", base, mirror.add(version))
        second = co.build(env, "twinb", base, mirror.index)
        refs = [co.push(registry, s["tags"][0]) for s in (first, second)]
        try:
            layers_a, layers_b = co.manifest_layers(registry, refs[0]), co.manifest_layers(registry, refs[1])
            new = sum(size for digest, size in layers_b.items() if digest not in layers_a)
            out = {
                "compile_seconds_first": round(co.compile_seconds(first), 1),
                "compile_seconds_second": round(co.compile_seconds(second), 1),
                "second_over_first_compile": round(co.compile_seconds(second) / max(co.compile_seconds(first), 1e-9), 3),
                "second_image_registry_bytes": sum(layers_b.values()),
                "bytes_to_pull_with_first": new,
                "pull_fraction": round(new / sum(layers_b.values()), 3),
            }
        finally:  # (b) builds the same model names again: these go first
            co.remove(first["tags"][0], second["tags"][0], *refs)
        out.update(wheel_cache(base, registry, work, mirror))
    print(json.dumps(out, indent=2))
    results.write("compile_once", out)
    shutil.rmtree(work, ignore_errors=True)


def wheel_cache(base: dict, registry: str, work: Path, mirror: co.Mirror) -> dict:
    """(b): twina compiles a fresh version and pushes it to the wheel cache; twinb, whose only link
    to that compile is the registry (the stage it would compile is never in its build), takes it."""
    version = co.fresh_version()
    env = {**os.environ, "ENVBUILD_MATRICES": str(co.twin_catalog(work / "cache-matrices", version)),
           "ENVBUILD_TORCH_INDEX": "none", "ENVBUILD_HOME": str(work / "cache-home"),
           "ENVBUILD_WHEEL_CACHE": f"{registry}/envbuild-wheel-cache-bench"}
    if Path("/etc/ssl/certs/ca-certificates.crt").exists():
        env["ENVBUILD_CA_BUNDLE"] = "/etc/ssl/certs/ca-certificates.crt"
    cold = co.build(env, "twina", base, mirror.add(version))
    shared = co.build(env, "twinb", base, mirror.index)
    co.remove(cold["tags"][0], shared["tags"][0])
    return {"wheel_cache_compile_seconds_cold": round(co.compile_seconds(cold), 1),
            "wheel_cache_compile_seconds_second_builder": round(co.compile_seconds(shared), 1),
            "wheel_cache_second_over_cold": round(co.compile_seconds(shared) / max(co.compile_seconds(cold), 1e-9), 3),
            "wheel_cache_second_from": shared.get("wheel_cache", {}).get(co.PACKAGE, {}).get("from")}


if __name__ == "__main__":
    main()
