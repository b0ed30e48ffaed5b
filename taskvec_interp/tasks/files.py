"""Task families from folders of JSON files (e.g. the function-vector datasets of Todd et al. 2023).

Every ``*.json`` file in the folder is one task named after the file stem (labels in sorted file-name
order, Null last); it must hold a non-empty JSON list of ``{"input": str, "output": str}`` objects
(extra keys are ignored). Inputs and outputs are stripped of surrounding whitespace by default (the
prompt template owns the spacing); duplicate inputs keep their first example.

Null task (a choice; the paper has no file-based family): inputs drawn from the union of all tasks'
distinct inputs, each paired with an output drawn uniformly from the union of all tasks' distinct
outputs, redrawn at every sample. Outputs thus look like answers of the family but ignore the input,
as POS Null pairs a sentence with a random word and bitwise Null outputs random bits.

Split (OPEN): ``split="train"``/``"test"`` keeps a seeded ``1 - test_fraction`` / ``test_fraction``
part of each task's examples (each file split independently); Null uses the union of the kept parts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .base import NULL_TASK, Example, ExampleTask, RandomOutputTask, TaskFamily, decode_utf8, split_indices

__all__ = ["files_family", "load_task_file"]


def load_task_file(path: str | os.PathLike[str], *, strip: bool = True) -> list[Example]:
    """Read and validate one task file; ValueError names the file and the problem."""
    path = Path(path)
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"{path}: empty file ({len(raw)} bytes): expected a JSON list of examples")
    text = decode_utf8(raw, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a JSON list of {{'input', 'output'}} objects, got {type(data).__name__}"
        )
    if not data:
        raise ValueError(f"{path}: the task has no examples (empty list)")
    out: list[Example] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: item {i} is a {type(item).__name__}, expected an object")
        for key in ("input", "output"):
            if key not in item:
                raise ValueError(f"{path}: item {i} has no {key!r} key")
            if not isinstance(item[key], str):
                raise ValueError(
                    f"{path}: item {i} {key!r} is a {type(item[key]).__name__}, expected a string"
                )
        x, y = item["input"], item["output"]
        if strip:
            x, y = x.strip(), y.strip()
        if not x or not y:
            which = " and ".join(k for k, v in (("'input'", x), ("'output'", y)) if not v)
            raise ValueError(
                f"{path}: item {i} has an empty input or output ({which} empty"
                f"{' after stripping whitespace' if strip else ''})"
            )
        out.append(Example(x, y))
    return out


def files_family(
    path: str | os.PathLike[str],
    *,
    tasks: Sequence[str] | None = None,
    strip: bool = True,
    split: str = "all",
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> TaskFamily:
    """A family from a folder of JSON task files; ``tasks`` picks (and orders) file stems."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"task folder {folder} does not exist or is not a folder")
    available = {p.stem: p for p in sorted(folder.glob("*.json")) if p.is_file()}
    if not available:
        subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("*.json")))
        hint = f" (its subfolders {', '.join(subs)} do: pass one of them)" if subs else ""
        raise ValueError(f"task folder {folder} holds no .json files{hint}")
    if tasks is None:
        names = sorted(available)
    else:
        if isinstance(tasks, str):
            raise TypeError(f"tasks must be a sequence of task names, got the string {tasks!r}")
        names = list(tasks)
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"tasks= names {dups} more than once (task folder {folder}); each task once")
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(f"no task file for {missing} in {folder}; available: {sorted(available)}")
        if not names:
            raise ValueError("tasks must name at least one task file")
    if NULL_TASK in names:
        raise ValueError(f"{available[NULL_TASK]}: the task name {NULL_TASK!r} is reserved for the Null task")
    built: list[ExampleTask] = []
    for name in names:
        examples = load_task_file(available[name], strip=strip)
        task = ExampleTask(name, examples)  # dedupes inputs
        idx = split_indices(task.n_inputs, split, test_fraction, split_seed, key=name)
        if len(idx) == 0:
            raise ValueError(f"{available[name]}: no examples left in split {split!r}")
        built.append(ExampleTask(name, [Example(task.inputs[i], task.outputs[i]) for i in idx]))
    inputs = list(dict.fromkeys(x for t in built for x in t.inputs))
    outputs = list(dict.fromkeys(y for t in built for y in t.outputs))
    null = RandomOutputTask(inputs, outputs=outputs)
    info = {
        "family": f"files:{folder}",
        "path": str(folder),
        "tasks": tuple(names),
        "strip": strip,
        "split": split,
        "test_fraction": test_fraction,
        "split_seed": split_seed,
    }
    return TaskFamily(folder.name, built, null, info=info)
