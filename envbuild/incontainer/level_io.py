"""Smoke level "io": checkpoint write/read bandwidth and latency (torch.save with fsync, then
torch.load) in --ckpt-dir, and that the round trip is exact.
"""

from __future__ import annotations

import os
import tempfile
import time

from smoke_common import result


def level_io(plan, args):
    import torch
    directory = args.ckpt_dir or tempfile.gettempdir()
    if not os.path.isdir(directory):
        return result("failed", reason="--ckpt-dir %s is not a directory" % directory)
    size_mb = args.ckpt_mb
    state = {"w%d" % i: torch.randn(size_mb * 2 ** 20 // 4 // 8) for i in range(8)}
    path = os.path.join(directory, "envbuild-smoke-%d.pt" % os.getpid())
    try:
        t0 = time.time()
        torch.save(state, path)
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        t1 = time.time()
        back = torch.load(path)
        t2 = time.time()
        ok = all(torch.equal(state[k], back[k]) for k in state)
        nbytes = os.path.getsize(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    mb = nbytes / 2 ** 20
    return result("passed" if ok else "failed", dir=directory, size_mb=round(mb, 1),
                  write_MBps=round(mb / max(t1 - t0, 1e-9), 1), read_MBps=round(mb / max(t2 - t1, 1e-9), 1),
                  write_latency_s=round(t1 - t0, 3), read_latency_s=round(t2 - t1, 3), roundtrip_equal=ok)
