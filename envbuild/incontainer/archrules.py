"""Which GPU code runs on which card: the one place for the rule, read by the resolver, the
audit and the in-image smoke (so: Python 3.8, stdlib only).

A cubin (SASS) for X.y runs on X.z only when z >= y; PTX for X.y JIT-compiles on any card
at or above X.y; no 8.x cubin runs on 9.x.

Two kinds of code break that rule (the audit scanner names them "9.0a", "10.0f"):
- arch-specific, sm_XYa / compute_XYa (CUDA 12.0+): runs only on exactly X.Y, SASS and PTX alike;
  an sm_100a cubin does not run on a 10.3 card (B300).
- family-specific, sm_XYf / compute_XYf (CUDA 12.9+): runs on the cards of X.Y's family at or
  above X.Y; since CUDA 13 renamed Thor to 11.0 a family is one major (sm_100f: 10.0 and 10.3,
  sm_103f: 10.3 only, sm_120f: 12.0 and 12.1). For a cubin that is the plain rule; its PTX does
  not JIT-compile beyond the family (compute_100f never runs on 12.0).
"""

from __future__ import annotations

from functools import lru_cache


ARCH_SPECIFIC, FAMILY_SPECIFIC = "a", "f"


def split_arch(arch: str) -> tuple:
    """'10.0a' -> (10, 0, 'a'), '8.6' -> (8, 6, '')."""
    major, minor = arch.split(".")
    variant = minor.lstrip("0123456789")
    if variant not in ("", ARCH_SPECIFIC, FAMILY_SPECIFIC) or len(minor) == len(variant):
        raise ValueError("not a compute capability: %r" % arch)
    return int(major), int(minor[:len(minor) - len(variant)]), variant


def cc_key(cc: str) -> tuple:
    """'8.6' -> (8, 6), for ordering compute capabilities; '10.0a' -> (10, 0, 'a'), which sorts
    after 10.0 and before 10.3. Compare suffixed archs with sass_runs_on/ptx_runs_on, not with it."""
    major, minor, variant = split_arch(cc)
    return (major, minor, variant) if variant else (major, minor)


def sass_runs_on(sass: str, cc: str) -> bool:
    """A cubin for X.y runs on X.z only when z >= y; an arch-specific one (X.ya) only on X.y."""
    smaj, smin, variant = split_arch(sass)
    cmaj, cmin, _ = split_arch(cc)
    if variant == ARCH_SPECIFIC:
        return (smaj, smin) == (cmaj, cmin)
    return smaj == cmaj and smin <= cmin  # plain and family-specific (a family is one major)


def ptx_runs_on(ptx: str, cc: str) -> bool:
    """PTX for X.y JIT-compiles on every card at or above X.y; X.ya only on X.y; X.yf only within
    its family (same major, minor >= y)."""
    pmaj, pmin, variant = split_arch(ptx)
    cmaj, cmin, _ = split_arch(cc)
    if variant == ARCH_SPECIFIC:
        return (pmaj, pmin) == (cmaj, cmin)
    if variant == FAMILY_SPECIFIC:
        return pmaj == cmaj and pmin <= cmin
    return (pmaj, pmin) <= (cmaj, cmin)


def _best(archs):
    """The newest arch; at one X.Y the plain code, which all of a library's kernels have, before
    the arch- or family-specific code only some of them carry (torch: sm_90 beside sm_90a)."""
    return max(archs, key=lambda a: (cc_key(a)[:2], len(cc_key(a)) == 2))


@lru_cache(maxsize=None)
def _runs_on(sass: tuple, ptx: tuple, cc: str):
    fitting = [a for a in sass if sass_runs_on(a, cc)]
    if fitting:
        return _best(fitting)
    jit = [a for a in ptx if ptx_runs_on(a, cc)]
    return "%s+PTX" % _best(jit) if jit else None


def runs_on(sass, cc: str, ptx=()):
    """The arch whose code runs on cc: '8.0' (SASS), '8.0+PTX' (JIT-compiled), or None."""
    return _runs_on(tuple(sass), tuple(ptx), cc)


def code_name(arch: str) -> str:
    """'8.0' -> 'sm_80', '8.0+PTX' -> 'compute_80', '10.0a' -> 'sm_100a': how nvcc names it."""
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
