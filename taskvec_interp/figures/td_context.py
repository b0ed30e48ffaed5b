"""TD of the same queries with demonstrations and under the controls (input only, shuffled labels): what the
context puts into the query's state (:func:`plot_td_context`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from ._common import (
    _DEMOS,
    _ci_band,
    _families,
    _finish,
    _grid,
    _of_family,
    _prepare_td,
    _shot_colors,
    _shot_label,
    _td_by_layer_axes,
)

__all__ = ["plot_td_context"]

_CONTROL_STYLE = {"shuffled": ("--", "shuffled labels"), "input_only": (":", "input only (0-shot)")}


def plot_td_context(
    td: pd.DataFrame,
    path: str | Path | None = None,
    title: str | None = None,
) -> Figure:
    """Overall TD by layer of the k-shot prompts (solid) beside the same queries' controls: shuffled labels at the
    same shot count (dashed, same colour) and input only (dotted, black), with CI bands and the chance line.

    ``td``: a sweep's TD table with its ``context`` column (run with ``SweepConfig.controls``); one panel per
    family. The gap between a solid line and its controls is the TD the demonstrations put there.
    """
    td = _prepare_td(td, ("layer", "level", "td", "context"))
    overall = td[td["level"] == "overall"]
    controls = overall[overall["context"] != _DEMOS]
    if len(controls) == 0:
        raise ValueError("the TD table has no control rows (context 'input_only' or 'shuffled'): run the sweep with "
                         "SweepConfig.controls")
    unknown = sorted(set(overall["context"]) - {_DEMOS, *_CONTROL_STYLE})
    if unknown:
        raise ValueError(f"unknown context(s) {unknown} in the TD table; known: {[_DEMOS, *_CONTROL_STYLE]}")
    families = _families(overall)
    fig, axes = _grid(len(families), (6.4, 4.2), max_cols=2)
    k_shots = sorted(s for s in pd.unique(overall.loc[overall["context"] == _DEMOS, "shots"]) if s > 0)
    colors = _shot_colors(k_shots) if k_shots else {}
    has_ci = {"ci_low", "ci_high"} <= set(overall.columns)
    for family, a in zip(families, axes, strict=True):
        part = _of_family(overall, family)
        series = [(_DEMOS, s) for s in k_shots] + [("shuffled", s) for s in k_shots] + \
                 [("input_only", s) for s in sorted(pd.unique(part.loc[part["context"] == "input_only", "shots"]))]
        for context, shots in series:
            s = part[(part["context"] == context) & (part["shots"] == shots)].sort_values("layer", kind="stable")
            if len(s) == 0:
                continue
            x = s["layer"].to_numpy()
            y = s["td"].to_numpy(dtype=float)
            if context == _DEMOS:
                ls, color, label = "-", colors[shots], _shot_label(shots)
            else:
                ls, what = _CONTROL_STYLE[context]
                color = "k" if context == "input_only" else colors.get(shots, "0.3")
                label = what if context == "input_only" else f"{_shot_label(shots)}, {what}"
            a.plot(x, y, ls=ls, marker="o" if context == _DEMOS else None, ms=3, lw=1.6, color=color, label=label,
                   zorder=3)
            if has_ci:
                _ci_band(a, s, x, color, 0.12)
        _td_by_layer_axes(a, part)
        head = "TD with demonstrations vs controls"
        if len(families) > 1:
            a.set_title(str(family))
        else:
            a.set_title(title if title is not None else head + (f" ({family})" if family is not None else ""))
    if len(families) > 1:
        fig.suptitle(title if title is not None else "TD with demonstrations vs controls")
    return _finish(fig, path)


# ---- Per-task TD -----------------------------------------------------------------------------------------
