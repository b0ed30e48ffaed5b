"""The command line: `taskvec demo` and `taskvec td` run end to end (tiny local model; real model in slow tests)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from taskvec_interp.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tiny_smol, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_smol.model.save_pretrained(d)
    tiny_smol.tokenizer.save_pretrained(d)
    return d


def test_td_command_writes_results_config_and_figures(tiny_dir, tmp_path):
    out = tmp_path / "td"
    res = runner.invoke(app, ["td", "--model", str(tiny_dir), "--family", "bitwise", "--shots", "1,2",
                              "--n-per-task", "6", "--k", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "peak_layer" in res.output and "R^2" in res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["shots"] == [1, 2] and cfg["n_per_task"] == 6 and cfg["model"] == str(tiny_dir)
    td = pd.read_parquet(out / "td.parquet")
    assert set(td["shots"]) == {1, 2}
    assert (out / "figures" / "td_by_layer.png").exists()


def test_td_command_family_files(tiny_dir, tmp_path, shared_data):
    folder = shared_data / "function_vectors" / "dataset_files" / "abstractive"
    res = runner.invoke(app, ["td", "--model", str(tiny_dir), "--family", f"files:{folder}", "--shots", "1",
                              "--n-per-task", "4", "--k", "2", "--out", str(tmp_path), "--no-figures"])
    assert res.exit_code == 0, res.output
    acc = pd.read_parquet(tmp_path / "accuracy.parquet")
    assert "antonym" in set(acc["task"]) and "null" in set(acc["task"])


def test_bad_cli_inputs(tiny_dir, tmp_path):
    res = runner.invoke(app, ["td", "--model", str(tiny_dir), "--shots", "1,x", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "comma-separated" in res.output
    res = runner.invoke(app, ["td", "--model", str(tiny_dir), "--family", "sentiment", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "sentiment" in str(res.exception)


def test_demo_command_on_a_local_model(tiny_dir, tmp_path, monkeypatch):
    """The demo end to end on a tiny local model (the real-model quick demo runs in CI's .ci/run): the
    report is written, and a second run reuses every finished part."""
    from taskvec_interp.demo import config as D  # where DemoConfig reads its presets

    tiny = {"synthetic": {"steps": 40, "n_per_basis": 12, "k": 3, "umap_checkpoints": 2},
            "td": {"shots": [1, 2], "n_per_task": 5, "k": 2, "n_boot": 10},
            "patch": {"shots": 2, "n_per_task": 4, "k": 1, "n_boot": 10},
            "finetune": {"family": "bitwise", "family_kwargs": {}, "steps": 2, "n_train": 4, "batch_size": 2,
                         "n_per_task": 4, "k": 1, "layers": ["first:2", "last:2"]},
            "trajectory": {"n_per_basis": 12, "k": 3}}
    real = D.demo_settings
    monkeypatch.setattr(D, "demo_settings", lambda quick: {k: {**v, **tiny.get(k, {})} for k, v in real(True).items()})
    out = tmp_path / "demo"
    args = ["demo", "--model", str(tiny_dir), "--out", str(out), "--quick", "--families", "bitwise"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    html = (out / "report.html").read_text()
    for section in ("scoreboard", "synthetic", "td_bitwise", "patch_bitwise", "finetune", "trajectory", "provenance"):
        assert f'id="{section}"' in html or f"id='{section}'" in html, section
    assert html.count("data:image/png;base64,") >= 8 and "paper" in html
    assert (out / "td_bitwise" / "sweep" / "fit.json").exists() and (out / "finetune" / "summary.parquet").exists()
    page = (out / "results.md").read_text()  # the results page, generated from the run's own tables
    assert "## Findings scoreboard" in page and "| F2 |" in page and "td_bitwise" in page
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and again.output.count("reused") == 5
