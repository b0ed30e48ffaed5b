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
from ..config import (
    PromptSetConfig,
    backend_field,
    backend_names,
    batch_size_field,
    k_field,
    max_new_tokens_field,
    model_field,
    n_boot_field,
    opt,
)
from ..finite import NonFiniteError
from ..hooks import CAPTURE_LAYERS, check_layer_spec
from ..io import manifest_files, read_result_dir, write_result_dir
from ..probes.accuracy import icl_accuracy
from ..probes.decodability import METRICS, task_decodability
from ..results import provenance, read_json, read_parquet
from ..tasks import NULL_TASK, Prompt, PromptBuilder, PromptTemplate, TaskFamily, get_family
from ..validate import (
    check_bool,
    check_choice,
    check_int,
    check_ints,
    check_knn_k,
    check_n_boot,
    check_optional_int,
    check_str,
)

KIND = "sweep"
"""The result kind a sweep's directory is marked with (``result.json``)."""


@dataclass
class SweepConfig(PromptSetConfig):
    """Everything that determines a sweep's numbers (saved as config.json next to the results).

    The prompt set (family, template, shots, n_per_task, seed) is :class:`PromptSetConfig`'s; here
    ``shots`` is a tuple of shot counts, one prompt set each. ``template`` holds :class:`PromptTemplate`
    fields; ``family_kwargs`` go to ``get_family``. ``fit_layer``: layer of the TD-vs-accuracy fit;
    ``None`` = the peak of the mean overall TD over shot counts. The Null task enters TD (as in the paper)
    but not the fit unless ``fit_include_null``.
    """

    shots: tuple[int, ...] = opt((1, 4, 10), "shot counts (demonstrations per prompt), comma-separated")
    model: str = model_field()
    backend: str = backend_field()
    k: int = k_field()
    metric: str = opt("euclidean", "distance of the k-NN", choices=METRICS)
    layers: str | list[int] = opt("all", "layers to capture: all | first:K | last:K | A-B | 3,5,7")
    batch_size: int = batch_size_field()
    max_new_tokens: int | None = max_new_tokens_field()
    n_boot: int = n_boot_field()
    fit_layer: int | None = opt(None, "layer of the TD-vs-accuracy fit (default: the peak of the mean overall TD)")
    fit_include_null: bool = opt(False, "include the Null task in the TD-vs-accuracy fit")
    save_activations: bool = opt(False, "also save the last-token activations (safetensors)")

    def __post_init__(self) -> None:
        self.check_prompt_set()
        check_str("SweepConfig.model", self.model, allow_empty=True)  # "" in a trajectory's probe
        check_choice("SweepConfig.backend", self.backend, backend_names())
        check_knn_k("SweepConfig.k", self.k, self.n_per_task, "n_per_task")
        check_choice("SweepConfig.metric", self.metric, METRICS)
        self.layers = check_layer_spec(self.layers, CAPTURE_LAYERS, "SweepConfig.layers")
        check_int("SweepConfig.batch_size", self.batch_size, 1)
        check_optional_int("SweepConfig.max_new_tokens", self.max_new_tokens, 1)
        check_n_boot("SweepConfig.n_boot", self.n_boot)
        check_optional_int("SweepConfig.fit_layer", self.fit_layer, 0)
        check_bool("SweepConfig.fit_include_null", self.fit_include_null)
        check_bool("SweepConfig.save_activations", self.save_activations)

    def check_shots(self) -> None:
        self.shots = check_ints("SweepConfig.shots", self.shots, 0)


@dataclass
class SweepResult:
    config: SweepConfig
    td: pd.DataFrame
    accuracy: pd.DataFrame
    predictions: pd.DataFrame
    fit: dict
    activations: dict[int, tuple[Activations, torch.Tensor]] = field(default_factory=dict)
    """shots -> (last-token activations [layer, prompt, d_model], labels [prompt]); on disk only if
    ``config.save_activations``."""
    seconds: float = 0.0
    model: dict = field(default_factory=dict)
    """The adapter's real identity (``Adapter.identity()``): recorded in config.json."""

    def save(self, out: str | Path) -> Path:
        """Write config.json, fit.json and td / accuracy / predictions as Parquet (+ activations safetensors)
        as one result directory (:func:`taskvec_interp.io.write_result_dir`, kind ``"sweep"``): an older
        sweep in ``out`` is replaced whole, never mixed in; anything else there is refused.

        Parquet, not CSV: it keeps dtypes, and a task named "null" would read back as NaN from CSV.
        """
        with write_result_dir(out, KIND, asdict(self.config)) as tmp:
            self._write(tmp)
        return Path(out)

    @classmethod
    def load(cls, directory: str | Path) -> SweepResult:
        """Read back what :meth:`save` wrote (activations only when they were saved); ``ValueError`` naming the
        file when the directory is not a complete, intact sweep result."""
        from safetensors.torch import load_file

        d = read_result_dir(directory, KIND)
        raw = read_json(d / "config.json")
        model = raw.pop("provenance", {}).get("model", {})
        from ..config import upgrade_config

        config = SweepConfig(**upgrade_config(SweepConfig, raw))
        fit = {k: (math.nan if v is None else v) for k, v in read_json(d / "fit.json").items()}
        seconds = fit.pop("seconds", 0.0)
        acts = {}
        for name in manifest_files(d):  # only files the manifest vouches for
            if name.startswith("activations_") and name.endswith("shot.safetensors") and "/" not in name:
                t = load_file(str(d / name))
                acts[int(name.split("_")[1].removesuffix("shot.safetensors"))] = (t["activations"], t["labels"])
        tables = {name: read_parquet(d / f"{name}.parquet") for name in ("td", "accuracy", "predictions")}
        layers = tables["td"]["layer"].drop_duplicates().tolist()  # the captured layers, in capture order
        acts = {s: (Activations(a, layers) if a.shape[0] == len(layers) else a, lab)
                for s, (a, lab) in sorted(acts.items())}
        return cls(config, tables["td"], tables["accuracy"], tables["predictions"], fit, acts, seconds, model)

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
        (out / "fit.json").write_text(json.dumps({**fit, "seconds": self.seconds}, indent=2))  # strict JSON


def load_sweep(directory: str | Path) -> SweepResult:
    """:meth:`SweepResult.load` (kept: notebooks and scripts call it)."""
    return SweepResult.load(directory)


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
    if len(overall) and overall["td"].isna().all():  # an all-NaN evaluation has no peak and no fit
        raise NonFiniteError(f"the overall TD is NaN at every layer ({sorted(set(overall['layer']))}): nothing to fit; "
                             "the activations it was computed from were not finite")
    if layer is None:
        layer = int(overall.groupby("layer")["td"].mean().idxmax())
    elif layer not in set(overall["layer"]):
        raise ValueError(f"fit layer {layer} is not among the sweep's layers")
    per_task = td[(td["level"] == "task") & (td["layer"] == layer)][["task", "shots", "td"]]
    points = per_task.merge(accuracy[["task", "shots", "exact"]], on=["task", "shots"])
    if not include_null:
        points = points[points["task"] != NULL_TASK]
    for col, what in (("td", f"TD at layer {layer}"), ("exact", "accuracy")):
        if len(points) and points[col].isna().all():
            raise NonFiniteError(f"{what} is NaN for every task x shots point of the fit: an all-NaN evaluation is "
                                 "an error, not a fit")
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
