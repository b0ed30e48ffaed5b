"""The engine room: the two generic loops every experiment and the synthetic analysis run on.

* :func:`run_conditions`, the condition loop (in the spirit of TransformerLens's
  ``generic_activation_patch``): a list of conditions (plain dicts: the index), an ``evaluate``
  callback that runs a chunk of them and returns one table per condition, and a tidy DataFrame out,
  one row per condition and result row, the condition's fields as columns. Chunks can be saved as
  they finish, so a killed run resumes. Patching, the synthetic patching matrix and head effects
  are calls of it.
* :func:`run_checkpoints`, the checkpoint loop: a probe over a list of checkpoints, one model in memory
  at a time, resumable, bad entries recorded.

The loop (:func:`run_checkpoints`) knows nothing of what it measures. Each entry is a
:class:`Checkpoint` (a training step and where the weights are); ``load(entry)`` turns it into a model
object, ``probe(model, entry)`` into named tidy tables (``{"td": DataFrame, ...}``). Every table gets
the entry's ``step`` column and the tables of all entries are concatenated by name, in entry order.

* **One model at a time**: the loop holds the only reference to the loaded model, drops it after the
  probe (also when the probe fails or the run is interrupted) and collects garbage before loading the
  next one, so peak memory is about one model.
* **Resumable**: with ``out``, each finished entry's tables are written to ``out/per_step/step_XXXXXXX/``
  (Parquet, the directory built under a temporary name and renamed whole); a rerun reads them back
  instead of loading the model again. A directory written for another entry or another probe
  configuration is refused before any work.
* **Bad entries**: a local path that does not exist is reported before any work; a load or probe error
  is recorded; either way the other entries still run. The ``failed`` table names each bad entry by its
  index, step and reason. ``on_error="raise"`` re-raises at the first error instead.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from .checkpoints import atomic_write_text, list_checkpoints
from .io import (
    MANIFEST,
    check_resume,
    config_diffs,
    inside,
    locks_out,
    manifest_files,
    manifest_problem,
    write_manifest,
)
from .results import check_out_dir, provenance, read_json, read_parquet

Evaluate = Callable[[list[dict]], Sequence[pd.DataFrame | Mapping]]


# ------------------------------------------------------------------------------------------------
# The condition loop
# ------------------------------------------------------------------------------------------------
def _conditions_key(conditions: list[dict]) -> str:
    return hashlib.sha256(json.dumps(conditions, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_index(index: Path) -> dict:
    try:
        saved = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{index} is not valid JSON ({type(err).__name__}): the chunk index of a killed run is "
                         "torn; remove its directory to start over") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{index} is not a chunk index (not a JSON object)")
    return saved


def check_conditions_dir(checkpoint_dir: str | Path | None, config: Mapping[str, Any] | None) -> None:
    """Refuse, before any work, to resume into ``checkpoint_dir`` when its finished chunks were computed with
    another ``config`` (the whole run config and the model's identity, JSON-able): ``ValueError`` naming every
    differing field with both values (``seed: saved 0, given 1``). Chunks saved without a config (by an older
    version) are refused too. Nothing there is changed or deleted."""
    if checkpoint_dir is None or config is None:
        return
    ckpt = Path(checkpoint_dir)
    index = ckpt / "conditions.json"
    if not index.is_file():
        return
    saved = _read_index(index)
    if "config" not in saved:
        if any(ckpt.glob("chunk_*.parquet")):
            raise ValueError(f"{ckpt} holds finished chunks saved without their config (an older version): they "
                             "cannot be told to belong to this run; remove the directory or use another one")
        return
    check_resume(saved["config"], dict(config), ckpt, "finished chunks")


def clear_chunks(checkpoint_dir: str | Path | None) -> None:
    """Remove the chunks :func:`run_conditions` saved (``cleanup=False``) once the run's result is built."""
    if checkpoint_dir is None:
        return
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        return
    for f in ckpt.glob("chunk_*.parquet"):
        f.unlink()
    (ckpt / "conditions.json").unlink(missing_ok=True)
    if not any(ckpt.iterdir()):
        ckpt.rmdir()


@locks_out("checkpoint_dir")  # one process at a time writes a chunk directory
def run_conditions(
    conditions: Sequence[Mapping] | pd.DataFrame,
    evaluate: Evaluate,
    *,
    chunk_size: int | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "conditions",
    config: Mapping[str, Any] | None = None,
    cleanup: bool = True,
) -> pd.DataFrame:
    """Run ``evaluate`` over ``conditions`` and return one tidy table.

    ``conditions``: dicts with the same keys (or a DataFrame, one row each): the index of the
    experiment. ``evaluate(chunk)`` gets a list of conditions and returns one DataFrame (or one dict,
    a single row) per condition. The result has a ``condition`` column (the position in
    ``conditions``), the condition's fields, then the callback's columns. ``chunk_size``: conditions
    per call (``None``: all in one call, which lets the callback share work between them).
    ``checkpoint_dir``: each finished chunk is saved there (Parquet) and a rerun with the same
    conditions skips it; the files are removed once the whole table is built (``cleanup=False``: left for
    the caller to remove with :func:`clear_chunks` once its result is built). ``config``: what the chunks are
    computed with (the whole run config and the model's identity, JSON-able), saved beside them; a rerun with
    another one is refused before any work, naming the fields that differ (:func:`check_conditions_dir`).
    """
    rows = conditions.to_dict("records") if isinstance(conditions, pd.DataFrame) else [dict(c) for c in conditions]
    if not rows:
        raise ValueError("no conditions to run")
    keys = list(rows[0])
    for i, c in enumerate(rows):
        if list(c) != keys:
            raise ValueError(f"condition {i} has fields {list(c)}, condition 0 has {keys}: give every condition "
                             "the same fields")
    if "condition" in keys:
        raise ValueError("'condition' is reserved for the condition's index")
    size = len(rows) if chunk_size is None else chunk_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        if ckpt.exists() and not ckpt.is_dir():
            raise ValueError(f"checkpoint_dir {ckpt} is a file")
        check_conditions_dir(ckpt, config)
        ckpt.mkdir(parents=True, exist_ok=True)
        key = _conditions_key(rows)
        index = ckpt / "conditions.json"
        if index.exists() and _read_index(index).get("key") != key:
            raise ValueError(f"{ckpt} holds chunks of other conditions; remove it or use another directory")
        record = {"key": key, "n": len(rows), "chunk_size": size}
        if config is not None:
            record["config"] = dict(config)
        atomic_write_text(index, json.dumps(record, default=str))
    frames = []
    starts = range(0, len(rows), size)
    bar = tqdm(starts, desc=desc, disable=not progress or len(starts) == 1, leave=False)
    for start in bar:
        chunk = rows[start:start + size]
        path = ckpt / f"chunk_{start:06d}_{len(chunk)}.parquet" if ckpt is not None else None
        if path is not None and path.exists():
            frames.append(pd.read_parquet(path))
            continue
        results = list(evaluate([dict(c) for c in chunk]))
        if len(results) != len(chunk):
            raise ValueError(f"evaluate returned {len(results)} results for {len(chunk)} conditions")
        parts = []
        for i, (cond, res) in enumerate(zip(chunk, results, strict=True)):
            res = pd.DataFrame([res]) if isinstance(res, Mapping) else res
            clash = [k for k in keys if k in res.columns]
            if clash:
                raise ValueError(f"evaluate's columns {clash} clash with condition fields")
            head = pd.DataFrame({"condition": start + i, **{k: [cond[k]] * len(res) for k in keys}})
            parts.append(pd.concat([head, res.reset_index(drop=True)], axis=1))
        frame = pd.concat(parts, ignore_index=True)
        if path is not None:
            tmp = path.with_suffix(".tmp")
            try:
                frame.to_parquet(tmp, index=False)
                tmp.replace(path)
            except BaseException:
                tmp.unlink(missing_ok=True)  # a full disk leaves no half-written chunk behind
                raise
        frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    if cleanup:
        clear_chunks(ckpt)
    return out


# ------------------------------------------------------------------------------------------------
# The checkpoint loop
# ------------------------------------------------------------------------------------------------
KINDS = ("local", "hub", "synthetic")
"""``local``: a Hugging Face model directory; ``hub``: a hub id at a revision; ``synthetic``: a
checkpoint directory of ``taskvec synthetic train`` (its loader comes from ``synthetic/``)."""

FAILED_COLUMNS = ["index", "step", "checkpoint", "stage", "reason"]

# OLMo revisions ("step1000-tokens4B"; OLMo 2: "stage1-step1000-tokens5B"), checkpoint directories of
# this package ("step_0001000"), of the HF Trainer ("checkpoint-1000"), and plain "step1000" / "step-1000"
_STEP_PATTERNS = (
    re.compile(r"^(?:[a-z0-9]+-)*step(\d+)-tokens\d+(?:\.\d+)?[KMBT]?$", re.IGNORECASE),
    re.compile(r"^step[_-]?(\d+)$", re.IGNORECASE),
    re.compile(r"^checkpoint-(\d+)$"),
)


def parse_step(name: str | os.PathLike) -> int | None:
    """The training step in a revision or directory name, ``None`` if it names none.

    ``"step1000-tokens4B"`` (OLMo) and ``"stage1-step1000-tokens5B"`` (OLMo 2) -> 1000,
    ``"step_0000500"`` / ``"step500"`` -> 500, ``"checkpoint-500"`` (HF Trainer) -> 500; for a path, its
    last component is read (``"runs/x/checkpoint-500"`` -> 500).
    """
    text = Path(name).name if isinstance(name, os.PathLike) or "/" in str(name) else str(name)
    for pattern in _STEP_PATTERNS:
        if m := pattern.match(text):
            return int(m.group(1))
    return None


@dataclass(frozen=True)
class Checkpoint:
    """One entry of a trajectory: its position in the list, its training step and where it is.

    ``location`` is a directory (``local``, ``synthetic``) or a hub id (``hub``, with ``revision``).
    ``step_source`` says where the step came from: ``"given"``, ``"name"`` (parsed from the revision or
    the directory name, :func:`parse_step`) or ``"index"`` (nothing to parse: the entry's index).
    """

    index: int
    step: int
    kind: str
    location: str
    revision: str | None = None
    step_source: str = "given"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"checkpoint {self.index}: kind {self.kind!r} is not one of {KINDS}")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"checkpoint {self.index}: step must be an int >= 0, got {self.step!r}")

    @property
    def label(self) -> str:
        return f"{self.location}@{self.revision}" if self.revision else self.location

    def describe(self) -> dict:
        return asdict(self)


def _steps_for(names: Sequence[str], steps: Sequence[int] | None) -> list[tuple[int, str]]:
    if steps is not None:
        if len(steps) != len(names):
            raise ValueError(f"{len(steps)} steps given for {len(names)} checkpoints")
        return [(int(s), "given") for s in steps]
    out = []
    for i, name in enumerate(names):
        s = parse_step(name)
        out.append((i, "index") if s is None else (s, "name"))
    return out


def local_checkpoints(paths: Sequence[str | os.PathLike], steps: Sequence[int] | None = None) -> list[Checkpoint]:
    """Entries for local Hugging Face model directories (step from ``steps``, the name, or the index)."""
    paths = [str(p) for p in paths]
    return [Checkpoint(i, s, "local", p, None, src) for i, (p, (s, src)) in enumerate(zip(paths, _steps_for(
        [Path(p).name for p in paths], steps), strict=True))]


def hub_checkpoints(model: str, revisions: Sequence[str], steps: Sequence[int] | None = None) -> list[Checkpoint]:
    """Entries for revisions of one hub model, e.g. ``("allenai/OLMo-7B-0424-hf", ["step1000-tokens4B"])``."""
    if not model or "/" not in model:
        raise ValueError(f"hub model id must look like 'org/name', got {model!r}")
    revisions = [str(r) for r in revisions]
    return [Checkpoint(i, s, "hub", model, r, src)
            for i, (r, (s, src)) in enumerate(zip(revisions, _steps_for(revisions, steps), strict=True))]


def run_checkpoints_of(run_dir: str | os.PathLike, steps: Sequence[int] | None = None) -> list[Checkpoint]:
    """Entries for the checkpoints of a training run (``run_dir/checkpoints/step_XXXXXXX``), by step.

    ``steps``: only these (each must exist).
    """
    found = list_checkpoints(run_dir)
    if not found:
        raise ValueError(f"no checkpoints in {run_dir}: train first (taskvec synthetic train)")
    if steps is not None:
        have = {s for s, _ in found}
        missing = sorted(set(steps) - have)
        if missing:
            raise ValueError(f"checkpoints {missing} not in {run_dir} (have {sorted(have)})")
        found = [(s, p) for s, p in found if s in set(steps)]
    return [Checkpoint(i, s, "synthetic", str(p), None, "name") for i, (s, p) in enumerate(found)]


def check_checkpoints(entries: Sequence[Checkpoint]) -> pd.DataFrame:
    """What can be known before any work: ``ValueError`` for an empty list, mixed-up indices or two
    entries with one step (their tables could not be told apart); a ``failed`` table (stage ``"check"``)
    for local / synthetic paths that do not exist."""
    if not entries:
        raise ValueError("no checkpoints given")
    for i, e in enumerate(entries):
        if e.index != i:
            raise ValueError(f"checkpoint at position {i} has index {e.index}: give entries in index order")
    seen: dict[int, int] = {}
    for e in entries:
        if e.step in seen:
            raise ValueError(f"checkpoints {seen[e.step]} and {e.index} ({e.label}) both have step {e.step}: "
                             "give explicit distinct steps")
        seen[e.step] = e.index
    rows = [{"index": e.index, "step": e.step, "checkpoint": e.label, "stage": "check",
             "reason": f"{e.kind} checkpoint directory {e.location!r} does not exist"}
            for e in entries if e.kind != "hub" and not Path(e.location).is_dir()]
    return pd.DataFrame(rows, columns=FAILED_COLUMNS)


def model_identity(model: object) -> dict:
    """What a loaded model is: ``Adapter.identity()`` if it has one, else its class and size."""
    ident = getattr(model, "identity", None)
    if callable(ident):
        return ident()
    params = getattr(model, "parameters", None)
    return {"name": type(model).__name__, "model_class": type(model).__name__,
            "n_params": sum(p.numel() for p in params()) if callable(params) else None}


Load = Callable[[Checkpoint], Any]
Probe = Callable[[Any, Checkpoint], Mapping[str, pd.DataFrame]]

ARCHITECTURE = ("model_type", "n_layers", "d_model")
"""The identity fields that make two checkpoints one model's (:func:`run_checkpoints`' ``same_architecture``)."""


class ArchitectureError(ValueError):
    """Checkpoints of different architectures in one trajectory (a refusal, never recorded as a bad entry)."""


@dataclass
class CheckpointRun:
    """What :func:`run_checkpoints` returns: the probe's tables over every good entry, and the bad ones."""

    entries: list[Checkpoint]
    tables: dict[str, pd.DataFrame]
    failed: pd.DataFrame
    models: dict[int, dict] = field(default_factory=dict)
    """step -> the loaded model's identity (:func:`model_identity`), for every good entry."""
    seconds: float = 0.0
    ran: list[int] = field(default_factory=list)
    """indices of the entries probed in this call (the others were read back or failed)."""

    def table(self, name: str) -> pd.DataFrame:
        """The concatenated table ``name`` (an empty DataFrame if no entry returned one)."""
        return self.tables.get(name, pd.DataFrame())

    @property
    def ok(self) -> bool:
        return self.failed.empty

    def failure_message(self) -> str:
        return failure_message(self.failed)


def failure_message(failed: pd.DataFrame) -> str:
    """One line per bad entry of a ``failed`` table, each named by its index."""
    return "; ".join(f"checkpoint {r.index} (step {r.step}, {r.checkpoint}) failed at {r.stage}: {r.reason}"
                     for r in failed.itertuples())


def config_key(config: Mapping[str, Any]) -> str:
    """A short hash of a JSON-able probe configuration (what decides whether saved tables can be reused)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_dir(out: Path, step: int) -> Path:
    return out / "per_step" / f"step_{step:07d}"


def entry_weights(entry: Checkpoint) -> str | None:
    """What the weights of ``entry`` are, read without loading them: a local directory's weight files
    (:func:`~taskvec_interp.adapters.fingerprint.files_fingerprint`, cached by path, size and mtime), a synthetic
    checkpoint's manifest (the sha256 of its ``manifest.json``); ``None`` for a hub revision (named by its id and
    revision) or a directory without weight files. A finished step is reused only while this is unchanged."""
    if entry.kind == "synthetic":
        from .io import manifest_fingerprint

        return manifest_fingerprint(entry.location) if (Path(entry.location) / MANIFEST).is_file() else None
    if entry.kind == "local":
        from .adapters.fingerprint import files_fingerprint
        from .adapters.load import cache_dir

        return files_fingerprint(entry.location, cache_dir() / "fingerprints.json")
    return None


def _saved_entry(out: Path, entry: Checkpoint, key: str, config: Mapping[str, Any] | None = None) -> dict | None:
    """The saved record of ``entry`` under ``out`` (``None`` if none); ``ValueError`` if it is another's: another
    entry, another probe configuration (naming the fields that differ) or other weights at the same path."""
    d = step_dir(out, entry.step)
    record = d / "checkpoint.json"
    if not record.exists() and not record.is_symlink():
        return None
    problem = manifest_problem(d)  # a torn, changed or escaping per-step file is refused, naming it
    if problem is not None:
        raise ValueError(f"per-step record {d} cannot be read: {problem}; remove {d} to compute step {entry.step} "
                         "again")
    saved = read_json(record)
    if not isinstance(saved, dict) or not isinstance(saved.get("entry"), dict) or "config_key" not in saved \
            or not isinstance(saved.get("tables"), list):
        raise ValueError(f"{record} is not a per-step record (no 'entry', 'config_key' or 'tables')")
    weights = entry_weights(entry)
    # the same weights at another path are the same checkpoint: the location is compared only when they differ
    skip = {"index", "location"} if weights is not None and saved.get("weights") == weights else {"index"}
    here = {k: v for k, v in entry.describe().items() if k not in skip}
    there = {k: v for k, v in saved["entry"].items() if k not in skip}
    if there != here:
        raise ValueError(f"{d} holds step {entry.step} of {there}, not of checkpoint {entry.index} {here}: "
                         "use another output directory or remove it")
    if saved["config_key"] != key:
        diffs = config_diffs(saved["config"], dict(config or {})) if isinstance(saved.get("config"), dict) else \
            [f"config key: saved {saved['config_key']}, given {key}"]
        raise ValueError(f"{d} was written with another probe configuration ({'; '.join(diffs)}): refusing to reuse "
                         "or replace it; use another output directory or the saved settings")
    if saved.get("weights") != weights:
        shown = config_diffs({"weights": saved.get("weights")}, {"weights": weights})
        raise ValueError(f"{d} holds step {entry.step} computed from other weights at {entry.label} "
                         f"({'; '.join(shown)}): the checkpoint changed since; refusing to reuse or replace it; use "
                         "another output directory")
    return saved


def _write_entry(out: Path, entry: Checkpoint, key: str, tables: Mapping[str, pd.DataFrame], identity: dict,
                 seconds: float, config: Mapping[str, Any] | None = None) -> None:
    final = step_dir(out, entry.step)
    tmp = final.parent / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    bad = [n for n in tables if not _plain_table_name(n)]
    if bad:
        raise ValueError(f"the probe returned a table named {bad[0]!r}: a table name must be a plain file name "
                         "(no '/', '\\', leading '.' or NUL)")
    tmp.mkdir(parents=True)
    try:
        for name, table in tables.items():
            table.to_parquet(tmp / f"{name}.parquet", index=False)
        record = {"entry": entry.describe(), "config_key": key, "tables": sorted(tables),
                  "seconds": round(seconds, 3), "provenance": provenance(identity), "config": dict(config or {}),
                  "weights": entry_weights(entry)}
        atomic_write_text(tmp / "checkpoint.json", json.dumps(record, indent=2, default=str))
        write_manifest(tmp)  # every file's size and sha256, written last: checked when the entry is read back
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no hidden temporary directory behind
        raise


def _plain_table_name(name: object) -> bool:
    return isinstance(name, str) and bool(name) and not name.startswith(".") and not any(
        c in name for c in "/\\\x00")


def _read_entry(out: Path, entry: Checkpoint, saved: dict) -> dict[str, pd.DataFrame]:
    """The tables of a verified per-step record (:func:`_saved_entry`): each must be a plain name whose file is
    inside the step directory and listed in its manifest; anything else is refused, never followed."""
    d = step_dir(out, entry.step)
    listed = set(manifest_files(d))
    tables = {}
    for name in saved["tables"]:
        rel = f"{name}.parquet" if _plain_table_name(name) else None
        path = inside(d, rel) if rel is not None else None
        if path is None or rel not in listed:
            raise ValueError(f"{d / 'checkpoint.json'} names a table {name!r} that is not a file of {d} listed in its "
                             f"{MANIFEST} (refused, not followed)")
        tables[name] = read_parquet(path)
    return tables


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_checkpoints(
    entries: Sequence[Checkpoint],
    probe: Probe,
    load: Load,
    *,
    config: Mapping[str, Any] | None = None,
    out: str | os.PathLike | None = None,
    on_error: str = "record",
    progress: bool = True,
    desc: str = "checkpoints",
    same_architecture: bool = False,
) -> CheckpointRun:
    """Run ``probe(load(entry), entry)`` over ``entries``, one loaded model at a time (see module doc).

    ``config``: JSON-able description of what the probe computes; a rerun into the same ``out`` with
    another one is refused (naming the fields that differ), and so is a finished step whose checkpoint's
    weights changed since (:func:`entry_weights`). ``same_architecture``: every entry's model must have the
    architecture of the first (``model_type``, ``n_layers``, ``d_model`` of its identity): another one is
    refused with an :class:`ArchitectureError` naming both entries and the fields (saved entries are
    compared before any work; finished steps stay on disk). ``on_error``: ``"record"`` (bad entries go to ``failed``, the others run;
    a warning names them) or ``"raise"`` (the first error propagates; an entry reported by the up-front
    check raises ``ValueError`` before any work).
    """
    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error must be 'record' or 'raise', got {on_error!r}")
    entries = list(entries)
    failed = check_checkpoints(entries)
    if on_error == "raise" and not failed.empty:
        r = failed.iloc[0]
        raise ValueError(f"checkpoint {r['index']} (step {r['step']}): {r['reason']}")
    key = config_key(dict(config or {}))
    out_dir = check_out_dir(out) if out is not None else None
    saved = {e.index: _saved_entry(out_dir, e, key, config) for e in entries} if out_dir is not None else {}
    if not failed.empty:
        msg = "; ".join(f"checkpoint {r.index} (step {r.step}): {r.reason}" for r in failed.itertuples())
        warnings.warn(f"skipping {len(failed)} bad checkpoint(s): {msg}", stacklevel=2)
    bad = set(failed["index"])
    first: list[tuple[Checkpoint, dict]] = []

    def check_architecture(entry: Checkpoint, identity: dict) -> None:
        if not same_architecture:
            return
        shape = {k: identity.get(k) for k in ARCHITECTURE}
        if not first:
            first.append((entry, shape))
            return
        other, want = first[0]
        diffs = config_diffs(want, shape, labels=(f"checkpoint {other.index}", f"checkpoint {entry.index}"))
        if diffs:
            raise ArchitectureError(f"checkpoint {entry.index} ({entry.label}) has another architecture than checkpoint "
                                    f"{other.index} ({other.label}): {'; '.join(diffs)}; a trajectory follows one "
                                    "model (allow_mixed_architectures=True runs them anyway)")

    for entry in entries:  # finished entries first: a mismatch among them is refused before any work
        if saved.get(entry.index) is not None:
            check_architecture(entry, saved[entry.index]["provenance"]["model"])
    per_entry: list[dict[str, pd.DataFrame]] = []
    models: dict[int, dict] = {}
    failures = [failed] if not failed.empty else []
    ran: list[int] = []
    t0 = time.perf_counter()
    bar = tqdm(entries, desc=desc, disable=not progress)
    for entry in bar:
        if entry.index in bad:
            continue
        bar.set_postfix_str(f"step {entry.step}")
        record = saved.get(entry.index)
        if record is not None:
            per_entry.append(_read_entry(out_dir, entry, record))
            models[entry.step] = record["provenance"]["model"]
            continue
        stage = "load"
        t_entry = time.perf_counter()
        model = None
        try:
            model = load(entry)
            identity = model_identity(model)
            check_architecture(entry, identity)
            stage = "probe"
            tables = {name: (t if "step" in t.columns else t.assign(step=entry.step))
                      for name, t in dict(probe(model, entry)).items()}
        except Exception as err:  # noqa: BLE001 - recorded with the entry's index, or re-raised
            if on_error == "raise" or isinstance(err, ArchitectureError):
                raise
            failures.append(pd.DataFrame([{"index": entry.index, "step": entry.step, "checkpoint": entry.label,
                                           "stage": stage, "reason": _reason(err)}], columns=FAILED_COLUMNS))
            continue
        finally:
            del model  # the only reference: the next checkpoint loads into freed memory
            _free()
        ran.append(entry.index)
        models[entry.step] = identity
        if out_dir is not None:
            _write_entry(out_dir, entry, key, tables, identity, time.perf_counter() - t_entry, config)
        per_entry.append(tables)
    names = list(dict.fromkeys(n for tables in per_entry for n in tables))
    tables = {n: pd.concat([t[n] for t in per_entry if n in t], ignore_index=True) for n in names}
    failed = (pd.concat(failures, ignore_index=True).sort_values("index", ignore_index=True) if failures
              else pd.DataFrame(columns=FAILED_COLUMNS))
    run = CheckpointRun(entries, tables, failed, models, time.perf_counter() - t0, ran)
    if len(failed) > len(bad):
        warnings.warn(f"{len(failed) - len(bad)} checkpoint(s) failed: {failure_message(failed)}", stacklevel=2)
    return run
