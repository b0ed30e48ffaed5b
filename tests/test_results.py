"""One way to save and load: every result type round-trips through ONE atomic writer and its checking reader.

For every result type ``XResult.load(x.save(d))`` equals ``x`` (tables, tensors, configs), built from tiny
constructed data. The reader refuses a torn, changed or missing file, a marker of another kind and a manifest
entry outside the directory, each with a ValueError naming the file; the writer refuses to replace a directory
it did not write, leaves no temporary directory when a write fails, and carries resume state over.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from taskvec_interp.activations import Activations
from taskvec_interp.demo import DemoConfig, DemoResult, Part
from taskvec_interp.engine import FAILED_COLUMNS, Checkpoint
from taskvec_interp.experiments.finetune import FinetuneComparison, FinetuneConfig, FinetuneResult
from taskvec_interp.experiments.patching import PatchConfig, PatchResult, load_patching
from taskvec_interp.experiments.sweep import SweepConfig, SweepResult, load_sweep
from taskvec_interp.experiments.trajectory import TrajectoryResult
from taskvec_interp.io import (
    MANIFEST,
    MARKER,
    claim_result_dir,
    read_result_dir,
    sha256_file,
    write_manifest,
    write_result_dir,
)
from taskvec_interp.probes.vectors import TaskVectors
from taskvec_interp.synthetic.analysis import AnalysisConfig, AnalysisResult

IDENTITY = {"name": "smollm2-135m", "backend": "torch", "d_model": 8, "n_layers": 2, "model_type": "llama"}


# ------------------------------------------------------------------------------------------------
# Tiny results, built directly (no model runs)
# ------------------------------------------------------------------------------------------------
def _td(shots: int = 2, tasks: tuple[str, ...] = ("a", "b", "null"), step: int | None = None) -> pd.DataFrame:
    rows = []
    for layer in (0, 1):
        rows.append({"layer": layer, "level": "overall", "task": "all", "td": 0.4 + 0.2 * layer, "chance": 1 / 3,
                     "ci_low": 0.3, "ci_high": 0.9, "n": 12, "k": 1, "shots": shots, "family": "bitwise"})
        rows += [{"layer": layer, "level": "task", "task": t, "td": 0.1 * (i + 1) + 0.3 * layer, "chance": 1 / 3,
                  "ci_low": 0.0, "ci_high": 1.0, "n": 4, "k": 1, "shots": shots, "family": "bitwise"}
                 for i, t in enumerate(tasks)]
    table = pd.DataFrame(rows)
    return table if step is None else table.assign(step=step)


def _accuracy(shots: int = 2) -> pd.DataFrame:
    return pd.DataFrame({"task": ["a", "b", "null"], "shots": shots, "n": 4, "exact": [0.25, 0.75, 0.5],
                         "first_token": [0.5, 1.0, 0.5], "family": "bitwise"})


def _sweep(seed: int = 0) -> SweepResult:
    g = torch.Generator().manual_seed(seed)
    acts = Activations(torch.randn(2, 6, 8, generator=g), [0, 1])
    predictions = pd.DataFrame({"prompt_id": range(6), "task": ["a", "a", "b", "b", "null", "null"],
                                "answer": ["1", "0", "11", "10", "", ""], "generated": ["1", "1", "11", "0", "", "x"],
                                "exact": [True, False, True, False, True, False], "shots": 2, "family": "bitwise"})
    fit = {"layer": 1, "n_points": 2, "r2": math.nan, "slope": math.nan, "intercept": math.nan,
           "note": "R^2 undefined: fewer than 3 points or constant TD/accuracy", "family": "bitwise"}
    return SweepResult(SweepConfig(shots=(2,), save_activations=True), _td(), _accuracy(), predictions, fit,
                       {2: (acts, torch.tensor([0, 0, 1, 1, 2, 2]))}, 1.25, dict(IDENTITY))


def _vectors() -> TaskVectors:
    meta = {"model": dict(IDENTITY), "shots": 4, "n": {"a": 3, "b": 3, "null": 3}, "seed": 0, "family": "bitwise"}
    return TaskVectors(torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1)), [0, 1],
                       ("a", "b", "null"), "paper", meta)


def _patch() -> PatchResult:
    acc = pd.DataFrame({"condition": [0, 1, 1], "layer": pd.array([pd.NA, 1, 1], dtype="Int64"),
                        "mode": ["none", "add", "add"], "vector": ["none", "own", "own"], "scale": [0.0, 1.0, 1.0],
                        "direction": ["baseline", "positive", "positive"], "task": ["a", "a", "b"], "n": 4,
                        "accuracy": [0.25, 0.5, 0.75], "ci_low": [0.0, 0.1, 0.2], "ci_high": [0.5, 0.9, 1.0],
                        "delta": [0.0, 0.25, 0.5]})
    preds = pd.DataFrame({"condition": [0, 1], "prompt_id": [0, 0], "task": ["a", "a"], "answer": ["1", "1"],
                          "generated": ["0", "1"], "exact": [False, True], "engine": ["full", "prefix"]})
    relation = pd.DataFrame({"layer": [1], "mode": ["add"], "direction": ["positive"], "r": [0.5], "slope": [1.0]})
    summary = {"peak_layer": 1, "peak_td": 0.6, "chance": 1 / 3, "layer": 1, "patched_layers": [1],
               "baseline": {"a": 0.25, "b": 0.5}, "at_peak": {"add_positive": {"a": 0.25, "b": 0.5, "mean": 0.375}},
               "engine": ["prefix"]}
    return PatchResult(PatchConfig(), acc, preds, _td(), relation, _vectors(), summary, dict(IDENTITY), 2.5)


def _trajectory() -> TrajectoryResult:
    entries = [Checkpoint(0, 10, "local", "/models/step10", None, "name"),
               Checkpoint(1, 20, "hub", "org/model", "step20-tokens1B", "given"),
               Checkpoint(2, 30, "local", "/models/step30", None, "name")]
    failed = pd.DataFrame([{"index": 1, "step": 20, "checkpoint": "org/model@step20-tokens1B", "stage": "load",
                            "reason": "OSError: no such revision"}], columns=FAILED_COLUMNS)
    summary = pd.DataFrame({"step": [10, 30], "layer": [1, 1], "td_mean": [0.3, 0.6], "accuracy": [0.2, 0.7]})
    tables = {"td": pd.concat([_td(step=10), _td(step=30)], ignore_index=True),
              "accuracy": pd.concat([_accuracy().assign(step=10), _accuracy().assign(step=30)], ignore_index=True),
              "summary": summary}
    config = {"probe": "td_accuracy", "family": "bitwise", "shots": 4, "n_per_task": 12, "template": {}}
    return TrajectoryResult(config, tables, failed, entries, {10: dict(IDENTITY), 30: dict(IDENTITY)}, 4.5)


def _finetune() -> FinetuneResult:
    g = torch.Generator().manual_seed(2)
    trained = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.randn(4, 8, generator=g),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight": torch.randn(8, 4, generator=g)}
    metrics = pd.DataFrame([{"step": s, "loss": 2.0 / s, "answer_tokens": 12, "lr": 1e-4 * s, "elapsed_s": 0.1 * s}
                            for s in (1, 2, 3)])
    identity = {"name": "tiny", "n_layers": 2, "model_type": "llama", "trainable_params": 64}
    return FinetuneResult(FinetuneConfig(model="tiny", layers="first:1"), [0], trained, metrics, _sweep(3), _sweep(4),
                          identity)


def _comparison() -> FinetuneComparison:
    summary = pd.DataFrame({"model": ["pretrained", "lora first:1"], "accuracy_mean": [0.25, 0.5],
                            "td_mean": [0.3, 0.4], "td_layer": [1, 1]})
    per_task = pd.DataFrame({"model": ["pretrained", "lora first:1"], "task": ["a", "a"], "exact": [0.25, 0.5],
                             "td": [0.3, 0.4]})
    td = pd.DataFrame({"model": ["pretrained", "pretrained"], "layer": [0, 1], "td": [0.2, 0.3]})
    return FinetuneComparison(summary, per_task, td)


def _analysis() -> AnalysisResult:
    rng = np.random.default_rng(0)
    td = _td(tasks=("B1", "B2"), step=100)
    loss = pd.DataFrame({"step": [0, 100, 0, 100], "basis": ["B1", "B1", "B2", "B2"], "mse": [1.0, 0.2, 1.1, 0.3]})
    patching = pd.DataFrame({"step": 100, "layer": 1, "mode": "replace", "source": ["B1", "B2"],
                             "target": ["B2", "B1"], "mse": [0.9, 0.8]})
    summary = {"td_layer": 1, "bases": {"B1": {"loss_drop_step": 100, "td_rise_step": None, "gap_closed": 0.5}},
               "td_first": 0.4, "td_last": 0.6, "chance": 0.5}
    embeddings = {(layer, step): (rng.normal(size=(4, 2)).astype(np.float32), np.array([0, 0, 1, 1]))
                  for step in (0, 100) for layer in (0, 1)}
    return AnalysisResult(AnalysisConfig(), td, loss, patching, summary, embeddings,
                          td.assign(task=td["task"].str.replace("B", "G")), None)


def _demo(out: Path) -> DemoResult:
    part = Part("td_bitwise", "(b) TD: bitwise", "text", [{"metric": "peak", "ours": "1 of 2", "paper": "13"}],
                ["td_bitwise/sweep/figures/td_by_layer.png"], {"summary": "td_bitwise/summary.parquet"}, 1.5)
    skipped = Part("td_pos", "(b) TD: pos", "", skipped="no treebank")
    return DemoResult(DemoConfig(quick=True), [part, skipped], out, 3.0, dict(IDENTITY))


# ------------------------------------------------------------------------------------------------
# Equality of results, field by field
# ------------------------------------------------------------------------------------------------
def assert_same(a: object, b: object, where: str = "result") -> None:
    """``b`` equals ``a``: tables with assert_frame_equal, tensors with torch.equal (same dtype), arrays with
    np.array_equal, NaN equal to NaN, dataclasses field by field (fields with ``compare=False`` skipped)."""
    if isinstance(a, pd.DataFrame):
        assert isinstance(b, pd.DataFrame), where
        pd.testing.assert_frame_equal(b, a, obj=where)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
        assert getattr(a, "layers", None) == getattr(b, "layers", None), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), where
    elif dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(b) is type(a), where
        for f in dataclasses.fields(a):
            if f.compare:
                assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, tuple) and hasattr(a, "_fields"):  # a named tuple
        assert type(b) is type(a), where
        for name in a._fields:
            assert_same(getattr(a, name), getattr(b, name), f"{where}.{name}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(b) is type(a) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".writing-" in p.name or ".old-" in p.name)


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------
ROUND_TRIPS = {
    "sweep": (_sweep, SweepResult.load),
    "patching": (_patch, PatchResult.load),
    "trajectory": (_trajectory, TrajectoryResult.load),
    "finetune": (_finetune, FinetuneResult.load),
    "finetune_comparison": (_comparison, FinetuneComparison.load),
    "analysis": (_analysis, AnalysisResult.load),
    "task_vectors": (_vectors, TaskVectors.load),
}


@pytest.mark.parametrize("kind", list(ROUND_TRIPS))
def test_every_result_type_round_trips(kind, tmp_path):
    build, load = ROUND_TRIPS[kind]
    result = build()
    out = result.save(tmp_path / kind)
    assert out == tmp_path / kind
    back = load(out)
    assert_same(result, back)
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == kind and marker["version"] and len(marker["config_hash"]) == 64
    manifest = json.loads((out / MANIFEST).read_text())["files"]
    assert set(manifest) == {p for p in _tree(out) if p != MANIFEST}  # every file, with its sha256
    assert all(manifest[p]["sha256"] == sha256_file(out / p) for p in manifest)
    assert_same(result, load(result.save(out)))  # saved again over itself: replaced whole, the same
    assert _temporaries(tmp_path) == []


def test_demo_result_round_trips(tmp_path):
    result = _demo(tmp_path / "demo")
    (tmp_path / "demo" / "td_bitwise").mkdir(parents=True)  # a part's directory: carried over, not in the manifest
    (tmp_path / "demo" / "td_bitwise" / "part.json").write_text("{}")
    back = DemoResult.load(result.save(tmp_path / "demo"))
    assert_same(result, back)
    assert (tmp_path / "demo" / "td_bitwise" / "part.json").read_text() == "{}"
    assert "td_bitwise/part.json" not in json.loads((tmp_path / "demo" / MANIFEST).read_text())["files"]


def test_old_loader_functions_are_the_classmethods(tmp_path):
    assert_same(_sweep(), load_sweep(_sweep().save(tmp_path / "s")))
    assert_same(_patch(), load_patching(_patch().save(tmp_path / "p")))


def test_task_vectors_keep_their_file_format(tmp_path):
    vecs = _vectors()
    path = vecs.save(tmp_path / "v.safetensors")  # one file, as a patching result holds it
    assert path.is_file() and not (tmp_path / MARKER).exists()
    assert_same(vecs, TaskVectors.load(path))
    d = vecs.save(tmp_path / "vectors")  # a result directory holding that same file
    assert (d / "vectors.safetensors").read_bytes() == path.read_bytes()
    assert_same(vecs, TaskVectors.load(d / "vectors.safetensors"))
    assert_same(_patch().vectors, TaskVectors.load(_patch().save(tmp_path / "p") / "vectors.safetensors"))


def test_a_nested_result_is_checked_twice(tmp_path):
    """A fine-tuning result holds two sweeps, each a result directory of its own inside its manifest."""
    out = _finetune().save(tmp_path / "ft")
    assert json.loads((out / "eval" / MARKER).read_text())["kind"] == "sweep"
    assert "eval/td.parquet" in json.loads((out / MANIFEST).read_text())["files"]
    assert_same(_sweep(3), SweepResult.load(out / "eval"))


# ------------------------------------------------------------------------------------------------
# The reader refuses what it cannot vouch for, naming the file
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path) -> Path:
    return _sweep().save(tmp_path / "sweep")


def test_a_torn_file_is_refused(saved):
    data = (saved / "td.parquet").read_bytes()
    (saved / "td.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"td\.parquet has \d+ bytes, the manifest says \d+ \(truncated\?\)") as err:
        SweepResult.load(saved)
    assert str(saved) in str(err.value)


def test_a_changed_file_is_refused(saved):
    data = bytearray((saved / "accuracy.parquet").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    (saved / "accuracy.parquet").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"accuracy\.parquet does not match its sha256"):
        SweepResult.load(saved)
    fit = json.loads((saved / "fit.json").read_text())
    (saved / "fit.json").write_text(json.dumps({**fit, "r2": 0.99}))  # an edited number: also a change
    with pytest.raises(ValueError, match=r"accuracy\.parquet|fit\.json"):
        SweepResult.load(saved)


def test_a_missing_file_is_refused(saved):
    (saved / "predictions.parquet").unlink()
    with pytest.raises(ValueError, match=r"predictions\.parquet is missing"):
        SweepResult.load(saved)
    (saved / MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"no manifest\.json"):
        SweepResult.load(saved)


def test_a_marker_of_another_kind_is_refused(saved, tmp_path):
    with pytest.raises(ValueError, match=r"holds a 'sweep' result, not a 'patching' one"):
        PatchResult.load(saved)
    marker = json.loads((saved / MARKER).read_text())
    (saved / MARKER).write_text(json.dumps({**marker, "kind": "trajectory"}))
    with pytest.raises(ValueError, match=r"result\.json|holds a 'trajectory' result"):
        SweepResult.load(saved)
    legacy = tmp_path / "legacy"  # what older versions wrote: the files, no marker
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"legacy'.*no result\.json"):
        SweepResult.load(legacy)
    with pytest.raises(ValueError, match=r"nowhere' cannot be read: it does not exist"):
        SweepResult.load(tmp_path / "nowhere")


@pytest.mark.parametrize("entry", ["../outside.txt", "/etc/hostname", "td/../../outside.txt", "link.txt"])
def test_a_manifest_entry_outside_the_directory_is_refused(saved, tmp_path, entry):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    if entry == "link.txt":
        os.symlink(outside, saved / "link.txt")
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["files"][entry] = {"bytes": outside.stat().st_size, "sha256": sha256_file(outside)}
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"lists {entry!r}, a path outside the directory"):
        SweepResult.load(saved)


def test_an_unfinished_run_is_refused(tmp_path):
    run = claim_result_dir(tmp_path / "run", "finetune")  # what finetune() holds while it trains
    (run / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"finetune result is not finished"):
        FinetuneResult.load(run)
    assert_same(_finetune(), FinetuneResult.load(_finetune().save(run)))  # the end of the run replaces it


def test_files_outside_the_manifest_are_never_read(saved):
    (saved / "figures").mkdir()
    (saved / "figures" / "td_by_layer.png").write_bytes(b"png")  # written next to the result after it
    (saved / "activations_7shot.safetensors").write_bytes(b"junk")  # not vouched for: ignored
    back = SweepResult.load(saved)
    assert sorted(back.activations) == [2]


# ------------------------------------------------------------------------------------------------
# The writer: replaces its own results whole, refuses everyone else's, leaves nothing half-written
# ------------------------------------------------------------------------------------------------
def test_a_directory_without_a_marker_is_never_replaced(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "sub").mkdir()
    (mine / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _tree(mine)
    for result in (_sweep(), _patch(), _trajectory(), _finetune(), _comparison(), _analysis(), _demo(mine)):
        with pytest.raises(ValueError, match=r"mine is not empty and holds no '\w+' result \(no result\.json\): it "
                                             r"holds notes\.txt, sub"):
            result.save(mine)
    with pytest.raises(ValueError, match="holds no 'task_vectors' result"):
        _vectors().save(mine)
    assert _tree(mine) == before and _temporaries(tmp_path) == []


def test_a_result_of_another_kind_is_never_replaced(saved, tmp_path):
    before = _tree(saved)
    with pytest.raises(ValueError, match=r"sweep holds a 'sweep' result, not a 'patching' one: refusing"):
        _patch().save(saved)
    assert _tree(saved) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        _sweep().save(tmp_path / "file")


def test_a_killed_write_leaves_the_old_result_and_no_temporary(saved, tmp_path, monkeypatch):
    before = _tree(saved)
    with pytest.raises(RuntimeError, match="killed"), write_result_dir(saved, "sweep") as tmp:
        (tmp / "td.parquet").write_bytes(b"half")
        raise RuntimeError("killed")
    assert _tree(saved) == before and _temporaries(tmp_path) == []
    with pytest.raises(RuntimeError, match="killed"), write_result_dir(tmp_path / "new", "sweep"):
        raise RuntimeError("killed")
    assert not (tmp_path / "new").exists() and _temporaries(tmp_path) == []

    def fail(self, path, **kw):  # a table write fails half-way through a real save
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", fail)
    with pytest.raises(OSError, match="disk full"):
        _sweep(5).save(saved)
    monkeypatch.undo()
    assert _tree(saved) == before and _temporaries(tmp_path) == []
    assert_same(_sweep(), SweepResult.load(saved))


def test_a_failed_swap_puts_the_old_result_and_its_resume_state_back(tmp_path, monkeypatch):
    from taskvec_interp import io

    out = _trajectory().save(tmp_path / "traj")
    (out / "per_step").mkdir()
    (out / "per_step" / "entry.json").write_text("{}")
    before = _tree(out)
    real = os.replace

    def replace(src, dst):  # the final rename fails (after the old result was moved aside)
        if ".writing-" in Path(src).name and Path(dst) == out:
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        _trajectory().save(out)
    monkeypatch.undo()
    assert _tree(out) == before and _temporaries(tmp_path) == []
    assert_same(_trajectory(), TrajectoryResult.load(out))


def test_a_result_directory_gets_the_default_mode(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    out = _comparison().save(tmp_path / "cmp")
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_a_result_may_not_write_the_writers_own_files(tmp_path):
    with pytest.raises(ValueError, match=r"must not write \['manifest\.json'\]"), \
            write_result_dir(tmp_path / "r", "sweep") as tmp:
        (tmp / MANIFEST).write_text("{}")
    assert not (tmp_path / "r").exists() and _temporaries(tmp_path) == []


def test_resume_state_is_carried_over_and_not_listed(tmp_path):
    """A trajectory's per_step/ (what a rerun skips) survives the result replacing its directory."""
    out = tmp_path / "traj"
    (out / "per_step" / "step_0000010").mkdir(parents=True)
    (out / "per_step" / "step_0000010" / "checkpoint.json").write_text('{"entry": {}}')
    _trajectory().save(out)  # a directory holding only resume state is the command's own
    _trajectory().save(out)  # and replacing the result keeps it
    assert (out / "per_step" / "step_0000010" / "checkpoint.json").read_text() == '{"entry": {}}'
    assert not any(p.startswith("per_step") for p in json.loads((out / MANIFEST).read_text())["files"])
    assert_same(_trajectory(), TrajectoryResult.load(out))
    ft = _finetune().save(tmp_path / "ft")
    (ft / "checkpoints" / "step_0000003").mkdir(parents=True)
    (ft / "checkpoints" / "step_0000003" / "state.json").write_text("{}")
    _finetune().save(ft)
    assert (ft / "checkpoints" / "step_0000003" / "state.json").exists()


def test_checkpoints_and_results_share_one_manifest(tmp_path):
    from taskvec_interp import checkpoints, io

    assert checkpoints.sha256_file is io.sha256_file and checkpoints.write_manifest is io.write_manifest
    ck = tmp_path / "step_0000001"
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(b"weights")
    write_manifest(ck)
    assert checkpoints.checkpoint_problem(ck) is None
    manifest = json.loads((ck / MANIFEST).read_text())
    manifest["files"]["../model.safetensors"] = manifest["files"]["model.safetensors"]
    (ck / MANIFEST).write_text(json.dumps(manifest))
    assert "outside the directory" in checkpoints.checkpoint_problem(ck)


def test_read_result_dir_returns_the_checked_directory(saved):
    assert read_result_dir(saved, "sweep") == saved


# ------------------------------------------------------------------------------------------------
# What a command writes, its result type reads
# ------------------------------------------------------------------------------------------------
def test_finetune_compare_command_writes_a_comparison(tmp_path):
    from typer.testing import CliRunner

    from taskvec_interp.cli import app

    first = _finetune().save(tmp_path / "first")
    last = dataclasses.replace(_finetune(), config=FinetuneConfig(model="tiny", layers="last:1"), layers=[1],
                               eval=_sweep(6)).save(tmp_path / "last")
    res = CliRunner().invoke(app, ["finetune", "compare", str(first), str(last), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    back = FinetuneComparison.load(tmp_path / "cmp")
    assert back.summary["model"].tolist() == ["pretrained", "lora first:1", "lora last:1"]
    assert list((tmp_path / "cmp" / "figures").glob("*.png"))  # figures beside the result, not in its manifest
