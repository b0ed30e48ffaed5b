"""The interventions table: a new intervention is one entry, used by patching, the synthetic patching matrix,
the figures and the CLI; an unknown name is an error everywhere."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from taskvec_interp import hooks as H
from taskvec_interp.experiments.patching import PatchConfig, run_patching
from taskvec_interp.interventions import (
    INTERVENTIONS,
    Intervention,
    get_intervention,
    intervention_names,
    register_intervention,
    unregister_intervention,
)
from taskvec_interp.tasks import get_family


@pytest.fixture
def replace_copy():
    """``replace`` under another name, recording what it was built with."""
    calls: list[tuple] = []

    def build(vector, position, scale):
        calls.append((tuple(vector.shape), position, scale))
        return H.replace(vector, position=position)

    register_intervention(Intervention("replace_copy", build, label="replace (copy)", help="a test copy of replace"))
    try:
        yield calls
    finally:
        unregister_intervention("replace_copy")
    assert "replace_copy" not in INTERVENTIONS


def test_the_builtin_table():
    assert intervention_names()[:3] == ("add", "replace", "ablate")
    assert get_intervention("add").uses_scale and get_intervention("add").centerable
    assert not get_intervention("ablate").needs_vector
    with pytest.raises(ValueError, match=r"intervention must be one of \('add', 'replace', 'ablate'.*got 'nope'"):
        get_intervention("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_intervention(Intervention("add", lambda v, p, s: H.add(v, p)))
    with pytest.raises(ValueError, match="reserved"):
        Intervention("none", lambda v, p, s: H.add(v, p))
    with pytest.raises(ValueError, match="Intervention.build must be callable"):
        Intervention("x", None)  # type: ignore[arg-type]


def test_a_registered_intervention_is_used_by_patching_and_drawn(tiny_smol, replace_copy, tmp_path):
    from taskvec_interp import figures

    fam = get_family("bitwise")
    cfg = PatchConfig(n_per_task=3, shots=2, layers=[1], modes=("replace", "replace_copy"),
                      directions=("positive", "negative"), n_boot=10, k=1)
    res = run_patching(tiny_smol, cfg, fam, progress=False)
    assert replace_copy and all(c[1] == -1 for c in replace_copy)  # built by patching, at the last prompt token
    acc = res.accuracy
    assert set(acc["mode"]) == {"none", "replace", "replace_copy"}
    cols = ["layer", "vector", "direction", "task", "accuracy"]
    a = acc[acc["mode"] == "replace"][cols].reset_index(drop=True)
    b = acc[acc["mode"] == "replace_copy"][cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)  # the copy does exactly what replace does
    fig = figures.plot_patch_heatmap(acc, "positive", mode="replace_copy", path=tmp_path / "heat.png")
    texts = [t.get_text() for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
    texts += [t.get_text() for t in fig.texts] + [fig._suptitle.get_text() if fig._suptitle else ""]
    assert any("replace (copy)" in t for t in texts), texts
    paths = figures.patching_figures(res, tmp_path / "figs")
    assert paths and all(p.exists() for p in paths)


def test_an_intervention_without_a_vector_runs_once_per_layer(tiny_smol):
    fam = get_family("bitwise")
    cfg = PatchConfig(n_per_task=3, shots=2, layers=[0, 1], modes=("ablate",), directions=("positive",), n_boot=10, k=1)
    res = run_patching(tiny_smol, cfg, fam, progress=False)
    rows = res.accuracy[res.accuracy["mode"] == "ablate"]
    assert set(rows["direction"]) == {"ablation"} and sorted(rows["layer"].unique()) == [0, 1]
    assert len(rows) == 2 * len(fam.task_names)


def test_an_unknown_intervention_is_refused_everywhere(tmp_path):
    from taskvec_interp import figures
    from taskvec_interp.synthetic.analysis import patch_matrix

    with pytest.raises(ValueError, match="nope"):
        PatchConfig(modes=("nope",))
    table = pd.DataFrame({"condition": [0, 1], "layer": [None, 1], "mode": ["none", "nope"], "vector": ["none", "own"],
                          "scale": [0.0, 1.0], "direction": ["baseline", "positive"], "task": ["AND", "AND"],
                          "n": [3, 3], "accuracy": [0.0, 1.0], "ci_low": [0.0, 1.0], "ci_high": [0.0, 1.0],
                          "delta": [0.0, 1.0], "delta_low": [0.0, 1.0], "delta_high": [0.0, 1.0]})
    with pytest.raises(ValueError, match="nope"):
        figures.plot_patch_bars(table, 1, path=tmp_path / "bars.png")
    with pytest.raises(ValueError, match="nope"):
        patch_matrix(torch.nn.Module(), None, 0, 2, mode="nope", position=-2)  # type: ignore[arg-type]


def test_the_cli_lists_and_accepts_a_registered_intervention(tmp_path):
    """Registered in ONE place (a user's module imported before the CLI is built): listed by the help."""
    plugin = tmp_path / "my_interventions.py"
    plugin.write_text(textwrap.dedent("""
        from taskvec_interp import hooks as H
        from taskvec_interp.interventions import Intervention, register_intervention

        register_intervention(Intervention("halfadd", lambda v, p, s: H.add(v, position=p, scale=0.5 * s),
                                           label="add x0.5", help="add half the vector", uses_scale=True))
    """))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import my_interventions; "
            "from taskvec_interp.cli import main; sys.argv = ['taskvec', 'patch', '--help']; main()")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         env={"COLUMNS": "250", "PATH": "/usr/bin:/bin", "TERM": "dumb"})
    assert out.returncode == 0, out.stderr
    assert "halfadd" in out.stdout and "ablate" in out.stdout
