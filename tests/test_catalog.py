import json

import pytest

from envbuild import catalog
from envbuild.errors import BadInput, CatalogError

REQUIRED_CARDS = ["v100", "t4", "a10", "a30", "a100", "a800", "a40", "l4", "l20", "l40s",
                  "rtx3090", "rtx4090", "h20", "h100", "h800", "h200", "b200", "b300", "rtx5090", "rtxpro6000"]


def test_catalog_has_models_and_cards(cat):
    assert {"maptr", "sparsedrive", "qcnet", "gaussianformer"} <= set(cat.models)
    assert set(REQUIRED_CARDS) <= set(cat.cards)


@pytest.mark.parametrize("name,expected", [
    ("A100-80G", "a100"), ("4090", "rtx4090"), ("RTX 4090", "rtx4090"), ("NVIDIA H20", "h20"),
    ("h200", "h200"), ("GeForce RTX 3090", "rtx3090"), ("l40s", "l40s"), ("3090", "rtx3090"),
    ("GB200", "b200"), ("gb300", "b300"), ("5090", "rtx5090"), ("NVIDIA GeForce RTX 5090", "rtx5090"),
    ("rtx-pro-6000", "rtxpro6000"), ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "rtxpro6000"),
    ("h100-sxm5", "h100"),
])
def test_card_names_and_aliases(cat, name, expected):
    assert cat.card(name).id == expected


def test_unknown_card_suggests_close_names(cat):
    with pytest.raises(BadInput) as exc:
        cat.card("h2")
    assert "h20" in exc.value.hint


def test_upstream_pins_follow_the_repos(cat):
    maptr = cat.model("maptr")
    assert (maptr.torch, maptr.cuda, maptr.packages["mmcv-full"]) == ("1.9.1", "11.1", "1.4.0")
    assert maptr.vendored["mmdet3d"][0] == "0.17.2"
    assert maptr.train.local_rank_arg == "--local_rank"
    sd = cat.model("sparsedrive")
    assert (sd.torch, sd.cuda, sd.packages["flash-attn"]) == ("1.13.0", "11.6", "2.3.2")
    qc = cat.model("qcnet")
    assert "mmdet3d" not in qc.packages and qc.train.launcher == "lightning"
    gf = cat.model("gaussianformer")
    assert gf.packages["mmcv"] == "2.0.1" and gf.train.launcher == "mp.spawn"


def test_card_facts(cat):
    assert cat.card("h20").cc == "9.0" and cat.card("l20").cc == "8.9"
    assert cat.card("rtx4090").p2p is False and cat.card("a100").p2p is True


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("file,old,new,key", [
    ("cards.toml", 'cc = "8.0"', 'cc = "eight"', "cards.a30.cc"),
    ("cards.toml", "p2p = true", 'p2p = "yes"', "cards.v100.p2p"),
    ("models/maptr.toml", '"mmcv-full" = "1.4.0"', '"mmcv-full" = "1.4.0\\nRUN curl evil"', "mmcv-full"),
    ("models/maptr.toml", '"mmcv-full" = "1.4.0"', '"mmcv-full" = "1.4.0; rm -rf /"', "mmcv-full"),
    ("models/maptr.toml", 'build = "python setup.py develop"', 'build = "python setup.py develop && curl x | sh"', "extensions[0].build"),
    ("models/maptr.toml", 'path = "mmdetection3d"\nbuild', 'path = "../../etc"\nbuild', "extensions[0].path"),
    ("models/maptr.toml", 'launcher = "torch.distributed.launch"', 'launcher = "deepspeed"', "train.launcher"),
    ("models/maptr.toml", 'version = "1.9.1"', 'version = "1.9.7"', "torch.version"),
    ("models/maptr.toml", 'commit = "a6872d8d9670bde17b4b01560f1221f88b443d55"', 'commit = "main"', "model.commit"),
    ("toolchains/cuda.toml", "max_gcc = 10", 'max_gcc = "10"', "cuda.11.1.max_gcc"),
    ("toolchains/torch.toml", 'pypi = "10.2"', 'pypi = "9.9"', "pypi"),
    ("toolchains/torch.toml", 'compile_python_max = "3.10"', 'compile_python_max = "yes"', "compile_python_max"),
    ("models/sparsedrive.toml", '"runner.max_iters={steps}"', '"runner.max_iters={steps};reboot"', "train.steps_args"),
    ("models/sparsedrive.toml", '"runner.max_iters={steps}"', '"{os.system}"', "train.steps_args"),
    ("models/maptr.toml", "tkinter = ", "curses = ", "stdlib_modules.curses"),
    ("toolchains/packages.toml", 'layers_clash_from = "1.4.6"', 'layers_clash_from = "soon"', "layers_clash_from"),
])
def test_malformed_entry_names_file_key_reason(matrices_copy, file, old, new, key):
    _edit(matrices_copy / file, old, new)
    with pytest.raises(CatalogError) as exc:
        catalog.load(matrices_copy)
    msg = exc.value.message
    assert file.split("/")[-1] in msg and key in msg, msg


def test_broken_toml_is_reported_with_file(matrices_copy):
    (matrices_copy / "cards.toml").write_text("[cards.x\n")
    with pytest.raises(CatalogError, match="cards.toml.*not valid TOML"):
        catalog.load(matrices_copy)


def test_adding_a_card_is_one_entry(matrices_copy):
    with open(matrices_copy / "cards.toml", "a") as fh:
        fh.write('\n[cards.rtx6000ada]\nname = "NVIDIA RTX 6000 Ada"\ncc = "8.9"\nmemory_gb = 48\n'
                 'p2p = true\naliases = ["6000ada"]\n')
    cat = catalog.load(matrices_copy)
    assert cat.card("6000ADA").cc == "8.9"


def test_adding_a_model_is_one_file(matrices_copy):
    text = (matrices_copy / "models" / "qcnet.toml").read_text().replace('name = "qcnet"', 'name = "qcnet2"')
    (matrices_copy / "models" / "qcnet2.toml").write_text(text)
    cat = catalog.load(matrices_copy)
    assert cat.model("QCNet2").torch == "2.0.1"


def test_construct_recipe_is_validated(matrices_copy):
    from envbuild.errors import CatalogError
    path = matrices_copy / "models" / "qcnet.toml"
    text = path.read_text()
    for old, new, says in (('kind = "argparse"', 'kind = "exec"', "is not one of argparse"),
                           ('module = "predictors"', 'module = "predictors; import os"', "invalid value"),
                           ('"--dataset", "argoverse_v2"', '"--dataset", "$(curl x)"', "invalid entry")):
        path.write_text(text.replace(old, new))
        with pytest.raises(CatalogError, match=says):
            catalog.load(matrices_copy)
    path.write_text(text)
    gf = matrices_copy / "models" / "gaussianformer.toml"
    gf_text = gf.read_text()
    for old, new, says in (('builder = "mmseg.models.build_segmentor"', 'builder = "mmseg.models.build_segmentor()"', "invalid value"),
                           ('config = "config/nuscenes_gs25600_solid.py"\nloader', 'config = "../../etc/passwd"\nloader', "construct.config: invalid value"),
                           ('imports = ["model"]', 'imports = ["model"]\nargs_hook = "add_args"', "not a field of construct kind 'config'"),
                           ('loader = "mmengine.Config.fromfile"\n', '', "loader: missing")):
        gf.write_text(gf_text.replace(old, new))
        with pytest.raises(CatalogError, match=says):
            catalog.load(matrices_copy)
    gf.write_text(gf_text)
    assert catalog.load(matrices_copy).model("gaussianformer").construct.to_dict() == {
        "kind": "config", "config": "config/nuscenes_gs25600_solid.py", "loader": "mmengine.Config.fromfile",
        "builder": "mmseg.models.build_segmentor", "imports": ("model",)}
    plan_construct = catalog.load(matrices_copy).model("qcnet").construct
    assert plan_construct.object == "QCNet" and "--num_recurrent_steps" in plan_construct.args


def test_construct_code_is_checked_at_load(matrices_copy):
    """kind python: lines of Python that parse and bind `model` at the top; nothing else of another kind."""
    from envbuild.errors import CatalogError
    path = matrices_copy / "models" / "qcnet.toml"
    text = path.read_text()
    head = text[:text.index("[construct]")]
    for body, says in (('code = """\nimport os\nmodel = os.getcwd(\n"""', "construct.code: not Python"),
                       ('code = """\nif True:\n    model = 1\n"""', "binds no `model` at its top level"),
                       ('code = "model = 1\\u0007"', "control characters are not allowed"),
                       ('code = "model = 1"\nconfig = "a.py"', "not a field of construct kind 'python'"),
                       ('', "code: missing")):
        path.write_text(head + '[construct]\nkind = "python"\n' + body + "\n")
        with pytest.raises(CatalogError, match=says):
            catalog.load(matrices_copy)
    path.write_text(head + '[construct]\nkind = "python"\nimports = ["predictors"]\ncode = """\nfrom predictors import QCNet\n'
                    'model = QCNet()\n"""\n')
    got = catalog.load(matrices_copy).model("qcnet").construct.to_dict()
    assert got == {"kind": "python", "code": "from predictors import QCNet\nmodel = QCNet()\n", "imports": ("predictors",)}


def test_the_plan_carries_the_construct_recipe_to_the_image(cat):
    from envbuild.resolve import resolve
    plan = resolve(cat, "qcnet", "a800")
    assert plan.to_dict()["construct"]["args_hook"] == "add_model_specific_args"
    sd = resolve(cat, "sparsedrive", "a800").to_dict()["construct"]
    assert sd["builder"] == "mmdet.models.build_detector" and "data/kmeans/kmeans_det_900.npy=900x11" in sd["arrays"]


def test_construct_arrays_are_validated(matrices_copy):
    from envbuild.errors import CatalogError
    path = matrices_copy / "models" / "sparsedrive.toml"
    text = path.read_text()
    for new, says in (('"data/kmeans/kmeans_det_900.npy=900x11"', None),
                      ('"data/../../etc/x.npy=1"', "must stay inside the repository"),
                      ('"data/k.npy=0x11"', "invalid entry"),
                      ('"data/k.txt=9"', "invalid entry"),
                      ('"data/k.npy=9; rm -rf /"', "invalid entry")):
        path.write_text(text.replace('"data/kmeans/kmeans_det_900.npy=900x11"', new))
        if says is None:
            assert catalog.load(matrices_copy).model("sparsedrive").construct.arrays[0] == "data/kmeans/kmeans_det_900.npy=900x11"
            continue
        with pytest.raises(CatalogError, match=says):
            catalog.load(matrices_copy)


def test_blackwell_cards(cat):
    from envbuild.incontainer.archrules import code_name, extension_arch, union_arch_list
    facts = {c: (cat.card(c).cc, cat.card(c).memory_gb, cat.card(c).p2p) for c in ("b200", "b300", "rtx5090", "rtxpro6000")}
    assert facts == {"b200": ("10.0", 180, True), "b300": ("10.3", 288, True),
                     "rtx5090": ("12.0", 32, False), "rtxpro6000": ("12.0", 96, True)}
    assert code_name("10.3") == "sm_103" and code_name("12.0+PTX") == "compute_120"
    assert union_arch_list(["9.0", "12.0", "10.3", "10.0+PTX"]) == "9.0;10.0+PTX;10.3;12.0"
    # nvcc 12.9 and 13.x emit sm_103 natively; 12.8 reaches B300 through sm_101 SASS
    assert extension_arch("10.3", cat.toolkit("13.0").archs, "12.1")[0] == "10.3"
    assert extension_arch("10.3", cat.toolkit("12.8").archs, "12.1")[0] == "10.1"
    assert extension_arch("12.0", cat.toolkit("13.1").archs, "12.1")[0] == "12.0"


def test_cuda_13_toolkits_are_measured(cat):
    tk = cat.toolkit("13.0")
    assert tk.archs[0] == "7.5" and "7.0" not in tk.archs and {"10.3", "11.0", "12.1"} <= set(tk.archs)
    assert tk.max_gcc == 15 and "20.04" not in tk.ubuntu
    assert {"10.3", "12.1"} <= set(cat.toolkit("12.9").archs) and "10.1" in cat.toolkit("12.8").archs


def test_measured_releases_carry_their_own_gpu_code(cat):
    measured = [r for r in cat.torch.values() if r.sass]
    assert len(measured) >= 10
    for rel in measured:
        sass, ptx = cat.wheel_code(rel, rel.pypi)
        assert (sass, ptx) == (rel.sass, rel.ptx)
    newest = cat.torch[cat.torch_versions()[-1]]
    assert newest.pypi.startswith("13.") and "10.0" in newest.sass and "12.0" in newest.sass + newest.ptx


@pytest.mark.parametrize("field,value,reason", [
    ("sass", '["sm_90"]', "invalid entry"),
    ("ptx", '["12.0"]', "without the SASS"),
    ("ptx", '["12.0a"]', "invalid entry"),
    ("sass", "[]", "not a measurement"),
    ("sass", '["9.0", "9.0"]', "listed twice"),
])
def test_measured_code_is_validated(matrices_copy, field, value, reason):
    _edit(matrices_copy / "toolchains" / "torch.toml", '[torch."2.7.1"]\n', f'[torch."2.7.1"]\n{field} = {value}\n')
    with pytest.raises(CatalogError) as exc:
        catalog.load(matrices_copy)
    msg = exc.value.message
    assert "torch.toml" in msg and f"torch.2.7.1.{field}" in msg and reason in msg, msg


def test_a_measured_pypi_build_needs_no_wheel_archs_entry(matrices_copy):
    torch_toml = matrices_copy / "toolchains" / "torch.toml"
    _edit(torch_toml, 'pypi = "12.6"\ncxx = 17\next_max_arch = "12.0"', 'pypi = "12.7"\ncxx = 17\next_max_arch = "12.0"')
    with pytest.raises(CatalogError, match=r"torch\.2\.7\.1\.index.*no \[wheel_archs\] entry for CUDA 12\.7"):
        catalog.load(matrices_copy)
    _edit(torch_toml, '[torch."2.7.1"]\n', '[torch."2.7.1"]\nsass = ["9.0"]\nptx = ["9.0"]\n')
    cat = catalog.load(matrices_copy)
    assert cat.wheel_code(cat.torch["2.7.1"], "12.7") == (("9.0",), ("9.0",))
    assert cat.wheel_code(cat.torch["2.7.1"], "12.8") == (cat.wheel_archs["12.8"], ())


@pytest.mark.parametrize("file,old,new,key,hint", [
    ("models/maptr.toml", 'name = "maptr"\n', 'name = "maptr"\nerra = "2022-06-01"\n', "model.erra", "did you mean 'era'"),
    ("models/maptr.toml", "[stdlib_modules]", "[stdlib_module]", "stdlib_module", "did you mean 'stdlib_modules'"),
    ("models/maptr.toml", "[corrections.numpy]", "[correction.numpy]", "correction", "did you mean 'corrections'"),
    ("models/maptr.toml", "[vendored.mmdet3d]\n", "[vendored.mmdet3d]\nbuild = \"x\"\n", "vendored.mmdet3d.build", "unknown key"),
    ("cards.toml", 'cc = "8.0"', 'cc = "8.0"\nmemory = 80', "cards.a30.memory", "did you mean 'memory_gb'"),
    ("toolchains/cuda.toml", "max_gcc = 10", "max_gcc = 10\nmax_gc = 11", "cuda.11.1.max_gc", "did you mean 'max_gcc'"),
    ("toolchains/torch.toml", '[torch."2.7.1"]\n', '[torch."2.7.1"]\ntorchvison = "0.22.1"\n', "torch.2.7.1.torchvison",
     "did you mean 'torchvision'"),
    ("toolchains/packages.toml", '[asserts.mmdet."2.14.0"]', '[assert.mmdet."2.14.0"]', "assert", "did you mean 'asserts'"),
    ("toolchains/packages.toml", 'torch_max = "2.3"\nalways', 'torch_max = "2.3"\nwhn_package = "x"\nalways', "era[0].whn_package",
     "did you mean 'when_package'"),
])
def test_unknown_keys_and_tables_are_refused_with_the_closest_known_name(matrices_copy, file, old, new, key, hint):
    _edit(matrices_copy / file, old, new)
    with pytest.raises(CatalogError) as exc:
        catalog.load(matrices_copy)
    msg = exc.value.message
    assert file.split("/")[-1] in msg and f"{key}: unknown" in msg and hint in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("file,old,new,key,reason", [
    ("models/maptr.toml", 'version = "1.23.5"', 'version = "*"', "corrections.numpy.version", "not a version or specifier"),
    ("models/maptr.toml", '"mmcv-full" = "1.4.0"', '"mmcv-full" = ""', "packages.mmcv-full", "not a version or specifier"),
    ("toolchains/packages.toml", 'spec = "<2"', 'spec = "*"', "era[0].spec", "not a version or specifier"),
    ("toolchains/packages.toml", 'spec = "<2"', 'spec = "<2"\nwhen_version = "<1.26"', "era[0].when_version", "needs when_package"),
    ("toolchains/packages.toml", 'from_date = "2026-01-06"', 'from_date = "2026-02-30"', "from_date", "not a date"),
    ("toolchains/packages.toml", '[asserts.mmdet."2.14.0"]', '[asserts.mmdet."2.14.x"]', "asserts.mmdet.2.14.x", "range of versions"),
    ("toolchains/packages.toml", "objects = 85\nhead_dims = [32, 64, 96, 128, 160, 192, 256]\nmin_nvcc = \"12.0\"",
     "objects = -85\nhead_dims = [32, 64, 96, 128, 160, 192, 256]\nmin_nvcc = \"12.0\"",
     "flash_attn.2.7.4.post1.objects", "must be a count"),
    ("toolchains/packages.toml", "objects = 85\nhead_dims = [32, 64, 96, 128, 160, 192, 256]\nmin_nvcc = \"12.0\"",
     "objects = 85\nhead_dims = [32, 48]\nmin_nvcc = \"12.0\"", "flash_attn.2.7.4.post1.head_dims",
     "expected head dims among"),
    ("toolchains/packages.toml", '[compiled.mmcv-full."1.6.2"]', '[compiled.mmcv-full."latest"]', "compiled.mmcv-full.latest",
     "not a version"),
    ("toolchains/packages.toml", '[flash_attn."2.6.3"]', '[flash_attn."2.6.x"]', "flash_attn.2.6.x", "not a version"),
    ("toolchains/packages.toml", 'series = "mmcv1"\ntorch = ["1.5", "2.0"]\ncxx = 14', 'series = "mmcv1"\ntorch = ["1.5", "2.0"]\ncxx = 15',
     "compiled.mmcv-full.1.6.2.cxx", "not a C++ standard"),
    ("toolchains/torch.toml", '[torch."2.7.1"]', '[torch."2.7.x"]', "torch.2.7.x", "not a version"),
])
def test_every_spec_key_and_enum_is_validated_at_load(matrices_copy, file, old, new, key, reason):
    """A correction of "*" loaded, then a Python port of the model died in the resolver with
    InvalidSpecifier; a bad version key died sorting releases. Now: one line at load."""
    _edit(matrices_copy / file, old, new)
    with pytest.raises(CatalogError) as exc:
        catalog.load(matrices_copy)
    msg = exc.value.message
    assert file.split("/")[-1] in msg and key in msg and reason in msg, msg


def test_facts_keyed_by_a_version_range_cover_every_release_in_it(matrices_copy):
    """A rule for mmdet3d >=0.17,<0.18 covers the 0.17.1 a BEVFormer entry vendors, as the exact
    0.17.2 key did for MapTR: the H20 port gets the mmcv assert and layer-clash fixers."""
    from envbuild.resolve import resolve
    _edit(matrices_copy / "toolchains" / "packages.toml", '[asserts.mmdet3d."0.17.2"]', '[asserts.mmdet3d.">=0.17,<0.18"]')
    _edit(matrices_copy / "models" / "maptr.toml", '[vendored.mmdet3d]\nversion = "0.17.2"', '[vendored.mmdet3d]\nversion = "0.17.1"')
    cat = catalog.load(matrices_copy)
    facts = cat.assert_facts("mmdet3d", "0.17.1")
    assert facts.version == "0.17.1" and facts.layers_clash_from == "1.4.6"
    assert cat.assert_facts("mmdet3d", "0.18.0") is None and cat.assert_facts("mmdet", "2.14.0").mmcv == ("1.3.8", "1.4.0")
    plan = resolve(cat, "maptr", "h20")
    fixers = {f.name: f for f in plan.fixers}
    assert {"mmcv-version-assert", "mmcv-layer-clash"} <= set(fixers)
    assert "mmdet3d 0.17.1" in fixers["mmcv-version-assert"].why and "mmdet3d 0.17.1" in fixers["mmcv-layer-clash"].why


USER_PACKAGES = '''
[asserts.mmdet3d.">=0.17,<0.17.2"]
mmcv = ["1.3.8", "1.4.0"]
layers_clash_from = "1.4.6"

[compiled.mmcv-full."1.7.2"]
notes = "overridden here"

[[era]]
name = "yapf"
spec = "==0.40.0"
when_package = "mmcv-full"
why = "a test"

[collections_abc]
networkx = "2.4"
'''


def test_a_user_toolchains_file_merges_into_the_built_in_one_per_key(tmp_path, cat):
    user = tmp_path / "user"
    (user / "toolchains").mkdir(parents=True)
    packages = user / "toolchains" / "packages.toml"
    packages.write_text(USER_PACKAGES)
    merged = catalog.load(user)
    assert merged.compiled["mmcv-full"]["1.7.2"].notes == "overridden here"
    assert merged.compiled["mmcv-full"]["1.7.2"].series == "mmcv1" and merged.compiled["mmcv-full"]["1.7.2"].cxx == 17
    assert set(merged.compiled) == set(cat.compiled) and merged.flash_attn == cat.flash_attn and merged.torch == cat.torch
    assert merged.assert_facts("mmdet3d", "0.17.1").mmcv == ("1.3.8", "1.4.0")
    assert merged.assert_facts("mmdet3d", "0.17.2") == cat.assert_facts("mmdet3d", "0.17.2")
    assert [e.name for e in merged.era] == [e.name for e in cat.era]
    assert next(e for e in merged.era if e.name == "yapf").spec == "==0.40.0"
    assert merged.collections_abc == {**cat.collections_abc, "networkx": "2.4"}
    # a mistake in the user's file names the user's file
    for text, says in (('notes = "overridden here"', 'notse = "x"'), ('notes = "overridden here"', "cxx = 15")):
        packages.write_text(USER_PACKAGES.replace(*(text, says)))
        with pytest.raises(CatalogError) as exc:
            catalog.load(user)
        assert "user/toolchains/packages.toml: compiled.mmcv-full.1.7.2." in exc.value.message, exc.value.message
    packages.write_text('[flash_attn."2.6.3"]\nmin_nvcc = "bad"\n')
    with pytest.raises(CatalogError, match=r"user/toolchains/packages\.toml: flash_attn\.2\.6\.3\.min_nvcc"):
        catalog.load(user)


def test_catalog_check_validates_a_user_catalog(tmp_path):
    import subprocess
    import sys

    def check(*args):
        return subprocess.run([sys.executable, "-m", "envbuild.cli", "catalog", "check", *args],
                              capture_output=True, text=True, timeout=120)
    user = tmp_path / "user"
    (user / "toolchains").mkdir(parents=True)
    (user / "toolchains" / "packages.toml").write_text(USER_PACKAGES)
    (user / "cards.toml").write_text('[cards.rtx6000ada]\nname = "NVIDIA RTX 6000 Ada"\ncc = "8.9"\nmemory_gb = 48\np2p = true\n')
    r = check(str(user))
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1, (r.stdout, r.stderr)
    assert "catalog OK" in r.stdout and "(1 from it)" in r.stdout and "toolchains merged: packages.toml" in r.stdout
    data = json.loads(check(str(user), "--json").stdout)
    assert data["user_cards"] == ["rtx6000ada"] and data["toolchains"] == ["packages.toml"]
    (user / "cards.toml").write_text('[cards.rtx6000ada]\nname = "x"\ncc = "8.9"\nmemory_gb = 48\np2p = true\nalias = ["a"]\n')
    r = check(str(user))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cards.rtx6000ada.alias: unknown key (did you mean 'aliases'?)" in r.stderr, r.stderr
    (user / "cards.toml").unlink()
    (user / "model").mkdir()
    (user / "model" / "bevformer.toml").write_text("")
    r = check(str(user))
    assert r.returncode == 2 and "model/bevformer.toml" in r.stderr and "did you mean models/bevformer.toml" in r.stderr, r.stderr
    assert check(str(tmp_path / "nowhere")).returncode == 2


def test_a_models_flash_attn_head_dims_are_kernel_dims_with_a_reason(matrices_copy):
    """[flash_attn] head_dims: the dims --trim-kernels compiles; a dim flash-attn has no kernel
    file for, an empty list or no reason is one line naming the key; a port cannot name the fixer."""
    from envbuild.errors import CatalogError
    path = matrices_copy / "models" / "sparsedrive.toml"
    text = path.read_text()
    assert catalog.load(matrices_copy).model("sparsedrive").flash_attn_head_dims == (32, 64)
    for old, new, says in (("head_dims = [32, 64]", "head_dims = [32, 48]", "flash_attn.head_dims: 48 is not a head dim"),
                           ("head_dims = [32, 64]", "head_dims = []", "flash_attn.head_dims: expected a non-empty"),
                           ("head_dims = [32, 64]", 'head_dims = ["32"]', "flash_attn.head_dims: expected a non-empty"),
                           ("why = \"MultiheadFlashAttention", "reason = \"MultiheadFlashAttention", "flash_attn.why: missing")):
        path.write_text(text.replace(old, new))
        with pytest.raises(CatalogError, match=says):
            catalog.load(matrices_copy)
    path.write_text(text)
    pkg = matrices_copy / "toolchains" / "packages.toml"
    pkg.write_text(pkg.read_text().replace('port = ["cxx-standard"]', 'port = ["flash-attn-head-dims"]', 1))
    with pytest.raises(CatalogError, match="takes arguments a port cannot give"):
        catalog.load(matrices_copy)
