"""The catalog's schema: every file, table and field a catalog may hold, with its type, meaning
and an example. The one description of the catalog's shape:

- loading (catalog._Reader) refuses a key or table the schema does not declare, with the
  closest declared name, and a loader that reads a key the schema lacks fails loudly;
- `envbuild catalog schema` (and the committed docs/catalog-schema.md) print it as the field
  reference.

A new field is one line here (plus the code that gives it its effect in catalog.py).
Pure data: no imports from the rest of envbuild.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# How a field's TOML value looks, by the Python type tomllib gives it.
_TOML = {str: "string", int: "integer", float: "float", bool: "boolean", list: "array", dict: "table"}


@dataclass(frozen=True)
class Field:
    """A key with a value: kind is the TOML value's Python type, type what the value must be."""
    kind: type
    type: str
    meaning: str
    example: str  # TOML text of the value
    required: bool = False
    only: str = ""  # applies only where the table's `by` field has this value


@dataclass(frozen=True)
class Table:
    """A table whose keys are fixed field names (each a Field, Table, Names or Rows)."""
    meaning: str
    fields: dict = field(default_factory=dict)
    required: bool = False
    by: str = ""  # a field whose value decides which fields apply (a Field's `only`)


@dataclass(frozen=True)
class Names:
    """A table whose keys the user chooses (package names, versions, card ids): every key is
    read by name, each value is `of`."""
    key: str  # what the names are, as the reference shows them: NAME, VERSION, CUDA
    meaning: str
    of: object  # Field | Table | Names
    required: bool = False
    free: bool = False  # documentation only: keys and values are not read


@dataclass(frozen=True)
class Rows:
    """An array of tables ([[era]], builds = [{...}])."""
    meaning: str
    of: Table
    required: bool = False


def F(kind, type_, meaning, example, req=False, only=""):
    return Field(kind, type_, meaning, example, req, only)


# Value types, as the reference names them.
VERSION = "version"
SPEC = 'version or specifier ("*" = unpinned where said)'
CC = "compute capability X.Y"
CUDA = "CUDA X.Y"
RANGE = "[min, max] versions"
DAY = "date YYYY-MM-DD"
PKG = "package name"
RELPATH = "path inside the model's repository"
DOTTED = "dotted Python name"
WORDS = "array of plain words"


CARDS = Table("GPU cards envbuild targets; a user's cards.toml adds cards or replaces one by id.", {
    "cards": Names("ID", "One table per card; the id is lowercase letters, digits, '.', '_' or '-'.", Table(
        "A GPU card.", {
            "name": F(str, "string", "Full product name, as shown in tables.", '"NVIDIA A800 80GB"', True),
            "cc": F(str, CC, "CUDA compute capability.", '"8.0"', True),
            "memory_gb": F(int, "integer 1-100000", "GPU memory in GB (bounds compile jobs and batch sizes).", "80", True),
            "p2p": F(bool, "boolean", "Whether NCCL peer-to-peer works between cards of a node (false: NCCL_P2P_DISABLE=1).",
                     "true", True),
            "aliases": F(list, "array of names", "Other spellings teams and nvidia-smi use (lowercase; 'NVIDIA '/'GeForce ' "
                         "dropped, spaces as '-').", '["a800-sxm4-80gb"]'),
        }), required=True),
})

CUDA_FILE = Table("CUDA toolkits and the Ubuntu releases of their nvidia/cuda images.", {
    "ubuntu": Names("UBUNTU", "One table per Ubuntu release (key like \"22.04\").", Table("An Ubuntu release.", {
        "gcc": F(int, "integer", "Its default gcc major.", "11", True),
        "python": F(str, VERSION, "Its system Python.", '"3.10"', True),
    }), required=True),
    "cuda": Names("CUDA", "One table per toolkit minor (key like \"11.8\").", Table("A CUDA toolkit.", {
        "full": F(str, VERSION, "Its last patch release: the only nvidia/cuda tags that survive.", '"11.8.0"', True),
        "archs": F(list, f"array of {CC}", "Compute capabilities its nvcc emits SASS for.", '["3.5", "8.0", "9.0"]', True),
        "max_gcc": F(int, "integer", "Newest host gcc major its nvcc accepts.", "11", True),
        "min_driver": F(str, "driver version", "Linux driver the toolkit needs.", '"520.61.05"', True),
        "compat_driver": F(str, "driver version", "Minor-version-compatibility driver floor.", '"450.80.02"', True),
        "cudnn": F(str, "cudnnN", "cuDNN infix of its image tags.", '"cudnn8"', True),
        "ubuntu": F(list, "array of Ubuntu releases", "OS versions its devel images exist for (each under [ubuntu]).",
                    '["20.04", "22.04"]', True),
    }), required=True),
})

TORCH_FILE = Table("torch releases on Linux x86_64 and the GPU code of their CUDA builds.", {
    "wheel_archs": Names("CUDA", "SASS archs the PyTorch index's builds for that CUDA carry.",
                         F(list, f"array of {CC}", "Archs of torch's wheels built with this CUDA.", '["3.7", "5.0", "8.0", "8.6"]'),
                         required=True),
    "torch": Names("VERSION", "One table per torch release.", Table("A torch release.", {
        "torchvision": F(str, VERSION, "The torchvision that pairs with it.", '"0.15.2"', True),
        "torchaudio": F(str, VERSION, "The torchaudio that pairs with it; absent: none pairs.", '"2.0.2"'),
        "python": F(list, RANGE, "CPython range it ships wheels for (inclusive).", '["3.8", "3.11"]', True),
        "index": F(list, f"array of {CUDA}", "CUDA builds on the PyTorch wheel index.", '["11.7", "11.8"]', True),
        "pypi": F(str, CUDA, "CUDA of the plain PyPI wheel.", '"11.7"', True),
        "cxx": F(int, "integer", "C++ standard its headers demand from extensions.", "17", True),
        "ext_max_arch": F(str, CC, "Newest arch cpp_extension accepts in TORCH_CUDA_ARCH_LIST.", '"9.0"', True),
        "compile_python_max": F(str, "Python X.Y", "Newest Python torch.compile runs on; absent: no torch.compile.", '"3.11"'),
        "released": F(str, DAY, "First upload of its wheels to PyPI: a port to it resolves PyPI as of then at the earliest.",
                      '"2023-05-08"'),
        "sass": F(list, f"array of {CC}", "SASS archs measured in its PyPI wheel (scripts/measure-torch.py).", '["8.0", "9.0"]'),
        "ptx": F(list, f"array of {CC}", "PTX archs measured in its PyPI wheel (needs sass beside it).", '["9.0"]'),
    }), required=True),
})

PACKAGES_FILE = Table("Facts about compiled, version-asserting and era-pinned packages.", {
    "compiled": Names("NAME", "A package envbuild compiles from its sdist in a wheel stage.", Names(
        "VERSION", "One table per release.", Table("A release of a compiled package.", {
            "series": F(str, "name", "Releases of one series share an API; a port never crosses series.", '"mmcv1"', True),
            "torch": F(list, RANGE, "[min, max) torch versions it builds and runs with.", '["1.5", "1.11"]', True),
            "cxx": F(int, "11, 14, 17, 20 or 23", "The C++ standard it forces.", "14", True),
            "notes": F(str, "string", "Why the range ends where it does.", '"includes THC/THC.h, removed in torch 1.11"'),
            "port": F(list, "array of fixer names", "Fixers that carry its sdist past its torch range (run before pip wheel).",
                      '["thc-to-aten"]'),
        })), required=True),
    "asserts": Names("NAME", "A package that asserts the mmcv range at import.", Names(
        "VERSION", "An exact release, or a range of releases (\">=0.17,<0.18\"): exact key first, else the first range "
                   "that holds.", Table("What a release asserts.", {
            "mmcv": F(list, RANGE, "[min, max] mmcv its __init__ accepts (inclusive).", '["1.3.8", "1.4.0"]', True),
            "layers_clash_from": F(str, VERSION, "First mmcv-full that registers layers this package registers too "
                                   "(KeyError at import unless forced).", '"1.4.6"'),
        })), required=True),
    "flash_attn": Names("VERSION", "Build and runtime rules of a flash-attn 2.x release.", Table("A flash-attn release.", {
        "min_nvcc": F(str, CUDA, "Oldest nvcc that builds it.", '"11.6"', True),
        "min_torch": F(str, VERSION, "Oldest torch it builds with.", '"1.12"', True),
        "python": F(list, RANGE, "Python range (inclusive).", '["3.8", "3.12"]', True),
        "sass": F(dict, f"table of {CC} = {CUDA}", "Archs it compiles, each with the nvcc it needs.",
                  '{ "8.0" = "11.6", "9.0" = "11.8" }', True),
        "runtime": F(list, f"array of {CC}", "Archs its kernels run on.", '["8.0", "8.6", "9.0"]', True),
        "objects": F(int, "integer", "Objects its wheel stage compiles (the estimate scales another release's "
                     "measured time by it).", "85"),
        "head_dims": F(list, "array of 32, 64, 96, 128, 160, 192, 224 or 256", "The head dims it has kernel files for "
                       "(each the same number): --trim-kernels compiles a model's alone.", "[32, 64, 96, 128, 160, 192, 256]"),
    }), required=True),
    "spconv": Table("spconv 2.x: one PyPI package per CUDA build.", {
        "builds": F(list, f"array of {CUDA}", "CUDA builds published (spconv-cu117, ...).", '["11.7", "11.8"]', True),
    }, required=True),
    "era": Rows("Pins for what upstream left open, held to what the Plan's torch was built against.", Table("An era pin.", {
        "name": F(str, PKG, "The package (the row's name: a user file replaces the row of that name).", '"numpy"', True),
        "spec": F(str, "specifier", "What it is held to.", '"<2"', True),
        "why": F(str, "string", "The reason, shown in the Plan.", '"torch < 2.3 was built against numpy 1.x"', True),
        "torch_max": F(str, VERSION, "Applies while the Plan's torch is below this (exclusive).", '"2.3"'),
        "when_package": F(str, PKG, "Applies only when the Plan has this package.", '"mmcv-full"'),
        "when_version": F(str, "specifier", "Applies only while when_package's exact pin is in this range "
                          "(needs when_package).", '"<2.1"'),
        "from_date": F(str, DAY, "Applies only to Plans whose index cutoff is on or after this day (when the release "
                       "it guards against came out): an earlier era cannot pick it.", '"2026-01-06"'),
        "replaces": F(str, PKG, "A package this one stands in for.", '"opencv-python"'),
        "always": F(bool, "boolean", "Add the package even when the stack does not have it.", "true"),
    }), required=True),
    "requires": Names("NAME", "Runtime dependencies of a package compiled with --no-deps (its install_requires).",
                      F(list, "array of package names", "They go into requirements.in and the lock.", '["addict", "numpy"]')),
    "python_floor": Names("NAME", "The first release of a package that runs on each Python.", Names(
        "PYTHON", "A Python X.Y.", F(str, VERSION, "First release with a wheel for (or that imports on) that Python.",
                                     '"1.23.2"'))),
    "runtime_apt": Names("NAME", "OS libraries a package's wheel loads at import that it does not ship.",
                         F(list, "array of Debian packages", "Installed in the runtime stage when the lock has the package.",
                           '["libgl1"]')),
    "collections_abc": Names("NAME", "Packages that take container ABCs from `collections` (gone in Python 3.10).",
                             F(str, VERSION, "First release that no longer does; older pins get the fixer.", '"1.2.0"')),
    "source_build": Names("NAME", "How a package builds from its sdist with OS libraries (needs a python_floor).",
                          Table("A source build.", {
                              "build_apt": F(list, "array of Debian packages", "Installed in the deps stage before pip builds it.",
                                             '["libfreetype-dev"]'),
                              "runtime_apt": F(list, "array of Debian packages", "Shared libraries the built package loads.",
                                               '["libfreetype6"]'),
                              "build_env": F(dict, "table of NAME = value", "Environment of the pip install that builds it.",
                                             '{ MPLSETUPCFG = "/opt/envbuild/mplsetup.cfg" }'),
                              "build_files": F(list, "array of file names", "Files from envbuild/incontainer/ the build reads.",
                                               '["mplsetup.cfg"]'),
                          })),
    "vendor": Names("NAME", "Where a vendor publishes prebuilt wheels of a compiled package.", Table("A vendor's wheels.", {
        "find_links": F(str, "URL ({cu}, {torch} filled in)", "The page pip's --find-links reads.",
                        '"https://download.example.org/mmcv/dist/{cu}/torch{torch}/index.html"', True),
        "builds": Rows("One matrix of prebuilt wheels and the GPU code they carry.", Table("A build matrix.", {
            "versions": F(list, "array of versions", "Releases it covers.", '["1.7.1"]', True),
            "torch": F(list, "array of torch X.Y", "torch minors it covers.", '["2.0"]', True),
            "cuda": F(list, f"array of {CUDA}", "CUDA builds of torch it covers.", '["11.8"]', True),
            "python": F(list, RANGE, "Python range (inclusive).", '["3.8", "3.11"]', True),
            "sass": F(list, f"array of {CC}", "SASS archs its wheels carry.", '["8.0", "8.6"]', True),
            "ptx": F(list, f"array of {CC}", "PTX archs its wheels carry.", '["8.6"]'),
        }), required=True),
    })),
    "torch_load": Table("Packages whose checkpoint loaders call torch.load without weights_only.", {
        "packages": F(list, "array of package names", "A port to torch >= 2.6 runs the torch-load-weights-only fixer on them.",
                      '["mmcv-full", "timm"]', True),
    }),
})

BASES_FILE = Table("Offline CUDA devel bases `envbuild base` builds without Docker Hub.", {
    "base": Names("CUDA", "One table per toolkit.", Table("How the base is made.", by="source", fields={
        "source": F(str, "debian or pypi", "Where the toolkit comes from.", '"debian"', True),
        "suite": F(str, "Debian suite", "The Debian release debootstrap installs.", '"bookworm"', True),
        "packages": F(list, "array of names", "debian: the toolkit's packages.", '["nvidia-cuda-toolkit"]', True, "debian"),
        "host_gcc": F(int, "integer", "debian: the gcc that toolkit's nvcc accepts.", "11", False, "debian"),
        "toolkit": F(str, VERSION, "pypi: the cuda-toolkit metapackage release.", '"13.0.2"', True, "pypi"),
        "extras": F(list, "array of names", "pypi: its components.", '["nvcc", "cudart"]', True, "pypi"),
        "cuobjdump": F(str, VERSION, "pypi: the nvidia-cuda-cuobjdump release.", '"13.5.37"', True, "pypi"),
    }), required=True),
})

MODEL_FILE = Table("One model (file name = the model's name); a user's file of the same name replaces it.", {
    "model": Table("Who the model is and which upstream commit the entry reflects.", {
        "name": F(str, "name", "The model's name; must match the file name.", '"maptr"', True),
        "title": F(str, "string", "Display name.", '"MapTR"', True),
        "description": F(str, "string", "One line on what it is.", '"Online vectorized HD map construction"', True),
        "repo": F(str, "https URL", "Its git repository.", '"https://github.com/hustvl/MapTR"', True),
        "commit": F(str, "40-hex commit", "The upstream commit whose pins the entry reflects.",
                    '"a6872d8d9670bde17b4b01560f1221f88b443d55"', True),
        "python": F(str, VERSION, "Upstream's Python.", '"3.8"', True),
        "era": F(str, DAY, "The commit's date: what it left unpinned resolves against PyPI as of then.", '"2023-09-14"'),
        "era_grace_days": F(int, "integer 0-3650", "Releases this long after the era still count (default 30).", "30"),
    }, required=True),
    "torch": Table("Upstream's torch.", {
        "version": F(str, VERSION, "A release in toolchains/torch.toml.", '"1.9.1"', True),
        "cuda": F(str, CUDA, "One of that release's CUDA builds.", '"11.1"', True),
    }, required=True),
    "packages": Names("NAME", "Upstream's pins.", F(str, SPEC, "\"1.2.3\" exact, a specifier set, or \"*\" unpinned.",
                                                     '"1.4.0"')),
    "corrections": Names("NAME", "Upstream pins that cannot install together, corrected (a deviation, kept by --strict).",
                         Table("A correction of a [packages] pin.", {
                             "version": F(str, "version or specifier", "What the pin becomes.", '"1.23.5"', True),
                             "why": F(str, "string", "The reason, shown in the Plan.", '"av2 requires numpy >= 1.21.5"', True),
                         })),
    "vendored": Names("NAME", "A package whose source the repository carries and installs itself.", Table("A vendored package.", {
        "version": F(str, VERSION, "Its version.", '"0.17.2"', True),
        "path": F(str, RELPATH, "Where it lives.", '"mmdetection3d"', True),
    })),
    "git_packages": Names("NAME", "A package installed from a git repository at one commit, not from the package index "
                          "(upstream's `pip install git+URL@COMMIT`): fetched at build time in a stage of its own, as the "
                          "model's source is, built into a wheel and installed without dependencies. Its name must not "
                          "be in [packages] or [vendored] too.", Table("A package from git.", {
                              "url": F(str, "https URL (http for an in-house mirror)", "The repository to fetch; no "
                                       "credentials, no ssh (builds get no SSH agent).",
                                       '"https://github.com/example/chamferdist"', True),
                              "commit": F(str, "40-hex commit", "The full commit to fetch: the pin (a tag or a short hash "
                                          "can move or cannot be fetched).", '"0123456789abcdef0123456789abcdef01234567"',
                                          True),
                              "subdirectory": F(str, "path inside that repository", "The folder with its setup.py or "
                                                "pyproject.toml (default: the repository's root).", '"python"'),
                              "build": F(str, "pip or cuda-extension", "pip (default): `pip wheel` in isolation, as "
                                         "`pip install git+...` does; cuda-extension: compiled against the Plan's torch "
                                         "for its TORCH_CUDA_ARCH_LIST, like a compiled package.", '"cuda-extension"'),
                              "requires": F(list, "array of package names, each with an optional version range",
                                            "Its runtime dependencies the model does not pin itself (its own ranges "
                                            "kept): they go into requirements.in and the lock (it is installed with "
                                            "--no-deps).", '["numpy", "fvcore>=0.1.5,<0.1.6"]'),
                          })),
    "extensions": Rows("The repository's CUDA extensions, built in the model stage (without dependencies).", Table(
        "A CUDA extension.", {
            "name": F(str, PKG, "Its name.", '"mmdet3d-ops"', True),
            "path": F(str, RELPATH, 'The folder with its setup.py ("." for the repository\'s own).', '"mmdetection3d"',
                      True),
            "build": F(str, "plain words", "The build command (no other package source).", '"python setup.py develop"', True),
            "needs_visible_gpu": F(bool, "boolean", "Its setup.py refuses to build without a visible GPU (FORCE_CUDA is set).",
                                   "true"),
        })),
    "train": Table("How the model trains (smoke's train level and the launcher fixers).", {
        "launcher": F(str, "torch.distributed.launch, torchrun, lightning, mp.spawn or python", "How training starts (python: `python ENTRY`, one process on one GPU).",
                      '"torch.distributed.launch"', True),
        "entry": F(str, RELPATH, "The train script.", '"tools/train.py"', True),
        "config": F(str, RELPATH, "The training config it is given.", '"projects/configs/maptr/maptr_tiny_r50_24e.py"'),
        "local_rank_arg": F(str, "--local_rank or --local-rank", "The rank argument its parser takes.", '"--local_rank"'),
        "extra_args": F(list, WORDS, "Further arguments of the train script.", '["--launcher", "pytorch"]'),
        "ops_check": F(str, RELPATH, "A file defining check(device) for smoke's ops level.", '"tools/ops_check.py"'),
        "cpu_args": F(list, WORDS, "Arguments that make the train script run on the CPU.", '["--device", "cpu"]'),
        "steps_args": F(list, "array of plain words ({steps} filled in)", "Arguments that stop it after {steps} steps.",
                        '["--max_steps", "{steps}"]'),
    }, required=True),
    "data": Names("KEY", "The dataset a person needs: documentation only, not read.", F(str, "any", "Free text.",
                                                                                      '"nuScenes"'), free=True),
    "construct": Table("How smoke's model level builds the network from the model's own code.", by="kind", fields={
        "kind": F(str, "argparse, config or python", "argparse: the class's argument hook and cls(**vars(args)); config: "
                  "the training config through the model's builder; python: lines of your own, for a builder that "
                  "takes more than cfg.model (a detectron2 cfg, a dataset).", '"config"', True),
        "module": F(str, DOTTED, "Where the class lives.", '"predictors"', True, "argparse"),
        "object": F(str, "identifier", "The class.", '"QCNet"', True, "argparse"),
        "args_hook": F(str, "identifier", "The class's argument hook.", '"add_model_specific_args"', True, "argparse"),
        "args": F(list, WORDS, "The train script's arguments.", '["--dataset", "argoverse_v2"]', False, "argparse"),
        "config": F(str, RELPATH, "The training config.", '"projects/configs/maptr/maptr_tiny_r50_24e.py"', True, "config"),
        "loader": F(str, DOTTED, "The callable that reads it.", '"mmcv.Config.fromfile"', True, "config"),
        "builder": F(str, DOTTED, "The callable that builds the network from cfg.model.", '"mmdet3d.models.build_model"',
                     True, "config"),
        "cfg_kwargs": F(list, "array of identifiers", "Top-level config keys the train script also passes.",
                        '["train_cfg", "test_cfg"]', False, "config"),
        "code": F(str, "Python source (runs on 3.8)", "Lines run with the model's root as working folder and on "
                  "sys.path; they bind the network to `model`.",
                  '"from train_net import setup\\nmodel = build_model(setup())"', True, "python"),
        "imports": F(list, f"array of {DOTTED}s", "Modules the train script imports first (plugins, registries).",
                     '["projects.mmdet3d_plugin"]'),
        "step": F(str, "a training step name", "A training step on a synthetic batch, run on the CPU.", '"qcnet-argoverse2"'),
        "arrays": F(list, "array of PATH.npy=AxB", "float32 arrays the network reads when built (written as zeros).",
                    '["data/kmeans/kmeans_det_900.npy=900x11"]'),
    }),
    "flash_attn": Table("The head dims the model's flash-attn calls use: `--trim-kernels` compiles flash-attn's kernels "
                        "for these only (a fraction of its compile); a call with another head dim raises a clear error.", {
        "head_dims": F(list, "array of 32, 64, 96, 128, 160, 192, 224 or 256", "Kernel head dims (a call's head dim "
                       "runs the next one up: 48 runs 64).", "[32, 64]", True),
        "why": F(str, "string", "Where they come from (configs, embed dims over heads), shown in the Plan.",
                 '"MultiheadFlashAttention: 256 and 512 embed dims over 8 heads"', True),
    }),
    "stdlib_modules": Names("MODULE", "Standard-library modules the OS packs apart from Python that the model imports.",
                            F(str, "string", "Why the model needs it (tkinter only).",
                              '"the detectors import tkinter.messagebox"')),
})

# The catalog's files, as a user catalog lays them out.
FILES = {
    "cards.toml": CARDS,
    "models/*.toml": MODEL_FILE,
    "toolchains/cuda.toml": CUDA_FILE,
    "toolchains/torch.toml": TORCH_FILE,
    "toolchains/packages.toml": PACKAGES_FILE,
    "toolchains/bases.toml": BASES_FILE,
}


def variants(table: Table) -> dict[str, tuple[str, ...]]:
    """{value of the table's `by` field: the other fields that apply with it}."""
    kinds = {f.only for f in table.fields.values() if isinstance(f, Field) and f.only}
    return {kind: tuple(k for k, f in table.fields.items() if k != table.by and getattr(f, "only", "") in ("", kind))
            for kind in sorted(kinds)}


def construct_fields() -> dict[str, tuple[str, ...]]:
    """{construct kind: the recipe fields it takes}, from [construct]'s fields."""
    return variants(MODEL_FILE.fields["construct"])


# ---------------------------------------------------------------- the reference


def walk(node, path: str, array: bool = False, about: str = ""):
    """(heading, meaning, node) for every table in the schema, depth first, in declaration order;
    the meaning of a table of names leads the meaning of the tables under it."""
    if isinstance(node, Table):
        heading = (f"[[{path}]]" if array else f"[{path}]") if path else "(top level)"
        yield heading, " ".join(m for m in (about, node.meaning) if m), node
        for key, child in node.fields.items():
            if not isinstance(child, Field):
                yield from walk(child, f"{path}.{key}" if path else key)
    elif isinstance(node, Rows):
        yield from walk(node.of, path, array=True, about=" ".join(m for m in (about, node.meaning) if m))
    elif isinstance(node, Names):
        meaning = " ".join(m for m in (about, node.meaning) if m)
        if isinstance(node.of, Field):
            yield f"[{path}]", meaning, node
        else:
            yield from walk(node.of, f"{path}.{node.key}", about=meaning)


def _row(name: str, f: Field) -> dict:
    return {"field": name, "toml": _TOML[f.kind], "type": f.type, "required": f.required, "meaning": f.meaning,
            "example": f.example, **({"only": f.only} if f.only else {})}


def reference() -> dict:
    """The schema as data (`envbuild catalog schema --json`)."""
    out = {}
    for file, root in FILES.items():
        tables = []
        for heading, meaning, node in walk(root, ""):
            if isinstance(node, Names):
                tables.append({"table": heading, "meaning": meaning, "names": node.key,
                               "fields": [_row(node.key, node.of)], "documentation_only": node.free})
            elif any(isinstance(f, Field) for f in node.fields.values()):
                tables.append({"table": heading, "meaning": meaning, "required": node.required,
                               **({"by": node.by} if node.by else {}),
                               "fields": [_row(k, f) for k, f in node.fields.items() if isinstance(f, Field)]})
        out[file] = {"meaning": root.meaning, "tables": tables}
    return out


HEADER = ("<!-- Generated by `envbuild catalog schema > docs/catalog-schema.md` from envbuild/schema.py; "
          "a test fails when it is stale. -->")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """The field reference as markdown (`envbuild catalog schema`)."""
    lines = [HEADER, "", "# Catalog field reference", "",
             "Every file, table and field a catalog may hold. A key or table not listed here is refused at",
             "load with the closest listed name. UPPERCASE parts of a table name are names you choose",
             "(a package, a version, a card id). Required fields are marked **yes**.", ""]
    for file, doc in reference().items():
        lines += [f"## `{file}`", "", doc["meaning"], ""]
        for table in doc["tables"]:
            lines += [f"### `{table['table']}`", "", table["meaning"], ""]
            if table.get("documentation_only"):
                lines += ["Free-form: any keys and values.", ""]
                continue
            if not table["fields"]:
                continue
            lines += ["| field | type | required | meaning | example |", "|---|---|---|---|---|"]
            for f in table["fields"]:
                meaning = f["meaning"] + (f" (only with {table['by']} = \"{f['only']}\")" if f.get("only") else "")
                lines.append(f"| `{f['field']}` | {_cell(f['type'])} | {'yes' if f['required'] else ''} | "
                             f"{_cell(meaning)} | `{_cell(f['example'])}` |")
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def as_json() -> str:
    return json.dumps(reference(), indent=2) + "\n"
