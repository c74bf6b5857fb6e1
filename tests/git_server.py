"""A git server for tests: repositories the test writes, served over git's smart HTTP protocol by
`git http-backend` (as CGI behind a small http.server), so a client can `git fetch --depth 1 URL
COMMIT` as envbuild's git stages do. A dumb HTTP server cannot answer a fetch by commit id."""

import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

GIT = shutil.which("git") or "/usr/bin/git"
IDENTITY = {"GIT_AUTHOR_NAME": "envbuild tests", "GIT_AUTHOR_EMAIL": "tests@envbuild.invalid",
            "GIT_COMMITTER_NAME": "envbuild tests", "GIT_COMMITTER_EMAIL": "tests@envbuild.invalid",
            "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


def git(repo: Path, *args: str) -> str:
    env = dict(os.environ, **IDENTITY)
    r = subprocess.run([GIT, "-C", str(repo), *args], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, f"git {' '.join(args)}: {r.stderr}"
    return r.stdout.strip()


def _http_backend() -> str:
    exec_path = subprocess.run([GIT, "--exec-path"], capture_output=True, text=True, timeout=30).stdout.strip()
    return str(Path(exec_path) / "git-http-backend")


class GitServer:
    """Serves every repository under root at http://HOST:PORT/NAME (read only: upload-pack)."""

    def __init__(self, root: Path, host: str = "127.0.0.1"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.requests: list[str] = []  # "METHOD PATH" of every request served, in order
        backend, server = _http_backend(), self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                self._cgi(b"")

            def do_POST(self):  # noqa: N802
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        chunk = self.rfile.read(size)
                        self.rfile.readline()  # the CRLF after each chunk
                        if not size:
                            break
                        body += chunk
                else:
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._cgi(body)

            def _cgi(self, body: bytes):
                path, _, query = self.path.partition("?")
                server.requests.append(f"{self.command} {path}")
                env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_PROJECT_ROOT": str(server.root),
                       "GIT_HTTP_EXPORT_ALL": "1", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent",
                       "REQUEST_METHOD": self.command, "PATH_INFO": path, "QUERY_STRING": query,
                       "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
                       "REMOTE_ADDR": self.client_address[0], "SERVER_PROTOCOL": "HTTP/1.0",
                       "GATEWAY_INTERFACE": "CGI/1.1"}
                if self.headers.get("Content-Encoding"):
                    env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
                if self.headers.get("Git-Protocol"):  # protocol v2, which fetches by any reachable commit
                    env["HTTP_GIT_PROTOCOL"] = env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
                r = subprocess.run([backend], input=body, capture_output=True, env=env, timeout=120)
                head, sep, payload = r.stdout.partition(b"\r\n\r\n")
                if not sep:
                    head, sep, payload = r.stdout.partition(b"\n\n")
                status, headers = 200, []
                for line in head.decode("latin-1").splitlines():
                    name, _, value = line.partition(":")
                    if name.lower() == "status":
                        status = int(value.split()[0])
                    elif name:
                        headers.append((name, value.strip()))
                if r.returncode and not sep:
                    status, headers, payload = 500, [("Content-Type", "text/plain")], r.stderr
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        bound, port = self.server.server_address[:2]
        self.base = f"http://{bound}:{port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def repository(self, name: str) -> Path:
        """A new repository NAME under root (commit to it with commit()); served at url(name)."""
        repo = self.root / name
        repo.mkdir()
        git(repo, "init", "-q", "-b", "main")
        # a client fetches one commit by its id (not a branch tip once the branch moves on)
        git(repo, "config", "uploadpack.allowReachableSHA1InWant", "true")
        git(repo, "config", "uploadpack.allowAnySHA1InWant", "true")
        return repo

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    @staticmethod
    def commit(repo: Path, files: dict[str, str], message: str) -> str:
        """Write files (path -> text) into repo, commit them; the full 40-hex commit id."""
        for rel, text in files.items():
            path = repo / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", message)
        return git(repo, "rev-parse", "HEAD")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
