"""A model's fingerprint: what its weights ARE, never where they were loaded from.

Resume and provenance compare fingerprints, not path strings: the same weights copied under another path
give the same fingerprint, other weights written over the same path a different one. Three kinds, named in
the identity (``fingerprint_kind``):

* ``"parameters"``: a sha256 over every parameter and persistent buffer of the model in memory (name, shape,
  dtype, bytes), streamed through CPU copies of at most :data:`CHUNK_BYTES` at a time (a model on a GPU is
  never duplicated whole in memory). The same for a model passed as a module and one loaded from a
  directory. For a model loaded from a local directory of weight files (``model*.safetensors``,
  ``pytorch_model*.bin``, ``adapter_model.*``) it is cached in one small JSON file (``fingerprints.json`` in
  the package cache directory), keyed by each weight file's absolute path, size and modification time and
  by the dtypes loaded: a reload costs a ``stat`` per file; rewritten files (another size or mtime) are
  hashed again.
* ``"files"``: a model whose weights are not in memory (disk-offloaded: on the meta device) but come from a
  weight directory: a sha256 over each weight file's name, size and sha256 (each file's sha256 cached the
  same way).
* ``"config"``: a model with no weights here at all (an NDIF remote model on the meta device): a sha256 of
  its config, hub id and revision. Two such models with the same config and id compare equal even if the
  hub's weights changed; the kind says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

CHUNK_BYTES = 64 << 20
"""At most this many bytes of one tensor are copied to the CPU at a time while hashing."""

WEIGHT_FILE = re.compile(r"^(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)$")
"""The files of a Hugging Face model directory that hold its weights."""

CACHE_NAME = "fingerprints.json"

__all__ = ["CHUNK_BYTES", "WEIGHT_FILE", "config_fingerprint", "files_fingerprint", "model_fingerprint",
           "parameters_fingerprint", "weight_files"]


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of a model directory (top level, by name); ``[]`` when it holds none."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_file() and WEIGHT_FILE.match(p.name))


def _read_cache(cache: Path | None) -> dict:
    if cache is None:
        return {}
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or a torn one: hashed again
    return data if isinstance(data, dict) else {}


def _write_cache(cache: Path | None, data: dict) -> None:
    if cache is None:
        return
    with contextlib.suppress(OSError):  # a read-only cache directory costs a rehash next time, nothing else
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        os.replace(tmp, cache)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stat_key(files: list[Path]) -> list[list]:
    """What identifies the weight files on disk without reading them: absolute path, size, mtime."""
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def files_fingerprint(directory: str | os.PathLike, cache: str | os.PathLike | None = None) -> str | None:
    """The ``"files"`` fingerprint of a model directory (``None`` when it holds no weight file): a sha256 over
    each weight file's name, size and sha256. ``cache``: the JSON file caching each file's sha256 by
    (absolute path, size, mtime)."""
    files = weight_files(directory)
    if not files:
        return None
    cache = Path(cache) if cache is not None else None
    data = _read_cache(cache)
    known = data.get("files") if isinstance(data.get("files"), dict) else {}
    h = hashlib.sha256(b"taskvec_interp.files/1\n")
    changed = False
    for f, (path, size, mtime) in zip(files, _stat_key(files), strict=True):
        entry = known.get(path)
        if not (isinstance(entry, dict) and entry.get("bytes") == size and entry.get("mtime_ns") == mtime
                and isinstance(entry.get("sha256"), str)):
            entry = {"bytes": size, "mtime_ns": mtime, "sha256": _sha256(f)}
            known[path] = entry
            changed = True
        h.update(f"{f.name}\t{size}\t{entry['sha256']}\n".encode())
    if changed:
        _write_cache(cache, {**data, "files": known})
    return h.hexdigest()


def _chunks(t: torch.Tensor) -> Iterator[object]:
    """The bytes of ``t`` in row order, through CPU copies of at most :data:`CHUNK_BYTES`."""
    t = t.detach()
    if t.ndim == 0:
        t = t.reshape(1)
    row = max(1, t[0].numel() * t.element_size()) if t.shape[0] else 1
    step = max(1, CHUNK_BYTES // row)
    for i in range(0, t.shape[0], step):
        part = t[i:i + step].to("cpu").contiguous()
        yield part.reshape(-1).view(torch.uint8).numpy()  # a buffer: hashed without another copy


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}


def parameters_fingerprint(module: torch.nn.Module) -> str | None:
    """The ``"parameters"`` fingerprint of a module: a sha256 over its state (every parameter and persistent
    buffer: name, shape, dtype, bytes). ``None`` when a tensor is on the meta device (no weights here)."""
    state = _tensors(module)
    if any(t.device.type == "meta" for t in state.values()):
        return None
    h = hashlib.sha256(b"taskvec_interp.parameters/1\n")
    with torch.no_grad():
        for name in sorted(state):
            t = state[name]
            h.update(f"{name}\t{list(t.shape)}\t{t.dtype}\n".encode())
            for block in _chunks(t):
                h.update(block)
    return h.hexdigest()


def config_fingerprint(config: object, name: str | None, revision: str | None) -> str:
    """The ``"config"`` fingerprint: a sha256 of the model's config, its hub id and revision."""
    to_dict = getattr(config, "to_dict", None)
    cfg = to_dict() if callable(to_dict) else (config if isinstance(config, dict) else {})
    cfg = {k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version")}
    text = json.dumps({"config": cfg, "name": name, "revision": revision}, sort_keys=True, default=str)
    return hashlib.sha256(b"taskvec_interp.config/1\n" + text.encode()).hexdigest()


def model_fingerprint(module: object, *, weights_dir: str | os.PathLike | None = None,
                      cache: str | os.PathLike | None = None, name: str | None = None,
                      revision: str | None = None) -> dict:
    """``{"fingerprint": sha256, "fingerprint_kind": "parameters" | "files" | "config"}`` of a loaded model (see
    the module doc): its tensors (cached by ``weights_dir``'s weight files when it was loaded from one), else
    (weights not in memory) the weight files, else its config with ``name`` and ``revision``."""
    files = weight_files(weights_dir) if weights_dir is not None else []
    cache = Path(cache) if cache is not None else None
    if isinstance(module, torch.nn.Module):
        state = _tensors(module)
        if not any(t.device.type == "meta" for t in state.values()):
            key = None
            if files:  # loaded from these files: the same files at the same dtypes give the same tensors
                dtypes = sorted({str(t.dtype) for t in state.values()})
                key = hashlib.sha256(json.dumps([_stat_key(files), dtypes, type(module).__name__]).encode()).hexdigest()
                data = _read_cache(cache)
                hit = (data.get("parameters") or {}).get(key) if isinstance(data.get("parameters"), dict) else None
                if isinstance(hit, str):
                    return {"fingerprint": hit, "fingerprint_kind": "parameters"}
            fp = parameters_fingerprint(module)
            if fp is not None:
                if key is not None:
                    data = _read_cache(cache)
                    params = data.get("parameters") if isinstance(data.get("parameters"), dict) else {}
                    _write_cache(cache, {**data, "parameters": {**params, key: fp}})
                return {"fingerprint": fp, "fingerprint_kind": "parameters"}
    if files:
        fp = files_fingerprint(weights_dir, cache)
        if fp is not None:
            return {"fingerprint": fp, "fingerprint_kind": "files"}
    return {"fingerprint": config_fingerprint(getattr(module, "config", None), name, revision),
            "fingerprint_kind": "config"}
