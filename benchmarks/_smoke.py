"""Smoke runs of the benchmarks: each ``benchmarks/*.py`` takes ``--smoke`` (tiny model and sizes, seconds,
the same code path) and prints its final JSON line; this file holds what they share and, run as a script,
runs every one and checks that its last line parses as JSON with the expected keys (not its speed).

    .venv/bin/python benchmarks/_smoke.py                  # all of them (CI: .ci/run)
    .venv/bin/python benchmarks/_smoke.py td_speed         # some of them

The benchmarks that time the real SmolLM2-135M use, in smoke mode, a tiny random Llama (4 layers, d_model
32) over SmolLM2's own tokenizer, saved to a directory and loaded by path like any local model: real
tokenization, no dequantisation, no hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent

EXPECTED_KEYS: dict[str, set[str]] = {
    "capture_overhead": {"benchmark", "seconds", "ratio_to_hf", "max_abs_diff_vs_hf", "memory_2000_prompts",
                         "discovered_smollm2"},
    "finetune_speed": {"benchmark", "ours_s", "plain_s", "speedup", "max_loss_diff", "answer_tokens"},
    "head_effects_speed": {"benchmark", "ours_s", "loop_s", "speedup", "max_abs_diff", "heads", "loop_extrapolated"},
    "offload_capture": {"benchmark", "in_memory_s", "offloaded_s", "slowdown", "identical", "layers_on_disk"},
    "patching_speed": {"benchmark", "obvious_s", "ours_s", "speedup", "identical", "conditions"},
    "sweep_speed": {"benchmark", "ours_s", "obvious_script_s", "speedup", "exact_identical",
                    "td_identical_on_same_states", "peak_layer"},
    "synthetic_seeds": {"benchmark", "together_s", "sequential_s", "speedup", "max_rel_diff"},
    "synthetic_small": {"benchmark", "train_s", "analyze_s", "final_mse", "td_middle_last", "td_peak_last"},
    "synthetic_throughput": {"benchmark", "reference_s_per_step", "ours_s_per_step", "speedup"},
    "synthetic_variants": {"benchmark", "variant", "train_s", "final_mse", "oracle_mse", "td_middle_last"},
    "td_speed": {"shape", "ours_s", "naive_loo_s", "fast_predict_none_s", "speedup_vs_naive", "identical"},
}
"""Keys each benchmark's JSON line must hold (smoke runs add ``"smoke": true``)."""

TIMEOUT_S = 300  # one smoke run; they take seconds to ~half a minute on 2 shared cores


@cache
def tiny_model_dir(layers: int = 4) -> str:
    """A directory holding a tiny random Llama over SmolLM2-135M's vocabulary and that tokenizer (what the
    smoke runs load instead of ``smollm2-135m``; the tokenizer comes from the offline model's cache)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from taskvec_interp.adapters import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    out = Path(tempfile.mkdtemp(prefix="taskvec-smoke-model-"))
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def benchmarks() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_"))


def run_one(name: str) -> tuple[bool, str, float]:
    """Run ``benchmarks/<name>.py --smoke``; (ok, message, seconds)."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), "--smoke"], capture_output=True,
                              text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {TIMEOUT_S} s", time.perf_counter() - t0
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return False, f"exit code {proc.returncode}:\n{proc.stderr[-4000:]}", wall
    lines = proc.stdout.strip().splitlines()
    if not lines:
        return False, "printed nothing", wall
    try:
        record = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        return False, f"last line is not JSON ({e}): {lines[-1][:300]}", wall
    if not isinstance(record, dict):
        return False, f"last line is JSON but not an object: {lines[-1][:300]}", wall
    missing = EXPECTED_KEYS.get(name, {"benchmark"}) - set(record)
    if missing:
        return False, f"JSON lacks {sorted(missing)}: {lines[-1][:300]}", wall
    if record.get("smoke") is not True:
        return False, "JSON does not say smoke: true", wall
    return True, lines[-1][:160], wall


def main(argv: list[str]) -> int:
    names = argv or benchmarks()
    unknown = set(names) - set(benchmarks())
    if unknown:
        print(f"unknown benchmark(s) {sorted(unknown)}; have {benchmarks()}")
        return 2
    untracked = set(benchmarks()) - set(EXPECTED_KEYS)
    if untracked:  # a new benchmark must say which keys its JSON holds
        print(f"benchmark(s) without expected keys in benchmarks/_smoke.py EXPECTED_KEYS: {sorted(untracked)}")
        return 2
    failed = []
    for name in names:
        ok, msg, wall = run_one(name)
        print(f"{'ok  ' if ok else 'FAIL'} {name:22s} {wall:6.1f} s  {msg}", flush=True)
        if not ok:
            failed.append(name)
    print(f"{len(names) - len(failed)}/{len(names)} benchmark smoke runs passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
