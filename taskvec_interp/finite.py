"""Numbers that are not numbers stop the work where they appear.

:class:`NonFiniteError` (a ``ValueError``: the ``taskvec`` command prints it as one line) is raised where a
NaN or an infinity first shows: a training loss (the step and the last good checkpoint named), captured
activations (the layer named, with the advice to capture or load in float32 / bfloat16 when a float16 range
overflowed), an evaluation whose every value is NaN. :func:`first_nonfinite` finds the first bad site of a
stack of per-site tensors with one reduction; :func:`json_safe` turns what must still be recorded into
strict JSON (a non-finite float becomes ``null``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["NonFiniteError", "describe", "first_nonfinite", "json_safe", "nonfinite_keys", "nonfinite_params",
           "nonfinite_slices", "overflow_advice"]


class NonFiniteError(ValueError):
    """A NaN or an infinity where a number was needed (a ``ValueError``, so one-line CLI errors apply)."""


def nonfinite_slices(stacked: Tensor) -> list[int]:
    """Indices along dim 0 of the slices of ``stacked`` holding a NaN or an infinity (``[]``: all finite). One
    ``isfinite`` and one reduction over the whole tensor; floating tensors only (others are always finite)."""
    if not stacked.dtype.is_floating_point or stacked.numel() == 0:
        return []
    ok = torch.isfinite(stacked).reshape(stacked.shape[0], -1).all(dim=1)
    if bool(ok.all()):
        return []
    return (~ok).nonzero()[:, 0].tolist()


def first_nonfinite(stacked: Tensor) -> int | None:
    """The first of :func:`nonfinite_slices` (``None``: all finite)."""
    bad = nonfinite_slices(stacked)
    return bad[0] if bad else None


def describe(t: Tensor) -> str:
    """``'nan'``, ``'inf'`` or ``'nan and inf'``: what a non-finite tensor holds."""
    kinds = []
    if bool(torch.isnan(t).any()):
        kinds.append("nan")
    if bool(torch.isinf(t).any()):
        kinds.append("inf")
    return " and ".join(kinds) or "finite"


def overflow_advice(capture_dtype: torch.dtype, model_dtype: torch.dtype | None) -> str:
    """Why values at a site may be non-finite and what to do, from the capture's and the model's dtypes."""
    def name(d: torch.dtype | None) -> str:
        return str(d).removeprefix("torch.")

    if model_dtype == torch.float16:
        return (f"the model runs in float16 and its hidden states overflow float16's range "
                f"(max {torch.finfo(torch.float16).max:g}): load it in float32 or bfloat16")
    if model_dtype is not None and capture_dtype.is_floating_point and model_dtype.is_floating_point and \
            torch.finfo(capture_dtype).max < torch.finfo(model_dtype).max:
        return (f"the model's {name(model_dtype)} values exceed the capture dtype {name(capture_dtype)}'s range "
                f"(max {torch.finfo(capture_dtype).max:g}): capture with dtype=torch.float32 or torch.bfloat16")
    own = f"{name(model_dtype)} " if model_dtype is not None else ""
    return (f"the model's own {own}activations are not finite (NaN or infinite weights, or a hook or vector "
            "that writes them)")


def nonfinite_params(named: Sequence[tuple[str, Tensor]] | Any) -> list[str]:
    """Names of the parameters (``model.named_parameters()``) holding a NaN or an infinity."""
    return [n for n, p in named if p.dtype.is_floating_point and not bool(torch.isfinite(p).all())]


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (strict JSON: no bare ``NaN`` / ``Infinity``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def nonfinite_keys(record: dict[str, Any]) -> list[str]:
    """Keys of ``record`` whose float value (or any float in a list value) is not finite."""
    bad = []
    for k, v in record.items():
        vals = v if isinstance(v, (list, tuple)) else [v]
        if any(isinstance(x, float) and not math.isfinite(x) for x in vals):
            bad.append(k)
    return bad
