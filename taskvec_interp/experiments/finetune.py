"""Layer-subset fine-tuning: first-k vs last-k layers, TD and accuracy before and after (paper Sec. 4.4, Table 1).

The paper's lesson: fine-tuning the first layers (the task "encoder") beats fine-tuning the last ones,
and only it raises task decodability. Here:

* **Which layers**: ``first:k``, ``last:k``, a range ``a-b`` (inclusive), a list ``3,5,7``, or
  ``td:encoder`` (beyond the paper: every layer up to the peak of the model's own TD curve, read from a
  sweep of the same model).
* **How**: LoRA through peft on those blocks only (``layers_to_transform`` / ``layers_pattern``; rank 16,
  alpha 16, dropout 0.1 as the paper), on the Linear sublayers of the blocks' attention / MLP / mixer
  found from the adapter's architecture row; or ``method="full"``: every parameter of those blocks, and
  nothing else, trains.
* **Data**: k-shot prompts from the family's TRAIN side (``split="train"``: bitwise operand pairs, POS
  sentences, file examples disjoint from the ``split="test"`` side the evaluation reads), the family's
  tasks mixed, Null left out unless ``include_null``; loss on the answer tokens only (mean over the
  answer tokens of the optimizer step, gradient accumulation included).
* **Training**: AdamW with linear warmup + cosine decay, gradient clipping, a seed; checkpoints (the
  trainable weights as safetensors, optimizer, the data generator and the dropout RNG) through
  :mod:`taskvec_interp.checkpoints`, so a killed run resumes to the same weights. The global torch RNG
  is forked: nothing outside the run is reseeded.
* **Evaluation** through :func:`run_sweep` on the TEST side: TD per layer and exact match per task,
  before (the pretrained model) and after; :func:`compare_runs` builds the Table-1-like DataFrame.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from .. import hooks as H
from ..adapters.arch import ArchSpec, find_arch, get_module
from ..adapters.base import Adapter
from ..adapters.load import make_adapter, resolve_model
from ..checkpoints import (
    atomic_write_text,
    clean_partial,
    config_diffs,
    latest_good_checkpoint,
    list_checkpoints,
    load_optimizer,
    read_metrics,
    save_checkpoint,
    scheduled_lr,
)
from ..config import PromptSetConfig, k_field, model_field, opt, read_saved_config, upgrade_config
from ..finite import NonFiniteError, json_safe, nonfinite_params
from ..io import (
    check_result_owner,
    claim_result_dir,
    locks_out,
    manifest_files,
    read_result_dir,
    result_problem,
    write_result_dir,
)
from ..results import provenance, read_json
from ..tasks import NULL_TASK, PromptBuilder, PromptTemplate, get_family
from ..tasks.prompts import Prompt
from ..validate import check_bool, check_choice, check_int, check_knn_k, check_number, check_str
from .sweep import KIND as SWEEP_KIND
from .sweep import SweepConfig, SweepResult, peak_layer_of, run_sweep

METHODS: tuple[str, ...] = ("lora", "full")
KIND = "finetune"
"""The result kind a fine-tuning run directory is marked with (``result.json``)."""
KEEP = ("checkpoints",)
"""Carried over when a run directory is replaced by its result: the run's checkpoints (resume state)."""
RUNTIME_FIELDS = frozenset({"eval_before", "batch_size_eval"})
"""Fields a resumed run may change: they do not change its numbers (``steps`` does: the cosine schedule
depends on it)."""


# ------------------------------------------------------------------------------------------------
# Layer subsets and target modules
# ------------------------------------------------------------------------------------------------
def check_layer_spec(spec: str | Sequence[int]) -> str | list[int]:
    """The checks of :func:`resolve_layer_spec` that need no model (syntax, K >= 1, empty ranges, repeats);
    returns the canonical spec (:func:`~taskvec_interp.hooks.check_layer_spec`)."""
    return H.check_layer_spec(spec, H.FINETUNE_LAYERS, "FinetuneConfig.layers")


def resolve_layer_spec(spec: str | Sequence[int], n_layers: int, td: pd.DataFrame | None = None,
                       shots: int | None = None) -> list[int]:
    """``first:K`` | ``last:K`` | ``A-B`` | ``3,5,7`` (or a list) | ``all`` | ``td:encoder`` -> sorted layer
    indices (:func:`~taskvec_interp.hooks.parse_layers` with the :data:`~taskvec_interp.hooks.FINETUNE_LAYERS`
    forms).

    ``td:encoder`` takes layers ``0..p`` where ``p`` is the peak of the overall TD in ``td`` (a sweep's
    ``td`` table; at ``shots`` when it has several shot counts).
    """
    peak = peak_layer_of(td, shots) if td is not None and isinstance(spec, str) and spec.strip() == "td:encoder" \
        else None
    return sorted(H.parse_layers(spec, n_layers, allowed=H.FINETUNE_LAYERS, peak=peak, what="FinetuneConfig.layers"))


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's transposed Linear


def target_modules(model: nn.Module, arch: ArchSpec, layer: int = 0) -> list[str]:
    """Names (last path part) of the Linear sublayers inside a block's attention / MLP / mixer, from the
    architecture row: what LoRA adapts when ``target_modules`` is not given."""
    block = get_module(model, arch.blocks)[layer]
    names: list[str] = []
    for path in (arch.attn, arch.mlp, arch.mixer):
        if path is None:
            continue
        for name, mod in get_module(block, path).named_modules():
            if name and _linear_like(mod) and name.split(".")[-1] not in names:
                names.append(name.split(".")[-1])
    if not names:
        raise ValueError(f"no Linear sublayers found in the blocks of {type(model).__name__}: pass target_modules=")
    return names


def _check_targets(model: nn.Module, arch: ArchSpec, layers: Sequence[int], names: Sequence[str]) -> None:
    blocks = get_module(model, arch.blocks)
    present = {n.split(".")[-1] for n, m in blocks[layers[0]].named_modules() if n and _linear_like(m)}
    unknown = [n for n in names if n not in present]
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; the blocks' Linear sublayers are {sorted(present)}")


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig(PromptSetConfig):
    """Everything that determines a fine-tuning run (saved as config.json in the run directory).

    The prompt set (:class:`PromptSetConfig`: family, template, shots, seed) is shared by training and
    evaluation: ``n_train`` training prompts per task, drawn once from the family's train side with
    ``seed`` (each optimizer step samples ``batch_size * grad_accum`` of them, with replacement, from a
    generator seeded with ``seed``), and ``n_per_task`` evaluation prompts per task on the test side (TD
    and accuracy before / after). ``layers``: see :func:`resolve_layer_spec`. ``alpha``: LoRA's alpha
    (``None``: the rank).
    """

    n_per_task: int = opt(50, "evaluation prompts per task on the family's test side (Null included)")
    model: str = model_field()
    layers: str | list[int] = opt("first:10", "layers to train: first:K | last:K | A-B | 3,5,7 | all | td:encoder "
                                              "(layers up to the TD peak of --td-sweep)")
    method: str = opt("lora", "lora, or full: every parameter of those blocks", choices=METHODS)
    rank: int = opt(16, "LoRA rank")
    alpha: float | None = opt(None, "LoRA alpha (default: the rank)")
    dropout: float = opt(0.1, "LoRA dropout")
    target_modules: list[str] | None = opt(None, "Linear sublayers LoRA adapts, comma-separated (default: every "
                                                 "Linear of the blocks' attention / MLP / mixer)")
    n_train: int = opt(500, "training prompts per task (the family's train side)")
    include_null: bool = opt(False, "train on the Null task too")
    steps: int = opt(200, "optimizer steps")
    batch_size: int = opt(8, "training prompts per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(2e-4, "peak learning rate (AdamW, linear warmup then cosine decay)")
    warmup_steps: int = opt(20, "steps of linear warmup")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of lr")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float | None = opt(1.0, "gradient-norm clip (none: no clipping)")
    ckpt_every: int = opt(50, "steps between checkpoints")
    k: int = k_field()
    eval_before: bool = opt(True, "also evaluate the pretrained model (once per run directory)")
    batch_size_eval: int = opt(16, "prompts per forward pass of the evaluation")
    td_sweep: str | None = opt(None, "a `taskvec td` output directory of this model (for layers td:encoder)")

    def __post_init__(self) -> None:
        self.check_prompt_set()
        check_str("FinetuneConfig.model", self.model)
        self.layers = check_layer_spec(self.layers)
        check_choice("FinetuneConfig.method", self.method, METHODS)
        check_int("FinetuneConfig.rank", self.rank, 1)
        if self.alpha is not None:
            check_number("FinetuneConfig.alpha", self.alpha, 0.0, low_open=True)
        check_number("FinetuneConfig.dropout", self.dropout, 0.0, 1.0, high_open=True)
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not isinstance(self.target_modules, (list, tuple)) or \
                    not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"FinetuneConfig.target_modules must be a non-empty list of names, got "
                                 f"{self.target_modules!r}")
            self.target_modules = list(self.target_modules)
        for name in ("n_train", "steps", "batch_size", "grad_accum", "ckpt_every", "batch_size_eval"):
            check_int(f"FinetuneConfig.{name}", getattr(self, name), 1)
        check_bool("FinetuneConfig.include_null", self.include_null)
        check_number("FinetuneConfig.lr", self.lr, 0.0, low_open=True)
        check_int("FinetuneConfig.warmup_steps", self.warmup_steps, 0)
        check_number("FinetuneConfig.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_number("FinetuneConfig.weight_decay", self.weight_decay, 0.0)
        if self.grad_clip is not None:
            check_number("FinetuneConfig.grad_clip", self.grad_clip, 0.0, low_open=True)
        check_knn_k("FinetuneConfig.k", self.k, self.n_per_task, "n_per_task")
        check_bool("FinetuneConfig.eval_before", self.eval_before)
        if "split" in self.family_kwargs:
            raise ValueError(f"FinetuneConfig.family_kwargs must not set 'split' (training reads split='train', "
                             f"evaluation 'test'), got {self.family_kwargs!r}")
        if self.td_sweep is not None:
            check_str("FinetuneConfig.td_sweep", self.td_sweep)
        elif self.layers == "td:encoder":
            raise ValueError("FinetuneConfig.td_sweep must be a `taskvec td` output directory of this model when "
                             "layers is 'td:encoder', got None")

    @property
    def lora_alpha(self) -> float:
        """LoRA's alpha: ``alpha``, or the rank when it is ``None``."""
        return float(self.rank) if self.alpha is None else float(self.alpha)

    def sweep_config(self, model_name: str) -> SweepConfig:
        """The evaluation sweep (TEST side of the family), the same before and after training."""
        return SweepConfig(model=model_name, family=self.family, shots=(self.shots,), n_per_task=self.n_per_task,
                           k=self.k, seed=self.seed, batch_size=self.batch_size_eval, template=dict(self.template),
                           family_kwargs={**self.family_kwargs, "split": "test"})


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainingData:
    """Tokenized training prompts: prompt ids + answer ids, labels -100 on the prompt."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    prompts: list[Prompt]

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, idx: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded batch (positions 0.. as unpadded; padded labels -100)."""
        length = max(len(self.input_ids[i]) for i in idx)
        ids = torch.full((len(idx), length), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), length), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for r, i in enumerate(idx):  # a loop over the rows of one batch, to place ragged lists
            n = len(self.input_ids[i])
            ids[r, :n] = torch.tensor(self.input_ids[i])
            labels[r, :n] = torch.tensor(self.labels[i])
            mask[r, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def training_data(tokenizer: Any, config: FinetuneConfig, add_special_tokens: bool = True) -> TrainingData:
    """``n_train`` k-shot prompts per task from the family's train side, tokenized with answer-only labels."""
    fam = get_family(config.family, **config.family_kwargs, split="train")
    tasks = [t for t in fam.task_names if config.include_null or t != NULL_TASK]
    prompts = PromptBuilder(PromptTemplate(**config.template)).build(
        fam, n_per_task=config.n_train, shots=config.shots, seed=config.seed, tasks=tasks, distinct_queries=False)
    from ..tasks.tokenization import check_tokenization

    checks = check_tokenization(tokenizer, prompts, add_special_tokens=add_special_tokens)
    ids = tokenizer([p.text for p in prompts], add_special_tokens=add_special_tokens)["input_ids"]
    input_ids, labels = [], []
    for row, c in zip(ids, checks, strict=True):
        answer = list(c.answer_ids)
        input_ids.append(list(row) + answer)
        labels.append([-100] * len(row) + answer)
    return TrainingData(input_ids, labels, prompts)


def eval_prompts(config: FinetuneConfig) -> list[Prompt]:
    """The evaluation prompts (the family's test side), exactly those the before / after sweeps read."""
    sweep = config.sweep_config(config.model)
    fam = get_family(sweep.family, **sweep.family_kwargs)
    return PromptBuilder(PromptTemplate(**sweep.template)).build(fam, n_per_task=sweep.n_per_task,
                                                                 shots=sweep.shots[0], seed=sweep.seed)


def check_disjoint(train: Sequence[Prompt], evaluation: Sequence[Prompt]) -> None:
    """Refuse an evaluation query that a training prompt contains (as query or demonstration)."""
    seen = {p.query for p in train} | {e.input for p in train for e in p.demos}
    leak = sorted({p.query for p in evaluation} & seen)
    if leak:
        raise ValueError(f"{len(leak)} evaluation queries also occur in the training prompts, e.g. {leak[:3]}")


# ------------------------------------------------------------------------------------------------
# Model preparation
# ------------------------------------------------------------------------------------------------
def prepare_model(model: nn.Module, config: FinetuneConfig, layers: Sequence[int]) -> nn.Module:
    """Wrap ``model`` for training ``layers`` only: a peft LoRA model, or the blocks' own parameters."""
    arch = find_arch(model)
    if config.method == "full":
        blocks = get_module(model, arch.blocks)
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers:
            for p in blocks[layer].parameters():
                p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    names = config.target_modules or target_modules(model, arch, layers[0])
    _check_targets(model, arch, layers, names)
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.dropout, target_modules=names,
                      layers_to_transform=list(layers), layers_pattern=arch.blocks.split(".")[-1], bias="none")
    return get_peft_model(model, lora)


def load_trainable(model: nn.Module, path: Path | dict[str, torch.Tensor]) -> None:
    """Copy saved trainable weights (a safetensors file, or its tensors) into ``model``; refuse other trainable
    parameters than the model's."""
    state = load_file(path) if isinstance(path, (str, Path)) else dict(path)
    path = path if isinstance(path, (str, Path)) else "the saved weights"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if sorted(state) != sorted(names):
        raise ValueError(f"{path} holds other trainable parameters than this config trains")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


def _takes_logits_to_keep(model: nn.Module) -> bool:
    return _forward_takes(type(_inference_module(model)), "logits_to_keep")


@functools.cache
def _forward_takes(cls: type, name: str) -> bool:
    import inspect

    return name in inspect.signature(cls.forward).parameters


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor], n_tokens: int) -> torch.Tensor:
    """Summed cross-entropy of the answer tokens divided by ``n_tokens`` (the step's answer tokens).

    Only the columns that predict an answer token get logits (the model's own head, through
    ``logits_to_keep``): the vocabulary projection of every prompt position is never computed.
    """
    target = batch["labels"][:, 1:]  # position t predicts token t + 1
    cols = (target != -100).any(0).nonzero().squeeze(1)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if _takes_logits_to_keep(model):
        logits = model(**kwargs, logits_to_keep=cols).logits.float()
    else:
        logits = model(**kwargs).logits[:, :-1][:, cols].float()
    target = target[:, cols]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100, reduction="sum") / n_tokens


# ------------------------------------------------------------------------------------------------
# Train
# ------------------------------------------------------------------------------------------------
def _load_base(spec: object) -> tuple[nn.Module, Any]:
    if isinstance(spec, nn.Module):
        return copy.deepcopy(spec), None
    model, tok = resolve_model(spec)
    return model, tok


def base_fingerprint(base: nn.Module, spec: str | None = None) -> dict:
    """The fingerprint of the pretrained model a run starts from (``{"fingerprint", "fingerprint_kind"}``,
    :func:`~taskvec_interp.adapters.fingerprint.model_fingerprint`): its weights, cached by its weight files when
    ``spec`` (``config.model``) names a local directory or the built-in model."""
    from ..adapters.fingerprint import model_fingerprint
    from ..adapters.load import cache_dir, weights_dir_of

    return model_fingerprint(base, weights_dir=weights_dir_of(spec) if spec is not None else None,
                             cache=cache_dir() / "fingerprints.json")


def _sweep_td(config: FinetuneConfig) -> pd.DataFrame | None:
    return SweepResult.load(config.td_sweep).td if config.td_sweep is not None else None


@dataclass
class FinetuneResult:
    """A finished fine-tuning run: what :func:`finetune` returns, ``save(dir)`` writes and ``load(dir)`` reads.

    On disk, one result directory (:func:`taskvec_interp.io.write_result_dir`, kind ``"finetune"``):
    ``config.json`` (the config, ``resolved_layers``, the model's identity and library versions),
    ``metrics.jsonl`` (one record per optimizer step), ``trained.safetensors`` (the trainable weights),
    ``eval/`` and ``eval_pretrained/`` (sweep results, where evaluated). A run directory's ``checkpoints/``
    is carried over when the result replaces it (resume state, not part of the result).
    """

    config: FinetuneConfig
    layers: list[int]
    """The resolved layer indices that trained."""
    trained: dict[str, torch.Tensor]
    """The trainable weights after training, by parameter name."""
    metrics: pd.DataFrame
    """One row per optimizer step: step, loss, answer_tokens, lr, elapsed_s."""
    eval: SweepResult | None = None
    """The fine-tuned model's evaluation sweep (``None``: not evaluated)."""
    eval_pretrained: SweepResult | None = None
    """The pretrained model's evaluation sweep (``None``: not evaluated in this run directory)."""
    model: dict = field(default_factory=dict)
    """The model's identity: name, n_layers, model_type, trainable_params."""
    path: Path | None = field(default=None, compare=False)
    """The directory it was last saved to or loaded from."""

    @property
    def label(self) -> str:
        """``method layers`` (the layer spec, or the resolved layers for a list): its name in comparisons."""
        return f"{self.config.method} {self.config.layers if isinstance(self.config.layers, str) else self.layers}"

    def save(self, out: str | Path) -> Path:
        """Write the run's result whole into ``out`` (see the class doc); an older fine-tuning result or run in
        ``out`` is replaced (its ``checkpoints/`` kept), anything else there is refused."""
        from safetensors.torch import save_file

        record = {**asdict(self.config), "resolved_layers": list(self.layers), "provenance": provenance(self.model)}
        with write_result_dir(out, KIND, asdict(self.config), keep=KEEP) as tmp:
            (tmp / "config.json").write_text(json.dumps(record, indent=1))
            (tmp / "metrics.jsonl").write_text("".join(json.dumps(json_safe(r), allow_nan=False) + "\n"
                                                       for r in self.metrics.to_dict("records")))
            save_file({n: t.detach().cpu().contiguous() for n, t in self.trained.items()},
                      str(tmp / "trained.safetensors"))
            if self.eval is not None:
                self.eval.save(tmp / "eval")
            if self.eval_pretrained is not None:
                self.eval_pretrained.save(tmp / "eval_pretrained")
        self.path = Path(out)
        return self.path

    @classmethod
    def load(cls, directory: str | Path) -> FinetuneResult:
        """Read back what :meth:`save` (or :func:`finetune`) wrote; ``ValueError`` naming the file when the
        directory is not a finished, intact fine-tuning result (a run still training is refused)."""
        d = read_result_dir(directory, KIND)
        raw, model = read_saved_config(d, FinetuneConfig)
        layers = raw.pop("resolved_layers")
        files = set(manifest_files(d))
        metrics = pd.DataFrame(read_metrics(d))  # a bad line: a ValueError naming the file and the line
        evals = {name: SweepResult.load(d / name) if f"{name}/result.json" in files else None
                 for name in ("eval", "eval_pretrained")}
        return cls(FinetuneConfig(**raw), list(layers),
                   load_file(d / "trained.safetensors"), metrics,
                   evals["eval"], evals["eval_pretrained"], model, d)


@locks_out("out")  # one process at a time trains into a run directory
def finetune(
    config: FinetuneConfig,
    out: str | Path,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    progress: bool = True,
    stop_at: int | None = None,
    evaluate: bool = True,
) -> FinetuneResult | None:
    """Train (or resume) a layer-subset fine-tune in ``out``; then evaluate before/after.

    ``model``: a Hugging Face causal LM to start from (deep-copied; default: load ``config.model``).
    Resumes from the newest checkpoint in ``out`` (``ValueError`` if ``out`` holds another config, or is a
    non-empty directory that is not a fine-tuning run). ``stop_at`` stops after that many steps without
    evaluating (simulates a kill; for tests) and returns ``None``.
    While it trains, ``out`` holds ``config.json``, ``metrics.jsonl``, ``checkpoints/`` (+ ``eval_pretrained/``)
    and a marker that no reader accepts; at the end the :class:`FinetuneResult` (``config.json``,
    ``metrics.jsonl``, ``trained.safetensors``, ``eval/``, ``eval_pretrained/``) replaces it whole, the
    checkpoints carried over. Returns the result (read back from ``out`` when the run had finished before).
    """
    out = check_result_owner(out, KIND)  # a directory that is not a fine-tuning run is refused up front
    base, tok = _load_base(model if model is not None else config.model)
    tok = tokenizer if tokenizer is not None else tok
    if tok is None:
        raise ValueError("fine-tuning needs a tokenizer: pass tokenizer= with model=")
    if getattr(tok, "pad_token_id", None) is None:
        tok.pad_token = tok.eos_token
    name = config.model if model is None else getattr(getattr(base, "config", None), "_name_or_path", "") or "module"
    n_layers = len(get_module(base, find_arch(base).blocks))
    fingerprint = base_fingerprint(base, config.model if model is None else None)  # the weights, not the path
    td = _sweep_td(config)
    if td is not None and config.layers == "td:encoder":
        swept = read_json(Path(config.td_sweep) / "config.json")
        theirs = swept.get("provenance", {}).get("model", {})
        diffs = config_diffs({"model fingerprint": theirs.get("fingerprint")},
                             {"model fingerprint": fingerprint["fingerprint"]}, labels=("sweep", "this model"))
        if theirs.get("n_layers", n_layers) != n_layers or diffs:
            raise ValueError(f"the TD sweep in {config.td_sweep} comes from another model ({swept.get('model')!r}; "
                             f"{'; '.join(diffs) or 'n_layers'})")
    layers = resolve_layer_spec(config.layers, n_layers, td, config.shots)
    data = training_data(tok, config)  # refuses a family without a train side or too few examples
    evaluation = eval_prompts(config)  # ... and an evaluation side too small for the shots
    check_disjoint(data.prompts, evaluation)
    # the run directory: same config to resume, nothing written before the checks above
    cfg_dict = asdict(config)
    held = list_checkpoints(out)
    cfg_path = out / "config.json"
    given_key = {"model fingerprint": fingerprint["fingerprint"]}
    if cfg_path.exists():
        saved = read_json(cfg_path)
        saved_key = {"model fingerprint": ((saved.pop("provenance", None) or {}).get("model") or {}).get("fingerprint")}
        saved.pop("resolved_layers", None)
        try:  # a config written before a field was renamed or a spec canonicalised compares by its current form
            saved = asdict(FinetuneConfig(**upgrade_config(FinetuneConfig, saved)))
        except (TypeError, ValueError):
            pass  # not a config this version can read: compared as it is (and refused)
        # the model by its weights' fingerprint, never by its path string: the same weights elsewhere resume
        diffs = config_diffs({**saved, **saved_key}, {**cfg_dict, **given_key}, RUNTIME_FIELDS | {"model"})
        if diffs:
            raise ValueError(f"{out} holds a fine-tuning run with another config; refusing to resume (nothing there "
                             "was changed or deleted). Differences: " + "; ".join(diffs))
    elif held or (out / "eval_pretrained").exists():
        raise ValueError(f"{out} has checkpoints or an evaluation but no config.json: it cannot be told to belong to "
                         "this run; refusing to resume")
    if held and held[-1][0] > config.steps:
        raise ValueError(f"{out} already holds checkpoints up to step {held[-1][0]}, beyond steps={config.steps}: "
                         f"use steps >= {held[-1][0]} or a new output directory")
    good, _ = latest_good_checkpoint(out) if held else (None, [])  # warns about each checkpoint it skips
    ckpts = [good] if good is not None else []
    if ckpts and ckpts[-1][0] == config.steps and result_problem(out, KIND) is None:
        done = FinetuneResult.load(out)
        if not evaluate or done.eval is not None:
            return done  # nothing left to do
        # trained but never evaluated: evaluate the saved weights; the result is replaced whole, not edited
        with torch.random.fork_rng(devices=[]):
            if config.eval_before and done.eval_pretrained is None:
                done.eval_pretrained = _evaluate(base, tok, config, name, evaluation)
            torch.manual_seed(config.seed)
            trained = prepare_model(base, config, done.layers)
            load_trainable(trained, done.trained)
            done.eval = _evaluate(_inference_module(trained.eval()), tok, config, name, evaluation)
        done.save(out)
        return done
    claim_result_dir(out, KIND, cfg_dict)
    base_identity = {"name": name, "n_layers": n_layers, "model_type": getattr(base.config, "model_type", None),
                     **fingerprint}
    # what the run is, before any of its work (the pretrained evaluation included): a rerun is compared with it
    atomic_write_text(cfg_path, json.dumps({**cfg_dict, "resolved_layers": layers,
                                            "provenance": provenance(base_identity)}, indent=1))
    clean_partial(out)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # dropout and LoRA init draw from torch's RNG: fork, never reseed it
        eval_before = None
        if evaluate and config.eval_before and not _done(out / "eval_pretrained"):
            eval_before = _evaluate(base, tok, config, name, evaluation)  # before wrapping: the pretrained model
        torch.manual_seed(config.seed)
        trained = prepare_model(base, config, layers)
        params = [p for p in trained.parameters() if p.requires_grad]
        identity = {**base_identity, "trainable_params": sum(p.numel() for p in params)}
        atomic_write_text(cfg_path, json.dumps({**cfg_dict, "resolved_layers": layers,
                                                "provenance": provenance(identity)}, indent=1))
        if eval_before is not None:
            eval_before.save(out / "eval_pretrained")
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        gen = torch.Generator().manual_seed(config.seed)
        start = 0
        if ckpts:
            start, ck = ckpts[-1]
            load_trainable(trained, ck / "trainable.safetensors")
            load_optimizer(opt, ck)
            rng = load_file(ck / "rng.safetensors")
            gen.set_state(rng["data_generator"])
            torch.set_rng_state(rng["torch"])
            recs = [r for r in read_metrics(out) if r["step"] <= start]
            atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(json_safe(r), allow_nan=False) + "\n"
                                  for r in recs))
        elif (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
        end = config.steps if stop_at is None else min(stop_at, config.steps)
        trained.train()
        metrics = open(out / "metrics.jsonl", "a")  # noqa: SIM115 - closed in finally
        try:
            bar = tqdm(range(start + 1, end + 1), initial=start, total=config.steps, desc="finetune",
                       disable=not progress, dynamic_ncols=True)
            for step in bar:
                loss, n_tok = train_step(trained, opt, data, gen, config, step, tok.pad_token_id, params)
                _check_finite_step(out, step, loss, trained, config)  # before this step writes anything
                metrics.write(json.dumps({"step": step, "loss": loss, "answer_tokens": n_tok,
                                          "lr": scheduled_lr(step, config.lr, config.steps, config.warmup_steps,
                                                             "cosine", config.min_lr_ratio),
                                          "elapsed_s": round(time.perf_counter() - t0, 3)}, allow_nan=False) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{loss:.4f}")
                if step % config.ckpt_every == 0 or step == config.steps:
                    save_checkpoint(out, step, opt, {
                        "trainable": {n: p for n, p in trained.named_parameters() if p.requires_grad},
                        "rng": {"data_generator": gen.get_state(), "torch": torch.get_rng_state()}},
                        {"state.json": json.dumps({"step": step})})
            bar.close()
        finally:
            metrics.close()
        if stop_at is not None and stop_at < config.steps:
            return None
        trained.eval()
        weights = {n: p.detach().cpu().contiguous() for n, p in trained.named_parameters() if p.requires_grad}
        after = _evaluate(_inference_module(trained), tok, config, name, evaluation) if evaluate else None
    if eval_before is None and _done(out / "eval_pretrained"):
        eval_before = SweepResult.load(out / "eval_pretrained")
    result = FinetuneResult(config, layers, weights, pd.DataFrame(read_metrics(out)), after, eval_before, identity)
    result.save(out)  # replaces the run directory whole; its checkpoints are carried over
    return result


def _check_finite_step(out: Path, step: int, loss: float, model: nn.Module, config: FinetuneConfig) -> None:
    """A non-finite loss, or trainable weights an update made non-finite, stop the run at ``step`` with a
    :class:`~taskvec_interp.finite.NonFiniteError` naming the step and the last good checkpoint (kept);
    nothing of the step is written."""
    what = None
    if not math.isfinite(loss):
        what = f"the training loss is {loss}"
    else:
        bad = nonfinite_params((n, p) for n, p in model.named_parameters() if p.requires_grad)
        if bad:
            what = f"the trainable weights are not finite after the update ({bad[0]}" + \
                   (f" and {len(bad) - 1} more)" if len(bad) > 1 else ")")
    if what is None:
        return
    good, _ = latest_good_checkpoint(out)
    kept = f"the last good checkpoint is {good[1]} (step {good[0]}), kept as it is" if good else \
        "no checkpoint was written yet"
    raise NonFiniteError(f"fine-tuning diverged in {out}: {what} at step {step}; stopped there, nothing was written "
                         f"after it and {kept}. Train with a lower lr (now {config.lr:g}) or a grad_clip, in a new "
                         "output directory")


def _done(sweep_dir: Path) -> bool:
    """A saved sweep is complete: its marker and every file of its manifest are there and intact."""
    return result_problem(sweep_dir, SWEEP_KIND) is None


def train_step(model: nn.Module, opt: torch.optim.Optimizer, data: TrainingData, gen: torch.Generator,
               config: FinetuneConfig, step: int, pad_id: int, params: Sequence[torch.Tensor]) -> tuple[float, int]:
    """One optimizer step over ``grad_accum`` micro-batches; returns (loss, answer tokens)."""
    lr = scheduled_lr(step, config.lr, config.steps, config.warmup_steps, "cosine", config.min_lr_ratio)
    for g in opt.param_groups:
        g["lr"] = lr
    micro = [data.batch(torch.randint(len(data), (config.batch_size,), generator=gen).tolist(), pad_id)
             for _ in range(config.grad_accum)]
    n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for b in micro:
        loss = answer_loss(model, b, n_tok)
        loss.backward()
        total += float(loss.detach())
    if config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    opt.step()
    return total, n_tok


def _inference_module(model: nn.Module) -> nn.Module:
    """The plain HF model under a peft wrapper (its LoRA layers stay active)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _evaluate(model: nn.Module, tok: Any, config: FinetuneConfig, name: str, prompts: list[Prompt]) -> SweepResult:
    adapter = make_adapter(model.eval(), tok, "torch")
    adapter.name = name
    sweep = config.sweep_config(name)
    return run_sweep(adapter, sweep, get_family(sweep.family, **sweep.family_kwargs), progress=False,
                     prompts=prompts)


# ------------------------------------------------------------------------------------------------
# Loading and comparing runs
# ------------------------------------------------------------------------------------------------
def load_finetuned(run: str | Path | FinetuneResult, backend: str = "torch", merge: bool = False,
                   model: nn.Module | None = None, tokenizer: Any = None) -> Adapter:
    """The fine-tuned model of a run (its directory or its :class:`FinetuneResult`) behind an adapter (LoRA kept
    as a peft model, or merged). A run that has not finished is refused (``ValueError``)."""
    res = run if isinstance(run, FinetuneResult) else FinetuneResult.load(run)
    config = res.config
    base, tok = _load_base(model if model is not None else config.model)
    tok = tokenizer if tokenizer is not None else tok
    with torch.random.fork_rng(devices=[]):
        trained = prepare_model(base, config, res.layers)
    load_trainable(trained, res.trained)
    from ..adapters.load import load_model

    return load_model(trained.eval(), backend=backend, tokenizer=tok, merge=merge)


def compare_runs(runs: Sequence[str | Path | FinetuneResult]) -> FinetuneComparison:
    """(summary, per_task, td): the Table-1-like comparison of fine-tuning runs (directories or results) and the
    pretrained model, as a :class:`FinetuneComparison` (a named tuple: ``summary, per_task, td = ...``).

    ``summary``: one row per model (``pretrained`` + each run's layer spec; two runs of one spec are told apart
    by their directory names): mean +- std over the non-Null tasks of exact-match accuracy and of per-task TD
    at the pretrained model's peak layer, and the peak overall TD. ``per_task``: accuracy and TD per task.
    ``td``: overall TD per layer per model. Runs are keyed by their identity (their directory), never by their
    layer spec; the same run given twice, and runs of different base models (their weights' fingerprints: one
    table has one pretrained baseline) are refused (``ValueError`` naming both runs).
    """
    if not runs:
        raise ValueError("give at least one fine-tuning run directory")
    results: dict[str, SweepResult] = {}
    seen: dict[object, str] = {}
    first: tuple[str, dict] | None = None
    for i, run in enumerate(runs):
        if isinstance(run, FinetuneResult):
            res = run
        else:
            try:
                res = FinetuneResult.load(run)
            except ValueError as err:
                raise ValueError(f"{run} has no eval results to compare: it is not a finished fine-tuning run "
                                 f"({err})") from None
        if res.eval is None:
            raise ValueError(f"{res.path or 'the run'} has no eval results to compare: it was not evaluated "
                             "(finetune(..., evaluate=False))")
        where = str(res.path) if res.path is not None else f"run {i}"
        key = res.path.resolve() if res.path is not None else id(res)
        if key in seen:
            raise ValueError(f"{where} is given twice (as {seen[key]} too): give each run once")
        seen[key] = where
        base = _base_key(res.model)
        if first is None:
            first = (where, base)
        else:
            diffs = config_diffs(first[1], base, labels=(first[0], where))
            if diffs:
                raise ValueError(f"the runs start from different base models ({'; '.join(diffs)}): one comparison has "
                                 "one pretrained baseline; compare runs of one base model")
        if "pretrained" not in results and res.eval_pretrained is not None:
            results["pretrained"] = res.eval_pretrained
        label = res.label
        if label in results:  # another run of the same spec: both rows stay, told apart by their directories
            label = f"{label} ({res.path.name if res.path is not None else i})"
            while label in results:
                label = f"{label} #{i}"
        results[label] = res.eval
    base = results.get("pretrained", next(iter(results.values())))
    overall = base.td[base.td["level"] == "overall"]
    peak = int(overall.loc[overall["td"].idxmax(), "layer"])
    per_task, td_rows, summary = [], [], []
    for label, res in results.items():
        acc = res.accuracy[res.accuracy["task"] != NULL_TASK][["task", "exact"]]
        tt = res.td[(res.td["level"] == "task") & (res.td["layer"] == peak)][["task", "td"]]
        table = acc.merge(tt, on="task").assign(model=label)
        per_task.append(table)
        o = res.td[res.td["level"] == "overall"][["layer", "td"]].assign(model=label)
        td_rows.append(o)
        summary.append({"model": label, "accuracy_mean": table["exact"].mean(), "accuracy_std": table["exact"].std(ddof=0),
                        "td_mean": table["td"].mean(), "td_std": table["td"].std(ddof=0), "td_layer": peak,
                        "peak_td": float(o["td"].max()), "peak_layer": int(o.loc[o["td"].idxmax(), "layer"])})
    per = pd.concat(per_task, ignore_index=True)[["model", "task", "exact", "td"]]
    return FinetuneComparison(pd.DataFrame(summary), per,
                              pd.concat(td_rows, ignore_index=True)[["model", "layer", "td"]])


def _base_key(model: dict) -> dict:
    """What identifies a run's base model: its weights' fingerprint (runs of older versions: name and shape)."""
    model = model or {}
    if model.get("fingerprint") is not None:
        return {"model fingerprint": model["fingerprint"]}
    return {k: model.get(k) for k in ("name", "model_type", "n_layers")}


COMPARISON_KIND = "finetune_comparison"
"""The result kind of a saved comparison (``taskvec finetune compare --out``)."""


class FinetuneComparison(NamedTuple):
    """What :func:`compare_runs` returns: three tidy tables, unpacked as ``summary, per_task, td``; ``save(dir)``
    writes them as Parquet in one result directory (kind ``"finetune_comparison"``), ``load(dir)`` reads them."""

    summary: pd.DataFrame
    per_task: pd.DataFrame
    td: pd.DataFrame

    def save(self, out: str | Path) -> Path:
        """``summary.parquet``, ``per_task.parquet``, ``td.parquet``; an older comparison in ``out`` is replaced
        whole, anything else there is refused."""
        with write_result_dir(out, COMPARISON_KIND, {"models": self.summary["model"].tolist()}) as tmp:
            for name in self._fields:
                getattr(self, name).to_parquet(tmp / f"{name}.parquet", index=False)
        return Path(out)

    @classmethod
    def load(cls, directory: str | Path) -> FinetuneComparison:
        """Read back what :meth:`save` wrote; ``ValueError`` naming the file when it is not a complete, intact
        comparison."""
        from ..results import read_parquet

        d = read_result_dir(directory, COMPARISON_KIND)
        return cls(*(read_parquet(d / f"{name}.parquet") for name in cls._fields))


__all__ = [
    "METHODS", "FinetuneComparison", "FinetuneConfig", "FinetuneResult", "TrainingData", "answer_loss",
    "check_disjoint", "check_layer_spec", "compare_runs",
    "eval_prompts", "finetune",
    "load_finetuned", "prepare_model", "resolve_layer_spec", "target_modules", "train_step", "training_data",
]
