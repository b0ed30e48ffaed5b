"""What every figure module shares (taskvec_interp.figures): no backend side effects, no runtime import of
the experiments (result types only for type checking), one small module per subject."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import matplotlib
import pandas as pd
import pytest

import taskvec_interp.figures as figures

MODULES = sorted(Path(figures.__file__).parent.glob("*.py"))
FORBIDDEN = ("taskvec_interp.experiments", "taskvec_interp.synthetic", "taskvec_interp.demo")
MIN_PNG = 5_000


def _runtime_imports(path: Path) -> list[str]:
    """Absolute names of the modules ``path`` imports outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    package = ["taskvec_interp", "figures"]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    names = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def test_there_is_one_module_per_subject_and_each_is_small():
    assert {p.stem for p in MODULES} == {"__init__", "_common", "td", "patching", "finetune", "trajectory",
                                         "synthetic", "heads", "report", "zeroshot", "results_page", "td_context"}
    long = {p.name: n for p in MODULES if (n := len(p.read_text().splitlines())) >= 400}
    assert not long


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_result_types_are_imported_only_for_type_checking(path):
    bad = [name for name in _runtime_imports(path) if name.startswith(FORBIDDEN)]
    assert not bad, f"{path.name} imports {bad} at run time"


def test_importing_the_figures_loads_no_experiment():
    code = ("import sys, taskvec_interp.figures; "
            f"print([m for m in sys.modules if m.startswith({FORBIDDEN!r})])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_modules_never_touch_the_backend(tmp_path):
    for path in MODULES:
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                    for alias in node.names} | {node.module for node in ast.walk(tree)
                                                if isinstance(node, ast.ImportFrom) and node.module}
        assert not any("pyplot" in name for name in imported), path.name
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Attribute) and node.func.attr == "use"]
        assert not calls, path.name
    before = matplotlib.rcParams._get_backend_or_none()
    td = pd.DataFrame([{"layer": layer, "level": "overall", "task": "all", "td": 0.2 + 0.1 * layer, "shots": 4,
                        "chance": 0.25} for layer in range(6)])
    fig = figures.plot_td_by_layer(td)
    assert matplotlib.rcParams._get_backend_or_none() == before
    png = fig._repr_png_()  # shows in IPython even without pyplot
    assert png[:4] == b"\x89PNG" and len(png) > MIN_PNG
    saved = figures.save_figure(fig, tmp_path / "a" / "b" / "td.png")
    assert saved.read_bytes()[:4] == b"\x89PNG"
