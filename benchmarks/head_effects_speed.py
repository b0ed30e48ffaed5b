"""The exact causal indirect effect (CIE) of every attention head of smollm2-135m (30 layers x 9 heads = 270):
ours (every head a branch of one shared prompt prefix) vs the obvious loop, same run (issue 23).

Setting: function-vector tasks (the shipped excerpts in ``tests/data/function_vectors``: antonym, country-capital,
present-past, singular-plural), 5 prompts each = 20 prompts, 10-shot in Todd et al.'s ``Q:`` / ``A:`` template with
the demonstrations' labels shuffled within each prompt; every head's ``z`` at the last prompt token replaced by its
task mean (from 5 clean prompts per task, one capture pass, timed apart as ``means_s``); the effect is the
probability of the answer's first token.

* The obvious loop: one full forward pass of the Hugging Face model per head over the whole prompt batch, with a
  plain ``register_forward_pre_hook`` on that layer's ``o_proj`` that writes the head's slice of the last column
  (plus one unpatched pass for the baseline).
* Ours: :func:`taskvec_interp.experiments.heads.head_effects`: the prompt prefix (every token but the last) runs
  once; each head runs only the last prompt token and the answer token on a copy of the prefix's KV cache, heads
  stacked along the batch axis (``--max-rows`` rows per call).

``max_abs_diff``: the largest difference between the two methods' probabilities (patched and baseline) over every
head the loop ran. ``--loop-heads N`` times the loop on N heads spread evenly over the layers (the loop's cost is
the same for every head) and extrapolates its time to all heads (``loop_extrapolated: true``); the default runs
the loop on every head. The last line is JSON.

``--smoke``: the same code on a tiny random Llama over SmolLM2's tokenizer, 2-shot, 8 prompts (seconds).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "function_vectors" / "dataset_files" / "abstractive"
TASKS = ("antonym", "country-capital", "present-past", "singular-plural")


def obvious_loop(model, o_projs, n_heads: int, enc: dict, answers: torch.Tensor, values: torch.Tensor,
                 heads: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One full forward per head (plus the baseline), a plain pre-hook on ``o_proj`` writing the head's slice of the
    last column (the batch is left-padded: the last column is every prompt's last token)."""
    def prob(out) -> torch.Tensor:
        return out.logits[:, -1].double().log_softmax(-1).gather(-1, answers[:, None])[:, 0].exp()

    with torch.no_grad():
        base = prob(model(**enc, logits_to_keep=1, use_cache=False))
        outs = []
        for layer, head in heads:
            def pre(module, args, layer=layer, head=head):
                x = args[0].clone()
                d = x.shape[-1] // n_heads
                x[:, -1, head * d:(head + 1) * d] = values[:, layer, head].to(x.dtype)
                return (x, *args[1:])

            handle = o_projs[layer].register_forward_pre_hook(pre)
            try:
                outs.append(prob(model(**enc, logits_to_keep=1, use_cache=False)))
            finally:
                handle.remove()
    return base, torch.stack(outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-task", type=int, default=5, help="prompts per task (4 tasks)")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--max-rows", type=int, default=256, help="rows (heads x prompts) stacked per call of ours")
    ap.add_argument("--loop-heads", type=int, default=None, help="time the loop on this many heads spread evenly "
                                                                 "over the layers and extrapolate (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny model and sizes (seconds): CI's check that it runs")
    args = ap.parse_args()
    if args.smoke:
        args.per_task, args.shots = 2, 2
    torch.set_num_threads(args.threads)

    from taskvec_interp import load_model
    from taskvec_interp.experiments.heads import (
        TODD_TEMPLATE,
        answer_first_tokens,
        corrupt_prompts,
        head_effects,
    )
    from taskvec_interp.probes.heads import mean_head_activations, output_projections
    from taskvec_interp.tasks import PromptBuilder, PromptTemplate, get_family

    if args.smoke:
        from _smoke import tiny_model_dir

        adapter = load_model(tiny_model_dir())
    else:
        adapter = load_model("smollm2-135m")
    fam = get_family(f"files:{DATA}", tasks=list(TASKS))
    template = PromptTemplate(**TODD_TEMPLATE)
    builder = PromptBuilder(template)
    tasks = [t for t in fam.task_names if t != fam.null.name]
    clean = builder.build(fam, args.per_task, args.shots, seed=0, tasks=tasks)
    prompts = corrupt_prompts(builder.build(fam, args.per_task, args.shots, seed=1, tasks=tasks), fam, "shuffled",
                              template, seed=1)
    texts = [p.text for p in prompts]
    answers = answer_first_tokens(adapter, prompts)
    t = time.perf_counter()
    means, _ = mean_head_activations(adapter, clean, progress=False)
    means_s = time.perf_counter() - t
    values = means.for_prompts([p.task for p in prompts])
    n_heads = adapter.n_heads
    heads = [(layer, head) for layer in range(adapter.n_layers) for head in range(n_heads)]
    if args.loop_heads is None or args.loop_heads >= len(heads):
        loop_heads = heads
    else:
        step = len(heads) / args.loop_heads
        loop_heads = [heads[int(i * step)] for i in range(args.loop_heads)]

    # the plain model's inputs, in the adapter's own layout (left padding, mask-derived positions)
    inputs = adapter.tokenize(texts)
    enc = {k: v for k, v in inputs.kwargs.items()}
    o_projs = output_projections(adapter)
    model = adapter.model
    # warm-up, both paths
    head_effects(adapter, texts[:4], answers[:4], values[:4], heads[:2], batch_size=4, progress=False)
    obvious_loop(model, o_projs, n_heads, {k: v[:4] for k, v in enc.items()}, answers[:4], values[:4], heads[:1])

    t = time.perf_counter()
    base, ours = head_effects(adapter, texts, answers, values, batch_size=len(texts), max_rows=args.max_rows,
                              progress=False)
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    lbase, loop = obvious_loop(model, o_projs, n_heads, enc, answers, values, loop_heads)
    measured = time.perf_counter() - t
    loop_s = measured * len(heads) / len(loop_heads)
    rows = torch.tensor([heads.index(h) for h in loop_heads])
    diff = max(float((ours[rows] - loop).abs().max()), float((base - lbase).abs().max()))
    lengths = [len(ids) for ids in adapter.encode(texts)]
    print(json.dumps({
        "benchmark": "head_effects_speed", "smoke": args.smoke,
        "model": "a tiny random Llama (smoke)" if args.smoke else "smollm2-135m", "backend": adapter.backend,
        "machine": f"{platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}",
        "family": "function_vectors (tests/data excerpts)", "tasks": tasks, "shots": args.shots,
        "corruption": "shuffled", "n_prompts": len(texts), "prompt_tokens": {"min": min(lengths), "max": max(lengths)},
        "heads": len(heads), "n_layers": adapter.n_layers, "n_heads": n_heads, "max_rows": args.max_rows,
        "means_s": round(means_s, 2), "ours_s": round(ours_s, 2), "loop_s": round(loop_s, 2),
        "loop_heads_timed": len(loop_heads), "loop_measured_s": round(measured, 2),
        "loop_extrapolated": len(loop_heads) < len(heads), "speedup": round(loop_s / ours_s, 2),
        "max_abs_diff": diff, "max_abs_cie": float((ours - base).abs().max()),
        "mean_p_base": float(base.mean()), "target_met": loop_s / ours_s >= 10 and diff <= 1e-5,
    }))


if __name__ == "__main__":
    main()
