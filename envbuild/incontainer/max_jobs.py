"""Print how many parallel compile jobs this builder can afford.

Usage: python max_jobs.py GB_PER_JOB. min(cores, available memory / GB_PER_JOB), at least 1,
and at most $ENVBUILD_JOBS_CAP when a build farm sets it.
flash-attn needs about 9 GB per nvcc job; a builder that runs out of memory dies silently.
Runs inside images: Python 3.8+, stdlib only.
"""

import os
import sys


def available_gb():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / (1024.0 * 1024.0)
    except OSError:
        pass
    return 4.0


def cgroup_limit_gb():
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                raw = fh.read().strip()
            if raw.isdigit() and int(raw) < (1 << 60):
                return int(raw) / float(1 << 30)
        except OSError:
            continue
    return None


def main(argv):
    per_job = float(argv[1]) if len(argv) > 1 else 2.0
    mem = available_gb()
    limit = cgroup_limit_gb()
    if limit is not None:
        mem = min(mem, limit)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = max(1, min(cores, int(mem // per_job)))
    cap = os.environ.get("ENVBUILD_JOBS_CAP", "0")
    if cap.isdigit() and int(cap) > 0:
        jobs = min(jobs, int(cap))
    print(jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
