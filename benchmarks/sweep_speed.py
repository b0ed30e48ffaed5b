"""TD + ICL accuracy for 7 tasks x 40 prompts (4-shot bitwise) on smollm2-135m: ours vs the obvious script.

The obvious script (what a careful researcher writes first): HF forward with output_hidden_states
on left-padded batches (with mask-derived position ids, so padding does not change the numbers),
a scikit-learn leave-one-out k-NN per layer, then HF ``generate`` on the same batches.
Ours: ``run_sweep``: batches sorted by length, ONE generation whose prefill captures every layer,
TD for all layers at once in torch. Both read the same prompts. Checks: per-prompt exact match is
identical; our TD on the obvious script's hidden states equals its scikit-learn TD; the hidden
states of both paths are compared per layer. The last layer differs by design: HF's last
``hidden_states`` entry is after the final norm, the adapter captures the block output (residual
stream), so the end-to-end TD difference is reported per layer. Timings are measured
in the same run. The last line is JSON.

``--smoke``: the same code on a tiny random Llama over SmolLM2's tokenizer, 7 tasks x 6 prompts, 2-shot
(seconds; checks that the benchmark runs, not its speed).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch


def obvious_script(model, tok, prompts, layers: int, k: int, batch_size: int, max_new_tokens: int):
    from sklearn.model_selection import LeaveOneOut, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    from taskvec_interp.probes.accuracy import normalize_answer

    tok.padding_side = "left"
    texts = [p.text for p in prompts]
    labels = np.array([p.label for p in prompts])
    hidden = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True)
            pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            hs = model(**enc, position_ids=pos, output_hidden_states=True).hidden_states
            hidden.append(torch.stack([h[:, -1] for h in hs[1:]]))  # block outputs (last = after final norm)
    hidden = torch.cat(hidden, dim=1)
    td = []
    for layer in range(layers):
        pred = cross_val_predict(KNeighborsClassifier(n_neighbors=k), hidden[layer].double().numpy(), labels,
                                 cv=LeaveOneOut())
        td.append(float((pred == labels).mean()))
    exact = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            for p, row in zip(prompts[i:i + batch_size], out[:, enc["input_ids"].shape[1]:], strict=True):
                text = tok.decode(row, skip_special_tokens=True)
                exact.append(normalize_answer(text) == normalize_answer(p.answer))
    return np.array(td), np.array(exact), hidden


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-per-task", type=int, default=40)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes (seconds): CI's check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.n_per_task, args.shots, args.batch_size = 6, 2, 16
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taskvec_interp import load_model
    from taskvec_interp.adapters import smollm2_dir
    from taskvec_interp.experiments.sweep import SweepConfig, run_sweep
    from taskvec_interp.tasks import build_prompts, get_family, max_answer_tokens

    if args.smoke:
        from _smoke import tiny_model_dir

        model_dir = tiny_model_dir()
        model_name = "a tiny random Llama (smoke)"
    else:
        model_dir, model_name = smollm2_dir(), "smollm2-135m"
    adapter = load_model(model_dir if args.smoke else "smollm2-135m")
    cfg = SweepConfig(family="bitwise", shots=(args.shots,), n_per_task=args.n_per_task, n_boot=0,
                      batch_size=args.batch_size, k=min(SweepConfig.k, args.n_per_task - 2))
    prompts = build_prompts(get_family("bitwise"), n_per_task=args.n_per_task, shots=args.shots, seed=cfg.seed)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    budget = max_answer_tokens(tok, prompts)

    # warm both paths on a few prompts (allocator, lazy imports); k must stay below n_per_task - 1
    run_sweep(adapter, SweepConfig(family="bitwise", shots=(1,), n_per_task=4, n_boot=0, k=2), progress=False)
    obvious_script(hf, tok, prompts[:16], 2, 2, args.batch_size, 1)

    t0 = time.perf_counter()
    ours = run_sweep(adapter, cfg, progress=False)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_td, base_exact, base_states = obvious_script(hf, tok, prompts, adapter.n_layers, cfg.k, args.batch_size, budget)
    t_base = time.perf_counter() - t0

    from taskvec_interp.probes.decodability import task_decodability

    our_td = ours.td[ours.td["level"] == "overall"].sort_values("layer")["td"].to_numpy()
    our_exact = ours.predictions.sort_values("prompt_id")["exact"].to_numpy()
    labels = [p.label for p in prompts]
    same_states_td = task_decodability(base_states, labels, k=cfg.k, n_boot=0).td.numpy()
    our_states = ours.activations[args.shots][0]
    rel_state_diff = float(((our_states[:-1] - base_states[:-1]).abs().amax(-1)
                            / base_states[:-1].abs().amax(-1)).max())
    differing = [int(i) for i in np.nonzero(np.abs(our_td - base_td) > 0)[0]]
    print(json.dumps({
        "benchmark": "sweep_speed",
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "smoke": args.smoke,
        "work": f"bitwise 7 tasks x {args.n_per_task} prompts, {args.shots}-shot, {model_name} "
                f"({adapter.n_layers} layers)",
        "ours_s": round(t_ours, 2),
        "obvious_script_s": round(t_base, 2),
        "speedup": round(t_base / t_ours, 2),
        "exact_identical": bool(np.array_equal(our_exact, base_exact)),
        "td_identical_on_same_states": bool(np.array_equal(same_states_td, base_td)),
        "hidden_state_max_rel_diff": rel_state_diff,
        "td_end_to_end_max_abs_diff": float(np.abs(our_td - base_td).max()),
        "td_end_to_end_layers_differing": differing,
        "peak_layer": int(np.argmax(our_td)), "peak_td": float(our_td.max()),
        "mean_exact": float(our_exact.mean()),
    }))


if __name__ == "__main__":
    main()
