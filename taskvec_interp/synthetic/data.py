"""Mixture of Sparse Linear Regression (MSLR), the synthetic task of Han et al. (ICML 2025).

A sequence draws a basis ``b`` uniformly from ``n_bases`` bases, a weight vector ``W = U_b w`` with
``w ~ N(0, I_rank)`` (``U_b`` is a ``[D, rank]`` coordinate selector: the basis "turns on" ``rank``
coordinates of ``W``), ``K`` inputs ``x_i ~ N(0, I_D)`` and targets ``y_i = W^T x_i + eps_i`` with
``eps_i ~ N(0, noise_var)``. Basis, ``W`` and ``x`` are redrawn for every sequence.

Paper defaults: ``D = 16``, ``rank = 4``, 4 disjoint bases partitioning the 16 coordinates,
``noise_var = 0.01``, ``K = 20``.

OPEN choices and the defaults taken here:

* Basis layout. ``"disjoint"``: basis ``b`` owns coordinates ``b*rank .. b*rank+rank-1`` (needs
  ``rank * n_bases <= D``; with equality they partition the coordinates, as in the paper).
  ``"overlapping"`` (the appendix's 8 overlapping bases in ``D = 16``): bases come in groups of
  ``D // rank``; each group is a partition of the ``D`` coordinates into blocks of ``rank``. Group 0 is the
  contiguous partition above, group 1 the strided one (basis ``m + j`` owns ``j, j + M, j + 2M, ...``
  with ``M = D // rank``), so with ``D = 16, rank = 4`` every group-1 basis shares exactly one
  coordinate with every group-0 basis. Further groups (not in the paper) use seeded random permutations.
* Prior variance of the active weights: 1 (``W ~ N(0, I)`` on the basis coordinates).
* Noise: ``noise_var`` is a variance (0.01, i.e. std 0.1).

Oracles (all vectorised, prediction at position ``i`` uses examples ``< i`` only):

* ``basis_ridge``: the rank-r oracle, i.e. the Bayes-optimal predictor that knows the basis (posterior
  mean of ``w`` given the previous examples, ridge with ``lambda = noise_var / prior_var``).
* ``basis_ols``: least squares restricted to the basis coordinates (minimum-norm when underdetermined).
* ``mixture_bayes``: the Bayes-optimal predictor that does NOT know the basis (posterior over bases times
  each basis' posterior mean). This is the best any model trained on the mixture can do.
* ``full_ridge`` / ``full_ols``: ridge (same prior variance on all ``D`` coordinates) / min-norm least
  squares on all ``D`` coordinates (no sparsity knowledge).
* ``zero``: predict 0 (error ``rank * prior_var + noise_var`` in expectation).

Errors are squared errors against the noisy ``y`` (so they include the irreducible ``noise_var``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..validate import check_int, check_number
from .solvers import causal_gram, ols, ridge

if TYPE_CHECKING:
    from .families import FamilyMixtureConfig

__all__ = [
    "MSLRConfig",
    "MSLRBatch",
    "basis_masks",
    "basis_matrices",
    "sample_batch",
    "make_test_set",
    "oracle_errors",
    "oracle_summary",
    "ORACLES",
]

BasisLayout = Literal["disjoint", "overlapping"]
ORACLES: tuple[str, ...] = ("basis_ridge", "basis_ols", "mixture_bayes", "full_ridge", "full_ols", "zero")


@dataclass(frozen=True)
class MSLRConfig:
    """Mixture of Sparse Linear Regression. Defaults are the paper's main setting."""

    n_dims: int = 16  # D
    rank: int = 4  # r, number of active coordinates per basis
    n_bases: int = 4
    layout: BasisLayout = "disjoint"
    noise_var: float = 0.01
    prior_var: float = 1.0  # variance of the active weights
    n_points: int = 20  # K, in-context examples per sequence
    basis_seed: int = 0  # only used by overlapping layouts with more than two groups

    def __post_init__(self) -> None:
        for name in ("n_dims", "rank", "n_bases", "n_points"):
            check_int(f"MSLRConfig.{name}", getattr(self, name), 1)
        check_int("MSLRConfig.basis_seed", self.basis_seed, 0)
        if self.rank > self.n_dims:
            raise ValueError(f"MSLRConfig.rank ({self.rank}) must be <= n_dims ({self.n_dims})")
        if self.layout == "disjoint":
            if self.rank * self.n_bases > self.n_dims:
                raise ValueError(
                    f"disjoint bases need rank * n_bases <= n_dims, got rank={self.rank} * "
                    f"n_bases={self.n_bases} = {self.rank * self.n_bases} > n_dims={self.n_dims}"
                )
        elif self.layout == "overlapping":
            if self.n_dims % self.rank != 0:
                raise ValueError(
                    f"overlapping bases need n_dims divisible by rank, got n_dims={self.n_dims}, rank={self.rank}"
                )
            per_group = self.n_dims // self.rank
            if self.n_bases % per_group != 0:
                raise ValueError(
                    f"overlapping bases come in groups of n_dims // rank = {per_group}; "
                    f"n_bases={self.n_bases} is not a multiple"
                )
        else:
            raise ValueError(f"unknown basis layout {self.layout!r}; expected 'disjoint' or 'overlapping'")
        check_number("MSLRConfig.noise_var", self.noise_var, 0.0)
        check_number("MSLRConfig.prior_var", self.prior_var, 0.0, low_open=True)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MSLRBatch:
    """One batch of MSLR sequences."""

    xs: Float[Tensor, "batch n_points n_dims"]
    ys: Float[Tensor, "batch n_points"]
    basis: Int[Tensor, " batch"]
    w: Float[Tensor, "batch n_dims"]

    def to(self, device: torch.device | str) -> MSLRBatch:
        return MSLRBatch(self.xs.to(device), self.ys.to(device), self.basis.to(device), self.w.to(device))

    def __len__(self) -> int:
        return self.xs.shape[0]

    def __getitem__(self, idx: slice | Tensor) -> MSLRBatch:
        return MSLRBatch(self.xs[idx], self.ys[idx], self.basis[idx], self.w[idx])


def basis_masks(cfg: MSLRConfig) -> torch.Tensor:
    """Boolean ``[n_bases, n_dims]``: which coordinates each basis turns on."""
    d, r = cfg.n_dims, cfg.rank
    masks = torch.zeros(cfg.n_bases, d, dtype=torch.bool)
    if cfg.layout == "disjoint":
        for b in range(cfg.n_bases):
            masks[b, b * r : (b + 1) * r] = True
        return masks
    per_group = d // r
    coords = torch.arange(d)
    for g in range(cfg.n_bases // per_group):
        if g == 0:
            order = coords
        elif g == 1:  # strided partition: basis j owns j, j + M, j + 2M, ...
            order = coords.reshape(r, per_group).T.reshape(-1)
        else:
            gen = torch.Generator().manual_seed(cfg.basis_seed * 1000 + g)
            order = torch.randperm(d, generator=gen)
        for j in range(per_group):
            masks[g * per_group + j, order[j * r : (j + 1) * r]] = True
    return masks


def basis_matrices(cfg: MSLRConfig, dtype: torch.dtype = torch.float32) -> Float[Tensor, "n_bases n_dims rank"]:
    """Orthonormal coordinate selectors ``U_b`` (columns are unit vectors on the basis coordinates)."""
    return _basis_matrices(cfg, dtype, "cpu").clone()


@functools.lru_cache(maxsize=32)
def _basis_matrices(cfg: MSLRConfig, dtype: torch.dtype, device: str) -> Tensor:
    masks = basis_masks(cfg)
    u = torch.zeros(cfg.n_bases, cfg.n_dims, cfg.rank, dtype=dtype)
    for b in range(cfg.n_bases):
        idx = masks[b].nonzero().squeeze(-1)
        u[b, idx, torch.arange(cfg.rank)] = 1.0
    return u.to(device)


def sample_batch(
    cfg: MSLRConfig | FamilyMixtureConfig,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    basis: Int[Tensor, " batch"] | None = None,
) -> MSLRBatch:
    """Draw ``batch_size`` sequences with ``generator`` (which must live on ``device``).

    ``cfg`` is an MSLR config or a :class:`~taskvec_interp.synthetic.families.FamilyMixtureConfig`
    (the label in ``basis`` is then the family's index).

    ``basis`` optionally fixes the basis of every sequence (else uniform). The random draws are, in
    order: basis (if not given), ``w``, ``xs``, noise; the stream depends on the generator's device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else generator.device
    if basis is not None:
        basis = basis.to(device)
        if basis.shape != (batch_size,):
            raise ValueError(f"basis must have shape ({batch_size},), got {tuple(basis.shape)}")
        if basis.numel() and (int(basis.min()) < 0 or int(basis.max()) >= cfg.n_bases):
            raise ValueError(f"basis labels must be in [0, {cfg.n_bases}), got {basis.unique().tolist()}")
    if not isinstance(cfg, MSLRConfig):  # a mixture of regression families (families.py)
        return cfg.sample(batch_size, generator, device, basis)
    if basis is None:
        basis = torch.randint(cfg.n_bases, (batch_size,), generator=generator, device=device)
    u = _basis_matrices(cfg, torch.float32, str(device))[basis]  # [B, D, r] (cached per device)
    w_low = torch.randn(batch_size, cfg.rank, generator=generator, device=device) * math.sqrt(cfg.prior_var)
    w = torch.einsum("bdr,br->bd", u, w_low)
    xs = torch.randn(batch_size, cfg.n_points, cfg.n_dims, generator=generator, device=device)
    noise = torch.randn(batch_size, cfg.n_points, generator=generator, device=device) * math.sqrt(cfg.noise_var)
    ys = torch.einsum("bkd,bd->bk", xs, w) + noise
    return MSLRBatch(xs=xs, ys=ys, basis=basis, w=w)


def make_test_set(cfg: MSLRConfig | FamilyMixtureConfig, n_per_basis: int = 250, seed: int = 1234) -> MSLRBatch:
    """A fixed, balanced test set on CPU: ``n_per_basis`` sequences of each basis, sorted by basis.

    The paper uses a 1K-sample test set (250 per basis with 4 bases). Independent of any training stream.
    For a family mixture "basis" is the family index.
    """
    if n_per_basis < 1:
        raise ValueError(f"n_per_basis must be >= 1, got {n_per_basis}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    basis = torch.arange(cfg.n_bases).repeat_interleave(n_per_basis)
    return sample_batch(cfg, basis.numel(), gen, device="cpu", basis=basis)


@torch.no_grad()
def oracle_errors(
    cfg: MSLRConfig,
    xs: Float[Tensor, "batch n_points n_dims"],
    ys: Float[Tensor, "batch n_points"],
    basis: Int[Tensor, " batch"],
    oracles: tuple[str, ...] | None = None,
    w: Float[Tensor, "batch n_dims"] | None = None,
) -> dict[str, Float[Tensor, "batch n_points"]]:
    """Squared error of each oracle at each position (position ``i`` sees examples ``< i``). In float64.

    ``oracles=None``: all of the config's (``ORACLES``; for a family mixture ``FAMILY_ORACLES``, whose
    ``family_best`` needs ``w`` on sparse sequences).
    """
    if not isinstance(cfg, MSLRConfig):
        return cfg.oracle_errors(xs, ys, basis, oracles, w)
    oracles = ORACLES if oracles is None else tuple(oracles)
    unknown = set(oracles) - set(ORACLES)
    if unknown:
        raise ValueError(f"unknown oracle(s) {sorted(unknown)}; available: {ORACLES}")
    xs, ys = xs.double(), ys.double()
    dev = xs.device
    b, k, d = xs.shape
    lam = cfg.noise_var / cfg.prior_var
    out: dict[str, Tensor] = {}
    prev = torch.tril(torch.ones(k, k, dtype=torch.double, device=dev), diagonal=-1)  # [i, j] = j < i
    u_all = basis_matrices(cfg, torch.double).to(dev)
    # ridge and least squares on the basis' coordinates (u = the basis selector) or on all of them (None)
    for prefix, u in (("basis", u_all[basis]), ("full", None)):
        if f"{prefix}_ridge" not in oracles and f"{prefix}_ols" not in oracles:
            continue
        z, gram, cross, _ = causal_gram(xs, ys, u)
        if f"{prefix}_ridge" in oracles:
            pred, _ = ridge(z, gram, cross, max(lam, 1e-12))
            out[f"{prefix}_ridge"] = (pred - ys) ** 2
        if f"{prefix}_ols" in oracles:
            out[f"{prefix}_ols"] = (ols(z, prev, ys) - ys) ** 2
    if "mixture_bayes" in oracles:
        out["mixture_bayes"] = (_mixture_bayes(cfg, xs, ys, u_all, prev) - ys) ** 2
    if "zero" in oracles:
        out["zero"] = ys**2
    return {name: out[name].float() for name in oracles}


def _mixture_bayes(cfg: MSLRConfig, xs: Tensor, ys: Tensor, u_all: Tensor, prev: Tensor) -> Tensor:
    """Posterior-mean prediction under the uniform mixture over bases (basis unknown)."""
    s2, tau2 = cfg.noise_var, cfg.prior_var
    if s2 <= 0:
        raise ValueError("mixture_bayes needs noise_var > 0")
    n_prev = prev.sum(-1)  # [K] number of previous examples
    preds, loglik = [], []
    for bi in range(cfg.n_bases):  # loop over bases only (few); vectorised over batch and positions
        u = u_all[bi].expand(xs.shape[0], -1, -1)
        z, gram, cross, ysq = causal_gram(xs, ys, u)
        pred, a = ridge(z, gram, cross, s2 / tau2)  # a = Z^T Z + (s2/tau2) I
        preds.append(pred)
        # y_{<i} ~ N(0, s2 I + tau2 Z Z^T); Woodbury / matrix determinant lemma with r x r matrices:
        # logdet = n log s2 + logdet(I + tau2/s2 Z^T Z); quad = (y^T y - c^T A^{-1} c) / s2
        r = z.shape[-1]
        eye = torch.eye(r, dtype=xs.dtype, device=xs.device)
        logdet = n_prev * math.log(s2) + torch.logdet(eye + (tau2 / s2) * gram)
        sol = torch.linalg.solve(a, cross.unsqueeze(-1)).squeeze(-1)
        quad = (ysq - (cross * sol).sum(-1)) / s2
        loglik.append(-0.5 * (logdet + quad))
    post = torch.softmax(torch.stack(loglik, 0), dim=0)  # uniform prior over bases
    return (post * torch.stack(preds, 0)).sum(0)


def oracle_summary(
    cfg: MSLRConfig | FamilyMixtureConfig, test: MSLRBatch, oracles: tuple[str, ...] | None = None
) -> dict[str, dict[str, float]]:
    """Mean squared error (over positions and sequences) of each oracle, overall and per basis.

    Returns ``{oracle: {"all": mse, "b0": mse_basis0, ...}}``; also ``"last"`` (the final position only).
    ``oracles=None``: all of the config's. A family mixture has its own oracles
    (:func:`~taskvec_interp.synthetic.families.family_oracle_summary`; ``None`` where undefined).
    """
    if not isinstance(cfg, MSLRConfig):
        return cfg.oracle_summary(test, oracles)
    errs = oracle_errors(cfg, test.xs, test.ys, test.basis, oracles)
    out: dict[str, dict[str, float]] = {}
    for name, e in errs.items():
        row = {"all": float(e.mean()), "last": float(e[:, -1].mean())}
        for b in range(cfg.n_bases):
            sel = test.basis == b
            if sel.any():
                row[f"b{b}"] = float(e[sel].mean())
        out[name] = row
    return out
