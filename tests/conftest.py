import shutil
from pathlib import Path

import pytest

from envbuild import catalog

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cat():
    return catalog.load()


@pytest.fixture
def matrices_copy(tmp_path):
    """A writable copy of matrices/ for tests that break or extend the catalog."""
    dst = tmp_path / "matrices"
    shutil.copytree(ROOT / "matrices", dst)
    return dst
