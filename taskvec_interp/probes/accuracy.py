"""ICL accuracy: batched greedy generation with left padding, exact match of the whole answer.

One generation per prompt set; its prefill is the forward pass whose hidden states TD reads, so
accuracy and TD cost one pass (``capture_layers``). Exact match compares the generated text, cut at
the template's example separator (the model's next demonstration would start there) and
whitespace-normalised, with the whole answer.

First-token accuracy scores the first token that carries content: leading tokens that decode to
whitespace only are skipped on both sides. The answer's side is ``AnswerTokens.first_content``, the
stripped text of its first non-whitespace token in the in-context tokenization (``check_tokenization``);
the generation is correct when its text, cut at the separator like exact match and with leading
whitespace removed, starts with that text. So SmolLM2's bitwise answer ``" 01101"`` (tokens ``" "``,
``"0"``, ...) scores the first digit, not the space token every generation starts with, and a
generation that spells the space differently (``" "`` + ``"apples"`` for the answer token
``" apples"``, or no space at all) is aligned with the answer by its content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..adapters.base import Adapter, Generation
from ..finite import NonFiniteError, describe, overflow_advice
from ..hooks import HookSpec
from ..tasks.prompts import Prompt
from ..tasks.tokenization import AnswerTokens, check_tokenization


def normalize_answer(text: str, stop: str | None = "\n") -> str:
    """Cut at ``stop`` and collapse whitespace.

    A separator made only of spaces is not used to cut (answers may contain spaces).
    """
    if stop and stop.strip(" ") and stop in text:
        text = text[: text.index(stop)]
    return " ".join(text.split())


@dataclass
class AccuracyResult:
    """Per-prompt generations and correctness, plus the prefill's activations when captured."""

    predictions: pd.DataFrame
    activations: Float[Tensor, "layer prompt d_model"] | None
    layers: list[int]
    max_new_tokens: int

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

    ``max_new_tokens``: default is the longest answer's token count (never truncating an answer); a
    smaller explicit budget than some answer needs raises ``ValueError``. ``stop``: where a generated
    answer ends (the template's example separator). ``capture_layers``: also return the prefill's
    last-token activations ``[layer, prompt, d_model]`` (for TD), from the same forward pass.
    """
    checks, max_new_tokens = answer_budget(adapter, prompts, max_new_tokens)
    gen = adapter.generate([p.text for p in prompts], max_new_tokens, hooks=hooks, capture_layers=capture_layers,
                           batch_size=batch_size, progress=progress)
    predictions = score_generation(prompts, gen, checks, stop)
    if not predictions["exact"].any() and not predictions["first_token"].any():
        check_finite_logits(adapter, prompts[0].text)  # every answer wrong: NaN logits are not an accuracy of 0
    return AccuracyResult(predictions, gen.activations, gen.layers, max_new_tokens)


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


def answer_budget(adapter: Adapter, prompts: Sequence[Prompt],
                  max_new_tokens: int | None = None) -> tuple[list[AnswerTokens], int]:
    """Tokenization checks of every answer and the generation budget (see :func:`icl_accuracy`)."""
    if len(prompts) == 0:
        raise ValueError("no prompts to score")
    if not all(isinstance(p, Prompt) for p in prompts):
        raise TypeError("icl_accuracy needs Prompt objects (see taskvec_interp.tasks.build_prompts)")
    tok = adapter._require_tokenizer()
    checks = check_tokenization(tok, prompts, add_special_tokens=adapter.add_special_tokens)
    need = max(c.n_budget for c in checks)
    if max_new_tokens is None:
        max_new_tokens = need
    elif max_new_tokens < need:
        worst = max(range(len(prompts)), key=lambda i: checks[i].n_budget)
        raise ValueError(
            f"answer {prompts[worst].answer!r} needs {checks[worst].n_budget} tokens, longer than the budget "
            f"max_new_tokens={max_new_tokens}"
        )
    return checks, max_new_tokens


def first_token_match(generated: str, first_content: str, stop: str | None = "\n") -> bool:
    """Whether ``generated`` (cut at ``stop`` as in :func:`normalize_answer`, leading whitespace removed)
    starts with the answer's first content token ``first_content`` (never true for an empty one)."""
    if stop and stop.strip(" ") and stop in generated:
        generated = generated[: generated.index(stop)]
    return bool(first_content) and generated.lstrip().startswith(first_content)


def score_generation(prompts: Sequence[Prompt], gen: Generation, checks: Sequence[AnswerTokens],
                     stop: str | None = "\n") -> pd.DataFrame:
    """One row per prompt: its task, answer, the generated text, exact match and first-token match
    (the first content token, see the module docstring)."""
    rows = {
        "prompt_id": list(range(len(prompts))),
        "task": [p.task for p in prompts],
        "label": [p.label for p in prompts],
        "shots": [p.n_shots for p in prompts],
        "query": [p.query for p in prompts],
        "answer": [p.answer for p in prompts],
        "generated": gen.texts,
        "exact": [normalize_answer(g, stop) == normalize_answer(p.answer, stop) for g, p in
                  zip(gen.texts, prompts, strict=True)],
        "first_token": [first_token_match(g, c.first_content, stop) for g, c in
                        zip(gen.texts, checks, strict=True)],
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
