"""Export for hosts without Docker or without a registry: a compressed `docker save` with a
sha256 manifest, or an Apptainer/Singularity definition (and a .sif where apptainer exists).
`load` verifies the checksum before anything reaches the engine.

Files are written under a temporary name and renamed when complete: an interrupted export
leaves no half-written archive that looks finished.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from . import labels as label
from . import engine, paths
from .errors import BadInput, OperationFailed

CHUNK = 4 << 20


def _safe_name(ref: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", ref).strip("_")[:150]


def local_image(ref: str):
    from docker.errors import APIError, DockerException, ImageNotFound
    try:
        return engine.client().images.get(ref)
    except ImageNotFound:
        raise BadInput(f"no local image {ref!r}", "see `envbuild images`") from None
    except (APIError, DockerException) as exc:  # e.g. a reference the daemon cannot parse
        raise BadInput(f"not a usable image reference {ref!r}: {getattr(exc, 'explanation', None) or exc}",
                       "see `envbuild images` for the local ones") from None


def export_tar(ref: str, out_dir: Path, level: int = 3) -> dict:
    image = local_image(ref)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = _safe_name(ref)
    final = out_dir / f"{name}.tar.gz"
    tmp = out_dir / f".{name}.tar.gz.partial"
    digest = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level, mtime=0) as gz:
                for chunk in image.save(chunk_size=CHUNK, named=True):
                    gz.write(chunk)
        with open(tmp, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                digest.update(block)
                size += len(block)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    manifest = {"file": final.name, "sha256": digest.hexdigest(), "bytes": size, "image": ref, "id": image.id,
                "tags": image.tags, "labels": {k: v for k, v in (image.labels or {}).items() if k.startswith(label.PREFIX)}}
    (out_dir / f"{final.name}.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (out_dir / f"{final.name}.sha256").write_text(f"{manifest['sha256']}  {final.name}\n")
    return {"archive": str(final), "manifest": str(out_dir / f"{final.name}.json"), **manifest}


def apptainer_def(ref: str, archive_name: str) -> str:
    """An Apptainer definition that bootstraps from the docker-save archive (no registry needed)."""
    image = local_image(ref)
    env = image.attrs.get("Config", {}).get("Env") or []
    labels = image.labels or {}
    lines = [f"# Apptainer/Singularity definition for {ref}, written by envbuild export.",
             f"# Build on the HPC login node: apptainer build image.sif this.def (after gunzip of {archive_name})",
             "Bootstrap: docker-archive", f"From: {archive_name.removesuffix('.gz')}", "", "%environment"]
    for item in env:
        key, _, value = item.partition("=")
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            lines.append(f"    export {key}={json.dumps(value)}")
    lines += ["", "%labels"]
    for key in sorted(labels):
        if key.startswith((label.MODEL, label.CARD, label.MODE, label.ARCH_LIST,
                           "org.opencontainers.image.revision")):
            lines.append(f"    {key} {labels[key]}")
    lines += ["", "%runscript", f"    cd {paths.MODEL}", '    exec "$@"', ""]
    return "\n".join(lines)


def export_apptainer(ref: str, out_dir: Path) -> dict:
    tar = export_tar(ref, out_dir)
    definition = out_dir / f"{_safe_name(ref)}.def"
    definition.write_text(apptainer_def(ref, Path(tar["archive"]).name))
    result = {**tar, "definition": str(definition), "sif": None}
    tool = shutil.which("apptainer") or shutil.which("singularity")
    if tool:
        plain = out_dir / Path(tar["archive"]).name.removesuffix(".gz")
        with gzip.open(tar["archive"], "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        sif = out_dir / f"{_safe_name(ref)}.sif"
        r = subprocess.run([tool, "build", "--force", str(sif), f"docker-archive://{plain}"], capture_output=True, text=True)
        plain.unlink(missing_ok=True)
        if r.returncode != 0:
            raise OperationFailed(f"{tool} build failed: {r.stderr.strip()[-500:]}")
        result["sif"] = str(sif)
    else:
        result["sif_note"] = "apptainer/singularity not installed here: copy the archive and .def to the cluster and build there"
    return result


def verify(path: Path) -> dict:
    """Check an archive against its manifest; returns the manifest."""
    manifest_path = path.with_name(path.name + ".json")
    if not path.is_file():
        raise BadInput(f"{path} is not a file", "pass the .tar.gz that envbuild export wrote")
    if not manifest_path.is_file():
        raise BadInput(f"no manifest {manifest_path.name} next to {path.name}", "export writes both; copy them together")
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str):
            raise ValueError("no sha256 in it")
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadInput(f"{manifest_path.name} is not an envbuild export manifest ({exc})",
                       "export writes both files; copy them together again") from None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    if digest.hexdigest() != manifest.get("sha256"):
        raise OperationFailed(f"checksum mismatch for {path.name}: {digest.hexdigest()[:16]}... != "
                              f"{str(manifest.get('sha256'))[:16]}... (corrupt or incomplete copy); nothing loaded")
    return manifest


def load(path: Path) -> dict:
    manifest = verify(path)
    client = engine.client()

    def chunks():
        with gzip.open(path, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                yield block

    from docker.errors import APIError
    try:
        images = client.images.load(chunks())
    except (EOFError, OSError, APIError) as exc:  # gzip.BadGzipFile is an OSError
        raise OperationFailed(f"cannot load {path}: the archive is truncated or not what export writes ({exc})",
                              "export it again and copy the .tar.gz and its .json together") from None
    ids = [i.id for i in images]
    if manifest.get("id") and manifest["id"] not in ids:
        raise OperationFailed(f"loaded {ids} but the manifest names {manifest['id']}")
    return {"loaded": ids, "tags": manifest.get("tags", []), "sha256": manifest["sha256"]}
