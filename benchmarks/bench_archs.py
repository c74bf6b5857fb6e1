#!/usr/bin/env python3
"""The cost of a multi-card image: one compiled package's wheel stage for fewer archs vs more
(one vs two, two vs three), from the verified ledger's stage times
(envbuild/matrices/verified/*.json), nothing rebuilt.

A pair is the same package and version compiled in two ledger records whose images target a
different number of archs. The records say which torch and CUDA compiled each: a pair across
toolchains is reported as such (newer torch headers cost compile time of their own).

Usage: python benchmarks/bench_archs.py    writes benchmarks/results/archs.json
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import results  # noqa: E402 - benchmarks/results.py, beside this file
from envbuild import catalog, ledger  # noqa: E402

WHEEL_STEP = re.compile(r"^\[(wheel-[a-z0-9._-]+) \d+/\d+\] RUN ")


def wheel_stages(record: dict) -> dict:
    """{(stage, version): seconds} of the compiled wheel stages a record measured compiling, the
    RUN that compiles; the version from its requirement. A stage ccache fed (its "ccache" counts
    say hits) is left out: it did not compile cold. Records older than those counts cannot tell."""
    out = {}
    for step in record.get("stages") or []:
        m = WHEEL_STEP.match(step["step"])
        version = re.search(r"[A-Za-z0-9._-]==([0-9][0-9A-Za-z.+!]*)", step["step"])
        if m and version and step.get("seconds") and _compiled(step) \
                and not (step.get("ccache") or {}).get("hits"):
            key = (m.group(1), version.group(1))
            out[key] = max(out.get(key, 0), step["seconds"])
    return out


def _compiled(step: dict) -> bool:
    """The record's build ran it, or BuildKit served it and the record carries the time of the
    build that ran it (ledger.with_cold_times names that log): then only that build's own ccache
    counts can say it compiled cold, so a carried step without them is left out."""
    if not step.get("cached"):
        return True
    return bool(step.get("from_log")) and (step.get("ccache") or {}).get("misses", 0) > 0


def archs(cat, record: dict) -> list[str]:
    """The distinct compute capabilities of the record's cards: what its wheels were compiled for."""
    cards = record["request"]["card"].split(",")
    return sorted({cat.card(c).cc for c in cards}, key=lambda cc: tuple(map(int, cc.split("."))))


def main() -> int:
    cat = catalog.load()
    rows = []
    for path in sorted(ledger.folders()[0].glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("verdict") != ledger.PASSED:
            continue
        plan = record.get("plan") or {}
        for (stage, version), seconds in wheel_stages(record).items():
            rows.append({"record": path.name, "stage": stage, "version": version, "seconds": seconds,
                         "archs": archs(cat, record), "torch": plan.get("torch"),  # the record's summary
                         "cuda": plan.get("cuda") or record["request"].get("cuda")})
    pairs = []
    for fewer in rows:
        for more in (r for r in rows if len(r["archs"]) > len(fewer["archs"])
                     and (r["stage"], r["version"]) == (fewer["stage"], fewer["version"])):
            pairs.append({"stage": fewer["stage"], "fewer_archs": fewer, "more_archs": more,
                          "ratio_more_to_fewer": round(more["seconds"] / fewer["seconds"], 2),
                          "same_toolchain": (fewer["cuda"], fewer["torch"]) == (more["cuda"], more["torch"])})
    if not pairs:
        sys.exit("no wheel stage compiled in the ledger for two numbers of archs: verify a multi-card cell "
                 "with its compiled package not yet in BuildKit's cache (docker builder prune first)")
    results.write("archs", {"pairs": pairs, "stages_seen": rows})
    for p in pairs:
        print(f"{p['stage']}: {p['fewer_archs']['seconds']} s for {p['fewer_archs']['archs']} vs "
              f"{p['more_archs']['seconds']} s for {p['more_archs']['archs']} = {p['ratio_more_to_fewer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
