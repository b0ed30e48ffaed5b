"""Control prompt sets for "TD gained from the context": the same queries without demonstrations, or with
demonstrations whose labels come from other tasks. Knows no model.

Task decodability of k-shot prompts mixes two sources: what the demonstrations tell the model, and what the
query alone already gives away (the function-vector tasks' inputs differ by task, so their TD is high at the
first layers before the model reads any demonstration). Two controls separate them, each built from an
existing prompt set so that prompt ``i`` of a control holds the same query (and task label) as prompt ``i`` of
the set it came from:

* :func:`input_only_prompts` (``"input_only"``): each query's zero-shot prompt, no demonstrations (the
  template's ``prefix`` kept). Its TD is what the query's input type alone puts there.
* :func:`shuffled_label_prompts` (``"shuffled"``): each demonstration keeps its input, its output is replaced
  by an output drawn (uniformly, seeded) from the demonstrations of the *other* tasks of the same prompt set,
  so the context keeps its shape, its inputs and its answer format but no longer shows the task's mapping.

``k``-shot TD minus a control's TD (paired over the same queries) is the part of TD the demonstrations'
input-output mapping put there (:func:`~taskvec_interp.experiments.sweep.context_gain`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Example, SeedLike, base_entropy, keyed_rng
from .prompts import Prompt, PromptBuilder, PromptTemplate

__all__ = ["CONTROLS", "control_prompts", "input_only_prompts", "shuffled_label_prompts"]

CONTROLS: tuple[str, ...] = ("input_only", "shuffled")
"""The control prompt sets, by name: ``"input_only"`` (no demonstrations) and ``"shuffled"`` (demonstration
outputs drawn from other tasks)."""


def _check_prompts(prompts: Sequence[Prompt], what: str) -> list[Prompt]:
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{what}: no prompts")
    bad = next((p for p in prompts if not isinstance(p, Prompt)), None)
    if bad is not None:
        raise TypeError(f"{what} takes Prompt objects, got {type(bad).__name__}")
    return prompts


def input_only_prompts(prompts: Sequence[Prompt], template: PromptTemplate | None = None) -> list[Prompt]:
    """Each prompt's query alone, as a zero-shot prompt of ``template`` (the template the prompts were built
    with; default :class:`PromptTemplate`): same query, target, task, label and family, no demonstrations.

    Prompt ``i`` of the result is the query of prompt ``i``: the two sets pair point by point.
    """
    prompts = _check_prompts(prompts, "input_only_prompts")
    builder = PromptBuilder(template if template is not None else PromptTemplate())
    return [builder.render(Example(p.query, p.target), (), task=p.task, label=p.label, family=p.family)
            for p in prompts]


def shuffled_label_prompts(prompts: Sequence[Prompt], template: PromptTemplate | None = None,
                           seed: SeedLike = 0) -> list[Prompt]:
    """Each prompt with its demonstrations' outputs replaced by outputs of OTHER tasks' demonstrations.

    The pool is every demonstration output of the prompt set, grouped by task; a demonstration of a task-``T``
    prompt gets an output drawn uniformly (with replacement) from the pool of the tasks other than ``T`` (the
    Null task counts as a task: its demonstrations give and take outputs like any other). Inputs, queries,
    targets, labels and the number of demonstrations stay; prompt ``i`` of the result pairs with prompt ``i``.
    Reproducible: the draws come from a generator keyed by ``seed`` alone. Prompts without demonstrations come
    back unchanged. ``ValueError`` when some task's prompts have demonstrations but no other task's do (no
    output to draw from).
    """
    prompts = _check_prompts(prompts, "shuffled_label_prompts")
    builder = PromptBuilder(template if template is not None else PromptTemplate())
    pool: dict[str, list[str]] = {}
    for p in prompts:
        pool.setdefault(p.task, []).extend(e.output for e in p.demos)
    others: dict[str, list[str]] = {t: [o for u, outs in pool.items() if u != t for o in outs] for t in pool}
    needy = sorted({p.task for p in prompts if p.demos and not others[p.task]})
    if needy:
        raise ValueError(f"shuffled_label_prompts: the demonstrations of task(s) {needy} have no other task's "
                         f"demonstration output to take (tasks with demonstrations: "
                         f"{sorted(t for t, outs in pool.items() if outs)}); a shuffled-label control needs "
                         "prompts of at least two tasks with demonstrations")
    rng = keyed_rng(base_entropy(seed), "controls", "shuffled")
    out: list[Prompt] = []
    for p in prompts:
        if not p.demos:
            out.append(p)
            continue
        cands = others[p.task]
        picks = rng.integers(0, len(cands), size=len(p.demos))
        demos = [Example(e.input, cands[int(j)]) for e, j in zip(p.demos, picks, strict=True)]
        out.append(builder.render(Example(p.query, p.target), demos, task=p.task, label=p.label, family=p.family))
    return out


def control_prompts(name: str, prompts: Sequence[Prompt], template: PromptTemplate | None = None,
                    seed: SeedLike = 0) -> list[Prompt]:
    """The control ``name`` (one of :data:`CONTROLS`) of ``prompts``."""
    if name == "input_only":
        return input_only_prompts(prompts, template)
    if name == "shuffled":
        return shuffled_label_prompts(prompts, template, seed)
    raise ValueError(f"unknown control {name!r}; known: {CONTROLS}")

