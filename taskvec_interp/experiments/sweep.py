"""TD over layers x shots and ICL accuracy per task x shots, and the TD-vs-accuracy fit (paper Fig. 4-5).

For each shot count one set of prompts (``n_per_task`` per task, Null included) is generated
greedily; the generation's prefill captures every layer's last-token residual, so TD and accuracy
read the same prompts from ONE forward pass. Results are tidy DataFrames saved next to the config.

TD gained from the context (``SweepConfig.controls``): the TD of the SAME queries without demonstrations
(``"input_only"``, once, ``shots == 0``) and with demonstrations whose outputs come from other tasks
(``"shuffled"``, at every shot count > 0), one capture pass per control prompt set
(:mod:`taskvec_interp.tasks.controls`). The TD table's ``context`` column tells the rows apart ("demos": the
ordinary k-shot rows; peaks, the fit and :func:`summarize` read only those); ``td_points`` holds every
point's leave-one-out correctness, and :func:`context_gain` the paired k-shot-minus-control difference.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
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
    read_saved_config,
)
from ..finite import NonFiniteError
from ..hooks import CAPTURE_LAYERS, check_layer_spec
from ..io import manifest_files, read_result_dir, write_result_dir
from ..probes.accuracy import icl_accuracy
from ..probes.decodability import METRICS, task_decodability
from ..results import provenance, read_json, read_parquet
from ..tasks import NULL_TASK, Prompt, PromptBuilder, PromptTemplate, TaskFamily, get_family
from ..tasks.controls import CONTROLS, input_only_prompts, shuffled_label_prompts
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

DEMOS = "demos"
"""The ``context`` of the ordinary k-shot rows of a TD table (the controls' rows are named by
:data:`~taskvec_interp.tasks.controls.CONTROLS`)."""

POINT_COLUMNS: tuple[str, ...] = ("layer", "shots", "context", "index", "task", "correct")
"""The columns of a sweep's ``td_points`` table: one row per (layer, prompt set, point); ``index`` is the
point's position in its prompt set (the same index is the same query in every context of one shot count, and in
the input-only set), ``correct`` whether its leave-one-out k-NN vote is its own task."""


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
    controls: tuple[str, ...] = opt((), "TD controls of the same queries beside k-shot TD, comma-separated: "
                                        "input_only (no demonstrations), shuffled (demonstration outputs drawn from "
                                        "other tasks)", choices=CONTROLS)
    shuffled_shots: tuple[int, ...] = opt((), "shot counts of the shuffled-label control, comma-separated "
                                              "(default: every shot count > 0; each is one more capture pass)")

    supports_replace: ClassVar[bool] = True
    """``replace`` is honoured: every shot count's queries are drawn with replacement, the same draws."""

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
        self.controls = check_controls("SweepConfig.controls", self.controls, self.shots)
        self.shuffled_shots = check_shuffled_shots("SweepConfig.shuffled_shots", self.shuffled_shots, self.shots,
                                                   self.controls)

    def check_shots(self) -> None:
        self.shots = check_ints("SweepConfig.shots", self.shots, 0)


def check_shuffled_shots(name: str, value: object, shots: Sequence[int], controls: Sequence[str]) -> tuple[int, ...]:
    """``value`` as a tuple of shot counts at which the shuffled-label control runs (empty: every shot count > 0),
    refused unless each is a shot count > 0 of ``shots`` and ``"shuffled"`` is among ``controls``."""
    value = check_ints(name, value, 1) if value else ()
    if value and "shuffled" not in controls:
        raise ValueError(f"{name}={list(value)} needs the 'shuffled' control, but controls={list(controls)}")
    bad = [s for s in value if s not in shots]
    if bad:
        raise ValueError(f"{name} must list shot counts of the sweep ({list(shots)}), got {bad}")
    return tuple(value)


def check_controls(name: str, value: object, shots: Sequence[int]) -> tuple[str, ...]:
    """``value`` as a tuple of distinct control names (:data:`CONTROLS`, possibly empty), refused when no shot
    count of ``shots`` has demonstrations for a control to take away or shuffle."""
    want = f"a list of distinct names of {CONTROLS} (or empty)"
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    for v in value:
        if not isinstance(v, str) or v not in CONTROLS:
            raise ValueError(f"{name} must be {want}, got {v!r} in {list(value)}; known controls: "
                             f"{', '.join(CONTROLS)}")
    if len(set(value)) != len(value):
        raise ValueError(f"{name} must not list a control twice, got {list(value)}")
    if value and not any(s > 0 for s in shots):
        raise ValueError(f"{name} must be empty when no prompt has demonstrations (every shot count is 0: the "
                         f"0-shot prompts are input only already, and there is nothing to shuffle), got "
                         f"{tuple(value)} with shots {tuple(shots)}")
    return tuple(value)


def empty_td_points() -> pd.DataFrame:
    """A ``td_points`` table with no rows (a sweep saved before the table existed)."""
    return pd.DataFrame({"layer": pd.Series(dtype="int64"), "shots": pd.Series(dtype="int64"),
                         "context": pd.Series(dtype="str"), "index": pd.Series(dtype="int64"),
                         "task": pd.Series(dtype="str"), "correct": pd.Series(dtype="bool")})


def with_context(td: pd.DataFrame) -> pd.DataFrame:
    """``td`` with a ``context`` column: a table written before the controls existed holds k-shot rows only, so a
    missing column reads as ``"demos"`` (placed after ``shots``). A table that has the column is returned as is."""
    if "context" in td.columns:
        return td
    td = td.copy()
    where = list(td.columns).index("shots") + 1 if "shots" in td.columns else len(td.columns)
    td.insert(where, "context", DEMOS)
    return td


def demos_rows(td: pd.DataFrame) -> pd.DataFrame:
    """The ordinary k-shot rows of a TD table (``context == "demos"``; every row of a table without the
    column): what peaks, the TD-vs-accuracy fit and the summary read."""
    return td[td["context"] == DEMOS] if "context" in td.columns else td


def point_table(td, shots: int, context: str) -> pd.DataFrame:
    """The ``td_points`` rows of one :class:`~taskvec_interp.probes.decodability.TaskDecodability`: every
    point's leave-one-out correctness at every layer (read off its predictions: no second k-NN)."""
    correct = (td.predictions == td.labels.unsqueeze(0)).numpy()  # [layer, n]
    n_layers, n = correct.shape
    tasks = np.asarray(td.label_names, dtype=object)[td.labels.numpy()]
    return pd.DataFrame({"layer": np.repeat(td.layers.numpy().astype("int64"), n),
                         "shots": np.full(n_layers * n, shots, dtype="int64"),
                         "context": [context] * (n_layers * n),
                         "index": np.tile(np.arange(n, dtype="int64"), n_layers),
                         "task": np.tile(tasks, n_layers),
                         "correct": correct.reshape(-1).astype(bool)})


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
    td_points: pd.DataFrame = field(default_factory=empty_td_points)
    """Per-point leave-one-out correctness (:data:`POINT_COLUMNS`) of every row set of ``td``: its per-layer
    means are ``td``'s overall values and its per-task means the task rows, exactly."""

    def __post_init__(self) -> None:
        self.td = with_context(self.td)  # a table from before the controls: every row is a k-shot row

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
        raw, model = read_saved_config(d, SweepConfig)
        config = SweepConfig(**raw)
        fit = {k: (math.nan if v is None else v) for k, v in read_json(d / "fit.json").items()}
        seconds = fit.pop("seconds", 0.0)
        acts = {}
        for name in manifest_files(d):  # only files the manifest vouches for
            if name.startswith("activations_") and name.endswith("shot.safetensors") and "/" not in name:
                t = load_file(str(d / name))
                acts[int(name.split("_")[1].removesuffix("shot.safetensors"))] = (t["activations"], t["labels"])
        tables = {name: read_parquet(d / f"{name}.parquet") for name in ("td", "accuracy", "predictions")}
        points = read_parquet(d / "td_points.parquet") if "td_points.parquet" in manifest_files(d) \
            else empty_td_points()  # a sweep saved before the table existed
        layers = tables["td"]["layer"].drop_duplicates().tolist()  # the captured layers, in capture order
        acts = {s: (Activations(a, layers) if a.shape[0] == len(layers) else a, lab)
                for s, (a, lab) in sorted(acts.items())}
        return cls(config, tables["td"], tables["accuracy"], tables["predictions"], fit, acts, seconds, model,
                   points)

    def _write(self, out: Path) -> None:
        config = asdict(self.config)
        if self.model:  # the model that produced the numbers, whatever the config's default said
            config |= {"model": self.model["name"], "backend": self.model["backend"],
                       "provenance": provenance(self.model)}
        (out / "config.json").write_text(json.dumps(config, indent=2))
        for name in ("td", "accuracy", "predictions", "td_points"):
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
    """The layer of the highest overall k-shot TD (at ``shots`` when the table has several shot counts; the
    controls' rows never count)."""
    td = demos_rows(td)
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

    ``layer=None`` takes the peak of the overall TD averaged over shot counts. Only the k-shot rows of ``td``
    enter (``context == "demos"``), never the controls'.
    """
    from scipy.stats import linregress

    td = demos_rows(td)
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

    ``config.controls``: also the TD of the same queries without demonstrations (``"input_only"``: once,
    ``shots == 0``, from the queries every shot count shares) and with demonstration outputs drawn from other
    tasks (``"shuffled"``: at every shot count > 0, or at ``config.shuffled_shots``), one capture pass per control
    prompt set. Every prompt set (controls included) is built and checked before any model work.
    """
    t0 = time.perf_counter()
    fam = family if family is not None else get_family(config.family, **config.family_kwargs)
    template = PromptTemplate(**config.template)
    builder = PromptBuilder(template)
    controls = check_controls("SweepConfig.controls", config.controls, config.shots)  # a config changed since
    given: dict[int, list[Prompt]] = {}
    if prompts is not None:
        for p in prompts:
            if p.task not in fam.task_names:
                raise ValueError(f"prompt of unknown task {p.task!r}; family {fam.name!r} has {fam.task_names}")
            given.setdefault(p.n_shots, []).append(p)
        missing = [s for s in config.shots if s not in given]
        if missing:
            raise ValueError(f"no ready-made prompts with {missing} shots (have {sorted(given)})")
    sets = {shots: given.get(shots) or builder.build(fam, n_per_task=config.n_per_task, shots=shots,
                                                     seed=config.seed, replace=config.replace)
            for shots in config.shots}  # all built (and checked) before the model runs
    plan = _control_plan(controls, sets, template, config.seed, config.shuffled_shots)
    td_frames, acc_frames, pred_frames, point_frames, acts = [], [], [], [], {}

    def decode(activations, prompt_set: list[Prompt], layers, shots: int, context: str) -> None:
        td = task_decodability(activations, [p.label for p in prompt_set], k=config.k, metric=config.metric,
                               label_names=fam.task_names, layers=layers, n_boot=config.n_boot, seed=config.seed)
        td_frames.append(td.to_frame().assign(shots=shots, context=context, family=fam.name))
        point_frames.append(point_table(td, shots, context))

    captured: dict[tuple[str, ...], Activations] = {}  # k-shot prompt texts -> their activations (kept in acts too)
    bar = tqdm(total=len(sets) + len(plan), desc=f"{fam.name} prompt sets", disable=not progress)
    for shots, prompts_s in sets.items():
        acc = icl_accuracy(adapter, prompts_s, max_new_tokens=config.max_new_tokens,
                           stop=template.example_separator, capture_layers=config.layers,
                           batch_size=config.batch_size, progress=progress)
        decode(acc.activations, prompts_s, acc.layers, shots, DEMOS)
        acc_frames.append(acc.by_task().assign(family=fam.name))
        pred_frames.append(acc.predictions.assign(family=fam.name))
        acts[shots] = (acc.activations, torch.tensor([p.label for p in prompts_s]))
        if isinstance(acc.activations, Activations):
            captured[tuple(p.text for p in prompts_s)] = acc.activations
        bar.update()
        for context, ctrl_shots, ctrl in [c for c in plan if c[1] == shots]:
            _capture_and_decode(adapter, config, ctrl, ctrl_shots, context, captured, decode, progress)
            bar.update()
    for context, ctrl_shots, ctrl in [c for c in plan if c[1] not in sets]:  # input only (when 0 is no shot count)
        _capture_and_decode(adapter, config, ctrl, ctrl_shots, context, captured, decode, progress)
        bar.update()
    bar.close()
    td_all = pd.concat(td_frames, ignore_index=True)
    acc_all = pd.concat(acc_frames, ignore_index=True)
    fit = fit_td_accuracy(td_all, acc_all, config.fit_layer, config.fit_include_null)
    fit["family"] = fam.name
    return SweepResult(config, td_all, acc_all, pd.concat(pred_frames, ignore_index=True), fit, acts,
                       time.perf_counter() - t0, adapter.identity(), pd.concat(point_frames, ignore_index=True))


def _control_plan(controls: Sequence[str], sets: dict[int, list[Prompt]], template: PromptTemplate,
                  seed: int, shuffled_shots: Sequence[int] = ()) -> list[tuple[str, int, list[Prompt]]]:
    """``(context, shots, prompts)`` of every control prompt set, built from the k-shot sets (ValueError before
    any model work when they cannot be: input only needs the same queries at every shot count > 0)."""
    with_demos = {s: p for s, p in sets.items() if s > 0}
    plan: list[tuple[str, int, list[Prompt]]] = []
    if "input_only" in controls:
        (first, base), *rest = with_demos.items()
        key = [(p.task, p.query) for p in base]
        for s, other in rest:
            if [(p.task, p.query) for p in other] != key:
                raise ValueError(f"the input-only control needs the same queries at every shot count > 0, but the "
                                 f"{s}-shot prompts' (task, query) sequence differs from the {first}-shot prompts' "
                                 "(ready-made prompts must list the same queries in the same order per shot count)")
        plan.append(("input_only", 0, input_only_prompts(base, template)))
    if "shuffled" in controls:
        plan += [("shuffled", s, shuffled_label_prompts(p, template, seed)) for s, p in with_demos.items()
                 if not shuffled_shots or s in shuffled_shots]
    return plan


def _capture_and_decode(adapter: Adapter, config: SweepConfig, prompts: list[Prompt], shots: int, context: str,
                        captured: dict, decode, progress: bool) -> None:
    """One capture pass over a control prompt set (none when a k-shot set of the very same texts was read: the
    input-only set of a sweep with 0 shots among its shot counts) and its TD."""
    texts = tuple(p.text for p in prompts)
    acts = captured.get(texts)
    if acts is None:  # not kept afterwards: only the k-shot sets' activations stay in the result
        acts = adapter.capture(list(texts), layers=config.layers, batch_size=config.batch_size, progress=progress)
    decode(acts, prompts, acts.layers, shots, context)


def summarize(result: SweepResult, shots: Sequence[int] | None = None) -> pd.DataFrame:
    """Peak layer and TD per shot count, next to mean accuracy (a compact table for notes and the CLI)."""
    rows = []
    td = demos_rows(result.td)
    for s in shots or result.config.shots:
        overall = td[(td["level"] == "overall") & (td["shots"] == s)]
        peak = overall.loc[overall["td"].idxmax()]
        acc = result.accuracy[(result.accuracy["shots"] == s) & (result.accuracy["task"] != NULL_TASK)]
        rows.append({"shots": s, "peak_layer": int(peak["layer"]), "peak_td": float(peak["td"]),
                     "chance": float(peak["chance"]), "mean_exact": float(acc["exact"].mean()),
                     "mean_first_token": float(acc["first_token"].mean())})
    return pd.DataFrame(rows)


GAIN_COLUMNS: tuple[str, ...] = ("shots", "control", "control_shots", "layer", "task", "n", "td_demos", "td_control",
                                 "gain", "ci_low", "ci_high", "p_value")
"""The columns of :func:`context_gain`'s table."""


def context_gain(result: SweepResult, *, by_task: bool = False, n_boot: int | None = None,
                 ci_level: float = 0.95, seed: int | None = None) -> pd.DataFrame:
    """TD the context put there: per layer, k-shot TD minus each control's TD on the same queries.

    One row per (k-shot count > 0, control, layer) (and per task with ``by_task``; ``task`` is ``"all"``
    otherwise): ``td_demos`` (the k-shot TD), ``td_control`` (the input-only TD, ``control_shots == 0``, or the
    shuffled-label TD at the same k), ``gain = td_demos - td_control``, its percentile bootstrap CI (``ci_level``)
    and a two-sided bootstrap p-value (twice the smaller share of resampled gains on either side of 0), the
    bootstrap PAIRED over points: the same query's two leave-one-out correctness indicators are resampled
    together (``n_boot`` resamples, default the sweep's; ``seed`` default the sweep's; ``n_boot=0``: NaN CI and
    p). Read from ``result.td_points``. ``ValueError`` when the sweep ran no control
    (``SweepConfig.controls``) or a control's points are not the same queries as the k-shot points.
    """
    from ..probes.decodability import _bootstrap_means

    points = result.td_points
    n_boot = result.config.n_boot if n_boot is None else n_boot
    seed = result.config.seed if seed is None else seed
    check_int("context_gain n_boot", n_boot, 0)
    if not 0.0 < ci_level < 1.0:
        raise ValueError(f"ci_level must be in (0, 1), got {ci_level}")
    have = [c for c in CONTROLS if len(points) and (points["context"] == c).any()]
    if not have:
        raise ValueError("the sweep has no control rows to compare with (run it with SweepConfig.controls, e.g. "
                         f"controls=('input_only', 'shuffled'); has contexts {sorted(set(points['context']))})")
    q = torch.tensor([(1 - ci_level) / 2, (1 + ci_level) / 2], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    demos = points[points["context"] == DEMOS]
    for shots in sorted(s for s in set(demos["shots"]) if s > 0):
        d_layers, d_task, d_correct = _point_matrix(demos[demos["shots"] == shots])
        for control in have:
            ctrl_shots = 0 if control == "input_only" else shots
            part = points[(points["context"] == control) & (points["shots"] == ctrl_shots)]
            if part.empty:
                continue
            c_layers, c_task, c_correct = _point_matrix(part)
            if c_layers != d_layers or not np.array_equal(c_task, d_task):
                raise ValueError(f"the {control} points ({ctrl_shots} shots) are not the {shots}-shot points' queries "
                                 "(layers, indices or tasks differ): no paired difference")
            diff = d_correct - c_correct  # [layer, n]
            groups = [("all", np.ones(len(d_task), dtype=bool))]
            if by_task:
                groups += [(t, d_task == t) for t in pd.unique(d_task)]
            for task, mask in groups:
                dd = torch.from_numpy(diff[:, mask])
                lo = hi = p = torch.full((len(d_layers),), math.nan, dtype=torch.float64)
                if n_boot > 0:
                    boot = _bootstrap_means(dd, n_boot, gen)  # [boot, layer]
                    lo, hi = torch.quantile(boot, q, dim=0)
                    side = torch.minimum((boot <= 0).double().mean(0), (boot >= 0).double().mean(0))
                    p = (2 * side).clamp(max=1.0)
                for i, layer in enumerate(d_layers):
                    rows.append({"shots": int(shots), "control": control, "control_shots": ctrl_shots,
                                 "layer": int(layer), "task": task, "n": int(mask.sum()),
                                 "td_demos": float(d_correct[i, mask].mean()),
                                 "td_control": float(c_correct[i, mask].mean()), "gain": float(dd[i].mean()),
                                 "ci_low": float(lo[i]), "ci_high": float(hi[i]), "p_value": float(p[i])})
    return pd.DataFrame(rows, columns=list(GAIN_COLUMNS))


def _point_matrix(points: pd.DataFrame) -> tuple[list[int], np.ndarray, np.ndarray]:
    """``(layers, task per index, correctness [layer, index] as float64)`` of one prompt set's points."""
    points = points.sort_values(["layer", "index"], kind="stable")
    layers = points["layer"].drop_duplicates().tolist()
    n = len(points) // max(len(layers), 1)
    if n * len(layers) != len(points):
        raise ValueError("td_points: a prompt set's points do not cover every layer once per index")
    first = points[points["layer"] == layers[0]]
    if first["index"].tolist() != list(range(n)):
        raise ValueError("td_points: a prompt set's indices are not 0..n-1")
    correct = points["correct"].to_numpy(dtype=np.float64).reshape(len(layers), n)
    return layers, first["task"].to_numpy(dtype=object), correct
