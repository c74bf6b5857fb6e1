"""Two fixture models that share one compiled package (tinyscale, served from a local index):
shared by tests/test_compile_once_e2e.py and benchmarks/bench_compile_once.py."""

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixture"
PACKAGE = "tinyscale"
# The mirror's port, the same in every module and every run: the base stage's pip settings name the
# index, so a new address would mean a new torch stage (GBs) where BuildKit's cache has one.
PORT = 38731


def fresh_version() -> str:
    """A version no builder has compiled before, so the first image always compiles it."""
    return f"0.1.{int(time.time())}"


def sdist(version: str) -> bytes:
    """tinyscale's sdist at this version (a tar.gz with PKG-INFO, as `setup.py sdist` makes)."""
    top = f"{PACKAGE}-{version}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name: str, data: bytes):
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
        add("PKG-INFO", f"Metadata-Version: 1.0\nName: {PACKAGE}\nVersion: {version}\n".encode())
        add("VERSION", f"{version}\n".encode())
        src = FIXTURE / PACKAGE
        for path in sorted(src.rglob("*")):
            if path.is_file() and path.name != "VERSION" and "__pycache__" not in path.parts:
                add(str(path.relative_to(src)), path.read_bytes())
    return buf.getvalue()


def bridge_gateway() -> str:
    """The host's address on Docker's default bridge: build containers reach it."""
    out = subprocess.run(["/usr/bin/docker", "network", "inspect", "bridge", "-f",
                          "{{range .IPAM.Config}}{{.Gateway}}{{end}}"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or "172.17.0.1"


class Mirror:
    """What build containers download from, served on Docker's bridge (they reach it): a PEP 503
    index with tinyscale's sdists at the versions added (every other project redirects to PyPI),
    and find-links pages for folders of wheels, as a mirror of a vendor's index would serve them.
    One address (PORT) for every build that uses it."""

    def __init__(self):
        self.sdists: dict[str, tuple[bytes, str]] = {}  # file name -> (bytes, sha256)
        self.folders: dict[str, Path] = {}
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                code, body, kind, location = mirror.answer([p for p in self.path.split("?")[0].split("/") if p])
                self.send_response(code)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        try:
            self.server = ThreadingHTTPServer((bridge_gateway(), PORT), Handler)
        except OSError:  # taken (a benchmark running beside the tests): any port, at the price of a torch stage
            self.server = ThreadingHTTPServer((bridge_gateway(), 0), Handler)
        host, port = self.server.server_address[:2]
        self.root = f"http://{host}:{port}"
        self.index = f"{self.root}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, version: str) -> str:
        """Serve tinyscale's sdist at this version; the index URL."""
        data = sdist(version)
        self.sdists[f"{PACKAGE}-{version}.tar.gz"] = (data, hashlib.sha256(data).hexdigest())
        return self.index

    def find_links(self, folder: Path) -> str:
        """Serve a page linking every wheel in folder; its URL (pip's --find-links)."""
        name = f"links{len(self.folders)}"
        self.folders[name] = folder
        return f"{self.root}/{name}/index.html"

    def answer(self, parts: list[str]) -> tuple[int, bytes, str, str]:
        """(status, body, content type, redirect) for a request path split on '/'."""
        html, binary = "text/html", "application/octet-stream"
        if parts[:2] == ["simple", PACKAGE]:
            return 200, "".join(f'<a href="/files/{f}#sha256={d}">{f}</a>\n'
                                for f, (_, d) in self.sdists.items()).encode(), html, ""
        if parts[:1] == ["simple"] and len(parts) == 2:
            return 301, b"", html, f"https://pypi.org/simple/{parts[1]}/"
        if len(parts) == 2 and parts[0] == "files" and parts[1] in self.sdists:
            return 200, self.sdists[parts[1]][0], binary, ""
        folder = self.folders.get(parts[0]) if parts else None
        if folder is not None:
            wheels = sorted(p.name for p in folder.glob("*.whl"))
            if parts[1:] in ([], ["index.html"]):
                return 200, "".join(f'<a href="{w}">{w}</a>\n' for w in wheels).encode(), html, ""
            if len(parts) == 2 and parts[1] in wheels:
                return 200, (folder / parts[1]).read_bytes(), binary, ""
        return 404, b"not here\n", "text/plain", ""

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def mirror():
    served = Mirror()
    try:
        yield served
    finally:
        served.close()


def without_its_op(model_toml: str) -> str:
    """The fixture's entry without its own CUDA op (the [[extensions]] table and what loads it):
    the twins are about tinyscale's shared wheel, and each twin image would compile the op again."""
    tables = model_toml.split("\n\n")
    kept = [t for t in tables if not t.lstrip().startswith("[[extensions]]")]
    assert len(kept) == len(tables) - 1, "tinybev.toml's [[extensions]] table moved: update without_its_op"
    return "\n".join(line for line in "\n\n".join(kept).splitlines()
                     if not line.startswith(("imports = ", "ops_check = ")))


def twin_catalog(folder: Path, version: str) -> Path:
    """A user catalog: the built-in packages.toml plus tinyscale as a compiled package, and two
    copies of the tinybev fixture that pin it, twina and twinb (twinb adds one more dependency,
    so the two images differ from the deps stage on)."""
    (folder / "toolchains").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    packages = (ROOT / "envbuild" / "matrices" / "toolchains" / "packages.toml").read_text()
    packages = packages.replace("\n[requires]\n", f'\n[requires]\n{PACKAGE} = []\n', 1)
    packages += (f'\n[compiled.{PACKAGE}."{version}"]\nseries = "{PACKAGE}0"\ntorch = ["1.10", "2.2"]\ncxx = 14\n'
                 'notes = "envbuild test fixture"\n')
    (folder / "toolchains" / "packages.toml").write_text(packages)
    base = without_its_op((FIXTURE / "tinybev.toml").read_text())
    base = "\n".join(line for line in base.splitlines() if not line.startswith("era ="))  # today's index
    for name, extra in (("twina", ""), ("twinb", '\nsix = "*"')):
        text = base.replace('name = "tinybev"', f'name = "{name}"')
        text = text.replace('numpy = "*"', f'numpy = "*"\n{PACKAGE} = "{version}"{extra}')
        (folder / "models" / f"{name}.toml").write_text(text)
    return folder


def vendor_catalog(folder: Path, version: str, links: str, sass: str, model: str) -> Path:
    """The twin catalog plus a vendor entry for tinyscale VERSION (its wheels at links, carrying
    the SASS given, as the catalog would claim) and one more copy of the fixture, MODEL, pinning it."""
    twin_catalog(folder, version)
    path = folder / "toolchains" / "packages.toml"
    path.write_text(path.read_text() + (
        f'\n[vendor.{PACKAGE}]\nfind_links = "{links}"\n[[vendor.{PACKAGE}.builds]]\nversions = ["{version}"]\n'
        # keyed like a vendor's matrix: torch and the CUDA of the torch build (PyPI's 2.0.1 is cu117)
        f'torch = ["2.0"]\ncuda = ["11.7"]\npython = ["3.11", "3.11"]\nsass = ["{sass}"]\n'))
    text = (folder / "models" / "twina.toml").read_text().replace('name = "twina"', f'name = "{model}"')
    (folder / "models" / f"{model}.toml").write_text(text)
    return folder


def build(env: dict, model: str, base: dict, index: str, timeout=3600, check=True):
    """The image's JSON summary; with check=False, the finished process instead."""
    import sys
    r = subprocess.run([sys.executable, "-m", "envbuild.cli", "image", model, "--card", "a800", "--cuda", "11.8",
                        "--python", "3.11", "--source", str(FIXTURE / "tinybev"), "--base-image", base["devel"],
                        "--runtime-image", base["runtime"], "--pypi-index", index, "--json", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if not check:
        return r
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


def wheel_step(summary: dict, version: str) -> dict:
    steps = [s for s in summary["run_steps"] if f"{PACKAGE}=={version}" in s["step"] and "pip wheel" in s["step"]]
    assert len(steps) == 1, summary["run_steps"]
    return steps[0]


def compile_seconds(summary: dict) -> float:
    """Seconds the build spent in wheel stages (compiling packages) that it did not find cached."""
    return sum(s["seconds"] or 0 for s in summary["run_steps"] if "pip wheel" in s["step"] and not s["cached"])


def remove(*refs: str) -> None:
    subprocess.run(["/usr/bin/docker", "image", "rm", "-f", *refs], capture_output=True, timeout=600)


def cleanup_contexts(env: dict) -> None:
    for name in ("twina-a800", "twinb-a800", "twinc-a800", "twind-a800"):
        shutil.rmtree(Path(env["ENVBUILD_HOME"]) / "contexts" / name, ignore_errors=True)


def push(registry: str, ref: str) -> str:
    """Tag the image into the registry and push it; the registry ref."""
    name, tag = ref.rsplit(":", 1)
    target = f"{registry}/{name}:{tag}"
    for cmd in (["tag", ref, target], ["push", target]):
        r = subprocess.run(["/usr/bin/docker", *cmd], capture_output=True, text=True, timeout=3600)
        assert r.returncode == 0, r.stderr[-2000:]
    return target


def manifest_layers(registry: str, ref: str) -> dict:
    """{layer digest: compressed size} of an image as the registry stores it (what a pull moves)."""
    import urllib.request
    repo, tag = ref[len(registry) + 1:].rsplit(":", 1)
    req = urllib.request.Request(f"http://{registry}/v2/{repo}/manifests/{tag}",
                                 headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        manifest = json.loads(resp.read())
    return {layer["digest"]: layer["size"] for layer in manifest["layers"]}


def export_wheels(env: dict, model: str, base: dict, index: str, dest: Path) -> tuple[dict, Path]:
    import sys
    r = subprocess.run([sys.executable, "-m", "envbuild.cli", "wheels", model, "--card", "a800", "--cuda", "11.8",
                        "--python", "3.11", "--base-image", base["devel"], "--pypi-index", index, "-o", str(dest),
                        "--json"], capture_output=True, text=True, env=env, timeout=3600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout), dest
