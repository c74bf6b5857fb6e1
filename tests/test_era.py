"""PyPI as of a model's era: which files the lock step may see (pure logic, no network)."""

from datetime import datetime, timezone

import pytest

from envbuild import catalog
from envbuild.era import exact_pins, file_version, page, visible
from envbuild.resolve import resolve

CUTOFF = datetime(2023, 10, 9, tzinfo=timezone.utc)


def f(name, when, **extra):
    return {"filename": name, "url": f"https://files.example/{name}", "hashes": {"sha256": "ab" * 32},
            "upload-time": when, **extra}


def test_files_after_the_cutoff_are_hidden_unless_exactly_pinned():
    files = [f("lightning_cloud-0.5.39-py3-none-any.whl", "2023-09-30T10:00:00.000000Z"),
             f("lightning_cloud-0.6.0-py3-none-any.whl", "2024-11-20T10:00:00.000000Z"),
             f("lightning_cloud-0.5.70.tar.gz", "2024-07-01T10:00:00Z"),
             f("lightning_cloud-0.5.1.tar.gz", None)]
    shown = [x["filename"] for x in visible(files, CUTOFF, set())]
    assert shown == ["lightning_cloud-0.5.39-py3-none-any.whl"]  # no upload time: not provably of the era
    shown = [x["filename"] for x in visible(files, CUTOFF, {"0.6.0"})]
    assert "lightning_cloud-0.6.0-py3-none-any.whl" in shown  # an exact pin wins over the cutoff


def test_exact_pins_are_read_from_requirements_lines():
    text = "--index-url https://pypi.org/simple\ntorch==2.0.1+cu118\nNumPy==1.24.3\nscipy>=1.10\n# c==1\n"
    assert exact_pins(text) == {"torch": {"2.0.1"}, "numpy": {"1.24.3"}}


def test_versions_come_from_wheel_and_sdist_names():
    assert file_version("torch_scatter-2.1.1-cp311-cp311-linux_x86_64.whl") == "2.1.1"
    assert file_version("av2-0.3.1.tar.gz") == "0.3.1"
    assert file_version("not-a-dist.zip") is None


def test_the_page_is_pep503_with_hashes_and_escaped_attributes():
    body = page("x", [f("x-1.0.tar.gz", "2020-01-01T00:00:00Z", **{"requires-python": ">=3.8,<4"})]).decode()
    assert 'href="https://files.example/x-1.0.tar.gz#sha256=' in body
    assert 'data-requires-python="&gt;=3.8,&lt;4"' in body


def test_the_plan_names_the_cutoff_and_why(cat):
    plan = resolve(cat, "qcnet", "a800")
    assert plan.index_cutoff == "2023-10-08" and "2023-09-08" in plan.index_cutoff_why
    assert resolve(cat, "maptr", "a800").index_cutoff == "2023-10-14"


def test_a_model_without_an_era_resolves_against_todays_index_and_says_so(matrices_copy):
    path = matrices_copy / "models" / "maptr.toml"
    path.write_text("\n".join(l for l in path.read_text().splitlines() if not l.startswith("era =")))
    plan = resolve(catalog.load(matrices_copy), "maptr", "a800")
    assert plan.index_cutoff is None and "no era" in plan.index_cutoff_why


def test_a_python_port_gets_the_smallest_later_release_with_a_wheel_for_it():
    files = [f("av-10.0.0-cp310-cp310-manylinux2014_x86_64.whl", "2022-10-18T00:00:00Z"),
             f("av-10.0.0.tar.gz", "2022-10-18T00:00:00Z"),
             f("av-11.0.0.tar.gz", "2023-11-10T00:00:00Z"),
             f("av-12.0.0-cp311-cp311-manylinux2014_x86_64.whl", "2024-03-21T00:00:00Z"),
             f("av-13.0.0-cp311-cp311-manylinux2014_x86_64.whl", "2024-08-01T00:00:00Z")]
    names = [x["filename"] for x in visible(files, CUTOFF, set(), python="3.11")]
    assert "av-12.0.0-cp311-cp311-manylinux2014_x86_64.whl" in names and not any("13.0.0" in n for n in names)
    # the era's own Python has its wheel: nothing later is shown
    assert not any("12.0.0" in x["filename"] for x in visible(files, CUTOFF, set(), python="3.10"))
    # pure-Python packages are never upgraded for a port
    pure = [f("x-1.0.tar.gz", "2022-01-01T00:00:00Z"), f("x-2.0-py3-none-any.whl", "2024-01-01T00:00:00Z")]
    assert [x["filename"] for x in visible(pure, CUTOFF, set(), python="3.11")] == ["x-1.0.tar.gz"]


def test_the_page_offers_metadata_files_so_pip_need_not_download_wheels():
    body = page("x", [f("x-1.0-py3-none-any.whl", "2020-01-01T00:00:00Z", **{"core-metadata": {"sha256": "cd" * 32}}),
                      f("x-0.9.tar.gz", "2019-01-01T00:00:00Z", **{"core-metadata": False})]).decode()
    assert 'data-core-metadata="sha256=' + "cd" * 32 + '"' in body and 'data-dist-info-metadata="sha256=' in body
    assert body.count("data-core-metadata") == 1


def test_the_lock_runs_pip_compile_against_the_era_view_of_the_plans_cutoff(tmp_path, monkeypatch):
    """The era path of the lock, end to end on the host: the Plan's cutoff reaches pip-compile as
    its --index-url, a loopback view of the configured index (here a PEP 691 stand-in on loopback,
    through the ordinary pypi_index option) that hides what was uploaded after the cutoff day and
    keeps the exact pins. Only the Docker boundary is stood in for: the base-stage build and the
    container run, which reads the view while the lock step serves it, as pip-compile would."""
    import json as _json
    import re
    import threading
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from envbuild import build, engine, lock as lock_stage, pipeline

    files = {  # the cutoff is 2023-10-08 (QCNet's era + grace): the whole cutoff day counts
        "numpy": [f("numpy-1.26.0-cp38-cp38-manylinux_2_17_x86_64.whl", "2023-09-16T12:00:00Z"),
                  f("numpy-1.26.1-cp38-cp38-manylinux_2_17_x86_64.whl", "2023-10-08T23:30:00Z"),
                  f("numpy-1.26.2-cp38-cp38-manylinux_2_17_x86_64.whl", "2023-10-09T00:30:00Z")],
    }
    asked = []

    class Upstream(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            asked.append(self.path)
            name = self.path.strip("/").split("/")[-1]
            body = _json.dumps({"meta": {"api-version": "1.1"}, "name": name, "files": files.get(name, [])}).encode()
            self.send_response(200 if name in files else 404)
            self.send_header("Content-Type", "application/vnd.pypi.simple.v1+json")
            self.end_headers()
            self.wfile.write(body if name in files else b"")

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        upstream = f"http://127.0.0.1:{server.server_port}/simple"
        monkeypatch.setenv("ENVBUILD_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("ENVBUILD_TORCH_INDEX", "none")
        monkeypatch.setenv("ENVBUILD_PYPI_INDEX", upstream)
        plan, _, ctx, _ = pipeline.prepare_locked(pipeline.Request(model="qcnet", card="a800"), lock=False)
        assert plan.index_cutoff == "2023-10-08"
        pinned = re.search(r"^(torch)==(\S+)$", (ctx / "requirements.in").read_text(), re.M)
        files["torch"] = [f(f"torch-{pinned.group(2)}-cp38-cp38-manylinux1_x86_64.whl", "2030-01-01T00:00:00Z"),
                          f("torch-9.9.9-cp38-cp38-manylinux1_x86_64.whl", "2030-01-01T00:00:00Z"),
                          f("torch-0.4.1-cp38-cp38-manylinux1_x86_64.whl", "2018-07-26T00:00:00Z")]
        monkeypatch.setattr(build, "build", lambda context, tags, target="runtime", **k:
                            build.BuildResult("sha256:base", [], 0, 0.0, [], ""))
        seen = {}

        def run_container(image, cmd, **k):
            script = cmd[-1]
            compile_args = script[script.index("pip-compile"):]
            url = re.search(r"--index-url (\S+)", compile_args).group(1)
            seen["url"], seen["args"] = url, compile_args
            for name in ("numpy", "torch"):
                with urllib.request.urlopen(f"{url}/{name}/", timeout=10) as resp:
                    seen[name] = resp.read().decode()
            out = "".join(f"{n}==1.0 \\\n    --hash=sha256:{'c' * 64}\n" for n in ("torch", "torchaudio", "torchvision"))
            return 0, out, ""
        monkeypatch.setattr(engine, "run_container", run_container)
        said = []
        lock_stage.lock(ctx, echo=said.append)
    finally:
        server.shutdown()
        server.server_close()
    # pip-compile asked the era view on loopback, not the index itself, and read the copy of
    # requirements.in without its --index-url line (which would override the view)
    assert seen["url"].startswith("http://127.0.0.1:") and seen["url"] != upstream
    assert seen["args"].rstrip().endswith("/tmp/requirements.in && cat /tmp/requirements.lock")
    assert any("PyPI as of 2023-10-08" in line and seen["url"] in line for line in said), said
    # the view is the Plan's cutoff: up to the end of 2023-10-08, nothing after
    assert "numpy-1.26.0-" in seen["numpy"] and "numpy-1.26.1-" in seen["numpy"]
    assert "numpy-1.26.2-" not in seen["numpy"]
    # an exact pin stays visible whatever its date; another version of it uploaded later does not
    assert f"torch-{pinned.group(2)}-" in seen["torch"] and "torch-0.4.1-" in seen["torch"] and "torch-9.9.9-" not in seen["torch"]
    assert any(p.rstrip("/").endswith("/numpy") for p in asked)  # the view asked the configured index


def _wheel(name: str, version: str) -> bytes:
    """A real pure-Python wheel of an empty package (written here, not downloaded)."""
    import io
    import zipfile
    buf = io.BytesIO()
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return buf.getvalue()


@pytest.mark.parametrize("speaks,cutoff", [("json", CUTOFF), ("html", None)])
def test_pip_compile_takes_every_files_hash_from_the_view_and_downloads_no_other_platforms_file(tmp_path, speaks,
                                                                                                cutoff):
    """The lock's pip-compile --generate-hashes wants the hash of every file of a pin (all platforms).
    It matches the JSON API's URLs against its page links; when they differ it downloads each file
    to hash it (for torch: every platform's wheel, GBs per lock). Real pip-compile, an index on
    loopback without PyPI's JSON API (as many mirrors), speaking PEP 691 JSON or only PEP 503 HTML
    (relative links, as a plain mirror serves them), with an era cutoff or without one (the view
    serves today's index then), and files it must never fetch."""
    import hashlib
    import json as _json
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path
    from envbuild.era import EraIndex

    good = _wheel("tinydemo", "1.0")
    blobs = {"tinydemo-1.0-py3-none-any.whl": good,  # the one pip installs here
             "tinydemo-1.0-cp311-cp311-win_amd64.whl": b"not for this host",
             "tinydemo-1.0-cp311-cp311-macosx_11_0_arm64.whl": b"nor this one"}
    fetched = []

    class Upstream(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            base = f"http://127.0.0.1:{self.server.server_port}"
            if self.path.startswith("/files/"):
                fetched.append(self.path)
                body = blobs.get(self.path.rsplit("/", 1)[-1])
                ctype = "application/octet-stream"
            elif self.path.rstrip("/") == "/simple/tinydemo" and speaks == "json":
                body = _json.dumps({"meta": {"api-version": "1.1"}, "name": "tinydemo", "files": [
                    {"filename": n, "url": f"{base}/files/{n}", "hashes": {"sha256": hashlib.sha256(b).hexdigest()},
                     "upload-time": "2020-01-01T00:00:00Z"} for n, b in blobs.items()]}).encode()
                ctype = "application/vnd.pypi.simple.v1+json"
            elif self.path.rstrip("/") == "/simple/tinydemo":
                body = "".join(f'<a href="../../files/{n}#sha256={hashlib.sha256(b).hexdigest()}">{n}</a><br/>\n'
                               for n, b in blobs.items()).encode()
                ctype = "text/html"
            else:  # no /pypi/<name>/json here, as on many mirrors
                body = None
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", ctype if body is not None else "text/plain")
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "req.in").write_text("tinydemo==1.0\n")
    compile_ = Path(sys.executable).parent / "pip-compile"
    try:
        with EraIndex(f"http://127.0.0.1:{server.server_port}/simple", cutoff, {"tinydemo": {"1.0"}}) as view:
            r = subprocess.run([str(compile_), "--quiet", "--generate-hashes", "--no-header", "--index-url", view.url,
                                "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "req.lock"),
                                str(tmp_path / "req.in")], capture_output=True, text=True, timeout=300,
                               env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PIP_CONFIG_FILE": "/dev/null"})
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 0, r.stderr[-2000:]
    lock = (tmp_path / "req.lock").read_text()
    assert all(f"sha256:{hashlib.sha256(b).hexdigest()}" in lock for b in blobs.values()), lock
    assert not [p for p in fetched if "win_amd64" in p or "macosx" in p], fetched


def test_a_pep503_page_reads_as_pep691_files():
    from envbuild.era import read_page
    files = read_page('<a href="../../files/x-1.0.tar.gz#sha256=ab" data-requires-python="&gt;=3.8" '
                      'data-yanked="">x-1.0.tar.gz</a>\n<a href="https://h/x-2.0-py3-none-any.whl" '
                      'data-core-metadata="sha256=cd">x-2.0-py3-none-any.whl</a>')
    assert files == [{"filename": "x-1.0.tar.gz", "url": "../../files/x-1.0.tar.gz", "hashes": {"sha256": "ab"},
                      "requires-python": ">=3.8", "yanked": True},
                     {"filename": "x-2.0-py3-none-any.whl", "url": "https://h/x-2.0-py3-none-any.whl", "hashes": {},
                      "core-metadata": {"sha256": "cd"}}]


def test_the_views_credential_goes_to_the_mirror_and_never_on_to_where_it_redirects():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from envbuild.era import EraIndex
    heard = {}

    def serve(answer):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                heard[self.server.server_port] = self.headers.get("Authorization")
                answer(self)

            def log_message(self, *a):
                pass
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def elsewhere_answer(h):
        h.send_response(200)
        h.send_header("Content-Type", "text/html")
        h.end_headers()
        h.wfile.write(b'<a href="x-1.0.tar.gz#sha256=ab">x-1.0.tar.gz</a>')
    elsewhere = serve(elsewhere_answer)

    def mirror_answer(h):
        h.send_response(301)
        h.send_header("Location", f"http://127.0.0.1:{elsewhere.server_port}/simple/x/")
        h.end_headers()
    mirror = serve(mirror_answer)
    try:
        view = EraIndex(f"http://127.0.0.1:{mirror.server_port}/simple", None, {},
                        auth={"Authorization": "Basic c2VjcmV0"})
        status, files = view.files("x")
    finally:
        mirror.shutdown()
        elsewhere.shutdown()
    assert status == 200 and files[0]["url"] == f"http://127.0.0.1:{elsewhere.server_port}/simple/x/x-1.0.tar.gz"
    assert heard[mirror.server_port] == "Basic c2VjcmV0" and heard[elsewhere.server_port] is None
