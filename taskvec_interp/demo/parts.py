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
    DemoZeroShotConfig,
)
from .result import Part


def _row(metric: str, ours: Any, paper: str = "") -> dict:
    return {"metric": metric, "ours": ours, "paper": paper}


def _rel(paths: list[Path], out: Path) -> list[str]:
    return [str(Path(p).relative_to(out)) for p in paths]


def family_source(fam: str, part: str = "td") -> tuple[dict, str]:
    """The family's keyword arguments for this machine and part, and what they mean: for ``pos`` the treebank that
    resolves (``path``, ``TASKVEC_UD_PATH``, the cached or downloaded UD English EWT), else, offline with nothing
    else, the excerpt shipped with the package (``path="excerpt"``), said in the note; for ``fv`` every shipped
    task in the TD sweep (``part="td"``: the TD-vs-accuracy fit needs the points) and the ten
    :data:`~taskvec_interp.tasks.function_vectors.FV_CORE_TASKS` in patching and zero-shot (the budget); other
    families ``{}``."""
    if fam == "fv" and part != "td":
        from ..tasks.function_vectors import FV_CORE_TASKS, FV_TASKS

        return {"tasks": list(FV_CORE_TASKS)}, (
            f"fv: the {len(FV_CORE_TASKS)} core tasks of the {len(FV_TASKS)} shipped (Todd et al.'s six and four "
            "small knowledge / sequence tasks); the TD sweep reads all of them.")
    if fam != "pos":
        return {}, ""
    from ..tasks import get_family

    try:
        get_family("pos")
    except (ValueError, OSError) as err:
        return {"path": "excerpt"}, (
            f"No treebank here ({str(err).splitlines()[0][:160]}): POS reads the UD English EWT excerpt shipped with "
            "the package (the first 300 dev sentences, 66 with all six tags). Set TASKVEC_UD_PATH for the full "
            "treebank.")
    return {}, ""


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

    kwargs, note = family_source(fam)
    cfg = SweepConfig(model=config.model, backend=config.backend, family=fam, family_kwargs=kwargs, shots=tuple(s.shots),
                      n_per_task=s.n_per_task, k=s.k, n_boot=s.n_boot, seed=config.seed, controls=tuple(s.controls),
                      shuffled_shots=tuple(s.shuffled_shots) if "shuffled" in s.controls else ())
    result = run_sweep(adapter, cfg, progress=progress)
    result.save(d / "sweep")
    figs = sweep_figures(result, d / "sweep", umap=False)
    summ = summarize(result)
    summ.to_parquet(d / "summary.parquet", index=False)
    four = summ[summ["shots"] == 4]
    mid = four.iloc[0] if len(four) else summ.iloc[-1]
    td = result.td[result.td["context"] == "demos"] if "context" in result.td else result.td
    td_task = td[(td["level"] == "task") & (td["shots"] == int(mid["shots"])) & (td["layer"] == int(mid["peak_layer"]))
                 & (td["task"] != "null")]
    headline = [
        _row(f"peak-TD layer ({int(mid['shots'])}-shot)", f"{int(mid['peak_layer'])} of {adapter.n_layers}",
             PAPER.get(f"td_{fam}", "")),
        _row(f"mean per-task TD at the peak ({int(mid['shots'])}-shot)",
             f"{td_task['td'].mean():.2f} +- {td_task['td'].std(ddof=0):.2f} (overall {mid['peak_td']:.3f}, "
             f"chance {mid['chance']:.3f})"),
        _row("peak TD by shots", ", ".join(f"{int(r.shots)}-shot {r.peak_td:.2f}" for r in summ.itertuples())),
        _row("mean exact-match accuracy by shots",
             ", ".join(f"{int(r.shots)}-shot {r.mean_exact:.2f}" for r in summ.itertuples())),
        _row(f"TD vs accuracy R^2 (layer {result.fit['layer']}, {result.fit['n_points']} points)",
             "undefined" if result.fit["r2"] != result.fit["r2"] else f"{result.fit['r2']:.2f}"
             + (f", slope {result.fit['slope']:+.2f}, p = {result.fit['p_value']:.2g}" if "p_value" in result.fit else ""),
             PAPER.get(f"r2_{fam}", "")),
    ]
    tables = {"peak TD and accuracy per shot count": str((d / "summary.parquet").relative_to(out))}
    if cfg.controls:
        from ..experiments.sweep import context_gain

        gain = context_gain(result)
        gain.to_parquet(d / "context_gain.parquet", index=False)
        tables["TD gained from the context: k-shot TD minus each control's, per layer (paired bootstrap)"] = str(
            (d / "context_gain.parquet").relative_to(out))
        top = int(gain["shots"].max())
        for control, g in gain[gain["shots"] == top].groupby("control", sort=False):
            at = g.loc[(g["layer"] - int(mid["peak_layer"])).abs().idxmin()]
            first = g.loc[g["layer"].idxmin()]
            what = "without demonstrations (input only)" if control == "input_only" else "with labels shuffled"
            headline.append(_row(f"{top}-shot TD minus TD {what}, layer {int(first['layer'])} / {int(at['layer'])}",
                                 f"{first['gain']:+.2f} [{first['ci_low']:+.2f}, {first['ci_high']:+.2f}] / "
                                 f"{at['gain']:+.2f} [{at['ci_low']:+.2f}, {at['ci_high']:+.2f}] "
                                 f"(control TD {first['td_control']:.2f} / {at['td_control']:.2f})"))
    text = (f"{fam}: {cfg.n_per_task} prompts per task (Null included), shots {list(cfg.shots)}, on "
            f"{adapter.identity()['name']}. One forward pass per prompt batch gives every layer's activation at "
            "the token before the answer (the generation's prefill) and the greedy answer." + (" " + note if note else ""))
    return Part(f"td_{fam}", f"(b) Task decodability over layers and shots: {fam}", text, headline, _rel(figs, out),
                tables)


def _patch(d: Path, out: Path, adapter, fam: str, s: DemoPatchConfig, config: DemoConfig, progress: bool) -> Part:
    from ..experiments.patching import PatchConfig, run_patching
    from ..experiments.sweep import load_sweep
    from ..figures import patching_figures

    sweep_td = load_sweep(out / f"td_{fam}" / "sweep").td
    kwargs, note = family_source(fam, "patch")
    cfg = PatchConfig(model=config.model, backend=config.backend, family=fam, family_kwargs=kwargs, shots=s.shots,
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
            "teacher-forced log-probability of the answer (continuous where exact match sits at the floor)."
            + (" " + note if note else ""))
    tables = {"accuracy per task and condition": str((d / "patching" / "accuracy.parquet").relative_to(out))}
    return Part(f"patch_{fam}", f"(c) Task-vector patching at the peak layer: {fam}", text, rows, _rel(figs, out),
                tables)


def _zeroshot(d: Path, out: Path, adapter, fam: str, s: DemoZeroShotConfig, config: DemoConfig,
              progress: bool) -> Part:
    from ..experiments.zeroshot import ZeroShotConfig, run_zero_shot
    from ..figures.zeroshot import zero_shot_figures

    kwargs, note = family_source(fam, "zeroshot")
    cfg = ZeroShotConfig(model=config.model, backend=config.backend, family=fam, family_kwargs=kwargs, shots=s.shots,
                         n_dev=s.n_dev, n_test=s.n_test, n_dummy=s.n_dummy, layers=s.layers, n_boot=s.n_boot,
                         replace=True, seed=config.seed, template=dict(s.template))
    result = run_zero_shot(adapter, cfg, progress=progress)
    result.save(d / "zeroshot")
    figs = zero_shot_figures(result, d / "zeroshot")
    rows = []
    for metric in ("first_token", "exact"):
        table = result.table(metric)
        table.to_parquet(d / f"table_{metric}.parquet", index=False)
        a = table[table["task"] == "all"].iloc[0]
        for v in ("per_query", "per_task"):
            if v not in result.task_layers:
                continue
            rows.append(_row(f"{metric}: baseline / task vector ({v.replace('_', '-')}, layer {a[f'layer_{v}']}) / "
                             "ICL, test split",
                             f"{a['baseline']:.2f} / {a[v]:.2f} [{a[f'{v}_low']:.2f}, {a[f'{v}_high']:.2f}] / "
                             f"{a['icl']:.2f}; gain {a[f'{v}_gain']:+.2f} [{a[f'{v}_gain_low']:+.2f}, "
                             f"{a[f'{v}_gain_high']:+.2f}], McNemar p = {a[f'p_{v}']:.2g}",
                             PAPER["zeroshot"] if metric == "first_token" and v == "per_query" else ""))
    n_tasks = len(result.tasks)
    text = (f"{fam}: Hendel et al.'s protocol on {n_tasks} tasks. Each query's own {cfg.shots} demonstrations "
            f"followed by {cfg.n_dummy} dummy queries give its task vector (per-query, averaged over the dummies; "
            "per-task: the mean over the task's dev queries); the vector replaces the last-token state of the "
            "zero-shot prompt at one layer, chosen on the dev split "
            f"({cfg.n_dev} queries per task), and every number is on the disjoint test split ({cfg.n_test} per task, "
            "inputs drawn with replacement where a task has fewer). First-token scoring is Hendel's; exact match "
            "scores the whole answer. Paired tests on the same queries." + (" " + note if note else ""))
    tables = {f"baseline / task vector / ICL per task ({m}, test split)": str((d / f"table_{m}.parquet")
                                                                              .relative_to(out))
              for m in ("first_token", "exact")}
    return Part(f"zeroshot_{fam}", f"(c') Zero-shot task vectors (Hendel et al.'s protocol): {fam}", text, rows,
                _rel(figs, out), tables)


def _finetune(d: Path, out: Path, adapter, s: DemoFinetuneConfig, config: DemoConfig, progress: bool) -> Part:
    from ..experiments.finetune import FinetuneConfig, compare_runs, finetune
    from ..figures import finetune_figures

    module = adapter._hf_module()
    runs = []
    for layers in s.layers:
        cfg = FinetuneConfig(model=config.model, family=s.family, family_kwargs=dict(s.family_kwargs), layers=layers,
                             steps=s.steps,
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
    acc = {r.model: r.accuracy_mean for r in summary.itertuples()}
    pre = next((v for k, v in acc.items() if "pretrained" in str(k)), None)
    below = [k for k, v in acc.items() if pre is not None and "pretrained" not in str(k) and v < pre]
    tasks = s.family_kwargs.get("tasks")
    text = (f"LoRA (rank 16) on the first or the last 10 of {adapter.n_layers} layers, {s.steps} steps (lr {s.lr:g}, "
            f"batch {s.batch_size}) on {s.family}'s train side" + (f" ({len(tasks)} tasks: {', '.join(tasks)})"
                                                                   if tasks else "")
            + f"; accuracy and TD on its test side ({s.n_per_task} prompts per task) before and after, the same "
            "queries for every model; the scoreboard's F6 row holds the paired test of first minus last."
            + (f" Measured here: {', '.join(map(str, below))} ended below the pretrained model's accuracy "
               f"({pre:.2f}), so at this learning rate that fine-tune damages the model as much as it teaches it."
               if below else ""))
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


