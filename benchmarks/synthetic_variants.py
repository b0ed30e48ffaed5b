"""Train one of the paper's appendix variants on CPU and analyse it; the last line is JSON.

``--variant``: ``bases6_d24`` (6 disjoint bases, D = 24), ``overlap8_d16`` (8 overlapping bases in two
groups of 4, D = 16) or ``families`` (linear / sparse / leaky-ReLU / quadratic). Reports wall time,
final per-basis test MSE next to the config's oracles (MSLR: rank-r, mixture-Bayes, ridge on all
coordinates; families: the family-aware oracle where defined, ridge on x, zero), per basis the share of
the sparsity gap closed (MSLR), the step its loss goes below ridge on all coordinates and its TD rise,
TD at the middle layer at the first and last checkpoint (overall, per basis, and per group for the
overlapping bases), and the peak TD layer at the end. UMAP is off (time); ``--steps`` shortens a run.

``--smoke``: the same code on the variant's data (default ``overlap8_d16``: it has groups) with the ``tiny``
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

VARIANTS = ("bases6_d24", "overlap8_d16", "families")


def _r(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(v, nd)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=VARIANTS, help="required, except with --smoke")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=None, help="override the config's steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes (seconds): CI's check that it runs")
    args = parser.parse_args()
    if args.variant is None:
        if not args.smoke:
            parser.error("the following arguments are required: --variant")
        args.variant = "overlap8_d16"
    torch.set_num_threads(args.threads)

    from taskvec_interp.synthetic import train, train_config
    from taskvec_interp.synthetic.analysis import AnalysisConfig, analyze_run

    run = args.out or Path(tempfile.mkdtemp(prefix=f"mslr-{args.variant}-"))
    over = {"seed": args.seed} | ({"steps": args.steps} if args.steps is not None else {})
    analysis = AnalysisConfig(n_boot=args.n_boot)
    if args.smoke:
        over |= {"model": "tiny", "steps": 20, "compile": False, "warmup_steps": 2, "batch_size": 16,
                 "eval_every": 10, "log_every": 5, "ckpt_every": 10, "ckpt_log_points": 0, "n_test_per_basis": 16}
        analysis = AnalysisConfig(n_per_basis=12, k=3, n_boot=0)
    cfg = train_config(args.variant, **over)
    t0 = time.perf_counter()
    train(cfg, run, progress=False)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = analyze_run(run, analysis, umap=False, progress=False)
    res.save(run / "analysis")
    t_analyze = time.perf_counter() - t0
    s, oracles, bases = res.summary, res.summary["oracles"], res.summary["bases"]
    td = res.td[res.td["layer"] == s["td_layer"]]
    first_step, last_step = td["step"].min(), td["step"].max()

    def per_task(table, step):
        part = table[(table["step"] == step) & (table["level"] == "task")]
        return {t: round(float(v), 3) for t, v in zip(part["task"], part["td"], strict=True)}

    last_all = res.td[(res.td["level"] == "overall") & (res.td["step"] == last_step)]
    peak = last_all.loc[last_all["td"].idxmax()]
    out = {
        "benchmark": "synthetic_variants", "smoke": args.smoke, "variant": args.variant,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "steps": cfg.steps, "run": str(run),
        "data": {"kind": cfg.to_dict()["data"]["kind"], **cfg.data.to_dict()},
        "model": {k: getattr(cfg.model, k) for k in ("n_layer", "d_model", "n_head", "tokens")},
        "train_s": round(t_train, 1), "analyze_s": round(t_analyze, 1), "wall_s": round(t_train + t_analyze, 1),
        "final_mse": {b: _r(v["final_mse"]) for b, v in bases.items()},
        "oracle_mse": {name: {b: _r(row.get(f"b{i}")) for i, b in enumerate(bases)} for name, row in oracles.items()
                       if name in ("basis_ridge", "mixture_bayes", "full_ridge", "family_best", "zero")},
        "gap_closed": {b: _r(v["gap_closed"], 3) for b, v in bases.items()},
        "below_ridge_step": {b: v["below_ridge_step"] for b, v in bases.items()},
        "loss_drop_step": {b: v["loss_drop_step"] for b, v in bases.items()},
        "td_rise_step": {b: v["td_rise_step"] for b, v in bases.items()},
        "td_layer": s["td_layer"], "chance": s["chance"],
        "td_middle_first": round(s["td_first"], 3), "td_middle_last": round(s["td_last"], 3),
        "td_middle_first_per_basis": per_task(td, first_step), "td_middle_last_per_basis": per_task(td, last_step),
        "td_peak_last": {"layer": int(peak["layer"]), "td": round(float(peak["td"]), 3)},
    }
    if "families" in s:
        out["families"] = s["families"]
    if res.td_group is not None:
        tg = res.td_group[res.td_group["layer"] == s["td_layer"]]
        out.update({"groups": s["groups"], "group_chance": s["group_chance"],
                    "td_group_first": round(s["td_group_first"], 3), "td_group_last": round(s["td_group_last"], 3),
                    "td_group_last_per_group": per_task(tg, last_step)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
