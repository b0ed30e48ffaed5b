"""Tasks and task families: seeding and splits, the task model (:class:`Task`, :class:`TaskFamily`, the
Null task) and reading data files as text. Knows no model and no prompt layout (``prompts.py``) or tokenizer
(``tokenization.py``).

A :class:`Task` is a source of ``(input, output)`` :class:`Example` pairs with *distinct inputs*; a
:class:`TaskFamily` is several tasks plus a Null task whose outputs ignore the input. Every task has a
stable integer label: its position in the family, the Null task always last
(``label == len(family) - 1``).

Randomness is always explicit: functions take ``seed`` as an ``int``, a ``numpy.random.Generator`` or
a ``torch.Generator``; nothing here touches global random state.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    SeedLike = int | np.integer | np.random.Generator | torch.Generator
else:
    SeedLike = Any

__all__ = ["NULL_TASK", "SPLITS", "Example", "ExampleTask", "RandomOutputTask", "SeedLike", "Task", "TaskFamily",
           "as_rng", "base_entropy", "check_count", "decode_utf8", "keyed_rng", "split_indices", "text_key"]

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


def base_entropy(seed: SeedLike) -> int:
    """An int to derive keyed child generators from (an int seed is used directly)."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        return int(seed)
    return int(as_rng(seed).integers(0, 2**63))


def text_key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def keyed_rng(base: int, *keys: str) -> np.random.Generator:
    """A generator depending only on ``base`` and the string keys (stable across runs and platforms)."""
    return np.random.default_rng([base, *(text_key(k) for k in keys)])


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
    perm = keyed_rng(int(seed), "split", key).permutation(n)
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


def check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


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
