"""Training step time of a synthetic config: our trainer vs a plain fp32 eager reference, same run.

Reference: the same model (``SyntheticRegressor``) and loss written straightforwardly: sample a batch,
forward, MSE, backward, ``torch.optim.Adam`` (its default implementation) step. Ours:
``taskvec_interp.synthetic.train`` with the options given (fused Adam always; ``--compile``: inductor
on CPU, CUDA graphs with ``--compile-mode reduce-overhead`` on a GPU; ``--bf16`` autocast). Both run on
the same device in the same process, timed after a warm-up (which includes compilation). The paper
took ~8 h for 80K steps of the ``paper`` config on an A100. The last line is JSON.

    python benchmarks/synthetic_throughput.py --config small --compile          # CPU, 2 threads
    python benchmarks/synthetic_throughput.py --config paper --device cuda --bf16 --compile

``--smoke``: the same code on the ``tiny`` config, 2 warm-up and 3 timed steps (seconds; checks that it runs).
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
    parser.add_argument("--config", default="small", help="a named train config: small | paper | ...")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 200 small, 20 paper)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode (default: reduce-overhead = CUDA graphs on a GPU, default on CPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes (seconds): CI's check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.config, args.steps, args.warmup = "tiny", 3, 2
    torch.set_num_threads(args.threads)
    from taskvec_interp.synthetic import train_config

    device = torch.device(args.device)
    mode = args.compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")
    n = args.steps or (200 if args.config != "paper" else 20)
    total = args.warmup + n + 1
    cfg = train_config(args.config, steps=total, eval_every=10**9, log_every=1, ckpt_every=10**9, ckpt_log_points=0,
                       n_test_per_basis=8, device=args.device, compile=args.compile, compile_mode=mode,
                       warmup_steps=0, autocast_dtype="bfloat16" if args.bf16 else None)
    ref = reference_steps(cfg, n, args.warmup, device)
    ours = our_steps(cfg, n, args.warmup)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    m = cfg.model
    print(json.dumps({
        "benchmark": "synthetic_throughput", "smoke": args.smoke, "machine": name, "torch": torch.__version__, "config": args.config,
        "model": f"{m.backbone} {m.n_layer}L d{m.d_model} {m.n_head} heads, {m.attn_implementation} attention, "
                 f"{m.activation}, batch {cfg.batch_size}, {cfg.data.n_points} examples ({2 * cfg.data.n_points} tokens)",
        "options": {"bf16": args.bf16, "compile": args.compile, "compile_mode": mode if args.compile else None,
                    "fused_adam": True},
        "timed_steps": n, "reference_s_per_step": round(ref, 5), "ours_s_per_step": round(ours, 5),
        "reference_steps_per_s": round(1 / ref, 2), "ours_steps_per_s": round(1 / ours, 2),
        "speedup": round(ref / ours, 2), "ours_80k_steps_min": round(80_000 * ours / 60, 1),
        "reference_80k_steps_min": round(80_000 * ref / 60, 1),
    }))


if __name__ == "__main__":
    main()
