"""Credentials in URLs (a corporate mirror's https://user:token@host/simple): split off where the
value enters envbuild (config.load_sources), handed to builds only as a BuildKit secret (a netrc
file that with-ca.sh points pip at for one command), and masked in everything envbuild writes or
prints (redact). Files, Plans, labels and ledger records hold the credential-free URL."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from .errors import BadInput

MASK = "***"
SECRET_ID = "index_auth"  # the BuildKit secret's id; with-ca.sh reads /run/secrets/index_auth
# scheme://userinfo@ : userinfo runs to the last @ before the host's end (a password may hold @)
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/?#\s'\"<>]*)@")
_TOKEN_RE = re.compile(r"^[^\s'\"#\\]+$")  # what a netrc token may hold here (no quoting in old netrc parsers)
_known: set[str] = set()  # the secrets of this process, masked wherever they appear


@dataclass(frozen=True)
class Credential:
    host: str
    login: str
    password: str

    def __repr__(self) -> str:  # never the secret, not even in a traceback or a debugger
        return f"Credential(host={self.host!r}, login={MASK!r}, password={MASK!r})"


def split_url(url: str) -> tuple[str, Credential | None]:
    """(the URL without its user:password, the credential or None). Registers the secret for redact()."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    login, _, password = userinfo.partition(":")
    login, password = unquote(login), unquote(password)
    clean = urlunsplit(parts._replace(netloc=hostport))
    if not (login and password):
        raise BadInput(f"{redact(url)}: a credential in an index URL needs both user and password (user:token@host)",
                       "a token alone goes as the password, after any user name (user:token@host)")
    if not (_TOKEN_RE.match(login) and _TOKEN_RE.match(password)):
        raise BadInput(f"{redact(url)}: the credential holds a space, a quote, # or a backslash",
                       "use a token without them")
    register(password)  # not the login: a user name such as "deploy" is a word in every file too
    return clean, Credential(parts.hostname or hostport, login, password)


def without_credentials(url: str) -> str:
    """The URL without any user:password@ (no checks: for values that should hold none already)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) if "@" in parts.netloc else url


def register(*secrets: str) -> None:
    """Mask these strings wherever redact() sees them (short ones only inside a URL: 'simple' is a word too)."""
    _known.update(s for s in secrets if s and len(s) >= 8)


def redact(text):
    """The text with every URL's user:password@ (and every registered secret) replaced by ***."""
    if not isinstance(text, str) or not text:
        return text
    text = _USERINFO_RE.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    for secret in sorted(_known, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def merge(creds: list[Credential]) -> tuple[Credential, ...]:
    """One credential per host (a netrc names hosts, not URLs): two different ones for a host are refused."""
    by_host: dict[str, Credential] = {}
    for cred in creds:
        have = by_host.setdefault(cred.host, cred)
        if have != cred:
            raise BadInput(f"two different credentials for {cred.host} (pypi_index and torch_index)",
                           "use one user:token for both URLs of that host")
    return tuple(by_host[h] for h in sorted(by_host))


def netrc_text(creds) -> str:
    """A netrc file for these credentials: pip (through NETRC), requests and curl read it."""
    return "".join(f"machine {c.host} login {c.login} password {c.password}\n" for c in creds)


def parse_netrc(text: str) -> tuple[Credential, ...]:
    """The credentials of a netrc_text() (for host-side fetches made with what a build gets)."""
    found = []
    for line in (text or "").splitlines():
        words = line.split()
        if len(words) == 6 and words[0::2] == ["machine", "login", "password"]:
            found.append(Credential(words[1], words[3], words[5]))
    return tuple(found)


@contextlib.contextmanager
def secret_file(text: str, name: str = "netrc"):
    """A private file holding a secret, outside any build context, deleted on the way out (errors and
    Ctrl-C included); yields its path, or None when there is no secret."""
    if not text:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="envbuild-secret-"))  # 0700
    try:
        path = folder / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        yield str(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def auth_header(url: str, creds) -> dict:
    """An Authorization header for a host-side fetch of url (the era index's upstream), or {}."""
    import base64
    host = urlsplit(url).hostname
    for cred in creds or ():
        if cred.host == host:
            token = base64.b64encode(f"{cred.login}:{cred.password}".encode()).decode()
            return {"Authorization": f"Basic {token}"}
    return {}


class RedactingStream:
    """stdout/stderr of the CLI: what any command prints passes redact() on its way out."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        self._stream.write(redact(text) if isinstance(text, str) else text)
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)
