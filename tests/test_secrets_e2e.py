"""Index credentials for real: a package index on loopback that answers only with Basic auth, an
image built from it by envbuild, and then every layer of that image and the build log searched
for the password. None may hold it, and the package must be installed (the credentials worked).

Needs a Docker engine; skips without one, except in CI."""

import base64
import hashlib
import io
import json
import tarfile
import tempfile
import threading
import uuid
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import CA_BUNDLE, FIXTURE, cli

pytestmark = pytest.mark.integration

PROBE = "envbuild-secret-probe"
MODULE = "envbuild_secret_probe"


def _wheel(value: str) -> tuple[str, bytes]:
    """A tiny pure-Python wheel, made here: (file name, bytes)."""
    name = f"{MODULE}-1.0-py3-none-any.whl"
    info = f"{MODULE}-1.0.dist-info"
    files = {f"{MODULE}/__init__.py": f"VALUE = {value!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
                     f"{len(text.encode())}\n" for path, text in files.items()) + f"{info}/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path, text in {**files, f"{info}/RECORD": record}.items():
            zf.writestr(path, text)
    return name, buf.getvalue()


class _Index:
    """A PEP 503 index on 127.0.0.1 holding one wheel, for one user:password only (Basic auth)."""

    def __init__(self, login: str, password: str, wheel: tuple[str, bytes]):
        self.expected = "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()
        self.wheel_name, self.wheel = wheel
        self.served, self.refused = [], []
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.headers.get("Authorization") != index.expected:
                    index.refused.append(self.path)
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="corp"')
                    self.end_headers()
                    return
                index.served.append(self.path)
                if self.path.rstrip("/").endswith("/" + PROBE):
                    digest = hashlib.sha256(index.wheel).hexdigest()
                    body = f'<html><body><a href="/files/{index.wheel_name}#sha256={digest}">{index.wheel_name}</a></body></html>'
                    self._send(200, body.encode(), "text/html")
                elif self.path == f"/files/{index.wheel_name}":
                    self._send(200, index.wheel, "application/octet-stream")
                else:
                    self._send(404, b"not here", "text/plain")

            def _send(self, code, body, kind):
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _holders(path: Path, needles: list[bytes]) -> list[str]:
    """The members of a `docker save` tar (and the files of each layer tar in it) holding a needle."""
    found = []

    def scan(name, fh):
        tail = b""
        while chunk := fh.read(1 << 20):
            window = tail + chunk
            if any(n in window for n in needles):
                found.append(name)
                return
            tail = window[-256:]

    with tarfile.open(path) as outer:
        for member in outer:
            if not member.isfile():
                continue
            fh = outer.extractfile(member)
            if member.name.endswith(".tar"):  # a layer: each of its files, and the raw tar too
                with tarfile.open(fileobj=fh) as layer:
                    for inner in layer:
                        if inner.isfile():
                            scan(f"{member.name}:{inner.name}", layer.extractfile(inner))
                fh = outer.extractfile(member)
            scan(member.name, fh)
    return found


def _files_under(folders):
    """Files under folders that another worker may be deleting as we look."""
    for folder in folders:
        try:
            yield from [p for p in folder.rglob("*") if p.is_file()]
        except OSError:
            continue


def _read_or_empty(path):
    try:
        return path.read_bytes()
    except OSError:
        return b""


def test_a_credentialed_index_installs_and_no_layer_or_log_holds_the_password(docker_engine, offline_base, fixture_env,
                                                                               tmp_path, monkeypatch):
    from envbuild import build, config, lock as lock_stage

    password = "pw-" + uuid.uuid4().hex  # one no file in the world holds by chance
    index = _Index("probe", password, _wheel("installed from the credentialed index"))
    try:
        url = f"http://probe:{password}@127.0.0.1:{index.port}/simple"
        env = {**fixture_env, "ENVBUILD_TORCH_INDEX": url, "ENVBUILD_BUILD_NETWORK": "host",
               "ENVBUILD_HOME": str(tmp_path / "home")}
        ctx = tmp_path / "ctx"
        # the smallest stage that installs from the torch index: base (Debian 12, its Python) + torch
        args = ["tinybev", "--card", "a800", "--cuda", "11.8", "--python", "3.11", "--source", FIXTURE / "tinybev",
                "--base-image", offline_base["runtime"], "--runtime-image", offline_base["runtime"], "-o", ctx]
        printed = []
        r = cli(env, "render", *args)
        printed += [r.stdout, r.stderr]
        assert r.returncode == 0, r.stderr
        # torch.lock names only the probe (with its hash), so the torch stage installs it and nothing of PyPI's
        wheel_hash = hashlib.sha256(index.wheel).hexdigest()
        req_in = (ctx / "requirements.in").read_text()
        lock_stage.write_locks(ctx, lock_stage.HEADER + hashlib.sha256(req_in.encode()).hexdigest() + "\n",
                               f"{PROBE}==1.0 \\\n    --hash=sha256:{wheel_hash}\n")
        r = cli(env, "render", *args, "--json")
        printed += [r.stdout, r.stderr]
        assert r.returncode == 0 and json.loads(r.stdout)["locked"] is True, r.stderr
        dockerfile = (ctx / "Dockerfile").read_text()
        assert f"--extra-index-url http://127.0.0.1:{index.port}/simple/cu118 -r /opt/envbuild/torch.lock" in dockerfile

        for key, value in env.items():
            monkeypatch.setenv(key, value)
        sources = config.load_sources()
        assert password not in repr(sources) and sources.netrc
        result = build.build(ctx, [], target="torch", echo=printed.append, **sources.build_kwargs)
        image = docker_engine.images.get(result.image_id)

        # the credentials worked: every request the build made was answered, and the probe is in the venv
        assert index.served and not index.refused, (index.served, index.refused)
        out = docker_engine.containers.run(result.image_id, ["python", "-c", f"import {MODULE}; print({MODULE}.VALUE)"],
                                           remove=True).decode()
        assert "installed from the credentialed index" in out

        needles = [password.encode(), base64.b64encode(f"probe:{password}".encode())]
        saved = tmp_path / "image.tar"
        with open(saved, "wb") as fh:
            for chunk in image.save(named=False):
                fh.write(chunk)
        assert _holders(saved, needles) == []
        assert _holders(saved, [b"installed from the credentialed index"])  # the search does read the layers' files
        log = Path(result.log).read_text()
        assert "--secret id=index_auth,src=" in log and password not in log
        assert all(password not in text for text in printed)
        assert not [p for p in ctx.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
        assert f"127.0.0.1:{index.port}/simple" in dockerfile  # the mirror is named, without its credentials
        # the netrc handed to the build is gone (other workers' builds may hold secret folders of
        # their own at this moment: only one holding this test's password would be this build's)
        assert not [p for p in _files_under(Path(tempfile.gettempdir()).glob("envbuild-secret-*"))
                    if password.encode() in _read_or_empty(p)]
        docker_engine.images.remove(result.image_id, force=True)
    finally:
        index.close()
