"""Smoke stage: image + card -> JSON report, by running incontainer/smoke.py in the image.

The container always goes away (also on Ctrl-C or a timeout). GPU levels run where the
host has NVIDIA GPUs and are reported as skipped, with the reason, where it has none.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from . import labels as label
from . import engine, host, paths
from .build import split_ref
from .errors import BadInput, OperationFailed
from .incontainer.smoke_common import LEVELS
TIMEOUT = 3600  # seconds a smoke container may run (envbuild smoke --timeout)


def parse_levels(value: str | None) -> list[str]:
    """Default: every level (GPU levels report 'skipped' with the reason where there is no GPU)."""
    if value is None or value == "":
        return list(LEVELS)
    levels = [v.strip() for v in value.split(",") if v.strip()]
    if not levels:  # ",,," names no level: not "all of them", and not none either
        raise BadInput(f"--level {value!r} names no level", f"choose from {', '.join(LEVELS)}, or leave --level out for all")
    bad = [v for v in levels if v not in LEVELS]
    if bad:
        raise BadInput(f"unknown smoke level(s) {', '.join(bad)}", f"choose from {', '.join(LEVELS)}")
    return levels


def shm_size_bytes() -> int:
    """Docker's 64 MB /dev/shm kills DataLoader workers; give the container a real one."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return int(min(max(total // 4, 1 << 30), 16 << 30))


def run(image: str, levels: list[str], gpus: str = "all", steps: int = 20, recipe: str = "synthetic",
        data: str | None = None, ckpt_dir: str | None = None, ops_check: str | None = None,
        compile_model: bool = False, loader: str = "tuned", ipc_host: bool = False, timeout: int = TIMEOUT,
        comm_timeout: int = 120, ckpt_mb: int = 64, card=None) -> dict:
    """Run the levels in the image; `card` (a catalog Card) is the card this run is for: the one
    asked, else the GPU here. A multi-card image without either is judged for all its cards."""
    client = engine.client()
    import docker
    from docker.errors import ImageNotFound
    try:
        img = client.images.get(image)
    except ImageNotFound:
        raise BadInput(f"no local image {image!r}", "build it (envbuild image) or pull it (envbuild pull)") from None
    if label.MODEL not in (img.labels or {}):
        raise BadInput(f"{image} is not an envbuild image (no io.envbuild labels)", "build it with envbuild image")
    driver = host.driver()
    # The image's ENTRYPOINT (launch.py) runs first: it decides the host settings (NCCL P2P) for
    # the GPUs this container gets, and every level and command smoke.py starts inherits them.
    cmd = ["python", f"{paths.HELPERS}/smoke.py", "--level", ",".join(levels), "--steps", str(steps),
           "--recipe", recipe, "--loader", loader, "--comm-timeout", str(comm_timeout), "--ckpt-mb", str(ckpt_mb)]
    volumes, mount_args = _mounts(data, ckpt_dir, ops_check)
    cmd += mount_args
    if compile_model:
        cmd.append("--compile")
    kwargs = {"volumes": volumes}
    if ipc_host:
        kwargs["ipc_mode"] = "host"
    else:
        kwargs["shm_size"] = shm_size_bytes()
    if driver and gpus != "none":
        count = -1 if gpus == "all" else int(gpus)
        kwargs["device_requests"] = [docker.types.DeviceRequest(count=count, capabilities=[["gpu"]])]
    from docker.errors import APIError
    start = time.monotonic()
    try:
        code, out, err = engine.run_container(img.id, cmd, timeout=timeout, what=f"the smoke container of {image}",
                                              limit_hint="give it longer with envbuild smoke --timeout SECONDS",
                                              **kwargs)
    except APIError as exc:
        if "device_requests" in kwargs and "gpu" in str(exc).lower():
            raise OperationFailed(f"Docker cannot give the container the GPUs: {exc.explanation or exc}",
                                  "install nvidia-container-toolkit, run `nvidia-ctk runtime configure --runtime=docker` "
                                  "and restart dockerd (envbuild doctor checks this)") from None
        raise OperationFailed(f"cannot start the smoke container for {image}: {exc.explanation or exc}") from None
    except OperationFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - a daemon that went away; Ctrl-C passes through
        raise OperationFailed(f"smoke run of {image} did not finish: {exc}") from None
    report = _report(image, code, out, err)
    report["image"] = image
    report["image_id"] = img.id
    if card is not None:
        built_for = (img.labels or {}).get(label.CARDS) or str(report.get("card"))
        report.update(card=card.id, card_name=card.name, cc=card.cc)
        if card.id not in built_for.split(","):
            report.setdefault("notes", []).append(f"image built for {built_for}, smoke run for {card.id}")
    report["host"] = {"driver": driver, "gpus_requested": gpus if driver else "none (no NVIDIA driver on this host)",
                      "shm": "host IPC" if ipc_host else f"{kwargs.get('shm_size', 0) // 2**20} MB",
                      "seconds": round(time.monotonic() - start, 1)}
    return report


def _mounts(data: str | None, ckpt_dir: str | None, ops_check: str | None) -> tuple[dict, list[str]]:
    """The host folders and file the levels read, as Docker volumes, and the smoke.py
    arguments that point at them inside the container."""
    volumes, cmd = {}, []
    if data:
        if not Path(data).is_dir():
            raise BadInput(f"--data {data} is not a directory", "point --data at the dataset folder")
        volumes[str(Path(data).resolve())] = {"bind": "/data", "mode": "ro"}
        cmd += ["--data", "/data"]
    if ckpt_dir:
        if not Path(ckpt_dir).is_dir():
            raise BadInput(f"--ckpt-dir {ckpt_dir} is not a directory", "create it first (a NAS or CPFS mount)")
        volumes[str(Path(ckpt_dir).resolve())] = {"bind": "/ckpt", "mode": "rw"}
        cmd += ["--ckpt-dir", "/ckpt"]
    if ops_check:
        path = Path(ops_check).resolve()
        if not path.is_file():
            raise BadInput(f"--ops-check {ops_check} is not a file", "a Python file defining check(device)")
        volumes[str(path)] = {"bind": paths.OPS_CHECK, "mode": "ro"}
        cmd += ["--ops-check", paths.OPS_CHECK]
    return volumes, cmd


def _report(image: str, code: int, out: str, err: str) -> dict:
    """The JSON report smoke.py printed on stdout: from its first "{" to the end (what comes
    before is noise); no report is a failure that shows the end of stderr."""
    start_json = out.find("{")
    try:
        report = json.loads(out[start_json:]) if start_json >= 0 else None
    except ValueError:
        report = None
    if report is None:
        tail = "\n".join(err.strip().splitlines()[-15:])
        raise OperationFailed(f"smoke run of {image} printed no report (exit {code}):\n{tail}")
    levels = report.get("levels") if isinstance(report, dict) else None
    if not (isinstance(levels, dict) and isinstance(report.get("ok"), bool)
            and all(isinstance(v, dict) and isinstance(v.get("status"), str) for v in levels.values())):
        raise OperationFailed(f"smoke run of {image} printed a report envbuild cannot read (exit {code}): "
                              "no levels with a status, or no verdict",
                              "is the image's /opt/envbuild/smoke.py the one envbuild wrote? rebuild the image")
    return report


def is_report(text: str) -> bool:
    """Whether a file's text is a smoke report envbuild wrote (so --report may replace it)."""
    try:
        data = json.loads(text)
    except ValueError:
        return False
    return isinstance(data, dict) and {"levels", "image", "image_id", "host"} <= set(data)


def summary(report: dict) -> dict:
    """What an image carries about its smoke run (label io.envbuild.smoke)."""
    gpu = (report.get("environment") or {}).get("gpus") or []
    return {"card": report.get("card"), "gpu": gpu[0] if gpu else None, "ok": report.get("ok"),
            "levels": {k: v.get("status") for k, v in (report.get("levels") or {}).items()},
            "driver": (report.get("host") or {}).get("driver")}


def records(labels: dict) -> dict:
    """{card: smoke summary} an image carries (one entry per card it was smoke-tested for)."""
    raw = (labels or {}).get(label.SMOKE)
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    if "levels" in data:  # one summary, as images before multi-card labels carry it
        return {str(data.get("card")): data}
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def record(refs, report: dict) -> str:
    """Add the smoke summary to the image as a label (a metadata-only commit); returns the new id.

    Summaries for other cards stay; every reference given (all of `image --tag`s) moves to the
    labelled image, other tags stay put."""
    refs = [refs] if isinstance(refs, str) else list(refs)
    client = engine.client()
    img = client.images.get(refs[0])
    kept = records(img.labels)
    s = summary(report)
    kept[str(s["card"])] = s
    value = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    # A created (never started) container has the image's exact config; committing it with one
    # LABEL change adds an empty layer and nothing else.
    container = client.containers.create(img.id)
    try:
        new = container.commit(changes=[f"LABEL {label.SMOKE}={json.dumps(value)}"])
    finally:
        container.remove(force=True)
    for ref in refs:
        if ref != img.id and not ref.startswith("sha256:"):
            new.tag(*split_ref(ref))
    return new.id


def validated_on(labels: dict, card: str) -> str:
    found = records(labels)
    if not found:
        return "not validated: no smoke report recorded with this image"
    s = found.get(card) or next((v for k, v in found.items() if card in k.split("+") or k == "portable"), None)
    if s is None:
        return f"not validated for {card}: smoke recorded for {', '.join(sorted(found))} only"
    levels = s.get("levels") or {}
    gpu_levels = [k for k in ("ops", "comm") if levels.get(k) == "passed"]
    where = f"on {s.get('gpu')}" if s.get("gpu") else "without a GPU (CPU levels only)"
    verdict = "passed" if s.get("ok") else "FAILED"
    same = "the requested card" if s.get("card") == card else f"cards {s.get('card')}, which include {card}"
    return f"smoke {verdict} {where} for {same}; GPU levels passed: {', '.join(gpu_levels) or 'none'}"
