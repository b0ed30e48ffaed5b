"""One way to write and read a result directory: built whole under a temporary name, checked whole on read.

:func:`write_result_dir` yields a temporary sibling of ``out`` to fill; when the block ends without error it
writes the marker ``result.json`` (the result's kind, this package's version, the config's hash) and
``manifest.json`` (every file's relative path, size and sha256; written last), then renames the directory
into place. An older result of the SAME kind in ``out`` is moved aside first and deleted after; anything
else in ``out`` (a result of another kind, a non-empty directory without a marker: someone else's) is
refused with a ``ValueError`` before anything is written. On any error the temporary directory is removed.

:func:`read_result_dir` is its reader: it checks the marker's kind and every manifest entry (present, same
size, same sha256, a path inside the directory: no ``..``, no absolute path, no symbolic link) and refuses
anything else with a ``ValueError`` naming the file. Files that are not in the manifest (figures written
next to a result, resume state) are never read by the readers.

Resume state that outlives one write (a trajectory's ``per_step/``, a fine-tuning run's ``checkpoints/``,
the demo's parts) is named by ``keep``: carried over from the old directory into the new one, not listed in
the manifest. Checkpoint directories (:mod:`taskvec_interp.checkpoints`) use the same manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

MARKER = "result.json"
MANIFEST = "manifest.json"
FORMAT = 1
"""Version of the marker / manifest layout."""


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_hash(config: Any) -> str:
    """sha256 of a JSON-able config in canonical form (sorted keys): equal configs, equal hashes."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Manifests
# ------------------------------------------------------------------------------------------------
def _files_under(directory: Path, exclude: Sequence[str] = ()) -> list[str]:
    """Relative POSIX paths of every file under ``directory`` (the manifest and ``exclude``d top-level
    entries left out); a symbolic link is refused: a result holds its own files."""
    out = []
    for root, dirs, files in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        for name in [*dirs, *files]:
            p = Path(root) / name
            if p.is_symlink():
                raise ValueError(f"{p} is a symbolic link: a result directory holds its own files")
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d not in exclude]
            files = [f for f in files if f not in exclude and f != MANIFEST]
        out += [(rel_root / f).as_posix() for f in files]
    return sorted(out)


def write_manifest(directory: Path, exclude: Sequence[str] = ()) -> dict:
    """``manifest.json``: every other file's size and sha256 by relative path (written last: its presence marks a
    whole set). Top-level entries named in ``exclude`` are left out. Returns the manifest."""
    directory = Path(directory)
    files = {}
    for rel in _files_under(directory, exclude):
        p = directory / rel
        files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _inside(directory: Path, rel: str) -> Path | None:
    """``directory / rel`` if ``rel`` is a plain relative path that stays inside ``directory`` without
    following a symbolic link; ``None`` otherwise."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return None
    pure = PurePosixPath(rel)
    if pure.is_absolute() or any(part in ("..", ".", "") for part in rel.split("/")):
        return None
    base = directory.resolve()
    target = directory.joinpath(*pure.parts)
    if target.resolve() != base.joinpath(*pure.parts):  # a symbolic link somewhere on the way
        return None
    return target


def manifest_problem(directory: Path) -> str | None:
    """Why the files of ``directory`` do not match its manifest (``None``: every listed file is there, inside
    the directory, with its size and sha256). The first problem found, naming the file."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if manifest.is_symlink() or not manifest.is_file():
        have = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        return f"no {MANIFEST} (an incomplete write; holds {have or 'nothing'})"
    try:
        files = json.loads(manifest.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST} ({type(err).__name__})"
    for name, want in files.items():
        f = _inside(directory, name)
        if f is None:
            return f"{MANIFEST} lists {name!r}, a path outside the directory (refused, not followed)"
        if not isinstance(want, dict) or not isinstance(want.get("bytes"), int) or not isinstance(
                want.get("sha256"), str):
            return f"{MANIFEST} has a malformed entry for {name}"
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)"
        if sha256_file(f) != want["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def manifest_files(directory: Path) -> list[str]:
    """The relative paths a (verified) result directory's manifest lists."""
    return sorted(json.loads((Path(directory) / MANIFEST).read_text())["files"])


# ------------------------------------------------------------------------------------------------
# Result directories
# ------------------------------------------------------------------------------------------------
def read_marker(directory: Path) -> dict | None:
    """The marker of ``directory`` (``None`` if it has none); ``ValueError`` naming it when unreadable."""
    path = Path(directory) / MARKER
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"{path} is not a plain file")
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({type(err).__name__}: {err})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("kind"), str):
        raise ValueError(f"{path} is not a result marker (no 'kind')")
    return marker


def check_result_owner(out: str | os.PathLike, kind: str, keep: Sequence[str] = ()) -> Path:
    """``out`` as a Path if a ``kind`` result may be written there: it does not exist, is empty, holds a
    marker of the same kind, or holds only entries named in ``keep``. ``ValueError`` naming the path and
    what is there otherwise (a file, a result of another kind, a non-empty directory without a marker)."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise ValueError(f"output path {out} is a dangling symbolic link")
    if not out.exists():
        return out
    if not out.is_dir():
        raise ValueError(f"output path {out} is a file, not a directory")
    marker = read_marker(out)
    if marker is not None:
        if marker["kind"] != kind:
            raise ValueError(f"{out} holds a {marker['kind']!r} result, not a {kind!r} one: refusing to replace "
                             "it; choose another output directory")
        return out
    foreign = sorted(p.name for p in out.iterdir() if p.name not in keep)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"{out} is not empty and holds no {kind!r} result (no {MARKER}): it holds {shown}; "
                         "refusing to replace a directory this package did not write; choose another output "
                         "directory or remove it")
    return out


def claim_result_dir(out: str | os.PathLike, kind: str, config: Any = None, keep: Sequence[str] = ()) -> Path:
    """Make ``out`` a ``kind`` result directory in progress: checked with :func:`check_result_owner`, created,
    and given a marker (``"complete": false``, no manifest, so every reader refuses it) if it has none. For
    a command that fills its output directory over a long run (a fine-tuning run) before it writes the
    result whole."""
    out = check_result_owner(out, kind, keep)
    out.mkdir(parents=True, exist_ok=True)
    if read_marker(out) is None:
        atomic_write_text(out / MARKER, json.dumps(_marker(kind, config, complete=False), indent=1))
    return out


def _marker(kind: str, config: Any, complete: bool = True) -> dict:
    from . import __version__

    marker = {"kind": kind, "format": FORMAT, "version": __version__,
              "config_hash": None if config is None else config_hash(config)}
    if not complete:
        marker["complete"] = False
    return marker


def _move(src: Path, dst: Path, names: Sequence[str]) -> list[str]:
    moved = []
    for name in names:
        if (src / name).exists() or (src / name).is_symlink():
            os.replace(src / name, dst / name)
            moved.append(name)
    return moved


@contextlib.contextmanager
def write_result_dir(out: str | os.PathLike, kind: str, config: Any = None,
                     keep: Sequence[str] = ()) -> Iterator[Path]:
    """Write a ``kind`` result directory whole (see the module doc): yields a temporary sibling of ``out`` to
    fill; then the marker (``config``: the JSON-able config whose hash it records) and the manifest are
    written and the directory renamed into place. ``keep``: top-level entries of an older ``out`` carried
    over into the new one (resume state), not in the manifest; the result must not write them itself.

    Refused before anything is written (``ValueError``): ``out`` is a file, holds a result of another kind,
    or is a non-empty directory without a marker (entries named in ``keep`` aside). A failed or killed write
    leaves the old result or the new one, never a mix; on any error the temporary directory is removed.
    """
    out = check_result_owner(out, kind, keep)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "writing")
    moved: list[str] = []
    old = None
    try:
        yield tmp
        clash = sorted(n for n in (*keep, MARKER, MANIFEST) if (tmp / n).exists() or (tmp / n).is_symlink())
        if clash:
            raise ValueError(f"a {kind} result must not write {clash} itself (the writer's own or carried-over "
                             "entries)")
        (tmp / MARKER).write_text(json.dumps(_marker(kind, config), indent=1))
        write_manifest(tmp)
        check_result_owner(out, kind, keep)  # again: nothing else may have moved in meanwhile
        if out.exists():
            moved = _move(out, tmp, keep)
            old = _sibling(out, "old")
            os.replace(out, old / "result")
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            if old is not None and not out.exists() and (old / "result").exists():
                os.replace(old / "result", out)  # the old result goes back in place
            if moved and out.is_dir() and tmp.is_dir():
                _move(tmp, out, moved)  # and its resume state with it
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sibling(out: Path, what: str) -> Path:
    """A new hidden directory beside ``out`` (``.NAME.writing-PID-XXXXXXXX``), made with the default mode (the
    umask applies, unlike ``tempfile.mkdtemp``'s 0700: the result is renamed from it)."""
    while True:
        path = out.parent / f".{out.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def result_problem(directory: str | os.PathLike, kind: str) -> str | None:
    """Why ``directory`` is not a complete, intact ``kind`` result (``None``: it is)."""
    d = Path(directory)
    if not d.is_dir():
        return "it does not exist (or is not a directory)"
    try:
        marker = read_marker(d)
    except ValueError as err:
        return str(err)
    if marker is None:
        return (f"no {MARKER}: not a {kind} result written by taskvec_interp (written by another program, by an "
                "older version, or a write that did not finish)")
    if marker["kind"] != kind:
        return f"it holds a {marker['kind']!r} result, not a {kind!r} one"
    if marker.get("complete") is False:
        return f"the {kind} result is not finished (the run writing it has not ended, or was killed)"
    problem = manifest_problem(d)
    return None if problem is None else problem


def read_result_dir(directory: str | os.PathLike, kind: str) -> Path:
    """``directory`` as a Path once it is checked to be a complete, intact ``kind`` result: its marker names
    ``kind`` and every file of its manifest is there unchanged. ``ValueError`` naming the directory and the
    file otherwise (missing, truncated, changed, a path outside the directory)."""
    d = Path(directory)
    problem = result_problem(d, kind)
    if problem is not None:
        raise ValueError(f"{kind} directory {str(d)!r} cannot be read: {problem}")
    return d


__all__ = [
    "FORMAT", "MANIFEST", "MARKER", "atomic_write_text", "check_result_owner", "claim_result_dir", "config_hash",
    "manifest_files", "manifest_problem", "read_marker", "read_result_dir", "result_problem", "sha256_file",
    "write_manifest", "write_result_dir",
]
