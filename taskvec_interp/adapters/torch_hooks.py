"""Plain PyTorch backend: ``register_forward_hook`` on the blocks of any ``nn.Module``.

Works for Hugging Face causal LMs (blocks found through :mod:`.arch`) and for custom modules that
have a ``ModuleList`` of blocks (pass ``blocks="path"`` or give the module a ``blocks_path``
attribute, as the synthetic models do). This is the fastest path: no tracing, no wrappers.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from itertools import groupby

from torch import Tensor, nn

from ..hooks import HookFn, Site, checked_call
from .arch import config_d_model, config_n_ctx, find_arch, get_module, heads_of, input_device, model_logits
from .base import Adapter, LogitsMode, ModelInputs, _CallState


class _StopForward(Exception):
    """Raised by a hook after the last needed block when only activations are wanted."""


def _chain(fns: list[HookFn], site: Site, state: _CallState):
    def run(act: Tensor) -> Tensor:
        for fn in fns:
            act = checked_call(fn, act, state.context(site))
        return act

    return run


class TorchHooksAdapter(Adapter):
    """Backend on plain ``torch.nn.Module`` forward hooks."""

    backend = "torch"

    def __init__(
        self, model: nn.Module, tokenizer: object | None = None, blocks: str | None = None,
        d_model: int | None = None, n_ctx: int | None = None, add_special_tokens: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"TorchHooksAdapter needs an nn.Module, got {type(model).__name__}")
        self.arch = find_arch(model, blocks)
        self.blocks = get_module(model, self.arch.blocks)
        d = d_model or config_d_model(model)
        if d is None:
            raise ValueError("cannot infer d_model of this module: pass d_model=")
        n_heads, why = heads_of(model, self.arch, self.blocks)
        super().__init__(
            model=model, n_layers=len(self.blocks), d_model=d, tokenizer=tokenizer, device=input_device(model),
            n_ctx=n_ctx or config_n_ctx(model), components=self.arch.components,
            position_ids=self.arch.position_ids, add_special_tokens=add_special_tokens,
            left_padding=self.arch.left_padding, n_heads=n_heads, no_heads_reason=why,
        )
        params = inspect.signature(model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self._use_cache = "use_cache" in params  # a plain forward builds no KV cache it would throw away
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it

    @contextlib.contextmanager
    def _attached(self, hooks: list[tuple[Site, HookFn]], state: _CallState, stop_after: int | None) -> Iterator[None]:
        handles = []
        try:
            for site, group in groupby(hooks, key=lambda p: p[0]):
                run = _chain([fn for _, fn in group], site, state)
                block = self.blocks[site.layer]
                if site.component == "resid_pre":
                    handles.append(block.register_forward_pre_hook(_pre_hook(run), with_kwargs=True))
                elif site.component == "z":
                    proj = get_module(block, self.arch.o_proj)
                    handles.append(proj.register_forward_pre_hook(_pre_hook(per_head(run, self.n_heads)),
                                                                  with_kwargs=True))
                else:
                    path = self.arch.sublayer(site.component)
                    module = block if path is None else get_module(block, path)
                    handles.append(module.register_forward_hook(_post_hook(run)))
            if stop_after is not None:
                handles.append(self.blocks[stop_after].register_forward_hook(_raise_stop))
            yield
        finally:
            for h in handles:
                h.remove()

    def _forward(self, inputs: ModelInputs, hooks: list[tuple[Site, HookFn]], state: _CallState,
                 logits: LogitsMode) -> Tensor | None:
        kwargs = dict(inputs.kwargs)
        if logits != "all" and self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if self._use_cache:
            kwargs.setdefault("use_cache", False)
        stop = max(s.layer for s, _ in hooks) if (logits == "none" and hooks) else None
        try:
            with self._attached(hooks, state, stop):
                out = self.model(**kwargs)
        except _StopForward:
            return None
        lg = model_logits(out)
        return lg[:, -1] if (logits == "last" and lg.ndim == 3) else lg

    def _generate(self, inputs: ModelInputs, hooks: list[tuple[Site, HookFn]], state: _CallState,
                  max_new_tokens: int, cache: object | None = None) -> Tensor:
        if not hasattr(self.model, "generate"):
            raise TypeError(f"{type(self.model).__name__} has no .generate(): generation needs a causal LM")
        from transformers import GenerationConfig

        tok = self.tokenizer
        gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id)
        extra = {} if cache is None else {"cache": cache}

        def track(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = kwargs.get("input_ids")
            if x is None:
                x = kwargs.get("inputs_embeds")
            if x is None:
                x = args[0]
            state.advance(x.shape[1])

        root = self.model.register_forward_pre_hook(track, with_kwargs=True)
        try:
            with self._attached(hooks, state, None):
                out = self.model.generate(input_ids=inputs.kwargs["input_ids"],
                                          attention_mask=inputs.kwargs["attention_mask"], generation_config=gen_cfg,
                                          **extra)
        finally:
            root.remove()
        return out[:, inputs.length:]

    def _shared_prefix(self, inputs: ModelInputs, branches: list[list[tuple[Site, HookFn]]], state: _CallState,
                       max_rows: int) -> Iterator[tuple[dict, list, _CallState, object, int]] | None:
        """The prompt prefix (every prompt token but the last) once, without hooks (every branch hook writes
        only the last prompt token), then one entry per chunk of branches: the batch repeated per branch
        (row ``b * C + c`` is prompt ``b`` under branch ``c``), the dispatching hooks (each branch's hooks see
        only its rows), the call state (the chunk starts at the last prompt token) and a repeated copy of
        the prefix's KV cache, made only when its chunk runs (one copy alive at a time). ``None`` where the
        model's cache cannot be repeated (e.g. Mamba-2)."""
        if getattr(self, "_cache_shareable", True) is False:
            return None
        p = inputs.length
        prefix = {k: v[:, : p - 1] for k, v in inputs.kwargs.items()}
        if self._logits_to_keep:
            prefix["logits_to_keep"] = 1  # the prefix's logits are never read
        out = self.model(**prefix, use_cache=True)
        cache = (out["cache"] if "cache" in out else out.get("past_key_values")) if hasattr(out, "get") else None
        layers = getattr(cache, "layers", None)
        if layers is None or not all(hasattr(layer, "batch_repeat_interleave") for layer in layers):
            self._cache_shareable = False  # e.g. Mamba-2's recurrent state: full passes instead
            return None
        per_chunk = max(1, max_rows // inputs.batch)

        def chunks() -> Iterator[tuple[dict, list, _CallState, object, int]]:
            for start in range(0, len(branches), per_chunk):
                chunk = branches[start:start + per_chunk]
                c = len(chunk)
                branch_cache = copy.deepcopy(cache)
                branch_cache.batch_repeat_interleave(c)
                sites = sorted({site for hooks in chunk for site, _ in hooks}, key=lambda s: s.order)
                hooks = [(site, _branch_dispatch(site, [[f for s, f in h if s == site] for h in chunk]))
                         for site in sites]
                run = _CallState(pad=state.pad, prompt_len=state.prompt_len, indices=state.indices,
                                 n_prompts=state.n_prompts, offset=p - 1, seen=p - 1)
                yield {k: v.repeat_interleave(c, 0) for k, v in inputs.kwargs.items()}, hooks, run, branch_cache, c

        return chunks()

    def _generate_branches(self, inputs: ModelInputs, branches: list[list[tuple[Site, HookFn]]], state: _CallState,
                           max_new_tokens: int, max_rows: int) -> list[Tensor] | None:
        if not hasattr(self.model, "generate"):
            return None
        chunks = self._shared_prefix(inputs, branches, state, max_rows)
        if chunks is None:
            return None
        out = []
        for kwargs, hooks, run, cache, c in chunks:
            gen = self._generate(ModelInputs(kwargs, inputs.pad, inputs.length), hooks, run, max_new_tokens,
                                 cache=cache)
            out.extend(gen[i::c] for i in range(c))
        return out

    def _score_branches(self, inputs: ModelInputs, branches: list[list[tuple[Site, HookFn]]], state: _CallState,
                        max_rows: int) -> list[Tensor] | None:
        chunks = self._shared_prefix(inputs, branches, state, max_rows)
        if chunks is None:
            return None
        p = inputs.length
        out = []
        for kwargs, hooks, run, cache, c in chunks:
            rest = {k: v[:, p - 1:] for k, v in kwargs.items() if k != "attention_mask"}
            with self._attached(hooks, run, None):
                res = self.model(**rest, attention_mask=kwargs["attention_mask"], use_cache=True,
                                 **{self._cache_kwarg: cache})
            logits = model_logits(res)  # [rows, answer + 1, vocab]: the last prompt token and the answer
            out.extend(logits[i::c] for i in range(c))
        return out


def _branch_dispatch(site: Site, per_branch: list[list[HookFn]]) -> HookFn:
    """One hook for a batch of stacked branches: branch ``c`` owns rows ``c::C`` and its hooks see only
    them, with the prompt batch's own context (the same prompts in the same order for every branch)."""
    n_branches = len(per_branch)

    def hook(act: Tensor, ctx) -> Tensor:
        out = act
        for c, fns in enumerate(per_branch):
            if not fns:
                continue
            sub = act[c::n_branches]
            new = sub
            for fn in fns:
                new = checked_call(fn, new, ctx)
            if new is not sub:
                if out is act:
                    out = act.clone()
                out[c::n_branches] = new
        return out

    return hook


def per_head(run, n_heads: int):
    """``run`` (hooks on ``[batch, seq, n_heads, d_head]``) applied to a ``[batch, seq, n_heads * d_head]``
    activation (the output projection's input), reshaped back; the input itself when nothing changed."""
    def wrapped(act: Tensor) -> Tensor:
        if act.shape[-1] % n_heads != 0:
            raise ValueError(f"the attention output projection's input has width {act.shape[-1]}, not a multiple "
                             f"of {n_heads} heads")
        z = act.view(*act.shape[:-1], n_heads, act.shape[-1] // n_heads) if act.is_contiguous() else \
            act.reshape(*act.shape[:-1], n_heads, act.shape[-1] // n_heads)
        new = run(z)
        return act if new is z else new.reshape(act.shape)

    return wrapped


def _pre_hook(run):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (run(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = run(kwargs["hidden_states"])
        return args, kwargs

    return hook


def _post_hook(run):
    def hook(module: nn.Module, args: tuple, output):
        if isinstance(output, (tuple, list)):  # (lists: OpenAI GPT's blocks)
            new = run(output[0])
            rest = output[1:]
            return output if new is output[0] else ([new, *rest] if isinstance(output, list) else (new, *rest))
        new = run(output)
        return None if new is output else new

    return hook


def _raise_stop(module: nn.Module, args: tuple, output) -> None:
    raise _StopForward
