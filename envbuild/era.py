"""The package index as it was: a local view of PyPI (or a mirror) that hides every file uploaded
after a cutoff date, so that what a model left unpinned resolves as of the model's era. Without
a cutoff it shows everything; either way it answers pip-tools' hash questions from the index's
own listing, so the lock downloads no file only to hash it.

PyPI's JSON simple API (PEP 691) gives each file's upload time (PEP 700). The lock step runs
pip-compile against this view, whatever pip the image's Python has (pip 24 on Python 3.8 has
no --uploaded-prior-to). Exact pins (from the catalog, a port or --set) always win: their
files stay visible whatever their date. The view serves links to the real file URLs, so pip
still checks every file's sha256.
"""

from __future__ import annotations

import html
import json
import re
import ssl
import threading
import urllib.error
import urllib.request
from datetime import datetime, timezone
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

from packaging.utils import InvalidSdistFilename, InvalidWheelFilename, canonicalize_name, parse_sdist_filename, \
    parse_wheel_filename
from packaging.version import InvalidVersion, Version

JSON_ACCEPT = "application/vnd.pypi.simple.v1+json"
ACCEPT = f"{JSON_ACCEPT}, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1"
PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def exact_pins(requirements_text: str) -> dict[str, set[str]]:
    """{canonical name: {versions}} of the `name==version` lines: these are never hidden."""
    pins: dict[str, set[str]] = {}
    for line in requirements_text.splitlines():
        m = PIN_RE.match(line.strip())
        if m:
            pins.setdefault(canonicalize_name(m.group(1)), set()).add(m.group(2).split("+")[0])
    return pins


def file_version(filename: str) -> str | None:
    try:
        if filename.endswith(".whl"):
            return str(parse_wheel_filename(filename)[1])
        return str(parse_sdist_filename(filename)[1])
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        return None


def visible(files: list[dict], cutoff: datetime, pinned: set[str], python: str | None = None) -> list[dict]:
    """The files pip may see: uploaded by the cutoff, or of an exactly pinned version. When the
    Plan ports to a Python that no release of the era has a wheel for, the earliest release
    after the cutoff that has one is shown too: the smallest upgrade that installs there."""
    out, later = [], {}
    for f in files:
        version = file_version(f.get("filename", ""))
        if version is not None and any(Version(version) == Version(p) for p in pinned if _is_version(p)):
            out.append(f)
            continue
        uploaded = f.get("upload-time")
        if not uploaded:
            continue  # no upload time (PEP 700): cannot prove it is of the era
        if datetime.fromisoformat(uploaded.replace("Z", "+00:00")) <= cutoff:
            out.append(f)
        elif version is not None:
            later.setdefault(version, []).append(f)
    if python and _has_binary_wheels(files) and not any(_wheel_for(f, python) for f in out):
        fits = sorted((Version(v), v) for v, fs in later.items() if any(_wheel_for(f, python) for f in fs))
        if fits:
            out += later[fits[0][1]]
    return out


def _has_binary_wheels(files: list[dict]) -> bool:
    return any(f.get("filename", "").endswith(".whl") and "-none-any.whl" not in f["filename"] for f in files)


def _wheel_for(f: dict, python: str) -> bool:
    """A wheel this CPython X.Y installs (its own cpXY tag, abi3 from an older one, or pure Python)."""
    name = f.get("filename", "")
    if not name.endswith(".whl"):
        return False
    try:
        tags = parse_wheel_filename(name)[3]
    except (InvalidWheelFilename, InvalidVersion):
        return False
    minor = int(python.split(".")[1])
    for tag in tags:
        if tag.interpreter in ("py3", f"py3{minor}") or tag.interpreter == f"cp3{minor}":
            return True
        if tag.abi == "abi3" and tag.interpreter.startswith("cp3") and int(tag.interpreter[3:] or 99) <= minor:
            return True
    return False


def _is_version(text: str) -> bool:
    try:
        Version(text)
        return True
    except InvalidVersion:
        return False


class _Links(HTMLParser):
    """The <a> elements of a PEP 503 page: (href, attributes, text)."""

    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, dict, str]] = []
        self._open: tuple[str, dict] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            attrs = dict(attrs)
            self._open = (attrs.pop("href", None) or "", attrs)
            self.links.append((*self._open, ""))

    def handle_data(self, data):
        if self._open is not None:
            self.links[-1] = (*self._open, self.links[-1][2] + data)

    def handle_endtag(self, tag):
        if tag == "a":
            self._open = None


def read_page(text: str) -> list[dict]:
    """A PEP 503 page's files in PEP 691's terms: filename, url, hashes (from the #sha256= fragment),
    requires-python, yanked and core-metadata from the data- attributes."""
    parser = _Links()
    parser.feed(text)
    files = []
    for href, attrs, label in parser.links:
        url, _, fragment = href.partition("#")
        algo, _, digest = fragment.partition("=")
        f = {"filename": label.strip() or unquote(url.rsplit("/", 1)[-1]), "url": url,
             "hashes": {algo: digest} if digest else {}}
        if attrs.get("data-requires-python"):
            f["requires-python"] = attrs["data-requires-python"]
        if "data-yanked" in attrs:
            f["yanked"] = attrs["data-yanked"] or True
        meta = attrs.get("data-core-metadata", attrs.get("data-dist-info-metadata"))
        if meta:
            algo, _, digest = meta.partition("=")
            f["core-metadata"] = {algo: digest} if digest else True
        files.append(f)
    return files


def json_page(name: str, files: list[dict]) -> bytes:
    """A PEP 691 project page: the files as the upstream described them (hashes, upload time, metadata)."""
    keep = ("filename", "url", "hashes", "requires-python", "yanked", "core-metadata", "dist-info-metadata",
            "upload-time", "size")
    return json.dumps({"meta": {"api-version": "1.1"}, "name": canonicalize_name(name),
                       "files": [{k: f[k] for k in keep if k in f} for f in files]}).encode()


def pip_url(url: str) -> str:
    """A file URL as pip holds its links: each part of the path between '@'s unquoted, then quoted."""
    parts = urlsplit(url)
    path = re.split("(@|%2F)", parts.path, flags=re.IGNORECASE)
    path = "".join(p.upper() if i % 2 else quote(unquote(p)) for i, p in enumerate(path))
    return urlunsplit(parts._replace(path=path))


def page(name: str, files: list[dict]) -> bytes:
    """A PEP 503 project page linking the real file URLs (with their sha256)."""
    links = []
    for f in files:
        url = f["url"] + (f"#sha256={f['hashes']['sha256']}" if f.get("hashes", {}).get("sha256") else "")
        attrs = f' data-requires-python="{html.escape(f["requires-python"])}"' if f.get("requires-python") else ""
        if f.get("yanked"):
            attrs += ' data-yanked=""'
        meta = f.get("core-metadata", f.get("dist-info-metadata"))
        if meta:  # PEP 658/714: pip reads the metadata file instead of downloading the whole wheel
            value = "sha256=" + meta["sha256"] if isinstance(meta, dict) and meta.get("sha256") else "true"
            attrs += f' data-core-metadata="{value}" data-dist-info-metadata="{value}"'
        links.append(f'<a href="{html.escape(url)}"{attrs}>{html.escape(f["filename"])}</a><br/>')
    return ("<!DOCTYPE html><html><body><h1>" + html.escape(name) + "</h1>\n" + "\n".join(links)
            + "\n</body></html>\n").encode()


class EraIndex:
    """A loopback server for the time-filtered view; use as a context manager, read .url."""

    def __init__(self, upstream: str, cutoff: datetime | None, pins: dict[str, set[str]], ca_bundle: str | None = None,
                 timeout: int = 60, python: str | None = None, auth: dict | None = None):
        self.python = python
        self.auth = dict(auth or {})  # an Authorization header for a mirror that asks for credentials
        self.upstream = upstream.rstrip("/")
        # None: today's index, every file shown (the view still answers pip-tools' hash questions)
        self.cutoff = cutoff if cutoff is None or cutoff.tzinfo else cutoff.replace(tzinfo=timezone.utc)
        self.pins = pins
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else ssl.create_default_context()
        self.hidden: dict[str, int] = {}  # name -> files hidden, for the report
        self._cache: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.server = None

    def files(self, name: str) -> tuple[int, list[dict]]:
        """The files of a project that the view shows (absolute URLs); (HTTP status, files)."""
        name = canonicalize_name(name)
        with self._lock:
            if name in self._cache:
                return 200, self._cache[name]
        req = urllib.request.Request(f"{self.upstream}/{name}/", headers={"Accept": ACCEPT})
        for key, value in self.auth.items():  # the mirror's credential, never sent on to where it redirects
            req.add_unredirected_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.context) as resp:
                page_url, kind, body = resp.geturl(), resp.headers.get("Content-Type", ""), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, []
        # PEP 691 JSON where the index speaks it, else its PEP 503 page (no upload times there)
        files = json.loads(body).get("files", []) if "json" in kind else read_page(body.decode("utf-8", "replace"))
        files = [dict(f, url=urljoin(page_url, f["url"])) for f in files]
        shown = files if self.cutoff is None else visible(files, self.cutoff, self.pins.get(name, set()), self.python)
        with self._lock:
            self._cache[name] = shown
            self.hidden[name] = len(files) - len(shown)
        return 200, shown

    def project(self, name: str, as_json: bool = False) -> tuple[int, bytes]:
        """The project's page: PEP 691 JSON for a client that asks for it (pip does), else PEP 503 HTML."""
        status, files = self.files(name)
        if status != 200:
            return status, b""
        return 200, json_page(name, files) if as_json else page(name, files)

    def metadata(self, name: str) -> tuple[int, bytes]:
        """The part of PyPI's JSON API that pip-tools reads for a pinned version's hashes, made from
        the same files the page shows (any mirror, with or without that API). Its URLs are spelled
        as pip spells the page's links: pip-tools matches the two by URL and downloads every file it
        cannot match to hash it (all platforms of a pin: GBs for torch)."""
        status, files = self.files(name)
        if status != 200:
            return status, b""
        releases: dict[str, list[dict]] = {}
        for f in files:
            version, sha256 = file_version(f["filename"]), f.get("hashes", {}).get("sha256")
            if version and sha256:
                releases.setdefault(version, []).append({
                    "filename": f["filename"], "url": pip_url(f["url"]), "digests": {"sha256": sha256},
                    "packagetype": "bdist_wheel" if f["filename"].endswith(".whl") else "sdist"})
        return 200, json.dumps({"info": {"name": canonicalize_name(name)}, "releases": releases}).encode()

    def __enter__(self) -> "EraIndex":
        era = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                m = re.match(r"^/simple/([A-Za-z0-9._-]+)/?$", self.path)
                js = re.match(r"^/pypi/([A-Za-z0-9._-]+)/json$", self.path)
                as_json = JSON_ACCEPT in self.headers.get("Accept", "")
                kind = "application/json" if js else JSON_ACCEPT if as_json else "text/html; charset=utf-8"
                try:
                    if js:  # pip-tools reads a pinned version's hashes here instead of downloading its files
                        status, body = era.metadata(js.group(1))
                    else:
                        status, body = era.project(m.group(1), as_json) if m else (404, b"")
                except Exception as exc:  # noqa: BLE001 - the client gets a 502, the lock step the reason
                    status, body, kind = 502, str(exc).encode(), "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/simple"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def release_dates(upstream: str, name: str, ca_bundle: str | None = None, timeout: int = 30,
                  auth: dict | None = None) -> dict[str, str] | None:
    """{version: YYYY-MM-DD its first file was uploaded} of a project, from the index's JSON
    simple API (PEP 691/700); None when the index has no such project. Files without an upload
    time count for the version with no date ("")."""
    context = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else ssl.create_default_context()
    req = urllib.request.Request(f"{upstream.rstrip('/')}/{canonicalize_name(name)}/",
                                 headers={"Accept": JSON_ACCEPT, **(auth or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    dates: dict[str, str] = {}
    for f in data.get("files", []):
        version = file_version(f.get("filename", ""))
        if version is None:
            continue
        day = (f.get("upload-time") or "")[:10]
        if version not in dates or (day and (not dates[version] or day < dates[version])):
            dates[version] = day
    return dates
