"""Figures from the sweep's tidy result tables, and UMAP views of one layer's representations.

Every function returns a :class:`matplotlib.figure.Figure` and, given ``path=``, also writes it
(PNG at 150 dpi, ``bbox_inches="tight"``, parent folders created). Figures are built with
``Figure()`` directly, not through pyplot: nothing here selects or changes a matplotlib backend,
figures are not registered with pyplot (no "too many open figures", nothing to close), and in a
notebook the returned figure shows inline as the value of a cell. The functions that take
``ax=`` draw into an existing axes instead and return the figure that holds it (``path=`` then
saves that whole figure).

Input tables (as :mod:`taskvec_interp.experiments.sweep` writes them):

* **TD table** (:meth:`TaskDecodability.to_frame` plus ``shots`` and ``family``): ``layer``,
  ``level`` ("overall" or "task"), ``task`` ("all" on overall rows), ``td``, ``ci_low``,
  ``ci_high`` (may be NaN), ``n``, ``k``, ``metric``, ``chance``, ``shots``, optional ``family``.
  ``shots`` may be absent (one un-named series) and ``ci_low``/``ci_high``/``chance`` are drawn only
  where present.
* **Accuracy table**: ``task``, ``shots``, ``n``, ``exact``, ``first_token``, optional ``family``.
* **Fit dict** (:func:`~taskvec_interp.experiments.sweep.fit_td_accuracy`): ``layer``, ``r2``,
  ``slope``, ``intercept`` (``exact = intercept + slope * td``), ``n_points``, optional ``family``.

Peaks are the highest TD over layers, the earliest layer on ties (as
:attr:`TaskDecodability.peak_layer`); NaN TDs are ignored.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .probes.decodability import encode_labels
from .tasks.base import NULL_TASK

__all__ = [
    "plot_basis_emergence",
    "plot_head_ablation",
    "plot_patching",
    "plot_task_td",
    "plot_task_td_heatmap",
    "plot_td_by_layer",
    "plot_td_heatmap_steps",
    "plot_td_vs_accuracy",
    "plot_trajectory",
    "plot_umap",
    "plot_umap_grid",
    "save_figure",
    "td_peaks",
    "umap_embedding",
]

DPI = 150
_NO_SHOTS = -1  # internal shot count of a TD table without a ``shots`` column
_SHOT_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
_TD_LIMITS = (-0.03, 1.03)


class _Figure(Figure):
    """A plain Figure that can also show itself in IPython without pyplot (``_repr_png_``).

    Where matplotlib's inline backend is active IPython uses its own Figure formatter first, so
    this only matters when pyplot was never imported in the kernel.
    """

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``fig`` to ``path`` (format from its suffix, PNG by default), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _finish(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


def _root_figure(ax: Axes) -> Figure:
    try:
        return ax.get_figure(root=True)  # matplotlib >= 3.10
    except TypeError:
        fig = ax.figure
        while not isinstance(fig, Figure):  # a SubFigure: climb to the Figure
            fig = fig.figure
        return fig


def _grid(n: int, panel: tuple[float, float], max_cols: int = 3) -> tuple[Figure, list[Axes]]:
    ncols = min(n, max_cols)
    nrows = math.ceil(n / ncols)
    fig = _Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for extra in axes[n:]:
        fig.delaxes(extra)
    return fig, axes[:n]


def _check_table(df: Any, required: Sequence[str], name: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{name} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{name} table is missing column(s) {missing}; it has {list(df.columns)}")
    if len(df) == 0:
        raise ValueError(f"{name} table is empty")
    return df


def _prepare_td(td: Any, required: Sequence[str]) -> pd.DataFrame:
    td = _check_table(td, required, "TD")
    if "shots" not in td.columns:
        td = td.assign(shots=_NO_SHOTS)
    if "family" in td.columns:
        td = td.assign(family=td["family"].fillna("?").astype(str))
    return td


def _families(df: pd.DataFrame) -> list[str | None]:
    return list(pd.unique(df["family"])) if "family" in df.columns else [None]


def _of_family(df: pd.DataFrame, family: str | None) -> pd.DataFrame:
    return df if family is None or "family" not in df.columns else df[df["family"] == family]


def _overall(td: pd.DataFrame, what: str) -> pd.DataFrame:
    overall = td[td["level"] == "overall"]
    if len(overall) == 0:
        raise ValueError(f"TD table has no overall rows (level == 'overall'), needed for {what}")
    keys = [c for c in ("family", "shots", "layer") if c in overall.columns]
    dup = overall.duplicated(keys, keep=False)
    if dup.any():
        example = overall.loc[dup, keys].iloc[0].to_dict()
        raise ValueError(
            f"TD table has several overall rows for the same {tuple(keys)}, e.g. {example}: "
            "tables from several families need a 'family' column"
        )
    return overall


def _shot_label(shots: int) -> str:
    return "TD" if shots == _NO_SHOTS else f"{int(shots)}-shot"


def _shot_colors(shots: Sequence[int]) -> dict[int, Any]:
    if len(shots) == 1:
        return {shots[0]: "C0"}
    cmap = mpl.colormaps["viridis"]
    return {s: cmap(0.85 - 0.75 * i / (len(shots) - 1)) for i, s in enumerate(shots)}


def _class_colors(n: int) -> list[Any]:
    if n <= 10:
        return [mpl.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [mpl.colormaps["tab20"](i) for i in range(n)]
    cmap = mpl.colormaps["turbo"]
    return [cmap(0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def _task_colors(tasks: Sequence[str]) -> dict[str, Any]:
    """One colour per task in table order; the Null task is grey."""
    real = [t for t in tasks if t != NULL_TASK]
    colors = dict(zip(real, _class_colors(len(real)), strict=True))
    if NULL_TASK in tasks:
        colors[NULL_TASK] = (0.55, 0.55, 0.55, 1.0)
    return colors


def _peak(layers: np.ndarray, values: np.ndarray) -> tuple[int, float] | None:
    """(layer, value) of the highest finite value, the earliest on ties; None if all NaN."""
    values = np.asarray(values, dtype=float)
    if not np.isfinite(values).any():
        return None
    i = int(np.nanargmax(np.where(np.isfinite(values), values, np.nan)))
    return int(layers[i]), float(values[i])


def _draw_chance(ax: Axes, chances: Any) -> None:
    values = pd.to_numeric(pd.Series(chances), errors="coerce").dropna().round(12).unique()
    for i, c in enumerate(sorted(values)):
        ax.axhline(c, ls="--", lw=1, color="0.4", label="chance" if i == 0 else None, zorder=1)


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# TD over layers
# ----------------------------------------------------------------------------------------------
def td_peaks(td: pd.DataFrame) -> pd.DataFrame:
    """Peak of the overall TD per (family, shots): columns ``[family], [shots], layer, td, [chance]``.

    ``family``, ``shots`` and ``chance`` appear when the TD table has them. The peak is the highest
    TD, the earliest layer on ties; a series with only NaN TDs is left out.
    """
    td = _check_table(td, ("layer", "level", "td"), "TD")
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
    td = _prepare_td(td, ("layer", "level", "td"))
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
                lo = s["ci_low"].to_numpy(dtype=float)
                hi = s["ci_high"].to_numpy(dtype=float)
                ok = np.isfinite(lo) & np.isfinite(hi)
                if ok.any():
                    a.fill_between(x, lo, hi, where=ok, color=color, alpha=0.18, lw=0, zorder=2)
            peak = _peak(x, y)
            if peak is not None:
                a.scatter([peak[0]], [peak[1]], marker="*", s=140, color=[color], edgecolors="k",
                          linewidths=0.6, zorder=4)
                a.annotate(f"L{peak[0]}", peak, xytext=(0, 7), textcoords="offset points", ha="center",
                           fontsize=8, color=color)
        if "chance" in part.columns:
            _draw_chance(a, part["chance"])
        a.set_xlabel("layer")
        a.set_ylabel("task decodability (TD)")
        a.set_ylim(*_TD_LIMITS)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
        a.legend(fontsize="small", loc="best")
        if len(families) > 1:
            a.set_title(str(family))
        else:
            default = "Task decodability by layer" + (f" ({family})" if family is not None else "")
            a.set_title(title if title is not None else default)
    if len(families) > 1:
        fig.suptitle(title if title is not None else "Task decodability by layer")
    return _finish(fig, path)


# ----------------------------------------------------------------------------------------------
# Per-task TD
# ----------------------------------------------------------------------------------------------
def _pick_shots(part: pd.DataFrame, shots: int | None, family: str | None) -> int:
    available = sorted(pd.unique(part["shots"]))
    if shots is None:
        return available[-1]
    if available == [_NO_SHOTS]:
        return _NO_SHOTS  # the table has no shots column: nothing to select
    if shots not in available:
        where = f" for family {family!r}" if family is not None else ""
        raise ValueError(f"shots={shots} not in the TD table{where}; available: {[int(s) for s in available]}")
    return shots


def _pick_layer(part: pd.DataFrame, layer: int | None, shots: int, family: str | None) -> int:
    where = f" for family {family!r}" if family is not None else ""
    if layer is None:
        overall = _overall(part, "the default layer (the overall peak); pass layer=")
        series = overall[overall["shots"] == shots].sort_values("layer", kind="stable")
        if len(series) == 0:
            raise ValueError(f"TD table has no overall rows{where} at {_shot_label(shots)}: pass layer=")
        peak = _peak(series["layer"].to_numpy(), series["td"].to_numpy())
        if peak is None:
            raise ValueError(f"overall TD{where} at {_shot_label(shots)} is all NaN: pass layer=")
        return peak[0]
    layers = sorted(pd.unique(part["layer"]))
    if layer not in layers:
        raise ValueError(f"layer {layer} not in the TD table{where}; available layers: {[int(v) for v in layers]}")
    return int(layer)


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
    td = _prepare_td(td, ("layer", "level", "task", "td"))
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
    td = _prepare_td(td, ("layer", "level", "task", "td"))
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


# ----------------------------------------------------------------------------------------------
# TD vs accuracy
# ----------------------------------------------------------------------------------------------
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
    td = _check_table(td, ("layer", "level", "task", "td", "shots"), "TD")
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
        fig = _Figure(figsize=(7.2, 4.8), layout="constrained")
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
    r2 = float(fit["r2"])
    r2_txt = f"R² = {r2:.2f}" if math.isfinite(r2) else "R² = n/a"
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
    ax.legend(handles=handles, fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel(f"per-task TD at layer {layer}")
    ax.set_ylabel("ICL accuracy (exact match)")
    ax.set_xlim(*_TD_LIMITS)
    ax.set_ylim(*_TD_LIMITS)
    ax.grid(alpha=0.3)
    head = f"{family}: " if family is not None else ""
    ax.set_title(title if title is not None else f"{head}TD vs accuracy, layer {layer} ({r2_txt}, n = {len(points)})")
    return _finish(fig, path)


# ----------------------------------------------------------------------------------------------
# UMAP
# ----------------------------------------------------------------------------------------------
def _as_points(acts: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(acts, torch.Tensor):
            acts = acts.detach().to("cpu", torch.float32).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    x = np.asarray(acts)
    if x.dtype.kind not in "fiu":
        raise ValueError(f"acts must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if x.ndim != 2:
        raise ValueError(f"acts must be [n, d] (one layer), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"acts is empty: shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("acts has NaN or inf values")
    return x


def umap_embedding(
    acts: Any,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "euclidean",
) -> np.ndarray:
    """2-D UMAP (umap-learn) of ``acts`` ``[n, d]`` (tensor or array): a float32 array ``[n, 2]``.

    ``random_state=seed`` makes it reproducible (and single-threaded); ``n_neighbors`` is capped at
    ``n - 1``. The first fit in a process pays umap's numba compilation (about 10 s).
    """
    x = _as_points(acts)
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"UMAP needs at least 4 points, got {n}")
    if n_neighbors < 2:
        raise ValueError(f"n_neighbors must be >= 2, got {n_neighbors}")
    import umap

    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, n - 1), min_dist=min_dist, metric=metric,
                        random_state=seed)
    import torch

    threads = torch.get_num_threads()  # umap-learn (numba's threading layer) resets torch's thread count
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*overridden to 1 by setting random_state.*")
            emb = reducer.fit_transform(x)
    finally:
        torch.set_num_threads(threads)
    return np.asarray(emb, dtype=np.float32)


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


# ----------------------------------------------------------------------------------------------
# Synthetic experiment: emergence over training checkpoints
# ----------------------------------------------------------------------------------------------
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


def plot_patching(patching: pd.DataFrame, path: str | Path | None = None, title: str | None = None) -> Figure:
    """Source x target heatmaps of the patched test MSE, one panel per checkpoint (paper Fig. 7).

    The unpatched MSE of each source basis is the first column (target "none").
    """
    _check_table(patching, ["step", "source", "target", "mse"], "patching table")
    steps = sorted(patching["step"].unique())
    fig, axes = _grid(len(steps), (4.2, 3.6))
    for ax, step in zip(axes, steps, strict=False):
        part = patching[patching["step"] == step]
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
        mode = part["mode"].iloc[0] if "mode" in part else "replace"
        layer = part["layer"].iloc[0] if "layer" in part else "?"
        where = f", tokens: {part['position'].iloc[0]}" if "position" in part else ""
        ax.set_title(f"step {step}: {mode} at layer {layer}{where}", fontsize=9)
        fig.colorbar(im, ax=ax, label="log10 MSE")
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


# ------------------------------------------------------------------------------------------------
# Task-vector interventions on language models (paper Fig. 20)
# ------------------------------------------------------------------------------------------------
_DIRECTION_COLORS = {"baseline": "0.55", "positive": "tab:green", "negative": "tab:red"}


def plot_patch_bars(accuracy: pd.DataFrame, layer: int, mode: str | None = None, path: str | Path | None = None,
                    title: str | None = None) -> Figure:
    """Baseline / positive / negative exact-match accuracy per task at one layer, with bootstrap CIs
    (paper Fig. 20). One panel per intervention mode (or only ``mode``)."""
    acc = _check_table(accuracy, ["layer", "mode", "direction", "task", "accuracy", "ci_low", "ci_high"],
                       "patching accuracy table")
    base = acc[acc["direction"] == "baseline"]
    at = acc[(acc["layer"] == layer) & acc["direction"].isin(["positive", "negative"])]
    if at.empty:
        raise ValueError(f"no positive/negative interventions at layer {layer} in the table")
    modes = [mode] if mode is not None else [m for m in ("add", "replace") if m in set(at["mode"])]
    tasks = list(dict.fromkeys(base["task"]))
    fig, axes = _grid(len(modes), (max(5.0, 0.9 * len(tasks) + 1.5), 3.4), max_cols=1)
    width = 0.27
    top = min(1.05, max(0.25, 1.2 * float(pd.concat([base, at])["ci_high"].max())))  # small accuracies stay readable
    for ax, m in zip(axes, modes, strict=False):
        for j, (direction, part) in enumerate((("baseline", base), *((d, at[(at["mode"] == m) & (at["direction"] == d)])
                                                                        for d in ("positive", "negative")))):
            part = part.set_index("task").reindex(tasks)
            x = np.arange(len(tasks)) + (j - 1) * width
            err = np.vstack([part["accuracy"] - part["ci_low"], part["ci_high"] - part["accuracy"]])
            ax.bar(x, part["accuracy"], width, yerr=np.clip(err, 0, None), capsize=2,
                   color=_DIRECTION_COLORS[direction], label=direction)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylim(0, top)
        ax.set_ylabel("exact-match accuracy")
        ax.set_title(f"{m} task vector at layer {layer}", fontsize=9)
        ax.legend(fontsize=8, ncols=3, loc="upper right")
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def plot_patch_heatmap(accuracy: pd.DataFrame, direction: str = "positive", mode: str | None = None,
                       path: str | Path | None = None, title: str | None = None, value: str = "delta") -> Figure:
    """Layer x task heatmap of the change (intervention minus baseline), one panel per mode.

    ``value``: ``"delta"`` (exact-match accuracy) or ``"logprob_delta"`` (mean per-token answer
    log-probability, when the run scored it)."""
    acc = _check_table(accuracy, ["layer", "mode", "direction", "task", value], "patching accuracy table")
    what = "answer log-prob" if value.startswith("logprob") else "accuracy"
    part = acc[acc["direction"] == direction]
    if part.empty:
        raise ValueError(f"no {direction!r} interventions in the table")
    modes = [mode] if mode is not None else [m for m in ("add", "replace") if m in set(part["mode"])]
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
        ax.set_title(f"{direction} ({m}): {what} change", fontsize=9)
        fig.colorbar(im, ax=ax, label=f"{what} - baseline")
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def plot_patch_matrix(accuracy: pd.DataFrame, layer: int, mode: str, path: str | Path | None = None,
                      title: str | None = None) -> Figure:
    """Source x target matrix: the accuracy change on each task's prompts (columns) when each task's
    vector (rows) is patched in at ``layer`` (the language-model analogue of the synthetic Fig. 7)."""
    acc = _check_table(accuracy, ["layer", "mode", "vector", "task", "delta"], "patching accuracy table")
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
    ax.set_title(title or f"{mode} at layer {layer}: accuracy change", fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy - baseline")
    return _finish(fig, path)


# ------------------------------------------------------------------------------------------------
# Layer-subset fine-tuning (paper Fig. 24, Table 1)
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# Attention heads of the synthetic model (paper Figs. 17-18)
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
