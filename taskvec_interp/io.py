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
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

MARKER = "result.json"
MANIFEST = "manifest.json"
FORMAT = 1
"""Version of the marker / manifest layout."""


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temporary sibling of ``path``, then a rename puts it in place: readers never see half
    a file, and a failed write (a full disk) leaves no temporary behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and a rename (:func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


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
# Resume keys: what saved work was computed with, compared field by field before any new work
# ------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists, keys strings): a saved and a given config compare
    by content, not by Python type."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _shown(value: Any) -> str:
    """A value in a difference message: a sha256 hex digest shortened to its first 12 characters."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."
    return repr(value)


def config_diffs(saved: Any, given: Any, ignore: Sequence[str] | frozenset[str] = frozenset(),
                 labels: tuple[str, str] = ("saved", "given"), _prefix: str = "") -> list[str]:
    """One line per field that differs between two JSON-able configs, ``"seed: saved 0, given 1"`` (nested
    dicts by dotted path, ``"model.backbone: saved 'gpt2', given 'mamba2'"``; a sha256 digest shortened).
    ``ignore``: top-level fields left out; ``labels``: the two sides' names. The ONE helper behind every
    refusal to resume or to mix (patching chunks, demo parts, fine-tuning and synthetic runs, trajectories,
    seeds analysed together)."""
    saved, given = _plain(saved), _plain(given)
    if not isinstance(saved, dict) or not isinstance(given, dict):
        return [] if saved == given else [f"{_prefix or 'value'}: {labels[0]} {_shown(saved)}, "
                                          f"{labels[1]} {_shown(given)}"]
    out = []
    missing = object()
    for key in sorted(set(saved) | set(given)):
        if not _prefix and key in ignore:
            continue
        a, b = saved.get(key, missing), given.get(key, missing)
        if a == b:
            continue
        name = f"{_prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diffs(a, b, (), labels, _prefix=f"{name}.")
        else:
            out.append(f"{name}: {labels[0]} {'(none)' if a is missing else _shown(a)}, "
                       f"{labels[1]} {'(none)' if b is missing else _shown(b)}")
    return out


def check_resume(saved: Any, given: Any, where: str | os.PathLike, what: str,
                 ignore: Sequence[str] | frozenset[str] = frozenset()) -> None:
    """Refuse to resume (``ValueError``) when the config ``saved`` with finished work at ``where`` differs from the
    ``given`` one: the message names every differing field with both values. Called before any new work; the
    finished work is left as it is."""
    diffs = config_diffs(saved, given, ignore)
    if diffs:
        raise ValueError(f"{where} holds {what} computed with another config; refusing to resume or mix (nothing "
                         f"there was changed or deleted): {'; '.join(diffs)}. Give the saved settings, or use "
                         "another output directory")


def manifest_fingerprint(directory: str | os.PathLike) -> str:
    """A result directory's own fingerprint: the sha256 of its ``manifest.json`` (which holds every file's
    sha256), so any changed file changes it. ``ValueError`` naming the directory when it has no manifest."""
    path = Path(directory) / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"{directory} has no {MANIFEST}: not a complete result directory")
    return sha256_file(path)


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


def inside(directory: str | os.PathLike, rel: object) -> Path | None:
    """``directory / rel`` if ``rel`` is a plain relative path (a string) that stays inside ``directory``
    without following a symbolic link; ``None`` otherwise (``..``, an absolute path, a backslash, a NUL, a
    symbolic link on the way, a non-string). Every reader that takes a path from a results directory (a
    manifest entry, the demo's ``part.json`` figures, a trajectory's per-step tables) goes through it."""
    directory = Path(directory)
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


def inside_or_raise(directory: str | os.PathLike, rel: object, source: str) -> Path:
    """:func:`inside`, or a ``ValueError`` naming ``source`` (the file the path was read from) and the path,
    never followed."""
    target = inside(directory, rel)
    if target is None:
        raise ValueError(f"{source} names {rel!r}, a path outside {str(directory)!r} (refused, not followed)")
    return target


def listed_file(directory: str | os.PathLike, rel: object, source: str) -> Path:
    """``directory / rel`` for a file named inside a verified result (by ``source``, e.g. its config.json): a
    path inside ``directory`` (:func:`inside_or_raise`) that its manifest lists; a ``ValueError`` naming
    ``source`` and the path otherwise (a file the manifest does not vouch for is never read)."""
    target = inside_or_raise(directory, rel, source)
    if rel not in manifest_files(directory):
        raise ValueError(f"{source} names {rel!r}, which is not a file of {str(directory)!r} listed in its "
                         f"{MANIFEST} (refused, not read)")
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
        f = inside(directory, name)
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


def check_result_owner(out: str | os.PathLike, kind: str, keep: Sequence[str] = (), *, overwrite: bool = False,
                       what: str | None = None) -> Path:
    """``out`` as a Path if a ``kind`` result may be written there: it does not exist, is empty, holds a
    marker of the same kind, or holds only entries named in ``keep``. ``ValueError`` naming the path and
    what is there otherwise (a file, a result of another kind, a non-empty directory without a marker).
    Writes nothing.

    Never accepted: the current directory, one of its parents, the home directory, the directory holding
    this package's source or one of its parents (``--out .``); a result directory that also holds entries
    this package did not write (replacing it would delete them). ``overwrite``: a result of ANOTHER kind is
    accepted too (:func:`remove_result_dir` removes it); a directory without a marker never is. ``what``:
    how the caller names the path in the message (``"--out"``)."""
    out = Path(out)
    label = f"{what} {out}" if what else str(out)
    why = _protected(out)
    if why:
        raise ValueError(f"{label} is {why}: refusing to write a result there (a result replaces its directory "
                         f"whole); give a directory of its own, e.g. runs/{kind}")
    if out.is_symlink() and not out.exists():
        raise ValueError(f"{label if what else f'output path {out}'} is a dangling symbolic link")
    if not out.exists():
        return out
    if not out.is_dir():
        raise ValueError(f"{label if what else f'output path {out}'} is a file, not a directory")
    marker = read_marker(out)
    if marker is not None:
        unowned = _unowned(out, marker, keep if marker["kind"] == kind else ())
        if unowned:
            raise ValueError(f"{label} holds a {marker['kind']!r} result ({MARKER}) and also {_listed(unowned)}, "
                             "which taskvec_interp did not write: refusing to replace it (that would delete "
                             "them); move them out or choose another output directory")
        if marker["kind"] != kind and not overwrite:
            raise ValueError(f"{label} holds a {marker['kind']!r} result, not a {kind!r} one: refusing to replace "
                             f"it ({MARKER} says so); choose another output directory, or overwrite it "
                             "(--overwrite)")
        return out
    foreign = sorted(p.name for p in out.iterdir() if p.name not in keep and not _leftover(p.name))
    if foreign:
        raise ValueError(f"{label} is not empty and holds no {kind!r} result (no {MARKER}): it holds "
                         f"{_listed(foreign)}; refusing to replace a directory this package did not write"
                         f"{' (even with --overwrite: it removes only a directory with a taskvec marker)' if overwrite else ''}"
                         "; choose another output directory or an empty one")
    return out


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{shown} ({len(names)} {'entry' if len(names) == 1 else 'entries'})"


_LEFTOVER = re.compile(r"^\..+\.(lock|tmp|writing-\d+-[0-9a-f]+|old-\d+-[0-9a-f]+)$")


def _leftover(name: str) -> bool:
    """A hidden entry this package leaves behind only when a process is killed (a lock, a temporary file or
    directory): never the user's, never read."""
    return bool(_LEFTOVER.match(name))


def _unowned(out: Path, marker: dict, keep: Sequence[str]) -> list[str]:
    """Top-level entries of the result directory ``out`` that this package did not write: not in its manifest,
    not the marker, the manifest, ``figures/`` (written next to a result), resume state (``keep``, and what the
    marker records), nor a leftover of a killed process. A result still being written (``"complete": false``)
    owns everything in it."""
    if marker.get("complete") is False:
        return []
    owned = {MARKER, MANIFEST, "figures", *keep, *(marker.get("keep") or ())}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        owned |= {str(rel).split("/")[0] for rel in json.loads((out / MANIFEST).read_text())["files"]}
    return sorted(p.name for p in out.iterdir() if p.name not in owned and not _leftover(p.name))


def _protected(out: Path) -> str | None:
    """Why ``out`` may never be a result directory (replaced whole, renamed aside): the current directory or a
    parent of it, the home directory, the directory holding this package's source or a parent of it."""
    try:
        target = out.resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError):
        return None
    if target == cwd:
        return "the current directory"
    if target in cwd.parents:
        return f"a parent of the current directory ({cwd})"
    with contextlib.suppress(RuntimeError, KeyError, OSError):
        if target == Path.home().resolve():
            return "the home directory"
    source = Path(__file__).resolve().parents[1]  # the checkout (or site-packages) holding taskvec_interp
    if target == source or target in source.parents:
        return f"the directory holding the taskvec_interp source ({source}) or a parent of it"
    return None


def claim_result_dir(out: str | os.PathLike, kind: str, config: Any = None, keep: Sequence[str] = ()) -> Path:
    """Make ``out`` a ``kind`` result directory in progress: checked with :func:`check_result_owner`, created,
    and given a marker (``"complete": false``, no manifest, so every reader refuses it) if it has none. For
    a command that fills its output directory over a long run (a fine-tuning run) before it writes the
    result whole."""
    out = check_result_owner(out, kind, keep)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        if read_marker(out) is None:
            atomic_write_text(out / MARKER, json.dumps(_marker(kind, config, complete=False, keep=keep), indent=1))
    except OSError as err:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only the empty directory this call made
        raise output_error(err, out, f"start the {kind} result in") from err
    return out


def _marker(kind: str, config: Any, complete: bool = True, keep: Sequence[str] = ()) -> dict:
    from . import __version__

    marker = {"kind": kind, "format": FORMAT, "version": __version__,
              "config_hash": None if config is None else config_hash(config)}
    if keep:
        marker["keep"] = list(keep)  # resume state it owns besides the manifest's files (see _unowned)
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
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _sibling(out, "writing")
    except OSError as err:
        raise output_error(err, out, f"write the {kind} result to") from err
    moved: list[str] = []
    old = None
    try:
        yield tmp
        clash = sorted(n for n in (*keep, MARKER, MANIFEST) if (tmp / n).exists() or (tmp / n).is_symlink())
        if clash:
            raise ValueError(f"a {kind} result must not write {clash} itself (the writer's own or carried-over "
                             "entries)")
        (tmp / MARKER).write_text(json.dumps(_marker(kind, config, keep=keep), indent=1))
        write_manifest(tmp)
        check_result_owner(out, kind, keep)  # again: nothing else may have moved in meanwhile
        if out.exists():
            moved = _move(out, tmp, keep)
            old = _sibling(out, "old")
            os.replace(out, old / "result")
        os.replace(tmp, out)
    except BaseException as err:
        with contextlib.suppress(OSError):
            if old is not None and not out.exists() and (old / "result").exists():
                os.replace(old / "result", out)  # the old result goes back in place
            if moved and out.is_dir() and tmp.is_dir():
                _move(tmp, out, moved)  # and its resume state with it
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk, a read-only directory: one line naming the result's path
            raise output_error(err, out, f"write the {kind} result to") from err
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


# ------------------------------------------------------------------------------------------------
# Output directories: OS errors named, --overwrite, one writer at a time
# ------------------------------------------------------------------------------------------------
class OutputError(OSError):
    """An OS error (read-only, disk full, a parent that is a file) while writing an output, as ONE line naming
    the output's path and the cause; ``errno`` is the cause's."""


def output_error(err: OSError, out: str | os.PathLike, doing: str) -> OSError:
    """``err`` as an :class:`OutputError` naming ``out`` (``cannot write the sweep result to runs/td: No space
    left on device (runs/.td.writing-1-ab12)``); an :class:`OutputError` already is one and is returned as it is."""
    if isinstance(err, OutputError):
        return err
    cause = err.strerror or str(err) or type(err).__name__
    if err.filename is not None:
        cause += f" ({err.filename})"
    new = OutputError(" ".join(f"cannot {doing} {out}: {cause}".split()))
    new.errno = err.errno
    return new


class OutputLockedError(RuntimeError):
    """Another process is writing the same output directory (its lock file is there)."""


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of ``out``: ``.NAME.lock`` beside it (beside, not inside: a result replaces its directory
    whole)."""
    out = Path(out)
    if not out.name or out.name in (".", ".."):
        raise ValueError(f"output path {str(out)!r} has no name to lock (give a directory of its own)")
    return out.parent / f".{out.name}.lock"


_HELD: dict[str, tuple[int, int]] = {}
"""Lock files this process holds: path -> (pid, depth); a nested ``out_lock`` of the same path is free."""


def _lock_holder(lock: Path) -> dict | None:
    try:
        holder = json.loads(lock.read_text())
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _alive(pid: object) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def _acquire(out: Path, lock: Path) -> None:
    import socket
    import sys
    import time
    import warnings

    host = socket.gethostname()
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            age = time.time() - lock.stat().st_mtime if lock.exists() else 0.0
            if holder is None and age < 10:  # being written by a process that just made it
                raise OutputLockedError(f"{out} is being written by another process (lock file {lock}, just "
                                        "created): wait for it to finish, or choose another output directory") from None
            if holder is not None and (holder.get("host") != host or _alive(holder.get("pid"))):
                raise OutputLockedError(
                    f"{out} is being written by another process (pid {holder.get('pid')} on {holder.get('host')}, "
                    f"since {holder.get('started', '?')}; lock file {lock}): wait for it to finish, or choose another "
                    "output directory (delete the lock file only if that process is gone)") from None
            stale = lock.with_name(f"{lock.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                os.replace(lock, stale)  # atomic: of two processes taking over, one wins
            except FileNotFoundError:
                continue
            stale.unlink()
            warnings.warn(f"took over the stale lock {lock} of {out} (pid {(holder or {}).get('pid')} on {host} is "
                          "gone: a killed run)", stacklevel=4)
            continue
        except OSError as err:
            raise output_error(err, out, "lock") from err
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                    "command": " ".join(sys.argv)[:500]}))
        except BaseException as err:
            with contextlib.suppress(OSError):
                lock.unlink()
            if isinstance(err, OSError):
                raise output_error(err, out, "lock") from err
            raise
        return
    raise OutputLockedError(f"{out}: could not take its lock {lock} (other processes keep taking it)")


@contextlib.contextmanager
def out_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of the output directory ``out`` while the block runs: a lock file beside it
    (:func:`lock_path`), created with ``O_EXCL`` and holding this process's pid and host. A second process
    asking for it is refused at once (:class:`OutputLockedError` naming the holder); a lock whose process is
    gone (same host, pid dead: a killed run) is taken over with a warning. Released when the block ends, on
    an error too. Nested use in one process (a command and the library call it makes) is free. Creates the
    parent directory; an OS error there is an :class:`OutputError` naming ``out``."""
    out = Path(out)
    lock = lock_path(out)
    key = os.path.abspath(lock)
    pid, depth = _HELD.get(key, (None, 0))
    if pid == os.getpid():
        _HELD[key] = (pid, depth + 1)
        try:
            yield out
        finally:
            _HELD[key] = (pid, _HELD[key][1] - 1)
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(err, out, "create the parent directory of") from err
    _acquire(out, lock)
    _HELD[key] = (os.getpid(), 1)
    try:
        yield out
    finally:
        _HELD.pop(key, None)
        if (_lock_holder(lock) or {}).get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                lock.unlink()


def locks_out(param: str = "out") -> Any:
    """Decorator: the function holds :func:`out_lock` of its argument ``param`` (when not ``None``) while it
    runs: a run that writes into a directory as it goes (chunks, checkpoints, per-step tables) is its only
    writer."""
    import functools
    import inspect

    def deco(fn: Any) -> Any:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            target = sig.bind_partial(*args, **kwargs).arguments.get(param)
            if target is None:
                return fn(*args, **kwargs)
            with out_lock(target):
                return fn(*args, **kwargs)

        return wrapper

    return deco


def remove_result_dir(out: str | os.PathLike, what: str | None = None, kind: str | None = None,
                      keep: Sequence[str] = ()) -> bool:
    """``--overwrite``: remove the result directory ``out`` (any kind) before a run writes there. Only a
    directory carrying a marker, holding nothing this package did not write (:func:`check_result_owner`'s
    rule), is removed, renamed aside first (a kill mid-way leaves ``out`` whole or absent); a directory
    without a marker is refused (``ValueError`` naming it), even an empty one is left as it is. ``keep``: the
    resume state a ``kind`` result owns (a marker written before markers recorded it). Returns whether
    something was removed."""
    out = Path(out)
    marker = read_marker(out) if out.is_dir() and not out.is_symlink() else None
    held = marker["kind"] if marker else (kind or "overwritten")
    check_result_owner(out, held, keep if held == kind else (), overwrite=True, what=what)
    if marker is None:
        return False
    try:
        old = _sibling(out, "old")
        os.replace(out, old / "result")
    except OSError as err:
        raise output_error(err, out, "remove (--overwrite)") from err
    shutil.rmtree(old, ignore_errors=True)
    return True


__all__ = [
    "FORMAT", "MANIFEST", "MARKER", "atomic_write_text", "check_result_owner", "claim_result_dir", "config_hash",
    "manifest_files", "manifest_problem", "read_marker", "read_result_dir", "result_problem", "sha256_file",
    "write_manifest", "write_result_dir",
]
__all__ += ["inside", "inside_or_raise", "listed_file"]  # readers stay inside (issue 20, part C)
__all__ += ["check_resume", "config_diffs", "manifest_fingerprint"]  # resume keys (issue 20, part B)
__all__ += ["OutputError", "OutputLockedError", "lock_path", "locks_out", "out_lock", "output_error",
            "remove_result_dir"]  # output directories (issue 20, part A)
