"""Train the `small` synthetic config on CPU and analyse it; the last line is JSON.

Reports wall time, final per-basis test MSE next to the rank-r (basis-aware Bayes) oracle, the
mixture-Bayes predictor, ridge on all coordinates and least squares, per basis the share of the
sparsity gap closed, the loss-drop step, the step its loss goes below ridge on all coordinates and the
TD-rise step, and TD (middle layer, first and last checkpoint; per basis; the peak layer at the end).
Target (issue 22): middle-layer TD >= 0.95 at the last checkpoint and every basis' final MSE <= 1.2x the
mixture-Bayes error, within 720 s of training + analysis on 2 cores (not reached by any recipe measured:
docs/results/synthetic.md). ``--set JSON`` overrides TrainConfig / ModelConfig fields (a recipe-search row);
the JSON's ``recipe`` says what ran.

``--smoke``: the same code (training, analysis with UMAP, figures) on the config's data with the ``tiny``
model, 20 eager steps and a small analysis (seconds; checks that it runs, not what it learns).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a temp dir)")
    parser.add_argument("--config", default="small")
    parser.add_argument("--backbone", default="gpt2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the config's steps (say so when reporting)")
    parser.add_argument("--no-compile", action="store_true", help="train eagerly (the config compiles on CPU)")
    parser.add_argument("--set", type=json.loads, default={}, metavar="JSON",
                        help="TrainConfig / ModelConfig overrides as a JSON object (a recipe-search row), e.g. "
                             "'{\"lr_schedule\": \"cosine\", \"min_lr_ratio\": 0.0, \"n_layer\": 12}'")
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes (seconds): CI's check that it runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from taskvec_interp.figures import synthetic_figures
    from taskvec_interp.synthetic import train, train_config
    from taskvec_interp.synthetic.analysis import AnalysisConfig, analyze_run

    run = args.out or Path(tempfile.mkdtemp(prefix="mslr-small-"))
    if not isinstance(args.set, dict):
        parser.error(f"--set must be a JSON object, got {args.set!r}")
    over = dict(args.set) | ({} if args.steps is None else {"steps": args.steps})
    if args.no_compile:
        over["compile"] = False
    analysis = AnalysisConfig()
    if args.smoke:
        over |= {"model": "tiny", "steps": 20, "compile": False, "warmup_steps": 2, "batch_size": 16,
                 "eval_every": 10, "log_every": 5, "ckpt_every": 10, "ckpt_log_points": 0, "n_test_per_basis": 16}
        analysis = AnalysisConfig(n_per_basis=12, k=3, n_boot=0, umap_checkpoints=2, umap_layers=[0, 1])
    cfg = train_config(args.config, backbone=args.backbone, seed=args.seed, **over)
    t0 = time.perf_counter()
    train(cfg, run, progress=False)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = analyze_run(run, analysis, progress=False)
    res.save(run / "analysis")
    figures = [str(p) for p in synthetic_figures(res, run / "analysis")]
    t_analyze = time.perf_counter() - t0
    oracles = res.summary["oracles"]
    bases = res.summary["bases"]
    final = {b: v["final_mse"] for b, v in bases.items()}
    rank_r = {b: oracles["basis_ridge"][f"b{i}"] for i, b in enumerate(bases)}
    agnostic = {b: oracles["full_ridge"][f"b{i}"] for i, b in enumerate(bases)}
    gap_closed = {b: v["gap_closed"] for b, v in bases.items()}
    last = res.td[(res.td["level"] == "overall") & (res.td["step"] == res.td["step"].max())]
    peak = last.loc[last["td"].idxmax()]
    print(json.dumps({
        "benchmark": "synthetic_small", "smoke": args.smoke,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "config": args.config, "backbone": args.backbone, "steps": cfg.steps, "compile": cfg.compile, "run": str(run),
        "data": {k: getattr(cfg.data, k) for k in ("n_dims", "rank", "n_bases", "n_points", "noise_var")},
        "model": {k: getattr(cfg.model, k) for k in ("n_layer", "d_model", "n_head", "tokens")},
        "recipe": {"lr": cfg.lr, "betas": list(cfg.betas), "warmup_steps": cfg.warmup_steps,
                   "lr_schedule": cfg.lr_schedule, "min_lr_ratio": cfg.min_lr_ratio, "batch_size": cfg.batch_size,
                   "points_curriculum": [list(st) for st in cfg.points_curriculum]},
        "train_s": round(t_train, 1), "analyze_s": round(t_analyze, 1), "wall_s": round(t_train + t_analyze, 1),
        "final_mse": {b: round(v, 4) for b, v in final.items()},
        "rank_r_oracle_mse": {b: round(v, 4) for b, v in rank_r.items()},
        "mixture_bayes_mse": {b: round(oracles["mixture_bayes"][f"b{i}"], 4) for i, b in enumerate(bases)},
        "ridge_all_coords_mse": {b: round(v, 4) for b, v in agnostic.items()},
        "least_squares_mse": {b: round(oracles["full_ols"][f"b{i}"], 4) for i, b in enumerate(bases)},
        "gap_closed": {b: round(v, 3) for b, v in gap_closed.items()},
        # how far each basis' final MSE is above the best any model of the mixture can do
        "excess_over_mixture_bayes": {b: round(final[b] - oracles["mixture_bayes"][f"b{i}"], 4)
                                      for i, b in enumerate(bases)},
        "ratio_to_mixture_bayes": {b: round(final[b] / oracles["mixture_bayes"][f"b{i}"], 3)
                                   for i, b in enumerate(bases)},
        "loss_drop_step": {b: v["loss_drop_step"] for b, v in bases.items()},
        "below_ridge_step": {b: v["below_ridge_step"] for b, v in bases.items()},
        "td_rise_step": {b: v["td_rise_step"] for b, v in bases.items()},
        "td_layer": res.summary["td_layer"],
        "td_middle_last_per_basis": {b: round(v["final_td"], 3) for b, v in bases.items()},
        "td_peak_last": {"layer": int(peak["layer"]), "td": round(float(peak["td"]), 3)},
        "td_middle_first": round(res.summary["td_first"], 3), "td_middle_last": round(res.summary["td_last"], 3),
        "chance": res.summary["chance"], "figures": figures,
    }))


if __name__ == "__main__":
    main()
