"""Which GPU code runs on which card: the one place for the rule, read by the resolver, the
audit and the in-image smoke (so: Python 3.8, stdlib only).

A cubin (SASS) for X.y runs on X.z only when z >= y; PTX for X.y JIT-compiles on any card
at or above X.y; no 8.x cubin runs on 9.x.
"""

from __future__ import annotations

from functools import lru_cache


def cc_key(cc: str) -> tuple:
    """'8.6' -> (8, 6), for ordering compute capabilities."""
    major, minor = cc.split(".")
    return int(major), int(minor)


def sass_runs_on(sass: str, cc: str) -> bool:
    """A cubin for X.y runs on X.z only when z >= y."""
    (smaj, smin), (cmaj, cmin) = cc_key(sass), cc_key(cc)
    return smaj == cmaj and smin <= cmin


@lru_cache(maxsize=None)
def _runs_on(sass: tuple, ptx: tuple, cc: str):
    fitting = [a for a in sass if sass_runs_on(a, cc)]
    if fitting:
        return max(fitting, key=cc_key)
    jit = [a for a in ptx if cc_key(a) <= cc_key(cc)]
    return "%s+PTX" % max(jit, key=cc_key) if jit else None


def runs_on(sass, cc: str, ptx=()):
    """The arch whose code runs on cc: '8.0' (SASS), '8.0+PTX' (JIT-compiled), or None."""
    return _runs_on(tuple(sass), tuple(ptx), cc)


def code_name(arch: str) -> str:
    """'8.0' -> 'sm_80', '8.0+PTX' -> 'compute_80': how nvcc and cuobjdump name it."""
    base, _, ptx = arch.partition("+")
    return ("compute_" if ptx else "sm_") + base.replace(".", "")


@lru_cache(maxsize=None)
def _extension_arch(cc: str, nvcc_archs: tuple, torch_max: str):
    usable = [a for a in nvcc_archs if cc_key(a) <= cc_key(torch_max)]
    if cc in usable:
        return cc, "native SASS for compute capability %s" % cc
    limit = []
    if cc not in nvcc_archs:
        limit.append("nvcc cannot emit %s" % code_name(cc))
    elif cc_key(cc) > cc_key(torch_max):
        limit.append("torch's extension builder knows archs only up to %s" % torch_max)
    same_major = [a for a in usable if sass_runs_on(a, cc)]
    if same_major:
        best = max(same_major, key=cc_key)
        return best, "%s: %s SASS runs on %s (same major, lower minor)" % ("; ".join(limit), code_name(best), cc)
    lower = [a for a in usable if cc_key(a) < cc_key(cc)]
    if lower:
        best = max(lower, key=cc_key)
        return best + "+PTX", "%s: %s PTX JIT-compiles forward on %s" % ("; ".join(limit), code_name(best + "+PTX"), cc)
    return None, "no arch this nvcc can emit runs on %s" % cc


def extension_arch(cc: str, nvcc_archs, torch_max: str):
    """(TORCH_CUDA_ARCH_LIST entry, why) to compile extensions for cc: native, else same-major
    SASS, else PTX; (None, why) when this nvcc and torch cannot make code for it."""
    return _extension_arch(cc, tuple(nvcc_archs), torch_max)


def union_arch_list(entries, ptx_for_newest: bool = False) -> str:
    """'8.0' + '9.0' -> '8.0;9.0'; an arch with +PTX anywhere keeps its PTX."""
    archs = {}
    for entry in entries:
        for item in entry.split(";"):
            arch, _, ptx = item.partition("+")
            archs[arch] = archs.get(arch, False) or bool(ptx)
    order = sorted(archs, key=cc_key)
    if ptx_for_newest and order:
        archs[order[-1]] = True
    return ";".join(a + ("+PTX" if archs[a] else "") for a in order)
