"""Packages from git ([git_packages]): a catalog fact (URL, full commit, folder, build kind)
validated at load, listed by the Plan with its commit, fetched and built in a stage of its own,
kept out of requirements.in and the lock, named in the image's labels, and drafted by
`envbuild add` from a git+ pin. Every model and repository here is a snippet the tests write."""

import json
import subprocess
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from envbuild import add, catalog, labels, ledger, render
from envbuild.errors import BadInput, CatalogError
from envbuild.resolve import resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "89abcdef0123456789abcdef0123456789abcdef"


def with_git(matrices: Path, text: str, model: str = "qcnet") -> Path:
    path = matrices / "models" / f"{model}.toml"
    path.write_text(path.read_text() + "\n" + textwrap.dedent(text))
    return matrices


FACTS = f"""
[git_packages.chamferdist]
url = "https://github.com/example/chamferdist"
commit = "{COMMIT}"
build = "cuda-extension"
requires = ["einops"]

[git_packages.tinylib]
url = "https://git.example.org/group/tiny.git"
commit = "{OTHER}"
subdirectory = "python/pkg"
"""


@pytest.fixture
def git_cat(matrices_copy):
    return catalog.load(with_git(matrices_copy, FACTS))


# ---------------------------------------------------------------- load


def test_a_fact_loads_with_its_defaults(git_cat):
    facts = git_cat.model("qcnet").git_packages
    assert facts["chamferdist"] == catalog.GitPackage("chamferdist", "https://github.com/example/chamferdist", COMMIT,
                                                      "", "cuda-extension", ("einops",))
    assert facts["tinylib"].build == "pip" and facts["tinylib"].subdirectory == "python/pkg"


@pytest.mark.parametrize("field, needle", [
    ('commit = "0123abc"', "a short hash cannot be fetched: give the full 40-hex commit"),
    ('commit = "v1.0.2"', "a tag or branch can move: give the full 40-hex commit it points at (git ls-remote URL v1.0.2)"),
    ('commit = "0123456789ABCDEF0123456789ABCDEF01234567"', "not a full commit id"),
    ('url = "git@github.com:example/x.git"', "ssh is not supported (builds get no SSH agent): give the https address"),
    ('url = "ssh://git@github.com/example/x"', "ssh is not supported"),
    ('url = "https://user:token@github.com/example/x"', "carries credentials"),
    ('url = "git+https://github.com/example/x"', "without pip's git+ prefix"),
    ('url = "ftp://example.org/x"', "not an https URL of a repository"),
    ('url = "https://github.com/example/x;touch /pwn"', "not an https URL of a repository"),
    ('subdirectory = "../outside"', "must stay inside the repository"),
    ('subdirectory = "/etc"', "must stay inside the repository"),
    ('subdirectory = "-x"', "invalid value"),
    ('subdirectory = "a/../../b"', "must stay inside the repository"),
    ('build = "cuda"', "'cuda' is not one of pip, cuda-extension (did you mean 'cuda-extension'?)"),
    ('comit = "x"', "unknown key (did you mean 'commit'?)"),
    ('requires = ["numpy;rm"]', "invalid entry"),
    ('requires = ["fvcore>=0.1.5,<x"]', "invalid version range"),
    ('requires = [3]', "invalid entry"),
])
def test_mistakes_are_one_error_with_file_key_and_hint(matrices_copy, field, needle):
    key = field.split(" =")[0]
    fact = {"url": '"https://github.com/example/x"', "commit": f'"{COMMIT}"'}
    fact[key] = field.split("= ", 1)[1]
    body = "\n".join(f"{k} = {v}" for k, v in fact.items())
    with_git(matrices_copy, f"[git_packages.xlib]\n{body}\n")
    with pytest.raises(CatalogError) as err:
        catalog.load(matrices_copy)
    text = str(err.value)
    assert "qcnet.toml" in text and f"git_packages.xlib.{key}" in text and needle in text, text


def test_a_missing_commit_and_a_package_from_two_places_are_refused(matrices_copy):
    with_git(matrices_copy, '[git_packages.xlib]\nurl = "https://github.com/example/x"\n')
    with pytest.raises(CatalogError, match=r"git_packages\.xlib\.commit.*missing"):
        catalog.load(matrices_copy)
    path = matrices_copy / "models" / "qcnet.toml"
    path.write_text(path.read_text().replace("[git_packages.xlib]", "[git_packages.numpy]")
                    + f'commit = "{COMMIT}"\n')
    with pytest.raises(CatalogError, match=r"numpy is in \[packages\] too: a package comes from one place"):
        catalog.load(matrices_copy)
    # the same project spelt another way is the same package: pip would install the git wheel over the pin
    path.write_text(path.read_text().replace("[git_packages.numpy]", "[git_packages.Torch_Geometric]"))
    with pytest.raises(CatalogError, match=r"Torch_Geometric is in \[packages\] too"):
        catalog.load(matrices_copy)


def test_the_misspelled_table_is_refused(matrices_copy):
    with_git(matrices_copy, f'[git_package.xlib]\nurl = "https://github.com/example/x"\ncommit = "{COMMIT}"\n')
    with pytest.raises(CatalogError, match="did you mean 'git_packages'"):
        catalog.load(matrices_copy)


# ---------------------------------------------------------------- the Plan


def test_the_plan_lists_each_with_its_commit_and_its_dependencies(git_cat, cat):
    plan = resolve(git_cat, "qcnet", "a800")
    assert plan.git_packages["chamferdist"] == {"url": "https://github.com/example/chamferdist", "commit": COMMIT,
                                                "subdirectory": "", "build": "cuda-extension", "requires": ["einops"]}
    assert plan.git_packages["tinylib"]["commit"] == OTHER
    einops = plan.pin("einops")
    assert einops.version == "" and "required by chamferdist (from git" in einops.why and not einops.deviation
    assert json.loads(plan.to_json())["git_packages"]["tinylib"]["subdirectory"] == "python/pkg"
    # a Plan without one is as it was: no key in plan.json, the same ledger digest
    plain = resolve(cat, "qcnet", "a800")
    assert "git_packages" not in plain.to_dict()
    assert ledger.digest(plain) == ledger.digest(replace(plan, git_packages={}, packages=plain.packages))
    # another commit is another image
    moved = dict(plan.git_packages, tinylib={**plan.git_packages["tinylib"], "commit": COMMIT})
    assert ledger.digest(replace(plan, git_packages=moved)) != ledger.digest(plan)


def test_a_required_range_is_kept_and_reaches_requirements_in(matrices_copy):
    """detectron2's own ranges (fvcore>=0.1.5,<0.1.6): a requires entry may carry one; it is the pin."""
    cat = catalog.load(with_git(matrices_copy, f"""
        [git_packages.detlib]
        url = "https://github.com/example/detlib"
        commit = "{COMMIT}"
        requires = ["FVCore >= 0.1.5, <0.1.6", "iopath"]
        """))
    assert cat.model("qcnet").git_packages["detlib"].requires == ("fvcore>=0.1.5,<0.1.6", "iopath")
    plan = resolve(cat, "qcnet", "a800")
    fvcore, iopath = plan.pin("fvcore"), plan.pin("iopath")
    assert fvcore.version == ">=0.1.5,<0.1.6" and "required by detlib" in fvcore.why and "its own range" in fvcore.why
    assert iopath.version == "" and "the lock picks a version" in iopath.why
    req = render.requirements_in(render.make_context(plan, "x")).splitlines()
    assert "fvcore>=0.1.5,<0.1.6" in req and "iopath" in req


# ---------------------------------------------------------------- render


def stage(text: str, name: str) -> str:
    start = text.index(f" AS {name}\n")
    end = text.find("\n# ------", start)
    return text[start:end]


def test_each_is_fetched_by_commit_in_a_stage_of_its_own_and_installed_by_the_builder(git_cat):
    ctx = render.make_context(resolve(git_cat, "qcnet", "a800"), "envbuild render qcnet --card a800")
    text = render.dockerfile(ctx)
    pure = stage(text, "git-tinylib")
    assert "FROM base AS git-tinylib" in text
    assert f"git -C /src fetch -q --depth 1 https://git.example.org/group/tiny.git {OTHER}" in pure
    assert "git -C /src checkout -q FETCH_HEAD" in pure and "--mount=type=secret,id=ca_bundle" in pure
    assert "pip wheel --no-deps -w /wheels /src/python/pkg" in pure and "--no-build-isolation" not in pure
    cuda = stage(text, "git-chamferdist")
    assert "FROM compile AS git-chamferdist" in text
    assert f"fetch -q --depth 1 https://github.com/example/chamferdist {COMMIT}" in cuda
    assert "pip wheel --no-build-isolation --no-deps -v -w /wheels /src" in cuda and "max_jobs.py" in cuda
    assert "--mount=type=cache,target=/root/.ccache" in cuda
    builder = stage(text, "builder")
    for name in ("git-chamferdist", "git-tinylib", "wheel-torch-scatter"):
        assert f"--mount=type=bind,from={name},source=/wheels,target=/wheels/{name}" in builder
    assert "pip install --no-cache-dir --no-deps --no-index /wheels/*/*.whl" in builder
    order = [text.index(s) for s in ("AS torch", "AS compile", "AS git-chamferdist", "AS builder", "AS runtime")]
    assert order == sorted(order)
    assert f"# from git: tinylib https://git.example.org/group/tiny.git at {OTHER}, folder python/pkg, built as pip" in text
    # nothing resolves them unpinned: neither requirements.in nor the lock names a VCS source
    req = render.requirements_in(ctx)
    assert "git+" not in req and "chamferdist" not in req and "tinylib" not in req
    assert "\neinops\n" in req  # what one needs at run time is locked like any other package


def test_the_labels_name_url_and_commit(git_cat, cat):
    ctx = render.make_context(resolve(git_cat, "qcnet", "a800"), "x")
    got = dict(ctx.labels)
    assert got[labels.GIT_PACKAGES] == (f"chamferdist=https://github.com/example/chamferdist@{COMMIT},"
                                        f"tinylib=https://git.example.org/group/tiny.git@{OTHER}#subdirectory=python/pkg")
    summary = json.loads(got[labels.PLAN])
    assert summary["git_packages"]["chamferdist"] == f"https://github.com/example/chamferdist@{COMMIT}"
    plain = dict(render.make_context(resolve(cat, "qcnet", "a800"), "x").labels)
    assert labels.GIT_PACKAGES not in plain and "git_packages" not in json.loads(plain[labels.PLAN])


def test_a_cuda_extension_alone_brings_the_compile_stage(matrices_copy):
    cat = catalog.load(with_git(matrices_copy, f"""
        [git_packages.tinyops]
        url = "https://github.com/example/tinyops"
        commit = "{COMMIT}"
        build = "cuda-extension"
        """, model="maptr"))
    plan = resolve(cat, "maptr", "a800")
    plan = replace(plan, compiled=(), native_packages={})  # no compiled package of its own
    text = render.dockerfile(render.make_context(plan, "x"))
    assert "FROM torch AS compile" in text and "FROM compile AS git-tinyops" in text
    assert "AS wheels" not in text  # envbuild wheels' stage holds compiled packages only


def test_a_git_mirror_serves_every_fetch_and_the_labels_keep_upstream(git_cat):
    """git_mirror: the model's source and each package are fetched from MIRROR/HOST/PATH."""
    plan = resolve(git_cat, "qcnet", "a800")
    ctx = render.make_context(plan, "x", git_mirror="http://10.0.0.5:8080/git/")
    text = render.dockerfile(ctx)
    assert f"fetch -q --depth 1 http://10.0.0.5:8080/git/github.com/example/chamferdist {COMMIT}" in stage(text, "git-chamferdist")
    assert f"fetch -q --depth 1 http://10.0.0.5:8080/git/git.example.org/group/tiny.git {OTHER}" in stage(text, "git-tinylib")
    assert f"fetch -q --depth 1 http://10.0.0.5:8080/git/{plan.repo.split('://')[1]} {plan.commit}" in text
    assert "https://github.com/example/chamferdist" not in stage(text, "git-chamferdist")
    assert dict(ctx.labels)[labels.GIT_PACKAGES].startswith(f"chamferdist=https://github.com/example/chamferdist@{COMMIT}")


@pytest.mark.parametrize("value, ok", [("http://10.0.0.5:8080/git", "http://10.0.0.5:8080/git/"), ("", ""),
                                       ("ftp://mirror/", None), ("https://user:pw@mirror.corp/", None),
                                       ("https://mirror.corp/a b", None)])
def test_the_git_mirror_setting_is_checked(monkeypatch, value, ok):
    from envbuild import config
    monkeypatch.setenv("ENVBUILD_GIT_MIRROR", value)
    if ok is None:
        with pytest.raises(BadInput, match="git_mirror"):
            config.load_sources()
    else:
        assert config.load_sources().git_mirror == ok


@pytest.mark.parametrize("change", [
    {"url": "https://github.com/x/y\nRUN rm -rf /"}, {"url": "https://github.com/x/y $(id)"},
    {"commit": "HEAD"}, {"subdirectory": "../../etc"}, {"build": "sh"},
])
def test_a_plan_from_anywhere_cannot_inject(git_cat, change):
    plan = resolve(git_cat, "qcnet", "a800")
    bad = dict(plan.git_packages, tinylib={**plan.git_packages["tinylib"], **change})
    with pytest.raises(BadInput, match="refusing to render"):
        render.make_context(replace(plan, git_packages=bad), "x")


# ---------------------------------------------------------------- envbuild add


def git(repo: Path, *args) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org", "GIT_AUTHOR_DATE": "2023-05-01T12:00:00",
           "GIT_COMMITTER_DATE": "2023-05-01T12:00:00", "PATH": "/usr/bin:/bin"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def gitrepo(tmp_path):
    """A model whose requirements.txt installs three packages from git: at a commit (in a folder),
    at a tag, and with no commit at all."""
    root = tmp_path / "gitdet"
    (root / "tools").mkdir(parents=True)
    (root / "requirements.txt").write_text(
        "torch==2.0.1\n"
        "numpy==1.24.3\n"
        f"git+https://github.com/example/pointops.git@{COMMIT}#egg=pointops&subdirectory=lib/pointops\n"
        "tinylib @ git+https://github.com/example/tinylib@v1.2\n"
        "git+ssh://git@github.com/example/nocommit.git#egg=nocommit\n")
    (root / "tools" / "train.py").write_text("import argparse\nimport numpy\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "first")
    return root


def test_add_turns_git_pins_into_facts_and_asks_only_what_it_cannot_know(gitrepo):
    refs = [(OTHER, "refs/tags/v1.2^{}"), ("f" * 40, "refs/tags/v1.2"), (COMMIT, "refs/heads/main")]
    d = add.draft(str(gitrepo), ls_remote=lambda url: refs if url == "https://github.com/example/tinylib" else [])
    got = {g.name: g for g in d.git_packages}
    assert (got["pointops"].https, got["pointops"].commit, got["pointops"].subdirectory) == \
        ("https://github.com/example/pointops.git", COMMIT, "lib/pointops")
    assert got["tinylib"].commit == OTHER  # the tag's peeled commit
    assert got["nocommit"].https == "https://github.com/example/nocommit.git" and not got["nocommit"].commit
    asked = {q.key for q in d.questions if q.key.startswith("git_packages.")}
    assert "git_packages.nocommit.commit" in asked and "git_packages.pointops.commit" not in asked
    assert {"pointops", "tinylib", "nocommit"}.isdisjoint(d.packages)
    text = add.render(d, "envbuild add")
    assert f'[git_packages.pointops]  # requirements.txt:3' in text and f'commit = "{COMMIT}"' in text
    assert 'subdirectory = "lib/pointops"' in text
    assert '# [git_packages.nocommit]' in text  # left for the user to finish: the questions say so


def test_offline_a_tag_stays_a_question(gitrepo):
    d = add.draft(str(gitrepo))
    tiny = next(q for q in d.questions if q.key == "git_packages.tinylib.commit")
    assert "'v1.2' is not a full commit (--offline: not asked)" in tiny.question and tiny.found == "requirements.txt:4"


def test_resolve_ref():
    refs = [(COMMIT, "refs/heads/dev"), (OTHER, "refs/tags/v1"), ("a" * 40, "refs/tags/v1^{}")]
    assert add.resolve_ref(refs, "v1") == "a" * 40
    assert add.resolve_ref(refs, "dev") == COMMIT
    assert add.resolve_ref(refs, OTHER[:9]) == OTHER
    assert add.resolve_ref(refs, "nope") == "" and add.resolve_ref(refs, "abcdef0") == ""
    assert add.git_https("git+git@github.com:o/r.git") == "https://github.com/o/r.git"
    assert add.git_https("git+https://u:t@host.example/o/r") == "https://host.example/o/r"


def test_add_writes_an_entry_whose_facts_load(gitrepo, home):
    d = add.add_model(str(gitrepo), offline=True)
    model = catalog.load(home).model("gitdet")
    assert model.git_packages["pointops"] == catalog.GitPackage(
        "pointops", "https://github.com/example/pointops.git", COMMIT, "lib/pointops", "pip", ())
    assert set(model.git_packages) == {"pointops"}  # the two without a commit are commented out
    assert d.path and "git_packages.tinylib.commit" in {q.key for q in d.questions}


# ---------------------------------------------------------------- smoke env


def test_smoke_env_checks_that_each_is_installed_and_imports(tmp_path, monkeypatch):
    import importlib.util
    import sys
    folder = Path(__file__).resolve().parent.parent / "envbuild" / "incontainer"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location("level_env_under_test", folder / "level_env.py")
    env_level = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(env_level)
    installed = {"torch": "2.0.1", "torchvision": "0.15.2", "tinylib": "0.1.dev0"}
    monkeypatch.setattr(env_level, "dist_version", lambda name: installed.get(name))
    imported = []
    monkeypatch.setattr(env_level.importlib, "import_module", imported.append)
    monkeypatch.setattr(env_level, "gpu_libraries", lambda: [])

    class Args:
        workdir, lock = str(tmp_path), str(tmp_path / "none.lock")
    plan = {"torch": {"version": "2.0.1"}, "torchvision": {"version": "0.15.2"}, "torchaudio": {"version": ""},
            "packages": [], "git_packages": {"tinylib": {"commit": COMMIT}, "pointops": {"commit": COMMIT}}}
    out = env_level.level_env(plan, Args)
    got = {p["name"]: p for p in out["packages"]}
    assert got["tinylib"]["ok"] and "tinylib" in imported
    assert got["pointops"]["problems"] == ["not installed"] and out["status"] == "failed"
    assert sys.modules.get("level_env_under_test") is None


def test_resolve_prints_each_with_its_commit(git_cat, capsys):
    from envbuild import show
    show.plan(resolve(git_cat, "qcnet", "a800"))
    text = " ".join(capsys.readouterr().out.split())
    assert f"from git chamferdist: https://github.com/example/chamferdist@{COMMIT} (cuda-extension)" in text
    assert f"tinylib: https://git.example.org/group/tiny.git@{OTHER}#subdirectory=python/pkg (pip)" in text
