"""The demo's report: ONE self-contained HTML file (:func:`write_demo_report`) with each part's text, its
headline numbers beside the paper's, its figures embedded as base64 PNG and its tables."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from ..demo import DemoResult, Part

__all__ = ["VERDICT_COLOURS", "scoreboard_html", "write_demo_report"]

VERDICT_COLOURS: dict[str, str] = {"reproduced": "#cdeccf", "not reproduced": "#f6cfcd", "inconclusive": "#fbeeb8",
                                   "not run": "#e6e6e6"}
"""Background colour of each verdict's cell in the scoreboard."""

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top} th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums} .paper{color:#555;font-style:italic}
img{max-width:100%;border:1px solid #eee;margin:.4em 0} .skipped{color:#a00} .meta{color:#555;font-size:.9em}
details{margin:.5em 0} pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em}
nav a{margin-right:1em}
table.scoreboard td.verdict{font-weight:600;white-space:nowrap} table.scoreboard .note{color:#555;font-size:.85em}
"""


def _img(path: Path) -> str:
    import base64

    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{path.name}" src="data:image/png;base64,{data}"><figcaption class="meta">' \
           f'{path.name}</figcaption></figure>'


def _table_html(df: pd.DataFrame, max_rows: int = 40) -> str:
    shown = df.head(max_rows)
    html = shown.to_html(index=False, border=0, float_format=lambda v: f"{v:.3f}", na_rep="")
    more = f'<p class="meta">{len(df) - max_rows} more rows in the table file</p>' if len(df) > max_rows else ""
    return html + more


def _num(x: object, digits: int = 3) -> str:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    if v != v:  # NaN
        return ""
    return f"{v:.{digits}g}" if abs(v) < 10 ** -digits and v != 0 else f"{v:.{digits}f}"


def scoreboard_html(table: pd.DataFrame) -> str:
    """The findings scoreboard (:func:`taskvec_interp.findings.findings`'s table) as one HTML table: a row per
    finding and family, with the claim, the paper's number, ours, the statistic with its CI and p-value, the test
    and the verdict (its cell coloured by :data:`VERDICT_COLOURS`); the note under the test. Every text is
    escaped."""
    import html

    esc = html.escape
    need = {"finding", "claim", "family", "paper", "ours", "statistic", "estimate", "ci_low", "ci_high", "p_value",
            "test", "verdict"}
    missing = sorted(need - set(table.columns))
    if missing:
        raise ValueError(f"the scoreboard table lacks columns {missing}")
    head = ("<tr><th>finding</th><th>claim</th><th>family</th><th>paper</th><th>ours</th><th>statistic</th>"
            "<th>estimate [CI]</th><th>p</th><th>test</th><th>verdict</th></tr>")
    rows = []
    for r in table.to_dict("records"):
        v = str(r["verdict"])
        colour = VERDICT_COLOURS.get(v, "#ffffff")
        est = _num(r["estimate"])
        ci = f" [{_num(r['ci_low'])}, {_num(r['ci_high'])}]" if _num(r["ci_low"]) or _num(r["ci_high"]) else ""
        note = f"<div class='note'>{esc(str(r.get('note') or ''))}</div>" if r.get("note") else ""
        threshold = (f" (vs {_num(r['threshold'])}, paper {'above' if r.get('side') == 'greater' else 'below'})"
                     if "threshold" in r and r.get("side") in ("greater", "less") and est else "")
        rows.append(f"<tr><td>{esc(str(r['finding']))}</td><td>{esc(str(r['claim']))}</td>"
                    f"<td>{esc(str(r['family']))}</td><td class='paper'>{esc(str(r['paper']))}</td>"
                    f"<td>{esc(str(r['ours']))}</td><td>{esc(str(r['statistic']))}</td>"
                    f"<td class='num'>{esc(est + ci + threshold)}</td><td class='num'>{esc(_num(r['p_value'], 4))}</td>"
                    f"<td>{esc(str(r['test']))}{note}</td>"
                    f"<td class='verdict' style='background:{colour}'>{esc(v)}</td></tr>")
    return f"<table class='scoreboard'>{head}{''.join(rows)}</table>"


def _nav_label(part: Part) -> str:
    label = part.title.split(":")[0]
    return f"{label} ({part.name.split('_', 1)[1]})" if "_" in part.name else label


def write_demo_report(result: DemoResult, path: str | Path | None = None,
                      scoreboard: pd.DataFrame | None = None) -> Path:
    """ONE self-contained HTML file for a :class:`~taskvec_interp.demo.DemoResult`: the findings scoreboard at the
    top (``scoreboard``, else the result's ``findings`` table where it has one; :func:`scoreboard_html`), then each
    part's text, its headline numbers beside the paper's, its figures (embedded as base64 PNG) and tables, then
    the configuration, the model's identity, package versions and wall times."""
    import html
    import json

    from ..io import inside_or_raise
    from ..results import provenance, read_parquet

    out = Path(result.out)
    if path is None:  # beside the demo's results: only in a directory marked as a demo's (never someone's report.html)
        from ..io import read_marker

        marker = read_marker(out) if out.is_dir() else None
        if marker is None or marker.get("kind") != "demo":
            raise ValueError(f"{out} is not a demo's directory (no demo result.json): refusing to write report.html "
                             "there; pass path= for a report elsewhere")
    path = Path(path) if path is not None else out / "report.html"
    board = scoreboard if scoreboard is not None else getattr(result, "findings", None)
    board = board if isinstance(board, pd.DataFrame) else None
    esc = html.escape
    body = [f"<h1>Task vectors in in-context learning: the paper's story on {esc(str(result.model.get('name')))}</h1>",
            '<p class="meta">Han, Song, Gore &amp; Agrawal, <i>Emergence and Effectiveness of Task Vectors in '
            "In-Context Learning: An Encoder-Decoder Perspective</i> (ICML 2025), reproduced by taskvec_interp. "
            f"{'Quick settings' if result.config.quick else 'Full settings'}; the parts took "
            f"{sum(p.seconds for p in result.parts):.0f} s together (this run's wall time: {result.seconds:.0f} s; "
            "parts reused from an earlier run count the time they took when they ran).</p>",
            "<nav>" + ("<a href='#scoreboard'>Scoreboard</a>" if board is not None else "")
            + "".join(f'<a href="#{esc(p.name)}">{esc(_nav_label(p))}</a>' for p in result.parts)
            + "</nav>"]
    if board is not None:
        body.append("<section id='scoreboard'><h2>Findings scoreboard</h2><p class='meta'>Each verdict is computed from "
                    "the statistic's CI (and p-value) against the threshold, never from the paper's number: "
                    "reproduced (the CI on the paper's side), not reproduced (on the other side), inconclusive (it "
                    f"spans the threshold), not run.</p>{scoreboard_html(board)}</section>")
    for part in result.parts:
        body.append(f'<section id="{esc(part.name)}"><h2>{esc(part.title)}</h2>')
        if part.skipped:
            body.append(f'<p class="skipped">Skipped: {esc(part.skipped)}</p></section>')
            continue
        body.append(f"<p>{esc(part.text)}</p>")
        rows = "".join(f"<tr><td>{esc(r['metric'])}</td><td class='num'>{esc(str(r['ours']))}</td>"
                       f"<td class='paper'>{esc(r['paper'])}</td></tr>" for r in part.headline)
        body.append(f"<table class='headline'><tr><th>headline</th><th>ours</th><th>paper</th></tr>{rows}</table>")
        source = f"part {part.name!r} of the demo in {str(out)!r}"  # a path outside out is refused, never embedded
        for fig in part.figures:
            body.append(_img(inside_or_raise(out, fig, f"{source} (figures)")))
        for caption, table in part.tables.items():
            body.append(f"<details open><summary>{esc(caption)} (<code>{esc(table)}</code>)</summary>"
                        f"{_table_html(read_parquet(inside_or_raise(out, table, f'{source} (tables)')))}</details>")
        body.append(f'<p class="meta">wall time {part.seconds:.0f} s</p></section>')
    from dataclasses import asdict

    times = "".join(f"<tr><td>{esc(p.name)}</td><td class='num'>{'skipped' if p.skipped else f'{p.seconds:.0f} s'}"
                    f"</td></tr>" for p in result.parts)
    meta = {"config": asdict(result.config), "resolved settings": result.config.resolved(),
            **provenance(result.model)}
    body.append("<section id='provenance'><h2>Configuration, model and versions</h2>"
                f"<table><tr><th>part</th><th>wall time</th></tr>{times}</table>"
                f"<pre>{esc(json.dumps(meta, indent=2, default=str))}</pre></section>")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>taskvec_interp demo</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    from ..checkpoints import atomic_write_text

    atomic_write_text(path, page)
    return path
