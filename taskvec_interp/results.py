"""What every saved result shares: the output-directory check, atomic JSON, and provenance
(the model's real identity and the library versions that produced the numbers)."""

from __future__ import annotations

import importlib.metadata as md
import json
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
