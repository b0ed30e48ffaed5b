"""Intervention figures (taskvec_interp.figures.patching): every mode of a table is drawn, in the order of
the interventions registry and with its label; a mode the registry does not know is an error."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from taskvec_interp import figures
from taskvec_interp import hooks as H
from taskvec_interp.experiments.patching import direction_of, patch_conditions
from taskvec_interp.interventions import (
    Intervention,
    intervention_names,
    register_intervention,
    unregister_intervention,
)

TASKS = ["AND", "OR", "null"]
MIN_PNG = 5_000


def _accuracy_table(modes=("add", "replace", "ablate"), layers=(2, 5)) -> pd.DataFrame:
    rows = []
    for i, c in enumerate(patch_conditions(list(layers), modes, ("matrix", "positive", "negative"), TASKS)):
        for j, task in enumerate(TASKS):
            acc = 0.3 + 0.1 * j + (0.0 if c["vector"] == "none" else 0.01 * i)
            rows.append({"condition": i, **c, "direction": direction_of(c["vector"]), "task": task, "n": 10,
                         "accuracy": acc, "ci_low": acc - 0.1, "ci_high": acc + 0.1, "delta": acc - (0.3 + 0.1 * j)})
    return pd.DataFrame(rows)


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_bars_draw_every_mode_in_registry_order_with_its_label(tmp_path):
    acc = _accuracy_table(modes=("ablate", "replace", "add"))  # table order is not the drawing order
    fig = figures.plot_patch_bars(acc, 5, path=tmp_path / "bars.png")
    assert (tmp_path / "bars.png").stat().st_size > MIN_PNG
    assert _titles(fig) == ["add task vector at layer 5", "replace task vector at layer 5", "zero ablation at layer 5"]
    add, _, ablate = fig.axes
    assert len(add.patches) == 3 * len(TASKS)  # baseline, positive, negative
    assert [t.get_text() for t in add.get_legend().get_texts()] == ["baseline", "positive", "negative"]
    assert len(ablate.patches) == 2 * len(TASKS)  # baseline, ablation: the intervention takes no vector
    assert [t.get_text() for t in ablate.get_legend().get_texts()] == ["baseline", "ablation"]
    want = acc[(acc["mode"] == "ablate") & (acc["layer"] == 5)]["accuracy"].tolist()
    assert [p.get_height() for p in ablate.patches][len(TASKS):] == pytest.approx(want)
    assert _titles(figures.plot_patch_bars(acc, 5, mode="replace")) == ["replace task vector at layer 5"]


def test_heatmap_and_matrix_use_the_registry(tmp_path):
    acc = _accuracy_table()
    fig = figures.plot_patch_heatmap(acc, "positive")
    assert _titles(fig) == ["positive (add): accuracy change", "positive (replace): accuracy change"]
    fig = figures.plot_patch_heatmap(acc, "ablation")
    assert _titles(fig) == ["ablation (zero ablation): accuracy change"]
    want = acc[acc["mode"] == "ablate"].pivot_table(index="layer", columns="task", values="delta", sort=False)
    assert np.allclose(np.asarray(fig.axes[0].images[0].get_array()), want.sort_index().to_numpy())
    fig = figures.plot_patch_matrix(acc, 2, "add")
    assert fig.axes[0].get_title() == "add at layer 2: accuracy change"


def test_an_unknown_mode_is_an_error_not_dropped():
    acc = _accuracy_table(modes=("add",))
    odd = pd.concat([acc, acc[acc["mode"] == "add"].assign(mode="rotate")], ignore_index=True)
    for draw in (lambda: figures.plot_patch_bars(odd, 5), lambda: figures.plot_patch_heatmap(odd, "positive"),
                 lambda: figures.plot_patch_matrix(odd, 2, "rotate"), lambda: figures.plot_patch_bars(acc, 5, "rotate")):
        with pytest.raises(ValueError, match="rotate") as err:
            draw()
        assert "add" in str(err.value)  # names the known ones too
    synthetic = pd.DataFrame({"step": [1, 1], "source": ["B1", "B1"], "target": ["none", "B1"], "mse": [1.0, 0.5],
                              "mode": "rotate"})
    with pytest.raises(ValueError, match="rotate"):
        figures.plot_patching(synthetic)


def test_a_registered_intervention_is_drawn():
    spec = Intervention("add_half", lambda vector, position, scale: H.add(vector, position=position, scale=0.5),
                        label="add x0.5")
    register_intervention(spec)
    try:
        assert intervention_names()[-1] == "add_half"
        acc = _accuracy_table(modes=("add_half", "add"))
        fig = figures.plot_patch_bars(acc, 2)
        assert _titles(fig) == ["add task vector at layer 2", "add x0.5 task vector at layer 2"]
        fig = figures.plot_patch_heatmap(acc, "negative")
        assert _titles(fig)[1] == "negative (add x0.5): accuracy change"
    finally:
        unregister_intervention("add_half")


def test_patching_figures_write_every_mode(tmp_path):
    acc = _accuracy_table()
    result = SimpleNamespace(accuracy=acc, summary={"layer": 5}, vectors=SimpleNamespace(definition="mean"),
                             config=SimpleNamespace(family="bitwise", zero_shot=False, shots=4,
                                                    modes=("add", "replace", "ablate")))
    paths = figures.patching_figures(result, tmp_path)
    assert [p.name for p in paths] == ["patch_bars_layer5.png", "patch_heatmap_positive.png",
                                       "patch_heatmap_negative.png", "patch_heatmap_ablation.png",
                                       "patch_matrix_layer5_add.png", "patch_matrix_layer5_replace.png"]
    assert all(p.stat().st_size > MIN_PNG for p in paths)


def test_synthetic_patching_panels_per_step_and_mode():
    rows = [{"step": step, "source": src, "target": tgt, "mse": 0.1 + i + j, "mode": mode, "layer": 2}
            for step in (10, 100) for mode in ("replace", "add") for i, src in enumerate(("B1", "B2"))
            for j, tgt in enumerate(("none", "B1", "B2"))]
    fig = figures.plot_patching(pd.DataFrame(rows))
    assert _titles(fig) == ["step 10: add at layer 2", "step 10: replace at layer 2", "step 100: add at layer 2",
                            "step 100: replace at layer 2"]
    one = pd.DataFrame(rows).query("mode == 'replace'").drop(columns="mode")  # no mode column: replace
    assert _titles(figures.plot_patching(one)) == ["step 10: replace at layer 2", "step 100: replace at layer 2"]
