"""The interventions, in one table: what patching, the synthetic analysis, the figures and the CLI can apply.

An intervention turns a vector (or nothing) into a plain hook function at a prompt position
(``hooks.py``); it is looked up by name everywhere, so a new one is ONE entry here and an unknown
name is an error everywhere (patching's config, the synthetic patching matrix, the figures, the CLI's
help and choices)::

    from taskvec_interp import hooks as H
    from taskvec_interp.interventions import Intervention, register_intervention

    register_intervention(Intervention(
        name="add_half", label="add x0.5", help="add half the task vector",
        build=lambda vector, position, scale: H.add(vector, position=position, scale=0.5 * scale),
        uses_scale=True))

``build(vector, position, scale)`` gets the vector (``[d_model]`` or one row per prompt;
``None`` for an intervention with ``needs_vector=False``), the position (prompt coordinates, ``-1``:
the last prompt token) and the condition's scale (``1.0`` unless ``uses_scale``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from . import hooks as H


@dataclass(frozen=True)
class Intervention:
    """One named intervention: how to build its hook and how to show it."""

    name: str
    build: Callable[[Tensor | None, H.Position, float], H.HookFn]
    label: str = ""
    """Shown in figure titles and legends (the name if empty)."""
    help: str = ""
    """One line for the CLI's help and the docs."""
    needs_vector: bool = True
    """False: the hook takes no task vector (e.g. zero ablation); patching runs it once per layer."""
    uses_scale: bool = False
    """True: the condition's ``scale`` reaches ``build`` (patching's ``--scale``)."""
    centerable: bool = False
    """True: patching's ``center`` option subtracts the mean of every task's vector first."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"Intervention.name must be an identifier-like string, got {self.name!r}")
        if self.name in ("none",):
            raise ValueError(f"Intervention.name {self.name!r} is reserved (the baseline condition)")
        if not callable(self.build):
            raise ValueError(f"Intervention.build must be callable, got {self.build!r}")
        if not self.label:
            object.__setattr__(self, "label", self.name)


def _add(vector: Tensor | None, position: H.Position, scale: float) -> H.HookFn:
    return H.add(vector, position=position, scale=scale)


def _replace(vector: Tensor | None, position: H.Position, scale: float) -> H.HookFn:
    return H.replace(vector, position=position)


def _ablate(vector: Tensor | None, position: H.Position, scale: float) -> H.HookFn:
    return H.ablate(position=position)


INTERVENTIONS: dict[str, Intervention] = {}
"""name -> :class:`Intervention`, in registration order (the order figures and help list them)."""


def register_intervention(intervention: Intervention, *, replace: bool = False) -> Intervention:
    """Add ``intervention`` to the table; ``replace=True`` to overwrite an entry of the same name."""
    if not isinstance(intervention, Intervention):
        raise ValueError(f"register_intervention takes an Intervention, got {type(intervention).__name__}")
    if intervention.name in INTERVENTIONS and not replace:
        raise ValueError(f"intervention {intervention.name!r} is already registered (pass replace=True)")
    INTERVENTIONS[intervention.name] = intervention
    return intervention


def unregister_intervention(name: str) -> None:
    """Remove a registered intervention (``ValueError`` for an unknown name)."""
    get_intervention(name)
    del INTERVENTIONS[name]


def intervention_names() -> tuple[str, ...]:
    return tuple(INTERVENTIONS)


def get_intervention(name: object) -> Intervention:
    """The intervention called ``name``; ``ValueError`` naming it and the known ones."""
    if not isinstance(name, str) or name not in INTERVENTIONS:
        raise ValueError(f"intervention must be one of {intervention_names()}, got {name!r}")
    return INTERVENTIONS[name]


register_intervention(Intervention(
    "add", _add, label="add", uses_scale=True, centerable=True,
    help="add scale x the vector to the activation at the position"))
register_intervention(Intervention(
    "replace", _replace, label="replace", help="overwrite the activation at the position with the vector"))
register_intervention(Intervention(
    "ablate", _ablate, label="zero ablation", needs_vector=False,
    help="set the activation at the position to zero (no vector)"))
