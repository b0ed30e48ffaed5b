"""Checkpoint-trajectory figures: TD and the outcome over training (paper Fig. 5), and
:func:`trajectory_figures` (a trajectory's set, with the layer x checkpoint TD heatmap)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._common import _TD_LIMITS, _check_table, _draw_chance, _Figure, _finish
from .synthetic import plot_td_heatmap_steps

if TYPE_CHECKING:
    from ..experiments.trajectory import TrajectoryResult

__all__ = ["plot_trajectory", "trajectory_figures"]

_OUTCOMES = {"accuracy": ("ICL accuracy (exact match)", "linear"), "mse": ("test MSE, last prediction", "log")}


def _step_axis(ax: Axes, steps: np.ndarray) -> None:
    """Log x; symlog (linear below the first positive step) when step 0 is on the axis."""
    positive = steps[steps > 0]
    if len(positive) and (steps <= 0).any():
        ax.set_xscale("symlog", linthresh=float(positive.min()))
        ax.set_xlim(-0.3 * float(positive.min()), float(positive.max()) * 1.4)
    elif len(positive):
        ax.set_xscale("log")
        ax.set_xlim(float(positive.min()) / 1.4, float(positive.max()) * 1.4)
    ax.set_xlabel("training step" + (" (symlog: linear up to the first nonzero step)"
                                     if (steps <= 0).any() and len(positive) else " (log)"))


def plot_trajectory(summary: pd.DataFrame, outcome: str = "accuracy", path: str | Path | None = None,
                    title: str | None = None) -> Figure:
    """Mean TD and the outcome against the training step (paper Fig. 5), two panels sharing a log x axis.

    ``summary``: :func:`~taskvec_interp.experiments.trajectory.trajectory_summary` (step, layer, td_mean,
    td_sd, chance, ``outcome``, ``{outcome}_sd``). Left: mean per-task TD at each step's layer (band: s.d.
    over tasks) with TD's chance level; right: the mean outcome over tasks (``accuracy``: exact match,
    ``mse``: the synthetic model's test MSE, log y).
    """
    if outcome not in _OUTCOMES:
        raise ValueError(f"outcome must be one of {sorted(_OUTCOMES)}, got {outcome!r}")
    df = _check_table(summary, ["step", "layer", "td_mean", "td_sd", "chance", outcome], "summary")
    df = df.sort_values("step")
    steps = df["step"].to_numpy()
    fig = _Figure(figsize=(10, 3.8), layout="constrained")
    ax_td, ax_out = fig.subplots(1, 2, sharex=True)
    td, sd = df["td_mean"].to_numpy(), df["td_sd"].to_numpy()
    ax_td.plot(steps, td, marker="o", color="C0", label="mean TD over tasks")
    ax_td.fill_between(steps, td - sd, td + sd, color="C0", alpha=0.2, lw=0, label="s.d. over tasks")
    _draw_chance(ax_td, df["chance"])
    ax_td.set_ylim(*_TD_LIMITS)
    layers = df["layer"].unique()
    ax_td.set_ylabel(f"TD at layer {layers[0]}" if len(layers) == 1 else "TD at each step's peak layer (numbers: layer)")
    ax_td.legend(fontsize=8, loc="upper left")
    label, scale = _OUTCOMES[outcome]
    val = df[outcome].to_numpy()
    ax_out.plot(steps, val, marker="s", color="C1", label="mean over tasks")
    if f"{outcome}_sd" in df:
        osd = df[f"{outcome}_sd"].to_numpy()
        lo = np.maximum(val - osd, val * 0.5) if scale == "log" else val - osd
        ax_out.fill_between(steps, lo, val + osd, color="C1", alpha=0.2, lw=0, label="s.d. over tasks")
    ax_out.set_yscale(scale)
    if scale == "linear":
        ax_out.set_ylim(-0.03, 1.03)
    ax_out.set_ylabel(label)
    ax_out.legend(fontsize=8, loc="best")
    for ax in (ax_td, ax_out):
        _step_axis(ax, steps)
        ax.grid(alpha=0.3)
    if len(layers) > 1:  # the peak layer of each step, under the TD points
        for x, y, layer in zip(steps, td, df["layer"], strict=True):
            ax_td.annotate(str(layer), (x, y), textcoords="offset points", xytext=(0, -11), ha="center", fontsize=6,
                           color="0.35")
    fig.suptitle(title or "Task decodability and " + ("ICL accuracy" if outcome == "accuracy" else "test loss")
                 + " over training")
    return _finish(fig, path)



def trajectory_figures(result: TrajectoryResult, out: str | Path, title: str | None = None) -> list[Path]:
    """Fig. 5-like mean TD and accuracy (or the synthetic model's MSE) against the step, and the overall TD
    as a layer x checkpoint heatmap."""
    out = Path(out) / "figures"
    paths = [out / "trajectory.png", out / "td_heatmap.png"]
    plot_trajectory(result.summary, outcome=result.outcome, path=paths[0], title=title)
    plot_td_heatmap_steps(result.td, path=paths[1])
    return paths
