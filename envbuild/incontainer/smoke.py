"""envbuild smoke test, run inside the image: does this stack work on this card?

Levels: env (every Plan package imports at its pinned version), arch (torch and the
compiled extensions carry code for the card), ops (compiled ops forward/backward on the
GPU against a reference), comm (NCCL all-reduce over the visible GPUs, bounded, with a
P2P-off retry), train (N steps of a synthetic perception net or the model's own recipe),
io (checkpoint write/read bandwidth). GPU levels are reported as skipped, with the
reason, when there is no GPU; never as passed.

Python 3.8+, stdlib and torch only. Prints one JSON report on stdout.

Each level lives in level_<name>.py beside this file, the helpers they share in smoke_common.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # run as a script it is already there; loaded from elsewhere it may not be
    sys.path.insert(0, HERE)

import launch  # noqa: E402 - the folder must be on sys.path first
from level_arch import level_arch  # noqa: E402
from level_comm import comm_worker, level_comm  # noqa: E402
from level_env import level_env  # noqa: E402
from level_io import level_io  # noqa: E402
from level_model import level_model  # noqa: E402
from level_ops import level_ops, op_check  # noqa: E402
from level_train import level_train  # noqa: E402
from smoke_common import LEVELS, SCAN_ROOTS, host_driver, load_plan, result, shm_bytes  # noqa: E402


def environment():
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "hostname": platform.node(), "cpus": os.cpu_count(), "shm_bytes": shm_bytes()}
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    info["driver"] = host_driver()
    info["host_settings"] = os.environ.get(launch.SAID)  # what the launcher chose on this host, and why
    return info


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["comm-worker"]:
        return comm_worker(argv[1], int(argv[2]))
    if argv[:1] == ["op-check"]:
        return op_check(argv[1], argv[2] if len(argv) > 2 else None)
    # The image's entrypoint (launch.py) decided the host settings (NCCL P2P) before this ran; run
    # without it (--entrypoint, scripts/gpu-selftest.sh), the same decision is made here, so every
    # level and every command the levels start (torchrun, the model's own training) runs under it.
    launch.prepare(os.environ)
    ap = argparse.ArgumentParser(prog="envbuild-smoke")
    ap.add_argument("--plan", default=os.path.join(HERE, "plan.json"))
    ap.add_argument("--lock", default=os.path.join(HERE, "requirements.lock"))
    ap.add_argument("--level", default=",".join(LEVELS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--recipe", choices=["synthetic", "model", "both"], default="synthetic")
    ap.add_argument("--data")
    ap.add_argument("--ckpt-dir")
    ap.add_argument("--ckpt-mb", type=int, default=64)
    ap.add_argument("--ops-check")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--loader", choices=["tuned", "untuned"], default="tuned")
    ap.add_argument("--comm-timeout", type=int, default=120)
    ap.add_argument("--ops-timeout", type=int, default=300)
    ap.add_argument("--train-timeout", type=int, default=900)
    ap.add_argument("--workdir", default="/workspace/model")
    ap.add_argument("--scan-roots", help="comma-separated folders holding compiled code (default: the image's)")
    args = ap.parse_args(argv)
    if args.scan_roots:
        SCAN_ROOTS[:] = [r for r in args.scan_roots.split(",") if r]
    levels = [l.strip() for l in args.level.split(",") if l.strip()]
    unknown = [l for l in levels if l not in LEVELS]
    if unknown:
        print("unknown level(s): %s (choose from %s)" % (", ".join(unknown), ", ".join(LEVELS)), file=sys.stderr)
        return 2
    if not os.path.exists(args.plan):
        print("no Plan at %s: run this in an envbuild image, or pass --plan" % args.plan, file=sys.stderr)
        return 2
    plan = load_plan(args.plan)
    report = {"model": plan["model"], "card": plan["card"], "card_name": plan["card_name"], "cc": plan["cc"],
              "environment": environment(), "levels": {}}
    runners = {"env": level_env, "model": level_model, "arch": level_arch, "ops": level_ops, "comm": level_comm,
               "train": level_train, "io": level_io}
    for level in levels:
        start = time.time()
        try:
            out = runners[level](plan, args)
        except Exception as exc:  # noqa: BLE001 - a crash in a level is that level failing
            out = result("failed", reason="%s: %s" % (type(exc).__name__, str(exc)[:500]))
        out["seconds"] = round(time.time() - start, 2)
        report["levels"][level] = out
    statuses = [v["status"] for v in report["levels"].values()]
    report["ok"] = "failed" not in statuses
    print(json.dumps(report, indent=1, sort_keys=True))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
