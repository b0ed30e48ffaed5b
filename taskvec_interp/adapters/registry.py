"""The backends, in one table: adding one is one :func:`register_backend` call (or one row of :data:`BACKENDS`).

Everything that needs to know the backends reads this table: :func:`~taskvec_interp.adapters.load.make_adapter`
and :func:`~taskvec_interp.adapters.load.load_model` (which adapter class, how to wrap a Hugging Face model,
which placements it supports), ``taskvec_interp.adapters.<Class>`` (the adapter classes, imported lazily),
provenance (:func:`backend_packages`: the versions saved with every result), the configs and the CLI
(:func:`backend_names`), and the architecture matrix harness. Nothing here imports a backend's library: a
row names its adapter class (and wrapper) as ``"module:attribute"`` strings, imported on first use.

An adapter class is called as ``cls(model, tokenizer, **adapter_kwargs)``, where ``model`` is the Hugging
Face model (or module), or what the row's ``wrap(model, tokenizer)`` turned it into.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

Loadable = Callable | str
"""A callable, or a ``"package.module:attribute"`` string naming one (imported when first used)."""


def _load(ref: Loadable) -> Callable:
    if not isinstance(ref, str):
        return ref
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{ref!r} is not of the form 'package.module:attribute'")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Backend:
    """One backend: its name, its adapter class and what it needs."""

    name: str
    adapter: Loadable
    """The :class:`~taskvec_interp.adapters.base.Adapter` subclass, or ``"module:Class"`` (imported lazily)."""
    packages: tuple[str, ...] = ()
    """The pip distributions it needs (their versions are saved with every result)."""
    help: str = ""
    """One line for ``--backend`` help and the docs."""
    wrap: Loadable | None = None
    """``wrap(model, tokenizer) -> object``: turns a Hugging Face model and its tokenizer into what the adapter
    class takes (TransformerLens: a ``TransformerBridge``); ``None``: the adapter takes the model as it is."""
    owns: Callable[[object], bool] | None = None
    """A model object only this backend takes (wrapped as it is, refused by every other backend)."""
    device_map: bool = True
    """Whether it runs models placed by accelerate (``load_model(device_map=...)``)."""
    remote: bool = False
    """Whether it runs on NDIF (``load_model(remote=...)``)."""
    arch_matrix: bool = True
    """Whether the architecture matrix (:mod:`taskvec_interp.testing.arch_matrix`) checks it on every causal-LM
    ``model_type`` of transformers (off for TransformerLens: its bridge covers the families it has adapters for)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"a backend name must be an identifier (letters, digits, '_'), got {self.name!r}")
        if not isinstance(self.packages, tuple) or not all(isinstance(p, str) and p for p in self.packages):
            raise ValueError(f"Backend.packages must be a tuple of distribution names, got {self.packages!r}")
        for field in ("adapter", "wrap"):
            ref = getattr(self, field)
            if isinstance(ref, str) and ref.count(":") != 1:
                raise ValueError(f"Backend.{field} must be a callable or 'package.module:attribute', got {ref!r}")

    def adapter_class(self) -> type:
        """The adapter class (its module imported now)."""
        return _load(self.adapter)

    def wrapper(self) -> Callable | None:
        """The ``wrap`` function (its module imported now), or ``None``."""
        return None if self.wrap is None else _load(self.wrap)


def _is_bridge(model: object) -> bool:
    """A TransformerLens ``TransformerBridge`` (by class, without importing TransformerLens)."""
    return any(c.__name__ == "TransformerBridge" and c.__module__.startswith("transformer_lens")
               for c in type(model).__mro__)


BACKENDS: dict[str, Backend] = {
    "torch": Backend(
        "torch", "taskvec_interp.adapters.torch_hooks:TorchHooksAdapter", ("torch",),
        "plain PyTorch forward hooks on the blocks (fastest; any module with a block list)"),
    "transformer_lens": Backend(
        "transformer_lens", "taskvec_interp.adapters.transformer_lens:TransformerLensAdapter", ("transformer-lens",),
        "a TransformerLens 4 TransformerBridge and its hook points",
        wrap="taskvec_interp.adapters.transformer_lens:wrap_hf", owns=_is_bridge, device_map=False, arch_matrix=False),
    "nnsight": Backend(
        "nnsight", "taskvec_interp.adapters.nnsight:NNsightAdapter", ("nnsight",),
        "an nnsight 0.8 trace (also runs remotely on NDIF)", remote=True),
}
"""The registered backends by name, in the order they are listed (read it through the functions below)."""


def register_backend(backend: Backend, replace: bool = False) -> Backend:
    """Add ``backend`` to the table (``replace=True`` overwrites a backend of the same name). Returns it."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend needs a Backend, got {type(backend).__name__}")
    if backend.name in BACKENDS and not replace:
        raise ValueError(f"backend {backend.name!r} is already registered (pass replace=True to overwrite it)")
    BACKENDS[backend.name] = backend
    return backend


def unregister_backend(name: str) -> Backend:
    """Remove the backend ``name`` from the table. Returns it."""
    return BACKENDS.pop(get_backend(name).name)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` naming it and the registered ones otherwise."""
    backend = BACKENDS.get(name) if isinstance(name, str) else None
    if backend is None:
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r} (unknown backend {name!r}; "
                         "register_backend() adds one)")
    return backend


def backend_names() -> tuple[str, ...]:
    """The registered backends' names, in table order."""
    return tuple(BACKENDS)


def backend_packages() -> tuple[str, ...]:
    """The pip distributions the registered backends need, each once, in table order."""
    return tuple(dict.fromkeys(p for b in BACKENDS.values() for p in b.packages))


def owner_of(model: object) -> Backend | None:
    """The backend that owns ``model`` (see :attr:`Backend.owns`), if any."""
    return next((b for b in BACKENDS.values() if b.owns is not None and b.owns(model)), None)


def with_capability(flag: str) -> tuple[str, ...]:
    """The names of the backends whose ``flag`` (``"device_map"``, ``"remote"``, ``"arch_matrix"``) is set."""
    return tuple(b.name for b in BACKENDS.values() if getattr(b, flag))
