"""Training checkpoints shared by every trainer (the synthetic regressor, layer-subset fine-tuning).

A run directory holds ``config.json``, ``metrics.jsonl`` and ``checkpoints/step_XXXXXXX/``; each
checkpoint directory is written under a temporary name and renamed whole, so a kill never leaves a
half-written checkpoint behind, and it carries ``manifest.json`` (every file's size and sha256),
written last: resume takes the newest checkpoint whose files match their manifest and falls back to
the one before it otherwise (a truncated or bit-flipped file, an empty ``step_*`` folder), saying
which it skipped and why. Tensors are safetensors (no pickle); optimizer state is split into its
tensors (safetensors) and the rest (JSON). The learning-rate schedule is a pure function of the
step, so it needs no state. ``metrics.jsonl`` tolerates a torn last line (a kill mid-write).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .io import MANIFEST, atomic_write_text, config_diffs, manifest_problem, sha256_file, write_manifest

__all__ = ["MANIFEST", "atomic_write_text", "config_diffs", "sha256_file", "write_manifest"]  # re-exported: they live in io.py
__all__ += ["checkpoint_problem", "clean_partial", "latest_good_checkpoint", "list_checkpoints",
            "load_optimizer", "optimizer_from_disk", "optimizer_to_disk", "read_metrics", "save_checkpoint",
            "scheduled_lr"]

CKPT_RE = re.compile(r"^step_(\d{7,})$")


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``[(step, path)]``, by step. A symbolic link among them (or as
    ``checkpoints/`` itself) is refused with a ``ValueError`` naming it: a run holds its own checkpoints, and
    nothing outside the run directory is read."""
    d = Path(run_dir) / "checkpoints"
    if d.is_symlink():
        raise ValueError(f"{d} is a symbolic link (to {os.readlink(d)!r}): a run directory holds its own "
                         "checkpoints; refused, not followed")
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        if (m := CKPT_RE.match(p.name)) is None:
            continue
        if p.is_symlink():
            raise ValueError(f"checkpoint {p} is a symbolic link (to {os.readlink(p)!r}): a run directory holds its "
                             "own checkpoints; refused, not followed")
        if p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The metrics records of a run (one dict per logged step, from ``metrics.jsonl``).

    A torn LAST line (the process was killed while writing it) is dropped with a warning; a bad line
    anywhere else is a ``ValueError`` naming the file and line."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    lines = [(i + 1, line) for i, line in enumerate(p.read_text(errors="replace").splitlines()) if line.strip()]
    out = []
    for pos, (lineno, line) in enumerate(lines):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError("not a record with an int 'step'")
        except ValueError as err:
            if pos == len(lines) - 1:
                warnings.warn(f"{p}: dropped a torn last line {lineno} ({line[:60]!r}): the run was killed "
                              "while writing it", stacklevel=2)
                break
            raise ValueError(f"{p} line {lineno} is not a metrics record ({err}): {line[:80]!r}") from None
        out.append(rec)
    return out


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint directory ``path`` cannot be trusted (``None``: every file matches its manifest,
    :func:`taskvec_interp.io.manifest_problem`)."""
    return manifest_problem(Path(path))


def latest_good_checkpoint(run_dir: str | os.PathLike) -> tuple[tuple[int, Path] | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies (``(step, path)`` or ``None``) and the newer ones skipped, with why.
    Each skipped one is reported with a warning, naming it."""
    skipped: list[tuple[Path, str]] = []
    for step, path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return (step, path), skipped
        warnings.warn(f"skipping checkpoint {path}: {problem}; resuming from an earlier one", stacklevel=2)
        skipped.append((path, problem))
    return None, skipped


def optimizer_to_disk(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's state as (tensors for safetensors, everything else for JSON)."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def optimizer_from_disk(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The ``state_dict`` that :func:`optimizer_to_disk` split up."""
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in meta["state"].items()}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(run_dir: Path, step: int, opt: torch.optim.Optimizer, tensors: Mapping[str, Mapping[str, Tensor]],
                    texts: Mapping[str, str]) -> Path:
    """Write ``checkpoints/step_{step}`` atomically: ``{name}.safetensors`` for each entry of ``tensors``,
    each of ``texts`` as a file, and the optimizer (``optimizer.safetensors`` + ``optimizer.json``)."""
    ckdir = run_dir / "checkpoints"
    final = ckdir / f"step_{step:07d}"
    tmp = ckdir / f".tmp_step_{step:07d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, group in tensors.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, tmp / f"{name}.safetensors")
    opt_tensors, meta = optimizer_to_disk(opt)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    for name, text in texts.items():
        (tmp / name).write_text(text)
    write_manifest(tmp)
    if final.exists():  # e.g. re-running the final step after extending; replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_optimizer(opt: torch.optim.Optimizer, ckpt: Path) -> None:
    """Restore an optimizer saved by :func:`save_checkpoint`."""
    from .results import read_json  # a torn optimizer.json: a one-line error naming it

    opt.load_state_dict(optimizer_from_disk(load_file(ckpt / "optimizer.safetensors"),
                                            read_json(ckpt / "optimizer.json")))


def clean_partial(run_dir: Path) -> None:
    """Remove the temporary directories of checkpoints whose save was killed."""
    for p in (run_dir / "checkpoints").glob(".tmp_step_*"):
        shutil.rmtree(p, ignore_errors=True)


def scheduled_lr(step: int, lr: float, steps: int, warmup_steps: int = 0, schedule: str = "constant",
                 min_lr_ratio: float = 0.0) -> float:
    """Linear warmup over ``warmup_steps``, then constant or cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    if warmup_steps and step < warmup_steps:
        return lr * step / warmup_steps
    if schedule == "cosine":
        frac = (step - warmup_steps) / max(1, steps - warmup_steps)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
    return lr
