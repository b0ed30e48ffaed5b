"""Layer-subset fine-tuning figures (paper Fig. 24, Table 1), and :func:`finetune_figures` (a run's set)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ._common import _TD_LIMITS, _check_table, _class_colors, _finish, _grid

__all__ = ["finetune_figures", "plot_finetune_accuracy", "plot_finetune_td"]


def plot_finetune_accuracy(per_task: pd.DataFrame, path: str | Path | None = None, title: str | None = None) -> Figure:
    """Per-task exact-match accuracy of each model (pretrained, first-k, last-k, ...), grouped bars."""
    df = _check_table(per_task, ["model", "task", "exact"], "fine-tuning per-task table")
    models = list(dict.fromkeys(df["model"]))
    tasks = list(dict.fromkeys(df["task"]))
    fig, (ax,) = _grid(1, (max(5.0, 1.1 * len(tasks) + 1.5), 3.6))
    width = 0.8 / len(models)
    colors = _class_colors(len(models))
    for j, model in enumerate(models):
        part = df[df["model"] == model].set_index("task").reindex(tasks)
        ax.bar(np.arange(len(tasks)) + (j - (len(models) - 1) / 2) * width, part["exact"], width, label=model,
               color=colors[j])
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact-match accuracy")
    ax.legend(fontsize=8, ncols=min(len(models), 3), loc="upper right")
    if title:
        ax.set_title(title, fontsize=10)
    return _finish(fig, path)


def plot_finetune_td(td: pd.DataFrame, path: str | Path | None = None, title: str | None = None) -> Figure:
    """Overall TD by layer for each model: does fine-tuning move the task encoding?"""
    df = _check_table(td, ["model", "layer", "td"], "fine-tuning TD table")
    fig, (ax,) = _grid(1, (5.5, 3.6))
    colors = _class_colors(df["model"].nunique())
    for j, (model, part) in enumerate(df.groupby("model", sort=False)):
        part = part.sort_values("layer")
        style = {"color": "k", "ls": "--", "zorder": 3} if model == "pretrained" else {"color": colors[j]}
        ax.plot(part["layer"], part["td"], marker="o", ms=3, label=model, **style)  # pretrained on top: shared
        # layers below a last-k subset are identical to it
    ax.set_xlabel("layer")
    ax.set_ylabel("task decodability")
    ax.set_ylim(*_TD_LIMITS)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _finish(fig, path)



def finetune_figures(per_task: pd.DataFrame, td: pd.DataFrame, out: str | Path, title: str | None = None) -> list[Path]:
    """Per-task accuracy bars of every model (Fig. 24-like) and TD by layer before / after."""
    out = Path(out) / "figures"
    paths = [out / "accuracy_per_task.png", out / "td_by_layer.png"]
    plot_finetune_accuracy(per_task, path=paths[0], title=title)
    plot_finetune_td(td, path=paths[1], title=title)
    return paths
