"""Expected errors: one clear line, a hint, and the exit code the CLI returns."""

from __future__ import annotations

import difflib


class EnvbuildError(Exception):
    """An expected failure. exit_code 2 = bad input, 1 = the operation failed."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "", log: str = ""):
        from .creds import redact  # an error line quotes what it was given: never a password in it
        message = redact(message)
        super().__init__(message)
        self.message = message
        self.hint = redact(hint)
        self.log = log


class BadInput(EnvbuildError):
    exit_code = 2


class CatalogError(BadInput):
    """A malformed matrix file: names the file, the key and the reason."""

    def __init__(self, path: str, key: str, reason: str):
        super().__init__(f"{path}: {key}: {reason}",
                         "fix that entry (README: The catalog), or unset ENVBUILD_MATRICES / "
                         "catalog_dir to use the built-in catalog alone")


class OperationFailed(EnvbuildError):
    exit_code = 1


class BuildStopped(OperationFailed):
    """A build stopped at the bound its user set (--time-limit): no verdict on what it builds."""


def unknown(kind: str, name: str, known: list[str]) -> BadInput:
    close = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known {kind}s: {', '.join(sorted(known))}"
    return BadInput(f"unknown {kind} '{name}'", hint)
