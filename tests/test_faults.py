"""Long runs that survive faults: a synthetic run and a fine-tuning run killed while a checkpoint was being
written (a torn file), a bit-flipped checkpoint, an empty ``step_*`` folder and a torn metrics line all resume
to the uninterrupted result, saying what they skipped; a run never gets a config it did not train with."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from taskvec_interp.checkpoints import (
    checkpoint_problem,
    latest_good_checkpoint,
    list_checkpoints,
    read_metrics,
)
from taskvec_interp.synthetic import train, train_config
from taskvec_interp.synthetic.train import load_run_config


def _cfg(**kw):
    base = {"steps": 30, "batch_size": 16, "eval_every": 10, "log_every": 5, "ckpt_every": 10,
            "ckpt_log_points": 0, "n_test_per_basis": 8}
    return train_config("tiny", **{**base, **kw})


def _weights(ckpt: Path) -> dict:
    return load_file(ckpt / "model.safetensors")


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in read_metrics(run)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cfg = _cfg()
    run = tmp_path_factory.mktemp("ref")
    return cfg, run, train(cfg, run, progress=False)


def _torn(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x40  # a bit in the last tensor's data
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fault", ["torn", "bitflip", "missing_manifest"])
def test_synthetic_run_resumes_past_a_damaged_checkpoint(reference, tmp_path, fault):
    cfg, ref_run, ref_last = reference
    run = tmp_path / "run"
    train(cfg, run, progress=False, stop_at=20)  # killed after step 20 (checkpoints 0, 10, 20)
    newest = run / "checkpoints" / "step_0000020"
    {"torn": lambda: _torn(newest / "model.safetensors"), "bitflip": lambda: _flip(newest / "model.safetensors"),
     "missing_manifest": lambda: (newest / "manifest.json").unlink()}[fault]()
    (run / "checkpoints" / "step_0000025").mkdir()  # an empty step folder, newer than the rest
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 21, "train_lo')  # torn last metrics line
    assert checkpoint_problem(newest) is not None and checkpoint_problem(run / "checkpoints" / "step_0000010") is None
    with pytest.warns(UserWarning) as caught:
        last = train(load_run_config(run), run, progress=False)
    said = " ".join(str(w.message) for w in caught)
    assert "step_0000025" in said and "step_0000020" in said and "step_0000010" not in said.split("skipping")[-1]
    assert "torn last line" in said
    ref, got = _weights(ref_last), _weights(last)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)  # the uninterrupted result
    assert _metrics(run) == _metrics(ref_run)
    assert all(checkpoint_problem(p) is None for s, p in list_checkpoints(run) if s != 25)


def test_a_checkpoint_damaged_after_the_fact_is_named(reference, tmp_path):
    import shutil

    cfg, ref_run, _ = reference
    run = tmp_path / "copy"
    shutil.copytree(ref_run, run)
    _flip(run / "checkpoints" / "step_0000030" / "optimizer.safetensors")
    good, skipped = _quiet(latest_good_checkpoint, run)
    assert good[0] == 20
    assert skipped[0][0].name == "step_0000030" and "optimizer.safetensors does not match its sha256" in skipped[0][1]


def _quiet(fn, *args):
    with pytest.warns(UserWarning):
        return fn(*args)


def test_metrics_corrupted_in_the_middle_is_an_error_naming_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a metrics record"):
        read_metrics(tmp_path)


def test_fewer_steps_than_held_is_refused_and_config_kept(reference, tmp_path):
    import shutil

    cfg, ref_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    before = (run / "config.json").read_text()
    with pytest.raises(ValueError, match=r"holds checkpoints up to step 30, beyond steps=20"):
        train(replace(cfg, steps=20), run, progress=False)
    assert (run / "config.json").read_text() == before
    (run / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        train(cfg, run, progress=False)


def test_bad_optimiser_settings_refused_before_anything_is_written(tmp_path):
    for kw, match in [({"lr": float("inf")}, "lr must be a finite number"), ({"grad_clip": -1.0}, "grad_clip must be > 0"),
                      ({"grad_clip": 0.0}, "grad_clip must be > 0"), ({"betas": (0.9, 1.0)}, r"betas\[1\] must be in"),
                      ({"eps": 0.0}, "eps must be > 0"), ({"steps": 2.5}, "steps must be an int")]:
        with pytest.raises(ValueError, match=match):
            train(_cfg(**kw), tmp_path / "never", progress=False)
        assert not (tmp_path / "never").exists()


def test_finetune_run_resumes_past_a_torn_checkpoint(smol_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from taskvec_interp.experiments.finetune import FinetuneConfig, FinetuneResult, finetune

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=len(smol_tokenizer),
                                        max_position_embeddings=256, tie_word_embeddings=True,
                                        eos_token_id=smol_tokenizer.eos_token_id)).eval()
    cfg = FinetuneConfig(model="tiny", layers="first:2", n_train=6, steps=6, batch_size=4, lr=5e-2, warmup_steps=2,
                         ckpt_every=2, n_per_task=3, shots=2, k=1)
    kw = {"model": base, "tokenizer": smol_tokenizer, "progress": False, "evaluate": False}
    full = finetune(cfg, tmp_path / "full", **kw).path
    cut = tmp_path / "cut"
    assert finetune(cfg, cut, stop_at=4, **kw) is None  # checkpoints 2 and 4, no result
    with pytest.raises(ValueError, match="finetune result is not finished"):
        FinetuneResult.load(cut)  # the run directory of a killed run is no result
    _torn(cut / "checkpoints" / "step_0000004" / "trainable.safetensors")
    with pytest.warns(UserWarning, match="step_0000004"):
        resumed = finetune(cfg, cut, **kw)  # resumes from step 2
    a, b = load_file(full / "trained.safetensors"), load_file(cut / "trained.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], resumed.trained[k]) for k in a)
    losses = [json.loads(line)["loss"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert losses == [r["loss"] for r in read_metrics(cut)] == FinetuneResult.load(cut).metrics["loss"].tolist()
    assert (cut / "checkpoints" / "step_0000006").is_dir()  # the result replaced the run, its checkpoints kept
    evaluated = finetune(cfg, cut, **{**kw, "evaluate": True})  # trained, never evaluated: evaluates the weights
    assert evaluated.eval is not None and evaluated.eval_pretrained is not None
    assert all(torch.equal(a[k], evaluated.trained[k]) for k in a)
    assert FinetuneResult.load(cut).eval.td.equals(evaluated.eval.td)


def test_progress_bar_never_shows_a_nan_loss(tmp_path, monkeypatch):
    """Evaluation steps before the first logged training loss used to show loss=nan."""
    import tqdm.std

    shown: list[dict] = []
    real = tqdm.std.tqdm.set_postfix

    def spy(self, ordered_dict=None, refresh=True, **kwargs):
        shown.append(dict(kwargs))
        return real(self, ordered_dict, refresh, **kwargs)

    monkeypatch.setattr(tqdm.std.tqdm, "set_postfix", spy)
    train(_cfg(steps=12, eval_every=3, log_every=5, ckpt_every=6), tmp_path / "run", progress=True)
    assert shown and all("nan" not in str(v) for d in shown for v in d.values())
    assert shown[0] == {"test": shown[0]["test"]}  # step 3: evaluated, no training loss logged yet
    assert any("loss" in d and "test" in d for d in shown)  # later evaluations show the last logged loss


def test_positions_are_refused_when_the_hook_is_built():
    from taskvec_interp import hooks as H

    for bad, match in [(1.5, "got 1.5"), (True, "got True"), ([1, 2.5], r"got 2\.5 \(float\)"),
                       (torch.tensor([1.0]), "dtype torch.float32")]:
        with pytest.raises(TypeError, match=match):
            H.add(torch.zeros(4), position=bad)
