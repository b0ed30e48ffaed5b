"""Checkpoint trajectories of a language model (paper Fig. 5): TD at every layer and ICL accuracy per checkpoint.

The loop over checkpoints (:func:`~taskvec_interp.engine.run_checkpoints`: one model in memory at a time,
resumable, bad entries recorded), its entries (:class:`~taskvec_interp.engine.Checkpoint`, local
directories, hub revisions, synthetic runs) and its result type live in ``engine.py`` and are
re-exported here; this module is the language-model probe over them (:func:`run_trajectory`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..config import (
    PromptSetConfig,
    backend_field,
    backend_names,
    batch_size_field,
    k_field,
    max_new_tokens_field,
    n_boot_field,
    opt,
)
from ..engine import (  # noqa: F401 - re-exported: the trajectory API names its entries
    FAILED_COLUMNS,
    KINDS,
    Checkpoint,
    CheckpointRun,
    Load,
    Probe,
    check_checkpoints,
    config_key,
    failure_message,
    hub_checkpoints,
    local_checkpoints,
    model_identity,
    parse_step,
    run_checkpoints,
    run_checkpoints_of,
    step_dir,
)
from ..hooks import CAPTURE_LAYERS, check_layer_spec
from ..io import check_result_owner, listed_file, locks_out, read_result_dir, write_result_dir
from ..probes.decodability import METRICS
from ..results import provenance, read_json, read_parquet
from ..validate import (
    check_bool,
    check_choice,
    check_int,
    check_knn_k,
    check_n_boot,
    check_optional_int,
    check_str,
)

# ------------------------------------------------------------------------------------------------
# The default probe: TD at every layer + ICL accuracy, per checkpoint (paper Fig. 5)
# ------------------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TABLES = ("td", "accuracy", "predictions", "trajectory", "summary", "failed")
KIND = "trajectory"
"""The result kind a trajectory directory is marked with (``result.json``)."""
KEEP = ("per_step",)
"""Carried over when a trajectory directory is replaced: the finished checkpoints a rerun skips."""


@dataclass
class TrajectoryConfig(PromptSetConfig):
    """What decides a trajectory's numbers (saved in config.json): the prompt set (:class:`PromptSetConfig`,
    one shot count), the sweep's settings, and how each checkpoint is loaded (``backend``, ``dtype``,
    ``device``).

    ``summary_layer``: the layer of the summary's mean TD; ``None`` = each checkpoint's peak layer (the
    highest overall TD; at an untrained checkpoint the maximum over layers sits slightly above chance).
    A synthetic run (``taskvec trajectory --synthetic-run``) reads ``n_per_task`` test sequences per basis,
    ``k``, ``n_boot`` and the test-set seed ``SYNTHETIC_TEST_SEED + seed``.
    """

    n_per_task: int = opt(100, "prompts per task, Null included (a synthetic run: test sequences per basis)")
    k: int = k_field()
    metric: str = opt("euclidean", "distance of the k-NN", choices=METRICS)
    layers: str | list[int] = opt("all", "layers to capture: all | first:K | last:K | A-B | 3,5,7")
    batch_size: int = batch_size_field()
    max_new_tokens: int | None = max_new_tokens_field()
    n_boot: int = n_boot_field()
    backend: str = backend_field()
    dtype: str | None = opt(None, "dtype each checkpoint loads in (default: float32)", choices=tuple(sorted(DTYPES)))
    device: str | None = opt(None, "device each checkpoint loads on, e.g. cuda (default: cpu)")
    summary_layer: int | None = opt(None, "layer of the summary's mean TD (default: each checkpoint's peak)")
    allow_mixed_architectures: bool = opt(False, "run checkpoints of different architectures (model_type, layers, "
                                                 "d_model) as one trajectory")

    def __post_init__(self) -> None:
        self.check_prompt_set()
        check_knn_k("TrajectoryConfig.k", self.k, self.n_per_task, "n_per_task")
        check_choice("TrajectoryConfig.metric", self.metric, METRICS)
        self.layers = check_layer_spec(self.layers, CAPTURE_LAYERS, "TrajectoryConfig.layers")
        check_int("TrajectoryConfig.batch_size", self.batch_size, 1)
        check_optional_int("TrajectoryConfig.max_new_tokens", self.max_new_tokens, 1)
        check_n_boot("TrajectoryConfig.n_boot", self.n_boot)
        check_choice("TrajectoryConfig.backend", self.backend, backend_names())
        check_choice("TrajectoryConfig.dtype", self.dtype, (None, *sorted(DTYPES)))
        if self.device is not None:
            check_str("TrajectoryConfig.device", self.device)
        check_optional_int("TrajectoryConfig.summary_layer", self.summary_layer, 0)
        check_bool("TrajectoryConfig.allow_mixed_architectures", self.allow_mixed_architectures)

    def sweep_config(self, model: str = "") -> Any:
        from .sweep import SweepConfig

        return SweepConfig(model=model, backend=self.backend, family=self.family, shots=(self.shots,),
                           n_per_task=self.n_per_task, seed=self.seed, k=self.k, metric=self.metric,
                           layers=self.layers, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                           n_boot=self.n_boot, template=dict(self.template), family_kwargs=dict(self.family_kwargs))


def _local_architecture(entry: Checkpoint) -> dict | None:
    """``model_type``, ``n_layers``, ``d_model`` of a local checkpoint directory, read from its config.json
    (``None`` where it cannot be read: the load will say why)."""
    if entry.kind != "local" or not (Path(entry.location) / "config.json").is_file():
        return None
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(entry.location)
    except Exception:  # noqa: BLE001 - an unreadable config is the loader's to report, with the entry's index
        return None
    return {"model_type": getattr(cfg, "model_type", None), "n_layers": getattr(cfg, "num_hidden_layers", None),
            "d_model": getattr(cfg, "hidden_size", None)}


def check_architectures(entries: Sequence[Checkpoint]) -> None:
    """Refuse (:class:`~taskvec_interp.engine.ArchitectureError`, before any model loads) local checkpoint
    directories whose config.json give another architecture (model_type, n_layers, d_model) than the first's,
    naming both entries and the fields; other entries are compared when they load."""
    from ..engine import ArchitectureError
    from ..io import config_diffs

    shapes = [(e, a) for e in entries if (a := _local_architecture(e)) is not None]
    for entry, shape in shapes[1:]:
        first, want = shapes[0]
        diffs = config_diffs(want, shape, labels=(f"checkpoint {first.index}", f"checkpoint {entry.index}"))
        if diffs:
            raise ArchitectureError(f"checkpoint {entry.index} ({entry.label}) has another architecture than checkpoint "
                                    f"{first.index} ({first.label}): {'; '.join(diffs)}; a trajectory follows one "
                                    "model (allow_mixed_architectures=True runs them anyway)")


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
        """Tables as Parquet and config.json (the configuration, every entry with its status and model
        identity, library versions), as one result directory (:func:`taskvec_interp.io.write_result_dir`,
        kind ``"trajectory"``): an older trajectory in ``out`` is replaced whole, its finished checkpoints
        (``per_step/``, what a rerun skips) carried over; anything else there is refused."""
        bad = dict(zip(self.failed["index"], self.failed["reason"], strict=True))
        entries = [{**e.describe(), "status": "failed" if e.index in bad else "ok", "reason": bad.get(e.index),
                    "model": self.models.get(e.step)} for e in self.entries]
        record = {**self.config, "outcome": self.outcome, "checkpoints": entries,
                  "tables": [*self.tables, "failed"], "seconds": self.seconds,
                  "provenance": {"versions": provenance({})["versions"]}}
        with write_result_dir(out, KIND, self.config, keep=KEEP) as tmp:
            for name, table in {**self.tables, "failed": self.failed}.items():
                table.to_parquet(tmp / f"{name}.parquet", index=False)
            (tmp / "config.json").write_text(json.dumps(record, indent=2, default=str))
        return Path(out)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TrajectoryResult:
        """Read back what :meth:`save` wrote; ``ValueError`` naming the file when the directory is not a
        complete, intact trajectory result."""
        d = read_result_dir(directory, KIND)
        record = read_json(d / "config.json")
        if not isinstance(record, dict):
            raise ValueError(f"{d / 'config.json'} is not a trajectory record")
        outcome = record.pop("outcome", "accuracy")
        described = record.pop("checkpoints", [])
        names = record.pop("tables", [])
        seconds = record.pop("seconds", 0.0)
        record.pop("provenance", None)
        keys = {f.name for f in fields(Checkpoint)}
        entries = [Checkpoint(**{k: v for k, v in c.items() if k in keys}) for c in described]
        models = {c["step"]: c["model"] for c in described if c.get("model") is not None}
        source = str(d / "config.json")  # a table it names must be a file of this result (never followed out)
        tables = {name: read_parquet(listed_file(d, f"{name}.parquet" if isinstance(name, str) else name, source))
                  for name in names if name != "failed"}
        return cls(record, tables, read_parquet(d / "failed.parquet"), entries, models, seconds, outcome)


def trajectory_result(run: CheckpointRun, config: dict, outcome_table: str = "accuracy", column: str = "exact",
                      outcome: str = "accuracy", layer: int | None = None) -> TrajectoryResult:
    """Assemble a :class:`TrajectoryResult` from the loop's tables (td + ``outcome_table``)."""
    tables = {n: t[["step"] + [c for c in t.columns if c != "step"]] for n, t in run.tables.items()}
    if "td" in tables:
        tables["trajectory"] = trajectory_table(tables["td"], tables[outcome_table], column, outcome)
        tables["summary"] = trajectory_summary(tables["trajectory"], outcome, layer)
    return TrajectoryResult(config, tables, run.failed, run.entries, run.models, run.seconds, outcome)


@locks_out("out")  # one process at a time writes its per_step/ and result
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
        check_result_owner(out, KIND, KEEP)  # before any model loads: a directory of someone else's is refused
    if not config.allow_mixed_architectures:
        check_architectures(entries)  # local directories, from their config.json: before any model loads
    record = {"probe": "td_accuracy", **asdict(config), "family": fam.name}
    record.pop("allow_mixed_architectures")  # decides what may run together, not what a checkpoint's numbers are
    run = run_checkpoints(entries, sweep_probe(config, fam, progress=False),
                          load or language_model_loader(config.backend, config.dtype, config.device),
                          config=record, out=out, on_error=on_error, progress=progress,
                          same_architecture=not config.allow_mixed_architectures)
    if not run.tables:
        result = TrajectoryResult(record, {}, run.failed, run.entries, run.models, run.seconds)
        raise TrajectoryError(result)
    result = trajectory_result(run, record, layer=config.summary_layer)
    if out is not None:
        result.save(out)
    return result
