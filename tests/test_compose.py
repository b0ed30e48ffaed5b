"""Hooks and activations that cross over to and from TransformerLens and nnsight, on real bridge and
nnsight objects: TL-style hooks ``fn(act, hook)`` in our adapters, our factories in ``bridge.run_with_hooks``,
a TL cache or nnsight-saved tensors fed to TD and the hook factories, and ``names_filter`` site selection."""

from __future__ import annotations

import functools

import nnsight
import pytest
import torch
from conftest import build_tiny, make_tiny_adapter, random_prompts

from taskvec_interp import hooks as H
from taskvec_interp.adapters import TransformerLensAdapter
from taskvec_interp.adapters.transformer_lens import bridge_from_hf
from taskvec_interp.hooks import HookContext, Site, as_tl_hook, last_token
from taskvec_interp.probes.decodability import task_decodability

PROMPTS = random_prompts(6, seed=11)
BACKENDS = ["torch", "nnsight", "transformer_lens"]


def make(backend: str, tok, arch: str = "llama"):
    return make_tiny_adapter(arch, backend, tok)


@pytest.fixture(params=BACKENDS)
def adapter(request, word_tokenizer):
    return make(request.param, word_tokenizer)


def test_tl_style_hooks_run_in_every_backend(adapter):
    """``fn(act, hook)`` with ``hook.layer()`` / ``hook.name``, and a partial taking ``hook`` by keyword."""
    torch.manual_seed(0)
    vec = torch.randn(adapter.d_model)
    seen = []

    def tl_hook(act, hook):
        seen.append((hook.name, hook.layer()))
        out = act.clone()
        out[:, -1] = 0.0  # the last column: every left-padded row's last prompt token
        return out

    def shift(act, vec, hook):  # TransformerLens calls partial(shift, vec=v)(act, hook=hp)
        assert hook.layer == 1 and hook.layer() == 1
        return act + vec

    ours = adapter.forward(PROMPTS, hooks=[(Site(0), H.ablate(-1)), (Site(1), H.add(vec, position=None))])
    theirs = adapter.forward(PROMPTS, hooks=[(Site(0), tl_hook), ("blocks.1.hook_resid_post",
                                                                  functools.partial(shift, vec=vec))])
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert seen and all(s == ("blocks.0.hook_resid_post", 0) for s in seen)
    assert not torch.allclose(ours, adapter.forward(PROMPTS), atol=1e-3)  # the hooks did something


def test_tl_style_hook_with_wrong_shape_is_refused_and_removed(adapter):
    def bad(act, hook):
        return act[:, :-1]

    with pytest.raises(ValueError, match=r"hook at blocks\.1\.hook_resid_post returned shape"):
        adapter.forward(PROMPTS, hooks=[(Site(1), bad)])
    torch.testing.assert_close(adapter.forward(PROMPTS), adapter.forward(PROMPTS, hooks=[]))


def test_our_factories_in_bridge_run_with_hooks(word_tokenizer):
    """``as_tl_hook(hooks.add(v), mask)`` in ``bridge.run_with_hooks`` == our adapter with the same hook."""
    bridge = bridge_from_hf(build_tiny("llama"), word_tokenizer)
    adapter = TransformerLensAdapter(bridge, tokenizer=word_tokenizer)
    torch.manual_seed(1)
    vec = torch.randn(adapter.d_model) * 3
    inputs = adapter.tokenize(PROMPTS)
    kwargs = dict(inputs.kwargs)
    ids, mask = kwargs.pop("input_ids"), kwargs["attention_mask"]
    assert bool((mask == 0).any())  # really padded
    for name in ("blocks.1.hook_resid_post", "blocks.1.hook_out"):
        logits = bridge.run_with_hooks(ids, fwd_hooks=[(name, as_tl_hook(H.add(vec, position=-1), mask))], **kwargs)
        ours = adapter.forward(inputs, hooks=[(Site(1), H.add(vec, position=-1))])
        torch.testing.assert_close(logits[:, -1], ours, atol=1e-5, rtol=0)
    plain = bridge(ids, **kwargs)[:, -1]
    assert (logits[:, -1] - plain).abs().max() > 1e-3
    # position 0 = each row's first REAL token, found from the mask, not column 0
    got = bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_out", as_tl_hook(H.add(vec, position=0), mask))],
                                **kwargs)
    ours0 = adapter.forward(inputs, hooks=[(Site(0), H.add(vec, position=0))])
    torch.testing.assert_close(got[:, -1], ours0, atol=1e-5, rtol=0)


def test_as_tl_hook_refuses_a_mismatched_mask(word_tokenizer):
    bridge = bridge_from_hf(build_tiny("gpt2"), word_tokenizer)
    ids = torch.randint(1, 100, (2, 5))
    hook = as_tl_hook(H.ablate(-1), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"does not match the attention_mask \[2, 4\]"):
        bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", hook)])


def test_tl_cache_feeds_td_and_matches_capture(word_tokenizer):
    bridge = bridge_from_hf(build_tiny("gpt2"), word_tokenizer)
    adapter = TransformerLensAdapter(bridge, tokenizer=word_tokenizer)
    prompts = random_prompts(12, seed=5)
    labels = torch.arange(12) % 3
    inputs = adapter.tokenize(prompts)
    kwargs = dict(inputs.kwargs)
    ids, mask = kwargs.pop("input_ids"), kwargs["attention_mask"]
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(adapter.n_layers)]
    _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n in names, **kwargs)
    acts = last_token(torch.stack([cache[n] for n in names]), mask)  # [layer, batch, d]
    ref = adapter.capture(inputs, progress=False)
    torch.testing.assert_close(acts, ref, atol=1e-5, rtol=0)
    td_tl = task_decodability(acts, labels.tolist(), k=2, n_boot=0)
    td_ours = task_decodability(ref, labels.tolist(), k=2, n_boot=0)
    torch.testing.assert_close(td_tl.td, td_ours.td)
    assert td_tl.td.max() > 0


def test_nnsight_saved_tensors_feed_td_and_the_factories(word_tokenizer):
    adapter = make("nnsight", word_tokenizer)
    nn_model = adapter.nn  # the user's own nnsight model
    inputs = adapter.tokenize(PROMPTS)
    kwargs = dict(inputs.kwargs)
    mask = kwargs["attention_mask"]
    with nn_model.trace(**kwargs):
        saved = nnsight.save([nn_model.model.layers[layer].output for layer in range(adapter.n_layers)])
    stacked = torch.stack([torch.as_tensor(s) for s in saved])
    torch.testing.assert_close(last_token(stacked, mask), adapter.capture(inputs, progress=False), atol=1e-5,
                               rtol=0)
    # a hook factory applied straight to a saved tensor, its context built from the mask
    vec = torch.ones(adapter.d_model)
    ctx = HookContext.from_attention_mask(mask, "blocks.2.hook_resid_post")
    out = H.replace(vec, position=-1)(stacked[2], ctx)
    torch.testing.assert_close(last_token(out, mask), vec.expand(len(PROMPTS), -1))
    changed = (out != stacked[2]).any(-1)
    assert int(changed.sum()) == len(PROMPTS)  # exactly one cell per row


def test_right_padding_contexts_and_last_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    acts = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2)
    torch.testing.assert_close(last_token(acts, mask), acts[[0, 1, 2], [2, 1, 3]])
    ctx = HookContext.from_attention_mask(mask, 0)
    rows, cols = ctx.columns(-1, 3, 4)
    assert cols.tolist() == [2, 1, 3]
    rows, cols = ctx.columns(-2, 3, 4)
    assert cols.tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="out of range for prompt 1 of 2 tokens"):
        ctx.columns(-3, 3, 4)
    with pytest.raises(ValueError, match="row 0 is not one contiguous run"):
        HookContext.from_attention_mask(torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="row 1 has no real token"):
        last_token(acts[:2], torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"attention_mask has shape \[3, 3\]"):
        last_token(acts, mask[:, :3])


def test_capture_sites_names_filter(adapter):
    ref = adapter.capture(PROMPTS, progress=False)
    every = adapter.capture_sites(PROMPTS, progress=False)
    assert list(every) == adapter.site_names()
    assert len(every) == adapter.n_layers * len(adapter.components)
    for layer in range(adapter.n_layers):
        torch.testing.assert_close(every[f"blocks.{layer}.hook_resid_post"], ref[layer])
    picked = adapter.capture_sites(PROMPTS, names_filter=lambda n: n.endswith("attn_out") or n == "blocks.2.hook_resid_post",
                                   progress=False)
    assert adapter.n_layers == 3
    assert list(picked) == ["blocks.0.hook_attn_out", "blocks.1.hook_attn_out", "blocks.2.hook_attn_out",
                            "blocks.2.hook_resid_post"]
    torch.testing.assert_close(picked["blocks.2.hook_resid_post"], ref[2])
    torch.testing.assert_close(picked["blocks.1.hook_attn_out"], every["blocks.1.hook_attn_out"])
    listed = adapter.capture_sites(PROMPTS, names_filter=["blocks.1.hook_out", Site(0, "mlp_out")], progress=False)
    assert list(listed) == ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"]  # forward order
    torch.testing.assert_close(listed["blocks.1.hook_resid_post"], ref[1])
    assert (every["blocks.1.hook_attn_out"] - every["blocks.1.hook_mlp_out"]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="selected none of this model's"):
        adapter.capture_sites(PROMPTS, names_filter=lambda n: False)
    with pytest.raises(ValueError, match="more than once"):
        adapter.capture_sites(PROMPTS, names_filter=["blocks.1.hook_out", "blocks.1.hook_resid_post"])
    with pytest.raises(ValueError, match="unknown site"):
        adapter.capture_sites(PROMPTS, names_filter=["blocks.1.resid"])
    with pytest.raises(ValueError, match="floating-point"):
        adapter.capture(PROMPTS, dtype=torch.int64)
