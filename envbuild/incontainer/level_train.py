"""Smoke level "train": N steps of a synthetic multi-camera perception net (optionally again
under torch.compile), and/or the model's own train entry launched as the catalog says; losses
must stay finite. Runs on the CPU when no GPU is visible.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time

from smoke_common import gpu_count, gpu_state, result, run_bounded, shm_bytes


def loader_knobs(tuned, device):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not tuned:
        return {"num_workers": 0, "pin_memory": False, "persistent_workers": False, "prefetch_factor": None}
    workers = max(1, min(8, cores - 1))
    return {"num_workers": workers, "pin_memory": device == "cuda", "persistent_workers": True, "prefetch_factor": 4}


def sharing_strategy(knobs):
    """How worker processes hand batches to the trainer: torch's shared memory (file descriptors
    or files in /dev/shm), which is why /dev/shm's size matters."""
    if not knobs["num_workers"]:
        return "none: batches are made in the training process"
    import torch.multiprocessing as tmp
    return "shared memory (%s)" % tmp.get_sharing_strategy()


class SyntheticCameras(object):
    """Generated multi-camera batches with CPU preprocessing (normalize + flip), like a real loader."""

    def __init__(self, n, cameras=6, size=96, seed=0):
        self.n, self.cameras, self.size, self.seed = n, cameras, size, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch
        g = torch.Generator().manual_seed(self.seed + i)
        img = torch.rand(self.cameras, 3, self.size, self.size, generator=g) * 255.0
        img = (img - 127.5) / 58.0  # the per-sample CPU work data loaders spend their time on
        if i % 2:
            img = img.flip(-1)
        occ = (img.mean(dim=(0, 1)) > 0).float()
        target = torch.nn.functional.adaptive_avg_pool2d(occ[None, None], 24)[0, 0].round().long()
        return img, target


def perception_net():
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self, cameras=6, ch=32, bev=24, classes=2):
            super().__init__()
            self.cameras, self.bev = cameras, bev
            self.backbone = nn.Sequential(
                nn.Conv2d(3, ch, 3, 2, 1), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
                nn.Conv2d(ch, ch, 3, 2, 1), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
                nn.Conv2d(ch, ch * 2, 3, 2, 1), nn.BatchNorm2d(ch * 2), nn.ReLU(inplace=True))
            self.pool = nn.AdaptiveAvgPool2d(bev)
            self.neck = nn.Sequential(nn.Conv2d(ch * 2 * cameras, ch * 2, 1), nn.ReLU(inplace=True),
                                      nn.Conv2d(ch * 2, ch * 2, 3, padding=1), nn.ReLU(inplace=True))
            self.head = nn.Conv2d(ch * 2, classes, 1)

        def forward(self, x):
            b, n = x.shape[:2]
            f = self.pool(self.backbone(x.flatten(0, 1)))
            return self.head(self.neck(f.reshape(b, n * f.shape[1], self.bev, self.bev)))

    return Net()


def train_synthetic(args, device, tuned=True, compile_model=False):
    import torch
    from torch.utils.data import DataLoader
    torch.manual_seed(0)
    knobs = loader_knobs(tuned, device)
    kwargs = {k: v for k, v in knobs.items() if v is not None and not (k != "pin_memory" and knobs["num_workers"] == 0 and k != "num_workers")}
    loader = DataLoader(SyntheticCameras(args.batch_size * (args.steps + 2)), batch_size=args.batch_size, shuffle=False, **kwargs)
    model = perception_net().to(device)
    if compile_model and hasattr(torch, "compile"):
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, step_times, wait = [], [], 0.0
    it = iter(loader)
    start = time.time()
    for step in range(args.steps):
        t0 = time.time()
        images, target = next(it)
        t1 = time.time()
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        loss = torch.nn.functional.cross_entropy(model(images), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = loss.item()
        if device == "cuda":
            torch.cuda.synchronize()
        t2 = time.time()
        if not math.isfinite(value):
            return result("failed", reason="loss is %s at step %d" % (value, step), losses=losses)
        losses.append(value)
        if step > 0:  # the first step pays for worker start-up and lazy init
            wait += t1 - t0
            step_times.append(t2 - t0)
    total = sum(step_times) or 1e-9
    out = {
        "recipe": "synthetic", "device": device, "steps": args.steps, "batch_size": args.batch_size,
        "step_time_s": round(total / max(1, len(step_times)), 4),
        "samples_per_s": round(args.batch_size * len(step_times) / total, 2),
        "data_wait_share": round(wait / total, 3), "first_loss": losses[0], "last_loss": losses[-1],
        "losses": [round(l, 5) for l in losses], "wall_s": round(time.time() - start, 2),
        "knobs": dict(knobs, compile=bool(compile_model), shm_bytes=shm_bytes(), worker_transport=sharing_strategy(knobs)),
    }
    if device == "cuda":
        out["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return result("passed", **out)


def train_compiled(plan, args, device, eager):
    """The synthetic run again under torch.compile (inductor), with its speed-up over eager.

    The Plan says whether this torch x Python has torch.compile; where it should work and
    does not (no compiler in the image, an inductor bug), the run fails and says why."""
    import torch
    can = plan.get("torch_compile", hasattr(torch, "compile"))
    if not can:
        return result("skipped", reason=plan.get("torch_compile_why") or "torch %s has no torch.compile" % torch.__version__)
    try:
        run = train_synthetic(args, device, tuned=args.loader == "tuned", compile_model=True)
    except Exception as exc:  # noqa: BLE001 - the compile error is the finding
        lines = str(exc).strip().splitlines() or [""]
        return result("failed", reason="torch.compile: %s: %s" % (type(exc).__name__, lines[0][:300]))
    if run["status"] == "passed" and eager.get("status") == "passed":
        run["speedup_vs_eager"] = round(run["samples_per_s"] / max(eager["samples_per_s"], 1e-9), 2)
        # Same seed, same batches: the compiled net must start from the same loss as eager.
        gap = abs(run["first_loss"] - eager["first_loss"]) / max(abs(eager["first_loss"]), 1e-9)
        run["first_loss_gap_vs_eager"] = round(gap, 6)
        if gap > 1e-2:  # room for TF32 convolutions on Ampere and newer
            run["status"], run["reason"] = "failed", "compiled first loss differs from eager by %.2g (relative)" % gap
    return run


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_recipe(plan, args, device):
    """The model's own entry point, launched the way the catalog says, with --local-rank handled."""
    train = plan.get("train") or {}
    entry = train.get("entry")
    if not entry:
        return result("skipped", reason="the catalog has no train entry for this model")
    cmd = [sys.executable]
    launcher = train.get("launcher")
    nproc = max(1, gpu_count()) if device == "cuda" else 1
    if launcher == "torch.distributed.launch":  # its default port 29500 may be taken on a shared host
        cmd += ["-m", "torch.distributed.launch", "--nproc_per_node=%d" % nproc, "--master_port=%d" % free_port()]
    elif launcher == "torchrun":
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=%d" % nproc]
    cmd.append(entry)
    if train.get("config"):
        cmd.append(train["config"])
    cmd += list(train.get("extra_args") or [])
    steps_args = [a.replace("{steps}", str(args.steps)) for a in train.get("steps_args") or []]
    cmd += steps_args
    if device == "cpu":
        cmd += list(train.get("cpu_args") or [])  # how the model's script runs without a GPU
    env = dict(os.environ)
    if args.data:
        env["ENVBUILD_DATA"] = args.data
        # The repos here read their data from data/ under the repo root (data/nuscenes, data/infos).
        link = os.path.join(args.workdir, "data")
        if not os.path.lexists(link):
            os.symlink(args.data, link)
    start = time.time()
    code, out, err = run_bounded(cmd, args.train_timeout, env=env, cwd=args.workdir)
    if code is None:
        return result("failed", recipe="model", command=cmd, reason="timed out after %ds" % args.train_timeout,
                      stderr_tail=err[-1500:])
    status = "passed" if code == 0 else "failed"
    lines = [l for l in out.splitlines() if l.startswith("{")]
    report = {"recipe": "model", "command": cmd, "returncode": code, "wall_s": round(time.time() - start, 2),
              "steps": args.steps if steps_args else "the recipe's own (the catalog has no steps_args for it)"}
    if lines:
        try:
            report["metrics"] = json.loads(lines[-1])
        except ValueError:
            pass
    if re.search(r"\bnan\b|\binf\b", out.lower() + err.lower()) and "loss" in (out + err).lower():
        status, report["reason"] = "failed", "NaN/Inf in the training output"
    if status == "failed":
        report["stderr_tail"] = err[-1500:]
    return result(status, **report)


def level_train(plan, args):
    state, detail = gpu_state()
    if state == "unusable":  # training on the CPU instead would hide it
        return result("failed", reason=detail)
    device = "cuda" if state == "ok" else "cpu"
    runs = {}
    if args.recipe in ("synthetic", "both"):
        runs["synthetic"] = train_synthetic(args, device, tuned=args.loader == "tuned")
        if args.compile:
            runs["synthetic_compiled"] = train_compiled(plan, args, device, runs["synthetic"])
    if args.recipe in ("model", "both"):
        runs["model"] = train_recipe(plan, args, device)
    statuses = [r["status"] for r in runs.values()]
    status = "failed" if "failed" in statuses else ("passed" if "passed" in statuses else "skipped")
    return result(status, device=device, runs=runs)
