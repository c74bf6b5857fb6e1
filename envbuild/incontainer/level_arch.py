"""Smoke level "arch": torch and every compiled extension carry code (same-major SASS or older
PTX) for the Plan's card(s) and, when a GPU is visible, for that GPU. Static without a GPU.
"""

from __future__ import annotations

import re

import archrules
from archrules import cc_key
from smoke_common import CUDA_LIBRARY, gpu_libraries, gpu_state, result


def runs_on(sass, ptx, cc):
    """The code that runs on cc ('sm_80' SASS, 'compute_80' PTX), or None."""
    arch = archrules.runs_on(sass, cc, ptx)
    return archrules.code_name(arch) if arch else None


def arch_flags(flags, kind):
    """torch's arch flags ('sm_80 sm_90a compute_90') -> sorted archs of one kind ('8.0', '9.0a');
    the 'a'/'f' suffix stays: sm_90a runs only on 9.0."""
    found = re.findall(r"\b%s_(\d+)(\d)([af]?)\b" % kind, flags or "")
    return sorted({"%s.%s%s" % m for m in found}, key=cc_key)


def level_arch(plan, args):
    import torch
    ccs = plan["cc"].split(",")  # a multi-card image is for each of its cards
    flags = torch._C._cuda_getArchFlags() if hasattr(torch._C, "_cuda_getArchFlags") else ""
    sass, ptx = arch_flags(flags, "sm"), arch_flags(flags, "compute")
    via = dict((cc, runs_on(sass, ptx, cc)) for cc in ccs)
    out = {"card_cc": plan["cc"], "torch_cuda": torch.version.cuda, "torch_archs": sass, "torch_ptx": ptx,
           "torch_runs_via": via[ccs[0]] if len(ccs) == 1 else via}
    problems = ["torch %s ships %s: nothing runs on %s" % (torch.__version__, sass, cc) for cc in ccs if not via[cc]]
    libs = gpu_libraries()
    if libs:
        ext = [dict(l) for l in libs if not CUDA_LIBRARY.search(l["path"])]
        for lib in ext:
            lib_via = dict((cc, runs_on(lib["sass"], lib["ptx"], cc)) for cc in ccs)
            lib["runs_via"] = lib_via[ccs[0]] if len(ccs) == 1 else lib_via
            for cc in ccs:
                if not lib_via[cc]:
                    problems.append("%s has SASS %s PTX %s: nothing for %s" % (lib["path"], lib["sass"], lib["ptx"], cc))
        out["extensions"] = ext
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_capability(0)
        out["device_cc"] = "%d.%d" % dev
        out["device_name"] = torch.cuda.get_device_name(0)
        out["device_arch_list"] = torch.cuda.get_arch_list()
        # The image is for the Plan's card; what matters here is whether its code runs on this GPU.
        here = out["device_cc"]
        if not runs_on(sass, ptx, here):
            problems.append("torch ships %s: nothing runs on this GPU, %s (%s)" % (sass, out["device_name"], here))
        for lib in out.get("extensions", []):
            if not runs_on(lib["sass"], lib["ptx"], here):
                problems.append("%s has nothing for this GPU, %s (%s)" % (lib["path"], out["device_name"], here))
        if here not in ccs:
            out["note"] = "the image was built for %s (%s); this GPU is %s" % (plan["card"], plan["cc"], here)
    else:
        state, detail = gpu_state()
        out["device"] = "no GPU visible: static check only" if state == "none" else detail
        if state == "unusable":
            problems.append(detail)
    out["problems"] = problems
    return result("failed" if problems else "passed", **out)
