"""LoRA fine-tuning throughput on smollm2-135m: ours (``finetune``) vs a plain peft + torch loop, same run.

Same model, data (4-shot bitwise prompts from the train side), seed, LoRA config (rank 16, alpha 16,
dropout 0.1 on the first 10 blocks), AdamW with warmup + cosine, and steps. The plain loop is written
the obvious way: ``model(input_ids, attention_mask, labels=labels).loss`` (full logits, Hugging Face's
loss), backward, clip, step. Ours computes logits only where an answer token is predicted and
checkpoints at the end (included in its time). Both draw the same batches and the same dropout masks,
so their loss curves agree; ``max_loss_diff`` is the largest per-step difference. The last line is JSON.

``--smoke``: the same code on a tiny random Llama over SmolLM2's tokenizer, 3 steps of batch 2 on its first
2 layers (seconds; checks that the benchmark runs, not its speed).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch


def plain_loop(base, tok, data, cfg, layers_pattern: str, layers: list[int], targets: list[str]):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout, target_modules=targets,
        layers_to_transform=layers, layers_pattern=layers_pattern, bias="none"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses, tokens = [], 0
    for step in range(1, cfg.steps + 1):
        if step < cfg.warmup_steps:
            lr = cfg.lr * step / cfg.warmup_steps
        else:
            frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            lr = cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(data.input_ids), (cfg.batch_size,), generator=gen).tolist()
        batch = data.batch(idx, tok.pad_token_id)  # right padding, labels -100 on the prompt
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        losses.append(float(out.loss.detach()))
        tokens += int((batch["labels"][:, 1:] != -100).sum())
    return losses, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", default="first:10")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny model and sizes (seconds): CI's check that it runs")
    args = ap.parse_args()
    n_train = 200
    if args.smoke:
        args.steps, args.batch_size, args.layers, n_train = 3, 2, "first:2", 8
    torch.set_num_threads(args.threads)

    from taskvec_interp.adapters.arch import find_arch
    from taskvec_interp.adapters.load import resolve_model
    from taskvec_interp.experiments.finetune import (
        FinetuneConfig,
        finetune,
        resolve_layer_spec,
        target_modules,
        training_data,
    )

    if args.smoke:
        from _smoke import tiny_model_dir

        model_name = tiny_model_dir()
    else:
        model_name = "smollm2-135m"
    base, tok = resolve_model(model_name)
    cfg = FinetuneConfig(model=model_name, family="bitwise", layers=args.layers, steps=args.steps,
                         batch_size=args.batch_size, warmup_steps=max(1, args.steps // 10), ckpt_every=args.steps,
                         n_train=n_train)
    data = training_data(tok, cfg)
    arch = find_arch(base)
    layers = resolve_layer_spec(cfg.layers, len(base.model.layers))
    targets = target_modules(base, arch, layers[0])

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run = finetune(cfg, Path(tmp) / "run", model=base, tokenizer=tok, progress=False, evaluate=False)
        ours_s = time.perf_counter() - t
        recs = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    ours_loss = [r["loss"] for r in recs]
    tokens = sum(r["answer_tokens"] for r in recs)
    t = time.perf_counter()
    plain_loss, plain_tokens = plain_loop(base, tok, data, cfg, arch.blocks.split(".")[-1], layers, targets)
    plain_s = time.perf_counter() - t
    assert plain_tokens == tokens, (plain_tokens, tokens)
    print(json.dumps({
        "benchmark": "finetune_speed", "smoke": args.smoke,
        "model": "a tiny random Llama (smoke)" if args.smoke else model_name, "family": "bitwise", "shots": cfg.shots,
        "machine": f"{platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}",
        "layers": args.layers, "method": "lora", "rank": cfg.rank, "steps": cfg.steps, "batch_size": cfg.batch_size,
        "answer_tokens": tokens, "ours_s": round(ours_s, 2), "plain_s": round(plain_s, 2),
        "ours_tokens_per_s": round(tokens / ours_s, 2), "plain_tokens_per_s": round(tokens / plain_s, 2),
        "speedup": round(plain_s / ours_s, 3),
        "max_loss_diff": max(abs(a - b) for a, b in zip(ours_loss, plain_loss, strict=True)),
        "loss_first_last": [round(ours_loss[0], 4), round(ours_loss[-1], 4)],
    }))


if __name__ == "__main__":
    main()
