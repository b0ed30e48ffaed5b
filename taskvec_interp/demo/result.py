"""A finished demo on disk: one :class:`Part` per part (``part.json``), the :class:`DemoResult` (``demo.json``),
and the checks that every path they name stays inside the demo directory."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pandas as pd

from ..results import read_json
from .config import FAMILIES, DemoConfig


@dataclass
class Part:
    """One finished part: its headline rows (metric, ours, the paper's), figures, tables and wall time."""

    name: str
    title: str
    text: str
    headline: list[dict] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    tables: dict[str, str] = field(default_factory=dict)
    """caption -> Parquet file (relative to the demo's out) shown in the report."""
    seconds: float = 0.0
    skipped: str | None = None
    key: dict = field(default_factory=dict)
    """What the part was computed with (:func:`part_key`: its settings, the seed, ``quick``, the model's
    fingerprint for the language-model parts); a rerun reuses the part only with the same key."""


DEMO_KIND = "demo"
"""The result kind a demo directory is marked with (``result.json``)."""
DEMO_KEEP = ("demo_config.json", "report.html", "results.md", "figures", "synthetic", "finetune", "trajectory",
             *(f"{p}_{f}" for p in ("td", "patch", "zeroshot") for f in FAMILIES))
"""What a demo directory holds besides ``demo.json``: each part's directory (its results, each a result directory
of its own), the config record and the report; carried over when the demo's result is saved again."""


@dataclass
class DemoResult:
    """What :func:`run_demo` returns and saves in its ``out``: ``demo.json`` (config, parts, seconds, model) as a
    result directory of kind ``"demo"``; ``load(out)`` reads it. The parts' figures and tables are paths
    relative to ``out``; their directories are carried over when the result is saved again."""

    config: DemoConfig
    parts: list[Part]
    out: Path
    seconds: float
    model: dict = field(default_factory=dict)
    findings: pd.DataFrame | None = field(default=None, compare=False)
    """The findings scoreboard (:func:`taskvec_interp.findings.findings` of the parts), ``findings.parquet``."""
    machine: dict = field(default_factory=dict)
    """Where it ran (:func:`machine_info`): platform, CPU count, torch threads, accelerator."""
    finished: str = ""
    """When the run finished (UTC, ISO 8601)."""

    def save(self, out: str | Path) -> Path:
        """``demo.json`` in ``out``, written whole (:func:`taskvec_interp.io.write_result_dir`): an older demo
        result is replaced (the parts' directories carried over), anything else there is refused."""
        from ..io import write_result_dir

        record = {"config": asdict(self.config), "parts": [asdict(p) for p in self.parts], "seconds": self.seconds,
                  "model": self.model, "machine": self.machine, "finished": self.finished}
        with write_result_dir(out, DEMO_KIND, record["config"], keep=DEMO_KEEP) as tmp:
            (tmp / "demo.json").write_text(json.dumps(record, indent=2, default=str))
            if self.findings is not None:
                self.findings.to_parquet(tmp / "findings.parquet", index=False)
        return Path(out)

    @classmethod
    def load(cls, directory: str | Path) -> DemoResult:
        """Read back what :meth:`save` wrote (``out`` is ``directory``); ``ValueError`` naming the file when it
        is not a complete, intact demo result."""
        from ..io import manifest_files, read_result_dir
        from ..results import read_json, read_parquet

        d = read_result_dir(directory, DEMO_KIND)
        record = read_json(d / "demo.json")
        parts = [Part(**p) for p in record["parts"]]
        for part in parts:  # a figure or table outside the demo directory is refused, never read
            check_part_paths(part, d, str(d / "demo.json"))
        board = read_parquet(d / "findings.parquet") if "findings.parquet" in manifest_files(d) else None
        return cls(DemoConfig(**record["config"]), parts, d, record["seconds"], record.get("model", {}), board,
                   record.get("machine", {}), record.get("finished", ""))


def machine_info() -> dict:
    """Where a run happens: platform, CPU count, torch's threads and version, the accelerator if any."""
    import os
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    desc = (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)" + (f", {gpu}" if gpu else ", no GPU"))
    return {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "gpu": gpu, "description": desc}


def read_part(path: Path, out: Path) -> Part:
    """A finished part's ``part.json`` (in a part directory of the demo directory ``out``): a ``ValueError``
    naming the file when it is not valid JSON, not a part record, or names a figure or table outside ``out``
    (a tampered entry such as ``/etc/passwd`` or ``../x`` is refused, never read into the report)."""
    raw = read_json(path)
    known = {f.name for f in fields(Part)}
    if not isinstance(raw, dict) or not {"name", "title", "text"} <= set(raw) or set(raw) - known:
        have = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path} is not a demo part record (fields {have}, expected {sorted(known)})")
    part = Part(**raw)
    check_part_paths(part, out, str(path))
    return part


def check_part_paths(part: Part, out: Path, source: str) -> None:
    """Every figure and table of ``part`` is a relative path inside the demo directory ``out``
    (:func:`taskvec_interp.io.inside`); a ``ValueError`` naming ``source`` and the path otherwise."""
    from ..io import inside_or_raise

    figures, tables = part.figures, part.tables
    if not isinstance(figures, list) or not isinstance(tables, dict):
        raise ValueError(f"{source}: part {part.name!r} has malformed figures / tables ({figures!r}, {tables!r})")
    for rel in [*figures, *tables.values()]:
        inside_or_raise(out, rel, f"{source} (part {part.name!r})")

