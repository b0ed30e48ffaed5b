"""What every saved result shares: the output-directory check, atomic JSON, readers that name the file, and
provenance (the model's real identity and the library versions that produced the numbers).

Result directories are written and read through ONE writer / reader pair, :func:`write_result_dir` /
:func:`read_result_dir` (in :mod:`taskvec_interp.io`, re-exported here): built under a temporary sibling and
renamed into place, with a marker (``result.json``: kind, package version, config hash) and a manifest
(``manifest.json``: every file's relative path, size and sha256) checked on every load.
"""

from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path

from .io import atomic_write_text, read_result_dir, write_result_dir

__all__ = ["PACKAGES", "check_out_dir", "provenance", "read_json", "read_parquet", "read_result_dir", "write_json",
           "write_result_dir"]

PACKAGES = ("taskvec-interp", "torch", "transformers", "peft")
"""The core distributions provenance records; every registered backend's own (``backend_packages()``) follow."""


def check_out_dir(out: str | Path) -> Path:
    """``out`` as a Path; ``ValueError`` if it exists and is not a directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} is a file, not a directory")
    return out


def write_json(path: Path, obj: object) -> None:
    """Strict JSON (no NaN), written atomically: never a half-written file."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str, allow_nan=False))


def provenance(model: dict) -> dict:
    """The model's identity (``Adapter.identity()``) and the versions of the libraries in use."""
    from .adapters.registry import backend_packages

    versions = {}
    for pkg in dict.fromkeys((*PACKAGES, *backend_packages())):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"model": model, "versions": versions}


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
