"""Smoke level "comm": an NCCL all-reduce over the visible GPUs (smoke.py comm-worker under
torchrun), bounded by a timeout and retried once with P2P off. Without a GPU a gloo rehearsal
on the CPU runs and the level is skipped.
"""

from __future__ import annotations

import json
import os
import sys
import time

from smoke_common import ENTRY, gpu_state, result, run_bounded


def comm_worker(backend, timeout):
    """One rank of the all-reduce check: the sum must be exact, then 5 timed rounds."""
    import datetime
    import torch
    import torch.distributed as dist
    on_gpu = backend == "nccl"
    if on_gpu:  # before init: NCCL binds each rank to the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Ranks also give up on their own (where NCCL's watchdog runs) rather than wait forever.
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    t = torch.full((1 << 20,), float(rank + 1), device="cuda" if on_gpu else "cpu")
    dist.all_reduce(t)  # the first call sets up rings and P2P: where a broken topology hangs
    sync()
    expected = float(world * (world + 1) // 2)
    ok = bool((t == expected).all())
    start = time.time()
    for _ in range(5):
        dist.all_reduce(t)
    sync()
    secs = (time.time() - start) / 5
    if rank == 0:
        print(json.dumps({"backend": backend, "world": world, "ok": ok, "allreduce_4MB_ms": round(secs * 1000, 3),
                          "bus_GBps": round(2.0 * (world - 1) / world * 4 / 1024 / secs, 2) if world > 1 else None}))
    dist.destroy_process_group()
    return 0 if ok else 1


def _torchrun(nproc, backend, env, timeout):
    """Run the all-reduce on nproc ranks; a hang is killed at timeout, every rank with it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=%d" % nproc,
           ENTRY, "comm-worker", backend, str(timeout)]
    code, out, err = run_bounded(cmd, timeout, env=env)
    if code is None:
        return {"ok": False, "error": "timed out after %ds (hang)" % timeout}
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if code != 0 or not lines:
        return {"ok": False, "error": err[-600:] or "exit %d" % code}
    return json.loads(lines[-1])


def comm_attempts(nproc, backend, timeout, run=_torchrun):
    """The all-reduce as the environment has it, then, for NCCL, once more with P2P off.

    The environment is the one the image's launcher (launch.py) set up for this host: P2P off
    where it found a pair of GPUs without it or a card the catalog marks P2P-less. Nodes whose
    P2P breaks anyway (ACS on, some VMs) hang or fail in the first all-reduce; NCCL_P2P_DISABLE=1
    routes through host memory instead.
    """
    env = dict(os.environ)
    first = run(nproc, backend, env, timeout)
    attempts = [first]
    if backend != "nccl":
        return attempts, None
    first["setting"] = "NCCL_P2P_DISABLE=%s" % env.get("NCCL_P2P_DISABLE", "unset")
    if env.get("ENVBUILD_LAUNCHER_SAID"):
        first["launcher"] = env["ENVBUILD_LAUNCHER_SAID"]
    if not first["ok"] and env.get("NCCL_P2P_DISABLE") != "1":
        env["NCCL_P2P_DISABLE"] = "1"
        retry = run(nproc, backend, env, timeout)
        retry["setting"] = "NCCL_P2P_DISABLE=1"
        attempts.append(retry)
    return attempts, next((a["setting"] for a in attempts if a["ok"]), None)


def level_comm(plan, args):
    state, detail = gpu_state()
    if state == "unusable":
        return result("failed", reason=detail)
    if state == "none":
        # Still run the launcher, the rendezvous and the timeout bound, on CPU with gloo, so a
        # broken torch.distributed shows up before a GPU host does. It decides nothing.
        rehearsal = comm_attempts(2, "gloo", args.comm_timeout)[0][0]
        said = "ok" if rehearsal["ok"] else "FAILED: " + rehearsal["error"].strip().splitlines()[-1][:200]
        return result("skipped", reason="no GPU visible: NCCL needs GPUs (CPU rehearsal with gloo: %s)" % said,
                      cpu_rehearsal=rehearsal)
    attempts, works = comm_attempts(detail, "nccl", args.comm_timeout)
    return result("passed" if works else "failed", gpus=detail, attempts=attempts, works_with=works)
