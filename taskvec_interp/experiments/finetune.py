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
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

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
from ..results import check_out_dir, provenance
from ..tasks import NULL_TASK, PromptBuilder, PromptTemplate, get_family
from ..tasks.base import Prompt
from ..validate import check_int, check_number
from .sweep import SweepConfig, SweepResult, load_sweep, peak_layer_of, run_sweep

METHODS: tuple[str, ...] = ("lora", "full")
RUNTIME_FIELDS = frozenset({"eval_before", "batch_size_eval"})
"""Fields a resumed run may change: they do not change its numbers (``steps`` does: the cosine schedule
depends on it)."""


# ------------------------------------------------------------------------------------------------
# Layer subsets and target modules
# ------------------------------------------------------------------------------------------------
def check_layer_spec(spec: str | Sequence[int]) -> None:
    """The checks of :func:`resolve_layer_spec` that need no model (syntax, empty ranges, repeats)."""
    resolve_layer_spec(spec, 2**31 - 1, td=pd.DataFrame({"layer": [0], "level": ["overall"], "td": [0.0]}))


def _int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"layer spec {spec!r}: {text!r} is not an int") from None


def resolve_layer_spec(spec: str | Sequence[int], n_layers: int, td: pd.DataFrame | None = None,
                       shots: int | None = None) -> list[int]:
    """``first:k`` | ``last:k`` | ``a-b`` | ``3,5,7`` (or a list) | ``td:encoder`` -> sorted layer indices.

    ``td:encoder`` takes layers ``0..p`` where ``p`` is the peak of the overall TD in ``td`` (a sweep's
    ``td`` table; at ``shots`` when it has several shot counts).
    """
    if not isinstance(spec, str):
        layers = list(spec)
        for x in layers:
            if isinstance(x, bool) or not isinstance(x, int):
                raise ValueError(f"layers must be ints, got {x!r} ({type(x).__name__})")
    elif spec == "td:encoder":
        if td is None:
            raise ValueError("layers 'td:encoder' needs a TD sweep of this model (td_sweep=...)")
        peak = peak_layer_of(td, shots)
        if peak >= n_layers:
            raise ValueError(f"the TD sweep's peak layer {peak} is out of range for a model with {n_layers} layers")
        layers = list(range(peak + 1))
    elif spec.startswith(("first:", "last:")):
        kind, _, num = spec.partition(":")
        k = _int(num, spec)
        if not 1 <= k <= n_layers:
            raise ValueError(f"layer spec {spec!r}: k must be in [1, {n_layers}] for a model with {n_layers} layers")
        layers = list(range(k)) if kind == "first" else list(range(n_layers - k, n_layers))
    elif "-" in spec.strip("-") and "," not in spec:
        a_text, _, b_text = spec.partition("-")
        a, b = _int(a_text, spec), _int(b_text, spec)
        if a > b:
            raise ValueError(f"layer range {spec!r} is empty (start > end)")
        layers = list(range(a, b + 1))
    else:
        layers = [_int(x.strip(), spec) for x in spec.split(",") if x.strip()]
    if not layers:
        raise ValueError(f"layer spec {spec!r} selects no layers")
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {n_layers} layers")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer spec {spec!r} repeats layers")
    return sorted(layers)


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
class FinetuneConfig:
    """Everything that determines a fine-tuning run (saved as config.json in the run directory).

    ``layers``: see :func:`resolve_layer_spec`. ``n_train``: training prompts per task, drawn once from
    the family's train side with ``seed``; each optimizer step samples ``batch_size * grad_accum`` of
    them (with replacement) from a generator seeded with ``seed``. ``eval_n_per_task``: evaluation
    prompts per task on the test side (TD and accuracy before / after).
    """

    model: str = "smollm2-135m"
    family: str = "bitwise"
    layers: str | list[int] = "first:10"
    method: str = "lora"
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: list[str] | None = None
    shots: int = 4
    n_train: int = 500
    include_null: bool = False
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    ckpt_every: int = 50
    eval_n_per_task: int = 50
    k: int = 10
    """Neighbours of the evaluation TD's leave-one-out k-NN (needs k < eval_n_per_task - 1)."""
    eval_before: bool = True
    batch_size_eval: int = 16
    td_sweep: str | None = None
    template: dict = field(default_factory=dict)
    family_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown fine-tuning method {self.method!r}; known: {METHODS}")
        for name in ("rank", "shots", "n_train", "steps", "batch_size", "grad_accum", "ckpt_every",
                     "eval_n_per_task", "batch_size_eval"):
            check_int(name, getattr(self, name), 1)
        check_int("seed", self.seed, 0)
        check_int("k", self.k, 1)
        if self.k >= self.eval_n_per_task - 1:
            raise ValueError(f"k={self.k} is not below eval_n_per_task - 1 = {self.eval_n_per_task - 1}: the "
                             f"evaluation TD would read low whatever the model does; use eval_n_per_task >= "
                             f"{self.k + 2} or a smaller k")
        check_int("warmup_steps", self.warmup_steps, 0)
        check_number("alpha", self.alpha, 0.0, low_open=True)
        check_number("dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_number("lr", self.lr, 0.0, low_open=True)
        check_number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_number("weight_decay", self.weight_decay, 0.0)
        if self.grad_clip is not None:
            check_number("grad_clip", self.grad_clip, 0.0, low_open=True)
        if isinstance(self.layers, str):
            if not self.layers.strip():
                raise ValueError("layers is empty")
        else:
            self.layers = list(self.layers)
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")
        if "split" in self.family_kwargs:
            raise ValueError("family_kwargs must not set 'split': training reads split='train', evaluation 'test'")
        if self.layers == "td:encoder" and self.td_sweep is None:
            raise ValueError("layers 'td:encoder' needs td_sweep= (a `taskvec td` output directory of this model)")

    def sweep_config(self, model_name: str) -> SweepConfig:
        """The evaluation sweep (TEST side of the family), the same before and after training."""
        return SweepConfig(model=model_name, family=self.family, shots=(self.shots,), n_per_task=self.eval_n_per_task,
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
    from ..tasks.base import check_tokenization

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
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=names,
                      layers_to_transform=list(layers), layers_pattern=arch.blocks.split(".")[-1], bias="none")
    return get_peft_model(model, lora)


def load_trainable(model: nn.Module, path: Path) -> None:
    """Copy saved trainable weights into ``model``; refuse a file with other trainable parameters."""
    state = load_file(path)
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


def _sweep_td(config: FinetuneConfig) -> pd.DataFrame | None:
    return load_sweep(config.td_sweep).td if config.td_sweep is not None else None


def finetune(
    config: FinetuneConfig,
    out: str | Path,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    progress: bool = True,
    stop_at: int | None = None,
    evaluate: bool = True,
) -> Path:
    """Train (or resume) a layer-subset fine-tune in ``out``; then evaluate before/after.

    ``model``: a Hugging Face causal LM to start from (deep-copied; default: load ``config.model``).
    Resumes from the newest checkpoint in ``out`` (``ValueError`` if ``out`` holds another config).
    ``stop_at`` stops after that many steps without evaluating (simulates a kill; for tests).
    Writes ``config.json``, ``metrics.jsonl``, ``checkpoints/``, ``trained.safetensors`` (the trainable
    weights), and ``eval/`` (+ ``eval_pretrained/``) sweep results. Returns ``out``.
    """
    out = check_out_dir(out)
    base, tok = _load_base(model if model is not None else config.model)
    tok = tokenizer if tokenizer is not None else tok
    if tok is None:
        raise ValueError("fine-tuning needs a tokenizer: pass tokenizer= with model=")
    if getattr(tok, "pad_token_id", None) is None:
        tok.pad_token = tok.eos_token
    name = config.model if model is None else getattr(getattr(base, "config", None), "_name_or_path", "") or "module"
    n_layers = len(get_module(base, find_arch(base).blocks))
    td = _sweep_td(config)
    if td is not None and config.layers == "td:encoder":
        swept = json.loads((Path(config.td_sweep) / "config.json").read_text())
        if swept.get("provenance", {}).get("model", {}).get("n_layers", n_layers) != n_layers or \
                (model is None and swept.get("model") != config.model):
            raise ValueError(f"the TD sweep in {config.td_sweep} comes from another model ({swept.get('model')!r})")
    layers = resolve_layer_spec(config.layers, n_layers, td, config.shots)
    data = training_data(tok, config)  # refuses a family without a train side or too few examples
    evaluation = eval_prompts(config)  # ... and an evaluation side too small for the shots
    check_disjoint(data.prompts, evaluation)
    # the run directory: same config to resume, nothing written before the checks above
    cfg_dict = asdict(config)
    held = list_checkpoints(out)
    cfg_path = out / "config.json"
    if cfg_path.exists():
        saved = json.loads(cfg_path.read_text())
        saved.pop("provenance", None)
        saved.pop("resolved_layers", None)
        diffs = config_diffs(saved, cfg_dict, RUNTIME_FIELDS)
        if diffs:
            raise ValueError(f"{out} holds a fine-tuning run with another config; refusing to resume. "
                             "Differences: " + "; ".join(diffs))
    elif held:
        raise ValueError(f"{out} has checkpoints but no config.json; refusing to resume")
    if held and held[-1][0] > config.steps:
        raise ValueError(f"{out} already holds checkpoints up to step {held[-1][0]}, beyond steps={config.steps}: "
                         f"use steps >= {held[-1][0]} or a new output directory")
    good, _ = latest_good_checkpoint(out) if held else (None, [])  # warns about each checkpoint it skips
    ckpts = [good] if good is not None else []
    finished = ckpts and ckpts[-1][0] == config.steps and (out / "trained.safetensors").exists()
    if finished and (not evaluate or _done(out / "eval")):
        return out  # nothing left to do
    out.mkdir(parents=True, exist_ok=True)
    clean_partial(out)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # dropout and LoRA init draw from torch's RNG: fork, never reseed it
        eval_before = None
        if evaluate and config.eval_before and not _done(out / "eval_pretrained"):
            eval_before = _evaluate(base, tok, config, name, evaluation)  # before wrapping: the pretrained model
        torch.manual_seed(config.seed)
        trained = prepare_model(base, config, layers)
        params = [p for p in trained.parameters() if p.requires_grad]
        identity = {"name": name, "n_layers": n_layers, "model_type": getattr(base.config, "model_type", None),
                    "trainable_params": sum(p.numel() for p in params)}
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
            atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
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
                metrics.write(json.dumps({"step": step, "loss": loss, "answer_tokens": n_tok,
                                          "lr": scheduled_lr(step, config.lr, config.steps, config.warmup_steps,
                                                             "cosine", config.min_lr_ratio),
                                          "elapsed_s": round(time.perf_counter() - t0, 3)}) + "\n")
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
            return out
        trained.eval()
        from safetensors.torch import save_file

        tmp = out / ".trained.safetensors.tmp"
        save_file({n: p.detach().contiguous() for n, p in trained.named_parameters() if p.requires_grad}, str(tmp))
        tmp.replace(out / "trained.safetensors")
        if evaluate:
            _evaluate(_inference_module(trained), tok, config, name, evaluation).save(out / "eval")
    return out


def _done(sweep_dir: Path) -> bool:
    """A saved sweep is complete once its last file (fit.json) is there."""
    return (sweep_dir / "fit.json").exists()


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
def load_finetuned(run: str | Path, backend: str = "torch", merge: bool = False, model: nn.Module | None = None,
                   tokenizer: Any = None) -> Adapter:
    """The fine-tuned model of a run directory behind an adapter (LoRA kept as a peft model, or merged)."""
    run = Path(run)
    raw = json.loads((run / "config.json").read_text())
    layers = raw.pop("resolved_layers")
    raw.pop("provenance", None)
    config = FinetuneConfig(**raw)
    base, tok = _load_base(model if model is not None else config.model)
    tok = tokenizer if tokenizer is not None else tok
    if not (run / "trained.safetensors").exists():
        raise ValueError(f"{run} has no trained.safetensors: the run has not finished")
    with torch.random.fork_rng(devices=[]):
        trained = prepare_model(base, config, layers)
    load_trainable(trained, run / "trained.safetensors")
    from ..adapters.load import load_model

    return load_model(trained.eval(), backend=backend, tokenizer=tok, merge=merge)


def compare_runs(runs: Sequence[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(summary, per_task, td): the Table-1-like comparison of fine-tuning runs and the pretrained model.

    ``summary``: one row per model (``pretrained`` + each run's layer spec): mean +- std over the
    non-Null tasks of exact-match accuracy and of per-task TD at the pretrained model's peak layer, and
    the peak overall TD. ``per_task``: accuracy and TD per task. ``td``: overall TD per layer per model.
    """
    if not runs:
        raise ValueError("give at least one fine-tuning run directory")
    results: dict[str, SweepResult] = {}
    for run in runs:
        run = Path(run)
        if not _done(run / "eval"):
            raise ValueError(f"{run} has no eval/ results: the run has not finished")
        cfg = json.loads((run / "config.json").read_text())
        label = f"{cfg['method']} {cfg['layers'] if isinstance(cfg['layers'], str) else cfg['resolved_layers']}"
        if "pretrained" not in results and _done(run / "eval_pretrained"):
            results["pretrained"] = load_sweep(run / "eval_pretrained")
        results[label] = load_sweep(run / "eval")
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
    return pd.DataFrame(summary), per, pd.concat(td_rows, ignore_index=True)[["model", "layer", "td"]]


__all__ = [
    "METHODS", "FinetuneConfig", "TrainingData", "answer_loss", "check_disjoint", "check_layer_spec", "compare_runs",
    "eval_prompts", "finetune",
    "load_finetuned", "prepare_model", "resolve_layer_spec", "target_modules", "train_step", "training_data",
]
