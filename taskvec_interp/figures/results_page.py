"""A measured-results page generated from a demo run's own tables (:func:`write_results_page`): Markdown for the
docs site, with the run's date, machine, model and library versions, wall time per part, the findings scoreboard
and each part's headline numbers, figures and tables. Nothing on it is typed by hand, so it cannot go stale
against the run it names: regenerate it from a new run (``taskvec results-page RUN PAGE``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from ..demo import DemoResult

__all__ = ["markdown_table", "write_results_page"]


def _cell(v: object) -> str:
    if isinstance(v, float):
        if v != v:
            return ""
        return f"{v:.3g}" if v != 0 and abs(v) < 1e-3 else f"{v:.3f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, max_rows: int = 40) -> str:
    """``df`` as a Markdown table (floats to 3 decimals, ``|`` escaped); rows beyond ``max_rows`` counted below."""
    shown = df.head(max_rows)
    lines = ["| " + " | ".join(_cell(c) for c in shown.columns) + " |",
             "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    if len(df) > max_rows:
        lines.append(f"\n*{len(df) - max_rows} more rows in the run's table file.*")
    return "\n".join(lines)


SCOREBOARD_COLUMNS = ("finding", "family", "claim", "paper", "ours", "statistic", "estimate", "ci_low", "ci_high",
                      "p_value", "test", "verdict")


def write_results_page(result: DemoResult, page: str | Path, figures_dir: str | Path | None = None,
                       title: str | None = None) -> Path:
    """Write ``page`` (Markdown) from the demo ``result`` (a :class:`~taskvec_interp.demo.DemoResult`, e.g.
    ``DemoResult.load(run_dir)``): the date it finished, the machine, the model's identity, package versions, the wall time of every
    part, the findings scoreboard and each part's text, headline rows, figures and tables. Figures are copied
    into ``figures_dir`` (default: ``<page's folder>/figures/<page's stem>``) and linked relative to the page.
    Everything comes from the run's files: regenerate the page from a new run, never edit it by hand."""
    import os

    from ..io import inside_or_raise
    from ..results import provenance, read_parquet

    out = Path(result.out)
    page = Path(page)
    figures_dir = Path(figures_dir) if figures_dir is not None else page.parent / "figures" / page.stem
    prov = provenance(result.model)
    lines = [f"# {title or 'The demo report on ' + str(result.model.get('name'))}", "",
             "*Generated from a run's own tables by `taskvec results-page` "
             "(`taskvec_interp.figures.write_results_page`); not edited by hand.*", ""]
    machine = result.machine or {}
    lines += ["| run | |", "|---|---|",
              f"| finished | {result.finished or 'unknown'} |",
              f"| settings | {'quick' if result.config.quick else 'full'} (`taskvec demo{' --quick' if result.config.quick else ''}`) |",
              f"| machine | {_cell(machine.get('description', 'unknown'))} |",
              f"| model | {_cell(result.model.get('name'))} ({_cell(result.model.get('backend'))}; weights "
              f"{_cell(str(result.model.get('fingerprint', ''))[:16])}) |",
              "| versions | " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items() if v) + " |",
              f"| wall time | {sum(p.seconds for p in result.parts):.0f} s in all parts "
              f"({sum(p.seconds for p in result.parts) / 60:.1f} min) |", ""]
    lines += ["## Wall time per part", "", "| part | wall time |", "|---|---|"]
    lines += [f"| {p.name} | {'skipped: ' + _cell(p.skipped) if p.skipped else f'{p.seconds:.0f} s'} |"
              for p in result.parts]
    lines.append("")
    board = result.findings
    if isinstance(board, pd.DataFrame) and len(board):
        cols = [c for c in SCOREBOARD_COLUMNS if c in board.columns]
        lines += ["## Findings scoreboard", "",
                  "Each verdict is computed from the statistic's CI (and p-value) against its threshold, never from "
                  "the paper's number (`taskvec_interp.findings`).", "", markdown_table(board[cols], max_rows=100), ""]
    figures_dir.mkdir(parents=True, exist_ok=True)
    for part in result.parts:
        lines += [f"## {part.title}", ""]
        if part.skipped:
            lines += [f"Skipped: {part.skipped}", ""]
            continue
        lines += [part.text, "", markdown_table(pd.DataFrame(part.headline, columns=["metric", "ours", "paper"])), ""]
        source = f"part {part.name!r} of the demo in {str(out)!r}"
        for fig in part.figures:
            src = inside_or_raise(out, fig, f"{source} (figures)")
            dst = figures_dir / f"{part.name}__{src.name}"
            shutil.copyfile(src, dst)
            lines += [f"![{part.name}: {src.stem}]({os.path.relpath(dst, page.parent)})", ""]
        for caption, table in part.tables.items():
            df = read_parquet(inside_or_raise(out, table, f"{source} (tables)"))
            lines += [f"**{caption}**", "", markdown_table(df), ""]
        lines += [f"*wall time {part.seconds:.0f} s*", ""]
    page.parent.mkdir(parents=True, exist_ok=True)
    from ..checkpoints import atomic_write_text

    atomic_write_text(page, "\n".join(lines))
    return page
