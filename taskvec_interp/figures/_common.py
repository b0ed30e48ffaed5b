"""What every figure module shares: saving (:func:`save_figure`, :data:`DPI`), the pyplot-free
``_Figure``, panel grids, colours, and the checks and selections on tidy result tables.

Every figure function of :mod:`taskvec_interp.figures` returns a :class:`matplotlib.figure.Figure`
and, given ``path=``, also writes it (PNG at 150 dpi, ``bbox_inches="tight"``, parent folders
created). Figures are built with ``Figure()`` directly, not through pyplot: nothing here selects or
changes a matplotlib backend, figures are not registered with pyplot (no "too many open figures",
nothing to close), and in a notebook the returned figure shows inline as the value of a cell. The
functions that take ``ax=`` draw into an existing axes instead and return the figure that holds it
(``path=`` then saves that whole figure).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..tasks.base import NULL_TASK

__all__ = ["DPI", "save_figure"]

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


# ---- Helpers ---------------------------------------------------------------------------------------------
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


# ---- The shot count and layer a per-task TD figure shows -------------------------------------------------
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


_DEMOS = "demos"  # the context of the k-shot rows (experiments.sweep.DEMOS; figures import no experiment)


def _k_shot(td: pd.DataFrame) -> pd.DataFrame:
    """The k-shot rows of a TD table (all of them when it has no ``context`` column)."""
    return td[td["context"] == _DEMOS] if "context" in td.columns else td


def _ci_band(a, rows: pd.DataFrame, x: np.ndarray, color: Any, alpha: float) -> None:
    """Shade ``rows``' ``ci_low``..``ci_high`` over ``x`` where both ends are finite (nothing when none is)."""
    lo, hi = rows["ci_low"].to_numpy(dtype=float), rows["ci_high"].to_numpy(dtype=float)
    ok = np.isfinite(lo) & np.isfinite(hi)
    if ok.any():
        a.fill_between(x, lo, hi, where=ok, color=color, alpha=alpha, lw=0, zorder=2)


def _td_by_layer_axes(a, part: pd.DataFrame) -> None:
    """The axes of a TD-by-layer panel: the chance line (where the table has one), labels, limits, grid, legend."""
    if "chance" in part.columns:
        _draw_chance(a, part["chance"])
    a.set_xlabel("layer")
    a.set_ylabel("task decodability (TD)")
    a.set_ylim(*_TD_LIMITS)
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    a.grid(alpha=0.3)
    a.legend(fontsize="small", loc="best")
