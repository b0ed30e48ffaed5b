"""ICL accuracy: batched greedy generation with left padding, exact match of the whole answer.

One generation per prompt set; its prefill is the forward pass whose hidden states TD reads, so
accuracy and TD cost one pass (``capture_layers``).

**Where a generated answer ends** (both metrics, every family): at the end of its line (the first
``"\n"``) or at the template's example separator (the model's next demonstration would start there),
whichever comes first (:func:`cut_generation`). So with a blank-line separator (``"\n\n"``) the
generation ``"changed\nA: ..."`` answers ``"changed"``. A separator made only of spaces never cuts
(answers may hold spaces). An answer that itself spans lines (possible only in a ``files:`` family whose
outputs hold a line break: none of the shipped families' do) keeps as many lines of the generation as it
has, and a separator that occurs inside the answer does not cut it.

**Exact match** compares that part of the generation, whitespace-normalised, with the whole answer.

**First-token accuracy** compares first *content tokens* of the model's tokenizer, not string prefixes:
leading tokens that decode to whitespace only are skipped on both sides, and the two tokens' texts (their
whitespace stripped) must be equal. The answer's side is ``AnswerTokens.first_content``, the first
non-whitespace token of its in-context tokenization (``check_tokenization``); the generation's side is the
first non-whitespace token it actually generated (:func:`generated_first_content`), which must lie inside the
answer's part of the generation (a content token after a line break is the next line's, not the answer's).
So ``" larvae"`` is wrong for the answer ``" larva"`` and ``" closed"`` for ``" close"`` wherever the tokenizer
has them as one token each; SmolLM2's bitwise answer ``" 01101"`` (tokens ``" "``, ``"0"``, ...) scores the
first digit, not the space token every generation starts with; and a generation that spells the space
differently (``" "`` + ``"apples"`` for the answer token ``" apples"``, or no space at all) is aligned with the
answer by its content.

**Answer budget**: each task generates as many new tokens as its own longest answer needs
(:func:`answer_budgets`), whatever its sibling tasks' answers; prompts are generated in one call per distinct
budget (:func:`generate_by_budget`, :func:`generate_branches_by_budget`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..activations import Activations
from ..adapters.base import Adapter, Generation
from ..finite import NonFiniteError, describe, overflow_advice
from ..hooks import HookContext, HookSpec, checked_call
from ..tasks.prompts import Prompt
from ..tasks.tokenization import AnswerTokens, check_tokenization


def cut_generation(text: str, stop: str | None = "\n", answer: str = "") -> str:
    """The part of a generated ``text`` that is the answer: up to the end of its line, or of its
    ``n``-th line for an ``answer`` of ``n`` lines, or up to the separator ``stop``, whichever comes first
    (see the module docstring). ``stop`` does not cut when it is only spaces or occurs in ``answer``."""
    end = -1
    for _ in range(answer.count("\n") + 1):
        end = text.find("\n", end + 1)
        if end < 0:
            break
    if end >= 0:
        text = text[:end]
    if stop and stop.strip(" ") and stop not in answer and stop in text:
        text = text[: text.index(stop)]
    return text


def normalize_answer(text: str, stop: str | None = "\n", answer: str = "") -> str:
    """:func:`cut_generation`, whitespace collapsed (what exact match compares)."""
    return " ".join(cut_generation(text, stop, answer).split())


def exact_match(generated: str, answer: str, stop: str | None = "\n") -> bool:
    """Whether the answer's part of ``generated`` equals the whole ``answer`` (whitespace-normalised)."""
    return normalize_answer(generated, stop, answer) == " ".join(answer.split())


@dataclass
class AccuracyResult:
    """Per-prompt generations and correctness, plus the prefill's activations when captured.

    ``max_new_tokens``: the largest budget; ``budgets``: each task's own (:func:`answer_budgets`)."""

    predictions: pd.DataFrame
    activations: Float[Tensor, "layer prompt d_model"] | None
    layers: list[int]
    max_new_tokens: int
    budgets: dict[str, int] = field(default_factory=dict)

    def by_task(self) -> pd.DataFrame:
        """Tidy per-task accuracy: task, label, shots, n, exact, first_token."""
        df = self.predictions
        return (df.groupby(["task", "label", "shots"], sort=False)
                .agg(n=("exact", "size"), exact=("exact", "mean"), first_token=("first_token", "mean"))
                .reset_index())


def icl_accuracy(
    adapter: Adapter,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int | None = None,
    stop: str | None = "\n",
    hooks: HookSpec = (),
    capture_layers: str | int | Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> AccuracyResult:
    """Greedy-generate every prompt's answer and score it.

    ``max_new_tokens``: default is each task's longest answer's token count (never truncating an answer, and
    not depending on the other tasks' answers: :func:`answer_budgets`); an explicit budget is every task's,
    and one smaller than some answer needs raises ``ValueError``. ``stop``: the template's example separator
    (where a generated answer ends, beside its line's end: see the module docstring). ``hooks``: per-prompt
    vectors and positions in call order, as for :meth:`Adapter.generate`. ``capture_layers``: also return
    the prefill's last-token activations ``[layer, prompt, d_model]`` (for TD), from the same forward pass.
    """
    checks, budgets = answer_budgets(adapter, prompts, max_new_tokens)
    gen = generate_by_budget(adapter, [p.text for p in prompts], budgets, hooks=hooks, capture_layers=capture_layers,
                             batch_size=batch_size, progress=progress)
    predictions = score_generation(prompts, gen, checks, stop, tokenizer=adapter.tokenizer)
    if not predictions["exact"].any() and not predictions["first_token"].any():
        check_finite_logits(adapter, prompts[0].text)  # every answer wrong: NaN logits are not an accuracy of 0
    return AccuracyResult(predictions, gen.activations, gen.layers, max(budgets), task_budgets(prompts, budgets))


def check_finite_logits(adapter: Adapter, prompt: str) -> None:
    """One forward pass of the model itself over ``prompt``: a :class:`~taskvec_interp.finite.NonFiniteError`
    when its hidden states (naming the first layer that is not finite) or its next-token logits are NaN or
    infinite, so an evaluation of NaN is an error rather than an accuracy of 0. Cheap: :func:`icl_accuracy` runs
    it only when every answer was wrong. (Hooks of the evaluation are checked where they run: ``generate``
    refuses non-finite hidden states at the last layer.) Any other error of this one-prompt pass (a hook
    attached with ``adapter.hooks`` that expects every prompt) leaves the result as it is."""
    try:
        adapter.capture([prompt], "all", dtype=torch.float32, progress=False)  # raises naming the layer
        logits = adapter.forward([prompt], logits="last")
    except NonFiniteError:
        raise
    except Exception:  # noqa: BLE001 - a diagnostic: only a non-finite number is its business
        return
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteError(f"icl_accuracy: the next-token logits of prompt 0 are {describe(logits)} (every answer "
                             "was scored wrong: an evaluation of NaN, not an accuracy of 0): "
                             f"{overflow_advice(torch.float32, adapter._model_dtype())}")


# ------------------------------------------------------------------------------------------------
# Answer budgets: each task its own, generated in one call per distinct budget
# ------------------------------------------------------------------------------------------------
def answer_budgets(adapter: Adapter, prompts: Sequence[Prompt],
                   max_new_tokens: int | None = None) -> tuple[list[AnswerTokens], list[int]]:
    """Tokenization checks of every answer and each prompt's generation budget: its task's longest answer's
    token count (``AnswerTokens.n_budget``), so a task's budget never depends on its sibling tasks' answers.
    An explicit ``max_new_tokens`` is every prompt's budget (``ValueError`` when some answer needs more)."""
    if len(prompts) == 0:
        raise ValueError("no prompts to score")
    if not all(isinstance(p, Prompt) for p in prompts):
        raise TypeError("icl_accuracy needs Prompt objects (see taskvec_interp.tasks.build_prompts)")
    tok = adapter._require_tokenizer()
    checks = check_tokenization(tok, prompts, add_special_tokens=adapter.add_special_tokens)
    need = [c.n_budget for c in checks]
    if max_new_tokens is not None:
        worst = max(range(len(prompts)), key=need.__getitem__)
        if max_new_tokens < need[worst]:
            raise ValueError(
                f"answer {prompts[worst].answer!r} needs {need[worst]} tokens, longer than the budget "
                f"max_new_tokens={max_new_tokens}"
            )
        return checks, [max_new_tokens] * len(prompts)
    longest: dict[str, int] = {}
    for p, n in zip(prompts, need, strict=True):
        longest[p.task] = max(longest.get(p.task, 0), n)
    return checks, [longest[p.task] for p in prompts]


def answer_budget(adapter: Adapter, prompts: Sequence[Prompt],
                  max_new_tokens: int | None = None) -> tuple[list[AnswerTokens], int]:
    """The checks and the largest budget of :func:`answer_budgets` (one budget for every prompt)."""
    checks, budgets = answer_budgets(adapter, prompts, max_new_tokens)
    return checks, max(budgets)


def task_budgets(prompts: Sequence[Prompt], budgets: Sequence[int]) -> dict[str, int]:
    """Task -> its budget (what a result records)."""
    return {p.task: int(b) for p, b in zip(prompts, budgets, strict=True)}


def budget_groups(budgets: Sequence[int]) -> list[tuple[int, Tensor]]:
    """``(budget, prompt indices)`` per distinct budget, largest first (indices ascending: call order)."""
    b = torch.as_tensor(list(budgets), dtype=torch.long)
    return [(int(v), torch.nonzero(b == v).flatten()) for v in torch.unique(b).flip(0)]


def in_call_order(hooks: HookSpec, indices: Tensor, n_prompts: int) -> list[tuple[Any, Any]]:
    """``hooks`` written for ``n_prompts`` prompts (per-prompt vectors and positions in call order), run on
    the subset ``indices`` of them: each hook sees the indices and prompt count of the whole call, so it
    reads its own prompts' rows. Markers the adapters read (``position``: may share a prompt prefix;
    ``store``: a capture's dict) are kept."""
    return [(site, _remapped(fn, indices, n_prompts)) for site, fn in hooks]


def _remapped(fn: Any, indices: Tensor, n_prompts: int) -> Any:
    def hook(act: Tensor, hook: HookContext) -> Tensor:
        ctx = dataclasses.replace(hook, indices=indices.to(hook.indices.device)[hook.indices], n_prompts=n_prompts)
        return checked_call(fn, act, ctx)

    for attr in ("position", "store"):
        if hasattr(fn, attr):
            setattr(hook, attr, getattr(fn, attr))
    return hook


def merge_generations(parts: Sequence[Generation], groups: Sequence[tuple[int, Tensor]], n: int) -> Generation:
    """Generations of the prompt subsets ``groups`` put back in call order (texts, tokens, activations)."""
    texts: list[str] = [""] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    acts = None
    first = parts[0].activations
    if first is not None:
        acts = torch.empty((first.shape[0], n, *first.shape[2:]), dtype=first.dtype)
    for part, (_, idx) in zip(parts, groups, strict=True):
        for j, i in enumerate(idx.tolist()):
            texts[i], tokens[i] = part.texts[j], part.tokens[j]
        if acts is not None:
            acts[:, idx] = torch.as_tensor(part.activations).as_subclass(Tensor)
    engines = {p.engine for p in parts}
    return Generation(texts=texts, tokens=tokens, layers=list(parts[0].layers),
                      activations=None if acts is None else Activations(acts, parts[0].layers),
                      engine=engines.pop() if len(engines) == 1 else "mixed")


def generate_by_budget(adapter: Adapter, prompts: Sequence[str], budgets: Sequence[int], *, hooks: HookSpec = (),
                       **kwargs: Any) -> Generation:
    """:meth:`Adapter.generate` with a budget per prompt: one call per distinct budget (``hooks`` see the whole
    call's prompt indices, :func:`in_call_order`), results in call order. One budget: exactly one
    ``generate`` call. ``kwargs`` go to ``generate`` (``capture_layers``, ``component``, ``batch_size`` ...)."""
    groups = budget_groups(budgets)
    if len(groups) == 1:
        return adapter.generate(prompts, groups[0][0], hooks=hooks, **kwargs)
    n = len(prompts)
    parts = [adapter.generate([prompts[i] for i in idx.tolist()], budget, hooks=in_call_order(hooks, idx, n), **kwargs)
             for budget, idx in groups]
    return merge_generations(parts, groups, n)


def generate_branches_by_budget(adapter: Adapter, prompts: Sequence[str], branches: Sequence[HookSpec],
                                budgets: Sequence[int], **kwargs: Any) -> list[Generation]:
    """:meth:`Adapter.generate_branches` with a budget per prompt (see :func:`generate_by_budget`): one call per
    distinct budget, each branch's hooks seeing the whole call's prompt indices; one Generation per branch."""
    groups = budget_groups(budgets)
    if len(groups) == 1:
        return adapter.generate_branches(prompts, branches, groups[0][0], **kwargs)
    n = len(prompts)
    per_group = [adapter.generate_branches([prompts[i] for i in idx.tolist()],
                                           [in_call_order(b, idx, n) for b in branches], budget, **kwargs)
                 for budget, idx in groups]
    return [merge_generations([g[k] for g in per_group], groups, n) for k in range(len(branches))]


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------
def generated_first_content(tokenizer: Any, ids: Sequence[int], stop: str | None = "\n", answer: str = "") -> str:
    """The text (whitespace stripped) of the first content token actually generated: leading tokens that
    decode to whitespace only are skipped, as :func:`~taskvec_interp.tasks.tokenization.first_content_text`
    does for the answer; ``""`` when there is none or it lies past the answer's end (:func:`cut_generation`:
    a line break or the separator before it)."""
    for j in range(len(ids)):
        text = tokenizer.decode(list(ids[: j + 1]), skip_special_tokens=True)
        content = text.strip()
        if content and "\ufffd" not in content:
            return content if cut_generation(text, stop, answer).strip() == content else ""
    return ""


def first_token_match(tokenizer: Any, generated_ids: Sequence[int], first_content: str, stop: str | None = "\n",
                      answer: str = "") -> bool:
    """Whether the first content token generated (:func:`generated_first_content`) is the answer's first content
    token ``first_content`` (``AnswerTokens.first_content``): the same token text, never a prefix of it, and
    never true for an empty one."""
    return bool(first_content) and generated_first_content(tokenizer, generated_ids, stop, answer) == first_content


def score_generation(prompts: Sequence[Prompt], gen: Generation, checks: Sequence[AnswerTokens],
                     stop: str | None = "\n", *, tokenizer: Any) -> pd.DataFrame:
    """One row per prompt: its task, query, answer, the generated text, exact match and first-token match (see
    the module docstring; ``tokenizer``: the model's, which generated ``gen.tokens``)."""
    if tokenizer is None:
        raise ValueError("score_generation needs the model's tokenizer (first-token accuracy compares tokens)")
    rows = {
        "prompt_id": list(range(len(prompts))),
        "task": [p.task for p in prompts],
        "label": [p.label for p in prompts],
        "shots": [p.n_shots for p in prompts],
        "query": [p.query for p in prompts],
        "answer": [p.answer for p in prompts],
        "generated": gen.texts,
        "exact": [exact_match(g, p.answer, stop) for g, p in zip(gen.texts, prompts, strict=True)],
        "first_token": [first_token_match(tokenizer, ids, c.first_content, stop, p.answer) for ids, c, p in
                        zip(gen.tokens, checks, prompts, strict=True)],
        "clean_tokenization": [c.ok for c in checks],
    }
    return pd.DataFrame(rows)


def bootstrap_accuracy(
    correct: Bool[Tensor, "condition prompt"], groups: Sequence[str], *, n_boot: int = 1000, seed: int = 0,
    ci_level: float = 0.95, baseline: int | None = 0,
) -> pd.DataFrame:
    """Accuracy per (condition, group) with percentile bootstrap CIs, vectorised over conditions.

    ``correct[c, i]``: prompt ``i`` answered correctly under condition ``c``; ``groups[i]``: its task.
    Prompts are resampled with replacement within each group (``n_g`` of ``n_g``), the SAME resamples
    for every condition, so the CI of ``delta`` (accuracy minus the ``baseline`` condition's) is a
    paired bootstrap. Randomness only from ``torch.Generator().manual_seed(seed)``. Returns columns
    ``condition, task, n, accuracy, ci_low, ci_high`` (+ ``delta, delta_low, delta_high``).
    """
    return bootstrap_means(torch.as_tensor(correct), groups, n_boot=n_boot, seed=seed, ci_level=ci_level,
                           baseline=baseline, name="accuracy")


def bootstrap_means(
    values: Float[Tensor, "condition prompt"], groups: Sequence[str], *, n_boot: int = 1000, seed: int = 0,
    ci_level: float = 0.95, baseline: int | None = 0, name: str = "mean",
) -> pd.DataFrame:
    """Per-(condition, group) mean of any per-prompt value with paired percentile bootstrap CIs (see
    :func:`bootstrap_accuracy`, which is this for correctness). Columns: ``condition, task, n, {name},
    ci_low, ci_high`` (+ ``delta, delta_low, delta_high``) for ``name="accuracy"``, else prefixed by
    ``name`` (``{name}_low``, ``{name}_delta``, ...)."""
    correct = torch.as_tensor(values)
    if correct.ndim != 2 or correct.shape[1] != len(groups):
        raise ValueError(f"values must be [condition, {len(groups)}], got {list(correct.shape)}")
    if not torch.isfinite(correct.double()).all():
        raise ValueError(f"{name} values contain NaN or inf")
    if not 0 < ci_level < 1:
        raise ValueError(f"ci_level must be in (0, 1), got {ci_level}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ValueError(f"n_boot must be an int >= 0 (0: no bootstrap, CIs are NaN), got {n_boot!r}")
    values = correct.double()
    g = torch.Generator().manual_seed(seed)
    lo_q, hi_q = (1 - ci_level) / 2, 1 - (1 - ci_level) / 2
    frames = []
    pre = "" if name == "accuracy" else f"{name}_"
    for group in dict.fromkeys(groups):
        idx = torch.tensor([i for i, x in enumerate(groups) if x == group])
        v = values[:, idx]  # [condition, n_g]
        draws = torch.randint(len(idx), (n_boot, len(idx)), generator=g)
        boot = v[:, draws].mean(-1)  # [condition, n_boot]
        nan = torch.full((2, v.shape[0]), float("nan"), dtype=boot.dtype)
        q = torch.quantile(boot, torch.tensor([lo_q, hi_q], dtype=boot.dtype), dim=1) if n_boot else nan
        frame = {"condition": list(range(v.shape[0])), "task": group, "n": len(idx),
                 name: v.mean(1).tolist(), f"{pre}ci_low": q[0].tolist(), f"{pre}ci_high": q[1].tolist()}
        if baseline is not None:
            dq = torch.quantile(boot - boot[baseline], torch.tensor([lo_q, hi_q], dtype=boot.dtype), dim=1) \
                if n_boot else nan
            frame |= {f"{pre}delta": (v.mean(1) - v[baseline].mean()).tolist(), f"{pre}delta_low": dq[0].tolist(),
                      f"{pre}delta_high": dq[1].tolist()}
        frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True).sort_values(["condition"], kind="stable").reset_index(drop=True)
