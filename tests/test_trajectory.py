"""Checkpoint trajectories: the generic loop (one model at a time, resume, bad entries), the TD + accuracy
probe on a tiny model trained between checkpoints, a synthetic run, step parsing, the figure and the CLI."""

from __future__ import annotations

import gc
import importlib.metadata
import json
import weakref

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from taskvec_interp.adapters import load_model
from taskvec_interp.cli import app
from taskvec_interp.experiments import trajectory as T
from taskvec_interp.experiments.sweep import run_sweep
from taskvec_interp.experiments.trajectory import (
    Checkpoint,
    TrajectoryConfig,
    TrajectoryError,
    check_checkpoints,
    hub_checkpoints,
    local_checkpoints,
    parse_step,
    run_checkpoints,
    run_checkpoints_of,
    run_trajectory,
)
from taskvec_interp.tasks import PromptBuilder, get_family

STEPS = (0, 3, 30)
CFG = TrajectoryConfig(family="bitwise", shots=2, n_per_task=6, k=3, n_boot=0, batch_size=16)


@pytest.fixture(scope="module")
def model_steps(smol_tokenizer, tmp_path_factory):
    """A tiny Llama over SmolLM2's vocabulary, trained with plain Adam on bitwise prompts; saved at STEPS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = smol_tokenizer
    cfg = LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    prompts = PromptBuilder().build(get_family("bitwise"), n_per_task=8, shots=2, seed=123)
    texts = [p.text + p.answer for p in prompts]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    root = tmp_path_factory.mktemp("traj-models")
    dirs, g = [], torch.Generator().manual_seed(0)
    for step in range(STEPS[-1] + 1):
        if step in STEPS:
            d = root / f"checkpoint-{step}"  # the HF Trainer's naming: the step is read from it
            model.eval().save_pretrained(d)
            tok.save_pretrained(d)
            dirs.append(d)
        if step == STEPS[-1]:
            break
        model.train()
        idx = torch.randint(len(texts), (8,), generator=g).tolist()
        batch = tok([texts[i] for i in idx], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dirs


def test_parse_step():
    assert parse_step("step1000-tokens4B") == 1000  # OLMo-7B revisions
    assert parse_step("step477000-tokens2000B") == 477000
    assert parse_step("stage1-step10000-tokens42B") == 10000  # OLMo 2
    assert parse_step("step_0000500") == 500  # taskvec synthetic train
    assert parse_step("step500") == 500 and parse_step("step-7") == 7
    assert parse_step("checkpoint-1500") == 1500  # HF Trainer
    assert parse_step("runs/x/checkpoint-20") == 20
    assert parse_step("main") is None and parse_step("my-model") is None and parse_step("tokens4B") is None
    entries = local_checkpoints(["a/checkpoint-5", "b/final", "c/step_0000020"])
    assert [(e.step, e.step_source) for e in entries] == [(5, "name"), (1, "index"), (20, "name")]
    entries = hub_checkpoints("allenai/OLMo-7B-0424-hf", ["step1000-tokens4B", "step2000-tokens8B"])
    assert [(e.step, e.revision, e.kind) for e in entries] == [(1000, "step1000-tokens4B", "hub"),
                                                               (2000, "step2000-tokens8B", "hub")]
    assert [e.step for e in hub_checkpoints("org/m", ["main", "v2"], steps=[10, 20])] == [10, 20]
    with pytest.raises(ValueError, match="2 steps given for 1"):
        local_checkpoints(["a"], steps=[1, 2])
    with pytest.raises(ValueError, match="'org/name'"):
        hub_checkpoints("olmo", ["step1-tokens0B"])
    with pytest.raises(ValueError, match="checkpoint 0: step must be an int >= 0"):
        Checkpoint(0, -1, "local", "x")


def test_up_front_checks(tmp_path):
    with pytest.raises(ValueError, match="no checkpoints"):
        check_checkpoints([])
    dup = local_checkpoints([tmp_path, tmp_path / "x"], steps=[5, 5])
    with pytest.raises(ValueError, match="checkpoints 0 and 1 .* both have step 5"):
        check_checkpoints(dup)
    failed = check_checkpoints(local_checkpoints([tmp_path, tmp_path / "missing"]))
    assert failed[["index", "stage"]].values.tolist() == [[1, "check"]]
    assert "missing" in failed["reason"].iloc[0]
    with pytest.raises(ValueError, match="checkpoint 1 .* does not exist"):  # on_error="raise": before any work
        run_checkpoints(local_checkpoints([tmp_path, tmp_path / "missing"]), lambda m, e: {},
                        lambda e: pytest.fail("loaded"), on_error="raise")


def _counting_probe(calls: list, refs: list):
    """A probe that counts its calls and checks that the previous checkpoint's model is gone."""

    def probe(adapter, entry):
        gc.collect()
        assert all(r() is None for r in refs), "a previous checkpoint's model is still alive"
        refs.append(weakref.ref(adapter.model))
        calls.append(entry.index)
        return {"norms": pd.DataFrame({"param_norm": [float(sum(p.detach().norm() for p in adapter.model.parameters()))]})}

    return probe


def test_one_model_at_a_time_resume_and_bad_entries(model_steps, tmp_path):
    load = T.language_model_loader()
    calls, refs = [], []
    entries = local_checkpoints([*model_steps[:2], tmp_path / "nope", model_steps[2]])
    with pytest.warns(UserWarning, match="checkpoint 2"):
        run = run_checkpoints(entries, _counting_probe(calls, refs), load, progress=False)
    assert calls == [0, 1, 3] and run.ran == [0, 1, 3]
    assert run.failed[["index", "step", "stage"]].values.tolist() == [[2, 2, "check"]]
    assert sorted(run.table("norms")["step"]) == [0, 3, 30]
    norms = run.table("norms")["param_norm"]
    assert norms.nunique() == 3  # the checkpoints really differ
    gc.collect()
    assert all(r() is None for r in refs)

    # resume: a kill in the middle leaves the finished checkpoints on disk; the rerun runs only the rest
    out = tmp_path / "resume"
    entries = local_checkpoints(model_steps)
    calls, refs = [], []
    inner = _counting_probe(calls, refs)

    def killed(adapter, entry):
        if entry.index == 1:
            raise KeyboardInterrupt
        return inner(adapter, entry)

    with pytest.raises(KeyboardInterrupt):
        run_checkpoints(entries, killed, load, out=out, config={"x": 1}, progress=False)
    assert calls == [0]
    assert [p.name for p in sorted((out / "per_step").iterdir())] == ["step_0000000"]
    calls.clear()
    refs.clear()
    again = run_checkpoints(entries, _counting_probe(calls, refs), load, out=out, config={"x": 1}, progress=False)
    assert calls == [1, 2] and again.ran == [1, 2]
    pd.testing.assert_frame_equal(again.table("norms"), run.table("norms"))
    saved = json.loads((out / "per_step" / "step_0000003" / "checkpoint.json").read_text())
    assert saved["provenance"]["model"]["n_layers"] == 3 and "torch" in saved["provenance"]["versions"]
    calls.clear()
    run_checkpoints(entries, _counting_probe(calls, refs), load, out=out, config={"x": 1}, progress=False)
    assert calls == []  # everything done
    with pytest.raises(ValueError, match="another probe configuration"):
        run_checkpoints(entries, _counting_probe(calls, refs), load, out=out, config={"x": 2}, progress=False)
    with pytest.raises(ValueError, match="holds step 3"):
        run_checkpoints(local_checkpoints(model_steps[::-1], steps=[3, 0, 30]), _counting_probe(calls, refs), load,
                        out=out, config={"x": 1}, progress=False)


def test_load_and_probe_errors_are_recorded(model_steps):
    def probe(adapter, entry):
        if entry.step == 3:
            raise RuntimeError("probe broke")
        return {"t": pd.DataFrame({"v": [1]})}

    entries = [*local_checkpoints(model_steps), Checkpoint(3, 99, "hub", "no-such-org/no-such-model", "step99-tokens1B")]
    with pytest.warns(UserWarning, match="2 checkpoint"):
        run = run_checkpoints(entries, probe, T.language_model_loader(), progress=False)
    assert run.failed[["index", "stage"]].values.tolist() == [[1, "probe"], [3, "load"]]
    assert "probe broke" in run.failed["reason"].iloc[0]
    assert "no-such-org/no-such-model" in run.failed["reason"].iloc[1]
    assert run.table("t")["step"].tolist() == [0, 30]
    with pytest.raises(RuntimeError, match="probe broke"):
        run_checkpoints(entries, probe, T.language_model_loader(), on_error="raise", progress=False)


def test_trajectory_equals_direct_sweeps_and_differs_over_steps(model_steps, tmp_path):
    out = tmp_path / "traj"
    res = run_trajectory(local_checkpoints(model_steps), CFG, out=out, progress=False)
    assert res.ok and sorted(res.td["step"].unique()) == list(STEPS)
    fam = get_family("bitwise")
    for d, step in zip(model_steps, STEPS, strict=True):
        direct = run_sweep(load_model(d), CFG.sweep_config(), fam, progress=False)
        td = res.td[res.td["step"] == step].drop(columns="step").reset_index(drop=True)
        pd.testing.assert_frame_equal(td, direct.td)
        acc = res.tables["accuracy"][res.tables["accuracy"]["step"] == step].drop(columns="step")
        pd.testing.assert_frame_equal(acc.reset_index(drop=True), direct.accuracy)
    # the checkpoints really differ: TD tables and predictions change with training
    by_step = {s: res.td[res.td["step"] == s]["td"].to_numpy() for s in STEPS}
    assert not np.array_equal(by_step[0], by_step[30]) and not np.array_equal(by_step[3], by_step[30])
    preds = res.tables["predictions"]
    assert not np.array_equal(preds[preds["step"] == 0]["generated"].to_numpy(),
                              preds[preds["step"] == 30]["generated"].to_numpy())
    # the joined table: per-task TD at every layer with that task's accuracy; overall rows: mean over real tasks
    table = res.table
    assert list(table.columns[:6]) == ["step", "layer", "level", "task", "td", "accuracy"]
    assert len(table) == len(res.td)
    acc = res.tables["accuracy"]
    row = table[(table["step"] == 30) & (table["layer"] == 1) & (table["task"] == "AND")]
    assert row["accuracy"].item() == acc[(acc["step"] == 30) & (acc["task"] == "AND")]["exact"].item()
    overall = table[(table["step"] == 30) & (table["level"] == "overall")]["accuracy"]
    assert overall.nunique() == 1
    assert overall.iloc[0] == pytest.approx(acc[(acc["step"] == 30) & (acc["task"] != "null")]["exact"].mean())
    s = res.summary
    assert s["step"].tolist() == list(STEPS) and set(s["n_tasks"]) == {6}
    for step, layer, td_mean in s[["step", "layer", "td_mean"]].itertuples(index=False):
        at = res.td[(res.td["step"] == step) & (res.td["level"] == "overall")]
        assert layer == at.loc[at["td"].idxmax(), "layer"]
        tasks = res.td[(res.td["step"] == step) & (res.td["layer"] == layer) & (res.td["level"] == "task")
                       & (res.td["task"] != "null")]
        assert td_mean == pytest.approx(tasks["td"].mean())
    # the output layout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["shots"] == 2 and cfg["family"] == "bitwise" and cfg["outcome"] == "accuracy"
    assert [c["step"] for c in cfg["checkpoints"]] == list(STEPS)
    assert all(c["status"] == "ok" and c["model"]["n_layers"] == 3 for c in cfg["checkpoints"])
    assert cfg["checkpoints"][1]["model"]["name"] == str(model_steps[1])
    assert cfg["provenance"]["versions"]["torch"] == importlib.metadata.version("torch")
    for name in ("td", "accuracy", "predictions", "trajectory", "summary", "failed"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{name}.parquet"),
                                      res.failed if name == "failed" else res.tables[name], check_dtype=False)
    assert not list(out.glob(".*tmp"))
    fixed = T.trajectory_summary(res.table, layer=2)
    assert set(fixed["layer"]) == {2}
    with pytest.raises(ValueError, match="summary layer 7"):
        T.trajectory_summary(res.table, layer=7)


def test_trajectory_bad_entries_kept_and_raised(model_steps, tmp_path):
    entries = local_checkpoints([model_steps[0], tmp_path / "gone", model_steps[2]])
    with pytest.warns(UserWarning, match="checkpoint 1"):
        res = run_trajectory(entries, CFG, out=tmp_path / "o", progress=False)
    assert not res.ok and res.failed["index"].tolist() == [1]
    assert sorted(res.td["step"].unique()) == [0, 30]  # the others still ran (the missing one was entry 1)
    with pytest.raises(TrajectoryError, match="checkpoint 1 .*gone"):
        res.raise_for_failed()
    saved = json.loads((tmp_path / "o" / "config.json").read_text())
    assert [c["status"] for c in saved["checkpoints"]] == ["ok", "failed", "ok"]
    assert pd.read_parquet(tmp_path / "o" / "failed.parquet")["index"].tolist() == [1]
    with pytest.raises(ValueError, match=r"TrajectoryConfig\.k must be <= n_per_task - 2 = 1 .*got 40"):
        run_trajectory(entries, TrajectoryConfig(n_per_task=3, k=40), progress=False)
    with pytest.raises(ValueError, match="synthetic"):
        run_trajectory([Checkpoint(0, 0, "synthetic", str(tmp_path))], CFG, progress=False)
    with pytest.raises(ValueError, match="TrajectoryConfig.shots must be an int >= 0"):
        TrajectoryConfig(shots=-1)
    with pytest.raises(ValueError, match="dtype"):
        TrajectoryConfig(dtype="fp8")


def test_hub_revisions_go_through_load_model(model_steps, monkeypatch):
    """The real hub path: each revision of one model id is passed to load_model (mapped to local dirs here)."""
    import taskvec_interp.adapters as adapters

    revisions = ["step1000-tokens4B", "step2000-tokens8B"]
    where = dict(zip(revisions, [model_steps[0], model_steps[2]], strict=True))
    seen = []

    def fake_load(spec, backend="torch", *, revision=None, **kw):
        seen.append((spec, revision))
        return load_model(where[revision], backend=backend)

    monkeypatch.setattr(adapters, "load_model", fake_load)
    res = run_trajectory(hub_checkpoints("allenai/OLMo-7B-0424-hf", revisions), CFG, progress=False)
    assert seen == [("allenai/OLMo-7B-0424-hf", r) for r in revisions]
    assert res.summary["step"].tolist() == [1000, 2000]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from taskvec_interp.synthetic import train, train_config

    run = tmp_path_factory.mktemp("mslr-traj")
    train(train_config("tiny", steps=120), run, progress=False)
    return run


def test_synthetic_trajectory(tiny_run, tmp_path):
    from taskvec_interp.probes.decodability import task_decodability
    from taskvec_interp.synthetic import load_checkpoint, make_test_set, train_config
    from taskvec_interp.synthetic.analysis import capture_checkpoint, synthetic_trajectory

    entries = run_checkpoints_of(tiny_run)
    res = synthetic_trajectory(tiny_run, n_per_basis=20, k=5, n_boot=0, seed=7, out=tmp_path / "s", progress=False)
    assert res.outcome == "mse" and sorted(res.td["step"].unique()) == [e.step for e in entries]
    last = entries[-1]
    model = load_checkpoint(last.location)
    test = make_test_set(train_config("tiny").data, n_per_basis=20, seed=7)
    direct = task_decodability(capture_checkpoint(model, test), test.basis, k=5, n_boot=0)
    got = res.td[(res.td["step"] == last.step) & (res.td["level"] == "overall")].sort_values("layer")["td"]
    assert got.tolist() == pytest.approx(direct.td.tolist())
    with torch.no_grad():
        err = (model(test.xs, test.ys)[:, -1] - test.ys[:, -1]) ** 2
    mse = res.tables["mse"]
    assert mse[(mse["step"] == last.step) & (mse["task"] == "B2")]["mse"].item() == pytest.approx(
        float(err[test.basis == 1].mean()), rel=1e-5)
    first = res.summary.iloc[0]["mse"]
    assert res.summary.iloc[-1]["mse"] < first  # training lowers the loss
    assert json.loads((tmp_path / "s" / "config.json").read_text())["outcome"] == "mse"


def test_trajectory_figure(model_steps, tiny_run, tmp_path):
    from taskvec_interp import figures
    from taskvec_interp.figures import trajectory_figures
    from taskvec_interp.synthetic.analysis import synthetic_trajectory

    res = run_trajectory(local_checkpoints(model_steps), CFG, progress=False)
    paths = trajectory_figures(res, tmp_path / "lm")
    assert [p.name for p in paths] == ["trajectory.png", "td_heatmap.png"]
    assert all(p.stat().st_size > 5000 for p in paths)
    fig = figures.plot_trajectory(res.summary)
    ax_td, ax_out = fig.axes[:2]
    assert ax_td.get_xscale() == "symlog"  # step 0 is on the axis
    assert "accuracy" in ax_out.get_ylabel()
    syn = synthetic_trajectory(tiny_run, n_per_basis=10, k=3, n_boot=0, progress=False)
    fig = figures.plot_trajectory(syn.summary, outcome="mse")
    assert fig.axes[1].get_yscale() == "log" and "MSE" in fig.axes[1].get_ylabel()
    pos = syn.summary[syn.summary["step"] > 0]
    assert figures.plot_trajectory(pos, outcome="mse").axes[0].get_xscale() == "log"
    with pytest.raises(ValueError, match="summary table"):
        figures.plot_trajectory(pd.DataFrame({"step": [1]}))


runner = CliRunner(env={"COLUMNS": "400"})  # wide: rich does not wrap the error messages


def test_cli_trajectory(model_steps, tiny_run, tmp_path):
    out = tmp_path / "cli"
    args = ["trajectory", "--family", "bitwise", "--shots", "2", "--n-per-task", "6", "--k", "3", "--n-boot", "0"]
    res = runner.invoke(app, [*args, "--checkpoints", f"{model_steps[0]},{model_steps[1]}", "--checkpoints",
                              str(model_steps[2]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert pd.read_parquet(out / "summary.parquet")["step"].tolist() == list(STEPS)
    assert (out / "figures" / "trajectory.png").exists() and "td_mean" in res.output
    # a bad entry: named by index up front, the good ones written, exit code non-zero
    bad = tmp_path / "bad"
    res = runner.invoke(app, [*args, "--checkpoints", f"{model_steps[0]},{tmp_path / 'gone'}", "--out", str(bad)])
    assert res.exit_code == 1 and "checkpoint 1" in res.output and "gone" in res.output
    assert pd.read_parquet(bad / "summary.parquet")["step"].tolist() == [0]
    # config and --out are checked before any model loads
    for extra, msg in ((["--shots", "x"], "'--shots'"), (["--family", "sentiment"], "sentiment"),
                       (["--backend", "jax"], "jax"), (["--steps", "1,2"], "2 steps given for 1")):
        res = runner.invoke(app, [*args, "--checkpoints", str(model_steps[0]), "--out", str(tmp_path / "z"), *extra])
        assert res.exit_code != 0 and msg in res.output + str(res.exception), (extra, res.output, res.exception)
    (tmp_path / "file").write_text("x")
    res = runner.invoke(app, [*args, "--checkpoints", str(model_steps[0]), "--out", str(tmp_path / "file")])
    assert res.exit_code != 0 and "is a file" in res.output
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "z")])
    assert res.exit_code != 0 and "exactly one of" in res.output
    res = runner.invoke(app, [*args, "--model", "allenai/OLMo-7B-0424-hf", "--out", str(tmp_path / "z")])
    assert res.exit_code != 0 and "--revisions" in res.output
    res = runner.invoke(app, [*args, "--checkpoints", f"{model_steps[0]},{model_steps[0]}", "--steps", "4,4",
                              "--out", str(tmp_path / "z")])
    assert res.exit_code != 0 and "both have step 4" in res.output
    assert not (tmp_path / "z").exists()
    # a synthetic run
    res = runner.invoke(app, ["trajectory", "--synthetic-run", str(tiny_run), "--n-per-task", "10", "--k", "3",
                              "--n-boot", "0", "--out", str(tmp_path / "syn")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "syn" / "config.json").read_text())["outcome"] == "mse"
    assert (tmp_path / "syn" / "figures" / "trajectory.png").exists()
