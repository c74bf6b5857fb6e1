"""Say how many of a build step's compiles ccache served, then start the next step's count.

The builder's toolchain sets CCACHE_STATSLOG: ccache appends one block per compile to that file
("# file" and the counters it moved: direct_cache_hit, preprocessed_cache_hit, cache_miss, ...).
A step that compiles runs this last; the line it prints lands in the build log, where envbuild
reads it (the ledger keeps it beside the step's time). A step ccache mostly served, after an
earlier build was stopped, is not what a cold compile costs.

Usage: python ccache_stats.py    (prints "envbuild-ccache: H hits, M misses"; nothing if no compile)
Runs inside images: Python 3.8+, stdlib only.
"""

import os
import sys

MARKER = "envbuild-ccache:"
HITS = {"direct_cache_hit", "preprocessed_cache_hit"}


def count(lines):
    """(hits, misses) of a stats log's blocks; a block with neither (a link, a call ccache could
    not cache) counts as none."""
    hits = misses = 0
    block = set()
    for line in list(lines) + ["#"]:
        line = line.strip()
        if line.startswith("#"):
            if block & HITS:
                hits += 1
            elif "cache_miss" in block:
                misses += 1
            block = set()
        elif line:
            block.add(line)
    return hits, misses


def main():
    path = os.environ.get("CCACHE_STATSLOG")
    if not path or not os.path.exists(path):
        return 0
    with open(path, errors="replace") as fh:
        hits, misses = count(fh.read().splitlines())
    os.remove(path)  # the next step counts its own compiles
    if hits or misses:
        print("%s %d hits, %d misses" % (MARKER, hits, misses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
