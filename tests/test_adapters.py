"""Backend parity, hooks, generation and bad inputs on tiny random GPT-2 / Llama / Mamba-2 models."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny, make_tiny_adapter, random_prompts

from taskvec_interp import hooks as H
from taskvec_interp.adapters import (
    AdapterMismatchError,
    TorchHooksAdapter,
    load_model,
    make_adapter,
    verify_adapter,
)
from taskvec_interp.adapters.arch import get_module, measure_hidden_states_offset
from taskvec_interp.hooks import Site

ATOL = 1e-5
PROMPTS = random_prompts(7, seed=3)


make = make_tiny_adapter  # a fresh model per adapter: the TransformerLens bridge modifies its HF model in place


BACKENDS = ["torch", "nnsight", "transformer_lens"]


@pytest.fixture
def adapters(tiny_arch, word_tokenizer):
    return {b: make(tiny_arch, b, word_tokenizer) for b in BACKENDS}


def test_capture_matches_models_own_forward(tiny_arch, word_tokenizer):
    model = build_tiny(tiny_arch)
    adapter = TorchHooksAdapter(model, word_tokenizer)
    acts = adapter.capture(PROMPTS, batch_size=3, progress=False)
    assert acts.shape == (adapter.n_layers, len(PROMPTS), adapter.d_model)
    first = measure_hidden_states_offset(model, get_module(model, adapter.arch.blocks), adapter.arch.position_ids)
    for i, ids in enumerate(adapter.encode(PROMPTS)):
        hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer in range(adapter.n_layers - 1):
            torch.testing.assert_close(acts[layer, i], hs[first + layer][0, -1], atol=ATOL, rtol=0)


def test_backends_capture_the_same_activations(adapters, tiny_arch):
    ref = adapters["torch"]
    expected_components = {"mamba2": ("resid_pre", "mixer_out", "resid_post")}.get(
        tiny_arch, ("resid_pre", "attn_out", "mlp_out", "resid_post"))
    for backend, adapter in adapters.items():
        assert adapter.components == expected_components, backend
    for component in expected_components:
        expected = ref.capture(PROMPTS, component=component, batch_size=4, progress=False)
        for backend in ("nnsight", "transformer_lens"):
            got = adapters[backend].capture(PROMPTS, component=component, batch_size=4, progress=False)
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=f"{backend} {component}")


def test_padded_batch_equals_one_by_one(adapters):
    for backend, adapter in adapters.items():
        batched = adapter.capture(PROMPTS, batch_size=len(PROMPTS), progress=False)
        single = torch.cat([adapter.capture([p], progress=False) for p in PROMPTS], dim=1)
        torch.testing.assert_close(batched, single, atol=ATOL, rtol=0, msg=backend)


def test_patched_logits_agree_across_backends(adapters):
    d = adapters["torch"].d_model
    g = torch.Generator().manual_seed(0)
    per_prompt = torch.randn(len(PROMPTS), d, generator=g)
    hooks = [
        ("blocks.0.hook_resid_post", H.add(torch.randn(d, generator=g), position=-1, scale=2.0)),
        (Site(1, "resid_post"), H.replace(per_prompt, position=[0, 1, -2, 0, 1, 0, -1])),
        (Site(2, "resid_pre"), H.ablate(position=-1)),
    ]
    plain = adapters["torch"].forward(PROMPTS, logits="last")
    expected = adapters["torch"].forward(PROMPTS, hooks=hooks, logits="last")
    assert (expected - plain).abs().max() > 1e-3  # the patch does something
    for backend in ("nnsight", "transformer_lens"):
        got = adapters[backend].forward(PROMPTS, hooks=hooks, logits="last")
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=backend)


def test_per_prompt_vectors_follow_prompts_through_sorting_and_batching(word_tokenizer):
    adapter = make("gpt2", "torch", word_tokenizer)
    g = torch.Generator().manual_seed(1)
    vecs = torch.randn(len(PROMPTS), adapter.d_model, generator=g)
    hook = [("blocks.1.hook_resid_post", H.replace(vecs, position=-1))]
    batched = adapter.capture(PROMPTS, layers=[1], hooks=hook, batch_size=3, progress=False)
    torch.testing.assert_close(batched[1], vecs)
    one_by_one = torch.stack([adapter.forward([p], hooks=[("blocks.1.hook_resid_post", H.replace(vecs[i]))])[0]
                              for i, p in enumerate(PROMPTS)])
    torch.testing.assert_close(adapter.forward(PROMPTS, hooks=hook), one_by_one, atol=ATOL, rtol=0)
    gen = adapter.generate(PROMPTS, 2, hooks=hook, batch_size=3, progress=False)
    assert gen.tokens == [adapter.generate([p], 2, hooks=[("blocks.1.hook_resid_post", H.replace(vecs[i]))],
                                           progress=False).tokens[0] for i, p in enumerate(PROMPTS)]


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(ids):].tolist()


def test_generation_matches_unpadded_greedy_and_captures_prefill(tiny_arch, adapters):
    reference_model = build_tiny(tiny_arch)
    ids = adapters["torch"].encode(PROMPTS)
    expected = [greedy_reference(reference_model, row, 4) for row in ids]
    prefill = adapters["torch"].capture(PROMPTS, progress=False)
    for backend, adapter in adapters.items():
        gen = adapter.generate(PROMPTS, max_new_tokens=4, capture_layers="all", batch_size=3, progress=False)
        # word tokenizer: eos is "w0"; cut rows the same way
        cut = [row[: row.index(0)] if 0 in row else row for row in expected]
        assert gen.tokens == cut, backend
        torch.testing.assert_close(gen.activations, prefill, atol=ATOL, rtol=0, msg=backend)


def test_generation_under_hooks_agrees_across_backends(adapters):
    d = adapters["torch"].d_model
    vec = 3 * torch.randn(d, generator=torch.Generator().manual_seed(5))
    hooks = [("blocks.1.hook_resid_post", H.add(vec, position=-1))]
    plain = adapters["torch"].generate(PROMPTS, 3, progress=False).tokens
    expected = adapters["torch"].generate(PROMPTS, 3, hooks=hooks, progress=False).tokens
    assert expected != plain
    for backend in ("nnsight", "transformer_lens"):
        assert adapters[backend].generate(PROMPTS, 3, hooks=hooks, progress=False).tokens == expected, backend


def _torch_hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_when_the_body_raises(adapters):
    def boom(act, ctx):
        raise RuntimeError("boom")

    for backend, adapter in adapters.items():
        before = adapter.forward(PROMPTS)
        plain = adapter.model if backend == "torch" else (adapter.module if backend == "nnsight" else adapter.bridge)
        n_hooks = _torch_hook_count(plain)
        with pytest.raises(RuntimeError, match="boom"):
            adapter.forward(PROMPTS, hooks=[("blocks.1.hook_resid_post", boom)])
        with pytest.raises(KeyError):
            with adapter.hooks([("blocks.0.hook_resid_post", H.add(torch.ones(adapter.d_model)))]):
                assert adapter._context_hooks
                raise KeyError("user error inside the context")
        assert adapter._context_hooks == []
        assert _torch_hook_count(plain) == n_hooks, backend
        torch.testing.assert_close(adapter.forward(PROMPTS), before, atol=0, rtol=0, msg=backend)


def test_context_hooks_apply_to_every_call(word_tokenizer):
    adapter = make("llama", "torch", word_tokenizer)
    vec = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(2))
    hook = ("blocks.0.hook_resid_post", H.add(vec))
    explicit = adapter.forward(PROMPTS, hooks=[hook])
    with adapter.hooks([hook]):
        inside = adapter.forward(PROMPTS)
    torch.testing.assert_close(inside, explicit)
    assert not torch.allclose(adapter.forward(PROMPTS), explicit)


def test_tl_native_bridge(word_tokenizer):
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    bridge = TransformerBridge.boot_native(TransformerBridgeConfig(n_layers=2, d_model=32, n_heads=4, d_head=8,
                                                                   d_vocab=300, n_ctx=64, seed=0))
    adapter = make_adapter(bridge, word_tokenizer, backend="transformer_lens")
    assert adapter.n_layers == 2 and adapter.d_model == 32
    prompts = ["w1 w2 w3", "w4 w5 w6"]  # equal lengths: native models take no position ids
    acts = adapter.capture(prompts, progress=False)
    _, cache = bridge.run_with_cache(adapter.tokenize(prompts).kwargs["input_ids"],
                                     names_filter=lambda n: n.endswith("hook_out") and n.startswith("blocks."))
    for layer in range(2):
        torch.testing.assert_close(acts[layer], cache[f"blocks.{layer}.hook_out"][:, -1], atol=ATOL, rtol=0)


def test_verify_adapter_passes_and_catches_a_broken_adapter(word_tokenizer):
    adapter = make("gpt2", "nnsight", word_tokenizer)
    report = verify_adapter(adapter, prompts=PROMPTS)
    assert set(report["check"]) == {"padded_vs_single", "resid_vs_model", "logits_vs_model", "identity_hooks"}
    assert report["ok"].all()

    broken = make("gpt2", "torch", word_tokenizer)
    broken.uses_position_ids = False  # left padding without position ids shifts padded rows
    with pytest.raises(AdapterMismatchError, match="padded_vs_single"):
        verify_adapter(broken, prompts=PROMPTS)


def test_load_model_from_local_directory(tmp_path, word_tokenizer):
    model = build_tiny("llama")
    model.save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    expected = TorchHooksAdapter(model, word_tokenizer).capture(PROMPTS, progress=False)
    for backend in BACKENDS:
        adapter = load_model(str(tmp_path), backend=backend)
        assert adapter.backend == backend
        torch.testing.assert_close(adapter.capture(PROMPTS, progress=False), expected, atol=ATOL, rtol=0, msg=backend)


# ------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_give_clear_errors(adapters):
    for adapter in adapters.values():
        d = adapter.d_model
        with pytest.raises(ValueError, match="layer 3 out of range"):
            adapter.capture(PROMPTS, layers=[0, 3], progress=False)
        with pytest.raises(ValueError, match="layer -4 out of range"):
            adapter.forward(PROMPTS, hooks=[(Site(-4), H.ablate())])
        with pytest.raises(ValueError, match="unknown site"):
            adapter.forward(PROMPTS, hooks=[("blocks.0.resid", H.ablate())])
        with pytest.raises(ValueError, match="unknown site component"):
            adapter.forward(PROMPTS, hooks=[("blocks.0.hook_attn_z", H.ablate())])
        with pytest.raises(ValueError, match="returned shape"):
            adapter.forward(PROMPTS, hooks=[("blocks.0.hook_resid_post", lambda a, c: a[:, -1:])])
        with pytest.raises(ValueError, match="returned dtype"):
            adapter.forward(PROMPTS, hooks=[("blocks.0.hook_resid_post", lambda a, c: a.double())])
        with pytest.raises(TypeError, match="returned list"):
            adapter.forward(PROMPTS, hooks=[("blocks.0.hook_resid_post", lambda a, c: [a])])
        with pytest.raises(ValueError, match="d_model is"):
            adapter.forward(PROMPTS, hooks=[("blocks.0.hook_resid_post", H.add(torch.ones(d + 1)))])
        with pytest.raises(ValueError, match="one per prompt"):
            adapter.forward(PROMPTS, hooks=[("blocks.0.hook_resid_post", H.replace(torch.ones(2, d)))])
        with pytest.raises(ValueError, match="out of range for prompt"):
            adapter.capture(PROMPTS, position=40, progress=False)
        with pytest.raises(ValueError, match="empty prompt list"):
            adapter.capture([], progress=False)
        with pytest.raises(TypeError, match="list of strings"):
            adapter.capture("w1 w2", progress=False)
        if adapter.n_ctx is not None:
            with pytest.raises(ValueError, match="context window"):
                adapter.capture([" ".join(["w5"] * (adapter.n_ctx + 1))], progress=False)
            with pytest.raises(ValueError, match="exceed the context window"):
                adapter.generate([" ".join(["w5"] * (adapter.n_ctx - 1))], max_new_tokens=5, progress=False)
        with pytest.raises(ValueError, match="max_new_tokens"):
            adapter.generate(PROMPTS, max_new_tokens=0, progress=False)
        with pytest.raises(ValueError, match="batch_size"):
            adapter.capture(PROMPTS, batch_size=0, progress=False)


def test_missing_component_is_named(word_tokenizer):
    adapter = make("mamba2", "torch", word_tokenizer)
    with pytest.raises(ValueError, match="has no 'attn_out'"):
        adapter.capture(PROMPTS, component="attn_out", progress=False)


def test_unresolvable_specs(word_tokenizer):
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        load_model(build_tiny("gpt2"), backend="jax", tokenizer=word_tokenizer)
    with pytest.raises(ValueError, match="tried: built-in names") as err:
        load_model("/nonexistent/model/dir")
    assert "does not exist" in str(err.value)
    with pytest.raises(ValueError, match="hub id"):
        load_model("definitely-not-a-model")
    with pytest.raises(TypeError, match="model spec"):
        load_model(42)
    with pytest.raises(ValueError, match="no architecture row"):
        TorchHooksAdapter(torch.nn.Linear(3, 3))
