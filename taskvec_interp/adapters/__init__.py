"""Adapters: the one interface every experiment talks to, over three backends.

Only this package imports TransformerLens or nnsight (lazily, when that backend is used).
"""

from .arch import ARCHS, ArchSpec
from .base import Adapter, Generation, ModelInputs
from .load import BACKENDS, cache_dir, load_model, make_adapter, smollm2_dir
from .torch_hooks import TorchHooksAdapter
from .verify import AdapterMismatchError, verify_adapter


def __getattr__(name: str):
    if name == "TransformerLensAdapter":
        from .transformer_lens import TransformerLensAdapter

        return TransformerLensAdapter
    if name == "NNsightAdapter":
        from .nnsight import NNsightAdapter

        return NNsightAdapter
    raise AttributeError(name)


__all__ = [
    "ARCHS", "Adapter", "AdapterMismatchError", "ArchSpec", "BACKENDS", "Generation", "ModelInputs",
    "NNsightAdapter", "TorchHooksAdapter", "TransformerLensAdapter", "cache_dir", "load_model", "make_adapter",
    "smollm2_dir", "verify_adapter",
]
