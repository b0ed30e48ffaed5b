"""Does a short first-k vs last-k LoRA fine-tune decide F6 (paper Sec. 4.4)? One setting, measured end to end.

Runs what the demo's fine-tuning part runs (:func:`~taskvec_interp.experiments.finetune.finetune` twice on the
built-in model: ``first:K`` with the pretrained evaluation, then ``last:K``), then compares the two fine-tuned
models on the SAME evaluation queries (the family's test side, Null left out): the first-minus-last difference
of exact-match accuracy with a paired percentile bootstrap CI (the queries resampled with replacement, the same
resamples for both models: :func:`~taskvec_interp.probes.accuracy.bootstrap_accuracy`, seeded) and McNemar's
exact test on the discordant queries. F6 is *decided* when the CI excludes 0 (either sign).

Each run is trained (``finetune(..., evaluate=False)``) and then evaluated by a second ``finetune`` call on
the same directory (the library's "trained but not evaluated" path; the same weights and queries as the demo's
one call), so training and evaluation get their own wall AND CPU time (``time.process_time``, with
``--threads 1``: robust to other processes on a shared machine, unlike wall time). The load average
(``os.getloadavg``) is printed before and after. To estimate an unloaded 2-core wall time, scale CPU seconds
by the reference s/step of an unloaded run (first:10 ~1.6 s/step, last:10 ~1.2 s/step at batch 8 on bitwise,
2 threads) over the measured CPU s/step of the same setting: about 0.33 on the project's machine.
The last line printed is JSON.

Example (the measured setting that decides F6 on the built-in model: fv, 5 tasks whose inputs no other of them
shares, so the check that no evaluation query occurs in the training prompts passes; the full 10-task fv family
fails that check, 153 leaks, since country-capital / country-currency and next_item / prev_item share inputs)::

    python scripts/finetune_f6.py --family fv --steps 120 --lr 5e-3 --n-train 100 --n-per-task 38 \
        --family-kwargs '{"tasks": ["person-sport", "country-capital", "singular-plural", "present-past", "next_item"]}'

A quick check that it runs: ``--steps 2 --n-per-task 6 --k 3`` (a minute or two on the real model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def paired_difference(first, last, pretrained=None, *, n_boot: int = 10000, seed: int = 0) -> dict:
    """First-minus-last accuracy on the same queries (two evaluation sweeps' ``predictions`` tables), Null left
    out: the difference, its paired bootstrap CI and McNemar's exact p-value."""
    from scipy.stats import binomtest

    from taskvec_interp.probes.accuracy import bootstrap_accuracy
    from taskvec_interp.tasks import NULL_TASK

    tables = [t[t["task"] != NULL_TASK].reset_index(drop=True) for t in (last, first)]
    if pretrained is not None:
        tables.append(pretrained[pretrained["task"] != NULL_TASK].reset_index(drop=True))
    for t in tables[1:]:  # the same queries in the same order, or the pairing means nothing
        if not (t[["task", "query", "answer"]].equals(tables[0][["task", "query", "answer"]])):
            raise ValueError("the two evaluations did not read the same queries")
    correct = torch.tensor(np.stack([t["exact"].to_numpy(dtype=bool) for t in tables]))
    boot = bootstrap_accuracy(correct, ["all"] * correct.shape[1], n_boot=n_boot, seed=seed, baseline=0)
    row = boot[boot["condition"] == 1].iloc[0]
    first_only = int((correct[1] & ~correct[0]).sum())
    last_only = int((correct[0] & ~correct[1]).sum())
    p = binomtest(first_only, first_only + last_only).pvalue if first_only + last_only else 1.0
    per_task = tables[0][["task"]].assign(last=correct[0].numpy(), first=correct[1].numpy()) \
        .groupby("task", sort=False).mean().round(3)
    return {"n_queries": int(correct.shape[1]), "acc_first": round(float(correct[1].double().mean()), 4),
            "acc_last": round(float(correct[0].double().mean()), 4),
            "acc_pretrained": round(float(correct[2].double().mean()), 4) if pretrained is not None else None,
            "diff": round(float(row["delta"]), 4), "ci": [round(float(row["delta_low"]), 4),
                                                          round(float(row["delta_high"]), 4)],
            "decided": bool(row["delta_low"] > 0 or row["delta_high"] < 0),
            "first_only": first_only, "last_only": last_only, "mcnemar_p": float(p),
            "per_task": {t: [float(a), float(b)] for t, a, b in per_task[["first", "last"]].itertuples()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--family", default="bitwise")
    ap.add_argument("--family-kwargs", default="{}", help="JSON, e.g. '{\"tasks\": [\"antonym\"]}'")
    ap.add_argument("--layers", type=int, default=10, help="K: first:K vs last:K")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps // 10, the demo's)")
    ap.add_argument("--n-train", type=int, default=100, help="training prompts per task")
    ap.add_argument("--n-per-task", type=int, default=50, help="evaluation prompts per task (Null included)")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--k", type=int, default=10, help="neighbours of the TD k-NN")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one, removed)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from taskvec_interp.experiments.finetune import FinetuneConfig, finetune

    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="finetune_f6_")
        out = Path(tmp.name)
    else:
        out = Path(args.out)
    warmup = max(1, args.steps // 10) if args.warmup is None else args.warmup
    setting = {"model": args.model, "family": args.family, "family_kwargs": json.loads(args.family_kwargs),
               "layers": [f"first:{args.layers}", f"last:{args.layers}"], "steps": args.steps,
               "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": warmup, "n_train": args.n_train,
               "n_per_task": args.n_per_task, "shots": args.shots, "k": args.k, "seed": args.seed}
    load0, t_all, c_all = _load(), time.perf_counter(), time.process_time()
    runs, seconds = [], {}
    for i, layers in enumerate(setting["layers"]):
        cfg = FinetuneConfig(model=args.model, family=args.family, family_kwargs=setting["family_kwargs"],
                             layers=layers, steps=args.steps, n_train=args.n_train, batch_size=args.batch_size,
                             n_per_task=args.n_per_task, k=args.k, lr=args.lr, warmup_steps=warmup,
                             ckpt_every=args.steps, seed=args.seed, shots=args.shots, eval_before=i == 0)
        t0, c0 = time.perf_counter(), time.process_time()
        finetune(cfg, out / layers.replace(":", ""), progress=False, evaluate=False)  # train only
        t1, c1 = time.perf_counter(), time.process_time()
        res = finetune(cfg, out / layers.replace(":", ""), progress=False)  # the same run, now evaluated
        t2, c2 = time.perf_counter(), time.process_time()
        el = res.metrics["elapsed_s"].to_numpy()
        step_s = float((el[-1] - el[0]) / max(1, len(el) - 1))  # steady state (from step 2)
        ev_pre = res.eval_pretrained.seconds if (i == 0 and res.eval_pretrained is not None) else 0.0
        seconds[layers] = {"wall": round(t2 - t0, 1), "train_wall": round(t1 - t0, 1),
                           "train_cpu": round(c1 - c0, 1), "s_per_step": round(step_s, 3),
                           "cpu_s_per_step": round((c1 - c0) / args.steps, 3),
                           "eval_wall": round(t2 - t1, 1), "eval_cpu": round(c2 - c1, 1),
                           "eval_after": round(res.eval.seconds, 1), "eval_pretrained": round(ev_pre, 1),
                           "final_loss": round(float(res.metrics["loss"].iloc[-5:].mean()), 4)}
        print(json.dumps({"part": layers, **seconds[layers], "loadavg": _load()}), flush=True)
        runs.append(res)
    first, last = runs
    stats = paired_difference(first.eval.predictions, last.eval.predictions, first.eval_pretrained.predictions,
                              n_boot=args.n_boot, seed=args.seed)
    report = {"setting": setting, **stats, "seconds": seconds, "total_s": round(time.perf_counter() - t_all, 1),
              "total_cpu_s": round(time.process_time() - c_all, 1),
              "loadavg_before": load0, "loadavg_after": _load(),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__}}
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
