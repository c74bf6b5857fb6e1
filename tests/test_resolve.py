import itertools

import pytest
from hypothesis import given, settings, strategies as st

from envbuild import catalog
from envbuild.incontainer.archrules import cc_key
from envbuild.config import Sources
from envbuild.errors import BadInput
from envbuild.incontainer.archrules import extension_arch, runs_on as wheel_runs_on, sass_runs_on
from envbuild.resolve import Conflict, parse_overrides, resolve
from packaging.version import Version as V

PYPI_ONLY = Sources(torch_index=None)


# ---------------------------------------------------------- binary compatibility

@pytest.mark.parametrize("sass,cc,ok", [
    ("8.0", "8.0", True), ("8.0", "8.6", True), ("8.6", "8.9", True), ("8.6", "8.0", False),
    ("8.6", "9.0", False), ("8.0", "9.0", False), ("9.0", "10.0", False), ("7.0", "7.5", True),
])
def test_cubin_runs_only_on_same_major_higher_minor(sass, cc, ok):
    assert sass_runs_on(sass, cc) is ok


@pytest.mark.parametrize("sass,cc,ok", [
    ("10.0a", "10.0", True), ("10.0a", "10.3", False), ("9.0a", "9.0", True), ("9.0a", "10.0", False),
    ("10.3a", "10.0", False), ("12.0a", "12.1", False),
    # family-specific: the family's cards at or above it (sm_100f: 10.0 and 10.3; sm_103f: 10.3 only)
    ("10.0f", "10.0", True), ("10.0f", "10.3", True), ("10.3f", "10.0", False), ("10.0f", "12.0", False),
    ("12.0f", "12.1", True),
])
def test_arch_specific_cubins_run_only_on_their_own_arch(sass, cc, ok):
    assert sass_runs_on(sass, cc) is ok


def test_arch_and_family_specific_ptx_do_not_compile_forward():
    assert wheel_runs_on([], "10.3", ptx=["10.0a"]) is None and wheel_runs_on([], "10.0", ptx=["10.0a"]) == "10.0a+PTX"
    assert wheel_runs_on([], "10.3", ptx=["10.0f"]) == "10.0f+PTX" and wheel_runs_on([], "12.0", ptx=["10.0f"]) is None
    assert wheel_runs_on(["9.0", "10.0a"], "10.3", ptx=["9.0"]) == "9.0+PTX"  # not the sm_100a cubin
    # at one X.Y the plain cubin names the code that runs (all kernels have it; sm_90a only some)
    assert wheel_runs_on(["9.0", "9.0a", "10.0", "10.0a"], "9.0") == "9.0" and wheel_runs_on(["9.0a"], "9.0") == "9.0a"
    assert wheel_runs_on(["10.0a", "10.0"], "10.0") == "10.0"


def test_cc_key_reads_the_suffix_and_orders_it_beside_its_arch():
    assert cc_key("10.0a") == (10, 0, "a") and cc_key("8.6") == (8, 6)
    assert sorted(["10.3", "10.0f", "10.0", "9.0a", "10.0a"], key=cc_key) == ["9.0a", "10.0", "10.0a", "10.0f", "10.3"]
    with pytest.raises(ValueError):
        cc_key("10.0x")


def test_ptx_compiles_forward():
    assert wheel_runs_on(["7.0"], "9.0", ptx=["8.0"]) == "8.0+PTX"
    assert wheel_runs_on(["7.0"], "7.5", ptx=["8.0"]) == "7.0"
    assert wheel_runs_on(["8.0", "8.6"], "9.0") is None


def test_extension_arch_falls_back_to_same_major_then_ptx():
    nvcc111 = ["7.0", "7.5", "8.0", "8.6"]
    assert extension_arch("8.9", nvcc111, "8.6")[0] == "8.6"
    assert extension_arch("9.0", nvcc111, "8.6")[0] == "8.6+PTX"
    assert extension_arch("8.0", nvcc111, "8.6")[0] == "8.0"


# ---------------------------------------------------------- the cases the issue names

def test_maptr_a100_strict_is_upstream(cat):
    p = resolve(cat, "maptr", "a100", strict=True)
    assert p.mode == "upstream" and p.torch.version == "1.9.1+cu111"
    assert p.pin("mmcv-full").version == "1.4.0" and p.arch_list == "8.0"
    assert p.torch_index and "torch_stable" in p.torch_index
    # the one deviation strict keeps: the catalog's correction of pins that cannot install together
    assert [d.split(": catalog")[0] for d in p.deviations] == ["numpy: <1.20.0 -> 1.23.5"]
    assert p.pin("numpy").source == "fix" and "av2" in p.pin("numpy").why


def test_maptr_l20_strict_runs_through_sm86(cat):
    p = resolve(cat, "maptr", "l20", strict=True)
    assert p.torch.version == "1.9.1+cu111"
    assert p.arch_list == "8.6"  # nvcc 11.1 cannot emit 8.9
    assert "sm_89" in p.arch_why


def test_maptr_h20_strict_is_impossible_with_the_chain(cat):
    with pytest.raises(Conflict) as exc:
        resolve(cat, "maptr", "h20", strict=True)
    text = exc.value.message + " ".join(exc.value.chain)
    assert "9.0" in text and "no PTX" in text
    assert any("mmcv-full 1.4.0 caps torch below 1.11" in line for line in exc.value.chain)
    assert "a port would change" in exc.value.hint and "torch" in exc.value.hint
    assert exc.value.exit_code == 2


def test_maptr_h20_port(cat):
    p = resolve(cat, "maptr", "h20")
    assert p.mode == "port"
    t = p.torch.version
    assert t.startswith("2.0.") and t.endswith("+cu118")
    mmcv = p.pin("mmcv-full")
    assert mmcv.deviation and mmcv.upstream == "1.4.0"
    assert p.arch_list == "9.0"
    names = {f.name for f in p.fixers}
    assert {"thc-to-aten", "numba-errors", "local-rank", "mmcv-version-assert"} <= names
    assert any(d.startswith("torch:") for d in p.deviations)


def test_sparsedrive_v100_impossible_flash_attn(cat):
    with pytest.raises(Conflict) as exc:
        resolve(cat, "sparsedrive", "v100")
    assert "flash-attn" in exc.value.message and "7.0" in exc.value.message


def test_sparsedrive_h20_cuda_118(cat):
    p = resolve(cat, "sparsedrive", "h20", cuda="11.8")
    assert p.cuda == "11.8.0" and p.torch.version.endswith("+cu118")
    assert p.pin("flash-attn").version == "2.3.2"  # sm_90 with nvcc >= 11.8
    assert p.pin("mmcv-full").version == "1.7.1"


@pytest.mark.parametrize("model, card, python, compiles, why", [
    ("maptr", "a800", None, False, "no torch.compile"),           # torch 1.9
    ("sparsedrive", "h20", None, True, "compiles on Python 3.8"),  # ported to torch 2.0.1
    ("sparsedrive", "h20", "3.11", False, "Python <= 3.10, not 3.11"),
])
def test_plan_says_whether_torch_compile_runs(cat, model, card, python, compiles, why):
    p = resolve(cat, model, card, python=python)
    assert p.torch_compile is compiles and why in p.torch_compile_why


@pytest.mark.parametrize("model", ["maptr", "sparsedrive", "qcnet", "gaussianformer"])
def test_any_model_on_4090_disables_p2p(cat, model):
    p = resolve(cat, model, "4090")
    assert p.runtime_env["NCCL_P2P_DISABLE"]["value"] == "1"


def test_p2p_cards_get_no_p2p_override(cat):
    assert "NCCL_P2P_DISABLE" not in resolve(cat, "qcnet", "a100").runtime_env


def test_pypi_only_sources_change_the_answer(cat):
    with pytest.raises(Conflict, match="only on the PyTorch index"):
        resolve(cat, "maptr", "a100", strict=True, sources=PYPI_ONLY)
    p = resolve(cat, "qcnet", "a800", cuda="11.8", sources=PYPI_ONLY)
    assert p.torch.version == "2.0.1" and p.torch_index is None and p.torch_cuda == "11.7"


def test_overrides(cat):
    p = resolve(cat, "sparsedrive", "a100", overrides={"mmcv-full": "1.7.2"})
    pin = p.pin("mmcv-full")
    assert pin.version == "1.7.2" and pin.source == "override" and p.mode == "port"
    with pytest.raises(Conflict, match="--set"):  # past its torch range, and no port known for it
        resolve(cat, "maptr", "h20", overrides={"mmcv-full": "1.6.2"})
    ported = resolve(cat, "maptr", "h20", overrides={"mmcv-full": "1.4.0"})  # THC: its sdist is ported
    assert [f["name"] for f in ported.native_packages["mmcv-full"]["sdist_fixers"]] == ["thc-to-aten", "cxx-standard"]


def test_bad_override_is_bad_input():
    with pytest.raises(BadInput):
        parse_overrides(["mmcv-full>=1.4"])
    with pytest.raises(BadInput):
        parse_overrides(["mmcv-full==1.4\nRUN x"])


def test_unknown_inputs_are_bad_input(cat):
    for kwargs in ({"model_name": "mapr", "card_name": "a100"}, {"model_name": "maptr", "card_name": "a1000"},
                   {"model_name": "maptr", "card_name": "a100", "cuda": "10.0"},
                   {"model_name": "maptr", "card_name": "a100", "python": "2.7"}):
        with pytest.raises(BadInput):
            resolve(cat, **kwargs)


def test_era_pins_hold_what_upstream_left_open(cat):
    p = resolve(cat, "maptr", "a100")
    assert p.pin("numpy").version == "1.23.5"  # the catalog's correction wins over the era's numpy<2
    assert p.pin("yapf").version == "==0.40.1" and p.pin("yapf").source == "era"
    assert p.pin("opencv-python-headless") is not None
    sd = resolve(cat, "sparsedrive", "a100")
    assert sd.pin("opencv-python") is None and sd.pin("opencv-python-headless").version == "4.8.1.78"
    assert sd.mode == "upstream" and any("opencv" in d for d in sd.deviations)


def test_an_era_pin_guards_only_plans_whose_lock_could_pick_what_it_guards_against(cat):
    """lightning-cloud 0.6.0 (2026-01-06) dropped what lightning 2.0.x imports: QCNet's port to torch
    2.11 (index cutoff 2026-04) gets lightning-cloud<0.6; its A800 port (cutoff 2023) cannot pick 0.6."""
    from envbuild.plan import Pin
    from envbuild.resolve import _era_pins
    no_index = Sources(torch_index=None)
    port = resolve(cat, "qcnet", "h20,b200", cuda="13.0", python="3.11", sources=no_index)
    cloud = port.pin("lightning-cloud")
    assert port.index_cutoff >= "2026-01-06" and cloud.version == "<0.6" and cloud.source == "era"
    assert "AppinstancesIdBody" in cloud.why
    a800 = resolve(cat, "qcnet", "a800", cuda="11.8", python="3.11", sources=no_index)
    assert a800.index_cutoff < "2026-01-06" and a800.pin("lightning-cloud") is None
    # lightning 2.1 made lightning-cloud an extra: a pin outside when_version, or no exact pin, gets nothing
    rel, model = cat.torch[port.torch.version], cat.models["qcnet"]
    for lightning in ("2.1.0", ">=2.0"):
        pins = _era_pins(cat, [Pin("lightning", lightning, "upstream pin", lightning)], rel, model)
        assert [p.name for p in pins] == ["lightning"], lightning
    assert "lightning-cloud" in [p.name for p in _era_pins(cat, [Pin("lightning", "2.0.9", "", "2.0.9")], rel, model)]


# ---------------------------------------------------------- an oracle apart from archrules
# Written by hand from the rule in DESIGN.md, not computed: a cubin for X.y runs on X.z only when
# z >= y (same major); PTX for X.y JIT-compiles on every card at or above X.y. The sweeps below
# check the resolver's choices against these tables, so a broken archrules.runs_on (which the
# resolver itself uses) cannot vouch for itself.
ALL_CCS = ("7.0", "7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "10.3", "12.0")
# a cubin of every arch some toolkit emits -> the catalog cards' compute capabilities it runs on
CUBIN_RUNS_ON = {"3.5": set(), "3.7": set(), "5.0": set(), "5.2": set(), "5.3": set(), "6.0": set(), "6.1": set(),
                 "6.2": set(), "7.0": {"7.0", "7.5"}, "7.2": {"7.5"}, "7.5": {"7.5"}, "8.0": {"8.0", "8.6", "8.9"},
                 "8.6": {"8.6", "8.9"}, "8.7": {"8.9"}, "8.8": {"8.9"}, "8.9": {"8.9"}, "9.0": {"9.0"},
                 "10.0": {"10.0", "10.3"}, "10.1": {"10.3"}, "10.3": {"10.3"}, "11.0": set(), "12.0": {"12.0"},
                 "12.1": set(),
                 # arch-specific (sm_XYa): exactly X.Y; family-specific (sm_XYf): X.Y's family at or above it
                 "9.0a": {"9.0"}, "10.0a": {"10.0"}, "10.3a": {"10.3"}, "12.0a": {"12.0"}, "12.1a": set(),
                 "10.0f": {"10.0", "10.3"}, "10.3f": {"10.3"}, "12.0f": {"12.0"}}
# (SASS, PTX) a torch wheel carries -> the compute capabilities of catalog cards it runs on
WHEEL_RUNS_ON = {
    (("3.7", "5.0", "6.0", "7.0"), ()): {"7.0", "7.5"},
    (("3.7", "5.0", "6.0", "7.0", "7.5", "8.0", "8.6"), ()): {"7.0", "7.5", "8.0", "8.6", "8.9"},
    (("3.7", "5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "9.0"), ()): {"7.0", "7.5", "8.0", "8.6", "8.9", "9.0"},
    (("5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "9.0"), ()): {"7.0", "7.5", "8.0", "8.6", "8.9", "9.0"},
    (("7.0", "7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"), ()): set(ALL_CCS),
    (("7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "10.3", "12.0"), ()): set(ALL_CCS) - {"7.0"},
    (("7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"), ()): set(ALL_CCS) - {"7.0"},
    (("7.5", "8.0", "8.6", "9.0", "10.0", "12.0"), ()): set(ALL_CCS) - {"7.0"},
    # not in today's catalog: PTX, and code for one arch only
    (("7.0",), ("8.0",)): set(ALL_CCS),
    (("8.0", "8.6"), ("8.6",)): {"8.0", "8.6", "8.9", "9.0", "10.0", "10.3", "12.0"},
    ((), ("9.0",)): {"9.0", "10.0", "10.3", "12.0"},
    (("9.0",), ()): {"9.0"},
    (("10.0",), ()): {"10.0", "10.3"},
    (("8.6", "12.0"), ()): {"8.6", "8.9", "12.0"},
    # arch-specific code serves its own arch only; family-specific PTX stays in its family
    (("9.0a",), ()): {"9.0"},
    (("10.0a",), ()): {"10.0"},
    (("8.0", "9.0a", "10.0a"), ()): {"8.0", "8.6", "8.9", "9.0", "10.0"},
    (("9.0", "9.0a", "10.0", "10.0a"), ()): {"9.0", "10.0", "10.3"},
    ((), ("10.0a",)): {"10.0"},
    ((), ("10.0f",)): {"10.0", "10.3"},
    (("9.0a",), ("9.0",)): {"9.0", "10.0", "10.3", "12.0"},
}


@pytest.mark.parametrize("code", sorted(WHEEL_RUNS_ON), ids=str)
def test_runs_on_agrees_with_the_hand_written_table(code):
    sass, ptx = code
    assert {cc for cc in ALL_CCS if wheel_runs_on(sass, cc, ptx)} == WHEEL_RUNS_ON[code]
    for arch, ccs in CUBIN_RUNS_ON.items():
        assert {cc for cc in ALL_CCS if sass_runs_on(arch, cc)} == ccs, arch


def test_the_oracle_covers_every_card_of_the_catalog(cat):
    assert {c.cc for c in cat.cards.values()} <= set(ALL_CCS), "a new compute capability: extend the tables by hand"
    assert {a for t in cat.toolkits.values() for a in t.archs} <= set(CUBIN_RUNS_ON), "a new arch: extend CUBIN_RUNS_ON"


# ---------------------------------------------------------- properties over the whole catalog

def _all_plans(cat, sources=None):
    for model, card in itertools.product(sorted(cat.models), cat.cards):
        for cuda in [None, *cat.toolkits]:
            try:
                yield resolve(cat, model, card, cuda=cuda, sources=sources)
            except Conflict:
                continue


@pytest.mark.parametrize("sources", [None, PYPI_ONLY], ids=["torch-index", "pypi-only"])
def test_every_plan_is_sound(cat, sources):
    n = 0
    for p in _all_plans(cat, sources):
        n += 1
        card = cat.cards[p.card]
        code = tuple(cat.wheel_code(cat.torch[p.torch.version.split("+")[0]], p.torch_cuda))
        assert code in WHEEL_RUNS_ON, f"torch {p.torch.version} carries {code}: add it to WHEEL_RUNS_ON by hand"
        assert card.cc in WHEEL_RUNS_ON[code], (p.model, p.card, p.torch.version)
        toolkit = cat.toolkit(p.cuda)
        assert p.gcc <= p.gcc_max == toolkit.max_gcc
        ubuntu = p.os.removeprefix("ubuntu")
        assert ubuntu in toolkit.ubuntu  # a tag that exists
        assert p.base_image.endswith(f"nvidia/cuda:{toolkit.full}-{toolkit.cudnn}-devel-ubuntu{ubuntu}")
        arch = p.arch_list.removesuffix("+PTX")
        assert arch in toolkit.archs
        if p.arch_list.endswith("+PTX"):
            assert cc_key(arch) < cc_key(card.cc)
        else:
            assert card.cc in CUBIN_RUNS_ON[arch], (p.model, p.card, p.arch_list)
        if not card.p2p:  # a one-card image: every host has the card, so the ENV is baked
            assert p.runtime_env["NCCL_P2P_DISABLE"]["value"] == "1" and "NCCL_P2P_DISABLE" not in p.host_env
        else:  # else the image's launcher decides it on the host
            assert "NCCL_P2P_DISABLE" not in p.runtime_env and p.host_env["NCCL_P2P_DISABLE"]["rule"] == "no-p2p"
        if p.strict is False and p.mode == "upstream":
            assert not [pin for pin in p.pins if pin.is_port]
        rel = cat.torch[p.torch.version.split("+")[0]]
        if p.torch_compile:  # torch.compile only where the release has it for this Python
            assert cc_key(rel.compile_python_max) >= cc_key(p.python.version)
        else:
            assert rel.compile_python_max is None or cc_key(rel.compile_python_max) < cc_key(p.python.version)
    assert n > 50


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_same_input_same_plan(cat, data):
    model = data.draw(st.sampled_from(sorted(cat.models)))
    card = data.draw(st.sampled_from(sorted(cat.cards)))
    cuda = data.draw(st.sampled_from([None, *cat.toolkits]))
    strict = data.draw(st.booleans())
    try:
        a = resolve(cat, model, card, cuda=cuda, strict=strict).to_json()
    except Conflict as exc:
        with pytest.raises(Conflict) as again:
            resolve(cat, model, card, cuda=cuda, strict=strict)
        assert again.value.message == exc.message
        return
    assert resolve(cat, model, card, cuda=cuda, strict=strict).to_json() == a


# ---------------------------------------------------------- several cards, portable

def test_two_cards_one_stack_union_of_archs(cat):
    p = resolve(cat, "maptr", "a800,h20")
    assert p.cards == ("a800", "h20") and p.card == "a800+h20" and p.ccs == ["8.0", "9.0"]
    assert p.arch_list == "8.0;9.0"
    # the stack is what the stricter card (H20) needs, and A800 alone would not need it
    alone = resolve(cat, "maptr", "a800")
    assert p.torch.version.startswith("2.0") and alone.torch.version.startswith("1.9")
    assert p.torch.version == resolve(cat, "maptr", "h20").torch.version


def test_cards_are_deduplicated_and_aliases_resolve(cat):
    assert resolve(cat, "qcnet", "a800,A800,h20").cards == ("a800", "h20")


def test_no_stack_for_every_card_says_which_card_and_why(cat):
    with pytest.raises(Conflict) as exc:
        resolve(cat, "sparsedrive", "a800,v100", cuda="11.8")
    assert "every one of a800, v100" in exc.value.message and "v100: flash-attn" in exc.value.message


def test_no_p2p_card_in_the_set_leaves_p2p_to_the_host(cat):
    """a800+rtx4090: baking P2P off would slow the A800 hosts too; the launcher decides on the host,
    with the catalog's P2P-less cards in the Plan. Only cards that all lack P2P bake it."""
    p = resolve(cat, "qcnet", "a800,rtx4090")
    assert "NCCL_P2P_DISABLE" not in p.runtime_env
    rule = p.host_env["NCCL_P2P_DISABLE"]
    assert rule["value"] == "1" and rule["rule"] == "no-p2p" and "NCCL_P2P_LEVEL" in rule["respects"]
    assert {c["id"] for c in rule["cards"]} == {"rtx4090", "rtx5090"}
    assert "4090" in next(c for c in rule["cards"] if c["id"] == "rtx4090")["match"]
    assert "NCCL_P2P_DISABLE" not in resolve(cat, "qcnet", "a800").runtime_env
    both = resolve(cat, "qcnet", "rtx4090,rtx5090")
    assert both.runtime_env["NCCL_P2P_DISABLE"]["value"] == "1" and both.host_env == {}


def test_portable_covers_every_card_the_stack_runs_on_and_says_which_not(cat):
    p = resolve(cat, "sparsedrive", None, cuda="11.8")
    assert p.card == "portable" and "h20" in p.cards and "a800" in p.cards
    assert "v100" not in p.cards and "b200" not in p.cards  # flash-attn needs sm_80+; cu118 torch has no sm_100
    assert any(n.startswith("not for v100: flash-attn") for n in p.notes)
    assert p.arch_list.endswith("9.0+PTX") and "8.0" in p.arch_list.split(";")
    assert "portable" in p.cards_why and f"{len(p.cards)} of {len(cat.cards)}" in p.cards_why


def test_union_keeps_ptx_and_orders_by_capability():
    from envbuild.incontainer.archrules import union_arch_list
    assert union_arch_list(["9.0", "8.0", "8.6+PTX", "8.0"]) == "8.0;8.6+PTX;9.0"
    assert union_arch_list(["7.0", "8.0"], ptx_for_newest=True) == "7.0;8.0+PTX"


def test_the_base_image_suits_the_strictest_cxx_of_torch_and_compiled_packages(matrices_copy):
    from envbuild import catalog
    # a catalog where CUDA 11.1 exists only on Ubuntu 18.04 (gcc 7, no C++17) and mmcv-full 1.4.0 needs C++17
    cuda = matrices_copy / "toolchains" / "cuda.toml"
    cuda.write_text(cuda.read_text().replace('ubuntu = ["18.04", "20.04"]', 'ubuntu = ["18.04"]', 1))
    pkg = matrices_copy / "toolchains" / "packages.toml"
    text = pkg.read_text()
    head, tail = text.split('[compiled.mmcv-full."1.4.0"]', 1)
    pkg.write_text(head + '[compiled.mmcv-full."1.4.0"]' + tail.replace("cxx = 14", "cxx = 17", 1))
    cat = catalog.load(matrices_copy)
    with pytest.raises(Conflict) as exc:
        resolve(cat, "maptr", "a100", cuda="11.1", strict=True)
    assert "for C++17" in exc.value.message  # torch 1.9 alone (C++14) would have taken gcc 7


# ---------------------------------------------------------- Python ports of plain pins

def test_a_python_port_moves_exact_pins_below_the_first_release_for_that_python(cat):
    p = resolve(cat, "maptr", "a800", python="3.11", cuda="11.8")
    numba = p.pin("numba")
    assert (numba.version, numba.upstream, numba.source) == ("0.57.0", "0.48.0", "port")
    assert "does not run on Python 3.11" in numba.why
    assert p.pin("scikit-image").version == "0.20.0"
    assert p.pin("shapely").version == "1.8.5.post1"  # at or above the floor (1.8.5): it stands
    # a range that excludes every release for the Python opens at the floor
    assert p.pin("networkx").version == ">=2.4" and p.pin("networkx").upstream == ">=2.2,<2.3"
    # upstream's own Python keeps upstream's pins
    up = resolve(cat, "maptr", "a100")
    assert up.pin("numba").version == "0.48.0" and up.pin("networkx").version == ">=2.2,<2.3"


def test_the_floor_for_a_python_is_the_newest_entry_not_above_it(cat):
    assert cat.python_floor("numba", "3.11") == "0.57.0"
    assert cat.python_floor("networkx", "3.12") == "2.4"  # one entry holds for every later Python
    assert cat.python_floor("numba", "3.8") is None and cat.python_floor("torch", "3.11") is None
    assert cat.python_floor("NumPy", "3.10") == "1.21.2"


def test_a_floor_never_lowers_a_pin_or_a_range_that_already_allows_it(cat):
    from envbuild.resolve import _python_port
    assert _python_port(cat, "numpy", "1.24.4", "3.11", "3.8") is None
    assert _python_port(cat, "numpy", ">=1.21", "3.11", "3.8") is None
    assert _python_port(cat, "numpy", "<1.25", "3.11", "3.8") is None
    assert _python_port(cat, "numpy", "~=1.19.0", "3.11", "3.8").version == ">=1.23.2"
    assert _python_port(cat, "numpy", "1.19.5", "3.11", "3.11") is None  # not a port: upstream's Python


def test_python_floors_and_corrections_are_validated(matrices_copy):
    from envbuild.errors import CatalogError
    pkg = matrices_copy / "toolchains" / "packages.toml"
    text = pkg.read_text()
    for bad, says in (('[python_floor.numba]\n"3.x" = "1.0"\n', "not a Python version"),
                      ('[python_floor.numba]\n"3.9" = "latest"\n', "not a version")):
        pkg.write_text(text.replace("[python_floor.numba]\n", bad.split("\n", 1)[0] + "\n" + bad.split("\n", 1)[1]
                                    ).replace('"3.9" = "0.53.0"\n', "", 1))
        with pytest.raises(CatalogError, match=says):
            catalog.load(matrices_copy)
    pkg.write_text(text)
    model = matrices_copy / "models" / "maptr.toml"
    mtext = model.read_text()
    for old, new, says in (("[corrections.numpy]", "[corrections.pillow]", "does not pin in"),
                           ('version = "1.23.5"', 'version = "1.23.5; rm -rf /"', "not a version or specifier"),
                           ('why = "av2', 'wh = "av2', "why: missing")):
        model.write_text(mtext.replace(old, new, 1))
        with pytest.raises(CatalogError, match=says):
            catalog.load(matrices_copy)


def test_a_port_past_mmcv_1_4_6_forces_mmdet3d_0x_sparse_conv_registration(cat):
    port = resolve(cat, "maptr", "a800", python="3.11", cuda="11.8")
    clash = next(f for f in port.fixers if f.name == "mmcv-layer-clash")
    assert "mmdet3d 0.17.2" in clash.why and clash.installed == ()  # vendored: fixed in the model tree
    upstream = resolve(cat, "maptr", "a800")  # mmcv-full 1.4.0 has no sparse conv of its own
    assert upstream.pin("mmcv-full").version == "1.4.0"
    assert all(f.name != "mmcv-layer-clash" for f in upstream.fixers)


def test_a_registry_mirror_prefixes_the_base_and_runtime_images(cat):
    """README: registry_mirror is a prefix for nvidia/cuda base images (hosts that reach Docker Hub
    only through a mirror)."""
    plain = resolve(cat, "maptr", "h20")
    mirrored = resolve(cat, "maptr", "h20", sources=Sources(registry_mirror="mirror.example.com/"))
    assert plain.base_image.startswith("nvidia/cuda:")
    assert mirrored.base_image == "mirror.example.com/" + plain.base_image
    from envbuild.render import runtime_image_for  # the runtime stage's image follows the base's name
    assert runtime_image_for(mirrored.base_image) == "mirror.example.com/" + runtime_image_for(plain.base_image)


def test_a_changed_pin_is_never_silent_across_the_whole_catalog(cat):
    """Wherever a Plan's version differs from an exact upstream pin (any model, card, CUDA), the
    pin says why, counts as a deviation, and the Plan lists it."""
    import re
    exact = re.compile(r"^(==)?(\d[\w.!]*)(\+\w+)?$")
    checked = 0
    for model, card, cuda in itertools.product(sorted(cat.models), cat.cards, [None, *cat.toolkits]):
        try:
            plan = resolve(cat, model, card, cuda=cuda)
        except Conflict:
            continue
        for pin in plan.pins:
            up, got = exact.match(pin.upstream or ""), exact.match(pin.version or "")
            if up and got and up.group(2) != got.group(2):
                checked += 1
                assert pin.why and pin.deviation, (model, card, cuda, pin)
                assert any(d.startswith(f"{pin.name}: {pin.upstream} -> {pin.version}: ") for d in plan.deviations), \
                    (model, card, cuda, pin, plan.deviations)
    assert checked > 50  # ports are common across the catalog: the property was exercised


# ---------------------------------------------------------- measured wheels (scripts/measure-torch.py)

def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _qcnet_on_pypi_build(matrices_copy, code: str):
    """qcnet's torch 2.0.1 from its PyPI build (CUDA 11.7), whose [wheel_archs] SASS stops at
    8.6, with `code` (measured sass/ptx lines) given to that build."""
    qcnet = matrices_copy / "models" / "qcnet.toml"
    if 'cuda = "11.7"' not in qcnet.read_text():
        _edit(qcnet, 'cuda = "11.8"', 'cuda = "11.7"')
    if code:
        _edit(matrices_copy / "toolchains" / "torch.toml", '[torch."2.0.1"]\n', '[torch."2.0.1"]\n' + code)
    return catalog.load(matrices_copy)


def test_measured_ptx_makes_a_newer_card_run_the_wheel(matrices_copy):
    before = _qcnet_on_pypi_build(matrices_copy, "")
    with pytest.raises(Conflict) as exc:
        resolve(before, "qcnet", "h100", strict=True, sources=PYPI_ONLY)
    assert "no PTX" in str(exc.value)
    cat = _qcnet_on_pypi_build(matrices_copy, 'sass = ["8.0", "8.6"]\nptx = ["8.6"]\n')
    assert cat.wheel_code(cat.torch["2.0.1"], "11.7") == (("8.0", "8.6"), ("8.6",))
    assert cat.wheel_code(cat.torch["2.0.1"], "11.8") == (cat.wheel_archs["11.8"], ())  # the index build
    p = resolve(cat, "qcnet", "h100", strict=True, sources=PYPI_ONLY)
    assert p.torch.version == "2.0.1" and p.torch_cuda == "11.7"
    assert any("compute_86" in n for n in p.notes), p.notes  # runs through the PTX, and says so


def test_measured_ptx_newer_than_the_card_does_not_run(matrices_copy):
    cat = _qcnet_on_pypi_build(matrices_copy, 'sass = ["8.0", "8.6"]\nptx = ["8.6"]\n')
    sass, ptx = cat.wheel_code(cat.torch["2.0.1"], "11.7")
    assert wheel_runs_on(sass, "7.5", ptx) is None  # 8.6 PTX cannot JIT down to 7.5
    assert wheel_runs_on(sass, "9.0", ptx) == "8.6+PTX"
    with pytest.raises(Conflict) as exc:
        resolve(cat, "qcnet", "t4", strict=True, sources=PYPI_ONLY)
    assert "PTX for 8.6" in str(exc.value) and "7.5" in str(exc.value)


PLAIN_MODEL = """[model]
name = "plainnet"
title = "plainnet"
description = "a torch-only model: nothing compiled, so only torch decides"
repo = "https://github.com/example/plainnet"
commit = "55cacb418cbbce3753119c1f157360e66993d0d0"
python = "3.8"

[torch]
version = "2.0.1"
cuda = "11.8"

[train]
launcher = "torchrun"
entry = "train.py"
"""


@pytest.mark.parametrize("card", ["b200", "rtx5090"])
def test_blackwell_with_cuda_13_gets_a_cuda_13_pypi_torch(matrices_copy, card):
    (matrices_copy / "models" / "plainnet.toml").write_text(PLAIN_MODEL)
    cat = catalog.load(matrices_copy)
    p = resolve(cat, "plainnet", card, cuda="13.0", python="3.11", sources=PYPI_ONLY)
    rel = cat.torch[p.torch.version.split("+")[0]]
    assert rel.pypi.startswith("13.") and p.torch_cuda == rel.pypi, (p.torch.version, p.torch_cuda)
    assert p.python.version == "3.11" and p.cuda == "13.0.2"  # the 13.0 toolkit asked for
    sass, ptx = cat.wheel_code(rel, p.torch_cuda)
    assert wheel_runs_on(sass, cat.card(card).cc, ptx) == cat.card(card).cc  # native SASS, measured
    # the smallest such upgrade: no older release has a CUDA 13 PyPI build for Python 3.11
    older = [r for v, r in cat.torch.items() if V(v) < V(rel.version) and r.pypi.startswith("13.") and r.supports_python("3.11")]
    assert not older, [r.version for r in older]


def test_the_torch_upgrade_names_the_constraint_that_forced_it(cat):
    """Issue 24: not the CUDA of the build chosen instead, but what stopped upstream's torch."""
    from envbuild.config import Sources
    # several cards, no --cuda: the Hopper card moved torch
    p = resolve(cat, "maptr", "a800,h20")
    assert "CUDA 11.8)" not in p.torch.why and "h20: torch 1.9.1+cu111 has no code for 9.0" in p.torch.why
    # Python 3.11 moved sparsedrive's torch, not CUDA 11.7
    p = resolve(cat, "sparsedrive", "a800", python="3.11", sources=Sources(torch_index=None))
    assert "(CUDA 11.7)" not in p.torch.why and "not 3.11" in p.torch.why
    # the same release, another build: upstream's build is only on the PyTorch index
    p = resolve(cat, "qcnet", "a800", python="3.11", sources=Sources(torch_index=None))
    assert "only on the PyTorch index" in p.torch.why
    # a --cuda request
    p = resolve(cat, "maptr", "a800", cuda="12.1")
    assert "CUDA 12.1 was requested" in p.torch.why
