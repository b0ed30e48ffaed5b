"""``verify_adapter``: check that an adapter reads and writes the model it claims to (as nnterp does).

Checks, each a row of the returned DataFrame; a check passes when
``max_abs_diff <= atol + rtol * scale`` with ``scale`` the largest magnitude compared (real models
carry residual entries in the hundreds, where fp32 batching noise is ~1e-6 relative):

* ``padded_vs_single``: a left-padded batch gives the same activations as one prompt at a time;
* ``resid_vs_model``: captured residuals equal the model's own ``output_hidden_states`` (layer ``l``'s
  block output; the last layer through the model's final norm);
* ``logits_vs_model``: last-token logits equal the model's own forward;
* ``identity_hooks``: a hook returning a copy at every site leaves the logits unchanged.

What the model comparison needs (where the blocks are, the final norm, whether ``hidden_states``
starts with the embeddings) comes from the adapter's own ``adapter.arch`` (a table row or a discovered
architecture alike, its layout facts measured on load; one left unmeasured is measured here); an adapter
without one (TransformerLens) gets the padding and hook checks only.
``prompts`` may be strings or, for a model without a tokenizer, a left-padded :class:`ModelInputs`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from ..hooks import Site
from .arch import ArchSpec, get_module, measure_hidden_states_offset, model_logits
from .base import Adapter, ModelInputs

DEFAULT_PROMPTS = (
    "The capital of France is",
    "hot -> cold\nbig -> small\nup ->",
    "1 2 3",
    "Once upon a time, in a land far away, there lived a",
)


class AdapterMismatchError(ValueError):
    """An adapter's activations or logits disagree with the model's own forward."""


def _rows(prompts: list[str] | ModelInputs) -> list[list[str] | ModelInputs]:
    """Each prompt on its own (a ``ModelInputs`` row is re-trimmed to its own length)."""
    if isinstance(prompts, ModelInputs):
        return [prompts.rows(torch.tensor([i], device=prompts.pad.device)) for i in range(prompts.batch)]
    return [[p] for p in prompts]


def _token_ids(adapter: Adapter, prompts: list[str] | ModelInputs) -> list[list[int]]:
    if isinstance(prompts, ModelInputs):
        ids = prompts.kwargs["input_ids"]
        return [ids[b, int(prompts.pad[b]):].tolist() for b in range(prompts.batch)]
    return adapter.encode(prompts)


def _forward(adapter: Adapter, prompts: Sequence[str] | ModelInputs, hooks: list = ()) -> torch.Tensor:
    """Last-token logits of every prompt, in order; an adapter that cannot take a padded batch
    (``left_padding=False``) runs one forward per group of prompts of equal token length."""
    if isinstance(prompts, ModelInputs) or getattr(adapter, "left_padding", True):
        return adapter.forward(prompts, hooks=hooks)
    lengths = [len(r) for r in adapter.encode(prompts)]
    out: list = [None] * len(prompts)
    for length in sorted(set(lengths)):
        idx = [i for i, n in enumerate(lengths) if n == length]
        for i, row in zip(idx, adapter.forward([prompts[i] for i in idx], hooks=hooks), strict=True):
            out[i] = row
    return torch.stack(out)


def _hidden_states_offset(model: torch.nn.Module, spec: ArchSpec) -> int:
    """Where block 0's output sits in ``model``'s ``hidden_states``: the adapter's measured fact, else measured now."""
    if spec.hidden_states_has_embeddings is not None:
        return int(spec.hidden_states_has_embeddings)
    offset = measure_hidden_states_offset(model, get_module(model, spec.blocks), bool(spec.position_ids))
    if offset is None:
        raise ValueError(f"cannot compare {type(model).__name__}'s captured residuals with its output_hidden_states: "
                         "they do not line up with its blocks (hidden_states_has_embeddings is unknown)")
    return offset


def verify_adapter(
    adapter: Adapter, prompts: Sequence[str] | ModelInputs | None = None, atol: float = 1e-4, rtol: float = 1e-5,
    raise_on_fail: bool = True,
) -> pd.DataFrame:
    """Run the checks above on ``prompts`` (defaults: a few sentences of different lengths).

    Returns a tidy DataFrame (backend, check, max_abs_diff, scale, tol, ok); raises :class:`AdapterMismatchError`
    on failure unless ``raise_on_fail=False``.
    """
    if prompts is None:
        prompts = list(DEFAULT_PROMPTS)
    elif not isinstance(prompts, ModelInputs):
        prompts = list(prompts)
    n = prompts.batch if isinstance(prompts, ModelInputs) else len(prompts)
    if n < 2:
        raise ValueError(f"verify_adapter needs at least 2 prompts (of different lengths) to test padding, got {n}")
    rows = []
    batched = adapter.capture(prompts, batch_size=n, progress=False)
    single = torch.cat([adapter.capture(p, progress=False) for p in _rows(prompts)], dim=1)
    rows.append(("padded_vs_single", (batched - single).abs().max().item(), single.abs().max().item()))

    model = adapter._hf_module()  # the plain model under any backend's wrapper
    spec = getattr(adapter, "arch", None)
    if isinstance(spec, ArchSpec) and getattr(model, "config", None) is not None:
        ids = _token_ids(adapter, prompts)
        resid_diff, logit_diff, resid_scale, logit_scale = 0.0, 0.0, 0.0, 0.0
        logits = _forward(adapter, prompts)
        device = adapter.device
        first = _hidden_states_offset(model, spec)
        with torch.no_grad():
            norm = get_module(model, spec.final_norm) if spec.final_norm else torch.nn.Identity()
            for i, row in enumerate(ids):
                out = model(input_ids=torch.tensor([row], device=device), output_hidden_states=True)
                hs = out.hidden_states
                ref = torch.stack([hs[first + layer][0, -1] for layer in range(adapter.n_layers - 1)])
                mine = batched[: adapter.n_layers - 1, i].to(ref.dtype)
                last = norm(batched[-1, i].to(device=device, dtype=hs[-1].dtype)[None, None])[0, 0]
                resid_diff = max(resid_diff, (mine - ref.cpu()).abs().max().item(),
                                 (last - hs[-1][0, -1]).abs().max().item())
                ref_logits = model_logits(out)[0, -1]
                logit_diff = max(logit_diff, (logits[i] - ref_logits).abs().max().item())
                resid_scale = max(resid_scale, ref.abs().max().item(), hs[-1][0, -1].abs().max().item())
                logit_scale = max(logit_scale, ref_logits.abs().max().item())
        rows.append(("resid_vs_model", resid_diff, resid_scale))
        rows.append(("logits_vs_model", logit_diff, logit_scale))

    base = _forward(adapter, prompts)
    identity = [(Site(layer, comp), lambda act, ctx: act.clone())
                for layer in range(adapter.n_layers) for comp in adapter.components]
    hooked = _forward(adapter, prompts, identity)
    rows.append(("identity_hooks", (hooked - base).abs().max().item(), base.abs().max().item()))

    df = pd.DataFrame(rows, columns=["check", "max_abs_diff", "scale"])
    df["tol"] = atol + rtol * df["scale"]
    df["ok"] = df["max_abs_diff"] <= df["tol"]
    df.insert(0, "backend", adapter.backend)
    if raise_on_fail and not bool(df["ok"].all()):
        bad = df[~df["ok"]]
        raise AdapterMismatchError(f"{adapter!r} failed verification:\n{bad.to_string(index=False)}")
    return df
