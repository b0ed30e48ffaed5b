"""Readers stay inside the results directory; torn files are named (issue 20, part C).

No path read from a results directory is followed outside it: the demo's part.json / demo.json figures and tables
(a tampered entry would embed a local file into the published HTML report), a trajectory's per-step records and
its config's table names, a synthetic run's checkpoints and seed directories. Per-step records carry a manifest
and are verified when read back; a patching result half-written by a full disk never loads. Torn JSON files give
one-line errors naming the file. Every case checks that nothing was written or deleted.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from taskvec_interp.demo import DemoConfig, DemoResult, Part, read_part
from taskvec_interp.engine import Checkpoint, run_checkpoints
from taskvec_interp.experiments.patching import PatchConfig, PatchResult
from taskvec_interp.experiments.trajectory import TrajectoryResult
from taskvec_interp.figures.report import write_demo_report
from taskvec_interp.io import MANIFEST, inside, listed_file, write_manifest
from taskvec_interp.probes.vectors import TaskVectors
from taskvec_interp.synthetic import list_checkpoints, load_run_config
from taskvec_interp.synthetic.analysis import seed_runs

IDENTITY = {"name": "tiny", "backend": "torch", "d_model": 8, "n_layers": 2, "model_type": "llama"}


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _listing(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*"))


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside every results directory that must never be read (a stand-in for /etc/passwd)."""
    s = tmp_path / "secret.png"
    s.write_bytes(b"\x89PNG secret bytes")
    return s


# ------------------------------------------------------------------------------------------------
# The inside check itself
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", ["../x.png", "/etc/passwd", "a/../../x", "a\\b", "", ".", "a//b", "a\x00b", None, 3,
                                 ["a"]])
def test_inside_refuses_every_way_out(tmp_path, rel):
    assert inside(tmp_path, rel) is None


def test_inside_refuses_a_symbolic_link_and_accepts_a_plain_path(tmp_path, secret):
    d = tmp_path / "result"
    (d / "figures").mkdir(parents=True)
    (d / "figures" / "link.png").symlink_to(secret)
    (d / "up").symlink_to(tmp_path)
    assert inside(d, "figures/link.png") is None and inside(d, "up/secret.png") is None
    assert inside(d, "figures/a.png") == d / "figures" / "a.png"


# ------------------------------------------------------------------------------------------------
# The demo: part.json, demo.json and the report
# ------------------------------------------------------------------------------------------------
def _part(figures: list[str], tables: dict[str, str] | None = None) -> Part:
    return Part("td_bitwise", "(b) TD: bitwise", "text", [{"metric": "peak", "ours": "1", "paper": "13"}],
                figures, tables or {}, 1.5)


def _write_part(out: Path, part: Part) -> Path:
    d = out / part.name
    d.mkdir(parents=True, exist_ok=True)
    (d / "part.json").write_text(json.dumps(part.__dict__))
    return d / "part.json"


@pytest.mark.parametrize("entry", ["/etc/passwd", "../secret.png", "td_bitwise/../../secret.png"])
def test_a_tampered_part_figure_is_refused(tmp_path, entry):
    out = tmp_path / "demo"
    marker = _write_part(out, _part(["td_bitwise/sweep/figures/td.png", entry]))
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=rf"part\.json \(part 'td_bitwise'\) names {entry!r}, a path outside .*"
                                         r"\(refused, not followed\)") as err:
        read_part(marker, out)
    assert "\n" not in str(err.value)
    assert _tree(tmp_path) == before


def test_a_part_table_outside_the_demo_is_refused(tmp_path):
    out = tmp_path / "demo"
    marker = _write_part(out, _part([], {"summary": "/etc/passwd"}))
    with pytest.raises(ValueError, match=r"part\.json \(part 'td_bitwise'\) names '/etc/passwd'"):
        read_part(marker, out)


@pytest.mark.parametrize("text, match", [
    ('{"name": "td_bitwise", "title": "t", "te', r"part\.json is not valid JSON \(JSONDecodeError"),
    ('["td_bitwise"]', r"part\.json is not a demo part record \(fields list"),
    ('{"name": "x", "title": "t", "text": "", "evil": 1}', r"part\.json is not a demo part record \(fields \["),
])
def test_a_torn_or_foreign_part_json_is_one_line_naming_it(tmp_path, text, match):
    d = tmp_path / "demo" / "td_bitwise"
    d.mkdir(parents=True)
    (d / "part.json").write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        read_part(d / "part.json", tmp_path / "demo")
    assert str(d / "part.json") in str(err.value) and "\n" not in str(err.value)


def test_the_report_never_embeds_a_file_outside_the_demo(tmp_path, secret):
    out = tmp_path / "demo"
    DemoResult(DemoConfig(quick=True), [_part([])], out, 1.0, dict(IDENTITY)).save(out)  # a demo's directory
    (out / "td_bitwise").mkdir()
    (out / "td_bitwise" / "link.png").symlink_to(secret)  # a link inside, pointing out
    for figure in (str(secret), "../secret.png", "td_bitwise/link.png"):
        result = DemoResult(DemoConfig(quick=True), [_part([figure])], out, 1.0, dict(IDENTITY))
        with pytest.raises(ValueError, match=rf"part 'td_bitwise' of the demo in .* \(figures\) names "
                                             rf"{figure!r}, a path outside"):
            write_demo_report(result)
        assert not (out / "report.html").exists()
    result = DemoResult(DemoConfig(quick=True), [_part([], {"t": "../secret.png"})], out, 1.0, dict(IDENTITY))
    with pytest.raises(ValueError, match=r"\(tables\) names '../secret.png'"):
        write_demo_report(result)
    assert not (out / "report.html").exists()


def test_a_demo_result_naming_a_file_outside_is_refused_on_load(tmp_path):
    out = tmp_path / "demo"
    DemoResult(DemoConfig(quick=True), [_part(["td_bitwise/sweep/figures/td.png"])], out, 1.0,
               dict(IDENTITY)).save(out)
    record = json.loads((out / "demo.json").read_text())
    record["parts"][0]["figures"] = ["/etc/passwd"]
    (out / "demo.json").write_text(json.dumps(record))
    write_manifest(out)  # even a consistent manifest does not make the path acceptable
    before = _tree(out)
    with pytest.raises(ValueError, match=r"demo\.json \(part 'td_bitwise'\) names '/etc/passwd', a path outside"):
        DemoResult.load(out)
    assert _tree(out) == before


# ------------------------------------------------------------------------------------------------
# Trajectories: per-step records and the result's table names
# ------------------------------------------------------------------------------------------------
def _entries(tmp_path: Path) -> list[Checkpoint]:
    entries = []
    for i, step in enumerate((10, 20)):
        d = tmp_path / "models" / f"step{step}"
        d.mkdir(parents=True, exist_ok=True)
        entries.append(Checkpoint(i, step, "local", str(d), None, "name"))
    return entries


def _probe(model, entry):
    return {"td": pd.DataFrame({"layer": [0, 1], "td": [0.1 * entry.step, 0.2]})}


def _run(tmp_path: Path, out: Path, probe=_probe):
    return run_checkpoints(_entries(tmp_path), probe, lambda e: torch.nn.Linear(2, 2), config={"probe": "t"},
                           out=out, on_error="raise", progress=False)


def test_per_step_records_carry_a_manifest_and_are_read_back(tmp_path):
    out = tmp_path / "traj"
    first = _run(tmp_path, out)
    step = out / "per_step" / "step_0000010"
    assert (step / MANIFEST).is_file()
    assert set(json.loads((step / MANIFEST).read_text())["files"]) == {"checkpoint.json", "td.parquet"}
    again = _run(tmp_path, out, probe=lambda m, e: pytest.fail("a finished step is read back, not probed"))
    pd.testing.assert_frame_equal(again.table("td"), first.table("td"))


def test_a_torn_per_step_table_is_refused_naming_it(tmp_path):
    out = tmp_path / "traj"
    _run(tmp_path, out)
    table = out / "per_step" / "step_0000020" / "td.parquet"
    table.write_bytes(table.read_bytes()[:40])
    before = _tree(out)
    with pytest.raises(ValueError, match=r"per-step record .*step_0000020 cannot be read: td\.parquet has 40 bytes, "
                                         r"the manifest says \d+ \(truncated\?\); remove"):
        _run(tmp_path, out)
    assert _tree(out) == before  # refused: nothing replaced, nothing deleted


def test_a_per_step_record_without_a_manifest_is_refused(tmp_path):
    out = tmp_path / "traj"
    _run(tmp_path, out)
    (out / "per_step" / "step_0000010" / MANIFEST).unlink()
    before = _tree(out)
    with pytest.raises(ValueError, match=r"step_0000010 cannot be read: no manifest\.json"):
        _run(tmp_path, out)
    assert _tree(out) == before


def test_a_per_step_table_named_outside_is_never_read(tmp_path):
    out = tmp_path / "traj"
    _run(tmp_path, out)
    step = out / "per_step" / "step_0000010"
    (tmp_path / "evil.parquet").write_bytes(b"not read")
    record = json.loads((step / "checkpoint.json").read_text())
    record["tables"] = ["td", "../../../evil"]
    (step / "checkpoint.json").write_text(json.dumps(record))
    write_manifest(step)  # a consistent manifest: the name itself is refused
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint\.json names a table '\.\./\.\./\.\./evil' that is not a file of "
                                         r".* listed in its manifest\.json \(refused, not followed\)"):
        _run(tmp_path, out)
    assert _tree(tmp_path) == before


def test_a_probe_table_name_that_leaves_the_directory_is_refused(tmp_path):
    out = tmp_path / "traj"
    with pytest.raises(ValueError, match=r"the probe returned a table named '\.\./\.\./escape'"):
        _run(tmp_path, out, probe=lambda m, e: {"../../escape": pd.DataFrame({"x": [1]})})
    assert not list(tmp_path.rglob("escape*"))
    assert not (out / "per_step").exists() or not any((out / "per_step").iterdir())


def test_a_trajectory_naming_a_table_outside_is_refused_on_load(tmp_path):
    entries = [Checkpoint(0, 10, "local", "/models/step10", None, "name")]
    result = TrajectoryResult({"probe": "t"}, {"td": pd.DataFrame({"step": [10], "td": [0.5]})},
                              pd.DataFrame(columns=["index", "step", "checkpoint", "stage", "reason"]), entries,
                              {10: dict(IDENTITY)}, 1.0)
    out = result.save(tmp_path / "traj")
    record = json.loads((out / "config.json").read_text())
    record["tables"] = ["td", "../outside"]
    (out / "config.json").write_text(json.dumps(record))
    write_manifest(out)
    with pytest.raises(ValueError, match=r"config\.json names '\.\./outside\.parquet', a path outside"):
        TrajectoryResult.load(out)
    record["tables"] = ["td", "figures/extra"]  # inside, but not vouched for by the manifest
    (out / "config.json").write_text(json.dumps(record))
    write_manifest(out)
    with pytest.raises(ValueError, match=r"names 'figures/extra\.parquet', which is not a file .* listed in its "
                                         r"manifest\.json"):
        TrajectoryResult.load(out)


def test_listed_file_needs_the_manifest(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    write_manifest(tmp_path)
    (tmp_path / "b.txt").write_text("b")
    assert listed_file(tmp_path, "a.txt", "x.json") == tmp_path / "a.txt"
    with pytest.raises(ValueError, match=r"x\.json names 'b\.txt', which is not a file"):
        listed_file(tmp_path, "b.txt", "x.json")


# ------------------------------------------------------------------------------------------------
# A patching result half-written by a full disk
# ------------------------------------------------------------------------------------------------
def _patch() -> PatchResult:
    acc = pd.DataFrame({"condition": [0, 1], "layer": pd.array([pd.NA, 1], dtype="Int64"), "mode": ["none", "add"],
                        "vector": ["none", "own"], "scale": [0.0, 1.0], "direction": ["baseline", "positive"],
                        "task": ["a", "a"], "n": 4, "accuracy": [0.25, 0.5], "ci_low": [0.0, 0.1],
                        "ci_high": [0.5, 0.9], "delta": [0.0, 0.25]})
    preds = pd.DataFrame({"condition": [0, 1], "prompt_id": [0, 0], "task": ["a", "a"], "answer": ["1", "1"],
                          "generated": ["0", "1"], "exact": [False, True], "engine": ["full", "prefix"]})
    td = pd.DataFrame({"layer": [0, 1], "level": "overall", "task": "all", "td": [0.4, 0.6], "shots": 2})
    relation = pd.DataFrame({"layer": [1], "mode": ["add"], "direction": ["positive"], "r": [0.5], "slope": [1.0]})
    meta = {"model": dict(IDENTITY), "shots": 4, "n": {"a": 3, "null": 3}, "seed": 0, "family": "bitwise"}
    vectors = TaskVectors(torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(1)), [0, 1], ("a", "null"),
                          "paper", meta)
    summary = {"peak_layer": 1, "peak_td": 0.6, "layer": 1, "patched_layers": [1], "baseline": {"a": 0.25}}
    return PatchResult(PatchConfig(), acc, preds, td, relation, vectors, summary, dict(IDENTITY), 2.5)


def test_a_patching_result_half_written_by_a_full_disk_never_loads(tmp_path, monkeypatch):
    out = tmp_path / "patch"
    real = pd.DataFrame.to_parquet
    calls = {"n": 0}

    def full_disk(self, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second table: half of it reaches the disk, then ENOSPC
            real(self, path, *args, **kwargs)
            Path(path).write_bytes(Path(path).read_bytes()[:20])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full_disk)
    with pytest.raises(OSError) as err:
        _patch().save(out)
    assert "No space left on device" in str(err.value) or "ENOSPC" in str(err.value) or "full" in str(err.value)
    monkeypatch.undo()
    assert _listing(tmp_path) == []  # no result, no hidden .writing-* directory
    with pytest.raises(ValueError, match=r"patching directory .*patch.* cannot be read: it does not exist"):
        PatchResult.load(out)


def test_a_torn_patching_file_is_refused_naming_it(tmp_path):
    out = _patch().save(tmp_path / "patch")
    vec = out / "vectors.safetensors"
    vec.write_bytes(vec.read_bytes()[:100])
    before = _tree(out)
    with pytest.raises(ValueError, match=r"vectors\.safetensors has 100 bytes, the manifest says \d+ \(truncated\?\)"):
        PatchResult.load(out)
    assert _tree(out) == before


# ------------------------------------------------------------------------------------------------
# A synthetic run's files: checkpoints, seed directories, torn JSON
# ------------------------------------------------------------------------------------------------
def _tiny_run(tmp_path: Path) -> Path:
    from taskvec_interp.synthetic import train, train_config

    cfg = train_config("tiny", steps=2, batch_size=4, eval_every=1, log_every=1, ckpt_every=1, ckpt_log_points=0,
                       n_test_per_basis=4)
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    return run


def test_a_synthetic_run_never_follows_a_linked_checkpoint(tmp_path):
    run = _tiny_run(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    os.replace(run / "checkpoints" / "step_0000002", elsewhere)
    (run / "checkpoints" / "step_0000002").symlink_to(elsewhere)
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint .*step_0000002 is a symbolic link \(to .*elsewhere'\): .* "
                                         r"refused, not followed"):
        list_checkpoints(run)
    assert _tree(tmp_path) == before


def test_a_seeds_directory_never_follows_a_linked_seed(tmp_path):
    seeds = tmp_path / "seeds"
    (seeds / "seed_0").mkdir(parents=True)
    (seeds / "seed_0" / "config.json").write_text("{}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    (seeds / "seed_1").symlink_to(tmp_path / "other")
    with pytest.raises(ValueError, match=r"seed_1 is a symbolic link \(to .*other'\): a seeds directory holds its "
                                         r"own runs"):
        seed_runs(seeds)


@pytest.mark.parametrize("name, match", [
    ("config.json", r"run/config\.json is not valid JSON \(JSONDecodeError: "),
    ("checkpoints/step_0000001/model_config.json", r"checkpoint .*step_0000001 cannot be loaded: model_config\.json "
                                                   r"has \d+ bytes, the manifest says \d+"),
])
def test_a_torn_run_json_is_one_line_naming_it(tmp_path, name, match):
    from taskvec_interp.synthetic import load_checkpoint, train

    run = _tiny_run(tmp_path)
    cfg = load_run_config(run)
    path = run / name
    path.write_text(path.read_text()[: len(path.read_text()) // 2])
    before = _tree(run)
    with pytest.raises(ValueError, match=match) as err:
        if name == "config.json":
            load_run_config(run)
        else:
            load_checkpoint(path.parent)
    assert "\n" not in str(err.value)
    if name == "config.json":  # and training into the run is refused before it writes anything
        with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
            train(cfg, run, progress=False)
    assert _tree(run) == before
