"""Lock stage: requirements.in -> requirements.lock with hashes, made by the Plan's Python.

pip-compile runs inside a container of the image's own base stage (its OS, Python and
platform), never on the host: a lock made by the host's Python 3.11 is wrong for a
Python 3.8 image. torch.lock holds just the torch trio so torch keeps its own layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from . import build as build_stage
from . import creds, engine, outputs, paths
from .config import PYPI
from .era import EraIndex, exact_pins
from .errors import OperationFailed

# pip-tools and pip versions that still support Python 3.8 and agree with each other.
PIP_TOOLS = "pip-tools==7.4.1"
PIP = "pip==24.0"
TORCH_TRIO = ("torch", "torchvision", "torchaudio")
# The wheels torch pins exactly (its CUDA libraries, triton): the same in every lock for one
# torch, so they go into torch's own layer with it. What torch leaves open (sympy, networkx...)
# differs between models' locks and stays in requirements.lock.
TORCH_EXACT_RE = re.compile(r"^(nvidia-[a-z0-9-]+|triton)$")
HEADER = "# envbuild lock of requirements.in sha256:"
# pip-compile runs in the base stage, built as an image under a name of its own per lock and
# removed after it: no untagged image is left per lock, and two locks of one base never remove
# the image from under each other (each holds its own tag).
LOCK_IMAGE = "envbuild/lock-base"


def input_digest(requirements_in: Path) -> str:
    return hashlib.sha256(requirements_in.read_bytes()).hexdigest()


def matches(context: Path, requirements_in_text: str) -> bool:
    """True when the context holds locks made from exactly this requirements.in text."""
    lock = context / "requirements.lock"
    if not (lock.exists() and (context / "torch.lock").exists()):
        return False
    first = lock.read_text().splitlines()[:1]
    return bool(first) and first[0] == HEADER + hashlib.sha256(requirements_in_text.encode()).hexdigest()


def has_package(lock: Path, name: str) -> bool:
    return name in split_blocks(lock.read_text())


def locked_version(lock: Path, name: str) -> str | None:
    block = split_blocks(lock.read_text()).get(name)
    return block.split("==", 1)[1].split()[0].rstrip("\\") if block else None


def find_matching(contexts: Path, requirements_in_text: str) -> Path | None:
    """A context folder under `contexts` holding locks made from exactly this requirements.in."""
    if not contexts.is_dir():
        return None
    return next((d for d in sorted(contexts.iterdir()) if d.is_dir() and matches(d, requirements_in_text)), None)


def copy_lock(src: Path, dst: Path) -> None:
    write_locks(dst, (src / "requirements.lock").read_text(), (src / "torch.lock").read_text())


def split_blocks(lock_text: str) -> dict[str, str]:
    """{package name: its block (requirement line + hash lines)} of a pip-compile output."""
    blocks, name, current = {}, None, []
    for line in lock_text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if m:
            if name:
                blocks[name] = "\n".join(current)
            name, current = m.group(1).lower().replace("_", "-"), [line]
        elif name and line.startswith("    --hash"):
            current.append(line)
        elif name and not line.startswith(" "):
            blocks[name] = "\n".join(current)
            name, current = None, []
    if name:
        blocks[name] = "\n".join(current)
    return blocks


TORCH_LOCK_HEADER = "# torch, torchvision and torchaudio as pinned in requirements.lock beside this file"


def torch_lock_text(blocks: dict[str, str]) -> str:
    """torch.lock: the torch trio and the wheels torch pins exactly, with their hashes."""
    names = [*(n for n in TORCH_TRIO if n in blocks), *sorted(n for n in blocks if TORCH_EXACT_RE.match(n))]
    return TORCH_LOCK_HEADER + "\n" + "\n".join(blocks[n] for n in names) + "\n"


def lock(context: Path, ca_bundle: str | None = None, echo=None, index_auth: str = "", network: str = "") -> Path:
    """Run pip-compile --generate-hashes in the context's base stage; write the locks. index_auth and
    network: as for build.build (the credentials reach pip as a netrc file mounted for this run only)."""
    context = context.resolve()
    req = context / "requirements.in"
    if not req.exists():
        raise OperationFailed(f"{req} is missing: run envbuild render first")
    volumes = {str(context): {"bind": "/ctx", "mode": "rw"}}
    env = {"HOME": "/tmp", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if ca_bundle:
        volumes[str(Path(ca_bundle).resolve())] = {"bind": "/run/secrets/ca_bundle", "mode": "ro"}
    text = req.read_text()
    plan = json.loads((context / "plan.json").read_text()) if (context / "plan.json").exists() else {}
    cutoff, python = plan.get("index_cutoff"), (plan.get("python") or {}).get("version")
    with contextlib.ExitStack() as stack:
        tag = f"{LOCK_IMAGE}:{uuid.uuid4().hex[:12]}"
        stack.callback(engine.remove_tag, tag)  # also when the build or pip-compile fails
        result = build_stage.build(context, [tag], target="base", ca_bundle=ca_bundle, echo=echo,
                                   log_name="lock-base", index_auth=index_auth, network=network)
        netrc = stack.enter_context(creds.secret_file(index_auth))  # outside the context, deleted after
        if netrc:
            volumes[netrc] = {"bind": f"/run/secrets/{creds.SECRET_ID}", "mode": "ro"}
        # pip-compile asks a view of the index on loopback (the container shares the host's
        # network): PyPI as it was at the Plan's cutoff, when it has one. The view also answers
        # pip-tools' hash questions, which an index without PyPI's JSON API answers only by
        # having every platform's file of every pin downloaded (GBs for torch).
        upstream = next((line.split(None, 1)[1].strip() for line in text.splitlines()
                         if line.startswith("--index-url ")), PYPI)
        until = datetime.fromisoformat(cutoff) + timedelta(days=1) if cutoff else None  # the cutoff day counts
        view = stack.enter_context(EraIndex(upstream, until, exact_pins(text), ca_bundle, python=python,
                                            auth=creds.auth_header(upstream, creds.parse_netrc(index_auth))))
        index = f"--index-url {view.url} "
        if echo and cutoff:
            echo(f"lock: PyPI as of {cutoff} (exact pins excepted), served at {view.url}")
        script = (
            f"{paths.HELPERS}/with-ca.sh pip install -q {PIP} {PIP_TOOLS} && "
            "grep -v '^--index-url ' /ctx/requirements.in > /tmp/requirements.in && "
            f"{paths.HELPERS}/with-ca.sh pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras {index}"
            "--no-emit-index-url --no-emit-find-links --no-header --output-file /tmp/requirements.lock "
            "/tmp/requirements.in && cat /tmp/requirements.lock"
        )
        code, output, errors = engine.run_container(result.image_id, ["/bin/bash", "-c", script], timeout=3600,
                                                    environment=env, volumes=volumes, network_mode="host")
    output, errors = creds.redact(output), creds.redact(errors)  # pip's words are kept: never a password
    if code != 0:
        log = build_stage.state_dir() / "logs" / f"lock-{context.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(errors)
        excerpt = "\n".join(build_stage.failure_excerpt(errors.strip().splitlines()))
        raise OperationFailed(f"pip-compile failed inside the image's Python:\n{excerpt}", log=str(log))
    blocks = split_blocks(output)
    missing = [n for n in TORCH_TRIO[:2] if n not in blocks]  # torchaudio: a torch may have none paired
    if missing:
        raise OperationFailed(f"the lock has no {', '.join(missing)}: is requirements.in from envbuild render?")
    header = HEADER + input_digest(req)
    # torch.lock names nothing of the model: every model on this torch shares its layer and
    # everything compiled on top of it (the wheel stages).
    write_locks(context, f"{header}\n# made by pip-compile inside the image's base stage\n{output}",
                torch_lock_text(blocks))
    return context / "requirements.lock"


def write_locks(context: Path, requirements_lock: str, torch_lock: str) -> None:
    """Both locks, recorded as envbuild's own in the context's manifest (torch.lock first:
    requirements.lock is what matches() reads first)."""
    with outputs.folder_lock(context):
        outputs.write_if_changed(context / "torch.lock", torch_lock)
        outputs.write_if_changed(context / "requirements.lock", requirements_lock)
        outputs.record_owned(context, ["torch.lock", "requirements.lock"])
