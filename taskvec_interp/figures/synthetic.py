"""Figures of the synthetic experiment (emergence over training checkpoints), the UMAP views of one layer's
representations that the language-model sweep uses too, and :func:`synthetic_figures` (an analysis' set).

The embeddings themselves come from :func:`taskvec_interp.probes.embedding.umap_embedding`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..probes.decodability import encode_labels
from ..probes.embedding import _as_points, umap_embedding
from ._common import _TD_LIMITS, _check_table, _class_colors, _Figure, _finish, _root_figure, _task_colors
from .heads import plot_head_ablation
from .patching import plot_patching

if TYPE_CHECKING:
    from ..synthetic.analysis import AnalysisResult

__all__ = ["plot_basis_emergence", "plot_td_heatmap_steps", "plot_umap", "plot_umap_grid", "synthetic_figures"]


# ---- UMAP ------------------------------------------------------------------------------------------------
def _names_per_point(
    labels: Any, label_names: Sequence[str] | None, n: int, what: str = "acts"
) -> tuple[list[str], tuple[str, ...]]:
    """Each point's class name, and the class names in order (``label_names`` order, else sorted)."""
    codes, names = encode_labels(labels, label_names)
    if len(codes) != n:
        raise ValueError(f"labels has {len(codes)} entries but {what} has {n} points")
    return [names[c] for c in codes.tolist()], names


def _scatter_classes(ax: Axes, emb: np.ndarray, point_names: Sequence[str], colors: Mapping[str, Any],
                     order: Sequence[str], size: float) -> None:
    point_names = np.asarray(point_names, dtype=object)
    for name in order:
        mask = point_names == name
        if mask.any():
            ax.scatter(emb[mask, 0], emb[mask, 1], s=size, color=[colors[name]], label=name, alpha=0.8,
                       edgecolors="none")
    ax.set_xticks([])
    ax.set_yticks([])


def _legend_colors(order: Sequence[str]) -> dict[str, Any]:
    return dict(zip(order, _class_colors(len(order)), strict=True))


def plot_umap(
    acts: Any,
    labels: Sequence[str] | Sequence[int] | Any,
    label_names: Sequence[str] | None = None,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    path: str | Path | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """UMAP of one layer's representations ``[n, d]``, coloured by task, with a legend.

    ``labels``: one string or integer per point; integers index ``label_names`` when given. Classes
    are ordered as ``label_names`` (else sorted) and each is one scatter collection.
    """
    x = _as_points(acts)
    point_names, order = _names_per_point(labels, label_names, x.shape[0])
    emb = umap_embedding(x, seed=seed, n_neighbors=n_neighbors, min_dist=min_dist)
    if ax is None:
        fig = _Figure(figsize=(6.0, 5.0), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = _root_figure(ax)
    size = float(np.clip(2000 / len(emb), 4, 30))
    _scatter_classes(ax, emb, point_names, _legend_colors(order), order, size)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, markerscale=1.5)
    ax.set_title(title if title is not None else f"UMAP (n = {len(emb)}, n_neighbors = {min(n_neighbors, len(emb) - 1)})")
    return _finish(fig, path)


def _class_sort_key(name: str) -> tuple[int, Any]:
    try:
        return (0, int(name))
    except ValueError:
        return (1, name)


def plot_umap_grid(
    embeddings: Mapping[tuple[Hashable, Hashable], tuple[Any, Any]],
    path: str | Path | None = None,
    row_label: str = "layer",
    col_label: str = "checkpoint",
    label_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Lay out precomputed 2-D embeddings in a grid: ``{(row_key, col_key): (emb [n, 2], labels)}``.

    Rows and columns follow the first appearance of their keys in ``embeddings`` (insert them in the
    order you want); cells without an entry are left blank. Classes get the same colour in every
    panel and one shared legend. Rows are labelled ``f"{row_label} {row_key}"``, columns
    ``f"{col_label} {col_key}"``. The figure has one axes per grid cell.
    """
    if not isinstance(embeddings, Mapping):
        raise ValueError(f"embeddings must be a dict {{(row, col): (emb, labels)}}, got {type(embeddings).__name__}")
    if len(embeddings) == 0:
        raise ValueError("embeddings is empty")
    rows: list[Hashable] = []
    cols: list[Hashable] = []
    cells: dict[tuple[Hashable, Hashable], tuple[np.ndarray, list[str]]] = {}
    classes: set[str] = set()
    for key, value in embeddings.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"embeddings keys must be (row_key, col_key) pairs, got {key!r}")
        if not (isinstance(value, tuple | list) and len(value) == 2):
            raise ValueError(f"embeddings[{key!r}] must be (embedding [n, 2], labels)")
        emb = _as_points(value[0])
        if emb.shape[1] != 2:
            raise ValueError(f"embeddings[{key!r}] must be [n, 2], got shape {tuple(emb.shape)}")
        names, _ = _names_per_point(value[1], label_names, emb.shape[0], f"embedding {key!r}")
        cells[key] = (emb, names)
        classes.update(names)
        if key[0] not in rows:
            rows.append(key[0])
        if key[1] not in cols:
            cols.append(key[1])
    order = [str(x) for x in label_names] if label_names is not None else sorted(classes, key=_class_sort_key)
    colors = _legend_colors(order)
    fig = _Figure(figsize=(2.8 * len(cols) + 1.5, 2.6 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            a = axes[i, j]
            if (r, c) in cells:
                emb, names = cells[(r, c)]
                _scatter_classes(a, emb, names, colors, order, float(np.clip(1000 / len(emb), 3, 20)))
            else:
                a.set_xticks([])
                a.set_yticks([])
                for spine in a.spines.values():
                    spine.set_visible(False)
            if i == 0:
                a.set_title(f"{col_label} {c}", fontsize="medium")
            if j == 0:
                a.set_ylabel(f"{row_label} {r}")
    handles = [Line2D([], [], ls="", marker="o", color=colors[name], label=name) for name in order
               if name in classes]
    fig.legend(handles=handles, loc="outside right center", fontsize="small", frameon=False)
    if title is not None:
        fig.suptitle(title)
    return _finish(fig, path)


# ---- Synthetic experiment: emergence over training checkpoints -------------------------------------------
def plot_basis_emergence(loss: pd.DataFrame, td: pd.DataFrame, layer: int, path: str | Path | None = None,
                         title: str | None = None) -> Figure:
    """Per-basis test MSE over training (left axis, log) with per-basis TD at ``layer`` (right axis).

    ``loss``: step, basis, mse. ``td``: the analysis TD table (step, layer, level, task, td, ...).
    The paper's Fig. 2: each basis' loss drop coincides with its TD rise.
    """
    _check_table(loss, ["step", "basis", "mse"], "loss table")
    _check_table(td, ["step", "layer", "level", "task", "td"], "TD table")
    at = td[(td["layer"] == layer) & (td["level"] == "task")]
    if at.empty:
        raise ValueError(f"layer {layer} is not in the TD table (layers: {sorted(td['layer'].unique())})")
    bases = list(dict.fromkeys(loss["basis"]))
    colors = _task_colors(bases)
    fig = _Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    ax2 = ax.twinx()
    for b in bases:
        lb = loss[loss["basis"] == b].sort_values("step")
        ax.plot(lb["step"], lb["mse"], color=colors[b], label=f"{b} loss")
        tb = at[at["task"] == b].sort_values("step")
        ax2.plot(tb["step"], tb["td"], color=colors[b], ls="--", marker=".", label=f"{b} TD")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("test MSE (solid)")
    ax2.set_ylabel(f"TD at layer {layer} (dashed)")
    ax2.set_ylim(*_TD_LIMITS)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, ncol=2, loc="center right")
    ax.set_title(title or f"Per-basis loss and task decodability (layer {layer})")
    return _finish(fig, path)


def plot_td_heatmap_steps(td: pd.DataFrame, path: str | Path | None = None, title: str | None = None) -> Figure:
    """Overall TD as a layer x checkpoint heatmap (checkpoints in order, labelled by step)."""
    _check_table(td, ["step", "layer", "level", "td"], "TD table")
    grid = td[td["level"] == "overall"].pivot_table(index="layer", columns="step", values="td")
    if grid.empty:
        raise ValueError("the TD table has no overall rows")
    fig = _Figure(figsize=(max(5.0, 0.35 * grid.shape[1] + 2), 0.35 * grid.shape[0] + 1.8), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(grid.to_numpy(), aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
    ax.set_yticks(range(grid.shape[0]), [str(v) for v in grid.index])
    steps = list(grid.columns)
    ticks = sorted(set(np.linspace(0, len(steps) - 1, min(len(steps), 10)).round().astype(int)))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks], rotation=45, ha="right")
    ax.set_xlabel("checkpoint (step)")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="TD")
    ax.set_title(title or "Task decodability over training")
    return _finish(fig, path)



# ---- An analysis' figure set -----------------------------------------------------------------------------
def synthetic_figures(result: AnalysisResult, out: str | Path) -> list[Path]:
    """Fig. 2 (per-basis loss + TD), Fig. 11 (UMAP grid layers x checkpoints), TD heatmap, Fig. 7 (patching),
    Figs. 17-18 (head ablation: layer x head per basis)."""
    out = Path(out) / "figures"
    layer = result.summary["td_layer"]
    paths = [out / "loss_and_td.png", out / "td_heatmap.png"]
    plot_basis_emergence(result.loss, result.td, layer, path=paths[0])
    plot_td_heatmap_steps(result.td, path=paths[1])
    if result.embeddings:
        paths.append(out / "umap_grid.png")
        n_bases = len(result.summary["bases"])
        plot_umap_grid(result.embeddings, path=paths[-1], row_label="layer", col_label="step",
                       label_names=[f"B{j + 1}" for j in range(n_bases)])  # the analysis' basis names
    if not result.patching.empty:
        paths.append(out / "patching.png")
        plot_patching(result.patching, path=paths[-1])
    if result.heads is not None and not result.heads.empty:
        paths.append(out / "head_ablation.png")
        plot_head_ablation(result.heads, path=paths[-1])
    return paths
