"""Task-decodability figures (taskvec_interp.figures.td): content, files and input errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from taskvec_interp import figures
from taskvec_interp.probes.decodability import task_decodability

SHOTS = (1, 4, 10)
TASKS = ("and", "or", "xor", "null")
LAYERS = tuple(range(8))
PEAKS = {1: 3, 4: 4, 10: 5}  # overall TD peak layer per shot count in the synthetic table
MIN_PNG = 5_000


def _td_table(family: str | None = None, peaks: dict[int, int] = PEAKS, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for shots in SHOTS:
        for layer in LAYERS:
            top = 0.4 + 0.05 * shots
            v = top - 0.08 * abs(layer - peaks[shots])
            rows.append({"layer": layer, "level": "overall", "task": "all", "td": v, "ci_low": v - 0.04,
                         "ci_high": v + 0.04, "n": 400, "k": 10, "metric": "euclidean", "chance": 0.25,
                         "shots": shots})
            for task in TASKS:
                t = float(np.clip(v + rng.normal(0, 0.05), 0, 1))
                rows.append({"layer": layer, "level": "task", "task": task, "td": t, "ci_low": t - 0.1,
                             "ci_high": min(1.0, t + 0.1), "n": 100, "k": 10, "metric": "euclidean",
                             "chance": 0.25, "shots": shots})
    df = pd.DataFrame(rows)
    return df if family is None else df.assign(family=family)


def _acc_table(family: str | None = None) -> pd.DataFrame:
    rows = [{"task": task, "shots": shots, "n": 100, "exact": 0.1 * i + 0.02 * shots, "first_token": 0.5}
            for i, task in enumerate(TASKS) for shots in SHOTS]
    df = pd.DataFrame(rows)
    return df if family is None else df.assign(family=family)


FIT = {"family": "bitwise", "layer": 4, "r2": 0.634, "slope": 0.8, "intercept": 0.1, "n_points": 9}


def _png_ok(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > MIN_PNG
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

# ---- TD by layer -----------------------------------------------------------------------------------------
def test_td_peaks():
    td = _td_table()
    peaks = figures.td_peaks(td)
    assert list(peaks.columns) == ["shots", "layer", "td", "chance"]
    assert dict(zip(peaks["shots"], peaks["layer"], strict=True)) == PEAKS
    # ties go to the earliest layer; NaN is ignored
    td.loc[(td["level"] == "overall") & (td["shots"] == 1), "td"] = [0.1, 0.9, 0.5, 0.9, np.nan, 0.2, 0.2, 0.2]
    assert figures.td_peaks(td).set_index("shots").loc[1, "layer"] == 1
    two = pd.concat([_td_table("a"), _td_table("b", peaks={1: 0, 4: 7, 10: 2})], ignore_index=True)
    got = figures.td_peaks(two).set_index(["family", "shots"])["layer"].to_dict()
    assert got[("a", 10)] == 5 and got[("b", 4)] == 7 and len(got) == 6


def test_plot_td_by_layer(tmp_path):
    out = tmp_path / "nested" / "dir" / "td.png"
    fig = figures.plot_td_by_layer(_td_table(), path=out, title="my title")
    assert isinstance(fig, Figure)
    _png_ok(out)
    (ax,) = fig.axes
    lines = list(ax.get_lines())
    assert len(lines) == len(SHOTS) + 1  # one per shot count + the chance line
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["1-shot", "4-shot", "10-shot", "chance"]
    chance = lines[-1]
    assert chance.get_linestyle() == "--" and set(chance.get_ydata()) == {0.25}
    np.testing.assert_array_equal(lines[0].get_xdata(), LAYERS)
    stars = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert [int(s.get_offsets()[0][0]) for s in stars] == [PEAKS[s] for s in SHOTS]
    assert len(ax.collections) == 2 * len(SHOTS)  # CI bands + peak stars
    assert ax.get_title() == "my title"
    assert {t.get_text() for t in ax.texts} == {f"L{layer}" for layer in PEAKS.values()}


def test_plot_td_by_layer_families_ax_and_missing_ci():
    two = pd.concat([_td_table("bitwise"), _td_table("pos", peaks={1: 0, 4: 7, 10: 2})], ignore_index=True)
    fig = figures.plot_td_by_layer(two)
    assert len(fig.axes) == 2
    assert [a.get_title() for a in fig.axes] == ["bitwise", "pos"]
    for a in fig.axes:
        assert len(a.get_lines()) == len(SHOTS) + 1
    star_x = [int(c.get_offsets()[0][0]) for c in fig.axes[1].collections if isinstance(c, PathCollection)]
    assert star_x == [0, 7, 2]
    with pytest.raises(ValueError, match="families"):
        figures.plot_td_by_layer(two, ax=Figure().add_subplot())
    with pytest.raises(ValueError, match="family"):  # two families without a family column
        figures.plot_td_by_layer(two.drop(columns="family"))

    # one family into a given axes; CIs all NaN -> no bands
    td = _td_table().assign(ci_low=np.nan, ci_high=np.nan)
    host = Figure()
    ax = host.add_subplot(1, 2, 2)
    assert figures.plot_td_by_layer(td, ax=ax) is host
    assert len(ax.get_lines()) == len(SHOTS) + 1
    assert len(ax.collections) == len(SHOTS)  # stars only


def test_plot_td_by_layer_from_task_decodability_frame(tmp_path):
    """A bare TaskDecodability.to_frame() (no shots, no family) plots as one series."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(12)
    acts = torch.randn(4, 36, 6, generator=g)
    acts[2] += 3 * torch.nn.functional.one_hot(labels, 6).float()  # layer 2 decodes the task
    res = task_decodability(acts, labels, k=5, n_boot=50, label_names=["a", "b", "c"])
    frame = res.to_frame()
    fig = figures.plot_td_by_layer(frame, path=tmp_path / "td.png")
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 2
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["TD", "chance"]
    assert int(ax.collections[-1].get_offsets()[0][0]) == res.peak_layer == 2
    fig = figures.plot_task_td(frame)
    assert "layer 2" in fig.axes[0].get_title()
    _png_ok(tmp_path / "td.png")


# ---- Per-task TD -----------------------------------------------------------------------------------------
def _bars(ax):
    return list(ax.patches)


def test_plot_task_td_defaults_and_choices(tmp_path):
    td = _td_table()
    fig = figures.plot_task_td(td, path=tmp_path / "bars.png")
    _png_ok(tmp_path / "bars.png")
    (ax,) = fig.axes
    bars = _bars(ax)
    assert len(bars) == len(TASKS)
    # default: largest shot count at its overall peak layer
    expected = td[(td["level"] == "task") & (td["shots"] == 10) & (td["layer"] == PEAKS[10])]["td"].to_numpy()
    np.testing.assert_allclose([b.get_height() for b in bars], expected)
    assert f"layer {PEAKS[10]}" in ax.get_title() and "10-shot" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == list(TASKS)
    chance = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(chance) == 1 and set(chance[0].get_ydata()) == {0.25}
    (err_container,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(err_container.lines[2][0].get_segments()) == len(TASKS)  # one CI bar per task
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["chance"]

    fig = figures.plot_task_td(td, shots=1)
    assert f"layer {PEAKS[1]}" in fig.axes[0].get_title()
    fig = figures.plot_task_td(td, layer=0, shots=4)
    expected = td[(td["level"] == "task") & (td["shots"] == 4) & (td["layer"] == 0)]["td"].to_numpy()
    np.testing.assert_allclose([b.get_height() for b in _bars(fig.axes[0])], expected)

    with pytest.raises(ValueError, match="layer 99 not in"):
        figures.plot_task_td(td, layer=99)
    with pytest.raises(ValueError, match="shots=3 not in"):
        figures.plot_task_td(td, shots=3)
    with pytest.raises(ValueError, match="per-task rows"):
        figures.plot_task_td(td[td["level"] == "overall"])
    with pytest.raises(ValueError, match="overall"):
        figures.plot_task_td(td[td["level"] == "task"])  # no overall rows for the default layer
    # ...but an explicit layer needs none, and NaN CIs are fine
    fig = figures.plot_task_td(td[td["level"] == "task"].assign(ci_low=np.nan), layer=2)
    assert len(_bars(fig.axes[0])) == len(TASKS)


def test_plot_task_td_families():
    two = pd.concat([_td_table("bitwise"), _td_table("pos", peaks={1: 0, 4: 7, 10: 2})], ignore_index=True)
    fig = figures.plot_task_td(two)
    assert len(fig.axes) == 2
    assert "bitwise" in fig.axes[0].get_title() and f"layer {PEAKS[10]}" in fig.axes[0].get_title()
    assert "pos" in fig.axes[1].get_title() and "layer 2" in fig.axes[1].get_title()


def test_plot_task_td_heatmap(tmp_path):
    td = _td_table()
    fig = figures.plot_task_td_heatmap(td, path=tmp_path / "heat.png")
    _png_ok(tmp_path / "heat.png")
    images = [im for a in fig.axes for im in a.get_images()]
    assert len(images) == 1 and isinstance(images[0], AxesImage)
    data = images[0].get_array()
    assert data.shape == (len(TASKS), len(LAYERS))
    rows = td[(td["level"] == "task") & (td["shots"] == 10)]
    np.testing.assert_allclose(data[2], rows[rows["task"] == "xor"].sort_values("layer")["td"])
    assert len(fig.axes) == 2  # heatmap + colour bar
    assert f"L{PEAKS[10]}" in fig.axes[0].get_title()
    fig = figures.plot_task_td_heatmap(td, shots=1)
    assert "1-shot" in fig.axes[0].get_title()

    two = pd.concat([_td_table("bitwise"), _td_table("pos")], ignore_index=True)
    fig = figures.plot_task_td_heatmap(two)
    assert len(fig.axes) == 3
    # a missing cell is masked, not dropped
    holes = td.drop(index=td[(td["task"] == "or") & (td["layer"] == 3)].index)
    data = figures.plot_task_td_heatmap(holes).axes[0].get_images()[0].get_array()
    assert data.shape == (len(TASKS), len(LAYERS)) and bool(data.mask[1, 3])
    with pytest.raises(ValueError, match="shots=2 not in"):
        figures.plot_task_td_heatmap(td, shots=2)


# ---- TD vs accuracy --------------------------------------------------------------------------------------
def _points(ax) -> np.ndarray:
    return np.concatenate([c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)])


def test_plot_td_vs_accuracy(tmp_path):
    td, acc = _td_table("bitwise"), _acc_table("bitwise")
    fig = figures.plot_td_vs_accuracy(td, acc, FIT, path=tmp_path / "a" / "scatter.png")
    _png_ok(tmp_path / "a" / "scatter.png")
    (ax,) = fig.axes
    pts = _points(ax)
    assert len(pts) == (len(TASKS) - 1) * len(SHOTS)  # Null excluded
    assert len(ax.collections) == len(SHOTS)  # one collection (marker) per shot count
    assert len({c.get_paths()[0].vertices.tobytes() for c in ax.collections}) == len(SHOTS)
    # the x values are per-task TD at the fit layer, y the exact accuracy
    at = td[(td["level"] == "task") & (td["layer"] == FIT["layer"]) & (td["task"] != "null")]
    assert sorted(pts[:, 0]) == pytest.approx(sorted(at["td"]))
    real = acc[acc["task"] != "null"]
    assert sorted(pts[:, 1]) == pytest.approx(sorted(real["exact"]))
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), FIT["intercept"] + FIT["slope"] * line.get_xdata())
    assert "R² = 0.63" in ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "fit, R² = 0.63" and "null" not in labels and "10-shot" in labels

    fig = figures.plot_td_vs_accuracy(td, acc, FIT, include_null=True)
    assert len(_points(fig.axes[0])) == len(TASKS) * len(SHOTS)
    # no family anywhere; NaN fit -> no line, "n/a"
    nofam = {k: v for k, v in FIT.items() if k != "family"} | {"r2": math.nan, "slope": math.nan}
    fig = figures.plot_td_vs_accuracy(_td_table(), _acc_table(), nofam)
    assert len(fig.axes[0].get_lines()) == 0 and "n/a" in fig.axes[0].get_title()


def test_plot_td_vs_accuracy_with_many_tasks_puts_the_legend_in_two_columns_beside_wider_axes():
    """23 tasks (the built-in fv family): a 1-column legend would run past the figure's height."""
    many = [f"task{i:02d}" for i in range(23)]
    td = pd.DataFrame([{"layer": 4, "level": "task", "task": t, "td": 0.04 * i, "shots": s}
                       for i, t in enumerate(many) for s in SHOTS])
    acc = pd.DataFrame([{"task": t, "shots": s, "exact": 0.03 * i} for i, t in enumerate(many) for s in SHOTS])
    fig = figures.plot_td_vs_accuracy(td, acc, {k: v for k, v in FIT.items() if k != "family"})
    few = figures.plot_td_vs_accuracy(_td_table(), _acc_table(), {k: v for k, v in FIT.items() if k != "family"})
    assert fig.axes[0].get_legend()._ncols == 2 and few.axes[0].get_legend()._ncols == 1
    assert fig.get_size_inches()[0] > few.get_size_inches()[0]
    assert len(fig.axes[0].get_legend().get_texts()) == 1 + len(many) + len(SHOTS)


def test_plot_td_vs_accuracy_joins_by_family():
    td = pd.concat([_td_table("bitwise"), _td_table("pos", seed=1)], ignore_index=True)
    acc = pd.concat([_acc_table("bitwise"), _acc_table("pos").assign(exact=0.99)], ignore_index=True)
    fig = figures.plot_td_vs_accuracy(td, acc, FIT | {"family": "pos"})
    pts = _points(fig.axes[0])
    assert len(pts) == 9 and np.all(pts[:, 1] == pytest.approx(0.99))
    with pytest.raises(ValueError, match="family 'nope'"):
        figures.plot_td_vs_accuracy(td, acc, FIT | {"family": "nope"})
    without = {k: v for k, v in FIT.items() if k != "family"}
    with pytest.raises(ValueError, match="several families"):
        figures.plot_td_vs_accuracy(td, acc.drop(columns="family"), without)


def test_plot_td_vs_accuracy_errors():
    td, acc = _td_table(), _acc_table()
    with pytest.raises(ValueError, match="fit layer 42 not in"):
        figures.plot_td_vs_accuracy(td, acc, FIT | {"layer": 42})
    with pytest.raises(ValueError, match=r"missing key\(s\) \['r2'\]"):
        figures.plot_td_vs_accuracy(td, acc, {k: v for k, v in FIT.items() if k != "r2"})
    with pytest.raises(ValueError, match=r"accuracy table is missing column\(s\) \['exact'\]"):
        figures.plot_td_vs_accuracy(td, acc.drop(columns="exact"), FIT)
    with pytest.raises(ValueError, match="accuracy table is empty"):
        figures.plot_td_vs_accuracy(td, acc.iloc[:0], FIT)
    with pytest.raises(ValueError, match="no \\(task, shots\\) pairs in common"):
        figures.plot_td_vs_accuracy(td, acc.assign(shots=acc["shots"] + 100), FIT)
    with pytest.raises(ValueError, match="no \\(task, shots\\) pairs in common"):  # only Null in common
        figures.plot_td_vs_accuracy(td, acc[acc["task"] == "null"], FIT)


# ---- Table errors shared by the TD plots -----------------------------------------------------------------
@pytest.mark.parametrize("fn", [figures.plot_td_by_layer, figures.plot_task_td, figures.plot_task_td_heatmap, figures.td_peaks])
def test_td_table_errors(fn):
    td = _td_table()
    with pytest.raises(ValueError, match="TD table is empty"):
        fn(td.iloc[:0])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['layer'\]"):
        fn(td.drop(columns="layer"))
    with pytest.raises(ValueError, match="DataFrame"):
        fn(td.to_dict())


def test_td_by_layer_needs_overall_rows():
    with pytest.raises(ValueError, match="no overall rows"):
        figures.plot_td_by_layer(_td_table().query("level == 'task'"))

