"""Files envbuild reads that a user names (reports, plans, manifests, CA bundles): only regular
files, only up to a size, never a FIFO that blocks or a device that never ends."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import BadInput

MAX_BYTES = 64 << 20  # no report, plan, manifest or CA bundle envbuild reads comes near this


def kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path, what: str, hint: str, limit: int = MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, or one BadInput line naming it."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (a regular file ignores the flag)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise BadInput(f"{what} {path}: {exc.strerror or exc}", hint) from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BadInput(f"{what} {path} is {kind(mode)}, not a file", hint)
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise BadInput(f"{what} {path}: {exc.strerror or exc}", hint) from None
    if len(data) > limit:
        raise BadInput(f"{what} {path} is larger than {limit >> 20} MB", hint)
    return data


def read_text(path, what: str, hint: str, limit: int = MAX_BYTES) -> str:
    data = read_bytes(path, what, hint, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{what} {path} is not UTF-8 text", hint) from None
