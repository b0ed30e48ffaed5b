"""The architecture matrix: every causal-LM ``model_type`` of the installed transformers, as a tiny random
model, loaded through each adapter backend the registry marks for it (:func:`matrix_backends`) and verified
(a test harness: used by ``tests/test_arch_matrix.py`` and ``scripts/arch_matrix.py``, which writes the
table in ``docs/architectures.md``).

The model types come from transformers' own auto mapping (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), not a
hand-written list. A tiny config is the model type's default config (``AutoConfig.for_model``) made tiny
by the first of :data:`RECIPES` that works: every width scaled by one common factor and the config rebuilt
through its constructor (:func:`scaled_config`), else the :data:`TINY_SIZES` values set on it
(:func:`shrink_config`); sub-configs too. Each build runs under a time limit. Every model that builds ends in one of three states per backend:

* ``verified``: ``make_adapter`` accepted it and :func:`verify_adapter` passed (padded batch vs one row at
  a time, every layer's capture vs ``output_hidden_states``, logits, identity hooks at every site);
* ``refused``: our code raised a ``ValueError`` saying why (e.g. no validating block list);
* ``failed`` / ``error``: verification disagreed, or something crashed (what the test forbids).
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters.arch import _probe_inputs
from ..adapters.base import ModelInputs


def matrix_backends() -> tuple[str, ...]:
    """The registered backends the matrix checks (those whose ``Backend.arch_matrix`` is set: torch, nnsight)."""
    from ..adapters.registry import with_capability

    return with_capability("arch_matrix")


TINY_SIZES: dict[str, int] = {
    # width
    "hidden_size": 32, "n_embd": 32, "d_model": 32, "n_embed": 32, "embed_dim": 32, "dim": 32,
    # depth
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
    # heads
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_key_value_heads": 2, "n_kv_heads": 2, "head_dim": 8, "kv_channels": 8,
    # MLP / experts
    "intermediate_size": 64, "ffn_dim": 64, "n_inner": 64, "decoder_ffn_dim": 64, "encoder_ffn_dim": 64,
    "moe_intermediate_size": 32, "rotary_dim": 4, "state_size": 8, "n_groups": 1, "shared_expert_intermediate_size": 32, "num_local_experts": 4, "num_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2,
    # multi-head latent attention, SSM / hybrid layouts, projections
    "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8, "kv_lora_rank": 16, "q_lora_rank": 16,
    "attention_hidden_size": 32, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
    "expert_layer_offset": 1, "word_embed_proj_dim": 32, "embedding_size": 32, "mamba_d_ssm": 32,
    "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8, "mamba_chunk_size": 16, "chunk_size": 16,
    # vocabulary and context
    "vocab_size": 256, "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128,
}
"""Size fields set wherever a config has them (a model type without one keeps its default)."""
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")
ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
BUILD_SECONDS = 5.0


def causal_lm_model_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class, from its own auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink_per_layer(cfg: object, n_old: int | None, n_new: int) -> None:
    """Per-layer lists/patterns (``layer_types``, hybrid patterns) cut to ``n_new`` layers, keeping each
    distinct kind (first occurrences first, in the original order)."""
    if not n_old:
        return
    for key, value in list(vars(cfg).items()):
        if isinstance(value, (list, str)) and len(value) == n_old and n_old != n_new and key not in ID_FIELDS:
            if isinstance(value, str) and not _is_pattern(key, value):
                continue
            firsts = sorted({v: i for i, v in reversed(list(enumerate(value)))}.values())[:n_new]
            keep = sorted(firsts + [i for i in range(n_old) if i not in firsts][: n_new - len(firsts)])
            new = [value[i] for i in keep]
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                setattr(cfg, key, "".join(new) if isinstance(value, str) else new)


def _is_pattern(key: str, value: str) -> bool:
    """A per-layer pattern string (Nemotron-H's ``"M-M*-"``), not a name that happens to have as many
    characters as there are layers (``"gelu"``, ``"block_sparse"``)."""
    return "pattern" in key or not value.replace("_", "a").isalnum()


WIDTH_RE = re.compile(r"hidden|intermediate|ffn|inner|embed|embd|d_model|^dim$|_dim$|dim_|headdim|d_head|rank"
                      r"|channels|d_ssm|_size_per")
"""Config fields that are widths (scaled together by :func:`scaled_overrides`) ..."""
NOT_WIDTH_RE = re.compile(r"vocab|position|window|kernel|conv|chunk|token|layers|^num_|^n_|_num|head_dim_factor"
                          r"|multiple|max_|seq|bucket|length|ctx|scale|factor|group|base|expert_num|top")
"""... unless they match this (counts, vocabularies, context lengths, kernel sizes)."""
HEAD_DIM_RE = re.compile(r"head_dim|headdim|d_head|kv_channels|rope|nope")
"""Widths of one head (kept even: rotary embeddings rotate pairs)."""
MIN_HIDDEN = 32
MIN_HEAD_DIM = 2


def _width_fields(cfg: object) -> dict[str, int]:
    return {k: v for k, v in vars(cfg).items() if isinstance(v, int) and not isinstance(v, bool) and v > 0
            and WIDTH_RE.search(k) and not NOT_WIDTH_RE.search(k)}


MODEL_WIDTHS = ("hidden_size", "d_model", "n_embd", "n_embed", "dim", "embed_dim", "embedding_dim", "embedding_size")


def width_factor(cfg: object) -> int:
    """The largest power of two dividing the model width(s) of ``cfg`` (:data:`MODEL_WIDTHS`) that leaves the
    hidden size at least :data:`MIN_HIDDEN` and every head width (given, or derived as hidden / heads) even
    and at least :data:`MIN_HEAD_DIM` (``1`` if none). Other widths (MLP, low ranks) are divided by it
    exactly where they can be, rounded up where not."""
    widths = _width_fields(cfg)
    hidden = next((widths[k] for k in ("hidden_size", "d_model", "n_embd", "n_embed", "dim") if k in widths), None)
    if hidden is None:
        return 1
    heads = next((getattr(cfg, k) for k in ("num_attention_heads", "n_head", "n_heads", "num_heads")
                  if isinstance(getattr(cfg, k, None), int)), None)
    head_dims = [v for k, v in widths.items() if HEAD_DIM_RE.search(k)]
    if heads and hidden % heads == 0 and not head_dims:
        head_dims.append(hidden // heads)
    model_widths = [v for k, v in widths.items() if k in MODEL_WIDTHS]
    g = 1
    while hidden // (2 * g) >= MIN_HIDDEN and all(v % (2 * g) == 0 for v in model_widths) and all(
            v % (4 * g) == 0 and v // (2 * g) >= MIN_HEAD_DIM for v in head_dims):
        g *= 2
    return g


def scaled_overrides(cfg: object) -> dict[str, object]:
    """The fields to change to make ``cfg`` tiny, scaling every width by one common factor
    (:func:`width_factor`: ratios and divisibility survive), leaving head counts as they are, and taking
    counts (layers, experts, vocabulary, context) from :data:`TINY_SIZES`; per-layer lists and patterns
    are cut keeping at least one layer of each kind (so the depth may exceed 2)."""
    g = width_factor(cfg)
    out: dict[str, object] = {k: -(-v // g) for k, v in _width_fields(cfg).items()}
    for key, value in TINY_SIZES.items():
        current = getattr(cfg, key, None)
        if key in out or key in LAYER_FIELDS or WIDTH_RE.search(key) and not NOT_WIDTH_RE.search(key) or "head" in key:
            continue
        if isinstance(current, int) and not isinstance(current, bool):
            out[key] = min(current, value) if key not in ("attn_layer_offset", "expert_layer_offset") else value
    n_old = next((getattr(cfg, k) for k in LAYER_FIELDS if isinstance(getattr(cfg, k, None), int)), None)
    if n_old:
        n_new = min(n_old, max(TINY_SIZES["num_hidden_layers"], _layers_for_kinds(cfg, n_old)))
        for key in LAYER_FIELDS:  # the stored fields only (not aliases: LongCat derives one from the other)
            if isinstance(vars(cfg).get(key), int):
                out[key] = n_new
        out.update(_cut_per_layer(cfg, n_old, n_new))
    vocab = out.get("vocab_size", getattr(cfg, "vocab_size", None))
    if isinstance(vocab, int):
        for key in ID_FIELDS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value >= vocab:
                out[key] = vocab - 1
    if getattr(cfg, "is_decoder", None) is False and not getattr(cfg, "is_encoder_decoder", False):
        out["is_decoder"] = True
    return out


def _kinds_at(value: list | str) -> list[int]:
    """The index of each distinct kind's first occurrence."""
    return sorted({v: i for i, v in reversed(list(enumerate(value)))}.values())


def _layers_for_kinds(cfg: object, n_old: int) -> int:
    """Layers needed to keep one of each kind: per-layer lists and patterns (``layer_types``, ``"M*-"``)
    keep their kinds in any depth >= their number of kinds; a shorter repeating list of kinds
    (RecurrentGemma's ``block_types``) needs the depth that reaches each kind's first occurrence."""
    need = 0
    for key, value in vars(cfg).items():
        if key in ID_FIELDS or not value or not isinstance(value, (list, tuple, str)):
            continue
        if isinstance(value, str) and not _is_pattern(key, value):
            continue
        if not all(isinstance(v, str) for v in value):
            continue
        firsts = _kinds_at(value)
        need = max(need, len(firsts) if len(value) == n_old else firsts[-1] + 1)
    return need


def _cut_per_layer(cfg: object, n_old: int, n_new: int) -> dict[str, object]:
    out = {}
    for key, value in vars(cfg).items():
        if key in ID_FIELDS or not isinstance(value, (list, str)) or len(value) != n_old or n_old == n_new:
            continue
        if isinstance(value, str) and not _is_pattern(key, value):
            continue
        firsts = _kinds_at(value)[:n_new]
        keep = sorted(firsts + [i for i in range(n_old) if i not in firsts][: n_new - len(firsts)])
        new = [value[i] for i in keep]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in new):  # per-layer widths (Gemma-3n)
            g = width_factor(cfg)
            new = [v // g if WIDTH_RE.search(key) and v % g == 0 else v for v in new]
        out[key] = "".join(new) if isinstance(value, str) else new
    return out


def scaled_config(cfg: object) -> object:
    """A new config of ``cfg``'s class built from :func:`scaled_overrides` (its constructor derives the
    dependent fields, e.g. DeepSeek's ``qk_head_dim``); sub-configs (a multimodal model's text model) too."""
    overrides = scaled_overrides(cfg)
    for name in getattr(cfg, "sub_configs", None) or {}:
        sub = getattr(cfg, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            overrides[name] = scaled_config(sub)
    if type(cfg)().to_dict() == cfg.to_dict():  # the class defaults: give only what changes
        return type(cfg)(**overrides)
    return type(cfg)(**{**{k: v for k, v in cfg.to_dict().items() if k not in ("transformers_version",)},
                        **overrides})


def shrink_config(cfg: object) -> object:
    """``cfg`` with its size fields (and its sub-configs') set from :data:`TINY_SIZES`, in place."""
    n_old = next((getattr(cfg, k) for k in LAYER_FIELDS if isinstance(getattr(cfg, k, None), int)), None)
    for key, value in TINY_SIZES.items():
        if isinstance(getattr(cfg, key, None), int) and not isinstance(getattr(cfg, key), bool):
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                setattr(cfg, key, value)
    _shrink_per_layer(cfg, n_old, TINY_SIZES["num_hidden_layers"])
    if getattr(cfg, "is_decoder", None) is False and not getattr(cfg, "is_encoder_decoder", False):
        cfg.is_decoder = True  # BERT-style "causal LM" heads are only causal as decoders
    expand, head_dim, hidden = (getattr(cfg, k, None) for k in ("expand", "head_dim", "hidden_size"))
    if all(isinstance(v, int) for v in (expand, head_dim, hidden)) and isinstance(getattr(cfg, "num_heads", None), int):
        cfg.num_heads = max(1, expand * hidden // head_dim)  # SSM heads tile the expanded width (Mamba-2)
    vocab = getattr(cfg, "vocab_size", None)
    if isinstance(vocab, int):
        for key in ID_FIELDS:  # default special ids of the full vocabulary fall outside the tiny one
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value >= vocab:
                with contextlib.suppress(AttributeError, TypeError, ValueError):
                    setattr(cfg, key, vocab - 1)
    for name in getattr(cfg, "sub_configs", None) or {}:
        sub = getattr(cfg, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            shrink_config(sub)
    return cfg


RECIPES = ("scaled", "fixed")
"""How :func:`tiny_config` makes a default config tiny, tried in this order by :func:`build_tiny` (the first
whose model builds and runs its own forward wins): ``scaled`` (:func:`scaled_config`: widths by one common
factor, head counts kept, the constructor deriving the rest) and ``fixed`` (:func:`shrink_config`: the
:data:`TINY_SIZES` values set on the default config)."""


def tiny_config(model_type: str, recipe: str = RECIPES[0]) -> object:
    """The default config of ``model_type`` made tiny by ``recipe`` (one of :data:`RECIPES`)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    if recipe == "scaled":
        return scaled_config(cfg)
    if recipe == "fixed":
        return shrink_config(cfg)
    raise ValueError(f"unknown recipe {recipe!r}; known: {RECIPES}")


class TinyModelBroken(Exception):
    """A tiny model builds but its plain forward on token ids fails (before any adapter is involved)."""


class BuildTimeout(Exception):
    """A tiny model took longer than the build time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`BuildTimeout` after ``seconds`` (SIGALRM; main thread only, elsewhere no limit)."""
    def expire(signum: int, frame: object) -> None:
        raise BuildTimeout(f"over {seconds:g} s")

    try:
        old = signal.signal(signal.SIGALRM, expire)
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def build_tiny(model_type: str, seed: int = 0, seconds: float = BUILD_SECONDS,
               recipes: tuple[str, ...] = RECIPES) -> nn.Module:
    """A tiny random causal LM of ``model_type`` in eval mode, fp32, on CPU: the first of ``recipes`` whose
    model builds and runs its own forward (``BuildTimeout`` past ``seconds`` in all; else the first
    recipe's error, naming each recipe's)."""
    from transformers import AutoModelForCausalLM

    errors: list[tuple[str, Exception]] = []
    t0 = time.perf_counter()
    with time_limit(seconds), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for recipe in recipes:
            try:
                cfg = tiny_config(model_type, recipe)
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
            except BuildTimeout:
                raise
            except Exception as err:
                errors.append((recipe, err))
                continue
            ids = torch.randint(1, model.get_input_embeddings().num_embeddings, (1, 4), generator=torch.Generator())
            with torch.no_grad():
                try:
                    model(input_ids=ids)
                except BuildTimeout:
                    raise
                except Exception as err:
                    errors.append((recipe, TinyModelBroken(f"the tiny model's own forward fails ({_first_line(err)})")))
                    continue
            model.tiny_recipe = recipe
            break
        else:
            model = None
    if model is not None:
        if time.perf_counter() - t0 > seconds:  # (a C call the alarm could not interrupt)
            raise BuildTimeout(f"over {seconds:g} s")
        return model
    first = errors[0][1]
    why = "; ".join(f"{r}: {_first_line(e) if not isinstance(e, TinyModelBroken) else e}" for r, e in errors)
    if all(isinstance(e, TinyModelBroken) for _, e in errors):
        raise TinyModelBroken(why) from first
    raise RuntimeError(why) from first


def random_inputs(model: nn.Module, position_ids: bool, lengths: tuple[int, ...] = (7, 4, 5), seed: int = 0
                  ) -> ModelInputs:
    """A left-padded batch of random token ids for ``model`` (no tokenizer): mask and, if taken, positions
    (the batch discovery validates with, as ``ModelInputs``)."""
    kwargs = _probe_inputs(model, position_ids, lengths, seed)
    n = max(lengths)
    pad = torch.tensor([n - length for length in lengths], dtype=torch.long, device=kwargs["input_ids"].device)
    return ModelInputs(kwargs, pad, n)


@dataclass
class Outcome:
    """What happened to one model type on one backend (or at build time: backend ``None``)."""

    status: str
    """``verified`` | ``refused`` | ``failed`` | ``error`` | ``not built``"""
    reason: str = ""
    seconds: float = 0.0
    ours: bool = False
    """Whether a refusal was raised by taskvec_interp itself (not by transformers or nnsight)."""


@dataclass
class MatrixRow:
    model_type: str
    model_class: str = ""
    build: Outcome = field(default_factory=lambda: Outcome("not built"))
    backends: dict[str, Outcome] = field(default_factory=dict)
    arch: str = ""
    recipe: str = ""
    """Which of :data:`RECIPES` made the tiny model."""

    @property
    def built(self) -> bool:
        return self.build.status == "built"

    @property
    def verified(self) -> bool:
        return self.built and all(o.status == "verified" for o in self.backends.values())


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _raised_by_us(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and "taskvec_interp" in frames[-1].filename


def check_backend(model: nn.Module, backend: str) -> Outcome:
    """Wrap ``model`` in ``backend``'s adapter and verify it on random token rows."""
    from ..adapters.load import make_adapter
    from ..adapters.verify import AdapterMismatchError, verify_adapter

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = make_adapter(model, None, backend)
            # a model that cannot take left padding (adapter.left_padding False) gets rows of one length
            lengths = (7, 4, 5) if adapter.left_padding else (6, 6, 6)
            inputs = random_inputs(model, adapter.uses_position_ids, lengths)
            verify_adapter(adapter, prompts=inputs)
    except AdapterMismatchError as err:
        return Outcome("failed", str(err).splitlines()[-1][:300], time.perf_counter() - t0, True)
    except ValueError as err:
        ours = _raised_by_us(err)
        return Outcome("refused" if ours else "error", _first_line(err), time.perf_counter() - t0, ours)
    except Exception as err:
        return Outcome("error", _first_line(err), time.perf_counter() - t0)
    return Outcome("verified", "", time.perf_counter() - t0)


def check_model_type(model_type: str, backends: tuple[str, ...] | None = None) -> MatrixRow:
    """Build ``model_type`` tiny and check it on every backend (default :func:`matrix_backends`; a failed build
    is recorded, not raised)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ..adapters.arch import ARCHS, find_arch

    row = MatrixRow(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""))
    t0 = time.perf_counter()
    try:
        model = build_tiny(model_type)
    except BuildTimeout as err:
        row.build = Outcome("not built", f"build over the time limit ({err})", time.perf_counter() - t0)
        return row
    except Exception as err:  # TinyModelBroken, or a config / model that does not build: each recipe's error
        row.build = Outcome("not built", str(err)[:400], time.perf_counter() - t0)
        return row
    row.build = Outcome("built", "", time.perf_counter() - t0)
    row.recipe = getattr(model, "tiny_recipe", "")
    for backend in backends if backends is not None else matrix_backends():
        row.backends[backend] = check_backend(model, backend)
    with contextlib.suppress(Exception):
        spec = find_arch(model)
        source = "table" if model_type in ARCHS else "discovered"
        subs = ", ".join(f"{k}={v}" for k, v in (("attn", spec.attn), ("mlp", spec.mlp), ("mixer", spec.mixer)) if v)
        row.arch = f"{source}: `{spec.blocks}`" + (f" ({subs})" if subs else "")
        if not spec.left_padding:
            row.arch += "; no left padding" + ("" if spec.position_ids else ", own positions")
    if row.recipe != RECIPES[0]:
        row.arch += f" (tiny: {row.recipe})"
    return row


def run_matrix(model_types: list[str] | None = None, backends: tuple[str, ...] | None = None,
               progress: bool = False) -> list[MatrixRow]:
    rows = []
    for mt in model_types if model_types is not None else causal_lm_model_types():
        rows.append(check_model_type(mt, backends))
        if progress:
            r = rows[-1]
            states = " ".join(f"{b}={o.status}" for b, o in r.backends.items()) or r.build.reason
            print(f"{mt:28s} {r.build.seconds + sum(o.seconds for o in r.backends.values()):6.2f}s {states}",
                  flush=True)
    return rows


def summary(rows: list[MatrixRow]) -> dict[str, int]:
    built = [r for r in rows if r.built]
    return {"model_types": len(rows), "built": len(built), "verified": sum(r.verified for r in built),
            "refused": sum(any(o.status == "refused" for o in r.backends.values()) for r in built),
            "failed_or_error": sum(any(o.status in ("failed", "error") for o in r.backends.values()) for r in built),
            "not_built": len(rows) - len(built)}


def markdown_table(rows: list[MatrixRow], backends: tuple[str, ...] | None = None) -> str:
    """The matrix as a Markdown table (one row per model type; default backends: :func:`matrix_backends`)."""
    backends = backends if backends is not None else matrix_backends()
    def cell(o: Outcome) -> str:
        return "verified" if o.status == "verified" else f"**{o.status}**: {o.reason}".replace("|", "\\|")

    head = "| model_type | class | " + " | ".join(backends) + " | architecture |"
    lines = [head, "|" + "---|" * (3 + len(backends))]
    for r in rows:
        if r.built:
            cells = [cell(r.backends[b]) if b in r.backends else "" for b in backends]
        else:
            cells = [f"not built: {r.build.reason}".replace("|", "\\|")] + ["(same)"] * (len(backends) - 1)
        lines.append(f"| `{r.model_type}` | {r.model_class} | " + " | ".join(cells) + f" | {r.arch} |")
    return "\n".join(lines)
