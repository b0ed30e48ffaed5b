"""Sites and plain hook functions. Knows tensors only: no model, no backend.

A hook is a plain function ``fn(activation, ctx) -> activation | None`` attached to a named
site, as in TransformerLens. ``activation`` is ``[batch, seq_chunk, d_model]``; ``ctx`` is a
:class:`HookContext` saying which site fired, which generation step this is, and how the chunk's
columns map onto prompt positions. Returning ``None`` leaves the activation unchanged; returning a
tensor replaces it (it must keep the shape, dtype and device).

Positions are given in *prompt coordinates*, the same on every backend and independent of padding:

* a negative int counts from the end of the prompt (``-1`` is the last prompt token, i.e. the
  token right before the answer);
* a non-negative int is an index into the prompt's own (unpadded) tokens;
* a sequence or 1-D tensor of ints gives one such position per prompt;
* ``None`` means every position of the chunk (including generated tokens).

During cached generation the prefill (step 0) holds the whole prompt and later steps hold one new
token each, so a hook at a prompt position fires only in the prefill; the KV cache carries its
effect forward. Backends that recompute the prefix every step (TransformerLens, see
``adapters/transformer_lens.py``) re-apply it every step, which is the same computation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

COMPONENTS: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "mixer_out", "resid_post")
"""Components a site may name, in forward order within a block."""

_SITE_RE = re.compile(r"^blocks\.(-?\d+)\.hook_([a-z_]+)$")

Position = Union[int, Sequence[int], Tensor, None]


@dataclass(frozen=True, order=True)
class Site:
    """A place in the model: the ``component`` of block ``layer`` (0-indexed).

    ``resid_post`` is the block's output (the residual stream after block ``layer``),
    ``resid_pre`` its input, ``attn_out`` / ``mlp_out`` / ``mixer_out`` the sublayer outputs
    before they are added to the residual stream. Names follow TransformerLens:
    ``Site(3, "resid_post").name == "blocks.3.hook_resid_post"``.
    """

    layer: int
    component: str = "resid_post"

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise TypeError(f"Site layer must be an int, got {type(self.layer).__name__}")
        if self.component not in COMPONENTS:
            raise ValueError(f"unknown site component {self.component!r}; known components: {COMPONENTS}")

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.component}"

    @property
    def order(self) -> tuple[int, int]:
        """Sort key in forward order."""
        return (self.layer, COMPONENTS.index(self.component))

    def __str__(self) -> str:
        return self.name


def parse_site(site: str | Site | int, n_layers: int | None = None) -> Site:
    """Turn ``"blocks.3.hook_resid_post"``, ``Site`` or a bare layer int into a checked ``Site``.

    Negative layers count from the end when ``n_layers`` is known. Raises ``ValueError`` for an
    unparseable name, an unknown component, or a layer out of range.
    """
    if isinstance(site, Site):
        out = site
    elif isinstance(site, int) and not isinstance(site, bool):
        out = Site(site)
    elif isinstance(site, str):
        m = _SITE_RE.match(site)
        if m is None:
            raise ValueError(
                f"unknown site {site!r}: expected 'blocks.<layer>.hook_<component>' with component in {COMPONENTS}"
            )
        out = Site(int(m.group(1)), m.group(2))
    else:
        raise TypeError(f"a site must be a str, Site or int, got {type(site).__name__}")
    if n_layers is not None:
        layer = out.layer + n_layers if out.layer < 0 else out.layer
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {out.layer} out of range for a model with {n_layers} layers")
        out = Site(layer, out.component)
    return out


def resolve_layers(layers: str | int | Sequence[int], n_layers: int) -> list[int]:
    """``"all"``, an int or a sequence of ints (negative from the end) -> checked layer indices."""
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all', an int or a list of ints, got {layers!r}")
        return list(range(n_layers))
    seq = [layers] if isinstance(layers, int) else list(layers)
    if not seq:
        raise ValueError("empty list of layers")
    return [parse_site(int(layer), n_layers).layer for layer in seq]


@dataclass
class HookContext:
    """What a hook knows about the call it runs in.

    ``pad[b]`` is the number of left-padding tokens of row ``b``; ``prompt_len`` the padded prompt
    length; ``offset`` the absolute column of the chunk's first token (0 in the prefill);
    ``step`` the generation step (0 = prefill / plain forward); ``indices[b]`` the index of row
    ``b`` among the ``n_prompts`` prompts of the call (the adapter sorts and batches prompts:
    per-prompt positions and vectors are given in call order and looked up through ``indices``).
    """

    site: Site
    pad: Int[Tensor, " batch"]
    prompt_len: int
    step: int = 0
    offset: int = 0
    indices: Int[Tensor, " batch"] | None = None
    n_prompts: int | None = None

    def __post_init__(self) -> None:
        if self.indices is None:
            self.indices = torch.arange(self.pad.shape[0], device=self.pad.device)
        if self.n_prompts is None:
            self.n_prompts = int(self.pad.shape[0])

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def layer(self) -> int:
        return self.site.layer

    def per_prompt(self, values: Tensor, what: str) -> Tensor:
        """Rows of a per-prompt tensor (first dim = n_prompts, call order) for this batch."""
        if values.ndim == 0 or values.shape[0] != self.n_prompts:
            raise ValueError(
                f"per-prompt {what} at {self.name} must have first dim {self.n_prompts} (one per prompt), "
                f"got shape {list(values.shape)}"
            )
        return values[self.indices.to(values.device)]

    def columns(self, position: Position, batch: int, chunk_len: int) -> tuple[Tensor, Tensor]:
        """Rows and chunk columns of ``position`` that fall inside this chunk.

        Returns ``(rows, cols)`` index tensors (possibly empty) for advanced indexing
        ``act[rows, cols]``.
        """
        device = self.pad.device
        if position is None:
            rows = torch.arange(batch, device=device).repeat_interleave(chunk_len)
            cols = torch.arange(chunk_len, device=device).repeat(batch)
            return rows, cols
        if not (isinstance(position, int) and not isinstance(position, bool)):
            position = self.per_prompt(torch.as_tensor(position), "positions")
        absolute = resolve_positions(position, self.pad, self.prompt_len)
        rel = absolute - self.offset
        keep = (rel >= 0) & (rel < chunk_len)
        rows = torch.arange(batch, device=device)
        if rel.ndim == 2:  # several positions per prompt: row-major (prompt, position) pairs
            rows = rows[:, None].expand_as(rel)
        return rows[keep], rel[keep]


def resolve_positions(position: int | Sequence[int] | Tensor, pad: Int[Tensor, " batch"], prompt_len: int) -> Int[Tensor, " batch"]:
    """Prompt coordinates -> absolute column per row of a left-padded batch (see module doc).

    ``position`` is an int, one position per row (``[batch]``) or several per row (``[batch, m]``,
    e.g. every demonstration's answer-preceding token); the result has the same shape.
    """
    batch = pad.shape[0]
    if isinstance(position, int) and not isinstance(position, bool):
        pos = torch.full((batch,), position, dtype=torch.long, device=pad.device)
    else:
        pos = torch.as_tensor(position, device=pad.device)
        if pos.dtype.is_floating_point or pos.dtype == torch.bool:
            raise TypeError(f"positions must be integers, got a tensor of dtype {pos.dtype}")
        pos = pos.long()
        if pos.ndim not in (1, 2) or pos.shape[0] != batch:
            raise ValueError(f"per-prompt positions must have shape [{batch}] or [{batch}, m], got {list(pos.shape)}")
    lengths = (prompt_len - pad).view(-1, *([1] * (pos.ndim - 1)))
    too_far = (pos >= lengths) | (pos < -lengths)
    if bool(too_far.any()):
        b = int(too_far.nonzero()[0, 0])
        raise ValueError(f"position {int(pos[b].flatten()[0]) if pos.ndim == 1 else pos[b].tolist()} out of range "
                         f"for prompt {b} of {int(lengths[b].flatten()[0])} tokens")
    return torch.where(pos < 0, prompt_len + pos, pad.view_as(lengths) + pos)


HookFn = Callable[[Tensor, HookContext], Tensor | None]
"""The one hook signature: ``fn(activation [batch, seq, d], ctx) -> activation | None``."""


def checked_call(fn: HookFn, act: Tensor, ctx: HookContext) -> Tensor:
    """Run a user hook and check what it returns: same shape, dtype and device, never a broadcast."""
    out = fn(act, ctx)
    if out is None:
        return act
    if not isinstance(out, Tensor):
        raise TypeError(f"hook at {ctx.name} returned {type(out).__name__}; return a Tensor or None")
    if out.shape != act.shape:
        raise ValueError(
            f"hook at {ctx.name} returned shape {list(out.shape)}, expected {list(act.shape)} (no broadcasting)"
        )
    if out.dtype != act.dtype:
        raise ValueError(f"hook at {ctx.name} returned dtype {out.dtype}, expected {act.dtype}")
    if out.device != act.device:
        raise ValueError(f"hook at {ctx.name} returned a tensor on {out.device}, expected {act.device}")
    return out


# --------------------------------------------------------------------------------------------
# Hook factories: plain functions researchers compose with their own.


def capture(
    store: dict, key: object = None, position: Position = -1, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> HookFn:
    """Hook that records ``act[row, position]`` (``[batch, d]``) into ``store[key or ctx.name]``.

    Records in the prefill only (step 0). With ``position=None`` records the whole ``[batch, seq, d]``
    chunk (mind the memory). With several positions per prompt (``[n_prompts, m]``) records
    ``[batch, m, d]``.
    """
    m = None
    if position is not None and not isinstance(position, int):
        shape = torch.as_tensor(position).shape
        m = shape[1] if len(shape) == 2 else None

    def hook(act: Tensor, ctx: HookContext) -> None:
        if ctx.step != 0:
            return None
        k = ctx.name if key is None else key
        if position is None:
            store[k] = act.detach().to(device=device, dtype=dtype)
            return None
        rows, cols = ctx.columns(position, act.shape[0], act.shape[1])
        if rows.shape[0] != act.shape[0] * (m or 1):
            raise ValueError(f"capture position {position!r} is not inside the prefill at {ctx.name}")
        got = act[rows, cols].detach().to(device=device, dtype=dtype)
        store[k] = got if m is None else got.view(act.shape[0], m, act.shape[-1])
        return None

    return hook


def _tag(hook: HookFn, position: Position) -> HookFn:
    """Record which prompt positions a hook writes (``hook.position``), so callers can tell a
    last-token intervention (``-1``: earlier positions' keys and values are untouched, a shared
    prompt prefix can be reused) from one that needs the whole prompt recomputed."""
    hook.position = position  # type: ignore[attr-defined]
    return hook


def writes_last_token_only(fn: HookFn) -> bool:
    """True for hooks built by :func:`add`, :func:`replace` or :func:`ablate` at ``position=-1``."""
    pos = getattr(fn, "position", None)
    return isinstance(pos, int) and not isinstance(pos, bool) and pos == -1


def _vector_rows(vector: Tensor, rows: Tensor, act: Tensor, ctx: HookContext) -> Tensor:
    d = act.shape[-1]
    v = vector.to(device=act.device, dtype=act.dtype)
    if v.ndim == 1:
        if v.shape[0] != d:
            raise ValueError(f"vector for {ctx.name} has size {v.shape[0]}, the model's d_model is {d}")
        return v.expand(rows.shape[0], d)
    if v.ndim == 2:
        if v.shape[1] != d:
            raise ValueError(f"vectors for {ctx.name} have size {v.shape[1]}, the model's d_model is {d}")
        return ctx.per_prompt(v, "vectors")[rows]
    raise ValueError(f"vector for {ctx.name} must be [d_model] or [n_prompts, d_model], got {list(v.shape)}")


def add(vector: Float[Tensor, "*batch d_model"], position: Position = -1, scale: float = 1.0) -> HookFn:
    """Hook that adds ``scale * vector`` at ``position``.

    ``vector`` is ``[d_model]`` (same for every prompt) or ``[n_prompts, d_model]`` (one per prompt,
    in the order the prompts were given to the adapter call).
    """

    def hook(act: Tensor, ctx: HookContext) -> Tensor | None:
        rows, cols = ctx.columns(position, act.shape[0], act.shape[1])
        if rows.numel() == 0:
            return None
        out = act.clone()
        out[rows, cols] = act[rows, cols] + scale * _vector_rows(vector, rows, act, ctx)
        return out

    return _tag(hook, position)


def replace(vector: Float[Tensor, "*batch d_model"], position: Position = -1) -> HookFn:
    """Hook that overwrites the activation at ``position`` with ``vector`` (``[d]`` or ``[n_prompts, d]``)."""

    def hook(act: Tensor, ctx: HookContext) -> Tensor | None:
        rows, cols = ctx.columns(position, act.shape[0], act.shape[1])
        if rows.numel() == 0:
            return None
        out = act.clone()
        out[rows, cols] = _vector_rows(vector, rows, act, ctx)
        return out

    return _tag(hook, position)


def ablate(position: Position = -1, value: float | Tensor = 0.0) -> HookFn:
    """Hook that sets the activation at ``position`` to ``value`` (zero by default, or a mean vector)."""

    def hook(act: Tensor, ctx: HookContext) -> Tensor | None:
        rows, cols = ctx.columns(position, act.shape[0], act.shape[1])
        if rows.numel() == 0:
            return None
        out = act.clone()
        if isinstance(value, Tensor):
            out[rows, cols] = _vector_rows(value, rows, act, ctx)
        else:
            out[rows, cols] = value
        return out

    return _tag(hook, position)


HookSpec = Sequence[tuple[str | Site | int, HookFn]]
"""A list of ``(site, fn)`` pairs."""


def normalize_hooks(hooks: HookSpec, n_layers: int, components: Sequence[str]) -> list[tuple[Site, HookFn]]:
    """Check sites against the model and sort the hooks into forward order (stable)."""
    out = []
    for item in hooks:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"hooks must be (site, fn) pairs, got {item!r}")
        site, fn = item
        s = parse_site(site, n_layers)
        if s.component not in components:
            raise ValueError(f"site {s.name}: this backend/model has no {s.component!r}; available: {tuple(components)}")
        if not callable(fn):
            raise TypeError(f"hook for {s.name} is not callable")
        out.append((s, fn))
    return sorted(out, key=lambda p: p[0].order)
