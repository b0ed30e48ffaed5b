"""A probe over a list of checkpoints: one model in memory at a time, resumable, bad entries recorded.

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

from ..checkpoints import atomic_write_text, list_checkpoints
from ..results import check_out_dir, provenance
from ..validate import check_choice, check_int

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


def _saved_entry(out: Path, entry: Checkpoint, key: str) -> dict | None:
    """The saved record of ``entry`` under ``out`` (``None`` if none); ``ValueError`` if it is another's."""
    d = step_dir(out, entry.step)
    record = d / "checkpoint.json"
    if not record.exists():
        return None
    saved = json.loads(record.read_text())
    here = {k: v for k, v in entry.describe().items() if k != "index"}
    there = {k: v for k, v in saved["entry"].items() if k != "index"}
    if there != here:
        raise ValueError(f"{d} holds step {entry.step} of {there}, not of checkpoint {entry.index} {here}: "
                         "use another output directory or remove it")
    if saved["config_key"] != key:
        raise ValueError(f"{d} was written with another probe configuration (key {saved['config_key']} != {key}): "
                         "use another output directory or remove it")
    return saved


def _write_entry(out: Path, entry: Checkpoint, key: str, tables: Mapping[str, pd.DataFrame], identity: dict,
                 seconds: float) -> None:
    final = step_dir(out, entry.step)
    tmp = final.parent / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, table in tables.items():
        table.to_parquet(tmp / f"{name}.parquet", index=False)
    record = {"entry": entry.describe(), "config_key": key, "tables": sorted(tables), "seconds": round(seconds, 3),
              "provenance": provenance(identity)}
    atomic_write_text(tmp / "checkpoint.json", json.dumps(record, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _read_entry(out: Path, entry: Checkpoint, saved: dict) -> dict[str, pd.DataFrame]:
    d = step_dir(out, entry.step)
    return {name: pd.read_parquet(d / f"{name}.parquet") for name in saved["tables"]}


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
) -> CheckpointRun:
    """Run ``probe(load(entry), entry)`` over ``entries``, one loaded model at a time (see module doc).

    ``config``: JSON-able description of what the probe computes; a rerun into the same ``out`` with
    another one is refused. ``on_error``: ``"record"`` (bad entries go to ``failed``, the others run;
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
    saved = {e.index: _saved_entry(out_dir, e, key) for e in entries} if out_dir is not None else {}
    if not failed.empty:
        msg = "; ".join(f"checkpoint {r.index} (step {r.step}): {r.reason}" for r in failed.itertuples())
        warnings.warn(f"skipping {len(failed)} bad checkpoint(s): {msg}", stacklevel=2)
    bad = set(failed["index"])
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
            stage = "probe"
            tables = {name: (t if "step" in t.columns else t.assign(step=entry.step))
                      for name, t in dict(probe(model, entry)).items()}
        except Exception as err:  # noqa: BLE001 - recorded with the entry's index, or re-raised
            if on_error == "raise":
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
            _write_entry(out_dir, entry, key, tables, identity, time.perf_counter() - t_entry)
        per_entry.append(tables)
    names = list(dict.fromkeys(n for tables in per_entry for n in tables))
    tables = {n: pd.concat([t[n] for t in per_entry if n in t], ignore_index=True) for n in names}
    failed = (pd.concat(failures, ignore_index=True).sort_values("index", ignore_index=True) if failures
              else pd.DataFrame(columns=FAILED_COLUMNS))
    run = CheckpointRun(entries, tables, failed, models, time.perf_counter() - t0, ran)
    if len(failed) > len(bad):
        warnings.warn(f"{len(failed) - len(bad)} checkpoint(s) failed: {failure_message(failed)}", stacklevel=2)
    return run


# ------------------------------------------------------------------------------------------------
# The default probe: TD at every layer + ICL accuracy, per checkpoint (paper Fig. 5)
# ------------------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TABLES = ("td", "accuracy", "predictions", "trajectory", "summary", "failed")


@dataclass
class TrajectoryConfig:
    """What decides a trajectory's numbers (saved in config.json): one shot count, the sweep's settings,
    and how each checkpoint is loaded (``backend``, ``dtype``, ``device``).

    ``summary_layer``: the layer of the summary's mean TD; ``None`` = each checkpoint's peak layer (the
    highest overall TD; at an untrained checkpoint the maximum over layers sits slightly above chance).
    """

    family: str = "bitwise"
    shots: int = 4
    n_per_task: int = 100
    seed: int = 0
    k: int = 10
    metric: str = "euclidean"
    layers: str | list[int] = "all"
    batch_size: int = 16
    max_new_tokens: int | None = None
    n_boot: int = 1000
    template: dict = field(default_factory=dict)
    family_kwargs: dict = field(default_factory=dict)
    backend: str = "torch"
    dtype: str | None = None
    device: str | None = None
    summary_layer: int | None = None

    def __post_init__(self) -> None:
        from ..adapters.load import BACKENDS

        check_int("TrajectoryConfig.shots", self.shots, 0)
        check_int("TrajectoryConfig.n_per_task", self.n_per_task, 1)
        check_int("TrajectoryConfig.k", self.k, 1)
        check_choice("TrajectoryConfig.backend", self.backend, BACKENDS)
        check_choice("TrajectoryConfig.dtype", self.dtype, (None, *sorted(DTYPES)))
        if self.summary_layer is not None:
            check_int("TrajectoryConfig.summary_layer", self.summary_layer, 0)
        self.sweep_config()  # the sweep it runs checks the rest (k against n_per_task, metric, ...) up front

    def sweep_config(self, model: str = "") -> Any:
        from .sweep import SweepConfig

        return SweepConfig(model=model, backend=self.backend, family=self.family, shots=(self.shots,),
                           n_per_task=self.n_per_task, seed=self.seed, k=self.k, metric=self.metric,
                           layers=self.layers, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                           n_boot=self.n_boot, template=dict(self.template), family_kwargs=dict(self.family_kwargs))


def language_model_loader(backend: str = "torch", dtype: str | None = None, device: str | None = None) -> Load:
    """Load a ``local`` directory or a ``hub`` id at its revision through :func:`load_model`."""

    def load(entry: Checkpoint) -> Any:
        from ..adapters import load_model

        if entry.kind == "synthetic":
            raise ValueError(f"checkpoint {entry.index} is a synthetic-run checkpoint: it has no tokenizer; "
                             "use taskvec_interp.synthetic.analysis.synthetic_trajectory")
        return load_model(entry.location, backend=backend, dtype=DTYPES.get(dtype) if dtype else None,
                          device=device, revision=entry.revision)

    return load


def sweep_probe(config: TrajectoryConfig, family: Any, progress: bool = False) -> Probe:
    """``probe(adapter, entry)``: :func:`run_sweep` at ``config.shots``; tables td, accuracy, predictions."""
    from .sweep import run_sweep

    def probe(adapter: Any, entry: Checkpoint) -> dict[str, pd.DataFrame]:
        res = run_sweep(adapter, config.sweep_config(entry.label), family, progress=progress)
        return {"td": res.td, "accuracy": res.accuracy, "predictions": res.predictions}

    return probe


def trajectory_table(td: pd.DataFrame, outcome: pd.DataFrame, column: str = "exact",
                     name: str = "accuracy") -> pd.DataFrame:
    """Per-task TD at every layer joined with that task's outcome at the same step (``column`` of the
    ``outcome`` table, renamed ``name``); overall rows get the mean over the tasks other than Null."""
    from ..tasks import NULL_TASK

    keys = ["step", "task"] + (["shots"] if "shots" in td and "shots" in outcome else [])
    per_task = td[td["level"] == "task"].merge(outcome[keys + [column]].rename(columns={column: name}), on=keys,
                                               how="left")
    real = outcome[outcome["task"] != NULL_TASK].groupby("step")[column].mean().rename(name)
    overall = td[td["level"] == "overall"].merge(real, left_on="step", right_index=True, how="left")
    table = pd.concat([overall, per_task], ignore_index=True).sort_values(["step", "layer"], kind="stable",
                                                                          ignore_index=True)
    first = [c for c in ("step", "layer", "level", "task", "td", name, "chance", "ci_low", "ci_high", "shots",
                         "family", "n") if c in table]
    return table[first + [c for c in table.columns if c not in first]]


def trajectory_summary(table: pd.DataFrame, name: str = "accuracy", layer: int | None = None) -> pd.DataFrame:
    """Per step: the layer (``layer``, or the step's peak of overall TD, earliest on ties), the mean and
    s.d. over tasks (Null left out) of per-task TD there, the overall TD there, the mean and s.d. of the
    outcome ``name``, and TD's chance level."""
    from ..tasks import NULL_TASK

    rows = []
    for step, part in table.groupby("step", sort=True):
        overall = part[part["level"] == "overall"].sort_values("layer")
        if layer is None:
            at = int(overall.loc[overall["td"].idxmax(), "layer"])
        elif layer not in set(overall["layer"]):
            raise ValueError(f"summary layer {layer} is not among the layers {sorted(set(overall['layer']))}")
        else:
            at = layer
        tasks = part[(part["level"] == "task") & (part["layer"] == at) & (part["task"] != NULL_TASK)]
        rows.append({"step": int(step), "layer": at, "td_mean": float(tasks["td"].mean()),
                     "td_sd": float(tasks["td"].std(ddof=0)),
                     "td_overall": float(overall.loc[overall["layer"] == at, "td"].iloc[0]),
                     name: float(tasks[name].mean()), f"{name}_sd": float(tasks[name].std(ddof=0)),
                     "chance": float(overall["chance"].iloc[0]), "n_tasks": len(tasks)})
    return pd.DataFrame(rows)


class TrajectoryError(RuntimeError):
    """Some checkpoints failed; ``.result`` holds the good ones, ``.result.failed`` the bad ones."""

    def __init__(self, result: TrajectoryResult) -> None:
        super().__init__(result.failure_message())
        self.result = result


def _write_parquet(table: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, path)


@dataclass
class TrajectoryResult:
    """TD and an outcome (exact-match ``accuracy``, or ``mse`` for the synthetic model) per checkpoint.

    ``tables``: ``td`` (step, layer, level, task, td, ...), the outcome's own table (``accuracy`` or
    ``mse``), ``trajectory`` (:func:`trajectory_table`), ``summary`` (:func:`trajectory_summary`),
    and whatever else the probe returned (``predictions``). ``failed``: index, step, checkpoint, stage,
    reason of every bad entry.
    """

    config: dict
    tables: dict[str, pd.DataFrame]
    failed: pd.DataFrame
    entries: list[Checkpoint]
    models: dict[int, dict] = field(default_factory=dict)
    seconds: float = 0.0
    outcome: str = "accuracy"

    @property
    def td(self) -> pd.DataFrame:
        return self.tables["td"]

    @property
    def table(self) -> pd.DataFrame:
        return self.tables["trajectory"]

    @property
    def summary(self) -> pd.DataFrame:
        return self.tables["summary"]

    @property
    def ok(self) -> bool:
        return self.failed.empty

    def failure_message(self) -> str:
        return failure_message(self.failed)

    def raise_for_failed(self) -> TrajectoryResult:
        """``TrajectoryError`` naming every bad entry by index; the result itself if there is none."""
        if not self.ok:
            raise TrajectoryError(self)
        return self

    def save(self, out: str | os.PathLike) -> Path:
        """Tables as Parquet, then config.json (the configuration, every entry with its status and model
        identity, library versions): written last, it marks a complete result."""
        out = check_out_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        for name, table in {**self.tables, "failed": self.failed}.items():
            _write_parquet(table, out / f"{name}.parquet")
        bad = dict(zip(self.failed["index"], self.failed["reason"], strict=True))
        entries = [{**e.describe(), "status": "failed" if e.index in bad else "ok", "reason": bad.get(e.index),
                    "model": self.models.get(e.step)} for e in self.entries]
        record = {**self.config, "outcome": self.outcome, "checkpoints": entries,
                  "tables": sorted([*self.tables, "failed"]), "seconds": round(self.seconds, 1),
                  "provenance": {"versions": provenance({})["versions"]}}
        atomic_write_text(out / "config.json", json.dumps(record, indent=2, default=str))
        return out


def trajectory_result(run: CheckpointRun, config: dict, outcome_table: str = "accuracy", column: str = "exact",
                      outcome: str = "accuracy", layer: int | None = None) -> TrajectoryResult:
    """Assemble a :class:`TrajectoryResult` from the loop's tables (td + ``outcome_table``)."""
    tables = {n: t[["step"] + [c for c in t.columns if c != "step"]] for n, t in run.tables.items()}
    if "td" in tables:
        tables["trajectory"] = trajectory_table(tables["td"], tables[outcome_table], column, outcome)
        tables["summary"] = trajectory_summary(tables["trajectory"], outcome, layer)
    return TrajectoryResult(config, tables, run.failed, run.entries, run.models, run.seconds, outcome)


def run_trajectory(
    entries: Sequence[Checkpoint],
    config: TrajectoryConfig | None = None,
    family: Any = None,
    *,
    out: str | os.PathLike | None = None,
    load: Load | None = None,
    on_error: str = "record",
    progress: bool = True,
) -> TrajectoryResult:
    """TD at every layer and ICL accuracy at ``config.shots`` shots, for every checkpoint (paper Fig. 5).

    Everything that can be checked is checked before any model loads (the configuration, the family,
    ``out``, the entries). With ``out``, finished checkpoints are saved as they complete (a rerun skips
    them) and the whole result is saved at the end. Bad entries do not stop the others: they are in
    ``result.failed`` (and a warning); call ``result.raise_for_failed()`` to make them an error, or pass
    ``on_error="raise"``.
    """
    from ..tasks import get_family

    config = config or TrajectoryConfig()
    fam = family if family is not None else get_family(config.family, **config.family_kwargs)
    synthetic = [e.index for e in entries if e.kind == "synthetic"]
    if synthetic:
        raise ValueError(f"checkpoints {synthetic} are synthetic-run checkpoints (no tokenizer): use "
                         "taskvec_interp.synthetic.analysis.synthetic_trajectory")
    if out is not None:
        check_out_dir(out)
    record = {"probe": "td_accuracy", **asdict(config), "family": fam.name}
    run = run_checkpoints(entries, sweep_probe(config, fam, progress=False),
                          load or language_model_loader(config.backend, config.dtype, config.device),
                          config=record, out=out, on_error=on_error, progress=progress)
    if not run.tables:
        result = TrajectoryResult(record, {}, run.failed, run.entries, run.models, run.seconds)
        raise TrajectoryError(result)
    result = trajectory_result(run, record, layer=config.summary_layer)
    if out is not None:
        result.save(out)
    return result
