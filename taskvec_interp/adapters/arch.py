"""Where the blocks and sublayers live in each architecture: a small table, one row per family, and
discovery (:func:`discover_arch`) for any other Hugging Face causal LM.

Adding a model family is adding a row (keyed by ``config.model_type``), not an if/elif chain; a model
without a row is discovered from its own structure (transformers' declared block classes, small tables
of sublayer and norm names) and validated by one forward pass on random tokens before it is used.
Paths are dotted attribute paths: ``blocks`` from the model root to the ``nn.ModuleList`` of blocks,
the others relative to one block. ``None`` means the family has no such sublayer.

A row holds paths only. Facts about the loaded model that its version of transformers decides
(whether its forward takes ``position_ids``, whether ``output_hidden_states`` starts with the
embeddings) are measured on load by :func:`find_arch`, and every path of a row is checked against the
model then (a ``ValueError`` names the field): a row cannot go stale silently. (transformers 5.25 moved
Mamba-2 to the generic hidden-states recorder: its ``hidden_states`` now start with the embeddings,
as GPT-2's do, where 5.24's started with block 0's output; Mamba (1) still starts with block 0.)

The rest of this module reads what a model says about itself (:func:`config_d_model`,
:func:`config_n_ctx`, :func:`heads_of`, :func:`input_device`, :func:`model_logits`), for every backend.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ArchSpec:
    blocks: str
    attn: str | None = None
    mlp: str | None = None
    mixer: str | None = None
    final_norm: str | None = None
    position_ids: bool | None = None
    """Whether the model's forward takes ``position_ids`` (left padding needs them). Measured on load from
    the forward's signature where a row leaves it ``None`` (every table row)."""
    hidden_states_has_embeddings: bool | None = None
    """Whether ``output_hidden_states`` starts with the embeddings (GPT-2, Llama, Mamba-2 on transformers
    >= 5.25) or with block 0's output (Mamba, Mamba-2 on <= 5.24). Measured on load by one forward on two
    tokens (:func:`measure_hidden_states_offset`); ``None`` where the model cannot run here (weights on the
    meta device: a remote nnsight model) or its ``hidden_states`` do not line up with its blocks."""
    left_padding: bool = True
    """Whether a left-padded row equals the same prompt run alone. ``False`` for models whose positions
    cannot follow the padding (absolute positions without ``position_ids``, as BART-style decoders; their
    own offset positions, as RoBERTa): the adapters then batch only prompts of equal token length."""
    o_proj: str | None = None
    """The attention's output projection, relative to a block (``attn.c_proj`` for GPT-2): its input is the
    per-head attention output, the ``z`` site (``blocks.{l}.attn.hook_z``). ``None``: no ``z`` site."""

    @property
    def components(self) -> tuple[str, ...]:
        comps = ["resid_pre"]
        comps += [name for name, path in (("attn_out", self.attn), ("mlp_out", self.mlp), ("mixer_out", self.mixer)) if path]
        return (*comps, "resid_post")

    def sublayer(self, component: str) -> str | None:
        return {"attn_out": self.attn, "mlp_out": self.mlp, "mixer_out": self.mixer}.get(component)


_DECODER = ArchSpec(blocks="model.layers", attn="self_attn", mlp="mlp", final_norm="model.norm",
                    o_proj="self_attn.o_proj")

ARCHS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(blocks="transformer.h", attn="attn", mlp="mlp", final_norm="transformer.ln_f",
                     o_proj="attn.c_proj"),
    "gpt_neox": ArchSpec(blocks="gpt_neox.layers", attn="attention", mlp="mlp", final_norm="gpt_neox.final_layer_norm",
                         o_proj="attention.dense"),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "olmo": _DECODER,
    "olmo2": _DECODER,
    "phi3": _DECODER,
    "mamba": ArchSpec(blocks="backbone.layers", mixer="mixer", final_norm="backbone.norm_f"),
    "mamba2": ArchSpec(blocks="backbone.layers", mixer="mixer", final_norm="backbone.norm_f"),
}
"""Paths only: the measured facts (``position_ids``, ``hidden_states_has_embeddings``) stay ``None`` here."""


def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            raise ValueError(f"{type(root).__name__} has no submodule {path!r} (missing {part!r})")
        mod = getattr(mod, part)
    return mod


def find_arch(model: nn.Module, blocks: str | None = None, discover: bool = False) -> ArchSpec:
    """The table row for ``model``; else a row built from an explicit ``blocks`` path (custom models);
    else :func:`discover_arch` (any Hugging Face causal LM; validated by one forward pass).

    Custom modules may also declare ``blocks_path`` (a str attribute), as the synthetic models do.
    ``discover=True`` skips the table (discovery even for a known family).
    """
    if blocks is None:
        blocks = getattr(model, "blocks_path", None)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if blocks is not None:
        params = inspect.signature(model.forward).parameters
        spec = ArchSpec(blocks=blocks, position_ids="position_ids" in params)
        if getattr(model, "config", None) is not None:  # a transformers model: fill in the rest if it validates
            with contextlib.suppress(ValueError):
                spec = discover_arch(model, blocks=blocks)
    elif model_type in ARCHS and not discover:
        spec = ARCHS[model_type]
        check_row(model, spec, f"the ARCHS row for model_type {model_type!r}")
    elif getattr(model, "config", None) is not None:
        spec = discover_arch(model)
    else:
        raise ValueError(
            f"no architecture row for {type(model).__name__} (no transformers config, model_type {model_type!r}); "
            f"known: {sorted(ARCHS)}. Pass blocks='path.to.ModuleList' or give the module a blocks_path attribute"
        )
    mods = get_module(model, spec.blocks)
    if not isinstance(mods, (nn.ModuleList, nn.Sequential)) or len(mods) == 0:
        raise ValueError(f"{spec.blocks!r} of {type(model).__name__} is not a non-empty ModuleList of blocks")
    if spec.o_proj is None:
        found = find_o_proj(mods)
        if found is not None:
            spec = replace(spec, o_proj=found)
    return measured(model, spec, mods)


def takes_position_ids(model: nn.Module) -> bool:
    """Whether ``model.forward`` names a ``position_ids`` parameter."""
    return "position_ids" in inspect.signature(model.forward).parameters


def measured(model: nn.Module, spec: ArchSpec, blocks: nn.ModuleList | None = None) -> ArchSpec:
    """``spec`` with ``position_ids`` measured from the forward's signature. ``hidden_states_has_embeddings``
    stays ``None`` here and is measured where it is needed (:func:`~taskvec_interp.adapters.verify.verify_adapter`,
    discovery) by :func:`measure_hidden_states_offset`: a forward with ``output_hidden_states`` makes transformers
    (>= 5.25) install its own output-capturing hooks on the blocks for good, so loading a model never runs one."""
    if spec.position_ids is None:
        spec = replace(spec, position_ids=takes_position_ids(model))
    return spec


def check_row(model: nn.Module, spec: ArchSpec, what: str) -> None:
    """Every path of a hand-written ``spec`` exists on ``model`` (``blocks`` a non-empty module list; the
    sublayers and ``o_proj`` on every block; ``final_norm`` from the root), else a ``ValueError`` naming
    the field: a table row that no longer fits the installed transformers fails on load, not later."""
    name = type(model).__name__
    fix = "update the row, or pass discover=True (find_arch) to build one from the model itself"
    blocks = _get_or_none(model, spec.blocks)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ValueError(f"{what} says blocks={spec.blocks!r}, but {name} has no non-empty module list there; {fix}")
    if spec.final_norm is not None and _get_or_none(model, spec.final_norm) is None:
        raise ValueError(f"{what} says final_norm={spec.final_norm!r}, but {name} has no such submodule; {fix}")
    for field in ("attn", "mlp", "mixer", "o_proj"):
        path = getattr(spec, field)
        if path is None:
            continue
        missing = [i for i, block in enumerate(blocks) if _get_or_none(block, path) is None]
        if missing:
            raise ValueError(f"{what} says {field}={path!r}, but block {missing[0]} of {name} ({spec.blocks}) has "
                             f"no such submodule; {fix}")


_OFFSETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hidden_states_offset(hs: Sequence[Tensor], outs: Sequence[Tensor], rtol: float) -> int | None:
    """Where block 0's output sits in a model's ``hidden_states`` (``1``: the embeddings come first; ``0``: the
    blocks do), from the blocks' own outputs ``outs`` (one forward); ``None`` if they do not line up. The
    entries must be the blocks' outputs in order (the last may be through the final norm)."""
    n = len(outs)
    if len(hs) not in (n, n + 1):
        return None
    firsts = [f for f in dict.fromkeys((len(hs) - n, 0)) if all(_close(outs[i], hs[f + i], rtol) for i in range(n - 1))]
    return firsts[0] if firsts else None


def measure_hidden_states_offset(model: nn.Module, blocks: nn.ModuleList, position_ids: bool) -> int | None:
    """:func:`hidden_states_offset` measured by one forward of ``model`` on two random tokens (cached per model).
    ``None`` where it cannot run here (every weight on the meta device and no accelerate hook to bring them:
    a remote nnsight model), its forward on token ids fails, or its ``hidden_states`` do not line up."""
    if model in _OFFSETS:
        return _OFFSETS[model]
    params = list(model.parameters())
    if params and all(p.device.type == "meta" for p in params) and not any(
            hasattr(m, "_hf_hook") for m in model.modules()):
        return None
    rec: dict[str, list] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _recording({str(i): b for i, b in enumerate(blocks)}, rec):
            out = model(**_probe_inputs(model, position_ids, lengths=(2,)), **_call_kwargs(model))
    except Exception:  # a model that needs more than token ids: the fact stays unknown (verify_adapter says so)
        return None
    finally:
        model.train(was_training)
    hs = getattr(out, "hidden_states", None)
    calls = [rec.get(str(i), []) for i in range(len(blocks))]
    offset = None
    if hs and all(len(c) == 1 and c[0][1] is not None for c in calls):
        dtype = next(iter(params)).dtype if params else torch.float32
        rtol = max(1e-4, 16 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-4
        offset = hidden_states_offset(hs, [c[0][1] for c in calls], rtol)
    _OFFSETS[model] = offset
    return offset


O_PROJ_NAMES: tuple[str, ...] = ("attn.c_proj", "self_attn.o_proj", "attention.dense", "self_attention.dense",
                                 "attn.o_proj", "attention.o_proj", "self_attn.out_proj", "attn.out_proj",
                                 "self_attn.dense", "attn.attention.out_proj", "attn.out")
"""Paths (relative to a block) of the attention's output projection, tried in order (every block must have it,
and its attention module must say how many heads it has)."""


def find_o_proj(blocks: nn.ModuleList) -> str | None:
    """The first path of :data:`O_PROJ_NAMES` that every block has, whose attention knows its head count."""
    for path in O_PROJ_NAMES:
        parent, _, leaf = path.rpartition(".")
        ok = True
        for block in blocks:
            attn = _get_or_none(block, parent)
            proj = getattr(attn, leaf, None) if attn is not None else None
            if not isinstance(proj, nn.Module) or attn_heads(attn) is None:
                ok = False
                break
        if ok:
            return path
    return None


def _get_or_none(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def attn_heads(attn: nn.Module) -> int | None:
    """The number of query heads of an attention module (``num_heads``, ``n_head``, ``num_attention_heads``,
    here or on its ``config``), or ``None`` if it does not say."""
    for owner in (attn, getattr(attn, "config", None)):
        for name in ("num_heads", "n_head", "num_attention_heads", "n_heads"):
            value = getattr(owner, name, None) if owner is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def o_proj_heads(model: nn.Module, spec: ArchSpec, blocks: nn.ModuleList) -> int | None:
    """The head count behind ``spec.o_proj`` (the model config's when the attention module does not say)."""
    if spec.o_proj is None:
        return None
    attn = _get_or_none(blocks[0], spec.o_proj.rpartition(".")[0])
    n = attn_heads(attn) if attn is not None else None
    if n is None:
        cfg = getattr(model, "config", None)
        for name in ("num_attention_heads", "n_head", "num_heads"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return n


# ---------------------------------------------------------------- discovery
# Candidate names, tried in this order; discovery is these tables plus one validating forward pass.
SUBLAYER_NAMES: dict[str, tuple[str, ...]] = {
    "attn": ("self_attn", "attn", "attention", "self_attention", "attn_layer", "mha", "attention_block"),
    "mlp": ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "feedforward", "mlp_block", "ff", "moe_block"),
    "mixer": ("mixer", "mamba", "linear_attn", "ssm", "conv", "temporal_block", "recurrent"),
}
"""Direct children of a block that may be its attention / MLP / sequence mixer (first that validates wins)."""
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "norm_f", "final_layer_norm", "final_norm", "layer_norm",
                    "layernorm", "ln_out", "final_ln", "norm_out")
"""Names of the final norm after the blocks (any module whose class name contains 'norm' is tried after these)."""
_LEAF_TYPES = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.Dropout, nn.Conv1d, nn.Identity)
_DISCOVERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _class_names(model: nn.Module) -> set[str]:
    """Block class names transformers itself declares: ``_no_split_modules`` and the hidden-states recorder."""
    names = {n for n in (getattr(model, "_no_split_modules", None) or []) if isinstance(n, str)}
    record = getattr(model, "_can_record_outputs", None)
    hs = record.get("hidden_states") if isinstance(record, dict) else None
    for item in hs if isinstance(hs, (list, tuple)) else [hs]:
        if isinstance(item, type):
            names.add(item.__name__)
        elif item is not None:
            cls = getattr(item, "target_class", None)
            names.update(n for n in (getattr(cls, "__name__", None), getattr(item, "class_name", None)) if n)
    return names


def _block_candidates(model: nn.Module) -> list[tuple[str, str]]:
    """(path, why) of module lists that may be the blocks: transformers' declared block classes first,
    then lists of identical non-leaf modules; longer lists first, then shallower paths."""
    declared = _class_names(model)
    named, same = [], []
    for path, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 1 or not path:
            continue
        classes = {type(m).__name__ for m in mod}
        if declared and classes <= declared:
            named.append((path, len(mod)))
        elif len(classes) == 1 and not isinstance(mod[0], _LEAF_TYPES) and any(True for _ in mod[0].children()):
            same.append((path, len(mod)))
    order = sorted(named, key=lambda p: (-p[1], p[0].count("."))) + sorted(same, key=lambda p: (-p[1], p[0].count(".")))
    return [(p, "declared block class" if (p, n) in named else "identical blocks") for p, n in order]


def _first_tensor(x: object) -> Tensor | None:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):  # the adapters rewrite both
        return x[0]
    return None


def _close(a: Tensor, b: Tensor, rtol: float) -> bool:
    if a.shape != b.shape:
        return False
    a, b = a.float(), b.float()
    scale = max(a.abs().max().item(), b.abs().max().item(), 1.0)
    return (a - b).abs().max().item() <= 1e-5 + rtol * scale


def _same(a: Tensor | None, b: Tensor) -> bool:
    return a is b or (a is not None and a.shape == b.shape and bool(torch.equal(a, b)))


def _probe_inputs(model: nn.Module, position_ids: bool, lengths: tuple[int, ...] = (6, 4), seed: int = 0
                  ) -> dict[str, Tensor]:
    """A left-padded batch of random token ids (no tokenizer): attention mask and, where taken, position ids."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None) or 2
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(1, max(2, int(vocab)), (len(lengths), n), generator=g)
    mask = torch.zeros((len(lengths), n), dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, n - length:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if position_ids:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return {k: v.to(device) for k, v in kwargs.items()}


def _call_kwargs(model: nn.Module) -> dict:
    params = inspect.signature(model.forward).parameters
    extra = {"output_hidden_states": True, "return_dict": True}
    if "use_cache" in params:
        extra["use_cache"] = False
    return extra


@contextlib.contextmanager
def _recording(modules: dict[str, nn.Module], store: dict[str, list]):
    """Record (first input tensor, first output tensor) of every module, per call."""
    def make(key):
        def hook(module, args, kwargs, output):
            x = args[0] if args and isinstance(args[0], Tensor) else kwargs.get("hidden_states")
            y = _first_tensor(output)  # copies: some blocks add into a sublayer's output in place
            store.setdefault(key, []).append((None if x is None else x.clone(), None if y is None else y.clone()))
            store.setdefault("#order", []).append(key)
        return hook

    handles = [m.register_forward_hook(make(k), with_kwargs=True) for k, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _norm_candidates(model: nn.Module, blocks_path: str) -> list[str]:
    named = [(p, m) for p, m in model.named_modules()
             if p and not (p == blocks_path or p.startswith(blocks_path + "."))
             and not any(True for _ in m.children())]
    by_name = [p for p, _ in named if p.rsplit(".", 1)[-1] in FINAL_NORM_NAMES]
    by_name.sort(key=lambda p: FINAL_NORM_NAMES.index(p.rsplit(".", 1)[-1]))
    by_class = [p for p, m in reversed(named) if "norm" in type(m).__name__.lower() and p not in by_name]
    return by_name + by_class


def discover_arch(model: nn.Module, blocks: str | None = None) -> ArchSpec:
    """An :class:`ArchSpec` for any Hugging Face causal LM, found from the model's own structure and validated.

    Blocks: the module list whose items are the block classes transformers declares (``_no_split_modules``,
    the ``hidden_states`` recorder), else the longest list of identical blocks (or ``blocks=``). Sublayers:
    the block's direct children named as in :data:`SUBLAYER_NAMES`, kept only when every block has one, it
    outputs ``[batch, seq, d_model]`` (or a tuple starting with it) and the block's output is its input
    plus the kept sublayers' outputs (each possibly through a norm child of the block: post-norms).
    Validation, one forward on random token rows: every block's output equals the model's own
    ``output_hidden_states`` (the last through the final norm found here), and a left-padded row equals
    the same row unpadded. Where the padding is what fails (absolute positions without ``position_ids``,
    RoBERTa's own offset positions, RWKV's recurrence), the validation is rerun on rows of one length and
    the spec gets ``left_padding=False`` (``position_ids=False`` where the model's own positions are what
    agree). Raises ``ValueError`` saying what was tried and failed.
    """
    if blocks is None and model in _DISCOVERED:
        return _DISCOVERED[model]
    name = type(model).__name__
    if getattr(model, "config", None) is None:
        raise ValueError(f"cannot discover the architecture of {name}: it has no transformers config; pass "
                         "blocks='path.to.ModuleList' (or give the module a blocks_path attribute)")
    hint = f"pass blocks='path.to.ModuleList' (e.g. {name}'s decoder layers) or add a row to ARCHS"
    candidates = [(blocks, "blocks=")] if blocks is not None else _block_candidates(model)
    if not candidates:
        raise ValueError(f"no block list found in {name} (model_type {model.config.model_type!r}): no ModuleList of "
                         f"its declared block classes {sorted(_class_names(model)) or '(none declared)'} nor of "
                         f"identical blocks; {hint}")
    position_ids = "position_ids" in inspect.signature(model.forward).parameters
    was_training = model.training
    model.eval()
    try:
        spec, why, ran = _validate(model, candidates, _probe_inputs(model, position_ids), position_ids)
        if (spec is not None and why) or not ran:  # padding (or the padded forward) fails: try unpadded rows
            spec, why = _validate_unpadded(model, candidates, position_ids, why)
    finally:
        model.train(was_training)
    if spec is None:
        raise ValueError(f"architecture discovery failed for {name} (model_type {model.config.model_type!r}): "
                         f"{why}; {hint}")
    if spec.o_proj is None:  # the per-head z site: found by name (O_PROJ_NAMES), not validated by the forward
        spec = replace(spec, o_proj=find_o_proj(get_module(model, spec.blocks)))
    if blocks is None:
        _DISCOVERED[model] = spec
    return spec


def _validate_unpadded(model: nn.Module, candidates: list[tuple[str, str]], position_ids: bool, padded_why: str
                       ) -> tuple[ArchSpec | None, str]:
    """After the left-padded probe failed: the same validation on rows of one length (no padding), first
    with mask-derived position ids where the model takes them, then letting the model compute its own
    (RoBERTa's start after the padding index). A spec found here has ``left_padding=False``."""
    tried = []
    for pos in dict.fromkeys((position_ids, False)):
        spec, why, _ = _validate(model, candidates, _probe_inputs(model, pos, lengths=(6, 6)), pos)
        if spec is not None and not why:
            return replace(spec, left_padding=False), ""
        tried.append(f"without padding{' and with' if pos else ', without'} position_ids: {why}")
    return None, f"{padded_why}; " + "; ".join(tried)


def _validate(model: nn.Module, candidates: list[tuple[str, str]], inputs: dict[str, Tensor], position_ids: bool
              ) -> tuple[ArchSpec | None, str, bool]:
    """``(spec, "", True)`` if a candidate validates on ``inputs``; ``(spec, why, True)`` if one validates but
    a padded row (or, unpadded, a row of the batch) differs from the same row alone; ``(None, why, ran)``
    otherwise, ``ran`` saying whether the model's forward on ``inputs`` itself ran."""
    extra = _call_kwargs(model)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    rtol = max(1e-4, 16 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-4
    lists = {p: get_module(model, p) for p, _ in candidates[:4]}
    watched = {}
    for p, mods in lists.items():
        for i, block in enumerate(mods):
            watched[f"{p}|{i}"] = block
            for child, sub in block.named_children():
                watched[f"{p}|{i}|{child}"] = sub
    rec: dict[str, list] = {}
    padded = bool((inputs["attention_mask"] == 0).any())
    try:
        with torch.no_grad(), _recording(watched, rec):
            out = model(**inputs, **extra)
    except Exception as err:  # e.g. a model that needs inputs beyond token ids (pixels, audio)
        what = "a left-padded batch of random token ids" if padded else "random token ids"
        return None, f"its forward on {what} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})", False
    hs = getattr(out, "hidden_states", None)
    if not hs:
        return None, "its forward returned no hidden_states to validate against (output_hidden_states=True)", True
    tried = []
    for path, why in candidates[:4]:
        n = len(lists[path])
        calls = [rec.get(f"{path}|{i}", []) for i in range(n)]
        if any(len(c) != 1 or c[0][1] is None for c in calls):
            tried.append(f"{path!r} ({why}): its blocks did not each run once returning a tensor (or a tuple or "
                         "list starting with one)")
            continue
        outs = [c[0][1] for c in calls]
        if len(hs) not in (n, n + 1):
            tried.append(f"{path!r} ({why}): {n} blocks but {len(hs)} hidden_states")
            continue
        # n + 1 entries: the embeddings first (GPT-2, Llama) or the blocks then a final normed copy (Mamba)
        first = hidden_states_offset(hs, outs, rtol)
        if first is None:
            tried.append(f"{path!r} ({why}): block 0's output differs from hidden_states[{len(hs) - n}] "
                         "(and the blocks' outputs from hidden_states in order)")
            continue
        final_norm, ok = None, _close(outs[-1], hs[-1], rtol)
        norms = _norm_candidates(model, path)
        if not ok:
            with torch.no_grad():
                for cand in norms:
                    try:
                        ok = _close(get_module(model, cand)(outs[-1]), hs[-1], rtol)
                    except Exception:  # a norm-named module that is not a plain norm of the residual
                        ok = False
                    if ok:
                        final_norm = cand
                        break
        if not ok:
            tried.append(f"{path!r} ({why}): hidden_states[-1] is neither the last block's output nor a final norm "
                         f"of it (tried {norms[:6]})")
            continue
        blocks = lists[path]
        subs = _sublayers(blocks, path, rec, outs)
        spec = ArchSpec(blocks=path, final_norm=final_norm, position_ids=position_ids,
                        hidden_states_has_embeddings=first == 1, **subs)
        try:
            mismatch = _padding_mismatch(model, blocks, inputs, extra, outs, rtol)
        except Exception as err:  # the one-row forward itself failed
            mismatch = f"its forward on one unpadded row failed ({type(err).__name__}: {str(err)[:200]})"
        return spec, f"{path!r} validates, but {mismatch}" if mismatch else "", True
    return None, "; ".join(tried), True


def _sublayers(blocks: nn.ModuleList, path: str, rec: dict, outs: list[Tensor]) -> dict[str, str | None]:
    """The attn / mlp / mixer children every block has, that fire with the block's output shape, kept only
    when every block is residual around its recognised children: out = in + sum(child (or its post-norm))."""
    n = len(blocks)

    def fired(i: int, child: str) -> Tensor | None:
        calls = rec.get(f"{path}|{i}|{child}", [])
        ok = len(calls) == 1 and calls[0][1] is not None and calls[0][1].shape == outs[i].shape
        return calls[0][1] if ok else None

    all_names = [c for names in SUBLAYER_NAMES.values() for c in names]
    found = {comp: next((c for c in names if all(fired(i, c) is not None for i in range(n))), None)
             for comp, names in SUBLAYER_NAMES.items()}
    # hooks run in the components' fixed order (attn, mlp, mixer): keep only those that fire in that order
    order = rec.get("#order", [])
    last = -1
    for comp, child in found.items():
        pos = order.index(f"{path}|0|{child}") if child else -1
        if child and pos < last:
            found[comp] = None
        elif child:
            last = pos
    if not any(found.values()):
        return found
    for i in range(n):
        x = rec[f"{path}|{i}"][0][0]
        if x is None or x.shape != outs[i].shape:
            return dict.fromkeys(found)
        kids = [k for k, _ in blocks[i].named_children()]
        norms = [k for k in kids if "norm" in k.lower() and rec.get(f"{path}|{i}|{k}")]
        total = x.float()
        for child in [k for k in kids if k in all_names and fired(i, k) is not None]:  # hybrids: per block
            y = fired(i, child)
            post = [rec[f"{path}|{i}|{k}"][0][1] for k in norms if _same(rec[f"{path}|{i}|{k}"][0][0], y)]
            total = total + (post[0] if post else y).float()
        if not _close(total, outs[i], 1e-4):
            return dict.fromkeys(found)
    return found


def _padding_mismatch(model: nn.Module, blocks: nn.ModuleList, inputs: dict[str, Tensor], extra: dict,
                      outs: list[Tensor], rtol: float) -> str | None:
    """Why a left-padded row's block outputs differ from the same row run alone (``None`` if they agree)."""
    row = 1
    keep = inputs["attention_mask"][row].bool()
    # the reference is the model's own call on the row alone, with its own default positions
    single = {k: v[row:row + 1][:, keep] for k, v in inputs.items() if k != "position_ids"}
    rec: dict[str, list] = {}
    with torch.no_grad(), _recording({str(i): b for i, b in enumerate(blocks)}, rec):
        model(**single, **extra)
    for i in range(len(blocks)):
        alone = rec[str(i)][0][1][0, -1]
        if not _close(outs[i][row, -1], alone, max(rtol, 1e-4)):
            diff = (outs[i][row, -1].float() - alone.float()).abs().max().item()
            how = ("takes position_ids, but its own default positions differ from the mask-derived 0, 1, 2, ... "
                   "(e.g. offset by the padding index)" if "position_ids" in inputs else "takes no position_ids")
            if not bool(keep.all()):
                return (f"a left-padded row differs from the same row alone at block {i} (max abs diff {diff:.3g}; "
                        f"the model {how}), so batches of prompts of different lengths would be wrong")
            return (f"a row of an unpadded batch differs from the same row alone at block {i} (max abs diff "
                    f"{diff:.3g}; the model {how})")
    return None


# ---------------------------------------------------------------- introspection
# What a loaded model says about itself (every backend reads it through these).


def model_logits(out: object) -> Tensor:
    """Logits of a model output (``ModelOutput.logits``, a tuple's first item, or a tensor)."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def config_d_model(model: nn.Module) -> int | None:
    """The residual width from the model's config: its own, else its text model's (multimodal models keep
    it in ``text_config``), else a ``d_model`` attribute of the module."""
    cfg = getattr(model, "config", None)
    configs = [cfg]
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        try:
            configs.append(get_text())
        except (TypeError, ValueError, AttributeError):
            pass
    for c in configs:
        for attr in ("hidden_size", "n_embd", "d_model"):
            value = getattr(c, attr, None) if c is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return getattr(model, "d_model", None)


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the input embedding's execution device for a model dispatched with
    accelerate (``device_map``: its weights may sit on other devices, the CPU or disk, as ``meta``
    parameters), else the first real parameter's device; the CPU for a parameterless or all-meta model
    (e.g. an nnsight model whose weights live on a remote NDIF server)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
    hook = getattr(emb, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    for p in ([*emb.parameters()] if isinstance(emb, nn.Module) else []) + [*model.parameters()]:
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def config_n_ctx(model: nn.Module) -> int | None:
    """The context length from the config (``n_positions`` / ``max_position_embeddings``); ``None`` for
    recurrent models (Mamba, Mamba-2: no positions, no limit)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) in ("mamba", "mamba2"):
        return None
    for attr in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    return None


def heads_of(model: nn.Module, arch, blocks: nn.ModuleList) -> tuple[int | None, str | None]:
    """``(n_heads, None)`` where the per-head ``z`` site is available, else ``(None, why not)``."""
    if arch.o_proj is None:
        kind = "has no attention" if arch.attn is None and arch.mixer is not None else \
            "has no known attention output projection (o_proj)"
        return None, (f"{type(model).__name__} {kind}; the z site hooks the input of the attention's output "
                      "projection: give its ArchSpec an o_proj path (e.g. 'self_attn.o_proj')")
    n = o_proj_heads(model, arch, blocks)
    if n is None:
        return None, f"the head count of {type(model).__name__}'s attention ({arch.o_proj}) is unknown"
    return n, None
