"""The findings scoreboard: the paper's six findings, each decided by a statistical test on your own results.

:func:`findings` reads the results of the experiments (a synthetic analysis, TD sweeps, patching runs, a
zero-shot task-vector table, fine-tuning runs; objects or their directories) and returns one row per finding
and family: the paper's claim and number (as text), ours, the statistic with its CI, the test's p-value where
a test gives one, and a verdict computed from the statistic alone, never from the paper's number:

* ``reproduced``: the statistic's CI lies entirely on the paper's side of the threshold (and p < alpha
  where a p-value is the test);
* ``not reproduced``: the CI lies entirely on the other side (and p < alpha where a p-value is the test);
* ``inconclusive``: the CI spans (or touches) the threshold, or the test is not significant;
* ``not run``: the input the finding needs was not given (or lacks the table it reads).

The rules of each finding are in :func:`findings`'s docstring and in ``docs/findings.md``; the tests live in
:mod:`taskvec_interp.probes.stats`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .probes import stats as S

COLUMNS: tuple[str, ...] = ("finding", "aspect", "claim", "paper", "family", "ours", "statistic", "estimate",
                            "ci_low", "ci_high", "p_value", "test", "threshold", "side", "verdict", "note")
"""The scoreboard's columns (``side``: the side of ``threshold`` the paper's claim is on)."""

CLAIMS: dict[tuple[str, str], str] = {
    ("F1", "coupling"): "each basis' hidden states separate (TD rises) when its loss drops",
    ("F2", "shots"): "TD rises with the number of shots",
    ("F2", "context"): "the context puts the task into the query's state (k-shot TD above input-only TD)",
    ("F2", "labels"): "the demonstrations' labels carry the task (k-shot TD above TD with labels shuffled across "
                      "tasks)",
    ("F3", "peak"): "TD peaks in the middle layers (above the first and the last layer)",
    ("F4", "fit"): "TD predicts ICL accuracy (linear fit over tasks x shots, slope > 0)",
    ("F5", "positive"): "patching the task's own vector raises accuracy",
    ("F5", "negative"): "patching the Null task's vector lowers accuracy",
    ("F5", "zero-shot"): "a task vector patched into a zero-shot query beats the zero-shot baseline",
    ("F6", "accuracy"): "fine-tuning the first layers beats fine-tuning the last layers",
    ("F6", "TD"): "fine-tuning the first layers raises TD",
}
"""The claim of each (finding, aspect)."""

PAPER: dict[tuple[str, str], dict[str, str]] = {
    ("F1", "coupling"): {"*": "B1's loss drops and it separates first, B2-B4 later, each drop with its separation "
                              "(GPT-2 12L, 80K steps)"},
    ("F2", "shots"): {"pos": "TD rises over 1, 4, 10 shots; 4-shot 0.68 +- 0.11 (Llama-3.1-8B)",
                      "bitwise": "TD rises over 1, 4, 10 shots; 4-shot 0.43 +- 0.13 (Llama-3.1-8B)",
                      "*": "TD rises over 1, 4, 10 shots (Llama-3.1-8B)"},
    ("F2", "context"): {"*": "- (a control, not in the paper)"},
    ("F2", "labels"): {"*": "- (a control, not in the paper)"},
    ("F3", "peak"): {"pos": "peak at layer 15 of 32 (Llama-3.1-8B)", "bitwise": "peak at layer 13 of 32 (Llama-3.1-8B)",
                     "*": "peak in the middle layers (layers 13-15 of 32, Llama-3.1-8B)"},
    ("F4", "fit"): {"pos": "R^2 0.78 (Llama-3.1-8B; 0.42-0.84 over six models)",
                    "bitwise": "R^2 0.53 (Llama-3.1-8B; 0.32-0.78 over six models)",
                    "*": "R^2 0.32-0.84 over six models and two families"},
    ("F5", "positive"): {"*": "up to +14 points (separable tasks), about +2 (overlapping); Llama-3.1-8B"},
    ("F5", "negative"): {"*": "down to -15 points (separable tasks), about -6 (overlapping); Llama-3.1-8B"},
    ("F5", "zero-shot"): {"*": "baseline / task vector / ICL 0.13 / 0.72 / 0.83 (Pythia-2.8B, Hendel et al., mean "
                               "of 18 tasks)"},
    ("F6", "accuracy"): {"pos": "69.4% (first 10) vs 33.9% (last 10); pretrained 25.5% (Llama-3.1-8B)",
                         "bitwise": "90.2% (first 10) vs 66.3% (last 10); pretrained 26.2% (Llama-3.1-8B)",
                         "*": "first 10 layers beat the last 10 (Llama-3.1-8B)"},
    ("F6", "TD"): {"pos": "0.68 -> 0.95 with the first 10; last 10 unchanged",
                   "bitwise": "0.43 -> 0.85 with the first 10; last 10 unchanged",
                   "*": "TD rises with the first 10 layers only"},
}
"""The paper's numbers as text, per family (``"*"``: any family). Shown beside ours; never read by a verdict."""

DEMOS, INPUT_ONLY, SHUFFLED = "demos", "input_only", "shuffled"


# ------------------------------------------------------------------------------------------------
# rows
# ------------------------------------------------------------------------------------------------
def _paper(finding: str, aspect: str, family: str) -> str:
    texts = PAPER.get((finding, aspect), {})
    return texts.get(str(family).lower(), texts.get("*", ""))


def _row(finding: str, aspect: str, family: str, *, verdict: str, ours: str = "", statistic: str = "",
         estimate: float = math.nan, ci: tuple[float, float] = (math.nan, math.nan), p_value: float = math.nan,
         test: str = "", threshold: float = 0.0, side: str = "greater", note: str = "") -> dict:
    if verdict not in S.VERDICTS:
        raise ValueError(f"verdict must be one of {S.VERDICTS}, got {verdict!r}")
    return {"finding": finding, "aspect": aspect, "claim": CLAIMS[(finding, aspect)],
            "paper": _paper(finding, aspect, family), "family": family, "ours": ours, "statistic": statistic,
            "estimate": float(estimate), "ci_low": float(ci[0]), "ci_high": float(ci[1]), "p_value": float(p_value),
            "test": test, "threshold": float(threshold), "side": side, "verdict": verdict, "note": note}


def _not_run(finding: str, aspect: str, family: str, why: str, side: str = "greater",
             threshold: float = 0.0) -> dict:
    return _row(finding, aspect, family, verdict=S.NOT_RUN, note=why, side=side, threshold=threshold)


def _decided(finding: str, aspect: str, family: str, *, estimate: float, ci: tuple[float, float],
             p_value: float | None = None, alpha: float = 0.05, threshold: float = 0.0, side: str = "greater",
             **kw: Any) -> dict:
    """A row whose verdict is :func:`~taskvec_interp.probes.stats.verdict` of its CI (and p-value)."""
    v = S.verdict(ci[0], ci[1], threshold=threshold, side=side, p_value=p_value, alpha=alpha)
    return _row(finding, aspect, family, verdict=v, estimate=estimate, ci=ci,
                p_value=math.nan if p_value is None else p_value, threshold=threshold, side=side, **kw)


def _f(x: float, digits: int = 3) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(lo: float, hi: float) -> str:
    return f"[{_f(lo)}, {_f(hi)}]"


# ------------------------------------------------------------------------------------------------
# inputs: objects or their directories
# ------------------------------------------------------------------------------------------------
def _is_path(x: object) -> bool:
    return isinstance(x, (str, Path))


def _load(x: Any, kind: str) -> Any:
    """A result object as is; a directory read by its type's ``load`` (``kind``: sweep, patching, zero_shot)."""
    if not _is_path(x):
        return x
    from .experiments.patching import PatchResult
    from .experiments.sweep import SweepResult
    from .experiments.zeroshot import ZeroShotResult

    return {"sweep": SweepResult, "patching": PatchResult, "zero_shot": ZeroShotResult}[kind].load(x)


def _load_synthetic(x: Any) -> Any:
    """An :class:`~taskvec_interp.synthetic.analysis.AnalysisResult`, a mapping seed -> one, or a directory of one
    (or a directory holding ``analysis/``, as the demo's synthetic part)."""
    if isinstance(x, Mapping):
        return {k: _load_synthetic(v) for k, v in x.items()}
    if _is_path(x):
        from .io import read_marker
        from .synthetic.analysis import AnalysisResult

        d = Path(x)
        if read_marker(d) is None and (d / "analysis").is_dir():
            d = d / "analysis"
        return AnalysisResult.load(d)
    return x


def _load_finetune(x: Any) -> Any:
    """A comparison (object or directory), or fine-tuning runs (objects or directories, or a directory whose
    subdirectories are runs, as the demo's fine-tuning part) -> a comparison or a list of runs."""
    if hasattr(x, "per_task"):  # a comparison
        return x
    if _is_path(x):
        from .experiments.finetune import FinetuneComparison, FinetuneResult
        from .io import read_marker

        d = Path(x)
        kind = (read_marker(d) or {}).get("kind")
        if kind == "finetune_comparison":
            return FinetuneComparison.load(d)
        if kind == "finetune":
            return [FinetuneResult.load(d)]
        runs = [FinetuneResult.load(s) for s in sorted(d.iterdir())
                if s.is_dir() and (read_marker(s) or {}).get("kind") == "finetune"]
        if not runs:
            raise ValueError(f"{d} is neither a fine-tuning comparison nor a run, and holds no runs")
        return runs
    return [r for run in x for r in (_load_finetune(run) if _is_path(run) else [run])]


# ------------------------------------------------------------------------------------------------
# TD tables and per-point tables
# ------------------------------------------------------------------------------------------------
def _context(df: pd.DataFrame, context: str) -> pd.DataFrame:
    """Rows of one context (a table without a ``context`` column, or a missing value, is ``demos``)."""
    if "context" not in df:
        return df if context == DEMOS else df.iloc[0:0]
    ctx = df["context"].fillna(DEMOS).astype(str)
    return df[ctx == context]


def _overall(td: pd.DataFrame, context: str = DEMOS) -> pd.DataFrame:
    t = _context(td, context)
    return t[t["level"] == "overall"]


def _points(result: Any) -> pd.DataFrame | None:
    pts = getattr(result, "td_points", None)
    if isinstance(pts, pd.DataFrame) and len(pts) and {"layer", "shots", "index", "task", "correct"} <= set(pts):
        return pts
    return None


def _td_at(overall: pd.DataFrame, layer: int, shots: int | None = None) -> tuple[float, float, float]:
    t = overall[overall["layer"] == layer]
    if shots is not None and "shots" in t:
        t = t[t["shots"] == shots]
    if t.empty:
        raise KeyError(f"no overall TD at layer {layer}, shots {shots}")
    r = t.iloc[0]
    return float(r["td"]), float(r.get("ci_low", math.nan)), float(r.get("ci_high", math.nan))


def _point_vector(points: pd.DataFrame, context: str, shots: int, layer: int) -> pd.DataFrame:
    p = _context(points, context)
    p = p[(p["shots"] == shots) & (p["layer"] == layer)][["task", "index", "correct"]]
    return p.drop_duplicates(["task", "index"]).sort_values(["task", "index"]).reset_index(drop=True)


def _at_layer(column: pd.Series, layer: int) -> pd.Series:
    """``column == layer`` where a missing layer (a baseline's NA) is False, whatever the column's dtype."""
    return pd.to_numeric(column, errors="coerce").eq(layer).fillna(False).astype(bool)


def _same_queries(predictions: pd.DataFrame | None, s1: int, s2: int) -> bool:
    """Whether the sweep's prompt sets of ``s1`` and ``s2`` shots ask the same queries in the same order (read
    from its predictions: ``task`` and ``query`` by ``prompt_id``, the points' ``index``)."""
    if not isinstance(predictions, pd.DataFrame) or not {"shots", "prompt_id", "task", "query"} <= set(predictions):
        return False
    seqs = [predictions[predictions["shots"] == s].sort_values("prompt_id")[["task", "query"]].to_numpy().tolist()
            for s in (s1, s2)]
    return bool(seqs[0]) and seqs[0] == seqs[1]


def _peak_layer_mean_over_shots(overall: pd.DataFrame) -> int:
    return int(overall.groupby("layer")["td"].mean().idxmax())


# ------------------------------------------------------------------------------------------------
# F1: coupled emergence (synthetic)
# ------------------------------------------------------------------------------------------------
def _prev_gap(grid: Sequence[int], step: int) -> int:
    """The spacing of ``grid`` just before ``step`` (0 at the first point): the step where a curve was seen to
    cross lies in (previous point, step]."""
    earlier = [s for s in grid if s < step]
    return step - max(earlier) if earlier else 0


def _basis_gaps(res: Any, label: str) -> list[dict]:
    """Per basis: the signed TD-rise minus loss-drop interval (in steps) from the checkpoint grid."""
    summary = res.summary
    td_layer = summary["td_layer"]
    td_grid = sorted(int(s) for s in res.td.loc[res.td["layer"] == td_layer, "step"].unique())
    loss_grid = sorted(int(s) for s in res.loss["step"].unique()) if len(res.loss) else td_grid
    start, end = min(td_grid + loss_grid), max(td_grid + loss_grid)
    ridge = (summary.get("oracles") or {}).get("full_ridge") or {}
    out = []
    for i, (name, b) in enumerate(summary["bases"].items()):
        below = f"b{i}" in ridge
        drop = b.get("below_ridge_step") if below else b.get("loss_drop_step")
        rise = b.get("td_rise_step")
        g = {"basis": f"{label}{name}", "drop": drop, "rise": rise, "length": end - start,
             "drop_kind": "below-ridge step" if below else "loss-drop midpoint"}
        if drop is not None and rise is not None:
            d = rise - drop
            lo, hi = d - _prev_gap(td_grid, rise), d + _prev_gap(loss_grid, drop)
            g |= {"gap": abs(d), "low": 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi)), "high": max(abs(lo), abs(hi))}
        elif drop is None and rise is None:  # nothing emerged: no evidence either way
            g |= {"gap": math.nan, "low": 0.0, "high": math.inf}
        else:  # one curve moved, the other did not within the run: at least as far as the nearer end of the run
            s = drop if drop is not None else rise
            g |= {"gap": math.nan, "low": float(min(s - start, end - s)), "high": math.inf}
        out.append(g)
    return out


def _f1_rows(synthetic: Any, tolerance: float) -> list[dict]:
    fam = "synthetic"
    if synthetic is None:
        return [_not_run("F1", "coupling", fam, "no synthetic analysis given (synthetic=)", "less", tolerance)]
    results = synthetic if isinstance(synthetic, Mapping) else {None: synthetic}
    gaps = []
    for key, res in results.items():
        gaps += _basis_gaps(res, "" if key is None else f"seed {key} ")
    if not gaps:
        return [_not_run("F1", "coupling", fam, "the analysis has no bases", "less", tolerance)]
    length = max(g["length"] for g in gaps)
    if length <= 0:
        return [_row("F1", "coupling", fam, verdict=S.INCONCLUSIVE, side="less", threshold=tolerance,
                     note="a single checkpoint: nothing to time")]
    rel = [{**g, "gap": g["gap"] / length, "low": g["low"] / length, "high": g["high"] / length} for g in gaps]
    moved = [g for g in rel if g["drop"] is not None or g["rise"] is not None]
    est = max((g["gap"] if not math.isnan(g["gap"]) else g["low"]) for g in moved) if moved else math.nan
    ci = (max(g["low"] for g in rel), max(g["high"] for g in rel))
    both = [g for g in gaps if g["drop"] is not None and g["rise"] is not None]
    ours = "; ".join(f"{g['basis']}: drop {g['drop']}, TD rise {g['rise']}" for g in gaps)
    notes = [f"steps: {gaps[0]['drop_kind']} of each basis' loss vs the TD-rise step at the TD layer; run length "
             f"{length} steps"]
    if len(both) >= 3:
        from scipy.stats import spearmanr

        rho = spearmanr([g["drop"] for g in both], [g["rise"] for g in both]).statistic
        notes.append(f"order of drops vs rises: Spearman {_f(float(rho), 2)} over {len(both)} bases")
    missing = [g["basis"] for g in gaps if g["drop"] is None or g["rise"] is None]
    if missing:
        notes.append(f"no drop and/or no TD rise within the run: {', '.join(missing)}")
    return [_decided("F1", "coupling", fam, estimate=est, ci=ci, threshold=tolerance, side="less", ours=ours,
                     statistic="max over bases of |TD-rise step - loss-drop step| / run length",
                     test="interval from the checkpoint grid (each crossing lies between the checkpoint before it "
                          "and its own)", note="; ".join(notes))]


# ------------------------------------------------------------------------------------------------
# F2, F3, F4: sweeps
# ------------------------------------------------------------------------------------------------
def _f2_rows(family: str, sweep: Any, n_boot: int, seed: int, ci_level: float) -> list[dict]:
    overall = _overall(sweep.td)
    shots = sorted(int(s) for s in overall["shots"].unique())
    points = _points(sweep)
    rows = []
    layer = _peak_layer_mean_over_shots(overall) if len(overall) else None
    if len(shots) < 2:
        rows.append(_not_run("F2", "shots", family, f"the sweep has one shot count ({shots}): nothing to compare"))
    else:
        lo_s, hi_s = shots[0], shots[-1]
        stat = f"TD({hi_s}-shot) - TD({lo_s}-shot) at layer {layer} (peak of the mean TD over shots)"
        if points is not None:
            a, b = _point_vector(points, DEMOS, hi_s, layer), _point_vector(points, DEMOS, lo_s, layer)
            if _same_queries(getattr(sweep, "predictions", None), hi_s, lo_s):
                pair = a.merge(b, on=["task", "index"], suffixes=("_h", "_l"))
                r = S.paired_bootstrap(pair["correct_h"], pair["correct_l"], n_boot=n_boot, seed=seed,
                                       strata=pair["task"], ci_level=ci_level)
                test = "paired bootstrap over points (the same queries at both shot counts, by task)"
            else:
                r = S.bootstrap_difference(a["correct"], b["correct"], n_boot=n_boot, seed=seed, ci_level=ci_level,
                                           strata_first=a["task"], strata_second=b["task"])
                test = "bootstrap over points (two prompt sets, by task)"
            est, ci = r.estimate, (r.ci_low, r.ci_high)
        else:
            est, lo, hi = S.difference_from_cis(_td_at(overall, layer, hi_s), _td_at(overall, layer, lo_s),
                                                ci_level=ci_level)
            ci, test = (lo, hi), "from the stored bootstrap CIs (normal approx., independent prompt sets)"
        tds = ", ".join(f"{s}: {_f(_td_at(overall, layer, s)[0])}" for s in shots)
        rows.append(_decided("F2", "shots", family, estimate=est, ci=ci, ours=f"TD by shots at layer {layer}: {tds}",
                             statistic=stat, test=test))
    for aspect, ctx in (("context", INPUT_ONLY), ("labels", SHUFFLED)):
        rows.append(_f2_context_row(family, sweep, points, layer, shots, aspect, ctx, n_boot, seed, ci_level))
    return rows


def _f2_context_row(family: str, sweep: Any, points: pd.DataFrame | None, layer: int | None, shots: list[int],
                    aspect: str, ctx: str, n_boot: int, seed: int, ci_level: float) -> dict:
    other = _overall(sweep.td, ctx)
    if other.empty or layer is None or not shots:
        return _not_run("F2", aspect, family, f"the sweep has no {ctx!r} TD (a sweep with that context control)")
    demos = _overall(sweep.td)
    if ctx == SHUFFLED:  # the same shot count on both sides
        common = sorted(set(shots) & {int(s) for s in other["shots"]})
        if not common:
            return _not_run("F2", aspect, family, "no shot count has both k-shot and shuffled-label TD")
        k = other_k = common[-1]
    else:  # input only: shots 0 (or stored under the k-shot set's count)
        k = shots[-1]
        have = {int(s) for s in other["shots"]}
        other_k = k if k in have else (0 if 0 in have else max(have))
    label = "input only" if ctx == INPUT_ONLY else "labels shuffled"
    stat = f"TD({k}-shot) - TD({label}) at layer {layer}"
    note = ""
    if points is not None and not _context(points, ctx).empty:
        a, b = _point_vector(points, DEMOS, k, layer), _point_vector(points, ctx, other_k, layer)
        pair = a.merge(b, on=["task", "index"], suffixes=("_k", "_c"))
        if len(pair):
            r = S.paired_bootstrap(pair["correct_k"], pair["correct_c"], n_boot=n_boot, seed=seed,
                                   strata=pair["task"], ci_level=ci_level)
            test = "paired bootstrap over the same queries (by task)"
            if len(pair) < max(len(a), len(b)):
                note = f"{len(pair)} queries in both sets (of {len(a)} and {len(b)})"
        else:
            r = S.bootstrap_difference(a["correct"], b["correct"], n_boot=n_boot, seed=seed, ci_level=ci_level,
                                       strata_first=a["task"], strata_second=b["task"])
            test, note = "bootstrap over points (unpaired: no common query index)", "the point sets share no index"
        est, ci = r.estimate, (r.ci_low, r.ci_high)
    else:
        est, lo, hi = S.difference_from_cis(_td_at(demos, layer, k), _td_at(other, layer, other_k), ci_level=ci_level)
        ci, test = (lo, hi), "from the stored bootstrap CIs (normal approx.; conservative for paired queries)"
    ours = f"TD {_f(_td_at(demos, layer, k)[0])} ({k}-shot) vs {_f(_td_at(other, layer, other_k)[0])} ({label})"
    return _decided("F2", aspect, family, estimate=est, ci=ci, ours=ours, statistic=stat, test=test, note=note)


def _f3_rows(family: str, sweep: Any, n_boot: int, seed: int, ci_level: float) -> list[dict]:
    overall = _overall(sweep.td)
    if overall.empty:
        return [_not_run("F3", "peak", family, "the sweep has no overall TD rows")]
    k = int(overall["shots"].max())
    at = overall[overall["shots"] == k].sort_values("layer")
    layers = [int(x) for x in at["layer"]]
    if len(layers) < 3:
        return [_not_run("F3", "peak", family, f"{len(layers)} layers captured: no middle to peak in")]
    first, last, inner = layers[0], layers[-1], layers[1:-1]
    td = dict(zip(layers, at["td"].astype(float), strict=True))
    peak = max(layers, key=lambda layer: td[layer])
    best_inner = max(inner, key=lambda layer: td[layer])
    end = first if td[first] >= td[last] else last
    depth = (peak - first) / (last - first)
    stat = f"max over middle layers of TD - max(TD at layer {first}, TD at layer {last}), {k}-shot"
    points = _points(sweep)
    if points is not None and not _point_vector(points, DEMOS, k, first).empty:
        p = _context(points, DEMOS)
        p = p[p["shots"] == k].pivot_table(index=["task", "index"], columns="layer", values="correct")
        m = p.reindex(columns=layers).to_numpy(dtype=float)
        tasks = p.index.get_level_values("task").to_numpy()

        def statistic(rows: np.ndarray) -> float:
            v = m[rows].mean(axis=0)
            return float(v[1:-1].max() - max(v[0], v[-1]))

        r = S.bootstrap_statistic(statistic, len(m), n_boot=n_boot, seed=seed, strata=tasks, ci_level=ci_level)
        est, ci = r.estimate, (r.ci_low, r.ci_high)
        test = "bootstrap over points (the same points at every layer, by task; the peak re-chosen per resample)"
    else:
        est, lo, hi = S.difference_from_cis(_td_at(at, best_inner), _td_at(at, end), ci_level=ci_level)
        ci, test = (lo, hi), "from the stored bootstrap CIs (normal approx.) at the best middle layer"
    ours = (f"peak layer {peak} of {first}-{last} (relative depth {_f(depth, 2)}), TD {_f(td[peak])}; first "
            f"{_f(td[first])}, last {_f(td[last])}")
    note = (f"peak - first {_f(td[best_inner] - td[first])}, peak - last {_f(td[best_inner] - td[last])} "
            f"(best middle layer {best_inner})")
    return [_decided("F3", "peak", family, estimate=est, ci=ci, ours=ours, statistic=stat, test=test, note=note)]


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.ptp(x) == 0:
        return math.nan
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def _f4_rows(family: str, sweep: Any, alpha: float, n_boot: int, seed: int, ci_level: float) -> list[dict]:
    fit = dict(sweep.fit or {})
    layer = fit.get("layer")
    if layer is None:
        return [_not_run("F4", "fit", family, "the sweep has no TD-vs-accuracy fit")]
    td = _context(sweep.td, DEMOS)
    acc = _context(sweep.accuracy, DEMOS)
    per_task = td[(td["level"] == "task") & (td["layer"] == layer)][["task", "shots", "td"]]
    pts = per_task.merge(acc[["task", "shots", "exact"]], on=["task", "shots"])
    include_null = bool(getattr(getattr(sweep, "config", None), "fit_include_null", False))
    if not include_null:
        from .tasks import NULL_TASK

        pts = pts[pts["task"] != NULL_TASK]
    x, y = pts["td"].to_numpy(float), pts["exact"].to_numpy(float)
    slope = float(fit.get("slope", math.nan))
    r2, p = float(fit.get("r2", math.nan)), float(fit.get("p_value", math.nan))
    stat = f"slope of accuracy on per-task TD at layer {layer} over tasks x shots"
    ours = f"R^2 {_f(r2, 2)}, slope {_f(slope)} (p {_f(p, 4)}, {len(pts)} points, layer {layer})"
    if len(pts) < 3 or math.isnan(slope):
        return [_row("F4", "fit", family, verdict=S.INCONCLUSIVE, ours=ours, statistic=stat, estimate=slope,
                     p_value=p, test="linear regression t-test (fit undefined)",
                     note=fit.get("note", "fewer than 3 points or constant TD / accuracy"))]
    r = S.bootstrap_statistic(lambda rows: _slope(x[rows], y[rows]), len(x), n_boot=n_boot, seed=seed,
                              ci_level=ci_level)
    return [_decided("F4", "fit", family, estimate=slope, ci=(r.ci_low, r.ci_high), p_value=p, alpha=alpha,
                     ours=ours, statistic=stat,
                     test="linear regression t-test p-value, bootstrap CI of the slope over points",
                     note=f"R^2 {_f(r2, 2)} (paper's R^2 in 'paper')")]


# ------------------------------------------------------------------------------------------------
# F5: patching (k-shot) and zero-shot task vectors
# ------------------------------------------------------------------------------------------------
def _paired_binary_row(finding: str, aspect: str, family: str, first: np.ndarray, second: np.ndarray,
                       strata: np.ndarray, *, side: str, alpha: float, n_boot: int, seed: int, ci_level: float,
                       stat: str, ours: str, note: str = "") -> dict:
    m = S.mcnemar_exact(first, second)
    r = S.paired_bootstrap(first, second, n_boot=n_boot, seed=seed, strata=strata, ci_level=ci_level)
    note = "; ".join(x for x in (f"discordant pairs {m.b} / {m.c} of {m.n}", note) if x)
    return _decided(finding, aspect, family, estimate=r.estimate, ci=(r.ci_low, r.ci_high), p_value=m.p_value,
                    alpha=alpha, side=side, ours=ours, statistic=stat,
                    test="exact McNemar (two-sided) + paired bootstrap CI (by task)", note=note)


def _f5_rows(family: str, patch: Any, alpha: float, n_boot: int, seed: int, ci_level: float,
             metric: str) -> list[dict]:
    preds = patch.predictions
    layer = (patch.summary or {}).get("layer")
    if metric not in preds:
        return [_not_run("F5", a, family, f"the patching predictions have no {metric!r} column",
                         "greater" if a == "positive" else "less") for a in ("positive", "negative")]
    if layer is None or "direction" not in preds:
        return [_not_run("F5", a, family, "the patching result has no chosen layer / directions",
                         "greater" if a == "positive" else "less") for a in ("positive", "negative")]
    base = preds[preds["direction"] == "baseline"][["prompt_id", "task", metric]]
    neg = preds.loc[preds["direction"] == "negative", "vector"]
    null = str(neg.iloc[0]) if len(neg) else "null"
    rows = []
    at = preds[_at_layer(preds["layer"], layer) & preds["direction"].isin(["positive", "negative"])]
    for aspect in ("positive", "negative"):
        side = "greater" if aspect == "positive" else "less"
        sub = at[at["direction"] == aspect]
        if sub.empty:
            rows.append(_not_run("F5", aspect, family, f"no {aspect} patching at layer {layer}", side))
            continue
        for mode in sorted(sub["mode"].unique()):
            pair = sub[sub["mode"] == mode][["prompt_id", "task", metric]].merge(base, on=["prompt_id", "task"],
                                                                                 suffixes=("_p", "_b"))
            pair = pair[pair["task"] != null]  # the Null task's own vector is the negative one
            a, b = pair[f"{metric}_p"].to_numpy(bool), pair[f"{metric}_b"].to_numpy(bool)
            ours = f"{mode}: {_f(b.mean())} -> {_f(a.mean())} ({metric}, layer {layer}, {len(pair)} queries)"
            rows.append(_paired_binary_row(
                "F5", aspect, family, a, b, pair["task"].to_numpy(), side=side, alpha=alpha, n_boot=n_boot, seed=seed,
                ci_level=ci_level, ours=ours, stat=f"accuracy ({mode}, {aspect} vector) - baseline at layer {layer}",
                note=f"mode {mode}; Null-task queries left out"))
    return rows


def _zero_shot_layers(layers: Any, vector: str, tasks: pd.Series) -> pd.Series:
    """The layer each row's task is reported at for ``vector``: ``layers`` is one int, a mapping vector -> int
    (a :class:`~taskvec_interp.experiments.zeroshot.ZeroShotResult`'s ``chosen_layer``) or vector -> task -> int
    (its ``task_layers``)."""
    at = layers.get(vector) if isinstance(layers, Mapping) else layers
    if at is None:
        raise ValueError(f"no chosen layer for the {vector!r} vector (have {sorted(layers)})")
    if isinstance(at, Mapping):
        return tasks.map(lambda t: at.get(t, math.nan)).astype(float)
    return pd.Series(float(int(at)), index=tasks.index)


def _f5_zero_shot_rows(family: str, entry: Any, alpha: float, n_boot: int, seed: int, ci_level: float,
                       metric: str | None) -> list[dict]:
    if isinstance(entry, tuple):
        preds, layers = entry
    else:
        preds = entry.predictions
        layers = getattr(entry, "task_layers", None) or entry.chosen_layer
        metric = metric or getattr(getattr(entry, "config", None), "scoring", None)
    metric = metric or "exact"
    p = preds[preds["split"] == "test"] if "split" in preds else preds
    base = p[p["condition"] == "baseline"].drop_duplicates(["task", "query"])[["task", "query", metric]]
    tv = p[p["condition"] == "task_vector"]
    icl = p[p["condition"] == "icl"].drop_duplicates(["task", "query"])
    rows = []
    for vector in sorted(tv["vector"].astype(str).unique()):
        sub = tv[tv["vector"].astype(str) == vector]
        want = _zero_shot_layers(layers, vector, sub["task"])
        sub = sub[pd.to_numeric(sub["layer"], errors="coerce").astype(float).eq(want).to_numpy()]
        sub = sub.drop_duplicates(["task", "query"])
        where = sorted({int(x) for x in sub["layer"]})
        pair = sub[["task", "query", metric]].merge(base, on=["task", "query"], suffixes=("_v", "_b"))
        if pair.empty:
            rows.append(_not_run("F5", "zero-shot", family, f"no test-split queries with both the baseline and the "
                                                            f"{vector} task vector at its chosen layer"))
            continue
        a, b = pair[f"{metric}_v"].to_numpy(bool), pair[f"{metric}_b"].to_numpy(bool)
        at = f"layer {where[0]}" if len(where) == 1 else f"layers {where} (per task)"
        icl_txt = f", ICL {_f(icl[metric].astype(float).mean())}" if len(icl) else ""
        ours = (f"baseline {_f(b.mean())} -> task vector ({vector}) {_f(a.mean())}{icl_txt} ({metric}, test split, "
                f"{at}, {len(pair)} queries)")
        rows.append(_paired_binary_row(
            "F5", "zero-shot", family, a, b, pair["task"].to_numpy(), side="greater", alpha=alpha, n_boot=n_boot,
            seed=seed, ci_level=ci_level, ours=ours,
            stat=f"zero-shot accuracy with the {vector} task vector - without, at {at} (chosen on dev)",
            note=f"vector {vector}; alpha {alpha}"))
    if not rows:
        rows.append(_not_run("F5", "zero-shot", family, "no test-split task-vector rows"))
    return rows


# ------------------------------------------------------------------------------------------------
# F6: fine-tuning first vs last layers
# ------------------------------------------------------------------------------------------------
def _which(label: str) -> str | None:
    m = re.search(r"\b(first|last)\b", label)
    return m.group(1) if m else None


def _f6_from_runs(family: str, runs: Sequence[Any], alpha: float, n_boot: int, seed: int, ci_level: float,
                  metric: str) -> list[dict]:
    from .tasks import NULL_TASK

    named: dict[str, Any] = {}
    pretrained = None
    for run in runs:
        side = _which(str(run.config.layers)) if isinstance(run.config.layers, str) else None
        if side is None and run.layers:
            n = int((run.model or {}).get("n_layers") or 0)
            side = "first" if min(run.layers) == 0 else ("last" if n and max(run.layers) == n - 1 else None)
        if side is not None and side not in named:
            named[side] = run
        if pretrained is None and run.eval_pretrained is not None:
            pretrained = run.eval_pretrained
    if set(named) != {"first", "last"} or any(r.eval is None for r in named.values()):
        why = f"need one evaluated first-k and one last-k run, got {sorted(named)}"
        return [_not_run("F6", "accuracy", family, why), _not_run("F6", "TD", family, why)]
    first, last = named["first"].eval, named["last"].eval
    keys = ["task", "prompt_id"] + [c for c in ("query", "answer") if c in first.predictions and c in last.predictions]
    a = first.predictions[first.predictions["task"] != NULL_TASK][[*keys, metric]]
    b = last.predictions[last.predictions["task"] != NULL_TASK][[*keys, metric]]
    pair = a.merge(b, on=keys, suffixes=("_f", "_l"))
    lf, ll = named["first"].label, named["last"].label
    ours = f"{lf} {_f(a[metric].mean())} vs {ll} {_f(b[metric].mean())} ({metric})"
    if pretrained is not None:
        pp = pretrained.predictions
        ours += f"; pretrained {_f(pp.loc[pp['task'] != NULL_TASK, metric].mean())}"
    stat = f"accuracy ({lf}) - accuracy ({ll}) on the evaluation queries"
    if len(pair) == len(a) == len(b) and len(pair):
        rows = [_paired_binary_row("F6", "accuracy", family, pair[f"{metric}_f"].to_numpy(bool),
                                   pair[f"{metric}_l"].to_numpy(bool), pair["task"].to_numpy(), side="greater",
                                   alpha=alpha, n_boot=n_boot, seed=seed, ci_level=ci_level, stat=stat, ours=ours)]
    else:  # not the same queries: two proportions
        d, lo, hi = S.newcombe_difference(int(a[metric].sum()), len(a), int(b[metric].sum()), len(b), ci_level=ci_level)
        rows = [_decided("F6", "accuracy", family, estimate=d, ci=(lo, hi), ours=ours, statistic=stat,
                         test="Newcombe score CI of two independent proportions",
                         note="the two evaluations are not the same queries: unpaired")]
    rows.append(_f6_td_row(family, pretrained, first, last, lf, ll, n_boot, seed, ci_level))
    return rows


def _f6_td_row(family: str, pretrained: Any, first: Any, last: Any, lf: str, ll: str, n_boot: int, seed: int,
               ci_level: float) -> dict:
    if pretrained is None:
        return _not_run("F6", "TD", family, "no pretrained evaluation in the runs (eval_before)")
    base = _overall(pretrained.td)
    k = int(base["shots"].max())
    layer = int(base[base["shots"] == k].sort_values("td").iloc[-1]["layer"])
    stat = f"TD ({lf}) - TD (pretrained) at layer {layer} (the pretrained peak), {k}-shot"
    f_td, p_td, l_td = (_td_at(_overall(r.td), layer, k) for r in (first, pretrained, last))
    ours = f"TD pretrained {_f(p_td[0])}, {lf} {_f(f_td[0])}, {ll} {_f(l_td[0])} (layer {layer})"
    pf, pp = _points(first), _points(pretrained)
    if pf is not None and pp is not None:
        pair = _point_vector(pf, DEMOS, k, layer).merge(_point_vector(pp, DEMOS, k, layer), on=["task", "index"],
                                                        suffixes=("_f", "_p"))
        r = S.paired_bootstrap(pair["correct_f"], pair["correct_p"], n_boot=n_boot, seed=seed, strata=pair["task"],
                               ci_level=ci_level)
        est, ci, test = r.estimate, (r.ci_low, r.ci_high), "paired bootstrap over the same evaluation points (by task)"
    else:
        est, lo, hi = S.difference_from_cis(f_td, p_td, ci_level=ci_level)
        ci, test = (lo, hi), "from the stored bootstrap CIs (normal approx.; conservative for the same queries)"
    return _decided("F6", "TD", family, estimate=est, ci=ci, ours=ours, statistic=stat, test=test,
                    note=f"{ll} changes TD by {_f(l_td[0] - p_td[0])}")


def _f6_from_comparison(family: str, comp: Any, n_boot: int, seed: int, ci_level: float) -> list[dict]:
    from .tasks import NULL_TASK

    per = comp.per_task[comp.per_task["task"] != NULL_TASK]
    models = list(dict.fromkeys(per["model"]))
    named = {}
    for m in models:
        side = _which(str(m))
        if side and side not in named:
            named[side] = m
    if set(named) != {"first", "last"}:
        why = f"the comparison needs one first-k and one last-k model, has {models}"
        return [_not_run("F6", "accuracy", family, why), _not_run("F6", "TD", family, why)]
    wide = per.pivot_table(index="task", columns="model", values=["exact", "td"])
    lf, ll = named["first"], named["last"]
    ef, el = wide[("exact", lf)].to_numpy(float), wide[("exact", ll)].to_numpy(float)
    ours = f"{lf} {_f(ef.mean())} vs {ll} {_f(el.mean())} (exact, mean over {len(ef)} tasks)"
    stat = f"mean over tasks of accuracy ({lf}) - accuracy ({ll})"
    if "n" in per:
        n = per.pivot_table(index="task", columns="model", values="n")
        kf, kl = int(round((ef * n[lf]).sum())), int(round((el * n[ll]).sum()))
        d, lo, hi = S.newcombe_difference(kf, int(n[lf].sum()), kl, int(n[ll].sum()), ci_level=ci_level)
        rows = [_decided("F6", "accuracy", family, estimate=d, ci=(lo, hi), ours=ours, statistic=stat,
                         test="Newcombe score CI of two proportions (aggregated counts)")]
    else:
        r = S.paired_bootstrap(ef, el, n_boot=n_boot, seed=seed, ci_level=ci_level)
        rows = [_decided("F6", "accuracy", family, estimate=r.estimate, ci=(r.ci_low, r.ci_high), ours=ours,
                         statistic=stat, test="paired bootstrap over tasks (the comparison has no per-query "
                                              "predictions)")]
    if "pretrained" not in models:
        rows.append(_not_run("F6", "TD", family, "the comparison has no pretrained model"))
    else:
        tf, tp = wide[("td", lf)].to_numpy(float), wide[("td", "pretrained")].to_numpy(float)
        r = S.paired_bootstrap(tf, tp, n_boot=n_boot, seed=seed, ci_level=ci_level)
        rows.append(_decided("F6", "TD", family, estimate=r.estimate, ci=(r.ci_low, r.ci_high),
                             ours=f"per-task TD pretrained {_f(tp.mean())} -> {lf} {_f(tf.mean())}",
                             statistic=f"mean over tasks of TD ({lf}) - TD (pretrained)",
                             test="paired bootstrap over tasks"))
    return rows


# ------------------------------------------------------------------------------------------------
# the scoreboard
# ------------------------------------------------------------------------------------------------
def findings(
    *,
    synthetic: Any = None,
    sweeps: Mapping[str, Any] | None = None,
    patching: Mapping[str, Any] | None = None,
    zero_shot: Mapping[str, Any] | None = None,
    finetune: Mapping[str, Any] | None = None,
    alpha: float = 0.05,
    zero_shot_alpha: float = 0.01,
    n_boot: int = 2000,
    seed: int = 0,
    ci_level: float = 0.95,
    f1_tolerance: float = 0.1,
    metric: str = "exact",
    zero_shot_metric: str | None = None,
) -> pd.DataFrame:
    """The findings scoreboard (:data:`COLUMNS`), one row per finding, aspect and family; inputs not given give
    ``not run`` rows. Every input may be a result object or its directory.

    Args:
        synthetic: an :class:`~taskvec_interp.synthetic.analysis.AnalysisResult` (or a mapping seed -> one,
            pooled), for F1.
        sweeps: family -> :class:`~taskvec_interp.experiments.sweep.SweepResult`, for F2, F3, F4. Its ``td`` table
            may carry a ``context`` column (``demos`` / ``input_only`` / ``shuffled``; none means ``demos``) and
            the result a ``td_points`` table (``layer, shots, context, index, task, correct``).
        patching: family -> :class:`~taskvec_interp.experiments.patching.PatchResult`, for F5 (positive and
            negative, per intervention mode, at the result's summary layer).
        zero_shot: family -> ``(predictions, chosen_layer)`` or a
            :class:`~taskvec_interp.experiments.zeroshot.ZeroShotResult`-like object (``.predictions``,
            ``.task_layers`` or ``.chosen_layer``): ``predictions`` has ``task, split, layer, condition, vector,
            query`` and the metric's column; the chosen layer is an int, a mapping vector -> int or vector ->
            task -> int. For F5's zero-shot rows, one per vector.
        finetune: family -> a :class:`~taskvec_interp.experiments.finetune.FinetuneComparison` or a sequence of
            :class:`~taskvec_interp.experiments.finetune.FinetuneResult` (a directory of either, or a directory
            of runs), for F6.
        alpha: significance level of the p-value tests; ``zero_shot_alpha`` that of F5's zero-shot row.
        n_boot: bootstrap resamples of every CI.
        seed: the seed of every bootstrap (each one seeded on its own: an added input moves no other row's CI).
        ci_level: the CIs' two-sided level.
        f1_tolerance: F1's threshold, as a fraction of the run's length.
        metric: the per-query correctness column of F5 and F6 (``exact`` or ``first_token``).
        zero_shot_metric: that of F5's zero-shot rows (default: a zero-shot result's own ``config.scoring``,
            else ``metric``).

    Verdicts (``side`` says where the paper's claim is, ``threshold`` the line):

    * F1: the per-basis gap |TD-rise step - loss-drop step| (the below-ridge step where the analysis has the
      ridge oracle, else the loss-drop midpoint), bounded by the checkpoint grid, divided by the run's length;
      the row's statistic is the max over bases (its interval: the max of the lower and of the upper bounds).
      Reproduced if the upper bound < ``f1_tolerance``; not reproduced if the lower bound > it; a basis
      without drop or rise bounds nothing above (inconclusive at best).
    * F2 shots: TD at the largest minus the smallest shot count at the layer of the peak of the mean TD over
      shots; context / labels: k-shot TD minus input-only / shuffled-label TD at that layer (paired on the
      same queries where ``td_points`` exist). Reproduced if the CI > 0, not reproduced if < 0.
    * F3: at the largest shot count, the max TD over the middle layers minus the max of the first and last
      layer's TD. Reproduced if the CI > 0 (an interior peak above both ends), not reproduced if < 0.
    * F4: the sweep's fit slope; reproduced if p < ``alpha`` and the slope's bootstrap CI > 0, not reproduced
      if p < ``alpha`` and the CI < 0.
    * F5: patched minus baseline accuracy on the same queries (Null-task queries left out); positive:
      reproduced if McNemar p < ``alpha`` and CI > 0; negative: if p < ``alpha`` and CI < 0; the opposite
      side with p < ``alpha`` is not reproduced. Zero-shot: the same with ``zero_shot_alpha``, on the test
      split at the chosen layer, per vector definition.
    * F6: accuracy of the first-k run minus the last-k run (McNemar + paired bootstrap on the same queries
      where both evaluations hold them); reproduced if CI > 0 (and p < ``alpha``), not reproduced if CI < 0;
      TD: first-k minus pretrained TD at the pretrained peak layer, CI > 0.
    """
    S.verdict(0.0, 0.0, alpha=alpha)  # checks alpha
    S.verdict(0.0, 0.0, alpha=zero_shot_alpha)
    for name, m in (("metric", metric), ("zero_shot_metric", zero_shot_metric or "exact")):
        if m not in ("exact", "first_token"):
            raise ValueError(f"{name} must be 'exact' or 'first_token', got {m!r}")
    if not (isinstance(f1_tolerance, int | float) and 0 < f1_tolerance < 1):
        raise ValueError(f"f1_tolerance must be in (0, 1), got {f1_tolerance!r}")
    boot = {"n_boot": n_boot, "seed": seed, "ci_level": ci_level}
    rows = _f1_rows(_load_synthetic(synthetic) if synthetic is not None else None, f1_tolerance)
    sw = {f: _load(s, "sweep") for f, s in (sweeps or {}).items()}
    for name, fn in (("F2", lambda f, s: _f2_rows(f, s, **boot)), ("F3", lambda f, s: _f3_rows(f, s, **boot)),
                     ("F4", lambda f, s: _f4_rows(f, s, alpha, **boot))):
        if not sw:
            aspects = ("shots", "context", "labels") if name == "F2" else ("peak",) if name == "F3" else ("fit",)
            rows += [_not_run(name, a, "-", "no TD sweep given (sweeps=)") for a in aspects]
        for fam, s in sw.items():
            rows += fn(fam, s)
    if not patching:
        rows += [_not_run("F5", "positive", "-", "no patching result given (patching=)"),
                 _not_run("F5", "negative", "-", "no patching result given (patching=)", "less")]
    for fam, p in (patching or {}).items():
        rows += _f5_rows(fam, _load(p, "patching"), alpha, metric=metric, **boot)
    if not zero_shot:
        rows.append(_not_run("F5", "zero-shot", "-", "no zero-shot task-vector table given (zero_shot=)"))
    for fam, z in (zero_shot or {}).items():
        z = _load(z, "zero_shot")
        rows += _f5_zero_shot_rows(fam, z, zero_shot_alpha, metric=zero_shot_metric or (
            metric if isinstance(z, tuple) else None), **boot)
    if not finetune:
        rows += [_not_run("F6", a, "-", "no fine-tuning runs given (finetune=)") for a in ("accuracy", "TD")]
    for fam, ft in (finetune or {}).items():
        ft = _load_finetune(ft)
        if hasattr(ft, "per_task"):
            rows += _f6_from_comparison(fam, ft, **boot)
        else:
            rows += _f6_from_runs(fam, list(ft), alpha, metric=metric, **boot)
    return pd.DataFrame(rows, columns=list(COLUMNS))


__all__ = ["CLAIMS", "COLUMNS", "PAPER", "findings"]
