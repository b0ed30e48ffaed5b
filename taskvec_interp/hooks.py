"""Sites and plain hook functions. Knows tensors only: no model, no backend.

A hook is a plain function ``fn(activation, hook) -> activation | None`` attached to a named
site, as in TransformerLens. ``activation`` is ``[batch, seq_chunk, d_model]``; ``hook`` is a
:class:`HookContext` saying which site fired (``hook.name``, ``hook.layer()``, as on a TransformerLens
``HookPoint``), which generation step this is, and how the chunk's columns map onto prompt positions.
Returning ``None`` leaves the activation unchanged; returning a tensor replaces it (it must keep the
shape, dtype and device). A TransformerLens hook written as ``fn(act, hook)`` or one that takes ``hook``
by keyword (``functools.partial(fn, vec=v)`` with ``def fn(act, vec, hook)``) runs as it is; our
factories run in TransformerLens through :func:`as_tl_hook`, and activations captured elsewhere (a
TransformerLens cache, nnsight-saved tensors) reach the prompt's last token through :func:`last_token`.

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

import inspect
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

COMPONENTS: tuple[str, ...] = ("resid_pre", "z", "attn_out", "mlp_out", "mixer_out", "resid_post")
"""Components a site may name, in forward order within a block."""
HEAD_COMPONENTS: tuple[str, ...] = ("z",)
"""Per-head components: activations ``[batch, seq, n_heads, d_head]``, named ``blocks.{l}.attn.hook_{c}``
as in TransformerLens. They are hooked by name only (never part of an adapter's ``site_names()``)."""

_SITE_RE = re.compile(r"^blocks\.(-?[0-9]{1,9})\.(attn\.)?hook_([a-z_]+)$")  # ASCII digits, a sane size
TL_ALIASES = {"in": "resid_pre", "out": "resid_post"}
"""TransformerBridge's canonical names for the residual stream (``blocks.3.hook_out`` is ``resid_post``)."""

Position = Union[int, Sequence[int], Tensor, None]


@dataclass(frozen=True, order=True)
class Site:
    """A place in the model: the ``component`` of block ``layer`` (0-indexed).

    ``resid_post`` is the block's output (the residual stream after block ``layer``),
    ``resid_pre`` its input, ``attn_out`` / ``mlp_out`` / ``mixer_out`` the sublayer outputs
    before they are added to the residual stream. ``z`` is the attention's per-head output before its
    output projection, ``[batch, seq, n_heads, d_head]`` (TransformerLens's ``hook_z``). Names follow
    TransformerLens: ``Site(3, "resid_post").name == "blocks.3.hook_resid_post"``,
    ``Site(3, "z").name == "blocks.3.attn.hook_z"``.
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
        if self.component in HEAD_COMPONENTS:
            return f"blocks.{self.layer}.attn.hook_{self.component}"
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
                f"unknown site {site!r}: expected 'blocks.<layer>.hook_<component>' with component in {COMPONENTS} "
                f"(per-head components {HEAD_COMPONENTS}: 'blocks.<layer>.attn.hook_<component>')"
            )
        attn, raw = m.group(2) is not None, m.group(3)
        comp = raw if attn else TL_ALIASES.get(raw, raw)
        if comp not in COMPONENTS:
            raise ValueError(f"unknown site component {raw!r} in {site!r}; known components: {COMPONENTS} "
                             f"(or TransformerBridge's {tuple('hook_' + a for a in TL_ALIASES)})")
        if attn != (comp in HEAD_COMPONENTS):
            want = f"blocks.{m.group(1)}.attn.hook_{comp}" if comp in HEAD_COMPONENTS else f"blocks.{m.group(1)}.hook_{comp}"
            raise ValueError(f"unknown site {site!r}: did you mean {want!r}?")
        out = Site(int(m.group(1)), comp)
    else:
        raise TypeError(f"a site must be a str, Site or int, got {type(site).__name__}")
    if n_layers is not None:
        layer = out.layer + n_layers if out.layer < 0 else out.layer
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {out.layer} out of range for a model with {n_layers} layers")
        out = Site(layer, out.component)
    return out


LAYER_FORMS: dict[str, str] = {
    "all": "'all'", "peak": "'peak'", "td:encoder": "'td:encoder'", "first": "'first:K'", "last": "'last:K'",
    "range": "'A-B'", "list": "ints like '3,5,7' (negative from the end)",
}
"""The layer-spec grammar, one parser for every command (:func:`parse_layers`): ``all``; ``peak`` (the layer of
the highest TD); ``td:encoder`` (layers ``0..peak``); ``first:K`` / ``last:K``; ``A-B`` (inclusive); a
comma-separated list of ints, an int, a list or a tensor of ints. Each command accepts the forms that make sense:"""
CAPTURE_LAYERS: tuple[str, ...] = ("all", "first", "last", "range", "list")
"""Layers to capture (``adapter.capture``, sweeps, trajectories)."""
PATCH_LAYERS: tuple[str, ...] = ("all", "peak", "first", "last", "range", "list")
"""Layers to patch (``PatchConfig.layers``): also the peak-TD layer."""
FINETUNE_LAYERS: tuple[str, ...] = ("all", "td:encoder", "first", "last", "range", "list")
"""Layers to fine-tune (``FinetuneConfig.layers``): also the TD "encoder", every layer up to the TD peak."""
LayerSpec = Union[str, int, Sequence[int], Tensor]

_FIRST_LAST = re.compile(r"^(first|last):(.*)$")
_RANGE = re.compile(r"^([0-9]+)\s*-\s*([0-9]+)$")
_INT = re.compile(r"^[+-]?[0-9]+$")  # ASCII digits only: no '1_000', no other scripts' digits
_MAX_DIGITS = 9
"""A layer or K with more digits is beyond any model (and never reaches int(), whose own limits would leak)."""


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _layer_error(what: str, allowed: Sequence[str], spec: object, detail: str = "") -> ValueError:
    forms = [LAYER_FORMS[a] for a in allowed]
    menu = forms[0] if len(forms) == 1 else ", ".join(forms[:-1]) + " or " + forms[-1]
    return ValueError(f"{what} must be {menu}, got {_short(spec)}" + (f": {detail}" if detail else ""))


def _layer_int(text: str, what: str, allowed: Sequence[str], spec: object) -> int:
    if not _INT.match(text):
        raise _layer_error(what, allowed, spec, f"{_short(text, 40)} is not an int")
    if len(text.lstrip("+-")) > _MAX_DIGITS:
        raise _layer_error(what, allowed, spec, f"{_short(text, 40)} ({len(text.lstrip('+-'))} digits) is beyond any "
                                                "model's layers")
    return int(text)


def _parse_layer_spec(spec: object, allowed: Sequence[str], what: str) -> tuple[str, object]:
    """``(form, payload)``: the syntax only (no model): ``("first", K)``, ``("range", (A, B))``,
    ``("list", [ints])``, or ``(form, None)`` for ``all`` / ``peak`` / ``td:encoder``."""
    unknown = [a for a in allowed if a not in LAYER_FORMS]
    if unknown:
        raise ValueError(f"unknown layer-spec forms {unknown}; known: {tuple(LAYER_FORMS)}")
    if isinstance(spec, str):
        s = spec.strip()
        if s in ("all", "peak", "td:encoder"):
            form, payload = s, None
        elif m := _FIRST_LAST.match(s):
            form, payload = m.group(1), _layer_int(m.group(2).strip(), what, allowed, spec)
        elif m := _RANGE.match(s):
            form, payload = "range", (_layer_int(m.group(1), what, allowed, spec),
                                      _layer_int(m.group(2), what, allowed, spec))
            if payload[0] > payload[1]:
                raise _layer_error(what, allowed, spec, f"the range is empty (start {payload[0]} > end {payload[1]})")
        else:
            items = [x.strip() for x in s.split(",") if x.strip()]
            if not items:
                raise _layer_error(what, allowed, spec, "no layers")
            form, payload = "list", [_layer_int(x, what, allowed, spec) for x in items]
    elif isinstance(spec, bool) or not isinstance(spec, (numbers.Integral, Sequence, Tensor)):
        raise _layer_error(what, allowed, spec)
    else:
        seq = [spec] if isinstance(spec, numbers.Integral) else (spec.tolist() if isinstance(spec, Tensor)
                                                                else list(spec))
        if isinstance(spec, Tensor) and spec.ndim == 0:
            seq = [spec.item()]
        if not seq:
            raise _layer_error(what, allowed, spec, "an empty list of layers")
        for layer in seq:  # never truncate: layers=[1.7] is an error, not layer 1 (numpy ints are fine)
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
                raise ValueError(f"{what} must be ints, got {layer!r} ({type(layer).__name__}) in {seq!r}")
        form, payload = "list", [int(x) for x in seq]
    if form not in allowed:
        raise _layer_error(what, allowed, spec)
    if form == "list":
        twice = sorted({x for x in payload if payload.count(x) > 1})  # type: ignore[union-attr]
        if twice:
            raise _layer_error(what, allowed, spec, f"repeats layer{'s' if len(twice) > 1 else ''} "
                               f"{', '.join(map(str, twice))}")
    return form, payload


def check_layer_spec(spec: LayerSpec, allowed: Sequence[str] = tuple(LAYER_FORMS), what: str = "layers"
                     ) -> str | list[int]:
    """The checks of :func:`parse_layers` that need no model; returns the spec's canonical form: explicit
    layers as a list of ints (``"8,12"`` -> ``[8, 12]``), any other form as its stripped string."""
    form, payload = _parse_layer_spec(spec, allowed, what)
    if form in ("first", "last") and payload < 1:  # type: ignore[operator]
        raise _layer_error(what, allowed, spec, "K must be >= 1")
    return payload if form == "list" else spec.strip()  # type: ignore[return-value,union-attr]


def parse_layers(spec: LayerSpec, n_layers: int, *, allowed: Sequence[str] = tuple(LAYER_FORMS),
                 peak: int | None = None, what: str = "layers") -> list[int]:
    """A layer spec (see :data:`LAYER_FORMS`; ``allowed``: the forms this caller accepts) -> checked layer
    indices of a model with ``n_layers`` layers, in the order given (ranges ascending; negative ints count from
    the end). ``peak``: the peak-TD layer, needed by ``peak`` and ``td:encoder``. Every error reads
    ``{what} must be <the allowed forms>, got <spec>: <why>``."""
    form, payload = _parse_layer_spec(spec, allowed, what)

    def out_of_range(layer: int) -> ValueError:
        return _layer_error(what, allowed, spec, f"layer {layer} out of range for a model with {n_layers} layers")

    if form == "all":
        return list(range(n_layers))
    if form in ("peak", "td:encoder"):
        if peak is None:
            raise _layer_error(what, allowed, spec, "it needs a TD sweep of this model (the peak of its TD curve)")
        if not 0 <= peak < n_layers:
            raise _layer_error(what, allowed, spec, f"the TD peak layer {peak} is out of range for a model with "
                                                    f"{n_layers} layers (a TD sweep of another model?)")
        return [peak] if form == "peak" else list(range(peak + 1))
    if form in ("first", "last"):
        k = payload
        if not 1 <= k <= n_layers:  # type: ignore[operator]
            raise _layer_error(what, allowed, spec, f"K must be in [1, {n_layers}] for a model with {n_layers} layers")
        return list(range(k)) if form == "first" else list(range(n_layers - k, n_layers))  # type: ignore[arg-type,operator]
    if form == "range":
        a, b = payload  # type: ignore[misc]
        if b >= n_layers:
            raise out_of_range(b)
        return list(range(a, b + 1))
    layers = []
    for layer in payload:  # type: ignore[union-attr]
        if not -n_layers <= layer < n_layers:
            raise out_of_range(layer)
        layers.append(layer % n_layers)
    twice = sorted({x for x in layers if layers.count(x) > 1})
    if twice:
        raise _layer_error(what, allowed, spec, f"repeats layer{'s' if len(twice) > 1 else ''} "
                           f"{', '.join(map(str, twice))} (negative layers count from the end)")
    return layers


def resolve_layers(layers: LayerSpec, n_layers: int, what: str = "layers") -> list[int]:
    """Layers to capture: :func:`parse_layers` with the :data:`CAPTURE_LAYERS` forms (``"all"``, ``first:K``,
    ``last:K``, ``A-B``, an int or ints, negative from the end) -> checked layer indices."""
    return parse_layers(layers, n_layers, allowed=CAPTURE_LAYERS, what=what)


class LayerIndex(int):
    """A layer number that is also callable: ``hook.layer`` and TransformerLens's ``hook.layer()`` both work."""

    def __call__(self) -> int:
        return int(self)


@dataclass
class HookContext:
    """What a hook knows about the call it runs in (the ``hook`` argument of a hook function).

    ``pad[b]`` is the column of row ``b``'s first real token (its left padding); ``prompt_len`` the
    padded prompt length; ``lengths[b]`` the number of real prompt tokens of row ``b`` (default
    ``prompt_len - pad``: left padding; a right-padded batch has ``pad = 0`` and shorter lengths);
    ``offset`` the absolute column of the chunk's first token (0 in the prefill); ``step`` the
    generation step (0 = prefill / plain forward); ``indices[b]`` the index of row ``b`` among the
    ``n_prompts`` prompts of the call (the adapter sorts and batches prompts: per-prompt positions and
    vectors are given in call order and looked up through ``indices``).

    Build one yourself for activations from elsewhere with :meth:`from_attention_mask`.
    """

    site: Site
    pad: Int[Tensor, " batch"]
    prompt_len: int
    step: int = 0
    offset: int = 0
    indices: Int[Tensor, " batch"] | None = None
    n_prompts: int | None = None
    lengths: Int[Tensor, " batch"] | None = None

    def __post_init__(self) -> None:
        if self.indices is None:
            self.indices = torch.arange(self.pad.shape[0], device=self.pad.device)
        if self.n_prompts is None:
            self.n_prompts = int(self.pad.shape[0])

    @classmethod
    def from_attention_mask(cls, attention_mask: Tensor, site: str | Site | int = 0) -> HookContext:
        """The context of a forward pass over a batch with this ``attention_mask`` (``[batch, seq]``, left or
        right padded; each row's real tokens contiguous), at ``site`` (a name such as
        ``"blocks.3.hook_resid_post"``, a :class:`Site` or a layer). Lets the hook factories and
        :func:`last_token` work on activations captured by TransformerLens or nnsight."""
        pad, lengths = mask_spans(attention_mask)
        return cls(site=parse_site(site), pad=pad, prompt_len=int(attention_mask.shape[1]), lengths=lengths)

    @property
    def name(self) -> str:
        return self.site.name

    @property
    def layer(self) -> LayerIndex:
        """The block index; callable too (``hook.layer()``), as on a TransformerLens ``HookPoint``."""
        return LayerIndex(self.site.layer)

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
        absolute = resolve_positions(position, self.pad, self.prompt_len, self.lengths)
        rel = absolute - self.offset
        keep = (rel >= 0) & (rel < chunk_len)
        rows = torch.arange(batch, device=device)
        if rel.ndim == 2:  # several positions per prompt: row-major (prompt, position) pairs
            rows = rows[:, None].expand_as(rel)
        return rows[keep], rel[keep]


def mask_spans(attention_mask: Tensor) -> tuple[Int[Tensor, " batch"], Int[Tensor, " batch"]]:
    """Each row's first real column and number of real tokens, from a ``[batch, seq]`` attention mask
    (left or right padding). ``ValueError`` for a row with no real token or with a hole in it."""
    if not isinstance(attention_mask, Tensor) or attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be a [batch, seq] tensor, got "
                         f"{list(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__}")
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError(f"attention_mask row {int((lengths == 0).nonzero()[0, 0])} has no real token")
    first = mask.int().argmax(1)
    cols = torch.arange(mask.shape[1], device=mask.device)
    inside = (cols >= first[:, None]) & (cols < (first + lengths)[:, None])
    if not bool((inside == mask).all()):
        row = int((inside != mask).any(1).nonzero()[0, 0])
        raise ValueError(f"attention_mask row {row} is not one contiguous run of real tokens: {mask[row].int().tolist()}")
    return first.long(), lengths.long()


def last_token(acts: Float[Tensor, "*lead batch seq d"], attention_mask: Tensor | None = None
               ) -> Float[Tensor, "*lead batch d"]:
    """Each row's last real token of ``[..., batch, seq, d]`` activations (e.g. a TransformerLens cache's
    ``stack_activation("resid_post")`` ``[layer, batch, seq, d]`` or an nnsight-saved block output),
    given the batch's ``attention_mask`` (left or right padding; ``None``: no padding, the last column).
    The result ``[..., batch, d]`` is what :func:`taskvec_interp.probes.task_decodability` reads."""
    if not isinstance(acts, Tensor) or acts.ndim < 3:
        raise ValueError(f"activations must be [..., batch, seq, d], got "
                         f"{list(acts.shape) if isinstance(acts, Tensor) else type(acts).__name__}")
    batch, seq = acts.shape[-3], acts.shape[-2]
    if attention_mask is None:
        return acts[..., -1, :]
    if tuple(attention_mask.shape) != (batch, seq):
        raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}, the activations' batch and "
                         f"sequence are [{batch}, {seq}]")
    first, lengths = mask_spans(attention_mask.to(acts.device))
    return acts[..., torch.arange(batch, device=acts.device), first + lengths - 1, :]


def resolve_positions(position: int | Sequence[int] | Tensor, pad: Int[Tensor, " batch"], prompt_len: int,
                      lengths: Int[Tensor, " batch"] | None = None) -> Int[Tensor, " batch"]:
    """Prompt coordinates -> absolute column per row of a padded batch (see module doc).

    ``position`` is an int, one position per row (``[batch]``) or several per row (``[batch, m]``,
    e.g. every demonstration's answer-preceding token); the result has the same shape. ``pad`` is each
    row's first real column and ``lengths`` its number of real tokens (default ``prompt_len - pad``).
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
    real = prompt_len - pad if lengths is None else lengths.to(pad.device)
    lengths = real.view(-1, *([1] * (pos.ndim - 1)))
    too_far = (pos >= lengths) | (pos < -lengths)
    if bool(too_far.any()):
        b = int(too_far.nonzero()[0, 0])
        raise ValueError(f"position {int(pos[b].flatten()[0]) if pos.ndim == 1 else pos[b].tolist()} out of range "
                         f"for prompt {b} of {int(lengths[b].flatten()[0])} tokens")
    start = pad.view_as(lengths)
    return torch.where(pos < 0, start + lengths + pos, start + pos)


HookFn = Callable[[Tensor, HookContext], Tensor | None]
"""The one hook signature: ``fn(activation [batch, seq, d], hook) -> activation | None``."""

def _takes_hook_keyword(fn: HookFn) -> bool:
    """Whether ``fn`` is called with ``hook=`` by keyword, as TransformerLens calls hooks: a function or
    partial with a parameter named ``hook`` that is not its first. (Not cached: a module-level cache
    would not pickle into a remote nnsight run, and the lookup costs microseconds.)"""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    hook = next((p for p in params if p.name == "hook"), None)
    return hook is not None and hook.kind in (hook.POSITIONAL_OR_KEYWORD, hook.KEYWORD_ONLY) \
        and params.index(hook) > 0


def checked_call(fn: HookFn, act: Tensor, ctx: HookContext) -> Tensor:
    """Run a user hook and check what it returns: same shape, dtype and device, never a broadcast.

    A hook with a parameter named ``hook`` (TransformerLens style) gets the context by keyword."""
    out = fn(act, hook=ctx) if _takes_hook_keyword(fn) else fn(act, ctx)
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
    check_position(position)
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
        store[k] = got if m is None else got.view(act.shape[0], m, *act.shape[2:])
        return None

    hook.store = store  # type: ignore[attr-defined]  # where it writes: a remote backend sends it back
    return hook


def check_position(position: object, what: str = "position") -> None:
    """A hook factory's ``position``: ``None``, an int, or ints per prompt (a sequence or an integer tensor,
    ``[n]`` or ``[n, m]``). Floats and bools are refused when the hook is built, never truncated."""
    if position is None or (isinstance(position, int) and not isinstance(position, bool)):
        return
    if not isinstance(position, Tensor) and hasattr(position, "dtype") and hasattr(position, "shape"):
        position = torch.as_tensor(position)  # a numpy array
    if isinstance(position, Tensor):
        if position.dtype.is_floating_point or position.dtype == torch.bool or position.dtype.is_complex:
            raise TypeError(f"{what} must hold integers, got a tensor of dtype {position.dtype}")
        if position.ndim not in (1, 2):
            raise ValueError(f"{what} must be an int or [n_prompts] / [n_prompts, m] ints, got shape {list(position.shape)}")
        return
    if isinstance(position, (str, bytes)) or not isinstance(position, Sequence):
        raise TypeError(f"{what} must be None, an int or a list of ints, got {position!r}")
    flat = [x for row in position for x in (row if isinstance(row, Sequence) else [row])]
    bad = [x for x in flat if isinstance(x, bool) or not isinstance(x, numbers.Integral)]
    if bad:
        raise TypeError(f"{what} must hold ints, got {bad[0]!r} ({type(bad[0]).__name__})")


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

    check_position(position)

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

    check_position(position)

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

    check_position(position)

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


def as_tl_hook(fn: HookFn, attention_mask: Tensor | None = None) -> Callable[..., Tensor | None]:
    """Our hook function (e.g. ``hooks.add(vec)``) as a TransformerLens hook ``(act, hook)``, for
    ``bridge.run_with_hooks(tokens, fwd_hooks=[(name, as_tl_hook(fn, mask))])`` or ``bridge.hooks(...)``.

    The context comes from the TransformerLens hook point's name (``blocks.3.hook_resid_post``, the
    bridge's ``blocks.3.hook_out`` ...) and from ``attention_mask`` (``[batch, seq]`` of the tokens you
    run, left or right padded; ``None``: no padding), so prompt positions (``-1`` = each row's last real
    token) mean what they mean in our adapters. Meant for a forward pass over the whole prompt: a chunk
    whose shape does not match the mask (e.g. a cached generation step) is refused.
    """
    if not callable(fn):
        raise TypeError(f"as_tl_hook needs a callable hook function, got {type(fn).__name__}")
    spans = mask_spans(attention_mask) if attention_mask is not None else None

    def tl_hook(act: Tensor, hook: object) -> Tensor | None:
        name = getattr(hook, "name", None)
        if not isinstance(name, str):
            raise TypeError(f"as_tl_hook: the hook point has no name (got {type(hook).__name__})")
        if spans is None:
            pad = torch.zeros(act.shape[0], dtype=torch.long, device=act.device)
            ctx = HookContext(parse_site(name), pad=pad, prompt_len=int(act.shape[1]))
        else:
            if tuple(attention_mask.shape) != tuple(act.shape[:2]):
                raise ValueError(f"as_tl_hook at {name}: activation [batch, seq] = {list(act.shape[:2])} does not "
                                 f"match the attention_mask {list(attention_mask.shape)} (a cached generation step?)")
            pad, lengths = (t.to(act.device) for t in spans)
            ctx = HookContext(parse_site(name), pad=pad, prompt_len=int(act.shape[1]), lengths=lengths)
        out = checked_call(fn, act, ctx)
        return None if out is act else out

    tl_hook.position = getattr(fn, "position", None)  # type: ignore[attr-defined]
    return tl_hook


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
