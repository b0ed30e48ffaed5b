"""How the synthetic model is run and named by the analyses: the torch-hooks adapter over its blocks,
its tensor inputs, and the bases' display names (shared by ``analysis.py`` and ``heads.py``)."""

from __future__ import annotations

import torch

from ..adapters.base import ModelInputs
from ..adapters.torch_hooks import TorchHooksAdapter
from .data import MSLRBatch
from .model import SyntheticRegressor


def synthetic_adapter(model: SyntheticRegressor) -> TorchHooksAdapter:
    """The torch-hooks adapter over a synthetic model's blocks (no tokenizer: inputs are tensors)."""
    return TorchHooksAdapter(model, blocks=model.blocks_path, d_model=model.cfg.d_model)


def model_inputs(batch: MSLRBatch) -> ModelInputs:
    """Tensor inputs for the adapter: ``xs``/``ys``, no padding, ``2K`` tokens."""
    n, k = batch.ys.shape
    return ModelInputs({"xs": batch.xs, "ys": batch.ys}, torch.zeros(n, dtype=torch.long), 2 * k)


def basis_names(n_bases: int) -> list[str]:
    return [f"B{j + 1}" for j in range(n_bases)]
