"""The architecture matrix: every causal-LM ``model_type`` of the installed transformers, as a tiny random
model, loaded through each adapter backend and verified (used by ``tests/test_arch_matrix.py`` and
``scripts/arch_matrix.py``, which writes the table in ``docs/architectures.md``).

The model types come from transformers' own auto mapping (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), not a
hand-written list. A tiny config is the model type's default config (``AutoConfig.for_model``) with its
common size fields shrunk (:data:`TINY_SIZES`, applied to sub-configs too); each build runs under a time
limit. Every model that builds ends in one of three states per backend:

* ``verified``: ``make_adapter`` accepted it and :func:`verify_adapter` passed (padded batch vs one row at
  a time, every layer's capture vs ``output_hidden_states``, logits, identity hooks at every site);
* ``refused``: our code raised a ``ValueError`` saying why (e.g. no validating block list);
* ``failed`` / ``error``: verification disagreed, or something crashed (what the test forbids).
"""

from __future__ import annotations

import contextlib
import signal
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .base import ModelInputs

MATRIX_BACKENDS = ("torch", "nnsight")
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
            if isinstance(value, str) and " " in value:
                continue
            firsts = sorted({v: i for i, v in reversed(list(enumerate(value)))}.values())[:n_new]
            keep = sorted(firsts + [i for i in range(n_old) if i not in firsts][: n_new - len(firsts)])
            new = [value[i] for i in keep]
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                setattr(cfg, key, "".join(new) if isinstance(value, str) else new)


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


def tiny_config(model_type: str) -> object:
    """The default config of ``model_type`` shrunk to a tiny model."""
    from transformers import AutoConfig

    return shrink_config(AutoConfig.for_model(model_type))


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


def build_tiny(model_type: str, seed: int = 0, seconds: float = BUILD_SECONDS) -> nn.Module:
    """A tiny random causal LM of ``model_type`` in eval mode, fp32, on CPU (``BuildTimeout`` past ``seconds``)."""
    from transformers import AutoModelForCausalLM

    with time_limit(seconds), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = tiny_config(model_type)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        ids = torch.randint(1, model.get_input_embeddings().num_embeddings, (1, 4), generator=torch.Generator())
        with torch.no_grad():
            try:
                model(input_ids=ids)
            except Exception as err:
                raise TinyModelBroken(f"the tiny model's own forward fails ({_first_line(err)})") from err
    return model


def random_inputs(model: nn.Module, position_ids: bool, lengths: tuple[int, ...] = (7, 4, 5), seed: int = 0
                  ) -> ModelInputs:
    """A left-padded batch of random token ids for ``model`` (no tokenizer): mask and, if taken, positions."""
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), n), generator=g)
    mask = torch.zeros((len(lengths), n), dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, n - length:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if position_ids:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    pad = torch.tensor([n - length for length in lengths], dtype=torch.long)
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
    from .load import make_adapter
    from .verify import AdapterMismatchError, verify_adapter

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


def check_model_type(model_type: str, backends: tuple[str, ...] = MATRIX_BACKENDS) -> MatrixRow:
    """Build ``model_type`` tiny and check it on every backend (a failed build is recorded, not raised)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .arch import ARCHS, find_arch

    row = MatrixRow(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""))
    t0 = time.perf_counter()
    try:
        model = build_tiny(model_type)
    except BuildTimeout as err:
        row.build = Outcome("not built", f"build over the time limit ({err})", time.perf_counter() - t0)
        return row
    except TinyModelBroken as err:
        row.build = Outcome("not built", str(err), time.perf_counter() - t0)
        return row
    except Exception as err:
        row.build = Outcome("not built", f"config does not build ({_first_line(err)})", time.perf_counter() - t0)
        return row
    row.build = Outcome("built", "", time.perf_counter() - t0)
    for backend in backends:
        row.backends[backend] = check_backend(model, backend)
    with contextlib.suppress(Exception):
        spec = find_arch(model)
        source = "table" if model_type in ARCHS else "discovered"
        subs = ", ".join(f"{k}={v}" for k, v in (("attn", spec.attn), ("mlp", spec.mlp), ("mixer", spec.mixer)) if v)
        row.arch = f"{source}: `{spec.blocks}`" + (f" ({subs})" if subs else "")
        if not spec.left_padding:
            row.arch += "; no left padding" + ("" if spec.position_ids else ", own positions")
    return row


def run_matrix(model_types: list[str] | None = None, backends: tuple[str, ...] = MATRIX_BACKENDS,
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


def markdown_table(rows: list[MatrixRow], backends: tuple[str, ...] = MATRIX_BACKENDS) -> str:
    """The matrix as a Markdown table (one row per model type)."""
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
