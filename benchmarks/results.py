"""Benchmark results: each bench writes results/<name>.json with when, where and how it ran, and
README.md's measured table is made from those files, never typed.

Usage: python benchmarks/results.py          print the table
       python benchmarks/results.py --write  put it into README.md (between its markers)
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN = "<!-- measured: made by benchmarks/results.py from benchmarks/results/*.json -->"
END = "<!-- end of measured -->"


def machine() -> dict:
    """What the numbers were measured on: cores, memory and GPUs (the ratios depend on them)."""
    memory_gb = None
    try:
        with open("/proc/meminfo") as fh:
            memory_gb = round(int(fh.readline().split()[1]) / 2**20)
    except (OSError, ValueError, IndexError):
        pass
    from envbuild import host
    return {"cores": os.cpu_count(), "memory_gb": memory_gb, "gpus": [g["name"] for g in host.gpus()]}


def commit() -> str | None:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def write(name: str, data: dict) -> Path:
    """results/<name>.json: the numbers, plus the date, the commit, the machine and the command."""
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit(), "machine": machine(),
            "command": " ".join(["python", *(os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a
                                              for a in sys.argv)])}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**data, "meta": meta}, indent=2) + "\n")
    return path


def _gb(n) -> str:
    return f"{n / 1e9:.2f} GB"


# (results file, what was measured, the result from its numbers); one row each, in this order.
ROWS = [
    ("resolve", lambda d: f"resolve every model × card × CUDA of the catalog ({d['requests']} requests)",
     lambda d: f"{d['total_s']} s in all, {d['per_request_ms']} ms each (goal: the catalog in under {d['goal_total_s']} s)"),
    ("build", lambda d: "cold build of the test fixture (torch 2.0.1 from PyPI, one CUDA op for sm_80)",
     lambda d: f"{d['cold_build_s']} s"),
    ("build", lambda d: "no-op rebuild",
     lambda d: f"{d['noop_rebuild_s']} s (goal ≤ {d['goals']['noop_rebuild_s']} s)"),
    ("build", lambda d: "rebuild after editing one Python / one CUDA file of the model",
     lambda d: (f"{d['rebuild_after_py_edit_s']} s / {d['rebuild_after_cu_edit_s']} s = {d['ratio_py_edit_to_cold']:.1%} / "
                f"{d['ratio_cu_edit_to_cold']:.1%} of the cold build (goal ≤ {d['goals']['py_edit_rebuild_ratio']:.0%}); "
                + ("torch and deps layers are cache hits" if d["torch_and_deps_cached"] else "torch or deps rebuilt"))),
    ("build", lambda d: "compiling the fixture's op for the card's arch only vs CUDA 11.8's whole arch list",
     lambda d: (f"{d['compile_op_s']['card_arch_only']} s vs {d['compile_op_s']['full_cuda_11_8_list']} s "
                f"({d['ratio_arch_only_to_full_list']})" if "ratio_arch_only_to_full_list" in d
                else f"{d['compile_op_s']['card_arch_only']} s (full list not measured: --no-arch-list)")),
    ("build", lambda d: "runtime image vs builder image",
     lambda d: f"{_gb(d['runtime_image_bytes'])} vs {_gb(d['builder_image_bytes'])} ({d['ratio_runtime_to_builder_size']})"),
    ("compile_once", lambda d: ("two models that pin one compiled package on the same torch, Python and card: the second "
                                "image's compile time over the first's (fixture twins, package served by a local index)"),
     lambda d: f"{d['compile_seconds_second']} s / {d['compile_seconds_first']} s = {d['second_over_first_compile']} (goal ≤ 5 %)"),
    ("compile_once", lambda d: "a second builder that shares only the registry's wheel cache: its compile time over a cold builder's",
     lambda d: (f"{d['wheel_cache_compile_seconds_second_builder']} s / {d['wheel_cache_compile_seconds_cold']} s = "
                f"{d['wheel_cache_second_over_cold']} (the wheel came from the {d['wheel_cache_second_from']})")),
    ("compile_once", lambda d: "bytes a host that has the first image pulls for the second (same torch)",
     lambda d: (f"{d['bytes_to_pull_with_first'] / 1e6:.0f} MB of {_gb(d['second_image_registry_bytes'])} = "
                f"{d['pull_fraction']:.1%} (goal ≤ 25 %)")),
    ("archs", lambda d: ("one compiled wheel stage for more archs vs fewer (the cost of a multi-card image), from the "
                         "ledger: " + "; ".join(f"{p['stage']}, {'+'.join(p['more_archs']['archs'])} "
                                                f"(torch {p['more_archs']['torch']}, CUDA {p['more_archs']['cuda']}) vs "
                                                f"{'+'.join(p['fewer_archs']['archs'])} (torch {p['fewer_archs']['torch']}, "
                                                f"CUDA {p['fewer_archs']['cuda']})" for p in d["pairs"])),
     lambda d: "; ".join(f"{p['more_archs']['seconds']:.0f} s / {p['fewer_archs']['seconds']:.0f} s = {p['ratio_more_to_fewer']}"
                         + ("" if p["same_toolchain"] else " (across toolchains: newer torch headers cost time too)")
                         for p in d["pairs"])),
    ("gpu_selftest", lambda d: (f"`make selftest-gpu CARD={d['cards']}` on a GPU machine with no Docker: the in-image smoke "
                                f"script's GPU levels against its torch {d['torch']} (fixture op built for {d['cards']})"),
     lambda d: (", ".join(f"{k} {v}" for k, v in d["levels"].items()) + f" on the {d['gpu_present']}; "
                f"4 MB all-reduce {d['allreduce_4MB_ms']} ms; train {d['train_eager_samples_per_s']} samples/s eager, "
                f"torch.compile {d['compile_speedup_vs_eager']}× (30 steps of a tiny net: launch-bound)")),
    ("dataloader", lambda d: f"tuned vs untuned DataLoader, CPU training (`{d['image'].split(':')[0]}` image)",
     lambda d: (f"data-wait share {d['untuned']['data_wait_share']:.1%} → {d['tuned']['data_wait_share']:.1%} "
                f"({d['ratio_tuned_to_untuned_data_wait']}×); samples/s {d['ratio_tuned_to_untuned_samples_per_s']}× "
                "(on a CPU-only host the workers compete with the model for the cores)")),
    *((name, lambda d: ("`.ci/run` from a fresh clone (what CI runs; limit 90 min), started "
                        + ("cold: no images, no BuildKit cache" + (f"; a new machine (.ci/run installed {', '.join(d['installed'])})"
                                                   if d.get("installed") else "") if d["cold"] else
                           "warm: " + (f"{d['at_start']['images']} images, " if d['at_start']['images'] is not None else "")
                           + f"{d['at_start']['build_cache']} of BuildKit cache"
                           + (f" (.ci/run capped it at {d['at_start']['cache_cap_gb']} GB for the disk)"
                              if d['at_start'].get('cache_cap_gb') else ""))),
       lambda d: (f"{d['wall_s']} s, {d['tests']} tests" + (f", {d['failed']} failed" if d.get("failed") else "")
                  + f", {d['disk_peak_extra_gb']} GB of disk at its peak")) for name in ("ci_cold", "ci_warm")),
]


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _when(d: dict) -> str:
    """'2026-11-30, 2 cores, 24 GB, no GPU' from the file's meta."""
    meta = d["meta"]
    where = meta["machine"]
    return f"{meta['date']}, {where['cores']} cores, {where['memory_gb']} GB, {', '.join(where['gpus']) or 'no GPU'}"


def table() -> str:
    """The README's measured table: one row per measurement whose results file exists, each saying
    when and on what it ran; the measurements with no file yet are named below it."""
    lines = ["| what | result | measured (`benchmarks/results/`) |", "|---|---|---|"]
    missing = []
    for name, what, result in ROWS:
        data = load(name)
        if data is None:
            missing.append(name)
            continue
        lines.append(f"| {what(data)} | {result(data)} | {name}.json: {_when(data)} |")
    if missing:
        files = ", ".join(f"`{n}.json`" for n in dict.fromkeys(missing))
        targets = sorted({"`make bench-ci`" if n.startswith("ci_") else "`make selftest-gpu` on a GPU (its report, summarised)" if n == "gpu_selftest"
                          else "`make bench-build`" for n in missing})
        lines += ["", f"Not measured yet (no {files}): {' and '.join(targets)} measure{'s' if len(targets) == 1 else ''} them."]
    return "\n".join(lines)


def readme_with_table(text: str) -> str:
    """README.md's text with the table between the markers made afresh."""
    head, found, rest = text.partition(BEGIN)
    if not found or END not in rest:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    return f"{head}{BEGIN}\n{table()}\n{END}{rest.partition(END)[2]}"


def main() -> int:
    if "--write" in sys.argv:
        README.write_text(readme_with_table(README.read_text()))
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
