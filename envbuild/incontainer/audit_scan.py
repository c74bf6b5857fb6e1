"""List the GPU code (SASS and PTX archs) in every shared library under the given roots.

Reads each ELF's .nv_fatbin section directly (fatbin container headers carry the kind
and the SM number of every embedded cubin and PTX), so it needs no CUDA toolkit and no
GPU. Runs inside images: Python 3.8+, stdlib only. Prints one JSON document.

An arch is "X.Y", or "X.Ya" / "X.Yf" for arch-specific (sm_90a, sm_100a: runs only on exactly
X.Y) and family-specific (sm_100f) code, which the entry header marks in its flags (see
ENTRY_FLAGS); archrules judges all three.

Usage: python audit_scan.py ROOT [ROOT ...]
       python audit_scan.py --wheels FOLDER --cc 8.0,9.0   (a vendor's wheels, before they are
       trusted: exit 1 unless every library with GPU code in them runs on each compute capability)
"""

import json
import os
import re
import struct
import sys

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2
# An entry header: kind u16 @0, header size u32 @4, payload size u64 @8, SM number u32 @28 (100
# for sm_100), flags u64 @40. Measured with nvcc 13.0 (V13.0.88) on one kernel per -gencode, the
# same code otherwise: flags 0x11 for sm_90 and 0x100011 for sm_90a, 0x1000011 for sm_100,
# 0x1100011 for sm_100a / sm_103a and 0x1200011 for sm_100f / sm_121f; PTX entries 0x8011,
# 0x108011 (compute_100a), 0x208011 (compute_100f); compressed entries (0x8000) keep the bits.
# So bit 20 marks arch-specific code and bit 21 family-specific; the cubin's own ELF header
# (e_flags) is the same for sm_100, sm_100a and sm_100f.
ENTRY_FLAGS = 40
ARCH_SPECIFIC_FLAG, FAMILY_SPECIFIC_FLAG = 1 << 20, 1 << 21


def arch_key(arch):
    """'10.0a' -> (10, 0, 'a'): plain X.Y first, then its 'a' and 'f' twins, then X.Y+1."""
    major, minor = arch.split(".")
    digits = minor.rstrip("af")
    return int(major), int(digits), minor[len(digits):]


# Where GPU code lies in a library: nvcc's own section, and the large-data sections a library
# linked with a large code model keeps it in (cuFFT 12 from CUDA 13: its .nv_fatbin holds one
# sm_75 stub; 23,983 containers with SASS 7.5-12.0 are in .ldata).
FATBIN_SECTIONS = (".nv_fatbin", ".ldata", ".lrodata")
SHT_NOBITS = 8  # a section with no bytes in the file (.bss, .lbss): its offset is another's


def elf_sections(fh):
    """{name: (offset, size)} of the sections with bytes in a 64-bit little-endian ELF file, or
    {} if not one."""
    fh.seek(0)
    ident = fh.read(64)
    if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
        return {}
    shoff = struct.unpack_from("<Q", ident, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ident, 0x3A)
    if not shoff or not shnum or shentsize < 64:
        return {}
    fh.seek(shoff)
    table = fh.read(shentsize * shnum)
    headers = []
    for i in range(shnum):
        name, kind, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", table, i * shentsize)
        headers.append((name, kind, offset, size))
    str_off, str_size = headers[shstrndx][2], headers[shstrndx][3]
    fh.seek(str_off)
    strtab = fh.read(str_size)
    out = {}
    for name, kind, offset, size in headers:
        if kind != SHT_NOBITS:
            end = strtab.find(b"\0", name)
            out[strtab[name:end].decode("ascii", "replace")] = (offset, size)
    return out


def fatbin_archs(data):
    """(sass, ptx): sorted lists of 'X.Y' archs ('X.Ya', 'X.Yf' for arch- and family-specific
    code) in the fatbin containers among a section's bytes (containers follow each other in
    .nv_fatbin; in .ldata other data lies between them, at any alignment)."""
    sass, ptx = set(), set()
    magic = struct.pack("<I", FATBIN_MAGIC)
    pos = data.find(magic)
    while pos != -1 and pos + 16 <= len(data):
        _magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if not 16 <= header_size <= 64:  # the magic's four bytes inside other data
            pos = data.find(magic, pos + 1)
            continue
        entry = pos + header_size
        end = min(len(data), entry + fat_size)
        while entry + 32 <= end:
            kind, _unk, eh_size, size = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            if eh_size == 0:
                break
            flags = struct.unpack_from("<Q", data, entry + ENTRY_FLAGS)[0] if eh_size >= ENTRY_FLAGS + 8 else 0
            suffix = "a" if flags & ARCH_SPECIFIC_FLAG else "f" if flags & FAMILY_SPECIFIC_FLAG else ""
            name = "%d.%d%s" % (arch // 10, arch % 10, suffix)
            if kind == KIND_ELF:  # other kinds (8: LTO IR, as cuFFT ships) neither run nor JIT
                sass.add(name)
            elif kind == KIND_PTX:
                ptx.add(name)
            entry += eh_size + size
        pos = data.find(magic, max(end, pos + 1))
    return sorted(sass, key=arch_key), sorted(ptx, key=arch_key)


def scan_file(path):
    with open(path, "rb") as fh:
        sections = elf_sections(fh)
        if ".nv_fatbin" not in sections:  # nvcc built none of it: its large data is not read
            return None
        sass, ptx = set(), set()
        for name in (n for n in FATBIN_SECTIONS if n in sections):
            offset, size = sections[name]
            fh.seek(offset)
            found = fatbin_archs(fh.read(size))
            sass.update(found[0])
            ptx.update(found[1])
        sass, ptx = sorted(sass, key=arch_key), sorted(ptx, key=arch_key)
        python_module = None
        if ".dynstr" in sections:  # a Python extension module exports PyInit_<name>
            offset, size = sections[".dynstr"]
            fh.seek(offset)
            names = re.findall(rb"\0PyInit_(\w+)\0", fh.read(size))
            python_module = names[0].decode() if names else None
    return {"path": path, "sass": sass, "ptx": ptx, "bytes": os.path.getsize(path), "python_module": python_module}


def libraries(roots):
    """Every shared library with GPU code under the roots, once each."""
    found, seen = [], set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if ".so" not in name:
                    continue
                path = os.path.join(dirpath, name)
                real = os.path.realpath(path)
                if real in seen or os.path.islink(path) or not os.path.isfile(path):
                    continue
                seen.add(real)
                try:
                    item = scan_file(path)
                except (OSError, struct.error):
                    continue
                if item and (item["sass"] or item["ptx"]):
                    found.append(item)
    return found


def main(roots):
    json.dump({"libraries": libraries(roots)}, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


def wheel_problems(folder, ccs):
    """(libraries checked, problems): each wheel unpacked, each library with GPU code judged by
    archrules for every compute capability; a wheel without GPU code is a problem too."""
    import tempfile
    import zipfile
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import archrules
    wheels = sorted(n for n in os.listdir(folder) if n.endswith(".whl"))
    checked, problems = [], [] if wheels else ["no wheel in %s" % folder]
    for name in wheels:
        with tempfile.TemporaryDirectory() as tmp:
            zipfile.ZipFile(os.path.join(folder, name)).extractall(tmp)
            libs = libraries([tmp])
            if not libs:
                problems.append("%s carries no GPU code" % name)
            for lib in libs:
                where = "%s: %s" % (name, os.path.relpath(lib["path"], tmp))
                checked.append({"library": where, "sass": lib["sass"], "ptx": lib["ptx"]})
                for cc in ccs:
                    if archrules.runs_on(lib["sass"], cc, lib["ptx"]) is None:
                        problems.append("%s has SASS %s, PTX %s: nothing runs on %s" % (
                            where, ",".join(lib["sass"]) or "none", ",".join(lib["ptx"]) or "none", cc))
    return checked, problems


def check_wheels(folder, ccs):
    checked, problems = wheel_problems(folder, ccs)
    json.dump({"checked": checked, "problems": problems}, sys.stdout, sort_keys=True)  # one line
    sys.stdout.write("\n")
    sys.stdout.flush()  # the refusals come last, where a build log's tail shows them
    for problem in problems:
        sys.stderr.write("envbuild: vendor wheel refused: %s (build it from source: --compile)\n" % problem)
    return 1 if problems else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--wheels"] and len(sys.argv) == 5 and sys.argv[3] == "--cc":
        sys.exit(check_wheels(sys.argv[2], sys.argv[4].split(",")))
    sys.exit(main(sys.argv[1:] or ["/opt/venv", "/workspace"]))
