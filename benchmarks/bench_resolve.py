"""Resolve every model x card x CUDA of the catalog; report total and per-Plan time.

Goal (issue 2): the whole catalog in well under one second. One run, reported, not asserted.
"""

import itertools
import json
import sys
import time

import results  # benchmarks/results.py, beside this file
from envbuild import catalog
from envbuild.resolve import Conflict, resolve


def main() -> int:
    t0 = time.perf_counter()
    cat = catalog.load()
    load_s = time.perf_counter() - t0
    plans = conflicts = 0
    t1 = time.perf_counter()
    for model, card, cuda in itertools.product(sorted(cat.models), cat.cards, [None, *cat.toolkits]):
        try:
            resolve(cat, model, card, cuda=cuda)
            plans += 1
        except Conflict:
            conflicts += 1
    total = time.perf_counter() - t1
    n = plans + conflicts
    out = {"catalog_load_s": round(load_s, 4), "requests": n, "plans": plans, "impossible": conflicts,
           "total_s": round(total, 3), "per_request_ms": round(1000 * total / n, 3),
           "goal_total_s": 1.0, "ratio_to_goal": round(total / 1.0, 3)}
    print(json.dumps(out, indent=2))
    results.write("resolve", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
