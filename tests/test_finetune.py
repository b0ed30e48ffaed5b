"""Layer-subset fine-tuning: layer specs, only the subset trains, answer-only loss, disjoint data, exact resume."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from taskvec_interp.adapters import load_model
from taskvec_interp.adapters.arch import find_arch
from taskvec_interp.cli import app
from taskvec_interp.experiments.finetune import (
    FinetuneConfig,
    answer_loss,
    check_disjoint,
    compare_runs,
    eval_prompts,
    finetune,
    load_finetuned,
    prepare_model,
    resolve_layer_spec,
    target_modules,
    training_data,
)
from taskvec_interp.tasks import get_family


def _tiny(arch: str, tok, layers: int = 4):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=len(tok), n_positions=256,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


FAST = {"n_train": 6, "steps": 6, "batch_size": 4, "lr": 5e-2, "warmup_steps": 2, "ckpt_every": 3,
        "n_per_task": 3, "shots": 2, "k": 1}


def test_layer_specs():
    assert resolve_layer_spec("first:3", 10) == [0, 1, 2]
    assert resolve_layer_spec("last:2", 10) == [8, 9]
    assert resolve_layer_spec("3-5", 10) == [3, 4, 5]
    assert resolve_layer_spec("7,2", 10) == [2, 7]
    assert resolve_layer_spec("all", 3) == [0, 1, 2] and resolve_layer_spec("-1", 4) == [3]
    assert resolve_layer_spec([4, 1], 10) == [1, 4]
    td = pd.DataFrame({"layer": [0, 1, 2, 3], "level": "overall", "task": "all", "td": [0.1, 0.5, 0.9, 0.4]})
    assert resolve_layer_spec("td:encoder", 10, td) == [0, 1, 2]
    for spec, match in [("first:0", r"\[1, 30\]"), ("last:40", r"\[1, 30\]"), ("5-3", "empty"), ("", "no layers"),
                        ("3,x", "not an int"), ([1.5], "ints"), ([True], "ints"), ("2,2", "repeats"),
                        ("31", "out of range"), ("td:encoder", "TD sweep"), ("middle:3", "not an int")]:
        with pytest.raises(ValueError, match=match):
            resolve_layer_spec(spec, 30)


def test_target_modules_come_from_the_architecture(smol_tokenizer):
    llama = _tiny("llama", smol_tokenizer)
    assert target_modules(llama, find_arch(llama)) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]
    gpt2 = _tiny("gpt2", smol_tokenizer)
    assert target_modules(gpt2, find_arch(gpt2)) == ["c_attn", "c_proj", "c_fc"]
    with pytest.raises(ValueError, match="unknown target modules"):
        prepare_model(llama, FinetuneConfig(target_modules=["qkv"]), [0])


@pytest.mark.parametrize("arch,method", [("llama", "lora"), ("gpt2", "lora"), ("llama", "full"), ("gpt2", "full")])
def test_only_the_subset_trains(arch, method, smol_tokenizer, tmp_path):
    base = _tiny(arch, smol_tokenizer)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = FinetuneConfig(model="tiny", layers="1-2", method=method, **FAST)
    run = finetune(cfg, tmp_path / "run", model=base, tokenizer=smol_tokenizer, progress=False, evaluate=False)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the caller's model untouched
    adapter = load_finetuned(run, model=base, tokenizer=smol_tokenizer, merge=(method == "lora"))
    after = adapter.model.state_dict()
    prefix = find_arch(base).blocks
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training changed nothing"
    assert {int(k[len(prefix) + 1:].split(".")[0]) for k in changed} == {1, 2}  # every change inside blocks 1-2
    assert all(k.startswith(prefix + ".") for k in changed)


def test_labels_are_the_answer_tokens_only(smol_tokenizer, tiny_smol):
    cfg = FinetuneConfig(model="tiny", n_train=3, shots=3)
    data = training_data(smol_tokenizer, cfg)
    assert len(data) == 6 * 3 and {p.task for p in data.prompts} == set(get_family("bitwise").task_names[:-1])
    for ids, labels, p in zip(data.input_ids, data.labels, data.prompts, strict=True):
        answer = [t for t in labels if t != -100]
        assert smol_tokenizer.decode(answer) == p.answer
        assert labels[: len(ids) - len(answer)] == [-100] * (len(ids) - len(answer))
        assert smol_tokenizer.decode(ids[: len(ids) - len(answer)]) == p.text
    with_null = training_data(smol_tokenizer, FinetuneConfig(model="tiny", n_train=3, shots=3, include_null=True))
    assert "null" in {p.task for p in with_null.prompts}
    batch = data.batch([0, 5, 7], smol_tokenizer.pad_token_id)
    model = tiny_smol.model
    n = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        ours = answer_loss(model, batch, n)
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        every = torch.nn.functional.cross_entropy(full.reshape(-1, full.shape[-1]),
                                                  batch["input_ids"][:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-5)
    assert abs(float(every.mean()) - float(ours)) > 1e-3  # counting prompt tokens would give another number


def test_train_and_evaluation_prompts_are_disjoint(smol_tokenizer):
    cfg = FinetuneConfig(model="tiny", n_train=200, shots=4, n_per_task=50)
    train = training_data(smol_tokenizer, cfg).prompts
    evaluation = eval_prompts(cfg)
    assert len(evaluation) == 7 * 50 and {p.n_shots for p in evaluation} == {4}
    check_disjoint(train, evaluation)  # finetune() runs this check before training
    inputs = {p.query for p in train} | {e.input for p in train for e in p.demos}
    assert not inputs & ({p.query for p in evaluation} | {e.input for p in evaluation for e in p.demos})
    with pytest.raises(ValueError, match="also occur in the training prompts"):
        check_disjoint(train, train[:3])


def test_kill_and_resume_is_exact(smol_tokenizer, tmp_path):
    base = _tiny("llama", smol_tokenizer)
    cfg = FinetuneConfig(model="tiny", layers="first:2", **FAST)
    state = torch.get_rng_state()
    full = finetune(cfg, tmp_path / "full", model=base, tokenizer=smol_tokenizer, progress=False, evaluate=False).path
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is forked, never reseeded
    cut = tmp_path / "cut"
    finetune(cfg, cut, model=base, tokenizer=smol_tokenizer, progress=False, evaluate=False, stop_at=4)
    assert not (cut / "trained.safetensors").exists()
    finetune(cfg, cut, model=base, tokenizer=smol_tokenizer, progress=False, evaluate=False)  # resumes at step 3
    a, b = load_file(full / "trained.safetensors"), load_file(cut / "trained.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads(line)["loss"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line)["loss"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert losses == resumed and len(losses) == cfg.steps
    other = FinetuneConfig(model="tiny", layers="last:2", **FAST)
    with pytest.raises(ValueError, match="another config"):
        finetune(other, cut, model=base, tokenizer=smol_tokenizer, progress=False, evaluate=False)


def test_finetune_evaluates_before_and_after_and_compares(smol_tokenizer, tmp_path):
    base = _tiny("llama", smol_tokenizer)
    runs = []
    for layers in ("first:2", "last:2"):
        cfg = FinetuneConfig(model="tiny", layers=layers, **FAST)
        runs.append(finetune(cfg, tmp_path / layers.replace(":", ""), model=base, tokenizer=smol_tokenizer,
                             progress=False))
    for run in runs:
        assert (run.path / "eval" / "td.parquet").exists() and (run.path / "eval_pretrained" / "accuracy.parquet").exists()
        saved = json.loads((run.path / "config.json").read_text())
        assert saved["provenance"]["model"]["trainable_params"] > 0 and saved["resolved_layers"]
    summary, per_task, td = compare_runs(runs)
    assert summary["model"].tolist() == ["pretrained", "lora first:2", "lora last:2"]
    assert set(per_task["task"]) == set(get_family("bitwise").task_names[:-1])
    assert set(td["model"]) == set(summary["model"]) and td["layer"].nunique() == 4
    before = pd.read_parquet(runs[0].path / "eval_pretrained" / "td.parquet")
    pd.testing.assert_frame_equal(before, pd.read_parquet(runs[1].path / "eval_pretrained" / "td.parquet"))
    assert compare_runs([r.path for r in runs]).summary.equals(summary)  # the saved runs compare the same
    with pytest.raises(ValueError, match="no eval"):
        compare_runs([tmp_path])


def test_peft_models_load_on_every_backend(smol_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    from taskvec_interp import hooks as H

    prompts = ["01101 10110 -> 00100\n11100 00111 ->", "10101 01010 ->"]
    torch.manual_seed(0)
    peft_model = get_peft_model(_tiny("llama", smol_tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                           init_lora_weights=False))
    plain = load_model(peft_model, tokenizer=smol_tokenizer)  # the adapter active, unmerged
    expected = plain.capture(prompts, progress=False)
    hooks = [(1, H.add(torch.ones(32)))]
    expected_hooked = plain.capture(prompts, hooks=hooks, progress=False)
    got = load_model(peft_model, backend="nnsight", tokenizer=smol_tokenizer).capture(prompts, progress=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    merged = load_model(peft_model, tokenizer=smol_tokenizer, merge=True)
    torch.testing.assert_close(merged.capture(prompts, progress=False), expected, atol=1e-5, rtol=1e-5)
    bridge = load_model(merged.model, backend="transformer_lens", tokenizer=smol_tokenizer)
    torch.testing.assert_close(bridge.capture(prompts, hooks=hooks, progress=False), expected_hooked,
                               atol=1e-4, rtol=1e-4)
    torch.manual_seed(0)
    fresh = get_peft_model(_tiny("llama", smol_tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                      init_lora_weights=False))
    unmerged_tl = load_model(fresh, backend="transformer_lens", tokenizer=smol_tokenizer)
    torch.testing.assert_close(unmerged_tl.capture(prompts, progress=False), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="needs a peft model"):
        load_model(_tiny("llama", smol_tokenizer), tokenizer=smol_tokenizer, merge=True)


def test_bad_finetune_inputs(smol_tokenizer, tmp_path):
    for kwargs, match in [({"method": "adapter"}, "method"), ({"rank": 0}, "rank"), ({"lr": float("inf")}, "lr"),
                          ({"lr": -1.0}, "lr"), ({"grad_clip": 0.0}, "grad_clip"), ({"grad_clip": -1.0}, "grad_clip"),
                          ({"dropout": 1.0}, "dropout"), ({"steps": 1.5}, "steps"), ({"batch_size": True}, "batch"),
                          ({"family_kwargs": {"split": "all"}}, "split"), ({"layers": "td:encoder"}, "td_sweep")]:
        with pytest.raises(ValueError, match=match):
            FinetuneConfig(**kwargs)
    base = _tiny("llama", smol_tokenizer)
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny.json").write_text(json.dumps([{"input": f"a{i}", "output": f"b{i}"} for i in range(4)]))
    one = tmp_path / "one"  # a single example: too few for 2-shot prompts
    one.mkdir()
    (one / "one.json").write_text(json.dumps([{"input": "a", "output": "b"}]))
    for cfg, match in [(FinetuneConfig(model="tiny", layers="last:9", **FAST), r"\[1, 4\]"),
                       (FinetuneConfig(model="tiny", layers="1", family=f"files:{folder}", **FAST), "distinct"),
                       (FinetuneConfig(model="tiny", layers="1", family="nope", **FAST), "unknown task family"),
                       (FinetuneConfig(model="tiny", layers="1", family=f"files:{one}", **FAST), "has only 1"),
                       (FinetuneConfig(model="tiny", layers="1", family=f"files:{folder}",
                                       family_kwargs={"test_fraction": 0.99}, **FAST), "no examples left in split 'train'")]:
        with pytest.raises(ValueError, match=match):
            finetune(cfg, tmp_path / "bad", model=base, tokenizer=smol_tokenizer, progress=False)
        assert not (tmp_path / "bad").exists()  # nothing written
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        finetune(FinetuneConfig(model="tiny", **FAST), tmp_path / "file", model=base, tokenizer=smol_tokenizer)


def test_finetune_cli_trains_resumes_and_compares(smol_tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    _tiny("llama", smol_tokenizer).save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    runner = CliRunner()
    args = ["finetune", "--model", str(model_dir), "--layers", "first:2", "--steps", "4", "--n-train", "4",
            "--batch-size", "2", "--shots", "2", "--n-per-task", "3", "--k", "1", "--lr", "0.01"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert (tmp_path / "a" / "trained.safetensors").exists()
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])  # finished: nothing to do but evaluate again
    assert res.exit_code == 0, res.output + repr(res.exception)
    res = runner.invoke(app, [*args[:4], "last:2", *args[5:], "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    res = runner.invoke(app, ["finetune", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                              str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "pretrained" in res.output and (tmp_path / "cmp" / "summary.parquet").exists()
    assert list((tmp_path / "cmp" / "figures").glob("*.png"))
    res = runner.invoke(app, ["finetune", "--model", "no/such", "--layers", "5-3", "--out", str(tmp_path / "c")])
    assert res.exit_code != 0 and not (tmp_path / "c").exists()


def test_td_encoder_reads_the_models_own_sweep(smol_tokenizer, tmp_path):
    from taskvec_interp.adapters import TorchHooksAdapter
    from taskvec_interp.experiments.sweep import SweepConfig, load_sweep, run_sweep

    base = _tiny("llama", smol_tokenizer)
    sweep = run_sweep(TorchHooksAdapter(copy.deepcopy(base), smol_tokenizer),
                      SweepConfig(shots=(2,), n_per_task=12, n_boot=10), progress=False).save(tmp_path / "td")
    td = load_sweep(sweep).td
    overall = td[td["level"] == "overall"]
    peak = int(overall.loc[overall["td"].idxmax(), "layer"])
    cfg = FinetuneConfig(model="tiny", layers="td:encoder", td_sweep=str(sweep), **FAST)
    run = finetune(cfg, tmp_path / "run", model=base, tokenizer=smol_tokenizer, progress=False, evaluate=False)
    assert json.loads((run.path / "config.json").read_text())["resolved_layers"] == list(range(peak + 1))
    with pytest.raises(ValueError, match="another model"):
        finetune(cfg, tmp_path / "other", model=_tiny("llama", smol_tokenizer, layers=3), tokenizer=smol_tokenizer,
                 progress=False, evaluate=False)
    assert not (tmp_path / "other").exists()


def test_finetune_figures_draw_the_tables(tmp_path):
    from taskvec_interp import figures

    per_task = pd.DataFrame({"model": ["pretrained"] * 2 + ["lora first:2"] * 2, "task": ["AND", "OR"] * 2,
                             "exact": [0.1, 0.2, 0.5, 0.7], "td": [0.3, 0.4, 0.6, 0.8]})
    fig = figures.plot_finetune_accuracy(per_task, path=tmp_path / "acc.png")
    assert [p.get_height() for p in fig.axes[0].patches] == pytest.approx([0.1, 0.2, 0.5, 0.7])
    td = pd.DataFrame({"model": ["pretrained"] * 3 + ["lora first:2"] * 3, "layer": [0, 1, 2] * 2,
                       "td": [0.2, 0.5, 0.4, 0.3, 0.7, 0.6]})
    fig = figures.plot_finetune_td(td, path=tmp_path / "td.png")
    assert [list(line.get_ydata()) for line in fig.axes[0].lines] == [[0.2, 0.5, 0.4], [0.3, 0.7, 0.6]]
    assert (tmp_path / "acc.png").exists() and (tmp_path / "td.png").exists()
