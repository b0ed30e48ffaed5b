"""TD over layers x shots and ICL accuracy per task x shots, and the TD-vs-accuracy fit (paper Fig. 4-5).

For each shot count one set of prompts (``n_per_task`` per task, Null included) is generated
greedily; the generation's prefill captures every layer's last-token residual, so TD and accuracy
read the same prompts from ONE forward pass. Results are tidy DataFrames saved next to the config.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..activations import Activations
from ..adapters.base import Adapter
from ..adapters.load import BACKENDS
from ..probes.accuracy import icl_accuracy
from ..probes.decodability import METRICS, task_decodability
from ..results import check_result_dir, provenance, read_json, read_parquet, replacing_dir
from ..tasks import NULL_TASK, Prompt, PromptBuilder, PromptTemplate, TaskFamily, get_family
from ..validate import check_bool, check_choice, check_int, check_str


@dataclass
class SweepConfig:
    """Everything that determines a sweep's numbers (saved as config.json next to the results).

    ``template`` holds :class:`PromptTemplate` fields; ``family_kwargs`` go to ``get_family``.
    ``fit_layer``: layer of the TD-vs-accuracy fit; ``None`` = the peak of the mean overall TD over
    shot counts. The Null task enters TD (as in the paper) but not the fit unless ``fit_include_null``.
    """

    model: str = "smollm2-135m"
    backend: str = "torch"
    family: str = "bitwise"
    shots: tuple[int, ...] = (1, 4, 10)
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
    fit_layer: int | None = None
    fit_include_null: bool = False
    save_activations: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.shots, (str, bytes)) or not isinstance(self.shots, (list, tuple)) or not self.shots:
            raise ValueError(f"SweepConfig.shots must be a non-empty list of ints >= 0, got {self.shots!r}")
        for s in self.shots:
            check_int("SweepConfig.shots entries", s, 0)
        if len(set(self.shots)) != len(self.shots):
            raise ValueError(f"SweepConfig.shots lists a shot count twice: {list(self.shots)}")
        self.shots = tuple(self.shots)
        check_int("SweepConfig.n_per_task", self.n_per_task, 1)
        check_int("SweepConfig.seed", self.seed, 0)
        check_int("SweepConfig.k", self.k, 1)
        check_int("SweepConfig.batch_size", self.batch_size, 1)
        check_int("SweepConfig.n_boot", self.n_boot, 0)
        if self.max_new_tokens is not None:
            check_int("SweepConfig.max_new_tokens", self.max_new_tokens, 1)
        if self.fit_layer is not None:
            check_int("SweepConfig.fit_layer", self.fit_layer, 0)
        check_choice("SweepConfig.metric", self.metric, METRICS)
        check_choice("SweepConfig.backend", self.backend, BACKENDS)
        check_str("SweepConfig.family", self.family)
        check_bool("SweepConfig.fit_include_null", self.fit_include_null)
        check_bool("SweepConfig.save_activations", self.save_activations)
        if isinstance(self.layers, str):
            check_choice("SweepConfig.layers", self.layers, ("all",))
        elif not isinstance(self.layers, (list, tuple)) or not self.layers:
            raise ValueError(f"SweepConfig.layers must be 'all' or a non-empty list of ints, got {self.layers!r}")
        else:
            for layer in self.layers:
                if isinstance(layer, bool) or not isinstance(layer, int):
                    raise ValueError(f"SweepConfig.layers entries must be ints, got {layer!r}")
        for name in ("template", "family_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"SweepConfig.{name} must be a dict, got {getattr(self, name)!r}")
        # leave-one-out k-NN over n_per_task points per task: each has n_per_task - 1 same-task neighbours
        if self.k >= self.n_per_task - 1:
            raise ValueError(f"SweepConfig.k={self.k} is not below n_per_task - 1 = {self.n_per_task - 1}: each "
                             f"prompt has only {self.n_per_task - 1} same-task neighbours, so TD would read low "
                             f"whatever the model does; use n_per_task >= {self.k + 2} or a smaller k")


@dataclass
class SweepResult:
    config: SweepConfig
    td: pd.DataFrame
    accuracy: pd.DataFrame
    predictions: pd.DataFrame
    fit: dict
    activations: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """shots -> (last-token activations [layer, prompt, d_model], labels [prompt]); on disk only if
    ``config.save_activations``."""
    seconds: float = 0.0
    model: dict = field(default_factory=dict)
    """The adapter's real identity (``Adapter.identity()``): recorded in config.json."""

    def save(self, out: str | Path) -> Path:
        """Write config.json, fit.json and td / accuracy / predictions as Parquet (+ activations safetensors).

        Parquet, not CSV: it keeps dtypes, and a task named "null" would read back as NaN from CSV.
        """
        with replacing_dir(out) as tmp:  # an older result in ``out`` is replaced whole, never mixed in
            self._write(tmp)
        return Path(out)

    def _write(self, out: Path) -> None:
        config = asdict(self.config)
        if self.model:  # the model that produced the numbers, whatever the config's default said
            config |= {"model": self.model["name"], "backend": self.model["backend"],
                       "provenance": provenance(self.model)}
        (out / "config.json").write_text(json.dumps(config, indent=2))
        for name in ("td", "accuracy", "predictions"):
            getattr(self, name).to_parquet(out / f"{name}.parquet", index=False)
        if self.config.save_activations:
            for shots, (acts, labels) in self.activations.items():
                save_file({"activations": acts.contiguous(), "labels": labels.contiguous()},
                          str(out / f"activations_{shots}shot.safetensors"))
        fit = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.fit.items()}
        # fit.json last: its presence marks a complete result
        (out / "fit.json").write_text(json.dumps({**fit, "seconds": self.seconds}, indent=2))  # strict JSON


def load_sweep(directory: str | Path) -> SweepResult:
    """Read back what :meth:`SweepResult.save` wrote (activations only when they were saved)."""
    from safetensors.torch import load_file

    d = check_result_dir(directory, ("config.json", "fit.json", "td.parquet", "accuracy.parquet",
                                     "predictions.parquet"), "TD sweep")
    raw = read_json(d / "config.json")
    model = raw.pop("provenance", {}).get("model", {})
    config = SweepConfig(**raw)
    fit = {k: (math.nan if v is None else v) for k, v in read_json(d / "fit.json").items()}
    seconds = fit.pop("seconds", 0.0)
    acts = {}
    for path in sorted(d.glob("activations_*shot.safetensors")):
        t = load_file(str(path))
        acts[int(path.name.split("_")[1].removesuffix("shot.safetensors"))] = (t["activations"], t["labels"])
    tables = {name: read_parquet(d / f"{name}.parquet") for name in ("td", "accuracy", "predictions")}
    layers = tables["td"]["layer"].drop_duplicates().tolist()  # the captured layers, in capture order
    acts = {s: (Activations(a, layers) if a.shape[0] == len(layers) else a, lab) for s, (a, lab) in acts.items()}
    return SweepResult(config, tables["td"], tables["accuracy"], tables["predictions"], fit, acts, seconds, model)


def peak_layer_of(td: pd.DataFrame, shots: int | None = None) -> int:
    """The layer of the highest overall TD (at ``shots`` when the table has several shot counts)."""
    overall = td[td["level"] == "overall"]
    if shots is not None and "shots" in overall:
        if shots not in set(overall["shots"]):
            raise ValueError(f"the TD table has no {shots}-shot rows (has {sorted(set(overall['shots']))})")
        overall = overall[overall["shots"] == shots]
    if overall.empty:
        raise ValueError("the TD table has no overall rows")
    return int(overall.loc[overall["td"].idxmax(), "layer"])


def fit_td_accuracy(
    td: pd.DataFrame, accuracy: pd.DataFrame, layer: int | None = None, include_null: bool = False,
) -> dict:
    """Linear fit of per-task TD at one layer vs exact-match accuracy over tasks x shots; R^2.

    ``layer=None`` takes the peak of the overall TD averaged over shot counts.
    """
    from scipy.stats import linregress

    overall = td[td["level"] == "overall"]
    if layer is None:
        layer = int(overall.groupby("layer")["td"].mean().idxmax())
    elif layer not in set(overall["layer"]):
        raise ValueError(f"fit layer {layer} is not among the sweep's layers")
    per_task = td[(td["level"] == "task") & (td["layer"] == layer)][["task", "shots", "td"]]
    points = per_task.merge(accuracy[["task", "shots", "exact"]], on=["task", "shots"])
    if not include_null:
        points = points[points["task"] != NULL_TASK]
    fit = {"layer": layer, "n_points": len(points), "r2": math.nan, "slope": math.nan, "intercept": math.nan}
    if len(points) >= 3 and points["td"].nunique() > 1 and points["exact"].nunique() > 1:
        reg = linregress(points["td"], points["exact"])
        fit.update(r2=float(reg.rvalue**2), slope=float(reg.slope), intercept=float(reg.intercept),
                   p_value=float(reg.pvalue))
    else:
        fit["note"] = "R^2 undefined: fewer than 3 points or constant TD/accuracy"
    return fit


def run_sweep(adapter: Adapter, config: SweepConfig, family: TaskFamily | None = None,
              progress: bool = True, prompts: Sequence[Prompt] | None = None) -> SweepResult:
    """TD (all layers) and ICL accuracy for every shot count of ``config``, one pass per prompt batch.

    ``prompts``: ready-made prompts instead of building them from the family; they are grouped by
    their number of demonstrations, and every shot count of ``config`` must be among them.
    """
    t0 = time.perf_counter()
    fam = family if family is not None else get_family(config.family, **config.family_kwargs)
    template = PromptTemplate(**config.template)
    builder = PromptBuilder(template)
    given: dict[int, list[Prompt]] = {}
    if prompts is not None:
        for p in prompts:
            if p.task not in fam.task_names:
                raise ValueError(f"prompt of unknown task {p.task!r}; family {fam.name!r} has {fam.task_names}")
            given.setdefault(p.n_shots, []).append(p)
        missing = [s for s in config.shots if s not in given]
        if missing:
            raise ValueError(f"no ready-made prompts with {missing} shots (have {sorted(given)})")
    td_frames, acc_frames, pred_frames, acts = [], [], [], {}
    for shots in tqdm(config.shots, desc=f"{fam.name} shots", disable=not progress):
        prompts_s = given.get(shots) or builder.build(fam, n_per_task=config.n_per_task, shots=shots,
                                                      seed=config.seed)
        acc = icl_accuracy(adapter, prompts_s, max_new_tokens=config.max_new_tokens,
                           stop=template.example_separator, capture_layers=config.layers,
                           batch_size=config.batch_size, progress=progress)
        labels = [p.label for p in prompts_s]
        td = task_decodability(acc.activations, labels, k=config.k, metric=config.metric,
                               label_names=fam.task_names, layers=acc.layers, n_boot=config.n_boot,
                               seed=config.seed)
        td_frames.append(td.to_frame().assign(shots=shots, family=fam.name))
        acc_frames.append(acc.by_task().assign(family=fam.name))
        pred_frames.append(acc.predictions.assign(family=fam.name))
        acts[shots] = (acc.activations, torch.tensor(labels))
    td_all = pd.concat(td_frames, ignore_index=True)
    acc_all = pd.concat(acc_frames, ignore_index=True)
    fit = fit_td_accuracy(td_all, acc_all, config.fit_layer, config.fit_include_null)
    fit["family"] = fam.name
    return SweepResult(config, td_all, acc_all, pd.concat(pred_frames, ignore_index=True), fit, acts,
                       time.perf_counter() - t0, adapter.identity())


def summarize(result: SweepResult, shots: Sequence[int] | None = None) -> pd.DataFrame:
    """Peak layer and TD per shot count, next to mean accuracy (a compact table for notes and the CLI)."""
    rows = []
    for s in shots or result.config.shots:
        overall = result.td[(result.td["level"] == "overall") & (result.td["shots"] == s)]
        peak = overall.loc[overall["td"].idxmax()]
        acc = result.accuracy[(result.accuracy["shots"] == s) & (result.accuracy["task"] != NULL_TASK)]
        rows.append({"shots": s, "peak_layer": int(peak["layer"]), "peak_td": float(peak["td"]),
                     "chance": float(peak["chance"]), "mean_exact": float(acc["exact"].mean()),
                     "mean_first_token": float(acc["first_token"].mean())})
    return pd.DataFrame(rows)
