"""The nnsight backend's own behaviour (taskvec_interp.adapters.nnsight); what every backend shares is tested
across backends in test_adapters.py and test_compose.py."""

from __future__ import annotations

import nnsight
import pytest
import torch
from conftest import build_tiny, random_prompts

from taskvec_interp import hooks as H
from taskvec_interp.adapters import TorchHooksAdapter
from taskvec_interp.adapters.nnsight import NNsightAdapter

PROMPTS = random_prompts(4, seed=5)


def _hooked_capture(adapter):
    vec = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0))
    return adapter.capture(PROMPTS, hooks=[("blocks.1.hook_resid_post", H.add(vec, position=-1))], progress=False)


def test_a_wrapped_module_gives_the_torch_numbers(word_tokenizer):
    adapter = NNsightAdapter(build_tiny("llama"), word_tokenizer)
    assert adapter.backend == "nnsight" and isinstance(adapter.nn, nnsight.TransformersModel)
    expected = _hooked_capture(TorchHooksAdapter(build_tiny("llama"), word_tokenizer))
    torch.testing.assert_close(_hooked_capture(adapter), expected, atol=1e-5, rtol=0)


def test_an_nnsight_model_is_taken_as_it_is(word_tokenizer):
    adapter = NNsightAdapter(nnsight.TransformersModel(build_tiny("llama"), tokenizer=word_tokenizer))
    assert adapter.tokenizer is not None  # taken from the nnsight model
    expected = _hooked_capture(TorchHooksAdapter(build_tiny("llama"), word_tokenizer))
    torch.testing.assert_close(_hooked_capture(adapter), expected, atol=1e-5, rtol=0)


def test_generation_inside_a_trace_matches_torch(word_tokenizer):
    ref = TorchHooksAdapter(build_tiny("gpt2"), word_tokenizer).generate(PROMPTS, max_new_tokens=3, progress=False)
    got = NNsightAdapter(build_tiny("gpt2"), word_tokenizer).generate(PROMPTS, max_new_tokens=3, progress=False)
    assert got.texts == ref.texts


def test_bad_arguments_are_refused(word_tokenizer):
    with pytest.raises(ValueError, match="remote must be"):
        NNsightAdapter(build_tiny("gpt2"), word_tokenizer, remote="somewhere")
    with pytest.raises(TypeError, match="nn.Module or nnsight model"):
        NNsightAdapter("gpt2", word_tokenizer)
