"""Where packages come from: config file, environment variables, then flags.

Defaults suit an internet-connected host. Users behind a firewall point these at
mirrors; the sandbox's tests use the same options (e.g. PyPI only, local base image).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import creds
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
    "vendor_wheels": "ENVBUILD_VENDOR_WHEELS",
    "wheel_cache": "ENVBUILD_WHEEL_CACHE",
    "build_network": "ENVBUILD_BUILD_NETWORK",
    "git_mirror": "ENVBUILD_GIT_MIRROR",
}
# Settings that are not package sources: a user catalog on top of the built-in one, and the
# card to build for when no GPU is present and none is given.
SETTINGS_ENV = {
    "catalog_dir": "ENVBUILD_MATRICES",
    "card": "ENVBUILD_CARD",
}
_REPO_RE = re.compile(r"^[a-z0-9.-]+(:[0-9]{1,5})?(/[a-z0-9._-]+)+$")
_CARD_LIST_RE = re.compile(r"^[A-Za-z0-9 ._-]+(,[A-Za-z0-9 ._-]+)*$")


@dataclass(frozen=True)
class Sources:
    """Package and image sources the resolver and the build may use."""

    pypi_index: str = PYPI
    torch_index: str | None = TORCH_INDEX  # None: plain PyPI only
    registry_mirror: str = ""  # prefix put before nvidia/cuda base images, e.g. "mirror.local/"
    ca_bundle: str | None = None  # extra CA bundle handed to builds as a BuildKit secret
    registry: str = ""  # default push registry, e.g. "127.0.0.1:5000/"
    # Vendors' prebuilt wheels (OpenMMLab, PyG, flash-attn releases) may be used where the catalog
    # says they cover the card; False (air-gapped, or --compile): every compiled package compiles.
    vendor_wheels: bool = True
    # A registry repository that holds compiled wheels (one small image per wheel stage, tagged by
    # the stage's inputs), e.g. "registry.local:5000/envbuild-wheels": a builder uses what any
    # builder pushed there instead of compiling, and pushes what it compiled. "" = not shared.
    wheel_cache: str = ""
    # user:password from the index URLs (which keep only the credential-free form): handed to builds
    # as the BuildKit secret index_auth (a netrc file), never written (creds.py)
    credentials: tuple = field(default=(), repr=False)
    # docker build --network: "host" lets builds reach a mirror on the host's loopback; "" = the engine's default
    build_network: str = ""
    # Where builds fetch git repositories (the model's source, [git_packages]) when the hosts they
    # name cannot be reached: https://HOST/PATH is fetched as GIT_MIRROR + HOST/PATH. "" = from the host.
    git_mirror: str = ""

    @property
    def netrc(self) -> str:
        """The index credentials as a netrc file's text ("" when there are none)."""
        return creds.netrc_text(self.credentials)

    @property
    def build_kwargs(self) -> dict:
        """What every build and lock of these sources gets: the CA bundle, the index credentials, the network."""
        return {"ca_bundle": self.ca_bundle, "index_auth": self.netrc, "network": self.build_network}

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
    """A validated setting; a refusal says where the value came from and how to mend it."""
    try:
        return _checked(key, value, origin)
    except BadInput as exc:
        if not exc.hint:
            exc.hint = (f"fix it in {origin}" if origin.startswith("/") else f"unset or fix {origin}"
                        if origin.isupper() or origin.startswith("ENVBUILD") else f"fix {origin}")
        raise


_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no", "none")


def _checked(key: str, value, origin: str):
    if value is None:
        return None
    if key == "vendor_wheels":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise BadInput(f"{origin}: vendor_wheels must be true or false, not {value!r}")
    if not isinstance(value, str):
        raise BadInput(f"{origin}: {key} must be a string")
    value = value.strip()
    if key in ("pypi_index", "torch_index"):
        if key == "torch_index" and value.lower() in _NONE:
            return None
        if not _URL_RE.match(value):
            raise BadInput(f"{origin}: {key} is not an http(s) URL: {creds.redact(value)!r}")
        return value.rstrip("/")
    if key == "build_network":
        if value not in ("", "default", "host", "none"):
            raise BadInput(f"{origin}: build_network must be default, host or none, not {value!r}",
                           "host: builds reach a package mirror on this host's 127.0.0.1")
        return "" if value == "default" else value
    if key in ("registry_mirror", "registry"):
        if value and not value.endswith("/"):
            value += "/"
        if value and not _IMAGE_PREFIX_RE.match(value):
            raise BadInput(f"{origin}: {key} is not a registry prefix: {value!r}")
        return value
    if key == "ca_bundle":
        if any(c in value for c in ",\n\r\"'="):
            # it becomes one field of `--secret id=ca_bundle,src=PATH`: a comma would start another
            raise BadInput(f"{origin}: ca_bundle {value!r}: a path with , = or quotes cannot be passed to BuildKit",
                           "copy the bundle to a plain path")
        if value:
            from .inputs import read_bytes
            hint = "point ca_bundle at a PEM file of certificates (e.g. /etc/ssl/certs/ca-certificates.crt)"
            data = read_bytes(value, f"{origin}: ca_bundle", hint)
            if b"-----BEGIN CERTIFICATE-----" not in data:  # empty, binary (DER) or not a bundle at all
                raise BadInput(f"{origin}: ca_bundle {value!r} holds no PEM certificate", hint)
        return value or None
    if key == "git_mirror":
        if value and (not _URL_RE.match(value) or "@" in value.split("/")[2]):
            raise BadInput(f"{origin}: git_mirror is not an http(s) URL without credentials: {creds.redact(value)!r}",
                           "e.g. https://git-mirror.corp/ (https://github.com/a/b is then fetched as "
                           "https://git-mirror.corp/github.com/a/b)")
        return value.rstrip("/") + "/" if value else ""
    if key == "wheel_cache":
        if value and not _REPO_RE.match(value):
            raise BadInput(f"{origin}: wheel_cache {value!r} is not a registry repository",
                           "e.g. registry.local:5000/envbuild-wheels (no tag)")
        return value
    if key == "catalog_dir":
        if value and not Path(value).expanduser().is_dir():
            raise BadInput(f"{origin}: catalog_dir {value!r} is not a directory",
                           "a folder with cards.toml and/or models/*.toml that add to the built-in catalog")
        return str(Path(value).expanduser()) if value else None
    if key == "card":
        if value and not _CARD_LIST_RE.match(value):
            raise BadInput(f"{origin}: card {value!r} is not a card name or a comma-separated list")
        return value or None
    raise BadInput(f"{origin}: unknown key {key!r}", f"known keys: {', '.join([*ENV, *SETTINGS_ENV])}")


def _file_and_env(env_names: dict) -> dict:
    """Validated values for these keys: config file, then environment variables."""
    values: dict = {}
    path = config_path()
    if os.environ.get("ENVBUILD_CONFIG") and not path.is_file():
        raise BadInput(f"ENVBUILD_CONFIG={path}: no such file", "unset it or point it at a config.toml")
    if path.is_file():
        try:
            doc = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise BadInput(f"{path}: not valid TOML: {exc}", "fix the file, or point ENVBUILD_CONFIG elsewhere") from None
        for key, value in doc.items():  # a table is a typo or a setting misplaced: say so
            if isinstance(value, dict) and key != "sources":
                raise BadInput(f"{path}: unknown table [{key}]",
                               "settings go at the top level (or under [sources]): see README, Package sources")
        for key, value in doc.get("sources", doc).items():
            if isinstance(value, dict):
                continue
            checked = _check(key, value, str(path))  # unknown keys fail here, whichever group asks
            if key in env_names:
                values[key] = checked
    for key, var in env_names.items():
        if var in os.environ:
            values[key] = _check(key, os.environ[var], var)
    return values


def setting(key: str) -> str | None:
    """catalog_dir or card, from the config file or the environment (None: not set)."""
    return _file_and_env(SETTINGS_ENV).get(key)


def load_sources(**flags) -> Sources:
    """Config file < environment < flags. A flag of None means 'not given'."""
    values = _file_and_env(ENV)
    for key, value in flags.items():
        if value is not None:
            values[key] = _check(key, value, f"--{key.replace('_', '-')}")
    found = []  # credentials leave the URLs here: nothing downstream sees them but the build's secret
    for key in ("pypi_index", "torch_index"):
        if values.get(key):
            values[key], cred = creds.split_url(values[key])
            found += [cred] if cred else []
    return replace(Sources(), **values, credentials=creds.merge(found))
