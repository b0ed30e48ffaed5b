"""Attention heads that carry the task (Todd et al., "Function vectors in large language models", ICLR 2024):
each head's output at the last prompt token, its mean per task, per-head task decodability and the function
vector.

* :func:`head_activations`: every head of every layer at the last prompt token, ``[layer, prompt, head, d_head]``,
  in ONE capture pass per prompt batch. A head's output is the per-head ``z`` site (``blocks.{l}.attn.hook_z``,
  the input of the attention's output projection; :mod:`taskvec_interp.hooks`). On GQA models (query heads
  sharing key/value heads, as in SmolLM2 and Llama-3) ``z`` is per QUERY head: that is what the output projection
  reads, head ``h`` owning input columns ``h * d_head .. (h + 1) * d_head``.
* :class:`HeadMeans`: each task's mean ``z`` per (layer, head), ``[task, layer, head, d_head]``; saved as
  safetensors with the model's identity, refused on another model.
* :func:`head_decodability`: task decodability (the paper's leave-one-out k-NN) of each head's ``z``: a
  layer x head map, every head in one call.
* :func:`head_outputs` / :func:`function_vector`: a head's mean projected through its slice of the output
  projection, i.e. its contribution to the residual stream; the function vector of a task is the sum of
  those contributions over the chosen heads. The output projection's bias is NOT part of it: the bias is
  added once per layer whatever the heads write, so it belongs to no head. The function vector is returned
  as :class:`~taskvec_interp.probes.vectors.TaskVectors` (definition ``"function"``, the same vector at every
  layer: it is added at one layer of the caller's choice), so ``taskvec patch --vectors-file`` injects it and
  a model of another shape refuses it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..adapters.arch import ARCHS, O_PROJ_NAMES, find_o_proj, get_module
from ..adapters.base import Adapter
from ..hooks import Site, resolve_layers
from ..io import atomic_write, read_result_dir, write_result_dir
from ..tasks.prompts import Prompt, PromptTemplate
from .decodability import task_decodability
from .vectors import TaskVectors

__all__ = [
    "FUNCTION", "Head", "HeadMeans", "check_heads", "check_top_k", "function_vector", "head_activations",
    "head_decodability", "head_means", "head_outputs", "heads_of", "load_function_vectors", "mean_head_activations",
    "output_projections", "parse_heads",
]

Head = tuple[int, int]
"""``(layer, head)``: a query head of one layer (0-indexed both)."""
FUNCTION = "function"
"""The ``definition`` of a function-vector :class:`TaskVectors`."""
_MEANS_FORMAT = "taskvec_interp.head_means/1"
MEANS_KIND = "head_means"
MEANS_FILE = "head_means.safetensors"


# ------------------------------------------------------------------------------------------------
# Checks (all before any model work)
# ------------------------------------------------------------------------------------------------
def heads_of(adapter: Adapter) -> int:
    """The number of query heads per layer behind the adapter's ``z`` site; ``ValueError`` saying why where the
    model or backend has none (no attention, an unknown output projection)."""
    if adapter.n_heads is None:
        why = getattr(adapter, "_no_heads_reason", None) or "this adapter has no per-head sites"
        raise ValueError(f"per-head analysis needs the per-head z site (blocks.{{l}}.attn.hook_z), which "
                         f"{adapter!r} does not have: {why}")
    return int(adapter.n_heads)


def check_heads(heads: Sequence[Sequence[int]], n_layers: int, n_heads: int, what: str = "heads") -> list[Head]:
    """Distinct ``(layer, head)`` pairs inside a model of ``n_layers`` layers of ``n_heads`` heads (negative indices
    are NOT accepted: a head is named exactly), as a list of int tuples."""
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence) or len(heads) == 0:
        raise ValueError(f"{what} must be a non-empty list of (layer, head) pairs, got {heads!r}")
    out: list[Head] = []
    for item in heads:
        pair = tuple(item) if isinstance(item, (tuple, list)) else None
        if pair is None or len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
            raise ValueError(f"{what} must hold (layer, head) pairs of ints, got {item!r}")
        layer, head = int(pair[0]), int(pair[1])
        if not 0 <= layer < n_layers:
            raise ValueError(f"{what}: layer {layer} of head ({layer}, {head}) is out of range for a model with "
                             f"{n_layers} layers (0..{n_layers - 1})")
        if not 0 <= head < n_heads:
            raise ValueError(f"{what}: head index {head} of ({layer}, {head}) is out of range for a model with "
                             f"{n_heads} heads per layer (0..{n_heads - 1})")
        out.append((layer, head))
    twice = sorted({h for h in out if out.count(h) > 1})
    if twice:
        raise ValueError(f"{what} name head(s) {twice} more than once")
    return out


_HEAD_RE = re.compile(r"^\s*(\d+)\s*[.:]\s*(\d+)\s*$")


def parse_heads(spec: str | Sequence[Sequence[int]]) -> list[Head]:
    """``"9.3,12.0"`` (``layer.head``, comma-separated; ``layer:head`` also works) or a list of pairs -> pairs
    (syntax only; :func:`check_heads` checks them against a model)."""
    if not isinstance(spec, str):
        return [tuple(int(v) for v in item) for item in spec]  # type: ignore[misc]
    items = [s for s in spec.split(",") if s.strip()]
    out = []
    for s in items:
        m = _HEAD_RE.match(s)
        if m is None:
            raise ValueError(f"heads must be 'layer.head' pairs, comma-separated (e.g. '9.3,12.0'), got {s.strip()!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    if not out:
        raise ValueError(f"heads must name at least one 'layer.head' pair, got {spec!r}")
    return out


def check_top_k(top_k: object, n_total: int, what: str = "top_k") -> int:
    """``top_k`` must be an int in ``[1, n_total]`` (the model's number of heads over all layers)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_total:
        raise ValueError(f"{what} must be an int in [1, {n_total}] (this model has {n_total} attention heads in "
                         f"all), got {top_k!r}")
    return int(top_k)


def output_projections(adapter: Adapter) -> list[nn.Module]:
    """The attention output projection of every layer (the module whose input is the ``z`` site), found on the
    wrapped Hugging Face / torch module through the adapter's architecture row, the ``ARCHS`` table or the
    known names (:data:`~taskvec_interp.adapters.arch.O_PROJ_NAMES`). A TransformerLens bridge's wrapper is
    unwrapped to the original layer. ``ValueError`` naming every path tried when none fits."""
    module = adapter._hf_module()
    arch = getattr(adapter, "arch", None)
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    row = arch if arch is not None else ARCHS.get(model_type)
    blocks_path = getattr(row, "blocks", None)
    tried: list[str] = []
    blocks = None
    if isinstance(module, nn.Module) and blocks_path is not None:
        try:
            blocks = get_module(module, blocks_path)
        except ValueError:
            blocks = None
    paths = list(dict.fromkeys([p for p in (getattr(row, "o_proj", None),) if p] + list(O_PROJ_NAMES)))
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) == adapter.n_layers:
        found = find_o_proj(blocks)
        for path in ([found] if found else []) + paths:
            tried.append(path)
            try:
                projs = [get_module(b, path) for b in blocks]
            except ValueError:
                continue
            return [getattr(p, "original_component", None) or p for p in projs]
        where = f"on every block of {blocks_path!r}"
    else:
        tried = paths
        where = (f"no list of {adapter.n_layers} blocks at {blocks_path!r}" if blocks_path else
                 f"no architecture row for model_type {model_type!r}, so no blocks to look in")
    raise ValueError(f"cannot find the attention output projection of {type(module).__name__} ({where}); tried "
                     f"{list(dict.fromkeys(tried))}: give its ArchSpec an o_proj path (e.g. 'self_attn.o_proj')")


# ------------------------------------------------------------------------------------------------
# Activations and their task means
# ------------------------------------------------------------------------------------------------
def _texts(prompts: Sequence[Prompt] | Sequence[str]) -> list[str]:
    return [p.text if isinstance(p, Prompt) else p for p in prompts]


def head_activations(
    adapter: Adapter, prompts: Sequence[Prompt] | Sequence[str], layers: str | int | Sequence[int] = "all", *,
    batch_size: int = 16, dtype: torch.dtype = torch.float32, progress: bool = True,
) -> Float[Tensor, "layer prompt head d_head"]:
    """Every head's ``z`` at each prompt's last token, for every requested layer, in ONE capture pass per batch:
    ``[layer, prompt, head, d_head]`` on CPU, prompts in call order."""
    heads_of(adapter)
    layer_list = resolve_layers(layers, adapter.n_layers)
    sites = [Site(layer, "z") for layer in layer_list]
    got = adapter.capture_sites(_texts(prompts), sites, position=-1, batch_size=batch_size, dtype=dtype,
                                progress=progress)
    return torch.stack([got[s.name] for s in sites])


def head_means(z: Float[Tensor, "layer n head d_head"], prompt_tasks: Sequence[str], tasks: Sequence[str]
               ) -> Float[Tensor, "task layer head d_head"]:
    """Each task's mean of ``z`` over its prompts (one einsum, no loop over prompts)."""
    if z.ndim != 4 or z.shape[1] != len(prompt_tasks):
        raise ValueError(f"z must be [layer, {len(prompt_tasks)} prompts, head, d_head], got {list(z.shape)}")
    missing = [t for t in tasks if t not in set(prompt_tasks)]
    if missing:
        raise ValueError(f"tasks {missing} have no prompts to average over")
    index = {t: i for i, t in enumerate(tasks)}
    onehot = torch.zeros((len(tasks), len(prompt_tasks)), dtype=z.dtype)
    keep = [i for i, t in enumerate(prompt_tasks) if t in index]
    onehot[[index[prompt_tasks[i]] for i in keep], keep] = 1.0
    return torch.einsum("tn,lnhd->tlhd", onehot / onehot.sum(1, keepdim=True), z)


@dataclass
class HeadMeans:
    """``means[t, i, h]``: task ``tasks[t]``'s mean ``z`` of head ``h`` at layer ``layers[i]`` (``[task, layer, head,
    d_head]``), with provenance in ``meta`` (model identity, shots, n per task, template, family, seed)."""

    means: Float[Tensor, "task layer head d_head"]
    tasks: tuple[str, ...]
    layers: list[int]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        self.layers = [int(x) for x in self.layers]
        if self.means.ndim != 4 or self.means.shape[:2] != (len(self.tasks), len(self.layers)):
            raise ValueError(f"head means must be [{len(self.tasks)} tasks, {len(self.layers)} layers, head, d_head], "
                             f"got {list(self.means.shape)}")
        if not torch.isfinite(self.means).all():
            raise ValueError("head means contain NaN or inf")

    @property
    def n_heads(self) -> int:
        return int(self.means.shape[2])

    @property
    def d_head(self) -> int:
        return int(self.means.shape[3])

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise ValueError(f"no head means for task {task!r}; these have tasks {list(self.tasks)}")
        return self.tasks.index(task)

    def for_prompts(self, prompt_tasks: Sequence[str]) -> Float[Tensor, "n layer head d_head"]:
        """Each prompt's own task's means (``[n, layer, head, d_head]``, call order)."""
        return self.means[[self.task_index(t) for t in prompt_tasks]]

    def check_model(self, adapter: Adapter, allow_other_model: bool = False) -> None:
        """Refuse a model of another shape (layers, heads, head size) or, unless allowed, another model."""
        n_heads = heads_of(adapter)
        if max(self.layers) >= adapter.n_layers or self.n_heads != n_heads or \
                self.meta.get("model", {}).get("n_layers") not in (None, adapter.n_layers):
            raise ValueError(f"head means come from a model with {self.meta.get('model', {}).get('n_layers')} layers "
                             f"of {self.n_heads} heads; this model has {adapter.n_layers} layers of {n_heads}")
        _same_model(self.meta.get("model") or {}, adapter, "head means", allow_other_model)

    def save(self, path: str | Path) -> Path:
        """A ``.safetensors`` file (the means + JSON metadata, written atomically) or, for any other path, a result
        directory of kind ``"head_means"`` holding it."""
        path = Path(path)
        if path.suffix != ".safetensors":
            with write_result_dir(path, MEANS_KIND, self._info()) as tmp:
                self._write(tmp / MEANS_FILE)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, self._write)

    def _info(self) -> dict:
        return {"format": _MEANS_FORMAT, "tasks": list(self.tasks), "layers": self.layers, "meta": self.meta}

    def _write(self, path: Path) -> None:
        save_file({"means": self.means.detach().float().contiguous()}, str(path),
                  metadata={"taskvec": json.dumps(self._info(), default=str)})

    @classmethod
    def load(cls, path: str | Path, adapter: Adapter | None = None, allow_other_model: bool = False) -> HeadMeans:
        """Read what :meth:`save` wrote; with ``adapter``, refuse means from another model."""
        path = Path(path)
        if path.is_dir():
            path = read_result_dir(path, MEANS_KIND) / MEANS_FILE
        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get("taskvec", "{}"))
                means = f.get_tensor("means")
        except Exception as err:
            raise ValueError(f"{path} is not a readable head-means file: {type(err).__name__}: {err}") from None
        if info.get("format") != _MEANS_FORMAT:
            raise ValueError(f"{path} is not a head-means file written by taskvec_interp (format {info.get('format')!r})")
        out = cls(means, tuple(info["tasks"]), list(info["layers"]), info.get("meta", {}))
        if adapter is not None:
            out.check_model(adapter, allow_other_model)
        return out


def _same_model(model: dict, adapter: Adapter, what: str, allow_other_model: bool) -> None:
    if allow_other_model:
        return
    mine = adapter.identity()
    for key in ("name", "model_type", "n_params", "d_model"):
        if model.get(key) is not None and mine.get(key) is not None and model[key] != mine[key]:
            raise ValueError(f"{what} come from another model ({key} {model[key]!r}, this model: {mine[key]!r}); "
                             "pass allow_other_model=True to use them anyway")


def mean_head_activations(
    adapter: Adapter, prompts: Sequence[Prompt], *, template: PromptTemplate | None = None, seed: int | None = None,
    batch_size: int = 16, progress: bool = True,
) -> tuple[HeadMeans, Float[Tensor, "layer prompt head d_head"]]:
    """Each task's mean head output at the last prompt token (tasks in label order), from ONE capture pass over
    ``prompts``; also returns the captured ``z`` ``[layer, prompt, head, d_head]`` (for :func:`head_decodability`)."""
    if len(prompts) == 0:
        raise ValueError("no prompts to average head outputs over")
    by_label: dict[int, str] = {}
    for p in prompts:
        if by_label.setdefault(p.label, p.task) != p.task:
            raise ValueError(f"label {p.label} names two tasks ({by_label[p.label]!r}, {p.task!r})")
    tasks = tuple(by_label[k] for k in sorted(by_label))
    z = head_activations(adapter, prompts, batch_size=batch_size, progress=progress)
    prompt_tasks = [p.task for p in prompts]
    shots = sorted({p.n_shots for p in prompts})
    meta = {"model": adapter.identity(), "n_heads": heads_of(adapter), "site": "blocks.{l}.attn.hook_z",
            "position": -1, "shots": shots[0] if len(shots) == 1 else shots,
            "n": {t: prompt_tasks.count(t) for t in tasks}, "seed": seed,
            "template": asdict(template) if template is not None else None, "family": prompts[0].family}
    return HeadMeans(head_means(z, prompt_tasks, tasks), tasks, list(range(adapter.n_layers)), meta), z


def head_decodability(
    z: Float[Tensor, "layer n head d_head"], prompt_tasks: Sequence[str], label_names: Sequence[str] | None = None, *,
    k: int = 10, n_boot: int = 1000, seed: int = 0, metric: str = "euclidean",
) -> pd.DataFrame:
    """Task decodability of every head's ``z`` (leave-one-out k-NN, :func:`~taskvec_interp.probes.task_decodability`),
    all heads in one call: one row per (layer, head, task), ``task == "all"`` for the overall TD, with ``td``,
    ``ci_low``, ``ci_high``, ``chance``, ``k``, ``n``."""
    if z.ndim != 4:
        raise ValueError(f"z must be [layer, n, head, d_head], got {list(z.shape)}")
    n_layers, n, n_heads, d_head = z.shape
    flat = z.permute(0, 2, 1, 3).reshape(n_layers * n_heads, n, d_head)
    res = task_decodability(flat, list(prompt_tasks), k=k, metric=metric, label_names=label_names,
                            layers=list(range(n_layers * n_heads)), n_boot=n_boot, seed=seed)
    names = list(res.label_names)
    idx = torch.arange(n_layers * n_heads)
    overall = pd.DataFrame({"layer": (idx // n_heads).tolist(), "head": (idx % n_heads).tolist(), "task": "all",
                            "td": res.td.tolist(), "ci_low": res.ci_low.tolist(), "ci_high": res.ci_high.tolist(),
                            "n": n})
    counts = res.n_per_task.tolist()
    per_task = pd.DataFrame({
        "layer": (idx // n_heads).repeat_interleave(len(names)).tolist(),
        "head": (idx % n_heads).repeat_interleave(len(names)).tolist(),
        "task": names * len(idx), "td": res.td_task.flatten().tolist(),
        "ci_low": res.task_ci_low.flatten().tolist(), "ci_high": res.task_ci_high.flatten().tolist(),
        "n": counts * len(idx)})
    out = pd.concat([overall, per_task], ignore_index=True)
    out["chance"] = res.chance
    out["k"] = res.k
    return out


# ------------------------------------------------------------------------------------------------
# Function vectors
# ------------------------------------------------------------------------------------------------
def _project(proj: nn.Module, x: Tensor) -> Tensor:
    """``x @ W^T`` of an output projection WITHOUT its bias (``x``: ``[..., n_heads * d_head]``): exact for
    ``nn.Linear`` and GPT-2's ``Conv1D``; any other module as ``proj(x) - proj(0)``."""
    param = next(proj.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    if isinstance(proj, nn.Linear):
        return torch.nn.functional.linear(x, proj.weight)
    if type(proj).__name__ == "Conv1D" and getattr(proj, "weight", None) is not None:
        return x @ proj.weight  # GPT-2's Conv1D: weight [n_in, n_out]
    return proj(x) - proj(torch.zeros_like(x[..., :1, :]))


def head_outputs(
    adapter: Adapter, means: HeadMeans | Float[Tensor, "task layer head d_head"], heads: Sequence[Sequence[int]],
) -> Float[Tensor, "head task d_model"]:
    """Each head's mean output projected through its slice of the output projection (its contribution to the
    residual stream, the projection's bias excluded): ``[len(heads), task, d_model]`` float32 on CPU. Heads of one
    layer go through their projection together."""
    n_heads = heads_of(adapter)
    tensor = means.means if isinstance(means, HeadMeans) else means
    if isinstance(means, HeadMeans):
        means.check_model(adapter, allow_other_model=True)
    if tensor.ndim != 4 or tensor.shape[1] != adapter.n_layers or tensor.shape[2] != n_heads:
        raise ValueError(f"head means must be [task, {adapter.n_layers} layers, {n_heads} heads, d_head], "
                         f"got {list(tensor.shape)}")
    pairs = check_heads(heads, adapter.n_layers, n_heads)
    projs = output_projections(adapter)
    n_tasks, d_head = tensor.shape[0], tensor.shape[3]
    out = torch.empty((len(pairs), n_tasks, adapter.d_model), dtype=torch.float32)
    with torch.no_grad():
        for layer in sorted({layer for layer, _ in pairs}):  # a loop over layers (one projection each)
            rows = [i for i, (lay, _) in enumerate(pairs) if lay == layer]
            x = torch.zeros((len(rows), n_tasks, n_heads, d_head), dtype=tensor.dtype)
            x[torch.arange(len(rows)), :, [pairs[i][1] for i in rows]] = tensor[:, layer, [pairs[i][1] for i in rows]
                                                                                ].transpose(0, 1)
            y = _project(projs[layer], x.reshape(len(rows), n_tasks, n_heads * d_head))
            if y.shape[-1] != adapter.d_model:
                raise ValueError(f"the output projection of layer {layer} maps to {y.shape[-1]} dims, the model's "
                                 f"d_model is {adapter.d_model}")
            out[rows] = y.detach().float().cpu()
    return out


def function_vector(
    adapter: Adapter, means: HeadMeans, heads: Sequence[Sequence[int]], *, scores: Sequence[float] | None = None,
    ranking: str = "given",
) -> TaskVectors:
    """Todd et al.'s function vector of every task of ``means``: the sum over ``heads`` of each head's mean output
    projected through its slice of the output projection (:func:`head_outputs`; the projection's bias excluded).

    Returned as :class:`TaskVectors` of definition ``"function"`` holding the SAME vector at every layer (it is
    added at one layer of the caller's choice: ``TaskVectors.get(layer, task)``), with the heads, their
    ``scores`` (e.g. AIE), ``ranking`` and the means' provenance in ``meta["function_vector"]``; saved and loaded
    like task vectors and refused by a model of another shape."""
    means.check_model(adapter)
    pairs = check_heads(heads, adapter.n_layers, means.n_heads)
    fv = head_outputs(adapter, means, pairs).sum(0)  # [task, d_model]
    vectors = fv.unsqueeze(0).expand(adapter.n_layers, *fv.shape).contiguous()
    meta = {k: v for k, v in means.meta.items() if k not in ("site", "position")}
    meta["model"] = adapter.identity()
    meta["component"] = "resid_post"
    meta["function_vector"] = {
        "heads": [list(h) for h in pairs], "top_k": len(pairs), "n_heads": means.n_heads,
        "scores": None if scores is None else [float(s) for s in scores], "ranking": ranking,
        "bias": "excluded (the output projection's bias belongs to no head)",
        "layers": "the same vector at every layer: add it at one layer (taskvec patch --modes add --layers L)",
    }
    return TaskVectors(vectors, list(range(adapter.n_layers)), means.tasks, FUNCTION, meta)


def load_function_vectors(path: str | Path, adapter: Adapter | None = None,
                          allow_other_model: bool = False) -> TaskVectors:
    """A saved function vector (:meth:`TaskVectors.save` of :func:`function_vector`), checked: definition
    ``"function"`` and, with ``adapter``, a model of the same shape (layers, d_model, heads per layer) and name."""
    tv = TaskVectors.load(path)
    if tv.definition != FUNCTION:
        raise ValueError(f"{path} holds {tv.definition!r} task vectors, not function vectors")
    if adapter is not None:
        info = tv.meta.get("function_vector", {})
        n_heads = heads_of(adapter)
        if info.get("n_heads") not in (None, n_heads):
            raise ValueError(f"the function vectors come from a model with {info.get('n_heads')} heads per layer; "
                             f"this model has {n_heads}")
        tv.check_model(adapter, allow_other_model)
    return tv
