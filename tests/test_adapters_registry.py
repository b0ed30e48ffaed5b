"""The backend registry: one table that loading, the adapter classes, provenance and the configs all read."""

from __future__ import annotations

import importlib.metadata as md

import pytest
import torch
from conftest import build_tiny, random_prompts

import taskvec_interp.adapters as A
from taskvec_interp.adapters import load_model, make_adapter
from taskvec_interp.adapters.registry import (
    BACKENDS,
    Backend,
    backend_names,
    backend_packages,
    get_backend,
    register_backend,
    unregister_backend,
)
from taskvec_interp.adapters.torch_hooks import TorchHooksAdapter
from taskvec_interp.results import provenance


class ToyAdapter(TorchHooksAdapter):
    """A new backend: the torch adapter under another name, over a model its wrap function marks."""

    backend = "toy"


def toy_wrap(model: torch.nn.Module, tokenizer: object) -> torch.nn.Module:
    model.wrapped_by_toy = True
    return model


@pytest.fixture
def toy():
    backend = register_backend(Backend("toy", ToyAdapter, ("einops",), "a toy backend for the test", wrap=toy_wrap))
    try:
        yield backend
    finally:
        unregister_backend("toy")
    assert "toy" not in backend_names()


def test_a_registered_backend_is_used_everywhere(toy, word_tokenizer):
    assert backend_names() == ("torch", "transformer_lens", "nnsight", "toy")
    adapter = load_model(build_tiny("gpt2"), backend="toy", tokenizer=word_tokenizer)
    assert type(adapter) is ToyAdapter and adapter.backend == "toy" and adapter.model.wrapped_by_toy
    assert adapter.capture(random_prompts(3), progress=False).shape == (3, 3, 32)
    assert "einops" in backend_packages()
    versions = provenance(adapter.identity())["versions"]
    assert versions["einops"] == md.version("einops")
    assert {"torch", "transformers", "transformer-lens", "nnsight"} <= set(versions)


def test_the_configs_accept_a_registered_backend(toy):
    from taskvec_interp.experiments.sweep import SweepConfig

    assert SweepConfig(backend="toy").backend == "toy"
    unregister_backend("toy")
    try:
        with pytest.raises(ValueError, match=r"SweepConfig.backend must be one of .*got 'toy'"):
            SweepConfig(backend="toy")
    finally:
        register_backend(toy)


def test_an_unknown_backend_is_refused_naming_it(word_tokenizer):
    with pytest.raises(ValueError, match=r"backend must be one of \('torch', 'transformer_lens', 'nnsight'\), "
                                         r"got 'jax'"):
        load_model(build_tiny("gpt2"), backend="jax", tokenizer=word_tokenizer)
    with pytest.raises(ValueError, match=r"got 'toy'"):
        make_adapter(build_tiny("gpt2"), word_tokenizer, "toy")
    with pytest.raises(ValueError, match=r"got 'toy'"):
        unregister_backend("toy")


def test_registration_is_checked(toy):
    with pytest.raises(ValueError, match=r"backend 'toy' is already registered \(pass replace=True"):
        register_backend(Backend("toy", ToyAdapter))
    assert register_backend(Backend("toy", ToyAdapter, ("einops",)), replace=True) is BACKENDS["toy"]
    with pytest.raises(ValueError, match=r"must be an identifier"):
        Backend("my backend", ToyAdapter)
    with pytest.raises(ValueError, match=r"'package.module:attribute', got 'ToyAdapter'"):
        Backend("toy2", "ToyAdapter")
    with pytest.raises(TypeError, match=r"needs a Backend, got str"):
        register_backend("toy2")


def test_rows_name_their_classes_lazily(word_tokenizer):
    """A row names its adapter as 'module:Class': nothing is imported until the backend is used."""
    register_backend(Backend("lazy", "taskvec_interp_no_such_module:Adapter", ("no-such-dist",)))
    try:
        assert "lazy" in backend_names()
        with pytest.raises(ModuleNotFoundError, match="taskvec_interp_no_such_module"):
            make_adapter(build_tiny("gpt2"), word_tokenizer, "lazy")
        assert provenance({})["versions"]["no-such-dist"] is None
    finally:
        unregister_backend("lazy")


def test_the_package_exposes_the_tables_adapter_classes():
    for name in backend_names():
        cls = getattr(A, get_backend(name).adapter.rpartition(":")[2])
        assert cls.backend == name
    assert {"NNsightAdapter", "TransformerLensAdapter", "TorchHooksAdapter"} <= set(dir(A))
    with pytest.raises(AttributeError, match="no attribute 'NoSuchAdapter'"):
        A.NoSuchAdapter  # noqa: B018


def test_placement_capabilities_come_from_the_table(word_tokenizer):
    model = build_tiny("gpt2")
    with pytest.raises(ValueError, match=r"device_map= is supported on the 'torch' and 'nnsight' backends, not "
                                         r"'transformer_lens'"):
        load_model(model, backend="transformer_lens", tokenizer=word_tokenizer, device_map="auto")
    with pytest.raises(ValueError, match=r"remote=True runs through NDIF, which only the 'nnsight' backend speaks "
                                         r"\(got backend 'transformer_lens'\)"):
        load_model(model, backend="transformer_lens", tokenizer=word_tokenizer, remote=True)
