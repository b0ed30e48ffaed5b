"""Sequence model for the synthetic MSLR experiment: read-in -> HF backbone -> read-out.

Tokens follow Garg et al. (2022) (OPEN in the paper, which says it follows them): the sequence is
``x_1, y_1, x_2, y_2, ..., x_K, y_K`` (length ``2K``), the token of ``y_i`` being ``[y_i, 0, ..., 0]``
(zero-padded to ``D``). ``tokens="xy"`` is our variant: the y token is ``[x_i, y_i, 1]`` and the x token
``[x_i, 0, 0]``, so a y token holds its whole example and one attention layer can regress without first
learning a previous-token head; small CPU models leave the zero-predictor plateau within a few hundred
steps with it, instead of thousands (docs/synthetic.md). A linear read-in maps the token to
``d_model``, the backbone (``GPT2Model`` or
``Mamba2Model`` from transformers, fed ``inputs_embeds``; its token embedding is unused and has a
vocabulary of 1) runs causally, and a linear read-out ``d_model -> 1`` at the position of ``x_i``
predicts ``y_i``. So the prediction for example ``i`` sees ``x_1..x_i`` and ``y_1..y_{i-1}`` only.

The backbone's blocks are the ``nn.ModuleList`` at ``model.blocks_path`` (``"backbone.h"`` for GPT-2,
``"backbone.layers"`` for Mamba-2); in transformers 5 each block returns a plain tensor
``[batch, 2K, d_model]`` (the residual stream after that block), ready for forward hooks.
Position ``2i`` is the ``x_{i+1}`` token, ``2i + 1`` the ``y_{i+1}`` token (0-based).

Named configs (``model_config(name)``):

* ``paper``: GPT-2, 12 layers, d_model 256, 8 heads (~9.5M parameters; the appendix's size).
* ``small``: GPT-2, 8 layers, d_model 32, 8 heads of 4 dims (~104K parameters), ``"xy"`` tokens, eager attention
  (faster than SDPA on CPU at 20 tokens), the fused tanh GELU (GPT-2's function, ~8% faster on CPU); its
  run (``train.train_config("small")``) also shrinks the data to D = 8, rank 2, K = 10 (see
  docs/synthetic.md).
* ``tiny``: GPT-2, 2 layers, d_model 32, 2 heads, for tests.

Each accepts ``backbone="mamba2"`` (Mamba-2 blocks of the same depth and width; heads of ``head_dim``
channels, ``expand = 2``; runs on CPU through transformers' slow reference path).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..validate import check_choice, check_int

__all__ = [
    "ModelConfig",
    "SyntheticRegressor",
    "model_config",
    "MODEL_CONFIGS",
    "interleave",
    "x_positions",
    "y_positions",
]

Backbone = Literal["gpt2", "mamba2"]
BACKBONES: tuple[str, ...] = ("gpt2", "mamba2")
TOKEN_LAYOUTS: tuple[str, ...] = ("garg", "xy")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and size. ``n_dims`` (D) and ``n_points`` (K) must match the data config."""

    backbone: Backbone = "gpt2"
    n_layer: int = 12
    d_model: int = 256
    n_head: int = 8  # GPT-2 attention heads (Mamba-2 uses d_model * expand // head_dim heads)
    n_dims: int = 16
    n_points: int = 20
    # token layout (see ``interleave``): "garg" (Garg et al. 2022, the paper's) or "xy" (the y token also
    # carries x and a y-token flag; small models leave the zero-predictor plateau far sooner with it)
    tokens: Literal["garg", "xy"] = "garg"
    # GPT-2 only
    attn_implementation: str = "sdpa"
    # GPT-2's MLP activation: "gelu_new" (GPT-2's tanh GELU, composed of elementwise ops) or any
    # transformers ACT2FN name, e.g. "gelu_pytorch_tanh" (the same function as one fused kernel)
    activation: str = "gelu_new"
    # "token": position t for token t (plain GPT-2, the default); "example": x_i and y_i share position i
    position_ids: Literal["token", "example"] = "token"
    init_std: float | None = None  # GPT-2 initializer_range (None: HF's 0.02)
    pos_init_std: float | None = None  # std of the learned position embeddings at init (None: init_std)
    # Mamba-2 only
    d_state: int = 16
    head_dim: int = 16
    expand: int = 2
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 16  # SSD chunk; on CPU (reference path) smaller is faster for 2K = 40 tokens

    def __post_init__(self) -> None:
        check_choice("ModelConfig.backbone", self.backbone, BACKBONES)
        for name in ("n_layer", "d_model", "n_head", "n_dims", "n_points", "d_state", "head_dim", "expand"):
            check_int(f"ModelConfig.{name}", getattr(self, name), 1)
        if self.backbone == "gpt2" and self.d_model % self.n_head != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.backbone == "gpt2":
            from transformers.activations import ACT2FN

            if self.activation not in ACT2FN:
                raise ValueError(f"unknown activation {self.activation!r}; transformers knows {sorted(ACT2FN)}")
        if self.tokens not in TOKEN_LAYOUTS:
            raise ValueError(f"unknown token layout {self.tokens!r}; expected one of {TOKEN_LAYOUTS}")
        if self.position_ids not in ("token", "example"):
            raise ValueError(f"position_ids must be 'token' or 'example', got {self.position_ids!r}")
        if self.backbone == "mamba2":
            inner = self.d_model * self.expand
            if inner % self.head_dim != 0:
                raise ValueError(f"d_model * expand ({inner}) must be divisible by head_dim ({self.head_dim})")
            if (inner // self.head_dim) % self.n_groups != 0:
                raise ValueError(f"Mamba-2 heads ({inner // self.head_dim}) must be divisible by n_groups")

    @property
    def token_dim(self) -> int:
        """Width of a token before the read-in: ``D`` ("garg") or ``D + 2`` ("xy")."""
        return self.n_dims + (2 if self.tokens == "xy" else 0)

    @property
    def n_positions(self) -> int:
        return self.n_points if self.position_ids == "example" else 2 * self.n_points

    def to_dict(self) -> dict:
        return asdict(self)


MODEL_CONFIGS: dict[str, ModelConfig] = {
    "paper": ModelConfig(n_layer=12, d_model=256, n_head=8),
    "small": ModelConfig(n_layer=8, d_model=32, n_head=8, tokens="xy", attn_implementation="eager",
                         activation="gelu_pytorch_tanh"),
    "tiny": ModelConfig(n_layer=2, d_model=32, n_head=2, head_dim=16, d_state=8, chunk_size=8,
                        attn_implementation="eager"),
}


def model_config(name: str, **overrides) -> ModelConfig:
    """A named config (``paper``, ``small``, ``tiny``) with field overrides, e.g. ``backbone="mamba2"``."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; available: {sorted(MODEL_CONFIGS)}")
    return replace(MODEL_CONFIGS[name], **overrides)


def interleave(
    xs: Float[Tensor, "batch n_points n_dims"], ys: Float[Tensor, "batch n_points"], tokens: str = "garg"
) -> Float[Tensor, "batch two_n_points token_dim"]:
    """The token sequence ``x_1, y_1, x_2, y_2, ...`` before the read-in.

    ``"garg"`` (Garg et al. 2022): x tokens ``x_i``, y tokens ``[y_i, 0, ..., 0]`` (width ``D``).
    ``"xy"``: x tokens ``[x_i, 0, 0]``, y tokens ``[x_i, y_i, 1]`` (width ``D + 2``): each y token holds its
    whole example and a flag, so one attention layer can already regress (no previous-token head needed).
    """
    b, k, d = xs.shape
    if ys.shape != (b, k):
        raise ValueError(f"ys must have shape {(b, k)} to match xs {tuple(xs.shape)}, got {tuple(ys.shape)}")
    if tokens == "garg":
        x_tok = xs
        y_tok = torch.zeros_like(xs)
        y_tok[..., 0] = ys
    elif tokens == "xy":
        zeros = xs.new_zeros(b, k, 1)
        x_tok = torch.cat((xs, zeros, zeros), dim=-1)
        y_tok = torch.cat((xs, ys.unsqueeze(-1), torch.ones_like(zeros)), dim=-1)
    else:
        raise ValueError(f"unknown token layout {tokens!r}; expected one of {TOKEN_LAYOUTS}")
    return torch.stack((x_tok, y_tok), dim=2).reshape(b, 2 * k, x_tok.shape[-1])


def x_positions(n_points: int) -> Tensor:
    """Token positions of ``x_1..x_K`` (where predictions are read out)."""
    return torch.arange(n_points) * 2


def y_positions(n_points: int) -> Tensor:
    """Token positions of ``y_1..y_K`` (the paper's UMAP uses the y token of the 20th demonstration)."""
    return torch.arange(n_points) * 2 + 1


def _build_backbone(cfg: ModelConfig) -> nn.Module:
    if cfg.backbone == "gpt2":
        from transformers import GPT2Config, GPT2Model

        hf = GPT2Config(
            vocab_size=1,
            n_positions=cfg.n_positions,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
            bos_token_id=None,
            eos_token_id=None,
            activation_function=cfg.activation,
            **({} if cfg.init_std is None else {"initializer_range": cfg.init_std}),
        )
        hf._attn_implementation = cfg.attn_implementation
        return GPT2Model(hf)
    from transformers import Mamba2Config, Mamba2Model

    hf = Mamba2Config(
        vocab_size=1,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layer,
        state_size=cfg.d_state,
        expand=cfg.expand,
        head_dim=cfg.head_dim,
        num_heads=cfg.d_model * cfg.expand // cfg.head_dim,
        n_groups=cfg.n_groups,
        conv_kernel=cfg.conv_kernel,
        chunk_size=cfg.chunk_size,
        use_cache=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    return Mamba2Model(hf)


class SyntheticRegressor(nn.Module):
    """``forward(xs, ys) -> predictions [B, K]``; prediction ``i`` is read out at the ``x_i`` token.

    Initialisation: ``SyntheticRegressor(cfg, seed=s)`` initialises inside ``torch.random.fork_rng`` seeded
    with ``s`` (the global RNG is restored afterwards); ``seed=None`` uses the global RNG as is.
    """

    def __init__(self, cfg: ModelConfig, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        if seed is None:
            self._init_modules()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self._init_modules()

    def _init_modules(self) -> None:
        cfg = self.cfg
        self.read_in = nn.Linear(cfg.token_dim, cfg.d_model)
        self.backbone = _build_backbone(cfg)
        if cfg.backbone == "gpt2" and cfg.pos_init_std is not None:
            nn.init.normal_(self.backbone.wpe.weight, std=cfg.pos_init_std)
        self.read_out = nn.Linear(cfg.d_model, 1)

    @property
    def blocks_path(self) -> str:
        """Attribute path of the ``nn.ModuleList`` of blocks (for hook adapters)."""
        return "backbone.h" if self.cfg.backbone == "gpt2" else "backbone.layers"

    @property
    def blocks(self) -> nn.ModuleList:
        return functools.reduce(getattr, self.blocks_path.split("."), self)

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layer

    def embed(
        self, xs: Float[Tensor, "batch n_points n_dims"], ys: Float[Tensor, "batch n_points"]
    ) -> Float[Tensor, "batch two_n_points d_model"]:
        """Read-in of the interleaved tokens (the backbone's ``inputs_embeds``)."""
        k = xs.shape[1]
        if k < 1 or k > self.cfg.n_points:
            raise ValueError(f"number of examples must be in [1, {self.cfg.n_points}], got {k}")
        if xs.shape[-1] != self.cfg.n_dims:
            raise ValueError(f"xs last dim must be n_dims={self.cfg.n_dims}, got {xs.shape[-1]}")
        return self.read_in(interleave(xs, ys, self.cfg.tokens))

    def hidden(
        self, xs: Float[Tensor, "batch n_points n_dims"], ys: Float[Tensor, "batch n_points"]
    ) -> Float[Tensor, "batch two_n_points d_model"]:
        """Final hidden states (after the backbone's final norm) at every token."""
        emb = self.embed(xs, ys)
        kwargs = {}
        if self.cfg.backbone == "gpt2" and self.cfg.position_ids == "example":
            kwargs["position_ids"] = (torch.arange(emb.shape[1], device=emb.device) // 2).unsqueeze(0)
        return self.backbone(inputs_embeds=emb, use_cache=False, **kwargs).last_hidden_state

    def forward(
        self, xs: Float[Tensor, "batch n_points n_dims"], ys: Float[Tensor, "batch n_points"]
    ) -> Float[Tensor, "batch n_points"]:
        h = self.hidden(xs, ys)
        return self.read_out(h[:, ::2]).squeeze(-1)

    def num_parameters(self, exclude_token_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_token_embedding:
            n -= self.backbone.get_input_embeddings().weight.numel()
        return n

