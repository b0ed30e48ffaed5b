"""TransformerLens 4.x backend: a ``TransformerBridge`` and its named hook points.

Sites map onto the bridge's canonical hook names (``blocks.{l}.hook_in`` / ``hook_out`` /
``hook_attn_out`` / ``hook_mlp_out`` / ``hook_mixer_out``); hooks attach with ``bridge.hooks()``,
which TransformerLens removes on exit, error included.

Generation recomputes the whole prefix at every step instead of using the KV cache: with a
left-padded batch, the bridge's cached decoding in TransformerLens 4.3 does not match Hugging Face's
(padded rows diverge after the first new token), while the uncached forward matches it to 1e-7.
Prompt-position hooks are re-applied at every step, which is the same computation as applying them
once in a cached prefill.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from itertools import groupby

import torch
from torch import Tensor

from ..hooks import HookFn, Site, checked_call
from .arch import takes_position_ids
from .base import Adapter, LogitsMode, ModelInputs, _CallState

HOOK_NAMES = {
    "resid_pre": "hook_in",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "mixer_out": "hook_mixer_out",
    "resid_post": "hook_out",
}
HEAD_HOOK_NAMES = {"z": "attn.hook_z"}
"""Per-head sites: the bridge's own ``blocks.{l}.attn.hook_z`` (``[batch, seq, n_heads, d_head]``)."""


def bridge_from_hf(model: torch.nn.Module, tokenizer: object, name: str | None = None) -> object:
    """Wrap a Hugging Face causal LM in a ``TransformerBridge`` (offline; modifies ``model`` in place).

    The bridge gets a private copy of ``tokenizer`` loaded from a directory (it needs one it can
    reload, and it adjusts it, e.g. to prepend BOS); the directory lives as long as the bridge. The
    adapter keeps tokenizing with the user's own tokenizer, so every backend sees the same ids.
    """
    from transformer_lens import TransformerBridge
    from transformers import AutoTokenizer

    name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or "local-model"
    tok_dir = tempfile.mkdtemp(prefix="taskvec-tokenizer-")
    try:
        tokenizer.save_pretrained(tok_dir)
        bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=AutoTokenizer.from_pretrained(tok_dir))
    except BaseException:
        shutil.rmtree(tok_dir, ignore_errors=True)
        raise
    weakref.finalize(bridge, shutil.rmtree, tok_dir, True)
    return bridge


def wrap_hf(model: torch.nn.Module, tokenizer: object | None) -> object:
    """The backend's ``wrap``: a Hugging Face causal LM and its tokenizer -> a ``TransformerBridge``."""
    if tokenizer is None:
        raise ValueError("backend 'transformer_lens' needs a tokenizer to wrap a Hugging Face model")
    return bridge_from_hf(model, tokenizer)


class TransformerLensAdapter(Adapter):
    """Backend on a TransformerLens 4.x ``TransformerBridge`` (from HF models or ``boot_native``).

    Pass the model's own ``tokenizer``; without one the bridge's tokenizer is used, which follows
    TransformerLens conventions (it may prepend BOS where Hugging Face would not).
    """

    backend = "transformer_lens"

    def __init__(self, bridge: object, tokenizer: object | None = None, add_special_tokens: bool = True) -> None:
        from transformer_lens import TransformerBridge

        if not isinstance(bridge, TransformerBridge):
            raise TypeError(f"TransformerLensAdapter needs a TransformerBridge, got {type(bridge).__name__}")
        self.bridge = bridge
        names = bridge.hook_dict
        components = [c for c, h in HOOK_NAMES.items() if f"blocks.0.{h}" in names]
        original = getattr(bridge, "original_model", None)
        model_type = getattr(getattr(original, "config", None), "model_type", None)
        # position ids where the wrapped model's forward takes them (measured, as for the other backends;
        # a boot_native bridge wraps no HF model: none)
        position_ids = callable(getattr(original, "forward", None)) and takes_position_ids(original)
        param = next(bridge.parameters(), None)
        cfg = bridge.cfg
        has_z = f"blocks.0.{HEAD_HOOK_NAMES['z']}" in names and isinstance(getattr(cfg, "n_heads", None), int)
        super().__init__(
            model=bridge, n_layers=cfg.n_layers, d_model=cfg.d_model,
            tokenizer=tokenizer if tokenizer is not None else bridge.tokenizer,
            device=param.device if param is not None else torch.device("cpu"),
            n_ctx=None if model_type in ("mamba", "mamba2") else getattr(cfg, "n_ctx", None),
            components=components, position_ids=position_ids, add_special_tokens=add_special_tokens,
            n_heads=cfg.n_heads if has_z else None,
            no_heads_reason=None if has_z else "this TransformerBridge has no blocks.0.attn.hook_z hook point",
        )

    @contextlib.contextmanager
    def _attached(self, hooks: list[tuple[Site, HookFn]], state: _CallState, stop: bool = False) -> Iterator[None]:
        fwd = []
        groups = [(site, [f for _, f in group]) for site, group in groupby(hooks, key=lambda p: p[0])]
        for i, (site, fns) in enumerate(groups):
            name = f"blocks.{site.layer}.{HEAD_HOOK_NAMES.get(site.component) or HOOK_NAMES[site.component]}"
            fwd.append((name, _tl_hook(fns, site, state, stop=stop and i == len(groups) - 1)))
        with self.bridge.hooks(fwd_hooks=fwd):
            yield

    def _call(self, kwargs: dict, hooks: list[tuple[Site, HookFn]], state: _CallState, stop: bool = False):
        kwargs = dict(kwargs)
        ids = kwargs.pop("input_ids")
        with self._attached(hooks, state, stop):
            return self.bridge(ids, **kwargs)

    def _forward(self, inputs: ModelInputs, hooks: list[tuple[Site, HookFn]], state: _CallState,
                 logits: LogitsMode) -> Tensor | None:
        if logits == "none" and hooks:
            # only the hooks' side effects are wanted: stop right after the last hooked site
            try:
                self._call(inputs.kwargs, hooks, state, stop=True)
            except _StopForward:
                pass
            return None
        out = self._call(inputs.kwargs, hooks, state)
        return out[:, -1] if logits == "last" else out

    def _generate(self, inputs: ModelInputs, hooks: list[tuple[Site, HookFn]], state: _CallState,
                  max_new_tokens: int) -> Tensor:
        eos = self.tokenizer.eos_token_id
        ids = inputs.kwargs["input_ids"]
        mask = inputs.kwargs["attention_mask"]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        new = []
        for step in range(max_new_tokens):
            state.step, state.offset = step, 0
            kwargs = {"input_ids": ids, "attention_mask": mask}
            if self.uses_position_ids:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            nxt = self._call(kwargs, hooks, state)[:, -1].argmax(-1)
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done |= nxt == eos
            new.append(nxt)
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        return torch.stack(new, 1)


class _StopForward(Exception):
    """Raised after the last hooked site when only activations are wanted."""


def _tl_hook(fns: list[HookFn], site: Site, state: _CallState, stop: bool = False):
    def hook(act: Tensor, hook: object) -> Tensor:
        for fn in fns:
            act = checked_call(fn, act, state.context(site))
        if stop:
            raise _StopForward
        return act

    return hook
