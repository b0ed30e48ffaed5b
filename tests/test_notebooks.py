"""The tutorial notebooks run top to bottom: each ``notebooks/*.ipynb`` is executed with nbclient in a
fresh ``python3`` kernel, with ``TASKVEC_QUICK=1`` (the notebooks' small CI sizes), in a temporary working
directory. A failing cell fails its notebook's test with that cell's source and traceback."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import nbclient  # the dev extra installs nbclient, nbformat and ipykernel (the python3 kernel)
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks
CELL_TIMEOUT = 600  # seconds for one cell; the QUICK notebooks take well under a minute each


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_saved_without_outputs(path):
    """Outputs are not committed (the repo stays small and diffs stay readable); CI executes them."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.slow  # each notebook loads the real model (SmolLM2) or trains: minutes in all
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    # the kernel inherits this environment: small sizes, and this checkout's package first on the path
    monkeypatch.setenv("TASKVEC_QUICK", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    failure = None
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:  # the cell's source and its traceback
        failure = ANSI.sub("", str(err))
    if failure is not None:  # outside the except block: one traceback, not a chained pair
        pytest.fail(f"{path.name} failed in a cell:\n{failure}", pytrace=False)
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
