"""Several seeds of one synthetic model trained as one: stacked parameters, ``torch.func.vmap``.

``StackedRegressors(cfg, seeds)`` holds the parameters of ``len(seeds)`` :class:`SyntheticRegressor`
models, each initialised exactly as ``SyntheticRegressor(cfg, seed=s)``, stacked along a leading seed
dimension (``torch.func.stack_module_state``). Its forward runs all of them in one pass with
``vmap(functional_call(...))`` over the transformers backbone (nothing is reimplemented): the seeds
share every kernel launch, so small models keep the cores busier than ``len(seeds)`` runs one after
another.

Why the seeds stay independent: the loss is the sum of the per-seed losses, so the gradient of seed
``s`` is the gradient of its own loss; Adam (and weight decay) is elementwise, so one Adam over the
stacked tensors is ``len(seeds)`` Adams; gradient clipping is applied per seed
(:meth:`StackedRegressors.clip_grad_norm_`, the global norm of each seed's gradients, as
``torch.nn.utils.clip_grad_norm_`` would for that seed alone). Every seed draws its data from its own
generator. The batched kernels round differently from the unbatched ones, so a seed trained here
matches its solo run to float precision (tested), not bit for bit.

:meth:`StackedRegressors.module` gives seed ``s`` as a plain :class:`SyntheticRegressor` (a copy), and
:func:`solo_optimizer` its Adam in the exact form a solo run saves, so every seed's checkpoints are the
solo format: analysis, resume and loading do not know the seeds were trained together.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from ..validate import check_int
from .model import ModelConfig, SyntheticRegressor

__all__ = ["StackedRegressors", "solo_optimizer", "check_seeds"]


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """A non-empty list of distinct non-negative int seeds (``ValueError`` naming the bad value)."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise ValueError(f"seeds must be a list of ints, got {seeds!r}")
    if len(seeds) < 1:
        raise ValueError(f"seeds must hold at least one seed (a seed count >= 1), got {list(seeds)!r}")
    for i, s in enumerate(seeds):
        check_int(f"seeds[{i}]", s, 0)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)!r}")
    return list(seeds)


class StackedRegressors(nn.Module):
    """``forward(xs [S, B, K, D], ys [S, B, K]) -> predictions [S, B, K]`` for ``S = len(seeds)`` models."""

    def __init__(self, cfg: ModelConfig, seeds: Sequence[int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.seeds = check_seeds(seeds)
        models = [SyntheticRegressor(cfg, seed=s) for s in self.seeds]
        params, buffers = stack_module_state(models)
        self.names = list(params)
        # parameters live in a ParameterDict keyed with "/" for "." (module names may not hold dots)
        self.stacked = nn.ParameterDict({k.replace(".", "/"): nn.Parameter(v.detach().clone()) for k, v in params.items()})
        self._buffers_stacked = {k: v.detach().clone() for k, v in buffers.items()}
        # the skeleton the functional call runs: no storage of its own
        self._skeleton = [copy.deepcopy(models[0]).to("meta")]
        self._batched = vmap(self._one, in_dims=(0, 0, 0, 0))

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    def params(self) -> dict[str, Tensor]:
        """The stacked parameters by the solo model's names (``[S, ...]``, in ``named_parameters`` order)."""
        return {k: self.stacked[k.replace(".", "/")] for k in self.names}

    def _one(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], xs: Tensor, ys: Tensor) -> Tensor:
        return functional_call(self._skeleton[0], (params, buffers), (xs, ys))

    def forward(self, xs: Float[Tensor, "seed batch n_points n_dims"], ys: Float[Tensor, "seed batch n_points"]
                ) -> Float[Tensor, "seed batch n_points"]:
        if xs.shape[0] != self.n_seeds or ys.shape[0] != self.n_seeds:
            raise ValueError(f"xs and ys need a leading seed dimension of {self.n_seeds}, got {tuple(xs.shape)} "
                             f"and {tuple(ys.shape)}")
        buffers = {k: v.to(xs.device) for k, v in self._buffers_stacked.items()}
        return self._batched(self.params(), buffers, xs, ys)

    def to(self, *args, **kwargs):  # noqa: D102 - buffers follow the parameters
        out = super().to(*args, **kwargs)
        dev = next(self.parameters()).device
        self._buffers_stacked = {k: v.to(dev) for k, v in self._buffers_stacked.items()}
        return out

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip each seed's gradients to global norm ``max_norm`` (as ``clip_grad_norm_`` on that seed alone);
        returns the per-seed norms before clipping."""
        grads = [p.grad for p in self.params().values() if p.grad is not None]
        if not grads:
            return torch.zeros(self.n_seeds)
        per_param = torch.stack([torch.linalg.vector_norm(g.reshape(self.n_seeds, -1), dim=1) for g in grads])
        norms = torch.linalg.vector_norm(per_param, dim=0)  # [S]
        coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
        return norms

    def state_dict_of(self, s: int) -> dict[str, Tensor]:
        """Seed ``s``'s parameters and buffers as a solo model's ``state_dict`` (tensors are copies)."""
        out = {k: v[s].detach().clone() for k, v in self.params().items()}
        out.update({k: v[s].detach().clone() for k, v in self._buffers_stacked.items()})
        return out

    def module(self, s: int) -> SyntheticRegressor:
        """Seed ``s`` (an index into ``seeds``) as a plain model (a copy, on the stacked parameters' device)."""
        dev = next(self.parameters()).device
        model = SyntheticRegressor(self.cfg, seed=self.seeds[s]).to(dev)
        full = model.state_dict()
        full.update(self.state_dict_of(s))
        model.load_state_dict(full, strict=True)
        return model

    @torch.no_grad()
    def load_seed(self, s: int, state: Mapping[str, Tensor]) -> None:
        """Set seed ``s`` from a solo ``state_dict`` (e.g. a checkpoint's ``model.safetensors``)."""
        for k, v in self.params().items():
            v[s].copy_(state[k])
        for k, v in self._buffers_stacked.items():
            v[s].copy_(state[k])


def solo_optimizer(stacked_opt: torch.optim.Optimizer, model: StackedRegressors, s: int,
                   solo_model: SyntheticRegressor) -> torch.optim.Optimizer:
    """Seed ``s``'s Adam as a solo run holds it: a ``torch.optim.Adam`` over ``solo_model``'s parameters
    with the same hyperparameters and the seed's slice of every moment (what its checkpoint saves)."""
    group = {k: v for k, v in stacked_opt.param_groups[0].items() if k != "params"}
    opt = torch.optim.Adam(solo_model.parameters(), **{k: group[k] for k in ("lr", "betas", "eps", "weight_decay")})
    state = stacked_opt.state_dict()
    stacked_params = stacked_opt.param_groups[0]["params"]
    ids = {id(p): i for i, p in enumerate(stacked_params)}
    order = [ids[id(p)] for p in model.params().values()]
    solo_state = {}
    for j, i in enumerate(order):
        if i in state["state"]:
            st = state["state"][i]
            solo_state[j] = {k: (v if k == "step" else v[s]).clone() for k, v in st.items()}
    groups = [{**{k: v for k, v in state["param_groups"][0].items() if k != "params"},
               "params": list(range(len(order)))}]
    opt.load_state_dict({"state": solo_state, "param_groups": groups})
    return opt


@torch.no_grad()
def load_solo_optimizer(stacked_opt: torch.optim.Optimizer, model: StackedRegressors, s: int,
                        solo_opt: torch.optim.Optimizer) -> None:
    """Copy a solo Adam's state (loaded from seed ``s``'s checkpoint) into the stacked Adam's slice ``s``."""
    solo = solo_opt.state_dict()["state"]
    for j, p in enumerate(model.params().values()):
        if j not in solo:
            continue
        st = stacked_opt.state.setdefault(p, {})
        for k, v in solo[j].items():
            if k == "step":
                st["step"] = v.clone() if "step" not in st else st["step"].copy_(v)
            else:
                if k not in st:
                    st[k] = torch.zeros_like(p)
                st[k][s].copy_(v)
