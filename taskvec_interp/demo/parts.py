"""The demo's parts, each a plain library call writing into its own directory and returning a :class:`Part`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..results import read_json
from .config import (
    PAPER,
    DemoConfig,
    DemoFinetuneConfig,
    DemoPatchConfig,
    DemoSyntheticConfig,
    DemoTDConfig,
    DemoTrajectoryConfig,
)
from .result import Part


def _row(metric: str, ours: Any, paper: str = "") -> dict:
    return {"metric": metric, "ours": ours, "paper": paper}


def _rel(paths: list[Path], out: Path) -> list[str]:
    return [str(Path(p).relative_to(out)) for p in paths]


def _pos_available() -> str | None:
    """Why the POS family cannot be built here (no treebank offline), or ``None``."""
    from ..tasks import get_family

    try:
        get_family("pos")
    except (ValueError, OSError) as err:
        return f"no Universal Dependencies treebank available ({str(err).splitlines()[0][:200]}); set TASKVEC_UD_PATH"
    return None


def _synthetic(d: Path, out: Path, s: DemoSyntheticConfig, seed: int, progress: bool) -> Part:
    from ..figures import synthetic_figures
    from ..synthetic import train, train_config
    from ..synthetic.analysis import AnalysisConfig, analyze_run

    run = d / "run"
    train(train_config(s.config, steps=s.steps, seed=seed), run, progress=progress)
    result = analyze_run(run, AnalysisConfig(n_per_basis=s.n_per_basis, k=s.k,
                                             umap_checkpoints=s.umap_checkpoints), progress=progress)
    result.save(d / "analysis")
    figs = synthetic_figures(result, d / "analysis")
    sm = result.summary
    bases = sm["bases"]
    order = sorted((b["below_ridge_step"] if b["below_ridge_step"] is not None else 10**12, name)
                   for name, b in bases.items())
    gaps = [b["gap_closed"] for b in bases.values() if b["gap_closed"] is not None]
    headline = [
        _row(f"TD at the middle layer ({sm['td_layer']}), last checkpoint", f"{sm['td_last']:.3f} "
             f"(chance {sm['chance']:.2f}; first checkpoint {sm['td_first']:.3f})", PAPER["synthetic_td"]),
        _row("per-basis TD at the last checkpoint", ", ".join(f"{n} {b['final_td']:.2f}" for n, b in bases.items())),
        _row("order in which bases go below the basis-agnostic error",
             " < ".join(f"{n} ({'never' if st >= 10**12 else st})" for st, n in order), PAPER["synthetic_order"]),
        _row("share of the sparsity gap closed by the final loss (0 ridge, 1 rank-r oracle)",
             f"mean {sum(gaps) / len(gaps):.2f}" if gaps else "n/a"),
    ]
    cfg = read_json(run / "config.json")
    text = (f"A {cfg['model']['n_layer']}-layer GPT-2 (d_model {cfg['model']['d_model']}) trained for {s.steps} "
            f"steps on the Mixture of Sparse Linear Regression ({cfg['data']['n_bases']} bases, D = "
            f"{cfg['data']['n_dims']}). TD is the leave-one-out k-NN decodability of the basis from the residual "
            "stream at the y token of the last demonstration. Encoding (TD) and decoding (the basis's loss) emerge "
            "together.")
    return Part("synthetic", "(a) Synthetic emergence: encoding and decoding rise together", text, headline,
                _rel(figs, out), {"TD per layer and checkpoint (overall)": str((d / "analysis" / "td.parquet").relative_to(out))})


def _td(d: Path, out: Path, adapter, fam: str, s: DemoTDConfig, config: DemoConfig, progress: bool) -> Part:
    from ..experiments.sweep import SweepConfig, run_sweep, summarize
    from ..figures import sweep_figures

    cfg = SweepConfig(model=config.model, backend=config.backend, family=fam, shots=tuple(s.shots),
                      n_per_task=s.n_per_task, k=s.k, n_boot=s.n_boot, seed=config.seed)
    result = run_sweep(adapter, cfg, progress=progress)
    result.save(d / "sweep")
    figs = sweep_figures(result, d / "sweep", umap=False)
    summ = summarize(result)
    summ.to_parquet(d / "summary.parquet", index=False)
    four = summ[summ["shots"] == 4]
    mid = four.iloc[0] if len(four) else summ.iloc[-1]
    td_task = result.td[(result.td["level"] == "task") & (result.td["shots"] == int(mid["shots"]))
                        & (result.td["layer"] == int(mid["peak_layer"])) & (result.td["task"] != "null")]
    headline = [
        _row(f"peak-TD layer ({int(mid['shots'])}-shot)", f"{int(mid['peak_layer'])} of {adapter.n_layers}",
             PAPER[f"td_{fam}"]),
        _row(f"mean per-task TD at the peak ({int(mid['shots'])}-shot)",
             f"{td_task['td'].mean():.2f} +- {td_task['td'].std(ddof=0):.2f} (overall {mid['peak_td']:.3f}, "
             f"chance {mid['chance']:.3f})"),
        _row("peak TD by shots", ", ".join(f"{int(r.shots)}-shot {r.peak_td:.2f}" for r in summ.itertuples())),
        _row("mean exact-match accuracy by shots",
             ", ".join(f"{int(r.shots)}-shot {r.mean_exact:.2f}" for r in summ.itertuples())),
        _row(f"TD vs accuracy R^2 (layer {result.fit['layer']}, {result.fit['n_points']} points)",
             "undefined" if result.fit["r2"] != result.fit["r2"] else f"{result.fit['r2']:.2f}", PAPER[f"r2_{fam}"]),
    ]
    text = (f"{fam}: {cfg.n_per_task} prompts per task (Null included), shots {list(cfg.shots)}, on "
            f"{adapter.identity()['name']}. One forward pass per prompt batch gives every layer's activation at "
            "the token before the answer (the generation's prefill) and the greedy answer.")
    return Part(f"td_{fam}", f"(b) Task decodability over layers and shots: {fam}", text, headline, _rel(figs, out),
                {"peak TD and accuracy per shot count": str((d / "summary.parquet").relative_to(out))})


def _patch(d: Path, out: Path, adapter, fam: str, s: DemoPatchConfig, config: DemoConfig, progress: bool) -> Part:
    from ..experiments.patching import PatchConfig, run_patching
    from ..experiments.sweep import load_sweep
    from ..figures import patching_figures

    sweep_td = load_sweep(out / f"td_{fam}" / "sweep").td
    cfg = PatchConfig(model=config.model, backend=config.backend, family=fam, shots=s.shots,
                      n_per_task=s.n_per_task, k=s.k, n_boot=s.n_boot, layers="peak",
                      modes=("add", "replace"), directions=("positive", "negative"), seed=config.seed,
                      logprob=True)
    result = run_patching(adapter, cfg, td_sweep=sweep_td[sweep_td["shots"] == s.shots]
                          if s.shots in set(sweep_td["shots"]) else sweep_td, progress=progress)
    result.save(d / "patching")
    figs = patching_figures(result, d / "patching")
    sm = result.summary
    rows = [_row("layer (peak TD of the sweep)", f"{sm['layer']} (TD {sm['peak_td']:.2f}, chance {sm['chance']:.2f})")]
    for key, vals in sm["at_peak"].items():
        mean = vals.get("mean")
        rows.append(_row(f"{key.replace('_', ' ')}: mean change in accuracy over tasks",
                         "n/a" if mean is None else f"{mean * 100:+.1f} points", PAPER["patch"] if "positive" in key
                         else ""))
    for key, vals in sm.get("logprob_at_peak", {}).items():
        mean = vals.get("mean")
        rows.append(_row(f"{key.replace('_', ' ')}: mean change in the answer's log-probability (nats per token)",
                         "n/a" if mean is None else f"{mean:+.3f}"))
    base = [v for t, v in sm["baseline"].items() if t != "null"]
    rows.insert(1, _row("baseline accuracy (mean over tasks)", f"{sum(base) / len(base):.2f}" if base else "n/a"))
    text = (f"{fam}: the task vector (mean residual at each demonstration's answer-preceding token, layer "
            f"{sm['layer']}) of the prompt's own task (positive) or of the Null task (negative), added to or "
            "replacing the query's last-token residual; exact match with paired bootstrap CIs, and the "
            "teacher-forced log-probability of the answer (continuous where exact match sits at the floor).")
    tables = {"accuracy per task and condition": str((d / "patching" / "accuracy.parquet").relative_to(out))}
    return Part(f"patch_{fam}", f"(c) Task-vector patching at the peak layer: {fam}", text, rows, _rel(figs, out),
                tables)


def _finetune(d: Path, out: Path, adapter, s: DemoFinetuneConfig, config: DemoConfig, progress: bool) -> Part:
    from ..experiments.finetune import FinetuneConfig, compare_runs, finetune
    from ..figures import finetune_figures

    module = adapter._hf_module()
    runs = []
    for layers in s.layers:
        cfg = FinetuneConfig(model=config.model, family=s.family, layers=layers, steps=s.steps,
                             n_train=s.n_train, batch_size=s.batch_size, n_per_task=s.n_per_task,
                             k=s.k, lr=s.lr, warmup_steps=max(1, s.steps // 10), ckpt_every=s.steps,
                             seed=config.seed, eval_before=not runs)
        runs.append(finetune(cfg, d / layers.replace(":", ""), model=module, tokenizer=adapter.tokenizer,
                             progress=progress))
    summary, per_task, td = compare_runs(runs)
    summary.to_parquet(d / "summary.parquet", index=False)
    figs = finetune_figures(per_task, td, d, title=f"{s.family}: first vs last layers")
    rows = [_row(f"{r.model}: accuracy / TD (layer {r.td_layer})", f"{r.accuracy_mean:.2f} / {r.td_mean:.2f}",
                 PAPER["finetune"] if i == 0 else "") for i, r in enumerate(summary.itertuples())]
    text = (f"LoRA (rank 16) on the first or the last 10 of {adapter.n_layers} layers, {s.steps} steps on "
            f"{s.family}'s train side; accuracy and TD on its test side before and after. A short run: the "
            "direction of the effect, not the paper's magnitude.")
    return Part("finetune", "(d) Fine-tuning the first vs the last layers", text, rows, _rel(figs, out),
                {"accuracy and TD per model": str((d / "summary.parquet").relative_to(out))})


def _trajectory(d: Path, out: Path, s: DemoTrajectoryConfig, seed: int, progress: bool) -> Part:
    from ..figures import trajectory_figures
    from ..synthetic.analysis import SYNTHETIC_TEST_SEED, synthetic_trajectory

    result = synthetic_trajectory(out / "synthetic" / "run", n_per_basis=s.n_per_basis, k=s.k, seed=SYNTHETIC_TEST_SEED + seed,
                                  out=d / "trajectory", progress=progress)  # saves it there
    figs = trajectory_figures(result, d / "trajectory", title="synthetic run: TD and loss over training")
    summ = result.tables["summary"]
    first, last = summ.iloc[0], summ.iloc[-1]
    td_col = "td" if "td" in summ else next(c for c in summ.columns if c.startswith("td"))
    rows = [_row("mean TD over tasks: first -> last checkpoint", f"{float(first[td_col]):.2f} -> {float(last[td_col]):.2f} "
                 f"(steps {int(first['step'])} -> {int(last['step'])})", PAPER["trajectory"])]
    return Part("trajectory", "(e) A trajectory over the synthetic run's checkpoints",
                "The generic checkpoint loop (experiments/trajectory.py) over the synthetic run of part (a): one model "
                "in memory at a time, TD at every layer and the per-basis loss at each checkpoint.", rows,
                _rel(figs, out), {"trajectory summary": str((d / "trajectory" / "summary.parquet").relative_to(out))})


