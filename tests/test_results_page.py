"""The measured-results page is generated from a demo run's own files (``write_results_page``): every number on it
is the run's, with the run's date, machine and versions; figures are copied and linked relative to the page."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from taskvec_interp.demo import DemoConfig, DemoResult, Part  # noqa: E402
from taskvec_interp.demo.result import machine_info  # noqa: E402
from taskvec_interp.figures import write_results_page  # noqa: E402
from taskvec_interp.figures.results_page import markdown_table  # noqa: E402


def _demo(out: Path, findings: pd.DataFrame | None) -> DemoResult:
    (out / "td_fv").mkdir(parents=True)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0.2, 0.9])
    fig.savefig(out / "td_fv" / "td_by_layer.png")
    plt.close(fig)
    pd.DataFrame({"shots": [1, 5], "peak_td": [0.4123, 0.8765]}).to_parquet(out / "td_fv" / "summary.parquet")
    part = Part("td_fv", "(b) Task decodability: fv", "fv: 20 prompts per task.",
                [{"metric": "peak TD (5-shot)", "ours": "0.877 at layer 19", "paper": "layer 15 of 32"}],
                ["td_fv/td_by_layer.png"], {"peak TD per shot count": "td_fv/summary.parquet"}, seconds=123.4)
    result = DemoResult(DemoConfig(quick=True, parts=("td",), families=("fv",)), [part], out, 130.0,
                        {"name": "tiny-model", "backend": "torch", "fingerprint": "abcdef0123456789ffff"},
                        findings, machine_info(), "2026-12-05T11:00:00+00:00")
    result.save(out)
    return DemoResult.load(out)


def test_page_holds_the_runs_numbers_date_machine_and_versions(tmp_path: Path):
    board = pd.DataFrame([{"finding": "F2", "family": "fv", "claim": "TD rises with shots", "paper": "1 < 4 < 10",
                           "ours": "0.41 -> 0.88", "statistic": "TD(5) - TD(1)", "estimate": 0.4642,
                           "ci_low": 0.31, "ci_high": 0.6, "p_value": 0.0001, "test": "paired bootstrap",
                           "verdict": "reproduced"}])
    result = _demo(tmp_path / "run", board)
    assert result.findings is not None and result.findings.equals(board)  # saved and read back with the demo
    page = write_results_page(DemoResult.load(tmp_path / "run"), tmp_path / "docs" / "results" / "demo.md")
    text = page.read_text()
    assert "2026-12-05T11:00:00+00:00" in text and machine_info()["description"] in text
    assert "torch " in text and "tiny-model" in text and "abcdef0123456789"[:16] in text
    assert "0.877 at layer 19" in text and "0.412" in text and "0.876" in text and "123 s" in text
    assert "| F2 | fv |" in text and "reproduced" in text and "0.464" in text
    link = "figures/demo/td_fv__td_by_layer.png"  # default: beside the page
    assert f"]({link})" in text and (page.parent / link).resolve().is_file()


def test_page_without_a_scoreboard_and_a_refused_tampered_figure(tmp_path: Path):
    result = _demo(tmp_path / "run", None)
    text = write_results_page(result, tmp_path / "page.md").read_text()
    assert "scoreboard" not in text.lower()
    result.parts[0].figures = ["../../etc/passwd"]
    with pytest.raises(ValueError, match="passwd"):
        write_results_page(result, tmp_path / "page2.md")


def test_markdown_table_escapes_and_counts_hidden_rows():
    md = markdown_table(pd.DataFrame({"a": ["x|y", "z"], "b": [0.12345, float("nan")]}), max_rows=1)
    assert "x\\|y" in md and "0.123" in md and "1 more rows" in md
