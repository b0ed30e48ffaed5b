"""The one interface every experiment talks to.

An :class:`Adapter` hides the backend (TransformerLens bridge, nnsight, plain torch hooks) behind
four things: tokenization with left padding, a forward pass with hooks, capture of every requested
layer in that one pass, and greedy generation whose prefill is that pass. Backends implement two
methods, ``_forward`` and ``_generate``; everything else (batching, sorting by length, padding,
positions, progress bars, checks) lives here once.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import ClassVar, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ..activations import Activations
from ..finite import NonFiniteError, describe, nonfinite_slices, overflow_advice
from ..hooks import (
    HEAD_COMPONENTS,
    HookContext,
    HookFn,
    HookSpec,
    Position,
    Site,
    capture,
    normalize_hooks,
    parse_site,
    resolve_layers,
    writes_last_token_only,
)

LogitsMode = Literal["all", "last", "none"]


def _short(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error names a bad prompt without printing all of it."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _noop(act: Tensor, ctx: HookContext) -> None:
    return None


@dataclass
class ModelInputs:
    """A left-padded batch: the keyword arguments for the model plus the padding of each row.

    For text models ``kwargs`` holds ``input_ids``, ``attention_mask`` and (where the architecture
    takes them) ``position_ids``; for custom models any tensors whose first dim is the batch
    (``xs``/``ys`` for the synthetic regressor). ``pad[b]`` counts row ``b``'s left-padding tokens.
    """

    kwargs: dict[str, Tensor]
    pad: Int[Tensor, " batch"]
    length: int

    @property
    def batch(self) -> int:
        return int(self.pad.shape[0])

    def to(self, device: torch.device | str) -> ModelInputs:
        return ModelInputs({k: v.to(device) for k, v in self.kwargs.items()}, self.pad.to(device), self.length)

    def rows(self, idx: Tensor) -> ModelInputs:
        """A sub-batch; for padded text it is re-trimmed to its own longest row."""
        kw = {k: v[idx] for k, v in self.kwargs.items()}
        pad = self.pad[idx]
        length = self.length
        trim = int(pad.min()) if pad.numel() else 0
        if trim and "attention_mask" in kw:
            kw = {k: (v[:, trim:] if v.ndim >= 2 and v.shape[1] == self.length else v) for k, v in kw.items()}
            pad = pad - trim
            length -= trim
        return ModelInputs(kw, pad, length)


@dataclass
class Generation:
    """Greedy generations: decoded new text, new token ids (cut at EOS) and prefill activations."""

    texts: list[str]
    tokens: list[list[int]]
    activations: Float[Tensor, "layer prompt d_model"] | None = None
    layers: list[int] = field(default_factory=list)
    engine: str = "full"
    """``"full"``: the whole prompt ran under the hooks; ``"prefix"``: a shared prompt prefix's KV cache
    was reused (see :meth:`Adapter.generate_branches`)."""


@dataclass
class _CallState:
    """Mutable per-call state that backends update while a call runs (read by hook contexts)."""

    pad: Tensor
    prompt_len: int
    indices: Tensor
    n_prompts: int
    step: int = 0
    offset: int = 0
    calls: int = 0
    seen: int = 0

    def advance(self, chunk_len: int) -> None:
        """Called once per model call of a cached generation: sets step and chunk offset."""
        self.step = self.calls
        self.offset = self.seen
        self.calls += 1
        self.seen += chunk_len

    def context(self, site: Site) -> HookContext:
        return HookContext(site=site, pad=self.pad, prompt_len=self.prompt_len, step=self.step, offset=self.offset,
                           indices=self.indices, n_prompts=self.n_prompts)


class Adapter(ABC):
    """Backend-independent access to a model's residual stream.

    Attributes: ``n_layers``, ``d_model``, ``tokenizer`` (or ``None`` for non-text models),
    ``device``, ``n_ctx`` (context window, ``None`` if unbounded), ``components`` (site components
    this backend exposes for this model), ``model`` (the wrapped object).
    """

    backend: ClassVar[str]

    def __init__(
        self, *, model: object, n_layers: int, d_model: int, tokenizer: object | None, device: torch.device,
        n_ctx: int | None, components: Sequence[str], position_ids: bool = True, add_special_tokens: bool = True,
        left_padding: bool = True, n_heads: int | None = None, no_heads_reason: str | None = None,
    ) -> None:
        self.model = model
        self.n_layers = int(n_layers)
        self.d_model = int(d_model)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.n_ctx = n_ctx
        self.components = tuple(components)
        self.n_heads = n_heads
        """Attention heads per layer behind the per-head ``z`` site (``None``: this adapter has no ``z`` site)."""
        self.head_components: tuple[str, ...] = HEAD_COMPONENTS if n_heads is not None else ()
        """Per-head components hookable by name (``blocks.{l}.attn.hook_z``), not listed in :meth:`site_names`."""
        self._no_heads_reason = no_heads_reason
        self.uses_position_ids = position_ids
        self.left_padding = left_padding
        """``False``: padding would change this model's numbers; batches hold prompts of one token length."""
        self.add_special_tokens = add_special_tokens
        self._context_hooks: list[tuple[Site, HookFn]] = []
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is None:
            # Same convention as nnsight and HF generate: pad with EOS (padded columns are masked).
            if getattr(tokenizer, "eos_token", None) is None:
                raise ValueError(f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')!r}) "
                                 "has neither a pad token nor an EOS token to pad with: set tokenizer.pad_token "
                                 "(e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'})) before loading")
            tokenizer.pad_token = tokenizer.eos_token

    name: str | None = None
    """What the model was loaded as (``load_model``'s spec: a built-in name, hub id or directory)."""
    revision: str | None = None
    weights_dir: str | None = None
    """The local directory the weights were loaded from (set by ``load_model``): its weight files fingerprint
    the model (:mod:`~taskvec_interp.adapters.fingerprint`)."""
    fingerprint_cache: str | None = None
    """The JSON file caching weight files' sha256 (set by ``load_model``: in the package cache directory)."""

    def _hf_module(self) -> object:
        """The wrapped Hugging Face / torch module (for its config and parameters)."""
        for attr in ("module", "bridge"):
            obj = getattr(self, attr, None)
            if obj is not None:
                return getattr(obj, "original_model", obj)
        return self.model

    def fingerprint(self) -> dict:
        """``{"fingerprint", "fingerprint_kind"}``: what the weights are (never the path they came from; see
        :func:`~taskvec_interp.adapters.fingerprint.model_fingerprint`). Computed once per adapter, on first use."""
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            from .fingerprint import model_fingerprint

            cached = model_fingerprint(self._hf_module(), weights_dir=self.weights_dir, cache=self.fingerprint_cache,
                                       name=self.name, revision=self.revision)
            self._fingerprint = cached
        return dict(cached)

    def identity(self) -> dict:
        """The model's real identity, recorded with every saved result: name, backend, class, shape, and the
        fingerprint of its weights (what resume and provenance compare)."""
        module = self._hf_module()
        cfg = getattr(module, "config", None)
        params = getattr(module, "parameters", None)
        n_params = sum(p.numel() for p in params()) if callable(params) else None
        name = self.name or getattr(cfg, "_name_or_path", None) or type(module).__name__
        first = next(params(), None) if callable(params) else None
        device_map = getattr(module, "hf_device_map", None)
        return {"name": str(name), "backend": self.backend, "model_class": type(module).__name__,
                "model_type": getattr(cfg, "model_type", None), "revision": self.revision,
                "n_layers": self.n_layers, "d_model": self.d_model, "n_params": n_params,
                "dtype": None if first is None else str(first.dtype).removeprefix("torch."),
                "device": str(self.device),
                "placement": None if not device_map else sorted({str(v) for v in device_map.values()}),
                "remote": getattr(self, "remote", False) or False, **self.fingerprint()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(backend={self.backend!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
                f"device={self.device})")

    # ---------------------------------------------------------------- backend contract
    @abstractmethod
    def _forward(self, inputs: ModelInputs, hooks: list[tuple[Site, HookFn]], state: _CallState,
                 logits: LogitsMode) -> Tensor | None:
        """One forward pass with ``hooks`` attached (and always detached afterwards).

        Returns logits ``[batch, seq, vocab]`` ("all"), ``[batch, vocab]`` ("last") or anything
        ("none": the caller only wants hook side effects; the backend may stop early).
        """

    @abstractmethod
    def _generate(self, inputs: ModelInputs, hooks: list[tuple[Site, HookFn]], state: _CallState,
                  max_new_tokens: int) -> Int[Tensor, "batch new"]:
        """Greedy generation with ``hooks``; returns the new token ids (EOS-padded after EOS)."""

    def _generate_branches(self, inputs: ModelInputs, branches: list[list[tuple[Site, HookFn]]], state: _CallState,
                           max_new_tokens: int, max_rows: int) -> list[Tensor] | None:
        """Optional: greedy generation of one prompt batch under each branch's hooks, sharing the prompt
        prefix's KV cache (every hook writes only the last prompt token). Returns one ``[batch, new]``
        tensor per branch, or ``None`` where this model cannot share its cache (the caller then runs
        full generations). Backends without a reusable cache keep this default."""
        return None

    def _score_branches(self, inputs: ModelInputs, branches: list[list[tuple[Site, HookFn]]], state: _CallState,
                        max_rows: int) -> list[Tensor] | None:
        """Optional: teacher-forced logits ``[batch, 1 + answer, vocab]`` (from the last prompt token on) of
        one batch (prompts left-padded, answers appended and right-padded) under each branch, sharing the
        prompt prefix's KV cache; ``None`` where this model cannot share it."""
        return None

    # ---------------------------------------------------------------- tokenization
    def _require_tokenizer(self) -> object:
        if self.tokenizer is None:
            raise ValueError(f"{self!r} has no tokenizer: pass ModelInputs instead of strings")
        return self.tokenizer

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt (no padding), checked against the context window."""
        tok = self._require_tokenizer()
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        if len(prompts) == 0:
            raise ValueError("empty prompt list")
        for i, p in enumerate(prompts):  # named here, by index: a tokenizer's own error names no prompt
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} is a {type(p).__name__} ({_short(p)}), not a string")
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"prompt {i} is not valid Unicode text: {err.reason} at character {err.start} "
                                 f"({p[err.start:err.end]!r} in {_short(p)})") from None
        ids = tok(list(prompts), add_special_tokens=self.add_special_tokens)["input_ids"]
        for i, row in enumerate(ids):
            if len(row) == 0:
                raise ValueError(f"prompt {i} tokenizes to nothing")
            if self.n_ctx is not None and len(row) > self.n_ctx:
                raise ValueError(f"prompt {i} has {len(row)} tokens, longer than the context window of {self.n_ctx}")
        return ids

    def collate(self, token_ids: Sequence[Sequence[int]], extra: int = 0) -> ModelInputs:
        """Left-pad token id lists into a batch with attention mask and position ids.

        ``extra`` reserves room for generated tokens in the context-window check.
        """
        tok = self._require_tokenizer()
        length = max(len(r) for r in token_ids)
        if not self.left_padding and min(len(r) for r in token_ids) != length:
            raise ValueError(
                f"{type(self._hf_module()).__name__} cannot take a padded batch (its positions do not follow the "
                f"attention mask), and these prompts have {sorted({len(r) for r in token_ids})} tokens: pass prompts "
                "of one token length, or use capture / generate / generate_branches, which batch by length")
        if self.n_ctx is not None and length + extra > self.n_ctx:
            raise ValueError(f"{length} prompt tokens + {extra} new tokens exceed the context window of {self.n_ctx}")
        batch = len(token_ids)
        ids = torch.full((batch, length), int(tok.pad_token_id), dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.long)
        pad = torch.tensor([length - len(r) for r in token_ids], dtype=torch.long)
        for b, row in enumerate(token_ids):  # a loop over rows of one batch to place ragged lists
            ids[b, length - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[b, length - len(row):] = 1
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if self.uses_position_ids:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return ModelInputs(kwargs, pad, length).to(self.device)

    def tokenize(self, prompts: Sequence[str]) -> ModelInputs:
        """Left-padded batch with attention mask and (where used) mask-derived position ids."""
        return self.collate(self.encode(prompts))

    # ---------------------------------------------------------------- hooks
    def _normalize(self, hooks: HookSpec) -> list[tuple[Site, HookFn]]:
        """:func:`normalize_hooks` over this adapter's components and per-head components; a per-head site on
        a model or backend without one is refused here, before any forward, saying why."""
        for item in hooks:
            site = item[0] if isinstance(item, tuple) and len(item) == 2 else None
            if isinstance(site, (str, Site)):
                s = parse_site(site)
                if s.component in HEAD_COMPONENTS and s.component not in self.head_components:
                    why = self._no_heads_reason or "this adapter has no per-head sites"
                    raise ValueError(f"site {s.name} (per-head attention output) is not available for "
                                     f"{self._model_label()} on the {self.backend!r} backend: {why}")
        return normalize_hooks(hooks, self.n_layers, self.components + self.head_components)

    def _model_label(self) -> str:
        inner = self._hf_module()
        name = getattr(getattr(inner, "config", None), "_name_or_path", None) or self.name
        return f"{type(inner).__name__}" + (f" ({name!r})" if name else "")

    @contextlib.contextmanager
    def hooks(self, hooks: HookSpec) -> Iterator[Adapter]:
        """Attach ``hooks`` to every call made inside the block; they are gone on exit, even on error."""
        checked = self._normalize(hooks)
        n_before = len(self._context_hooks)
        self._context_hooks.extend(checked)
        try:
            yield self
        finally:
            del self._context_hooks[n_before:]

    def _all_hooks(self, hooks: HookSpec) -> list[tuple[Site, HookFn]]:
        checked = self._normalize(hooks)
        return sorted(self._context_hooks + checked, key=lambda p: p[0].order)

    # ---------------------------------------------------------------- batching
    def _batches(
        self, prompts: Sequence[str] | ModelInputs, batch_size: int, extra: int = 0
    ) -> tuple[int, list[tuple[Tensor, ModelInputs]]]:
        """Split into batches, longest prompts first (less padding); yields original indices too."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(prompts, ModelInputs):
            n = prompts.batch
            if n == 0:
                raise ValueError("empty batch of inputs")
            order = torch.arange(n)
            return n, [(idx, prompts.rows(idx.to(prompts.pad.device))) for idx in order.split(batch_size)]
        ids = self.encode(prompts)
        n = len(ids)
        order = sorted(range(n), key=lambda i: -len(ids[i]))
        if self.left_padding:
            groups = [order]
        else:  # no padding: one group per token length, longest first
            groups = [list(g) for _, g in groupby(order, key=lambda i: len(ids[i]))]
        out = []
        for group in groups:
            for start in range(0, len(group), batch_size):
                idx = group[start:start + batch_size]
                out.append((torch.tensor(idx, dtype=torch.long), self.collate([ids[i] for i in idx], extra=extra)))
        return n, out

    @staticmethod
    def _state(inputs: ModelInputs, idx: Tensor, n: int) -> _CallState:
        return _CallState(pad=inputs.pad, prompt_len=inputs.length, indices=idx.to(inputs.pad.device), n_prompts=n)

    # ---------------------------------------------------------------- public API
    def forward(
        self, prompts: Sequence[str] | ModelInputs, hooks: HookSpec = (), logits: LogitsMode = "last",
    ) -> Tensor:
        """One forward pass over one left-padded batch with ``hooks``; returns logits.

        ``logits="last"`` gives ``[batch, vocab]`` at the last prompt token; ``"all"`` gives
        ``[batch, seq, vocab]`` in the left-padded layout (see ``tokenize``).
        """
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        inputs = prompts if isinstance(prompts, ModelInputs) else self.tokenize(prompts)
        state = self._state(inputs, torch.arange(inputs.batch), inputs.batch)
        with torch.no_grad():
            return self._forward(inputs, self._all_hooks(hooks), state, logits)

    run_with_hooks = forward

    def capture(
        self,
        prompts: Sequence[str] | ModelInputs,
        layers: str | int | Sequence[int] = "all",
        position: Position = -1,
        component: str = "resid_post",
        hooks: HookSpec = (),
        batch_size: int = 16,
        dtype: torch.dtype = torch.float32,
        progress: bool = True,
    ) -> Activations:
        """Activations of ``component`` at ``position`` for every requested layer, in ONE pass per batch.

        Default: the residual stream after each block at the last prompt token (the token before the
        answer). Returns an :class:`~taskvec_interp.activations.Activations` ``[len(layers), n_prompts,
        d_model]`` on CPU in ``dtype``, rows in prompt order, indexed by LAYER NUMBER: ``acts[15]`` is layer
        15 whatever else was captured (``acts.tensor``: the plain tensor; ``acts.layers``: the layers). Extra ``hooks`` (e.g. an intervention) run in the same pass, before the capture at
        each site. ``position`` may also give several positions per prompt (``[n_prompts, m]``, e.g.
        every demonstration's answer-preceding token): the result is then ``[layer, n, m, d_model]``.
        For several components at once, or TransformerLens-style ``names_filter`` selection, see
        :meth:`capture_sites`.
        """
        sites = [Site(layer, component) for layer in resolve_layers(layers, self.n_layers)]
        acts = self._capture(prompts, sites, position, hooks, batch_size, dtype, progress)
        return Activations(acts, [s.layer for s in sites])

    def site_names(self) -> list[str]:
        """Every site this adapter can hook, as TransformerLens-style names in forward order."""
        return [Site(layer, comp).name for layer in range(self.n_layers) for comp in self.components]

    def capture_sites(
        self,
        prompts: Sequence[str] | ModelInputs,
        names_filter: str | Sequence[str | Site] | Callable[[str], bool] | None = None,
        position: Position = -1,
        hooks: HookSpec = (),
        batch_size: int = 16,
        dtype: torch.dtype = torch.float32,
        progress: bool = True,
    ) -> dict[str, Tensor]:
        """Activations at ``position`` of the sites ``names_filter`` selects, all in ONE pass per batch:
        ``{site name: [n_prompts, d_model]}`` in forward order, like a TransformerLens cache.

        ``names_filter`` as in TransformerLens's ``run_with_cache``: ``None`` (every site of
        :meth:`site_names`), one name, a list of names / :class:`Site` s (``blocks.3.hook_resid_post``;
        the bridge's ``blocks.3.hook_out`` is accepted too), or a predicate over the names.
        """
        sites = self._select_sites(names_filter)
        acts = self._capture(prompts, sites, position, hooks, batch_size, dtype, progress)
        return {site.name: a for site, a in zip(sites, acts, strict=True)}

    def _select_sites(self, names_filter: object) -> list[Site]:
        every = [Site(layer, comp) for layer in range(self.n_layers) for comp in self.components]
        if names_filter is None:
            return every
        if callable(names_filter):
            chosen = [s for s in every if names_filter(s.name)]
            if not chosen:
                raise ValueError(f"names_filter selected none of this model's {len(every)} sites "
                                 f"(e.g. {every[0].name!r} ... {every[-1].name!r})")
            return chosen
        if isinstance(names_filter, (str, Site)):
            names_filter = [names_filter]
        if not isinstance(names_filter, Sequence) or len(names_filter) == 0:
            raise ValueError(f"names_filter must be None, a site name, a non-empty list of names or a predicate, "
                             f"got {names_filter!r}")
        sites = [s for s, _ in self._normalize([(n, _noop) for n in names_filter])]
        dup = sorted({s.name for s in sites if sites.count(s) > 1})
        if dup:
            raise ValueError(f"names_filter names {dup} more than once")
        return sites

    def _capture(self, prompts: Sequence[str] | ModelInputs, sites: list[Site], position: Position,
                 hooks: HookSpec, batch_size: int, dtype: torch.dtype, progress: bool, what: str = "capture"
                 ) -> Tensor:
        """``[len(sites), n_prompts, (m,) d_model]``: every site captured in one pass per batch."""
        if position is None:
            raise ValueError("capture needs a position (int or one per prompt); use hooks.capture for whole sequences")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"capture dtype must be a floating-point torch.dtype, got {dtype!r}")
        user_hooks = self._all_hooks(hooks)
        self._normalize([(s, _noop) for s in sites])
        n, batches = self._batches(prompts, batch_size)
        heads = {s.component in HEAD_COMPONENTS for s in sites}
        if len(heads) > 1:
            raise ValueError("capture per-head sites (blocks.{l}.attn.hook_z, [n, n_heads, d_head]) in a call of "
                             "their own, not together with d_model-wide sites")
        multi = () if isinstance(position, int) else tuple(torch.as_tensor(position).shape[1:])
        out = None if True in heads else torch.empty((len(sites), n, *multi, self.d_model), dtype=dtype)
        bar = tqdm(batches, desc=f"capture {len(sites)} sites", disable=not progress, leave=False)
        with torch.no_grad():
            for idx, inputs in bar:
                store: dict = {}
                cap = [(s, capture(store, s, position, dtype)) for s in sites]
                all_hooks = sorted(user_hooks + cap, key=lambda p: p[0].order)
                self._forward(inputs, all_hooks, self._state(inputs, idx, n), "none")
                got = torch.stack([store[s] for s in sites])
                self._check_finite(got, sites, idx, dtype, what)  # one isfinite per batch: overflow names its layer
                if out is None:  # per-head sites: [site, rows, (m,) n_heads, d_head], sized by the first batch
                    out = torch.empty((len(sites), n, *got.shape[2:]), dtype=dtype)
                out[:, idx] = got
        return out

    def _model_dtype(self) -> torch.dtype | None:
        params = getattr(self._hf_module(), "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        return None if first is None else first.dtype

    def _check_finite(self, got: Tensor, sites: Sequence[Site], idx: Tensor, dtype: torch.dtype, what: str) -> None:
        """A :class:`~taskvec_interp.finite.NonFiniteError` naming the first (in forward order) site of ``got``
        (``[site, rows, ...]``, one batch) that holds a NaN or an infinity, the first such prompt and why (a
        capture dtype or a float16 model that overflows, with what to use instead)."""
        bad = nonfinite_slices(got)
        if not bad:
            return
        i = min(bad, key=lambda j: sites[j].order)
        rows_ok = torch.isfinite(got[i]).reshape(got.shape[1], -1).all(1)
        prompt = int(idx.to(rows_ok.device)[~rows_ok].min())  # the first such prompt, in call order
        raise NonFiniteError(f"{what}: the activations at layer {sites[i].layer} ({sites[i].name}) are "
                             f"{describe(got[i])} for prompt {prompt}, the first non-finite layer: "
                             f"{overflow_advice(dtype, self._model_dtype())}")

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        hooks: HookSpec = (),
        capture_layers: str | int | Sequence[int] | None = None,
        position: Position = -1,
        component: str = "resid_post",
        batch_size: int = 16,
        dtype: torch.dtype = torch.float32,
        progress: bool = True,
    ) -> Generation:
        """Greedy generation under ``hooks``; optionally capture layers in the prefill (no extra pass).

        Rows are cut at the first EOS. ``capture_layers`` works as ``capture``'s ``layers`` and the
        activations come back in ``Generation.activations``.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        tok = self._require_tokenizer()
        layer_list = resolve_layers(capture_layers, self.n_layers) if capture_layers is not None else []
        sites = [Site(layer, component) for layer in layer_list]
        user_hooks = self._all_hooks(hooks)
        normalize_hooks([(s, capture({}, None)) for s in sites], self.n_layers, self.components)
        n, batches = self._batches(prompts, batch_size, extra=max_new_tokens)
        acts = torch.empty((len(sites), n, self.d_model), dtype=dtype) if sites else None
        new_tokens: list[list[int]] = [[] for _ in range(n)]
        # the last layer's output at the prompt's last token, in float32: a model whose hidden states overflow
        # (float16) would generate from NaN logits; caught here and traced to its first layer (on failure only)
        last = Site(self.n_layers - 1, "resid_post")
        sentinel: dict = {}
        watch = [] if last in sites else [(last, capture(sentinel, last, -1, torch.float32))]
        bar = tqdm(batches, desc="generate", disable=not progress, leave=False)
        with torch.no_grad():
            for idx, inputs in bar:
                store: dict = {}
                cap = [(s, capture(store, s.layer, position, dtype)) for s in sites]
                all_hooks = sorted(user_hooks + cap + watch, key=lambda p: p[0].order)
                gen = self._generate(inputs, all_hooks, self._state(inputs, idx, n), max_new_tokens)
                if acts is not None:
                    got = torch.stack([store[s.layer] for s in sites])
                    self._check_finite(got, sites, idx, dtype, "generate")
                    acts[:, idx] = got
                if watch and not bool(torch.isfinite(sentinel[last]).all()):  # find the first layer that overflows
                    every = [Site(layer, "resid_post") for layer in range(self.n_layers)]
                    probe: dict = {}
                    trace = sorted(user_hooks + [(s, capture(probe, s, -1, torch.float32)) for s in every],
                                   key=lambda p: p[0].order)
                    self._forward(inputs, trace, self._state(inputs, idx, n), "none")
                    self._check_finite(torch.stack([probe[s] for s in every]), every, idx, torch.float32, "generate")
                    self._check_finite(sentinel[last][None], [last], idx, torch.float32, "generate")
                self._store_rows(gen, idx, new_tokens)
        texts = tok.batch_decode(new_tokens, skip_special_tokens=True)
        return Generation(texts=texts, tokens=new_tokens, layers=layer_list,
                          activations=None if acts is None else Activations(acts, layer_list))

    def _store_rows(self, gen: Tensor, idx: Tensor, new_tokens: list[list[int]]) -> None:
        """Put one batch's new token rows (cut at the first EOS) into ``new_tokens`` in call order."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        for row, i in zip(gen.cpu().tolist(), idx.tolist(), strict=True):
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            new_tokens[i] = row

    def prefix_sharing(self, branches: Sequence[HookSpec]) -> str | None:
        """Why these branches cannot share a prompt prefix's KV cache, or ``None`` when they can.

        Sharing needs every branch hook to write only the last prompt token (``hooks.add`` /
        ``replace`` / ``ablate`` at ``position=-1``: earlier positions' keys and values stay as
        they are), no hooks attached with :meth:`hooks`, and a backend whose cache can be reused.
        """
        if type(self)._generate_branches is Adapter._generate_branches:
            return f"the {self.backend} backend recomputes the prompt at every step (no shared cache)"
        if self._context_hooks:
            return "hooks attached with adapter.hooks(...) apply to the whole prompt"
        for b, spec in enumerate(branches):
            for site, fn in spec:
                if not writes_last_token_only(fn):
                    return (f"branch {b}'s hook at {site} may write positions before the last prompt token "
                            "(only hooks.add/replace/ablate at position=-1 are known not to)")
        return None

    def _check_branches(self, branches: Sequence[HookSpec], max_rows: int, share_prefix: bool | None
                        ) -> tuple[list[list[tuple[Site, HookFn]]], str | None]:
        """Checked branch hooks and why they cannot share the prompt prefix (``None``: they can)."""
        if isinstance(branches, (str, bytes)) or not isinstance(branches, Sequence) or len(branches) == 0:
            raise ValueError("branches must be a non-empty list of hook lists")
        if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
        if share_prefix not in (None, True, False):
            raise ValueError(f"share_prefix must be None, True or False, got {share_prefix!r}")
        checked = [self._normalize(b) for b in branches]
        reason = self.prefix_sharing(checked) if share_prefix is not False else "share_prefix=False"
        if share_prefix and reason is not None:
            raise ValueError(f"cannot share the prompt prefix: {reason}")
        return checked, reason

    def score_branches(
        self,
        prompts: Sequence[str],
        answers: Sequence[Sequence[int]],
        branches: Sequence[HookSpec],
        *,
        share_prefix: bool | None = None,
        max_rows: int = 256,
        batch_size: int = 16,
        progress: bool = True,
    ) -> Float[Tensor, "branch prompt"]:
        """Teacher-forced log-probability of each prompt's answer (token ids, summed over its tokens) under
        each branch: ``[n_branches, n_prompts]``, a continuous metric beside exact match.

        The answers are appended to the left-padded prompts and right-padded, so prompt coordinates (and
        a hook at ``-1``, the last prompt token) mean what they mean in generation. The prompt prefix is
        shared as in :meth:`generate_branches` when the branches allow it; otherwise one full forward pass
        per branch, with the same numbers. When every answer is one token, nothing is appended: its
        log-probability comes from the last prompt token's logits, so a branch runs one token, not two.
        """
        if len(answers) != len(prompts):
            raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
        checked, reason = self._check_branches(branches, max_rows, share_prefix)
        answers = [list(a) for a in answers]
        longest = max(len(a) for a in answers)
        # one-token answers are scored from the last prompt token's logits alone: nothing is appended, so each
        # branch runs one token (not two) off the shared prefix
        single = longest == 1 and all(len(a) == 1 for a in answers)
        n, batches = self._batches(prompts, batch_size, extra=0 if single else longest)
        out = torch.zeros((len(checked), n), dtype=torch.float64)
        bar = tqdm(batches, desc=f"score x {len(checked)} branches", disable=not progress, leave=False)
        with torch.no_grad():
            for idx, inputs in bar:
                if single:
                    full = inputs
                    target = torch.tensor([answers[i] for i in idx.tolist()], dtype=torch.long, device=self.device)
                    valid = torch.ones(target.shape, dtype=torch.float64, device=self.device)
                else:
                    full, target, valid = self._append_answers(inputs, [answers[i] for i in idx.tolist()])
                logits = None
                if reason is None and inputs.length > 1:
                    logits = self._score_branches(full, checked, self._state(inputs, idx, n), max_rows)
                    if logits is None and share_prefix:
                        raise ValueError("cannot share the prompt prefix: this model's cache cannot be repeated")
                if logits is None:  # one full teacher-forced pass per branch
                    p = inputs.length
                    logits = [self._forward(full, b, self._state(inputs, idx, n), "all")[:, p - 1:] for b in checked]
                for b, lg in enumerate(logits):
                    lg = lg if single else lg[:, :-1]  # the positions that predict the answer's tokens
                    logp = torch.log_softmax(lg.double(), -1).gather(-1, target[:, :, None])[..., 0]
                    out[b, idx] = (logp * valid).sum(1).cpu()
        bad = nonfinite_slices(out)  # a NaN log-probability is an error, never a score
        if bad:
            prompt = int((~torch.isfinite(out[bad[0]])).nonzero()[0, 0])
            raise NonFiniteError(f"score_branches: the log-probability of prompt {prompt}'s answer under branch "
                                 f"{bad[0]} is {float(out[bad[0], prompt])}: "
                                 f"{overflow_advice(torch.float32, self._model_dtype())}")
        return out

    def _append_answers(self, inputs: ModelInputs, answers: list[list[int]]) -> tuple[ModelInputs, Tensor, Tensor]:
        """Prompts (left-padded) followed by their answers (right-padded): the inputs, the answer ids
        ``[batch, A]`` and their validity mask. ``length`` stays the prompt length (prompt coordinates)."""
        a = max(max((len(x) for x in answers), default=0), 1)
        pad_id = int(self._require_tokenizer().pad_token_id)
        target = torch.full((inputs.batch, a), pad_id, dtype=torch.long)
        valid = torch.zeros((inputs.batch, a), dtype=torch.float64)
        for r, ans in enumerate(answers):  # a loop over one batch's rows to place ragged lists
            target[r, : len(ans)] = torch.tensor(ans, dtype=torch.long)
            valid[r, : len(ans)] = 1.0
        target, dev_valid = target.to(self.device), valid.to(self.device)
        kw = dict(inputs.kwargs)
        kw["input_ids"] = torch.cat([kw["input_ids"], target], 1)
        kw["attention_mask"] = torch.cat([kw["attention_mask"], dev_valid.long()], 1)
        if "position_ids" in kw:
            kw["position_ids"] = (kw["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return ModelInputs(kw, inputs.pad, inputs.length), target, dev_valid

    def generate_branches(
        self,
        prompts: Sequence[str],
        branches: Sequence[HookSpec],
        max_new_tokens: int,
        *,
        share_prefix: bool | None = None,
        max_rows: int = 256,
        batch_size: int = 16,
        progress: bool = True,
    ) -> list[Generation]:
        """Greedy generation of the same prompts under several hook sets ("branches"): one
        :class:`Generation` per branch, as ``[generate(prompts, hooks=b) for b in branches]`` gives.

        When every branch hook writes only the last prompt token (see :meth:`prefix_sharing`), the
        prompt prefix (every token but the last) runs ONCE per prompt batch and each branch continues
        from a copy of its KV cache: only the last prompt token and the new tokens run per branch, with
        up to ``max_rows`` rows (branches x prompts) stacked along the batch axis. The answers are
        those of full generation (tested). ``share_prefix``: ``None`` shares when possible, ``True``
        requires it (``ValueError`` saying why not), ``False`` always runs full generations.
        """
        checked, reason = self._check_branches(branches, max_rows, share_prefix)
        if reason is not None:
            return [self.generate(prompts, max_new_tokens, hooks=b, batch_size=batch_size, progress=progress)
                    for b in tqdm(checked, desc="branches", disable=not progress, leave=False)]
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        tok = self._require_tokenizer()
        n, batches = self._batches(prompts, batch_size, extra=max_new_tokens)
        new_tokens = [[[] for _ in range(n)] for _ in checked]
        used: set[str] = set()
        bar = tqdm(batches, desc=f"generate x {len(checked)} branches", disable=not progress, leave=False)
        with torch.no_grad():
            for idx, inputs in bar:
                gens = None
                if inputs.length > 1:  # a one-token prompt has no prefix to share
                    gens = self._generate_branches(inputs, checked, self._state(inputs, idx, n), max_new_tokens,
                                                   max_rows)
                if gens is None and share_prefix and inputs.length > 1:
                    raise ValueError(f"cannot share the prompt prefix: the cache of {type(self._hf_module()).__name__} "
                                     "cannot be repeated per branch (e.g. a recurrent state)")
                used.add("full" if gens is None else "prefix")
                if gens is None:  # no cache to share here: full generation, the same tokens
                    gens = [self._generate(inputs, b, self._state(inputs, idx, n), max_new_tokens) for b in checked]
                for store, gen in zip(new_tokens, gens, strict=True):
                    self._store_rows(gen, idx, store)
        engine = used.pop() if len(used) == 1 else "mixed"
        return [Generation(texts=tok.batch_decode(t, skip_special_tokens=True), tokens=t, engine=engine)
                for t in new_tokens]
