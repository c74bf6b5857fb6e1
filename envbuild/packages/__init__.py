"""Building blocks for packages with native code, one module per family, registered in BLOCKS.

A block says which distributions it owns, chooses their pin for a torch build and a card (or
says why none fits), how they compile (environment, memory per job, C++ standard), what they
import as and which in-image op check covers them. The resolver, the renderer, bake and, through
plan.json, the in-image checks ask here. Adding a family: a module with a Block, one line below,
and its facts in the catalog.
"""

from __future__ import annotations

from .base import Block, CatalogCompiled, Target
from .flash_attn import FlashAttention
from .mmcv import Mmcv
from .pyg import PygOps
from .spconv import Spconv

# First match wins: the catch-all for catalog-described compiled packages comes last.
BLOCKS: tuple[Block, ...] = (Mmcv(), FlashAttention(), Spconv(), PygOps(), CatalogCompiled())
DEFAULT_GB_PER_JOB = Block.gb_per_job


def block_for(cat, name: str) -> Block | None:
    """The building block that owns a distribution, or None for a pure-Python package."""
    return next((b for b in BLOCKS if b.owns(cat, name)), None)


def by_family(family: str) -> Block:
    return next(b for b in BLOCKS if b.family == family)


__all__ = ["BLOCKS", "Block", "Target", "block_for", "by_family", "DEFAULT_GB_PER_JOB"]
