"""Credentials in index URLs never reach a file, a layer or a printed line (issue 23, item 1).

A corporate mirror's https://user:token@host/simple, given by flag, environment or config file,
reaches builds only as the BuildKit secret index_auth; every file envbuild writes names the
mirror without it, and everything it prints or logs is redacted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from envbuild import creds
from envbuild.errors import BadInput

ROOT = Path(__file__).resolve().parent.parent
SECRET = "S3CRET-d41d8cd98f00"
TORCH_URL = f"https://bob:{SECRET}@mirror.corp/whl"
PYPI_SECRET = "Pypi-T0ken-7a1c0e55"
PYPI_URL = f"https://alice:{PYPI_SECRET}@pypi.corp/simple"


def envbuild(*args, env=None):
    return subprocess.run([sys.executable, "-m", "envbuild.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture
def user_config(tmp_path):
    """A user config whose pypi_index carries a credential; no other source of settings."""
    path = tmp_path / "config.toml"
    path.write_text(f'pypi_index = "{PYPI_URL}"\n')
    return {"ENVBUILD_CONFIG": str(path), "ENVBUILD_HOME": str(tmp_path / "home")}


def _files_holding(folder: Path, *needles: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and any(n.encode() in p.read_bytes() for n in needles)]


def test_split_url_keeps_host_and_path_and_hands_back_the_credential():
    clean, cred = creds.split_url("https://bob:p@ss:w0rd-long@mirror.corp:8443/whl/simple")
    assert clean == "https://mirror.corp:8443/whl/simple"
    assert (cred.host, cred.login, cred.password) == ("mirror.corp", "bob", "p@ss:w0rd-long")
    assert "w0rd" not in repr(cred)
    assert creds.split_url("https://pypi.org/simple") == ("https://pypi.org/simple", None)
    with pytest.raises(BadInput) as exc:
        creds.split_url(f"https://{SECRET}@mirror.corp/simple")  # a netrc needs a login and a password
    assert SECRET not in str(exc.value) and "user:token" in exc.value.hint


def test_redact_masks_userinfo_and_known_passwords_and_nothing_else():
    creds.register("Tok3n-registered-x")
    text = (f"$ pip install --extra-index-url https://bob:pw@mirror.corp/whl torch\n"
            f"Looking in indexes: https://pypi.org/simple, http://u:Tok3n-registered-x@10.0.0.1:3141/root\n"
            f"netrc password Tok3n-registered-x; envbuild/deploy is a word")
    out = creds.redact(text)
    assert "pw@" not in out and "Tok3n-registered-x" not in out
    assert "https://***@mirror.corp/whl torch" in out and "http://***@10.0.0.1:3141/root" in out
    assert "https://pypi.org/simple" in out and "envbuild/deploy is a word" in out
    assert creds.redact("no url here: a@b") == "no url here: a@b"


def test_netrc_file_is_private_outside_any_context_and_gone_after():
    text = creds.netrc_text([creds.Credential("mirror.corp", "bob", SECRET)])
    assert text == f"machine mirror.corp login bob password {SECRET}\n"
    assert creds.parse_netrc(text) == (creds.Credential("mirror.corp", "bob", SECRET),)
    with pytest.raises(RuntimeError):
        with creds.secret_file(text) as path:
            kept = Path(path)
            assert kept.read_text() == text and oct(kept.stat().st_mode & 0o777) == "0o600"
            assert oct(kept.parent.stat().st_mode & 0o777) == "0o700"
            raise RuntimeError("a failed build")
    assert not kept.exists() and not kept.parent.exists()
    with creds.secret_file("") as path:
        assert path is None


def test_two_credentials_for_one_host_are_refused():
    from envbuild.config import load_sources
    with pytest.raises(BadInput) as exc:
        load_sources(torch_index=f"https://bob:{SECRET}@mirror.corp/whl",
                     pypi_index="https://bob:other-password@mirror.corp/simple")
    assert SECRET not in exc.value.message and "mirror.corp" in exc.value.message


def test_sources_hold_the_clean_urls_and_the_netrc_apart(monkeypatch, user_config):
    from envbuild.config import load_sources
    for key, value in user_config.items():
        monkeypatch.setenv(key, value)
    sources = load_sources(torch_index=TORCH_URL)
    assert (sources.pypi_index, sources.torch_index) == ("https://pypi.corp/simple", "https://mirror.corp/whl")
    assert sources.netrc == (f"machine mirror.corp login bob password {SECRET}\n"
                             f"machine pypi.corp login alice password {PYPI_SECRET}\n")
    assert SECRET not in repr(sources) and PYPI_SECRET not in repr(sources)
    assert sources.build_kwargs["index_auth"] == sources.netrc
    monkeypatch.setenv("ENVBUILD_BUILD_NETWORK", "host")
    assert load_sources().build_network == "host"
    monkeypatch.setenv("ENVBUILD_BUILD_NETWORK", "bridge; rm -rf /")
    with pytest.raises(BadInput):
        load_sources()


def test_render_with_credentialed_indexes_writes_and_prints_no_secret(tmp_path, user_config):
    out = tmp_path / "ctx"
    printed = []
    for extra in ([], ["--json"]):
        r = envbuild("render", "qcnet", "--card", "a800", "--torch-index", TORCH_URL, "-o", out, *extra, env=user_config)
        assert r.returncode == 0, r.stderr
        printed += [r.stdout, r.stderr]
    assert not _files_holding(out, SECRET, PYPI_SECRET, "bob:", "alice:")
    assert not any(s in text for text in printed for s in (SECRET, PYPI_SECRET))
    dockerfile = (out / "Dockerfile").read_text()
    # the mirrors stay readable; the header's command says a credential was there
    assert "--torch-index https://***@mirror.corp/whl" in dockerfile.splitlines()[0]
    assert "PIP_INDEX_URL=https://pypi.corp/simple" in dockerfile
    assert "--extra-index-url https://mirror.corp/whl/cu118" in dockerfile
    req = (out / "requirements.in").read_text()
    assert "--index-url https://pypi.corp/simple" in req and "--extra-index-url https://mirror.corp/whl/cu118" in req
    assert json.loads((out / "plan.json").read_text())["torch_index"] == "https://mirror.corp/whl/cu118"
    # labels (the plan summary among them) are in the Dockerfile: checked above with every other line


def test_every_run_that_uses_pip_mounts_the_index_secret_and_nothing_writes_it(tmp_path, user_config):
    out = tmp_path / "ctx"
    r = envbuild("render", "qcnet", "--card", "a800", "--torch-index", TORCH_URL, "-o", out, env=user_config)
    assert r.returncode == 0, r.stderr
    text = (out / "Dockerfile").read_text()
    instructions = [" ".join(i.split()) for i in text.replace("\\\n", " ").splitlines() if i.strip() and not i.startswith("#")]
    uses = [i for i in instructions if "/opt/envbuild/with-ca.sh " in i and i.startswith("RUN")]
    assert len(uses) >= 3 and all("--mount=type=secret,id=index_auth" in i for i in uses)
    assert not [i for i in instructions if "index_auth" in i and not i.startswith("RUN --mount")]
    assert not [i for i in instructions if i.startswith(("ENV", "ARG", "LABEL")) and ("netrc" in i.lower() or "@" in i)]
    helper = (out / "envbuild" / "with-ca.sh").read_text()
    assert "export NETRC=/run/secrets/index_auth" in helper


def test_rendering_does_not_depend_on_the_password(tmp_path):
    """Deterministic: another password (a rotated token) renders byte-identical files."""
    outs = []
    for password in (SECRET, "rotated-token-0042"):
        out = tmp_path / password
        r = envbuild("render", "qcnet", "--card", "a800", "--torch-index", f"https://bob:{password}@mirror.corp/whl",
                     "-o", out, env={"ENVBUILD_HOME": str(tmp_path / "home")})
        assert r.returncode == 0, r.stderr
        outs.append({n: (out / n).read_bytes() for n in ("Dockerfile", "requirements.in", "plan.json")})
    assert outs[0] == outs[1]


def test_error_lines_quote_the_url_without_its_password(tmp_path):
    bad = f"https://bob:{SECRET}@mirror.corp/whl?token=1"  # not an index URL envbuild takes
    for args, env in ((["--torch-index", bad], {}), ([], {"ENVBUILD_TORCH_INDEX": bad})):
        r = envbuild("render", "qcnet", "--card", "a800", *args, "-o", tmp_path / "x",
                     env={"ENVBUILD_HOME": str(tmp_path / "home"), **env})
        assert r.returncode == 2 and SECRET not in r.stderr + r.stdout, r.stderr
        assert "mirror.corp" in r.stderr


def test_the_build_gets_the_netrc_as_a_secret_outside_the_context_and_logs_no_password(tmp_path, monkeypatch):
    from envbuild import build, engine, pipeline
    monkeypatch.setenv("ENVBUILD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ENVBUILD_TORCH_INDEX", TORCH_URL)
    monkeypatch.setenv("ENVBUILD_BUILD_NETWORK", "host")
    monkeypatch.setattr(engine, "find_cli", lambda: engine.Cli(sys.executable, "20.10.24", "builtin"))
    monkeypatch.setattr(engine, "client", lambda: None)
    seen = {}
    real_run = build._run

    def run(cli, cmd, log_path, echo, time_limit):
        src = next(a.split(",src=", 1)[1] for a in cmd if a.startswith("id=index_auth,"))
        seen.update(cmd=cmd, src=Path(src), netrc=Path(src).read_text(), context=Path(cmd[-1]))
        # what the build prints (here: the password, as a careless tool would) is logged redacted
        return real_run(cli, [sys.executable, "-c", f"print('#1 [base 1/1] RUN x https://bob:{SECRET}@mirror.corp/whl')"
                              f"; print('#1 0.1 {SECRET}'); raise SystemExit(1)"], log_path, echo, time_limit)
    monkeypatch.setattr(build, "_run", run)
    echoed = []
    with pytest.raises(pipeline.OperationFailed) as exc:
        pipeline.build_image(pipeline.Request(model="qcnet", card="a800", python="3.11", cuda="11.8",
                                              base_image="nvidia/cuda:11.8.0-cudnn8-devel-ubuntu22.04"), lock=False,
                             progress=pipeline.Progress(echo=echoed.append))
    assert seen["netrc"] == f"machine mirror.corp login bob password {SECRET}\n"
    assert not seen["src"].exists()  # deleted after the build
    assert not seen["src"].is_relative_to(seen["context"]) and not _files_holding(seen["context"], SECRET)
    assert seen["cmd"][seen["cmd"].index("--network") + 1] == "host"
    log = Path(exc.value.log).read_text()
    assert SECRET not in log and "https://***@mirror.corp/whl" in log
    assert SECRET not in exc.value.message and not any(SECRET in line for line in echoed)


def test_the_lock_mounts_the_netrc_for_its_run_only(tmp_path, monkeypatch):
    from envbuild import build, engine, lock as lock_stage, pipeline
    monkeypatch.setenv("ENVBUILD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ENVBUILD_TORCH_INDEX", "none")
    _, sources, ctx, _ = pipeline.prepare_locked(pipeline.Request(model="qcnet", card="a800"), lock=False)
    built, ran = [], []
    monkeypatch.setattr(build, "build", lambda context, tags, target="runtime", **k: built.append(k) or
                        build.BuildResult("sha256:base", [], 0, 0.0, [], ""))
    out = "".join(f"{n}==1.0 \\\n    --hash=sha256:{'c' * 64}\n" for n in ("torch", "torchaudio", "torchvision"))

    def run_container(image, cmd, **k):
        mounts = {v["bind"]: Path(h) for h, v in k["volumes"].items()}
        ran.append((mounts, mounts["/run/secrets/index_auth"].read_text()))
        return 0, out, ""
    monkeypatch.setattr(engine, "run_container", run_container)
    plan = json.loads((ctx / "plan.json").read_text())
    plan["index_cutoff"] = None
    (ctx / "plan.json").write_text(json.dumps(plan))
    netrc = f"machine mirror.corp login bob password {SECRET}\n"
    lock_stage.lock(ctx, index_auth=netrc, network="host")
    assert built[0]["index_auth"] == netrc and built[0]["network"] == "host"
    mounts, text = ran[0]
    assert text == netrc and mounts["/run/secrets/index_auth"].parent != ctx
    assert not mounts["/run/secrets/index_auth"].exists() and not _files_holding(ctx, SECRET)


def test_the_era_view_asks_its_upstream_with_the_credential():
    cred = creds.Credential("pypi.corp", "alice", PYPI_SECRET)
    header = creds.auth_header("https://pypi.corp/simple", [cred])
    import base64
    assert base64.b64decode(header["Authorization"].split()[1]).decode() == f"alice:{PYPI_SECRET}"
    assert creds.auth_header("https://pypi.org/simple", [cred]) == {}


def test_ledger_request_and_bake_file_hold_no_secret(tmp_path, monkeypatch):
    from envbuild import pipeline
    monkeypatch.setenv("ENVBUILD_HOME", str(tmp_path / "home"))
    req = pipeline.Request(model="qcnet", card="a800", torch_index=TORCH_URL)
    plan, sources = pipeline.plan_for(req)
    record = pipeline.ledger_request(plan, sources, req)
    assert record["torch_index"] == "https://mirror.corp/whl" and SECRET not in json.dumps(record)
    r = envbuild("bake", "--models", "qcnet", "--cards", "a800", "--torch-index", TORCH_URL, "-o", tmp_path / "b.json",
                 "--json", env={"ENVBUILD_HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout + r.stderr and not _files_holding(tmp_path, SECRET)
    doc = json.loads((tmp_path / "b.json").read_text())
    assert all("id=index_auth,env=ENVBUILD_INDEX_NETRC" in t["secret"] for t in doc["target"].values())


def test_printed_output_is_redacted_whatever_prints_it():
    import io
    buf = io.StringIO()
    stream = creds.RedactingStream(buf)
    assert stream.write(f"see https://bob:{SECRET}@mirror.corp/whl\n") > 0
    assert buf.getvalue() == "see https://***@mirror.corp/whl\n"
