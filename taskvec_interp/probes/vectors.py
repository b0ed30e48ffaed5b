"""Task vectors: one vector per task and layer, read from the residual stream in ONE capture pass.

Three definitions, each returning ``[layer, task, d_model]``:

* ``"paper"`` (Han et al., Sec. 4.1): the mean state at each demonstration's answer-preceding token
  (the token "after x_i", the last one before demonstration i's answer), over the demonstrations and
  prompts of a task. Needs prompts with at least one demonstration.
* ``"hendel"`` (Hendel et al. 2023, "In-context learning creates task vectors"): the last-token state
  of the prompt's demonstrations followed by a *dummy* query (another input of the same task, none of
  the prompt's own), averaged over the prompts of a task.
* ``"mean"``: the mean last-token state of the task's k-shot prompts (what TD reads).

Vectors are saved as safetensors with their provenance (model identity, layers, tasks, definition,
shots, n, seed, template) and refused when loaded against a model of another shape or name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..adapters.base import Adapter
from ..hooks import resolve_layers
from ..io import atomic_write, config_diffs, read_result_dir, write_result_dir
from ..tasks.base import Example, TaskFamily, as_rng
from ..tasks.prompts import Prompt, PromptBuilder, PromptTemplate

DEFINITIONS: tuple[str, ...] = ("paper", "hendel", "mean")
STORED_DEFINITIONS: tuple[str, ...] = (*DEFINITIONS, "function")
"""What a vectors file may hold: the task-vector definitions above and Todd et al.'s function vectors
(``"function"``, built from attention heads by :func:`taskvec_interp.probes.heads.function_vector`)."""
_FORMAT = "taskvec_interp.task_vectors/1"
KIND = "task_vectors"
"""The result kind of a task-vector directory (``result.json``)."""
FILE = "vectors.safetensors"
"""The task-vector file of such a directory (and of a patching result)."""
PROVENANCE: tuple[str, ...] = ("model.fingerprint", "definition", "component", "layers", "shots", "template")
"""What a vectors file must record to be applied to a model (:meth:`TaskVectors.check_run`)."""


def _template(t: dict | PromptTemplate | None) -> dict | None:
    """A template as the full dict of its fields (a partial dict filled with the defaults)."""
    if t is None:
        return None
    return asdict(t) if isinstance(t, PromptTemplate) else asdict(PromptTemplate(**t))


@dataclass
class TaskVectors:
    """``vectors[i, t]``: task ``tasks[t]``'s vector at layer ``layers[i]`` (``[layer, task, d_model]``)."""

    vectors: Float[Tensor, "layer task d_model"]
    layers: list[int]
    tasks: tuple[str, ...]
    definition: str
    meta: dict = field(default_factory=dict)
    """model (identity dict, with the weights' fingerprint), component, shots, n (prompts per task), seed,
    template, family."""
    source: Path | None = field(default=None, compare=False, repr=False)
    """The file these vectors were loaded from (``None``: computed in this process). A file must carry its whole
    provenance (:data:`PROVENANCE`) to be applied to a model."""

    def __post_init__(self) -> None:
        if self.vectors.ndim != 3 or self.vectors.shape[:2] != (len(self.layers), len(self.tasks)):
            raise ValueError(f"vectors must be [{len(self.layers)} layers, {len(self.tasks)} tasks, d_model], "
                             f"got {list(self.vectors.shape)}")
        if not torch.isfinite(self.vectors).all():
            raise ValueError("task vectors contain NaN or inf")
        if self.definition not in STORED_DEFINITIONS:
            raise ValueError(f"unknown task-vector definition {self.definition!r}; known: {STORED_DEFINITIONS}")

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[-1])

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"no task vectors at layer {layer}; these have layers {self.layers}")
        return self.layers.index(layer)

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; these vectors have tasks {list(self.tasks)}")
        return self.tasks.index(task)

    def get(self, layer: int, task: str) -> Float[Tensor, " d_model"]:
        """One task's vector at one layer."""
        return self.vectors[self.layer_index(layer), self.task_index(task)]

    def _what(self) -> str:
        return f"the task vectors of {self.source}" if self.source is not None else "the task vectors"

    def missing_provenance(self) -> list[str]:
        """The keys of :data:`PROVENANCE` these vectors do not record (or record as ``None``)."""
        model = self.meta.get("model") if isinstance(self.meta.get("model"), dict) else {}
        have = {"model.fingerprint": model.get("fingerprint"), "definition": self.definition, "layers": self.layers,
                "component": self.meta.get("component"), "shots": self.meta.get("shots"),
                "template": self.meta.get("template")}
        return [k for k in PROVENANCE if have[k] is None]

    def check_run(self, *, definition: str, component: str, shots: int, template: dict | PromptTemplate) -> None:
        """Refuse to apply these vectors in a run of other settings (``ValueError`` naming each differing field
        with both values): the definition, the component the vectors were read at (and are written to), the
        shot count and the template of their prompts. Vectors from a file must record all of them (and the
        model's fingerprint, :meth:`check_model`): a file missing any is refused, naming the missing keys.
        Function vectors (definition ``"function"``, built from attention heads, applied at any shot count)
        are checked for their component only."""
        missing = self.missing_provenance()
        if missing and self.source is not None:
            raise ValueError(f"{self.source} does not record {', '.join(missing)} (missing keys): task vectors "
                             "whose provenance is unknown are not applied; recompute them with this version")
        mine = {"definition": self.definition, "component": self.meta.get("component"),
                "shots": self.meta.get("shots"), "template": _template(self.meta.get("template"))}
        run = {"definition": definition, "component": component, "shots": shots, "template": _template(template)}
        keys = ["component"] if self.definition == "function" else list(mine)
        diffs = config_diffs({k: mine[k] for k in keys if mine[k] is not None},
                             {k: run[k] for k in keys if mine[k] is not None}, labels=("vectors", "run"))
        if diffs:
            raise ValueError(f"{self._what()} were computed with other settings than this run: {'; '.join(diffs)}. "
                             "Run with the vectors' settings (or recompute the vectors)")

    def check_model(self, adapter: Adapter, allow_other_model: bool = False) -> None:
        """Refuse an adapter of another shape (d_model, n_layers) or, unless allowed, another model: other
        weights (the fingerprint recorded with the vectors, never the path the model was loaded from). Vectors
        from a file that records no fingerprint are refused (naming the missing key)."""
        model = self.meta.get("model") or {}
        if self.d_model != adapter.d_model:
            raise ValueError(f"task vectors have d_model {self.d_model}, the model has {adapter.d_model}")
        if model.get("n_layers") not in (None, adapter.n_layers) or max(self.layers) >= adapter.n_layers:
            raise ValueError(f"task vectors come from a model with {model.get('n_layers')} layers (layers "
                             f"{self.layers}); this model has {adapter.n_layers}")
        if allow_other_model:
            return
        mine = adapter.identity()
        if model.get("fingerprint") is None:
            if self.source is not None:
                raise ValueError(f"{self.source} does not record model.fingerprint (missing key): the vectors cannot "
                                 "be tied to a model; pass allow_other_model=True to use them anyway")
            keys = ("model_type", "n_params")  # computed in this process by an older identity: class and size
        else:
            keys = ("fingerprint", "fingerprint_kind", "model_type", "n_params")
        diffs = config_diffs({k: model.get(k) for k in keys if model.get(k) is not None},
                             {k: mine.get(k) for k in keys if model.get(k) is not None}, labels=("vectors", "this model"))
        if diffs:
            raise ValueError(f"{self._what()} come from another model ({'; '.join(diffs)}); pass "
                             "allow_other_model=True to use them anyway")

    def save(self, path: str | Path) -> Path:
        """A result directory (kind ``"task_vectors"``, :func:`taskvec_interp.io.write_result_dir`) holding
        ``vectors.safetensors``; or, for a path ending in ``.safetensors``, that one file alone (as a patching
        result holds it). The file: the vectors plus JSON metadata, written atomically (nothing partial on
        error)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            with write_result_dir(path, KIND, self._info()) as tmp:
                self._write_file(tmp / FILE)
            return path
        if path.is_dir():
            raise ValueError(f"{path} is a directory; give a file name for the task vectors")
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, self._write_file)

    def _info(self) -> dict:
        return {"format": _FORMAT, "layers": self.layers, "tasks": list(self.tasks), "definition": self.definition,
                "meta": self.meta}

    def _write_file(self, path: Path) -> None:
        save_file({"vectors": self.vectors.contiguous().float()}, str(path),
                  metadata={"taskvec": json.dumps(self._info())})

    @classmethod
    def load(cls, path: str | Path, adapter: Adapter | None = None, allow_other_model: bool = False) -> TaskVectors:
        """Read what :meth:`save` wrote (a result directory, checked whole, or a ``.safetensors`` file); with
        ``adapter``, refuse vectors from another model."""
        path = Path(path)
        if path.is_dir():
            path = read_result_dir(path, KIND) / FILE
        if not path.is_file():
            raise ValueError(f"no task-vector file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                info = json.loads((f.metadata() or {}).get("taskvec", "{}"))
                vectors = f.get_tensor("vectors")
        except Exception as err:
            raise ValueError(f"{path} is not a readable task-vector file: {type(err).__name__}: {err}") from None
        if info.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a task-vector file written by taskvec_interp (format "
                             f"{info.get('format')!r})")
        out = cls(vectors, list(info["layers"]), tuple(info["tasks"]), info["definition"], info.get("meta", {}), path)
        if adapter is not None:
            out.check_model(adapter, allow_other_model)
        return out


def demo_positions(adapter: Adapter, prompts: Sequence[Prompt]) -> torch.Tensor:
    """``[n, shots]`` token index (in the prompt's own tokens) of each demonstration's answer-preceding token.

    The index is the last token of ``text[:answer_start]``; it is checked that those tokens are a prefix
    of the prompt's tokens (no token straddles the boundary), else ``ValueError`` names the prompt.
    """
    shots = {len(p.demo_answer_starts) for p in prompts}
    if len(shots) != 1:
        raise ValueError(f"prompts have different numbers of demonstrations {sorted(shots)}; use one shot count")
    m = shots.pop()
    if m == 0:
        raise ValueError("the 'paper' task vector reads the demonstrations' answer-preceding tokens: the prompts "
                         "have no demonstrations (shots=0)")
    tok = adapter._require_tokenizer()
    heads = [p.text[:s] for p in prompts for s in p.demo_answer_starts]
    full = tok([p.text for p in prompts], add_special_tokens=adapter.add_special_tokens)["input_ids"]
    part = tok(heads, add_special_tokens=adapter.add_special_tokens)["input_ids"]
    out = torch.empty((len(prompts), m), dtype=torch.long)
    for i, ids in enumerate(full):  # a loop over token lists to check the prefix property (no model work)
        for j in range(m):
            head = part[i * m + j]
            if list(ids[: len(head)]) != list(head):
                raise ValueError(f"prompt {i} (task {prompts[i].task!r}): the tokens before demonstration {j}'s "
                                 "answer are not a prefix of the prompt's tokens; check the template's whitespace")
            out[i, j] = len(head) - 1
    return out


def _dummy_query_prompts(prompts: Sequence[Prompt], family: TaskFamily, template: PromptTemplate,
                         seed: int) -> list[Prompt]:
    """Each prompt's demonstrations followed by a dummy query of the same task (none of its own inputs)."""
    builder = PromptBuilder(template)
    rng = as_rng(seed)
    out = []
    for p in prompts:
        task = family[p.task]
        used = {e.input for e in p.demos} | {p.query}
        if task.n_inputs < len(used) + 1:
            raise ValueError(f"task {p.task!r} has no input left for a dummy query ({task.n_inputs} inputs)")
        while True:  # rejection sampling: a few draws at most, pools are far larger than a prompt
            (cand,) = task.sample(1, rng)
            if cand.input not in used:
                break
        out.append(builder.render(Example(cand.input, cand.output), p.demos, task=p.task, label=p.label,
                                  family=p.family))
    return out


def task_vectors(
    adapter: Adapter,
    prompts: Sequence[Prompt],
    definition: str = "paper",
    layers: str | int | Sequence[int] = "all",
    *,
    family: TaskFamily | None = None,
    template: PromptTemplate | None = None,
    seed: int = 0,
    component: str = "resid_post",
    batch_size: int = 16,
    progress: bool = True,
) -> TaskVectors:
    """Task vectors ``[layer, task, d_model]`` of ``definition`` from ONE capture pass over ``prompts``.

    Tasks are those of the prompts, in label order (Null last in a family). ``"hendel"`` needs the
    ``family`` (to draw dummy queries with ``seed``) and the prompts' ``template``.
    """
    if definition not in DEFINITIONS:
        raise ValueError(f"unknown task-vector definition {definition!r}; known: {DEFINITIONS}")
    if len(prompts) == 0:
        raise ValueError("no prompts to read task vectors from")
    layer_list = resolve_layers(layers, adapter.n_layers)
    by_label: dict[int, str] = {}
    for p in prompts:
        if by_label.setdefault(p.label, p.task) != p.task:
            raise ValueError(f"label {p.label} names two tasks ({by_label[p.label]!r}, {p.task!r})")
    tasks = tuple(by_label[k] for k in sorted(by_label))
    if family is not None:
        missing = [t for t in family.task_names if t not in tasks]
        if missing:
            raise ValueError(f"tasks {missing} of family {family.name!r} have no prompts")
    texts: Sequence[Prompt] = prompts
    if definition == "paper":
        position: object = demo_positions(adapter, prompts)
    else:
        position = -1
        if definition == "hendel":
            if family is None:
                raise ValueError("the 'hendel' definition needs family= (dummy queries are drawn from the task)")
            texts = _dummy_query_prompts(prompts, family, template or PromptTemplate(), seed)
    acts = adapter.capture([p.text for p in texts], layers=layer_list, position=position, component=component,
                           batch_size=batch_size, progress=progress)
    if acts.ndim == 4:
        acts = acts.mean(2)  # over demonstrations
    onehot = torch.zeros((len(tasks), len(prompts)), dtype=acts.dtype)
    onehot[[tasks.index(p.task) for p in prompts], torch.arange(len(prompts))] = 1.0
    counts = onehot.sum(1)
    vectors = torch.einsum("tn,lnd->ltd", onehot / counts[:, None], acts)
    shots = sorted({p.n_shots for p in prompts})
    meta = {"model": adapter.identity(), "component": component, "shots": shots[0] if len(shots) == 1 else shots,
            "n": {t: int(c) for t, c in zip(tasks, counts.tolist(), strict=True)}, "seed": seed,
            "template": asdict(template) if template is not None else None,
            "family": prompts[0].family}
    return TaskVectors(vectors, layer_list, tasks, definition, meta)


VECTORS_SUFFIX = "_vectors.safetensors"
"""File-name suffix of a named vector set in a result directory (``per_task_vectors.safetensors``)."""


def save_named_vectors(directory: str | Path, vectors: dict[str, TaskVectors]) -> None:
    """One ``{name}_vectors.safetensors`` per vector set in ``directory`` (each loadable by ``taskvec patch
    --vectors-file``)."""
    for name, vec in vectors.items():
        vec.save(Path(directory) / f"{name}{VECTORS_SUFFIX}")


def load_named_vectors(directory: str | Path) -> dict[str, TaskVectors]:
    """The vector sets :func:`save_named_vectors` wrote in ``directory``, by name (sorted)."""
    return {p.name.removesuffix(VECTORS_SUFFIX): TaskVectors.load(p)
            for p in sorted(Path(directory).glob(f"*{VECTORS_SUFFIX}"))}


__all__ = ["DEFINITIONS", "PROVENANCE", "VECTORS_SUFFIX", "TaskVectors", "demo_positions", "load_named_vectors",
           "save_named_vectors", "task_vectors"]


# ------------------------------------------------------------------------------------------------
# Per-query vectors (Hendel et al.'s published method): each query its own vector
# ------------------------------------------------------------------------------------------------
def dummy_query_prompts(prompts: Sequence[Prompt], family: TaskFamily, template: PromptTemplate | None = None,
                        n_dummy: int = 2, seed: int = 0) -> list[Prompt]:
    """``n_dummy`` prompts per prompt (query-major: prompt ``i``'s dummies are rows ``i * n_dummy ...``): the prompt's
    OWN demonstrations followed by a dummy query, another input of the same task, distinct from the prompt's query,
    from its demonstrations and from the prompt's other dummies. Drawn from one generator per task keyed by
    ``(seed, task)``, so a task's dummies do not depend on the other tasks. Model-free."""
    from ..tasks.base import base_entropy, check_count, keyed_rng

    n_dummy = check_count("n_dummy", n_dummy, 1)
    builder = PromptBuilder(template or PromptTemplate())
    base = base_entropy(seed)
    rngs: dict[str, object] = {}
    out: list[Prompt] = []
    for p in prompts:  # one draw per prompt (no model work): the task's pool is sampled without replacement
        task = family[p.task]
        used = {e.input for e in p.demos} | {p.query}
        if task.n_inputs < len(used) + n_dummy:
            raise ValueError(f"task {p.task!r} has {task.n_inputs} inputs: a query, its {len(p.demos)} demonstrations "
                             f"and {n_dummy} dummy queries need {len(used) + n_dummy} distinct inputs; lower shots or "
                             "n_dummy")
        rng = rngs.setdefault(p.task, keyed_rng(base, "dummy", p.task))
        cands = [c for c in task.sample(len(used) + n_dummy, rng) if c.input not in used][:n_dummy]
        out += [builder.render(Example(c.input, c.output), p.demos, task=p.task, label=p.label, family=p.family)
                for c in cands]
    return out


def per_query_vectors(
    adapter: Adapter,
    prompts: Sequence[Prompt],
    family: TaskFamily | None = None,
    *,
    n_dummy: int = 2,
    dummies: Sequence[Prompt] | None = None,
    layers: str | int | Sequence[int] = "all",
    template: PromptTemplate | None = None,
    seed: int = 0,
    component: str = "resid_post",
    batch_size: int = 16,
    progress: bool = True,
) -> Float[Tensor, "layer prompt d_model"]:
    """Hendel et al.'s task vector of EACH prompt, ``[layer, prompt, d_model]`` (layers as :func:`resolve_layers`
    gives them): the last-token state of the prompt's own demonstrations followed by each of ``n_dummy`` dummy
    queries (:func:`dummy_query_prompts`), averaged over the dummies, at every layer, from ONE capture pass.
    ``dummies``: the dummy prompts already drawn (``n_dummy`` per prompt, query-major); else they are drawn from
    ``family`` with ``seed``. (The per-task ``"hendel"`` definition of :func:`task_vectors` is the mean of such
    states over a task's prompts, with one dummy each.)"""
    if len(prompts) == 0:
        raise ValueError("no prompts to read per-query vectors from")
    if dummies is None:
        if family is None:
            raise ValueError("per_query_vectors needs family= (dummy queries are drawn from the task) or dummies=")
        dummies = dummy_query_prompts(prompts, family, template, n_dummy, seed)
    if len(dummies) != len(prompts) * n_dummy:
        raise ValueError(f"{len(dummies)} dummy prompts for {len(prompts)} prompts x n_dummy={n_dummy}")
    layer_list = resolve_layers(layers, adapter.n_layers)
    acts = adapter.capture([p.text for p in dummies], layers=layer_list, position=-1, component=component,
                           batch_size=batch_size, progress=progress)
    acts = acts.tensor if hasattr(acts, "tensor") else acts
    return acts.reshape(len(layer_list), len(prompts), n_dummy, -1).mean(2)


__all__ += ["dummy_query_prompts", "per_query_vectors"]
