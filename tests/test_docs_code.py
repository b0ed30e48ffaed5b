"""Every ```python block of README.md and docs/**/*.md runs as written (the API pages excepted: they hold
only mkdocstrings directives).

Each file's blocks run in order in one namespace (a later block may use an earlier block's names), in a
temporary working directory, on the real offline model where a block loads it. A block that cannot run
here by nature (a 70B model over GPUs, NDIF with an API key, hub downloads) carries a marker on the line
right before its fence, ``<!-- no-run: REASON -->``; the reason is required, the marked blocks are
counted and listed in the test report, and a marker anywhere else is an error. Nothing else is skipped.
"""

from __future__ import annotations

import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UD_EXCERPT = ROOT / "taskvec_interp" / "tasks" / "data" / "ud_english_ewt"  # shipped: 300 sentences of UD English EWT (CC BY-SA 4.0)
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)[^\n]*$")
NO_RUN = re.compile(r"^\s*<!--\s*no-run\s*:(?P<reason>.*?)-->\s*$")
NO_RUN_ANY = re.compile(r"<!--\s*no-run\b")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    no_run: str | None  # the reason, for a marked block


def doc_files() -> list[Path]:
    files = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
    return [f for f in files if "api" not in f.relative_to(ROOT).parts[1:2]]


def parse_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file (any language), each with its no-run marker if it has one."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i, marker_lines = [], 0, set()
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, ticks, indent = i, m["ticks"], m["indent"]
        body, i = [], i + 1
        while i < len(lines) and not (lines[i].strip().startswith(ticks) and lines[i].strip().strip(ticks[0]) == ""):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        prev = start - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        reason = None
        if prev >= 0 and (nm := NO_RUN.match(lines[prev])):
            reason = nm["reason"].strip()
            marker_lines.add(prev)
        blocks.append(Block(path, start + 1, m["lang"].lower(), textwrap.dedent("\n".join(body)) + "\n", reason))
    stray = [n + 1 for n, text in enumerate(lines) if NO_RUN_ANY.search(text) and n not in marker_lines]
    if stray:
        raise AssertionError(f"{path.relative_to(ROOT)}: no-run marker(s) not right before a code fence at "
                             f"line(s) {stray}")
    return blocks


def python_blocks(path: Path) -> list[Block]:
    return [b for b in parse_blocks(path) if b.lang in ("python", "py")]


FILES = [f for f in doc_files() if python_blocks(f)]


def test_markers_are_well_formed():
    """Every no-run marker sits right before a python fence and says why; list them for the report."""
    marked = []
    for f in doc_files():
        for b in parse_blocks(f):
            if b.no_run is None:
                continue
            where = f"{f.relative_to(ROOT)}:{b.line}"
            assert b.lang in ("python", "py"), f"{where}: no-run marker before a {b.lang or 'plain'} block"
            assert b.no_run, f"{where}: no-run marker without a reason"
            marked.append(f"{where} ({b.no_run})")
    print(f"\n{len(marked)} python block(s) marked no-run:\n  " + "\n  ".join(marked))


def test_blocks_are_found():
    """The extraction sees the blocks it should (a fence regex that silently found nothing would pass)."""
    n = sum(len(python_blocks(f)) for f in doc_files())
    assert n >= 10, n
    assert ROOT / "README.md" in FILES


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=[str(f.relative_to(ROOT)) for f in FILES])
def test_doc_code_runs(path: Path, tmp_path, monkeypatch):
    """The file's python blocks, in order, in one namespace, in a temporary working directory."""
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "TASKVEC_UD_PATH" not in os.environ:
        monkeypatch.setenv("TASKVEC_UD_PATH", str(UD_EXCERPT))  # the treebank `get_family("pos")` reads; no download
    namespace: dict = {"__name__": "__docs__"}
    ran = skipped = 0
    for block in python_blocks(path):
        if block.no_run is not None:
            skipped += 1
            continue
        where = f"{path.relative_to(ROOT)}:{block.line}"
        try:
            exec(compile(block.code, where, "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the python block at {where} failed: {type(e).__name__}: {e}") from e
        ran += 1
    print(f"\n{path.relative_to(ROOT)}: {ran} block(s) ran, {skipped} marked no-run")
    assert ran or skipped
