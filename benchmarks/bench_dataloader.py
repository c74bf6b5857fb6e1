"""Tuned vs untuned data loading on the CPU, inside an envbuild image (one run, ratio).

Untuned: num_workers=0, no pinning, Docker's defaults. Tuned: workers from the cores,
persistent workers, prefetch, and a sized /dev/shm (what `envbuild smoke` applies).
Usage: python benchmarks/bench_dataloader.py [IMAGE]   (default: the newest local envbuild image)
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ENVBUILD_DOCKER", "/usr/bin/docker")

import results  # noqa: E402 - benchmarks/results.py, beside this file


def main():
    from envbuild import ship, smoke
    if len(sys.argv) > 1:
        image = sys.argv[1]
    else:
        images = [i for i in ship.local_images() if i["tags"]]
        if not images:
            print(json.dumps({"skipped": "no local envbuild image: build one (make image) or pass IMAGE"}))
            return 0
        image = images[0]["tags"][0]
    out = {"image": image}
    for loader in ("untuned", "tuned"):
        report = smoke.run(image, ["train"], steps=30, loader=loader)
        run = report["levels"]["train"]["runs"]["synthetic"]
        out[loader] = {k: run[k] for k in ("samples_per_s", "step_time_s", "data_wait_share", "knobs")}
    out["ratio_tuned_to_untuned_samples_per_s"] = round(out["tuned"]["samples_per_s"] / out["untuned"]["samples_per_s"], 3)
    # On a CPU-only host the model competes with loader workers for the same cores, so
    # samples/s can drop; the share of each step spent waiting on data is what carries over
    # to a GPU host, where the model runs on the GPU and the cores are free for workers.
    out["ratio_tuned_to_untuned_data_wait"] = round(
        out["tuned"]["data_wait_share"] / max(out["untuned"]["data_wait_share"], 1e-9), 3)
    print(json.dumps(out, indent=2))
    results.write("dataloader", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
