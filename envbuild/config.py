"""Where packages come from: config file, environment variables, then flags.

Defaults suit an internet-connected host. Users behind a firewall point these at
mirrors; the sandbox's tests use the same options (e.g. PyPI only, local base image).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import BadInput

PYPI = "https://pypi.org/simple"
TORCH_INDEX = "https://download.pytorch.org/whl"
_URL_RE = re.compile(r"^https?://[A-Za-z0-9.:@_-]+(/[A-Za-z0-9._~%+-]+)*/?$")
_IMAGE_PREFIX_RE = re.compile(r"^[a-z0-9.:_-]+(/[a-z0-9._-]+)*/$")
_NONE = ("", "none", "off", "pypi")

ENV = {
    "pypi_index": "ENVBUILD_PYPI_INDEX",
    "torch_index": "ENVBUILD_TORCH_INDEX",
    "registry_mirror": "ENVBUILD_REGISTRY_MIRROR",
    "ca_bundle": "ENVBUILD_CA_BUNDLE",
    "registry": "ENVBUILD_REGISTRY",
}


@dataclass(frozen=True)
class Sources:
    """Package and image sources the resolver and the build may use."""

    pypi_index: str = PYPI
    torch_index: str | None = TORCH_INDEX  # None: plain PyPI only
    registry_mirror: str = ""  # prefix put before nvidia/cuda base images, e.g. "mirror.local/"
    ca_bundle: str | None = None  # extra CA bundle handed to builds as a BuildKit secret
    registry: str = ""  # default push registry, e.g. "127.0.0.1:5000/"

    def torch_index_for(self, torch_version: str, cuda: str) -> str:
        """The index URL pip needs for torch X+cuYYY (flat find-links before 1.11)."""
        tag = "cu" + cuda.replace(".", "")
        major, minor = (int(p) for p in torch_version.split(".")[:2])
        if (major, minor) < (1, 11):
            return f"{self.torch_index}/torch_stable.html"
        return f"{self.torch_index}/{tag}"


def config_path() -> Path:
    if os.environ.get("ENVBUILD_CONFIG"):
        return Path(os.environ["ENVBUILD_CONFIG"])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "envbuild" / "config.toml"


def _check(key: str, value, origin: str):
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadInput(f"{origin}: {key} must be a string")
    value = value.strip()
    if key in ("pypi_index", "torch_index"):
        if key == "torch_index" and value.lower() in _NONE:
            return None
        if not _URL_RE.match(value):
            raise BadInput(f"{origin}: {key} is not an http(s) URL: {value!r}")
        return value.rstrip("/")
    if key in ("registry_mirror", "registry"):
        if value and not value.endswith("/"):
            value += "/"
        if value and not _IMAGE_PREFIX_RE.match(value):
            raise BadInput(f"{origin}: {key} is not a registry prefix: {value!r}")
        return value
    if key == "ca_bundle":
        if value and not Path(value).is_file():
            raise BadInput(f"{origin}: ca_bundle {value!r} is not a file")
        return value or None
    raise BadInput(f"{origin}: unknown key {key!r}", f"known keys: {', '.join(ENV)}")


def load_sources(**flags) -> Sources:
    """Config file < environment < flags. A flag of None means 'not given'."""
    values: dict = {}
    path = config_path()
    if path.is_file():
        try:
            doc = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise BadInput(f"{path}: not valid TOML: {exc}") from None
        for key, value in doc.get("sources", doc).items():
            if isinstance(value, dict):
                continue
            values[key] = _check(key, value, str(path))
    for key, var in ENV.items():
        if var in os.environ:
            values[key] = _check(key, os.environ[var], var)
    for key, value in flags.items():
        if value is not None:
            values[key] = _check(key, value, f"--{key.replace('_', '-')}")
    return replace(Sources(), **values)
