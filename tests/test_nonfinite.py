"""Numbers that are not numbers stop the work where they appear (issue 20, part C).

Training (synthetic, stacked seeds, fine-tuning) stops at the first non-finite loss, naming the step and the last
good checkpoint, which is kept and loads; nothing is written after it and metrics.jsonl stays strict JSON.
Captures and generations whose activations overflow say which layer and why (a float16 capture or a float16
model); an all-NaN evaluation is an error, never an accuracy of 0. Bad prompts and layer specs are named.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_lm
from safetensors.torch import load_file

from taskvec_interp.adapters import TorchHooksAdapter
from taskvec_interp.checkpoints import checkpoint_problem
from taskvec_interp.experiments.sweep import fit_td_accuracy
from taskvec_interp.finite import NonFiniteError, json_safe
from taskvec_interp.hooks import check_layer_spec, parse_layers
from taskvec_interp.probes.accuracy import icl_accuracy
from taskvec_interp.synthetic import list_checkpoints, load_checkpoint, train, train_config
from taskvec_interp.synthetic.train import _Engine, train_seeds
from taskvec_interp.tasks import build_prompts, get_family


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _strict_records(path: Path) -> list[dict]:
    """Every line of a metrics file as strict JSON: a bare NaN / Infinity token fails."""
    def refuse(token: str) -> None:
        raise AssertionError(f"{path} holds a bare {token} token")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


def _fast(**kw):
    base = {"steps": 40, "batch_size": 16, "eval_every": 20, "log_every": 5, "ckpt_every": 10,
            "ckpt_log_points": 4, "n_test_per_basis": 8}
    return train_config("tiny", **{**base, **kw})


def _inject(monkeypatch, at_call: int, value: float, seed_index: int = 0) -> None:
    """The training loss of ``seed_index`` becomes ``value`` at the ``at_call``-th optimiser step (1-based)."""
    real = _Engine.step
    calls = {"n": 0}

    def step(self, xs, ys, amp_dtype, device):
        losses = real(self, xs, ys, amp_dtype, device)
        calls["n"] += 1
        if calls["n"] == at_call:
            losses = losses.clone()
            losses[seed_index] = value
        return losses

    monkeypatch.setattr(_Engine, "step", step)


# ------------------------------------------------------------------------------------------------
# Synthetic training
# ------------------------------------------------------------------------------------------------
def test_a_diverging_learning_rate_stops_at_the_first_bad_step(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"training diverged in .*run: test_mse is nan at step 1") as err:
        train(_fast(lr=1e10), run, progress=False)  # Adam's first update puts the weights at ~1e10: NaN
    msg = str(err.value)
    assert "step_0000000 (step 0), kept as it is" in msg and "lr (now 1e+10)" in msg and "\n" not in msg
    assert [s for s, _ in list_checkpoints(run)] == [0]  # no checkpoint of NaN weights
    recs = _strict_records(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == [0] and math.isfinite(recs[0]["test_mse"])
    model = load_checkpoint(run / "checkpoints" / "step_0000000")  # the last good checkpoint loads
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("value, shown", [(math.nan, "nan"), (math.inf, "inf")])
def test_a_non_finite_loss_names_its_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, value, shown):
    run = tmp_path / "run"
    _inject(monkeypatch, 13, value)
    with pytest.raises(NonFiniteError, match=rf"the training loss is {shown} at step 13") as err:
        train(_fast(), run, progress=False)
    assert "step_0000012 (step 12), kept as it is" in str(err.value)
    assert [s for s, _ in list_checkpoints(run)] == [0, 1, 3, 10, 12]  # nothing after the bad step
    assert all(checkpoint_problem(p) is None for _, p in list_checkpoints(run))
    recs = _strict_records(run / "metrics.jsonl")
    assert max(r["step"] for r in recs) <= 12
    assert all(math.isfinite(v) for r in recs for v in r.values() if isinstance(v, float))
    load_checkpoint(run / "checkpoints" / "step_0000012")


def test_a_rerun_resumes_from_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _inject(monkeypatch, 13, math.nan)
    with pytest.raises(NonFiniteError):
        train(_fast(steps=20), run, progress=False)
    monkeypatch.undo()  # the cause is gone (e.g. a transient fault): the same config resumes from step 12
    last = train(_fast(steps=20), run, progress=False)
    assert last.name == "step_0000020"
    assert [r["step"] for r in _strict_records(run / "metrics.jsonl")][-1] == 20


def test_stacked_seeds_stop_naming_the_seed(tmp_path, monkeypatch):
    run = tmp_path / "seeds"
    _inject(monkeypatch, 7, math.nan, seed_index=1)
    with pytest.raises(NonFiniteError, match=r"seed_4 \(seed 4\): the training loss is nan at step 7") as err:
        train_seeds(_fast(steps=12), [3, 4], run, progress=False)
    assert "step_0000005 (step 5), kept as it is" in str(err.value)
    for seed in (3, 4):  # neither seed got a checkpoint or a record after the bad step
        d = run / f"seed_{seed}"
        assert [s for s, _ in list_checkpoints(d)] == [0, 1, 2, 5]
        assert max(r["step"] for r in _strict_records(d / "metrics.jsonl")) <= 5
        load_checkpoint(d / "checkpoints" / "step_0000005")


def test_weights_that_turn_non_finite_are_never_checkpointed(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = _Engine.step
    calls = {"n": 0}

    def step(self, xs, ys, amp_dtype, device):  # the loss of step 10 is finite, its update is not
        losses = real(self, xs, ys, amp_dtype, device)
        calls["n"] += 1
        if calls["n"] == 10:
            with torch.no_grad():
                next(self.model.parameters()).fill_(math.inf)
        return losses

    monkeypatch.setattr(_Engine, "step", step)
    with pytest.raises(NonFiniteError, match=r"at step 10") as err:
        train(_fast(), run, progress=False)
    assert "step_0000003 (step 3), kept as it is" in str(err.value)
    assert [s for s, _ in list_checkpoints(run)] == [0, 1, 3]


def test_metrics_are_written_as_strict_json():
    assert json_safe({"a": math.nan, "b": [1.0, math.inf], "c": {"d": -math.inf}, "e": 2}) == \
        {"a": None, "b": [1.0, None], "c": {"d": None}, "e": 2}
    with pytest.raises(ValueError, match="not JSON compliant"):
        json.dumps({"a": math.nan}, allow_nan=False)  # what every metrics writer now uses


# ------------------------------------------------------------------------------------------------
# Fine-tuning
# ------------------------------------------------------------------------------------------------
FAST_FT = {"n_train": 6, "steps": 6, "batch_size": 4, "lr": 5e-2, "warmup_steps": 2, "ckpt_every": 3,
           "n_per_task": 3, "shots": 2, "k": 1}


def _tiny_llama(tok):
    return tiny_lm("llama", vocab_size=len(tok), seed=5, num_hidden_layers=2, max_position_embeddings=256,
                   tie_word_embeddings=True, eos_token_id=tok.eos_token_id)


def test_a_diverging_fine_tune_stops_at_its_step(smol_tokenizer, tmp_path, monkeypatch):
    from taskvec_interp.experiments import finetune as ft

    real = ft.train_step

    def step(model, opt, data, gen, config, step, pad_id, params):
        loss, n_tok = real(model, opt, data, gen, config, step, pad_id, params)
        return (math.nan if step == 5 else loss), n_tok

    monkeypatch.setattr(ft, "train_step", step)
    cfg = ft.FinetuneConfig(model="tiny", layers="first:1", **FAST_FT)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"fine-tuning diverged in .*run: the training loss is nan at step 5") as e:
        ft.finetune(cfg, out, model=_tiny_llama(smol_tokenizer), tokenizer=smol_tokenizer, progress=False,
                    evaluate=False)
    assert "step_0000003 (step 3), kept as it is" in str(e.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000003"]
    assert checkpoint_problem(out / "checkpoints" / "step_0000003") is None
    assert load_file(out / "checkpoints" / "step_0000003" / "trainable.safetensors")  # loads
    assert [r["step"] for r in _strict_records(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not (out / "trained.safetensors").exists()  # no result: the run is not finished
    with pytest.raises(ValueError, match="not finished"):
        ft.FinetuneResult.load(out)


def test_a_fine_tune_whose_weights_turn_non_finite_stops(smol_tokenizer, tmp_path, monkeypatch):
    from taskvec_interp.experiments import finetune as ft

    real = ft.train_step

    def step(model, opt, data, gen, config, step, pad_id, params):
        out = real(model, opt, data, gen, config, step, pad_id, params)
        if step == 2:
            with torch.no_grad():
                params[0].fill_(math.nan)
        return out

    monkeypatch.setattr(ft, "train_step", step)
    cfg = ft.FinetuneConfig(model="tiny", layers="first:1", **FAST_FT)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"trainable weights are not finite after the update .*at step 2; .*no "
                                             r"checkpoint was written yet"):
        ft.finetune(cfg, out, model=_tiny_llama(smol_tokenizer), tokenizer=smol_tokenizer, progress=False,
                    evaluate=False)
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert [r["step"] for r in _strict_records(out / "metrics.jsonl")] == [1]


# ------------------------------------------------------------------------------------------------
# Captures and generations
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def loud(smol_tokenizer):
    """A tiny GPT-2 whose layer 1 writes 1e6 into the residual stream: fine in float32, beyond float16."""
    model = tiny_lm("gpt2", vocab_size=len(smol_tokenizer), seed=0, eos_token_id=smol_tokenizer.eos_token_id)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.bias.fill_(1e6)
    return model


PROMPTS = ["w1 w2 w3", "w4 w5 w6 w7"]


def test_a_float16_capture_that_overflows_names_the_layer(loud, smol_tokenizer):
    adapter = TorchHooksAdapter(loud, smol_tokenizer)
    assert adapter.capture(PROMPTS, progress=False).tensor.abs().max() > 65504  # float32: fine
    with pytest.raises(NonFiniteError, match=r"capture: the activations at layer 1 \(blocks\.1\.hook_resid_post\) "
                                             r"are inf for prompt 0, the first non-finite layer: .*float16's range"
                                             r".*capture with dtype=torch\.float32"):
        adapter.capture(PROMPTS, dtype=torch.float16, progress=False)


def test_a_float16_model_that_overflows_names_the_layer(loud, smol_tokenizer):
    adapter = TorchHooksAdapter(loud.half(), smol_tokenizer)
    with pytest.raises(NonFiniteError, match=r"layer 1 .*the model runs in float16 .*load it in float32 or "
                                             r"bfloat16"):
        adapter.capture(PROMPTS, progress=False)
    with pytest.raises(NonFiniteError, match=r"generate: the activations at layer 1 .*float16"):
        adapter.generate(PROMPTS, 2, progress=False)  # no capture asked: the last layer is watched


def test_generate_with_a_capture_names_the_layer_a_hook_made_nan(smol_tokenizer):
    model = tiny_lm("gpt2", vocab_size=len(smol_tokenizer), seed=0, eos_token_id=smol_tokenizer.eos_token_id)
    adapter = TorchHooksAdapter(model, smol_tokenizer)

    def poison(act, ctx):
        return torch.full_like(act, math.nan)

    with pytest.raises(NonFiniteError, match=r"layer 2 \(blocks\.2\.hook_resid_post\) are nan .*a hook or vector"):
        adapter.generate(PROMPTS, 2, hooks=[("blocks.2.hook_resid_post", poison)], capture_layers="all",
                         progress=False)


def test_an_all_nan_evaluation_is_an_error_not_an_accuracy_of_0(smol_tokenizer):
    model = tiny_lm("llama", vocab_size=len(smol_tokenizer), seed=0, num_hidden_layers=2,
                    max_position_embeddings=256, eos_token_id=smol_tokenizer.eos_token_id)
    with torch.no_grad():
        model.model.norm.weight.fill_(math.nan)  # the hidden states are fine, the logits are NaN
    adapter = TorchHooksAdapter(model, smol_tokenizer)
    prompts = build_prompts(get_family("bitwise"), n_per_task=1, shots=1, seed=0)[:3]
    with pytest.raises(NonFiniteError, match=r"next-token logits of prompt 0 are nan .*not an accuracy of 0"):
        icl_accuracy(adapter, prompts, progress=False)


def test_a_fit_over_all_nan_td_is_an_error():
    td = pd.DataFrame({"layer": [0, 0, 0], "level": ["overall", "task", "task"], "task": ["all", "a", "b"],
                       "td": [math.nan] * 3, "shots": 1})
    acc = pd.DataFrame({"task": ["a", "b"], "shots": 1, "exact": [0.0, 0.0]})
    with pytest.raises(NonFiniteError, match=r"overall TD is NaN at every layer \(\[0\]\)"):
        fit_td_accuracy(td, acc)
    td.loc[td["level"] == "overall", "td"] = 0.5
    with pytest.raises(NonFiniteError, match=r"TD at layer 0 is NaN for every task x shots point"):
        fit_td_accuracy(td, acc)


def test_a_nan_score_is_an_error(smol_tokenizer):
    model = tiny_lm("gpt2", vocab_size=len(smol_tokenizer), seed=0, eos_token_id=smol_tokenizer.eos_token_id)
    adapter = TorchHooksAdapter(model, smol_tokenizer)

    def poison(act, ctx):
        return torch.full_like(act, math.nan)

    answers = [[5], [6]]
    with pytest.raises(NonFiniteError, match=r"log-probability of prompt 0's answer under branch 1 is nan"):
        adapter.score_branches(PROMPTS, answers, [[], [("blocks.2.hook_resid_post", poison)]], progress=False)


# ------------------------------------------------------------------------------------------------
# Prompts and layer specs are named, never a library's internals
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, error, match", [
    (b"w1 w2", TypeError, r"prompt 1 is a bytes \(b'w1 w2'\), not a string"),
    (None, TypeError, r"prompt 1 is a NoneType \(None\), not a string"),
    ("w1 \ud800 w2", ValueError, r"prompt 1 is not valid Unicode text: surrogates not allowed at character 3"),
])
def test_a_bad_prompt_is_named_by_its_index(tiny_smol, bad, error, match):
    with pytest.raises(error, match=match):
        tiny_smol.capture(["w1 w2", bad], progress=False)


@pytest.mark.parametrize("spec, match", [
    ("first:" + "9" * 5000, r"\(5000 digits\) is beyond any model's layers"),
    ("0-" + "9" * 5000, r"\(5000 digits\) is beyond any model's layers"),
    ("first:99999999999", r"\(11 digits\) is beyond any model's layers"),
    ("first:\u0663", r"'\u0663' is not an int"),
    ("1_000", r"'1_000' is not an int"),
])
def test_layer_specs_never_leak_an_internal_size(spec, match):
    for check in (lambda: check_layer_spec(spec), lambda: parse_layers(spec, 4)):
        with pytest.raises(ValueError, match=match) as err:
            check()
        msg = str(err.value)
        assert "4300" not in msg and "2147483647" not in msg and "set_int_max_str_digits" not in msg
        assert len(msg) < 400  # the spec is shown cut, not 5000 digits
