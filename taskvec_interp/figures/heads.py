"""Attention-head figures: the synthetic model's per-basis head ablation (paper Figs. 17-18) and, on language
models (Todd et al.'s function vectors beside the paper's TD), the average indirect effect (AIE) of every head
as a layer x head heatmap, per-head task decodability on the same grid, the two against each other, and the
function vector's zero-shot accuracy gain by layer beside the task vectors'.

Tables come from :mod:`taskvec_interp.synthetic.heads`, :mod:`taskvec_interp.experiments.heads` (``aie``,
``head_td``) and :mod:`taskvec_interp.experiments.function_vectors` (``accuracy``); result types are imported
for typing only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._common import _check_table, _Figure, _finish, _grid

if TYPE_CHECKING:
    from ..experiments.function_vectors import FVResult
    from ..experiments.heads import HeadsResult

__all__ = ["fv_figures", "heads_figures", "plot_aie_heatmap", "plot_fv_gain", "plot_head_ablation", "plot_head_td",
           "plot_td_vs_aie"]

def plot_head_ablation(table: pd.DataFrame, path: str | Path | None = None, mode: str | None = None,
                       value: str = "delta", title: str | None = None) -> Figure:
    """One layer x head heatmap per basis of the MSE change when that head is ablated
    (:func:`taskvec_interp.synthetic.heads.head_ablation`'s table), all panels on one colour scale
    centred at 0 (red: ablation hurts). ``mode``: which ablation (default: ``"mean"`` if present, else the
    first in the table); ``value``: ``"delta"`` (every prediction) or ``"delta_last"`` (the last one)."""
    tab = _check_table(table, ["layer", "head", "mode", "basis", value], "head-ablation")
    modes = list(dict.fromkeys(tab["mode"]))
    mode = mode if mode is not None else ("mean" if "mean" in modes else modes[0])
    part = tab[tab["mode"] == mode]
    if part.empty:
        raise ValueError(f"no {mode!r} ablations in the table (modes: {modes})")
    bases = list(dict.fromkeys(part["basis"]))
    layers = sorted(set(part["layer"]))
    heads = sorted(set(part["head"]))
    fig, axes = _grid(len(bases), (0.45 * len(heads) + 2.2, 0.32 * len(layers) + 1.6), max_cols=4)
    lim = max(float(np.nanmax(np.abs(part[value].to_numpy(dtype=float)))), 1e-6)
    im = None
    for ax, basis in zip(axes, bases, strict=True):
        grid = part[part["basis"] == basis].pivot_table(index="layer", columns="head", values=value)
        grid = grid.reindex(index=layers, columns=heads)
        im = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", origin="lower",
                       interpolation="nearest")
        ax.set_xticks(range(len(heads)), [int(h) for h in heads])
        step = max(1, math.ceil(len(layers) / 16))
        ax.set_yticks(range(0, len(layers), step), [int(v) for v in layers[::step]])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"basis {basis}", fontsize=9)
    what = "MSE" if value == "delta" else "last-prediction MSE"
    fig.colorbar(im, ax=axes, label=f"{what} change ({mode}-ablated - unablated)", shrink=0.9)
    fig.suptitle(title or f"{mode}-ablation of each attention head", fontsize=10)
    return _finish(fig, path)


_VECTOR_COLORS = {"function": "tab:blue", "paper": "tab:green", "hendel": "tab:orange"}


def _grid_of(table: pd.DataFrame, value: str) -> tuple[np.ndarray, list[int], list[int]]:
    layers = sorted(int(x) for x in table["layer"].unique())
    heads = sorted(int(x) for x in table["head"].unique())
    grid = table.pivot_table(index="layer", columns="head", values=value).reindex(index=layers, columns=heads)
    return grid.to_numpy(dtype=float), layers, heads


def _heatmap(ax: Axes, grid: np.ndarray, layers: list[int], heads: list[int], **kw) -> object:
    im = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", **kw)
    ax.set_xticks(range(len(heads)), heads, fontsize=7)
    step = max(1, math.ceil(len(layers) / 16))
    ax.set_yticks(range(0, len(layers), step), layers[::step], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    return im


def _mark(ax: Axes, top: Sequence[tuple[int, int]], layers: list[int], heads: list[int]) -> None:
    for rank, (layer, head) in enumerate(top, 1):
        if layer in layers and head in heads:
            ax.text(heads.index(head), layers.index(layer), str(rank), ha="center", va="center", fontsize=6,
                    color="black", fontweight="bold")


def _task_rows(table: pd.DataFrame, task: str, name: str) -> pd.DataFrame:
    part = table[table["task"] == task]
    if part.empty:
        raise ValueError(f"the {name} table has no rows for task {task!r} (tasks: {list(dict.fromkeys(table['task']))})")
    return part


def plot_aie_heatmap(aie: pd.DataFrame, path: str | Path | None = None, task: str = "all", value: str = "aie",
                     top: int = 10, title: str | None = None) -> Figure:
    """Layer x head heatmap of the average indirect effect (``task="all"``: the mean over tasks), centred at 0 (red:
    patching the head's task mean raises the answer's probability); the ``top`` heads are numbered by rank."""
    part = _task_rows(_check_table(aie, ["layer", "head", "task", value], "AIE"), task, "AIE")
    grid, layers, heads = _grid_of(part, value)
    lim = max(float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 0.0, 1e-9)
    fig = _Figure(figsize=(0.32 * len(heads) + 2.6, 0.16 * len(layers) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    im = _heatmap(ax, grid, layers, heads, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ranked = part.sort_values(value, ascending=False, kind="stable").head(top)
    _mark(ax, [(int(r.layer), int(r.head)) for r in ranked.itertuples()], layers, heads)
    fig.colorbar(im, ax=ax, label="AIE (change in P(answer))" if value == "aie" else value, shrink=0.9)
    ax.set_title(title or f"average indirect effect of each head ({'mean over tasks' if task == 'all' else task})",
                 fontsize=9)
    return _finish(fig, path)


def plot_head_td(head_td: pd.DataFrame, path: str | Path | None = None, task: str = "all",
                 title: str | None = None) -> Figure:
    """Layer x head heatmap of per-head task decodability (TD of each head's ``z`` at the last token), 0..1, chance
    in the title."""
    part = _task_rows(_check_table(head_td, ["layer", "head", "task", "td"], "per-head TD"), task, "per-head TD")
    grid, layers, heads = _grid_of(part, "td")
    fig = _Figure(figsize=(0.32 * len(heads) + 2.6, 0.16 * len(layers) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    im = _heatmap(ax, grid, layers, heads, cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, label="task decodability", shrink=0.9)
    chance = f" (chance {float(part['chance'].iloc[0]):.2f})" if "chance" in part else ""
    ax.set_title(title or f"per-head task decodability{chance}", fontsize=9)
    return _finish(fig, path)


def plot_td_vs_aie(aie: pd.DataFrame, head_td: pd.DataFrame, path: str | Path | None = None, top: int = 10,
                   title: str | None = None) -> Figure:
    """Each head's TD against its AIE (both over tasks): are the heads with a causal effect the heads where the task
    is decodable? The ``top`` heads by AIE are labelled ``layer.head``."""
    a = _task_rows(_check_table(aie, ["layer", "head", "task", "aie"], "AIE"), "all", "AIE")
    t = _task_rows(_check_table(head_td, ["layer", "head", "task", "td"], "per-head TD"), "all", "per-head TD")
    both = a[["layer", "head", "aie"]].merge(t[["layer", "head", "td"]], on=["layer", "head"])
    if both.empty:
        raise ValueError("the AIE and per-head TD tables share no head")
    fig = _Figure(figsize=(5.0, 3.8), layout="constrained")
    ax = fig.add_subplot()
    sc = ax.scatter(both["td"], both["aie"], c=both["layer"], cmap="viridis", s=14, alpha=0.8)
    for r in both.nlargest(top, "aie").itertuples():
        ax.annotate(f"{int(r.layer)}.{int(r.head)}", (r.td, r.aie), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    if "chance" in t:
        ax.axvline(float(t["chance"].iloc[0]), ls="--", lw=1, color="0.4", label="chance TD")
        ax.legend(fontsize=7, loc="upper left")
    ax.axhline(0, lw=0.8, color="0.6")
    fig.colorbar(sc, ax=ax, label="layer", shrink=0.9)
    ax.set_xlabel("per-head TD")
    ax.set_ylabel("AIE")
    ax.set_title(title or "causal effect vs task decodability, per head", fontsize=9)
    return _finish(fig, path)


def plot_fv_gain(accuracy: pd.DataFrame, path: str | Path | None = None, task: str = "all", setting: str = "zero_shot",
                 title: str | None = None) -> Figure:
    """Accuracy gain over the baseline (with its paired bootstrap CI band) by the layer each vector is injected at:
    the function vector and, where present, the paper's and Hendel et al.'s task vectors."""
    acc = _check_table(accuracy, ["setting", "vector", "layer", "task", "accuracy", "delta"], "FV accuracy")
    part = acc[(acc["setting"] == setting) & (acc["task"] == task)]
    if part.empty:
        raise ValueError(f"no {setting!r} rows for task {task!r} in the FV accuracy table")
    base = part[part["vector"] == "none"]
    fig = _Figure(figsize=(5.6, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for vec in [v for v in dict.fromkeys(part["vector"]) if v != "none"]:
        rows = part[part["vector"] == vec].sort_values("layer")
        color = _VECTOR_COLORS.get(vec)
        ax.plot(rows["layer"], rows["delta"], marker="o", ms=3, label=f"{vec} ({rows['mode'].iloc[0]})"
                if "mode" in rows else vec, color=color)
        if {"delta_low", "delta_high"} <= set(rows.columns) and rows["delta_low"].notna().any():
            ax.fill_between(rows["layer"], rows["delta_low"], rows["delta_high"], alpha=0.2, color=color)
    ax.axhline(0, lw=0.8, color="0.5")
    ax.set_xlabel("layer the vector is injected at")
    ax.set_ylabel("accuracy gain over baseline")
    if len(base):
        ax.set_title(title or f"{setting.replace('_', '-')} accuracy gain ({'pooled tasks' if task == 'all' else task}; "
                              f"baseline {float(base['accuracy'].iloc[0]):.2f})", fontsize=9)
    ax.legend(fontsize=7)
    return _finish(fig, path)


def heads_figures(result: HeadsResult, out: str | Path) -> list[Path]:
    """A head analysis' figures under ``out/figures/``: the AIE heatmap, the per-head TD map, TD vs AIE."""
    d = Path(out) / "figures"
    k = result.config.top_k
    paths = [d / "aie_heatmap.png", d / "head_td.png", d / "td_vs_aie.png"]
    plot_aie_heatmap(result.aie, paths[0], top=k)
    plot_head_td(result.head_td, paths[1])
    plot_td_vs_aie(result.aie, result.head_td, paths[2], top=k)
    return paths


def fv_figures(result: FVResult, out: str | Path) -> list[Path]:
    """A function-vector run's figures under ``out/figures/``: the zero-shot gain by layer (pooled tasks)."""
    d = Path(out) / "figures"
    paths = []
    if (result.accuracy["setting"] == "zero_shot").any():
        paths.append(d / "fv_gain_by_layer.png")
        plot_fv_gain(result.accuracy, paths[-1])
    return paths
