"""Runtime settings decided on the host (issue 24, item 1): the image's launcher
(envbuild/incontainer/launch.py), the host-settings.json the Plan renders for it, the image's
ENTRYPOINT, and the P2P decision as resolve, render and the CLI say it.

The launcher runs here as it runs in an image: as a script, under Python 3.8 where this machine
has one, with `-S` as the ENTRYPOINT runs it, from a folder holding the host-settings.json that
render wrote for a real Plan. The GPUs are stand-in `nvidia-smi` scripts first on PATH.
"""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from envbuild import render
from envbuild.resolve import resolve

LAUNCH = ROOT / "envbuild" / "incontainer" / "launch.py"
ENTRYPOINT = '["/opt/venv/bin/python", "-S", "/opt/envbuild/launch.py"]'
# prints its arguments and the setting it got, and exits 7: exec'd with both passed through
SHOW = ["sh", "-c", 'printf "%s|" "$@"; echo "P2P=${NCCL_P2P_DISABLE-unset} LEVEL=${NCCL_P2P_LEVEL-unset}"; exit 7',
        "sh", "a", "b c"]


def _python38():
    """The image's oldest Python where this machine has it (pyenv), else this interpreter."""
    for exe in [os.environ.get("ENVBUILD_TEST_PY38"), *sorted(glob.glob("/root/.pyenv/versions/3.8*/bin/python3.8")),
                shutil.which("python3.8")]:
        if not exe:
            continue
        try:
            r = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2] == (3, 8))"],
                               capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if r.stdout.strip() == "True":
            return exe
    return sys.executable


PY = _python38()


def _path_without_nvidia_smi():
    return ":".join(d for d in os.environ["PATH"].split(":") if d and not os.path.exists(os.path.join(d, "nvidia-smi")))


H100_TOPO = """\
\tGPU0\tGPU1\tGPU2\tGPU3\tGPU4\tGPU5\tGPU6\tGPU7\tNIC0\tNIC1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\tPXB\tSYS\t0-55,112-167\t0\t\tN/A
GPU1\tNV18\t X \tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\tPXB\tSYS\t0-55,112-167\t0\t\tN/A
GPU2\tNV18\tNV18\t X \tNV18\tNV18\tNV18\tNV18\tNV18\tSYS\tSYS\t0-55,112-167\t0\t\tN/A
GPU3\tNV18\tNV18\tNV18\t X \tNV18\tNV18\tNV18\tNV18\tSYS\tSYS\t0-55,112-167\t0\t\tN/A
GPU4\tNV18\tNV18\tNV18\tNV18\t X \tNV18\tNV18\tNV18\tSYS\tPXB\t56-111,168-223\t1\t\tN/A
GPU5\tNV18\tNV18\tNV18\tNV18\tNV18\t X \tNV18\tNV18\tSYS\tPXB\t56-111,168-223\t1\t\tN/A
GPU6\tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\t X \tNV18\tSYS\tSYS\t56-111,168-223\t1\t\tN/A
GPU7\tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\t X \tSYS\tSYS\t56-111,168-223\t1\t\tN/A
NIC0\tPXB\tPXB\tSYS\tSYS\tSYS\tSYS\tSYS\tSYS\t X \tSYS

Legend:

  X    = Self
  NV#  = Connection traversing a bonded set of # NVLinks
"""


def p2p_matrix(n, cell=lambda i, j: "OK"):
    rows = [" \t" + "\t".join(f"GPU{j}" for j in range(n)) + "\t"]
    for i in range(n):
        rows.append(f" GPU{i}\t" + "\t".join("X" if i == j else cell(i, j) for j in range(n)) + "\t")
    return "\n".join(rows) + "\n\nLegend:\n\n  X    = Self\n  OK   = Status Ok\n  NS   = Not supported\n"


def uuid(i):
    """The stand-in host's UUID of GPU i."""
    return f"GPU-{i:x}{i:x}c0ffee-{i:04x}-1111-2222-333344445555"


PCIE_TOPO = "\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\nGPU0\t X \tPHB\t0-31\t0\nGPU1\tPHB\t X \t0-31\t0\n"


class FakeHost:
    """A folder with a stand-in nvidia-smi that answers from files, and logs what it was asked."""

    def __init__(self, root: Path, gpus=(), p2p=None, topo=None, fail=None, no_compute_cap=False):
        self.bin = root / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        self.log = root / "calls.log"
        (root / "gpus.csv").write_text("".join(f"{i}, {name}, {cc}\n" for i, (name, cc) in enumerate(gpus)))
        (root / "uuids.csv").write_text("".join(f"{i}, {uuid(i)}\n" for i in range(len(gpus))))
        (root / "p2p.txt").write_text(p2p or "")
        (root / "topo.txt").write_text(topo or "")
        no_field = 'echo "Field compute_cap is not a valid field to query."; exit 2'
        answers = {
            "fail": f'echo "{fail}"; exit 9' if fail else "",
            "full": no_field if no_compute_cap else f"cat {root}/gpus.csv",
            "p2p": f"cat {root}/p2p.txt" if p2p is not None else 'echo "topo failed"; exit 3',
            "topo": f"cat {root}/topo.txt" if topo is not None else "exit 3",
        }
        script = "\n".join([
            "#!/bin/sh",
            f'echo "$*" >> {self.log}',
            answers["fail"],
            'case "$*" in',
            f'  *compute_cap*) {answers["full"]} ;;',
            f"  *--query-gpu=index,uuid*) cat {root}/uuids.csv ;;",
            f"  *--query-gpu=index,name*) sed 's/, [0-9.]*$//' {root}/gpus.csv ;;",
            f'  "topo -p2p r") {answers["p2p"]} ;;',
            f'  "topo -m") {answers["topo"]} ;;',
            '  *) echo "unexpected: $*" >&2; exit 9 ;;',
            "esac", ""])
        exe = self.bin / "nvidia-smi"
        exe.write_text(script)
        exe.chmod(0o755)

    @property
    def path(self):
        return f"{self.bin}:{_path_without_nvidia_smi()}"

    def calls(self):
        return self.log.read_text().splitlines() if self.log.exists() else []


_SETTINGS: dict = {}  # (model, card, cuda) -> host-settings.json text: a portable resolve takes seconds


@pytest.fixture
def helpers(tmp_path, cat):
    """The launcher beside the host-settings.json render writes for a portable image's Plan."""
    def make(model="sparsedrive", card=None, cuda="11.8"):
        key = (model, card, cuda)
        if key not in _SETTINGS:
            _SETTINGS[key] = render.make_context(resolve(cat, model, card, cuda=cuda), "envbuild render").host_settings
        folder = tmp_path / f"opt-envbuild-{card or 'portable'}"
        folder.mkdir(exist_ok=True)
        shutil.copy(LAUNCH, folder / "launch.py")
        (folder / "host-settings.json").write_text(_SETTINGS[key])
        return folder
    return make


def launch(folder, command, path, **env):
    base = {"PATH": path, "LANG": "C"}  # LANG=C: the line must print in plain ASCII
    return subprocess.run([PY, "-S", str(folder / "launch.py"), *command], capture_output=True, text=True,
                          env={**base, **env}, timeout=60)


def test_nvlink_h100s_keep_p2p_and_say_why(helpers, tmp_path):
    host = FakeHost(tmp_path, [("NVIDIA H100 80GB HBM3", "9.0")] * 8, p2p=p2p_matrix(8), topo=H100_TOPO)
    r = launch(helpers(), SHOW, host.path)
    assert r.returncode == 7 and r.stdout == "a|b c|P2P=unset LEVEL=unset\n"
    assert r.stderr == "envbuild: P2P kept (8x NVIDIA H100 80GB HBM3, NVLink)\n"


def test_two_4090s_without_p2p_turn_it_off_with_the_pair_and_the_card(helpers, tmp_path):
    host = FakeHost(tmp_path, [("NVIDIA GeForce RTX 4090", "8.9")] * 2, p2p=p2p_matrix(2, lambda i, j: "NS"),
                    topo=PCIE_TOPO)
    r = launch(helpers(), SHOW, host.path)
    assert r.returncode == 7 and r.stdout.endswith("P2P=1 LEVEL=unset\n")
    line, = r.stderr.splitlines()
    assert line.startswith("envbuild: NCCL_P2P_DISABLE=1 (2x NVIDIA GeForce RTX 4090: ")
    assert "GPU0-GPU1: P2P not supported (NS)" in line and "NVIDIA GeForce RTX 4090: no P2P (envbuild's catalog)" in line


def test_the_catalogs_p2p_less_cards_come_from_the_image_not_the_launcher(helpers, tmp_path):
    """A driver that claims P2P between two 4090s (the matrix says OK) does not fool the launcher:
    the image's host-settings.json names the card. Without that fact, the same host keeps P2P."""
    host = FakeHost(tmp_path, [("NVIDIA GeForce RTX 4090", "8.9")] * 2, p2p=p2p_matrix(2), topo=PCIE_TOPO)
    folder = helpers()
    r = launch(folder, SHOW, host.path)
    assert "P2P=1" in r.stdout and "(2x NVIDIA GeForce RTX 4090: NVIDIA GeForce RTX 4090: no P2P" in r.stderr
    settings = json.loads((folder / "host-settings.json").read_text())
    for rule in settings["host"]:
        rule["cards"] = []
    (folder / "host-settings.json").write_text(json.dumps(settings))
    r = launch(folder, SHOW, host.path)
    assert "P2P=unset" in r.stdout and r.stderr == "envbuild: P2P kept (2x NVIDIA GeForce RTX 4090, PCIe)\n"


def test_a_pcie_pair_that_cannot_reach_each_other_turns_p2p_off(helpers, tmp_path):
    """A100s in a VM with ACS on: not a P2P-less card, but the host's matrix says no."""
    cells = {(0, 1): "CNS", (1, 0): "CNS", (0, 2): "OK", (2, 0): "OK", (1, 2): "NS", (2, 1): "NS"}
    host = FakeHost(tmp_path, [("NVIDIA A100-PCIE-40GB", "8.0")] * 3, p2p=p2p_matrix(3, lambda i, j: cells[(i, j)]))
    r = launch(helpers(), SHOW, host.path)
    assert "P2P=1" in r.stdout
    assert r.stderr == ("envbuild: NCCL_P2P_DISABLE=1 (3x NVIDIA A100-PCIE-40GB: GPU0-GPU1: chipset does not "
                        "support P2P (CNS), GPU1-GPU2: P2P not supported (NS))\n")


def _four_gpus_two_reach_each_other(tmp_path, names=("NVIDIA H100 80GB HBM3",) * 4):
    """GPU0-GPU1 read each other's memory; every pair with GPU2 or GPU3 cannot (a VM with ACS)."""
    cell = lambda i, j: "OK" if {i, j} == {0, 1} else "CNS"  # noqa: E731
    return FakeHost(tmp_path, [(n, "9.0") for n in names], p2p=p2p_matrix(4, cell))


@pytest.mark.parametrize("visible, p2p, says", [
    (None, "1", "envbuild: NCCL_P2P_DISABLE=1 (4x NVIDIA H100 80GB HBM3: GPU0-GPU2"),  # nothing narrows
    ("0,1", "unset", "envbuild: CUDA_VISIBLE_DEVICES=0,1: P2P kept (2x NVIDIA H100 80GB HBM3, "),
    ("1,2", "1", "envbuild: CUDA_VISIBLE_DEVICES=1,2: NCCL_P2P_DISABLE=1 (2x NVIDIA H100 80GB HBM3: "
                 "GPU1-GPU2: chipset does not support P2P (CNS))"),
    ("0,1,7,2", "unset", "envbuild: CUDA_VISIBLE_DEVICES=0,1,7,2: P2P kept (2x"),  # CUDA stops at 7
    ("1,1,3", "unset", "envbuild: CUDA_VISIBLE_DEVICES=1,1,3: P2P kept (1x NVIDIA H100 80GB HBM3: one GPU"),
    (f"{uuid(3)[:12]},{uuid(2)}", "1", "envbuild: CUDA_VISIBLE_DEVICES=GPU-33c0ffee,GPU-22c0ffee-0002-1111-"  # a prefix
                                      "2222-333344445555: NCCL_P2P_DISABLE=1 (2x NVIDIA H100 80GB HBM3: GPU2-GPU3: "
                                      "chipset does not support P2P (CNS))\n"),
    ("", "unset", "envbuild: CUDA_VISIBLE_DEVICES=: no GPU CUDA can use: nothing decided"),
    ("-1", "unset", "envbuild: CUDA_VISIBLE_DEVICES=-1: no GPU CUDA can use: nothing decided"),
])
def test_only_the_gpus_cuda_visible_devices_leaves_are_looked_at(helpers, tmp_path, visible, p2p, says):
    """A scheduler that gives a job GPUs 0 and 1 of a node (CUDA_VISIBLE_DEVICES) gets the
    decision for those two: nvidia-smi lists every GPU of the container, and a pair the job does
    not use must not turn its P2P off (nor a pair it uses be missed)."""
    host = _four_gpus_two_reach_each_other(tmp_path)
    r = launch(helpers(), SHOW, host.path, **({} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}))
    assert r.returncode == 7 and f"P2P={p2p} LEVEL=unset" in r.stdout
    assert r.stderr.startswith(says), r.stderr
    assert any("uuid" in c for c in host.calls()) == (visible is not None and "GPU-" in visible)


def test_indices_of_unlike_cards_are_not_mapped_unless_cuda_orders_by_bus(helpers, tmp_path):
    """CUDA numbers GPUs fastest first, nvidia-smi by PCI bus: with two kinds of card, index 0 may
    be nvidia-smi's GPU2. The launcher then looks at all GPUs (and says so), unless
    CUDA_DEVICE_ORDER=PCI_BUS_ID makes the two orders one."""
    host = _four_gpus_two_reach_each_other(tmp_path, ("NVIDIA A100-SXM4-80GB",) * 2 + ("NVIDIA H100 80GB HBM3",) * 2)
    r = launch(helpers(), SHOW, host.path, CUDA_VISIBLE_DEVICES="0,1")
    assert "P2P=1" in r.stdout and r.stderr.startswith(
        "envbuild: CUDA_VISIBLE_DEVICES=0,1 (unlike cards: CUDA's order is not nvidia-smi's; all GPUs looked at): "
        "NCCL_P2P_DISABLE=1 (4 GPUs: ")
    r = launch(helpers(), SHOW, host.path, CUDA_VISIBLE_DEVICES="0,1", CUDA_DEVICE_ORDER="PCI_BUS_ID")
    assert "P2P=unset" in r.stdout and r.stderr.startswith(
        "envbuild: CUDA_VISIBLE_DEVICES=0,1: P2P kept (2x NVIDIA A100-SXM4-80GB")


@pytest.mark.parametrize("user, says", [
    ({"NCCL_P2P_DISABLE": "0"}, "envbuild: NCCL_P2P_DISABLE=0 kept (set before start)\n"),
    ({"NCCL_P2P_LEVEL": "PHB"}, "envbuild: NCCL_P2P_LEVEL=PHB kept (set before start)\n"),
])
def test_a_value_the_user_set_is_kept(helpers, tmp_path, user, says):
    host = FakeHost(tmp_path, [("NVIDIA GeForce RTX 4090", "8.9")] * 2, p2p=p2p_matrix(2, lambda i, j: "NS"))
    r = launch(helpers(), SHOW, host.path, **user)
    assert r.returncode == 7 and r.stderr == says
    assert f"P2P={user.get('NCCL_P2P_DISABLE', 'unset')} LEVEL={user.get('NCCL_P2P_LEVEL', 'unset')}" in r.stdout


def test_no_nvidia_smi_changes_nothing_and_says_nothing(helpers):
    r = launch(helpers(), SHOW, _path_without_nvidia_smi())
    assert (r.returncode, r.stdout, r.stderr) == (7, "a|b c|P2P=unset LEVEL=unset\n", "")


def test_one_gpu_keeps_p2p_without_asking_for_the_topology(helpers, tmp_path):
    host = FakeHost(tmp_path, [("NVIDIA A800-SXM4-80GB", "8.0")])
    r = launch(helpers(), SHOW, host.path)
    assert r.stderr == "envbuild: P2P kept (1x NVIDIA A800-SXM4-80GB: one GPU, no peers)\n" and "P2P=unset" in r.stdout
    assert not [c for c in host.calls() if c.startswith("topo")]


def test_quiet_decides_silently_and_skip_decides_nothing(helpers, tmp_path):
    host = FakeHost(tmp_path, [("NVIDIA GeForce RTX 5090", "12.0")] * 2, p2p=p2p_matrix(2, lambda i, j: "NS"))
    r = launch(helpers(), SHOW, host.path, ENVBUILD_LAUNCHER_QUIET="1")
    assert r.stderr == "" and "P2P=1" in r.stdout
    r = launch(helpers(), SHOW, host.path, ENVBUILD_LAUNCHER_SKIP="1")
    assert r.stderr == "" and "P2P=unset" in r.stdout


def test_a_nested_launcher_only_execs(helpers, tmp_path):
    """torchrun's workers, or `docker run IMAGE launch.py ...`: decided once, by the first."""
    host = FakeHost(tmp_path, [("NVIDIA GeForce RTX 4090", "8.9")] * 2, p2p=p2p_matrix(2, lambda i, j: "NS"))
    folder = helpers()
    r = launch(folder, [PY, "-S", str(folder / "launch.py"), *SHOW], host.path)
    assert r.returncode == 7 and "P2P=1" in r.stdout and len(r.stderr.splitlines()) == 1
    assert len([c for c in host.calls() if "query-gpu" in c]) == 1


def test_a_failing_nvidia_smi_is_one_line_and_the_command_still_runs(helpers, tmp_path):
    host = FakeHost(tmp_path, fail="NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.")
    r = launch(helpers(), SHOW, host.path)
    assert r.returncode == 7 and "P2P=unset" in r.stdout
    line, = r.stderr.splitlines()
    assert "couldn't communicate with the NVIDIA driver" in line and line.endswith("nothing decided")


def test_an_old_driver_without_compute_cap_still_lists_the_gpus(helpers, tmp_path):
    host = FakeHost(tmp_path, [("NVIDIA GeForce RTX 4090", "8.9")] * 2, p2p=p2p_matrix(2), no_compute_cap=True)
    r = launch(helpers(), SHOW, host.path)
    assert "P2P=1" in r.stdout and "NVIDIA GeForce RTX 4090: no P2P" in r.stderr


def test_exit_codes_of_the_launcher_itself(helpers):
    folder = helpers()
    r = launch(folder, ["no-such-command-here"], _path_without_nvidia_smi())
    assert r.returncode == 127 and "no-such-command-here: command not found" in r.stderr
    r = launch(folder, [], _path_without_nvidia_smi())
    assert r.returncode == 2 and "usage" in r.stderr
    r = launch(folder, ["--", "sh", "-c", "exit 3"], _path_without_nvidia_smi())
    assert r.returncode == 3


def test_the_launcher_replaces_itself_so_signals_reach_the_command(helpers):
    """exec, not a child: the command has the launcher's PID, so `docker stop` signals it."""
    r = launch(helpers(), ["sh", "-c", 'echo $$; kill -TERM $$'], _path_without_nvidia_smi())
    assert r.returncode == -15


def test_a_single_card_image_without_p2p_bakes_it_and_the_launcher_says_so(cat, helpers, tmp_path):
    """--card rtx4090: every host of the image has the card, so the ENV stays (it holds where the
    entrypoint is bypassed too); the launcher names it as the image's own setting."""
    plan = resolve(cat, "qcnet", "rtx4090")
    assert plan.runtime_env["NCCL_P2P_DISABLE"]["value"] == "1" and plan.host_env == {}
    text = render.dockerfile(render.make_context(plan, "envbuild render qcnet --card rtx4090"))
    assert "ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv NCCL_P2P_DISABLE=1\n" in text
    folder = helpers("qcnet", "rtx4090", None)
    settings = json.loads((folder / "host-settings.json").read_text())
    assert settings["host"] == [] and settings["image"]["NCCL_P2P_DISABLE"]["value"] == "1"
    host = FakeHost(tmp_path, [("NVIDIA GeForce RTX 4090", "8.9")] * 2, p2p=p2p_matrix(2, lambda i, j: "NS"))
    r = launch(folder, SHOW, host.path, NCCL_P2P_DISABLE="1")
    assert "P2P=1" in r.stdout
    assert r.stderr.startswith("envbuild: NCCL_P2P_DISABLE=1 (set in the image: NVIDIA GeForce RTX 4090 has no")
    r = launch(folder, SHOW, host.path, NCCL_P2P_DISABLE="0")  # docker run -e NCCL_P2P_DISABLE=0
    assert "P2P=0" in r.stdout and r.stderr == "envbuild: NCCL_P2P_DISABLE=0 kept (set before start)\n"


def test_an_image_without_host_settings_decides_from_the_topology_alone(tmp_path):
    shutil.copy(LAUNCH, tmp_path / "launch.py")
    host = FakeHost(tmp_path / "host", [("NVIDIA A100-PCIE-40GB", "8.0")] * 2, p2p=p2p_matrix(2, lambda i, j: "NS"))
    r = launch(tmp_path, SHOW, host.path)
    assert "P2P=1" in r.stdout and "GPU0-GPU1: P2P not supported (NS)" in r.stderr


def test_launcher_parsers_on_real_shaped_output():
    spec = importlib.util.spec_from_file_location("launch_for_test", LAUNCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    links = mod.parse_links(H100_TOPO)
    assert links[(0, 7)] == "NV18" and (0, 8) not in links and len(links) == 8 * 7  # NICs are not GPUs
    gpus = [{"index": i, "name": "H100", "cc": "9.0"} for i in range(8)]
    assert mod.link_kind(links, gpus) == "NVLink" and mod.link_kind(mod.parse_links(PCIE_TOPO), gpus[:2]) == "PCIe"
    assert mod.parse_p2p(p2p_matrix(2, lambda i, j: "NS")) == {(0, 1): "NS", (1, 0): "NS"}
    cards = [{"id": "rtx4090", "name": "NVIDIA GeForce RTX 4090", "match": ["rtx4090", "4090", "rtx-4090"]}]
    assert mod.catalog_card("NVIDIA GeForce RTX 4090 D", cards)["id"] == "rtx4090"
    assert mod.catalog_card("NVIDIA RTX A4000", cards) is None and mod.catalog_card("NVIDIA H20", cards) is None
    assert mod.parse_gpus("0, NVIDIA H20, 9.0\n1, NVIDIA H20, 9.0\n") == [
        {"index": 0, "name": "NVIDIA H20", "cc": "9.0"}, {"index": 1, "name": "NVIDIA H20", "cc": "9.0"}]


def test_the_launcher_parses_as_python_38():
    import ast
    ast.parse(LAUNCH.read_text(), feature_version=(3, 8))


# ------------------------------------------------------------------ the Plan, the image, the CLI

def test_a_portable_image_decides_p2p_on_the_host_not_in_an_env(cat, tmp_path):
    plan = resolve(cat, "sparsedrive", None, cuda="11.8")
    assert "rtx4090" in plan.cards and "h100" in plan.cards
    assert "NCCL_P2P_DISABLE" not in plan.runtime_env
    rule = plan.host_env["NCCL_P2P_DISABLE"]
    assert rule["rule"] == "no-p2p" and {c["id"] for c in rule["cards"]} == {c.id for c in cat.cards.values() if not c.p2p}
    ctx = render.make_context(plan, "envbuild render sparsedrive --cuda 11.8")
    text = render.dockerfile(ctx)
    assert not [l for l in text.splitlines() if l.startswith("ENV") and "NCCL_P2P_DISABLE" in l]
    assert "# NCCL_P2P_DISABLE: not set here: decided on the host at start by the launcher" in text
    tail = text.rstrip("\n").splitlines()[-2:]
    assert tail == [f"ENTRYPOINT {ENTRYPOINT}", 'CMD ["/bin/bash"]']  # `docker run IMAGE bash` still works
    assert "COPY envbuild/ /opt/envbuild/" in text  # where the entrypoint finds launch.py
    labels = dict(ctx.labels)
    assert json.loads(labels["io.envbuild.plan"])["host_env"] == {"NCCL_P2P_DISABLE": "decided on the host at start"}
    out = tmp_path / "ctx"
    render.write(ctx, out)
    assert (out / "envbuild" / "launch.py").read_text() == LAUNCH.read_text()
    written = json.loads((out / "envbuild" / "host-settings.json").read_text())
    assert written["image"] == {} and [s["name"] for s in written["host"]] == ["NCCL_P2P_DISABLE"]
    assert "rtx4090" in {c["id"] for c in written["host"][0]["cards"]}


def test_every_image_has_the_launcher_as_entrypoint(cat):
    for model, card in (("maptr", "h20"), ("qcnet", "a800"), ("qcnet", "rtx4090")):
        text = render.dockerfile(render.make_context(resolve(cat, model, card), "envbuild render"))
        assert f"\nENTRYPOINT {ENTRYPOINT}\nCMD [\"/bin/bash\"]\n" in text, (model, card)


def test_the_line_before_the_build_says_p2p_is_decided_on_the_host(cat, capsys):
    from envbuild import show
    show.plan_cards(resolve(cat, "qcnet", "a800,rtx4090"))
    said = capsys.readouterr().out
    assert "host    NCCL_P2P_DISABLE: decided on the host at start" in said and "rtx4090" in said
    show.plan_cards(resolve(cat, "qcnet", "rtx4090"))
    said = capsys.readouterr().out
    assert "env     NCCL_P2P_DISABLE=1 in the image" in said and "decided on the host" not in said


def test_the_smoke_script_decides_the_host_settings_when_run_without_the_entrypoint(monkeypatch, tmp_path):
    """scripts/gpu-selftest.sh or --entrypoint: smoke.py makes the launcher's decision itself,
    so its levels (and the torchrun and training commands they start) run under it."""
    host = FakeHost(tmp_path, [("NVIDIA GeForce RTX 4090", "8.9")] * 2, p2p=p2p_matrix(2, lambda i, j: "NS"))
    monkeypatch.setenv("PATH", host.path)
    for name in ("NCCL_P2P_DISABLE", "NCCL_P2P_LEVEL", "ENVBUILD_LAUNCHER_SAID", "ENVBUILD_LAUNCHER_SKIP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ENVBUILD_LAUNCHER_QUIET", "1")
    spec = importlib.util.spec_from_file_location("smoke_for_launcher", ROOT / "envbuild" / "incontainer" / "smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    assert smoke.main(["--plan", str(tmp_path / "no-plan.json")]) == 2  # stops after the decision: no Plan
    assert os.environ["NCCL_P2P_DISABLE"] == "1" and "GPU0-GPU1" in os.environ["ENVBUILD_LAUNCHER_SAID"]


def test_apptainer_run_goes_through_the_launcher(monkeypatch):
    from envbuild import export

    class Image:
        attrs = {"Config": {"Env": ["PATH=/opt/venv/bin:/usr/bin"], "Entrypoint": json.loads(ENTRYPOINT)}}
        labels = {"io.envbuild.model": "qcnet"}

    monkeypatch.setattr(export, "local_image", lambda ref, stream=False: Image())
    text = export.apptainer_def("envbuild/x:1", "x.tar.gz")
    assert '    exec /opt/venv/bin/python -S /opt/envbuild/launch.py "$@"\n' in text
    # `apptainer run image.sif` with no command gets a shell (Apptainer ignores the image's CMD):
    # the runscript, run by sh with no arguments, execs the launcher with /bin/bash
    script = text.split("%runscript\n", 1)[1].replace("cd /workspace/model", "true")
    shown = subprocess.run(["sh", "-c", script.replace("exec ", "echo "), "runscript"], capture_output=True, text=True)
    assert shown.stdout.split() == ["/opt/venv/bin/python", "-S", "/opt/envbuild/launch.py", "/bin/bash"]
    given = subprocess.run(["sh", "-c", script.replace("exec ", "echo "), "runscript", "python", "train.py"],
                           capture_output=True, text=True)
    assert given.stdout.split()[-2:] == ["python", "train.py"]
    Image.attrs = {"Config": {"Env": [], "Entrypoint": None}}  # an image envbuild did not make
    assert '    exec "$@"\n' in export.apptainer_def("envbuild/x:1", "x.tar.gz")
