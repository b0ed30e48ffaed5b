"""The k-shot prompt: its template (:class:`PromptTemplate`), the rendered :class:`Prompt` and the
seeded builder (:class:`PromptBuilder`, :func:`build_prompts`). Knows no model.

Whitespace convention (see :class:`PromptTemplate`): the prompt text ends right before the answer,
so the token just before the answer is the prompt's last token (the position whose hidden state Task
Decodability reads). With the default template ``"01101 10110 ->"`` the prompt ends *without* a
trailing space and the answer carries the space (``" 00100"``), because byte-level BPE tokenizers
encode ``" word"`` as one token while ``"-> "`` + ``"word"`` would leave a dangling space token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Example, SeedLike, Task, TaskFamily, as_rng, base_entropy, check_count, keyed_rng

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["Prompt", "PromptBuilder", "PromptTemplate", "build_prompts", "prompts_to_frame"]


@dataclass(frozen=True)
class PromptTemplate:
    """How examples are laid out. The paper's template is OPEN; the default renders 4-shot prompts as::

        01101 10110 -> 00100
        ...
        11000 00111 ->            (prompt ends here; answer " 00111" starts with a space)

    ``prefix`` starts the prompt (e.g. an instruction); each example is
    ``input_prefix + input + output_prefix + answer`` and examples are joined by ``example_separator``.
    ``answer_space``: ``None`` (auto) prepends a space to the output iff ``output_prefix`` does not end
    in whitespace and the output does not start with whitespace; ``True``/``False`` force it.
    """

    input_prefix: str = ""
    output_prefix: str = " ->"
    example_separator: str = "\n"
    prefix: str = ""
    answer_space: bool | None = None

    def answer_for(self, output: str) -> str:
        """The answer string (what follows the prompt) for a raw task output."""
        if self.answer_space is None:
            add = not self.output_prefix[-1:].isspace() and not output[:1].isspace()
        else:
            add = self.answer_space
        return " " + output if add else output


@dataclass(frozen=True)
class Prompt:
    """A k-shot prompt. ``text`` ends right before ``answer`` (its last token precedes the answer).

    ``target`` is the raw task output (``answer`` may carry a leading space); ``query`` the query
    input; ``demo_answer_starts[i]`` the character offset in ``text`` where demonstration ``i``'s
    answer starts (the character before it belongs to the token "after the demonstration input",
    where task vectors are read).
    """

    text: str
    answer: str
    task: str
    label: int
    n_shots: int
    query: str
    target: str
    demos: tuple[Example, ...] = ()
    demo_answer_starts: tuple[int, ...] = ()
    family: str = ""

    @property
    def full_text(self) -> str:
        """Prompt followed by its answer (for teacher forcing / fine-tuning)."""
        return self.text + self.answer

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["demos"] = [{"input": e.input, "output": e.output} for e in self.demos]
        d["demo_answer_starts"] = list(self.demo_answer_starts)
        return d


@dataclass(frozen=True)
class PromptBuilder:
    """Renders and samples k-shot prompts with a :class:`PromptTemplate`."""

    template: PromptTemplate = field(default_factory=PromptTemplate)

    def render(
        self, query: Example, demos: Sequence[Example], *, task: str, label: int, family: str = ""
    ) -> Prompt:
        """Lay out given demonstrations and query (e.g. demos of one task with another's query)."""
        t = self.template
        parts: list[str] = [t.prefix]
        pos = len(t.prefix)
        starts: list[int] = []
        for ex in demos:
            head = t.input_prefix + ex.input + t.output_prefix
            starts.append(pos + len(head))
            chunk = head + t.answer_for(ex.output) + t.example_separator
            parts.append(chunk)
            pos += len(chunk)
        parts.append(t.input_prefix + query.input + t.output_prefix)
        return Prompt(
            text="".join(parts),
            answer=t.answer_for(query.output),
            task=task,
            label=label,
            n_shots=len(demos),
            query=query.input,
            target=query.output,
            demos=tuple(demos),
            demo_answer_starts=tuple(starts),
            family=family,
        )

    def _check_shots(self, task: Task, shots: int) -> None:
        if shots + 1 > task.n_inputs:
            raise ValueError(
                f"shots={shots} needs {shots + 1} distinct examples (demonstrations + query) but task "
                f"{task.name!r} has only {task.n_inputs}"
            )

    def _demos_for(self, task: Task, query: Example, shots: int, rng: np.random.Generator) -> list[Example]:
        cands = task.sample(shots + 1, rng)
        return [c for c in cands if c.input != query.input][:shots]

    def sample(
        self, family: TaskFamily, task: str | Task, shots: int = 4, seed: SeedLike = 0, n: int = 1
    ) -> list[Prompt]:
        """``n`` prompts of one task (queries distinct from their demonstrations, not from each other)."""
        shots = check_count("shots", shots, 0)
        n = check_count("n", n, 1)
        tk = family[task] if not isinstance(task, Task) else task
        label = family.label(tk)
        self._check_shots(tk, shots)
        rng = as_rng(seed)
        out = []
        for _ in range(n):
            *demos, query = tk.sample(shots + 1, rng)
            out.append(self.render(query, demos, task=tk.name, label=label, family=family.name))
        return out

    def build(
        self,
        family: TaskFamily,
        n_per_task: int = 100,
        shots: int = 4,
        seed: SeedLike = 0,
        *,
        tasks: Sequence[str] | None = None,
        distinct_queries: bool = True,
        replace: bool = False,
    ) -> list[Prompt]:
        """A balanced set: ``n_per_task`` prompts for every task (Null included), in label order.

        Each task draws from its own generator keyed by ``(seed, task name)``, so a task's prompts
        do not change when other tasks are added or removed. Within a prompt the demonstrations
        and the query have distinct inputs. By default the queries of a task are also distinct from
        one another (the task then needs at least ``n_per_task`` inputs; more is refused, naming the
        task and its count). ``replace``: queries are drawn with replacement (a query may repeat across
        prompts: ``n_per_task`` may exceed a task's inputs), all of a task's queries first, then each
        query's demonstrations, so the same seed gives the same queries at every shot count (what TD's
        controls and paired comparisons across shots need). ``distinct_queries=False`` (kept for the
        fine-tuning's training prompts) draws each prompt's query and demonstrations together instead.
        """
        n_per_task = check_count("n_per_task", n_per_task, 1)
        shots = check_count("shots", shots, 0)
        if not isinstance(replace, bool):
            raise ValueError(f"replace must be True or False, got {replace!r}")
        chosen = [family[name] for name in tasks] if tasks is not None else list(family.tasks)
        for tk in chosen:
            self._check_shots(tk, shots)
            if distinct_queries and not replace and n_per_task > tk.n_inputs:
                raise ValueError(
                    f"n_per_task={n_per_task} distinct queries requested but task {tk.name!r} has only "
                    f"{tk.n_inputs} inputs; lower n_per_task to {tk.n_inputs} or sample queries with "
                    "replacement (replace=True, --replace)"
                )
        base = base_entropy(seed)
        prompts: list[Prompt] = []
        for tk in chosen:
            rng = keyed_rng(base, "prompts", tk.name)
            label = family.label(tk)
            if distinct_queries or replace:
                queries = ([tk.sample(1, rng)[0] for _ in range(n_per_task)] if replace
                           else tk.sample(n_per_task, rng))
                for q in queries:
                    demos = self._demos_for(tk, q, shots, rng)
                    prompts.append(self.render(q, demos, task=tk.name, label=label, family=family.name))
            else:
                for _ in range(n_per_task):
                    *demos, q = tk.sample(shots + 1, rng)
                    prompts.append(self.render(q, demos, task=tk.name, label=label, family=family.name))
        return prompts


def build_prompts(
    family: TaskFamily,
    n_per_task: int = 100,
    shots: int = 4,
    seed: SeedLike = 0,
    *,
    template: PromptTemplate | None = None,
    tasks: Sequence[str] | None = None,
    distinct_queries: bool = True,
    replace: bool = False,
) -> list[Prompt]:
    """Balanced prompts for every task of ``family`` (see :meth:`PromptBuilder.build`)."""
    builder = PromptBuilder(template if template is not None else PromptTemplate())
    return builder.build(family, n_per_task, shots, seed, tasks=tasks, distinct_queries=distinct_queries,
                         replace=replace)


def prompts_to_frame(prompts: Sequence[Prompt]) -> pd.DataFrame:
    """One row per prompt: prompt_id, family, task, label, shots, query, target, answer, text,
    demo_inputs, demo_outputs (tuples)."""
    import pandas as pd

    rows = [
        {
            "prompt_id": i,
            "family": p.family,
            "task": p.task,
            "label": p.label,
            "shots": p.n_shots,
            "query": p.query,
            "target": p.target,
            "answer": p.answer,
            "text": p.text,
            "demo_inputs": tuple(e.input for e in p.demos),
            "demo_outputs": tuple(e.output for e in p.demos),
        }
        for i, p in enumerate(prompts)
    ]
    cols = [
        "prompt_id",
        "family",
        "task",
        "label",
        "shots",
        "query",
        "target",
        "answer",
        "text",
        "demo_inputs",
        "demo_outputs",
    ]
    df = pd.DataFrame(rows, columns=cols)
    return df.astype({"prompt_id": "int64", "label": "int64", "shots": "int64"})
