"""Figures of interventions: the language-model patching tables (paper Fig. 20), the synthetic model's
source x target patching matrix (paper Fig. 7), and :func:`patching_figures` (a patching run's set).

Interventions are looked up by name in :mod:`taskvec_interp.interventions`: every mode of a table is
drawn (panels in the registry's order, titled with the intervention's ``label``), so a newly registered
intervention is drawn too, and a mode the registry does not know is a ``ValueError``. The baseline rows
(``direction == "baseline"``, mode ``"none"``) are not an intervention.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..interventions import get_intervention, intervention_names
from ._common import _check_table, _finish, _grid

if TYPE_CHECKING:
    from ..experiments.patching import PatchResult

__all__ = ["patching_figures", "plot_patch_bars", "plot_patch_heatmap", "plot_patch_matrix", "plot_patching"]

_DIRECTION_COLORS = {"baseline": "0.55", "positive": "tab:green", "negative": "tab:red", "ablation": "tab:purple"}
_HEATMAP_DIRECTIONS = ("positive", "negative", "ablation")


def _modes(present: Iterable[str], mode: str | None = None) -> list[str]:
    """``[mode]`` when given, else the modes in ``present`` in the registry's order; ``ValueError`` for a
    mode the registry does not know."""
    present = list(dict.fromkeys(present))
    for m in ([mode] if mode is not None else present):
        get_intervention(m)
    if mode is not None:
        return [mode]
    return [m for m in intervention_names() if m in present]


def _title(mode: str) -> str:
    spec = get_intervention(mode)
    return f"{spec.label} task vector" if spec.needs_vector else spec.label


# ---- The synthetic model (paper Fig. 7) ------------------------------------------------------------------
def plot_patching(patching: pd.DataFrame, path: str | Path | None = None, title: str | None = None) -> Figure:
    """Source x target heatmaps of the patched test MSE, one panel per checkpoint (paper Fig. 7), and per
    intervention where the table has several (registry order; a table without ``mode`` is ``replace``).

    The unpatched MSE of each source basis is the first column (target "none").
    """
    _check_table(patching, ["step", "source", "target", "mse"], "patching table")
    patching = patching if "mode" in patching else patching.assign(mode="replace")
    steps = sorted(patching["step"].unique())
    panels = [(step, m) for step in steps for m in _modes(patching.loc[patching["step"] == step, "mode"])]
    fig, axes = _grid(len(panels), (4.2, 3.6))
    for ax, (step, mode) in zip(axes, panels, strict=False):
        part = patching[(patching["step"] == step) & (patching["mode"] == mode)]
        grid = part.pivot_table(index="source", columns="target", values="mse", sort=False)
        cols = ["none"] + [c for c in grid.columns if c != "none"]
        grid = grid[cols]
        logv = np.log10(grid.to_numpy())
        im = ax.imshow(logv, cmap="magma_r", aspect="auto")
        lo, hi = np.nanmin(logv), np.nanmax(logv)
        for (i, j), v in np.ndenumerate(grid.to_numpy()):
            light = hi == lo or (logv[i, j] - lo) / (hi - lo) < 0.5  # magma_r is light at the low end
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="k" if light else "w")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(grid.index)), list(grid.index))
        ax.set_xlabel("patched-in basis mean (target)")
        ax.set_ylabel("input basis (source)")
        layer = part["layer"].iloc[0] if "layer" in part else "?"
        where = f", tokens: {part['position'].iloc[0]}" if "position" in part else ""
        ax.set_title(f"step {step}: {get_intervention(mode).label} at layer {layer}{where}", fontsize=9)
        fig.colorbar(im, ax=ax, label="log10 MSE")
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


# ---- Task-vector interventions on language models (paper Fig. 20) ----------------------------------------
def plot_patch_bars(accuracy: pd.DataFrame, layer: int, mode: str | None = None, path: str | Path | None = None,
                    title: str | None = None) -> Figure:
    """Baseline / positive / negative (or, for an intervention without a vector, baseline / ablation)
    exact-match accuracy per task at one layer, with bootstrap CIs (paper Fig. 20). One panel per
    intervention mode in the table (or only ``mode``)."""
    acc = _check_table(accuracy, ["layer", "mode", "direction", "task", "accuracy", "ci_low", "ci_high"],
                       "patching accuracy table")
    base = acc[acc["direction"] == "baseline"]
    at = acc[(acc["layer"] == layer) & ~acc["direction"].isin(["baseline", "cross"])]
    if at.empty:
        raise ValueError(f"no positive/negative (or ablation) interventions at layer {layer} in the table")
    modes = _modes(at["mode"], mode)
    tasks = list(dict.fromkeys(base["task"]))
    fig, axes = _grid(len(modes), (max(5.0, 0.9 * len(tasks) + 1.5), 3.4), max_cols=1)
    width = 0.27
    top = min(1.05, max(0.25, 1.2 * float(pd.concat([base, at])["ci_high"].max())))  # small accuracies stay readable
    for ax, m in zip(axes, modes, strict=False):
        of_mode = at[at["mode"] == m]
        beside = (("positive", "negative") if get_intervention(m).needs_vector
                  else tuple(dict.fromkeys(of_mode["direction"])))  # e.g. ("ablation",)
        shown = [("baseline", base), *((d, of_mode[of_mode["direction"] == d]) for d in beside)]
        for j, (direction, part) in enumerate(shown):
            part = part.set_index("task").reindex(tasks)
            x = np.arange(len(tasks)) + (j - (len(shown) - 1) / 2) * width
            err = np.vstack([part["accuracy"] - part["ci_low"], part["ci_high"] - part["accuracy"]])
            ax.bar(x, part["accuracy"], width, yerr=np.clip(err, 0, None), capsize=2,
                   color=_DIRECTION_COLORS.get(direction, f"C{j + 3}"), label=direction)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylim(0, top)
        ax.set_ylabel("exact-match accuracy")
        ax.set_title(f"{_title(m)} at layer {layer}", fontsize=9)
        ax.legend(fontsize=8, ncols=3, loc="upper right")
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def plot_patch_heatmap(accuracy: pd.DataFrame, direction: str = "positive", mode: str | None = None,
                       path: str | Path | None = None, title: str | None = None, value: str = "delta") -> Figure:
    """Layer x task heatmap of the change (intervention minus baseline), one panel per intervention mode
    of ``direction`` in the table (or only ``mode``); ``direction="ablation"`` for the interventions
    without a vector.

    ``value``: ``"delta"`` (exact-match accuracy) or ``"logprob_delta"`` (mean per-token answer
    log-probability, when the run scored it)."""
    acc = _check_table(accuracy, ["layer", "mode", "direction", "task", value], "patching accuracy table")
    what = "answer log-prob" if value.startswith("logprob") else "accuracy"
    part = acc[acc["direction"] == direction]
    if part.empty:
        raise ValueError(f"no {direction!r} interventions in the table")
    modes = _modes(part["mode"], mode)
    fig, axes = _grid(len(modes), (5.2, 4.2), max_cols=2)
    lim = max(float(np.nanmax(np.abs(part[value].to_numpy(dtype=float)))), 0.05)  # one scale for all panels
    for ax, m in zip(axes, modes, strict=False):
        grid = part[part["mode"] == m].pivot_table(index="layer", columns="task", values=value, sort=False)
        grid = grid.sort_index()
        im = ax.imshow(grid.to_numpy(), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", origin="lower")
        ax.set_xticks(range(len(grid.columns)), list(grid.columns), rotation=45, ha="right")
        step = max(1, math.ceil(len(grid.index) / 16))  # at most ~16 layer labels
        ax.set_yticks(range(0, len(grid.index), step), [int(v) for v in grid.index[::step]])
        ax.set_xlabel("task")
        ax.set_ylabel("patched layer")
        ax.set_title(f"{direction} ({get_intervention(m).label}): {what} change", fontsize=9)
        fig.colorbar(im, ax=ax, label=f"{what} - baseline")
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def plot_patch_matrix(accuracy: pd.DataFrame, layer: int, mode: str, path: str | Path | None = None,
                      title: str | None = None) -> Figure:
    """Source x target matrix: the accuracy change on each task's prompts (columns) when each task's
    vector (rows) is patched in at ``layer`` (the language-model analogue of the synthetic Fig. 7)."""
    acc = _check_table(accuracy, ["layer", "mode", "vector", "task", "delta"], "patching accuracy table")
    label = get_intervention(mode).label
    part = acc[(acc["layer"] == layer) & (acc["mode"] == mode) & ~acc["vector"].isin(["none", "own"])]
    if part.empty:
        raise ValueError(f"no source x target ('matrix') interventions at layer {layer} with mode {mode!r}")
    tasks = list(dict.fromkeys(acc["task"]))
    grid = part.pivot_table(index="vector", columns="task", values="delta").reindex(index=tasks, columns=tasks)
    lim = max(float(np.nanmax(np.abs(grid.to_numpy()))), 0.05)
    fig, (ax,) = _grid(1, (0.6 * len(tasks) + 2.5, 0.5 * len(tasks) + 1.8))
    im = ax.imshow(grid.to_numpy(), cmap="RdBu", vmin=-lim, vmax=lim)
    for (i, j), v in np.ndenumerate(grid.to_numpy()):
        if np.isfinite(v):
            ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=7,
                    color="k" if abs(v) < 0.6 * lim else "w")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("prompts of task (target)")
    ax.set_ylabel("task vector patched in (source)")
    ax.set_title(title or f"{label} at layer {layer}: accuracy change", fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy - baseline")
    return _finish(fig, path)


# ---- A patching run's figure set -------------------------------------------------------------------------
def patching_figures(result: PatchResult, out: str | Path) -> list[Path]:
    """Fig. 20-like bars at the headline layer, layer x task heatmaps of the change (positive, negative and
    ablation), and the source x target matrix of every intervention that has one."""
    out = Path(out) / "figures"
    acc, layer = result.accuracy, result.summary["layer"]
    fam = result.config.family
    shots = "zero-shot" if result.config.zero_shot else f"{result.config.shots}-shot"
    paths = [out / f"patch_bars_layer{layer}.png"]
    plot_patch_bars(acc, layer, path=paths[0], title=f"{fam}, {shots}, {result.vectors.definition} vectors")
    values = ["delta"] + (["logprob_delta"] if "logprob_delta" in acc else [])
    for direction in _HEATMAP_DIRECTIONS:
        if direction in set(acc["direction"]) and acc.loc[acc["direction"] == direction, "layer"].nunique() > 1:
            for value in values:
                suffix = "" if value == "delta" else "_logprob"
                paths.append(out / f"patch_heatmap_{direction}{suffix}.png")
                plot_patch_heatmap(acc, direction, path=paths[-1], title=f"{fam}, {shots}", value=value)
    cross = acc[(acc["direction"] == "cross") & (acc["layer"] == layer)]
    for mode in _modes(cross["mode"]):
        paths.append(out / f"patch_matrix_layer{layer}_{mode}.png")
        plot_patch_matrix(acc, layer, mode, path=paths[-1])
    return paths
