"""Run a model extension's build command with the environment it needs in this venv:
python editable_env.py CMD [ARGS...] (the command replaces this process).

setuptools 80 and newer run `setup.py develop`, which pip uses for an editable install of a
setup.py-only project, as a nested `pip install -e . --use-pep517` that builds in isolation:
it downloads its own setuptools and sees no torch, so an extension that imports torch in its
setup.py fails there. With PIP_USE_PEP517=1 pip takes the PEP 660 path from the start, which
builds in this venv as --no-build-isolation asks; PIP_NO_BUILD_ISOLATION=0 reaches a pip that
`python setup.py develop` starts itself (pip reads that variable inverted: 0 turns isolation
off; checked with pip 23.2 and 26.3). Older setuptools keep their own develop, untouched.
Runs inside images: Python 3.8+, stdlib only.
"""

import os
import sys

DELEGATES_DEVELOP = 80  # the first setuptools major whose develop command calls pip


def needs_pep517(version):
    head = version.split(".")[0]
    return head.isdigit() and int(head) >= DELEGATES_DEVELOP


def settings():
    """The variables to add: {} where setuptools is older or absent."""
    try:
        import setuptools
    except ImportError:
        return {}
    if needs_pep517(setuptools.__version__):
        return {"PIP_USE_PEP517": "1", "PIP_NO_BUILD_ISOLATION": "0"}
    return {}


def main(argv):
    if len(argv) < 2:
        sys.stderr.write("usage: python editable_env.py CMD [ARGS...]\n")
        return 2
    env = dict(os.environ, **settings())
    os.execvpe(argv[1], argv[1:], env)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
