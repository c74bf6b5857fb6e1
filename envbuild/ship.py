"""Ship stage: push, pull (with a host preflight), and the list of local envbuild images."""

from __future__ import annotations

import json
from functools import lru_cache

from . import labels as label
from . import engine, host
from .build import check_ref, split_ref
from .errors import BadInput, OperationFailed


def push(ref: str, echo=None) -> str:
    """Push a local image; returns the registry digest. Refusals and auth needs say so."""
    check_ref(ref)
    client = engine.client(stream=True)
    from docker.errors import ImageNotFound, APIError
    try:
        client.images.get(ref)
    except ImageNotFound:
        raise BadInput(f"no local image {ref!r}", "see `envbuild images`") from None
    repo, tag = split_ref(ref)
    digest = None
    try:
        for event in client.images.push(repo, tag, stream=True, decode=True):
            if "error" in event:
                msg = event.get("error", "")
                low = msg.lower()
                if "unauthorized" in low or "authentication required" in low or "denied" in low:
                    raise OperationFailed(f"registry refused the push of {ref}: {msg}",
                                          f"log in first: docker login {repo.split('/')[0]}")
                raise OperationFailed(f"push of {ref} failed: {msg}")
            aux = event.get("aux") or {}
            if aux.get("Digest"):
                digest = aux["Digest"]
            if echo and event.get("status") and not event.get("progressDetail"):
                echo(f"{event.get('id', '')} {event['status']}".strip())
    except APIError as exc:
        raise OperationFailed(f"push of {ref} failed: {exc.explanation or exc}") from None
    except Exception as exc:  # connection refused, DNS, TLS
        if isinstance(exc, OperationFailed):
            raise
        raise OperationFailed(f"cannot reach the registry for {ref}: {exc}",
                              "is the registry running and reachable? plain-http registries must be "
                              "listed in the daemon's insecure-registries (127.0.0.0/8 is by default)") from None
    if not digest:
        raise OperationFailed(f"push of {ref} reported no digest")
    return digest


@lru_cache(maxsize=None)
def in_registry(ref: str) -> bool:
    """Whether the registry holds ref (its manifest, asked through the daemon; nothing pulled),
    asked once per command: a context is rendered again after locking. Unreachable, refusing or
    not there counts as absent: the caller compiles instead."""
    try:
        engine.client().images.get_registry_data(check_ref(ref))
        return True
    except Exception:  # noqa: BLE001 - not found, connection refused, DNS, TLS: the cache is not there
        return False


def _vkey(v: str) -> tuple:
    return tuple(int(p) for p in v.split(".") if p.isdigit())


def driver_check(driver: str | None, min_driver: str, compat_driver: str, cuda: str) -> tuple[str, str]:
    """('ok'|'warn'|'fail'|'skip', reason) for running a CUDA `cuda` image on this driver."""
    if driver is None:
        return "skip", "no NVIDIA driver on this host (no GPU check)"
    if _vkey(driver) >= _vkey(min_driver):
        return "ok", f"driver {driver} >= {min_driver} required by CUDA {cuda}"
    if _vkey(driver) >= _vkey(compat_driver):
        return "warn", (f"driver {driver} < {min_driver}: CUDA {cuda} runs only through minor-version "
                        f"compatibility (>= {compat_driver}); PTX JIT of newer code will fail")
    return "fail", f"driver {driver} is older than {compat_driver}: CUDA {cuda} images cannot run"


def pull(ref: str, min_driver: str, compat_driver: str, cuda: str, cards=(), echo=None) -> dict:
    """Pull after a driver check; says, for each card of the Plan, whether a smoke run validated it."""
    status, reason = driver_check(host.driver(), min_driver, compat_driver, cuda)
    if status == "fail":
        raise OperationFailed(f"not pulling {ref}: {reason}", "update the NVIDIA driver or pick an older --cuda")
    client = engine.client(stream=True)
    from docker.errors import APIError, NotFound
    repo, tag = split_ref(ref)
    try:
        image = client.images.pull(repo, tag=tag)
    except NotFound:
        raise OperationFailed(f"{ref} is not in the registry", "build and push it: envbuild image ... --push") from None
    except APIError as exc:
        raise OperationFailed(f"pull of {ref} failed: {exc.explanation or exc}") from None
    from .smoke import validated_on
    return {"image": ref, "id": image.id, "driver": status, "driver_reason": reason,
            "validated": {c: validated_on(image.labels, c) for c in cards}, "smoke": image.labels.get(label.SMOKE)}


def local_images() -> list[dict]:
    client = engine.client()
    out = []
    for image in client.images.list(filters={"label": label.MODEL}):
        labels = image.labels or {}
        try:
            plan = json.loads(labels.get(label.PLAN, "{}"))
        except ValueError:
            plan = {}
        if not isinstance(plan, dict):  # a label anyone could set: only an object is a Plan summary
            plan = {}
        out.append({
            "id": image.short_id.split(":")[-1], "tags": image.tags, "size_bytes": image.attrs.get("Size", 0),
            "model": labels.get(label.MODEL), "card": labels.get(label.CARD),
            "mode": labels.get(label.MODE), "arch_list": labels.get(label.ARCH_LIST),
            "torch": plan.get("torch"), "cuda": plan.get("cuda"), "python": plan.get("python"),
            "fixers": plan.get("fixers", []), "smoke": labels.get(label.SMOKE),
        })
    return sorted(out, key=lambda i: (i["model"] or "", i["card"] or "", i["id"]))
