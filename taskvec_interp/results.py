"""What every saved result shares: the output-directory check, atomic JSON, and provenance
(the model's real identity and the library versions that produced the numbers)."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

PACKAGES = ("taskvec-interp", "torch", "transformers", "transformer-lens", "nnsight", "peft")


def check_out_dir(out: str | Path) -> Path:
    """``out`` as a Path; ``ValueError`` if it exists and is not a directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} is a file, not a directory")
    return out


def write_json(path: Path, obj: object) -> None:
    """Strict JSON (no NaN), written atomically: never a half-written file."""
    from .checkpoints import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, default=str, allow_nan=False))


def provenance(model: dict) -> dict:
    """The model's identity (``Adapter.identity()``) and the versions of the libraries in use."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"model": model, "versions": versions}


@contextlib.contextmanager
def replacing_dir(out: str | Path) -> Iterator[Path]:
    """Write a result directory whole: yields a temporary sibling to fill; on success it replaces ``out``
    (an older result there is moved aside first and deleted after), on error it is removed. A failed or
    killed write leaves the old result or the new one, never a mix of both."""
    out = check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.writing-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_result_dir(directory: str | Path, files: tuple[str, ...], kind: str) -> Path:
    """``directory`` as a Path holding every one of ``files``; ``ValueError`` naming it and what is missing."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"{kind} directory {str(d)!r} does not exist (or is not a directory)")
    missing = [f for f in files if not (d / f).is_file()]
    if missing:
        raise ValueError(f"{str(d)!r} is not a complete {kind} result: missing {missing} (written by another "
                         "command, or a run that did not finish)")
    return d


def read_json(path: Path) -> object:
    """JSON from ``path``; a ``ValueError`` naming the file when it is not valid JSON or not UTF-8."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({type(err).__name__}: {err})") from None


def read_parquet(path: Path):
    """A table from ``path``; a ``ValueError`` naming the file when it cannot be read."""
    import pandas as pd

    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises its own error types for torn or foreign files
        raise ValueError(f"{path} is not a readable Parquet table ({type(err).__name__}: {str(err)[:200]})") from None
