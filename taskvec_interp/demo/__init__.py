"""The paper's story in one command: ``taskvec demo`` runs every experiment of the package on the built-in
defaults and writes one self-contained HTML report (see :func:`taskvec_interp.figures.report.write_demo_report`).

Parts, each in its own subdirectory of ``out`` and each a plain library call:

(a) ``synthetic``: the synthetic GPT-2 trained on a Mixture of Sparse Linear Regression and analysed
    (per-basis loss with TD, the UMAP grid, the patching matrix);
(b) ``td_<family>``: TD over layers and shots on the language model, with the TD-vs-accuracy R^2 and TD of the
    same queries without demonstrations / with shuffled labels (what the context adds);
(c) ``patch_<family>``: positive / negative task-vector patching per task at the peak-TD layer;
(c') ``zeroshot_<family>``: zero-shot task vectors as Hendel et al. publish them (per-query and per-task vectors,
    layer chosen on a dev split, numbers on a disjoint test split);
(d) ``finetune``: first-k vs last-k layer fine-tuning, accuracy and TD before / after;
(e) ``trajectory``: TD and loss over the synthetic run's checkpoints.

A part that finished writes ``part.json`` last (its headline numbers, figures and wall time); a rerun with
the same ``out`` reuses it, so a killed demo resumes where it stopped. ``quick=True`` runs the same parts on
smaller settings (CI runs it). After the parts, :func:`demo_findings` computes the findings scoreboard
(:func:`taskvec_interp.findings.findings`) from their results; the report shows it at its top.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..checkpoints import atomic_write_text
from ..io import locks_out
from .config import (
    FAMILIES,
    PAPER,
    PART_FIELDS,
    PARTS,
    DemoConfig,
    DemoFinetuneConfig,
    DemoPatchConfig,
    DemoSyntheticConfig,
    DemoTDConfig,
    DemoTrajectoryConfig,
    DemoZeroShotConfig,
    demo_settings,
)
from .parts import _finetune, _patch, _synthetic, _td, _trajectory, _zeroshot, family_source
from .result import DEMO_KEEP, DEMO_KIND, DemoResult, Part, check_part_paths, machine_info, read_part


def check_demo(config: DemoConfig) -> None:
    """What the demo can check before its first part runs (the synthetic part trains for minutes first): the
    model resolves (a built-in name, a model directory, a hub id's shape), the backend is registered and
    importable, every family builds (``pos`` with no treebank reachable reads the excerpt shipped with the package).
    ``ValueError`` naming the value."""
    from ..adapters.load import check_model_spec
    from ..adapters.registry import get_backend
    from ..tasks import get_family

    if not {"td", "patch", "finetune"} & set(config.parts):
        return  # the synthetic parts alone use neither the model nor the families
    check_model_spec(config.model, "DemoConfig.model")
    backend = get_backend(config.backend)
    try:
        backend.adapter_class()
    except ImportError as err:
        hint = f"; install {', '.join(backend.packages)}" if backend.packages else ""
        raise ValueError(f"DemoConfig.backend {config.backend!r} cannot be used here ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]}){hint}") from None
    names = list(config.families) if {"td", "patch"} & set(config.parts) else []
    for name in names:  # pos: the treebank that resolves here, else the excerpt shipped with the package
        get_family(name, **family_source(name)[0])
    if "finetune" in config.parts:
        try:
            get_family(config.finetune.family, split="train", **config.finetune.family_kwargs)
        except ValueError as err:
            raise ValueError(f"DemoConfig.finetune.family {config.finetune.family!r}: {err}") from None


@locks_out("out")
def run_demo(out: str | Path, config: DemoConfig | None = None, progress: bool = True,
             log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo's parts into ``out`` (reusing finished ones) and return them; see the module doc.

    Before any part runs: the whole config is checked (:func:`check_demo`) and ``out`` must be missing, empty or
    a demo's directory (marked: ``result.json``, from the moment a demo starts in it); it is marked at once, so
    the report.html written there later is always the demo's own. One demo at a time per ``out`` (a lock)."""
    config = config or DemoConfig()
    from ..io import check_result_owner, claim_result_dir

    check_demo(config)
    out = check_result_owner(out, DEMO_KIND)  # someone else's directory (a report.html of theirs) is refused
    preloaded = check_finished_parts(out, config)  # finished parts of another config: refused, nothing written
    claim_result_dir(out, DEMO_KIND, asdict(config), keep=DEMO_KEEP)  # the marker first: the directory is ours
    atomic_write_text(out / "demo_config.json", json.dumps(asdict(config), indent=2))
    t0 = time.perf_counter()
    state: dict[str, Any] = {"adapter": preloaded} if preloaded is not None else {}
    parts: list[Part] = []

    def adapter():
        if "adapter" not in state:
            from ..adapters import load_model

            state["adapter"] = load_model(config.model, backend=config.backend)
        return state["adapter"]

    def run_part(name: str, fn: Callable[[Path], Part]) -> Part:
        d = out / name
        marker = d / "part.json"
        if marker.exists():
            part = read_part(marker, out)  # torn or tampered: a one-line error naming part.json
            log(f"[demo] {name}: reused ({part.seconds:.0f}s when it ran)")
            return part
        log(f"[demo] {name} ...")
        d.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        part = fn(d)
        part.seconds = round(time.perf_counter() - start, 1)
        part.key = part_key(name, config, lambda: adapter().fingerprint()["fingerprint"])
        atomic_write_text(marker, json.dumps(asdict(part), indent=2, default=str))
        log(f"[demo] {name}: {part.seconds:.0f}s")
        return part

    if "synthetic" in config.parts or "trajectory" in config.parts:
        parts.append(run_part("synthetic", lambda d: _synthetic(d, out, config.synthetic, config.seed, progress)))
    if "td" in config.parts or "patch" in config.parts:
        for fam in config.families:
            parts.append(run_part(f"td_{fam}", lambda d, fam=fam: _td(d, out, adapter(), fam, config.td, config,
                                                                          progress)))
            if "patch" in config.parts:
                parts.append(run_part(f"patch_{fam}", lambda d, fam=fam: _patch(d, out, adapter(), fam, config.patch,
                                                                                config, progress)))
    if "zeroshot" in config.parts:
        for fam in [f for f in config.zeroshot.families if f in config.families]:
            parts.append(run_part(f"zeroshot_{fam}", lambda d, fam=fam: _zeroshot(d, out, adapter(), fam,
                                                                                 config.zeroshot, config, progress)))
    if "finetune" in config.parts:
        parts.append(run_part("finetune", lambda d: _finetune(d, out, adapter(), config.finetune, config, progress)))
    if "trajectory" in config.parts:
        parts.append(run_part("trajectory", lambda d: _trajectory(d, out, config.trajectory, config.seed, progress)))
    model = state["adapter"].identity() if "adapter" in state else {"name": config.model, "backend": config.backend}
    from datetime import datetime, timezone

    board = demo_findings(out, parts, config.seed)
    result = DemoResult(config, parts, out, round(time.perf_counter() - t0, 1), model, board, machine_info(),
                        datetime.now(timezone.utc).isoformat(timespec="seconds"))
    result.save(out)  # demo.json, whole; the parts' directories carried over
    return result


def demo_findings(out: Path, parts: list[Part], seed: int = 0) -> Any:
    """The findings scoreboard (:func:`taskvec_interp.findings.findings`) of the demo's finished parts in ``out``:
    the synthetic analysis (F1), each family's TD sweep (F2-F4), patching (F5 k-shot) and zero-shot task vectors
    (F5 zero-shot), the fine-tuning runs (F6); a part that did not run gives ``not run`` rows."""
    from ..findings import findings

    done = {p.name for p in parts if not p.skipped}
    def fams(prefix: str) -> dict[str, Path]:
        return {n.split("_", 1)[1]: out / n for n in sorted(done) if n.startswith(prefix + "_")}

    ft = next((p for p in parts if p.name == "finetune" and not p.skipped), None)
    return findings(
        synthetic=out / "synthetic" / "analysis" if "synthetic" in done else None,
        sweeps={f: d / "sweep" for f, d in fams("td").items()},
        patching={f: d / "patching" for f, d in fams("patch").items()},
        zero_shot={f: d / "zeroshot" for f, d in fams("zeroshot").items()},
        finetune={ft.key.get("finetune", {}).get("family", "finetune"): out / "finetune"} if ft else None,
        seed=seed)


# ---------------------------------------------------------------------------------------------- resume
LM_PARTS = ("td", "patch", "zeroshot", "finetune")
"""The parts that run the language model (their key holds the model's fingerprint)."""


def part_key(name: str, config: DemoConfig, fingerprint: Callable[[], str]) -> dict:
    """What part ``name`` (``synthetic``, ``td_<family>``, ``patch_<family>``, ``finetune``, ``trajectory``) is
    computed with: its resolved settings (and those of the parts it reads), the seed, ``quick``, and for the
    language-model parts the backend and the model's fingerprint (``fingerprint()``, called only for them: the
    weights, never the path string)."""
    kind, _, family = name.partition("_")
    reads = {"synthetic": ("synthetic",), "td": ("td",), "patch": ("td", "patch"), "zeroshot": ("zeroshot",),
             "finetune": ("finetune",),
             "trajectory": ("synthetic", "trajectory")}[kind]
    key: dict = {"quick": config.quick, "seed": config.seed, **{r: asdict(getattr(config, r)) for r in reads}}
    if family:
        key["family"] = family
    if kind in LM_PARTS:
        key |= {"backend": config.backend, "model fingerprint": fingerprint()}
    return key


def planned_parts(config: DemoConfig) -> list[str]:
    """The part directories a demo of ``config`` reads or writes, in order."""
    names = ["synthetic"] if {"synthetic", "trajectory"} & set(config.parts) else []
    if {"td", "patch"} & set(config.parts):
        for fam in config.families:
            names += [f"td_{fam}"] + ([f"patch_{fam}"] if "patch" in config.parts else [])
    if "zeroshot" in config.parts:
        names += [f"zeroshot_{f}" for f in config.zeroshot.families if f in config.families]
    return names + [p for p in ("finetune", "trajectory") if p in config.parts]


def check_finished_parts(out: Path, config: DemoConfig) -> Any:
    """Refuse (``ValueError``, before any part runs and before anything is written) a demo directory whose
    finished parts were computed with another config: another model (its weights' fingerprint), seed,
    ``quick`` or part setting; the message names the part and every differing field with both values, and the
    finished parts are left as they are. Returns the adapter it loaded to read the model's fingerprint (only
    when a finished language-model part needs it), for the demo to reuse."""
    from ..io import check_resume

    state: dict[str, Any] = {}

    def fingerprint() -> str:
        if "adapter" not in state:
            from ..adapters import load_model

            state["adapter"] = load_model(config.model, backend=config.backend)
        return state["adapter"].fingerprint()["fingerprint"]

    for name in planned_parts(config):
        marker = out / name / "part.json"
        if not marker.exists():
            continue
        part = read_part(marker, out)
        check_resume(part.key, part_key(name, config, fingerprint), out / name, f"the demo part {name!r}")
    return state.get("adapter")


__all__ = ["DEMO_KEEP", "DEMO_KIND", "FAMILIES", "PAPER", "PARTS", "PART_FIELDS", "DemoConfig", "DemoFinetuneConfig",
           "DemoPatchConfig", "DemoResult", "DemoSyntheticConfig", "DemoTDConfig", "DemoTrajectoryConfig",
           "DemoZeroShotConfig", "Part",
           "check_demo", "check_finished_parts", "check_part_paths", "demo_settings", "part_key", "planned_parts",
           "demo_findings", "read_part", "run_demo"]
