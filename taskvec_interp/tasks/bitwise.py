"""Bitwise tasks: AND, NAND, OR, NOR, XOR, XNOR on two n-bit numbers (the paper: 5 bits).

Input format (OPEN in the paper): both operands as zero-padded binary strings, most significant bit
first, joined by ``pair_separator`` (default one space): ``"01101 10110"``. Output: the n-bit result,
zero-padded (``AND`` -> ``"00100"``). Null task: the same kind of inputs paired with n uniformly
random bits, independent of the input. Labels: the ops in the order given (default AND, NAND, OR,
NOR, XOR, XNOR = 0..5), Null last (6).

There are only ``4**n_bits`` input pairs (1,024 for 5 bits). A train/test split partitions the
*pairs* (shared by all ops) with a seeded hash, so about ``test_fraction`` of them are test pairs,
and no test query appears in the training set whatever the op. (The paper drew 10K training and 500
evaluation samples; with 1,024 pairs that can only mean repeated inputs, so prompts that need more
queries than pairs should pass ``distinct_queries=False`` to the builder.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import NULL_TASK, Example, SeedLike, Task, TaskFamily, _check_split, as_rng

__all__ = ["BITWISE_OPS", "MAX_BITS", "BitwiseTask", "apply_op", "bitwise_family", "format_bits"]

BITWISE_OPS: tuple[str, ...] = ("AND", "NAND", "OR", "NOR", "XOR", "XNOR")
MAX_BITS = 31
_ENUMERATE_MAX_BITS = 10  # enumerate the 4**n pairs up to ~1M of them; rejection-sample above


def _check_bits(n_bits: int) -> int:
    if isinstance(n_bits, bool) or not isinstance(n_bits, (int, np.integer)) or not 1 <= n_bits <= MAX_BITS:
        raise ValueError(f"n_bits must be an int in [1, {MAX_BITS}], got {n_bits!r}")
    return int(n_bits)


def apply_op(op: str, a: np.ndarray, b: np.ndarray, n_bits: int) -> np.ndarray:
    """Vectorised ``op`` on unsigned integer arrays, result masked to ``n_bits`` bits."""
    n_bits = _check_bits(n_bits)
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    mask = np.uint64((1 << n_bits) - 1)
    op = op.upper()
    if op == "AND":
        r = a & b
    elif op == "NAND":
        r = ~(a & b)
    elif op == "OR":
        r = a | b
    elif op == "NOR":
        r = ~(a | b)
    elif op == "XOR":
        r = a ^ b
    elif op == "XNOR":
        r = ~(a ^ b)
    else:
        raise ValueError(f"unknown bitwise op {op!r}; known: {BITWISE_OPS}")
    return r & mask


def format_bits(x: np.ndarray, n_bits: int) -> list[str]:
    """Zero-padded binary strings (MSB first) of an integer array, vectorised."""
    x = np.asarray(x, dtype=np.uint64).reshape(-1)
    shifts = np.arange(n_bits - 1, -1, -1, dtype=np.uint64)
    digits = (((x[:, None] >> shifts) & np.uint64(1)).astype(np.uint8) + ord("0")).tobytes()
    return [digits[i * n_bits : (i + 1) * n_bits].decode("ascii") for i in range(len(x))]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (wrapping uint64 arithmetic)."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class _PairSpace:
    """The input pairs (as codes ``a << n | b``) available to a split, shared by a family's tasks."""

    def __init__(self, n_bits: int, split: str, test_fraction: float, split_seed: int) -> None:
        _check_split(split, test_fraction)
        self.n_bits = n_bits
        self.split = split
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self.total = 1 << (2 * n_bits)
        self._codes: np.ndarray | None = None

    def contains(self, codes: np.ndarray) -> np.ndarray:
        if self.split == "all":
            return np.ones(codes.shape, dtype=bool)
        with np.errstate(over="ignore"):
            salt = _mix64(np.array([self.split_seed], dtype=np.uint64)) + np.uint64(0x9E3779B97F4A7C15)
            h = _mix64(codes.astype(np.uint64) + salt)
        is_test = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < self.test_fraction
        return is_test if self.split == "test" else ~is_test

    @property
    def codes(self) -> np.ndarray | None:
        """All codes of the split when ``n_bits`` is small enough to enumerate, else None."""
        if self._codes is None and self.n_bits <= _ENUMERATE_MAX_BITS:
            allc = np.arange(self.total, dtype=np.uint64)
            self._codes = allc[self.contains(allc)]
        return self._codes

    @property
    def size(self) -> int:
        codes = self.codes
        if codes is not None:
            return len(codes)
        frac = {"all": 1.0, "test": self.test_fraction, "train": 1.0 - self.test_fraction}[self.split]
        return int(self.total * frac * 0.99)  # a safe lower bound of the hashed subset at this size

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        codes = self.codes
        if codes is not None:
            return codes[rng.choice(len(codes), size=n, replace=False)]
        got = np.empty(0, dtype=np.uint64)
        while len(got) < n:
            draw = rng.integers(0, self.total, size=2 * n + 8, dtype=np.uint64)
            draw = draw[self.contains(draw)]
            got = np.concatenate([got, draw])
            _, first = np.unique(got, return_index=True)
            got = got[np.sort(first)]
        return got[:n]


class BitwiseTask(Task):
    """One bitwise op (``op=None`` gives the Null task: random output bits)."""

    def __init__(
        self,
        op: str | None,
        n_bits: int = 5,
        *,
        pair_separator: str = " ",
        split: str = "all",
        test_fraction: float = 0.2,
        split_seed: int = 0,
        _space: _PairSpace | None = None,
    ) -> None:
        n_bits = _check_bits(n_bits)
        if op is not None:
            op = op.upper()
            if op not in BITWISE_OPS:
                raise ValueError(f"unknown bitwise op {op!r}; known: {BITWISE_OPS}")
        if not isinstance(pair_separator, str) or set(pair_separator) & {"0", "1"}:
            raise ValueError(f"pair_separator must be a string without binary digits, got {pair_separator!r}")
        super().__init__(op if op is not None else NULL_TASK)
        self.op = op
        self.is_null = op is None
        self.n_bits = n_bits
        self.pair_separator = pair_separator
        self._space = _space if _space is not None else _PairSpace(n_bits, split, test_fraction, split_seed)
        if self._space.n_bits != n_bits:
            raise ValueError("pair space and task disagree on n_bits")

    @property
    def n_inputs(self) -> int:
        return self._space.size

    def sample_arrays(self, n: int, seed: SeedLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``n`` distinct operand pairs and results as uint64 arrays ``(a, b, y)``."""
        if n > self.n_inputs:
            raise ValueError(f"task {self.name!r} has only {self.n_inputs} input pairs; cannot draw {n}")
        rng = as_rng(seed)
        codes = self._space.sample(n, rng)
        mask = np.uint64((1 << self.n_bits) - 1)
        a = codes >> np.uint64(self.n_bits)
        b = codes & mask
        if self.op is None:
            y = rng.integers(0, 1 << self.n_bits, size=n, dtype=np.uint64)
        else:
            y = apply_op(self.op, a, b, self.n_bits)
        return a, b, y

    def _sample(self, n: int, rng: np.random.Generator) -> list[Example]:
        a, b, y = self.sample_arrays(n, rng)
        sa, sb, sy = (format_bits(v, self.n_bits) for v in (a, b, y))
        sep = self.pair_separator
        return [Example(f"{x1}{sep}{x2}", out) for x1, x2, out in zip(sa, sb, sy, strict=True)]


def bitwise_family(
    n_bits: int = 5,
    *,
    ops: Sequence[str] = BITWISE_OPS,
    pair_separator: str = " ",
    split: str = "all",
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> TaskFamily:
    """The bitwise family: one task per op (labels in ``ops`` order) plus Null (last label).

    ``split`` ("all", "train", "test") restricts every task to the same hashed subset of input pairs.
    """
    n_bits = _check_bits(n_bits)
    ops_u = [str(o).upper() for o in ops]
    unknown = [o for o in ops_u if o not in BITWISE_OPS]
    if unknown:
        raise ValueError(f"unknown bitwise ops {unknown}; known: {BITWISE_OPS}")
    if not ops_u or len(set(ops_u)) != len(ops_u):
        raise ValueError(f"ops must be non-empty and distinct, got {list(ops)}")
    space = _PairSpace(n_bits, split, test_fraction, split_seed)
    if space.size == 0:
        raise ValueError(f"split {split!r} of {n_bits}-bit pairs is empty; use more bits or split='all'")
    kw = {"pair_separator": pair_separator, "_space": space}
    tasks = [BitwiseTask(op, n_bits, **kw) for op in ops_u]
    null = BitwiseTask(None, n_bits, **kw)
    info = {
        "family": "bitwise",
        "n_bits": n_bits,
        "ops": tuple(ops_u),
        "pair_separator": pair_separator,
        "split": split,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
    }
    return TaskFamily("bitwise", tasks, null, info=info)
