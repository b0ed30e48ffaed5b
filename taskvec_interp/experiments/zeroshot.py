"""Zero-shot task vectors as Hendel et al. published them ("In-context learning creates task vectors", 2023): a
named preset.

For every query of a task (its input ``x``):

* **baseline**: the zero-shot prompt of the query (the template's prompt with no demonstrations, ``x ->``), no
  intervention;
* **icl**: the query with its own ``shots`` demonstrations;
* **task_vector**: the zero-shot prompt with the state of its last token at layer ``L`` (``resid_post``) REPLACED by
  a task vector read at the same layer, for every layer of ``layers`` and every kind of ``vectors``:

  - ``per_query`` (the published method): the query's OWN demonstrations followed by each of ``n_dummy`` dummy
    queries (other inputs of the task), the last-token state averaged over the dummies
    (:func:`~taskvec_interp.probes.vectors.per_query_vectors`);
  - ``per_task``: the mean of the per-query vectors over the task's DEV queries (one vector per task and layer; the
    library's ``hendel`` definition, saved as ``per_task_vectors.safetensors``).

Queries are split per task into a dev and a disjoint test split (``n_dev``, ``n_test``). The layer is chosen on the
dev split (``select``: the best mean accuracy over tasks, or each task's own best as Hendel et al.'s code does; or a
fixed ``layer``) and reported on the test split, where accuracies get bootstrap CIs and paired McNemar tests (task
vector vs baseline, per-query vs per-task) on the same queries.

Scoring, both from the same greedy generation (each task's own answer budget: its longest answer's tokens):

* ``first_token`` (Hendel et al. score one generated token): the first generated content token equals the answer's
  first content token (token texts compared; leading tokens that are spaces only are skipped on both sides, a line
  break before any content is a wrong answer) -- never a string-prefix test;
* ``exact``: the generation, cut at its line's end or the template's example separator (whichever comes first) and
  whitespace-normalised, equals the answer.

One capture pass reads every dummy prompt at every layer; every (vector kind, layer) condition of a task is a branch
of one shared prompt prefix (:meth:`~taskvec_interp.adapters.base.Adapter.generate_branches`), layers x queries
stacked along the batch axis.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
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
from ..probes.accuracy import bootstrap_accuracy, exact_match, first_token_match
from ..probes.stats import mcnemar_exact
from ..probes.vectors import (
    TaskVectors,
    dummy_query_prompts,
    load_named_vectors,
    per_query_vectors,
    save_named_vectors,
)
from ..results import provenance, read_json, read_parquet, write_json
from ..tasks import Example, Prompt, PromptBuilder, PromptTemplate, TaskFamily, get_family
from ..tasks.base import base_entropy, keyed_rng
from ..tasks.tokenization import check_tokenization
from ..validate import check_bool, check_choice, check_choices, check_int, check_optional_int, check_str

__all__ = ["CONDITIONS", "KIND", "SCORES", "SELECT", "VECTORS", "ZeroShotConfig", "ZeroShotPrompts", "ZeroShotResult",
           "run_zero_shot", "zero_shot_prompts"]

KIND = "zero_shot"
VECTORS: tuple[str, ...] = ("per_query", "per_task")
CONDITIONS: tuple[str, ...] = ("baseline", "task_vector", "icl")
SCORES: tuple[str, ...] = ("first_token", "exact")
SELECT: tuple[str, ...] = ("pooled", "per_task")
COLUMNS = ["task", "split", "layer", "condition", "vector", "query", "input", "answer", "generated", "exact",
           "first_token"]


@dataclass
class ZeroShotConfig(PromptSetConfig):
    """Hendel et al.'s zero-shot task-vector protocol (saved as ``config.json``); the defaults are theirs: 5
    demonstrations, 2 dummy queries, 50 dev and 50 test queries per task, the layer chosen on dev by first-token
    accuracy. ``n_per_task`` is derived (``n_dev + n_test``)."""

    family: str = opt("fv", "task family: fv (built-in function-vector tasks) | files:PATH | bitwise | pos")
    shots: int = opt(5, "demonstrations of each query (its ICL prompt and its task vector's prompts)")
    n_per_task: int | None = opt(None, "queries per task: n_dev + n_test (derived; given, it must equal that)")
    n_dev: int = opt(50, "dev queries per task (the layer is chosen on them; the per-task vector is their mean)")
    n_test: int = opt(50, "test queries per task (disjoint inputs from dev; every reported number)")
    n_dummy: int = opt(2, "dummy queries per query whose last-token states are averaged into its task vector")
    replace: bool = opt(False, "sample queries with replacement in a task with fewer inputs than n_dev + n_test "
                               "(dev and test stay disjoint by input)")
    strip: bool | None = opt(None, "strip whitespace around task-file inputs and outputs (fv / files families; "
                                   "default: the family's own, which strips)")
    model: str = model_field()
    backend: str = backend_field()
    layers: str | list[int] = opt("all", "layers swept: all | first:K | last:K | A-B | 3,5,7")
    vectors: tuple[str, ...] = opt(VECTORS, "task vectors, comma-separated: per_query (each query's own "
                                            "demonstrations + dummies), per_task (mean over the task's dev queries)",
                                   choices=VECTORS)
    scoring: str = opt("first_token", "score that chooses the layer and heads the table (both are computed): "
                                      "first_token (Hendel et al.) | exact", choices=SCORES)
    select: str = opt("pooled", "layer selection on the dev split: pooled (best mean accuracy over tasks) | "
                                "per_task (each task's own best, as Hendel et al.'s code)", choices=SELECT)
    layer: int | None = opt(None, "a fixed layer for the test split instead of choosing one on the dev split")
    max_new_tokens: int | None = opt(None, "tokens generated per answer (default: each task's longest answer)")
    n_boot: int = n_boot_field()
    batch_size: int = batch_size_field()
    max_rows: int = opt(256, "rows (queries x conditions) per call of the branch engine")

    supports_replace: ClassVar[bool] = True
    """``replace`` is honoured (:func:`zero_shot_prompts`: with replacement within disjoint dev / test pools)."""

    def __post_init__(self) -> None:
        n = "ZeroShotConfig"
        check_int(f"{n}.n_dev", self.n_dev, 1)
        check_int(f"{n}.n_test", self.n_test, 5)
        total = self.n_dev + self.n_test
        if self.n_per_task is None:
            self.n_per_task = total
        elif self.n_per_task != total:
            raise ValueError(f"{n}.n_per_task must be n_dev + n_test = {total} (or left unset), got {self.n_per_task!r}")
        self.check_prompt_set()
        check_int(f"{n}.n_dummy", self.n_dummy, 1)
        check_bool(f"{n}.replace", self.replace)
        if self.strip is not None:
            check_bool(f"{n}.strip", self.strip)
        check_str(f"{n}.model", self.model)
        check_choice(f"{n}.backend", self.backend, backend_names())
        self.layers = H.check_layer_spec(self.layers, H.CAPTURE_LAYERS, f"{n}.layers")
        self.vectors = check_choices(f"{n}.vectors", self.vectors, VECTORS)
        check_choice(f"{n}.scoring", self.scoring, SCORES)
        check_choice(f"{n}.select", self.select, SELECT)
        check_optional_int(f"{n}.layer", self.layer, 0)
        check_optional_int(f"{n}.max_new_tokens", self.max_new_tokens, 1)
        check_int(f"{n}.n_boot", self.n_boot, 0)
        check_int(f"{n}.batch_size", self.batch_size, 1)
        check_int(f"{n}.max_rows", self.max_rows, 1)

    def check_shots(self) -> None:
        check_int("ZeroShotConfig.shots", self.shots, 1)

    def build_family(self) -> TaskFamily:
        """The task family (``strip`` passed to a task-file family); a family that does not exist, or a ``strip``
        for a family that takes none, is a ``ValueError`` naming it."""
        kwargs = dict(self.family_kwargs)
        if self.strip is not None:
            if "strip" in kwargs:
                raise ValueError("ZeroShotConfig.strip and family_kwargs['strip'] are both given: give one")
            kwargs["strip"] = self.strip
        try:
            return get_family(self.family, **kwargs)
        except TypeError as err:
            raise ValueError(f"family {self.family!r} does not take the keyword arguments {sorted(kwargs)} "
                             f"(ZeroShotConfig.strip applies to the fv and files:PATH families): {err}") from None


# ------------------------------------------------------------------------------------------------
# The prompts (model-free): queries split dev / test, their ICL, zero-shot and dummy prompts
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZeroShotPrompts:
    """Every prompt of a run, one entry per query (query id = position): its ``split``, its ``icl`` prompt (the
    query with its ``shots`` demonstrations), its ``zero`` prompt (the query alone in the template) and, rows
    ``i * n_dummy ...`` of ``dummies``, its dummy prompts (its demonstrations + a dummy query)."""

    tasks: tuple[str, ...]
    split: tuple[str, ...]
    icl: tuple[Prompt, ...]
    zero: tuple[Prompt, ...]
    dummies: tuple[Prompt, ...]
    n_dummy: int

    def rows(self, task: str | None = None, split: str | None = None) -> list[int]:
        return [i for i, (p, s) in enumerate(zip(self.icl, self.split, strict=True))
                if (task is None or p.task == task) and (split is None or s == split)]


def _split_pools(n_inputs: int, n_dev: int, n_test: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint dev / test pools of input indices, sized in proportion to the splits (each at least one)."""
    perm = rng.permutation(n_inputs)
    k = min(max(1, round(n_inputs * n_dev / (n_dev + n_test))), n_inputs - 1)
    return perm[:k], perm[k:]


def zero_shot_prompts(family: TaskFamily, config: ZeroShotConfig) -> ZeroShotPrompts:
    """The run's prompts, drawn with one generator per task keyed by ``(seed, task)`` (no model): ``n_dev`` then
    ``n_test`` queries of every task but Null, dev and test disjoint by input. ``ValueError`` naming the task and
    the numbers when a task has too few inputs: for its splits (without ``replace``), for the splits even with
    replacement (fewer than two inputs), or for a query, its demonstrations and its dummy queries."""
    tasks = tuple(t.name for t in family.tasks if t is not family.null)
    need = config.n_dev + config.n_test
    for name in tasks:
        task = family[name]
        if config.shots + 1 + config.n_dummy > task.n_inputs:
            raise ValueError(f"task {name!r} has {task.n_inputs} inputs: a query, its {config.shots} demonstrations "
                             f"(shots) and {config.n_dummy} dummy queries (n_dummy) need "
                             f"{config.shots + 1 + config.n_dummy} distinct inputs; lower shots or n_dummy")
        if need > task.n_inputs and not config.replace:
            raise ValueError(f"task {name!r} has {task.n_inputs} distinct inputs, fewer than n_dev + n_test = "
                             f"{config.n_dev} + {config.n_test} = {need}: the dev and test splits would overlap; "
                             "lower n_dev / n_test or sample queries with replacement (replace=True, --replace; dev "
                             "and test stay disjoint by input)")
        if need > task.n_inputs and task.n_inputs < 2:
            raise ValueError(f"task {name!r} has {task.n_inputs} input: disjoint dev and test splits need two")
    builder = PromptBuilder(PromptTemplate(**config.template))
    base = base_entropy(config.seed)
    split, icl, zero = [], [], []
    for name in tasks:
        task = family[name]
        label = family.label(name)
        rng = keyed_rng(base, "zero_shot", name)
        if need <= task.n_inputs:
            queries = task.sample(need, rng)
        else:  # with replacement, from disjoint dev / test pools of the task's inputs
            pool = task.sample(task.n_inputs, rng)  # every example, in a seeded order
            dev, test = _split_pools(len(pool), config.n_dev, config.n_test, rng)
            picks = np.concatenate([rng.choice(dev, config.n_dev), rng.choice(test, config.n_test)])
            queries = [pool[int(i)] for i in picks]
        for j, q in enumerate(queries):  # a loop over queries to draw each one's demonstrations (no model work)
            cands = task.sample(config.shots + 1, rng)
            demos = [c for c in cands if c.input != q.input][: config.shots]
            split.append("dev" if j < config.n_dev else "test")
            icl.append(builder.render(q, demos, task=name, label=label, family=family.name))
            zero.append(builder.render(Example(q.input, q.output), [], task=name, label=label, family=family.name))
    dev_inputs = {(p.task, p.query) for p, s in zip(icl, split, strict=True) if s == "dev"}
    overlap = [(p.task, p.query) for p, s in zip(icl, split, strict=True) if s == "test" and (p.task, p.query) in dev_inputs]
    if overlap:  # never by construction; a guard for the statement the results rely on
        raise ValueError(f"dev and test queries overlap: {overlap[:3]}")
    dummies = dummy_query_prompts(icl, family, PromptTemplate(**config.template), config.n_dummy, config.seed)
    return ZeroShotPrompts(tasks, tuple(split), tuple(icl), tuple(zero), tuple(dummies), config.n_dummy)


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------
# The result
# ------------------------------------------------------------------------------------------------
@dataclass
class ZeroShotResult:
    """A zero-shot task-vector run. ``predictions``: one row per (condition, vector, layer, query) with
    :data:`COLUMNS` (``layer`` -1 and ``vector`` "" for baseline and ICL; the same ``query`` id is the same query in
    every condition). ``chosen_layer``: per vector kind, the layer of best mean dev accuracy over tasks;
    ``task_layers``: per vector kind and task, the layer the test split is reported at (``chosen_layer`` under
    ``select="pooled"``, each task's own best under ``"per_task"``, ``layer`` when fixed). ``vectors``: the
    per-task vectors (``per_task``: the ``hendel`` definition over the dev queries)."""

    config: ZeroShotConfig
    predictions: pd.DataFrame
    chosen_layer: dict[str, int]
    task_layers: dict[str, dict[str, int]]
    vectors: dict[str, TaskVectors] = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(self.predictions["task"]))

    def _metric(self, metric: str | None) -> str:
        metric = metric or self.config.scoring
        check_choice("metric", metric, SCORES)
        return metric

    def outcomes(self, condition: str, *, vector: str = "", task: str | None = None, split: str = "test",
                 layer: int | None = None, metric: str | None = None) -> pd.Series:
        """One condition's 0/1 outcome per query (indexed by query id, in query order); a task vector at ``layer``
        (default: the layer the task is reported at)."""
        metric = self._metric(metric)
        p = self.predictions
        sel = (p["condition"] == condition) & (p["split"] == split) & (p["vector"] == vector)
        if task is not None:
            sel &= p["task"] == task
        part = p[sel]
        if condition == "task_vector":
            if layer is None:
                want = part["task"].map(self.task_layers[vector])
                part = part[part["layer"] == want]
            else:
                part = part[part["layer"] == layer]
        return part.set_index("query")[metric].sort_index()

    def mcnemar(self, a: tuple[str, str], b: tuple[str, str], *, task: str | None = None, split: str = "test",
                metric: str | None = None) -> dict:
        """McNemar's test of two conditions, each ``(condition, vector)`` (``("task_vector", "per_query")``,
        ``("baseline", "")``), each task vector at its reported layer, on the same queries."""
        x = self.outcomes(a[0], vector=a[1], task=task, split=split, metric=metric)
        y = self.outcomes(b[0], vector=b[1], task=task, split=split, metric=metric)
        if not x.index.equals(y.index):
            raise ValueError("the two conditions were not run on the same queries")
        t = mcnemar_exact(x.to_numpy(), y.to_numpy())
        return {"a_only": t.b, "b_only": t.c, "p": t.p_value}

    def table(self, metric: str | None = None, split: str = "test") -> pd.DataFrame:
        """Per task (and ``"all"``, pooled over tasks) on ``split``: baseline, each task vector (at its reported
        layer, ``layer_{vector}``) and ICL accuracy with percentile bootstrap CIs (``_low`` / ``_high``, queries
        resampled within the task), each vector's gain over the baseline with its paired CI, and McNemar p-values of
        each vector against the baseline (``p_{vector}``) and of per-query against per-task (``p_per_query_vs_per_task``)
        on the same queries, with the discordant counts (``{a}_only_vs_{b}``: right under ``a`` only)."""
        metric = self._metric(metric)
        kinds = [v for v in VECTORS if v in self.task_layers]
        conds = [("baseline", "")] + [("task_vector", v) for v in kinds] + [("icl", "")]
        names = ["baseline", *kinds, "icl"]
        series = [self.outcomes(c, vector=v, split=split, metric=metric) for c, v in conds]
        for s in series[1:]:
            if not s.index.equals(series[0].index):
                raise ValueError("the conditions were not run on the same queries")
        qtask = self.predictions.drop_duplicates("query").set_index("query")["task"]
        groups = qtask.loc[series[0].index].tolist()
        correct = torch.tensor(np.stack([s.to_numpy() for s in series]), dtype=torch.bool)
        n_boot = self.config.n_boot
        boot = pd.concat([bootstrap_accuracy(correct, ["all"] * len(groups), n_boot=max(n_boot, 1),
                                             seed=self.config.seed),
                          bootstrap_accuracy(correct, groups, n_boot=max(n_boot, 1), seed=self.config.seed)])
        rows = []
        for task in ["all", *dict.fromkeys(groups)]:
            b = boot[boot["task"] == task].set_index("condition")
            row: dict = {"task": task, "n": int(b["n"].iloc[0])}
            for v in kinds:
                layers = set(self.task_layers[v].values()) if task == "all" else {self.task_layers[v][task]}
                row[f"layer_{v}"] = layers.pop() if len(layers) == 1 else -1
            for i, name in enumerate(names):
                row[name] = float(b.loc[i, "accuracy"])
                row[f"{name}_low"], row[f"{name}_high"] = _nan(b.loc[i, "ci_low"], n_boot), _nan(b.loc[i, "ci_high"], n_boot)
            sub = None if task == "all" else task
            for i, v in enumerate(kinds, start=1):
                row[f"{v}_gain"] = float(b.loc[i, "delta"])
                row[f"{v}_gain_low"] = _nan(b.loc[i, "delta_low"], n_boot)
                row[f"{v}_gain_high"] = _nan(b.loc[i, "delta_high"], n_boot)
                t = self.mcnemar(("task_vector", v), ("baseline", ""), task=sub, split=split, metric=metric)
                row[f"{v}_only_vs_baseline"], row[f"baseline_only_vs_{v}"] = t["a_only"], t["b_only"]
                row[f"p_{v}"] = t["p"]
            if len(kinds) == 2:
                t = self.mcnemar(("task_vector", "per_query"), ("task_vector", "per_task"), task=sub, split=split,
                                 metric=metric)
                row["per_query_only_vs_per_task"], row["per_task_only_vs_per_query"] = t["a_only"], t["b_only"]
                row["p_per_query_vs_per_task"] = t["p"]
            rows.append(row)
        return pd.DataFrame(rows)

    def curve(self, metric: str | None = None) -> pd.DataFrame:
        """Accuracy by layer on both splits: one row per (split, task, condition, vector, layer), ``task == "all"``
        pooled over tasks; baseline and ICL have ``layer`` -1."""
        metric = self._metric(metric)
        keys = ["split", "condition", "vector", "layer"]
        p = self.predictions
        per_task = p.groupby([*keys, "task"], sort=False)[metric].agg(["mean", "size"]).reset_index()
        pooled = p.groupby(keys, sort=False)[metric].agg(["mean", "size"]).reset_index().assign(task="all")
        out = pd.concat([pooled, per_task], ignore_index=True).rename(columns={"mean": "accuracy", "size": "n"})
        return out[["split", "task", "condition", "vector", "layer", "n", "accuracy"]]

    def save(self, out: str | Path) -> Path:
        """One result directory (kind ``"zero_shot"``): config.json (with the model's provenance),
        predictions.parquet, the per-task vectors (``per_task_vectors.safetensors``, loadable by ``taskvec patch
        --vectors-file``), summary.json (chosen layers, the test table)."""
        with write_result_dir(out, KIND, asdict(self.config)) as tmp:
            write_json(tmp / "config.json", {**asdict(self.config), "provenance": provenance(self.model)})
            self.predictions.to_parquet(tmp / "predictions.parquet", index=False)
            save_named_vectors(tmp, self.vectors)
            write_json(tmp / "summary.json", {"chosen_layer": self.chosen_layer, "task_layers": self.task_layers,
                                              "seconds": self.seconds, "table": _records(self.table())})
        return Path(out)

    @classmethod
    def load(cls, directory: str | Path) -> ZeroShotResult:
        d = read_result_dir(directory, KIND)
        raw, model = read_saved_config(d, ZeroShotConfig, known_only=True)
        raw["vectors"] = tuple(raw["vectors"])
        summary = read_json(d / "summary.json")
        vectors = load_named_vectors(d)
        return cls(ZeroShotConfig(**raw), read_parquet(d / "predictions.parquet"),
                   {k: int(v) for k, v in summary["chosen_layer"].items()},
                   {k: {t: int(x) for t, x in v.items()} for k, v in summary["task_layers"].items()},
                   vectors, model, float(summary.get("seconds", 0.0)))


def _nan(x: object, n_boot: int) -> float:
    return float(x) if n_boot else math.nan


def _records(frame: pd.DataFrame) -> list[dict]:
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
            for r in frame.to_dict("records")]


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
def _budgets(adapter: Adapter, zp: ZeroShotPrompts, config: ZeroShotConfig) -> tuple[dict[str, int], list[str]]:
    """Each task's answer budget (its longest answer's tokens after its prompts, or ``max_new_tokens``) and every
    query's answer first content token; an answer that tokenizes to nothing is refused, naming it."""
    tok = adapter._require_tokenizer()
    checks = check_tokenization(tok, list(zp.zero) + list(zp.icl), add_special_tokens=adapter.add_special_tokens)
    for c, p in zip(checks, list(zp.zero) + list(zp.icl), strict=True):
        if not c.answer_ids or not c.first_content:
            raise ValueError(f"the answer {p.answer!r} of task {p.task!r} (query {p.query!r}) tokenizes to no content")
    n = len(zp.zero)
    budgets = {}
    for task in zp.tasks:
        rows = zp.rows(task)
        budgets[task] = config.max_new_tokens or max(max(checks[i].n_budget, checks[n + i].n_budget) for i in rows)
    return budgets, [checks[i].first_content for i in range(n)]


def _choose(dev: pd.DataFrame, metric: str, vector: str, tasks: Sequence[str]) -> tuple[int, dict[str, int]]:
    """The layer of best mean dev accuracy over tasks (ties: the earlier layer) and each task's own best."""
    part = dev[(dev["condition"] == "task_vector") & (dev["vector"] == vector)]
    per_task = part.groupby(["task", "layer"], sort=False)[metric].mean().unstack("layer")
    per_task = per_task.loc[list(tasks)].sort_index(axis=1)
    pooled = int(per_task.mean(0).idxmax())
    return pooled, {t: int(per_task.loc[t].idxmax()) for t in tasks}


def _frame(zp: ZeroShotPrompts, rows: list[int], prompts: Sequence[Prompt], gen, condition: str, vector: str,
           layer: int, tokenizer: object, first: Sequence[str], separator: str) -> pd.DataFrame:
    exact = [exact_match(g, prompts[i].target, separator) for i, g in zip(rows, gen.texts, strict=True)]
    ft = [first_token_match(tokenizer, ids, first[i], separator, prompts[i].target)
          for i, ids in zip(rows, gen.tokens, strict=True)]
    return pd.DataFrame({"task": [prompts[i].task for i in rows], "split": [zp.split[i] for i in rows],
                         "layer": layer, "condition": condition, "vector": vector, "query": rows,
                         "input": [prompts[i].query for i in rows], "answer": [prompts[i].target for i in rows],
                         "generated": gen.texts, "exact": exact, "first_token": ft})


def run_zero_shot(adapter: Adapter, config: ZeroShotConfig, family: TaskFamily | None = None, *,
                  progress: bool = True) -> ZeroShotResult:
    """Run the protocol (module docstring) on ``adapter``. Every check (family, splits, shots, layers, answers)
    runs before any model work."""
    t0 = time.perf_counter()
    fam = family if family is not None else config.build_family()
    zp = zero_shot_prompts(fam, config)
    layers = H.resolve_layers(config.layers, adapter.n_layers, "ZeroShotConfig.layers")
    if config.layer is not None and config.layer not in layers:
        raise ValueError(f"ZeroShotConfig.layer {config.layer} is not among the layers swept ({layers[0]}..{layers[-1]} "
                         f"of a model with {adapter.n_layers} layers)")
    budgets, first = _budgets(adapter, zp, config)
    template = PromptTemplate(**config.template)
    tok = adapter._require_tokenizer()

    # the vectors: ONE capture pass over every dummy prompt, every layer
    pq = per_query_vectors(adapter, zp.icl, n_dummy=config.n_dummy, dummies=zp.dummies, layers=layers,
                           batch_size=config.batch_size, progress=progress)  # [layer, query, d]
    vecs: dict[str, torch.Tensor] = {}
    saved: dict[str, TaskVectors] = {}
    if "per_query" in config.vectors:
        vecs["per_query"] = pq
    if "per_task" in config.vectors:
        means = torch.stack([pq[:, zp.rows(t, "dev")].mean(1) for t in zp.tasks], 1)  # [layer, task, d]
        owner = torch.tensor([zp.tasks.index(p.task) for p in zp.icl])
        vecs["per_task"] = means[:, owner]
        saved["per_task"] = TaskVectors(means, layers, zp.tasks, "hendel", {
            "model": adapter.identity(), "component": "resid_post", "shots": config.shots,
            "n": {t: len(zp.rows(t, "dev")) for t in zp.tasks}, "seed": config.seed, "template": asdict(template),
            "family": fam.name, "n_dummy": config.n_dummy, "from": "dev queries (per-query vectors averaged)"})

    # the conditions: per answer budget, every (vector, layer) a branch of the zero-shot prompts' shared prefix
    frames = []
    by_budget: dict[int, list[str]] = {}
    for task in zp.tasks:
        by_budget.setdefault(budgets[task], []).append(task)
    for budget, tasks in by_budget.items():
        rows = [i for t in tasks for i in zp.rows(t)]
        conds = [("baseline", "", -1)] + [("task_vector", v, layer) for v in vecs for layer in layers]
        branches = [[] if c == "baseline" else
                    [(H.Site(layer, "resid_post"), H.replace(vecs[v][layers.index(layer), rows]))]
                    for c, v, layer in conds]
        gens = adapter.generate_branches([zp.zero[i].text for i in rows], branches, budget, max_rows=config.max_rows,
                                         batch_size=config.batch_size, progress=progress)
        for (c, v, layer), gen in zip(conds, gens, strict=True):
            frames.append(_frame(zp, rows, zp.zero, gen, c, v, layer, tok, first, template.example_separator))
        icl = adapter.generate([zp.icl[i].text for i in rows], budget, batch_size=config.batch_size, progress=progress)
        frames.append(_frame(zp, rows, zp.icl, icl, "icl", "", -1, tok, first, template.example_separator))
    order = {c: i for i, c in enumerate(CONDITIONS)}
    preds = pd.concat(frames, ignore_index=True)
    preds = preds.sort_values(["condition", "vector", "layer", "query"], key=lambda s: s.map(order)
                              if s.name == "condition" else s, kind="stable").reset_index(drop=True)[COLUMNS]
    preds = preds.astype({"layer": "int64", "query": "int64", "exact": bool, "first_token": bool})

    dev = preds[preds["split"] == "dev"]
    chosen, task_layers = {}, {}
    for v in vecs:
        pooled, own = _choose(dev, config.scoring, v, zp.tasks)
        chosen[v] = pooled if config.layer is None else config.layer
        if config.layer is not None:
            task_layers[v] = {t: config.layer for t in zp.tasks}
        elif config.select == "per_task":
            task_layers[v] = own
        else:
            task_layers[v] = {t: pooled for t in zp.tasks}
    return ZeroShotResult(config, preds, chosen, task_layers, saved, adapter.identity(), time.perf_counter() - t0)
