"""The real run of issue 23 on smollm2-135m: which heads carry the function-vector tasks, and what their function
vector does beside the paper's and Hendel et al.'s task vectors.

    .venv/bin/python scripts/heads_smollm2.py                # sized for 2 CPU cores (about 20 minutes)
    .venv/bin/python scripts/heads_smollm2.py --todd         # Todd et al.'s sizes (100 / 25 prompts per task)
    .venv/bin/python scripts/heads_smollm2.py --tasks antonym,country-capital,present-past,singular-plural \
        --n-per-task 16 --n-cie-prompts 4 --n-eval 10        # the run of the docs (about 5 minutes)

Writes ``runs/heads_smollm2`` (``taskvec heads``'s result: AIE, per-head TD, AtP, top heads, function vectors,
figures) and ``runs/fv_smollm2`` (``taskvec fv``'s: zero-shot sweep, shuffled-label and natural-text settings,
cosines, figures) and prints one JSON line with the numbers the closing note reports. A killed run resumes the
head effects from ``runs/.heads_smollm2.partial``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--todd", action="store_true", help="Todd et al.'s sizes (100 clean, 25 corrupted, 25 eval)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default=None, help="comma-separated task names (default: Todd et al.'s six)")
    ap.add_argument("--n-per-task", type=int, default=None, help="clean prompts per task for the head means")
    ap.add_argument("--n-cie-prompts", type=int, default=None, help="shuffled-label prompts per task for the CIE")
    ap.add_argument("--n-eval", type=int, default=None, help="zero-shot queries per task for the FV sweep")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from taskvec_interp import load_model
    from taskvec_interp.experiments.function_vectors import FVConfig, run_function_vectors
    from taskvec_interp.experiments.heads import TODD_TASKS, HeadsConfig, run_heads
    from taskvec_interp.figures.heads import fv_figures, heads_figures
    from taskvec_interp.tasks import get_family

    family = "fv"  # the built-in function-vector tasks (shipped in the package)
    kwargs = {"tasks": args.tasks.split(",") if args.tasks else list(TODD_TASKS)}
    fam = get_family(family, **kwargs)
    sizes = dict(n_per_task=100, n_cie_prompts=25) if args.todd else dict(n_per_task=40, n_cie_prompts=10)
    if args.n_per_task is not None:
        sizes["n_per_task"] = args.n_per_task
    if args.n_cie_prompts is not None:
        sizes["n_cie_prompts"] = args.n_cie_prompts
    hcfg = HeadsConfig(family=family, family_kwargs=kwargs, method="both", chunk_heads=54, **sizes)
    model = load_model("smollm2-135m")
    t0 = time.perf_counter()
    heads = run_heads(model, hcfg, fam, checkpoint_dir=args.out / ".heads_smollm2.partial")
    heads.save(args.out / "heads_smollm2")
    heads_figures(heads, args.out / "heads_smollm2")
    n_eval = args.n_eval if args.n_eval is not None else (25 if args.todd else 20)
    fcfg = FVConfig(family=family, family_kwargs=kwargs, n_per_task=n_eval, n_vector_prompts=n_eval,
                    n_mean_prompts=hcfg.n_per_task, n_cie_prompts=hcfg.n_cie_prompts)
    fv = run_function_vectors(model, fcfg, fam, heads=heads)
    fv.save(args.out / "fv_smollm2")
    fv_figures(fv, args.out / "fv_smollm2")

    s, f = heads.summary, fv.summary
    aie_all = heads.aie[heads.aie["task"] == "all"]
    by_layer = aie_all.groupby("layer")["aie"].agg(["sum", "max"]).round(6)
    print(json.dumps({
        "run": "issue 23 real run", "model": "smollm2-135m", "tasks": kwargs["tasks"], "sizes": sizes,
        "eval_per_task": n_eval, "heads_s": round(heads.seconds, 1), "fv_s": round(fv.seconds, 1),
        "total_s": round(time.perf_counter() - t0, 1), "p_base_mean": s["p_base_mean"],
        "top_heads": s["top_heads"], "aie_by_layer_sum": by_layer["sum"].to_dict(),
        "aie_by_layer_max": by_layer["max"].to_dict(), "n_heads_aie_ci_above_0": int((aie_all["ci_low"] > 0).sum()),
        "td_vs_aie_spearman": s["td_vs_aie_spearman"], "td_top_k_overlap": s["td_top_k_overlap"],
        "peak_td_head": s["peak_td_head"], "chance_td": s["chance_td"],
        "atp_vs_exact_spearman": s.get("atp_vs_exact_spearman"), "atp_top_k_overlap": s.get("atp_top_k_overlap"),
        "fv_best_layer": f["fv_best_layer"], "zero_shot": f["zero_shot"], "shuffled": f.get("shuffled"),
        "natural": f.get("natural"), "cosine_mean": f.get("cosine_mean"), "engine": f["engine"],
    }, default=str))


if __name__ == "__main__":
    main()
