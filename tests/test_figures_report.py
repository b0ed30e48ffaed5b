"""The demo's HTML report (taskvec_interp.figures.report.write_demo_report) from a result object: one
self-contained file with each part's text, headline, embedded figures and tables, and the provenance."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace

import pandas as pd

from taskvec_interp import figures


@dataclass
class _Config:
    quick: bool = True

    def resolved(self) -> dict:
        return {"td": asdict(self)}


def test_write_demo_report(tmp_path):
    from taskvec_interp.io import claim_result_dir

    claim_result_dir(tmp_path, "demo")  # report.html goes only into a directory marked as a demo's
    td = pd.DataFrame([{"layer": layer, "level": "overall", "task": "all", "td": 0.1 * layer} for layer in range(5)])
    figures.plot_td_by_layer(td, path=tmp_path / "td" / "figures" / "td_by_layer.png")
    td.to_parquet(tmp_path / "td" / "td.parquet")
    parts = [SimpleNamespace(name="td_bitwise", title="TD: by layer", skipped=None, text="TD <rises>", seconds=3.0,
                             headline=[{"metric": "peak layer", "ours": 4, "paper": "15"}],
                             figures=["td/figures/td_by_layer.png"], tables={"the TD table": "td/td.parquet"}),
             SimpleNamespace(name="finetune", title="Fine-tuning", skipped="no GPU", text="", seconds=0.0,
                             headline=[], figures=[], tables={})]
    result = SimpleNamespace(out=str(tmp_path), model={"name": "tiny"}, config=_Config(), parts=parts, seconds=4.0)
    path = figures.write_demo_report(result)
    assert path == tmp_path / "report.html"
    html = path.read_text()
    assert html.count("data:image/png;base64,") == 1 and "td_by_layer.png" in html
    assert 'id="td_bitwise"' in html and 'id="finetune"' in html and "id='provenance'" in html
    assert "TD &lt;rises&gt;" in html and "Skipped: no GPU" in html and "the TD table" in html
    assert '>TD (bitwise)</a>' in html  # the nav label: the title before ':' and the part's suffix
    assert "Quick settings" in html and "&quot;quick&quot;: true" in html
