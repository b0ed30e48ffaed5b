"""Coupled emergence of task encoding and decoding over training (paper Fig. 2, 7, 11).

Every checkpoint runs through the plain-torch adapter (the synthetic model's blocks are hooked like a
language model's), so TD, UMAP and patching reuse the same hook functions as for language models:

* **TD per layer**: leave-one-out k-NN of the basis label from the residual stream at the y token of
  the last demonstration (position ``-1``), ``n_per_basis`` test sequences per basis (paper: 100).
* **Per-basis test MSE** from the run's metrics (every ``eval_every`` steps).
* **Patching**: replace (or add) the layer-``l`` residual of a source-basis input with the mean
  activation of a target basis, at every token before the final query ``x_K`` (``"context"``, the
  default: the paper's "input", read as the demonstrations, since overwriting ``x_K`` itself would
  destroy the prediction whatever the target) or at one token (e.g. ``-3``, the y token of demonstration
  ``K - 1``, the last one the query reads); each token gets the target basis' mean at that token. The
  result is the test MSE of the last prediction (read out at ``x_K``) for each (source basis, target
  basis) pair. In the 8-layer ``small`` model a one-token patch leaves the loss unchanged whatever the
  target (docs/synthetic.md); the query reads every demonstration.
* **Summary**: per basis, the step where its loss drops (first eval whose median-smoothed MSE falls
  below the midpoint between its initial and final MSE, if it falls by half at least) and the step
  where its TD rises (first checkpoint whose per-basis TD at ``td_layer`` passes the midpoint between
  its first and last value, if it rises by 0.25 at least), the step where its loss first goes below the
  error of ridge on all coordinates (``below_ridge_step``: from there on the model must be using the
  basis; the first loss drop is basis-agnostic regression, common to all bases), and the share of the
  sparsity gap its final MSE closes (``gap_closed``: 0 at the error of ridge on all coordinates, the
  best predictor that ignores the basis; 1 at the rank-r oracle, which knows it; ``None`` where the data
  has no such oracles, as the mixture of regression families).
* **Groups**: where the bases come in groups (:func:`basis_groups`: the overlapping layout's partitions),
  TD of the group label at every layer (table ``td_group``, same k-NN) and, in the summary,
  ``td_group_first`` / ``td_group_last`` at ``td_layer``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import hooks as H
from ..config import opt
from ..engine import Checkpoint, run_checkpoints, run_checkpoints_of, run_conditions
from ..experiments.trajectory import TrajectoryError, TrajectoryResult, trajectory_result
from ..interventions import get_intervention, intervention_names
from ..io import locks_out
from ..probes.decodability import task_decodability
from ..validate import (
    check_bool,
    check_choice,
    check_int,
    check_ints,
    check_knn_k,
    check_n_boot,
    check_number,
    check_optional_int,
    check_seed,
)
from .data import MSLRBatch, MSLRConfig, make_test_set, oracle_summary
from .heads import ABLATION_MODES
from .inputs import basis_names, model_inputs, synthetic_adapter
from .model import SyntheticRegressor
from .train import list_checkpoints, load_checkpoint, load_run_config, read_metrics

TD_POSITION = -1  # y token of the last demonstration
QUERY_POSITION = -2  # x_K: its read-out predicts y_K
PATCH_POSITION = "context"  # every token before the query x_K (demonstrations 1..K-1)
SYNTHETIC_TEST_SEED = 4321
"""Seed of the test sequences every analysis of a synthetic run reads (``synthetic analyze``, ``trajectory
--synthetic-run`` at ``--seed 0``, the demo): not the training test set's."""
ANALYSIS_KIND = "analysis"  # the result kind an analysis directory is marked with (result.json)


def _vector_interventions() -> tuple[str, ...]:
    """The interventions the patching matrix can apply: those that take a vector (a target basis' mean)."""
    return tuple(n for n in intervention_names() if get_intervention(n).needs_vector)


def basis_groups(data_cfg: object) -> list[int] | None:
    """The group index of each basis, or ``None`` where the bases form no groups.

    Overlapping MSLR bases come in groups of ``n_dims // rank`` (each group a partition of the
    coordinates): basis ``b`` is in group ``b // (n_dims // rank)``. Disjoint bases and regression
    families: ``None``.
    """
    if isinstance(data_cfg, MSLRConfig) and data_cfg.layout == "overlapping":
        per_group = data_cfg.n_dims // data_cfg.rank
        return [b // per_group for b in range(data_cfg.n_bases)]
    return None


@dataclass
class AnalysisConfig:
    """What decides a synthetic run's analysis (saved as analysis_config.json next to its tables)."""

    n_per_basis: int = opt(100, "test sequences per basis (paper: 100)")
    k: int = opt(10, "neighbours of the leave-one-out k-NN behind task decodability (at most n_per_basis - 2)")
    seed: int = opt(SYNTHETIC_TEST_SEED, "seed of the analysis' test sequences (not the training test set)")
    td_layer: int | None = opt(None, "layer of the loss/TD figure and summary (default: the middle, n_layers // 2)")
    checkpoints: tuple[int, ...] | None = opt(None, "steps to analyse, comma-separated (default: all)")
    umap_layers: tuple[int, ...] | None = opt(None, "layers of the UMAP grid, comma-separated (default: up to 6 "
                                                    "evenly spaced)")
    umap_checkpoints: int = opt(5, "checkpoints of the UMAP grid (evenly spaced)")
    patch_layer: int | None = opt(None, "layer of the patching matrix (default: td_layer, at most n_layers - 2)")
    patch_position: int | str = opt(PATCH_POSITION, "'context' (every token before the query x_K) or one token's "
                                                    "negative index, e.g. -3")
    patch_checkpoints: tuple[int, ...] | None = opt(None, "steps of the patching matrix, comma-separated (default: "
                                                          "the middle and the last checkpoint)")
    patch_mode: str = opt("replace", "intervention of the patching matrix", choices=_vector_interventions)
    n_boot: int = opt(200, "bootstrap resamples of the TD confidence intervals (0: none, CIs are NaN)")
    batch_size: int = opt(256, "test sequences per forward pass")
    heads: bool = opt(True, "head ablation at the last checkpoint (GPT-2 backbone; Mamba-2 has no heads)")
    head_mode: str = opt("mean", "head ablation: mean or zero", choices=ABLATION_MODES)
    head_threshold: float = opt(0.05, "basis-specific heads: MSE rise >= this for the basis ...")
    head_ratio: float = opt(3.0, "... and >= this times the other bases' median rise")

    def __post_init__(self) -> None:
        check_int("AnalysisConfig.n_per_basis", self.n_per_basis, 1)
        check_knn_k("AnalysisConfig.k", self.k, self.n_per_basis, "n_per_basis")
        check_seed("AnalysisConfig.seed", self.seed)
        check_optional_int("AnalysisConfig.td_layer", self.td_layer, 0)
        for name in ("checkpoints", "umap_layers", "patch_checkpoints"):
            if getattr(self, name) is not None:
                setattr(self, name, check_ints(f"AnalysisConfig.{name}", getattr(self, name), 0,
                                               allow_empty=name == "patch_checkpoints"))
        check_int("AnalysisConfig.umap_checkpoints", self.umap_checkpoints, 0)
        check_optional_int("AnalysisConfig.patch_layer", self.patch_layer, 0)
        if self.patch_position != PATCH_POSITION and (isinstance(self.patch_position, bool) or not isinstance(
                self.patch_position, int) or self.patch_position > QUERY_POSITION):
            raise ValueError(f"AnalysisConfig.patch_position must be {PATCH_POSITION!r} or an int <= {QUERY_POSITION} "
                             f"(a token before the query x_K), got {self.patch_position!r}")
        check_choice("AnalysisConfig.patch_mode", self.patch_mode, _vector_interventions())
        check_n_boot("AnalysisConfig.n_boot", self.n_boot)
        check_int("AnalysisConfig.batch_size", self.batch_size, 1)
        check_bool("AnalysisConfig.heads", self.heads)
        check_choice("AnalysisConfig.head_mode", self.head_mode, ABLATION_MODES)
        check_number("AnalysisConfig.head_threshold", self.head_threshold, 0.0)
        check_number("AnalysisConfig.head_ratio", self.head_ratio, 0.0)


@dataclass
class AnalysisResult:
    """What :func:`analyze_run` returns; ``save(dir)`` / ``load(dir)`` write and read it whole."""

    config: AnalysisConfig
    td: pd.DataFrame  # step, layer, level, task, td, ...
    loss: pd.DataFrame  # step, basis, mse
    patching: pd.DataFrame  # step, layer, mode, source, target, mse
    summary: dict
    embeddings: dict = field(default_factory=dict)  # (layer, step) -> ([n, 2], labels)
    td_group: pd.DataFrame | None = None  # TD of the group label (basis_groups), as ``td``; None: no groups
    heads: pd.DataFrame | None = None  # head ablation at the last checkpoint (synthetic.heads); None: not run

    def save(self, out: str | Path) -> Path:
        """Write the tables (UMAP embeddings as ``embeddings.parquet``: step, layer, point, x, y, label), config
        and summary as one result directory (:func:`taskvec_interp.io.write_result_dir`, kind ``"analysis"``):
        an older analysis in ``out`` is replaced whole; anything else there is refused."""
        from ..io import write_result_dir

        config = json.loads(json.dumps(asdict(self.config), default=list))
        with write_result_dir(out, ANALYSIS_KIND, config) as tmp:
            (tmp / "analysis_config.json").write_text(json.dumps(config, indent=2))
            self.td.to_parquet(tmp / "td.parquet", index=False)
            self.loss.to_parquet(tmp / "loss.parquet", index=False)
            self.patching.to_parquet(tmp / "patching.parquet", index=False)
            if self.td_group is not None:
                self.td_group.to_parquet(tmp / "td_group.parquet", index=False)
            if self.heads is not None:
                self.heads.to_parquet(tmp / "heads.parquet", index=False)
            if self.embeddings:
                frames = [embedding_frame(np.asarray(emb), np.asarray(labels), layer).assign(step=step)
                          for (layer, step), (emb, labels) in self.embeddings.items()]
                pd.concat(frames, ignore_index=True).to_parquet(tmp / "embeddings.parquet", index=False)
            (tmp / "summary.json").write_text(json.dumps(self.summary, indent=2))
        return Path(out)

    @classmethod
    def load(cls, directory: str | Path) -> AnalysisResult:
        """Read back what :meth:`save` wrote; ``ValueError`` naming the file when the directory is not a
        complete, intact analysis result."""
        from ..io import manifest_files, read_result_dir
        from ..results import read_json, read_parquet

        d = read_result_dir(directory, ANALYSIS_KIND)
        files = set(manifest_files(d))

        def table(name: str) -> pd.DataFrame | None:
            return read_parquet(d / f"{name}.parquet") if f"{name}.parquet" in files else None

        embeddings = table("embeddings")
        from ..config import upgrade_config

        config = AnalysisConfig(**upgrade_config(AnalysisConfig, read_json(d / "analysis_config.json")))
        return cls(config, table("td"), table("loss"),
                   table("patching"), read_json(d / "summary.json"),
                   {} if embeddings is None else embeddings_of(embeddings), table("td_group"), table("heads"))


def capture_checkpoint(model: SyntheticRegressor, test: MSLRBatch, position: int = TD_POSITION,
                       layers: str | Sequence[int] = "all", batch_size: int = 256) -> torch.Tensor:
    """Residuals ``[layer, n, d_model]`` at ``position`` for every layer in one pass per batch."""
    return synthetic_adapter(model).capture(model_inputs(test), layers=layers, position=position,
                                            batch_size=batch_size, progress=False)


def patch_positions(position: int | str, n_points: int) -> list[int]:
    """Token positions (negative, from the end) that a patch at ``position`` covers.

    An int is one token; it must come before the last x token (``-2``), whose read-out is scored.
    ``"context"`` is every token before that query: the ``2K - 2`` tokens of demonstrations ``1..K-1``.
    """
    n_tokens = 2 * n_points
    if isinstance(position, str):
        if position != "context":
            raise ValueError(f"patch position must be an int or 'context', got {position!r}")
        return list(range(-n_tokens, QUERY_POSITION))
    if isinstance(position, bool) or not -n_tokens <= position <= QUERY_POSITION:
        raise ValueError(f"patch position {position} must be in [{-n_tokens}, {QUERY_POSITION}] (the scored "
                         f"prediction is read out at the last x token, position {QUERY_POSITION}) or 'context'")
    return [position]


def patch_matrix(model: SyntheticRegressor, test: MSLRBatch, layer: int, n_bases: int, mode: str = "replace",
                 position: int | str = PATCH_POSITION) -> pd.DataFrame:
    """Test MSE of the last prediction for every (source, target) basis pair, plus ``target="none"``.

    The residual after block ``layer`` at token ``position`` of each source-basis sequence is replaced by
    (``mode="replace"``) or added to (``mode="add"``) the mean activation of the target basis there (any
    intervention of ``interventions.py`` that takes a vector).
    ``position`` is one token before the last x token (``-2``), whose read-out is scored, or
    ``"context"``: every token before it, each patched with the target basis' mean at that token.
    """
    spec = get_intervention(mode)
    if not spec.needs_vector:
        raise ValueError(f"patch mode {mode!r} takes no vector; the patching matrix patches a target basis' mean: "
                         f"use one of {tuple(n for n in intervention_names() if get_intervention(n).needs_vector)}")
    positions = patch_positions(position, test.xs.shape[1])
    if positions != [QUERY_POSITION] and not 0 <= layer < model.n_layers - 1:
        raise ValueError(f"patch layer {layer}: patching token(s) {position} after block {layer} needs a later "
                         f"block to carry the patch to the query; use a layer in [0, {model.n_layers - 2}]")
    adapter = synthetic_adapter(model)
    inputs = model_inputs(test)
    labels = test.basis
    # one unpatched pass gives both the "none" predictions and the residual stream at every token
    store: dict = {}
    plain = adapter.forward(inputs, hooks=[(H.Site(layer), H.capture(store, "resid", None))], logits="all")
    cols = [store["resid"].shape[1] + p for p in positions]
    # [position, basis, d_model]: the target means at every patched token
    means = torch.stack([store["resid"][labels == b][:, cols].mean(0) for b in range(n_bases)], dim=1)
    names = basis_names(n_bases)

    def evaluate(chunk: list[dict]) -> list[pd.DataFrame]:
        frames = []
        for cond in chunk:
            t = cond["target_index"]
            hooks = [(H.Site(layer), spec.build(means[i, t - 1], p, 1.0)) for i, p in enumerate(positions)]
            preds = plain if t == 0 else adapter.forward(inputs, hooks=hooks, logits="all")
            err = (preds[:, -1].float() - test.ys[:, -1]) ** 2
            frames.append(pd.DataFrame({"source": names, "mse": [float(err[labels == b].mean())
                                                                 for b in range(n_bases)]}))
        return frames

    conditions = [{"layer": layer, "mode": mode, "position": str(position), "target": target, "target_index": t}
                  for t, target in enumerate(["none", *names])]
    table = run_conditions(conditions, evaluate, progress=False)
    return table[["layer", "mode", "position", "source", "target", "mse"]]


def load_synthetic(entry: Checkpoint) -> SyntheticRegressor:
    """The loader of :func:`~taskvec_interp.experiments.trajectory.run_checkpoints` for a run's checkpoints."""
    return load_checkpoint(entry.location)


def embedding_frame(embedding: np.ndarray, labels: np.ndarray, layer: int) -> pd.DataFrame:
    """A UMAP embedding ``[n, 2]`` of one layer as a tidy table: layer, point, x, y, label."""
    return pd.DataFrame({"layer": layer, "point": np.arange(len(labels)), "x": embedding[:, 0],
                         "y": embedding[:, 1], "label": labels})


def embeddings_of(table: pd.DataFrame) -> dict:
    """``(layer, step) -> (embedding [n, 2], labels [n])`` from the tables :func:`embedding_frame` made."""
    if table.empty:
        return {}
    return {(int(layer), int(step)): (part[["x", "y"]].to_numpy(), part["label"].to_numpy())
            for (step, layer), part in table.groupby(["step", "layer"], sort=False)}


def _pick(seq: Sequence[int], n: int) -> list[int]:
    if len(seq) <= n:
        return list(seq)
    idx = np.unique(np.linspace(0, len(seq) - 1, n).round().astype(int))
    return [seq[i] for i in idx]


def _smooth(values: Sequence[float]) -> np.ndarray:
    """Centred 3-point running median: one noisy evaluation neither makes nor hides a crossing."""
    return pd.Series(np.asarray(values, dtype=float)).rolling(3, center=True, min_periods=1).median().to_numpy()


def _midpoint_step(steps: Sequence[int], values: Sequence[float], falling: bool, min_change: float) -> int | None:
    """First step where ``values`` (median-smoothed over 3 points) crosses the midpoint between its
    first and last value; ``None`` when it changes by less than ``min_change`` (no drop / rise).

    For a falling loss ``min_change`` is relative (0.5: the final MSE is at most half the first);
    for a rising TD it is absolute.
    """
    v = _smooth(values)
    if len(v) < 2 or not np.isfinite(v).all():
        return None
    change = (v[0] - v[-1]) / abs(v[0]) if falling else v[-1] - v[0]
    if change < min_change:
        return None
    mid = (v[0] + v[-1]) / 2
    hit = np.nonzero(v <= mid if falling else v >= mid)[0]
    return int(steps[hit[0]])


def _first_below(steps: Sequence[int], values: Sequence[float], threshold: float) -> int | None:
    """First step where ``values`` (median-smoothed, ``_smooth``) is below ``threshold``; ``None`` if never."""
    v = _smooth(values)
    hit = np.nonzero(v < threshold)[0]
    return int(steps[hit[0]]) if len(hit) else None


def analyze_run(run_dir: str | Path, config: AnalysisConfig | None = None, umap: bool = True,
                progress: bool = True) -> AnalysisResult:
    """TD per layer and checkpoint, per-basis loss, UMAP embeddings, patching matrices and the summary."""
    config = config or AnalysisConfig()
    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir)
    if not ckpts or not (run_dir / "config.json").exists():
        raise ValueError(f"no checkpoints in {run_dir}: train first (taskvec synthetic train)")
    cfg = load_run_config(run_dir)
    entries = run_checkpoints_of(run_dir, config.checkpoints)
    n_layers, n_bases = cfg.model.n_layer, cfg.data.n_bases
    td_layer = n_layers // 2 if config.td_layer is None else config.td_layer
    # default: the TD layer, or the last block that still has a block after it to carry the patch on
    patch_layer = min(td_layer, max(n_layers - 2, 0)) if config.patch_layer is None else config.patch_layer
    for name, layer in (("td_layer", td_layer), ("patch_layer", patch_layer)):
        if not 0 <= layer < n_layers:
            raise ValueError(f"{name} {layer} out of range for a model with {n_layers} layers")
    test = make_test_set(cfg.data, n_per_basis=config.n_per_basis, seed=config.seed)
    names = basis_names(n_bases)
    steps = [e.step for e in entries]
    umap_steps = set(_pick(steps, config.umap_checkpoints)) if umap else set()
    umap_layers = list(config.umap_layers) if config.umap_layers is not None else _pick(list(range(n_layers)), 6)
    patch_steps = set(config.patch_checkpoints) if config.patch_checkpoints is not None else {steps[len(steps) // 2],
                                                                                             steps[-1]}
    run_heads = config.heads and cfg.model.backbone == "gpt2"
    groups = basis_groups(cfg.data)
    group_labels = None if groups is None else torch.tensor(groups)[test.basis]
    group_names = None if groups is None else [f"G{g + 1}" for g in range(max(groups) + 1)]

    def probe(model: SyntheticRegressor, entry: Checkpoint) -> dict[str, pd.DataFrame]:
        acts = capture_checkpoint(model, test, batch_size=config.batch_size)
        td = task_decodability(acts, test.basis, k=config.k, label_names=names, n_boot=config.n_boot,
                               seed=config.seed)
        tables = {"td": td.to_frame()}
        if group_labels is not None:  # TD of the group label, same probe
            tables["td_group"] = task_decodability(acts, group_labels, k=config.k, label_names=group_names,
                                                   n_boot=config.n_boot, seed=config.seed).to_frame()
        if entry.step in umap_steps:
            from ..probes.embedding import umap_embedding

            tables["embeddings"] = pd.concat([embedding_frame(umap_embedding(acts[layer], seed=config.seed),
                                                              test.basis.numpy(), layer) for layer in umap_layers],
                                             ignore_index=True)
        if entry.step in patch_steps:
            tables["patching"] = patch_matrix(model, test, patch_layer, n_bases, config.patch_mode,
                                              config.patch_position)
        if run_heads and entry.step == steps[-1]:
            from .heads import head_ablation

            tables["heads"] = head_ablation(model, test, n_bases, mode=config.head_mode)
        return tables

    t0 = time.perf_counter()
    run = run_checkpoints(entries, probe, load_synthetic, on_error="raise", progress=progress)
    embeddings = embeddings_of(run.table("embeddings"))
    td_all, patching = run.table("td"), run.table("patching")
    loss = pd.DataFrame([{"step": r["step"], "basis": names[b], "mse": r[f"test_mse_b{b}"]}
                         for r in read_metrics(run_dir) if "test_mse_b0" in r for b in range(n_bases)])
    summary = emergence_summary(td_all, loss, names, td_layer)
    summary["oracles"] = oracle_summary(cfg.data, make_test_set(cfg.data, cfg.n_test_per_basis, cfg.test_seed))
    if hasattr(cfg.data, "families"):
        summary["families"] = dict(zip(names, cfg.data.families, strict=True))
    for i, name in enumerate(names):  # share of the sparsity gap closed: 0 = basis-agnostic ridge, 1 = rank-r oracle
        b = summary["bases"][name]
        agnostic = summary["oracles"].get("full_ridge", {}).get(f"b{i}")
        rank_r = summary["oracles"].get("basis_ridge", {}).get(f"b{i}")  # none for a family mixture
        b["gap_closed"] = (None if None in (b["final_mse"], agnostic, rank_r) or agnostic == rank_r
                           else (agnostic - b["final_mse"]) / (agnostic - rank_r))
        # the basis-specific drop: below the error of every predictor that ignores the basis
        lb = loss[loss["basis"] == name].sort_values("step")
        b["below_ridge_step"] = (None if agnostic is None
                                 else _first_below(lb["step"].tolist(), lb["mse"].tolist(), agnostic))
    td_group = None if groups is None else run.table("td_group")
    if groups is not None:
        tg = td_group[(td_group["layer"] == td_layer) & (td_group["level"] == "overall")].sort_values("step")
        summary["groups"] = groups
        summary["td_group_first"], summary["td_group_last"] = float(tg["td"].iloc[0]), float(tg["td"].iloc[-1])
        summary["group_chance"] = float(tg["chance"].iloc[0])
    heads = run.table("heads") if run_heads else None
    if heads is not None:
        from .heads import basis_specific_heads

        summary["head_ablation"] = {"step": steps[-1], "mode": config.head_mode, "threshold": config.head_threshold,
                                    "ratio": config.head_ratio}
        summary["basis_specific_heads"] = basis_specific_heads(heads, config.head_threshold, config.head_ratio)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return AnalysisResult(config, td_all, loss, patching, summary, embeddings, td_group, heads)


def emergence_summary(td: pd.DataFrame, loss: pd.DataFrame, names: Sequence[str], td_layer: int,
                      min_loss_drop: float = 0.5, min_td_rise: float = 0.25) -> dict:
    """Per basis: loss-drop step, TD-rise step at ``td_layer``, first/final MSE; overall TD first/last.

    A basis whose MSE falls by less than ``min_loss_drop`` (relative) has no drop step (``None``);
    one whose TD rises by less than ``min_td_rise`` has no rise step.
    """
    out: dict = {"td_layer": td_layer, "bases": {}, "min_loss_drop": min_loss_drop, "min_td_rise": min_td_rise}
    at = td[(td["layer"] == td_layer)]
    for name in names:
        lb = loss[loss["basis"] == name].sort_values("step")
        tb = at[(at["level"] == "task") & (at["task"] == name)].sort_values("step")
        out["bases"][name] = {
            "loss_drop_step": (_midpoint_step(lb["step"].tolist(), lb["mse"].tolist(), True, min_loss_drop)
                               if len(lb) else None),
            "td_rise_step": _midpoint_step(tb["step"].tolist(), tb["td"].tolist(), False, min_td_rise),
            "first_mse": float(lb["mse"].iloc[0]) if len(lb) else None,
            "final_mse": float(lb["mse"].iloc[-1]) if len(lb) else None,
            "final_td": float(tb["td"].iloc[-1]),
        }
    overall = at[at["level"] == "overall"].sort_values("step")
    out["td_first"], out["td_last"] = float(overall["td"].iloc[0]), float(overall["td"].iloc[-1])
    out["chance"] = float(overall["chance"].iloc[0])
    return out


@locks_out("out")  # one process at a time writes its per_step/ and result
def synthetic_trajectory(run_dir: str | Path, n_per_basis: int = 100, k: int = 10, seed: int = SYNTHETIC_TEST_SEED,
                         n_boot: int = 200, batch_size: int = 256, steps: Sequence[int] | None = None,
                         out: str | Path | None = None, on_error: str = "record",
                         progress: bool = True) -> TrajectoryResult:
    """The trajectory of a synthetic run: per-basis TD at every layer (as :func:`analyze_run`) and the
    per-basis test MSE of the last prediction (the synthetic model's outcome instead of ICL accuracy),
    over its checkpoints (``steps``: only these), with the resume and bad-entry handling of
    :func:`~taskvec_interp.experiments.trajectory.run_checkpoints`.

    ``shots`` in the tables is ``K``, the number of in-context examples.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise ValueError(f"no run in {run_dir}: train first (taskvec synthetic train)")
    cfg = load_run_config(run_dir)
    entries = run_checkpoints_of(run_dir, steps)
    n_bases, n_points = cfg.data.n_bases, cfg.data.n_points
    check_int("n_per_basis", n_per_basis, 1)
    check_knn_k("k", k, n_per_basis, "n_per_basis")
    check_n_boot("n_boot", n_boot)
    check_seed("seed", seed)
    test = make_test_set(cfg.data, n_per_basis=n_per_basis, seed=seed)
    names = basis_names(n_bases)

    def probe(model: SyntheticRegressor, entry: Checkpoint) -> dict[str, pd.DataFrame]:
        acts = capture_checkpoint(model, test, batch_size=batch_size)
        td = task_decodability(acts, test.basis, k=k, label_names=names, n_boot=n_boot, seed=seed)
        with torch.no_grad():
            preds = torch.cat([model(test.xs[i:i + batch_size], test.ys[i:i + batch_size])[:, -1]
                               for i in range(0, len(test.basis), batch_size)])
        err = (preds.float() - test.ys[:, -1]) ** 2
        mse = pd.DataFrame({"task": names, "shots": n_points, "n": n_per_basis,
                            "mse": [float(err[test.basis == b].mean()) for b in range(n_bases)]})
        return {"td": td.to_frame().assign(shots=n_points), "mse": mse}

    record = {"probe": "synthetic_td_mse", "run": str(run_dir), "n_per_basis": n_per_basis, "k": k, "seed": seed,
              "n_boot": n_boot, "td_position": TD_POSITION, "n_layers": cfg.model.n_layer, "n_bases": n_bases,
              "n_points": n_points}
    if out is not None:  # before any checkpoint loads: a directory of someone else's is refused
        from ..experiments.trajectory import KEEP, KIND
        from ..io import check_result_owner

        check_result_owner(out, KIND, KEEP)
    run = run_checkpoints(entries, probe, load_synthetic, config=record, out=out, on_error=on_error,
                          progress=progress)
    if not run.tables:
        raise TrajectoryError(TrajectoryResult(record, {}, run.failed, run.entries, run.models, run.seconds, "mse"))
    result = trajectory_result(run, record, outcome_table="mse", column="mse", outcome="mse")
    if out is not None:
        result.save(out)
    return result


def seed_runs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The ``(seed, run directory)`` pairs that :func:`~taskvec_interp.synthetic.train.train_seeds` wrote."""
    out = []
    for p in Path(run_dir).glob("seed_*"):
        tail = p.name[len("seed_"):]
        if p.is_symlink():  # a seed's run is read from inside run_dir only
            raise ValueError(f"{p} is a symbolic link (to {str(p.readlink())!r}): a seeds directory holds its own runs; "
                             "refused, not followed")
        if p.is_dir() and tail.isascii() and tail.isdigit() and (p / "config.json").exists():
            out.append((int(tail), p))
    if not out:
        raise ValueError(f"no seed runs (seed_<n>/ with a config.json) in {run_dir}: train with train_seeds "
                         "(taskvec synthetic train --seeds ...)")
    return sorted(out)


SEED_FIELDS = frozenset({"seed", "device", "compile", "compile_mode"})
"""What the seeds analysed together may differ in: the seed, and where and how they ran (not their numbers)."""


def check_seed_configs(runs: Sequence[tuple[int, Path]]) -> None:
    """Refuse (``ValueError``) seed runs whose training configs differ beyond :data:`SEED_FIELDS` (a GPT-2 seed
    and a Mamba-2 one, 20 and 30 steps): the message names each differing field with both seeds' values."""
    from ..io import config_diffs

    configs = []
    for seed, path in runs:
        try:
            configs.append((seed, load_run_config(path).to_dict()))
        except (TypeError, ValueError, OSError) as err:
            raise ValueError(f"{path / 'config.json'} is not a readable training config ({err})") from None
    for seed, cfg in configs[1:]:
        first, want = configs[0]
        diffs = config_diffs(want, cfg, SEED_FIELDS, labels=(f"seed_{first}", f"seed_{seed}"))
        if diffs:
            raise ValueError(f"the seeds in {Path(runs[0][1]).parent} were not trained with one config: "
                             f"{'; '.join(diffs)}; a spread over seeds pools runs that differ only in their seed: "
                             "analyse them one by one (synthetic analyze RUN/seed_<n>)")


def seeds_table(results: dict[int, AnalysisResult]) -> pd.DataFrame:
    """One row per (seed, basis): TD at the middle layer (first / last checkpoint, per basis), final MSE,
    share of the sparsity gap closed and the loss-drop / below-ridge / TD-rise steps; tidy, for ``groupby``."""
    rows = []
    for seed, res in sorted(results.items()):
        s = res.summary
        for basis, b in s["bases"].items():
            rows.append({"seed": seed, "basis": basis, "td_layer": s["td_layer"], "td_middle_first": s["td_first"],
                         "td_middle_last": s["td_last"], "td_basis_last": b["final_td"],
                         "final_mse": b["final_mse"], "gap_closed": b.get("gap_closed"),
                         "loss_drop_step": b["loss_drop_step"], "below_ridge_step": b.get("below_ridge_step"),
                         "td_rise_step": b["td_rise_step"]})
    return pd.DataFrame(rows)


def seeds_spread(table: pd.DataFrame) -> dict:
    """Mean, std (ddof 1), min and max over seeds of the run-level and per-basis numbers of :func:`seeds_table`."""
    def stats(v: pd.Series) -> dict | None:
        v = pd.to_numeric(v, errors="coerce").dropna()
        if v.empty:
            return None
        return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}

    runs = table.drop_duplicates("seed")
    out: dict = {"seeds": sorted(int(s) for s in runs["seed"]),
                 "td_middle_first": stats(runs["td_middle_first"]), "td_middle_last": stats(runs["td_middle_last"]),
                 "bases": {}}
    for basis, part in table.groupby("basis", sort=True):
        out["bases"][basis] = {c: stats(part[c]) for c in ("td_basis_last", "final_mse", "gap_closed",
                                                            "below_ridge_step", "td_rise_step")}
    return out


def analyze_seeds(run_dir: str | Path, config: AnalysisConfig | None = None, umap: bool = True,
                  progress: bool = True, out: str | Path | None = None,
                  ) -> tuple[dict[int, AnalysisResult], pd.DataFrame, dict]:
    """:func:`analyze_run` on every seed of a :func:`~taskvec_interp.synthetic.train.train_seeds` run, their
    per-seed table (:func:`seeds_table`, saved as ``seeds.parquet``) and the spread over seeds
    (:func:`seeds_spread`, ``seeds_summary.json``). ``out``: where to write (default ``run_dir``): each
    seed's analysis goes to ``out/seed_<n>/analysis``, the table and the spread to ``out``."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    runs = seed_runs(run_dir)
    check_seed_configs(runs)  # seeds of different runs are never pooled: refused before any work
    results = {}
    for seed, path in runs:
        results[seed] = analyze_run(path, config, umap=umap, progress=progress)
        results[seed].save(out / f"seed_{seed}" / "analysis")
    table = seeds_table(results)
    spread = seeds_spread(table)
    table.to_parquet(out / "seeds.parquet", index=False)
    (out / "seeds_summary.json").write_text(json.dumps(spread, indent=2))
    return results, table, spread
