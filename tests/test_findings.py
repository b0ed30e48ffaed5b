"""The findings scoreboard (taskvec_interp.findings) and its tests (taskvec_interp.probes.stats): constructed tables
for every verdict of every finding, the verdict follows the statistic (never the paper's number), the exact
McNemar test against scipy, reproducible bootstraps, the HTML scoreboard, and an end-to-end run on tiny real
results."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from taskvec_interp import findings as FM
from taskvec_interp.experiments.finetune import FinetuneComparison
from taskvec_interp.experiments.sweep import fit_td_accuracy
from taskvec_interp.figures.report import VERDICT_COLOURS, scoreboard_html, write_demo_report
from taskvec_interp.findings import COLUMNS, findings
from taskvec_interp.probes import stats as S

R, NR, INC, NRUN = S.REPRODUCED, S.NOT_REPRODUCED, S.INCONCLUSIVE, S.NOT_RUN
TASKS = ("a", "b", "c", "d")
BOOT = {"n_boot": 400, "seed": 0}


def rows_of(table: pd.DataFrame, finding: str, aspect: str | None = None) -> pd.DataFrame:
    sub = table[table["finding"] == finding]
    return sub if aspect is None else sub[sub["aspect"] == aspect]


def one_verdict(table: pd.DataFrame, finding: str, aspect: str) -> str:
    sub = rows_of(table, finding, aspect)
    assert len(sub) == 1, sub
    return str(sub["verdict"].iloc[0])


# ------------------------------------------------------------------------------------------------
# the statistical tests
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,c", [(0, 0), (1, 0), (0, 1), (3, 10), (15, 44), (50, 50), (0, 25), (120, 80), (7, 8)])
def test_mcnemar_exact_matches_scipy_binomtest(b, c):
    from scipy.stats import binomtest

    first = np.array([True] * b + [False] * c + [True] * 5 + [False] * 4)  # 9 concordant pairs
    second = np.array([False] * b + [True] * c + [True] * 5 + [False] * 4)
    m = S.mcnemar_exact(first, second)
    assert (m.b, m.c, m.n) == (b, c, b + c + 9)
    want = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert m.p_value == pytest.approx(want, rel=1e-12, abs=1e-300)
    assert S.mcnemar_exact(second, first).p_value == pytest.approx(m.p_value)  # two-sided: symmetric


def test_binomial_p_and_bad_inputs():
    assert S.binomial_two_sided_p(0, 10) == pytest.approx(2 / 1024)
    assert S.binomial_two_sided_p(5, 10) == 1.0
    with pytest.raises(ValueError):
        S.binomial_two_sided_p(11, 10)
    with pytest.raises(ValueError):
        S.mcnemar_exact([True, False], [True])


def test_paired_bootstrap_is_reproducible_and_paired():
    rng = np.random.default_rng(1)
    a = rng.random(200) < 0.6
    b = rng.random(200) < 0.4
    strata = np.repeat(["x", "y"], 100)
    one = S.paired_bootstrap(a, b, n_boot=500, seed=7, strata=strata)
    assert one == S.paired_bootstrap(a, b, n_boot=500, seed=7, strata=strata)
    assert one == S.paired_bootstrap(a, b, n_boot=500, generator=np.random.default_rng(7), strata=strata)
    assert one != S.paired_bootstrap(a, b, n_boot=500, seed=8, strata=strata)
    assert one.estimate == pytest.approx(a.mean() - b.mean()) and one.ci_low < one.estimate < one.ci_high
    # pairing: identical columns shifted by a constant have a zero-width CI
    x = rng.random(50)
    tight = S.paired_bootstrap(x + 0.1, x, n_boot=200, seed=0)
    assert tight.ci_low == pytest.approx(0.1) and tight.ci_high == pytest.approx(0.1)
    loose = S.bootstrap_difference(x + 0.1, x, n_boot=200, seed=0)
    assert loose.ci_high - loose.ci_low > 0.05  # unpaired: the spread of x enters
    idx = S.resample_indices(6, 100, np.random.default_rng(0), strata=["p", "p", "q", "q", "q", "r"])
    assert idx.shape == (100, 6) and set(idx[:, -1]) == {5}  # a stratum keeps its size and its members
    with pytest.raises(ValueError):
        S.paired_bootstrap(a, b, seed=-1)


def test_verdict_helper():
    assert S.verdict(0.1, 0.3) == R and S.verdict(-0.3, -0.1) == NR and S.verdict(-0.1, 0.2) == INC
    assert S.verdict(0.0, 0.2) == INC  # touching the threshold is not on a side
    assert S.verdict(-0.3, -0.1, side="less") == R and S.verdict(0.1, 0.3, side="less") == NR
    assert S.verdict(0.1, 0.3, p_value=0.2) == INC and S.verdict(0.1, 0.3, p_value=0.01) == R
    assert S.verdict(0.1, 0.3, p_value=0.02, alpha=0.01) == INC
    assert S.verdict(math.nan, 0.3) == INC
    assert S.verdict(0.5, 0.7, threshold=0.6) == INC and S.verdict(0.65, 0.7, threshold=0.6) == R
    with pytest.raises(ValueError):
        S.verdict(0.1, 0.3, side="up")


def test_ci_combinations():
    d, lo, hi = S.difference_from_cis((0.8, 0.7, 0.9), (0.5, 0.4, 0.6))
    assert d == pytest.approx(0.3) and hi - lo == pytest.approx(0.2 * math.sqrt(2), rel=1e-9)
    d, lo, hi = S.newcombe_difference(60, 100, 40, 100)
    assert d == pytest.approx(0.2) and 0.05 < lo < 0.08 and 0.32 < hi < 0.35  # Newcombe 1998's order of magnitude


# ------------------------------------------------------------------------------------------------
# constructed results
# ------------------------------------------------------------------------------------------------
def _correct(p: float, n: int, shift: int = 0) -> list[bool]:
    k = int(round(p * n))
    out = [i < k for i in range(n)]
    return out[shift:] + out[:shift]


def make_sweep(td: dict[tuple[str, int, int], float], *, points: bool, n: int = 40, half: float = 0.05,
               accuracy: pd.DataFrame | None = None, fit: dict | None = None) -> SimpleNamespace:
    """A sweep-like object from TD per (context, shots, layer): per-point correctness with that TD in every task
    (``points``: the ``td_points`` table too; the correct points differ between layers), overall and per-task rows with CIs +- ``half``."""
    pts, rows = [], []
    for (ctx, shots, layer), value in td.items():
        for t, task in enumerate(TASKS):
            for i, c in enumerate(_correct(value, n, shift=7 * layer % n)):  # layers not nested
                pts.append({"layer": layer, "shots": shots, "context": ctx, "index": t * n + i, "task": task,
                            "correct": c})
        rows.append({"layer": layer, "level": "overall", "task": "all", "td": value, "ci_low": value - half,
                     "ci_high": value + half, "shots": shots, "context": ctx})
        rows += [{"layer": layer, "level": "task", "task": task, "td": value, "ci_low": value - half,
                  "ci_high": value + half, "shots": shots, "context": ctx} for task in TASKS]
    table = pd.DataFrame(rows)
    acc = accuracy if accuracy is not None else pd.DataFrame(
        [{"task": t, "shots": s, "exact": 0.5} for t in TASKS for s in sorted({k[1] for k in td})])
    return SimpleNamespace(td=table, accuracy=acc, fit=fit or {"layer": 1, "r2": math.nan, "slope": math.nan},
                           td_points=pd.DataFrame(pts) if points else None,
                           config=SimpleNamespace(fit_include_null=False))


def curve(values: list[float], shots: int = 4, ctx: str = "demos") -> dict:
    return {(ctx, shots, layer): v for layer, v in enumerate(values)}


# ------------------------------------------------------------------------------------------------
# F2: TD rises with shots; TD gained from the context
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("points", [True, False])
@pytest.mark.parametrize("low,high,want", [(0.3, 0.8, R), (0.8, 0.3, NR), (0.5, 0.525, INC)])
def test_f2_shots_every_verdict(points, low, high, want):
    td = {("demos", 1, layer): low for layer in range(3)} | {("demos", 10, layer): high for layer in range(3)}
    table = findings(sweeps={"pos": make_sweep(td, points=points)}, **BOOT)
    row = rows_of(table, "F2", "shots").iloc[0]
    assert row["verdict"] == want and row["estimate"] == pytest.approx(high - low)
    assert ("bootstrap over points" in row["test"]) == points
    assert one_verdict(table, "F2", "context") == NRUN  # no input-only control in this sweep


def test_f2_shots_is_paired_when_both_shot_counts_ask_the_same_queries():
    td = {("demos", 1, layer): 0.5 for layer in range(3)} | {("demos", 4, layer): 0.6 for layer in range(3)}
    sweep = make_sweep(td, points=True)
    same = pd.DataFrame([{"shots": s, "prompt_id": i, "task": TASKS[i // 40], "query": f"q{i}"}
                         for s in (1, 4) for i in range(160)])
    sweep.predictions = same
    paired = rows_of(findings(sweeps={"pos": sweep}, **BOOT), "F2", "shots").iloc[0]
    assert "paired bootstrap" in paired["test"]
    sweep.predictions = same.assign(query=same["query"] + same["shots"].astype(str))  # other queries per shot count
    unpaired = rows_of(findings(sweeps={"pos": sweep}, **BOOT), "F2", "shots").iloc[0]
    assert "two prompt sets" in unpaired["test"] and unpaired["estimate"] == pytest.approx(paired["estimate"])


def test_f2_not_run():
    assert one_verdict(findings(**BOOT), "F2", "shots") == NRUN
    one_shot = make_sweep(curve([0.3, 0.5, 0.4], shots=4), points=True)
    assert one_verdict(findings(sweeps={"pos": one_shot}, **BOOT), "F2", "shots") == NRUN


@pytest.mark.parametrize("points", [True, False])
@pytest.mark.parametrize("k_td,ctx_td,want", [(0.8, 0.3, R), (0.3, 0.8, NR), (0.5, 0.5, INC)])
def test_f2_context_and_labels_every_verdict(points, k_td, ctx_td, want):
    td = (curve([k_td] * 3, 1) | curve([k_td] * 3, 4) | curve([ctx_td] * 3, 0, "input_only")
          | curve([ctx_td] * 3, 4, "shuffled"))
    table = findings(sweeps={"fv": make_sweep(td, points=points)}, **BOOT)
    for aspect in ("context", "labels"):
        row = rows_of(table, "F2", aspect).iloc[0]
        assert row["verdict"] == want, (aspect, row.to_dict())
        assert row["estimate"] == pytest.approx(k_td - ctx_td)
        assert ("paired bootstrap" in row["test"]) == points


def test_f2_context_is_paired_on_the_same_queries():
    """The same queries, the context flipping exactly 3 of 160: paired, the CI excludes 0; unpaired it would not."""
    td = curve([0.5] * 3, 1) | curve([0.5] * 3, 4) | curve([0.5] * 3, 0, "input_only")
    sweep = make_sweep(td, points=True)
    pts = sweep.td_points
    flip = pts.index[(pts["context"] == "input_only") & pts["correct"]][:3]
    pts.loc[flip, "correct"] = False  # three queries the demonstrations decode and the input alone does not
    row = rows_of(findings(sweeps={"fv": sweep}, **BOOT), "F2", "context").iloc[0]
    assert row["estimate"] == pytest.approx(3 / 160) and row["ci_low"] >= 0


# ------------------------------------------------------------------------------------------------
# F3: TD peaks in the middle layers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("points", [True, False])
@pytest.mark.parametrize("values,want", [([0.3, 0.6, 0.9, 0.6, 0.4], R), ([0.1, 0.2, 0.3, 0.4, 0.9], NR),
                                         ([0.5, 0.5, 0.525, 0.5, 0.5], INC)])
def test_f3_every_verdict(points, values, want):
    table = findings(sweeps={"bitwise": make_sweep(curve(values), points=points)}, **BOOT)
    row = rows_of(table, "F3", "peak").iloc[0]
    assert row["verdict"] == want, row.to_dict()
    assert row["estimate"] == pytest.approx(max(values[1:-1]) - max(values[0], values[-1]))


def test_f3_not_run():
    assert one_verdict(findings(**BOOT), "F3", "peak") == NRUN
    two = make_sweep(curve([0.3, 0.6]), points=False)
    assert one_verdict(findings(sweeps={"pos": two}, **BOOT), "F3", "peak") == NRUN


# ------------------------------------------------------------------------------------------------
# F4: TD predicts accuracy
# ------------------------------------------------------------------------------------------------
def f4_sweep(sign: float, noise: float, seed: int = 0) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    tasks = [f"t{i}" for i in range(8)]
    rows, acc = [], []
    for shots in (1, 4, 10):
        for i, task in enumerate(tasks):
            td = 0.2 + 0.08 * i + 0.02 * shots
            rows.append({"layer": 2, "level": "task", "task": task, "td": td, "shots": shots})
            acc.append({"task": task, "shots": shots,
                        "exact": float(np.clip(0.5 + sign * (td - 0.6) + noise * rng.normal(), 0, 1))})
        rows.append({"layer": 2, "level": "overall", "task": "all", "td": 0.5, "shots": shots})
    td, accuracy = pd.DataFrame(rows), pd.DataFrame(acc)
    return SimpleNamespace(td=td, accuracy=accuracy, fit=fit_td_accuracy(td, accuracy), td_points=None,
                           config=SimpleNamespace(fit_include_null=False))


@pytest.mark.parametrize("sign,noise,want", [(1.0, 0.01, R), (-1.0, 0.01, NR), (0.0, 0.2, INC)])
def test_f4_every_verdict(sign, noise, want):
    sweep = f4_sweep(sign, noise)
    row = rows_of(findings(sweeps={"pos": sweep}, **BOOT), "F4", "fit").iloc[0]
    assert row["verdict"] == want, row.to_dict()
    assert row["estimate"] == pytest.approx(sweep.fit["slope"]) and row["p_value"] == pytest.approx(sweep.fit["p_value"])
    assert f"R^2 {sweep.fit['r2']:.2f}" in row["ours"] and "R^2 0.78" in row["paper"]


def test_f4_undefined_fit_and_not_run():
    sweep = f4_sweep(1.0, 0.0)
    sweep.accuracy["exact"] = 0.3  # constant accuracy: no fit
    sweep.fit = fit_td_accuracy(sweep.td, sweep.accuracy)
    assert one_verdict(findings(sweeps={"pos": sweep}, **BOOT), "F4", "fit") == INC
    assert one_verdict(findings(**BOOT), "F4", "fit") == NRUN


# ------------------------------------------------------------------------------------------------
# F5: patching, k-shot and zero-shot
# ------------------------------------------------------------------------------------------------
def make_patch(base: float, pos: float, neg: float, n: int = 30, layer: int = 3) -> SimpleNamespace:
    rows = []
    for cond, (direction, vector, p) in enumerate((("baseline", "none", base), ("positive", "own", pos),
                                                  ("negative", "null", neg))):
        for t, task in enumerate([*TASKS, "null"]):
            for i, c in enumerate(_correct(p, n)):
                rows.append({"condition": cond, "layer": pd.NA if cond == 0 else layer,
                             "mode": "none" if cond == 0 else "add", "vector": vector, "scale": 1.0,
                             "direction": direction, "prompt_id": t * n + i, "task": task, "exact": c})
    return SimpleNamespace(predictions=pd.DataFrame(rows), summary={"layer": layer})


@pytest.mark.parametrize("base,pos,neg,want_pos,want_neg", [
    (0.4, 0.8, 0.1, R, R), (0.6, 0.2, 0.9, NR, NR), (0.5, 0.5, 0.5, INC, INC)])
def test_f5_every_verdict(base, pos, neg, want_pos, want_neg):
    table = findings(patching={"bitwise": make_patch(base, pos, neg)}, **BOOT)
    p, n = rows_of(table, "F5", "positive").iloc[0], rows_of(table, "F5", "negative").iloc[0]
    assert (p["verdict"], n["verdict"]) == (want_pos, want_neg)
    assert p["estimate"] == pytest.approx(round(pos * 30) / 30 - round(base * 30) / 30)
    assert "McNemar" in p["test"] and "120 queries" in p["ours"]  # 4 tasks x 30, the Null task's left out
    assert one_verdict(table, "F5", "zero-shot") == NRUN


def test_f5_not_run():
    table = findings(**BOOT)
    assert {one_verdict(table, "F5", a) for a in ("positive", "negative", "zero-shot")} == {NRUN}


def make_zero_shot(base: float, tv: float, n: int = 40, layer: int = 5) -> pd.DataFrame:
    rows = []
    for split in ("dev", "test"):
        for task in TASKS:
            for q, (b, v, i) in enumerate(zip(_correct(base, n), _correct(tv, n), _correct(0.9, n), strict=True)):
                rows += [{"task": task, "split": split, "layer": pd.NA, "condition": "baseline", "vector": "",
                          "query": q, "exact": b, "first_token": b},
                         {"task": task, "split": split, "layer": pd.NA, "condition": "icl", "vector": "",
                          "query": q, "exact": i, "first_token": i}]
                for other in (layer - 1, layer):  # another layer, where the vector does nothing
                    value = v if other == layer else b
                    rows += [{"task": task, "split": split, "layer": other, "condition": "task_vector",
                              "vector": vec, "query": q, "exact": value, "first_token": value}
                             for vec in ("per_query", "per_task")]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("base,tv,want", [(0.1, 0.6, R), (0.6, 0.1, NR), (0.3, 0.3, INC)])
def test_f5_zero_shot_every_verdict(base, tv, want):
    table = findings(zero_shot={"fv": (make_zero_shot(base, tv), 5)}, **BOOT)
    sub = rows_of(table, "F5", "zero-shot")
    assert len(sub) == 2 and set(sub["verdict"]) == {want}  # per_query and per_task vectors
    assert sub["estimate"].iloc[0] == pytest.approx(round(tv * 40) / 40 - round(base * 40) / 40)
    assert "ICL 0.900" in sub["ours"].iloc[0]
    obj = SimpleNamespace(predictions=make_zero_shot(base, tv), chosen_layer=5)  # an object works as well
    assert set(rows_of(findings(zero_shot={"fv": obj}, **BOOT), "F5", "zero-shot")["verdict"]) == {want}


def test_f5_zero_shot_reads_a_zero_shot_result():
    """Layers per vector (``chosen_layer``) or per vector and task (``task_layers``); the result's own scoring."""
    preds = make_zero_shot(0.1, 0.6)
    preds["layer"] = preds["layer"].fillna(-1).astype("int64")  # baseline and ICL rows at layer -1
    by_vector = rows_of(findings(zero_shot={"fv": (preds, {"per_query": 5, "per_task": 4})}, **BOOT), "F5",
                        "zero-shot")
    assert list(by_vector["verdict"]) == [R, INC] and "vector per_task" in by_vector["note"].iloc[1]
    task_layers = {"per_query": dict.fromkeys(TASKS, 5), "per_task": {"a": 5, "b": 5, "c": 4, "d": 4}}
    tv = preds["condition"] == "task_vector"
    preds.loc[tv, "exact"] = preds.loc[tv, "exact"] & False  # right by first token only
    result = SimpleNamespace(predictions=preds, chosen_layer={"per_query": 5, "per_task": 5}, task_layers=task_layers,
                             config=SimpleNamespace(scoring="first_token"))
    sub = rows_of(findings(zero_shot={"fv": result}, **BOOT), "F5", "zero-shot")
    assert list(sub["verdict"]) == [R, R] and "first_token" in sub["ours"].iloc[0]
    assert "layers [4, 5] (per task)" in sub["ours"].iloc[1]
    assert sub["estimate"].iloc[1] == pytest.approx(sub["estimate"].iloc[0] / 2)  # half the tasks at a dead layer
    exact = rows_of(findings(zero_shot={"fv": result}, zero_shot_metric="exact", **BOOT), "F5", "zero-shot")
    assert set(exact["verdict"]) == {NR}  # by exact match the vector loses the baseline's 10 %


def test_f5_zero_shot_uses_its_own_alpha():
    """A gain whose McNemar p is between 0.01 and 0.05: reproduced at alpha 0.05, inconclusive at 0.01."""
    preds = make_zero_shot(0.25, 0.25)
    gain = preds.index[(preds["split"] == "test") & (preds["condition"] == "task_vector") & (preds["layer"] == 5)
                       & ~preds["exact"]]
    gain = preds.loc[gain].drop_duplicates(["task", "query", "vector"]).groupby("vector").head(9).index
    preds.loc[gain, "exact"] = True  # 9 queries the vector gets right and the baseline wrong: p = 2/2^9
    p = rows_of(findings(zero_shot={"fv": (preds, 5)}, **BOOT), "F5", "zero-shot")["p_value"].iloc[0]
    assert p == pytest.approx(2 / 2**9)
    assert set(rows_of(findings(zero_shot={"fv": (preds, 5)}, **BOOT), "F5", "zero-shot")["verdict"]) == {R}
    preds.loc[gain[::3], "exact"] = False  # 6 discordant pairs per vector: p = 2/64 = 0.031
    table = findings(zero_shot={"fv": (preds, 5)}, **BOOT)
    assert rows_of(table, "F5", "zero-shot")["p_value"].iloc[0] == pytest.approx(2 / 64)
    assert set(rows_of(table, "F5", "zero-shot")["verdict"]) == {INC}
    assert set(rows_of(findings(zero_shot={"fv": (preds, 5)}, zero_shot_alpha=0.05, **BOOT), "F5",
                       "zero-shot")["verdict"]) == {R}


# ------------------------------------------------------------------------------------------------
# F6: fine-tuning first vs last layers
# ------------------------------------------------------------------------------------------------
def eval_like(acc: float, td: float, n: int = 30) -> SimpleNamespace:
    preds = pd.DataFrame([{"prompt_id": t * n + i, "task": task, "query": f"{task}{i}", "answer": "x", "exact": c,
                           "first_token": c}
                          for t, task in enumerate(TASKS) for i, c in enumerate(_correct(acc, n))])
    tdt = pd.DataFrame([{"layer": layer, "level": "overall", "task": "all", "shots": 4,
                         "td": td if layer == 1 else td - 0.2, "ci_low": td - 0.05 - (layer != 1) * 0.2,
                         "ci_high": td + 0.05 - (layer != 1) * 0.2} for layer in range(3)])
    return SimpleNamespace(predictions=preds, td=tdt, td_points=None)


def run_like(spec: str, acc: float, td: float, pretrained: SimpleNamespace | None) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(layers=spec), layers=[0, 1] if "first" in spec else [8, 9],
                           model={"n_layers": 10}, label=f"lora {spec}", eval=eval_like(acc, td),
                           eval_pretrained=pretrained)


@pytest.mark.parametrize("first,last,want", [(0.8, 0.3, R), (0.2, 0.7, NR), (0.5, 0.5, INC)])
def test_f6_every_verdict_from_runs(first, last, want):
    pre = eval_like(0.2, 0.4)
    runs = [run_like("first:2", first, 0.4 + (first - last), pre), run_like("last:2", last, 0.4, pre)]
    table = findings(finetune={"bitwise": runs}, **BOOT)
    acc = rows_of(table, "F6", "accuracy").iloc[0]
    assert acc["verdict"] == want and "McNemar" in acc["test"]
    assert acc["estimate"] == pytest.approx(round(first * 30) / 30 - round(last * 30) / 30)
    assert one_verdict(table, "F6", "TD") == want  # TD of first-k minus pretrained moves with the same sign here


def test_f6_comparison_and_not_run():
    per = pd.DataFrame([{"model": m, "task": t, "exact": e + 0.01 * i, "td": d + 0.01 * i}
                        for m, e, d in (("pretrained", 0.2, 0.4), ("lora first:10", 0.7, 0.8), ("lora last:10", 0.3, 0.4))
                        for i, t in enumerate(TASKS)])
    comp = FinetuneComparison(pd.DataFrame(), per, pd.DataFrame())
    table = findings(finetune={"pos": comp}, **BOOT)
    assert one_verdict(table, "F6", "accuracy") == R and one_verdict(table, "F6", "TD") == R
    assert "over tasks" in rows_of(table, "F6", "accuracy")["test"].iloc[0]
    assert one_verdict(findings(**BOOT), "F6", "accuracy") == NRUN
    only_first = [run_like("first:2", 0.8, 0.6, None)]
    table = findings(finetune={"pos": only_first}, **BOOT)
    assert one_verdict(table, "F6", "accuracy") == NRUN and one_verdict(table, "F6", "TD") == NRUN


# ------------------------------------------------------------------------------------------------
# F1: coupled emergence (synthetic)
# ------------------------------------------------------------------------------------------------
def make_analysis(events: dict[str, tuple[int | None, int | None]], spacing: int = 100,
                  end: int = 10000) -> SimpleNamespace:
    steps = list(range(0, end + 1, spacing))
    td = pd.DataFrame([{"step": s, "layer": 2, "level": "overall", "task": "all", "td": 0.5} for s in steps])
    loss = pd.DataFrame([{"step": s, "basis": b, "mse": 1.0} for s in steps for b in events])
    bases = {b: {"loss_drop_step": 50, "below_ridge_step": drop, "td_rise_step": rise} for b, (drop, rise) in
             events.items()}
    oracles = {"full_ridge": {f"b{i}": 0.1 for i in range(len(events))}}
    return SimpleNamespace(summary={"td_layer": 2, "bases": bases, "oracles": oracles}, td=td, loss=loss)


@pytest.mark.parametrize("events,spacing,want", [
    ({"B1": (1000, 1100), "B2": (3000, 3000), "B3": (5000, 4900), "B4": (6000, 6200)}, 100, R),
    ({"B1": (1000, 6000), "B2": (3000, 3000), "B3": (5000, 4900), "B4": (6000, 6200)}, 100, NR),
    ({"B1": (1000, 1900), "B2": (3000, 3000), "B3": (5000, 5000), "B4": (6000, 6000)}, 100, INC),  # 0.09 +- 0.01
    ({"B1": (1000, 1000), "B2": (None, None), "B3": (5000, 5000), "B4": (6000, 6000)}, 100, INC),  # B2 never emerged
    ({"B1": (1000, 1000), "B2": (5000, None), "B3": (5000, 5000), "B4": (6000, 6000)}, 100, NR),  # TD never rose
])
def test_f1_every_verdict(events, spacing, want):
    row = rows_of(findings(synthetic=make_analysis(events, spacing), **BOOT), "F1").iloc[0]
    assert row["verdict"] == want, row.to_dict()
    assert row["side"] == "less" and row["threshold"] == 0.1


def test_f1_not_run_pools_seeds_and_tolerance():
    assert one_verdict(findings(**BOOT), "F1", "coupling") == NRUN
    ok = make_analysis({"B1": (1000, 1100), "B2": (3000, 3000)})
    late = make_analysis({"B1": (1000, 2500), "B2": (3000, 3000)})
    assert one_verdict(findings(synthetic={0: ok, 1: ok}, **BOOT), "F1", "coupling") == R
    assert one_verdict(findings(synthetic={0: ok, 1: late}, **BOOT), "F1", "coupling") == NR  # the worst basis
    assert one_verdict(findings(synthetic=late, f1_tolerance=0.2, **BOOT), "F1", "coupling") == R


# ------------------------------------------------------------------------------------------------
# the verdict follows the statistic, never the paper
# ------------------------------------------------------------------------------------------------
def everything(flip: bool = False) -> dict:
    lo, hi = (0.8, 0.3) if flip else (0.3, 0.8)
    td = {("demos", 1, layer): lo for layer in range(3)} | {("demos", 10, layer): hi for layer in range(3)}
    return {"sweeps": {"pos": make_sweep(td, points=True)},
            "patching": {"pos": make_patch(0.5, 0.2 if flip else 0.8, 0.8 if flip else 0.2)},
            "zero_shot": {"pos": (make_zero_shot(0.6 if flip else 0.1, 0.1 if flip else 0.6), 5)}}


def test_verdicts_ignore_the_paper_and_flip_with_the_data(monkeypatch):
    before = findings(**everything(), **BOOT)
    assert list(before.columns) == list(COLUMNS) and set(before["verdict"]) <= set(S.VERDICTS)
    # the paper's numbers and claims rewritten to say the opposite: no verdict moves
    monkeypatch.setattr(FM, "PAPER", {k: {"*": "TD falls with shots; patching lowers accuracy; R^2 -1"}
                                      for k in FM.PAPER})
    after = findings(**everything(), **BOOT)
    pd.testing.assert_series_equal(before["verdict"], after["verdict"])
    assert (after["paper"].str.startswith("TD falls") | (after["paper"] == "")).all()
    assert (before["paper"] != after["paper"]).any()
    # the data flipped: every decided verdict flips
    flipped = findings(**everything(flip=True), **BOOT)
    swap = {R: NR, NR: R, INC: INC, NRUN: NRUN}
    decided = before["verdict"].isin([R, NR])
    assert decided.sum() >= 5
    assert (flipped["verdict"][decided] == before["verdict"][decided].map(swap)).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        findings(alpha=1.5)
    with pytest.raises(ValueError, match="metric"):
        findings(metric="logprob")
    with pytest.raises(ValueError, match="zero_shot_metric"):
        findings(zero_shot_metric="logprob")
    with pytest.raises(ValueError, match="f1_tolerance"):
        findings(f1_tolerance=0)


# ------------------------------------------------------------------------------------------------
# the HTML scoreboard
# ------------------------------------------------------------------------------------------------
@dataclass
class _QuickConfig:
    quick: bool = True

    def resolved(self) -> dict:
        return {}


def test_scoreboard_html_colours_every_verdict(tmp_path):
    table = findings(**everything(), **BOOT)
    table.loc[0, "note"] = "<b>escaped</b>"
    html = scoreboard_html(table)
    assert html.count("<tr>") == len(table) + 1
    for verdict in set(table["verdict"]):
        assert f"background:{VERDICT_COLOURS[verdict]}'>{verdict}</td>" in html
    assert "&lt;b&gt;escaped&lt;/b&gt;" in html and "<b>escaped" not in html
    with pytest.raises(ValueError, match="lacks columns"):
        scoreboard_html(table.drop(columns="verdict"))
    # at the top of the demo report
    from taskvec_interp.io import claim_result_dir

    claim_result_dir(tmp_path, "demo")
    result = SimpleNamespace(out=str(tmp_path), model={"name": "tiny"}, config=_QuickConfig(), parts=[], seconds=1.0)
    page = write_demo_report(result, scoreboard=table).read_text()
    assert page.index("id='scoreboard'") < page.index("id='provenance'") and "Findings scoreboard" in page
    result.findings = table  # or from the result itself
    assert "id='scoreboard'" in write_demo_report(result).read_text()


# ------------------------------------------------------------------------------------------------
# end to end on tiny real results
# ------------------------------------------------------------------------------------------------
def test_findings_on_a_tiny_real_sweep_and_patching(tiny_smol, tmp_path):
    from taskvec_interp.experiments.patching import PatchConfig, run_patching
    from taskvec_interp.experiments.sweep import SweepConfig, run_sweep

    controls = {"controls": ("input_only", "shuffled")} if "controls" in SweepConfig.__dataclass_fields__ else {}
    sweep = run_sweep(tiny_smol, SweepConfig(family="bitwise", shots=(1, 2), n_per_task=6, n_boot=20, k=3,
                                             batch_size=32, **controls), progress=False)
    patch = run_patching(tiny_smol, PatchConfig(family="bitwise", n_per_task=4, layers=[1], modes=("add",),
                                                n_boot=20, k=2, batch_size=16), peak_layer=1, progress=False)
    table = findings(sweeps={"bitwise": sweep}, patching={"bitwise": patch}, n_boot=200)
    assert list(table.columns) == list(COLUMNS) and set(table["verdict"]) <= set(S.VERDICTS)
    for finding, aspect in (("F2", "shots"), ("F3", "peak"), ("F4", "fit"), ("F5", "positive"), ("F5", "negative")):
        sub = rows_of(table, finding, aspect)
        assert len(sub) >= 1 and (sub["family"] == "bitwise").all()
        assert (sub["verdict"] != NRUN).all(), sub.to_dict("records")
    assert set(rows_of(table, "F1")["verdict"]) == {NRUN} and set(rows_of(table, "F6")["verdict"]) == {NRUN}
    if controls:  # TD gained from the context: paired on the same queries through td_points
        for aspect in ("context", "labels"):
            row = rows_of(table, "F2", aspect).iloc[0]
            assert row["verdict"] != NRUN and "paired bootstrap" in row["test"], row.to_dict()
    shots_row = rows_of(table, "F2", "shots").iloc[0]  # the points' means are the TD table's values
    overall = sweep.td[(sweep.td["level"] == "overall") & (sweep.td.get("context", "demos") == "demos")]
    layer = int(overall.groupby("layer")["td"].mean().idxmax())
    at = overall[overall["layer"] == layer].set_index("shots")["td"]
    assert shots_row["estimate"] == pytest.approx(at[2] - at[1])
    # decided rows: the verdict is the helper's verdict of the row's own CI and p-value
    for r in table[table["verdict"] != NRUN].to_dict("records"):
        if r["finding"] in ("F2", "F3", "F5"):
            p = None if math.isnan(r["p_value"]) else r["p_value"]
            assert r["verdict"] == S.verdict(r["ci_low"], r["ci_high"], threshold=r["threshold"], side=r["side"],
                                             p_value=p), r
    # from directories as well
    again = findings(sweeps={"bitwise": sweep.save(tmp_path / "sweep")},
                     patching={"bitwise": patch.save(tmp_path / "patch")}, n_boot=200)
    pd.testing.assert_frame_equal(again, table)
