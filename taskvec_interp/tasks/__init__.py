"""Model-free task families and the k-shot prompt builder.

>>> fam = get_family("bitwise")                      # AND NAND OR NOR XOR XNOR + null
>>> prompts = build_prompts(fam, n_per_task=100, shots=4, seed=0)
>>> prompts[0].task, prompts[0].label, prompts[0].text.splitlines()[-1], prompts[0].answer
('AND', 0, '11001 01010 ->', ' 01000')

Specs accepted by :func:`get_family`: ``"bitwise"``, ``"pos"``, ``"fv"`` (the built-in function-vector tasks),
``"files:PATH"``, and any name given to :func:`register_family`. Every family's
Null task is named ``"null"`` and has the last label.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import (
    NULL_TASK,
    SPLITS,
    Example,
    ExampleTask,
    RandomOutputTask,
    Task,
    TaskFamily,
    as_rng,
    split_indices,
)
from .bitwise import BITWISE_OPS, BitwiseTask, bitwise_family
from .files import files_family, load_task_file
from .function_vectors import FV_CORE_TASKS, FV_TASKS, TODD_TASKS, function_vector_family
from .pos import (
    POS_TAGS,
    UD_ENV_VAR,
    UD_EXCERPT,
    ChecksumError,
    Sentence,
    download_ud_english_ewt,
    pos_family,
    read_conllu,
)
from .prompts import Prompt, PromptBuilder, PromptTemplate, build_prompts, prompts_to_frame
from .tokenization import AnswerTokens, check_tokenization, max_answer_tokens

__all__ = [
    "BITWISE_OPS",
    "FV_CORE_TASKS",
    "FV_TASKS",
    "TODD_TASKS",
    "function_vector_family",
    "FAMILIES",
    "NULL_TASK",
    "POS_TAGS",
    "SPLITS",
    "UD_ENV_VAR",
    "UD_EXCERPT",
    "AnswerTokens",
    "BitwiseTask",
    "ChecksumError",
    "Example",
    "ExampleTask",
    "Prompt",
    "PromptBuilder",
    "PromptTemplate",
    "RandomOutputTask",
    "Sentence",
    "Task",
    "TaskFamily",
    "as_rng",
    "bitwise_family",
    "build_prompts",
    "check_tokenization",
    "download_ud_english_ewt",
    "files_family",
    "get_family",
    "load_task_file",
    "max_answer_tokens",
    "pos_family",
    "prompts_to_frame",
    "read_conllu",
    "register_family",
    "unregister_family",
    "split_indices",
]

FAMILIES: dict[str, Callable[..., TaskFamily]] = {
    "bitwise": bitwise_family,
    "pos": pos_family,
    "files": files_family,
    "fv": function_vector_family,
}
"""Family factories by name; ``"files"`` takes its folder after a colon (``"files:PATH"``)."""


def register_family(name: str, factory: Callable[..., TaskFamily], *, replace: bool = False) -> None:
    """Make ``get_family(name)`` (and so every config's ``family`` field and the CLI's ``--family``) build
    ``factory(**kwargs)``: a new task family is its module plus this one call."""
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"a family name must be a lower-case identifier, got {name!r}")
    if not callable(factory):
        raise ValueError(f"a family factory must be callable, got {factory!r}")
    if name in FAMILIES and not replace:
        raise ValueError(f"task family {name!r} is already registered (pass replace=True)")
    FAMILIES[name] = factory


def unregister_family(name: str) -> None:
    if name not in FAMILIES or name in ("bitwise", "pos", "files", "fv"):
        raise ValueError(f"{name!r} is not a registered user family; registered: {tuple(FAMILIES)}")
    del FAMILIES[name]


def get_family(spec: str, **kwargs: Any) -> TaskFamily:
    """Build a family from ``"bitwise"``, ``"pos"``, ``"fv"``, ``"files:PATH"`` or a registered name; kwargs go to its
    factory."""
    if not isinstance(spec, str):
        raise ValueError(f"family spec must be a string, got {spec!r}")
    name, sep, arg = spec.partition(":")
    name = name.strip().lower()
    if name == "files":
        if not sep or not arg:
            raise ValueError("the files family needs a folder: 'files:PATH'")
        return files_family(arg, **kwargs)
    if name in FAMILIES and not sep:
        return FAMILIES[name](**kwargs)
    known = ", ".join("files:PATH" if k == "files" else k for k in FAMILIES)
    raise ValueError(f"unknown task family {spec!r}; known: {known}")
