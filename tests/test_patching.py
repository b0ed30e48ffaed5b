"""Interventions: shared-prefix branches, task vectors, the generic loop, run_patching, CLI, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import build_tiny, random_prompts
from typer.testing import CliRunner

from taskvec_interp import hooks as H
from taskvec_interp.adapters import NNsightAdapter, TorchHooksAdapter, TransformerLensAdapter
from taskvec_interp.adapters.transformer_lens import bridge_from_hf
from taskvec_interp.cli import app
from taskvec_interp.experiments.patching import (
    PatchConfig,
    intervention_hooks,
    load_patching,
    patch_conditions,
    run_conditions,
    run_patching,
)
from taskvec_interp.probes.accuracy import bootstrap_accuracy
from taskvec_interp.probes.vectors import TaskVectors, demo_positions, task_vectors
from taskvec_interp.tasks import PromptBuilder, get_family

PROMPTS = random_prompts(9, seed=5)


def _branches(d: int, n: int, layers: tuple[int, ...] = (0, 1, 2)) -> list[list]:
    g = torch.Generator().manual_seed(1)
    vec = torch.randn(3, d, generator=g) * 4
    per = torch.randn(n, d, generator=g) * 4
    return [[], [(layers[0], H.add(vec[0]))], [(layers[1], H.replace(vec[1]))], [(layers[2], H.add(per, scale=2.0))],
            [(layers[0], H.replace(per)), (layers[2], H.add(vec[2], scale=-1.5))]]


def _same_shape_other_model(tok) -> TorchHooksAdapter:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=64, eos_token_id=0)
    return TorchHooksAdapter(LlamaForCausalLM(cfg).eval(), tok)


def _hook_free(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------------
# Shared prompt prefix
# ------------------------------------------------------------------------------------------------
def test_shared_prefix_gives_exactly_the_answers_of_full_generation(tiny_arch, word_tokenizer):
    adapter = TorchHooksAdapter(build_tiny(tiny_arch), word_tokenizer)
    branches = _branches(adapter.d_model, len(PROMPTS))
    # max_rows=8 stacks two branches of a 4-prompt batch per call: several chunks, ragged padding
    got = adapter.generate_branches(PROMPTS, branches, 6, batch_size=4, max_rows=8, progress=False)
    ref = [adapter.generate(PROMPTS, 6, hooks=b, batch_size=4, progress=False) for b in branches]
    assert [g.tokens for g in got] == [r.tokens for r in ref]
    assert [g.texts for g in got] == [r.texts for r in ref]
    assert len({tuple(map(tuple, r.tokens)) for r in ref}) == len(branches)  # every intervention changes something
    # Mamba-2's recurrent state is not a repeatable KV cache: the same answers through full generation
    assert {g.engine for g in got} == {"full" if tiny_arch == "mamba2" else "prefix"}
    assert _hook_free(adapter.model)
    if tiny_arch == "mamba2":
        with pytest.raises(ValueError, match="cannot share the prompt prefix"):
            adapter.generate_branches(PROMPTS, branches, 2, share_prefix=True, progress=False)


def test_prefix_sharing_only_for_last_token_hooks(word_tokenizer):
    adapter = TorchHooksAdapter(build_tiny("llama"), word_tokenizer)
    vec = torch.ones(adapter.d_model)
    assert adapter.prefix_sharing([[(1, H.add(vec))]]) is None
    assert "position" in adapter.prefix_sharing([[(1, H.add(vec, position=0))]])
    assert "may write" in adapter.prefix_sharing([[(1, lambda act, ctx: None)]])
    early = [[(1, H.add(vec * 5, position=1))]]
    got = adapter.generate_branches(PROMPTS, early, 4, progress=False)  # falls back: still right
    assert got[0].engine == "full"
    assert got[0].tokens == adapter.generate(PROMPTS, 4, hooks=early[0], progress=False).tokens
    with pytest.raises(ValueError, match="cannot share the prompt prefix"):
        adapter.generate_branches(PROMPTS, early, 4, share_prefix=True, progress=False)
    with adapter.hooks([(0, H.add(vec))]):
        assert "adapter.hooks" in adapter.prefix_sharing([[(1, H.add(vec))]])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_interventions_agree_across_backends(arch, word_tokenizer):
    torch_ad = TorchHooksAdapter(build_tiny(arch), word_tokenizer)
    others = {"nnsight": NNsightAdapter(build_tiny(arch), word_tokenizer),
              "transformer_lens": TransformerLensAdapter(bridge_from_hf(build_tiny(arch), word_tokenizer),
                                                         tokenizer=word_tokenizer)}
    branches = _branches(torch_ad.d_model, len(PROMPTS))
    expected = torch_ad.generate_branches(PROMPTS, branches, 5, batch_size=4, progress=False)
    assert expected[0].engine == "prefix"
    for name, adapter in others.items():
        got = adapter.generate_branches(PROMPTS, branches, 5, batch_size=4, progress=False)
        assert {g.engine for g in got} == {"full"}, name  # the fallback: the same numbers
        assert [g.tokens for g in got] == [e.tokens for e in expected], name


def test_replacing_the_last_state_sets_the_next_token(word_tokenizer):
    """Replace the last block's output at the last prompt token: the first new token must be the
    unembedding's argmax of that vector, for each branch's own rows (stacked branches do not mix)."""
    model = build_tiny("llama")
    adapter = TorchHooksAdapter(model, word_tokenizer)
    last = adapter.n_layers - 1
    g = torch.Generator().manual_seed(3)
    vecs = torch.randn(4, adapter.d_model, generator=g) * 10
    per_prompt = torch.randn(len(PROMPTS), adapter.d_model, generator=g) * 10
    with torch.no_grad():
        def expect(v):
            return model.lm_head(model.model.norm(v)).argmax(-1)
        branches = [[(last, H.replace(v))] for v in vecs] + [[(last, H.replace(per_prompt))]]
        got = adapter.generate_branches(PROMPTS, branches, 3, batch_size=4, max_rows=12, progress=False)
        for v, gen in zip(vecs, got, strict=False):
            assert {row[0] for row in gen.tokens} == {int(expect(v))}
        assert [row[0] for row in got[-1].tokens] == expect(per_prompt).tolist()
    assert _hook_free(model)


def test_hooks_leave_no_trace_when_a_branch_raises(tiny_arch, word_tokenizer):
    adapter = TorchHooksAdapter(build_tiny(tiny_arch), word_tokenizer)
    before = adapter.generate(PROMPTS, 4, progress=False).tokens

    def boom(act, ctx):
        raise RuntimeError("boom")

    boom.position = -1  # claims to be a last-token hook: exercises the shared-prefix path too
    branches = [[(0, H.add(torch.ones(adapter.d_model)))], [(1, boom)]]
    with pytest.raises(RuntimeError, match="boom"):
        adapter.generate_branches(PROMPTS, branches, 4, progress=False)
    assert _hook_free(adapter.model)
    assert adapter.generate(PROMPTS, 4, progress=False).tokens == before


# ------------------------------------------------------------------------------------------------
# Task vectors
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bitwise():
    return get_family("bitwise")


@pytest.fixture(scope="module")
def few_prompts(bitwise):
    return PromptBuilder().build(bitwise, n_per_task=3, shots=3, seed=0)


def test_demo_positions_are_the_answer_preceding_tokens(tiny_smol, few_prompts):
    pos = demo_positions(tiny_smol, few_prompts)
    assert pos.shape == (len(few_prompts), 3)
    tok = tiny_smol.tokenizer
    for p, row in zip(few_prompts, pos.tolist(), strict=True):
        ids = tok(p.text)["input_ids"]
        for j, i in enumerate(row):
            assert tok.decode(ids[: i + 1]) == p.text[: p.demo_answer_starts[j]]  # ends right before the answer
            assert tok.decode(ids[i]).strip() == "->"


def test_task_vector_definitions_match_manual_means(tiny_smol, bitwise, few_prompts):
    model = tiny_smol.model
    tasks = bitwise.task_names

    def hidden(text):
        with torch.no_grad():
            hs = model(torch.tensor([tiny_smol.tokenizer(text)["input_ids"]]), output_hidden_states=True).hidden_states
        return torch.stack(hs[1:-1])[:, 0]  # block outputs 0..L-2 (the last entry is after the final norm)

    layers = list(range(tiny_smol.n_layers - 1))
    paper = task_vectors(tiny_smol, few_prompts, "paper", layers, progress=False)
    mean = task_vectors(tiny_smol, few_prompts, "mean", layers, progress=False)
    pos = demo_positions(tiny_smol, few_prompts)
    assert paper.tasks == tasks and paper.vectors.shape == (len(layers), len(tasks), tiny_smol.d_model)
    for t, task in enumerate(tasks):
        idx = [i for i, p in enumerate(few_prompts) if p.task == task]
        hs = [hidden(few_prompts[i].text) for i in idx]
        manual_paper = torch.stack([h[:, pos[i]].mean(1) for h, i in zip(hs, idx, strict=True)]).mean(0)
        manual_mean = torch.stack([h[:, -1] for h in hs]).mean(0)
        torch.testing.assert_close(paper.vectors[:, t], manual_paper, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mean.vectors[:, t], manual_mean, atol=1e-5, rtol=1e-5)
    hendel = task_vectors(tiny_smol, few_prompts, "hendel", layers, family=bitwise, seed=3, progress=False)
    assert not torch.allclose(hendel.vectors, mean.vectors)  # other queries, same demonstrations
    again = task_vectors(tiny_smol, few_prompts, "hendel", layers, family=bitwise, seed=3, progress=False)
    assert torch.equal(hendel.vectors, again.vectors)


def test_task_vectors_save_load_and_refuse_other_models(tiny_smol, few_prompts, tmp_path, word_tokenizer):
    vecs = task_vectors(tiny_smol, few_prompts, "paper", [0, 2], progress=False)
    path = vecs.save(tmp_path / "v.safetensors")
    back = TaskVectors.load(path, tiny_smol)
    assert torch.equal(back.vectors, vecs.vectors) and back.tasks == vecs.tasks and back.layers == [0, 2]
    assert back.meta["shots"] == 3 and back.meta["model"]["d_model"] == tiny_smol.d_model
    assert back.meta["n"] == {t: 3 for t in vecs.tasks}
    with pytest.raises(ValueError, match="a model with 4 layers"):
        TaskVectors.load(path, TorchHooksAdapter(build_tiny("llama"), word_tokenizer))  # 3 layers
    other = _same_shape_other_model(word_tokenizer)  # 4 layers, d_model 32, but another model
    with pytest.raises(ValueError, match="another model"):
        TaskVectors.load(path, other)
    assert TaskVectors.load(path, other, allow_other_model=True).layers == [0, 2]
    gpt2 = TorchHooksAdapter(build_tiny("gpt2"), word_tokenizer)
    bad = TaskVectors(torch.zeros(2, 7, 48), [0, 2], vecs.tasks, "paper")
    with pytest.raises(ValueError, match="d_model 48"):
        bad.check_model(gpt2)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable task-vector file"):
        TaskVectors.load(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="NaN or inf"):
        TaskVectors(torch.full((2, 7, 32), float("nan")), [0, 2], vecs.tasks, "paper")
    with pytest.raises(ValueError, match="unknown task-vector definition"):
        task_vectors(tiny_smol, few_prompts, "function", progress=False)
    zero = PromptBuilder().build(get_family("bitwise"), n_per_task=2, shots=0, seed=0)
    with pytest.raises(ValueError, match="no demonstrations"):
        task_vectors(tiny_smol, zero, "paper", progress=False)
    with pytest.raises(ValueError, match="family="):
        task_vectors(tiny_smol, few_prompts, "hendel", progress=False)


# ------------------------------------------------------------------------------------------------
# The generic loop and the bootstrap
# ------------------------------------------------------------------------------------------------
def test_run_conditions_is_tidy_and_resumes(tmp_path):
    conds = [{"a": i, "b": f"x{i}"} for i in range(5)]
    calls = []

    def evaluate(chunk):
        calls.append([c["a"] for c in chunk])
        return [pd.DataFrame({"task": ["t0", "t1"], "value": [c["a"] * 10, c["a"] * 10 + 1]}) for c in chunk]

    full = run_conditions(conds, evaluate, chunk_size=2, progress=False)
    assert list(full.columns) == ["condition", "a", "b", "task", "value"]
    assert full["value"].tolist() == [0, 1, 10, 11, 20, 21, 30, 31, 40, 41] and full["condition"].tolist()[-1] == 4

    def flaky(chunk):
        if chunk[0]["a"] == 4:
            raise KeyboardInterrupt  # killed while the last chunk runs
        return evaluate(chunk)

    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_conditions(conds, flaky, chunk_size=2, checkpoint_dir=tmp_path / "ck", progress=False)
    calls.clear()
    resumed = run_conditions(conds, evaluate, chunk_size=2, checkpoint_dir=tmp_path / "ck", progress=False)
    assert calls == [[4]]  # only the unfinished chunk runs again
    pd.testing.assert_frame_equal(resumed, full)
    assert not (tmp_path / "ck").exists()
    with pytest.raises(ValueError, match="same fields"):
        run_conditions([{"a": 1}, {"b": 2}], evaluate)
    with pytest.raises(ValueError, match="no conditions"):
        run_conditions([], evaluate)
    with pytest.raises(ValueError, match="reserved"):
        run_conditions([{"condition": 1}], evaluate)
    with pytest.raises(ValueError, match="returned 1 results for 2"):
        run_conditions(conds[:2], lambda chunk: [{"v": 1}])


def test_bootstrap_accuracy_is_paired_and_reproducible():
    g = torch.Generator().manual_seed(0)
    correct = torch.rand(3, 40, generator=g) < torch.tensor([[0.2], [0.6], [0.2]])
    correct[2] = correct[0]
    groups = ["a"] * 20 + ["b"] * 20
    df = bootstrap_accuracy(correct, groups, n_boot=300, seed=1)
    assert df.equals(bootstrap_accuracy(correct, groups, n_boot=300, seed=1))
    assert len(df) == 6 and (df["ci_low"] <= df["accuracy"]).all() and (df["accuracy"] <= df["ci_high"]).all()
    same = df[df["condition"] == 2]
    assert (same["delta"] == 0).all() and (same["delta_low"] == 0).all() and (same["delta_high"] == 0).all()
    ones = bootstrap_accuracy(torch.ones(1, 5, dtype=torch.bool), ["a"] * 5, n_boot=50)
    assert ones[["accuracy", "ci_low", "ci_high"]].iloc[0].tolist() == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------------
# The experiment
# ------------------------------------------------------------------------------------------------
def _forced_vectors(adapter, family, layers) -> TaskVectors:
    """Vectors whose replacement at the last layer makes each task answer with a known first token."""
    g = torch.Generator().manual_seed(7)
    vec = torch.randn(len(layers), len(family.task_names), adapter.d_model, generator=g) * 10
    return TaskVectors(vec, list(layers), family.task_names, "paper", {"model": adapter.identity()})


def test_run_patching_hits_the_right_rows(tiny_smol, bitwise, tmp_path):
    last = tiny_smol.n_layers - 1
    vectors = _forced_vectors(tiny_smol, bitwise, [1, last])
    cfg = PatchConfig(n_per_task=4, layers=[1, last], modes=("replace",), directions=("positive", "negative"),
                      n_boot=50, batch_size=5, k=2, td=True)
    res = run_patching(tiny_smol, cfg, bitwise, vectors=vectors, progress=False)
    model = tiny_smol.model
    with torch.no_grad():
        first = model.lm_head(model.model.norm(vectors.vectors[1])).argmax(-1)  # [task] expected first token
    tok = tiny_smol.tokenizer
    preds = res.predictions
    for vector, expected in (("own", lambda task: first[bitwise.label(task)]), ("null", lambda task: first[-1])):
        rows = preds[(preds["layer"] == last) & (preds["vector"] == vector)]
        assert len(rows) == 7 * 4
        for r in rows.itertuples():
            want = tok.decode([int(expected(r.task))], skip_special_tokens=True)
            assert want and r.generated.startswith(want), (vector, r.task, r.generated, want)
    assert set(preds["engine"]) == {"full", "prefix"}  # the baseline is a plain generation
    # each prediction keeps its query and the first-token score
    assert {"query", "answer", "generated", "exact", "first_token"} <= set(preds.columns)
    prompts = PromptBuilder().build(bitwise, n_per_task=4, shots=4, seed=0)
    base = preds[preds["direction"] == "baseline"].sort_values("prompt_id")
    assert base["query"].tolist() == [p.query for p in prompts]
    # tidy tables: one accuracy row per (condition, task); conditions = baseline + 2 layers x 2 vectors
    assert len(res.accuracy) == 5 * 7 and set(res.accuracy["direction"]) == {"baseline", "positive", "negative"}
    assert res.summary["layer"] in (1, last) and res.summary["peak_layer"] in range(tiny_smol.n_layers)
    assert set(res.relation["direction"]) == {"positive", "negative"}
    again = run_patching(tiny_smol, cfg, bitwise, vectors=vectors, progress=False)
    pd.testing.assert_frame_equal(again.accuracy, res.accuracy)
    out = res.save(tmp_path / "run")
    back = load_patching(out)
    pd.testing.assert_frame_equal(back.accuracy, res.accuracy)
    config = json.loads((out / "config.json").read_text())
    assert config["provenance"]["model"]["d_model"] == tiny_smol.d_model
    assert config["provenance"]["versions"]["torch"]


def test_run_patching_matrix_zero_shot_and_peak(tiny_smol, bitwise):
    cfg = PatchConfig(n_per_task=3, shots=2, layers="peak", modes=("add",), directions=("matrix",), scale=4.0,
                      zero_shot=True, definition="mean", n_boot=20, k=1, td=True)
    res = run_patching(tiny_smol, cfg, bitwise, progress=False)
    assert (res.predictions["generated"].notna()).all()
    assert res.summary["layer"] == res.summary["peak_layer"]
    conds = res.accuracy.drop_duplicates("condition")
    assert len(conds) == 1 + 7  # the baseline and one condition per source task at the peak layer
    assert set(conds["direction"]) == {"baseline", "cross", "negative"}  # Null's vector is the negative one
    assert set(res.accuracy["task"]) == set(bitwise.task_names)
    assert res.vectors.meta["shots"] == 2 and res.vectors.definition == "mean"
    prompts = PromptBuilder().build(bitwise, n_per_task=3, shots=0, seed=0)
    conds = patch_conditions([1], ("add",), ("positive",), bitwise.task_names)
    hooks = intervention_hooks(conds[1], res.vectors, prompts)
    assert len(hooks) == 1 and H.writes_last_token_only(hooks[0][1])
    # center: add only the task-specific part (vector minus the mean over tasks)
    act = torch.zeros(len(prompts), 4, tiny_smol.d_model)
    ctx = H.HookContext(H.Site(1), pad=torch.zeros(len(prompts), dtype=torch.long), prompt_len=4)
    at = res.vectors.vectors[res.vectors.layer_index(1)]
    own = torch.stack([at[res.vectors.task_index(p.task)] for p in prompts])
    plain = hooks[0][1](act, ctx)[:, -1]
    centered = intervention_hooks(conds[1], res.vectors, prompts, center=True)[0][1](act, ctx)[:, -1]
    torch.testing.assert_close(plain, own)
    torch.testing.assert_close(centered, own - at.mean(0))


class _Spy:
    """Counts forward calls of the model: bad input must be refused before any."""

    def __init__(self, adapter):
        self.model, self.calls = adapter.model, 0

    def __enter__(self):
        def count(module, args, kwargs):
            self.calls += 1

        self.handle = self.model.register_forward_pre_hook(count, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_bad_patching_inputs_fail_before_model_work(tiny_smol, bitwise, tmp_path, word_tokenizer):
    for kwargs, match in [({"definition": "fv"}, "definition"), ({"layers": [1.7]}, "ints"),
                          ({"layers": [True]}, "ints"), ({"layers": "some"}, "'all', 'peak'"),
                          ({"scale": float("nan")}, "finite"), ({"scale": float("inf")}, "finite"),
                          ({"shots": 0}, "shots must be an int >= 1"), ({"modes": ("swap",)}, "modes"),
                          ({"directions": ()}, "directions"), ({"n_per_task": 0}, "n_per_task"),
                          ({"layers": []}, "empty"), ({"td": True, "n_per_task": 11}, "k must be <= n_per_task - 2"),
                          ({"td": 1}, "PatchConfig.td"), ({"replace": "yes"}, "PatchConfig.replace")]:
        with pytest.raises(ValueError, match=match):
            PatchConfig(**kwargs)
    good = _forced_vectors(tiny_smol, bitwise, [0, 1])
    cases = [
        (PatchConfig(layers=[9]), {}, "out of range"),
        (PatchConfig(layers="peak"), {}, "needs the peak-TD layer"),  # no TD here, no sweep, no peak_layer
        (PatchConfig(layers=[2]), {"vectors": good}, "no layers"),
        (PatchConfig(layers=[1]), {"vectors": TaskVectors(torch.zeros(2, 7, 48), [0, 1], bitwise.task_names,
                                                         "paper")}, "d_model 48"),
        (PatchConfig(layers=[1]), {"vectors": TaskVectors(torch.zeros(2, 2, 32), [0, 1], ("AND", "null"),
                                                         "paper")}, "no vector for tasks"),
        (PatchConfig(layers=[1]), {"prompts": PromptBuilder().build(bitwise, 2, 2, tasks=["AND", "null"])},
         "no evaluation prompts"),
    ]
    other = _same_shape_other_model(word_tokenizer)
    cases.append((PatchConfig(layers=[1]), {"vectors": _forced_vectors(other, bitwise, [0, 1])}, "another model"))
    for cfg, kwargs, match in cases:
        with _Spy(tiny_smol) as spy, pytest.raises(ValueError, match=match):
            run_patching(tiny_smol, cfg, bitwise, progress=False, **kwargs)
        assert spy.calls == 0, match
    (tmp_path / "file").write_text("x")
    runner = CliRunner(env={"COLUMNS": "400"})  # one line per message: no wrapping inside the error box
    result = runner.invoke(app, ["patch", "--model", "no/such-model", "--out", str(tmp_path / "file")])
    assert result.exit_code != 0 and "is a file" in result.output
    for args, match in [(["--layers", "3,x"], "PatchConfig.layers"), (["--modes", "swap"], "PatchConfig.modes"),
                        (["--definition", "fv"], "definition"), (["--family", "nope"], "unknown task family")]:
        result = runner.invoke(app, ["patch", "--model", "no/such-model", "--out", str(tmp_path / "o"), *args])
        assert result.exit_code != 0, args
        text = result.output + repr(result.exception)
        assert match in text, (args, text)
    assert not (tmp_path / "o").exists()


def test_patch_cli_writes_results_and_figures(tiny_smol, tmp_path):
    model_dir = tmp_path / "model"
    tiny_smol.model.save_pretrained(model_dir)
    tiny_smol.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["patch", "--model", str(model_dir), "--n-per-task", "3", "--shots", "2", "--k", "1",
                                      "--layers", "1,2", "--n-boot", "20", "--chunk", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    for name in ("config.json", "accuracy.parquet", "predictions.parquet", "td.parquet", "relation.parquet",
                 "vectors.safetensors", "summary.json", "figures/patch_heatmap_positive.png"):
        assert (out / name).exists(), name
    assert list((out / "figures").glob("patch_bars_layer*.png"))
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == str(model_dir) and config["provenance"]["model"]["model_type"] == "llama"
    assert not (out / ".partial").exists()
    assert TaskVectors.load(out / "vectors.safetensors", tiny_smol, allow_other_model=True).layers == [1, 2]
    again = CliRunner().invoke(app, ["patch", "--model", str(model_dir), "--n-per-task", "3", "--shots", "2", "--k", "1",
                                     "--layers", "2", "--n-boot", "20", "--vectors-file",
                                     str(out / "vectors.safetensors"), "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output + repr(again.exception)
    first = pd.read_parquet(out / "accuracy.parquet")
    second = pd.read_parquet(tmp_path / "again" / "accuracy.parquet")
    cols = ["layer", "mode", "vector", "task", "accuracy", "ci_low", "ci_high", "delta"]
    pd.testing.assert_frame_equal(first.loc[first["layer"] == 2, cols].reset_index(drop=True),
                                  second.loc[second["layer"] == 2, cols].reset_index(drop=True))
    other_dir = tmp_path / "other-model"
    _same_shape_other_model(tiny_smol.tokenizer).model.save_pretrained(other_dir)
    tiny_smol.tokenizer.save_pretrained(other_dir)
    refused = CliRunner().invoke(app, ["patch", "--model", str(other_dir), "--layers", "2", "--vectors-file",
                                       str(out / "vectors.safetensors"), "--out", str(tmp_path / "refused")])
    assert refused.exit_code != 0 and "another model" in repr(refused.exception)
    assert not (tmp_path / "refused").exists()


def _accuracy_table() -> pd.DataFrame:
    tasks = ["AND", "OR", "null"]
    conds = patch_conditions([2, 5], ("add", "replace"), ("matrix", "positive"), tasks)
    rows = []
    for i, c in enumerate(conds):
        for j, task in enumerate(tasks):
            acc = 0.3 + 0.1 * j + (0.0 if c["vector"] == "none" else 0.01 * i)
            rows.append({"condition": i, **c, "direction": {"none": "baseline", "own": "positive", "null": "negative"}
                         .get(c["vector"], "cross"), "task": task, "n": 10, "accuracy": acc, "ci_low": acc - 0.1,
                         "ci_high": acc + 0.1, "delta": acc - (0.3 + 0.1 * j)})
    return pd.DataFrame(rows)


def test_patching_figures_draw_the_table(tmp_path):
    from taskvec_interp import figures

    acc = _accuracy_table()
    fig = figures.plot_patch_bars(acc, 5, path=tmp_path / "bars.png")
    assert (tmp_path / "bars.png").exists() and len(fig.axes) == 2
    heights = [p.get_height() for p in fig.axes[0].patches]
    base = acc[acc["direction"] == "baseline"]["accuracy"].tolist()
    assert heights[:3] == pytest.approx(base)  # baseline bars first, one per task
    fig = figures.plot_patch_heatmap(acc, "positive", path=tmp_path / "heat.png")
    want = acc[(acc["direction"] == "positive") & (acc["mode"] == "add")].pivot_table(
        index="layer", columns="task", values="delta", sort=False).sort_index()
    assert np.allclose(np.asarray(fig.axes[0].images[0].get_array()), want.to_numpy())
    fig = figures.plot_patch_matrix(acc, 2, "replace", path=tmp_path / "matrix.png")
    grid = fig.axes[0].images[0].get_array()
    cell = acc[(acc["layer"] == 2) & (acc["mode"] == "replace") & (acc["vector"] == "OR") & (acc["task"] == "AND")]
    assert grid[1, 0] == pytest.approx(float(cell["delta"].iloc[0]))  # row: source OR, column: target AND
    with pytest.raises(ValueError, match="layer 7"):
        figures.plot_patch_bars(acc, 7)
    with pytest.raises(ValueError, match="matrix"):
        figures.plot_patch_matrix(acc[acc["vector"].isin(["none", "own"])], 2, "add")


def _reference_logprob(model, tok, prompt: str, answer: list[int], layer: int, vec: torch.Tensor | None, mode: str,
                       blocks) -> float:
    """One prompt alone, a plain forward hook on block ``layer`` at the last prompt token."""
    ids = tok(prompt)["input_ids"]
    full = torch.tensor([ids + answer])
    handle = None
    if vec is not None:
        def hook(module, args, output):
            out = output.clone()
            out[:, len(ids) - 1] = vec if mode == "replace" else out[:, len(ids) - 1] + vec
            return out
        handle = blocks[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(full).logits[0, len(ids) - 1: len(ids) - 1 + len(answer)]
    finally:
        if handle is not None:
            handle.remove()
    return float(torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(answer)[:, None]).sum())


def test_score_branches_equals_one_prompt_at_a_time(tiny_arch, word_tokenizer):
    from taskvec_interp.adapters.arch import get_module

    model = build_tiny(tiny_arch)
    adapter = TorchHooksAdapter(model, word_tokenizer)
    g = torch.Generator().manual_seed(2)
    answers = [torch.randint(1, 299, (int(n),), generator=g).tolist() for n in torch.randint(1, 4, (len(PROMPTS),),
                                                                                             generator=g)]
    vecs = torch.randn(2, adapter.d_model, generator=g) * 3
    specs = [(None, None, "add"), (1, vecs[0], "add"), (2, vecs[1], "replace")]
    branches = [[] if vec is None else [(layer, H.add(vec) if mode == "add" else H.replace(vec))]
                for layer, vec, mode in specs]
    got = adapter.score_branches(PROMPTS, answers, branches, batch_size=4, max_rows=8, progress=False)
    blocks = get_module(model, adapter.arch.blocks)
    for b, (layer, vec, mode) in enumerate(specs):
        for i, (p, a) in enumerate(zip(PROMPTS, answers, strict=True)):
            want = _reference_logprob(model, word_tokenizer, p, a, layer, vec, mode, blocks)
            assert abs(float(got[b, i]) - want) < 1e-4, (tiny_arch, b, i)
    assert not torch.allclose(got[0], got[1])
    assert _hook_free(model)
    if tiny_arch != "mamba2":  # other backends (full passes) give the same numbers
        for other in (NNsightAdapter(build_tiny(tiny_arch), word_tokenizer),
                      TransformerLensAdapter(bridge_from_hf(build_tiny(tiny_arch), word_tokenizer),
                                             tokenizer=word_tokenizer)):
            torch.testing.assert_close(other.score_branches(PROMPTS, answers, branches, progress=False), got,
                                       atol=1e-4, rtol=1e-5)


def test_run_patching_scores_answer_logprobs(tiny_smol, bitwise):
    cfg = PatchConfig(n_per_task=3, shots=2, layers=[1, 2], modes=("add",), scale=3.0, n_boot=20, logprob=True, k=1)
    res = run_patching(tiny_smol, cfg, bitwise, progress=False)
    assert {"logprob", "logprob_ci_low", "logprob_delta", "logprob_delta_high"} <= set(res.accuracy.columns)
    base = res.accuracy[res.accuracy["direction"] == "baseline"]
    assert (base["logprob_delta"] == 0).all() and (base["logprob"] < 0).all()
    assert (res.accuracy.loc[res.accuracy["direction"] != "baseline", "logprob_delta"].abs() > 0).any()
    assert {"logprob_r", "logprob_mean_delta"} <= set(res.relation.columns)
    assert "logprob_at_peak" in res.summary


def test_patching_computes_td_only_when_asked(tiny_smol, bitwise):
    """Without td a small run needs no n_per_task >= k + 2 (the default k is 10): 2 prompts per task, the
    td and relation tables empty, no peak in the summary; the predictions keep query and first_token."""
    cfg = PatchConfig(n_per_task=2, shots=2, layers=[2], modes=("add",), directions=("positive",), n_boot=10)
    assert not cfg.td and cfg.k == 10
    res = run_patching(tiny_smol, cfg, bitwise, progress=False)
    assert res.td.empty and list(res.td.columns)[:4] == ["layer", "level", "task", "td"]
    assert res.relation.empty and "r" in res.relation.columns
    assert res.summary["peak_layer"] is None and res.summary["peak_td"] is None and res.summary["layer"] == 2
    assert res.summary["max_new_tokens"] == {t: 6 for t in bitwise.task_names}
    assert {"query", "first_token"} <= set(res.predictions.columns) and len(res.predictions) == 2 * 7 * 2
    # a given TD sweep gives the peak and its TD without TD in this run
    sweep = pd.DataFrame({"layer": [0, 1, 2, 3] * 3, "level": "overall", "task": "all", "chance": 0.14,
                          "td": [0.1, 0.3, 0.9, 0.2] + [0.1, 0.95, 0.3, 0.2] * 2, "shots": [2] * 4 + [4] * 4 + [2] * 4,
                          "context": ["demos"] * 8 + ["shuffled"] * 4})  # other shots and a control: not read
    peak = run_patching(tiny_smol, PatchConfig(n_per_task=2, shots=2, layers="peak", modes=("add",),
                                               directions=("positive",), n_boot=10), bitwise, td_sweep=sweep,
                        progress=False)
    assert peak.td.empty and peak.summary["peak_layer"] == 2 and peak.summary["peak_td"] == 0.9
    assert peak.summary["layer"] == 2 and peak.summary["chance"] == 0.14


def test_patching_gives_each_task_its_own_answer_budget(tiny_smol, tmp_path, monkeypatch):
    """A 1-token task and a 5-token task: each generates its own budget (grouped calls), and every prompt
    still gets its own task's vector (the hooks see the whole call's prompt indices)."""
    for name, outputs in (("short", ["cat", "dog", "red", "blue", "sun", "tree"]),
                          ("long", ["one two three four five"] * 6)):
        (tmp_path / f"{name}.json").write_text(json.dumps([{"input": f"{name[0]}{i}", "output": o}
                                                          for i, o in enumerate(outputs)]))
    from taskvec_interp.tasks import files_family

    fam = files_family(tmp_path, tasks=["short", "long"])
    last = tiny_smol.n_layers - 1
    vectors = _forced_vectors(tiny_smol, fam, [last])
    calls = []
    real = tiny_smol.generate_branches

    def spy(prompts, branches, max_new_tokens, **kw):
        calls.append((len(prompts), max_new_tokens))
        return real(prompts, branches, max_new_tokens, **kw)

    monkeypatch.setattr(tiny_smol, "generate_branches", spy)
    cfg = PatchConfig(family="unused", n_per_task=3, shots=1, layers=[last], modes=("replace",),
                      directions=("positive",), n_boot=10, batch_size=2)
    res = run_patching(tiny_smol, cfg, fam, vectors=vectors, progress=False)
    budgets = res.summary["max_new_tokens"]
    assert budgets["short"] == 1 and budgets["long"] == 5
    assert sorted(b for _, b in calls) == sorted(set(budgets.values()))  # one call per distinct budget
    with torch.no_grad():
        model = tiny_smol.model
        first = model.lm_head(model.model.norm(vectors.vectors[0])).argmax(-1)  # [task] forced first token
    tok = tiny_smol.tokenizer
    rows = res.predictions[res.predictions["direction"] == "positive"]
    for r in rows.itertuples():
        want = tok.decode([int(first[fam.label(r.task)])], skip_special_tokens=True)
        assert r.generated.startswith(want), (r.task, r.generated, want)
        if r.task == "short":  # one token: the forced one and nothing more
            assert r.generated == want


def test_patching_samples_queries_with_replacement_when_asked(tiny_smol):
    """A task with fewer inputs than n_per_task: refused before model work naming the task and the option;
    with replace=True the evaluation and vector prompts are drawn with replacement."""
    kw = dict(family="bitwise", family_kwargs={"n_bits": 1}, n_per_task=6, shots=1, layers=[1], modes=("add",),
              directions=("positive",), n_boot=10)
    with _Spy(tiny_smol) as spy, pytest.raises(ValueError, match=r"has only 4 inputs.*replace=True"):
        run_patching(tiny_smol, PatchConfig(**kw), progress=False)
    assert spy.calls == 0
    res = run_patching(tiny_smol, PatchConfig(**kw, replace=True), progress=False)
    base = res.predictions[res.predictions["direction"] == "baseline"]
    assert len(base) == 6 * 7 and base.groupby("task")["query"].nunique().max() <= 4
