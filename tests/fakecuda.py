"""Bytes that look like compiled CUDA code to envbuild's audit: a fatbin container and a minimal
ELF shared object carrying it in .nv_fatbin (headers only; nothing runs)."""

import struct


# The entry header's flags (u64 at offset 40) as nvcc 13.0 (V13.0.88) writes them, measured on one
# kernel compiled per -gencode: 0x11 for sm_90, 0x100011 for sm_90a, 0x1000011 for sm_100,
# 0x1100011 for sm_100a, 0x1200011 for sm_100f; PTX 0x8011 / 0x108011 (compute_100a) / 0x208011
# (compute_100f). Bit 20 marks arch-specific code, bit 21 family-specific.
ARCH_SPECIFIC = 1 << 20
FAMILY_SPECIFIC = 1 << 21


def fatbin_bytes(arch, kind=2, flags=0x11):
    """A fatbin container holding one empty entry for sm_<arch> (kind 2: a cubin; 1: PTX); flags
    | ARCH_SPECIFIC makes it sm_<arch>a, | FAMILY_SPECIFIC sm_<arch>f."""
    entry = (struct.pack("<HHIQ", kind, 0, 64, 8) + bytes(12) + struct.pack("<I", arch) + bytes(8)
             + struct.pack("<Q", flags) + bytes(16) + bytes(8))
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(entry)) + entry


def elf_with_fatbin(fatbin: bytes) -> bytes:
    """A 64-bit little-endian ELF with sections null, .shstrtab and .nv_fatbin."""
    return elf_with_sections([(".nv_fatbin", fatbin)])


SHT_PROGBITS, SHT_STRTAB, SHT_NOBITS = 1, 3, 8


def elf_with_sections(sections: list, nobits: dict | None = None, align: int = 8) -> bytes:
    """A 64-bit little-endian ELF with sections null, .shstrtab and the given (name, bytes) in
    order, each starting at a multiple of `align` in the file; `nobits` {name: (index of a section
    above, size)}: sections with no bytes whose offset is that section's (as .lbss shares .ldata's)."""
    nobits = nobits or {}
    names = b"\0.shstrtab\0" + b"".join(n.encode() + b"\0" for n, _ in sections) + \
        b"".join(n.encode() + b"\0" for n in nobits)

    def name_at(name):  # its offset in .shstrtab
        return names.index(b"\0" + name.encode() + b"\0") + 1

    body = bytearray(64)  # the ELF header, written last
    strtab_off = len(body)
    body += names
    placed = []
    for name, data in sections:
        body = body.ljust((len(body) + align - 1) // align * align, b"\0")
        placed.append((name_at(name), len(body), data))
        body += data
    body = body.ljust((len(body) + 7) & ~7, b"\0")
    shoff = len(body)

    def section(name, kind, offset, size):
        return struct.pack("<IIQQQQIIQQ", name, kind, 0, 0, offset, size, 0, 0, 1, 0)

    table = section(0, 0, 0, 0) + section(1, SHT_STRTAB, strtab_off, len(names))
    table += b"".join(section(n, SHT_PROGBITS, off, len(d)) for n, off, d in placed)
    for name, (above, size) in nobits.items():
        table += section(name_at(name), SHT_NOBITS, placed[above][1], size)
    count = 2 + len(placed) + len(nobits)
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, count, 1)
    body[0:64] = header
    return bytes(body + table)
