"""spconv 2.x: prebuilt wheels named after the CUDA runtime they bundle (spconv-cu117), so the
choice is the wheel whose CUDA major matches torch's; nothing is compiled."""

from __future__ import annotations

import re

from ..catalog import V, minor_key
from ..plan import Pin
from .base import Block

NAME_RE = re.compile(r"^spconv-cu(\d+)$")


class Spconv(Block):
    family = "spconv"
    compiled = False
    op_check = "spconv"
    also_covers = ("cumm",)  # its CUDA kernels live in cumm's library

    def owns(self, cat, name):
        return bool(NAME_RE.match(name))

    def import_name(self, name):
        return "spconv"

    def choose(self, target, name, spec, forced):
        digits = NAME_RE.match(name).group(1)
        have, cu = f"{digits[:-1]}.{digits[-1]}", target.cuda
        version = forced or ("" if spec == "*" else spec)
        if V(have).major == V(cu).major:
            return Pin(name, version, f"{name} bundles its CUDA {have} runtime; same major as torch's {cu}", spec,
                       "override" if forced else "upstream")
        if target.strict:
            return f"{name} is a CUDA {have} build; torch uses CUDA {cu}"
        same = [b for b in target.cat.spconv_builds if V(b).major == V(cu).major and minor_key(b) <= minor_key(cu)]
        if same:
            new = "spconv-cu" + max(same, key=minor_key).replace(".", "")
            return Pin(new, version, f"{name} is a CUDA {have} build; torch uses CUDA {cu}", f"{name} {spec}", "port")
        # Its wheels bundle their own CUDA runtime under a private soname (auditwheel), so an older
        # major loads beside torch's; a driver new enough for torch's CUDA runs it. The audit still
        # judges its kernels on every card.
        older = [b for b in target.cat.spconv_builds if minor_key(b) <= minor_key(cu)]
        if not older:
            return f"no spconv build for CUDA {cu} or older"
        newest = max(older, key=minor_key)
        new = "spconv-cu" + newest.replace(".", "")
        return Pin(new, version, f"no spconv build for CUDA {V(cu).major}.x; {new} bundles its own CUDA {newest} "
                   f"runtime, which loads beside torch's CUDA {cu}", f"{name} {spec}", "port")
