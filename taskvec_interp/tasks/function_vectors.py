"""The built-in function-vector family ``"fv"``: a chosen subset of Todd et al.'s abstractive task files
(ICLR 2024; MIT), shipped inside the package (``tasks/data/function_vectors``, with their licence and
provenance), so it works offline by name with no path: ``get_family("fv")``.

23 tasks (:data:`FV_TASKS`), many of which a small model can do in context (SmolLM2-135M: 4-shot accuracies
from 0 to 0.9), unlike the
paper's bitwise and POS families, whose exact-match accuracy on small models sits near the floor. The six
tasks of Todd et al.'s main figures come first (:data:`TODD_TASKS`). Each file is a folder family task
(:func:`~taskvec_interp.tasks.files.files_family`): same splits, same Null task.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .base import TaskFamily
from .files import files_family

FV_DIR = Path(__file__).resolve().parent / "data" / "function_vectors"
"""Where the shipped task files live (``LICENSE`` and ``PROVENANCE.txt`` beside them)."""

TODD_TASKS: tuple[str, ...] = ("antonym", "capitalize", "country-capital", "english-french", "present-past",
                               "singular-plural")
"""The six abstractive tasks Todd et al. show in their main figures."""

FV_CORE_TASKS: tuple[str, ...] = (*TODD_TASKS, "country-currency", "person-sport", "next_item", "prev_item")
"""Todd et al.'s six and four small knowledge / sequence tasks: the subset the demo patches and runs zero-shot
(its budget), where every task of :data:`FV_TASKS` would cost 2.3x."""

FV_TASKS: tuple[str, ...] = (*FV_CORE_TASKS, "person-instrument", "product-company", "national_parks",
                             "capitalize_first_letter", "capitalize_second_letter", "capitalize_last_letter",
                             "lowercase_first_letter", "lowercase_last_letter", "next_capital_letter", "word_length",
                             "person-occupation", "park-country", "landmark-country")
"""Every task the built-in family ships, in its order: :data:`FV_CORE_TASKS`, then every other abstractive task
whose file is under 70 KB (the rule that chose them, never how a model does on them). 23 tasks x 3 shot counts
give a TD-vs-accuracy fit (finding F4) its points."""

__all__ = ["FV_CORE_TASKS", "FV_DIR", "FV_TASKS", "TODD_TASKS", "function_vector_family"]


def function_vector_family(tasks: Sequence[str] | None = None, **kwargs) -> TaskFamily:
    """The built-in family (``tasks``: a subset, in order; default all of :data:`FV_TASKS`); ``kwargs`` go to
    :func:`~taskvec_interp.tasks.files.files_family` (``strip``, ``split``, ``test_fraction``, ``split_seed``)."""
    return files_family(FV_DIR, tasks=list(FV_TASKS if tasks is None else tasks), **kwargs)
