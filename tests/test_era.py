"""PyPI as of a model's era: which files the lock step may see (pure logic, no network)."""

from datetime import datetime, timezone

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
