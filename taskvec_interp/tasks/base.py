"""Tasks, task families, the k-shot prompt builder and tokenization checks. Knows no model.

A :class:`Task` is a source of ``(input, output)`` :class:`Example` pairs with *distinct inputs*; a
:class:`TaskFamily` is several tasks plus a Null task whose outputs ignore the input. Every task has a
stable integer label: its position in the family, the Null task always last
(``label == len(family) - 1``).

Randomness is always explicit: functions take ``seed`` as an ``int``, a ``numpy.random.Generator`` or
a ``torch.Generator``; nothing here touches global random state.

Whitespace convention (see :class:`PromptTemplate`): the prompt text ends right before the answer,
so the token just before the answer is the prompt's last token (the position whose hidden state Task
Decodability reads). With the default template ``"01101 10110 ->"`` the prompt ends *without* a
trailing space and the answer carries the space (``" 00100"``), because byte-level BPE tokenizers
encode ``" word"`` as one token while ``"-> "`` + ``"word"`` would leave a dangling space token.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch

    SeedLike = int | np.integer | np.random.Generator | torch.Generator
else:
    SeedLike = Any

__all__ = [
    "NULL_TASK",
    "SPLITS",
    "AnswerTokens",
    "Example",
    "ExampleTask",
    "Prompt",
    "PromptBuilder",
    "PromptTemplate",
    "RandomOutputTask",
    "SeedLike",
    "Task",
    "TaskFamily",
    "as_rng",
    "build_prompts",
    "check_tokenization",
    "max_answer_tokens",
    "prompts_to_frame",
    "split_indices",
]

NULL_TASK = "null"
"""Name of the Null task in every family (its label is the last one)."""

SPLITS = ("all", "train", "test")
"""Values accepted by the ``split`` argument of the family constructors."""


# --------------------------------------------------------------------------------------------------
# Seeding helpers
# --------------------------------------------------------------------------------------------------


def _is_torch_generator(obj: object) -> bool:
    return type(obj).__name__ == "Generator" and type(obj).__module__.split(".")[0] == "torch"


def as_rng(seed: SeedLike) -> np.random.Generator:
    """Turn ``seed`` into a numpy ``Generator``.

    An ``int`` gives a fresh generator; a numpy ``Generator`` is returned as is (its state advances);
    a ``torch.Generator`` is consumed once to seed a numpy generator (deterministic given its state).
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (bool, np.bool_)):
        raise TypeError("seed must be an int or a generator, not a bool")
    if isinstance(seed, (int, np.integer)):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        return np.random.default_rng(int(seed))
    if _is_torch_generator(seed):
        import torch

        draw = torch.randint(0, 2**62, (1,), generator=seed)
        return np.random.default_rng(int(draw.item()))
    raise TypeError(f"seed must be an int, numpy.random.Generator or torch.Generator, got {type(seed)!r}")


def _base_entropy(seed: SeedLike) -> int:
    """An int to derive keyed child generators from (an int seed is used directly)."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        return int(seed)
    return int(as_rng(seed).integers(0, 2**63))


def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _keyed_rng(base: int, *keys: str) -> np.random.Generator:
    """A generator depending only on ``base`` and the string keys (stable across runs and platforms)."""
    return np.random.default_rng([base, *(_key(k) for k in keys)])


def _check_split(split: str, test_fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def split_indices(
    n: int, split: str = "all", test_fraction: float = 0.2, seed: int = 0, key: str = ""
) -> np.ndarray:
    """Sorted indices of the ``split`` part of ``range(n)``: a seeded permutation, the first
    ``round(n * test_fraction)`` items form "test", the rest "train" ("all" returns everything).

    The paper split its POS sentences 80/20; ``key`` decorrelates splits of different pools.
    """
    _check_split(split, test_fraction)
    if split == "all":
        return np.arange(n)
    perm = _keyed_rng(int(seed), "split", key).permutation(n)
    n_test = int(round(n * float(test_fraction)))
    part = perm[:n_test] if split == "test" else perm[n_test:]
    return np.sort(part)


# --------------------------------------------------------------------------------------------------
# Tasks and families
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One demonstration or query: the task maps ``input`` to ``output``."""

    input: str
    output: str


class Task(ABC):
    """A source of examples with distinct inputs. Subclasses implement ``n_inputs`` and ``_sample``."""

    is_null: bool = False

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"task name must be a non-empty string, got {name!r}")
        self.name = name

    @property
    @abstractmethod
    def n_inputs(self) -> int:
        """How many distinct inputs this task can produce."""

    @abstractmethod
    def _sample(self, n: int, rng: np.random.Generator) -> list[Example]:
        """``n`` examples with pairwise distinct inputs (``n <= n_inputs`` already checked)."""

    def sample(self, n: int, seed: SeedLike) -> list[Example]:
        """Draw ``n`` examples with pairwise distinct inputs, deterministically given ``seed``."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if n > self.n_inputs:
            raise ValueError(
                f"task {self.name!r} has only {self.n_inputs} distinct inputs; cannot draw {n} distinct examples"
            )
        if n == 0:
            return []
        return self._sample(int(n), as_rng(seed))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_inputs={self.n_inputs})"


def _dedupe_pairs(pairs: Sequence[Example]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Keep the first example of each input (so demonstrations can never leak the query's answer)."""
    seen: set[str] = set()
    inputs: list[str] = []
    outputs: list[str] = []
    for ex in pairs:
        if ex.input in seen:
            continue
        seen.add(ex.input)
        inputs.append(ex.input)
        outputs.append(ex.output)
    return tuple(inputs), tuple(outputs)


class ExampleTask(Task):
    """A task given by a finite pool of examples. Duplicate inputs keep their first example."""

    def __init__(self, name: str, examples: Sequence[Example | tuple[str, str]]) -> None:
        super().__init__(name)
        pairs = [ex if isinstance(ex, Example) else Example(*ex) for ex in examples]
        self.inputs, self.outputs = _dedupe_pairs(pairs)
        if not self.inputs:
            raise ValueError(f"task {name!r} has no examples")

    @property
    def n_inputs(self) -> int:
        return len(self.inputs)

    @property
    def examples(self) -> tuple[Example, ...]:
        """All examples of the pool, in file/corpus order."""
        return tuple(Example(i, o) for i, o in zip(self.inputs, self.outputs, strict=True))

    def _sample(self, n: int, rng: np.random.Generator) -> list[Example]:
        idx = rng.choice(self.n_inputs, size=n, replace=False)
        return [Example(self.inputs[i], self.outputs[i]) for i in idx]


class RandomOutputTask(Task):
    """A Null task: inputs from a pool, each paired with an output drawn uniformly at random.

    Give either ``outputs`` (one pool shared by every input) or ``per_input_outputs`` (a candidate
    list for each input, e.g. the words of each sentence). Outputs are redrawn at every sample.
    """

    is_null = True

    def __init__(
        self,
        inputs: Sequence[str],
        *,
        outputs: Sequence[str] | None = None,
        per_input_outputs: Sequence[Sequence[str]] | None = None,
        name: str = NULL_TASK,
    ) -> None:
        super().__init__(name)
        if (outputs is None) == (per_input_outputs is None):
            raise ValueError("give exactly one of outputs= or per_input_outputs=")
        if per_input_outputs is not None and len(per_input_outputs) != len(inputs):
            raise ValueError("per_input_outputs must have one candidate list per input")
        self.inputs: tuple[str, ...] = tuple(inputs)
        if len(set(self.inputs)) != len(self.inputs):
            raise ValueError(f"task {name!r}: inputs must be distinct")
        if not self.inputs:
            raise ValueError(f"task {name!r} has no inputs")
        self.outputs = None if outputs is None else tuple(outputs)
        self.per_input_outputs = (
            None if per_input_outputs is None else tuple(tuple(c) for c in per_input_outputs)
        )
        if self.outputs is not None and not self.outputs:
            raise ValueError(f"task {name!r} has an empty output pool")
        if self.per_input_outputs is not None and any(not c for c in self.per_input_outputs):
            raise ValueError(f"task {name!r}: every input needs at least one candidate output")

    @property
    def n_inputs(self) -> int:
        return len(self.inputs)

    def _sample(self, n: int, rng: np.random.Generator) -> list[Example]:
        idx = rng.choice(self.n_inputs, size=n, replace=False)
        u = rng.random(n)
        if self.outputs is not None:
            outs = [self.outputs[int(x * len(self.outputs))] for x in u]
        else:
            cands = [self.per_input_outputs[i] for i in idx]  # type: ignore[index]
            outs = [c[int(x * len(c))] for c, x in zip(cands, u, strict=True)]
        return [Example(self.inputs[i], o) for i, o in zip(idx, outs, strict=True)]


class TaskFamily:
    """Several tasks plus a Null task. Labels: ``tasks[i]`` has label ``i``; Null is last.

    ``info`` holds the family's configuration (source path, n_bits, split...) for provenance.
    """

    def __init__(
        self, name: str, tasks: Sequence[Task], null: Task, *, info: Mapping[str, Any] | None = None
    ) -> None:
        if not tasks:
            raise ValueError(f"family {name!r} needs at least one task besides Null")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"family {name!r} has duplicate task names: {names}")
        if null.name in names:
            raise ValueError(f"family {name!r}: task name {null.name!r} is reserved for the Null task")
        self.name = name
        self.tasks: tuple[Task, ...] = (*tasks, null)
        self.null = null
        self.info: dict[str, Any] = dict(info or {})
        self._labels = {t.name: i for i, t in enumerate(self.tasks)}

    @property
    def task_names(self) -> tuple[str, ...]:
        """All task names in label order (Null last)."""
        return tuple(t.name for t in self.tasks)

    @property
    def labels(self) -> dict[str, int]:
        """Task name -> integer label."""
        return dict(self._labels)

    @property
    def null_label(self) -> int:
        return len(self.tasks) - 1

    def label(self, task: str | Task) -> int:
        """The integer label of a task (by name or object)."""
        name = task.name if isinstance(task, Task) else task
        try:
            return self._labels[name]
        except KeyError:
            raise ValueError(
                f"unknown task {name!r} in family {self.name!r}; known: {self.task_names}"
            ) from None

    def __getitem__(self, key: str | int) -> Task:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return self.tasks[int(key)]
        return self.tasks[self.label(key)]

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __repr__(self) -> str:
        return f"TaskFamily(name={self.name!r}, tasks={list(self.task_names)})"


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


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


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


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
        shots = _check_count("shots", shots, 0)
        n = _check_count("n", n, 1)
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
    ) -> list[Prompt]:
        """A balanced set: ``n_per_task`` prompts for every task (Null included), in label order.

        Each task draws from its own generator keyed by ``(seed, task name)``, so a task's prompts
        do not change when other tasks are added or removed. Within a prompt the demonstrations
        and the query have distinct inputs; with ``distinct_queries`` the queries of a task are
        also distinct from one another (the task then needs at least ``n_per_task`` inputs).
        """
        n_per_task = _check_count("n_per_task", n_per_task, 1)
        shots = _check_count("shots", shots, 0)
        chosen = [family[name] for name in tasks] if tasks is not None else list(family.tasks)
        for tk in chosen:
            self._check_shots(tk, shots)
            if distinct_queries and n_per_task > tk.n_inputs:
                raise ValueError(
                    f"n_per_task={n_per_task} distinct queries requested but task {tk.name!r} has only "
                    f"{tk.n_inputs} inputs; lower n_per_task or pass distinct_queries=False"
                )
        base = _base_entropy(seed)
        prompts: list[Prompt] = []
        for tk in chosen:
            rng = _keyed_rng(base, "prompts", tk.name)
            label = family.label(tk)
            if distinct_queries:
                queries = tk.sample(n_per_task, rng)
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
) -> list[Prompt]:
    """Balanced prompts for every task of ``family`` (see :meth:`PromptBuilder.build`)."""
    builder = PromptBuilder(template if template is not None else PromptTemplate())
    return builder.build(family, n_per_task, shots, seed, tasks=tasks, distinct_queries=distinct_queries)


def prompts_to_frame(prompts: Sequence[Prompt]) -> pd.DataFrame:
    """One row per prompt: prompt_id, family, task, label, n_shots, query, target, answer, text,
    demo_inputs, demo_outputs (tuples)."""
    import pandas as pd

    rows = [
        {
            "prompt_id": i,
            "family": p.family,
            "task": p.task,
            "label": p.label,
            "n_shots": p.n_shots,
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
        "n_shots",
        "query",
        "target",
        "answer",
        "text",
        "demo_inputs",
        "demo_outputs",
    ]
    df = pd.DataFrame(rows, columns=cols)
    return df.astype({"prompt_id": "int64", "label": "int64", "n_shots": "int64"})


def decode_utf8(raw: bytes, source: object, *, what: str = "") -> str:
    """``raw`` decoded as UTF-8 (a leading byte-order mark dropped); a ValueError names ``source``, the
    first bad byte, its offset and its line. ``what`` qualifies the offset (e.g. "of the decompressed text")."""
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        e = UnicodeDecodeError("utf-8", raw, err.start + bom, err.end + bom, err.reason)
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        hint = " (it looks gzip-compressed: name it .gz)" if raw[:2] == b"\x1f\x8b" else ""
        where = f" {what}" if what else ""
        raise ValueError(
            f"{source}: not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start}{where} "
            f"(line {line}, byte {col} of the line) is not valid UTF-8 ({e.reason}); re-encode the file as "
            f"UTF-8{hint}"
        ) from err


# --------------------------------------------------------------------------------------------------
# Tokenization checks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerTokens:
    """How one prompt's answer tokenizes after its prompt.

    ``answer_ids``: the tokens that follow the prompt's tokens in ``tokenize(text + answer)`` (when
    ``prefix_ok``), else the answer tokenized alone. ``prefix_ok``: the prompt's tokens are a prefix
    of the joint tokenization (no token straddles the prompt/answer boundary). ``standalone_ok``:
    tokenizing the answer alone gives the same ids (false e.g. for SentencePiece tokenizers that
    prepend a word-start marker; informative only). ``roundtrip_ok``: decoding prompt + answer ids
    gives back decode(prompt) + answer. ``n_budget``: new tokens a generator needs to emit it.
    ``first_content``: the text of the answer's first *content* token, i.e. ``decode(answer_ids[:j + 1])``
    stripped of whitespace for the smallest ``j`` where that is non-empty and holds no partial character
    (U+FFFD); leading tokens that decode to whitespace only (SmolLM2 splits ``" 01101"`` into ``" "``,
    ``"0"``, ...) are skipped. First-token accuracy compares it with the generation.
    """

    answer_ids: tuple[int, ...]
    prompt_len: int
    prefix_ok: bool
    standalone_ok: bool
    roundtrip_ok: bool
    n_budget: int
    first_content: str = ""

    @property
    def ok(self) -> bool:
        """The answer is a clean continuation of the prompt's tokens."""
        return self.prefix_ok and self.roundtrip_ok


def first_content_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of the first content token of ``ids`` (see :attr:`AnswerTokens.first_content`)."""
    for j in range(len(ids)):
        text = tokenizer.decode(list(ids[: j + 1]), skip_special_tokens=True).strip()
        if text and "\ufffd" not in text:
            return text
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def _ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    enc = tokenizer(texts, add_special_tokens=add_special_tokens)
    return [list(x) for x in enc["input_ids"]]


def check_tokenization(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    add_special_tokens: bool = False,
    strict: bool = False,
) -> list[AnswerTokens]:
    """Check ``tokenize(text + answer) == tokenize(text) + answer_ids`` for every prompt.

    ``tokenizer`` is any Hugging Face tokenizer (callable, with ``decode``). ``add_special_tokens``
    is passed to it (a BOS token does not change the split). With ``strict`` a ValueError lists the
    prompts whose answer does not tokenize cleanly; otherwise inspect ``.ok`` on each result.
    """
    if not prompts:
        return []
    texts = [p.text for p in prompts]
    p_ids = _ids(tokenizer, texts, add_special_tokens)
    f_ids = _ids(tokenizer, [p.text + p.answer for p in prompts], add_special_tokens)
    a_ids = _ids(tokenizer, [p.answer for p in prompts], False)
    out: list[AnswerTokens] = []
    for p, pi, fi, ai in zip(prompts, p_ids, f_ids, a_ids, strict=True):
        prefix_ok = fi[: len(pi)] == pi
        cont = fi[len(pi) :] if prefix_ok else ai
        decoded_full = tokenizer.decode(pi + cont, skip_special_tokens=True)
        decoded_prompt = tokenizer.decode(pi, skip_special_tokens=True)
        roundtrip_ok = decoded_full == decoded_prompt + p.answer
        out.append(
            AnswerTokens(
                answer_ids=tuple(cont),
                prompt_len=len(pi),
                prefix_ok=prefix_ok,
                standalone_ok=ai == cont,
                roundtrip_ok=roundtrip_ok,
                n_budget=max(len(cont), len(ai), len(fi) - len(pi)),
                first_content=first_content_text(tokenizer, cont),
            )
        )
    if strict:
        bad = [(p, r) for p, r in zip(prompts, out, strict=True) if not r.ok]
        if bad:
            shown = "; ".join(
                f"task={p.task!r} query={p.query!r} answer={p.answer!r} (prefix_ok={r.prefix_ok}, "
                f"roundtrip_ok={r.roundtrip_ok})"
                for p, r in bad[:5]
            )
            raise ValueError(
                f"{len(bad)} of {len(prompts)} answers do not tokenize as a clean continuation of their "
                f"prompt: {shown}. Check the template's whitespace (see PromptTemplate.answer_space)."
            )
    return out


def max_answer_tokens(
    tokenizer: Any, prompts: Sequence[Prompt], *, margin: int = 0, add_special_tokens: bool = False
) -> int:
    """Number of new tokens generation must allow so that every answer fits (plus ``margin``).

    Counts the worst case of the in-context and standalone tokenizations, so answers are never
    truncated even when they do not tokenize cleanly.
    """
    margin = _check_count("margin", margin, 0)
    checks = check_tokenization(tokenizer, prompts, add_special_tokens=add_special_tokens)
    return max((c.n_budget for c in checks), default=0) + margin
