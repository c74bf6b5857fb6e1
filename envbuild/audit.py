"""Audit stage: image -> per-library SASS/PTX archs, judged against the card.

The scan runs inside the image with its own Python (incontainer/audit_scan.py reads the
fatbin headers of every .so), so it needs no GPU and no CUDA toolkit on the host.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import labels as label
from . import engine, paths
from .catalog import Card
from .errors import BadInput, OperationFailed
from .incontainer.archrules import code_name, runs_on

SCANNER = Path(__file__).resolve().parent / "incontainer" / "audit_scan.py"
ROOTS = ["/opt", "/workspace", "/usr/local/lib", "/usr/lib/python3", "/root/.local"]
FIND_PYTHON = (f'for p in {paths.VENV}/bin/python python3 python; do '
               'if command -v "$p" >/dev/null 2>&1; then exec "$p" /envbuild-audit/audit_scan.py "$@"; fi; done; '
               'echo "no python in the image" >&2; exit 3')


CUDA_LIBRARY = re.compile(r"/site-packages/nvidia/|/lib(cu|nv|cudnn|nccl|nvrtc|nvjpeg)[^/]*\.so[^/]*$")


def kind_of(path: str) -> str:
    """'cuda-library' for NVIDIA's redistributed CUDA libraries (cuBLAS, cuDNN, NCCL...), else 'extension'.

    NVIDIA ships some host-side shims (libnvblas, libcufftw) with only a token sm_52 kernel;
    they are reported, but only compiled extensions (torch's, mmcv, flash-attn, spconv, the
    model's) decide the verdict.
    """
    return "cuda-library" if CUDA_LIBRARY.search(path) else "extension"


def judge(library: dict, cc: str) -> dict:
    """Whether a library's GPU code runs on compute capability cc, and through what."""
    arch = runs_on(library["sass"], cc, library["ptx"])
    via = arch and code_name(arch) + (" PTX (JIT at first launch)" if arch.endswith("+PTX") else " SASS")
    return {**library, "runs": via is not None, "via": via, "kind": kind_of(library["path"])}


def specific_note(library: dict) -> str:
    """Why the arch- and family-specific code a library has does not count: '' when it has none."""
    notes = []
    for arch, kind in [(a, "") for a in library["sass"]] + [(a, "+PTX") for a in library["ptx"]]:
        base = arch.rstrip("af")
        if arch.endswith("a"):
            notes.append(f"{code_name(arch + kind)} is arch-specific: it runs only on {base}")
        elif arch.endswith("f"):
            notes.append(f"{code_name(arch + kind)} is family-specific: it runs only on {base.split('.')[0]}.x "
                         f"at or above {base}")
    return f" ({'; '.join(notes)})" if notes else ""


TIMEOUT = 1800  # seconds the scan container may run (envbuild audit --timeout)


def scan(image: str, timeout: float = TIMEOUT) -> list[dict]:
    client = engine.client()
    from docker.errors import APIError, ImageNotFound
    try:
        client.images.get(image)
    except ImageNotFound:
        raise BadInput(f"no local image {image!r}", "pull or build it first") from None
    try:
        code, out, err = engine.run_container(
            image, ["sh", "-c", FIND_PYTHON, "audit", *ROOTS], timeout=timeout, entrypoint=[], network_disabled=True,
            what=f"the audit scan of {image}", limit_hint="give it longer with envbuild audit --timeout SECONDS",
            volumes={str(SCANNER.parent): {"bind": "/envbuild-audit", "mode": "ro"}})
    except APIError as exc:
        raise OperationFailed(f"cannot start the audit container for {image}: {exc.explanation or exc}") from None
    if code != 0:
        raise OperationFailed(f"audit scan failed in {image}: {err.strip()[-500:]}")
    try:
        libraries = json.loads(out)["libraries"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise OperationFailed(f"audit scan of {image} printed no report",
                              "is /envbuild-audit/audit_scan.py envbuild's? run it again") from None
    fields = {"path": str, "sass": list, "ptx": list}
    if not isinstance(libraries, list) or not all(
            isinstance(lib, dict) and all(isinstance(lib.get(k), kind) for k, kind in fields.items())
            and all(isinstance(a, str) for a in lib["sass"] + lib["ptx"]) for lib in libraries):
        raise OperationFailed(f"audit scan of {image} printed a report envbuild cannot read "
                              "(each library needs a path and lists of SASS and PTX archs)",
                              "run it again; report it if it persists")
    return libraries


TORCH_LIB = re.compile(r"/site-packages/torch/")


def audit(image: str, card: Card, scanned: list[dict] | None = None) -> dict:
    """The verdict for one card; pass `scanned` (scan()'s result) to judge several cards from one scan."""
    libs = [judge(lib, card.cc) for lib in (scan(image) if scanned is None else scanned)]
    failing = [lib for lib in libs if not lib["runs"] and lib["kind"] == "extension"]
    warnings = [f"{lib['path']} (NVIDIA CUDA library) has no code for {card.cc}" for lib in libs
                if not lib["runs"] and lib["kind"] != "extension"]
    return {
        "image": image, "card": card.id, "card_name": card.name, "cc": card.cc,
        "libraries": libs, "ok": not failing, "warnings": warnings,
        # torch's own wheel decides what runs at all: say so apart from the extensions envbuild compiled
        "torch_failures": [lib["path"].rsplit("/", 1)[-1] for lib in failing if TORCH_LIB.search(lib["path"])],
        "failures": [f"{lib['path']}: has SASS {', '.join(lib['sass']) or 'none'}, PTX {', '.join(lib['ptx']) or 'none'}; "
                     f"{card.name} needs sm_{card.cc.split('.')[0]}x SASS with minor <= {card.cc.split('.')[1]} "
                     f"or PTX <= {card.cc}{specific_note(lib)}" for lib in failing],
    }


def image_cards(image: str) -> str | None:
    """The cards an envbuild image was built for (comma-separated), from its labels."""
    client = engine.client()
    try:
        labels = client.images.get(image).labels or {}
    except Exception:
        return None
    return labels.get(label.CARDS) or labels.get(label.CARD)
