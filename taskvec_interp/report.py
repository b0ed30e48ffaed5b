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
    """Fig. 2 (per-basis loss + TD), Fig. 11 (UMAP grid layers x checkpoints), TD heatmap, Fig. 7 (patching),
    Figs. 17-18 (head ablation: layer x head per basis)."""
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
    if result.heads is not None and not result.heads.empty:
        paths.append(out / "head_ablation.png")
        viz.plot_head_ablation(result.heads, path=paths[-1])
    return paths


# ------------------------------------------------------------------------------------ the demo's HTML report

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top} th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums} .paper{color:#555;font-style:italic}
img{max-width:100%;border:1px solid #eee;margin:.4em 0} .skipped{color:#a00} .meta{color:#555;font-size:.9em}
details{margin:.5em 0} pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em}
nav a{margin-right:1em}
"""


def _img(path: Path) -> str:
    import base64

    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{path.name}" src="data:image/png;base64,{data}"><figcaption class="meta">' \
           f'{path.name}</figcaption></figure>'


def _table_html(df: pd.DataFrame, max_rows: int = 40) -> str:
    shown = df.head(max_rows)
    html = shown.to_html(index=False, border=0, float_format=lambda v: f"{v:.3f}", na_rep="")
    more = f'<p class="meta">{len(df) - max_rows} more rows in the table file</p>' if len(df) > max_rows else ""
    return html + more


def _nav_label(part) -> str:
    label = part.title.split(":")[0]
    return f"{label} ({part.name.split('_', 1)[1]})" if "_" in part.name else label


def write_demo_report(result, path: str | Path | None = None) -> Path:
    """ONE self-contained HTML file for a :class:`~taskvec_interp.demo.DemoResult`: each part's
    text, its headline numbers beside the paper's, its figures (embedded as base64 PNG) and tables, then
    the configuration, the model's identity, package versions and wall times."""
    import html
    import json

    from .results import provenance

    out = Path(result.out)
    path = Path(path) if path is not None else out / "report.html"
    esc = html.escape
    body = [f"<h1>Task vectors in in-context learning: the paper's story on {esc(str(result.model.get('name')))}</h1>",
            '<p class="meta">Han, Song, Gore &amp; Agrawal, <i>Emergence and Effectiveness of Task Vectors in '
            "In-Context Learning: An Encoder-Decoder Perspective</i> (ICML 2025), reproduced by taskvec_interp. "
            f"{'Quick settings' if result.config.quick else 'Full settings'}; the parts took "
            f"{sum(p.seconds for p in result.parts):.0f} s together (this run's wall time: {result.seconds:.0f} s; "
            "parts reused from an earlier run count the time they took when they ran).</p>",
            "<nav>" + "".join(f'<a href="#{esc(p.name)}">{esc(_nav_label(p))}</a>' for p in result.parts)
            + "</nav>"]
    for part in result.parts:
        body.append(f'<section id="{esc(part.name)}"><h2>{esc(part.title)}</h2>')
        if part.skipped:
            body.append(f'<p class="skipped">Skipped: {esc(part.skipped)}</p></section>')
            continue
        body.append(f"<p>{esc(part.text)}</p>")
        rows = "".join(f"<tr><td>{esc(r['metric'])}</td><td class='num'>{esc(str(r['ours']))}</td>"
                       f"<td class='paper'>{esc(r['paper'])}</td></tr>" for r in part.headline)
        body.append(f"<table class='headline'><tr><th>headline</th><th>ours</th><th>paper</th></tr>{rows}</table>")
        for fig in part.figures:
            body.append(_img(out / fig))
        for caption, table in part.tables.items():
            body.append(f"<details open><summary>{esc(caption)} (<code>{esc(table)}</code>)</summary>"
                        f"{_table_html(pd.read_parquet(out / table))}</details>")
        body.append(f'<p class="meta">wall time {part.seconds:.0f} s</p></section>')
    from dataclasses import asdict

    times = "".join(f"<tr><td>{esc(p.name)}</td><td class='num'>{'skipped' if p.skipped else f'{p.seconds:.0f} s'}"
                    f"</td></tr>" for p in result.parts)
    meta = {"config": asdict(result.config), "resolved settings": result.config.resolved(),
            **provenance(result.model)}
    body.append("<section id='provenance'><h2>Configuration, model and versions</h2>"
                f"<table><tr><th>part</th><th>wall time</th></tr>{times}</table>"
                f"<pre>{esc(json.dumps(meta, indent=2, default=str))}</pre></section>")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>taskvec_interp demo</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    from .checkpoints import atomic_write_text

    atomic_write_text(path, page)
    return path
