"""Per-head z site (blocks.{l}.attn.hook_z) and head ablation of the synthetic model (paper Figs. 17-18)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny, make_tiny_adapter, random_prompts

from taskvec_interp import hooks as H
from taskvec_interp.adapters import TorchHooksAdapter
from taskvec_interp.synthetic.data import make_test_set
from taskvec_interp.synthetic.heads import basis_specific_heads, head_ablation
from taskvec_interp.synthetic.inputs import model_inputs, synthetic_adapter
from taskvec_interp.synthetic.model import SyntheticRegressor, model_config
from taskvec_interp.synthetic.train import train_config


@pytest.fixture(scope="module")
def tiny():
    cfg = train_config("tiny")
    model = SyntheticRegressor(cfg.model, seed=0).eval()
    return cfg, model, make_test_set(cfg.data, n_per_basis=8, seed=3)


def test_z_site_names():
    assert H.Site(3, "z").name == "blocks.3.attn.hook_z"
    assert H.parse_site("blocks.3.attn.hook_z") == H.Site(3, "z")
    assert H.parse_site("blocks.-1.attn.hook_z", 4) == H.Site(3, "z")
    with pytest.raises(ValueError, match="did you mean 'blocks.3.attn.hook_z'"):
        H.parse_site("blocks.3.hook_z")
    with pytest.raises(ValueError, match="did you mean 'blocks.3.hook_resid_post'"):
        H.parse_site("blocks.3.attn.hook_resid_post")
    assert H.Site(1, "resid_pre").order < H.Site(1, "z").order < H.Site(1, "attn_out").order


def test_z_hook_shape_and_identity(tiny):
    cfg, model, test = tiny
    adapter = synthetic_adapter(model)
    assert adapter.n_heads == cfg.model.n_head and adapter.head_components == ("z",)
    assert "z" not in adapter.components and not any("hook_z" in n for n in adapter.site_names())
    inputs = model_inputs(test)
    shapes = {}

    def record(act, hook):
        shapes[hook.name] = tuple(act.shape)
        return act

    base = adapter.forward(inputs, logits="all")
    out = adapter.forward(inputs, hooks=[(f"blocks.{layer}.attn.hook_z", record) for layer in range(2)], logits="all")
    d_head = cfg.model.d_model // cfg.model.n_head
    assert shapes == {f"blocks.{layer}.attn.hook_z": (len(test), 40, cfg.model.n_head, d_head) for layer in range(2)}
    assert torch.equal(out, base)
    assert torch.equal(base, model(test.xs, test.ys))
    got = adapter.capture_sites(inputs, ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"], position=-2, progress=False)
    assert got["blocks.1.attn.hook_z"].shape == (len(test), cfg.model.n_head, d_head)
    with pytest.raises(ValueError, match="in a call of their own"):
        adapter.capture_sites(inputs, ["blocks.0.attn.hook_z", "blocks.1.hook_resid_post"], progress=False)


def test_zero_all_heads_equals_zero_c_proj_input(tiny):
    _, model, test = tiny
    adapter = synthetic_adapter(model)
    layer = 1
    got = adapter.forward(model_inputs(test), hooks=[(H.Site(layer, "z"), H.ablate(position=None))], logits="all")
    handle = model.backbone.h[layer].attn.c_proj.register_forward_pre_hook(lambda mod, args: (torch.zeros_like(args[0]),))
    try:
        with torch.no_grad():
            want = model(test.xs, test.ys)
    finally:
        handle.remove()
    assert torch.equal(got, want)
    assert not torch.equal(got, model(test.xs, test.ys).detach())


def test_head_ablation_table_and_batching(tiny):
    cfg, model, test = tiny
    n_bases = cfg.data.n_bases
    table = head_ablation(model, test, n_bases, mode=["mean", "zero"])
    assert len(table) == 2 * cfg.model.n_layer * cfg.model.n_head * n_bases
    assert list(table.columns[:4]) == ["layer", "head", "mode", "basis"]
    assert torch.allclose(torch.tensor(table["delta"].to_numpy()),
                          torch.tensor((table["mse"] - table["mse_base"]).to_numpy()))
    assert (table["delta_last"] == table["mse_last"] - table["mse_last_base"]).all()
    one = head_ablation(model, test, n_bases, mode=["mean", "zero"], batch_heads=False)
    assert (one[["mse", "mse_last"]].to_numpy() == table[["mse", "mse_last"]].to_numpy()).all()
    # the batched forward equals a hand-made one-head ablation (head 1 of layer 0 zeroed at every position)
    adapter = synthetic_adapter(model)

    def zero_head(act, hook):
        out = act.clone()
        out[:, :, 1] = 0
        return out

    preds = adapter.forward(model_inputs(test), hooks=[("blocks.0.attn.hook_z", zero_head)], logits="all")
    err = ((preds - test.ys) ** 2)[test.basis == 2]
    row = table[(table["layer"] == 0) & (table["head"] == 1) & (table["mode"] == "zero") & (table["basis"] == "B3")].iloc[0]
    assert row["mse"] == pytest.approx(float(err.mean()), rel=1e-6)
    assert row["mse_last"] == pytest.approx(float(err[:, -1].mean()), rel=1e-6)
    # ablating only the query token x_K changes only the last prediction
    q = head_ablation(model, test, n_bases, mode="mean", position=-2)
    assert (q["mse"] != q["mse_base"]).any() and set(q["mode"]) == {"mean"}


def _one_head_model():
    """Tiny GPT-2 regressor where only head 1 of layer 1 writes anything, and its values read
    x[2] - x[3]: zero on any sequence whose x tokens have x[2] == x[3]."""
    cfg = model_config("tiny")
    model = SyntheticRegressor(cfg, seed=0).eval()
    d, h = cfg.d_model, cfg.n_head
    dh = d // h
    with torch.no_grad():
        model.read_in.weight.zero_()
        model.read_in.weight[: cfg.n_dims, : cfg.n_dims] = torch.eye(cfg.n_dims)
        model.read_in.bias.zero_()
        model.backbone.wpe.weight.zero_()
        for block in model.backbone.h:
            block.ln_1.bias.zero_()
            block.attn.c_attn.weight[:, 2 * d:] = 0  # every head's values
            block.attn.c_attn.bias.zero_()
            block.attn.c_proj.bias.zero_()
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
        v = model.backbone.h[1].attn.c_attn.weight
        v[2, 2 * d + dh] = 50.0
        v[3, 2 * d + dh] = -50.0
    return cfg, model


def test_basis_specific_head_found():
    cfg, model = _one_head_model()
    data = train_config("tiny").data
    test = make_test_set(data, n_per_basis=16, seed=5)
    other = test.basis != 0
    test.xs[other, :, 3] = test.xs[other, :, 2]  # the head sees nothing in bases B2..B4
    with torch.no_grad():
        test.ys[test.basis == 0] = model(test.xs, test.ys)[test.basis == 0]  # B1 is fit exactly with the head
    table = head_ablation(model, test, data.n_bases, mode="zero")
    found = basis_specific_heads(table, threshold=1e-4, ratio=10)
    assert [(r["layer"], r["head"], r["basis"]) for r in found] == [(1, 1, "B1")]
    assert found[0]["delta"] > 1e-3 and found[0]["column"] == "delta"
    others = table[~((table["layer"] == 1) & (table["head"] == 1) & (table["basis"] == "B1"))]
    assert others["delta"].abs().max() < 1e-5
    assert basis_specific_heads(table, threshold=1e3) == []
    with pytest.raises(ValueError, match="ratio"):
        basis_specific_heads(table, ratio=0.5)


def test_mamba2_refused():
    model = SyntheticRegressor(model_config("tiny", backbone="mamba2"), seed=0)
    test = make_test_set(train_config("tiny").data, n_per_basis=2)
    with pytest.raises(ValueError, match="needs attention heads.*mamba2"):
        head_ablation(model, test, 4)
    adapter = synthetic_adapter(model)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.hook_z.*SyntheticRegressor"):
        adapter.forward(model_inputs(test), hooks=[("blocks.0.attn.hook_z", lambda a, h: None)])


def test_plot_head_ablation(tiny, tmp_path):
    from taskvec_interp.figures import plot_head_ablation

    cfg, model, test = tiny
    table = head_ablation(model, test, cfg.data.n_bases, mode=["mean", "zero"])
    fig = plot_head_ablation(table, tmp_path / "heads.png", mode="mean")
    assert (tmp_path / "heads.png").stat().st_size > 0
    assert len([a for a in fig.axes if a.get_label() != "<colorbar>"]) >= cfg.data.n_bases
    with pytest.raises(ValueError, match="missing column"):
        plot_head_ablation(table.drop(columns="delta"))


# ---------------------------------------------------------------- the z site on language models
def _zero_head(head):
    def hook(act, hook):
        out = act.clone()
        out[:, :, head] = 0
        return out

    return hook


def test_z_site_llama_torch(word_tokenizer):
    model = build_tiny("llama")
    adapter = TorchHooksAdapter(model, word_tokenizer)
    assert adapter.arch.o_proj == "self_attn.o_proj" and adapter.n_heads == 4
    prompts = random_prompts(3, seed=1)
    seen = {}

    def record(act, hook):
        seen["shape"] = tuple(act.shape)

    base = adapter.forward(prompts, logits="all")
    same = adapter.forward(prompts, hooks=[("blocks.1.attn.hook_z", record)], logits="all")
    inputs = adapter.tokenize(prompts)
    assert seen["shape"] == (3, inputs.length, 4, 8) and torch.equal(base, same)
    got = adapter.forward(prompts, hooks=[("blocks.1.attn.hook_z", _zero_head(2))], logits="all")
    proj = model.model.layers[1].self_attn.o_proj

    def plain(mod, args):
        x = args[0].clone()
        x[..., 2 * 8:3 * 8] = 0
        return (x,)

    handle = proj.register_forward_pre_hook(plain)
    try:
        want = adapter.forward(prompts, logits="all")
    finally:
        handle.remove()
    assert torch.equal(got, want) and not torch.equal(got, base)


def test_z_site_unknown_o_proj_refused(word_tokenizer):
    adapter = TorchHooksAdapter(build_tiny("mamba2"), word_tokenizer)
    assert adapter.n_heads is None and adapter.head_components == ()
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.hook_z.*Mamba2ForCausalLM.*'torch'"):
        adapter.forward(random_prompts(2), hooks=[("blocks.0.attn.hook_z", lambda a, h: None)])


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
def test_z_site_other_backends(backend, word_tokenizer):
    prompts = random_prompts(3, seed=2)
    ref = make_tiny_adapter("gpt2", "torch", word_tokenizer)
    other = make_tiny_adapter("gpt2", backend, word_tokenizer)
    assert other.n_heads == 4
    hooks = [("blocks.1.attn.hook_z", _zero_head(1))]
    want = ref.forward(prompts, hooks=hooks, logits="last")
    got = other.forward(prompts, hooks=hooks, logits="last")
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(ref.forward(prompts, logits="last"), want, atol=1e-4)
    z_ref = ref.capture_sites(prompts, "blocks.0.attn.hook_z", progress=False)["blocks.0.attn.hook_z"]
    z = other.capture_sites(prompts, "blocks.0.attn.hook_z", progress=False)["blocks.0.attn.hook_z"]
    assert z.shape == (3, 4, 8) and torch.allclose(z, z_ref, atol=1e-5)
