"""nnsight 0.8 backend: the same hook functions, applied inside an nnsight trace.

Inside ``model.trace(...)`` nnsight hands the with-block real tensors (it runs the block alongside
the model), so a plain hook function can be called on ``envoy.output`` and its result written back.
Sites are visited in forward order, as nnsight requires. Hugging Face causal LMs are wrapped in
``nnsight.TransformersModel``; any other module in ``nnsight.NNsight``.
"""

from __future__ import annotations

from itertools import groupby

import nnsight
from torch import Tensor, nn

from ..hooks import HookFn, Site, checked_call
from .arch import config_d_model, config_n_ctx, find_arch, get_module, heads_of, input_device, model_logits
from .base import Adapter, LogitsMode, ModelInputs, _CallState


class NNsightAdapter(Adapter):
    """Backend on nnsight (``TransformersModel`` for HF causal LMs, ``NNsight`` for other modules)."""

    backend = "nnsight"

    def __init__(
        self, model: nn.Module | object, tokenizer: object | None = None, blocks: str | None = None,
        d_model: int | None = None, n_ctx: int | None = None, add_special_tokens: bool = True,
        remote: bool | str = False,
    ) -> None:
        if remote not in (False, True, "local") and not (isinstance(remote, str) and remote.startswith("http")):
            raise ValueError(f"remote must be False, True (NDIF), 'local' (nnsight's local simulation of a remote "
                             f"run) or an NDIF host URL, got {remote!r}")
        self.remote = remote
        if remote:
            # our hook functions run on the server: ship taskvec_interp's code with the request
            nnsight.register("taskvec_interp")

        if isinstance(model, (nnsight.NNsight, nnsight.TransformersModel)):  # 0.8: both Envoys, neither a subclass
            self.nn = model
            module = model._module
            tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        elif isinstance(model, nn.Module):
            module = model
            is_lm = hasattr(model, "generate") and getattr(model, "config", None) is not None
            if is_lm and tokenizer is not None:
                self.nn = nnsight.TransformersModel(model, tokenizer=tokenizer)
            else:
                self.nn = nnsight.NNsight(model)
        else:
            raise TypeError(f"NNsightAdapter needs an nn.Module or nnsight model, got {type(model).__name__}")
        self.module = module
        self.arch = find_arch(module, blocks)
        d = d_model or config_d_model(module)
        if d is None:
            raise ValueError("cannot infer d_model of this module: pass d_model=")
        blocks_envoy = self.nn
        for part in self.arch.blocks.split("."):
            blocks_envoy = getattr(blocks_envoy, part)
        self._blocks = blocks_envoy
        n_heads, why = heads_of(module, self.arch, get_module(module, self.arch.blocks))
        super().__init__(
            model=self.nn, n_layers=len(blocks_envoy), d_model=d, tokenizer=tokenizer,
            device=input_device(module),
            n_ctx=n_ctx or config_n_ctx(module), components=self.arch.components,
            position_ids=self.arch.position_ids, add_special_tokens=add_special_tokens,
            left_padding=self.arch.left_padding, n_heads=n_heads, no_heads_reason=why,
        )
        import inspect

        self._logits_to_keep = "logits_to_keep" in inspect.signature(module.forward).parameters

    def _envoy(self, site: Site):
        env = self._blocks[site.layer]
        path = self.arch.o_proj if site.component == "z" else self.arch.sublayer(site.component)
        if path is not None:
            for part in path.split("."):
                env = getattr(env, part)
        return env

    def _plan(self, hooks: list[tuple[Site, HookFn]]) -> list[tuple[object, bool, list[HookFn], Site, int | None]]:
        """(envoy, reads its input, hook functions, site, heads) per site in forward order: resolved outside
        the trace, so the trace body refers to envoys and hook functions only (what a remote run ships).
        ``heads``: the z site's head count (its envoy is the attention output projection, read at its input)."""
        return [(self._envoy(site), site.component in ("resid_pre", "z"), [f for _, f in group], site,
                 self.n_heads if site.component == "z" else None)
                for site, group in groupby(hooks, key=lambda p: p[0])]

    def _trace_kwargs(self) -> dict:
        return {} if not self.remote else {"remote": self.remote}

    def _forward(self, inputs: ModelInputs, hooks: list[tuple[Site, HookFn]], state: _CallState,
                 logits: LogitsMode) -> Tensor | None:
        kwargs = dict(inputs.kwargs)
        if logits != "all" and self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        plan = self._plan(hooks)
        stores = _stores(hooks)
        if logits == "none" and hooks:
            # only the hooks' side effects are wanted: stop the model after the last hooked site
            with self.nn.trace(**kwargs, **self._trace_kwargs()) as tracer:
                _apply(plan, state)
                back = nnsight.save(stores)
                tracer.stop()
            _merge(stores, back)
            return None
        model = self.nn  # the trace body names no adapter: a remote run ships only what it refers to
        with model.trace(**kwargs, **self._trace_kwargs()):
            _apply(plan, state)
            back = nnsight.save(stores)
            out = model.output.save()
        _merge(stores, back)
        lg = model_logits(out)
        return lg[:, -1] if (logits == "last" and lg.ndim == 3) else lg

    def _generate(self, inputs: ModelInputs, hooks: list[tuple[Site, HookFn]], state: _CallState,
                  max_new_tokens: int) -> Tensor:
        if not hasattr(self.nn, "generate") or not hasattr(self.module, "generate"):
            raise TypeError(f"{type(self.module).__name__} has no .generate(): generation needs a causal LM")
        tok = self.tokenizer
        prompt_len = inputs.length
        from transformers import GenerationConfig

        # No EOS stop inside generate: every step runs, so the bounded step loop below always
        # completes and the result can be read after it. Rows are cut at EOS by the caller.
        gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        plan = self._plan(hooks)
        stores = _stores(hooks)
        with self.nn.generate(
            input_ids=inputs.kwargs["input_ids"], attention_mask=inputs.kwargs["attention_mask"],
            generation_config=gen_cfg, **self._trace_kwargs(),
        ) as tracer:
            for _ in tracer.iter[:max_new_tokens]:
                state.advance(prompt_len if state.calls == 0 else 1)
                _apply(plan, state)
            back = nnsight.save(stores)
            ids = tracer.result.save()
        _merge(stores, back)
        return ids[:, prompt_len:]


def _apply(plan: list[tuple[object, bool, list[HookFn], Site, int | None]], state: _CallState) -> None:
    """Run the hooks on the live activations, in forward order (call inside a trace). Remote-safe: it
    touches only envoys, hook functions and the call state, no adapter or Python state outside them."""
    for env, is_input, fns, site, heads in plan:
        if is_input:
            act = env.input
            z = act if heads is None else act.reshape(*act.shape[:-1], heads, act.shape[-1] // heads)
            new = _run(fns, z, site, state)
            if new is not z:
                env.input = new if heads is None else new.reshape(act.shape)
            continue
        out = env.output
        seq = isinstance(out, (tuple, list))  # (lists: OpenAI GPT's blocks)
        act = out[0] if seq else out
        new = _run(fns, act, site, state)
        if new is not act:
            env.output = ([new, *out[1:]] if isinstance(out, list) else (new, *out[1:])) if seq else new


def _run(fns: list[HookFn], act: Tensor, site: Site, state: _CallState) -> Tensor:
    for fn in fns:
        act = checked_call(fn, act, state.context(site))
    return act


def _stores(hooks: list[tuple[Site, HookFn]]) -> list[dict]:
    """The dicts capture hooks write into (``hooks.capture`` tags them): saved out of the trace, so a
    remote run (where the hooks run on the server) sends what they captured back."""
    out, seen = [], set()
    for _, fn in hooks:
        store = getattr(fn, "store", None)
        if isinstance(store, dict) and id(store) not in seen:
            seen.add(id(store))
            out.append(store)
    return out


def _merge(stores: list[dict], back: object) -> None:
    """Copy what came back from the trace into the local stores (the same objects when run locally)."""
    for local, remote in zip(stores, back, strict=True):
        if remote is not local:
            local.update(remote)
