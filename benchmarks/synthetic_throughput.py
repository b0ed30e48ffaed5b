"""Training steps/s of the `paper` synthetic config: our trainer vs a plain fp32 eager reference.

Reference: the same model (SyntheticRegressor) and loss written straightforwardly: sample a batch,
forward, MSE, backward, Adam step. Ours: `taskvec_interp.synthetic.train` (on CUDA: fused Adam, and
`--bf16` / `--compile` as given). Both run on the same device in the same process, timed after a
warm-up. The paper took ~8 h for 80K steps on an A100. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch


def reference_steps(cfg, n: int, warmup: int, device: torch.device) -> float:
    """Seconds per step of the straightforward fp32 eager loop."""
    from taskvec_interp.synthetic import SyntheticRegressor, sample_batch

    model = SyntheticRegressor(cfg.model, seed=cfg.seed).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    gen = torch.Generator(device=device).manual_seed(0)
    for i in range(warmup + n):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        batch = sample_batch(cfg.data, cfg.batch_size, gen, device)
        loss = torch.mean((model(batch.xs, batch.ys) - batch.ys) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def our_steps(cfg, n: int, warmup: int) -> float:
    """Seconds per step of `train`, from its per-step log (log_every=1; no evals or checkpoints inside)."""
    from taskvec_interp.synthetic import train

    times = {}
    with tempfile.TemporaryDirectory() as run:
        train(cfg, run, progress=False, callback=lambda step, rec: times.__setitem__(step, rec["elapsed_s"]))
    return (times[warmup + n - 1] - times[warmup - 1]) / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode (CUDA graphs: reduce-overhead)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from taskvec_interp.synthetic import train_config

    total = args.warmup + args.steps + 1
    cfg = train_config("paper", steps=total, eval_every=10**9, log_every=1, ckpt_every=10**9, ckpt_log_points=0,
                       n_test_per_basis=8, device=args.device, compile=args.compile,
                       compile_mode=args.compile_mode,
                       autocast_dtype="bfloat16" if args.bf16 else None)
    device = torch.device(args.device)
    ref = reference_steps(cfg, args.steps, args.warmup, device)
    ours = our_steps(cfg, args.steps, args.warmup)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(json.dumps({
        "benchmark": "synthetic_throughput", "machine": name, "torch": torch.__version__,
        "model": "paper: GPT-2 12L d256 8 heads, batch 128, 20 examples (40 tokens)",
        "options": {"bf16": args.bf16, "compile": args.compile, "compile_mode": args.compile_mode if args.compile else None, "fused_adam": device.type == "cuda"},
        "reference_s_per_step": round(ref, 4), "ours_s_per_step": round(ours, 4),
        "reference_steps_per_s": round(1 / ref, 2), "ours_steps_per_s": round(1 / ours, 2),
        "speedup": round(ref / ours, 2), "ours_80k_steps_min": round(80_000 * ours / 60, 1),
        "reference_80k_steps_min": round(80_000 * ref / 60, 1),
    }))


if __name__ == "__main__":
    main()
