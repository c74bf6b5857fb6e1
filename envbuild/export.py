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
from . import engine, inputs, paths
from .errors import BadInput, OperationFailed

CHUNK = 4 << 20


def _safe_name(ref: str) -> str:
    """A file name for an image reference; a short hash of the reference keeps two references that
    read alike once sanitized (a/b:c, a_b:c) from sharing one file."""
    digest = hashlib.sha256(ref.encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", ref).strip("_")[:140] + f"-{digest}"


MARK_DEF = "written by envbuild export"


def _mine(path: Path, ref: str) -> bool:
    """Whether an existing export file is envbuild's export of this same image (so it may be replaced)."""
    base = path.name
    suffix = next((s for s in (".tar.gz.json", ".tar.gz.sha256", ".tar.gz", ".def", ".sif") if base.endswith(s)), None)
    if suffix is None:
        return False
    manifest = path.with_name(base[: -len(suffix)] + ".tar.gz.json")
    try:
        data = json.loads(inputs.read_text(manifest, "manifest", ""))
    except (BadInput, ValueError):
        return False
    if not (isinstance(data, dict) and data.get("image") == ref and isinstance(data.get("sha256"), str)):
        return False
    if suffix == ".tar.gz.sha256":
        try:
            return path.read_text() == f"{data['sha256']}  {data.get('file')}\n"
        except (OSError, ValueError):
            return False
    if suffix == ".def":
        try:
            return MARK_DEF in inputs.read_text(path, "definition", "").splitlines()[0]
        except (BadInput, IndexError):
            return False
    return True


def check_outputs(paths, ref: str, force: bool) -> None:
    """Refuse, before anything is written, to replace a file envbuild did not export for this image."""
    for path in paths:
        if path.is_symlink() or path.exists():
            if path.is_dir():
                raise BadInput(f"{path} is a folder", "choose another folder with -o")
            if not force and not _mine(path, ref):
                raise BadInput(f"{path} exists and is not envbuild's export of {ref}",
                               "move it away, choose another folder with -o, or pass --force to replace it")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def local_image(ref: str, stream: bool = False):
    from docker.errors import APIError, DockerException, ImageNotFound
    try:
        return engine.client(stream=stream).images.get(ref)
    except ImageNotFound:
        raise BadInput(f"no local image {ref!r}", "see `envbuild images`") from None
    except (APIError, DockerException) as exc:  # e.g. a reference the daemon cannot parse
        raise BadInput(f"not a usable image reference {ref!r}: {getattr(exc, 'explanation', None) or exc}",
                       "see `envbuild images` for the local ones") from None


def export_tar(ref: str, out_dir: Path, level: int = 3, force: bool = False, also=()) -> dict:
    """also: the names of other files this export writes beside the archive (checked first too)."""
    name = _safe_name(ref)
    final = out_dir / f"{name}.tar.gz"
    check_outputs([final, out_dir / f"{final.name}.json", out_dir / f"{final.name}.sha256",
                   *(out_dir / n for n in also)], ref, force)
    image = local_image(ref, stream=True)  # save streams: its reads may wait the stream timeout
    out_dir.mkdir(parents=True, exist_ok=True)
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
    _write(out_dir / f"{final.name}.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _write(out_dir / f"{final.name}.sha256", f"{manifest['sha256']}  {final.name}\n")
    return {"archive": str(final), "manifest": str(out_dir / f"{final.name}.json"), **manifest}


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


def _plain(what: str, value: str, ref: str) -> str:
    """A value from the image that goes into the definition: one line, or refused (a newline would
    start a section such as %post, which runs as root at build time)."""
    if _CONTROL.search(value):
        raise BadInput(f"{ref}: {what} holds a newline or control character ({value[:80]!r}): it cannot go "
                       "into an Apptainer definition safely", "export --format tar, or rebuild the image without it")
    return value


def apptainer_def(ref: str, archive_name: str) -> str:
    """An Apptainer definition that bootstraps from the docker-save archive (no registry needed).
    Every value taken from the image is one line, and shell values are single-quoted."""
    import shlex

    image = local_image(ref)
    env = image.attrs.get("Config", {}).get("Env") or []
    labels = image.labels or {}
    _plain("the image reference", ref, ref)
    lines = [f"# Apptainer/Singularity definition for {ref}, {MARK_DEF}.",
             f"# Build on the HPC login node: apptainer build image.sif this.def (after gunzip of {archive_name})",
             "Bootstrap: docker-archive", f"From: {archive_name.removesuffix('.gz')}", "", "%environment"]
    for item in env:
        key, _, value = item.partition("=")
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            lines.append(f"    export {key}={shlex.quote(_plain(f'env {key}', value, ref))}")
    lines += ["", "%labels"]
    for key in sorted(labels):
        if key.startswith((label.MODEL, label.CARD, label.MODE, label.ARCH_LIST,
                           "org.opencontainers.image.revision")):
            if not _LABEL_KEY.match(key):
                raise BadInput(f"{ref}: label key {key[:80]!r} is not a plain name", "export --format tar instead")
            value = _plain(f"label {key}", str(labels[key]), ref)
            lines.append(f"    {key} {value}")
    # `apptainer run` goes through envbuild's launcher as `docker run` does (host settings such as
    # NCCL P2P decided on the node); `apptainer exec` bypasses it, as --entrypoint does in Docker.
    entry = image.attrs.get("Config", {}).get("Entrypoint") or []
    launcher = ""
    if isinstance(entry, list) and paths.LAUNCHER in entry:
        launcher = shlex.join(_plain("the entrypoint", str(e), ref) for e in entry) + " "
    # no arguments: a shell, as the image's CMD gives `docker run` (Apptainer ignores CMD)
    lines += ["", "%runscript", f"    cd {paths.MODEL}", '    [ "$#" -gt 0 ] || set -- /bin/bash',
              f'    exec {launcher}"$@"', ""]
    return "\n".join(lines)


def export_apptainer(ref: str, out_dir: Path, force: bool = False) -> dict:
    name = _safe_name(ref)
    text = apptainer_def(ref, f"{name}.tar.gz")  # an image value it cannot quote is refused before any file
    tar = export_tar(ref, out_dir, force=force, also=[f"{name}.def", f"{name}.sif"])
    definition = out_dir / f"{name}.def"
    _write(definition, text)
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
        manifest = json.loads(inputs.read_bytes(manifest_path, "manifest", "export writes both files; copy them together again"))
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
    client = engine.client(stream=True)

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
