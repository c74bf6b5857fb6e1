"""What CI costs: `.ci/run` from a fresh clone of this checkout's HEAD, as CI runs it, with its wall
time, its test count and the disk it takes at its peak (sampled every 20 s). CI's limit is
90 minutes and its machine has this one's disk, so both are worth watching.

Reports whether it started cold (no images, no BuildKit cache: results/ci_cold.json) or warm
(results/ci_warm.json); the README shows both. Each module's time and the disk after it come
from tests/conftest.py (ENVBUILD_TEST_TIMINGS). The clone is removed
afterwards; its log is kept. Usage: python benchmarks/bench_ci.py   (51 min from 20 GB of cache on 2 cores,
2026-12-03; results/ci_warm.json)
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import results  # benchmarks/results.py, beside this file

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9
DOCKER_DATA = Path("/var/lib/docker")


def docker_state() -> dict:
    """Images and BuildKit cache at the start: a run with neither is a cold one."""
    def ask(*args):
        r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
        return r.stdout.splitlines() if r.returncode == 0 else None
    images = ask("images", "-aq")
    cache = ask("system", "df", "--format", "{{.Type}}={{.Size}}")  # "Build Cache=11.15GB"
    if images is None and DOCKER_DATA.is_dir():
        # the engine is stopped (.ci/run starts it): what its data folder holds still makes the run warm
        configs = list(DOCKER_DATA.glob("image/*/imagedb/content/sha256/*"))
        cache_bytes = sum(f.stat().st_size for f in (DOCKER_DATA / "buildkit").rglob("*") if f.is_file()) \
            if (DOCKER_DATA / "buildkit").is_dir() else 0
        return {"images": len(configs),  # an empty data folder (wiped, or a mount point) is a cold start
                "build_cache": f"{cache_bytes / GB:.1f}GB (engine stopped: its data folder)" if cache_bytes else "0B"}
    return {"images": len(set(images)) if images is not None else None,
            "build_cache": next((c.split("=", 1)[1] for c in cache or [] if c.startswith("Build Cache=")), None)}


def installed(log: str) -> list[str]:
    """The packages .ci/run's log says it installed first: on a new machine Docker, debootstrap,
    the registry and buildx; none where a machine had them."""
    return [p for listed, buildx in re.findall(r"^>> (?:apt-get install (.+)|installing (docker-buildx))", log, re.M)
            for p in f"{listed} {buildx}".split()]


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="envbuild-ci-"))
    clone, log, timings = work / "clone", work / "ci.log", work / "modules.json"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    head = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    state = docker_state()
    used = [shutil.disk_usage("/").used]
    done = threading.Event()

    def sample():
        while not done.wait(20):
            used.append(shutil.disk_usage("/").used)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.monotonic()
    with open(log, "w") as fh:
        code = subprocess.run(["bash", ".ci/run"], cwd=clone, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "CI": "true", "ENVBUILD_TEST_TIMINGS": str(timings)}).returncode
    wall = time.monotonic() - t0
    done.set()
    shutil.rmtree(clone, ignore_errors=True)  # its venv and build outputs; the log stays
    text = log.read_text(errors="replace")
    spent = json.loads(timings.read_text()) if timings.exists() else None
    cap = re.search(r"^>> BuildKit keeps (\d+) GB of cache", text, re.M)  # .ci/run started the engine so
    if cap:
        state["cache_cap_gb"] = int(cap.group(1))
    # the engine was stopped: .ci/run asked the engine it started (the cache's snapshots live in
    # overlay2, so the buildkit folder's bytes undercount it)
    asked = re.search(r"^>> disk: \d+ GB free, (\d+) GB of BuildKit cache", text, re.M)
    if asked and "engine stopped" in str(state["build_cache"]):
        state["build_cache"], state["build_cache_from"] = f"{asked.group(1)}GB", ".ci/run's log (it started the engine)"
    summary = re.findall(r"^=*\s*(.*\b(?:passed|failed)\b.*) in ([\d.]+)s", text, re.M)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary[-1][0])} if summary else {}
    out = {
        "what": ".ci/run from a fresh clone, as CI runs it",
        "ci_commit": head,
        "exit_code": code,
        # no engine and no data (a new machine: .ci/run installs it) is as cold as an empty one
        "cold": not state["images"] and state["build_cache"] in ("0B", None),
        "at_start": state,
        "installed": installed(text),
        "wall_s": round(wall),
        "pytest_s": round(float(summary[-1][1])) if summary else None,
        "tests": counts.get("passed", 0) + counts.get("failed", 0),
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0) + counts.get("error", 0),
        "skipped": counts.get("skipped", 0),
        "disk_used_before_gb": round(used[0] / GB),
        "disk_used_peak_gb": round(max(used) / GB),
        "disk_peak_extra_gb": round((max(used) - used[0]) / GB),
        "sampled": "df every 20 s",
        # the slowest modules first: seconds (shared fixtures charged to the first user), disk at its end
        "modules": dict(sorted(spent["modules"].items(), key=lambda kv: -kv[1]["seconds"])) if spent else None,
        "slowest": spent["slowest"] if spent else None,  # phases of 20 s or more: setup, call, teardown
        "log": str(log),
    }
    print(results.write("ci_cold" if out["cold"] else "ci_warm", out).read_text())
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
