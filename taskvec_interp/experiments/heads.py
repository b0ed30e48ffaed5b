"""Which attention heads carry the task: the causal indirect effect (CIE) of every head, on the shared-prefix engine
(Todd et al., "Function vectors in large language models", ICLR 2024).

The method, per head ``(l, h)`` and prompt:

1. **Means.** Each task's mean of the head's output ``z`` (before the output projection) at the last prompt
   token, over clean ``shots``-shot prompts (:func:`taskvec_interp.probes.heads.mean_head_activations`: one
   capture pass, every head at once).
2. **Corrupted prompts.** ``n_cie_prompts`` prompts per task whose demonstrations' labels are shuffled
   across the demonstrations of the prompt (``corruption="shuffled"``, Todd et al.'s control; or
   ``"other_task"``: the demonstrations of another task of the family, the query of this one).
3. **CIE.** Replace head ``(l, h)``'s ``z`` at the last prompt token with its task mean; the CIE is the
   change in the probability of the correct answer's first token. Every head of every layer is one branch
   of ONE shared prompt prefix (:meth:`~taskvec_interp.adapters.base.Adapter.score_branches`): the prefix
   runs once per prompt batch, each branch only its last token (and the answer token), branches stacked on
   the batch axis. The baseline is a branch too (no hook), so both sides of the difference come from the same
   computation.
4. **AIE.** The mean CIE over a task's prompts, and over tasks (the mean of the task means); percentile
   bootstrap CIs, prompts resampled within tasks, the same resamples for every head.

On GQA models (query heads sharing key/value heads) ``z`` is per query head, so a branch patches one query
head, never the key/value group.

**Attribution patching** (AtP, Kramar et al. 2024) estimates every head's effect at once from one forward
and one backward pass per prompt batch: the gradient of the answer probability with respect to ``z`` at
the last token, times ``(mean - z)``. ``method="atp"`` ranks the heads by it and runs the exact CIE on the
top ``verify_top`` only; ``method="both"`` runs both on every head and reports their Spearman rank agreement.

The function vector (sum over the ``top_k`` heads by overall AIE of their projected means) is part of the
result (:attr:`HeadsResult.vectors`), saved like task vectors: ``taskvec patch --vectors-file`` injects it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .. import hooks as H
from ..adapters.base import Adapter
from ..config import (
    PromptSetConfig,
    backend_field,
    backend_names,
    batch_size_field,
    k_field,
    model_field,
    n_boot_field,
    opt,
    read_saved_config,
)
from ..engine import run_conditions
from ..io import config_hash, read_result_dir, write_result_dir
from ..probes.heads import (
    HeadMeans,
    check_heads,
    check_top_k,
    function_vector,
    head_decodability,
    heads_of,
    mean_head_activations,
    output_projections,
)
from ..probes.vectors import TaskVectors
from ..results import provenance, read_json, read_parquet, write_json
from ..tasks import (
    Example,
    Prompt,
    PromptBuilder,
    PromptTemplate,
    TaskFamily,
    as_rng,
    get_family,
    prompts_to_frame,
)
from ..tasks.function_vectors import TODD_TASKS
from ..tasks.tokenization import check_tokenization
from ..validate import check_choice, check_int, check_knn_k, check_n_boot, check_str

__all__ = [
    "CORRUPTIONS", "FV_FAMILY", "HeadsConfig", "HeadsResult", "METHODS", "PRESETS", "TODD_TASKS", "TODD_TEMPLATE",
    "aie_table", "answer_first_tokens", "atp_effects", "corrupt_prompts", "head_effects", "head_effects_loop",
    "patch_head", "real_tasks", "run_heads",
]

KIND = "heads"
CORRUPTIONS: tuple[str, ...] = ("shuffled", "other_task")
METHODS: tuple[str, ...] = ("exact", "atp", "both")
TODD_TEMPLATE: dict = {"input_prefix": "Q: ", "output_prefix": "\nA:", "example_separator": "\n\n"}
"""Todd et al.'s prompt layout: ``Q: x\\nA: y\\n\\n`` per demonstration, the prompt ending in ``A:``."""
FV_FAMILY = "fv"
"""The built-in function-vector family (:mod:`taskvec_interp.tasks.function_vectors`, shipped in the package)."""
PRESETS: dict[str, dict] = {
    "todd": {"shots": 10, "template": TODD_TEMPLATE, "n_per_task": 100, "n_cie_prompts": 25, "top_k": 10,
             "corruption": "shuffled", "method": "exact"},
    "quick": {"shots": 4, "template": TODD_TEMPLATE, "n_per_task": 20, "n_cie_prompts": 8, "top_k": 5, "n_boot": 200,
              "k": 5},
}
"""Named settings. ``todd``: Todd et al.'s defaults (10-shot prompts in the ``Q:`` / ``A:`` template, means over
100 clean prompts per task, the CIE over 25 shuffled-label prompts per task, the function vector from the top 10
heads); they are also :class:`HeadsConfig`'s defaults. ``quick``: a small run for a first look."""
TABLES = ("aie", "cie", "head_td", "atp", "top_heads", "prompts")


def real_tasks(family: TaskFamily) -> list[str]:
    """The family's tasks without its Null task."""
    return [t.name for t in family.tasks if t is not family.null]


@dataclass
class HeadsConfig(PromptSetConfig):
    """Everything that determines a head-effects run (saved as ``config.json``). Defaults: the ``todd`` preset.

    Prompt set: ``n_per_task`` clean ``shots``-shot prompts per task (the Null task included, for the per-head TD
    and the Null function vector) give the head means and the per-head TD; ``n_cie_prompts`` corrupted prompts
    per task (seed ``seed + 1``, ``corruption``) give the CIE. ``method``: ``exact`` (every head's exact CIE),
    ``atp`` (attribution patching of every head, the exact CIE of the top ``verify_top``), ``both``. ``top_k``:
    heads summed into the function vector. ``chunk_heads``: heads per call of the branch engine (a saved chunk
    when a checkpoint directory is given; ``None``: all in one call).
    """

    family: str = opt(FV_FAMILY, "task family: files:PATH (function-vector task files), bitwise or pos")
    template: dict = opt(TODD_TEMPLATE, "prompt template (PromptTemplate fields) as JSON")
    shots: int = opt(10, "demonstrations per prompt")
    n_per_task: int = opt(100, "clean prompts per task (Null included) the head means and per-head TD are read from")
    model: str = model_field()
    backend: str = backend_field()
    n_cie_prompts: int = opt(25, "corrupted prompts per task the causal indirect effects are measured on")
    corruption: str = opt("shuffled", "corrupted prompts: shuffled (labels shuffled across the demonstrations of a "
                                      "prompt, Todd et al.) | other_task (another task's demonstrations)",
                          choices=CORRUPTIONS)
    method: str = opt("exact", "exact (every head's exact CIE) | atp (attribution patching of every head, exact "
                               "CIE of the top --verify-top) | both", choices=METHODS)
    verify_top: int = opt(20, "heads whose exact CIE is measured after the AtP prefilter (method atp)")
    top_k: int = opt(10, "heads summed into the function vector (by average indirect effect over tasks)")
    k: int = k_field()
    n_boot: int = n_boot_field()
    batch_size: int = batch_size_field()
    max_rows: int = opt(128, "rows (prompts x heads) per call of the branch engine")
    chunk_heads: int | None = opt(None, "heads per call of the branch engine (default: all)")

    def __post_init__(self) -> None:
        self.check_prompt_set()
        n = "HeadsConfig"
        check_str(f"{n}.model", self.model)
        check_choice(f"{n}.backend", self.backend, backend_names())
        check_int(f"{n}.n_cie_prompts", self.n_cie_prompts, 1)
        check_choice(f"{n}.corruption", self.corruption, CORRUPTIONS)
        check_choice(f"{n}.method", self.method, METHODS)
        check_int(f"{n}.verify_top", self.verify_top, 1)
        check_int(f"{n}.top_k", self.top_k, 1)
        check_knn_k(f"{n}.k", self.k, self.n_per_task, "n_per_task")
        check_n_boot(f"{n}.n_boot", self.n_boot)
        check_int(f"{n}.batch_size", self.batch_size, 1)
        check_int(f"{n}.max_rows", self.max_rows, 1)
        if self.chunk_heads is not None:
            check_int(f"{n}.chunk_heads", self.chunk_heads, 1)

    def check_shots(self) -> None:
        check_int("HeadsConfig.shots", self.shots, 1)
        if self.corruption == "shuffled" and self.shots < 2:
            raise ValueError("HeadsConfig.shots must be an int >= 2 for corruption 'shuffled' (one label cannot be "
                             f"shuffled), got {self.shots}")

    @classmethod
    def preset(cls, name: str, **overrides) -> HeadsConfig:
        """A config from a named preset (:data:`PRESETS`) with ``overrides`` on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**(PRESETS[name] | overrides))


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------
def corrupt_prompts(prompts: Sequence[Prompt], family: TaskFamily, corruption: str, template: PromptTemplate,
                    seed: int) -> list[Prompt]:
    """Corrupted copies of ``prompts`` (same query and answer). ``"shuffled"``: the demonstrations' labels shuffled
    across the demonstrations of each prompt (a random permutation, as Todd et al. shuffle them); ``"other_task"``:
    the demonstrations of another task of the family (drawn uniformly among the other non-Null tasks), inputs
    distinct from the query."""
    check_choice("corruption", corruption, CORRUPTIONS)
    builder = PromptBuilder(template)
    rng = as_rng(seed)
    tasks = real_tasks(family)
    out = []
    for p in prompts:  # string work per prompt (the model runs batched)
        demos = list(p.demos)
        if corruption == "shuffled":
            labels = [d.output for d in demos]
            perm = rng.permutation(len(labels))
            demos = [Example(d.input, labels[j]) for d, j in zip(demos, perm, strict=True)]
        else:
            others = [t for t in tasks if t != p.task]
            other = family[others[int(rng.integers(len(others)))]]
            cands = other.sample(min(other.n_inputs, len(demos) + 1), rng)
            demos = [c for c in cands if c.input != p.query][: len(demos)]
        out.append(builder.render(Example(p.query, p.target), demos, task=p.task, label=p.label, family=p.family))
    return out


def answer_first_tokens(adapter: Adapter, prompts: Sequence[Prompt]) -> Tensor:
    """The first token id of each prompt's answer as it tokenizes after the prompt (``[n]`` long)."""
    checks = check_tokenization(adapter._require_tokenizer(), prompts, add_special_tokens=adapter.add_special_tokens)
    empty = [i for i, c in enumerate(checks) if not c.answer_ids]
    if empty:
        raise ValueError(f"the answer of prompt {empty[0]} ({prompts[empty[0]].answer!r}) tokenizes to nothing")
    return torch.tensor([c.answer_ids[0] for c in checks], dtype=torch.long)


# ------------------------------------------------------------------------------------------------
# The effects: exact (shared prefix), the obvious loop (reference), attribution patching
# ------------------------------------------------------------------------------------------------
def patch_head(head: int, values: Float[Tensor, "prompt d_head"]) -> H.HookFn:
    """A ``z``-site hook that replaces head ``head``'s output at the last prompt token with ``values`` (one row per
    prompt of the call, in call order); it writes nothing else, so it can branch off a shared prompt prefix."""
    def hook(act: Tensor, ctx: H.HookContext) -> Tensor | None:
        rows, cols = ctx.columns(-1, act.shape[0], act.shape[1])
        if rows.numel() == 0:
            return None
        if not 0 <= head < act.shape[2]:
            raise ValueError(f"head {head} out of range at {ctx.name} ({act.shape[2]} heads)")
        new = ctx.per_prompt(values, "head values")[rows.to(values.device)].to(device=act.device, dtype=act.dtype)
        heads = torch.full_like(rows, head)
        return act.index_put((rows, cols, heads), new)

    hook.position = -1  # type: ignore[attr-defined]  # writes the last prompt token only (hooks.writes_last_token_only)
    return hook


def _all_heads(adapter: Adapter) -> list[tuple[int, int]]:
    n_heads = heads_of(adapter)
    return [(layer, head) for layer in range(adapter.n_layers) for head in range(n_heads)]


def _check_effect_inputs(adapter: Adapter, texts: Sequence[str], answers: Tensor, values: Tensor,
                         heads: Sequence[Sequence[int]] | None) -> list[tuple[int, int]]:
    n_heads = heads_of(adapter)
    pairs = _all_heads(adapter) if heads is None else check_heads(heads, adapter.n_layers, n_heads)
    if answers.shape != (len(texts),):
        raise ValueError(f"answers must be [{len(texts)}] token ids, got {list(answers.shape)}")
    if values.ndim != 4 or values.shape[:3] != (len(texts), adapter.n_layers, n_heads):
        raise ValueError(f"values must be [{len(texts)} prompts, {adapter.n_layers} layers, {n_heads} heads, d_head], "
                         f"got {list(values.shape)}")
    return pairs


def head_effects(
    adapter: Adapter, prompts: Sequence[Prompt] | Sequence[str], answers: Tensor,
    values: Float[Tensor, "prompt layer head d_head"], heads: Sequence[Sequence[int]] | None = None, *,
    batch_size: int = 16, max_rows: int = 128, share_prefix: bool | None = None, progress: bool = True,
) -> tuple[Float[Tensor, " prompt"], Float[Tensor, "head prompt"]]:
    """The probability of each prompt's answer token ``answers[i]`` at its last prompt token, unpatched
    (``[prompt]``) and with each head of ``heads`` (default: every head of every layer) replaced by ``values[i, l,
    h]`` (``[head, prompt]``); the CIE is their difference. Every head is a branch of one shared prompt prefix
    (:meth:`Adapter.score_branches`; backends without a reusable cache run the same numbers in full passes)."""
    texts = [p.text if isinstance(p, Prompt) else p for p in prompts]
    pairs = _check_effect_inputs(adapter, texts, answers, values, heads)
    branches: list[list] = [[]] + [[(H.Site(layer, "z"), patch_head(head, values[:, layer, head]))]
                                   for layer, head in pairs]
    logp = adapter.score_branches(texts, [[int(a)] for a in answers.tolist()], branches, share_prefix=share_prefix,
                                  max_rows=max_rows, batch_size=batch_size, progress=progress)
    prob = logp.exp()
    return prob[0], prob[1:]


def head_effects_loop(
    adapter: Adapter, prompts: Sequence[Prompt] | Sequence[str], answers: Tensor,
    values: Float[Tensor, "prompt layer head d_head"], heads: Sequence[Sequence[int]] | None = None, *,
    batch_size: int = 16, progress: bool = True,
) -> tuple[Float[Tensor, " prompt"], Float[Tensor, "head prompt"]]:
    """The obvious loop :func:`head_effects` is checked against: one full forward pass per head per prompt batch,
    with one hook. Same return values; slower by about the prompt length (the reference of tests and the
    benchmark)."""
    texts = [p.text if isinstance(p, Prompt) else p for p in prompts]
    pairs = _check_effect_inputs(adapter, texts, answers, values, heads)
    n = len(texts)
    base = torch.empty(n, dtype=torch.float64)
    out = torch.empty((len(pairs), n), dtype=torch.float64)
    def prob(logits: Tensor, ans: Tensor) -> Tensor:
        return logits.double().log_softmax(-1).gather(-1, ans[:, None].to(logits.device))[:, 0].exp().cpu()

    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        batch = [texts[i] for i in idx.tolist()]
        base[idx] = prob(adapter.forward(batch, logits="last"), answers[idx])
        for c, (layer, head) in enumerate(tqdm(pairs, desc="heads (loop)", disable=not progress, leave=False)):
            hook = patch_head(head, values[idx, layer, head])
            out[c, idx] = prob(adapter.forward(batch, hooks=[(H.Site(layer, "z"), hook)], logits="last"), answers[idx])
    return base, out


def atp_effects(
    adapter: Adapter, prompts: Sequence[Prompt] | Sequence[str], answers: Tensor,
    values: Float[Tensor, "prompt layer head d_head"], *, batch_size: int = 16, progress: bool = True,
) -> Float[Tensor, "prompt layer head"]:
    """Attribution patching: each head's effect on the answer probability estimated to first order,
    ``grad_z p(answer) . (values - z)`` at the last prompt token, for every head of every layer from ONE forward and
    ONE backward pass per prompt batch (``[prompt, layer, head]``). Only the gradients with respect to ``z`` are
    computed (no parameter gets a ``.grad``)."""
    texts = [p.text if isinstance(p, Prompt) else p for p in prompts]
    _check_effect_inputs(adapter, texts, answers, values, None)
    n_layers = adapter.n_layers
    n, batches = adapter._batches(texts, batch_size)
    out = torch.empty((n, n_layers, values.shape[2]), dtype=torch.float32)
    for idx, inputs in tqdm(batches, desc="attribution patching", disable=not progress, leave=False):
        deltas: dict[int, Tensor] = {}
        zs: dict[int, Tensor] = {}
        hooks = adapter._all_hooks([(H.Site(layer, "z"), _tap(layer, deltas, zs)) for layer in range(n_layers)])
        with torch.enable_grad():
            logits = adapter._forward(inputs, hooks, adapter._state(inputs, idx, n), "last")
            target = answers[idx].to(logits.device)
            p = logits.float().softmax(-1).gather(-1, target[:, None]).sum()
            grads = torch.autograd.grad(p, [deltas[layer] for layer in range(n_layers)])
        g = torch.stack([x.detach().float().cpu() for x in grads], 1)  # [batch, layer, head, d_head]
        z = torch.stack([zs[layer].float().cpu() for layer in range(n_layers)], 1)
        out[idx] = ((values[idx].float() - z) * g).sum(-1)
    return out


def _tap(layer: int, deltas: dict[int, Tensor], zs: dict[int, Tensor]) -> H.HookFn:
    """A ``z`` hook that adds a zero leaf tensor (``deltas[layer]``, requiring grad) at the last prompt token and
    records ``z`` there (``zs[layer]``): the gradient with respect to it is the gradient with respect to ``z``."""
    def hook(act: Tensor, ctx: H.HookContext) -> Tensor:
        rows, cols = ctx.columns(-1, act.shape[0], act.shape[1])
        z = act[rows, cols]
        delta = torch.zeros_like(z, requires_grad=True)
        deltas[layer], zs[layer] = delta, z.detach()
        return act.index_put((rows, cols), z + delta)

    return hook


# ------------------------------------------------------------------------------------------------
# Averages with CIs
# ------------------------------------------------------------------------------------------------
def aie_table(cie: Float[Tensor, "head prompt"], prompt_tasks: Sequence[str], heads: Sequence[tuple[int, int]], *,
              n_boot: int = 1000, seed: int = 0, ci_level: float = 0.95, name: str = "aie") -> pd.DataFrame:
    """Average indirect effect per head and task (``task``) and over tasks (``task == "all"``: the mean of the task
    means), with percentile bootstrap CIs: prompts resampled within each task, the same resamples for every head
    (vectorised: one matrix product per task). Columns ``layer, head, task, n, {name}, ci_low, ci_high``."""
    cie = torch.as_tensor(cie, dtype=torch.float64)
    if cie.ndim != 2 or cie.shape != (len(heads), len(prompt_tasks)):
        raise ValueError(f"effects must be [{len(heads)} heads, {len(prompt_tasks)} prompts], got {list(cie.shape)}")
    tasks = list(dict.fromkeys(prompt_tasks))
    g = torch.Generator().manual_seed(seed)
    lo, hi = (1 - ci_level) / 2, 1 - (1 - ci_level) / 2
    q = torch.tensor([lo, hi], dtype=torch.float64)
    means, boots, frames = [], [], []
    layers = [h[0] for h in heads]
    head_ids = [h[1] for h in heads]
    for t in tasks:  # a loop over tasks; prompts and heads are vectorised
        idx = torch.tensor([i for i, x in enumerate(prompt_tasks) if x == t])
        v = cie[:, idx]
        mean = v.mean(1)
        means.append(mean)
        if n_boot:
            draws = torch.randint(len(idx), (n_boot, len(idx)), generator=g)
            counts = torch.zeros((n_boot, len(idx)), dtype=torch.float64).scatter_add_(
                1, draws, torch.ones_like(draws, dtype=torch.float64))
            boot = v @ counts.T / len(idx)  # [head, n_boot]
            boots.append(boot)
            ci = torch.quantile(boot, q, dim=1)
        else:
            ci = torch.full((2, len(heads)), math.nan, dtype=torch.float64)
        frames.append(pd.DataFrame({"layer": layers, "head": head_ids, "task": t, "n": len(idx), name: mean.tolist(),
                                    "ci_low": ci[0].tolist(), "ci_high": ci[1].tolist()}))
    overall = torch.stack(means).mean(0)
    ci = torch.quantile(torch.stack(boots).mean(0), q, dim=1) if n_boot else \
        torch.full((2, len(heads)), math.nan, dtype=torch.float64)
    frames.insert(0, pd.DataFrame({"layer": layers, "head": head_ids, "task": "all", "n": len(prompt_tasks),
                                   name: overall.tolist(), "ci_low": ci[0].tolist(), "ci_high": ci[1].tolist()}))
    return pd.concat(frames, ignore_index=True)


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


# ------------------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------------------
@dataclass
class HeadsResult:
    """A head-effects run. Tables (tidy, Parquet): ``aie`` (per head and task, ``task == "all"`` over tasks, the
    exact CIE's average with CIs), ``cie`` (per head and corrupted prompt: ``p_base``, ``p_patched``, ``cie``),
    ``head_td`` (per-head task decodability), ``atp`` (attribution-patching estimates, empty for ``exact``),
    ``top_heads`` (the ranking: ``rank, layer, head, aie, ci_low, ci_high, td``), ``prompts`` (the corrupted
    prompts). ``means`` (head means), ``vectors`` (the function vector of the top ``top_k`` heads), ``summary``."""

    config: HeadsConfig
    aie: pd.DataFrame
    cie: pd.DataFrame
    head_td: pd.DataFrame
    atp: pd.DataFrame
    top_heads: pd.DataFrame
    prompts: pd.DataFrame
    means: HeadMeans
    vectors: TaskVectors
    summary: dict
    model: dict = field(default_factory=dict)
    seconds: float = 0.0

    def top(self, k: int | None = None) -> list[tuple[int, int]]:
        """The ``k`` (default ``top_k``) heads of highest average indirect effect over tasks."""
        k = self.config.top_k if k is None else k
        return [(int(r.layer), int(r.head)) for r in self.top_heads.head(k).itertuples()]

    def save(self, out: str | Path) -> Path:
        """One result directory (kind ``"heads"``): config.json (with provenance), the tables as Parquet,
        ``head_means.safetensors``, ``function_vectors.safetensors`` (loadable by ``taskvec patch --vectors-file``)
        and summary.json; an older heads result in ``out`` is replaced whole, anything else refused."""
        with write_result_dir(out, KIND, asdict(self.config)) as tmp:
            write_json(tmp / "config.json", {**asdict(self.config), "provenance": provenance(self.model)})
            for name in TABLES:
                frame = getattr(self, name)
                frame = frame.map(lambda v: list(v) if isinstance(v, tuple) else v) if name == "prompts" else frame
                frame.to_parquet(tmp / f"{name}.parquet", index=False)
            self.means.save(tmp / "head_means.safetensors")
            self.vectors.save(tmp / "function_vectors.safetensors")
            write_json(tmp / "summary.json", {**self.summary, "seconds": self.seconds})
        return Path(out)

    @classmethod
    def load(cls, directory: str | Path) -> HeadsResult:
        """Read back what :meth:`save` wrote (checked whole: ``ValueError`` naming the file otherwise)."""
        d = read_result_dir(directory, KIND)
        raw, model = read_saved_config(d, HeadsConfig, known_only=True)
        config = HeadsConfig(**raw)
        tables = {name: read_parquet(d / f"{name}.parquet") for name in TABLES}
        summary = read_json(d / "summary.json")
        seconds = summary.pop("seconds", 0.0)
        return cls(config, **tables, means=HeadMeans.load(d / "head_means.safetensors"),
                   vectors=TaskVectors.load(d / "function_vectors.safetensors"), summary=summary, model=model,
                   seconds=seconds)


# ------------------------------------------------------------------------------------------------
# The experiment
# ------------------------------------------------------------------------------------------------
def _check_run(adapter: Adapter, config: HeadsConfig, fam: TaskFamily) -> list[str]:
    """Every refusal that needs no model work: heads, output projection, top-k, tasks."""
    n_heads = heads_of(adapter)
    output_projections(adapter)
    total = adapter.n_layers * n_heads
    check_top_k(config.top_k, total, "HeadsConfig.top_k")
    if config.method == "atp":
        check_top_k(config.verify_top, total, "HeadsConfig.verify_top")
    tasks = real_tasks(fam)
    if len(tasks) < 2:
        raise ValueError(f"family {fam.name!r} has {len(tasks)} task(s) besides Null ({tasks}); the head analysis needs "
                         "at least two: the shuffled-label (or other-task) control, the average effect over tasks and "
                         "the per-head task decodability compare tasks")
    return tasks


def _exact(adapter: Adapter, config: HeadsConfig, prompts: list[Prompt], answers: Tensor, values: Tensor,
           heads: list[tuple[int, int]], checkpoint_dir: str | Path | None, progress: bool) -> pd.DataFrame:
    """Exact CIE of ``heads``: one tidy row per (head, prompt), through the resumable condition loop."""
    tasks = [p.task for p in prompts]

    def evaluate(chunk: list[dict]) -> list[pd.DataFrame]:
        base, patched = head_effects(adapter, prompts, answers, values, [(c["layer"], c["head"]) for c in chunk],
                                     batch_size=config.batch_size, max_rows=config.max_rows, progress=progress)
        return [pd.DataFrame({"prompt_id": range(len(prompts)), "task": tasks, "p_base": base.numpy(),
                              "p_patched": row.numpy(), "cie": (row - base).numpy()}) for row in patched]

    # the run's identity in every condition: saved chunks of another model, config or prompt set are never reused
    run = config_hash({"model": adapter.identity(), "config": asdict(config), "prompts": [p.text for p in prompts],
                       "answers": answers.tolist(), "values": float(values.double().sum())})[:16]
    conds = [{"layer": layer, "head": head, "run": run} for layer, head in heads]
    return run_conditions(conds, evaluate, chunk_size=config.chunk_heads, checkpoint_dir=checkpoint_dir,
                          progress=progress, desc="heads").drop(columns=["condition", "run"])


def run_heads(
    adapter: Adapter, config: HeadsConfig, family: TaskFamily | None = None, *,
    prompts: Sequence[Prompt] | None = None, cie_prompts: Sequence[Prompt] | None = None,
    checkpoint_dir: str | Path | None = None, progress: bool = True,
) -> HeadsResult:
    """The head analysis (module docstring): head means and per-head TD from clean prompts, the CIE of every head on
    corrupted prompts (exact, AtP or both), AIE with CIs, the top heads and their function vector.

    ``prompts`` / ``cie_prompts`` replace the built clean / corrupted prompt sets. Everything is checked before any
    model work. ``checkpoint_dir``: finished chunks of heads (``config.chunk_heads``) are kept there and a rerun
    resumes."""
    t0 = time.perf_counter()
    fam = family if family is not None else get_family(config.family, **config.family_kwargs)
    tasks = _check_run(adapter, config, fam)
    template = PromptTemplate(**config.template)
    builder = PromptBuilder(template)
    clean = list(prompts) if prompts is not None else builder.build(fam, config.n_per_task, config.shots,
                                                                    config.seed)
    if cie_prompts is None:
        base = builder.build(fam, config.n_cie_prompts, config.shots, config.seed + 1, tasks=tasks)
        cie_prompts = corrupt_prompts(base, fam, config.corruption, template, config.seed + 1)
    cie_prompts = [p for p in cie_prompts if p.task in tasks]
    if not clean or not cie_prompts:
        raise ValueError("no prompts: the clean and the corrupted prompt sets must both be non-empty")
    missing = [t for t in tasks if t not in {p.task for p in clean}]
    if missing:
        raise ValueError(f"tasks {missing} have no clean prompts to average head outputs over")
    answers = answer_first_tokens(adapter, cie_prompts)

    means, z = mean_head_activations(adapter, clean, template=template, seed=config.seed,
                                     batch_size=config.batch_size, progress=progress)
    labels = list(means.tasks)
    head_td = head_decodability(z, [p.task for p in clean], labels, k=config.k, n_boot=config.n_boot,
                                seed=config.seed)
    del z
    values = means.for_prompts([p.task for p in cie_prompts])
    heads = _all_heads(adapter)
    prompt_tasks = [p.task for p in cie_prompts]
    tok = adapter._require_tokenizer()
    blank = sum(not tok.decode([int(a)]).strip() for a in answers.tolist())
    summary: dict = {"method": config.method, "n_heads": len(heads), "tasks": tasks,
                     "answers_starting_with_a_blank_token": blank}  # > 0: the metric reads a space, not the answer
    atp = pd.DataFrame(columns=["layer", "head", "task", "n", "atp", "ci_low", "ci_high"])
    if config.method in ("atp", "both"):
        est = atp_effects(adapter, cie_prompts, answers, values, batch_size=config.batch_size, progress=progress)
        atp = aie_table(est.flatten(1).T, prompt_tasks, heads, n_boot=config.n_boot, seed=config.seed, name="atp")
    exact_heads = heads
    if config.method == "atp":
        ranked = atp[atp["task"] == "all"].sort_values("atp", ascending=False, kind="stable")
        exact_heads = [(int(r.layer), int(r.head)) for r in ranked.head(config.verify_top).itertuples()]
    cie = _exact(adapter, config, cie_prompts, answers, values, exact_heads, checkpoint_dir, progress)
    matrix = torch.tensor(cie["cie"].to_numpy()).view(len(exact_heads), len(cie_prompts))
    aie = aie_table(matrix, prompt_tasks, exact_heads, n_boot=config.n_boot, seed=config.seed)

    overall = aie[aie["task"] == "all"].merge(
        head_td[head_td["task"] == "all"][["layer", "head", "td"]], on=["layer", "head"], how="left")
    ranked = overall.sort_values("aie", ascending=False, kind="stable").reset_index(drop=True)
    top_heads = ranked.assign(rank=range(1, len(ranked) + 1))[["rank", "layer", "head", "aie", "ci_low", "ci_high",
                                                               "td"]]
    k = min(config.top_k, len(top_heads))
    chosen = [(int(r.layer), int(r.head)) for r in top_heads.head(k).itertuples()]
    vectors = function_vector(adapter, means, chosen, scores=top_heads["aie"].head(k).tolist(), ranking="aie")

    td_all = head_td[head_td["task"] == "all"].set_index(["layer", "head"])["td"]
    summary |= {
        "top_heads": [{"layer": int(r.layer), "head": int(r.head), "aie": float(r.aie), "ci_low": _num(r.ci_low),
                       "ci_high": _num(r.ci_high), "td": _num(r.td)} for r in top_heads.head(k).itertuples()],
        "top_k": k, "p_base_mean": float(cie.drop_duplicates("prompt_id")["p_base"].mean()),
        "td_vs_aie_spearman": _num(_spearman(overall["aie"], overall["td"])),
        "td_top_k_overlap": _overlap(overall, "aie", "td", k),
        "peak_td_head": _peak(td_all), "chance_td": float(head_td["chance"].iloc[0]),
        "aie_by_layer": {int(layer): float(v) for layer, v in overall.groupby("layer")["aie"].sum().items()},
    }
    if config.method in ("atp", "both"):
        both = overall[["layer", "head", "aie"]].merge(atp[atp["task"] == "all"][["layer", "head", "atp"]],
                                                      on=["layer", "head"])
        summary["atp_vs_exact_spearman"] = _num(_spearman(both["aie"], both["atp"]))
        summary["atp_top_k_overlap"] = _overlap(both, "aie", "atp", k)
        summary["atp_verified_heads"] = len(exact_heads)
    result = HeadsResult(config, aie, cie, head_td, atp, top_heads, prompts_to_frame(cie_prompts), means, vectors,
                         summary, adapter.identity())
    result.seconds = time.perf_counter() - t0
    return result


def _num(x: object) -> float | None:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _overlap(frame: pd.DataFrame, a: str, b: str, k: int) -> int:
    """How many of the top ``k`` heads by column ``a`` are among the top ``k`` by column ``b``."""
    top = {(r.layer, r.head) for r in frame.nlargest(k, a).itertuples()}
    return len(top & {(r.layer, r.head) for r in frame.nlargest(k, b).itertuples()})


def _peak(td: pd.Series) -> dict:
    (layer, head), value = td.idxmax(), td.max()
    return {"layer": int(layer), "head": int(head), "td": float(value)}
