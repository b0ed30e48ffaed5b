"""The in-context regression solvers (synthetic/solvers.py) against their definitions, position by position."""

from __future__ import annotations

import torch

from taskvec_interp.synthetic.solvers import causal_gram, ols, ridge


def _data(b=3, k=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(b, k, d, generator=g, dtype=torch.double)
    ys = torch.randn(b, k, generator=g, dtype=torch.double)
    return xs, ys


def test_causal_gram_sums_only_earlier_examples():
    xs, ys = _data()
    u = torch.randn(3, 4, 2, dtype=torch.double)
    z, gram, cross, ysq = causal_gram(xs, ys, u)
    for i in range(xs.shape[1]):
        zi = torch.einsum("bkd,bdr->bkr", xs[:, :i], u)
        torch.testing.assert_close(z[:, i], torch.einsum("bd,bdr->br", xs[:, i], u))
        torch.testing.assert_close(gram[:, i], torch.einsum("bkp,bkq->bpq", zi, zi))
        torch.testing.assert_close(cross[:, i], torch.einsum("bkp,bk->bp", zi, ys[:, :i]))
        torch.testing.assert_close(ysq[:, i], (ys[:, :i] ** 2).sum(-1))


def test_ridge_is_the_closed_form_per_position():
    xs, ys = _data()
    z, gram, cross, _ = causal_gram(xs, ys, None)
    pred, a = ridge(z, gram, cross, 0.5)
    for i in range(xs.shape[1]):
        x_prev, y_prev = xs[:, :i], ys[:, :i]
        w = torch.linalg.solve(x_prev.transpose(1, 2) @ x_prev + 0.5 * torch.eye(4, dtype=torch.double),
                               (x_prev.transpose(1, 2) @ y_prev.unsqueeze(-1))).squeeze(-1)
        torch.testing.assert_close(pred[:, i], (xs[:, i] * w).sum(-1))
    torch.testing.assert_close(a, gram + 0.5 * torch.eye(4, dtype=torch.double))


def test_ols_is_min_norm_least_squares_on_the_previous_examples():
    xs, ys = _data(k=7)
    k = xs.shape[1]
    prev = torch.tril(torch.ones(k, k, dtype=torch.double), diagonal=-1)
    pred = ols(xs, prev, ys)
    for i in range(k):
        w = torch.linalg.pinv(xs[:, :i]) @ ys[:, :i].unsqueeze(-1) if i else torch.zeros(3, 4, 1, dtype=torch.double)
        torch.testing.assert_close(pred[:, i], (xs[:, i] * w.squeeze(-1)).sum(-1))
