"""All-layer last-token capture through each backend vs plain Hugging Face, in the same run.

Model: a GPT-2-small-sized random GPT-2 (12 layers, d_model 768, vocab 50257); batch 8 x 128 tokens.
Baseline: ``model(input_ids, attention_mask, position_ids, output_hidden_states=True)`` then the
last token of every block output (what a researcher would write). Each backend wraps its own copy of
the same weights (the TransformerLens bridge modifies its model in place). Medians of ``--repeats``.

Memory: capturing 2,000 prompts (in a subprocess each, peak RSS above the loaded model) through the
torch adapter vs keeping HF's full hidden-state cache; the adapter's result is layers x prompts x
d_model floats, the cache is layers x prompts x tokens x d_model.

Discovered architecture: the real SmolLM2-135M (``load_model("smollm2-135m")``) captured through an
architecture found by :func:`~taskvec_interp.adapters.arch.discover_arch` (``find_arch(model,
discover=True)``: its table row is skipped) vs plain ``output_hidden_states``, on a left-padded batch of
random token rows; the ratio should stay within 1.05x (``--discovered-only`` runs just this part).

The last printed line is JSON.

``--smoke``: the same code on a 2-layer d_model 32 GPT-2 (vocab 1,000), 40 prompts for the memory part and,
for the discovered architecture, a tiny random Llama over SmolLM2's tokenizer (seconds; checks that the
benchmark runs, not its speed).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

N_LAYERS, D_MODEL, VOCAB = 12, 768, 50257
SMOKE_SIZES = {"N_LAYERS": 2, "D_MODEL": 32, "VOCAB": 1000}
SMOKE = False


def use_smoke_sizes() -> None:
    global N_LAYERS, D_MODEL, VOCAB, SMOKE
    N_LAYERS, D_MODEL, VOCAB = SMOKE_SIZES["N_LAYERS"], SMOKE_SIZES["D_MODEL"], SMOKE_SIZES["VOCAB"]
    SMOKE = True


def build(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=4 if SMOKE else 12, vocab_size=VOCAB,
                     n_positions=1024)
    return GPT2LMHeadModel(cfg).eval()


def tokenizer():
    """A word-level tokenizer over the model's vocabulary, loaded from a directory (as TL needs)."""
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t0", eos_token="t0", pad_token="t0")
    d = tempfile.mkdtemp()
    tok.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


def prompts(n: int, length: int, seed: int = 0, ragged: bool = True) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g) if ragged else torch.full((n,), length)
    lengths[0] = length
    return [" ".join(f"t{int(t)}" for t in torch.randint(1, VOCAB, (int(L),), generator=g)) for L in lengths]


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each function, timed round-robin so background load hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


class PeakRSS:
    """Samples this process's resident memory every few ms; ``peak`` above the RSS at entry (MiB)."""

    def __enter__(self):
        import threading

        import psutil

        self._proc = psutil.Process()
        self.start = self._proc.memory_info().rss
        self.max = self.start
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.max = max(self.max, self._proc.memory_info().rss)
                self._stop.wait(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.max = max(self.max, self._proc.memory_info().rss)
        self.peak = (self.max - self.start) / 2**20


def speed(repeats: int, batch: int, length: int) -> dict:
    from taskvec_interp.adapters import NNsightAdapter, TorchHooksAdapter, TransformerLensAdapter
    from taskvec_interp.adapters.transformer_lens import bridge_from_hf

    tok = tokenizer()
    texts = prompts(batch, length)
    hf = build()
    adapters = {
        "torch": TorchHooksAdapter(build(), tok),
        "nnsight": NNsightAdapter(build(), tok),
        "transformer_lens": TransformerLensAdapter(bridge_from_hf(build(), tok), tokenizer=tok),
    }
    inputs = adapters["torch"].tokenize(texts)  # the same left-padded batch for the baseline

    def baseline():
        with torch.no_grad():
            hs = hf(**inputs.kwargs, output_hidden_states=True).hidden_states
            return torch.stack([h[:, -1] for h in hs[1:]])

    ref = baseline()
    max_diff = {}
    for name, adapter in adapters.items():
        got = adapter.capture(texts, batch_size=batch, progress=False)
        # block outputs; HF's last entry is after the final norm, so compare the first L-1 layers
        max_diff[name] = (got[:-1] - ref[:-1]).abs().max().item()
    fns = {"hf_output_hidden_states": baseline}
    fns.update({name: (lambda a=a: a.capture(texts, batch_size=batch, progress=False)) for name, a in adapters.items()})
    times = interleaved_medians(fns, repeats)
    base = times["hf_output_hidden_states"]
    return {
        "seconds": {k: round(v, 4) for k, v in times.items()},
        "ratio_to_hf": {k: round(v / base, 3) for k, v in times.items() if k != "hf_output_hidden_states"},
        "max_abs_diff_vs_hf": max_diff,
    }


def discovered(repeats: int, batch: int, length: int) -> dict:
    """All-layer capture on SmolLM2-135M through a discovered architecture vs HF ``output_hidden_states``."""
    from taskvec_interp.adapters import ARCHS, TorchHooksAdapter, load_model
    from taskvec_interp.adapters.arch import find_arch, get_module
    from taskvec_interp.testing.arch_matrix import random_inputs

    if SMOKE:
        from _smoke import tiny_model_dir

        model = load_model(tiny_model_dir()).model
    else:
        model = load_model("smollm2-135m").model
    t0 = time.perf_counter()
    spec = find_arch(model, discover=True)
    discover_s = time.perf_counter() - t0
    adapter = TorchHooksAdapter(model)
    adapter.arch, adapter.blocks = spec, get_module(model, spec.blocks)  # capture through the discovered spec
    g = torch.Generator().manual_seed(0)
    lengths = tuple(int(x) for x in torch.randint(length // 2, length + 1, (batch,), generator=g))
    inputs = random_inputs(model, spec.position_ids, lengths=(length, *lengths[1:]))

    def baseline():
        with torch.no_grad():
            hs = model(**inputs.kwargs, output_hidden_states=True).hidden_states
            return torch.stack([h[:, -1] for h in hs[1:]])

    def capture():
        return adapter.capture(inputs, batch_size=batch, progress=False)

    diff = (capture()[:-1] - baseline()[:-1]).abs().max().item()
    times = interleaved_medians({"hf_output_hidden_states": baseline, "discovered_capture": capture}, repeats)
    return {"model": "a tiny random Llama (smoke)" if SMOKE else "smollm2-135m", "spec": str(spec),
            # the table row holds paths only (measured facts such as hidden_states_has_embeddings are not tabled)
            "same_as_table_row": all(getattr(spec, f) == getattr(ARCHS[model.config.model_type], f)
                                     for f in ("blocks", "attn", "mlp", "mixer", "final_norm", "o_proj", "left_padding")),
            "discover_seconds": round(discover_s, 3), "batch": [batch, length],
            "seconds": {k: round(v, 4) for k, v in times.items()},
            "ratio": round(times["discovered_capture"] / times["hf_output_hidden_states"], 3),
            "within_1_05x": times["discovered_capture"] <= 1.05 * times["hf_output_hidden_states"],
            "max_abs_diff_vs_hf": diff}


def memory_child(mode: str, n: int, length: int, batch: int) -> None:
    """Run in a subprocess: print peak RSS (MiB) above the loaded model for one capture strategy."""
    from taskvec_interp.adapters import TorchHooksAdapter

    torch.set_num_threads(2)
    tok = tokenizer()
    model = build()
    texts = prompts(n, length, ragged=False)
    adapter = TorchHooksAdapter(model, tok)
    adapter.capture(texts[:batch], batch_size=batch, progress=False)  # warm allocator
    with PeakRSS() as mem:
        if mode == "adapter":
            out = adapter.capture(texts, batch_size=batch, progress=False)
            result_mib = out.numel() * out.element_size() / 2**20
        else:  # keep HF's full hidden-state cache for every prompt, as a naive script would
            kept = []
            with torch.no_grad():
                for start in range(0, n, batch):
                    inputs = adapter.tokenize(texts[start:start + batch])
                    kept.append(torch.stack(model(**inputs.kwargs, output_hidden_states=True).hidden_states[1:]))
            result_mib = sum(k.numel() * k.element_size() for k in kept) / 2**20
    print(json.dumps({"peak_rss_increase_mib": round(mem.peak, 1), "result_mib": round(result_mib, 1)}))


def memory(n: int, length: int, batch: int) -> dict:
    out = {}
    for mode in ("adapter", "full_cache"):
        proc = subprocess.run([sys.executable, __file__, "--memory-child", mode, "--mem-prompts", str(n),
                               "--mem-length", str(length), "--mem-batch", str(batch), *(["--smoke"] if SMOKE else [])],
                              capture_output=True, text=True, check=True)
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["expected_adapter_result_mib"] = round(N_LAYERS * n * D_MODEL * 4 / 2**20, 1)
    out["prompts"], out["tokens_per_prompt"], out["batch_size"] = n, length, batch
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--mem-prompts", type=int, default=2000)
    parser.add_argument("--mem-length", type=int, default=16)
    parser.add_argument("--mem-batch", type=int, default=50)
    parser.add_argument("--memory-child", choices=["adapter", "full_cache"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--discovered-only", action="store_true", help="only the discovered-architecture part")
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes (seconds): CI's check that it runs")
    args = parser.parse_args()
    if args.smoke:
        use_smoke_sizes()
        if not args.memory_child:
            args.repeats, args.batch, args.length = 1, 2, 16
            args.mem_prompts, args.mem_length, args.mem_batch = 40, 8, 10
    if args.memory_child:
        memory_child(args.memory_child, args.mem_prompts, args.mem_length, args.mem_batch)
        return
    torch.set_num_threads(args.threads)
    if args.discovered_only:
        print(json.dumps({"benchmark": "capture_overhead/discovered", "smoke": SMOKE, "repeats": args.repeats,
                          "discovered_smollm2": discovered(args.repeats, args.batch, args.length)}))
        return
    result = {
        "benchmark": "capture_overhead",
        "smoke": SMOKE,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": f"random GPT-2 {N_LAYERS}L d{D_MODEL} vocab {VOCAB}",
        "batch": [args.batch, args.length],
        "repeats": args.repeats,
        **speed(args.repeats, args.batch, args.length),
        "memory_2000_prompts": memory(args.mem_prompts, args.mem_length, args.mem_batch),
        "discovered_smollm2": discovered(args.repeats, args.batch, args.length),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
