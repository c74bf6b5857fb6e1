"""envbuild's nvcc in the builder: drop the -gencode targets whose code runs on no arch of
TORCH_CUDA_ARCH_LIST, spell the dependency flags so ccache can cache, then run nvcc through ccache.

Some packages hard-code their archs: flash-attn 2.x compiles every kernel for sm_80 and, with
CUDA >= 11.8, sm_90 too, whatever TORCH_CUDA_ARCH_LIST says; on a small builder each arch nobody
asked for costs hours. torch's extension builder makes its -gencode flags from the list, so
they all stay. When every -gencode would go, nvcc gets its arguments unchanged and the audit
judges what it made.

torch < 2.0 asks nvcc for a depfile with the long flags (--generate-dependencies-with-compile
--dependency-output F) on Linux too; ccache 4.x (Debian 12 has 4.7) cannot cache a compile that
uses them (ccache/ccache#1663: "preprocessor error", every .cu compiled again on each rebuild).
The short flags, -MD -MF F, mean the same to nvcc and ccache caches them.

Usage (the builder's nvcc is a two-line script that runs this): python nvcc_archs.py REAL_NVCC ARGS...
Runs inside images: Python 3.8+, stdlib only.
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import archrules  # noqa: E402 - beside this file in the image

GENCODE_FLAGS = ("-gencode", "--generate-code")
GENCODE_JOINED = tuple(f + "=" for f in GENCODE_FLAGS)  # -gencode=arch=...,code=...
CODE_RE = re.compile(r"^(sm|compute)_(\d+)(\d)[a-z]?$")  # sm_90a is sm_90's arch-specific twin


def list_archs(arch_list):
    """TORCH_CUDA_ARCH_LIST ('8.0;9.0+PTX', or space separated) -> ['8.0', '9.0']."""
    items = arch_list.replace(" ", ";").split(";")
    return [i.partition("+")[0] for i in items if re.match(r"^\d+\.\d(\+PTX)?$", i)]


def codes(value):
    """'arch=compute_90,code=sm_90' or 'arch=compute_80,code=[sm_80,compute_80]' -> the codes,
    or None when the value names none this reads."""
    value = value.replace('"', "").replace("'", "")
    _, found, code = value.partition("code=")
    if not found:
        return None
    return [c for c in code.strip("[]").split(",") if c]


def serves(code, archs):
    """Whether this code runs on an arch of the list: SASS by archrules' rule, PTX on any arch
    at or above it; a code this cannot read counts as serving (it stays)."""
    m = CODE_RE.match(code)
    if not m:
        return True
    arch = [("%s.%s" % (m.group(2), m.group(3)))]
    sass, ptx = (arch, []) if m.group(1) == "sm" else ([], arch)
    return any(archrules.runs_on(sass, a, ptx) for a in archs)


def trim(args, archs):
    """(arguments without the -gencode targets that run on no arch of archs, the codes dropped)."""
    kept, dropped, i = [], [], 0
    while i < len(args):
        flag, value, width = args[i], None, 1
        if flag in GENCODE_FLAGS and i + 1 < len(args):
            value, width = args[i + 1], 2
        elif flag.startswith(GENCODE_JOINED):
            value = flag.partition("=")[2]
        found = codes(value) if value is not None else None
        if found and not any(serves(c, archs) for c in found):
            dropped.extend(found)
        else:
            kept.extend(args[i:i + width])
        i += width
    if dropped and not any(a in GENCODE_FLAGS or a.startswith(GENCODE_JOINED) for a in kept):
        return list(args), []  # nothing left to compile for: unchanged, the audit judges
    return kept, dropped


# nvcc's long dependency flags -> the short ones ccache understands (same meaning to nvcc)
SHORT_DEP_FLAGS = {
    "--generate-dependencies-with-compile": "-MD",
    "--generate-nonsystem-dependencies-with-compile": "-MMD",
    "--dependency-output": "-MF",
}


def short_dep_flags(args):
    """The arguments with nvcc's long dependency flags in their short form (also --flag=value)."""
    out = []
    for a in args:
        flag, eq, value = a.partition("=")
        if flag in SHORT_DEP_FLAGS:
            out.extend([SHORT_DEP_FLAGS[flag], value] if eq else [SHORT_DEP_FLAGS[flag]])
        else:
            out.append(a)
    return out


def wraps_itself(real):
    """Whether `real` is this wrapper (a script that runs nvcc_archs.py), not nvcc: exec'ing it
    would loop forever, each round a new Python."""
    try:
        with open(real, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return False
    return head.startswith(b"#!") and b"nvcc_archs.py" in head


def main(argv):
    real, args = argv[1], argv[2:]
    if wraps_itself(real):
        sys.stderr.write("envbuild nvcc: %s is this wrapper, not nvcc: the real nvcc was replaced\n" % real)
        sys.exit(1)
    archs = list_archs(os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
    if archs:
        args, dropped = trim(args, archs)
        if dropped:
            sys.stderr.write("envbuild nvcc: not compiling %s (no card of TORCH_CUDA_ARCH_LIST=%s runs it)\n"
                             % (",".join(dropped), ";".join(archs)))
    os.execvp("ccache", ["ccache", real] + short_dep_flags(args))


if __name__ == "__main__":
    main(sys.argv)
