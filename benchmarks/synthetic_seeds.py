"""Several seeds at once: `train_seeds` (one stacked model, torch.func.vmap) vs the same seeds trained one
after another with `train`, same run, same steps. Checks that every seed's final test MSE matches its
solo run. The last line is JSON.

    python benchmarks/synthetic_seeds.py --config small --seeds 5 --steps 300

``--smoke``: the same code on the ``tiny`` config, 2 seeds x 6 steps (seconds; checks that it runs).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="small")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes (seconds): CI's check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.config, args.seeds, args.steps, args.compile = "tiny", 2, 6, False
    torch.set_num_threads(args.threads)
    from taskvec_interp.synthetic import train, train_config
    from taskvec_interp.synthetic.train import read_metrics, seed_dir, train_seeds

    warmup = min(train_config(args.config).warmup_steps, args.steps)  # a warm-up longer than the run is refused
    cfg = train_config(args.config, steps=args.steps, eval_every=args.steps, ckpt_every=args.steps, ckpt_log_points=0,
                       compile=args.compile, compile_mode="default", warmup_steps=warmup)
    seeds = list(range(args.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train_seeds(cfg, seeds, Path(tmp) / "together", progress=False)
        together = time.perf_counter() - t0
        t0 = time.perf_counter()
        for s in seeds:
            train(replace(cfg, seed=s), Path(tmp) / f"solo_{s}", progress=False)
        sequential = time.perf_counter() - t0
        mse_t = [read_metrics(seed_dir(Path(tmp) / "together", s))[-1]["test_mse"] for s in seeds]
        mse_s = [read_metrics(Path(tmp) / f"solo_{s}")[-1]["test_mse"] for s in seeds]
    print(json.dumps({
        "benchmark": "synthetic_seeds", "smoke": args.smoke, "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "config": args.config, "seeds": len(seeds), "steps": args.steps,
        "compile": args.compile, "together_s": round(together, 1), "sequential_s": round(sequential, 1),
        "together_ms_per_seed_step": round(1e3 * together / (len(seeds) * args.steps), 2),
        "sequential_ms_per_seed_step": round(1e3 * sequential / (len(seeds) * args.steps), 2),
        "speedup": round(sequential / together, 2),
        "final_test_mse_together": [round(v, 5) for v in mse_t], "final_test_mse_solo": [round(v, 5) for v in mse_s],
        "max_rel_diff": round(max(abs(a - b) / b for a, b in zip(mse_t, mse_s, strict=True)), 7),
    }))


if __name__ == "__main__":
    main()
