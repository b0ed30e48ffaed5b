"""All-layer last-token capture of 64 prompts on smollm2-135m: the model offloaded to disk through
accelerate (``load_model(..., device_map=..., offload_folder=...)``) vs the same model in memory, same run.

The offloaded model keeps the embeddings, the final norm, the head and the first ``--in-memory`` decoder
layers in memory and every other layer on disk (weights read back layer by layer during the forward).
Both captures run ``--repeats`` times, interleaved; medians are reported with ``identical`` (bitwise
equal activations). The last printed line is JSON.

``--smoke``: the same code on a tiny random Llama over SmolLM2's tokenizer (2 of its 4 layers on disk),
8 prompts, one repeat (seconds; checks that the benchmark runs, not its speed).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch


def bitwise_prompts(n: int, shots: int = 4) -> list[str]:
    """``n`` bitwise-arithmetic ICL prompts (all seven tasks), as the other benchmarks use."""
    from taskvec_interp.tasks import PromptBuilder, get_family

    fam = get_family("bitwise")
    per_task = -(-n // len(fam.task_names))
    return [p.text for p in PromptBuilder().build(fam, n_per_task=per_task, shots=shots, seed=0)][:n]


def device_map(n_layers: int, in_memory: int) -> dict:
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    return dm | {f"model.layers.{i}": ("cpu" if i < in_memory else "disk") for i in range(n_layers)}


def main() -> None:
    from taskvec_interp import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--in-memory", type=int, default=4, help="decoder layers kept in memory (the rest on disk)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--smoke", action="store_true", help="tiny model and sizes (seconds): CI's check that it runs")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model_name = "smollm2-135m"
    if args.smoke:
        from _smoke import tiny_model_dir

        model_name = tiny_model_dir()
        args.n_prompts, args.in_memory, args.repeats, args.batch_size = 8, 2, 1, 4

    memory = load_model(model_name)
    folder = tempfile.mkdtemp(prefix="taskvec-offload-")
    offloaded = load_model(model_name, device_map=device_map(memory.n_layers, args.in_memory),
                           offload_folder=folder)
    on_disk = sum(v == "disk" for v in offloaded.model.hf_device_map.values())
    prompts = bitwise_prompts(args.n_prompts)
    times: dict[str, list[float]] = {"in_memory": [], "offloaded": []}
    results = {}
    for _ in range(args.repeats):
        for name, adapter in (("in_memory", memory), ("offloaded", offloaded)):
            t0 = time.perf_counter()
            results[name] = adapter.capture(prompts, batch_size=args.batch_size, progress=False)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_tokens = [len(ids) for ids in memory.encode(prompts)]
    out = {
        "benchmark": "offload_capture", "smoke": args.smoke,
        "model": "a tiny random Llama (smoke)" if args.smoke else model_name, "backend": "torch",
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "n_prompts": len(prompts), "prompt_tokens": {"min": min(n_tokens), "max": max(n_tokens)},
        "layers_captured": memory.n_layers, "layers_on_disk": on_disk, "repeats": args.repeats,
        "in_memory_s": round(med["in_memory"], 3), "offloaded_s": round(med["offloaded"], 3),
        "slowdown": round(med["offloaded"] / med["in_memory"], 2),
        "identical": bool(torch.equal(results["in_memory"], results["offloaded"])),
        "shape": list(results["offloaded"].shape),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
