"""Task-vector patching on smollm2-135m: ours (shared prompt prefix) vs the obvious loop, same run.

Setting (issue 9): bitwise 4-shot, 7 tasks x 10 prompts, 10 layers (every third) x {add, replace} x
{positive, negative} = 40 conditions, the paper's task vectors (computed once, shared by both).

* The obvious loop: for each condition, one full Hugging Face ``generate`` over the left-padded
  batch, with a ``register_forward_hook`` on the block that writes the vector into the last prompt
  column during the prefill.
* Ours: ``Adapter.generate_branches``: the prompt prefix (every token but the last) runs once per
  prompt batch; every condition runs only the last prompt token and the answer, on a copy of the
  prefix's KV cache, conditions stacked along the batch axis.

``identical`` is true when every generated answer (token ids) is equal. The last line is JSON.

``--smoke``: the same code on a tiny random Llama over SmolLM2's tokenizer, 7 tasks x 2 prompts, 2-shot,
2 layers (seconds; checks that the benchmark runs, not its speed).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def obvious_loop(model, tok, prompts, vectors, conditions, max_new_tokens: int):
    """One full generate per condition, with a plain forward hook on the patched block."""
    tok.padding_side = "left"
    enc = tok([p.text for p in prompts], return_tensors="pt", padding=True)
    own = {}
    outs = []
    for cond in conditions:
        layer, mode = cond["layer"], cond["mode"]
        at = vectors.vectors[vectors.layer_index(layer)]
        if cond["vector"] == "own":
            key = layer
            if key not in own:
                own[key] = at[[vectors.task_index(p.task) for p in prompts]]
            vec = own[key]
        else:
            vec = at[vectors.task_index(cond["vector"])].expand(len(prompts), -1)

        def hook(module, args, output, vec=vec, mode=mode):
            if output.shape[1] == 1:  # decoding steps: the patch lives on in the KV cache
                return None
            out = output.clone()
            out[:, -1] = vec if mode == "replace" else output[:, -1] + vec
            return out

        handle = model.model.layers[layer].register_forward_hook(hook)
        try:
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        finally:
            handle.remove()
        rows = []
        for row in gen[:, enc["input_ids"].shape[1]:].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            rows.append(row)
        outs.append(rows)
    return outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-per-task", type=int, default=10)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--every", type=int, default=3, help="patch every this many layers")
    ap.add_argument("--max-rows", type=int, default=256, help="rows (conditions x prompts) stacked per call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny model and sizes (seconds): CI's check that it runs")
    args = ap.parse_args()
    if args.smoke:
        args.n_per_task, args.shots, args.every = 2, 2, 2
    torch.set_num_threads(args.threads)

    from taskvec_interp import hooks as H
    from taskvec_interp import load_model
    from taskvec_interp.experiments.patching import intervention_hooks, patch_conditions
    from taskvec_interp.probes.accuracy import answer_budget
    from taskvec_interp.probes.vectors import task_vectors
    from taskvec_interp.tasks import PromptBuilder, get_family

    if args.smoke:
        from _smoke import tiny_model_dir

        adapter = load_model(tiny_model_dir())
    else:
        adapter = load_model("smollm2-135m")
    fam = get_family("bitwise")
    builder = PromptBuilder()
    prompts = builder.build(fam, n_per_task=args.n_per_task, shots=args.shots, seed=0)
    layers = list(range(0, adapter.n_layers, args.every))
    t = time.perf_counter()
    vectors = task_vectors(adapter, builder.build(fam, n_per_task=args.n_per_task, shots=args.shots, seed=1),
                           "paper", layers, progress=False)
    vector_s = time.perf_counter() - t
    conds = patch_conditions(layers, ("add", "replace"), ("positive", "negative"), fam.task_names)[1:]
    _, max_new = answer_budget(adapter, prompts)
    texts = [p.text for p in prompts]
    branches = [intervention_hooks(c, vectors, prompts) for c in conds]
    assert all(H.writes_last_token_only(fn) for b in branches for _, fn in b)

    warm = [intervention_hooks(c, vectors, prompts[:8]) for c in conds[:2]]
    adapter.generate_branches(texts[:8], warm, max_new, progress=False)  # warm-up, both paths
    obvious_loop(adapter.model, adapter.tokenizer, prompts[:8], vectors, conds[:2], max_new)

    t = time.perf_counter()
    ours = adapter.generate_branches(texts, branches, max_new, batch_size=len(texts), max_rows=args.max_rows,
                                     progress=False)
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    ref = obvious_loop(adapter.model, adapter.tokenizer, prompts, vectors, conds, max_new)
    base_s = time.perf_counter() - t

    same = [g.tokens == r for g, r in zip(ours, ref, strict=True)]
    n_rows = sum(len(r) for r in ref)
    n_diff = sum(a != b for g, r in zip(ours, ref, strict=True) for a, b in zip(g.tokens, r, strict=True))
    lengths = [len(ids) for ids in adapter.encode(texts)]
    print(json.dumps({
        "benchmark": "patching_speed", "smoke": args.smoke,
        "model": "a tiny random Llama (smoke)" if args.smoke else "smollm2-135m", "backend": adapter.backend,
        "machine": f"{platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}",
        "family": "bitwise", "shots": args.shots, "tasks": len(fam.task_names), "n_prompts": len(prompts),
        "layers": layers, "conditions": len(conds), "max_new_tokens": max_new,
        "prompt_tokens": {"min": min(lengths), "max": max(lengths)}, "max_rows": args.max_rows,
        "engine": ours[0].engine, "vectors_s": round(vector_s, 2),
        "obvious_s": round(base_s, 2), "ours_s": round(ours_s, 2), "speedup": round(base_s / ours_s, 2),
        "identical": all(same), "rows_differing": n_diff, "rows": n_rows,
    }))


if __name__ == "__main__":
    main()
