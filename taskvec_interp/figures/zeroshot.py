"""Zero-shot task vectors (Hendel et al.'s protocol): accuracy by the layer the vector replaces the zero-shot
prompt's last state at, beside the zero-shot baseline and in-context learning, the chosen layer marked."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._common import _check_table, _Figure, _finish, _grid

if TYPE_CHECKING:  # pragma: no cover
    from ..experiments.zeroshot import ZeroShotResult

__all__ = ["plot_zero_shot_curve", "plot_zero_shot_tasks", "zero_shot_figures"]

_STYLE = {"per_query": ("tab:orange", "per-query task vector"), "per_task": ("tab:blue", "per-task mean vector")}
_COLUMNS = ["split", "task", "condition", "vector", "layer", "accuracy"]


def _draw(ax: Axes, curve: pd.DataFrame, task: str, split: str, chosen: Mapping[str, int] | None,
          legend: bool) -> None:
    part = curve[(curve["task"] == task) & (curve["split"] == split)]
    if part.empty:
        raise ValueError(f"no {split!r} rows for task {task!r} in the zero-shot curve")
    for vector, (color, label) in _STYLE.items():
        rows = part[(part["condition"] == "task_vector") & (part["vector"] == vector)].sort_values("layer")
        if rows.empty:
            continue
        ax.plot(rows["layer"], rows["accuracy"], marker="o", ms=3, lw=1.4, color=color, label=label)
        if chosen and vector in chosen:
            layer = chosen[vector]
            at = rows[rows["layer"] == layer]
            ax.axvline(layer, color=color, ls=":", lw=1)
            if len(at):
                ax.plot([layer], [float(at["accuracy"].iloc[0])], marker="*", ms=11, color=color, zorder=5,
                        label=f"chosen on dev: layer {layer}")
    for cond, color, label in (("icl", "tab:green", "ICL (demonstrations)"), ("baseline", "0.35", "zero-shot baseline")):
        rows = part[part["condition"] == cond]
        if len(rows):
            ax.axhline(float(rows["accuracy"].iloc[0]), color=color, ls="--", lw=1.2,
                       label=f"{label} {float(rows['accuracy'].iloc[0]):.2f}")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("layer of the replaced state")
    ax.set_ylabel("accuracy")
    if legend:
        ax.legend(fontsize=7, loc="upper left")


def plot_zero_shot_curve(curve: pd.DataFrame, path: str | Path | None = None, *, task: str = "all",
                         split: str = "test", chosen: Mapping[str, int] | None = None, metric: str = "",
                         title: str | None = None) -> Figure:
    """Accuracy by layer on ``split`` (``task == "all"``: pooled over tasks) of each task vector, beside the
    zero-shot baseline and ICL (horizontal lines); ``chosen``: the layer chosen on the dev split per vector (a
    dotted line and a star). ``curve``: :meth:`ZeroShotResult.curve`."""
    c = _check_table(curve, _COLUMNS, "zero-shot curve")
    fig = _Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.add_subplot()
    _draw(ax, c, task, split, chosen, legend=True)
    what = "pooled over tasks" if task == "all" else task
    ax.set_title(title or f"zero-shot task vectors, {split} split, {what}{f' ({metric})' if metric else ''}",
                 fontsize=9)
    return _finish(fig, path)


def plot_zero_shot_tasks(curve: pd.DataFrame, path: str | Path | None = None, *, split: str = "test",
                         task_layers: Mapping[str, Mapping[str, int]] | None = None) -> Figure:
    """One panel per task (the pooled curve's content per task), each task vector's reported layer marked."""
    c = _check_table(curve, _COLUMNS, "zero-shot curve")
    tasks = [t for t in dict.fromkeys(c["task"]) if t != "all"]
    if not tasks:
        raise ValueError("the zero-shot curve has no per-task rows")
    fig, axes = _grid(len(tasks), (3.6, 2.6), max_cols=3)
    for i, (ax, task) in enumerate(zip(axes, tasks, strict=False)):
        chosen = {v: layers[task] for v, layers in (task_layers or {}).items() if task in layers}
        _draw(ax, c, task, split, chosen, legend=i == 0)
        ax.set_title(task, fontsize=9)
    return _finish(fig, path)


def zero_shot_figures(result: ZeroShotResult, out: str | Path) -> list[Path]:
    """A zero-shot run's figures under ``out/figures/``: the pooled test curve (chosen layers marked) and one panel
    per task."""
    d = Path(out) / "figures"
    curve = result.curve()
    paths = [d / "zero_shot_by_layer.png", d / "zero_shot_by_layer_tasks.png"]
    plot_zero_shot_curve(curve, paths[0], chosen=result.chosen_layer, metric=result.config.scoring)
    plot_zero_shot_tasks(curve, paths[1], task_layers=result.task_layers)
    return paths
