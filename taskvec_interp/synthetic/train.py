"""Training for the synthetic MSLR experiment, with exact kill-and-resume.

Paper setting (Han et al. 2025, appendix): Adam, lr 1e-4, betas (0.9, 0.9999), batch 128, 80K steps,
MSE on the y predictions only (mean over all ``K`` positions, not normalised by ``D``: OPEN, Garg et al.
divide by ``D``), no curriculum, a 1K-sample test set. Those are the defaults of :class:`TrainConfig`
(``train_config("paper")``); ``train_config("small")`` is the CPU-sized run (smaller data with K ~ D as
in the paper, ``"xy"`` tokens, a larger lr; docs/synthetic.md says why and what it shows).
``lr_schedule="cosine"`` decays the lr after the warmup (the paper: constant).

Run directory layout::

    run_dir/config.json                    the TrainConfig (JSON)
    run_dir/metrics.jsonl                  one JSON object per logged step: train_loss and/or test_mse,
                                           test_mse_b{j} (per basis), test_mse_pos (per position), ...
    run_dir/checkpoints/step_0000000/      model.safetensors, optimizer.safetensors, optimizer.json,
                                           state.safetensors (data-generator state, loss window sum),
                                           state.json (step, loss window count), model_config.json

Checkpoints are written to a temporary directory and moved into place with ``os.replace`` (atomic), so
a killed run leaves only complete checkpoints. ``train(cfg, run_dir)`` resumes from the latest one and,
on CPU, continues bitwise-identically to an uninterrupted run (the model, Adam state and data-generator
state are restored; nothing else is random). No pickle is used anywhere.

Determinism: the model is initialised from ``seed`` (inside ``fork_rng``, the global RNG is untouched),
training data come from a ``torch.Generator`` seeded with ``seed + DATA_SEED_OFFSET`` on ``device``
(a CUDA generator gives a different stream from a CPU one), the test set from ``test_seed`` on CPU.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from ..checkpoints import (
    atomic_write_text,
    checkpoint_problem,
    clean_partial,
    config_diffs,
    latest_good_checkpoint,
    list_checkpoints,
    load_optimizer,
    read_metrics,
    save_checkpoint,
    scheduled_lr,
)
from ..finite import NonFiniteError, json_safe, nonfinite_keys, nonfinite_params
from ..io import locks_out
from ..validate import check_bool, check_choice, check_int, check_number, check_str
from .data import MSLRBatch, MSLRConfig, make_test_set, sample_batch
from .families import FamilyMixtureConfig, data_config_from_dict, data_config_to_dict
from .model import ModelConfig, SyntheticRegressor, model_config

__all__ = [
    "TrainConfig",
    "train_config",
    "TRAIN_CONFIGS",
    "train",
    "train_seeds",
    "seed_dir",
    "checkpoint_steps",
    "list_checkpoints",
    "load_checkpoint",
    "load_run_config",
    "read_metrics",
    "evaluate",
    "DATA_SEED_OFFSET",
    "COMPILE_MODES",
]

DATA_SEED_OFFSET = 1_000_003
#: fields that may change between a run and its resumption (they do not change the maths on one device;
#: ``steps`` may change to extend a run with a constant lr: checkpoints already written stay, the
#: checkpoint schedule beyond them changes; with a cosine schedule ``steps`` must match)
RUNTIME_FIELDS: frozenset[str] = frozenset({"device", "compile", "compile_mode", "steps"})
#: ``torch.compile`` modes; the ``reduce-overhead`` and ``max-autotune`` ones capture CUDA graphs on a GPU
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES: frozenset[str] = frozenset({"reduce-overhead", "max-autotune"})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Defaults are the paper's (12L/256/8 GPT-2, 80K steps)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: MSLRConfig | FamilyMixtureConfig = field(default_factory=MSLRConfig)  # JSON: with a "kind"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.9999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup from 0 (the paper: none)
    lr_schedule: str = "constant"  # after warmup: "constant" (the paper) or "cosine" (down to min_lr_ratio * lr)
    min_lr_ratio: float = 0.1
    grad_clip: float | None = None  # max global grad norm (the paper: none)
    batch_size: int = 128
    steps: int = 80_000
    seed: int = 0
    eval_every: int = 500
    log_every: int = 50
    n_test_per_basis: int = 250  # 1K test sequences with 4 bases, as in the paper
    test_seed: int = 1234
    ckpt_every: int = 5_000  # regular checkpoints
    ckpt_log_points: int = 40  # plus this many log-spaced steps in [1, steps]
    device: str = "cpu"
    autocast_dtype: str | None = None  # e.g. "bfloat16" (GPU); None = plain fp32
    compile: bool = False  # torch.compile the model's forward and backward (GPU)
    compile_mode: str = "reduce-overhead"  # torch.compile mode: CUDA graphs on a GPU (none on CPU)
    # curriculum over the number of in-context examples (Garg et al. 2022): stages ``(start_step, n_points)``,
    # the first at step 0, start steps increasing, ``n_points`` non-decreasing, the last stage at the data's
    # ``n_points`` and starting before ``steps``; the steps after ``start_step`` train on sequences of
    # ``n_points`` examples (drawn at that length). Empty: none (the paper). Evaluation: always full length.
    points_curriculum: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelConfig(**self.model))
        if isinstance(self.data, dict):  # "kind" picks the class; none: MSLR (config.json files before it)
            object.__setattr__(self, "data", data_config_from_dict(self.data))
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.model.n_dims != self.data.n_dims or self.model.n_points != self.data.n_points:
            raise ValueError(
                f"model (n_dims={self.model.n_dims}, n_points={self.model.n_points}) and data "
                f"(n_dims={self.data.n_dims}, n_points={self.data.n_points}) configs disagree"
            )
        for name in ("batch_size", "eval_every", "log_every", "n_test_per_basis", "ckpt_every"):
            check_int(f"TrainConfig.{name}", getattr(self, name), 1)
        for name in ("steps", "warmup_steps", "ckpt_log_points", "seed", "test_seed"):
            check_int(f"TrainConfig.{name}", getattr(self, name), 0)
        # optimiser settings: refused here, before anything is written (inside Adam it is too late)
        check_number("TrainConfig.lr", self.lr, 0.0, low_open=True)
        if len(self.betas) != 2:
            raise ValueError(f"TrainConfig.betas must be two numbers, got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            check_number(f"TrainConfig.betas[{i}]", beta, 0.0, 1.0, high_open=True)
        check_number("TrainConfig.eps", self.eps, 0.0, low_open=True)
        check_number("TrainConfig.weight_decay", self.weight_decay, 0.0)
        if self.grad_clip is not None:
            check_number("TrainConfig.grad_clip", self.grad_clip, 0.0, low_open=True)
        check_choice("TrainConfig.compile_mode", self.compile_mode, COMPILE_MODES)
        check_choice("TrainConfig.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        check_number("TrainConfig.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_choice("TrainConfig.autocast_dtype", self.autocast_dtype, (None, "bfloat16", "float16"))
        check_bool("TrainConfig.compile", self.compile)
        check_str("TrainConfig.device", self.device)
        if self.warmup_steps > self.steps:
            raise ValueError(f"TrainConfig.warmup_steps must be <= steps ({self.steps}), got {self.warmup_steps}")
        object.__setattr__(self, "points_curriculum", _check_curriculum(self.points_curriculum, self.steps,
                                                                        self.data.n_points))

    def n_points_at(self, step: int) -> int:
        """The number of in-context examples a training batch of ``step`` (1-based) holds."""
        k = self.data.n_points
        for start, n in self.points_curriculum:
            if step > start:  # step ``start + 1`` is the first of the stage
                k = n
        return k

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["data"] = data_config_to_dict(self.data)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {sorted(unknown)}")
        return cls(**d)


def _check_curriculum(value: object, steps: int, n_points: int) -> tuple[tuple[int, int], ...]:
    """``TrainConfig.points_curriculum`` as a tuple of ``(start_step, n_points)`` pairs, or ``ValueError``."""
    name = "TrainConfig.points_curriculum"
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of (start_step, n_points) pairs, got {value!r}")
    stages: list[tuple[int, int]] = []
    for stage in value:
        if (isinstance(stage, (str, bytes)) or not isinstance(stage, (list, tuple)) or len(stage) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in stage)):
            raise ValueError(f"{name} must be a list of (start_step, n_points) pairs of ints, got {stage!r} in "
                             f"{list(value)!r}")
        stages.append((stage[0], stage[1]))
    if not stages:
        return ()
    starts, sizes = [s for s, _ in stages], [n for _, n in stages]
    if starts[0] != 0:
        raise ValueError(f"{name} must start at step 0, got a first stage at step {starts[0]}")
    if any(b <= a for a, b in itertools.pairwise(starts)):
        raise ValueError(f"{name} must have increasing start steps, got {starts}")
    if min(sizes) < 1 or any(b < a for a, b in itertools.pairwise(sizes)):
        raise ValueError(f"{name} must have non-decreasing n_points >= 1 (a monotone curriculum), got {sizes}")
    if sizes[-1] != n_points:
        raise ValueError(f"{name} must end at the data's n_points ({n_points}), got a last stage of {sizes[-1]}")
    if starts[-1] >= steps:
        raise ValueError(f"{name} must reach its last stage before the run ends (steps={steps}), got a last "
                         f"stage at step {starts[-1]}")
    return tuple(stages)


TRAIN_CONFIGS: dict[str, dict[str, Any]] = {
    "paper": {},
    # CPU-sized (docs/synthetic.md, "The small config"): K ~ D as in the paper (there 20 ~ 16), but D = 8,
    # rank 2, K = 10; an 8-layer d_model 32 model with 8 heads and "xy" tokens; lr 3e-3 with betas
    # (0.9, 0.99), a 200-step warmup and batch 128; compiled (inductor) with fused Adam: ~9 min on 2 cores
    "small": {"data": {"n_dims": 8, "rank": 2, "n_points": 10}, "lr": 3e-3, "betas": (0.9, 0.99),
              "warmup_steps": 200, "batch_size": 128, "steps": 10_000, "eval_every": 250, "log_every": 50,
              "ckpt_every": 1_000, "ckpt_log_points": 12, "compile": True, "compile_mode": "default"},
    # the appendix variants, CPU-sized as "small" (its model and optimiser; "model" names the model config).
    # docs/synthetic.md, "Variants", says why these sizes and what the runs show.
    # 6 disjoint bases, D = 24, rank 4 (the paper's); K = 20 < D: ridge on all coordinates cannot solve
    # the last prediction, the rank-4 oracle can (0.77 against 0.012 at the last position)
    "bases6_d24": {"model": "small", "data": {"n_dims": 24, "rank": 4, "n_bases": 6, "n_points": 20},
                   "lr": 3e-3, "betas": (0.9, 0.99), "warmup_steps": 200, "batch_size": 128, "steps": 3_000,
                   "eval_every": 100, "log_every": 50, "ckpt_every": 500, "ckpt_log_points": 12,
                   "n_test_per_basis": 125, "compile": True, "compile_mode": "default"},
    # 8 overlapping bases in D = 16, rank 4: two groups of 4, each a partition of the coordinates; K = 14
    # (with the paper's K = 20 ridge on all coordinates nearly solves the last prediction: 0.088 against
    # 0.014; with K = 14: 0.92 against 0.017)
    "overlap8_d16": {"model": "small", "data": {"n_dims": 16, "rank": 4, "n_bases": 8, "layout": "overlapping",
                                                "n_points": 14},
                     "lr": 3e-3, "betas": (0.9, 0.99), "warmup_steps": 200, "batch_size": 128, "steps": 4_500,
                     "eval_every": 100, "log_every": 50, "ckpt_every": 500, "ckpt_log_points": 12,
                     "n_test_per_basis": 125, "compile": True, "compile_mode": "default"},
    # the mixture of regression families (linear, sparse, leaky-ReLU, quadratic), small's D = 8 and K = 10.
    # steps: what 1 CPU thread trains in ~8 min (~150 / 100 / 70 ms a step), far fewer than small's 14K
    "families": {"model": "small", "data": {"kind": "families", "n_dims": 8, "n_points": 10, "sparse_rank": 2},
                 "lr": 3e-3, "betas": (0.9, 0.99), "warmup_steps": 200, "batch_size": 128, "steps": 6_000,
                 "eval_every": 100, "log_every": 50, "ckpt_every": 500, "ckpt_log_points": 12,
                 "compile": True, "compile_mode": "default"},
    "tiny": {"lr": 3e-3, "steps": 300, "batch_size": 32, "eval_every": 50, "log_every": 10, "ckpt_every": 100,
             "ckpt_log_points": 5, "n_test_per_basis": 32},
}


def train_config(name: str, model: str | None = None, **overrides: Any) -> TrainConfig:
    """A named run (``paper``, ``small``, ``tiny``, the variants ``bases6_d24``, ``overlap8_d16``,
    ``families``) using the model config the preset names (default: the one of the same name), or ``model``.

    ``overrides`` are TrainConfig fields (``data`` may be an ``MSLRConfig`` / ``FamilyMixtureConfig`` or a
    dict of its fields, which replace the preset's; ``"kind"`` in it picks the class); ModelConfig fields
    (e.g. ``backbone="mamba2"``) go to the model config.
    """
    if name not in TRAIN_CONFIGS:
        raise ValueError(f"unknown train config {name!r}; available: {sorted(TRAIN_CONFIGS)}")
    preset = dict(TRAIN_CONFIGS[name])
    data = overrides.pop("data", None)
    if not isinstance(data, (MSLRConfig, FamilyMixtureConfig)):
        data = data_config_from_dict({**preset.get("data", {}), **(data or {})})
    preset.pop("data", None)
    model_name = model or preset.pop("model", name)
    preset.pop("model", None)
    model_over = {k: overrides.pop(k) for k in list(overrides) if k in ModelConfig.__dataclass_fields__}
    mcfg = model_config(model_name, n_dims=data.n_dims, n_points=data.n_points, **model_over)
    return TrainConfig(model=mcfg, data=data, **{**preset, **overrides})


def checkpoint_steps(cfg: TrainConfig) -> list[int]:
    """Sorted checkpoint steps: 0, ``ckpt_log_points`` log-spaced steps in [1, steps], every
    ``ckpt_every`` steps, and ``steps``."""
    s = {0, cfg.steps}
    n = cfg.ckpt_log_points
    if cfg.steps >= 1 and n >= 1:
        top = math.log(cfg.steps)
        s |= {round(math.exp(top * i / max(n - 1, 1))) for i in range(n)}
    s |= set(range(cfg.ckpt_every, cfg.steps + 1, cfg.ckpt_every))
    return sorted(x for x in s if 0 <= x <= cfg.steps)


def load_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    return TrainConfig.from_dict(_read_json(Path(run_dir) / "config.json"))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> SyntheticRegressor:
    """The model at a checkpoint directory (``run_dir/checkpoints/step_XXXXXXX``), in eval mode."""
    path = Path(path)
    problem = checkpoint_problem(path) if (path / "manifest.json").exists() or not path.is_dir() else None
    if problem is None and not (path / "model.safetensors").is_file():
        problem = "no model.safetensors"
    if problem is not None:
        raise ValueError(f"checkpoint {path} cannot be loaded: {problem}")
    mcfg = ModelConfig(**_read_json(path / "model_config.json"))
    model = SyntheticRegressor(mcfg, seed=0)
    try:
        state = load_file(path / "model.safetensors", device=str(device))
    except Exception as err:  # safetensors raises its own SafetensorError for torn files
        raise ValueError(f"checkpoint {path / 'model.safetensors'} is unreadable ({type(err).__name__}: {err})") from None
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    test: MSLRBatch,
    n_bases: int,
    batch_size: int = 500,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Test MSE overall, per basis (``test_mse_b{j}``), at the last position and per position."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    errs = []
    for i in range(0, len(test), batch_size):
        b = test[i : i + batch_size].to(dev)
        with torch.autocast(dev.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            pred = model(b.xs, b.ys)
        errs.append(((pred.float() - b.ys) ** 2).cpu())
    model.train(was_training)
    e: Float[Tensor, "n k"] = torch.cat(errs)
    out: dict[str, Any] = {"test_mse": float(e.mean()), "test_mse_last": float(e[:, -1].mean())}
    for j in range(n_bases):
        sel = test.basis == j
        if sel.any():
            out[f"test_mse_b{j}"] = float(e[sel].mean())
    out["test_mse_pos"] = [round(float(v), 6) for v in e.mean(0)]
    return out


# ---------------------------------------------------------------------------------------------- I/O


def _save_checkpoint(
    run_dir: Path,
    step: int,
    model: SyntheticRegressor,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    loss_sum: Tensor,
    loss_count: int,
) -> Path:
    return save_checkpoint(
        run_dir, step, opt,
        {"model": model.state_dict(), "state": {"data_generator": gen.get_state(), "loss_sum": loss_sum}},
        {"state.json": json.dumps({"step": step, "loss_count": loss_count}),
         "model_config.json": json.dumps(model.cfg.to_dict(), indent=1)},
    )


def _read_json(path: Path) -> Any:
    """JSON of a run or checkpoint directory: one-line ``ValueError`` naming the file when it is torn."""
    from ..results import read_json

    return read_json(path)


def _check_same_config(saved: dict[str, Any], cfg: TrainConfig, run_dir: Path) -> None:
    now = cfg.to_dict()
    try:  # fill fields added since the run was saved with their defaults
        saved = TrainConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        pass
    runtime = RUNTIME_FIELDS if cfg.lr_schedule == "constant" else RUNTIME_FIELDS - {"steps"}
    diffs = config_diffs(saved, now, runtime)
    if diffs:
        raise ValueError(
            f"run directory {run_dir} holds a run with a different config; refusing to resume. "
            "Differences: " + "; ".join(diffs) + ". Use a new run_dir or the saved config (load_run_config)."
        )


# ------------------------------------------------------------------------------------------- train


class _Engine:
    """What the training loop drives: a model over ``S`` seeds (``S = 1``: a plain model), its fused Adam,
    one optimiser step on ``xs [S, B, K, D]``, and each seed as a plain model for evaluation and checkpoints."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, params, device: torch.device) -> None:
        self.model = model
        self.opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                    fused=_fused_adam(device))
        # a curriculum changes the sequence length a few times: one static graph per length, not a dynamic one
        dyn = {"dynamic": False} if cfg.points_curriculum else {}
        self.fwd = torch.compile(model, mode=cfg.compile_mode, **dyn) if cfg.compile else model
        self.grad_clip = cfg.grad_clip

    def train_mode(self) -> None:
        self.model.train()

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def predict(self, xs: Tensor, ys: Tensor) -> Tensor:
        """Predictions ``[S, B, K]``."""
        raise NotImplementedError

    def clip(self) -> None:
        raise NotImplementedError

    def step(self, xs: Tensor, ys: Tensor, amp_dtype: torch.dtype | None, device: torch.device) -> Tensor:
        """One optimiser step; returns each seed's loss ``[S]`` (detached)."""
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            pred = self.predict(xs, ys)
        losses = torch.mean((pred.float() - ys) ** 2, dim=(1, 2))  # [S]: each seed's own loss
        self.opt.zero_grad(set_to_none=True)
        losses.sum().backward()  # the sum's gradient for seed s is the gradient of seed s's loss
        if self.grad_clip is not None:
            self.clip()
        self.opt.step()
        return losses.detach()


class _SoloEngine(_Engine):
    """One seed: the model itself."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        model = SyntheticRegressor(cfg.model, seed=cfg.seed).to(device)
        super().__init__(cfg, model, model.parameters(), device)

    def predict(self, xs: Tensor, ys: Tensor) -> Tensor:
        return self.fwd(xs[0], ys[0]).unsqueeze(0)

    def clip(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)

    def model_of(self, s: int) -> SyntheticRegressor:
        return self.model

    def optimizer_of(self, s: int, model: SyntheticRegressor) -> torch.optim.Optimizer:
        return self.opt

    def load(self, s: int, ckpt: Path, device: torch.device) -> None:
        self.model.load_state_dict(load_file(ckpt / "model.safetensors", device=str(device)))
        load_optimizer(self.opt, ckpt)


class _StackedEngine(_Engine):
    """Several seeds as one model (:class:`~taskvec_interp.synthetic.stacked.StackedRegressors`)."""

    def __init__(self, cfgs: list[TrainConfig], device: torch.device) -> None:
        from .stacked import StackedRegressors

        model = StackedRegressors(cfgs[0].model, [c.seed for c in cfgs]).to(device)
        super().__init__(cfgs[0], model, model.params().values(), device)

    def predict(self, xs: Tensor, ys: Tensor) -> Tensor:
        return self.fwd(xs, ys)

    def clip(self) -> None:
        self.model.clip_grad_norm_(self.grad_clip)

    def model_of(self, s: int) -> SyntheticRegressor:
        return self.model.module(s)

    def optimizer_of(self, s: int, model: SyntheticRegressor) -> torch.optim.Optimizer:
        from .stacked import solo_optimizer

        return solo_optimizer(self.opt, self.model, s, model)

    def load(self, s: int, ckpt: Path, device: torch.device) -> None:
        from .stacked import load_solo_optimizer

        solo = SyntheticRegressor(self.model.cfg, seed=self.model.seeds[s]).to(device)
        state = load_file(ckpt / "model.safetensors", device=str(device))
        solo.load_state_dict(state)
        self.model.load_seed(s, state)
        opt = torch.optim.Adam(solo.parameters())
        load_optimizer(opt, ckpt)
        load_solo_optimizer(self.opt, self.model, s, opt)


def _fused_adam(device: torch.device) -> bool | None:
    """Fused Adam (one kernel over all parameters) where torch has it: CUDA and CPU."""
    return True if device.type in ("cuda", "cpu") else None


def _prepare_run(cfg: TrainConfig, run_dir: Path, good_steps: bool = False) -> tuple[tuple[int, Path] | None, set[int]]:
    """Check ``run_dir`` against ``cfg`` (nothing written yet): the latest good checkpoint and, when
    ``good_steps``, the steps of every checkpoint that verifies."""
    cfg_path = run_dir / "config.json"
    held = list_checkpoints(run_dir)
    if cfg_path.exists():
        _check_same_config(_read_json(cfg_path), cfg, run_dir)
    elif held:
        raise ValueError(f"{run_dir} has checkpoints but no config.json; refusing to resume")
    if held and held[-1][0] > cfg.steps:
        raise ValueError(f"{run_dir} already holds checkpoints up to step {held[-1][0]}, beyond steps={cfg.steps}: "
                         f"train with steps >= {held[-1][0]} or use a new run directory (its config.json is left as it is)")
    if not good_steps:
        good, _ = latest_good_checkpoint(run_dir)  # warns about each newer checkpoint it skips
        return good, set()
    ok = {step for step, path in held if checkpoint_problem(path) is None}
    return None, ok


@locks_out("run_dir")  # one process at a time trains into a run directory
def train(
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    progress: bool = True,
    stop_at: int | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> Path:
    """Train (or resume) a run in ``run_dir``; returns the path of the last checkpoint written.

    Resumes from the latest complete checkpoint if ``run_dir`` has one (``ValueError`` if its saved
    config differs from ``cfg`` outside ``RUNTIME_FIELDS``). ``stop_at`` stops after that many steps
    without saving (simulates a kill; for tests). ``callback(step, record)`` gets each metrics record.
    A directory of :func:`train_seeds` (``seed_<n>/`` runs) is refused: a solo run would be mixed into it.
    """
    seeds = _seed_runs_in(Path(run_dir))
    if seeds:
        raise ValueError(f"{run_dir} holds the runs of several seeds ({', '.join(seeds[:5])}; written by train_seeds "
                         "/ --seeds): refusing to train a solo run into it (the two would be mixed); resume it with "
                         "train_seeds (--seeds) or use another run directory")
    return _train_runs([cfg], [Path(run_dir)], stacked=False, progress=progress, stop_at=stop_at,
                       callback=callback)[0]


def _seed_runs_in(run_dir: Path) -> list[str]:
    """The ``seed_<n>`` run directories (with a config.json) in ``run_dir``, by name."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.glob("seed_*") if p.name[5:].isdigit() and (p / "config.json").is_file())


def seed_dir(run_dir: str | os.PathLike, seed: int) -> Path:
    """Where :func:`train_seeds` writes seed ``seed``'s run: ``run_dir/seed_{seed}``."""
    return Path(run_dir) / f"seed_{seed}"


@locks_out("run_dir")
def train_seeds(
    cfg: TrainConfig,
    seeds: Sequence[int],
    run_dir: str | os.PathLike,
    *,
    progress: bool = True,
    stop_at: int | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[Path]:
    """Train (or resume) ``cfg`` for every seed in ``seeds`` together, as one stacked model
    (:mod:`~taskvec_interp.synthetic.stacked`); returns each seed's last checkpoint.

    Seed ``s`` is written to ``run_dir/seed_{s}`` (:func:`seed_dir`) as a complete solo run directory
    (``config.json`` with ``seed=s``, its own metrics and checkpoints in the solo format), with the data
    stream and initialisation of ``train(replace(cfg, seed=s), ...)`` and its numbers to float precision.
    ``cfg.seed`` is ignored. Resume takes the newest step at which every seed has a checkpoint that
    verifies. ``callback(step, record)`` gets each seed's records, with a ``"seed"`` key.
    """
    from .stacked import check_seeds

    seeds = check_seeds(seeds)
    base = Path(run_dir)
    if (base / "config.json").is_file() or list_checkpoints(base):
        raise ValueError(f"{base} holds a solo run (config.json / checkpoints/ of one seed): refusing to train seeds "
                         "into it (the two would be mixed); resume it with train (no --seeds) or use another run "
                         "directory")
    cfgs = [replace(cfg, seed=s) for s in seeds]
    return _train_runs(cfgs, [seed_dir(base, s) for s in seeds], stacked=True, progress=progress,
                       stop_at=stop_at, callback=callback)


def _train_runs(
    cfgs: list[TrainConfig],
    run_dirs: list[Path],
    *,
    stacked: bool,
    progress: bool,
    stop_at: int | None,
    callback: Callable[[int, dict[str, Any]], None] | None,
) -> list[Path]:
    """The training loop, for one plain model (``stacked=False``) or several seeds stacked into one."""
    cfg = cfgs[0]  # every field but the seed is shared
    n = len(cfgs)
    device = torch.device(cfg.device)
    # check every run directory before writing anything
    if stacked:
        good_sets = [_prepare_run(c, d, good_steps=True)[1] for c, d in zip(cfgs, run_dirs, strict=True)]
        common = set.intersection(*good_sets) if good_sets else set()
        newest = [max(s) for s in good_sets if s]
        if common:
            step0 = max(common)
            for d, mx in zip(run_dirs, newest, strict=True):
                if mx > step0:
                    warnings.warn(f"{d}: resuming from step {step0}, the newest step every seed has a good "
                                  f"checkpoint at (this seed has one at {mx})", stacklevel=3)
            resume = [(step0, d / "checkpoints" / f"step_{step0:07d}") for d in run_dirs]
        else:
            held = [str(d) for d, g in zip(run_dirs, good_sets, strict=True) if g]
            if held:  # training from 0 would overwrite those seeds' runs
                raise ValueError(f"{', '.join(held)} already hold checkpoints but the seeds {[c.seed for c in cfgs]} "
                                 "share no checkpoint step: resume with the seeds they were trained with, or use a "
                                 "new run directory")
            resume = [None] * n
    else:
        resume = [_prepare_run(cfgs[0], run_dirs[0])[0]]
    for c, d in zip(cfgs, run_dirs, strict=True):
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "config.json", json.dumps(c.to_dict(), indent=1))
        clean_partial(d)  # leftovers of a killed save

    engine = _StackedEngine(cfgs, device) if stacked else _SoloEngine(cfg, device)
    gens = [torch.Generator(device=device).manual_seed(c.seed + DATA_SEED_OFFSET) for c in cfgs]
    start, loss_count = 0, 0
    loss_sum = torch.zeros(n, dtype=torch.float64, device=device)  # on device: no sync per step
    last_ck: list[Path | None] = [None] * n
    if resume[0] is not None:
        start = resume[0][0]
        for s, (d, (_, ck)) in enumerate(zip(run_dirs, resume, strict=True)):
            engine.load(s, ck, device)
            st_t = load_file(ck / "state.safetensors")
            gens[s].set_state(st_t["data_generator"])
            loss_sum[s] = st_t["loss_sum"].to(device)
            loss_count = _read_json(ck / "state.json")["loss_count"]
            # drop metrics logged after the checkpoint (they will be recomputed identically)
            recs = [r for r in read_metrics(d) if r["step"] <= start]
            atomic_write_text(d / "metrics.jsonl", "".join(json.dumps(json_safe(r), allow_nan=False) + "\n"
                                for r in recs))
            last_ck[s] = ck
    else:
        for d in run_dirs:
            if (d / "metrics.jsonl").exists():
                (d / "metrics.jsonl").unlink()

    # CUDA-graph modes reuse output buffers between replays: mark each training step as a new one
    mark_step = cfg.compile and cfg.compile_mode in _CUDA_GRAPH_MODES
    amp_dtype = getattr(torch, cfg.autocast_dtype) if cfg.autocast_dtype else None
    test = make_test_set(cfg.data, cfg.n_test_per_basis, cfg.test_seed)
    data_of_size = functools.lru_cache(maxsize=None)(lambda data, k: replace(data, n_points=k))
    ck_steps = set(checkpoint_steps(cfg))
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    t0 = time.perf_counter()
    metrics_f = [open(d / "metrics.jsonl", "a") for d in run_dirs]  # noqa: SIM115 - closed in finally

    def diverged(s: int, step: int, what: str) -> NonFiniteError:
        """The error that stops a diverging run: the step, the seed, and the last good checkpoint (kept)."""
        ck = last_ck[s]
        seed = f" (seed {cfgs[s].seed})" if stacked else ""
        good = (f"the last good checkpoint is {ck} (step {int(ck.name.removeprefix('step_'))}), kept as it is"
                if ck is not None else "no checkpoint was written")
        return NonFiniteError(
            f"training diverged in {run_dirs[s]}{seed}: {what} at step {step}; stopped there, nothing was written "
            f"after it and {good}. Train with a lower lr (now {cfg.lr:g}) or a grad_clip, in a new run directory")

    def check_records(step: int, records: list[dict[str, Any]]) -> None:
        """Every seed's record is finite before ANY is written (metrics.jsonl stays strict JSON)."""
        for s, rec in enumerate(records):
            bad = nonfinite_keys(rec)
            if bad:
                raise diverged(s, step, f"{bad[0]} is {rec[bad[0]]!r}" if not isinstance(rec[bad[0]], list)
                               else f"{bad[0]} holds a non-finite value")

    # the first step at which each seed's training loss was not finite (-1: none yet) and that loss: kept on
    # the device (no sync per step off the CPU), checked before anything is written
    first_bad = torch.full((n,), -1, dtype=torch.long, device=device)
    bad_loss = torch.zeros(n, dtype=torch.float32, device=device)
    check_each_step = device.type == "cpu"  # a sync costs nothing there: stop at the bad step itself

    def check_losses() -> None:
        if bool((first_bad >= 0).any()):
            steps = [int(x) for x in first_bad.tolist()]
            s = min((st, i) for i, st in enumerate(steps) if st >= 0)[1]
            raise diverged(s, steps[s], f"the training loss is {float(bad_loss[s])}")

    def log(s: int, step: int, rec: dict[str, Any]) -> None:
        rec = {"step": step, **rec, "elapsed_s": round(time.perf_counter() - t0, 3)}
        metrics_f[s].write(json.dumps(json_safe(rec), allow_nan=False) + "\n")  # strict JSON, never a bare NaN
        metrics_f[s].flush()
        if callback is not None:
            callback(step, {**rec, "seed": cfgs[s].seed} if stacked else rec)

    def lr_at(step: int) -> float:  # a pure function of the step: nothing to checkpoint
        return scheduled_lr(step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio)

    def checkpoint(step: int, models: list[SyntheticRegressor]) -> None:
        for s, model in enumerate(models):  # no checkpoint of non-finite weights, for any seed
            bad = nonfinite_params(model.named_parameters())
            if bad:
                raise diverged(s, step, f"the weights are not finite ({', '.join(bad[:3])}"
                                        f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''})")
        for s, (d, model) in enumerate(zip(run_dirs, models, strict=True)):
            last_ck[s] = _save_checkpoint(d, step, model, engine.optimizer_of(s, model), gens[s], loss_sum[s].clone(),
                                          loss_count)

    last_loss: float | None = None
    try:
        if start == 0 and resume[0] is None:
            models = [engine.model_of(s) for s in range(n)]
            recs0 = [evaluate(models[s], test, cfg.data.n_bases, autocast_dtype=amp_dtype) for s in range(n)]
            check_records(0, recs0)
            for s in range(n):
                log(s, 0, recs0[s])
            checkpoint(0, models)
        engine.train_mode()
        bar = tqdm(range(start + 1, end + 1), initial=start, total=cfg.steps, disable=not progress,
                   desc="train" if n == 1 else f"train {n} seeds", dynamic_ncols=True)
        for step in bar:
            engine.set_lr(lr_at(step))
            k = cfg.n_points_at(step)
            data = cfg.data if k == cfg.data.n_points else data_of_size(cfg.data, k)
            batches = [sample_batch(data, cfg.batch_size, g, device) for g in gens]
            xs = torch.stack([b.xs for b in batches])
            ys = torch.stack([b.ys for b in batches])
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            losses = engine.step(xs, ys, amp_dtype, device)
            newly = (first_bad < 0) & ~torch.isfinite(losses)
            first_bad.masked_fill_(newly, step)
            bad_loss.copy_(torch.where(newly, losses.float(), bad_loss))
            loss_sum += losses
            loss_count += 1
            writes = step % cfg.log_every == 0 or step == cfg.steps or step % cfg.eval_every == 0 or step in ck_steps
            if check_each_step or writes:
                check_losses()  # before anything of this step is written
            recs: list[dict[str, Any]] = [{} for _ in range(n)]
            if step % cfg.log_every == 0 or step == cfg.steps:
                means = (loss_sum / loss_count).tolist()
                for s in range(n):
                    recs[s]["train_loss"] = means[s]
                    recs[s]["lr"] = lr_at(step)
                last_loss = sum(means) / n
                loss_sum.zero_()
                loss_count = 0
                bar.set_postfix(loss=f"{last_loss:.4f}")
            # each seed as a plain model, once per step that needs it (stacked: a copy of its slice)
            models = [engine.model_of(s) for s in range(n)] if step % cfg.eval_every == 0 or step in ck_steps else []
            if models:
                for s in range(n):
                    recs[s].update(evaluate(models[s], test, cfg.data.n_bases, autocast_dtype=amp_dtype))
                shown = {"test": f"{sum(r['test_mse'] for r in recs) / n:.4f}"}
                if last_loss is not None:  # the last logged training loss, never a NaN placeholder
                    shown = {"loss": f"{last_loss:.4f}", **shown}
                bar.set_postfix(**shown)
            check_records(step, recs)
            for s in range(n):
                if recs[s]:
                    log(s, step, recs[s])
            if step in ck_steps:
                checkpoint(step, models)
        bar.close()
    finally:
        for f in metrics_f:
            f.close()
    assert all(ck is not None for ck in last_ck)
    return [ck for ck in last_ck if ck is not None]
