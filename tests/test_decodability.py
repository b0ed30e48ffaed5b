"""Tests for leave-one-out k-NN task decodability (taskvec_interp.probes.decodability)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import typing

import numpy as np
import pandas as pd
import pytest
import torch
from jaxtyping import jaxtyped
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits
from typeguard import TypeCheckError, check_type

from taskvec_interp.probes import TaskDecodability, task_decodability


def _random(n_layers: int, n: int, d: int, n_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_layers, n, d, generator=g, dtype=torch.float64)
    y = torch.randint(n_classes, (n,), generator=g)
    return x, y


def _clustered(n_layers: int, per_class: int, d: int, n_classes: int, sep: torch.Tensor, seed: int):
    """Gaussian clusters whose centre spread at layer l is sep[l] (0 = labels carry no signal)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, d, generator=g, dtype=torch.float64)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    noise = torch.randn(n_layers, len(y), d, generator=g, dtype=torch.float64)
    return noise + sep.view(-1, 1, 1) * centres[y], y


def _sklearn_loo(x: torch.Tensor, y: torch.Tensor, k: int, metric: str) -> np.ndarray:
    """The reference: fit on the other n - 1 points, predict the held-out one, layer by layer."""
    n_layers, n, _ = x.shape
    yn = y.numpy()
    out = np.empty((n_layers, n), dtype=np.int64)
    with threadpool_limits(1):  # tiny problems: OpenMP threads only add overhead (and contention)
        _loo_into(out, x, yn, k, metric)
    return out


def _loo_into(out: np.ndarray, x: torch.Tensor, yn: np.ndarray, k: int, metric: str) -> None:
    n_layers, n, _ = x.shape
    for layer in range(n_layers):
        xl = x[layer].numpy()
        for i in range(n):
            keep = np.arange(n) != i
            clf = KNeighborsClassifier(n_neighbors=k, weights="uniform", algorithm="brute", metric=metric)
            out[layer, i] = clf.fit(xl[keep], yn[keep]).predict(xl[i : i + 1])[0]


# ---------------------------------------------------------------------------------------------
# Agreement with scikit-learn
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_matches_sklearn_leave_one_out(k: int, metric: str) -> None:
    x, y = _random(n_layers=3, n=45, d=6, n_classes=4, seed=k)
    small = k >= int(torch.bincount(y).min()) - 1
    with pytest.warns(UserWarning, match="not below the smallest class") if small else contextlib.nullcontext():
        res = task_decodability(x, y, k=k, metric=metric, n_boot=0, small_classes="warn")  # the algorithm itself
    ref = _sklearn_loo(x, y, k, metric)
    np.testing.assert_array_equal(res.predictions.numpy(), ref)
    correct = ref == y.numpy()
    np.testing.assert_allclose(res.td.numpy(), correct.mean(1))
    for c in range(4):
        np.testing.assert_allclose(res.td_task[:, c].numpy(), correct[:, y.numpy() == c].mean(1))


def test_vote_ties_go_to_smallest_class_like_sklearn() -> None:
    # k = 2 with 3 classes: many 1-1 vote splits; sklearn gives them to the smaller class index.
    x, y = _random(n_layers=2, n=40, d=3, n_classes=3, seed=7)
    res = task_decodability(x, y, k=2, n_boot=0)
    np.testing.assert_array_equal(res.predictions.numpy(), _sklearn_loo(x, y, 2, "euclidean"))
    # make sure ties actually occurred: the 2 neighbours disagree for some point
    d = torch.cdist(x[0], x[0]).fill_diagonal_(math.inf)
    nbr = d.topk(2, largest=False).indices
    split = y[nbr[:, 0]] != y[nbr[:, 1]]
    assert split.any()
    assert (res.predictions[0][split] == torch.minimum(y[nbr[split, 0]], y[nbr[split, 1]])).all()


def test_cosine_zero_vectors_like_sklearn() -> None:
    # A zero vector has cosine distance 1 to everything (as in scikit-learn). Its own query is an
    # all-way distance tie (implementation-defined), so compare every *other* point's prediction.
    x, y = _random(n_layers=2, n=40, d=5, n_classes=3, seed=9)
    x[:, [3, 7]] = 0.0
    res = task_decodability(x, y, k=5, metric="cosine", n_boot=0)
    ref = _sklearn_loo(x, y, 5, "cosine")
    others = np.setdiff1d(np.arange(40), [3, 7])
    np.testing.assert_array_equal(res.predictions.numpy()[:, others], ref[:, others])


def test_tie_break_follows_label_names_order() -> None:
    # 1-D: the point at 0 has one neighbour of each class at distance 1 (and 1.1); k = 2 -> a 1-1 tie.
    x = torch.tensor([[0.0], [1.0], [-1.1], [50.0], [51.0], [-50.0], [-51.0]], dtype=torch.float64)
    labels = ["a", "b", "c", "b", "b", "c", "c"]
    kw = {"k": 2, "n_boot": 0, "small_classes": "warn"}  # class "a" has one point: warned, computed
    with pytest.warns(UserWarning):
        first = task_decodability(x, labels, label_names=["b", "c", "a"], **kw)
        swapped = task_decodability(x, labels, label_names=["c", "b", "a"], **kw)
        inferred = task_decodability(x, labels, **kw)  # sorted: a, b, c
    assert first.label_names[first.predictions[0, 0]] == "b"
    assert swapped.label_names[swapped.predictions[0, 0]] == "c"
    assert inferred.label_names == ("a", "b", "c")
    assert inferred.label_names[inferred.predictions[0, 0]] == "b"


# ---------------------------------------------------------------------------------------------
# Leave-one-out vs self-inclusive (unofficial) k-NN
# ---------------------------------------------------------------------------------------------
def test_leave_one_out_not_inflated_like_self_inclusive() -> None:
    # Pure-noise labels: nothing to decode. Self-inclusive k-NN (fit and predict on the same
    # points) lets every point vote for itself; leave-one-out stays at chance.
    x, _ = _random(n_layers=4, n=240, d=16, n_classes=4, seed=3)
    y = torch.arange(4).repeat(60)  # balanced, unrelated to x
    for k in (1, 10):
        ours = task_decodability(x, y, k=k, n_boot=0)
        self_inclusive = np.array(
            [
                (
                    KNeighborsClassifier(k).fit(x[layer].numpy(), y.numpy()).predict(x[layer].numpy())
                    == y.numpy()
                ).mean()
                for layer in range(4)
            ]
        )
        assert ours.chance == 0.25
        assert abs(ours.td.mean().item() - 0.25) < 0.06
        assert self_inclusive.mean() > ours.td.mean().item() + 0.1
        if k == 1:
            assert (self_inclusive == 1.0).all()  # each point is its own nearest neighbour


# ---------------------------------------------------------------------------------------------
# Results: values, peak, CI, frame, save/load
# ---------------------------------------------------------------------------------------------
def test_clustered_layers_peak_and_per_task() -> None:
    sep = torch.tensor([0.0, 0.5, 6.0, 2.0])
    x, y = _clustered(n_layers=4, per_class=30, d=20, n_classes=3, sep=sep, seed=0)
    res = task_decodability(x, y, layers=[10, 11, 12, 13], label_names=["x", "y", "z"], n_boot=200)
    assert res.peak_layer == 12 and res.peak_index == 2
    assert res.td[2] == 1.0 and (res.td_task[2] == 1.0).all()
    assert abs(res.td[0].item() - 1 / 3) < 0.2
    assert res.chance == pytest.approx(1 / 3)
    assert res.confusion().sum() == 90 and torch.equal(
        res.confusion(), torch.diag(torch.tensor([30, 30, 30]))
    )
    with pytest.raises(ValueError, match="layer 99"):
        res.confusion(99)


def test_bootstrap_ci_properties() -> None:
    sep = torch.tensor([0.0, 0.6, 1.0])
    x, y = _clustered(n_layers=3, per_class=40, d=10, n_classes=3, sep=sep, seed=1)
    res = task_decodability(x, y, n_boot=500, seed=5)
    assert (res.ci_low <= res.td).all() and (res.td <= res.ci_high).all()
    assert (res.task_ci_low <= res.td_task + 1e-12).all() and (res.td_task <= res.task_ci_high + 1e-12).all()
    # width ~ 2 * 1.96 * sqrt(p (1 - p) / n) for the overall CI
    p, n = res.td, res.n
    expected = 2 * 1.96 * torch.sqrt(p * (1 - p) / n)
    assert torch.allclose(res.ci_high - res.ci_low, expected, rtol=0.3, atol=0.02)
    strat = task_decodability(x, y, n_boot=500, seed=5, stratified=True)
    assert (
        torch.equal(strat.td, res.td)
        and (strat.ci_low <= strat.td).all()
        and (strat.td <= strat.ci_high).all()
    )
    none = task_decodability(x, y, n_boot=0)
    assert torch.isnan(none.ci_low).all() and torch.isnan(none.task_ci_high).all()
    assert torch.equal(none.td, res.td)


def test_deterministic_and_seeded() -> None:
    x, y = _random(n_layers=3, n=50, d=5, n_classes=3, seed=2)
    a = task_decodability(x, y, n_boot=300, seed=11)
    b = task_decodability(x.clone(), y.clone(), n_boot=300, seed=11)
    for key in TaskDecodability.TENSOR_FIELDS:
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    c = task_decodability(x, y, n_boot=300, seed=12)
    assert torch.equal(a.td, c.td) and not torch.equal(a.ci_low, c.ci_low)


def test_chunking_and_dtype_do_not_change_predictions() -> None:
    x, y = _random(n_layers=5, n=70, d=8, n_classes=4, seed=4)
    full = task_decodability(x, y, n_boot=0)
    tiny = task_decodability(x, y, n_boot=0, max_bytes=1)  # one layer, one query row at a time
    assert torch.equal(full.predictions, tiny.predictions)
    f32 = task_decodability(x.float(), y, n_boot=0, dtype=torch.float32)
    assert (f32.predictions == full.predictions).float().mean() > 0.97  # float32: rare near-tie flips
    cos = task_decodability(x, y, metric="cosine", n_boot=0, max_bytes=1)
    assert torch.equal(cos.predictions, task_decodability(x, y, metric="cosine", n_boot=0).predictions)


def test_two_dim_input_is_one_layer_and_labels_forms() -> None:
    x, y = _random(n_layers=1, n=30, d=4, n_classes=2, seed=6)
    three = task_decodability(x, y, k=3, n_boot=0)
    two = task_decodability(x[0], y.tolist(), k=3, n_boot=0)
    assert two.td.shape == (1,) and torch.equal(two.predictions, three.predictions)
    names = ["null" if v == 0 else "task" for v in y.tolist()]
    named = task_decodability(x, names, k=3, n_boot=0)
    assert named.label_names == ("null", "task") and torch.equal(named.predictions, three.predictions)
    sparse = task_decodability(x, (y * 5 + 3).numpy(), k=3, n_boot=0)  # ints {3, 8} -> classes 0, 1
    assert sparse.label_names == ("3", "8") and torch.equal(sparse.predictions, three.predictions)


def test_to_frame_is_tidy() -> None:
    x, y = _clustered(3, 20, 6, 3, torch.tensor([0.0, 1.0, 3.0]), seed=2)
    res = task_decodability(x, y, label_names=["AND", "OR", "Null"], n_boot=50)
    df = res.to_frame()
    assert list(df.columns) == [
        "layer",
        "level",
        "task",
        "td",
        "ci_low",
        "ci_high",
        "n",
        "n_per_class",
        "k",
        "metric",
        "chance",
    ]
    assert len(df) == 3 * (1 + 3)
    overall = df[df.level == "overall"]
    assert (overall.task == "all").all() and (overall.n == 60).all()
    np.testing.assert_allclose(overall.td.to_numpy(), res.td.numpy())
    per = df[df.level == "task"].pivot(index="layer", columns="task", values="td")[["AND", "OR", "Null"]]
    np.testing.assert_allclose(per.to_numpy(), res.td_task.numpy())
    assert (df[df.level == "task"].n == 20).all() and (df.k == 10).all() and (df.metric == "euclidean").all()
    overall = df[df["level"] == "overall"]
    assert (overall["n_per_class"] == 20).all() and (df[df["level"] == "task"]["n_per_class"] == 20).all()


def test_save_load_roundtrip(tmp_path) -> None:
    x, y = _clustered(3, 15, 6, 3, torch.tensor([0.0, 1.0, 3.0]), seed=3)
    res = task_decodability(
        x, y, k=5, metric="cosine", label_names=["a", "b", "c"], layers=[4, 5, 6], n_boot=40
    )
    res.save(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["td.json", "td.safetensors"]
    meta = json.loads((tmp_path / "out" / "td.json").read_text())
    assert meta["k"] == 5 and meta["metric"] == "cosine" and meta["label_names"] == ["a", "b", "c"]
    back = TaskDecodability.load(tmp_path / "out")
    for key in TaskDecodability.TENSOR_FIELDS:
        assert torch.equal(getattr(back, key), getattr(res, key)), key
    for key in TaskDecodability.META_FIELDS:
        assert getattr(back, key) == getattr(res, key), key
    pd.testing.assert_frame_equal(back.to_frame(), res.to_frame())
    assert back.peak_layer == res.peak_layer
    assert repr(back) == repr(res) and "peak_layer=" in repr(res)


# ---------------------------------------------------------------------------------------------
# Errors and shape checks
# ---------------------------------------------------------------------------------------------
_X, _Y = _random(n_layers=2, n=12, d=3, n_classes=2, seed=0)


def _with(x: torch.Tensor, index: tuple[int, ...], value: float) -> torch.Tensor:
    out = x.clone()
    out[index] = value
    return out


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 11}, "too few points"),
        ({"k": 10, "acts": _X[:, :11], "labels": _Y[:11]}, "too few points"),
        ({"k": 0}, "k must be >= 1"),
        ({"k": 2.0}, "k must be an int"),
        ({"labels": torch.zeros(12, dtype=torch.long)}, "at least 2 classes"),
        ({"labels": _Y[:10]}, "n = 12 points but labels has 10"),
        (
            {"acts": _with(_X, (1, 0, 0), math.nan)},
            r"NaN or inf .* \[1\]",
        ),
        ({"acts": _X.clone().fill_(math.inf)}, "NaN or inf"),
        ({"acts": _X.unsqueeze(0)}, "4 dims"),
        ({"acts": _X[0, :, 0]}, "1 dims"),
        ({"acts": torch.empty(2, 0, 3), "labels": []}, "empty"),
        ({"acts": torch.empty(2, 12, 0)}, "empty"),
        ({"labels": []}, "labels is empty"),
        ({"metric": "manhattan"}, "metric must be one of"),
        ({"labels": _Y.double()}, "integers or strings"),
        ({"labels": [0.5] * 12}, "integers or strings"),
        ({"labels": ["a"] * 6 + [1] * 6}, "mix strings"),
        ({"label_names": ["a"]}, "must index label_names"),
        ({"label_names": ["a", "b", "c"]}, "no points"),
        ({"label_names": ["a", "a"]}, "duplicates"),
        ({"n_boot": -1}, "n_boot"),
        ({"ci_level": 1.0}, "ci_level"),
        ({"layers": [0, 1, 2]}, "layers has 3 entries"),
        ({"small_classes": "ignore"}, "small_classes must be"),
        ({"k": 3}, "task '1' has 4 points"),
    ],
)
def test_clear_errors(kwargs: dict, match: str) -> None:
    args = {"acts": _X, "labels": _Y, "k": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        task_decodability(**args)


def test_jaxtyping_shapes() -> None:
    # typeguard 4's @typechecked re-parses source and chokes on jaxtyping's string dims, so check the
    # annotations with check_type inside one jaxtyped context (dims must bind consistently).
    hints = typing.get_type_hints(task_decodability)
    res = task_decodability(_X, _Y, k=2, n_boot=20)
    with jaxtyped("context"):
        check_type(_X, hints["acts"])
        check_type(_Y, hints["labels"])
        for field in dataclasses.fields(TaskDecodability):
            check_type(getattr(res, field.name), field.type)
    with jaxtyped("context"), pytest.raises(TypeCheckError):
        check_type(_X, hints["acts"])
        check_type(_Y[:10], hints["labels"])


def test_k_too_large_for_a_class_is_refused_or_warned() -> None:
    """Perfectly separable data: with k at a class's size minus one its points cannot win the vote, and TD would
    read 0.0. Refused by default; with small_classes='warn' computed, warned, and the table says k and n."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    y = torch.tensor([0] * 4 + [1] * 20 + [2] * 20)
    x = centres[y] + torch.randn(len(y), 2, generator=g)
    assert task_decodability(x, y, k=2, n_boot=0).td.item() == 1.0  # k below 4 - 1: separable reads 1.0
    with pytest.raises(ValueError, match=r"k = 3 is not below .* task '0' has 4 points.*use k <= 2"):
        task_decodability(x, y, k=3, n_boot=0)
    with pytest.warns(UserWarning, match="task '0' has 4 points"):
        res = task_decodability(x, y, k=10, n_boot=0, small_classes="warn")
    assert res.td_task[0, 0].item() == 0.0  # what the refusal protects against
    frame = res.to_frame()
    assert set(frame["k"]) == {10}
    assert frame[(frame["level"] == "task") & (frame["task"] == "0")]["n"].item() == 4
