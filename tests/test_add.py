"""envbuild add: a catalog entry drafted from a small repository the tests write themselves."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from envbuild import add, catalog
from envbuild.errors import BadInput

README = """\
# TinyDet: a detector written for envbuild's tests

## Installation
```bash
conda create -n tinydet python=3.8 -y
pip install torch==1.10.2+cu113 torchvision==0.11.3+cu113 -f https://download.pytorch.org/whl/torch_stable.html
pip install mmcv-full==1.4.0
pip install -r requirements.txt
pip install git+https://github.com/example/detlib.git@0123456789abcdef0123456789abcdef01234567#egg=detlib
cd thirdparty/mmdetection3d
python setup.py develop
cd ops && FORCE_CUDA=1 pip install -v -e .
```

## Optional: visualization
```bash
pip install open3d==0.17.0
```

## Train
```bash
./tools/dist_train.sh ./projects/configs/tiny/tiny_r50.py 8
```
"""

SETUP_OPS = """\
import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

if torch.cuda.is_available():
    ext = [CUDAExtension('tiny_ops_ext', ['src/op.cpp', 'src/op_cuda.cu'])]
else:
    raise EnvironmentError('CUDA is required')
setup(name='tiny_ops', ext_modules=ext, cmdclass={'build_ext': BuildExtension})
"""

SETUP_VENDORED = """\
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension


def make_cuda_ext(name, sources):
    return CUDAExtension(name=name, sources=sources)


setup(name='mmdet3d', packages=find_packages(), install_requires=['numba==0.48.0'],
      ext_modules=[make_cuda_ext('mmdet3d.ops.voxel_layer', ['voxel.cpp'])], cmdclass={'build_ext': BuildExtension})
"""

TRAIN = """\
import argparse

from mmcv import Config
from mmdet3d.models import build_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('config')
    parser.add_argument('--local_rank', type=int, default=0)
    args = parser.parse_args()
    cfg = Config.fromfile(args.config)
    model = build_model(cfg.model, train_cfg=cfg.get('train_cfg'), test_cfg=cfg.get('test_cfg'))


if __name__ == '__main__':
    main()
"""

DIST_TRAIN = """\
#!/usr/bin/env bash
CONFIG=$1
GPUS=$2
python -m torch.distributed.launch --nproc_per_node=$GPUS $(dirname "$0")/train.py $CONFIG --launcher pytorch ${@:3} --deterministic
"""


def git(repo, *args, date="2023-05-01T12:00:00"):
    env = {**os.environ, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date, "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


def write(root: Path, files: dict) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text) if text.startswith("\n") else text)


@pytest.fixture
def repo(tmp_path):
    """TinyDet: a git repository of two code commits and a later commit to its README only."""
    root = tmp_path / "TinyDet"
    write(root, {
        "requirements.txt": "timm\nnumpy<1.20.0\n",
        "tools/train.py": TRAIN,
        "tools/dist_train.sh": DIST_TRAIN,
        "ops/setup.py": SETUP_OPS,
        "ops/src/op.cpp": "#include <torch/extension.h>\n",
        "ops/src/op_cuda.cu": "#include <THC/THC.h>\n",
        "thirdparty/mmdetection3d/setup.py": SETUP_VENDORED,
        "thirdparty/mmdetection3d/mmdet3d/__init__.py": "from .version import __version__\n",
        "thirdparty/mmdetection3d/mmdet3d/version.py": "__version__ = '0.17.2'\n",
        "thirdparty/mmdetection3d/requirements.txt": "numba==0.48.0\n",
        "projects/__init__.py": "",
        "projects/plugin/__init__.py": "from tkinter.messagebox import NO\nimport einops\nfrom distutils.version import LooseVersion\n",
        "projects/configs/_base_/default.py": "x = 1\n",
        "projects/configs/tiny/tiny_r50.py": "plugin = True\nplugin_dir = 'projects/plugin/'\nmodel = dict(type='Tiny')\n",
        "environment.yml": "name: tinydet\ndependencies:\n  - python=3.8\n  - pip:\n    - pyquaternion==0.9.9\n",
    })
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "first", date="2023-04-01T12:00:00")
    write(root, {"requirements.txt": "timm\nnumpy<1.20.0\nshapely==1.8.5.post1  # geometry\n", "README.md": README})
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "code", date="2023-05-01T12:00:00")
    write(root, {"README.md": README + "\nCite us.\n"})
    git(root, "commit", "-q", "-am", "docs", date="2023-06-01T12:00:00")
    return root


def keys(questions):
    return [q.key for q in questions]


def test_draft_reads_pins_extensions_vendored_git_construct_era_and_fixers(repo, home):
    d = add.draft(str(repo))
    assert d.name == "tinydet" and d.title == "TinyDet"
    assert (d.torch, d.cuda, d.python) == ("1.10.2", "11.3", "3.8")
    spec, found = d.packages["mmcv-full"]
    assert spec == "1.4.0" and found.file == "README.md" and found.line == 7
    assert d.packages["numpy"][0] == "<1.20.0" and d.packages["numpy"][1].where == "requirements.txt:2"
    assert d.packages["shapely"][0] == "1.8.5.post1" and d.packages["timm"][0] == "*"
    assert d.packages["pyquaternion"][0] == "0.9.9" and d.packages["pyquaternion"][1].file == "environment.yml"
    # torch's family, the vendored package's own requirements and the optional section stay out
    assert not {"torch", "torchvision", "mmdet3d", "numba", "open3d"} & set(d.packages)
    assert any("open3d==0.17.0" in q.question for q in d.questions)
    # a package from git: a catalog fact with its https URL and commit; only its build kind is asked
    (g,) = d.git_packages
    assert (g.name, g.ref) == ("detlib", "0123456789abcdef0123456789abcdef01234567")
    assert (g.https, g.commit) == ("https://github.com/example/detlib.git", g.ref)
    assert [q.found for q in d.questions if q.key.startswith("git_packages.detlib")] == ["README.md:9"]
    assert "detlib" not in d.packages
    assert d.vendored == {"mmdet3d": ("0.17.2", "thirdparty/mmdetection3d", "thirdparty/mmdetection3d/mmdet3d/version.py")}
    exts = {e["path"]: e for e in d.extensions}
    assert exts["ops"]["build"] == ["pip", "install", "--no-build-isolation", "-v", "-e", "."]
    assert exts["ops"]["needs_visible_gpu"] and exts["ops"]["name"] == "tiny_ops"
    assert exts["thirdparty/mmdetection3d"]["build"] == ["python", "setup.py", "develop"]
    assert not exts["thirdparty/mmdetection3d"]["needs_visible_gpu"]
    assert set(d.stdlib_modules) == {"tkinter"} and "projects/plugin/__init__.py:1" in d.stdlib_modules["tkinter"]
    assert any(q.key == "stdlib_modules" and "distutils" in q.question for q in d.questions)
    assert any("einops (projects/plugin/__init__.py:2)" in q.question for q in d.questions)
    assert d.train == {"launcher": "torch.distributed.launch", "entry": "tools/train.py",
                       "config": "projects/configs/tiny/tiny_r50.py", "local_rank_arg": "--local_rank",
                       "extra_args": ["--launcher", "pytorch", "--deterministic"]}
    assert d.construct == {"kind": "config", "config": "projects/configs/tiny/tiny_r50.py",
                           "loader": "mmcv.Config.fromfile", "builder": "mmdet3d.models.build_model",
                           "cfg_kwargs": ["train_cfg", "test_cfg"], "imports": ["projects.plugin"]}
    assert d.era == "2023-05-01" and "2023-06-01" in d.era_why
    found = {f["fixer"]: f for f in d.fixers}
    assert {"setup-without-gpu", "thc-to-aten", "local-rank"} <= set(found)
    assert found["thc-to-aten"]["first"] == "ops/src/op_cuda.cu:1" and found["local-rank"]["only_when"]
    assert d.commit == git(repo, "rev-parse", "HEAD")
    assert "model.repo" in keys(d.questions)  # no https remote: asked, not invented silently


def test_add_writes_an_entry_the_catalog_loads_and_replaces_only_its_own(repo, home):
    d = add.add_model(str(repo), offline=True)
    path = home / "models" / "tinydet.toml"
    assert d.path == str(path) and path.read_text().startswith(add.HEADER)
    model = catalog.load(home).model("tinydet")
    assert model.torch == "1.10.2" and model.packages["mmcv-full"] == "1.4.0"
    assert model.vendored == {"mmdet3d": ("0.17.2", "thirdparty/mmdetection3d")}
    assert [e.path for e in model.extensions] == ["ops", "thirdparty/mmdetection3d"]
    assert model.extensions[0].needs_visible_gpu and model.construct.builder == "mmdet3d.models.build_model"
    assert model.era == "2023-05-01" and model.stdlib_modules
    assert "# README.md:7: mmcv-full==1.4.0" in path.read_text()
    assert d.next_command == f"envbuild verify tinydet --card a800 --source {repo}"
    add.add_model(str(repo), offline=True)  # envbuild's own file: replaced
    path.write_text("# my own entry\n")
    with pytest.raises(BadInput, match="envbuild did not write it"):
        add.add_model(str(repo), offline=True)
    assert path.read_text() == "# my own entry\n"
    add.add_model(str(repo), offline=True, force=True)
    assert path.read_text().startswith(add.HEADER)


def test_commit_reads_that_commit_without_touching_the_checkout(repo, home):
    first = git(repo, "rev-list", "--max-parents=0", "HEAD")
    head = git(repo, "rev-parse", "HEAD")
    d = add.add_model(str(repo), commit=first[:10], offline=True, dry_run=True)
    assert d.commit == first and "shapely" not in d.packages and d.era == "2023-04-01"
    assert git(repo, "rev-parse", "HEAD") == head and not git(repo, "status", "--porcelain")
    assert not (home / "models").exists()  # a dry run writes nothing


def test_a_url_is_cloned_and_its_clone_kept_for_verify(repo, home, tmp_path):
    d = add.add_model(f"file://{repo}", name="tiny-url", offline=True)
    kept = tmp_path / "home" / "sources" / "tiny-url"
    assert d.next_command.endswith(f"--source {kept}") and (kept / "tools" / "train.py").is_file()
    assert catalog.load(home).model("tiny-url").packages["mmcv-full"] == "1.4.0"
    assert not [p for p in (tmp_path / "home" / "sources").iterdir() if p.name.startswith(".add-")]


def test_the_index_checks_pins_and_dates_a_tree_without_git(repo, home, tmp_path):
    plain = tmp_path / "plain"
    write(plain, {"requirements.txt": "mmcv-full==1.4.0\nnosuchpkg\nshapely==9.9.9\n", "train.py": "import torch\n"})
    dates = {"mmcv-full": {"1.4.0": "2021-11-23"}, "shapely": {"1.8.5": "2022-10-10"}}
    d = add.draft(str(plain), pypi=dates.get)
    text = [q.question for q in d.questions]
    assert any("nosuchpkg is not on the package index" in t for t in text)
    assert any("shapely 9.9.9 has no release" in t for t in text)
    assert d.era == "2021-11-23" and "model.era" in keys(d.questions) and "model.commit" in keys(d.questions)
    assert d.commit == "0" * 40 and "torch.version" in keys(d.questions)
    add._validate(add.render(d, "envbuild add plain"), d.name, None)  # still loads


@pytest.mark.parametrize("make,args,needle", [
    (lambda t: None, ["{t}/missing"], "no such repository folder"),
    (lambda t: (t / "empty").mkdir(), ["{t}/empty"], "not a model repository"),
    (lambda t: (t / "maptr").mkdir(), ["{t}/maptr"], "is a built-in model"),
    (lambda t: write(t / "nogit", {"a.py": ""}), ["{t}/nogit", "--commit", "abc123"], "not a git checkout"),
    (lambda t: write(t / "x", {"a.py": ""}), ["{t}/x", "--name", "Bad Name"], "cannot be a model name"),
    (lambda t: write(t / "y", {"a.py": ""}), ["{t}/y", "--commit=--detach"], "is not a commit or tag"),  # never a git option
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, make, args, needle):
    make(tmp_path)
    user = tmp_path / "usercat"
    user.mkdir()
    env = {**os.environ, "ENVBUILD_HOME": str(tmp_path / "home"), "ENVBUILD_MATRICES": str(user),
           "ENVBUILD_CONFIG": str(tmp_path / "c.toml")}
    (tmp_path / "c.toml").write_text("")
    r = subprocess.run([sys.executable, "-m", "envbuild.cli", "add", *[a.format(t=tmp_path) for a in args], "--offline"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr and r.stderr.startswith("error:")
    assert list(user.iterdir()) == []


def test_cli_prints_questions_and_the_verify_command_json_and_dry_run(repo, tmp_path):
    env = {**os.environ, "ENVBUILD_HOME": str(tmp_path / "home"), "ENVBUILD_CONFIG": str(tmp_path / "c.toml")}
    env.pop("ENVBUILD_MATRICES", None)
    (tmp_path / "c.toml").write_text("")
    run = lambda *a: subprocess.run([sys.executable, "-m", "envbuild.cli", "add", str(repo), "--offline", *a],
                                    capture_output=True, text=True, env=env, timeout=120)
    r = run("--dry-run")
    assert r.returncode == 0 and r.stdout.startswith(add.HEADER) and "nothing written" in r.stderr
    assert not (tmp_path / "home" / "catalog").exists()
    r = run()
    assert r.returncode == 0, r.stderr
    written = tmp_path / "home" / "catalog" / "models" / "tinydet.toml"
    assert f"wrote {written}" in r.stdout and "questions (" in r.stdout and "model.repo:" in r.stdout
    # not configured yet: the command says where the catalog is
    assert f"next: ENVBUILD_MATRICES={tmp_path / 'home' / 'catalog'} envbuild verify tinydet --card a800 --source {repo}" \
        in r.stdout
    data = json.loads(run("--json", "--card", "h20").stdout)
    assert data["packages"]["mmcv-full"] == {"spec": "1.4.0", "from": "README.md:7", "text": "mmcv-full==1.4.0"}
    assert data["next_command"].split(" envbuild ")[1].startswith("verify tinydet --card h20")
    assert {q["key"] for q in data["questions"]} >= {"model.repo", "construct.config"}


def test_a_token_in_a_pin_url_never_reaches_the_catalog_file(repo, home):
    token = "ghp_NotARealTokenButSecret123"
    pin = f"git+https://bob:{token}@github.com/example/tinygit.git@{'a' * 40}#egg=tinygit\n"
    write(repo, {"requirements.txt": "timm\nnumpy<1.20.0\n" + pin})
    git(repo, "commit", "-q", "-am", "private pin", date="2023-06-02T12:00:00")
    d = add.add_model(str(repo), name="tiny-token", offline=True)
    text = (home / "models" / "tiny-token.toml").read_text()
    assert token not in text and token not in d.text
    assert "github.com/example/tinygit" in text  # the package itself is still there, without its credentials


def test_a_root_setup_with_cuda_ops_the_guides_own_clone_and_case_blind_imports(tmp_path, home):
    """A LiDAR-codebase shape: the root setup.py builds the CUDA ops (an extension at "."), the guide
    clones the repository itself (its address, not a package from git), and a package imported
    as SharedArray is the index's sharedarray (no question about it)."""
    root = tmp_path / "PointDet"
    write(root, {
        "setup.py": ("from setuptools import setup\nfrom torch.utils.cpp_extension import BuildExtension, CUDAExtension\n"
                     "setup(name='pointdet', ext_modules=[CUDAExtension('pointdet.ops.iou_cuda', ['pointdet/ops/iou.cu'])],\n"
                     "      install_requires=['SharedArray', 'numba'], cmdclass={'build_ext': BuildExtension})\n"),
        "pointdet/__init__.py": "import SharedArray\nimport numba\n",
        "pointdet/ops/iou.cu": "// op\n",
        "README.md": "# PointDet\n\n`PointDet` is a `LiDAR` detection codebase for tests.\n",
        "docs/INSTALL.md": ("# Install\n```shell\ngit clone https://github.com/example-lab/PointDet.git\n```\n"
                            "```shell\npython setup.py develop\n```\n"),
    })
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "first")
    d = add.draft(str(root))
    assert d.repo == "https://github.com/example-lab/PointDet"
    assert d.description == "PointDet is a LiDAR detection codebase for tests."  # markdown's code marks dropped
    assert d.git_packages == []
    assert [(e["name"], e["path"], e["build"]) for e in d.extensions] == [("pointdet", ".", ["python", "setup.py", "develop"])]
    assert not [q for q in d.questions if q.key in ("model.repo", "extensions")]
    assert not any("SharedArray" in q.question for q in d.questions)
    written = add.add_model(str(root), offline=True)
    ext = catalog.load(home).model("pointdet").extensions
    assert [(e.name, e.path) for e in ext] == [("pointdet", ".")] and written.questions


def test_the_build_script_the_guide_runs_is_read_as_guide_lines(tmp_path):
    """`cd ops && sh make.sh`: the script's own command builds the extension (file:line of the script)."""
    root = tmp_path / "SegDet"
    write(root, {
        "ops/setup.py": SETUP_OPS.replace("if torch.cuda.is_available():", "if True:"),
        "ops/make.sh": "#!/usr/bin/env bash\n# builds the op\n\npython setup.py build install\n",
        "ops/src/op.cpp": "// op\n",
        "INSTALL.md": "# Install\n```bash\ncd ops\nsh make.sh\n```\n",
    })
    d = add.draft(str(root))
    assert [(e["path"], e["build"], e["build_from"]) for e in d.extensions] == \
        [("ops", ["python", "setup.py", "build", "install"], "ops/make.sh:4")]
    assert not [q for q in d.questions if q.key.startswith("extensions.")]


def test_a_detectron2_train_script_gives_a_python_construct_the_catalog_loads(tmp_path, home):
    """detectron2's setup(): get_cfg, the add_*_config hooks it imports, the yaml the guide trains
    with (a continued command in GETTING_STARTED.md), build_model on the CPU; launch() is mp.spawn."""
    root = tmp_path / "SegFormerD2"
    write(root, {
        "train_net.py": ("from detectron2.config import get_cfg\n"
                         "from detectron2.engine import (\n    DefaultTrainer,\n    launch,\n)\n"
                         "from detectron2.projects.deeplab import add_deeplab_config\n"
                         "from segd2 import add_segd2_config\n\n\n"
                         "def setup(args):\n    cfg = get_cfg()\n    add_deeplab_config(cfg)\n    add_segd2_config(cfg)\n"
                         "    cfg.merge_from_file(args.config_file)\n    return cfg\n"),
        "segd2/__init__.py": "from .config import add_segd2_config\n",
        "segd2/config.py": "def add_segd2_config(cfg):\n    cfg.SEG = 1\n",
        "configs/Base-Seg.yaml": "MODEL: {}\n",
        "configs/ade/a_first_by_name.yaml": "_BASE_: ../Base-Seg.yaml\n",
        "configs/coco/seg_R50.yaml": "_BASE_: ../Base-Seg.yaml\n",
        "GETTING_STARTED.md": "```\npython train_net.py --num-gpus 8 \\\n  --config-file configs/coco/seg_R50.yaml\n```\n",
    })
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "first")
    d = add.draft(str(root))
    assert d.train["launcher"] == "mp.spawn" and d.train["config"] == "configs/coco/seg_R50.yaml"
    assert d.construct == {"kind": "python", "code": (
        "from detectron2.config import get_cfg\nfrom detectron2.modeling import build_model\n"
        "from detectron2.projects.deeplab import add_deeplab_config\nfrom segd2 import add_segd2_config\n"
        "cfg = get_cfg()\nadd_deeplab_config(cfg)\nadd_segd2_config(cfg)\n"
        'cfg.merge_from_file("configs/coco/seg_R50.yaml")\ncfg.MODEL.DEVICE = "cpu"\nmodel = build_model(cfg)\n')}
    add.add_model(str(root), offline=True)
    assert "\ncode = \"\"\"\nfrom detectron2.config import get_cfg\n" in (home / "models" / "segformerd2.toml").read_text()
    assert catalog.load(home).model("segformerd2").construct.code == d.construct["code"]


@pytest.mark.parametrize("script, launcher, asked", [
    # one process: `python train.py`, as a single-GPU repository's guide runs it
    ("import torch\nmodel = Net().cuda()\nfor x in loader:\n    model(x)\n", "python", False),
    # it joins a process group: some distributed launcher starts it, which one the draft cannot see
    ("import torch.distributed as dist\ndist.init_process_group('nccl')\n", "torchrun", True),
])
def test_a_train_script_without_a_process_group_is_launched_as_one_python_process(tmp_path, home, script, launcher, asked):
    root = tmp_path / "SinglePillars"
    write(root, {"train.py": script, "requirements.txt": "torch==1.8.1\n"})
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "first")
    d = add.draft(str(root))
    assert d.train["launcher"] == launcher and d.train["entry"] == "train.py"
    assert any(q.key == "train.launcher" for q in d.questions) is asked


@pytest.mark.parametrize("width, built", [
    ("args.width", "model = TinyNet(width=16, depth=2)\n"),  # its argparse default
    ("args.data_root", None),  # no default: only the running script knows it, so the draft asks
])
def test_a_class_of_the_repository_that_the_script_trains_is_the_construct_recipe(tmp_path, home, width, built):
    root = tmp_path / "TinyNetRepo"
    write(root, {
        "tinynet/__init__.py": "",
        "tinynet/model.py": "import torch\n\n\nclass TinyNet(torch.nn.Module):\n    pass\n",
        "train.py": ("import argparse\nimport torch\nfrom tinynet.model import TinyNet\n\n"
                     "parser = argparse.ArgumentParser()\nparser.add_argument('--width', type=int, default=16)\n"
                     "parser.add_argument('--data_root', required=True)\nargs = parser.parse_args()\n"
                     f"net = TinyNet(width={width}, depth=2).cuda()\n"
                     "optimizer = torch.optim.SGD(net.parameters(), lr=0.1)\n"),
        "requirements.txt": "torch==1.8.1\n",
    })
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "first")
    d = add.draft(str(root))
    asked = {q.key for q in d.questions}
    if built:
        assert d.construct == {"kind": "python", "code": "from tinynet.model import TinyNet\n" + built}
        assert "construct.code" in asked and "construct" not in asked
    else:
        assert d.construct is None and "construct" in asked


def test_code_that_calls_flash_attn_is_asked_for_its_head_dims(tmp_path):
    """The head dims live in configs (embed dims over heads), not in an install file: a question
    naming where flash_attn is imported, so --trim-kernels can be answered; none without it."""
    write(tmp_path, {"models/attention.py": "import torch\nfrom flash_attn.bert_padding import unpad_input\n",
                     "vendor/lib/x.py": "import flash_attn\n"})
    asked = []
    add._flash_attn_head_dims(tmp_path, {"vendor"}, asked)
    (q,) = asked
    assert q.key == "flash_attn.head_dims" and q.found == "models/attention.py:2" and "--trim-kernels" in q.question
    none = []
    add._flash_attn_head_dims(tmp_path, {"vendor", "models"}, none)
    assert none == []
