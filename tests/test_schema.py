"""The catalog schema (envbuild/schema.py): the one description that loading validates against
and the field reference prints. The committed reference cannot drift, and the loader and the
schema agree key for key."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from envbuild import base_image, catalog, schema
from envbuild.errors import CatalogError

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "catalog-schema.md"

VENDOR = ('\n[vendor.mmcv-full]\nfind_links = "https://download.example.org/mmcv/dist/{cu}/torch{torch}/index.html"\n'
          '[[vendor.mmcv-full.builds]]\nversions = ["1.7.1"]\ntorch = ["2.0"]\ncuda = ["11.8"]\n'
          'python = ["3.8", "3.11"]\nsass = ["8.0", "8.6"]\nptx = ["8.6"]\n')

GIT_PACKAGE = ('\n[git_packages.tinylib]\nurl = "https://git.example.org/tinylib"\n'
               'commit = "0123456789abcdef0123456789abcdef01234567"\nsubdirectory = "python"\nbuild = "pip"\n'
               'requires = ["numpy"]\n')


def test_the_committed_reference_is_the_generated_one():
    assert DOC.read_text() == schema.markdown(), \
        "docs/catalog-schema.md is stale: envbuild catalog schema > docs/catalog-schema.md"


def test_the_readme_links_the_reference():
    assert "docs/catalog-schema.md" in (ROOT / "README.md").read_text()


def _tables(node, out=None):
    """Every schema.Table under node."""
    out = [] if out is None else out
    if isinstance(node, schema.Table):
        out.append(node)
        for child in node.fields.values():
            _tables(child, out)
    elif isinstance(node, (schema.Rows, schema.Names)):
        _tables(node.of, out)
    return out


def _fields(node, out=None):
    """Every schema.Field under node."""
    out = [] if out is None else out
    if isinstance(node, schema.Field):
        out.append(node)
    elif isinstance(node, schema.Table):
        for child in node.fields.values():
            _fields(child, out)
    elif isinstance(node, (schema.Rows, schema.Names)):
        _fields(node.of, out)
    return out


def test_every_key_the_loader_reads_is_documented_and_every_documented_key_is_read(matrices_copy, monkeypatch):
    """Record what each reader asked for while the whole catalog loads (built-in files, bases.toml,
    a vendor table, both construct kinds, both base sources): the asked keys of every table are
    exactly the keys its schema table declares."""
    asked: dict[int, set] = {}
    nodes: dict[int, object] = {}
    unread = catalog._Reader.unread

    def recording(self):
        if self.node is not None:
            asked.setdefault(id(self.node), set()).update(self.asked)
            nodes[id(self.node)] = self.node
        return unread(self)

    monkeypatch.setattr(catalog._Reader, "unread", recording)
    packages = matrices_copy / "toolchains" / "packages.toml"
    packages.write_text(packages.read_text() + VENDOR)
    model = matrices_copy / "models" / "qcnet.toml"
    model.write_text(model.read_text() + GIT_PACKAGE)
    cat = catalog.load(matrices_copy)
    assert "tinylib" in cat.model("qcnet").git_packages
    assert "mmcv-full" in cat.vendor and {m.construct.kind for m in cat.models.values() if m.construct} == {"argparse", "config", "python"}
    assert {r.source for r in base_image.recipes().values()} == {"debian", "pypi"}
    for root in schema.FILES.values():
        for table in _tables(root):
            seen = asked.get(id(table))
            assert seen is not None, f"no loader reads the table {table.meaning!r}"
            assert seen <= set(table.fields), f"read but not in schema.py: {sorted(seen - set(table.fields))}"
            assert set(table.fields) <= seen, f"in schema.py but nothing reads: {sorted(set(table.fields) - seen)}"
    assert set(nodes) <= {id(t) for root in schema.FILES.values() for t in _tables(root)} | \
        {id(n) for root in schema.FILES.values() for n in _names(root)}


def _names(node, out=None):
    out = [] if out is None else out
    if isinstance(node, schema.Names):
        out.append(node)
    if isinstance(node, schema.Table):
        for child in node.fields.values():
            _names(child, out)
    elif isinstance(node, (schema.Rows, schema.Names)):
        _names(node.of, out)
    return out


def test_a_loader_that_reads_an_undeclared_key_fails_loudly():
    reader = catalog._Reader(Path("x.toml"), {"cards": {}}, "", node=schema.CARDS)
    with pytest.raises(AssertionError, match="schema.py does not declare"):
        reader.get("cardz", dict, {})
    card = catalog._Reader(Path("x.toml"), {"name": "x"}, "cards.a.", node=schema.CARDS.fields["cards"].of)
    with pytest.raises(AssertionError, match="schema.py says int"):
        card.get("memory_gb", str)


@pytest.mark.parametrize("field", [f for root in schema.FILES.values() for f in _fields(root)],
                         ids=lambda f: f.meaning[:40])
def test_every_field_has_a_meaning_and_an_example_of_its_type(field):
    assert field.meaning.strip() and field.type.strip()
    value = tomllib.loads(f"x = {field.example}")["x"]
    assert type(value) is field.kind, (field.example, field.kind)


def test_unknown_keys_are_refused_against_the_schema(matrices_copy, tmp_path):
    path = matrices_copy / "models" / "qcnet.toml"
    path.write_text(path.read_text().replace('[train]\n', '[train]\nlaunchr = "x"\n'))
    with pytest.raises(CatalogError, match=r"train\.launchr: unknown key \(did you mean 'launcher'\?\)"):
        catalog.load(matrices_copy)
    bases = tmp_path / "bases.toml"
    bases.write_text('[base."11.8"]\nsource = "debian"\nsuite = "bookworm"\npackages = ["nvidia-cuda-toolkit"]\n'
                     'toolkit = "13.0.2"\n')
    with pytest.raises(CatalogError, match=r"base\.11\.8\.toolkit: not a field of source 'debian'"):
        base_image.recipes(bases)


def test_construct_kinds_come_from_the_schema():
    assert catalog.CONSTRUCT_FIELDS["argparse"][:3] == ("module", "object", "args_hook")
    assert "config" in catalog.CONSTRUCT_FIELDS["config"] and "module" not in catalog.CONSTRUCT_FIELDS["config"]


def test_catalog_schema_command():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "envbuild.cli", "catalog", "schema", *args],
                              capture_output=True, text=True, timeout=120)
    r = run()
    assert r.returncode == 0 and r.stdout == schema.markdown(), r.stderr
    data = json.loads(run("--json").stdout)
    assert set(data) == set(schema.FILES)
    train = next(t for t in data["models/*.toml"]["tables"] if t["table"] == "[train]")
    launcher = next(f for f in train["fields"] if f["field"] == "launcher")
    assert launcher["required"] and launcher["toml"] == "string" and launcher["meaning"] and launcher["example"]
