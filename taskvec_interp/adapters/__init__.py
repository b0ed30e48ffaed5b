"""Adapters: the one interface every experiment talks to, over the registered backends.

Only this package imports TransformerLens or nnsight (lazily, when that backend is used). The backends
are rows of :data:`~taskvec_interp.adapters.registry.BACKENDS`; each one's adapter class is an attribute
of this package (``taskvec_interp.adapters.NNsightAdapter``), imported on first access.
"""

from .arch import ARCHS, ArchSpec
from .base import Adapter, Generation, ModelInputs
from .load import cache_dir, load_model, make_adapter, smollm2_dir
from .registry import (
    Backend,
    backend_names,
    backend_packages,
    get_backend,
    register_backend,
    unregister_backend,
)
from .torch_hooks import TorchHooksAdapter
from .verify import AdapterMismatchError, verify_adapter


def _adapter_classes() -> dict[str, object]:
    """Class name -> backend, for every registered backend whose adapter is named by a string."""
    from .registry import BACKENDS

    return {b.adapter.rpartition(":")[2].rpartition(".")[2]: b for b in BACKENDS.values() if isinstance(b.adapter, str)}


def __getattr__(name: str):
    backend = _adapter_classes().get(name)
    if backend is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return backend.adapter_class()


def __dir__() -> list[str]:
    return sorted({*globals(), *_adapter_classes()})


__all__ = [
    "ARCHS", "Adapter", "AdapterMismatchError", "ArchSpec", "Backend", "Generation", "ModelInputs",
    "NNsightAdapter", "TorchHooksAdapter", "TransformerLensAdapter", "backend_names", "backend_packages",
    "cache_dir", "get_backend", "load_model", "make_adapter", "register_backend", "smollm2_dir",
    "unregister_backend", "verify_adapter",
]
