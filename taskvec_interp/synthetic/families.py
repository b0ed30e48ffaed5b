"""A mixture of regression FAMILIES: the appendix variant of Han et al. (ICML 2025).

Each sequence draws a family ``f`` uniformly from ``families`` (its label, in ``MSLRBatch.basis``, is the
family's index in ``families``; ``n_bases`` is the number of families), fresh weights ``w`` and ``K``
inputs ``x_i ~ N(0, I_D)``, and targets ``y_i = f_w(x_i) + eps_i`` with ``eps_i ~ N(0, noise_var)``.
The paper names the families (linear, sparse linear, leaky-ReLU, quadratic) but not their formulas
(OPEN); the ones here follow Garg et al. (2022), each scaled so that ``E[f_w(x)^2] = 1`` (over ``w`` and
``x``), so no family dominates the loss by its scale:

* ``"linear"``: ``w ~ N(0, I_D / D)``, ``f = w.x``.  ``E[f^2] = E|w|^2 = 1``.
* ``"sparse"``: a support ``S`` of ``sparse_rank`` coordinates drawn uniformly per sequence,
  ``w_S ~ N(0, I / sparse_rank)``, ``w`` zero elsewhere, ``f = w.x``.  ``E[f^2] = 1``. (Unlike MSLR's
  bases, the support is not one of a few fixed sets: it is redrawn per sequence.)
* ``"leaky_relu"``: ``w ~ N(0, I_D / D)``, ``f = c * leaky_relu(w.x, leaky_slope)`` with
  ``c = sqrt(2 / (1 + leaky_slope^2))``. Given ``w``, ``u = w.x ~ N(0, |w|^2)`` is symmetric, so
  ``E[leaky_relu(u)^2] = (1 + a^2) / 2 * E[u^2]`` and ``E[f^2] = 1``. Its mean is not zero.
* ``"quadratic"``: Garg et al.'s quadratic regression, ``f = sum_i w_i x_i^2 / sqrt(3)`` with
  ``w ~ N(0, I_D / D)``: ``E[x^4] = 3`` and the ``w_i`` are independent with mean 0, so ``E[f^2] = 1``.
  (Not ``(w.x)^2``: that one is a rank-one quadratic form with non-zero mean.)

``MSLRBatch.w`` holds each sequence's ``w`` (the weights on ``x`` or, for ``"quadratic"``, on ``x^2``).

Oracles (prediction at position ``i`` uses examples ``< i`` only; squared errors against the noisy ``y``):

* ``zero``: predict 0 (error ``1 + noise_var`` in expectation).
* ``full_ridge``: ridge on all ``D`` coordinates of ``x`` with the linear family's prior,
  ``lambda = noise_var * D`` (the Bayes predictor for ``"linear"``), for every family.
* ``full_ols``: min-norm least squares on ``x``, for every family.
* ``family_best``: the best predictor that knows the family, where it is cheap: ``"linear"`` ridge as
  above (Bayes); ``"sparse"`` ridge on the true support (``lambda = noise_var * sparse_rank``: it knows
  the support too, so it is a lower bound on what a family-aware model can reach); ``"quadratic"`` ridge
  on the features ``x^2 / sqrt(3)`` (``lambda = noise_var * D``, Bayes: ``y`` is linear in ``w`` given
  ``x``). ``"leaky_relu"`` has none (NaN errors, ``None`` in :func:`family_oracle_summary`).

There is no basis-aware oracle of MSLR's kind (``basis_ridge``), so the analysis' ``gap_closed`` is
``None`` for this data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..validate import check_choice, check_int, check_number
from .data import MSLRBatch, MSLRConfig
from .solvers import causal_gram, ols, ridge

__all__ = [
    "FAMILIES",
    "FAMILY_ORACLES",
    "FamilyMixtureConfig",
    "DATA_KINDS",
    "data_config_from_dict",
    "data_config_to_dict",
    "sample_families",
    "family_oracle_errors",
    "family_oracle_summary",
]

FAMILIES: tuple[str, ...] = ("linear", "sparse", "leaky_relu", "quadratic")
FAMILY_ORACLES: tuple[str, ...] = ("family_best", "full_ridge", "full_ols", "zero")


@dataclass(frozen=True)
class FamilyMixtureConfig:
    """A uniform mixture of regression families (module docstring: the formulas and their scaling)."""

    n_dims: int = 16  # D
    n_points: int = 20  # K
    families: tuple[str, ...] = FAMILIES
    sparse_rank: int = 4  # active coordinates of the "sparse" family (support redrawn per sequence)
    leaky_slope: float = 0.1  # negative-side slope of "leaky_relu" (OPEN in the paper)
    noise_var: float = 0.01

    def __post_init__(self) -> None:
        check_int("FamilyMixtureConfig.n_dims", self.n_dims, 1)
        check_int("FamilyMixtureConfig.n_points", self.n_points, 1)
        if isinstance(self.families, str) or not isinstance(self.families, (tuple, list)):
            raise ValueError(f"FamilyMixtureConfig.families must be a tuple of names from {FAMILIES}, "
                             f"got {self.families!r}")
        object.__setattr__(self, "families", tuple(self.families))
        if not self.families:
            raise ValueError("FamilyMixtureConfig.families must name at least one family")
        for i, fam in enumerate(self.families):
            check_choice(f"FamilyMixtureConfig.families[{i}]", fam, FAMILIES)
        dup = sorted({f for f in self.families if self.families.count(f) > 1})
        if dup:
            raise ValueError(f"FamilyMixtureConfig.families lists {dup} more than once: {self.families!r}")
        check_int("FamilyMixtureConfig.sparse_rank", self.sparse_rank, 1)
        if self.sparse_rank > self.n_dims:
            raise ValueError(f"FamilyMixtureConfig.sparse_rank ({self.sparse_rank}) must be <= n_dims "
                             f"({self.n_dims})")
        check_number("FamilyMixtureConfig.leaky_slope", self.leaky_slope)
        check_number("FamilyMixtureConfig.noise_var", self.noise_var, 0.0)

    @property
    def n_bases(self) -> int:
        """The number of labels (families): the analysis treats each family as a 'basis'."""
        return len(self.families)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["families"] = list(self.families)
        return d

    # data.sample_batch / oracle_errors / oracle_summary dispatch here for a non-MSLR config, so data.py
    # never imports this module (no import circle: families builds on data, not the other way round)
    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device | str | None = None,
               basis: Tensor | None = None) -> MSLRBatch:
        return sample_families(self, batch_size, generator, device, basis)

    def oracle_errors(self, xs: Tensor, ys: Tensor, basis: Tensor, oracles: tuple[str, ...] | None = None,
                      w: Tensor | None = None) -> dict[str, Tensor]:
        return family_oracle_errors(self, xs, ys, basis, oracles, w)

    def oracle_summary(self, test: MSLRBatch, oracles: tuple[str, ...] | None = None) -> dict:
        return family_oracle_summary(self, test, oracles)


#: the data-config classes a TrainConfig can hold, by the ``kind`` its JSON records
DATA_KINDS: dict[str, type] = {"mslr": MSLRConfig, "families": FamilyMixtureConfig}


def data_config_to_dict(cfg: MSLRConfig | FamilyMixtureConfig) -> dict[str, Any]:
    """The config's fields plus ``kind`` (the discriminator :func:`data_config_from_dict` reads)."""
    kind = next((k for k, c in DATA_KINDS.items() if type(cfg) is c), None)
    if kind is None:
        raise ValueError(f"not a data config: {type(cfg).__name__}; expected one of "
                         f"{[c.__name__ for c in DATA_KINDS.values()]}")
    return {"kind": kind, **cfg.to_dict()}


def data_config_from_dict(d: dict[str, Any]) -> MSLRConfig | FamilyMixtureConfig:
    """The data config a dict describes; no ``kind`` means MSLR (config.json files written before it)."""
    d = dict(d)
    kind = d.pop("kind", "mslr")
    check_choice("data kind", kind, tuple(DATA_KINDS))
    cls = DATA_KINDS[kind]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown} (data kind {kind!r})")
    return cls(**d)


def _leaky_scale(slope: float) -> float:
    return math.sqrt(2.0 / (1.0 + slope**2))


def sample_families(
    cfg: FamilyMixtureConfig,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device | str,
    basis: Int[Tensor, " batch"] | None = None,
) -> MSLRBatch:
    """Draw ``batch_size`` sequences (``sample_batch`` dispatches here for a :class:`FamilyMixtureConfig`).

    Random draws, in order: family (if not given), Gaussian weights ``[B, D]``, support scores ``[B, D]``
    (the ``sparse_rank`` largest pick the sparse support), ``xs``, noise. They are drawn for every
    sequence whatever its family, so one sequence's draws do not depend on the others' families.
    """
    d, s = cfg.n_dims, cfg.sparse_rank
    if basis is None:
        basis = torch.randint(cfg.n_bases, (batch_size,), generator=generator, device=device)
    g = torch.randn(batch_size, d, generator=generator, device=device)
    scores = torch.rand(batch_size, d, generator=generator, device=device)
    xs = torch.randn(batch_size, cfg.n_points, d, generator=generator, device=device)
    noise = torch.randn(batch_size, cfg.n_points, generator=generator, device=device) * math.sqrt(cfg.noise_var)
    support = torch.zeros(batch_size, d, dtype=torch.bool, device=device)
    support.scatter_(1, scores.topk(s, dim=1).indices, True)
    w_dense = g / math.sqrt(d)
    ws, fs = [], []
    for fam in cfg.families:
        if fam == "sparse":
            w = g * support / math.sqrt(s)
            f = torch.einsum("bkd,bd->bk", xs, w)
        elif fam == "linear":
            w = w_dense
            f = torch.einsum("bkd,bd->bk", xs, w)
        elif fam == "leaky_relu":
            w = w_dense
            f = _leaky_scale(cfg.leaky_slope) * torch.nn.functional.leaky_relu(
                torch.einsum("bkd,bd->bk", xs, w), cfg.leaky_slope)
        else:  # quadratic
            w = w_dense
            f = torch.einsum("bkd,bd->bk", xs**2, w) / math.sqrt(3.0)
        ws.append(w)
        fs.append(f)
    rows = torch.arange(batch_size, device=device)
    w = torch.stack(ws, 1)[rows, basis]  # [B, n_families, D] -> each sequence's own family
    f = torch.stack(fs, 1)[rows, basis]
    return MSLRBatch(xs=xs, ys=f + noise, basis=basis, w=w)


@torch.no_grad()
def family_oracle_errors(
    cfg: FamilyMixtureConfig,
    xs: Float[Tensor, "batch n_points n_dims"],
    ys: Float[Tensor, "batch n_points"],
    basis: Int[Tensor, " batch"],
    oracles: tuple[str, ...] | None = None,
    w: Float[Tensor, "batch n_dims"] | None = None,
) -> dict[str, Float[Tensor, "batch n_points"]]:
    """Squared error of each oracle (module docstring) per position; NaN where one is undefined.
    Parameters in the order of :func:`~taskvec_interp.synthetic.data.oracle_errors`.

    ``family_best`` on ``"sparse"`` sequences needs ``w`` (its non-zero coordinates are the support).
    """
    oracles = FAMILY_ORACLES if oracles is None else tuple(oracles)
    unknown = set(oracles) - set(FAMILY_ORACLES)
    if unknown:
        raise ValueError(f"unknown oracle(s) {sorted(unknown)} for a family mixture; available: {FAMILY_ORACLES}")
    xs, ys = xs.double(), ys.double()
    b, k, d = xs.shape
    lam = max(cfg.noise_var * d, 1e-12)
    out: dict[str, Tensor] = {}
    full_pred = None
    if "full_ridge" in oracles or "family_best" in oracles:
        z, gram, cross, _ = causal_gram(xs, ys, None)
        full_pred, _ = ridge(z, gram, cross, lam)
        out["full_ridge"] = (full_pred - ys) ** 2
    if "full_ols" in oracles:
        prev = torch.tril(torch.ones(k, k, dtype=torch.double, device=xs.device), diagonal=-1)
        out["full_ols"] = (ols(xs, prev, ys) - ys) ** 2
    if "zero" in oracles:
        out["zero"] = ys**2
    if "family_best" in oracles:
        best = torch.full_like(ys, math.nan)
        for j, fam in enumerate(cfg.families):
            sel = basis == j
            if not sel.any() or fam == "leaky_relu":
                continue
            if fam == "linear":
                pred = full_pred[sel]
            elif fam == "quadratic":
                z, gram, cross, _ = causal_gram(xs[sel] ** 2 / math.sqrt(3.0), ys[sel], None)
                pred, _ = ridge(z, gram, cross, lam)
            else:  # sparse: ridge on the true support
                if w is None:
                    raise ValueError("family_best on 'sparse' sequences needs w (the support is its non-zero part)")
                ws = w[sel].double()
                if not bool(((ws != 0).sum(-1) == cfg.sparse_rank).all()):
                    raise ValueError(f"w of the 'sparse' sequences must have {cfg.sparse_rank} non-zero coordinates")
                cols = (ws != 0).nonzero()[:, 1].view(-1, cfg.sparse_rank)  # [n, s], sorted per row
                u = torch.zeros(len(ws), d, cfg.sparse_rank, dtype=torch.double, device=xs.device)
                u[torch.arange(len(ws)).unsqueeze(1), cols, torch.arange(cfg.sparse_rank)] = 1.0
                z, gram, cross, _ = causal_gram(xs[sel], ys[sel], u)
                pred, _ = ridge(z, gram, cross, max(cfg.noise_var * cfg.sparse_rank, 1e-12))
            best[sel] = (pred - ys[sel]) ** 2
        out["family_best"] = best
    return {name: out[name].float() for name in oracles}


def family_oracle_summary(
    cfg: FamilyMixtureConfig, test: MSLRBatch, oracles: tuple[str, ...] | None = None
) -> dict[str, dict[str, float | None]]:
    """As :func:`~taskvec_interp.synthetic.data.oracle_summary`: ``{oracle: {"all", "last", "b0", ...}}``.

    An oracle undefined for a family (``family_best`` on ``"leaky_relu"``) gives ``None`` there, and
    ``None`` for ``"all"`` and ``"last"`` when the test set holds that family.
    """
    errs = family_oracle_errors(cfg, test.xs, test.ys, test.basis, oracles, test.w)
    out: dict[str, dict[str, float | None]] = {}
    for name, e in errs.items():
        defined = bool(torch.isfinite(e).all())
        row: dict[str, float | None] = {"all": float(e.mean()) if defined else None,
                                        "last": float(e[:, -1].mean()) if defined else None}
        for j in range(cfg.n_bases):
            sel = test.basis == j
            if sel.any():
                m = float(e[sel].mean())
                row[f"b{j}"] = m if math.isfinite(m) else None
        out[name] = row
    return out
