"""Several seeds trained as one stacked model (train_seeds) equal their solo runs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from taskvec_interp.synthetic import train, train_config
from taskvec_interp.synthetic.stacked import StackedRegressors
from taskvec_interp.synthetic.train import list_checkpoints, read_metrics, seed_dir, train_seeds

SEEDS = [0, 3, 7]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # bit-exact resume compares two runs: keep the kernels' thread split fixed whatever the machine's load
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**kw):
    return train_config("tiny", steps=30, eval_every=10, log_every=5, ckpt_every=15, ckpt_log_points=3,
                        n_test_per_basis=16, grad_clip=0.5, **kw)


@pytest.fixture(scope="module")
def stacked_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("seeds")
    train_seeds(_cfg(), SEEDS, run, progress=False)
    return run


def test_each_seed_equals_its_solo_run(stacked_run: Path, tmp_path: Path) -> None:
    for s in SEEDS:
        solo = tmp_path / f"solo_{s}"
        train(replace(_cfg(), seed=s), solo, progress=False)
        mine = seed_dir(stacked_run, s)
        assert json.loads((mine / "config.json").read_text()) == json.loads((solo / "config.json").read_text())
        assert [st for st, _ in list_checkpoints(mine)] == [st for st, _ in list_checkpoints(solo)]
        for (_, a), (_, b) in zip(list_checkpoints(mine), list_checkpoints(solo), strict=True):
            assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
            # the data stream is the solo run's, bit for bit
            assert torch.equal(load_file(a / "state.safetensors")["data_generator"],
                               load_file(b / "state.safetensors")["data_generator"])
            wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
            assert wa.keys() == wb.keys()
            for k in wa:
                torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5)
            oa, ob = load_file(a / "optimizer.safetensors"), load_file(b / "optimizer.safetensors")
            assert oa.keys() == ob.keys()
            for k in oa:
                torch.testing.assert_close(oa[k], ob[k], rtol=1e-3, atol=1e-7)
            assert json.loads((a / "optimizer.json").read_text()) == json.loads((b / "optimizer.json").read_text())
        ma, mb = read_metrics(mine), read_metrics(solo)
        assert [r["step"] for r in ma] == [r["step"] for r in mb]
        for ra, rb in zip(ma, mb, strict=True):
            for key in ("train_loss", "test_mse", "test_mse_b0"):
                if key in rb:
                    assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (s, ra["step"], key)


def test_seeds_with_a_points_curriculum_equal_their_solo_runs(tmp_path: Path) -> None:
    cfg = replace(_cfg(points_curriculum=((0, 6), (20, 20))), steps=24)
    train_seeds(cfg, SEEDS[:2], tmp_path / "seeds", progress=False)
    for s in SEEDS[:2]:
        solo = train(replace(cfg, seed=s), tmp_path / f"solo_{s}", progress=False)
        mine = seed_dir(tmp_path / "seeds", s) / "checkpoints" / solo.name
        assert torch.equal(load_file(mine / "state.safetensors")["data_generator"],
                           load_file(solo / "state.safetensors")["data_generator"])
        wa, wb = load_file(mine / "model.safetensors"), load_file(solo / "model.safetensors")
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5)


def test_seeds_differ_and_learn(stacked_run: Path) -> None:
    finals = [read_metrics(seed_dir(stacked_run, s))[-1]["test_mse"] for s in SEEDS]
    first = [read_metrics(seed_dir(stacked_run, s))[0]["test_mse"] for s in SEEDS]
    assert len(set(finals)) == len(SEEDS)  # different seeds, different runs
    assert all(f < i for f, i in zip(finals, first, strict=True))


def test_stacked_kill_and_resume_is_exact(stacked_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "killed"
    train_seeds(_cfg(), SEEDS, run, progress=False, stop_at=22)  # killed after the step-15 checkpoint
    train_seeds(_cfg(), SEEDS, run, progress=False)
    for s in SEEDS:
        a = list_checkpoints(seed_dir(run, s))[-1][1]
        b = list_checkpoints(seed_dir(stacked_run, s))[-1][1]
        for name in ("model.safetensors", "optimizer.safetensors", "state.safetensors"):
            ta, tb = load_file(a / name), load_file(b / name)
            assert all(torch.equal(ta[k], tb[k]) for k in tb), (s, name)
        assert read_metrics(seed_dir(run, s)) == [
            {**r, "elapsed_s": r2["elapsed_s"]} for r, r2 in zip(read_metrics(seed_dir(stacked_run, s)),
                                                                 read_metrics(seed_dir(run, s)), strict=True)]


def test_stacked_forward_equals_each_model() -> None:
    cfg = _cfg()
    model = StackedRegressors(cfg.model, SEEDS)
    xs = torch.randn(len(SEEDS), 4, cfg.data.n_points, cfg.data.n_dims)
    ys = torch.randn(len(SEEDS), 4, cfg.data.n_points)
    out = model(xs, ys)
    for i in range(len(SEEDS)):
        torch.testing.assert_close(out[i], model.module(i)(xs[i], ys[i]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="leading seed dimension of 3"):
        model(xs[:2], ys[:2])


@pytest.mark.parametrize("seeds, match", [([], "at least one seed"), ([1, 1], "distinct"), ([-1], "seeds\\[0\\]"),
                                          ([0.5], "seeds\\[0\\]"), ("01", "list of ints")])
def test_bad_seeds_refused_before_anything_is_written(tmp_path: Path, seeds, match) -> None:
    with pytest.raises(ValueError, match=match):
        train_seeds(_cfg(), seeds, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_analyze_seeds_reports_every_seed_and_the_spread(stacked_run: Path) -> None:
    from taskvec_interp.synthetic.analysis import AnalysisConfig, analyze_seeds

    cfg = AnalysisConfig(n_per_basis=12, k=3, n_boot=0, checkpoints=[0, 30], patch_checkpoints=[])
    results, table, spread = analyze_seeds(stacked_run, cfg, umap=False, progress=False)
    assert sorted(results) == SEEDS and spread["seeds"] == SEEDS
    assert len(table) == len(SEEDS) * 4 and set(table["basis"]) == {"B1", "B2", "B3", "B4"}
    last = table.drop_duplicates("seed")["td_middle_last"]
    assert spread["td_middle_last"]["mean"] == pytest.approx(last.mean())
    assert spread["td_middle_last"]["std"] == pytest.approx(last.std(ddof=1))
    for s in SEEDS:
        assert results[s].summary["td_last"] == pytest.approx(float(table[table.seed == s]["td_middle_last"].iloc[0]))
        assert (seed_dir(stacked_run, s) / "analysis" / "summary.json").exists()
        # the head ablation of the last checkpoint: one row per (layer, head, basis)
        heads = results[s].heads
        assert len(heads) == 2 * 2 * 4 and set(heads["step"]) == {30}
        assert (heads["delta"] == heads["mse"] - heads["mse_base"]).all()
        assert isinstance(results[s].summary["basis_specific_heads"], list)
    assert (stacked_run / "seeds.parquet").exists() and (stacked_run / "seeds_summary.json").exists()


def test_cli_trains_and_analyzes_seeds(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from taskvec_interp.cli import app

    runner = CliRunner(env={"COLUMNS": "400"})
    bad = runner.invoke(app, ["synthetic", "train", "--out", str(tmp_path / "bad"), "--config", "tiny",
                              "--seeds", "1,1"])
    assert bad.exit_code != 0 and "distinct" in bad.output and not (tmp_path / "bad").exists()
    run = tmp_path / "run"
    ok = runner.invoke(app, ["synthetic", "train", "--out", str(run), "--config", "tiny", "--steps", "6",
                             "--seeds", "0,2"])
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in run.iterdir()) == ["result.json", "seed_0", "seed_2"]  # marked 'synthetic_seeds'
    res = runner.invoke(app, ["synthetic", "analyze", str(run), "--n-per-basis", "12", "--no-umap"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "seeds_summary.json").read_text())["seeds"] == [0, 2]
    assert (run / "seed_2" / "analysis" / "figures" / "head_ablation.png").exists()
    elsewhere = tmp_path / "elsewhere"  # --out is honoured for a seeds run too; the run is not written to
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    res = runner.invoke(app, ["synthetic", "analyze", str(run), "--out", str(elsewhere), "--n-per-basis", "12",
                              "--no-umap"])
    assert res.exit_code == 0, res.output
    assert json.loads((elsewhere / "seeds_summary.json").read_text())["seeds"] == [0, 2]
    assert (elsewhere / "seed_0" / "analysis" / "figures" / "head_ablation.png").exists()
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_adding_a_seed_to_a_trained_run_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = train_config("tiny", steps=4, eval_every=2, log_every=2, ckpt_every=2, ckpt_log_points=0, n_test_per_basis=8)
    train_seeds(cfg, [0], run, progress=False)
    before = (seed_dir(run, 0) / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="share no checkpoint step"):
        train_seeds(cfg, [0, 1], run, progress=False)
    assert (seed_dir(run, 0) / "metrics.jsonl").read_text() == before and not seed_dir(run, 1).exists()
