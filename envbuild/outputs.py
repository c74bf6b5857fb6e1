"""What envbuild writes into folders that may hold a user's files: a manifest of what it wrote
(all it may ever replace), one writer per folder, atomic writes, a model tree copied in whole.
Shared by render, lock, bake, compare and wheels, which all write into -o folders."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import BadInput


MANIFEST = ".envbuild-manifest.json"  # what envbuild wrote in a context folder: all it may replace
FOLDER_LOCK = ".envbuild.lock"
MANIFEST_TEMP = f".{MANIFEST}."  # write_if_changed's temp name for the manifest, before it is moved in


def owned(out: Path, adopt: bool = False) -> set[str]:
    """The names envbuild wrote in `out` (from its manifest). A folder that holds anything else and
    has no manifest is not envbuild's: it refuses it rather than overwrite a user's files. `adopt`:
    the folder is inside envbuild's own state folder, so whatever is there is envbuild's."""
    if not out.exists():
        return set()
    if not out.is_dir():
        raise BadInput(f"{out} exists and is not a folder", "choose a new or empty folder for -o")
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
            return {f for f in files if isinstance(f, str)}
        except (ValueError, OSError, KeyError, TypeError):
            raise BadInput(f"{manifest} is not an envbuild manifest", "move it away, or choose another folder") from None
    # the lock, and a manifest another envbuild is writing this instant (its temp name), are envbuild's
    present = {p.name for p in out.iterdir() if p.name != FOLDER_LOCK and not p.name.startswith(MANIFEST_TEMP)}
    if adopt:
        return present
    if present:
        raise BadInput(f"{out} is not empty and envbuild did not write it",
                       "choose a new or empty folder for -o: envbuild replaces only files it wrote")
    return set()


def write_own_file(path: Path, text: str, made_by_envbuild) -> None:
    """Write one output file (an HTML report, a bake file) atomically. An existing file is
    replaced only when made_by_envbuild(its text) says envbuild wrote it: a user's own file
    with the same name is refused, untouched."""
    path = _real(Path(path))
    check_own_file(path, made_by_envbuild)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}", "choose a folder you can write to") from None


def check_own_file(path: Path, made_by_envbuild) -> None:
    """Refuse, before anything is written, an output file path that is a folder or a file envbuild
    did not write."""
    path = _real(Path(path))
    if path.is_dir():
        raise BadInput(f"{path} is a folder", "give a file name with -o")
    if path.exists():
        try:
            current = path.read_text(errors="replace")
        except OSError as exc:
            raise BadInput(f"cannot read {path}: {exc.strerror or exc}", "choose another file with -o") from None
        if not made_by_envbuild(current):
            raise BadInput(f"{path} exists and envbuild did not write it", "choose another file with -o, or move it away")


def _real(path: Path) -> Path:
    """An output path with its links followed (a link is written through, never replaced); a link
    that loops, in the path or at its end, is refused."""
    try:
        return path.resolve() if path.is_symlink() or path.parent != path.parent.resolve() else path
    except (RuntimeError, OSError):
        raise BadInput(f"{path}: a link in this path loops", "give a path without link loops") from None


def record_owned(out: Path, names) -> None:
    """Add names to the folder's manifest (atomically)."""
    manifest = out / MANIFEST
    have = set()
    if manifest.is_file():
        try:
            have = set(json.loads(manifest.read_text())["files"])
        except (ValueError, OSError, KeyError, TypeError):
            have = set()
    write_if_changed(manifest, json.dumps({"files": sorted(have | set(names))}, indent=1) + "\n")


@contextlib.contextmanager
def folder_lock(out: Path):
    """One writer at a time per context folder (two renders into one folder must not mix files)."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out} exists and is not a folder", "choose a new or empty folder for -o")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fh = open(out / FOLDER_LOCK, "a")
    except OSError as exc:
        raise BadInput(f"cannot write to {out}: {exc.strerror or exc}", "choose a folder you can write to") from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_apart(source_dir: Path, out: Path) -> None:
    """The output folder and the model's source must not contain each other."""
    src, dst = source_dir.resolve(), out.resolve()
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise BadInput(f"-o {out} and --source {source_dir} overlap",
                       "write the context to a folder outside the source tree (and not above it)")


def write_if_changed(path: Path, text: str) -> None:
    # Unchanged bytes keep their mtime, so BuildKit's context transfer stays a no-op.
    if path.exists() and path.read_text() == text:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


SKIPPED = (".git", "__pycache__", "build", ".envbuild")  # never copied (with *.egg-info, *.so)


def check_source(src: Path) -> None:
    """Refuse, before anything is written, a source tree copy_source could not copy whole: a named
    pipe (the copy would wait on it), a socket or device, a link that loops, a file or folder it
    cannot read."""
    import stat as st
    from .inputs import kind

    src = Path(src)
    if not src.is_dir():
        return  # copy_source says so
    hint = "remove it from the source tree (or copy the tree without it) and run again"

    def refuse(path, why):
        raise BadInput(f"--source {src}: {path} {why}", hint)

    def unreadable(exc):
        refuse(exc.filename, f"cannot be read ({exc.strerror or exc})")

    for root, dirs, files in os.walk(src, onerror=unreadable):
        dirs[:] = [d for d in dirs if not (d in SKIPPED or d.endswith(".egg-info"))
                   or os.path.islink(os.path.join(root, d))]
        for name in dirs + files:
            path = os.path.join(root, name)
            try:
                mode = os.lstat(path).st_mode
            except OSError as exc:
                refuse(path, f"cannot be read ({exc.strerror or exc})")
            if st.S_ISLNK(mode):
                try:
                    Path(path).resolve()
                except (RuntimeError, OSError):
                    refuse(path, "is a link that loops")
                continue
            if st.S_ISDIR(mode):
                if not os.access(path, os.R_OK | os.X_OK):
                    refuse(path, "is a folder that cannot be read")
                continue
            if not st.S_ISREG(mode):
                refuse(path, f"is {kind(mode)}")
            if not os.access(path, os.R_OK):
                refuse(path, "cannot be read (permission denied)")


def copy_source(src: Path, dst: Path) -> None:
    """Copy a local model tree into the context, without VCS data, build trees or symlinks out.
    The copy is made beside dst and swapped in, so a failure leaves the old copy whole."""
    src = src.resolve()
    if not src.is_dir():
        raise BadInput(f"--source {src} is not a directory", "point --source at a checkout of the model")
    ignore = shutil.ignore_patterns(".git", "__pycache__", "build", "*.egg-info", "*.so", ".envbuild*")
    check_source(src)
    staging = Path(tempfile.mkdtemp(dir=dst.parent, prefix=".src."))
    try:
        tree = staging / "src"
        try:
            shutil.copytree(src, tree, symlinks=True, ignore=ignore)
        except (shutil.Error, OSError) as exc:  # changed since it was checked
            raise BadInput(f"--source {src} could not be copied: {str(exc)[:300]}",
                           "make every file of the tree readable and regular, then run again") from None
        for path in tree.rglob("*"):
            if path.is_symlink():
                try:
                    target = (path.parent / os.readlink(path)).resolve()
                except (RuntimeError, OSError):  # a loop made after the check: not copied
                    path.unlink()
                    continue
                if not target.is_relative_to(tree.resolve()):
                    path.unlink()  # a link out of the tree would leak host files into the image
        if dst.is_symlink() or (dst.exists() and not dst.is_dir()):  # not the copy envbuild made
            raise BadInput(f"{dst} is not the source copy envbuild made (a link or a file is there now)",
                           "move it away, or render into another folder")
        if dst.exists():
            shutil.rmtree(dst)
        tree.rename(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
