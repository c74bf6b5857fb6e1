"""Host checks, as small registered objects: ok / warn / fail / skip, each with a reason.

A check never crashes the command: a missing tool is a finding, not a traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable

from . import catalog, engine, host, ship
from .errors import EnvbuildError, OperationFailed


@dataclass
class Result:
    name: str
    status: str  # ok | warn | fail | skip
    reason: str
    data: dict | None = None


CHECKS: list[tuple[str, Callable[[], Result]]] = []


def check(name: str):
    def register(fn):
        CHECKS.append((name, fn))
        return fn
    return register


def _sh(args, timeout=30) -> subprocess.CompletedProcess | None:
    if not shutil.which(args[0]):
        return None
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


@check("docker engine")
def docker_engine() -> Result:
    try:
        info = engine.client().info()
    except OperationFailed as exc:
        return Result("docker engine", "fail", exc.message + (f"; {exc.hint}" if exc.hint else ""))
    said = f"Docker {info.get('ServerVersion')} ({info.get('Driver')}, root {info.get('DockerRootDir')})"
    if engine.inline_caches_one_at_a_time(engine.major(info.get("ServerVersion"))):
        said += ("; its BuildKit (before 0.9) crashes on two inline-cache exports at once, so `bake --build` "
                 "builds a wave's targets one at a time here (Docker 23 or later builds them together)")
    return Result("docker engine", "ok", said, {"root": info.get("DockerRootDir")})


@check("buildkit")
def buildkit() -> Result:
    try:
        cli = engine.find_cli()
    except EnvbuildError as exc:  # ENVBUILD_DOCKER that names no CLI included
        return Result("buildkit", "fail", exc.message + (f"; {exc.hint}" if exc.hint else ""))
    how = "docker buildx build" if cli.mode == "buildx" else "DOCKER_BUILDKIT=1 docker build (built in)"
    return Result("buildkit", "ok", f"{cli.path} {cli.version}: {how}")


@check("nvidia container runtime")
def nvidia_runtime() -> Result:
    if not list(host.gpus()):
        return Result("nvidia container runtime", "skip", "no NVIDIA GPU on this host")
    cdi = [p for d in ("/etc/cdi", "/var/run/cdi") if os.path.isdir(d) for p in os.listdir(d) if "nvidia" in p]
    runtimes = {}
    try:
        runtimes = engine.client().info().get("Runtimes") or {}
    except OperationFailed:
        pass
    if "nvidia" in runtimes or shutil.which("nvidia-container-cli") or shutil.which("nvidia-ctk"):
        return Result("nvidia container runtime", "ok", "nvidia-container-toolkit present" + (f"; CDI specs {cdi}" if cdi else ""))
    if cdi:
        return Result("nvidia container runtime", "ok", f"CDI specs: {', '.join(cdi)}")
    return Result("nvidia container runtime", "fail", "GPUs present but no nvidia-container-toolkit or CDI spec: "
                  "containers cannot see them (install nvidia-container-toolkit)")


@check("gpus")
def gpus() -> Result:
    found = list(host.gpus())
    if not found:
        return Result("gpus", "skip", "nvidia-smi not found or no GPU")
    cat = catalog.load()
    matched = []
    for gpu in found:
        card = host.match_card(cat, gpu["name"])
        gpu["card"] = card.id if card else None
        if card and gpu["cc"] and gpu["cc"] != card.cc:
            gpu["note"] = f"catalog says {card.cc}"
        matched.append(gpu)
    unknown = [g["name"] for g in matched if not g["card"]]
    names = ", ".join(f"{g['index']}: {g['name']} ({g['cc']}) -> {g['card'] or '?'}" for g in matched)
    if unknown:
        return Result("gpus", "warn", f"{names}; not in the catalog: {', '.join(unknown)} (add to matrices/cards.toml)",
                      {"gpus": matched})
    return Result("gpus", "ok", names, {"gpus": matched})


@check("driver vs images")
def driver_vs_images() -> Result:
    driver = host.driver()
    if driver is None:
        return Result("driver vs images", "skip", "no NVIDIA driver on this host")
    try:
        images = ship.local_images()
    except OperationFailed as exc:
        return Result("driver vs images", "skip", exc.message)
    if not images:
        return Result("driver vs images", "skip", f"driver {driver}; no local envbuild images")
    cat = catalog.load()
    worst, lines = "ok", []
    for img in images:
        cuda = img.get("cuda") or ""
        tk = cat.toolkits.get(".".join(cuda.split(".")[:2]))
        if not tk:
            continue
        status, reason = ship.driver_check(driver, tk.min_driver, tk.compat_driver, cuda)
        lines.append(f"{(img['tags'] or [img['id']])[0]}: {status}: {reason}")
        worst = max(worst, status, key=["ok", "skip", "warn", "fail"].index)
    return Result("driver vs images", worst, "; ".join(lines) or "no CUDA version on the images' labels")


@check("shared memory")
def shared_memory() -> Result:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return Result("shared memory", "warn", "/dev/shm is missing: DataLoader workers need it")
    size = st.f_frsize * st.f_blocks
    gb = size / 2 ** 30
    if gb < 1:
        return Result("shared memory", "warn", f"/dev/shm is {gb:.2f} GB: DataLoader workers die; envbuild smoke "
                      "sizes containers' /dev/shm itself, run training with --shm-size or --ipc=host")
    return Result("shared memory", "ok", f"/dev/shm {gb:.1f} GB (containers get --shm-size from envbuild smoke)")


@check("free disk")
def free_disk() -> Result:
    root = "/var/lib/docker"
    try:
        root = engine.client().info().get("DockerRootDir") or root
    except OperationFailed:
        pass
    path = root if os.path.exists(root) else "/"
    st = os.statvfs(path)
    gb = st.f_frsize * st.f_bavail / 2 ** 30
    if gb < 20:
        return Result("free disk", "fail", f"{gb:.0f} GB free at {path}: one CUDA image build needs 20-40 GB")
    if gb < 60:
        return Result("free disk", "warn", f"{gb:.0f} GB free at {path}: enough for one or two image builds")
    return Result("free disk", "ok", f"{gb:.0f} GB free at {path}")


@check("build cache")
def build_cache() -> Result:
    """Whether the engine keeps ccache (a BuildKit cache mount) for a stopped long compile's rerun."""
    from . import build
    try:
        client, cli = engine.client(), engine.find_cli()
        inspect = build.buildx_inspect(cli)
    except EnvbuildError as exc:
        return Result("build cache", "skip", exc.message)
    held = ccache_held(client)
    if inspect.returncode != 0:
        return Result("build cache", "skip", f"{held}; docker buildx is not installed: its GC policy cannot be read")
    if "GC Policy rule#" not in inspect.stdout:  # GC off, or a buildx too old to show it
        return Result("build cache", "ok", f"{held}; the engine reports no GC policy: nothing drops cache mounts by age")
    age = gc_drops_cache_mounts(inspect.stdout)
    if age:
        return Result("build cache", "warn", f"{held}; the engine's GC drops cache mounts unused for {age}: a long "
                      "compile stopped for longer starts again cold (README: give the engine an explicit GC policy)")
    return Result("build cache", "ok", f"{held}; the engine's GC keeps cache mounts by size, not by age")


def gc_drops_cache_mounts(inspect: str) -> str | None:
    """The age past which a rule of `docker buildx inspect`'s GC policy drops cache mounts, or None.
    Docker's default rule#0: "Filters: type==source.local,type==exec.cachemount,..." and "Keep Duration: 48h0m0s";
    a rule with no type filter (buildx prints an empty "Filters:") covers cache mounts too."""
    for rule in re.split(r"^GC Policy rule#\d+:", inspect, flags=re.M)[1:]:
        filters = re.search(r"^[ \t]*Filters:[ \t]*(.*)$", rule, re.M)
        types = re.findall(r"type(==|!=)([\w.]+)", filters.group(1)) if filters else []
        covers = (not any(op == "==" for op, _ in types) or ("==", "exec.cachemount") in types) \
            and ("!=", "exec.cachemount") not in types
        age = re.search(r"^[ \t]*Keep Duration:[ \t]*(\S+)", rule, re.M)
        if age and covers:
            return age.group(1)
    return None


def ccache_held(client) -> str:
    """How much the ccache cache mount holds, as the engine last measured it."""
    try:
        mounts = [b for b in client.df().get("BuildCache") or []
                  if b.get("Type") == "exec.cachemount" and " /root/.ccache " in f"{b.get('Description', '')} "]
    except Exception:  # noqa: BLE001 - a size is a nicety; the policy is the finding
        return "ccache: size unknown"
    if not mounts:
        return "no ccache cache mount yet"
    if any(b.get("InUse") for b in mounts):  # its size is measured when the build lets go of it
        return "ccache in use by a running build"
    size = sum(b.get("Size") or 0 for b in mounts) / 1e9
    return f"ccache {size:.2f} GB (last used {max(b.get('LastUsedAt') or '' for b in mounts)[:10]})"


@check("peer-to-peer")
def peer_to_peer() -> Result:
    found = list(host.gpus())
    if len(found) < 2:
        return Result("peer-to-peer", "skip", f"{len(found)} GPU(s): nothing to talk to")
    r = _sh(["nvidia-smi", "topo", "-p2p", "r"])
    if not r or r.returncode != 0:
        return Result("peer-to-peer", "warn", "nvidia-smi topo -p2p failed: cannot tell; if NCCL hangs set NCCL_P2P_DISABLE=1")
    return p2p_verdict(r.stdout)


def p2p_verdict(matrix: str) -> Result:
    """Judge `nvidia-smi topo -p2p r` output: every off-diagonal cell must be OK."""
    cells = []
    for line in matrix.splitlines():
        parts = line.split()
        # rows look like "GPU0 X OK NS"; the header row is "GPU0 GPU1 ..."
        if len(parts) > 1 and re.match(r"^GPU\d+$", parts[0]) and not parts[1].startswith("GPU"):
            cells += [c for c in parts[1:] if c != "X"]
    if not cells:
        return Result("peer-to-peer", "warn", "could not read the P2P matrix")
    bad = [c for c in cells if c != "OK"]
    if bad:
        return Result("peer-to-peer", "warn", f"P2P not supported between some GPUs ({', '.join(sorted(set(bad)))}): "
                      "NCCL needs NCCL_P2P_DISABLE=1 here (an envbuild image's launcher sets it at start on such a host)", {"env": {"NCCL_P2P_DISABLE": "1"}})
    return Result("peer-to-peer", "ok", "P2P reads work between every pair of GPUs")


def run_all() -> list[Result]:
    out = []
    for name, fn in CHECKS:
        try:
            out.append(fn())
        except Exception as exc:  # a check must never take the command down
            out.append(Result(name, "fail", f"check crashed: {type(exc).__name__}: {exc}"))
    return out
