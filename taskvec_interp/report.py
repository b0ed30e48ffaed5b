"""Figures from result objects (the CLI's and notebooks' one-call entry points)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import viz
from .activations import Activations
from .experiments.patching import PatchResult
from .experiments.sweep import SweepResult
from .experiments.trajectory import TrajectoryResult
from .synthetic.analysis import AnalysisResult, basis_names


def sweep_figures(result: SweepResult, out: str | Path, umap: bool = True) -> list[Path]:
    """TD per layer, per-task TD (bars + heatmap), TD vs accuracy, and a UMAP of the peak layer.

    The UMAP uses the largest shot count's activations at its overall-TD peak layer.
    """
    out = Path(out) / "figures"
    fam = result.fit.get("family", result.config.family)
    paths = [out / "td_by_layer.png", out / "task_td.png", out / "task_td_heatmap.png", out / "td_vs_accuracy.png"]
    viz.plot_td_by_layer(result.td, path=paths[0], title=f"{fam}: task decodability by layer")
    viz.plot_task_td(result.td, path=paths[1])
    viz.plot_task_td_heatmap(result.td, path=paths[2])
    viz.plot_td_vs_accuracy(result.td, result.accuracy, result.fit, path=paths[3])
    if umap and result.activations:
        shots = max(result.activations)
        acts, labels = result.activations[shots]
        peaks = viz.td_peaks(result.td)
        peak = int(peaks[peaks["shots"] == shots]["layer"].iloc[0])
        layers = result.td["layer"].drop_duplicates().tolist()
        names = result.td.loc[result.td["level"] == "task", "task"].drop_duplicates().tolist()
        path = out / f"umap_layer{peak}_{shots}shot.png"
        at_peak = acts[peak] if isinstance(acts, Activations) else acts[layers.index(peak)]
        viz.plot_umap(at_peak, labels.tolist(), label_names=names, seed=result.config.seed,
                      path=path, title=f"{fam}, layer {peak}, {shots}-shot")
        paths.append(path)
    return paths


def patching_figures(result: PatchResult, out: str | Path) -> list[Path]:
    """Fig. 20-like bars at the headline layer, layer x task heatmaps of the change (positive and
    negative), and the source x target matrix when the run has one."""
    out = Path(out) / "figures"
    acc, layer = result.accuracy, result.summary["layer"]
    fam = result.config.family
    shots = "zero-shot" if result.config.zero_shot else f"{result.config.shots}-shot"
    paths = [out / f"patch_bars_layer{layer}.png"]
    viz.plot_patch_bars(acc, layer, path=paths[0], title=f"{fam}, {shots}, {result.vectors.definition} vectors")
    values = ["delta"] + (["logprob_delta"] if "logprob_delta" in acc else [])
    for direction in ("positive", "negative"):
        if direction in set(acc["direction"]) and acc.loc[acc["direction"] == direction, "layer"].nunique() > 1:
            for value in values:
                suffix = "" if value == "delta" else "_logprob"
                paths.append(out / f"patch_heatmap_{direction}{suffix}.png")
                viz.plot_patch_heatmap(acc, direction, path=paths[-1], title=f"{fam}, {shots}", value=value)
    if "cross" in set(acc["direction"]):
        for mode in result.config.modes:
            paths.append(out / f"patch_matrix_layer{layer}_{mode}.png")
            viz.plot_patch_matrix(acc, layer, mode, path=paths[-1])
    return paths


def finetune_figures(per_task: pd.DataFrame, td: pd.DataFrame, out: str | Path, title: str | None = None) -> list[Path]:
    """Per-task accuracy bars of every model (Fig. 24-like) and TD by layer before / after."""
    out = Path(out) / "figures"
    paths = [out / "accuracy_per_task.png", out / "td_by_layer.png"]
    viz.plot_finetune_accuracy(per_task, path=paths[0], title=title)
    viz.plot_finetune_td(td, path=paths[1], title=title)
    return paths


def trajectory_figures(result: TrajectoryResult, out: str | Path, title: str | None = None) -> list[Path]:
    """Fig. 5-like mean TD and accuracy (or the synthetic model's MSE) against the step, and the overall TD
    as a layer x checkpoint heatmap."""
    out = Path(out) / "figures"
    paths = [out / "trajectory.png", out / "td_heatmap.png"]
    viz.plot_trajectory(result.summary, outcome=result.outcome, path=paths[0], title=title)
    viz.plot_td_heatmap_steps(result.td, path=paths[1])
    return paths


def synthetic_figures(result: AnalysisResult, out: str | Path) -> list[Path]:
    """Fig. 2 (per-basis loss + TD), Fig. 11 (UMAP grid layers x checkpoints), TD heatmap, Fig. 7 (patching)."""
    out = Path(out) / "figures"
    layer = result.summary["td_layer"]
    paths = [out / "loss_and_td.png", out / "td_heatmap.png"]
    viz.plot_basis_emergence(result.loss, result.td, layer, path=paths[0])
    viz.plot_td_heatmap_steps(result.td, path=paths[1])
    if result.embeddings:
        paths.append(out / "umap_grid.png")
        n_bases = len(result.summary["bases"])
        viz.plot_umap_grid(result.embeddings, path=paths[-1], row_label="layer", col_label="step",
                           label_names=basis_names(n_bases))
    if not result.patching.empty:
        paths.append(out / "patching.png")
        viz.plot_patching(result.patching, path=paths[-1])
    return paths
