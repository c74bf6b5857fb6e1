"""List the GPU code (SASS and PTX archs) in every shared library under the given roots.

Reads each ELF's .nv_fatbin section directly (fatbin container headers carry the kind
and the SM number of every embedded cubin and PTX), so it needs no CUDA toolkit and no
GPU. Runs inside images: Python 3.8+, stdlib only. Prints one JSON document.

Usage: python audit_scan.py ROOT [ROOT ...]
"""

import json
import os
import re
import struct
import sys

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2


def elf_sections(fh):
    """{name: (offset, size)} of a 64-bit little-endian ELF file, or {} if not one."""
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
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", table, i * shentsize)
        headers.append((name, offset, size))
    str_off, str_size = headers[shstrndx][1], headers[shstrndx][2]
    fh.seek(str_off)
    strtab = fh.read(str_size)
    out = {}
    for name, offset, size in headers:
        end = strtab.find(b"\0", name)
        out[strtab[name:end].decode("ascii", "replace")] = (offset, size)
    return out


def fatbin_archs(data):
    """(sass, ptx): sorted lists of 'X.Y' archs in a .nv_fatbin section's bytes."""
    sass, ptx = set(), set()
    pos = 0
    while pos + 16 <= len(data):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # containers are 8-byte aligned; skip padding
            continue
        entry = pos + header_size
        end = min(len(data), entry + fat_size)
        while entry + 32 <= end:
            kind, _unk, eh_size, size = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            if eh_size == 0:
                break
            name = "%d.%d" % (arch // 10, arch % 10)
            if kind == KIND_ELF:
                sass.add(name)
            elif kind == KIND_PTX:
                ptx.add(name)
            entry += eh_size + size
        pos = max(end, pos + 8)
        pos = (pos + 7) & ~7
    key = lambda a: tuple(int(x) for x in a.split("."))  # noqa: E731
    return sorted(sass, key=key), sorted(ptx, key=key)


def scan_file(path):
    with open(path, "rb") as fh:
        sections = elf_sections(fh)
        if ".nv_fatbin" not in sections:
            return None
        offset, size = sections[".nv_fatbin"]
        fh.seek(offset)
        sass, ptx = fatbin_archs(fh.read(size))
        python_module = None
        if ".dynstr" in sections:  # a Python extension module exports PyInit_<name>
            offset, size = sections[".dynstr"]
            fh.seek(offset)
            names = re.findall(rb"\0PyInit_(\w+)\0", fh.read(size))
            python_module = names[0].decode() if names else None
    return {"path": path, "sass": sass, "ptx": ptx, "bytes": os.path.getsize(path), "python_module": python_module}


def main(roots):
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
    json.dump({"libraries": found}, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["/opt/venv", "/workspace"]))
