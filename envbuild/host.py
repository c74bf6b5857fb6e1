"""Facts about this host's GPUs, read once per command: doctor, pull, smoke and the card
choice of resolve/render/image all ask here."""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import lru_cache

QUERY = "index,name,compute_cap,driver_version,memory.total"


def _nvidia_smi(args: list[str], timeout: int = 30) -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        r = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


@lru_cache(maxsize=1)
def gpus() -> tuple[dict, ...]:
    """Each GPU nvidia-smi sees: index, name, cc, driver, memory_mb (empty: no GPU or no driver)."""
    out = _nvidia_smi([f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"])
    found = []
    for line in (out or "").strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 5:
            found.append({"index": parts[0], "name": parts[1], "cc": parts[2], "driver": parts[3],
                          "memory_mb": parts[4]})
    return tuple(found)


def driver() -> str | None:
    """The NVIDIA driver version of this host, or None when there is no GPU."""
    found = gpus()
    return found[0]["driver"] if found else None


def name_tokens(card) -> list[str]:
    """The words an nvidia-smi name of this card contains ('4090', 'rtx-4090'): what match_card
    looks for, and what the image's launcher matches GPU names against."""
    return list(dict.fromkeys((card.id, card.id.replace("rtx", ""), *card.aliases)))


def match_card(cat, name: str):
    """The catalog card an nvidia-smi name means ('NVIDIA H20' -> h20), or None."""
    low = name.lower()
    tokens = [(token, card) for card in cat.cards.values() for token in (card.id.replace("rtx", ""), *card.aliases)]
    for token, card in sorted(tokens, key=lambda t: -len(t[0])):  # 'h200' before 'h20'
        if re.search(rf"\b{re.escape(token)}\b", low):
            return card
    return None
