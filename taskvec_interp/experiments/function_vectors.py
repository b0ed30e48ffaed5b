"""Function vectors injected (Todd et al., ICLR 2024), beside the paper's and Hendel et al.'s task vectors.

The function vector (FV) of a task is the sum over the top heads (by average indirect effect,
:mod:`taskvec_interp.experiments.heads`) of their mean outputs projected through the output projection
(:func:`taskvec_interp.probes.heads.function_vector`). Here it is ADDED to the residual stream (``resid_post``)
at the last prompt token at one layer, in Todd et al.'s three settings:

* ``zero_shot``: the query alone in the template (``Q: x\\nA:``), swept over ``layers``;
* ``shuffled``: ``shots``-shot prompts with shuffled labels, at ``fv_layer``;
* ``natural``: the query inside natural-text templates (``NATURAL_TEMPLATES``), at ``fv_layer``; an answer counts
  when its text appears in the first ``natural_new_tokens`` generated tokens.

Zero-shot and shuffled accuracy is Todd et al.'s: the top-1 next token equals the answer's first token. Every
condition (baseline, each vector at each layer) is a branch of one shared prompt prefix
(:meth:`~taskvec_interp.adapters.base.Adapter.generate_branches`). Accuracy per task and over the pooled prompts
with paired bootstrap CIs (:func:`~taskvec_interp.probes.accuracy.bootstrap_accuracy`).

With ``compare`` the paper's task vector (Han et al.: the mean state at the demonstrations' answer-preceding
tokens) and Hendel et al.'s (the last-token state of demonstrations + a dummy query), read from clean
``shots``-shot prompts at every swept layer, go through the same zero-shot sweep (injected by ``tv_mode``,
``replace`` as Hendel et al. do), and the three vectors' cosine similarities are tabulated per layer and task
(raw, and centred: each minus the mean over tasks, the task-specific part).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from .. import hooks as H
from ..adapters.base import Adapter
from ..config import (
    PromptSetConfig,
    backend_field,
    backend_names,
    batch_size_field,
    model_field,
    n_boot_field,
    opt,
    read_saved_config,
)
from ..io import read_result_dir, write_result_dir
from ..probes.accuracy import bootstrap_accuracy
from ..probes.heads import FUNCTION, check_heads, function_vector, heads_of, parse_heads
from ..probes.vectors import TaskVectors, load_named_vectors, save_named_vectors, task_vectors
from ..results import provenance, read_json, read_parquet, write_json
from ..tasks import Prompt, PromptBuilder, PromptTemplate, TaskFamily, get_family
from ..validate import check_bool, check_choice, check_choices, check_int, check_optional_int, check_str
from .heads import (
    CORRUPTIONS,
    FV_FAMILY,
    TODD_TEMPLATE,
    HeadsConfig,
    HeadsResult,
    answer_first_tokens,
    corrupt_prompts,
    real_tasks,
    run_heads,
)

__all__ = ["FVConfig", "FVResult", "NATURAL_TEMPLATES", "SETTINGS", "cosine_table", "natural_prompts",
           "run_function_vectors"]

KIND = "function_vectors"
SETTINGS: tuple[str, ...] = ("zero_shot", "shuffled", "natural")
TV_MODES: tuple[str, ...] = ("replace", "add")
NATURAL_TEMPLATES: tuple[str, ...] = (
    'The word "{x}" means',
    'When I think of "{x}" I usually think of',
    'While reading a book I came across the word "{x}". I looked it up and it turns out that it means',
)
"""Natural-text templates in the spirit of Todd et al.'s (``{x}``: the query; no commas, so the command line can
take a comma-separated list). The answer counts when its text appears in the generated continuation."""
TABLES = ("accuracy", "predictions", "cosine")


@dataclass
class FVConfig(PromptSetConfig):
    """Everything that determines a function-vector run (saved as ``config.json``).

    ``n_per_task``: evaluation prompts per task in each setting (seed ``seed + 2``). The heads come from a heads
    result given to :func:`run_function_vectors`, else from a head analysis run here (``n_mean_prompts`` clean and
    ``n_cie_prompts`` corrupted prompts per task, ``corruption``). ``heads``: explicit ``layer.head`` pairs
    (``"9.3,12.0"``) instead of the top ``top_k`` by AIE. ``layers``: the zero-shot sweep; ``fv_layer``: the layer
    of the shuffled and natural settings (default: the sweep's best layer for the FV). ``compare``: also the
    paper's and Hendel et al.'s task vectors (from ``n_vector_prompts`` clean prompts per task, injected by
    ``tv_mode``).
    """

    family: str = opt(FV_FAMILY, "task family: files:PATH (function-vector task files), bitwise or pos")
    template: dict = opt(TODD_TEMPLATE, "prompt template (PromptTemplate fields) as JSON")
    shots: int = opt(10, "demonstrations in the clean and shuffled-label prompts")
    n_per_task: int = opt(25, "evaluation prompts per task in each setting")
    model: str = model_field()
    backend: str = backend_field()
    top_k: int = opt(10, "heads summed into the function vector (by average indirect effect over tasks)")
    heads: str | None = opt(None, "explicit heads as layer.head pairs, e.g. '9.3,12.0' (default: the top_k by AIE)")
    layers: str | list[int] = opt("all", "layers of the zero-shot sweep: all | first:K | last:K | A-B | 3,5,7")
    fv_layer: int | None = opt(None, "layer of the shuffled-label and natural-text settings (default: the sweep's "
                                     "best layer for the function vector)")
    settings: tuple[str, ...] = opt(SETTINGS, "settings, comma-separated: zero_shot, shuffled, natural",
                                    choices=SETTINGS)
    compare: bool = opt(True, "also the paper's and Hendel et al.'s task vectors (zero-shot sweep, cosines)")
    tv_mode: str = opt("replace", "how the task vectors are injected (the function vector is always added)",
                       choices=TV_MODES)
    n_vector_prompts: int = opt(25, "clean prompts per task the paper / Hendel task vectors are read from")
    n_mean_prompts: int = opt(100, "clean prompts per task for the head means (when the heads are computed here)")
    n_cie_prompts: int = opt(25, "corrupted prompts per task for the CIE (when the heads are computed here)")
    corruption: str = opt("shuffled", "corrupted prompts of the CIE (when the heads are computed here)",
                          choices=CORRUPTIONS)
    natural_templates: tuple[str, ...] = opt(NATURAL_TEMPLATES, "natural-text templates with {x} for the query")
    natural_new_tokens: int = opt(5, "tokens generated in the natural-text setting")
    n_boot: int = n_boot_field()
    batch_size: int = batch_size_field()
    max_rows: int = opt(128, "rows (prompts x conditions) per call of the branch engine")

    def __post_init__(self) -> None:
        self.check_prompt_set()
        n = "FVConfig"
        check_str(f"{n}.model", self.model)
        check_choice(f"{n}.backend", self.backend, backend_names())
        check_int(f"{n}.top_k", self.top_k, 1)
        if self.heads is not None:
            check_str(f"{n}.heads", self.heads)
            parse_heads(self.heads)
        self.layers = H.check_layer_spec(self.layers, H.CAPTURE_LAYERS, f"{n}.layers")
        check_optional_int(f"{n}.fv_layer", self.fv_layer, 0)
        self.settings = check_choices(f"{n}.settings", self.settings, SETTINGS)
        check_bool(f"{n}.compare", self.compare)
        check_choice(f"{n}.tv_mode", self.tv_mode, TV_MODES)
        for name in ("n_vector_prompts", "n_mean_prompts", "n_cie_prompts", "natural_new_tokens", "batch_size",
                     "max_rows"):
            check_int(f"{n}.{name}", getattr(self, name), 1)
        check_choice(f"{n}.corruption", self.corruption, CORRUPTIONS)
        self.natural_templates = tuple(self.natural_templates)
        bad = [t for t in self.natural_templates if not isinstance(t, str) or "{x}" not in t]
        if not self.natural_templates or bad:
            raise ValueError(f"{n}.natural_templates must be a non-empty list of strings holding '{{x}}', got "
                             f"{list(self.natural_templates)!r}")
        check_int(f"{n}.n_boot", self.n_boot, 0)

    def check_shots(self) -> None:
        check_int("FVConfig.shots", self.shots, 2)

    def heads_config(self) -> HeadsConfig:
        """The head analysis this run computes when it is given none."""
        return HeadsConfig(family=self.family, family_kwargs=self.family_kwargs, template=self.template,
                           shots=self.shots, n_per_task=self.n_mean_prompts, seed=self.seed, model=self.model,
                           backend=self.backend, n_cie_prompts=self.n_cie_prompts, corruption=self.corruption,
                           top_k=self.top_k, k=min(10, self.n_mean_prompts - 2) if self.n_mean_prompts > 2 else 1,
                           n_boot=self.n_boot, batch_size=self.batch_size, max_rows=self.max_rows)


@dataclass
class FVResult:
    """A function-vector run. ``accuracy``: one row per (setting, vector, layer, task), ``task == "all"`` pooled,
    with ``accuracy, ci_low, ci_high, delta, delta_low, delta_high`` (paired against the setting's baseline);
    ``predictions``: per condition and prompt; ``cosine``: per (layer, task, pair) the cosine of two vectors, raw
    and centred. ``vectors``: ``{"function": ..., "paper": ..., "hendel": ...}``."""

    config: FVConfig
    accuracy: pd.DataFrame
    predictions: pd.DataFrame
    cosine: pd.DataFrame
    vectors: dict[str, TaskVectors]
    summary: dict
    model: dict = field(default_factory=dict)
    seconds: float = 0.0

    def gain(self, setting: str = "zero_shot", task: str = "all") -> pd.DataFrame:
        """Accuracy gain over the setting's baseline by vector and layer (one row each)."""
        acc = self.accuracy
        sub = acc[(acc["setting"] == setting) & (acc["task"] == task) & (acc["vector"] != "none")]
        return sub[["vector", "layer", "accuracy", "delta", "delta_low", "delta_high"]].reset_index(drop=True)

    def save(self, out: str | Path) -> Path:
        """One result directory (kind ``"function_vectors"``): config.json, the tables as Parquet, one
        ``{name}_vectors.safetensors`` per vector (the function vector loadable by ``taskvec patch
        --vectors-file``), summary.json."""
        with write_result_dir(out, KIND, asdict(self.config)) as tmp:
            write_json(tmp / "config.json", {**asdict(self.config), "provenance": provenance(self.model)})
            for name in TABLES:
                getattr(self, name).to_parquet(tmp / f"{name}.parquet", index=False)
            save_named_vectors(tmp, self.vectors)
            write_json(tmp / "summary.json", {**self.summary, "seconds": self.seconds})
        return Path(out)

    @classmethod
    def load(cls, directory: str | Path) -> FVResult:
        d = read_result_dir(directory, KIND)
        raw, model = read_saved_config(d, FVConfig, known_only=True)
        for key in ("settings", "natural_templates"):
            raw[key] = tuple(raw[key])
        tables = {name: read_parquet(d / f"{name}.parquet") for name in TABLES}
        vectors = load_named_vectors(d)
        summary = read_json(d / "summary.json")
        seconds = summary.pop("seconds", 0.0)
        return cls(FVConfig(**raw), **tables, vectors=vectors, summary=summary, model=model, seconds=seconds)


def natural_prompts(family: TaskFamily, tasks: Sequence[str], templates: Sequence[str], n_per_task: int,
                    seed: int) -> list[Prompt]:
    """``n_per_task`` queries per task, each inside every template (``{x}``): ``len(templates) * n_per_task`` prompts
    per task; the answer is the target with a leading space."""
    out = []
    builder = PromptBuilder()
    queries = builder.build(family, n_per_task, 0, seed, tasks=list(tasks))
    for tmpl in templates:
        for q in queries:
            out.append(Prompt(text=tmpl.format(x=q.query), answer=" " + q.target, task=q.task, label=q.label,
                              n_shots=0, query=q.query, target=q.target, family=q.family))
    return out


def cosine_table(vectors: dict[str, TaskVectors], layers: Sequence[int], tasks: Sequence[str]) -> pd.DataFrame:
    """Per (layer, task, pair of vectors): the cosine similarity, raw and centred (each vector minus its mean over
    ``tasks`` at that layer), every pair of ``vectors`` (vectorised over layers and tasks)."""
    names = list(vectors)
    stack = {n: torch.stack([vectors[n].vectors[vectors[n].layer_index(layer)][[vectors[n].task_index(t) for t in tasks]]
                             for layer in layers]).double() for n in names}  # [layer, task, d]
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            raw = torch.nn.functional.cosine_similarity(stack[a], stack[b], dim=-1)
            ca, cb = stack[a] - stack[a].mean(1, keepdim=True), stack[b] - stack[b].mean(1, keepdim=True)
            cen = torch.nn.functional.cosine_similarity(ca, cb, dim=-1)
            rows.append(pd.DataFrame({"layer": [layer for layer in layers for _ in tasks], "task": list(tasks) * len(layers),
                                      "pair": f"{a}~{b}", "cosine": raw.flatten().tolist(),
                                      "cosine_centered": cen.flatten().tolist()}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["layer", "task", "pair", "cosine", "cosine_centered"])


def _vector_hook(tv: TaskVectors, layer: int, prompts: Sequence[Prompt], mode: str) -> list:
    """The hook of one vector at one layer: each prompt gets its own task's vector, at the last prompt token."""
    vec = tv.vectors[tv.layer_index(layer)][[tv.task_index(p.task) for p in prompts]]  # [n, d] call order
    fn = H.add(vec) if mode == "add" else H.replace(vec)
    return [(H.Site(layer, "resid_post"), fn)]


def _evaluate(adapter: Adapter, config: FVConfig, setting: str, prompts: list[Prompt], conds: list[dict],
              vectors: dict[str, TaskVectors], progress: bool) -> pd.DataFrame:
    """Run every condition (``vector``, ``mode``, ``layer``) of one setting as branches of one shared prefix; one row
    per (condition, prompt) with ``correct``."""
    branches = [[] if c["vector"] == "none" else _vector_hook(vectors[c["vector"]], c["layer"], prompts, c["mode"])
                for c in conds]
    texts = [p.text for p in prompts]
    new = config.natural_new_tokens if setting == "natural" else 1
    gens = adapter.generate_branches(texts, branches, new, max_rows=config.max_rows, batch_size=config.batch_size,
                                     progress=progress)
    first = answer_first_tokens(adapter, prompts).tolist()
    frames = []
    for c, gen in zip(conds, gens, strict=True):
        got = [row[0] if row else -1 for row in gen.tokens]
        if setting == "natural":
            correct = [p.target in text for p, text in zip(prompts, gen.texts, strict=True)]
        else:
            correct = [g == a for g, a in zip(got, first, strict=True)]
        frames.append(pd.DataFrame({"setting": setting, "vector": c["vector"], "mode": c["mode"],
                                    "layer": c["layer"] if c["layer"] is not None else -1,
                                    "prompt_id": range(len(prompts)), "task": [p.task for p in prompts],
                                    "generated": gen.texts, "first_token": got, "answer_token": first,
                                    "correct": correct, "engine": gen.engine}))
    return pd.concat(frames, ignore_index=True)


def _accuracy(preds: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Per (setting, condition, task) and pooled (``task == "all"``) accuracy with paired bootstrap CIs."""
    out = []
    for setting, part in preds.groupby("setting", sort=False):
        keys = part.drop_duplicates(["vector", "mode", "layer"])[["vector", "mode", "layer"]].reset_index(drop=True)
        n_cond = len(keys)
        correct = torch.tensor(part["correct"].to_numpy(), dtype=torch.bool).view(n_cond, -1)
        groups = part["task"].iloc[: correct.shape[1]].tolist()
        per_task = bootstrap_accuracy(correct, groups, n_boot=max(n_boot, 1), seed=seed)
        pooled = bootstrap_accuracy(correct, ["all"] * len(groups), n_boot=max(n_boot, 1), seed=seed)
        acc = pd.concat([pooled, per_task], ignore_index=True)
        if n_boot == 0:
            for col in ("ci_low", "ci_high", "delta_low", "delta_high"):
                acc[col] = math.nan
        acc = keys.reset_index().rename(columns={"index": "condition"}).merge(acc, on="condition")
        out.append(acc.drop(columns="condition").assign(setting=setting))
    cols = ["setting", "vector", "mode", "layer", "task", "n", "accuracy", "ci_low", "ci_high", "delta", "delta_low",
            "delta_high"]
    return pd.concat(out, ignore_index=True)[cols]


def run_function_vectors(
    adapter: Adapter, config: FVConfig, family: TaskFamily | None = None, *, heads: HeadsResult | None = None,
    progress: bool = True,
) -> FVResult:
    """Build the function vector and inject it (module docstring). ``heads``: a head analysis of this model (its
    means and AIE ranking; refused if from another model); without it one is run (:meth:`FVConfig.heads_config`).
    Every check runs before any model work."""
    t0 = time.perf_counter()
    fam = family if family is not None else get_family(config.family, **config.family_kwargs)
    tasks = real_tasks(fam)
    n_heads = heads_of(adapter)
    layers = H.resolve_layers(config.layers, adapter.n_layers, "FVConfig.layers")
    if config.fv_layer is not None and not 0 <= config.fv_layer < adapter.n_layers:
        raise ValueError(f"FVConfig.fv_layer {config.fv_layer} is out of range for a model with {adapter.n_layers} "
                         "layers")
    explicit = check_heads(parse_heads(config.heads), adapter.n_layers, n_heads, "FVConfig.heads") \
        if config.heads is not None else None
    if heads is not None:
        heads.means.check_model(adapter)
        absent = [t for t in tasks if t not in heads.means.tasks]
        if absent:
            raise ValueError(f"the head analysis has no means for tasks {absent}")
    hc = config.heads_config()
    if heads is None:
        from .heads import _check_run

        _check_run(adapter, hc, fam)
    elif len(tasks) < 2:
        raise ValueError(f"family {fam.name!r} needs at least two tasks besides Null, has {tasks}")
    if explicit is None and config.top_k > adapter.n_layers * n_heads:
        raise ValueError(f"FVConfig.top_k must be an int in [1, {adapter.n_layers * n_heads}], got {config.top_k}")
    builder = PromptBuilder(PromptTemplate(**config.template))
    evals = {"zero_shot": builder.build(fam, config.n_per_task, 0, config.seed + 2, tasks=tasks)}  # (also for the sweep)
    if "shuffled" in config.settings:
        clean = builder.build(fam, config.n_per_task, config.shots, config.seed + 3, tasks=tasks)
        evals["shuffled"] = corrupt_prompts(clean, fam, "shuffled", PromptTemplate(**config.template), config.seed + 3)
    if "natural" in config.settings:
        evals["natural"] = natural_prompts(fam, tasks, config.natural_templates, config.n_per_task, config.seed + 4)
    for setting in evals:
        answer_first_tokens(adapter, evals[setting])  # an answer that tokenizes to nothing fails here

    if heads is None:
        heads = run_heads(adapter, hc, fam, progress=progress)
    chosen = explicit if explicit is not None else heads.top(config.top_k)
    scores = None if explicit is not None else heads.top_heads["aie"].head(len(chosen)).tolist()
    vectors = {"function": function_vector(adapter, heads.means, chosen, scores=scores,
                                           ranking="given" if explicit is not None else "aie")}
    modes = {"function": "add"}
    if config.compare:
        vp = builder.build(fam, config.n_vector_prompts, config.shots, config.seed + 5)  # Null too, as patching reads
        for definition in ("paper", "hendel"):
            vectors[definition] = task_vectors(adapter, vp, definition, layers, family=fam,
                                               template=PromptTemplate(**config.template), seed=config.seed + 5,
                                               batch_size=config.batch_size, progress=progress)
            modes[definition] = config.tv_mode

    base = {"vector": "none", "mode": "none", "layer": None}
    frames, best = [], None
    if "zero_shot" in config.settings or config.fv_layer is None:  # the sweep (also to find the FV's best layer)
        sweep = [base] + [{"vector": v, "mode": modes[v], "layer": layer} for v in vectors for layer in layers]
        zero = _evaluate(adapter, config, "zero_shot", evals["zero_shot"], sweep, vectors, progress)
        acc0 = _accuracy(zero, 0, config.seed)
        fv_rows = acc0[(acc0["vector"] == "function") & (acc0["task"] == "all")]
        best = int(fv_rows.loc[fv_rows["accuracy"].idxmax(), "layer"])
        if "zero_shot" in config.settings:
            frames.append(zero)
    fv_layer = config.fv_layer if config.fv_layer is not None else best
    for setting in ("shuffled", "natural"):
        if setting in evals and setting in config.settings:
            conds = [base, {"vector": "function", "mode": "add", "layer": fv_layer}]
            frames.append(_evaluate(adapter, config, setting, evals[setting], conds, vectors, progress))
    preds = pd.concat(frames, ignore_index=True)
    accuracy = _accuracy(preds, config.n_boot, config.seed)
    cosine = cosine_table(vectors, layers, tasks) if len(vectors) > 1 else cosine_table({}, layers, tasks)
    result = FVResult(config, accuracy, preds, cosine, vectors, {}, adapter.identity())
    result.summary = fv_summary(result, best, fv_layer, chosen)
    result.seconds = time.perf_counter() - t0
    return result


def fv_summary(result: FVResult, best: int | None, fv_layer: int, heads: Sequence[tuple[int, int]]) -> dict:
    """Headlines: the heads, the FV's best zero-shot layer, the gain per task (with CIs) of each vector at its own
    best layer, the shuffled and natural gains, mean cosines."""
    acc = result.accuracy
    out: dict = {"heads": [list(h) for h in heads], "fv_best_layer": best, "fv_layer": fv_layer, "zero_shot": {}}
    zs = acc[acc["setting"] == "zero_shot"]
    base = zs[zs["vector"] == "none"].set_index("task")["accuracy"]
    out["zero_shot"]["baseline"] = {t: float(v) for t, v in base.items()}
    for vec in [v for v in dict.fromkeys(zs["vector"]) if v != "none"]:
        part = zs[zs["vector"] == vec]
        pooled = part[part["task"] == "all"]
        layer = int(pooled.loc[pooled["accuracy"].idxmax(), "layer"])
        at = part[part["layer"] == layer]
        out["zero_shot"][vec] = {"best_layer": layer, "gain": {
            r.task: {"delta": round(float(r.delta), 4), "ci": [_r(r.delta_low), _r(r.delta_high)],
                     "accuracy": round(float(r.accuracy), 4)} for r in at.itertuples()}}
    for setting in ("shuffled", "natural"):
        part = acc[(acc["setting"] == setting) & (acc["vector"] == "function")]
        if len(part):
            out[setting] = {r.task: {"delta": round(float(r.delta), 4), "ci": [_r(r.delta_low), _r(r.delta_high)],
                                     "accuracy": round(float(r.accuracy), 4)} for r in part.itertuples()}
    cos = result.cosine
    if len(cos):
        out["cosine_mean"] = {p: {"raw": round(float(g["cosine"].mean()), 4),
                                  "centered": round(float(g["cosine_centered"].mean()), 4)}
                              for p, g in cos.groupby("pair", sort=False)}
    out["engine"] = sorted(set(result.predictions["engine"]))
    out["definition"] = FUNCTION
    return out


def _r(x: object) -> float | None:
    v = float(x)  # type: ignore[arg-type]
    return round(v, 4) if math.isfinite(v) else None
