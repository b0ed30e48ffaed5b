"""Where the blocks and sublayers live in each architecture: a small table, one row per family.

Adding a model family is adding a row (keyed by ``config.model_type``), not an if/elif chain.
Paths are dotted attribute paths: ``blocks`` from the model root to the ``nn.ModuleList`` of blocks,
the others relative to one block. ``None`` means the family has no such sublayer.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    blocks: str
    attn: str | None = None
    mlp: str | None = None
    mixer: str | None = None
    final_norm: str | None = None
    position_ids: bool = True
    """Whether the model's forward takes ``position_ids`` (left padding needs them)."""
    hidden_states_has_embeddings: bool = True
    """Whether ``output_hidden_states`` starts with the embeddings (GPT-2/Llama) or not (Mamba)."""

    @property
    def components(self) -> tuple[str, ...]:
        comps = ["resid_pre"]
        comps += [name for name, path in (("attn_out", self.attn), ("mlp_out", self.mlp), ("mixer_out", self.mixer)) if path]
        return (*comps, "resid_post")

    def sublayer(self, component: str) -> str | None:
        return {"attn_out": self.attn, "mlp_out": self.mlp, "mixer_out": self.mixer}.get(component)


_DECODER = ArchSpec(blocks="model.layers", attn="self_attn", mlp="mlp", final_norm="model.norm")

ARCHS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(blocks="transformer.h", attn="attn", mlp="mlp", final_norm="transformer.ln_f"),
    "gpt_neox": ArchSpec(blocks="gpt_neox.layers", attn="attention", mlp="mlp", final_norm="gpt_neox.final_layer_norm"),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "olmo": _DECODER,
    "olmo2": _DECODER,
    "phi3": _DECODER,
    "mamba": ArchSpec(blocks="backbone.layers", mixer="mixer", final_norm="backbone.norm_f", position_ids=False,
                      hidden_states_has_embeddings=False),
    "mamba2": ArchSpec(blocks="backbone.layers", mixer="mixer", final_norm="backbone.norm_f", position_ids=False,
                       hidden_states_has_embeddings=False),
}


def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            raise ValueError(f"{type(root).__name__} has no submodule {path!r} (missing {part!r})")
        mod = getattr(mod, part)
    return mod


def find_arch(model: nn.Module, blocks: str | None = None) -> ArchSpec:
    """The table row for ``model``; or a row built from an explicit ``blocks`` path (custom models).

    Custom modules may also declare ``blocks_path`` (a str attribute), as the synthetic models do.
    """
    if blocks is None:
        blocks = getattr(model, "blocks_path", None)
    if blocks is not None:
        spec = ArchSpec(blocks=blocks, position_ids=False)
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in ARCHS:
            raise ValueError(
                f"no architecture row for model_type {model_type!r} ({type(model).__name__}); known: "
                f"{sorted(ARCHS)}. Pass blocks='path.to.ModuleList' or add a row to taskvec_interp.adapters.arch.ARCHS"
            )
        spec = ARCHS[model_type]
    mods = get_module(model, spec.blocks)
    if not isinstance(mods, (nn.ModuleList, nn.Sequential)) or len(mods) == 0:
        raise ValueError(f"{spec.blocks!r} of {type(model).__name__} is not a non-empty ModuleList of blocks")
    return spec
