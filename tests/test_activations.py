"""Captured activations know their layers: ``capture(prompts, layers=[1, 2])[2]`` is layer 2, not position 2."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny, random_prompts

from taskvec_interp.activations import Activations
from taskvec_interp.adapters import TorchHooksAdapter
from taskvec_interp.probes.decodability import task_decodability

PROMPTS = random_prompts(6, seed=7)


@pytest.fixture
def adapter(word_tokenizer):
    return TorchHooksAdapter(build_tiny("llama"), word_tokenizer)


def test_capture_is_indexed_by_layer_number(adapter):
    every = adapter.capture(PROMPTS, progress=False)
    some = adapter.capture(PROMPTS, layers=[2, 0], progress=False)
    assert isinstance(some, Activations) and isinstance(some, torch.Tensor)
    assert some.layers == [2, 0] and some.shape == (2, len(PROMPTS), adapter.d_model)
    assert torch.equal(some[2], every[2]) and torch.equal(some[0], every[0])  # by layer, not by position
    assert torch.equal(some[2, 3], every[2, 3])
    assert torch.equal(some.tensor[0], every[2])  # the plain tensor is indexed by position
    assert torch.equal(some[-1], every[0])  # negative: from the last captured
    with pytest.raises(ValueError, match=r"layer 1 was not captured \(captured layers: \[2, 0\]\)"):
        some[1]
    with pytest.raises(ValueError, match=r"layer 5 was not captured \(captured layers: \[2, 0\]\)"):
        some[5, 0]  # a tuple index starting with a layer
    with pytest.raises(ValueError, match=r"layer -3 is out of range: 2 layers were captured \(captured layers: \[2, 0\]\)"):
        some[-3]
    with pytest.raises(ValueError, match=r"layer 1 was not captured"):
        some[1] = 0.0  # assignment too
    vec = some[2].mean(0)  # the README's natural code
    assert type(vec) is torch.Tensor and vec.shape == (adapter.d_model,)
    assert type(some - every[[2, 0]]) is torch.Tensor  # results of operations are plain tensors
    assert [layer for layer, _ in some.items()] == [2, 0]
    assert copy.deepcopy(some).layers == [2, 0]
    some[0] = 0.0  # assignment by layer number too
    assert torch.equal(some.tensor[1], torch.zeros_like(some.tensor[1])) and torch.equal(some[2], every[2])


def test_td_reads_the_layer_numbers(adapter):
    some = adapter.capture(PROMPTS, layers=[2, 0], progress=False)
    td = task_decodability(some, [0, 1] * 3, k=1, n_boot=0)
    assert td.layers.tolist() == [2, 0]
    plain = task_decodability(some.tensor, [0, 1] * 3, k=1, n_boot=0)
    assert plain.layers.tolist() == [0, 1] and torch.equal(plain.td, td.td)


def test_generation_activations_know_their_layers(adapter):
    gen = adapter.generate(PROMPTS, 2, capture_layers=[1, 2], progress=False)
    assert isinstance(gen.activations, Activations) and gen.activations.layers == [1, 2]
    assert torch.equal(gen.activations[2], adapter.capture(PROMPTS, layers=[2], progress=False)[2])


def test_bad_activations():
    with pytest.raises(ValueError, match=r"activations of shape \[3, 4\] for 2 layers"):
        Activations(torch.zeros(3, 4), [0, 1])
    with pytest.raises(ValueError, match=r"layers listed twice: \[1, 1\]"):
        Activations(torch.zeros(2, 4), [1, 1])
