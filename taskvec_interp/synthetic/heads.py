"""Attention-head ablation for the synthetic regression model (paper Figs. 17-18).

For every (layer, head) of a GPT-2 synthetic model, that head's per-head attention output ``z`` (the
input of the attention's output projection, ``blocks.{l}.attn.hook_z``, ``[batch, seq, n_heads, d_head]``)
is replaced at the ablated positions (default: every position) by

* ``mode="mean"``: the head's mean ``z`` over the test set, at each position (mean ablation), or
* ``mode="zero"``: zero (zero ablation),

and the per-basis test MSE of the predictions (read out at the x tokens) is compared with the unablated
model's: ``mse`` over every prediction, ``mse_last`` over the last one (``x_K``). The result is a tidy
table, one row per (layer, head, mode, basis), with ``delta = mse - mse_base`` and ``delta_last``.

Work: one unablated pass captures every layer's ``z`` at every position (for the means) and gives the
baseline; then, per layer, the heads' ablations run batched: the test batch is repeated once per head
and row ``h * n + i`` is example ``i`` with head ``h`` ablated (``max_rows`` bounds a forward's rows).

:func:`basis_specific_heads` names the heads whose ablation hurts one basis much more than the others.
Mamba-2 backbones have no attention heads and are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .. import hooks as H
from ..adapters.base import ModelInputs
from .data import MSLRBatch
from .inputs import basis_names, model_inputs, synthetic_adapter
from .model import SyntheticRegressor

__all__ = ["ABLATION_MODES", "head_ablation", "basis_specific_heads"]

ABLATION_MODES: tuple[str, ...] = ("mean", "zero")


def _check_model(model: SyntheticRegressor) -> None:
    if not isinstance(model, SyntheticRegressor):
        raise TypeError(f"head_ablation needs a SyntheticRegressor, got {type(model).__name__}")
    if model.cfg.backbone != "gpt2":
        raise ValueError(f"head ablation needs attention heads: the {model.cfg.backbone!r} backbone has none "
                         "(only the GPT-2 backbone has them)")


def _position_mask(position: int | Sequence[int] | None, seq: int) -> Tensor:
    """``[seq]`` bool: the token positions to ablate (``None``: all; ints: prompt positions, negative from the end)."""
    if position is None:
        return torch.ones(seq, dtype=torch.bool)
    H.check_position(position)
    pos = [position] if isinstance(position, int) else list(position)
    if not pos:
        raise ValueError("position: an empty list of positions ablates nothing")
    mask = torch.zeros(seq, dtype=torch.bool)
    for p in pos:
        p = int(p)
        if not -seq <= p < seq:
            raise ValueError(f"position {p} out of range for sequences of {seq} tokens")
        mask[p] = True
    return mask


def _ablation_hook(heads: Sequence[int], value: Tensor | None, where: Tensor, n: int):
    """z hook over a batch of ``len(heads) * n`` rows: rows ``c * n .. (c + 1) * n`` get head ``heads[c]``
    replaced by ``value`` (``[seq, n_heads, d_head]`` means; ``None``: zero) at the ``where`` positions."""
    def hook(act: Tensor, ctx: H.HookContext) -> Tensor:
        c, seq, n_heads = len(heads), act.shape[1], act.shape[2]
        if act.shape[0] != c * n:
            raise ValueError(f"head ablation at {ctx.name}: expected {c} x {n} rows, got {act.shape[0]}")
        sel = torch.zeros(c, 1, seq, n_heads, 1, dtype=torch.bool, device=act.device)
        sel[torch.arange(c), 0, :, torch.as_tensor(list(heads)), 0] = where.to(act.device)
        view = act.view(c, n, *act.shape[1:])
        fill = torch.zeros((), dtype=act.dtype, device=act.device) if value is None \
            else value.to(device=act.device, dtype=act.dtype)
        return torch.where(sel, fill, view).reshape(act.shape)

    return hook


def _repeat(inputs: ModelInputs, c: int) -> ModelInputs:
    """The batch repeated ``c`` times along the rows (block ``k`` = copy ``k``)."""
    return ModelInputs({k: v.repeat(c, *([1] * (v.ndim - 1))) for k, v in inputs.kwargs.items()},
                       inputs.pad.repeat(c), inputs.length)


def _basis_mse(err: Tensor, basis: Tensor, n_bases: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-basis MSE over all predictions and over the last one, from squared errors ``[n, K]``."""
    onehot = torch.nn.functional.one_hot(basis.long(), n_bases).to(err.dtype)  # [n, n_bases]
    count = onehot.sum(0).clamp(min=1)
    return ((onehot.T @ err.mean(1)) / count).numpy(), ((onehot.T @ err[:, -1]) / count).numpy()


@torch.no_grad()
def head_ablation(
    model: SyntheticRegressor, test: MSLRBatch, n_bases: int, mode: str | Sequence[str] = "mean",
    position: int | Sequence[int] | None = None, layers: str | int | Sequence[int] = "all",
    batch_heads: bool = True, max_rows: int = 8192,
) -> pd.DataFrame:
    """Per-basis test MSE with each attention head ablated, minus the unablated MSE.

    ``mode``: ``"mean"`` (the head's mean z over ``test`` at each position), ``"zero"``, or both
    (``["mean", "zero"]``). ``position``: the token positions ablated (``None``: every position; an int
    or a list of ints, negative from the end, e.g. ``-2`` for the query ``x_K`` only). ``batch_heads``:
    several heads' ablations in one forward (the test batch repeated per head, at most ``max_rows``
    rows a forward); ``False`` runs one forward per head (same numbers, slower).

    Returns one row per (layer, head, mode, basis): ``layer``, ``head``, ``mode``, ``basis`` (``B1`` ...),
    ``mse`` / ``mse_base`` / ``delta`` (every prediction) and ``mse_last`` / ``mse_last_base`` /
    ``delta_last`` (the last prediction, at ``x_K``), sorted by layer, head, mode, basis.
    """
    _check_model(model)
    modes = [mode] if isinstance(mode, str) else list(mode)
    bad = [m for m in modes if m not in ABLATION_MODES]
    if bad or not modes:
        raise ValueError(f"ablation mode(s) {bad or modes!r}: expected one or more of {ABLATION_MODES}")
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
    if int(test.basis.max()) >= n_bases or int(test.basis.min()) < 0:
        raise ValueError(f"test set has basis labels outside [0, {n_bases - 1}]")
    was_training = model.training
    model.eval()
    try:
        adapter = synthetic_adapter(model)
        n_heads = adapter.n_heads
        layer_list = H.resolve_layers(layers, adapter.n_layers)
        inputs = model_inputs(test)
        n, seq = len(test), inputs.length
        where = _position_mask(position, seq)
        ys = test.ys.float()

        # one unablated pass: the baseline predictions and every layer's z at every position
        store: dict = {}
        caps = [(H.Site(layer, "z"), H.capture(store, layer, None)) for layer in layer_list] if "mean" in modes else []
        base = adapter.forward(inputs, hooks=caps, logits="all").float()
        base_mse, base_last = _basis_mse((base - ys) ** 2, test.basis, n_bases)
        means = {layer: store[layer].mean(0) for layer in store}  # [seq, n_heads, d_head]
        store.clear()

        per_pass = max(1, max_rows // n) if batch_heads else 1
        names = basis_names(n_bases)
        rows = []
        for m in modes:
            for layer in layer_list:
                value = means[layer] if m == "mean" else None
                for start in range(0, n_heads, per_pass):
                    heads = list(range(start, min(n_heads, start + per_pass)))
                    hook = _ablation_hook(heads, value, where, n)
                    preds = adapter.forward(_repeat(inputs, len(heads)), hooks=[(H.Site(layer, "z"), hook)],
                                            logits="all").float()
                    for c, head in enumerate(heads):
                        mse, last = _basis_mse((preds[c * n:(c + 1) * n] - ys) ** 2, test.basis, n_bases)
                        for b, name in enumerate(names):
                            rows.append((layer, head, m, name, float(mse[b]), float(base_mse[b]),
                                         float(last[b]), float(base_last[b])))
    finally:
        model.train(was_training)
    table = pd.DataFrame(rows, columns=["layer", "head", "mode", "basis", "mse", "mse_base", "mse_last",
                                        "mse_last_base"])
    table["delta"] = table["mse"] - table["mse_base"]
    table["delta_last"] = table["mse_last"] - table["mse_last_base"]
    cols = ["layer", "head", "mode", "basis", "mse", "mse_base", "delta", "mse_last", "mse_last_base", "delta_last"]
    return table[cols].sort_values(["layer", "head", "mode", "basis"], kind="stable").reset_index(drop=True)


def basis_specific_heads(table: pd.DataFrame, threshold: float = 0.05, ratio: float = 3.0, column: str = "delta",
                         mode: str | None = None) -> list[dict]:
    """Heads whose ablation hurts one basis much more than the others.

    A (layer, head, mode) is specific to basis ``b`` when ablating it raises ``b``'s MSE by at least
    ``threshold`` (``column``: ``"delta"`` over every prediction or ``"delta_last"``) AND by at least
    ``ratio`` times the median increase of the other bases (that median floored at 0: a head whose
    ablation helps or leaves the others unchanged needs only the threshold). With one basis nothing is
    specific. Returns JSON-ready dicts sorted by decreasing delta: ``layer``, ``head``, ``mode``,
    ``basis``, ``delta``, ``others_median``, ``ratio`` (``delta / others_median``, ``None`` where that
    median is not positive), ``threshold``, ``min_ratio``, ``column``.
    """
    need = ["layer", "head", "mode", "basis", column]
    missing = [c for c in need if c not in getattr(table, "columns", [])]
    if missing:
        raise ValueError(f"head-ablation table is missing column(s) {missing}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if not (isinstance(ratio, (int, float)) and ratio >= 1):
        raise ValueError(f"ratio must be a number >= 1, got {ratio!r}")
    part = table if mode is None else table[table["mode"] == mode]
    out = []
    for (layer, head, m), group in part.groupby(["layer", "head", "mode"], sort=True):
        deltas = group[column].to_numpy(dtype=float)
        bases = group["basis"].tolist()
        if len(deltas) < 2:
            continue
        for b, d in enumerate(deltas):
            others = float(np.median(np.delete(deltas, b)))
            if d >= threshold and d >= ratio * max(others, 0.0):
                out.append({"layer": int(layer), "head": int(head), "mode": str(m), "basis": str(bases[b]),
                            "delta": float(d), "others_median": others,
                            "ratio": float(d / others) if others > 0 else None,
                            "threshold": float(threshold), "min_ratio": float(ratio), "column": column})
    return sorted(out, key=lambda r: -r["delta"])
