"""The appendix variants: the mixture of regression families, 6 and 8 (overlapping) bases (fast, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from taskvec_interp.synthetic import (
    FAMILIES,
    FamilyMixtureConfig,
    MSLRConfig,
    TrainConfig,
    load_run_config,
    make_test_set,
    oracle_errors,
    oracle_summary,
    sample_batch,
    train,
    train_config,
)
from taskvec_interp.synthetic.analysis import AnalysisConfig, analyze_run, basis_groups
from taskvec_interp.synthetic.families import data_config_from_dict, data_config_to_dict

torch.set_num_threads(1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _leaky(u: torch.Tensor, a: float) -> torch.Tensor:
    return torch.where(u >= 0, u, a * u)


# ------------------------------------------------------------------------------------------ families


def test_family_sampler_shapes_reproducible_and_formulas() -> None:
    cfg = FamilyMixtureConfig(n_dims=6, n_points=7, sparse_rank=2, leaky_slope=0.2, noise_var=0.0)
    assert cfg.n_bases == 4 and cfg.families == FAMILIES
    b = sample_batch(cfg, 64, _gen(3))
    assert b.xs.shape == (64, 7, 6) and b.ys.shape == (64, 7) and b.w.shape == (64, 6) and b.basis.shape == (64,)
    again = sample_batch(cfg, 64, _gen(3))
    assert torch.equal(b.xs, again.xs) and torch.equal(b.ys, again.ys) and torch.equal(b.basis, again.basis)
    assert not torch.equal(b.ys, sample_batch(cfg, 64, _gen(4)).ys)
    assert set(b.basis.tolist()) == {0, 1, 2, 3}
    # each family's formula, recomputed here from xs and w (noise_var = 0: exact)
    x, w = b.xs.double(), b.w.double()
    lin = torch.einsum("bkd,bd->bk", x, w)
    expect = {
        "linear": lin,
        "sparse": lin,
        "leaky_relu": math.sqrt(2 / (1 + 0.2**2)) * _leaky(lin, 0.2),
        "quadratic": torch.einsum("bkd,bd->bk", x**2, w) / math.sqrt(3),
    }
    for j, fam in enumerate(cfg.families):
        sel = b.basis == j
        torch.testing.assert_close(b.ys[sel].double(), expect[fam][sel], atol=1e-5, rtol=1e-5)
        nonzero = (b.w[sel] != 0).sum(-1)
        assert (nonzero == (2 if fam == "sparse" else 6)).all(), fam


def test_family_scaling_and_noise() -> None:
    """Every family has E[f^2] = 1 (the documented normalisation); noise has variance noise_var."""
    cfg = FamilyMixtureConfig(n_dims=8, n_points=10, sparse_rank=3, noise_var=0.0)
    test = make_test_set(cfg, n_per_basis=1500, seed=7)
    for j, fam in enumerate(cfg.families):
        m = float((test.ys[test.basis == j] ** 2).mean())
        assert abs(m - 1.0) < 0.12, (fam, m)
    noisy = FamilyMixtureConfig(n_dims=8, n_points=10, families=("linear",), noise_var=0.25)
    g = sample_batch(noisy, 2000, _gen(1))
    resid = g.ys - torch.einsum("bkd,bd->bk", g.xs, g.w)
    assert abs(float(resid.var()) - 0.25) < 0.02


def test_family_subset_and_test_set_balanced() -> None:
    cfg = FamilyMixtureConfig(n_dims=4, n_points=5, families=("quadratic", "linear"), sparse_rank=2)
    test = make_test_set(cfg, n_per_basis=9, seed=0)
    assert test.basis.tolist() == [0] * 9 + [1] * 9  # label = index in families, balanced and sorted
    assert torch.equal(test.ys, make_test_set(cfg, n_per_basis=9, seed=0).ys)
    q = test.basis == 0
    torch.testing.assert_close(test.ys[q], torch.einsum("bkd,bd->bk", test.xs[q] ** 2, test.w[q]) / math.sqrt(3),
                               atol=0.6, rtol=0)  # noise std 0.1: within 6 sigma


def test_family_oracles() -> None:
    cfg = FamilyMixtureConfig(n_dims=4, n_points=12, sparse_rank=2)
    test = make_test_set(cfg, n_per_basis=40, seed=2)
    s = oracle_summary(cfg, test)
    assert set(s) == {"family_best", "full_ridge", "full_ols", "zero"}
    assert s["family_best"]["b2"] is None and s["family_best"]["all"] is None  # leaky_relu: undefined
    assert s["family_best"]["b0"] == pytest.approx(s["full_ridge"]["b0"])  # linear: ridge is Bayes
    for j in (1, 3):  # the family-aware oracle beats ridge on x at the last position for sparse and quadratic
        e = oracle_errors(cfg, test.xs, test.ys, test.basis, w=test.w)
        sel = test.basis == j
        assert float(e["family_best"][sel][:, -1].mean()) < float(e["full_ridge"][sel][:, -1].mean())
    torch.testing.assert_close(torch.tensor(s["zero"]["all"]), (test.ys**2).mean())
    with pytest.raises(ValueError, match="needs w"):
        oracle_errors(cfg, test.xs, test.ys, test.basis)
    with pytest.raises(ValueError, match="basis_ridge"):
        oracle_summary(cfg, test, ("basis_ridge",))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"families": ("linear", "cubic")}, "cubic"),
    ({"families": ("linear", "sparse", "linear")}, "linear"),
    ({"families": ()}, "at least one"),
    ({"families": "linear"}, "'linear'"),
    ({"n_dims": 4, "sparse_rank": 5}, "sparse_rank \\(5\\)"),
    ({"leaky_slope": math.nan}, "nan"),
    ({"leaky_slope": math.inf}, "inf"),
    ({"noise_var": -1.0}, "-1.0"),
    ({"n_points": 0}, "n_points"),
])
def test_family_bad_inputs(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FamilyMixtureConfig(**kwargs)


# ------------------------------------------------------------------------------- configs and JSON


def test_named_variants_build() -> None:
    c6 = train_config("bases6_d24")
    assert isinstance(c6.data, MSLRConfig) and (c6.data.n_dims, c6.data.rank, c6.data.n_bases) == (24, 4, 6)
    assert c6.data.layout == "disjoint" and c6.model.n_dims == 24 and c6.model.n_layer == 8
    small = train_config("small")
    for cfg in (c6, train_config("overlap8_d16"), train_config("families")):
        assert cfg.model.d_model == small.model.d_model and cfg.model.tokens == small.model.tokens
        assert (cfg.lr, cfg.betas, cfg.warmup_steps, cfg.batch_size) == (3e-3, (0.9, 0.99), 200, 128)
        assert cfg.model.n_points == cfg.data.n_points
    c8 = train_config("overlap8_d16")
    assert (c8.data.n_dims, c8.data.rank, c8.data.n_bases, c8.data.layout) == (16, 4, 8, "overlapping")
    assert basis_groups(c8.data) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert basis_groups(c6.data) is None
    fam = train_config("families", model="tiny", data={"n_points": 6})
    assert isinstance(fam.data, FamilyMixtureConfig) and fam.data.n_points == 6 and fam.model.n_layer == 2
    assert basis_groups(fam.data) is None


def test_variant_whose_bases_do_not_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="rank \\* n_bases <= n_dims"):
        train_config("bases6_d24", data={"n_dims": 20})
    with pytest.raises(ValueError, match="not a multiple"):
        train_config("overlap8_d16", data={"n_bases": 6})
    with pytest.raises(ValueError, match="sparse_rank"):
        train_config("families", data={"sparse_rank": 9})
    with pytest.raises(ValueError, match="rank"):
        train_config("families", data={"rank": 2})  # an MSLR field on a family mixture


def test_train_config_json_round_trip_keeps_the_data_kind() -> None:
    for name in ("small", "overlap8_d16", "families"):
        cfg = train_config(name)
        d = json.loads(json.dumps(cfg.to_dict()))
        assert d["data"]["kind"] == ("families" if name == "families" else "mslr")
        back = TrainConfig.from_dict(d)
        assert back == cfg and type(back.data) is type(cfg.data)
    old = train_config("small").to_dict()  # a config.json written before "kind" existed
    del old["data"]["kind"]
    assert TrainConfig.from_dict(old) == train_config("small")
    with pytest.raises(ValueError, match="'cubes'"):
        data_config_from_dict({"kind": "cubes"})
    assert data_config_to_dict(FamilyMixtureConfig())["families"] == list(FAMILIES)


# ------------------------------------------------------------------------------ training + analysis


def _tiny(name: str, **data) -> TrainConfig:
    return train_config(name, model="tiny", steps=20, warmup_steps=2, batch_size=16, eval_every=10, log_every=10,
                        ckpt_every=10,
                        ckpt_log_points=2, n_test_per_basis=8, **({"data": data} if data else {}))


def test_overlap_variant_trains_and_reports_group_td(tmp_path) -> None:
    cfg = _tiny("overlap8_d16", n_points=6)
    train(cfg, tmp_path, progress=False)
    assert load_run_config(tmp_path) == cfg
    res = analyze_run(tmp_path, AnalysisConfig(n_per_basis=12, k=3, n_boot=0), umap=False, progress=False)
    s = res.summary
    assert s["groups"] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert 0.0 <= s["td_group_first"] <= 1.0 and 0.0 <= s["td_group_last"] <= 1.0
    assert s["group_chance"] == pytest.approx(0.5) and s["chance"] == pytest.approx(1 / 8)
    tg = res.td_group
    assert set(tg.loc[tg["level"] == "task", "task"]) == {"G1", "G2"}
    last = tg[(tg["step"] == tg["step"].max()) & (tg["layer"] == s["td_layer"]) & (tg["level"] == "overall")]
    assert float(last["td"].iloc[0]) == s["td_group_last"]
    # computed on the group labels: the same k-NN as the analysis, recomputed here
    from taskvec_interp.probes.decodability import task_decodability
    from taskvec_interp.synthetic import list_checkpoints, load_checkpoint
    from taskvec_interp.synthetic.analysis import capture_checkpoint

    test = make_test_set(cfg.data, n_per_basis=12, seed=AnalysisConfig().seed)
    acts = capture_checkpoint(load_checkpoint(list_checkpoints(tmp_path)[-1][1]), test)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])[test.basis]
    td = task_decodability(acts[s["td_layer"]], groups, k=3, n_boot=0)
    assert float(td.td[0]) == pytest.approx(s["td_group_last"])
    assert all(isinstance(b["gap_closed"], float) for b in s["bases"].values())
    assert (res.save(tmp_path / "analysis") / "td_group.parquet").is_file()


def test_families_variant_trains_and_analyses(tmp_path) -> None:
    cfg = _tiny("families", n_points=6)
    train(cfg, tmp_path, progress=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["data"]["kind"] == "families"
    assert isinstance(load_run_config(tmp_path).data, FamilyMixtureConfig)
    train(cfg, tmp_path, progress=False)  # resume check: the saved config compares equal
    res = analyze_run(tmp_path, AnalysisConfig(n_per_basis=12, k=3, n_boot=0), umap=False, progress=False)
    s = res.summary
    assert s["families"] == {"B1": "linear", "B2": "sparse", "B3": "leaky_relu", "B4": "quadratic"}
    assert "td_group_last" not in s and res.td_group is None
    assert set(s["oracles"]) == {"family_best", "full_ridge", "full_ols", "zero"}
    for b in s["bases"].values():
        assert b["gap_closed"] is None and b["final_mse"] is not None
    assert 0.0 <= s["td_last"] <= 1.0
    json.dumps(s)  # None oracles are plain JSON
