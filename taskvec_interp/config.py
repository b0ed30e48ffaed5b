"""One way to configure: the prompt set every experiment builds its prompts from, and the field helper.

Every config is a dataclass whose fields carry their help text (``opt(default, "help")``); the command
line builds each option from these fields (:mod:`taskvec_interp.cli_config`), so a field, its default
and its help are written once. Every config checks itself in ``__post_init__`` through
:mod:`taskvec_interp.validate`, every message in one style: ``SweepConfig.k must be an int >= 1, got 0``.

:class:`PromptSetConfig` holds what decides WHICH prompts an experiment reads: the task family (and its
keyword arguments), the prompt template, the number of demonstrations, prompts per task, the seed and
whether queries are drawn with replacement (``replace``: :meth:`~taskvec_interp.tasks.PromptBuilder.build`).
The sweep, patching, fine-tuning and trajectory configs inherit it, so their keyword construction stays
flat (``SweepConfig(family="bitwise", n_per_task=40)``), ``cfg.n_per_task`` reads as before and a saved
``config.json`` keeps its flat keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .validate import check_bool, check_dict, check_int, check_seed, check_str

Choices = tuple | Callable[[], tuple]
"""The allowed values of a field: a tuple, or a function returning one (a registry read when asked)."""


def opt(default: Any = dataclasses.MISSING, help: str = "", *, choices: Choices | None = None,  # noqa: A002
        factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its help text (and allowed values) in ``metadata``, for the docs and the CLI.

    A mutable default (dict, list) becomes a ``default_factory`` copy; ``choices`` is a tuple or a function
    returning one (``backend_names``), listed by the CLI's help (the config's ``__post_init__`` enforces them).
    """
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(default, (dict, list, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def resolve_choices(choices: Choices | None) -> tuple | None:
    return choices() if callable(choices) else choices


@dataclass
class PromptSetConfig:
    """Which prompts: ``n_per_task`` prompts per task of ``family`` (Null included), ``shots``
    demonstrations each, laid out by ``template`` (:class:`~taskvec_interp.tasks.PromptTemplate` fields),
    drawn with ``seed`` (queries with replacement when ``replace``). Inherited by every experiment that
    builds prompts; a subclass may redeclare a field to change its default or help (``SweepConfig.shots`` is
    a tuple of shot counts)."""

    family: str = opt("bitwise", "task family: bitwise | pos | files:PATH")
    family_kwargs: dict = opt({}, "keyword arguments of the family's factory, as JSON, e.g. '{\"n_bits\": 6}'")
    template: dict = opt({}, "prompt template (PromptTemplate fields) as JSON, e.g. "
                             "'{\"input_prefix\": \"Q: \", \"output_prefix\": \"\\nA:\"}'")
    shots: int = opt(4, "demonstrations per prompt")
    n_per_task: int = opt(100, "prompts per task (Null included)")
    seed: int = opt(0, "seed of the prompts (and of the bootstrap)")
    replace: bool = opt(False, "draw each task's queries with replacement (a query may repeat; its demonstrations "
                               "stay distinct from it), so n_per_task may exceed a task's distinct inputs")

    supports_replace: ClassVar[bool] = False
    """Whether the experiment built from this config honours ``replace`` (it passes it to
    :meth:`~taskvec_interp.tasks.PromptBuilder.build`); where not, ``replace=True`` is refused rather than
    ignored."""

    def __post_init__(self) -> None:
        self.check_prompt_set()

    def check_prompt_set(self) -> None:
        """The prompt-set fields' checks (a subclass's ``__post_init__`` calls this first)."""
        name = type(self).__name__
        check_str(f"{name}.family", self.family)
        check_dict(f"{name}.family_kwargs", self.family_kwargs)
        check_template(f"{name}.template", self.template)
        self.check_shots()
        check_int(f"{name}.n_per_task", self.n_per_task, 1)
        check_seed(f"{name}.seed", self.seed)
        check_bool(f"{name}.replace", self.replace)
        if self.replace and not self.supports_replace:
            raise ValueError(f"{name}.replace must be False: this experiment does not draw queries with replacement "
                             "yet (PatchConfig does), got True")

    def check_shots(self) -> None:
        check_int(f"{type(self).__name__}.shots", self.shots, 0)


def check_template(name: str, value: object) -> None:
    """A dict of :class:`~taskvec_interp.tasks.PromptTemplate` fields with values of the right types."""
    from .tasks import PromptTemplate

    check_dict(name, value)
    known = {f.name: f for f in dataclasses.fields(PromptTemplate)}
    unknown = sorted(set(value) - set(known))  # type: ignore[arg-type]
    if unknown:
        raise ValueError(f"{name} must hold PromptTemplate fields {sorted(known)}, got unknown keys {unknown}")
    for key, v in value.items():  # type: ignore[union-attr]
        if key == "answer_space":
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"{name}['answer_space'] must be None, True or False, got {v!r}")
        elif not isinstance(v, str):
            raise ValueError(f"{name}[{key!r}] must be a string, got {v!r}")


LEGACY_KEYS: dict[str, dict[str, str]] = {"FinetuneConfig": {"eval_n_per_task": "n_per_task"}}
"""Renamed fields, per config: a config.json written before the rename still loads."""


def upgrade_config(cls: type, raw: dict) -> dict:
    """``raw`` (a saved config dict) with renamed keys under their current names."""
    renames = LEGACY_KEYS.get(cls.__name__, {})
    return {renames.get(k, k): v for k, v in raw.items()}


def read_saved_config(directory: Path, cls: type, known_only: bool = False) -> tuple[dict, dict]:
    """A result directory's ``config.json`` as ``(fields, model)``: the fields under their current names
    (:func:`upgrade_config`; ``known_only``: only ``cls``'s dataclass fields, so a key an
    older version wrote is dropped) and the model's provenance that was saved beside them (``{}`` if none)."""
    from .results import read_json

    raw = read_json(Path(directory) / "config.json")
    model = raw.pop("provenance", {}).get("model", {})
    raw = upgrade_config(cls, raw)
    if known_only:
        names = {f.name for f in dataclasses.fields(cls)}
        raw = {k: v for k, v in raw.items() if k in names}
    return raw, model



# ---------------------------------------------------------------------------------------------------------------
# Fields several configs share beyond the prompt set: declared once, with one help text
# ---------------------------------------------------------------------------------------------------------------
def backend_names() -> tuple[str, ...]:
    """The adapter backends (the backend registry's names)."""
    from .adapters.registry import backend_names as names

    return tuple(names())


def model_field(default: str = "smollm2-135m") -> Any:
    return opt(default, "model: built-in name, local HF directory or hub id")


def backend_field(default: str = "torch") -> Any:
    return opt(default, "adapter backend", choices=backend_names)


def k_field(default: int = 10) -> Any:
    return opt(default, "neighbours of the leave-one-out k-NN behind task decodability (at most n_per_task - 2)")


def n_boot_field(default: int = 1000) -> Any:
    return opt(default, "bootstrap resamples of the confidence intervals (0: none, CIs are NaN)")


def batch_size_field(default: int = 16) -> Any:
    return opt(default, "prompts per forward pass")


def max_new_tokens_field() -> Any:
    return opt(None, "tokens generated per answer (default: enough for the longest answer)")


__all__ = ["LEGACY_KEYS", "PromptSetConfig", "backend_field", "backend_names", "batch_size_field", "check_template",
           "k_field", "max_new_tokens_field", "model_field", "n_boot_field", "opt",
           "read_saved_config", "resolve_choices", "upgrade_config"]
