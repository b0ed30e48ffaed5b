"""Emergence analysis of the synthetic model: TD over checkpoints, patching, summary, figures, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from taskvec_interp.cli import app
from taskvec_interp.figures import synthetic_figures
from taskvec_interp.probes.decodability import task_decodability
from taskvec_interp.synthetic import (
    list_checkpoints,
    load_checkpoint,
    make_test_set,
    train,
    train_config,
)
from taskvec_interp.synthetic.analysis import (
    AnalysisConfig,
    _first_below,
    analyze_run,
    capture_checkpoint,
    emergence_summary,
    patch_matrix,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("mslr-tiny")
    train(train_config("tiny", steps=120), run, progress=False)
    return run


def test_capture_matches_the_backbone_hidden_states(tiny_run):
    cfg = train_config("tiny")
    model = load_checkpoint(list_checkpoints(tiny_run)[-1][1])
    test = make_test_set(cfg.data, n_per_basis=5, seed=0)
    acts = capture_checkpoint(model, test)
    with torch.no_grad():
        hs = model.backbone(inputs_embeds=model.embed(test.xs, test.ys), output_hidden_states=True).hidden_states
    assert acts.shape == (model.n_layers, 20, model.cfg.d_model)
    for layer in range(model.n_layers - 1):  # the last entry is after the final norm
        torch.testing.assert_close(acts[layer], hs[layer + 1][:, -1], atol=1e-5, rtol=0)


def test_patch_matrix(tiny_run):
    cfg = train_config("tiny")
    model = load_checkpoint(list_checkpoints(tiny_run)[-1][1])
    test = make_test_set(cfg.data, n_per_basis=8, seed=1)
    df = patch_matrix(model, test, layer=0, n_bases=4)
    assert len(df) == 4 * 5 and set(df["target"]) == {"none", "B1", "B2", "B3", "B4"}
    with torch.no_grad():
        err = (model(test.xs, test.ys)[:, -1] - test.ys[:, -1]) ** 2
    for b in range(4):
        plain = df[(df["target"] == "none") & (df["source"] == f"B{b + 1}")]["mse"].item()
        assert plain == pytest.approx(float(err[test.basis == b].mean()), rel=1e-5)
    # patching in a basis mean changes the predictions
    assert not torch.allclose(torch.tensor(df[df["target"] == "B1"]["mse"].values),
                              torch.tensor(df[df["target"] == "none"]["mse"].values))
    added = patch_matrix(model, test, layer=0, n_bases=4, mode="add")
    assert set(added["mode"]) == {"add"}
    with pytest.raises(ValueError, match="intervention must be one of .*got 'swap'"):
        patch_matrix(model, test, layer=0, n_bases=4, mode="swap")
    with pytest.raises(ValueError, match="patch mode 'ablate' takes no vector"):
        patch_matrix(model, test, layer=0, n_bases=4, mode="ablate")
    # the y token of the last demonstration comes after the scored read-out: patching it changes nothing
    with pytest.raises(ValueError, match="patch layer 1"):  # after the last block nothing reads token -3
        patch_matrix(model, test, layer=1, n_bases=4)
    with pytest.raises(ValueError, match="patch position -1"):
        patch_matrix(model, test, layer=0, n_bases=4, position=-1)
    with pytest.raises(ValueError, match="patch position"):
        patch_matrix(model, test, layer=0, n_bases=4, position=-2 * test.xs.shape[1] - 1)
    # patching the query token itself (the x_K it must regress on) is allowed, and differs from the default
    query = patch_matrix(model, test, layer=0, n_bases=4, position=-2)
    assert not np.allclose(query["mse"].values, df["mse"].values)
    with pytest.raises(ValueError, match="'context'"):
        patch_matrix(model, test, layer=0, n_bases=4, position="demos")


def test_context_patch_overwrites_every_demonstration(tiny_run):
    # "context" replaces the residual after block l at all 2K - 2 tokens before the query x_K, each with
    # the target basis' mean at that token. Checked against plain torch forward hooks on the block.
    cfg = train_config("tiny")
    model = load_checkpoint(list_checkpoints(tiny_run)[-1][1])
    test = make_test_set(cfg.data, n_per_basis=8, seed=1)
    layer, n_ctx = 0, 2 * cfg.data.n_points - 2
    seen = {}
    handle = model.blocks[layer].register_forward_hook(lambda m, i, o: seen.__setitem__("h", o.detach().clone()))
    try:
        with torch.no_grad():
            model(test.xs, test.ys)
    finally:
        handle.remove()
    means = torch.stack([seen["h"][test.basis == b, :n_ctx].mean(0) for b in range(4)])  # [basis, token, d]
    want = []
    for t in range(4):
        def patch(m, i, o, t=t):
            o = o.clone()
            o[:, :n_ctx] = means[t]
            return o
        handle = model.blocks[layer].register_forward_hook(patch)
        try:
            with torch.no_grad():
                err = (model(test.xs, test.ys)[:, -1] - test.ys[:, -1]) ** 2
        finally:
            handle.remove()
        want += [float(err[test.basis == b].mean()) for b in range(4)]
    got = patch_matrix(model, test, layer=layer, n_bases=4, position="context")
    assert set(got["position"]) == {"context"}
    patched = got[got["target"] != "none"].sort_values(["target", "source"])
    np.testing.assert_allclose(patched["mse"].values, want, rtol=1e-5)
    single = patch_matrix(model, test, layer=layer, n_bases=4, position=-3)
    single = single[single["target"] != "none"].sort_values(["target", "source"])
    assert not np.allclose(single["mse"].values, patched["mse"].values)


def test_analyze_run_tables_summary_and_figures(tiny_run, tmp_path):
    cfg = AnalysisConfig(n_per_basis=20, n_boot=20, umap_checkpoints=2, umap_layers=[0, 1], k=5)
    res = analyze_run(tiny_run, cfg, progress=False)
    steps = [s for s, _ in list_checkpoints(tiny_run)]
    overall = res.td[res.td["level"] == "overall"]
    assert sorted(overall["step"].unique()) == steps
    assert len(overall) == len(steps) * 2  # tiny: 2 layers
    # TD at the last checkpoint equals a direct computation on the same test set
    model = load_checkpoint(list_checkpoints(tiny_run)[-1][1])
    test = make_test_set(train_config("tiny").data, n_per_basis=20, seed=cfg.seed)
    direct = task_decodability(capture_checkpoint(model, test), test.basis, k=5, n_boot=0)
    last = overall[overall["step"] == steps[-1]].sort_values("layer")["td"].tolist()
    assert last == pytest.approx(direct.td.tolist())
    assert set(res.loss["basis"]) == {"B1", "B2", "B3", "B4"}
    assert len(res.embeddings) == 2 * 2
    assert set(res.patching["step"]) == {steps[len(steps) // 2], steps[-1]}
    assert set(res.summary["bases"]) == {"B1", "B2", "B3", "B4"}
    assert "basis_ridge" in res.summary["oracles"]
    out = res.save(tmp_path)
    assert json.loads((out / "summary.json").read_text())["td_layer"] == 1
    orc = res.summary["oracles"]
    for i, (name, b) in enumerate(res.summary["bases"].items()):
        ridge, rank_r = orc["full_ridge"][f"b{i}"], orc["basis_ridge"][f"b{i}"]
        assert b["gap_closed"] == pytest.approx((ridge - b["final_mse"]) / (ridge - rank_r))
        assert b["below_ridge_step"] is None  # 120 steps: still above every basis-agnostic predictor
        assert name == f"B{i + 1}" and rank_r < ridge
    pd.testing.assert_frame_equal(pd.read_parquet(out / "td.parquet"), res.td)
    paths = synthetic_figures(res, tmp_path)
    assert [p.name for p in paths] == ["loss_and_td.png", "td_heatmap.png", "umap_grid.png", "patching.png",
                                        "head_ablation.png"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_summary_finds_drop_and_rise_steps():
    steps = [0, 10, 20, 30, 40, 50]
    loss = pd.DataFrame([{"step": s, "basis": b, "mse": m} for b, ms in
                         {"B1": [4, 4, 0.2, 0.1, 0.1, 0.1], "B2": [4, 4, 4, 4, 0.3, 0.1], "B3": [4, 4, 3.9, 4, 3.9, 3.8]}.items()
                         for s, m in zip(steps, ms, strict=True)])
    td = pd.DataFrame([{"step": s, "layer": 1, "level": lvl, "task": t, "td": v, "chance": 1 / 3}
                       for t, vs, lvl in (("B1", [0.3, 0.3, 0.9, 1, 1, 1], "task"), ("B2", [0.3] * 4 + [1, 1], "task"),
                                          ("B3", [0.3] * 6, "task"), ("all", [0.3, 0.3, 0.5, 0.6, 0.9, 0.9], "overall"))
                       for s, v in zip(steps, vs, strict=True)])
    out = emergence_summary(td, loss, ["B1", "B2", "B3"], td_layer=1)
    assert out["bases"]["B1"]["loss_drop_step"] == 20 and out["bases"]["B1"]["td_rise_step"] == 20
    assert out["bases"]["B2"]["loss_drop_step"] == 40 and out["bases"]["B2"]["td_rise_step"] == 40
    assert out["bases"]["B3"]["loss_drop_step"] is None and out["bases"]["B3"]["td_rise_step"] is None
    assert (out["td_first"], out["td_last"]) == (0.3, 0.9)
    # below_ridge_step: a lone dip under the threshold is smoothed away; 1.0 itself is not below 1.0
    vals, stp = [2, 2, 0.5, 2, 2, 1.0, 0.9, 0.8], [0, 1, 2, 3, 4, 5, 6, 7]
    assert _first_below(stp, vals, 1.0) == 6
    assert _first_below(stp, vals, 0.5) is None


def test_bad_analysis_inputs(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="no checkpoints"):
        analyze_run(tmp_path)
    with pytest.raises(ValueError, match="td_layer 5 out of range"):
        analyze_run(tiny_run, AnalysisConfig(td_layer=5))
    with pytest.raises(ValueError, match="not in"):
        analyze_run(tiny_run, AnalysisConfig(checkpoints=[999999]))


def test_synthetic_cli_train_resume_and_analyze(tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, ["synthetic", "train", "--out", str(run), "--config", "tiny", "--steps", "60"])
    assert res.exit_code == 0, res.output
    first = [s for s, _ in list_checkpoints(run)]
    assert first[-1] == 60
    res = runner.invoke(app, ["synthetic", "train", "--out", str(run), "--config", "tiny", "--steps", "80"])
    assert res.exit_code == 0, res.output  # resumes from step 60
    assert [s for s, _ in list_checkpoints(run)][-1] == 80
    res = runner.invoke(app, ["synthetic", "analyze", str(run), "--n-per-basis", "12", "--no-umap"])
    assert res.exit_code == 0, res.output
    assert (run / "analysis" / "summary.json").exists()
    assert (run / "analysis" / "figures" / "loss_and_td.png").exists()
    assert set(pd.read_parquet(run / "analysis" / "patching.parquet")["position"]) == {"context"}
    res = runner.invoke(app, ["synthetic", "analyze", str(run), "--out", str(tmp_path / "one"), "--n-per-basis", "12",
                              "--no-umap", "--patch-position", "-3"])
    assert res.exit_code == 0, res.output
    assert set(pd.read_parquet(tmp_path / "one" / "patching.parquet")["position"]) == {"-3"}
    res = runner.invoke(app, ["synthetic", "analyze", str(run), "--patch-position", "last", "--no-umap"])
    assert res.exit_code != 0 and "AnalysisConfig.patch_position" in res.output + str(res.exception)
    xy = tmp_path / "xy"
    res = runner.invoke(app, ["synthetic", "train", "--out", str(xy), "--config", "tiny", "--steps", "4", "--tokens", "xy"])
    assert res.exit_code == 0, res.output
    assert json.loads((xy / "config.json").read_text())["model"]["tokens"] == "xy"
    res = runner.invoke(app, ["synthetic", "train", "--out", str(tmp_path / "bad"), "--config", "tiny", "--tokens", "pairs"])
    assert res.exit_code != 0 and "token layout" in str(res.exception)
