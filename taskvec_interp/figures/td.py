"""Task-decodability figures from the sweep's tidy tables (as :mod:`taskvec_interp.experiments.sweep` writes them),
and :func:`sweep_figures` (a sweep's set). Input tables:

* **TD table** (:meth:`TaskDecodability.to_frame` plus ``shots`` and ``family``): ``layer``, ``level``
  ("overall" or "task"), ``task`` ("all" on overall rows), ``td``, ``ci_low``, ``ci_high`` (may be NaN),
  ``n``, ``k``, ``metric``, ``chance``, ``shots``, optional ``family``. ``shots`` may be absent (one
  un-named series) and ``ci_low``/``ci_high``/``chance`` are drawn only where present.
* **Accuracy table**: ``task``, ``shots``, ``n``, ``exact``, ``first_token``, optional ``family``.
* **Fit dict** (:func:`~taskvec_interp.experiments.sweep.fit_td_accuracy`): ``layer``, ``r2``, ``slope``,
  ``intercept`` (``exact = intercept + slope * td``), ``n_points``, optional ``family``.
A peak is the highest TD over layers, the earliest on ties (:attr:`TaskDecodability.peak_layer`), NaN ignored.
Every figure here reads only the k-shot rows (``context == "demos"``) of a TD table with controls; the controls
are drawn by :func:`~taskvec_interp.figures.td_context.plot_td_context`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..tasks.base import NULL_TASK
from ._common import (
    _DEMOS,
    _NO_SHOTS,
    _SHOT_MARKERS,
    _TD_LIMITS,
    _check_table,
    _ci_band,
    _draw_chance,
    _families,
    _Figure,
    _finish,
    _finite,
    _grid,
    _k_shot,
    _of_family,
    _overall,
    _peak,
    _pick_layer,
    _pick_shots,
    _prepare_td,
    _root_figure,
    _shot_colors,
    _shot_label,
    _task_colors,
    _td_by_layer_axes,
)
from .synthetic import plot_umap
from .td_context import plot_td_context

if TYPE_CHECKING:
    from ..experiments.sweep import SweepResult

__all__ = ["plot_task_td", "plot_task_td_heatmap", "plot_td_by_layer", "plot_td_context", "plot_td_vs_accuracy",
           "sweep_figures", "td_peaks"]

# ---- TD over layers --------------------------------------------------------------------------------------
def td_peaks(td: pd.DataFrame) -> pd.DataFrame:
    """Peak of the overall TD per (family, shots): columns ``[family], [shots], layer, td, [chance]``.

    ``family``, ``shots`` and ``chance`` appear when the TD table has them. The peak is the highest
    TD, the earliest layer on ties; a series with only NaN TDs is left out.
    """
    td = _k_shot(_check_table(td, ("layer", "level", "td"), "TD"))
    overall = _overall(td, "td_peaks")
    keys = [c for c in ("family", "shots") if c in overall.columns]
    rows = []
    groups = overall.groupby(keys, sort=False) if keys else [((), overall)]
    for key, part in groups:
        part = part.sort_values("layer", kind="stable")
        peak = _peak(part["layer"].to_numpy(), part["td"].to_numpy())
        if peak is None:
            continue
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key, strict=True)) | {"layer": peak[0], "td": peak[1]}
        if "chance" in part.columns:
            row["chance"] = float(part["chance"].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows, columns=[*keys, "layer", "td", *(["chance"] if "chance" in overall else [])])


def plot_td_by_layer(
    td: pd.DataFrame,
    path: str | Path | None = None,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Overall TD against layer: one line per shot count, CI band, dashed chance line, peaks starred.

    Each panel holds one ``Line2D`` per shot count plus one per distinct chance level (normally
    one); the peaks are scatter markers (stars) labelled ``L<layer>``. A table with several
    families gets one panel per family (then ``ax`` cannot be given).
    """
    td = _k_shot(_prepare_td(td, ("layer", "level", "td")))
    overall = _overall(td, "plot_td_by_layer")
    families = _families(overall)
    if ax is not None and len(families) > 1:
        raise ValueError(f"the TD table has {len(families)} families {families}: pass ax=None to get one panel each")
    if ax is None:
        fig, axes = _grid(len(families), (6.4, 4.2))
    else:
        fig, axes = _root_figure(ax), [ax]
    all_shots = sorted(pd.unique(overall["shots"]))
    colors = _shot_colors(all_shots)
    has_ci = {"ci_low", "ci_high"} <= set(overall.columns)
    for family, a in zip(families, axes, strict=True):
        part = _of_family(overall, family)
        for shots in sorted(pd.unique(part["shots"])):
            s = part[part["shots"] == shots].sort_values("layer", kind="stable")
            x = s["layer"].to_numpy()
            y = s["td"].to_numpy(dtype=float)
            color = colors[shots]
            a.plot(x, y, marker="o", ms=3, lw=1.6, color=color, label=_shot_label(shots), zorder=3)
            if has_ci:
                _ci_band(a, s, x, color, 0.18)
            peak = _peak(x, y)
            if peak is not None:
                a.scatter([peak[0]], [peak[1]], marker="*", s=140, color=[color], edgecolors="k",
                          linewidths=0.6, zorder=4)
                a.annotate(f"L{peak[0]}", peak, xytext=(0, 7), textcoords="offset points", ha="center",
                           fontsize=8, color=color)
        _td_by_layer_axes(a, part)
        if len(families) > 1:
            a.set_title(str(family))
        else:
            default = "Task decodability by layer" + (f" ({family})" if family is not None else "")
            a.set_title(title if title is not None else default)
    if len(families) > 1:
        fig.suptitle(title if title is not None else "Task decodability by layer")
    return _finish(fig, path)


def plot_task_td(
    td: pd.DataFrame,
    layer: int | None = None,
    shots: int | None = None,
    path: str | Path | None = None,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Per-task TD at one layer as bars with bootstrap-CI error bars and the dashed chance line.

    ``shots`` defaults to the largest shot count; ``layer`` to the peak layer of the overall TD at
    that shot count. Bars follow the table's task order; the Null task is grey. A table with several
    families gets one panel per family (each with its own default layer).
    """
    td = _k_shot(_prepare_td(td, ("layer", "level", "task", "td")))
    tasks_all = td[td["level"] == "task"]
    if len(tasks_all) == 0:
        raise ValueError("TD table has no per-task rows (level == 'task')")
    families = _families(td)
    if ax is not None and len(families) > 1:
        raise ValueError(f"the TD table has {len(families)} families {families}: pass ax=None to get one panel each")
    picks = []
    for family in families:
        part = _of_family(td, family)
        s = _pick_shots(part, shots, family)
        picks.append((family, s, _pick_layer(part[part["shots"] == s], layer, s, family)))
    if ax is None:
        n_tasks = max(len(pd.unique(_of_family(tasks_all, f)["task"])) for f in families)
        fig, axes = _grid(len(families), (max(4.0, 0.45 * n_tasks + 1.5), 4.0), max_cols=2)
    else:
        fig, axes = _root_figure(ax), [ax]
    for (family, s, lay), a in zip(picks, axes, strict=True):
        part = _of_family(td, family)
        part = part[(part["shots"] == s) & (part["layer"] == lay)]
        rows = part[part["level"] == "task"]
        if len(rows) == 0:
            raise ValueError(f"no per-task rows at layer {lay}, {_shot_label(s)}" +
                             (f" for family {family!r}" if family is not None else ""))
        if rows["task"].duplicated().any():
            raise ValueError(f"duplicate per-task rows at layer {lay}, {_shot_label(s)}: "
                             "tables from several families need a 'family' column")
        tasks = [str(t) for t in rows["task"]]
        y = rows["td"].to_numpy(dtype=float)
        colors = _task_colors(list(pd.unique(_of_family(tasks_all, family)["task"].astype(str))))
        yerr = None
        if {"ci_low", "ci_high"} <= set(rows.columns):
            lo = np.clip(y - rows["ci_low"].to_numpy(dtype=float), 0, None)
            hi = np.clip(rows["ci_high"].to_numpy(dtype=float) - y, 0, None)
            if (np.isfinite(lo) & np.isfinite(hi)).any():
                yerr = np.vstack([lo, hi])
        x = np.arange(len(tasks))
        a.bar(x, y, yerr=yerr, color=[colors[t] for t in tasks], edgecolor="k", linewidth=0.5,
              capsize=3, error_kw={"elinewidth": 1, "ecolor": "0.2"}, zorder=3)
        if "chance" in part.columns:
            _draw_chance(a, part["chance"])
            a.legend(fontsize="small", loc="best", framealpha=0.9)
        a.set_xticks(x, tasks, rotation=45 if len(tasks) > 4 else 0, ha="right" if len(tasks) > 4 else "center")
        a.set_ylim(0, 1.05)
        a.set_ylabel("task decodability (TD)")
        a.grid(axis="y", alpha=0.3, zorder=0)
        overall = part[part["level"] == "overall"]
        head = f"{family}: " if family is not None else ""
        shot_txt = "" if s == _NO_SHOTS else f", {_shot_label(s)}"
        sub = f"{head}per-task TD at layer {lay}{shot_txt}"
        if len(overall) and _finite(overall["td"].iloc[0]):
            sub += f" (overall {float(overall['td'].iloc[0]):.2f})"
        if len(families) > 1:
            a.set_title(sub, fontsize="medium")
        else:
            a.set_title(title if title is not None else sub, fontsize="medium")
    if len(families) > 1 and title is not None:
        fig.suptitle(title)
    return _finish(fig, path)


def plot_task_td_heatmap(
    td: pd.DataFrame,
    shots: int | None = None,
    path: str | Path | None = None,
    title: str | None = None,
) -> Figure:
    """Per-task TD as a task x layer heatmap at one shot count (default: the largest), colour 0..1.

    One panel per family (stacked), a shared colour bar; rows follow the table's task order, missing
    cells are blank. The panel title gives the overall peak layer when overall rows are present.
    """
    td = _k_shot(_prepare_td(td, ("layer", "level", "task", "td")))
    tasks_all = td[td["level"] == "task"]
    if len(tasks_all) == 0:
        raise ValueError("TD table has no per-task rows (level == 'task')")
    families = _families(tasks_all)
    mats = []
    for family in families:
        part = _of_family(td, family)
        s = _pick_shots(part, shots, family)
        part = part[part["shots"] == s]
        rows = part[part["level"] == "task"]
        if rows.duplicated(["task", "layer"]).any():
            raise ValueError("duplicate per-task rows for the same (task, layer): "
                             "tables from several families need a 'family' column")
        order = [str(t) for t in pd.unique(rows["task"])]
        mat = rows.assign(task=rows["task"].astype(str)).pivot(index="task", columns="layer", values="td")
        mat = mat.reindex(index=order, columns=sorted(mat.columns))
        overall = part[part["level"] == "overall"].sort_values("layer", kind="stable")
        peak = _peak(overall["layer"].to_numpy(), overall["td"].to_numpy()) if len(overall) else None
        mats.append((family, s, mat, peak))
    heights = [max(1.0, 0.28 * len(m.index)) + 0.9 for _, _, m, _ in mats]
    width = max(5.0, 0.22 * max(len(m.columns) for _, _, m, _ in mats) + 2.5)
    fig = _Figure(figsize=(width, sum(heights)), layout="constrained")
    axes = list(fig.subplots(len(mats), 1, squeeze=False, gridspec_kw={"height_ratios": heights}).ravel())
    im = None
    for (family, s, mat, peak), a in zip(mats, axes, strict=True):
        data = np.ma.masked_invalid(mat.to_numpy(dtype=float))
        im = a.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        layers = list(mat.columns)
        step = max(1, math.ceil(len(layers) / 16))
        ticks = list(range(0, len(layers), step))
        a.set_xticks(ticks, [str(int(layers[i])) for i in ticks])
        a.set_yticks(range(len(mat.index)), list(mat.index), fontsize="small")
        a.set_xlabel("layer")
        parts = [str(family)] if family is not None else []
        if s != _NO_SHOTS:
            parts.append(_shot_label(s))
        if peak is not None:
            parts.append(f"overall peak L{peak[0]} ({peak[1]:.2f})")
        a.set_title(", ".join(parts) if parts else "per-task TD", fontsize="medium")
    fig.colorbar(im, ax=axes, label="TD", shrink=0.9)
    fig.suptitle(title if title is not None else "Per-task TD by layer")
    return _finish(fig, path)


# ---- TD vs accuracy --------------------------------------------------------------------------------------
def plot_td_vs_accuracy(
    td: pd.DataFrame,
    acc: pd.DataFrame,
    fit: Mapping[str, Any],
    path: str | Path | None = None,
    include_null: bool = False,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Per-task TD at ``fit["layer"]`` (x) against exact-match accuracy (y), one point per (task, shots).

    Colour = task, marker = shot count, plus the fitted line ``exact = intercept + slope * td`` over
    the points' TD range, labelled with R² (also in the title). Points join ``td`` and ``acc`` on
    (task, shots), and family when both have it; with ``fit["family"]`` and a ``family`` column only
    that family is used. The Null task is left out unless ``include_null``. One scatter collection is
    drawn per shot count.
    """
    td = _k_shot(_check_table(td, ("layer", "level", "task", "td", "shots"), "TD"))
    acc = _check_table(acc, ("task", "shots", "exact"), "accuracy")
    if not isinstance(fit, Mapping):
        raise ValueError(f"fit must be a dict, got {type(fit).__name__}")
    missing = [key for key in ("layer", "r2", "slope", "intercept") if key not in fit]
    if missing:
        raise ValueError(f"fit is missing key(s) {missing}; it has {sorted(fit)}")
    layer = int(fit["layer"])
    family = fit.get("family")
    if family is not None:
        if "family" in td.columns:
            td = td[td["family"] == family]
            if len(td) == 0:
                raise ValueError(f"TD table has no rows of the fit's family {family!r}")
        if "family" in acc.columns:
            acc = acc[acc["family"] == family]
            if len(acc) == 0:
                raise ValueError(f"accuracy table has no rows of the fit's family {family!r}")
    per_task = td[td["level"] == "task"]
    if len(per_task) == 0:
        raise ValueError("TD table has no per-task rows (level == 'task')")
    layers = sorted(pd.unique(per_task["layer"]))
    if layer not in layers:
        raise ValueError(f"fit layer {layer} not in the TD table; available layers: {[int(v) for v in layers]}")
    task_order = [str(t) for t in pd.unique(per_task["task"])]
    keys = ["task", "shots"] + (["family"] if "family" in td.columns and "family" in acc.columns else [])
    for name, table in (("TD", per_task), ("accuracy", acc)):
        if "family" not in keys and "family" in table.columns and table["family"].nunique() > 1:
            raise ValueError(f"the {name} table has several families {list(pd.unique(table['family']))} and "
                             "cannot be joined by family: give fit['family'] or filter the table")
    left = per_task[per_task["layer"] == layer][[*keys, "td"]]
    points = left.merge(acc[[*keys, "exact"]], on=keys, how="inner")
    points = points.assign(task=points["task"].astype(str))
    if not include_null:
        points = points[points["task"] != NULL_TASK]
    points = points[np.isfinite(points["td"].to_numpy(dtype=float)) & np.isfinite(points["exact"].to_numpy(dtype=float))]
    if len(points) == 0:
        raise ValueError(f"no (task, shots) pairs in common between the TD table at layer {layer} and the "
                         f"accuracy table (join on {keys}{'' if include_null else ', Null task excluded'})")
    if ax is None:
        fig = _Figure(figsize=(7.2 + 2.6 * (points["task"].nunique() + 4 > 18), 4.8), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = _root_figure(ax)
    colors = _task_colors(task_order)
    shot_values = sorted(pd.unique(points["shots"]))
    markers = {s: _SHOT_MARKERS[i % len(_SHOT_MARKERS)] for i, s in enumerate(shot_values)}
    for s in shot_values:
        p = points[points["shots"] == s]
        ax.scatter(p["td"], p["exact"], c=[colors[t] for t in p["task"]], marker=markers[s], s=55,
                   edgecolors="k", linewidths=0.5, zorder=3)
    r2_txt = f"R² = {float(fit['r2']):.2f}" if math.isfinite(float(fit["r2"])) else "R² = n/a"
    handles: list[Any] = []
    slope, intercept = float(fit["slope"]), float(fit["intercept"])
    if math.isfinite(slope) and math.isfinite(intercept):
        xs = np.linspace(float(points["td"].min()), float(points["td"].max()), 50)
        (line,) = ax.plot(xs, intercept + slope * xs, color="k", lw=1.5, ls="-", label=f"fit, {r2_txt}", zorder=2)
        handles.append(line)
    present = [t for t in task_order if t in set(points["task"])]
    handles += [Line2D([], [], ls="", marker="o", color=colors[t], markeredgecolor="k", label=t) for t in present]
    handles += [Line2D([], [], ls="", marker=markers[s], color="0.6", markeredgecolor="k", label=_shot_label(s))
                for s in shot_values]
    ax.legend(handles=handles, fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
              ncol=1 + (len(handles) > 18))  # many tasks: two legend columns (and a wider figure, above)
    ax.set_xlabel(f"per-task TD at layer {layer}")
    ax.set_ylabel("ICL accuracy (exact match)")
    ax.set_xlim(*_TD_LIMITS)
    ax.set_ylim(*_TD_LIMITS)
    ax.grid(alpha=0.3)
    head = f"{family}: " if family is not None else ""
    ax.set_title(title if title is not None else f"{head}TD vs accuracy, layer {layer} ({r2_txt}, n = {len(points)})")
    return _finish(fig, path)


# ---- A sweep's figure set --------------------------------------------------------------------------------
def sweep_figures(result: SweepResult, out: str | Path, umap: bool = True) -> list[Path]:
    """TD per layer, per-task TD (bars + heatmap), TD vs accuracy, a UMAP of the peak layer, and (a sweep run
    with controls) k-shot TD beside the controls' (``td_context.png``, :func:`plot_td_context`).

    The UMAP uses the largest shot count's activations at its overall-TD peak layer.
    """
    out = Path(out) / "figures"
    fam = result.fit.get("family", result.config.family)
    paths = [out / "td_by_layer.png", out / "task_td.png", out / "task_td_heatmap.png", out / "td_vs_accuracy.png"]
    plot_td_by_layer(result.td, path=paths[0], title=f"{fam}: task decodability by layer")
    plot_task_td(result.td, path=paths[1])
    plot_task_td_heatmap(result.td, path=paths[2])
    plot_td_vs_accuracy(result.td, result.accuracy, result.fit, path=paths[3])
    if umap and result.activations:
        shots = max(result.activations)
        acts, labels = result.activations[shots]
        peaks = td_peaks(result.td)
        peak = int(peaks[peaks["shots"] == shots]["layer"].iloc[0])
        k_shot = _k_shot(result.td)
        layers = k_shot["layer"].drop_duplicates().tolist()
        names = k_shot.loc[k_shot["level"] == "task", "task"].drop_duplicates().tolist()
        path = out / f"umap_layer{peak}_{shots}shot.png"
        # an Activations tensor is indexed by layer number, a plain [layer, n, d] tensor by position
        at_peak = acts[peak] if hasattr(acts, "layers") else acts[layers.index(peak)]
        plot_umap(at_peak, labels.tolist(), label_names=names, seed=result.config.seed,
                  path=path, title=f"{fam}, layer {peak}, {shots}-shot")
        paths.append(path)
    if "context" in result.td.columns and (result.td["context"] != _DEMOS).any():
        path = out / "td_context.png"
        plot_td_context(result.td, path=path, title=f"{fam}: TD with demonstrations vs controls")
        paths.append(path)
    return paths
