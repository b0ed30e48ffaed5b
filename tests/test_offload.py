"""Big-model paths on CPU: accelerate device_map with most of smollm2-135m's layers offloaded to disk gives
the numbers of the in-memory model; bf16; a dispatched in-memory module; NDIF remote runs passed through
(nnsight's local simulation of the remote path, and the remote backend reached) ; bad placements refused."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import build_tiny, random_prompts

from taskvec_interp import hooks as H
from taskvec_interp.adapters import NNsightAdapter, load_model
from taskvec_interp.experiments.sweep import SweepConfig, run_sweep
from taskvec_interp.hooks import Site
from taskvec_interp.probes.decodability import task_decodability

PROMPTS = ["The capital of France is", "hot -> cold\nbig -> small\nup ->", "1 2 3 4", "Once upon a time"]


def smol_device_map(n_layers: int, in_memory: int = 4) -> dict:
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    dm |= {f"model.layers.{i}": ("cpu" if i < in_memory else "disk") for i in range(n_layers)}
    return dm


@pytest.fixture(scope="module")
def offloaded(smollm2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload")
    adapter = load_model("smollm2-135m", device_map=smol_device_map(smollm2.n_layers), offload_folder=folder)
    return adapter


@pytest.mark.slow
def test_offloaded_model_gives_identical_numbers(smollm2, offloaded):
    model = offloaded.model
    assert getattr(model, "hf_device_map", None)
    assert sum(v == "disk" for v in model.hf_device_map.values()) == smollm2.n_layers - 4
    assert model.model.layers[10].self_attn.q_proj.weight.device.type == "meta"  # really not in memory
    assert offloaded.device == torch.device("cpu")
    assert offloaded.identity()["placement"] == ["cpu", "disk"]
    ref = smollm2.capture(PROMPTS, progress=False)
    got = offloaded.capture(PROMPTS, progress=False)
    assert torch.equal(ref, got)
    vec = ref[6].mean(0)
    hooks = [(Site(6), H.add(vec)), (Site(12, "attn_out"), H.ablate())]
    assert torch.equal(smollm2.forward(PROMPTS, hooks=hooks), offloaded.forward(PROMPTS, hooks=hooks))
    g_ref = smollm2.generate(PROMPTS, 6, hooks=hooks, capture_layers="all", progress=False)
    g_off = offloaded.generate(PROMPTS, 6, hooks=hooks, capture_layers="all", progress=False)
    assert g_ref.tokens == g_off.tokens and torch.equal(g_ref.activations, g_off.activations)
    branches = [[], [(Site(6), H.add(vec))], [(Site(9), H.replace(vec))]]
    b_ref = smollm2.generate_branches(PROMPTS, branches, 5, progress=False)
    b_off = offloaded.generate_branches(PROMPTS, branches, 5, progress=False)
    assert b_off[0].engine == "prefix"
    assert [g.tokens for g in b_ref] == [g.tokens for g in b_off]
    answers = [[1, 2], [3], [4, 5, 6], [7]]
    assert torch.equal(smollm2.score_branches(PROMPTS, answers, branches, progress=False),
                       offloaded.score_branches(PROMPTS, answers, branches, progress=False))


@pytest.mark.slow
def test_offloaded_sweep_equals_in_memory(smollm2, offloaded):
    cfg = SweepConfig(family="bitwise", shots=(2,), n_per_task=3, n_boot=0, k=1, layers=[3, 9, 15, 21, 27])
    a = run_sweep(smollm2, cfg, progress=False)
    b = run_sweep(offloaded, cfg, progress=False)
    assert a.td.equals(b.td)
    assert a.accuracy.equals(b.accuracy)


@pytest.mark.slow
def test_offloaded_model_on_nnsight(smollm2, offloaded):
    from taskvec_interp.adapters import make_adapter

    nn_adapter = make_adapter(offloaded.model, offloaded.tokenizer, backend="nnsight")
    assert torch.equal(nn_adapter.capture(PROMPTS, layers=[0, 10, 29], progress=False),
                       smollm2.capture(PROMPTS, layers=[0, 10, 29], progress=False))


@pytest.mark.slow
def test_bf16_model(smollm2):
    bf = load_model("smollm2-135m", dtype=torch.bfloat16)
    assert bf.identity()["dtype"] == "bfloat16" and smollm2.identity()["dtype"] == "float32"
    acts = bf.capture(PROMPTS, progress=False)
    ref = smollm2.capture(PROMPTS, progress=False)
    assert acts.dtype == torch.float32  # captured in the requested dtype
    rel = (acts - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert float(rel.median()) < 0.1  # bf16 rounding, not a different model
    vec = ref[6].mean(0)
    out = bf.forward(PROMPTS, hooks=[(Site(6), H.add(vec))])  # a float32 vector into bf16 activations
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert len(bf.generate(PROMPTS, 3, progress=False).tokens) == len(PROMPTS)


def test_dispatched_module_with_disk_offload(word_tokenizer, tmp_path):
    prompts = random_prompts(6, seed=2)
    ref = load_model(build_tiny("llama"), tokenizer=word_tokenizer)
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
          "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    off = load_model(build_tiny("llama"), tokenizer=word_tokenizer, device_map=dm, offload_folder=tmp_path / "w")
    assert off.model.model.layers[2].mlp.up_proj.weight.device.type == "meta"
    assert any((tmp_path / "w").iterdir())
    assert torch.equal(ref.capture(prompts, progress=False), off.capture(prompts, progress=False))
    acts = off.capture(prompts, progress=False)
    labels = [0, 1, 0, 1, 0, 1]
    torch.testing.assert_close(task_decodability(acts, labels, k=1, n_boot=0).td,
                               task_decodability(ref.capture(prompts, progress=False), labels, k=1, n_boot=0).td)


def test_nnsight_remote_local_simulation_equals_local(word_tokenizer):
    """nnsight's ``remote="local"`` serializes each trace as NDIF would and runs it with our package hidden:
    the hook functions and captures must survive that (remote-safe trace bodies)."""
    prompts = random_prompts(5, seed=4)
    model = build_tiny("llama")
    local = NNsightAdapter(model, word_tokenizer)
    remote = NNsightAdapter(model, word_tokenizer, remote="local")
    assert remote.identity()["remote"] == "local"
    torch.testing.assert_close(remote.capture(prompts, progress=False), local.capture(prompts, progress=False))
    vec = torch.randn(local.d_model, generator=torch.Generator().manual_seed(0))
    hooks = [(Site(1), H.add(vec)), (Site(2, "mlp_out"), H.ablate())]
    torch.testing.assert_close(remote.forward(prompts, hooks=hooks), local.forward(prompts, hooks=hooks))
    g_r = remote.generate(prompts, 3, hooks=hooks, capture_layers="all", progress=False)
    g_l = local.generate(prompts, 3, hooks=hooks, capture_layers="all", progress=False)
    assert g_r.tokens == g_l.tokens
    torch.testing.assert_close(g_r.activations, g_l.activations)


def test_nnsight_remote_true_goes_to_ndif(word_tokenizer, monkeypatch):
    from nnsight.intervention.backends import remote as remote_backend

    calls = []

    def fake_call(self, tracer):
        calls.append(self)
        raise ConnectionError("no network in tests")

    from nnsight.modeling import huggingface

    monkeypatch.setattr(remote_backend.RemoteBackend, "__call__", fake_call)
    monkeypatch.setitem(huggingface._ID_CACHE, "openai-community/gpt2", "openai-community/gpt2")  # no hub lookup
    model = build_tiny("gpt2")
    model.name_or_path = model.config._name_or_path = "openai-community/gpt2"  # the id NDIF serves it under
    adapter = NNsightAdapter(model, word_tokenizer, remote=True)
    with pytest.raises(ConnectionError, match="no network"):
        adapter.capture(random_prompts(3), progress=False)
    assert len(calls) == 1 and "openai-community/gpt2" in calls[0].model_key
    # nothing left attached: the same model still runs locally
    local = NNsightAdapter(model, word_tokenizer)
    assert local.capture(random_prompts(3), progress=False).shape[0] == 3


def test_bad_placements_are_refused_before_loading(word_tokenizer, tmp_path, monkeypatch):
    model = build_tiny("gpt2")
    with pytest.raises(ValueError, match="remote=True runs through NDIF, which only the 'nnsight' backend"):
        load_model(model, tokenizer=word_tokenizer, backend="torch", remote=True)
    with pytest.raises(ValueError, match="remote must be False, True"):
        NNsightAdapter(model, word_tokenizer, remote="yes")
    with pytest.raises(ValueError, match="pass device= or device_map=, not both"):
        load_model(model, tokenizer=word_tokenizer, device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="pass offload_folder="):
        load_model(model, tokenizer=word_tokenizer, device_map={"transformer": "disk", "lm_head": "cpu"})
    with pytest.raises(ValueError, match="device_map 'everywhere' is none of"):
        load_model(model, tokenizer=word_tokenizer, device_map="everywhere")
    with pytest.raises(ValueError, match="only applies with device_map"):
        load_model(model, tokenizer=word_tokenizer, offload_folder=tmp_path)
    with pytest.raises(ValueError, match="not 'torch' and 'nnsight'|supported on the 'torch' and 'nnsight'"):
        load_model(model, tokenizer=word_tokenizer, backend="transformer_lens", device_map="auto")
    with pytest.raises(ValueError, match="revision='step1000' applies to hub ids"):
        load_model(str(tmp_path), revision="step1000")
    with pytest.raises(ValueError, match="hub id 'allenai/no-such-model' at revision 'step1000-tokens4B'"):
        load_model("allenai/no-such-model", revision="step1000-tokens4B")  # offline here: not found
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(tmp_path / "empty")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="device_map= needs accelerate"):
        load_model(model, tokenizer=word_tokenizer, device_map="auto")
