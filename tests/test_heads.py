"""Attention heads that carry the task (Todd et al.'s function vectors): head means, per-head TD, the causal
indirect effect of every head on the shared-prefix engine (equal to the obvious loop on every backend),
attribution patching, the function vector, the experiments, figures, CLI and bad inputs."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch
import typer
from conftest import build_tiny, make_tiny_adapter, random_prompts, tiny_lm
from typer.testing import CliRunner

from taskvec_interp import hooks as H
from taskvec_interp.adapters import TorchHooksAdapter
from taskvec_interp.experiments.function_vectors import FVConfig, FVResult, cosine_table, run_function_vectors
from taskvec_interp.experiments.heads import (
    PRESETS,
    HeadsConfig,
    HeadsResult,
    aie_table,
    atp_effects,
    corrupt_prompts,
    head_effects,
    head_effects_loop,
    patch_head,
    run_heads,
)
from taskvec_interp.experiments.heads_cli import apply_preset, fv, heads
from taskvec_interp.figures.heads import plot_aie_heatmap, plot_fv_gain, plot_head_td, plot_td_vs_aie
from taskvec_interp.probes.heads import (
    HeadMeans,
    check_heads,
    function_vector,
    head_activations,
    head_decodability,
    head_outputs,
    load_function_vectors,
    mean_head_activations,
    output_projections,
    parse_heads,
)
from taskvec_interp.probes.vectors import TaskVectors
from taskvec_interp.tasks import (
    Example,
    ExampleTask,
    PromptBuilder,
    PromptTemplate,
    RandomOutputTask,
    TaskFamily,
)

TEMPLATE = {"input_prefix": "", "output_prefix": " w3", "example_separator": " w4 "}
"""Word-tokenizer prompts: ``w17 w3 w200 w4 w22 w3 w200 w4 w9 w3`` (w3 the arrow, w4 the separator)."""
LAYER, HEAD = 1, 2
"""The head that carries the task in :func:`carrier_model` (query head 2 reads key/value head 1 of 2)."""


def _hooks(model: torch.nn.Module) -> dict:
    """Every forward (pre-)hook on the model's modules (transformers installs a few of its own on load)."""
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks}


def toy_family(constant: bool = True) -> TaskFamily:
    """Two tasks over inputs w10..w59: A answers w200, B answers w201 (``constant``), or A maps w_i to w_{i+100}
    and B to w_{i+150}."""
    inputs = range(10, 60)
    a = ExampleTask("A", [Example(f"w{i}", "w200" if constant else f"w{i + 100}") for i in inputs])
    b = ExampleTask("B", [Example(f"w{i}", "w201" if constant else f"w{i + 150}") for i in inputs])
    null = RandomOutputTask([f"w{i}" for i in inputs], outputs=["w200", "w201"])
    return TaskFamily("toy", [a, b], null)


def carrier_model(alpha: float = 20.0, beta: float = 3.0):
    """A tiny Llama (3 layers, 4 query heads on 2 key/value heads) in which ONLY head (1, 2) moves the answer
    logits: every MLP and every other head writes nothing; head (1, 2) attends uniformly (zero query/key weights)
    and its values read two embedding dims that only w200 / w201 have, so its output at the last token counts the
    task's answer tokens in the prompt; its output projection writes them to two residual dims the unembedding
    reads as w200 / w201. So the answer follows the demonstrations' answers through this one head."""
    model = tiny_lm("llama", seed=7, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 28:] = 0
        emb[200, 28] = emb[201, 29] = 3.0
        for block in model.model.layers:
            block.mlp.down_proj.weight.zero_()
            block.self_attn.o_proj.weight.zero_()
        attn = model.model.layers[LAYER].self_attn
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        attn.v_proj.weight.zero_()
        kv = HEAD // (4 // 2)  # GQA: query head 2 reads key/value head 1
        attn.v_proj.weight[kv * 8, 28] = attn.v_proj.weight[kv * 8 + 1, 29] = 1.0
        attn.o_proj.weight[30, HEAD * 8] = attn.o_proj.weight[31, HEAD * 8 + 1] = alpha
        head = model.lm_head.weight
        head[:, 28:] = 0
        head[200].zero_()
        head[201].zero_()
        head[200, 30] = head[201, 31] = beta
    return model


@pytest.fixture
def carrier(word_tokenizer):
    return TorchHooksAdapter(carrier_model(), word_tokenizer)


def _quick(**kw) -> HeadsConfig:
    base = dict(family="toy", template=TEMPLATE, shots=4, n_per_task=8, n_cie_prompts=4, k=3, n_boot=50, top_k=1)
    return HeadsConfig.preset("quick", **(base | kw))


# ------------------------------------------------------------------------------------------------
# The method on a model where we know the answer
# ------------------------------------------------------------------------------------------------
def test_known_head_has_the_largest_effect_and_its_function_vector_restores_the_task(carrier):
    fam = toy_family()
    result = run_heads(carrier, _quick(corruption="other_task"), fam, progress=False)
    overall = result.aie[result.aie["task"] == "all"].set_index(["layer", "head"])["aie"]
    assert overall.idxmax() == (LAYER, HEAD)
    assert overall[(LAYER, HEAD)] > 0.9  # P(answer) from ~0 to ~1: the other task's answers, then this one's
    assert overall.drop((LAYER, HEAD)).abs().max() < 1e-6  # no other head writes anything
    assert result.top(1) == [(LAYER, HEAD)]
    assert result.summary["p_base_mean"] < 0.05
    # per-head TD: head (1, 2) separates the tasks (the Null task's random answers aside), and so does its
    # key/value twin, head 3 (z is per query head: head 3 has the same z as head 2 but no effect); heads 0 and 1
    # read the zeroed key/value head 0 (z = 0: chance)
    td = result.head_td[result.head_td["task"] == "all"].set_index(["layer", "head"])["td"]
    per_task = result.head_td.set_index(["layer", "head", "task"])["td"]
    assert per_task[(LAYER, HEAD, "A")] == per_task[(LAYER, HEAD, "B")] == 1.0 and td[(LAYER, HEAD)] > 0.8
    assert td[(LAYER, 3)] == td[(LAYER, HEAD)] and overall[(LAYER, 3)] == 0.0
    assert td[(LAYER, 0)] < 0.5 and td[(LAYER, 1)] < 0.5

    # the function vector of the top head restores the task zero-shot, at every layer it is added at
    tv = result.vectors
    assert tv.definition == "function" and tv.meta["function_vector"]["heads"] == [[LAYER, HEAD]]
    cfg = FVConfig(family="toy", template=TEMPLATE, shots=4, n_per_task=6, top_k=1, settings=("zero_shot", "shuffled"),
                   compare=False, n_boot=50)
    fvr = run_function_vectors(carrier, cfg, fam, heads=result, progress=False)
    zs = fvr.accuracy[(fvr.accuracy["setting"] == "zero_shot") & (fvr.accuracy["task"] == "all")]
    assert float(zs.loc[zs["vector"] == "none", "accuracy"].iloc[0]) == 0.0
    assert (zs.loc[zs["vector"] == "function", "accuracy"] == 1.0).all()
    assert {"zero_shot", "shuffled"} == set(fvr.accuracy["setting"])
    assert set(fvr.summary["engine"]) == {"prefix"}


def test_function_vector_is_the_head_slice_of_the_output_projection(word_tokenizer):
    """Sum of mean @ W_O[head slice] over the heads, the projection's bias excluded (GPT-2's c_proj has one)."""
    model = build_tiny("gpt2")
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.bias.normal_(0, 5.0)  # a big bias: counting it (once or per head) would show
    adapter = TorchHooksAdapter(model, word_tokenizer)
    prompts = PromptBuilder(PromptTemplate(**TEMPLATE)).build(toy_family(False), 6, 3, seed=0)
    means, z = mean_head_activations(adapter, prompts, progress=False)
    assert z.shape == (3, len(prompts), 4, 8) and means.means.shape == (3, 3, 4, 8)
    heads_ = [(0, 1), (2, 3), (2, 0)]
    tv = function_vector(adapter, means, heads_)
    want = torch.zeros(3, 32)
    for layer, head in heads_:
        w = model.transformer.h[layer].attn.c_proj.weight  # Conv1D: [n_in, n_out]
        want += means.means[:, layer, head] @ w[head * 8:(head + 1) * 8]
    assert torch.allclose(tv.vectors[0], want, atol=1e-5) and torch.equal(tv.vectors[0], tv.vectors[2])
    assert torch.allclose(head_outputs(adapter, means, heads_).sum(0), want, atol=1e-5)
    # the means are the per-task average of one capture pass
    a = [i for i, p in enumerate(prompts) if p.task == "A"]
    assert torch.allclose(means.means[0], z[:, a].mean(1), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Shared prefix == the obvious loop, on every backend and on GQA
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "nnsight", "transformer_lens"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shared_prefix_effects_equal_the_obvious_loop(arch, backend, word_tokenizer):
    adapter = make_tiny_adapter(arch, backend, word_tokenizer)
    prompts = random_prompts(4, seed=4)
    adapter.forward(prompts[:1])  # the bridge installs hooks of its own on its first forward
    hooks_before = _hooks(adapter._hf_module())
    g = torch.Generator().manual_seed(1)
    values = torch.randn(4, 3, 4, 8, generator=g) * 4
    answers = torch.randint(1, 299, (4,), generator=g)
    # two prompt batches (ragged padding), several chunks of branches
    base, patched = head_effects(adapter, prompts, answers, values, batch_size=3, max_rows=8, progress=False)
    lbase, lpatched = head_effects_loop(adapter, prompts, answers, values, batch_size=3, progress=False)
    assert patched.shape == (12, 4)
    assert torch.allclose(base, lbase, atol=1e-7, rtol=0) and torch.allclose(patched, lpatched, atol=1e-7, rtol=0)
    assert (patched - base).abs().max() > 1e-4  # the patches do something
    if backend == "torch":
        branch = [[(H.Site(1, "z"), patch_head(2, values[:, 1, 2]))]]
        assert adapter.prefix_sharing(branch) is None  # the fast path is the one measured
    else:  # and every backend gives the torch backend's numbers
        ref = make_tiny_adapter(arch, "torch", word_tokenizer)
        rbase, rpatched = head_effects(ref, prompts, answers, values, batch_size=3, progress=False)
        assert torch.allclose(patched, rpatched, atol=1e-6, rtol=1e-4)
        # the function vector's projection finds the same output projections through every backend
        pairs = [(0, 1), (2, 3)]
        assert torch.allclose(head_outputs(adapter, values[:2], pairs), head_outputs(ref, values[:2], pairs), atol=1e-6)
    assert _hooks(adapter._hf_module()) == hooks_before


def test_a_branch_patches_one_query_head_of_a_gqa_model(word_tokenizer):
    """Query heads 2 and 3 share key/value head 1: patching head 2 must leave head 3's z as it was."""
    adapter = make_tiny_adapter("llama", "torch", word_tokenizer)
    prompts = random_prompts(3, seed=2)
    seen = {}

    def record(act, hook):
        seen["z"] = act[:, -1].clone()

    values = torch.full((3, 8), 7.0)
    adapter.forward(prompts, hooks=[("blocks.1.attn.hook_z", patch_head(2, values)), ("blocks.1.attn.hook_z", record)])
    clean = adapter.capture_sites(prompts, ["blocks.1.attn.hook_z"], progress=False)["blocks.1.attn.hook_z"]
    assert torch.equal(seen["z"][:, 2], values)
    assert torch.equal(seen["z"][:, [0, 1, 3]], clean[:, [0, 1, 3]])


def test_hooks_leave_no_trace_after_a_raise(word_tokenizer):
    adapter = make_tiny_adapter("llama", "torch", word_tokenizer)
    prompts = random_prompts(4, seed=3)
    answers = torch.tensor([5, 6, 7, 8])
    before, hooks_before = adapter.forward(prompts), _hooks(adapter.model)
    bad = torch.zeros(4, 3, 4, 5)  # d_head 5, the model's is 8: the hook raises inside the forward
    for share in (None, False):
        with pytest.raises(RuntimeError):
            head_effects(adapter, prompts, answers, bad, heads=[(1, 2)], share_prefix=share, progress=False)
        assert _hooks(adapter.model) == hooks_before
    with pytest.raises(RuntimeError):
        head_effects_loop(adapter, prompts, answers, bad, heads=[(1, 2)], progress=False)
    with pytest.raises(RuntimeError):
        atp_effects(adapter, prompts, answers, bad, progress=False)
    assert _hooks(adapter.model) == hooks_before
    assert torch.equal(adapter.forward(prompts), before)
    assert all(p.grad is None for p in adapter.model.parameters())


def test_a_killed_run_resumes_from_its_saved_chunks(word_tokenizer, tmp_path, monkeypatch):
    import taskvec_interp.experiments.heads as mod

    adapter = make_tiny_adapter("llama", "torch", word_tokenizer)
    fam, cfg = toy_family(False), _quick(chunk_heads=5, top_k=2)
    calls = []
    real = mod.head_effects

    def flaky(*a, **k):
        calls.append(len(a[4]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mod, "head_effects", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_heads(adapter, cfg, fam, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert len(list((tmp_path / "ckpt").glob("chunk_*.parquet"))) == 1
    resumed = run_heads(adapter, cfg, fam, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert calls == [5, 5, 5, 2]  # chunk 1 was read back, not recomputed
    monkeypatch.setattr(mod, "head_effects", real)
    whole = run_heads(adapter, cfg, fam, progress=False)
    pd.testing.assert_frame_equal(resumed.cie, whole.cie)
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(ValueError, match="other conditions"):  # another config never reuses the chunks
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "conditions.json").write_text('{"key": "x"}')
        run_heads(adapter, cfg, fam, checkpoint_dir=tmp_path / "ckpt", progress=False)


# ------------------------------------------------------------------------------------------------
# Attribution patching
# ------------------------------------------------------------------------------------------------
def test_attribution_patching_ranks_like_the_exact_effects_and_verifies_its_top(word_tokenizer):
    adapter = make_tiny_adapter("llama", "torch", word_tokenizer)
    fam = toy_family(constant=False)
    both = run_heads(adapter, _quick(method="both", top_k=3), fam, progress=False)
    assert both.summary["atp_vs_exact_spearman"] > 0.8  # small random model: close to linear
    assert all(p.grad is None for p in adapter.model.parameters())  # only z got gradients
    atp = run_heads(adapter, _quick(method="atp", verify_top=4, top_k=3), fam, progress=False)
    verified = atp.cie.drop_duplicates(["layer", "head"])[["layer", "head"]]
    assert len(verified) == 4
    ranked = atp.atp[atp.atp["task"] == "all"].nlargest(4, "atp")
    assert set(map(tuple, verified.to_numpy().tolist())) == set(map(tuple, ranked[["layer", "head"]].to_numpy().tolist()))
    # the verified heads' exact effects are the exact run's
    merged = atp.cie.merge(both.cie, on=["layer", "head", "prompt_id"], suffixes=("", "_all"))
    assert len(merged) == len(atp.cie) and (merged["cie"] - merged["cie_all"]).abs().max() < 1e-9


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------
def test_shuffled_labels_stay_within_the_prompt():
    fam = toy_family(constant=False)
    builder = PromptBuilder(PromptTemplate(**TEMPLATE))
    clean = builder.build(fam, 10, 5, seed=0, tasks=["A", "B"])
    shuffled = corrupt_prompts(clean, fam, "shuffled", PromptTemplate(**TEMPLATE), seed=3)
    moved = 0
    for c, s in zip(clean, shuffled, strict=True):
        assert (s.query, s.answer, s.task) == (c.query, c.answer, c.task)
        assert [d.input for d in s.demos] == [d.input for d in c.demos]
        assert sorted(d.output for d in s.demos) == sorted(d.output for d in c.demos)
        moved += sum(a.output != b.output for a, b in zip(s.demos, c.demos, strict=True))
    assert moved > 20
    other = corrupt_prompts(clean, fam, "other_task", PromptTemplate(**TEMPLATE), seed=3)
    for c, o in zip(clean, other, strict=True):
        assert o.query == c.query and len(o.demos) == 5 and c.query not in {d.input for d in o.demos}
        shift = 150 if c.task == "A" else 100  # the other task's mapping
        assert all(int(d.output[1:]) - int(d.input[1:]) == shift for d in o.demos)


def test_aie_table_means_and_paired_cis():
    cie = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    tasks = ["A", "A", "B", "B", "B"]
    tab = aie_table(cie, tasks, [(0, 0), (3, 1)], n_boot=200, seed=0)
    all_ = tab[tab["task"] == "all"].set_index("head")
    assert all_.loc[0, "aie"] == pytest.approx(0.5) and all_.loc[1, "aie"] == pytest.approx(0.5)  # mean of task means
    assert all_.loc[1, "ci_low"] == pytest.approx(0.5) and all_.loc[1, "ci_high"] == pytest.approx(0.5)
    a = tab[(tab["task"] == "A") & (tab["head"] == 0)].iloc[0]
    assert a["aie"] == 1.0 and a["n"] == 2 and a["ci_low"] == 1.0
    assert tab[tab["task"] == "all"]["layer"].tolist() == [0, 3]
    nan = aie_table(cie, tasks, [(0, 0), (3, 1)], n_boot=0)
    assert nan["ci_low"].isna().all()


def test_per_head_td_matches_td_of_each_head_alone(word_tokenizer):
    from taskvec_interp.probes.decodability import task_decodability

    adapter = make_tiny_adapter("gpt2", "torch", word_tokenizer)
    prompts = PromptBuilder(PromptTemplate(**TEMPLATE)).build(toy_family(False), 8, 3, seed=1)
    z = head_activations(adapter, prompts, progress=False)
    tasks = [p.task for p in prompts]
    tab = head_decodability(z, tasks, ["A", "B", "null"], k=3, n_boot=0)
    one = task_decodability(z[2, :, 1], tasks, k=3, label_names=["A", "B", "null"], n_boot=0)
    row = tab[(tab["layer"] == 2) & (tab["head"] == 1) & (tab["task"] == "all")]
    assert float(row["td"].iloc[0]) == pytest.approx(float(one.td[0]))
    assert len(tab) == 12 * 4 and set(tab["task"]) == {"all", "A", "B", "null"}


def test_head_means_and_function_vectors_round_trip_and_refuse_other_models(word_tokenizer, tmp_path):
    adapter = make_tiny_adapter("llama", "torch", word_tokenizer)
    prompts = PromptBuilder(PromptTemplate(**TEMPLATE)).build(toy_family(), 4, 3, seed=0)
    means, _ = mean_head_activations(adapter, prompts, progress=False)
    back = HeadMeans.load(means.save(tmp_path / "m.safetensors"), adapter)
    assert torch.equal(back.means, means.means) and back.tasks == means.tasks
    tv = function_vector(adapter, means, [(1, 2), (0, 0)])
    path = tv.save(tmp_path / "fv.safetensors")
    loaded = TaskVectors.load(path, adapter)  # what `taskvec patch --vectors-file` does
    assert torch.equal(loaded.vectors, tv.vectors) and loaded.definition == "function"
    assert load_function_vectors(path, adapter).meta["function_vector"]["heads"] == [[1, 2], [0, 0]]
    deeper = TorchHooksAdapter(tiny_lm("llama", seed=3, num_hidden_layers=4, eos_token_id=0, pad_token_id=0),
                               word_tokenizer)
    with pytest.raises(ValueError, match="layers"):
        load_function_vectors(path, deeper)
    fewer_heads = TorchHooksAdapter(tiny_lm("llama", seed=3, num_attention_heads=2, num_key_value_heads=1,
                                            eos_token_id=0, pad_token_id=0), word_tokenizer)
    with pytest.raises(ValueError, match="heads per layer"):
        load_function_vectors(path, fewer_heads)
    with pytest.raises(ValueError, match="another model"):
        load_function_vectors(path, make_tiny_adapter("gpt2", "torch", word_tokenizer))
    with pytest.raises(ValueError, match="heads"):
        HeadMeans.load(tmp_path / "m.safetensors", fewer_heads)


def test_cosine_table_of_identical_and_opposite_vectors():
    v = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    a = TaskVectors(v, [0, 1], ("A", "B", "C"), "paper")
    b = TaskVectors(-v, [0, 1], ("A", "B", "C"), "function")
    tab = cosine_table({"function": b, "paper": a, "same": a}, [1], ["A", "C"])
    assert set(tab["pair"]) == {"function~paper", "function~same", "paper~same"}
    assert tab.loc[tab["pair"] == "function~paper", "cosine"].tolist() == pytest.approx([-1.0, -1.0])
    assert tab.loc[tab["pair"] == "paper~same", "cosine_centered"].tolist() == pytest.approx([1.0, 1.0])


# ------------------------------------------------------------------------------------------------
# Results, figures, presets, CLI
# ------------------------------------------------------------------------------------------------
def test_results_save_load_and_figures(carrier, tmp_path):
    fam = toy_family()
    result = run_heads(carrier, _quick(corruption="other_task", top_k=2), fam, progress=False)
    back = HeadsResult.load(result.save(tmp_path / "heads"))
    assert back.config == result.config and back.summary["top_heads"] == result.summary["top_heads"]
    pd.testing.assert_frame_equal(back.aie, result.aie)
    assert back.top(2) == result.top(2) and torch.equal(back.vectors.vectors, result.vectors.vectors)
    cfg = FVConfig(family="toy", template=TEMPLATE, shots=4, n_per_task=4, top_k=1, layers="0,2", n_boot=20,
                   n_vector_prompts=4, natural_templates=("w5 {x} w3",))
    fvr = run_function_vectors(carrier, cfg, fam, heads=back, progress=False)
    assert set(fvr.vectors) == {"function", "paper", "hendel"} and set(fvr.accuracy["setting"]) == {
        "zero_shot", "shuffled", "natural"}
    assert set(fvr.cosine["pair"]) == {"function~paper", "function~hendel", "paper~hendel"}
    fback = FVResult.load(fvr.save(tmp_path / "fv"))
    pd.testing.assert_frame_equal(fback.accuracy, fvr.accuracy)
    assert fback.config == fvr.config and set(fback.vectors) == set(fvr.vectors)
    for fig in (plot_aie_heatmap(result.aie, tmp_path / "a.png"), plot_head_td(result.head_td, tmp_path / "t.png"),
                plot_td_vs_aie(result.aie, result.head_td, tmp_path / "s.png"),
                plot_fv_gain(fvr.accuracy, tmp_path / "g.png")):
        assert fig.axes
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("a.png", "t.png", "s.png", "g.png"))
    with pytest.raises(ValueError, match="no rows for task"):
        plot_aie_heatmap(result.aie, task="nope")


def test_patching_injects_a_saved_function_vector(carrier, tmp_path):
    """What `taskvec patch --vectors-file function_vectors.safetensors` runs: the function vector (Null included)
    added zero-shot at a layer through the patching experiment."""
    from taskvec_interp.experiments.patching import PatchConfig, run_patching

    fam = toy_family()
    result = run_heads(carrier, _quick(corruption="other_task"), fam, progress=False)
    fv = TaskVectors.load(result.vectors.save(tmp_path / "fv.safetensors"), carrier)
    assert fv.tasks == ("A", "B", "null")
    cfg = PatchConfig(family="toy", template=TEMPLATE, shots=4, n_per_task=5, k=2, layers="2", modes=("add",),
                      directions=("positive",), zero_shot=True, n_boot=20)
    vector_prompts = PromptBuilder(PromptTemplate(**TEMPLATE)).build(fam, 5, 4, seed=1)
    acc = run_patching(carrier, cfg, fam, vectors=fv, vector_prompts=vector_prompts, progress=False).accuracy
    real = acc[acc["task"] != "null"]
    assert (real.loc[real["mode"] == "none", "accuracy"] == 0).all() and (real.loc[real["mode"] == "add", "accuracy"]
                                                                            == 1).all()


def test_presets_and_config_checks():
    todd = HeadsConfig()
    assert (todd.shots, todd.n_cie_prompts, todd.top_k) == (10, 25, 10) and todd.template["input_prefix"] == "Q: "
    assert HeadsConfig.preset("todd") == todd
    quick = apply_preset(HeadsConfig(top_k=3), "quick")
    assert quick.top_k == 3 and quick.shots == PRESETS["quick"]["shots"]  # an option given wins over the preset
    for kw, match in [({"top_k": 0}, "top_k"), ({"method": "fast"}, "method"), ({"corruption": "x"}, "corruption"),
                      ({"shots": 1}, "shots"), ({"k": 99}, "HeadsConfig.k")]:
        with pytest.raises(ValueError, match=match):
            HeadsConfig(**kw)
    with pytest.raises(ValueError, match="layer.head"):
        FVConfig(heads="3-1")
    assert parse_heads("9.3, 12:0") == [(9, 3), (12, 0)]


def test_bad_inputs_are_refused_before_any_model_work(word_tokenizer, monkeypatch):
    adapter = make_tiny_adapter("llama", "torch", word_tokenizer)

    def no_model(*a, **k):
        raise AssertionError("model work before the checks")

    monkeypatch.setattr(adapter, "_forward", no_model)
    monkeypatch.setattr(adapter, "_score_branches", no_model)
    fam = toy_family()
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 12\]"):
        run_heads(adapter, _quick(top_k=13), fam, progress=False)
    with pytest.raises(ValueError, match="verify_top"):
        run_heads(adapter, _quick(method="atp", verify_top=50), fam, progress=False)
    one = TaskFamily("one", [fam["A"]], fam.null)
    with pytest.raises(ValueError, match="at least two"):
        run_heads(adapter, _quick(), one, progress=False)
    with pytest.raises(ValueError, match="head index 4 .* 4 heads per layer"):
        run_function_vectors(adapter, FVConfig(family="toy", template=TEMPLATE, heads="1.4"), fam, progress=False)
    with pytest.raises(ValueError, match="layer 3 .* 3 layers"):
        check_heads([(3, 0)], 3, 4)
    with pytest.raises(ValueError, match="fv_layer"):
        run_function_vectors(adapter, FVConfig(family="toy", template=TEMPLATE, fv_layer=3), fam, progress=False)
    # an output projection that cannot be found: every path tried is named
    monkeypatch.setattr(adapter, "arch", dataclasses.replace(adapter.arch, blocks="model.nowhere"))
    with pytest.raises(ValueError, match=r"output projection.*tried \['self_attn.o_proj'.*'attn.c_proj'"):
        run_heads(adapter, _quick(), fam, progress=False)
    with pytest.raises(ValueError, match="output projection"):
        output_projections(adapter)
    mamba = make_tiny_adapter("mamba2", "torch", word_tokenizer)
    with pytest.raises(ValueError, match="per-head z site"):
        run_heads(mamba, _quick(), fam, progress=False)
    # a function vector from another model is refused by the FV experiment too
    other = TorchHooksAdapter(tiny_lm("llama", seed=3, num_hidden_layers=4, eos_token_id=0, pad_token_id=0),
                              word_tokenizer)
    result = run_heads(TorchHooksAdapter(carrier_model(), word_tokenizer), _quick(corruption="other_task"), fam,
                       progress=False)
    with pytest.raises(ValueError, match="layers"):
        run_function_vectors(other, FVConfig(family="toy", template=TEMPLATE), fam, heads=result, progress=False)


def _write_family(folder) -> str:
    folder.mkdir()
    for name, out in (("A", "w200"), ("B", "w201")):
        (folder / f"{name}.json").write_text(json.dumps([{"input": f"w{i}", "output": out} for i in range(10, 60)]))
    return f"files:{folder}"


def test_cli_heads_and_fv(word_tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    carrier_model().save_pretrained(model_dir)
    word_tokenizer.save_pretrained(model_dir)
    family = _write_family(tmp_path / "tasks")
    app = typer.Typer()
    app.command("heads")(heads)
    app.command("fv")(fv)
    common = ["--model", str(model_dir), "--family", family, "--template", json.dumps(TEMPLATE), "--shots", "4"]
    out = tmp_path / "heads"
    res = CliRunner().invoke(app, ["heads", *common, "--preset", "quick", "--n-per-task", "8", "--n-cie-prompts", "3",
                                   "--k", "3", "--corruption", "other_task", "--top-k", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    for name in ("config.json", "aie.parquet", "cie.parquet", "head_td.parquet", "top_heads.parquet",
                 "head_means.safetensors", "function_vectors.safetensors", "summary.json", "figures/aie_heatmap.png",
                 "figures/head_td.png", "figures/td_vs_aie.png"):
        assert (out / name).exists(), name
    top = json.loads((out / "summary.json").read_text())["top_heads"][0]
    assert (top["layer"], top["head"]) == (LAYER, HEAD) and "top 1 heads" in res.output
    fout = tmp_path / "fv"
    res = CliRunner().invoke(app, ["fv", *common, "--heads-dir", str(out), "--n-per-task", "4", "--top-k", "1",
                                   "--layers", "0,2", "--settings", "zero_shot", "--no-compare", "--out", str(fout)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert (fout / "figures" / "fv_gain_by_layer.png").exists() and (fout / "function_vectors.safetensors").exists()
    acc = pd.read_parquet(fout / "accuracy.parquet")
    assert acc.loc[(acc["vector"] == "function") & (acc["task"] == "all"), "accuracy"].tolist() == [1.0, 1.0]
