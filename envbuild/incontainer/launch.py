"""envbuild's launcher: the entrypoint of every envbuild image, and what the smoke levels run under.

    launch.py COMMAND [ARGS...]

It looks at the GPUs the container got, sets the settings that depend on the host (today: NCCL's
peer-to-peer) only where they are needed, says in one line on stderr what it chose and why, and
then exec's COMMAND: the command replaces it (same PID, its own signals and exit code), so
`docker run IMAGE bash` or `docker run IMAGE torchrun ...` behave as they would without it.

What it decides, and for which cards, is not written here: the image's host-settings.json (from
the Plan, which has it from the catalog) holds each rule and the catalog facts it reads. A value
the user set before start is never replaced. Only the GPUs CUDA_VISIBLE_DEVICES leaves to CUDA
are looked at (nvidia-smi lists all the container got).

    ENVBUILD_LAUNCHER_QUIET=1   decide, but print nothing
    ENVBUILD_LAUNCHER_SKIP=1    decide nothing, print nothing: run COMMAND as it is

No nvidia-smi (no GPU given to the container): nothing is decided and nothing is printed.
Python 3.8+, stdlib only; it runs before anything else in the image, so it must never stop the
command from running: whatever goes wrong here is one line, then COMMAND runs unchanged.
"""

import json
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = os.path.join(HERE, "host-settings.json")
SAID = "ENVBUILD_LAUNCHER_SAID"  # what the launcher decided; set, a nested launcher only exec's
QUIET = "ENVBUILD_LAUNCHER_QUIET"
SKIP = "ENVBUILD_LAUNCHER_SKIP"
TIMEOUT = 20  # seconds one nvidia-smi call may take (a wedged driver must not hold the command)
SHOWN_PAIRS = 3  # GPU pairs named in the line; the rest are counted

# `nvidia-smi topo -p2p r` cells: OK, or why not (CNS chipset, GNS GPU, TNS topology, NS, U unknown)
P2P_WHY = {"CNS": "chipset does not support P2P", "GNS": "GPU does not support P2P",
           "TNS": "topology does not support P2P", "NS": "P2P not supported", "U": "P2P status unknown"}


class NvidiaSmiFailed(Exception):
    pass


def nvidia_smi(args, timeout=TIMEOUT):
    """nvidia-smi's stdout; None where there is no nvidia-smi; NvidiaSmiFailed(why) when it fails."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        r = subprocess.run([exe] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise NvidiaSmiFailed("nvidia-smi %s took over %ds" % (" ".join(args), timeout))
    except OSError as exc:
        raise NvidiaSmiFailed("nvidia-smi: %s" % exc)
    if r.returncode != 0:
        said = (r.stdout.strip() or r.stderr.strip() or "exit %d" % r.returncode).splitlines()[0]
        raise NvidiaSmiFailed("nvidia-smi %s: %s" % (" ".join(args), said[:160]))
    return r.stdout


def _rows(text):
    """`--query-gpu=index,... --format=csv,noheader` -> [(index, [the other fields])]."""
    rows = []
    for line in (text or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0].isdigit():
            rows.append((int(parts[0]), parts[1:]))
    return rows


def parse_gpus(text):
    """`--query-gpu=index,name[,compute_cap] --format=csv,noheader` -> [{"index", "name", "cc"}]."""
    return [{"index": i, "name": f[0], "cc": f[1] if len(f) > 1 else ""} for i, f in _rows(text)]


def read_gpus():
    """The GPUs nvidia-smi shows in this container: None without nvidia-smi."""
    try:
        out = nvidia_smi(["--query-gpu=index,name,compute_cap", "--format=csv,noheader"])
    except NvidiaSmiFailed:  # drivers before 510 know no compute_cap field
        out = nvidia_smi(["--query-gpu=index,name", "--format=csv,noheader"])
    return None if out is None else parse_gpus(out)


def parse_uuids(text):
    """`--query-gpu=index,uuid --format=csv,noheader` -> {index: "GPU-..."}."""
    return {i: f[0] for i, f in _rows(text)}


def cuda_visible(gpus, env, probe=nvidia_smi):
    """(the GPUs CUDA will use, what narrowed them or ""). nvidia-smi lists every GPU the
    container got; CUDA_VISIBLE_DEVICES (a scheduler's share of a node, two jobs on one host) names
    some of them, by CUDA's index or by UUID (a unique prefix does), and CUDA stops at the first
    entry it cannot use. Where the entries cannot be mapped to nvidia-smi's GPUs, all are kept:
    deciding over more GPUs than CUDA uses may turn P2P off needlessly, never leave it on wrongly."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return gpus, ""
    said = "CUDA_VISIBLE_DEVICES=%s" % value
    ordered = sorted(gpus, key=lambda g: g["index"])
    # CUDA numbers GPUs fastest first; nvidia-smi by PCI bus. The same where all cards are alike
    # (ties go by bus) or where CUDA_DEVICE_ORDER=PCI_BUS_ID.
    same_order = env.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID" or len({(g["name"], g["cc"]) for g in gpus}) == 1
    uuids, chosen = None, []
    for token in [t.strip() for t in value.split(",")]:
        if token.isdigit():
            if not same_order:
                return gpus, said + " (unlike cards: CUDA's order is not nvidia-smi's; all GPUs looked at)"
            gpu = ordered[int(token)] if int(token) < len(ordered) else None
        elif token.startswith("GPU-"):
            if uuids is None:
                try:
                    uuids = parse_uuids(probe(["--query-gpu=index,uuid", "--format=csv,noheader"]))
                except NvidiaSmiFailed:
                    return gpus, said + " (nvidia-smi listed no UUIDs: all GPUs looked at)"
            found = [g for g in ordered if uuids.get(g["index"], "").startswith(token)]
            gpu = found[0] if len(found) == 1 else None
        elif token.startswith("MIG-"):
            return gpus, said + " (MIG instances: all GPUs looked at)"
        else:
            gpu = None
        if gpu is None or gpu in chosen:  # CUDA stops at an entry it cannot use
            break
        chosen.append(gpu)
    return (gpus, "") if chosen == ordered else (chosen, said)


def _matrix(text):
    """A `nvidia-smi topo` matrix -> {(i, j): cell} between GPU columns (i != j). The header row
    names the columns (GPU0 GPU1 ... then NICs and affinities); each GPU row's first cells are
    its GPU columns, in that order."""
    columns, cells = [], {}
    for line in (text or "").splitlines():
        parts = line.split()
        if not parts:
            continue
        if not columns and re.match(r"^GPU\d+$", parts[0]) and len(parts) > 1 and re.match(r"^GPU\d+$", parts[1]):
            columns = [int(p[3:]) for p in parts if re.match(r"^GPU\d+$", p)]
            continue
        if columns and re.match(r"^GPU\d+$", parts[0]):
            row = int(parts[0][3:])
            for col, cell in zip(columns, parts[1:1 + len(columns)]):
                if col != row:
                    cells[(row, col)] = cell
    return cells


def parse_p2p(text):
    """`nvidia-smi topo -p2p r` -> {(i, j): "OK" | "NS" | "CNS" | ...}."""
    return _matrix(text)


def parse_links(text):
    """`nvidia-smi topo -m` -> {(i, j): "NV18" | "PIX" | "SYS" | ...}."""
    return _matrix(text)


def link_kind(links, gpus):
    """NVLink, PCIe or both, between the GPUs listed: for the line, nothing is decided on it."""
    idx = [g["index"] for g in gpus]
    kinds = set("NVLink" if links[(a, b)].startswith("NV") else "PCIe"
                for a in idx for b in idx if a != b and (a, b) in links)
    return " + ".join(sorted(kinds))


def normalized(name):
    """A GPU name as the catalog spells card names: 'NVIDIA GeForce RTX 4090' -> 'rtx-4090'."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    for prefix in ("nvidia-", "geforce-"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def catalog_card(gpu_name, cards):
    """The card of the rule's list this GPU is ('NVIDIA GeForce RTX 4090 D' is rtx4090), or None."""
    key = "-%s-" % normalized(gpu_name)
    for card in cards:
        for token in card.get("match") or [card.get("id", "")]:
            if token and "-%s-" % token.lower() in key:
                return card
    return None


def _pairs_text(bad):
    shown = ["GPU%d-GPU%d: %s (%s)" % (a, b, P2P_WHY.get(cell, "no P2P"), cell) for (a, b), cell in bad[:SHOWN_PAIRS]]
    if len(bad) > SHOWN_PAIRS:
        shown.append("%d more pair(s)" % (len(bad) - SHOWN_PAIRS))
    return ", ".join(shown)


def _gpus_text(gpus):
    names = list(dict.fromkeys(g["name"] for g in gpus))
    return "%dx %s" % (len(gpus), names[0]) if len(names) == 1 else "%d GPUs: %s" % (len(gpus), ", ".join(names))


def decide_no_p2p(setting, gpus, probe):
    """(value or None, why) for NCCL_P2P_DISABLE: off where a card of the catalog's list is here,
    or where some pair of GPUs cannot read each other's memory; else P2P stays on."""
    name = setting["name"]
    lacking = []
    for g in gpus:
        card = catalog_card(g["name"], setting.get("cards") or [])
        label = card and (card.get("name") or g["name"])
        if label and label not in lacking:
            lacking.append(label)
    pairs = None
    if len(gpus) >= 2:
        try:
            pairs = parse_p2p(probe(["topo", "-p2p", "r"]))
        except NvidiaSmiFailed:
            pairs = None
    if pairs:  # only the pairs among the GPUs CUDA uses
        here = {g["index"] for g in gpus}
        pairs = {(a, b): cell for (a, b), cell in pairs.items() if a in here and b in here}
    bad = sorted((pair, cell) for pair, cell in (pairs or {}).items() if cell != "OK" and pair[0] < pair[1])
    why = []
    if bad:
        why.append(_pairs_text(bad))
    if lacking:
        why.append("%s: no P2P (envbuild's catalog)" % ", ".join(lacking))
    if why:
        return setting.get("value", "1"), "%s: %s" % (_gpus_text(gpus), "; ".join(why))
    if len(gpus) < 2:
        return None, "P2P kept (%s: one GPU, no peers)" % _gpus_text(gpus)
    if not pairs:
        return None, ("P2P kept (%s: nvidia-smi topo -p2p could not tell; if NCCL hangs, set %s=1)"
                      % (_gpus_text(gpus), name))
    try:
        kind = link_kind(parse_links(probe(["topo", "-m"])), gpus)
    except NvidiaSmiFailed:
        kind = ""
    return None, "P2P kept (%s, %s)" % (_gpus_text(gpus), kind or "P2P reads OK between every pair")


RULES = {"no-p2p": decide_no_p2p}


def load_settings(path=SETTINGS):
    """The image's host-settings.json; an image without one (or a broken one) decides with no
    catalog facts: the topology alone."""
    default = {"host": [{"name": "NCCL_P2P_DISABLE", "value": "1", "rule": "no-p2p",
                         "respects": ["NCCL_P2P_DISABLE", "NCCL_P2P_LEVEL"], "cards": []}], "image": {}}
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return default
    if not isinstance(data, dict) or not isinstance(data.get("host"), list):
        return default
    data.setdefault("image", {})
    return data


def decide(env, settings, gpus, probe=nvidia_smi):
    """({name: value} to set, [what was chosen and why]) for this host's GPUs."""
    changes, said = {}, []
    for setting in settings.get("host") or []:
        name = setting.get("name")
        rule = RULES.get(setting.get("rule"))
        if not name or rule is None:
            continue
        user = [k for k in setting.get("respects") or [name] if k in env]
        if user:
            baked = (settings.get("image") or {}).get(name) or {}
            if user == [name] and baked and env[name] == baked.get("value"):
                said.append("%s=%s (set in the image: %s)" % (name, env[name], baked.get("why", "")))
            else:
                said.append("%s kept (set before start)" % ", ".join("%s=%s" % (k, env[k]) for k in user))
            continue
        value, why = rule(setting, gpus, probe)
        if value is None:
            said.append(why)
        else:
            changes[name] = value
            said.append("%s=%s (%s)" % (name, value, why))
    for name, item in sorted((settings.get("image") or {}).items()):  # baked: every host of the image needs it
        if name in env and not any(s.get("name") == name for s in settings.get("host") or []):
            if env[name] == item.get("value"):
                said.append("%s=%s (set in the image: %s)" % (name, env[name], item.get("why", "")))
            else:
                said.append("%s=%s kept (set before start)" % (name, env[name]))
    return changes, said


def prepare(env, stream=None, settings_path=SETTINGS):
    """Decide for this host and apply it to env (a dict or os.environ); returns the line said,
    or None when nothing was looked at (skipped, or decided already by a launcher before)."""
    if env.get(SKIP, "") not in ("", "0") or SAID in env:
        return None
    stream = sys.stderr if stream is None else stream
    try:
        gpus = read_gpus()
        if gpus is None:  # no nvidia-smi: no GPU given to this container, nothing to decide
            env[SAID] = "no nvidia-smi: nothing decided"
            return None
        if not gpus:
            line = "no GPU visible to nvidia-smi: nothing decided"
        else:
            gpus, narrowed = cuda_visible(gpus, env)
            if not gpus:
                line = "%s: no GPU CUDA can use: nothing decided" % narrowed
            else:
                changes, said = decide(env, load_settings(settings_path), gpus)
                env.update(changes)
                line = "; ".join(said) or "nothing to decide"
                line = "%s: %s" % (narrowed, line) if narrowed else line
    except NvidiaSmiFailed as exc:
        line = "%s: nothing decided" % exc
    except Exception as exc:  # noqa: BLE001 - a bug here must not keep the command from running
        line = "launcher failed (%s: %s): nothing decided" % (type(exc).__name__, exc)
    line = " ".join(line.split())
    env[SAID] = line
    if env.get(QUIET, "") in ("", "0"):
        try:
            stream.write("envbuild: %s\n" % line)
            stream.flush()
        except (OSError, ValueError, UnicodeError):
            pass
    return line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.stderr.write("usage: launch.py COMMAND [ARGS...] (envbuild's launcher: decides host settings, "
                         "then runs COMMAND)\n")
        return 2
    env = dict(os.environ)
    prepare(env)
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        sys.stderr.write("envbuild: %s: command not found\n" % argv[0])
        return 127
    except OSError as exc:
        sys.stderr.write("envbuild: cannot run %s: %s\n" % (argv[0], exc.strerror or exc))
        return 126


if __name__ == "__main__":
    sys.exit(main())
