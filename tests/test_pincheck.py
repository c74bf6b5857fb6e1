"""resolve --check: pip's resolver, in report mode against the era view, says whether the Plan's
pins install together. Parsing of pip's words on texts written here; one real run against PyPI."""

from types import SimpleNamespace

import pytest

from envbuild import pincheck
from envbuild.errors import BadInput, OperationFailed
from envbuild.plan import Pin

TWO_SIDED = """\
Collecting nuscenes-devkit==1.1.10
  Using cached nuscenes_devkit-1.1.10-py3-none-any.whl.metadata (1.2 kB)
ERROR: Cannot install matplotlib==3.6.0 and nuscenes-devkit==1.1.10 because these package versions have conflicting dependencies.

The conflict is caused by:
    The user requested matplotlib==3.6.0
    nuscenes-devkit 1.1.10 depends on matplotlib<3.6.0

To fix this you could try to:
1. loosen the range of package versions you've specified
2. remove package versions to allow pip to attempt to solve the dependency conflict

ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/#dealing-with-dependency-conflicts
"""

RANGES = """\
The conflict is caused by:
    The user requested (constraint) numpy==1.19.5
    av2 0.2.1 depends on numpy>=1.21.5
    scikit-image 0.19.3 depends on numpy>=1.17.0
    The user requested urllib3==2.0.0
    requests 2.25.1 depends on urllib3<1.27 and >=1.21.1

To fix this you could try to:
"""

MISSING = """\
ERROR: Could not find a version that satisfies the requirement trimesh<2.35.40,>=2.35.39 (from versions: 3.6.2, 4.0.0)
ERROR: No matching distribution found for trimesh<2.35.40,>=2.35.39
ERROR: Could not find a version that satisfies the requirement mmcv-full==1.7.2 (from mmdet3d==1.0.0) (from versions: none)
"""

TORCH_ONLY = """\
The conflict is caused by:
    The user requested torch==2.0.1+cu118
    The user requested (constraint) torch<=2.14.1

Additionally, some packages in these conflicts have no matching distributions available for your environment:
    torch
"""


def test_a_pin_and_the_requirement_that_refuses_it():
    clashes = pincheck.parse_conflict(TWO_SIDED)
    assert clashes == [{"package": "matplotlib", "requested": ["matplotlib==3.6.0"],
                        "required": [{"by": "nuscenes-devkit", "version": "1.1.10", "spec": "<3.6.0",
                                      "requirement": "matplotlib<3.6.0"}]}]
    line = pincheck.describe(clashes[0])
    assert line == "pin conflict: matplotlib==3.6.0 clashes with nuscenes-devkit 1.1.10 requires matplotlib<3.6.0"
    assert "\n" not in line


def test_every_clash_constraints_and_pips_and_ranges():
    clashes = {c["package"]: c for c in pincheck.parse_conflict(RANGES)}
    assert set(clashes) == {"numpy", "urllib3"}
    assert clashes["numpy"]["requested"] == ["numpy==1.19.5"]
    assert [r["by"] for r in clashes["numpy"]["required"]] == ["av2", "scikit-image"]
    spec = clashes["urllib3"]["required"][0]["spec"]
    assert set(spec.split(",")) == {"<1.27", ">=1.21.1"}  # pip's "and" read as a specifier set


def test_no_conflict_section_is_no_clash_and_a_pin_alone_is_not_one():
    assert pincheck.parse_conflict(MISSING) == []
    assert pincheck.parse_conflict(TORCH_ONLY) == []  # nothing *requires* torch: it is missing, not clashing
    assert [m["package"] for m in pincheck.parse_missing(TORCH_ONLY)] == ["torch"]


def test_a_clash_on_a_package_with_no_wheel_here_is_missing_not_a_conflict():
    text = ("The conflict is caused by:\n    spconv-cu117 2.3.6 depends on fire\n    spconv-cu117 2.3.5 depends on fire\n\n"
            "Additionally, some packages in these conflicts have no matching distributions available for your "
            "environment:\n    fire\n")
    clash = pincheck.parse_conflict(text)[0]
    assert not clash["requested"] and pincheck.fix_for(clash, {"0.7.0": False}) is not None  # check() leaves it out
    assert [m["package"] for m in pincheck.parse_missing(text)] == ["fire"]


def test_requirements_without_a_wheel_are_named_with_what_asked_for_them():
    missing = pincheck.parse_missing(MISSING)
    assert [(m["package"], m["from"]) for m in missing] == [("trimesh", ""), ("mmcv-full", "mmdet3d==1.0.0")]
    assert missing[0]["requirement"] == "trimesh<2.35.40,>=2.35.39"


def test_the_line_names_the_ports_choice_and_a_pin_that_fixes_it():
    pin = Pin("matplotlib", "3.6.0", "3.5.2 has no wheel for Python 3.11", upstream="3.5.2", source="port")
    plan = SimpleNamespace(pin=lambda name: pin if name == "matplotlib" else None)
    clash = pincheck.parse_conflict(TWO_SIDED)[0]
    fix = pincheck.fix_for(clash, {"3.5.2": False, "3.5.3": False, "3.6.0": True, "3.6.0rc1": True})
    assert fix == {"requirement": "matplotlib==3.5.3", "how": "no wheel for this Python: it builds from its sdist"}
    line = pincheck.describe(clash, plan, fix)
    assert "upstream pins 3.5.2" in line and "3.5.2 has no wheel for Python 3.11" in line
    assert line.endswith("--set matplotlib==3.5.3")
    assert pincheck.fix_for(clash, {"3.6.0": True}) is None


def test_pip_runs_for_the_images_python_and_platform_and_builds_nothing(tmp_path):
    cmd = pincheck.pip_command("3.8", tmp_path / "r.in", "http://127.0.0.1:1/simple")
    text = " ".join(cmd)
    assert "--dry-run" in cmd and "--ignore-installed" in cmd and "--report -" in text
    assert "--python-version 3.8" in text and "--only-binary :all:" in text and "--platform manylinux2014_x86_64" in text
    assert "--no-deps" not in cmd and "--isolated" in cmd  # requirements are followed; no host pip.conf
    assert "--index-url http://127.0.0.1:1/simple" in text


def test_a_clash_exits_2_and_an_unfinished_check_exits_1():
    clash = pincheck.parse_conflict(TWO_SIDED)[0]
    clash["fix"] = {"requirement": "matplotlib==3.5.3", "how": "x"}
    with pytest.raises(BadInput) as exc:
        pincheck.raise_for({"status": "conflict", "clashes": [clash], "line": pincheck.describe(clash)})
    assert exc.value.exit_code == 2 and "matplotlib==3.5.3" in exc.value.hint
    with pytest.raises(OperationFailed):
        pincheck.raise_for({"status": "incomplete", "line": "pin check incomplete: x"})
    pincheck.raise_for({"status": "ok", "line": "fine"})


@pytest.mark.integration
def test_pip_finds_a_real_clash_against_the_era_view_of_pypi():
    """Two small pure-Python pins that truly conflict: requests 2.25.1 requires urllib3 < 1.27."""
    result = pincheck.check_requirements("requests==2.25.1\nurllib3==2.0.0\n", "3.8", "2023-06-01",
                                         "https://pypi.org/simple", timeout=300)
    assert result["status"] == "conflict", result
    assert result["line"].startswith("pin conflict: urllib3==2.0.0 clashes with requests 2.25.1 requires urllib3")
    assert result["clashes"][0]["fix"]["requirement"].startswith("urllib3==1.26.")  # the era's newest 1.26
    ok = pincheck.check_requirements("requests==2.25.1\nurllib3==1.26.15\n", "3.8", "2023-06-01",
                                     "https://pypi.org/simple", timeout=300)
    assert ok["status"] == "ok", ok
    assert ok["installs"]["urllib3"] == "1.26.15" and ok["installs"]["idna"] == "2.10"
    from packaging.version import Version
    assert Version(ok["installs"]["certifi"]) < Version("2023.6")  # unpinned: resolved as of the era, not today


@pytest.mark.integration
def test_a_pin_with_no_wheel_for_the_python_and_no_sdist_is_a_clash_with_its_first_release_that_has_one():
    """open3d ships wheels only: 0.14.1 (PointPillars' pin) has none for 3.11, so no build could
    install it (the Plan kept it: nothing told the resolver). numba 0.48.0 has no 3.11 wheel either
    but has an sdist: it builds in the image, and the check leaves it out and says so."""
    result = pincheck.check_requirements("open3d==0.14.1\nnumba==0.48.0\ntqdm==4.62.3\n", "3.11", "2025-03-15",
                                         "https://pypi.org/simple", timeout=300)
    assert result["status"] == "conflict", result
    (clash,) = result["clashes"]
    assert clash["line"].startswith("open3d==0.14.1 cannot install on Python 3.11: no wheel for it and no sdist")
    assert clash["fix"]["requirement"] == "open3d==0.18.0"  # the first with a cp311 manylinux wheel
    assert [s for s in result["skipped"] if s.startswith("numba==0.48.0: no wheel for Python 3.11")]
    with pytest.raises(BadInput) as exc:
        pincheck.raise_for(result)
    assert "open3d==0.18.0" in exc.value.hint
