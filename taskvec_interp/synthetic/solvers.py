"""The in-context regression solvers the oracles are built from (shared by MSLR and the family mixture).

Position ``i`` of a sequence sees the examples ``j < i``: prefix sums of the (projected) Gram matrix and
cross terms, then ridge or min-norm least squares, all batched over sequences and positions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_gram(xs: Tensor, ys: Tensor, u: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Projected inputs and prefix sums: G_i = sum_{j<i} z_j z_j^T, c_i = sum_{j<i} z_j y_j, s_i = sum y^2."""
    z = xs if u is None else torch.einsum("bkd,bdr->bkr", xs, u)  # [B, K, p]
    outer = torch.einsum("bkp,bkq->bkpq", z, z)
    gram = torch.cumsum(outer, dim=1) - outer  # exclusive prefix sum
    zy = z * ys.unsqueeze(-1)
    cross = torch.cumsum(zy, dim=1) - zy
    ysq = torch.cumsum(ys**2, dim=1) - ys**2
    return z, gram, cross, ysq


def ridge(z: Tensor, gram: Tensor, cross: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    p = z.shape[-1]
    a = gram + lam * torch.eye(p, dtype=z.dtype, device=z.device)
    w_hat = torch.linalg.solve(a, cross.unsqueeze(-1)).squeeze(-1)  # [B, K, p]
    return (z * w_hat).sum(-1), a


def ols(z: Tensor, prev: Tensor, ys: Tensor) -> Tensor:
    """Min-norm least squares on the previous examples, per position (pinv over a masked design)."""
    b, k, p = z.shape
    # design for position i: rows j < i of z, others zeroed -> [B, K, K, p]
    design = z.unsqueeze(1) * prev.view(1, k, k, 1)
    target = ys.unsqueeze(1) * prev.view(1, k, k)
    w_hat = torch.einsum("bipk,bik->bip", torch.linalg.pinv(design), target)
    return (z * w_hat).sum(-1)
