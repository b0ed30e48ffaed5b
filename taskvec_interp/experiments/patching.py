"""Interventions: task vectors patched into the residual stream, swept over layers (paper Sec. 4.1, Fig. 20).

Two layers of code:

* :func:`~taskvec_interp.engine.run_conditions` (in ``engine.py``), the generic loop (in the spirit of TransformerLens's
  ``generic_activation_patch``): a list of conditions (plain dicts: the index), an ``evaluate``
  callback that runs a chunk of them and returns one table per condition, and a tidy DataFrame out,
  one row per condition and result row, the condition's fields as columns. Chunks can be saved as
  they finish, so a killed run resumes. The synthetic patching matrix is a call of it.
* :func:`run_patching`, the language-model experiment: task vectors (``probes/vectors.py``) from one
  prompt set, interventions (add with a scale, or replace) at the query's last prompt token of
  another, positive (the prompt's own task), negative (the Null task) or any source task (a
  source x target matrix), k-shot or zero-shot, over layers; exact-match accuracy per task and
  condition with paired bootstrap CIs (each prediction also scored by first content token, with its query);
  each task generating its own answer budget. Only when asked (``PatchConfig.td``): TD per layer and task
  from the baseline generation's prefill (the same pass), and the accuracy change's relation to TD.

Every intervention is a plain hook (``hooks.add`` / ``hooks.replace``) at the query's last prompt
token, so all conditions branch off one shared prompt prefix (:meth:`Adapter.generate_branches`):
the prefix runs once per prompt batch, each condition only its last token and the answer.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch

from .. import hooks as H
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
from ..engine import check_conditions_dir, clear_chunks, run_conditions
from ..interventions import get_intervention, intervention_names
from ..io import config_diffs, manifest_fingerprint, read_result_dir, sha256_file, write_result_dir
from ..probes.accuracy import (
    answer_budgets,
    bootstrap_accuracy,
    bootstrap_means,
    generate_branches_by_budget,
    generate_by_budget,
    score_generation,
    task_budgets,
)
from ..probes.decodability import task_decodability
from ..probes.vectors import DEFINITIONS, TaskVectors, task_vectors
from ..results import provenance, read_json, read_parquet, write_json
from ..tasks import NULL_TASK, Prompt, PromptBuilder, PromptTemplate, TaskFamily, get_family
from ..validate import (
    check_bool,
    check_choice,
    check_choices,
    check_int,
    check_knn_k,
    check_n_boot,
    check_number,
    check_optional_int,
    check_seed,
    check_str,
)
from .sweep import SweepResult, peak_layer_of

# ------------------------------------------------------------------------------------------------
# Interventions as hooks
# ------------------------------------------------------------------------------------------------
DIRECTIONS: tuple[str, ...] = ("positive", "negative", "matrix")
KIND = "patching"
"""The result kind a patching directory is marked with (``result.json``)."""
TABLES = ("accuracy", "predictions", "td", "relation")
PREDICTION_COLUMNS = ["prompt_id", "task", "query", "answer", "generated", "exact", "first_token"]
"""What each prediction row keeps of :func:`~taskvec_interp.probes.accuracy.score_generation` (plus the
condition's fields, ``engine`` and, with ``logprob``, the answer's log-probability)."""
OWN = "own"
NO_VECTOR = "-"
"""The ``vector`` of a condition whose intervention takes none (e.g. ``ablate``)."""


def intervention_hooks(
    condition: Mapping, vectors: TaskVectors, prompts: Sequence[Prompt], *, component: str = "resid_post",
    position: int | Sequence[int] = -1, center: bool = False,
) -> list[tuple[H.Site, H.HookFn]]:
    """The hook of one condition: ``{"layer", "mode", "vector", "scale"}``.

    ``mode`` names an intervention of the registry (``interventions.py``: ``add``, ``replace``,
    ``ablate``, or one you registered); ``"none"`` is the baseline (no hook). ``vector`` is ``"own"``
    (each prompt gets its own task's vector: positive), a task name (every prompt gets that task's
    vector; the Null task's: negative) or ``"-"`` for an intervention that takes no vector.
    ``center``: a centerable intervention (``add``) gets only the task-specific part, the vector minus
    the mean of every task's vector at that layer (task vectors share a large common component).
    """
    if condition["mode"] == "none" or condition["vector"] == "none":
        return []
    spec = get_intervention(condition["mode"])
    layer = int(condition["layer"])
    vec = None
    if spec.needs_vector:
        at = vectors.vectors[vectors.layer_index(layer)]  # [task, d]
        if center and spec.centerable:
            at = at - at.mean(0)
        if condition["vector"] == OWN:
            vec = at[[vectors.task_index(p.task) for p in prompts]]  # [n_prompts, d], call order
        else:
            vec = at[vectors.task_index(condition["vector"])]
    scale = float(condition["scale"]) if spec.uses_scale else 1.0
    return [(H.Site(layer, component), spec.build(vec, position, scale))]


def direction_of(vector: str, null: str = NULL_TASK) -> str:
    """``baseline`` / ``positive`` (own task) / ``negative`` (Null) / ``cross`` (another task's vector) /
    ``ablation`` (an intervention without a vector)."""
    return {"none": "baseline", OWN: "positive", null: "negative", NO_VECTOR: "ablation"}.get(vector, "cross")


# ------------------------------------------------------------------------------------------------
# The language-model experiment
# ------------------------------------------------------------------------------------------------
@dataclass
class PatchConfig(PromptSetConfig):
    """Everything that determines a patching run's numbers (saved as config.json next to the results).

    Evaluation prompts (the prompt set of :class:`PromptSetConfig`): ``n_per_task`` per task at ``shots``
    (0 with ``zero_shot``: Hendel et al.'s setting, the query alone). Task vectors: ``definition`` from a
    separate set of ``shots``-shot prompts (``n_vector_prompts`` per task, seed ``vector_seed``; defaults
    ``n_per_task`` and ``seed + 1``). ``td``: also compute TD per layer and task (the ``td`` and ``relation``
    tables, the summary's ``peak_td``), from the baseline pass's prefill (with ``zero_shot``: from the k-shot
    vector prompts); ``k`` must then be at most ``n_per_task - 2`` (``n_vector_prompts - 2``). Off, those
    tables are empty and the prompt counts are free. ``layers``: ``"all"``, ``"peak"`` (``peak_layer`` or a
    TD sweep given to :func:`run_patching`, else the peak of this run's TD: ``td=True``), ``first:K``, ``last:K``,
    ``A-B`` or a list (:func:`~taskvec_interp.hooks.parse_layers`). ``modes``: interventions of the registry
    (:mod:`taskvec_interp.interventions`). ``directions``: ``positive`` (own task), ``negative`` (Null),
    ``matrix`` (every task's vector into every task's prompts). ``scale`` multiplies added vectors.
    ``position``: where the hook writes (``-1``, the query's last prompt token; other positions run full
    generations). ``share_prefix``: ``None`` shares the prompt prefix's KV cache where the backend can,
    ``False`` never. ``logprob``: also score the teacher-forced log-probability of each answer under each
    condition (a continuous metric that moves where exact match sits at the floor; about doubles the cost).
    ``center``: added vectors are the task-specific part only (minus the mean over tasks; see
    :func:`intervention_hooks`).
    """

    shots: int = opt(4, "demonstrations in the prompts (the task vectors' and, unless --zero-shot, the evaluated)")
    n_per_task: int = opt(50, "evaluation prompts per task (Null included)")
    model: str = model_field()
    backend: str = backend_field()
    definition: str = opt("paper", "task-vector definition", choices=DEFINITIONS)
    layers: str | list[int] = opt("all", "layers to patch: all | peak | first:K | last:K | A-B | 3,5,7")
    modes: tuple[str, ...] = opt(("add", "replace"), "interventions, comma-separated", choices=intervention_names)
    directions: tuple[str, ...] = opt(("positive", "negative"), "which vectors, comma-separated: positive (own "
                                      "task), negative (Null), matrix (every task's)", choices=DIRECTIONS)
    scale: float = opt(1.0, "scale of added vectors")
    zero_shot: bool = opt(False, "evaluate queries without demonstrations (Hendel et al.)")
    position: int = opt(-1, "prompt position the hook writes (-1: the query's last prompt token)")
    component: str = opt("resid_post", "site component the hook writes", choices=H.COMPONENTS)
    n_vector_prompts: int | None = opt(None, "prompts per task the task vectors are read from (default: n_per_task)")
    vector_seed: int | None = opt(None, "seed of the task-vector prompts (default: seed + 1)")
    k: int = k_field()
    n_boot: int = n_boot_field()
    batch_size: int = batch_size_field()
    max_rows: int = opt(256, "rows (prompts x conditions) per branched generation")
    max_new_tokens: int | None = max_new_tokens_field()
    share_prefix: bool | None = opt(None, "share the prompt prefix's KV cache across conditions (default: where the "
                                          "backend can)")
    logprob: bool = opt(False, "also score each answer's teacher-forced log-probability")
    center: bool = opt(False, "add only the task-specific part (vector minus the mean over tasks)")
    supports_replace: ClassVar[bool] = True
    td: bool = opt(False, "also compute task decodability per layer (the td and relation tables; needs k <= "
                          "n_per_task - 2, with zero_shot n_vector_prompts - 2)")

    def __post_init__(self) -> None:
        self.check_prompt_set()
        check_str("PatchConfig.model", self.model)
        check_choice("PatchConfig.backend", self.backend, backend_names())
        check_choice("PatchConfig.definition", self.definition, DEFINITIONS)
        self.layers = H.check_layer_spec(self.layers, H.PATCH_LAYERS, "PatchConfig.layers")
        self.modes = check_choices("PatchConfig.modes", self.modes, intervention_names())
        self.directions = check_choices("PatchConfig.directions", self.directions, DIRECTIONS)
        check_number("PatchConfig.scale", self.scale)
        self.scale = float(self.scale)
        check_bool("PatchConfig.zero_shot", self.zero_shot)
        if isinstance(self.position, bool) or not isinstance(self.position, int):
            raise ValueError(f"PatchConfig.position must be an int (prompt coordinates), got {self.position!r}")
        check_choice("PatchConfig.component", self.component, H.COMPONENTS)
        check_optional_int("PatchConfig.n_vector_prompts", self.n_vector_prompts, 1)
        if self.vector_seed is not None:
            check_seed("PatchConfig.vector_seed", self.vector_seed)
        check_bool("PatchConfig.td", self.td)
        # TD (only when asked) reads the baseline prompts, or with zero_shot the k-shot vector prompts
        if not self.td:
            check_int("PatchConfig.k", self.k, 1)
        elif self.zero_shot and self.n_vector_prompts is not None:
            check_knn_k("PatchConfig.k", self.k, self.n_vector_prompts, "n_vector_prompts")
        else:
            check_knn_k("PatchConfig.k", self.k, self.n_per_task, "n_per_task")
        check_n_boot("PatchConfig.n_boot", self.n_boot)
        check_int("PatchConfig.batch_size", self.batch_size, 1)
        check_int("PatchConfig.max_rows", self.max_rows, 1)
        check_optional_int("PatchConfig.max_new_tokens", self.max_new_tokens, 1)
        check_choice("PatchConfig.share_prefix", self.share_prefix, (None, True, False))
        check_bool("PatchConfig.logprob", self.logprob)
        check_bool("PatchConfig.center", self.center)

    def check_shots(self) -> None:
        if type(self.shots) is int and self.shots == 0:
            raise ValueError("PatchConfig.shots must be an int >= 1 (task vectors are read from prompts with "
                             "demonstrations; zero_shot=True evaluates queries without them), got 0")
        check_int("PatchConfig.shots", self.shots, 1)

    @property
    def eval_shots(self) -> int:
        return 0 if self.zero_shot else self.shots


@dataclass
class PatchResult:
    config: PatchConfig
    accuracy: pd.DataFrame
    """condition, layer, mode, vector, scale, direction, task, n, accuracy, ci_low, ci_high, delta, ..."""
    predictions: pd.DataFrame
    """condition, ..., prompt_id, task, query, answer, generated, exact, first_token: one row per condition and
    prompt (``first_token``: the first content token, see :mod:`taskvec_interp.probes.accuracy`)."""
    td: pd.DataFrame
    """TD per layer (overall and per task) of the baseline pass's last-token states (empty unless
    ``config.td``)."""
    relation: pd.DataFrame
    """per (layer, mode, direction): the accuracy change's correlation with per-task TD over tasks (empty
    unless ``config.td``)."""
    vectors: TaskVectors
    summary: dict
    model: dict = field(default_factory=dict)
    seconds: float = 0.0
    inputs: dict = field(default_factory=dict)
    """What the run read besides the model (recorded in config.json): ``vectors`` (a given vectors file: its
    path, sha256 and provenance) and ``td_sweep`` (a TD sweep: its path, manifest fingerprint, model)."""

    def at_layer(self, layer: int | None = None) -> pd.DataFrame:
        """Task x (baseline, positive, negative) accuracy at one layer (default: the summary's layer, the
        peak-TD layer when it was patched)."""
        layer = self.summary["layer"] if layer is None else layer
        acc = self.accuracy
        base = acc[acc["direction"] == "baseline"].set_index("task")["accuracy"].rename("baseline")
        sub = acc[(acc["layer"] == layer) & acc["direction"].isin(["positive", "negative"])]
        table = sub.pivot_table(index="task", columns=["mode", "direction"], values="accuracy", sort=False)
        table.columns = [f"{m}_{d}" for m, d in table.columns]
        return pd.concat([base, table], axis=1).loc[list(self.vectors.tasks)]

    def save(self, out: str | Path) -> Path:
        """config.json (with the model's identity), tables as Parquet, vectors.safetensors, summary.json, as one
        result directory (:func:`taskvec_interp.io.write_result_dir`, kind ``"patching"``): an older patching
        result in ``out`` is replaced whole; anything else there is refused."""
        with write_result_dir(out, KIND, asdict(self.config)) as tmp:
            write_json(tmp / "config.json", {**asdict(self.config), "model": self.model.get("name", self.config.model),
                                              "backend": self.model.get("backend", self.config.backend),
                                              "inputs": self.inputs, "provenance": provenance(self.model)})
            for name in TABLES:
                getattr(self, name).to_parquet(tmp / f"{name}.parquet", index=False)
            self.vectors.save(tmp / "vectors.safetensors")
            write_json(tmp / "summary.json", {**self.summary, "seconds": self.seconds})
        return Path(out)

    @classmethod
    def load(cls, directory: str | Path) -> PatchResult:
        """Read back what :meth:`save` wrote; ``ValueError`` naming the file when the directory is not a
        complete, intact patching result."""
        d = read_result_dir(directory, KIND)
        raw, model = read_saved_config(d, PatchConfig)
        inputs = raw.pop("inputs", {})
        raw["modes"], raw["directions"] = tuple(raw["modes"]), tuple(raw["directions"])
        config = PatchConfig(**raw)
        tables = {name: read_parquet(d / f"{name}.parquet") for name in TABLES}
        summary = read_json(d / "summary.json")
        seconds = summary.pop("seconds", 0.0)
        return cls(config, tables["accuracy"], tables["predictions"], tables["td"], tables["relation"],
                   TaskVectors.load(d / "vectors.safetensors"), summary, model, seconds, inputs)


def load_patching(directory: str | Path) -> PatchResult:
    """:meth:`PatchResult.load` (kept: scripts call it)."""
    return PatchResult.load(directory)


def patch_conditions(layers: Sequence[int], modes: Sequence[str], directions: Sequence[str], tasks: Sequence[str],
                     scale: float = 1.0, null: str = NULL_TASK) -> list[dict]:
    """The baseline plus every (layer, mode, vector) of the requested directions (an intervention without a
    vector, e.g. ``ablate``, once per layer)."""
    vecs: list[str] = []
    if "positive" in directions:
        vecs.append(OWN)
    if "negative" in directions:
        vecs.append(null)
    if "matrix" in directions:
        vecs += [t for t in tasks if t not in vecs]
    conds = [{"layer": None, "mode": "none", "vector": "none", "scale": 0.0}]
    for layer in layers:
        for m in modes:
            spec = get_intervention(m)
            for v in (vecs if spec.needs_vector else [NO_VECTOR]):
                conds.append({"layer": layer, "mode": m, "vector": v, "scale": scale if spec.uses_scale else 1.0})
    return conds


def td_relation(accuracy: pd.DataFrame, td: pd.DataFrame, null: str = NULL_TASK) -> pd.DataFrame:
    """Per (layer, mode, direction): Pearson r and slope of the accuracy change (and, when scored, of the
    answer log-probability change: ``logprob_*``) against per-task TD at that layer, over the non-Null
    tasks (do separable tasks move more?)."""
    from scipy.stats import linregress

    per_task = td[td["level"] == "task"][["layer", "task", "td"]]
    sub = accuracy[accuracy["direction"].isin(["positive", "negative"]) & (accuracy["task"] != null)]
    merged = sub.merge(per_task, on=["layer", "task"])
    metrics = [("", "delta")] + ([("logprob_", "logprob_delta")] if "logprob_delta" in accuracy else [])
    rows = []
    for (layer, mode, direction), g in merged.groupby(["layer", "mode", "direction"], sort=True):
        row: dict = {"layer": int(layer), "mode": mode, "direction": direction, "n_tasks": len(g)}
        for pre, col in metrics:
            row |= {f"{pre}r": math.nan, f"{pre}slope": math.nan, f"{pre}p_value": math.nan,
                    f"{pre}mean_delta": float(g[col].mean())}
            if len(g) >= 3 and g["td"].nunique() > 1 and g[col].nunique() > 1:
                reg = linregress(g["td"], g[col])
                row |= {f"{pre}r": float(reg.rvalue), f"{pre}slope": float(reg.slope), f"{pre}p_value": float(reg.pvalue)}
        rows.append(row)
    cols = ["layer", "mode", "direction", "n_tasks"] + [f"{pre}{k}" for pre, _ in metrics
                                                        for k in ("r", "slope", "p_value", "mean_delta")]
    return pd.DataFrame(rows, columns=cols)


def check_td_sweep(sweep: str | Path | SweepResult, adapter: Adapter, shots: int) -> tuple[pd.DataFrame, dict]:
    """A TD sweep (its directory, or a loaded :class:`SweepResult`) checked against the model and the shots:
    ``(td table, record)``. Refused (``ValueError`` naming the sweep): a sweep that records no model fingerprint,
    one of another model (the fingerprints, never the path strings, are compared), one without ``shots``-shot
    rows. The record (what config.json keeps): its path, its own fingerprint (the sha256 of its manifest), the
    model's fingerprint, its shot counts and its peak layer at ``shots``."""
    path = None
    if not isinstance(sweep, SweepResult):
        path = Path(sweep)
        sweep = SweepResult.load(path)
    where = f"the TD sweep {path}" if path is not None else "the TD sweep"
    theirs = (sweep.model or {}).get("fingerprint")
    if theirs is None:
        raise ValueError(f"{where} does not record model.fingerprint (missing key): it cannot be tied to this model; "
                         "recompute it with this version (taskvec td)")
    diffs = config_diffs({"model fingerprint": theirs}, {"model fingerprint": adapter.fingerprint()["fingerprint"]},
                         labels=("sweep", "this model"))
    if diffs:
        raise ValueError(f"{where} comes from another model ({'; '.join(diffs)}): its peak layer is not this model's")
    have = sorted({int(s) for s in sweep.config.shots})
    if shots not in have:
        raise ValueError(f"{where} has no {shots}-shot TD (it has shots {have}): sweep {shots} shots too, or patch "
                         f"with --shots among {have}")
    record = {"path": None if path is None else str(path),
              "fingerprint": None if path is None else manifest_fingerprint(path), "model fingerprint": theirs,
              "shots": have, "peak_layer": peak_layer_of(sweep.td, shots)}
    return sweep.td, record


def _sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def _vectors_record(vectors: TaskVectors) -> dict:
    """What patching records of vectors it was given: their file (path, sha256), content hash and provenance."""
    model = vectors.meta.get("model") or {}
    src = vectors.source
    return {"file": None if src is None else str(src),
            "file_sha256": None if src is None or not Path(src).is_file() else sha256_file(src),
            "sha256": _sha256_tensor(vectors.vectors), "definition": vectors.definition, "layers": vectors.layers,
            "component": vectors.meta.get("component"), "shots": vectors.meta.get("shots"),
            "template": vectors.meta.get("template"), "model fingerprint": model.get("fingerprint")}


def _resume_key(config: PatchConfig, adapter: Adapter, inputs: dict, peak_layer: int | None,
                given: dict[str, Sequence[Prompt] | None]) -> dict:
    """What finished chunks are computed with: the whole config (the model by its fingerprint, never its path
    string), the inputs (vectors, TD sweep: by content), a given peak layer and given prompt sets (by content)."""
    ident = adapter.identity()
    key: dict = {k: v for k, v in asdict(config).items() if k != "model"}
    key |= {"model fingerprint": ident.get("fingerprint"), "model dtype": ident.get("dtype"), "peak_layer": peak_layer}
    if "vectors" in inputs:
        key["vectors"] = inputs["vectors"]["sha256"]
    if "td_sweep" in inputs:
        key["td_sweep"] = inputs["td_sweep"].get("fingerprint") or inputs["td_sweep"].get("sha256")
    for name, prompts in given.items():
        if prompts is not None:
            text = json.dumps([p.to_dict() for p in prompts], sort_keys=True, default=str)
            key[name] = hashlib.sha256(text.encode()).hexdigest()
    return key


def _resolve_patch_layers(config: PatchConfig, n_layers: int) -> list[int] | None:
    """Checked layers, or ``None`` for ``"peak"`` (known after the baseline pass)."""
    if config.layers == "peak":
        return None
    return H.parse_layers(config.layers, n_layers, allowed=H.PATCH_LAYERS, what="PatchConfig.layers")


def run_patching(
    adapter: Adapter,
    config: PatchConfig,
    family: TaskFamily | None = None,
    *,
    prompts: Sequence[Prompt] | None = None,
    vector_prompts: Sequence[Prompt] | None = None,
    vectors: TaskVectors | None = None,
    peak_layer: int | None = None,
    td_sweep: pd.DataFrame | SweepResult | str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
) -> PatchResult:
    """Task-vector interventions on ``adapter`` (see the module docstring and :class:`PatchConfig`).

    ``prompts`` / ``vector_prompts`` replace the built evaluation / vector prompt sets; ``vectors``
    replaces the vectors (checked against the model and, :meth:`TaskVectors.check_run`, the config's
    definition, component, shots and template; a vectors file must record them all). ``peak_layer`` or
    ``td_sweep`` (a sweep's directory or :class:`SweepResult`, checked against the model and the shots by
    :func:`check_td_sweep`; or the ``td`` table of a :func:`run_sweep`) fix the peak layer for
    ``layers="peak"``; otherwise it is the peak of the baseline pass's TD (``config.td``; without it
    ``layers="peak"`` is refused). Without ``config.td`` the summary's ``peak_td`` / ``chance`` are the TD
    sweep's (``None`` without one). Given vectors and sweeps are
    recorded in ``result.inputs`` (config.json). ``checkpoint_dir``: finished chunks of conditions are kept
    there with what they were computed with (the whole config, the model's fingerprint, the inputs); a rerun
    with anything else is refused naming the fields that differ, and the chunks are left as they are.
    Everything is checked before any model work.
    """
    t0 = time.perf_counter()
    fam = family if family is not None else get_family(config.family, **config.family_kwargs)
    template = PromptTemplate(**config.template)
    builder = PromptBuilder(template)
    layers = _resolve_patch_layers(config, adapter.n_layers)
    given = {"prompts": prompts, "vector_prompts": vector_prompts}
    inputs: dict = {}
    if isinstance(td_sweep, pd.DataFrame):
        inputs["td_sweep"] = {"sha256": hashlib.sha256(pd.util.hash_pandas_object(td_sweep, index=False)
                                                       .to_numpy().tobytes()).hexdigest()}
    elif td_sweep is not None:
        td_sweep, inputs["td_sweep"] = check_td_sweep(td_sweep, adapter, config.shots)
    if peak_layer is not None:
        peak_layer = H.parse_layers([peak_layer], adapter.n_layers, what="peak_layer")[0]
    if td_sweep is not None and peak_layer is None:
        peak_layer = H.parse_layers([peak_layer_of(td_sweep, config.shots)], adapter.n_layers,
                                    what="the TD sweep's peak layer")[0]
    if layers is None and peak_layer is None and not config.td:
        raise ValueError("PatchConfig.layers='peak' needs the peak-TD layer: give peak_layer= or td_sweep= (a "
                         "`taskvec td` run, --td-sweep), or compute TD in this run with td=True (--td)")
    if prompts is None:
        prompts = builder.build(fam, n_per_task=config.n_per_task, shots=config.eval_shots, seed=config.seed,
                                replace=config.replace)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no evaluation prompts")
    names = fam.task_names
    empty = [t for t in names if not any(p.task == t for p in prompts)]
    if empty:
        raise ValueError(f"tasks {empty} have no evaluation prompts")
    unknown = sorted({p.task for p in prompts} - set(names))
    if unknown:
        raise ValueError(f"prompts of unknown tasks {unknown}; family {fam.name!r} has {list(names)}")
    if vectors is None:
        if vector_prompts is None:
            vector_prompts = builder.build(fam, n_per_task=config.n_vector_prompts or config.n_per_task,
                                           shots=config.shots,
                                           seed=config.seed + 1 if config.vector_seed is None else config.vector_seed,
                                           replace=config.replace)
    else:
        if config.td and config.zero_shot and vector_prompts is None:
            raise ValueError("zero_shot and td with given vectors need vector_prompts= (the k-shot prompts TD is "
                             "read from)")
        vectors.check_model(adapter)
        vectors.check_run(definition=config.definition, component=config.component, shots=config.shots,
                          template=config.template)
        inputs["vectors"] = _vectors_record(vectors)
        missing = [t for t in names if t not in vectors.tasks]
        if missing:
            raise ValueError(f"the task vectors have no vector for tasks {missing}")
        if layers is not None:
            absent = [layer for layer in layers if layer not in vectors.layers]
            if absent:
                raise ValueError(f"the task vectors have no layers {absent} (have {vectors.layers})")
    checks, budgets = answer_budgets(adapter, prompts, config.max_new_tokens)  # each task its own
    resume = _resume_key(config, adapter, inputs, peak_layer, given)
    check_conditions_dir(checkpoint_dir, resume)  # finished chunks of another run: refused before any model work
    stop = template.example_separator
    if vectors is None:
        vectors = task_vectors(adapter, vector_prompts, config.definition, layers if layers is not None else "all",
                               family=fam, template=template, seed=config.seed, component=config.component,
                               batch_size=config.batch_size, progress=progress)
    # the baseline: one generation whose prefill also gives every layer's last-token state (for TD, when asked)
    texts = [p.text for p in prompts]
    base = generate_by_budget(adapter, texts, budgets, capture_layers="all" if config.td and not config.zero_shot
                              else None, component=config.component, batch_size=config.batch_size, progress=progress)
    td = empty_td()
    if config.td:
        if config.zero_shot:  # queries alone encode no task: TD (peak, relation) from the k-shot vector prompts
            td_acts = adapter.capture([p.text for p in vector_prompts], component=config.component,
                                      batch_size=config.batch_size, progress=progress)
            td_tasks = [p.task for p in vector_prompts]
        else:
            td_acts, td_tasks = base.activations, [p.task for p in prompts]
        td = task_decodability(td_acts, td_tasks, k=config.k, label_names=names, n_boot=config.n_boot,
                               seed=config.seed).to_frame()
    if peak_layer is None and config.td:  # this run's TD gives the peak (layers="peak" needs one: checked above)
        peak_layer = peak_layer_of(td)
    if layers is None:
        layers = [peak_layer]
        if peak_layer not in vectors.layers:
            raise ValueError(f"the task vectors have no vector at the peak layer {peak_layer}")
    conds = patch_conditions(layers, config.modes, config.directions, names, config.scale, fam.null.name)

    answer_ids = [list(c.answer_ids) for c in checks]
    n_answer = torch.tensor([max(len(a), 1) for a in answer_ids], dtype=torch.float64)

    def evaluate(chunk: list[dict]) -> list[pd.DataFrame]:
        todo = [c for c in chunk if c["vector"] != "none"]
        gens = {}
        kw = {"share_prefix": config.share_prefix, "max_rows": config.max_rows, "batch_size": config.batch_size,
              "progress": progress}
        branches = [intervention_hooks(c, vectors, prompts, component=config.component, position=config.position,
                                       center=config.center) for c in chunk]
        if todo:
            out = generate_branches_by_budget(adapter, texts, [b for b, c in zip(branches, chunk, strict=True)
                                                               if c["vector"] != "none"], budgets, **kw)
            gens = {id(c): g for c, g in zip(todo, out, strict=True)}
        logp = adapter.score_branches(texts, answer_ids, branches, **kw) if config.logprob else None
        frames = []
        for i, c in enumerate(chunk):
            gen = gens.get(id(c), base)
            frame = score_generation(prompts, gen, checks, stop, tokenizer=adapter.tokenizer)
            frame = frame[PREDICTION_COLUMNS].assign(engine=gen.engine)
            if logp is not None:
                frame["answer_logprob"] = logp[i].numpy()
                frame["answer_logprob_per_token"] = (logp[i] / n_answer).numpy()
            frames.append(frame)
        return frames

    preds = run_conditions(conds, evaluate, chunk_size=chunk_size, checkpoint_dir=checkpoint_dir,
                           progress=progress, desc="interventions", config=resume, cleanup=False)
    preds["layer"] = preds["layer"].astype("Int64")
    preds.insert(5, "direction", [direction_of(v, fam.null.name) for v in preds["vector"]])
    correct = torch.tensor(preds["exact"].to_numpy(), dtype=torch.bool).view(len(conds), len(prompts))
    groups = [p.task for p in prompts]
    acc = bootstrap_accuracy(correct, groups, n_boot=config.n_boot, seed=config.seed)
    if config.logprob:
        values = torch.tensor(preds["answer_logprob_per_token"].to_numpy()).view(len(conds), len(prompts))
        lp = bootstrap_means(values, groups, n_boot=config.n_boot, seed=config.seed, name="logprob")
        acc = acc.merge(lp.drop(columns="n"), on=["condition", "task"])
    index = preds.drop_duplicates("condition")[["condition", "layer", "mode", "vector", "scale", "direction"]]
    acc = index.merge(acc, on="condition").reset_index(drop=True)
    relation = td_relation(acc, td, fam.null.name)
    result = PatchResult(config, acc, preds, td, relation, vectors, {}, adapter.identity())
    result.summary = patch_summary(result, peak_layer, names, fam.null.name,
                                   td=td if config.td or td_sweep is None else _at_shots(td_sweep, config.shots))
    result.summary["max_new_tokens"] = task_budgets(prompts, budgets)
    result.summary["engine"] = sorted(set(preds.loc[preds["direction"] != "baseline", "engine"]))
    result.seconds = time.perf_counter() - t0
    result.inputs = inputs
    clear_chunks(checkpoint_dir)  # the result is whole: its chunks are no longer needed
    return result


def patch_summary(result: PatchResult, peak_layer: int | None, tasks: Sequence[str], null: str = NULL_TASK,
                  td: pd.DataFrame | None = None) -> dict:
    """Headline numbers: the peak-TD layer, baseline accuracy, and the positive / negative change per task at
    ``layer`` (the peak-TD layer if patched, else the patched layer of highest TD, else the first patched
    layer). ``td``: the TD table the peak's TD and chance are read from (default ``result.td``; a TD sweep's
    when this run computed none); without TD rows ``peak_td`` and ``chance`` are ``None``."""
    acc = result.accuracy
    td = result.td if td is None else td
    overall = td[td["level"] == "overall"].set_index("layer")
    patched = sorted(int(x) for x in acc["layer"].dropna().unique())
    # the headline layer: the peak-TD layer if it was patched, else the patched layer of highest TD
    known = [layer for layer in patched if layer in overall.index]
    if peak_layer in patched:
        layer = int(peak_layer)
    elif known:
        layer = int(overall.loc[known, "td"].idxmax())
    else:
        layer = patched[0]
    at_peak = peak_layer is not None and peak_layer in overall.index
    out: dict = {"peak_layer": None if peak_layer is None else int(peak_layer),
                 "peak_td": float(overall.loc[peak_layer, "td"]) if at_peak else None,
                 "chance": float(overall.loc[peak_layer, "chance"]) if at_peak else None,
                 "layer": layer, "patched_layers": patched, "baseline": {}, "at_peak": {}}
    base = acc[acc["direction"] == "baseline"]
    out["baseline"] = {r.task: float(r.accuracy) for r in base.itertuples()}
    at = acc[(acc["layer"] == layer) & acc["direction"].isin(["positive", "negative"])]
    for r in at.itertuples():
        out["at_peak"].setdefault(f"{r.mode}_{r.direction}", {})[r.task] = round(float(r.delta), 4)
        if "logprob_delta" in at:
            out.setdefault("logprob_at_peak", {}).setdefault(f"{r.mode}_{r.direction}", {})[r.task] = \
                round(float(r.logprob_delta), 4)
    real = [t for t in tasks if t != null]
    for per_task in [*out["at_peak"].values(), *out.get("logprob_at_peak", {}).values()]:
        vals = [per_task[t] for t in real if t in per_task]
        per_task["mean"] = round(sum(vals) / len(vals), 4) if vals else None
    return out


def _at_shots(td: pd.DataFrame, shots: int) -> pd.DataFrame:
    """A TD sweep table's k-shot rows at ``shots`` (a sweep's table holds several shot counts, and may hold
    control rows: ``context`` other than ``"demos"``)."""
    if "context" in td:
        td = td[td["context"] == "demos"]
    return td[td["shots"] == shots] if "shots" in td else td


TD_COLUMNS: dict[str, str] = {"layer": "int64", "level": "object", "task": "object", "td": "float64",
                              "ci_low": "float64", "ci_high": "float64", "n": "int64", "n_per_class": "int64",
                              "k": "int64", "metric": "object", "chance": "float64"}
"""The columns of a TD table (:meth:`TaskDecodability.to_frame`)."""


def empty_td() -> pd.DataFrame:
    """The ``td`` table of a run that computed no TD (``PatchConfig.td`` off): its columns, no rows."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in TD_COLUMNS.items()})


__all__ = [
    "DIRECTIONS", "NO_VECTOR", "PREDICTION_COLUMNS", "PatchConfig", "PatchResult", "check_td_sweep", "direction_of",
    "empty_td", "intervention_hooks", "load_patching", "patch_conditions", "patch_summary", "run_conditions",
    "run_patching", "td_relation",
]
