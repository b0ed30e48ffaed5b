"""The paper's story in one command: ``taskvec demo`` runs every experiment of the package on the built-in
defaults and writes one self-contained HTML report (see :func:`taskvec_interp.figures.report.write_demo_report`).

Parts, each in its own subdirectory of ``out`` and each a plain library call:

(a) ``synthetic``: the synthetic GPT-2 trained on a Mixture of Sparse Linear Regression and analysed
    (per-basis loss with TD, the UMAP grid, the patching matrix);
(b) ``td_<family>``: TD over layers and shots on the language model, with the TD-vs-accuracy R^2;
(c) ``patch_<family>``: positive / negative task-vector patching per task at the peak-TD layer;
(d) ``finetune``: first-k vs last-k layer fine-tuning, accuracy and TD before / after;
(e) ``trajectory``: TD and loss over the synthetic run's checkpoints.

A part that finished writes ``part.json`` last (its headline numbers, figures and wall time); a rerun with
the same ``out`` reuses it, so a killed demo resumes where it stopped. ``quick=True`` runs the same parts on
smaller settings (CI runs it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .checkpoints import atomic_write_text
from .config import backend_field, backend_names, model_field, opt
from .hooks import FINETUNE_LAYERS, check_layer_spec
from .io import locks_out
from .results import read_json
from .validate import (
    check_bool,
    check_choice,
    check_choices,
    check_ints,
    check_knn_k,
    check_n_boot,
    check_number,
    check_optional_int,
    check_seed,
    check_str,
)

PARTS = ("synthetic", "td", "patch", "finetune", "trajectory")
FAMILIES = ("bitwise", "pos")

# What the paper reports, shown beside our numbers (Han et al. 2025; Llama-3.1-8B unless said otherwise).
PAPER = {
    "synthetic_td": "near-perfect separation of the 4 bases in the middle layers at convergence (Fig. 2, 11)",
    "synthetic_order": "bases separate one after another, each when its loss drops (Fig. 2)",
    "td_bitwise": "peak layer 13 of 32; 4-shot mean TD 0.43 +- 0.13",
    "td_pos": "peak layer 15 of 32; 4-shot mean TD 0.68 +- 0.11",
    "r2_bitwise": "0.53",
    "r2_pos": "0.78",
    "patch": "separable tasks gain up to ~14 points (positive) and lose up to ~15 (negative)",
    "finetune": "bitwise accuracy 26.2% -> 90.2% (first 10 layers) vs 66.3% (last 10); TD 0.43 -> 0.85 only "
                "with the first layers",
    "trajectory": "TD and accuracy rise together over pretraining (OLMo-7B, Fig. 5)",
}


def demo_settings(quick: bool) -> dict:
    """The sizes of each part: the full demo (<= 20 min on 2 CPU cores) or ``quick`` (<= 4 min)."""
    if quick:
        return {
            "synthetic": {"config": "tiny", "steps": 300, "n_per_basis": 30, "k": 5, "umap_checkpoints": 3},
            "td": {"shots": (1, 4), "n_per_task": 8, "k": 3, "n_boot": 50},
            "patch": {"shots": 4, "n_per_task": 6, "k": 2, "n_boot": 50},
            "finetune": {"family": "bitwise", "layers": ("first:10", "last:10"), "steps": 4, "n_train": 8,
                         "batch_size": 4, "n_per_task": 5, "k": 2, "lr": 2e-3},
            "trajectory": {"n_per_basis": 30, "k": 5},
        }
    return {
        "synthetic": {"config": "small", "steps": 3000, "n_per_basis": 100, "k": 10, "umap_checkpoints": 5},
        "td": {"shots": (1, 4, 10), "n_per_task": 30, "k": 10, "n_boot": 300},
        "patch": {"shots": 4, "n_per_task": 20, "k": 10, "n_boot": 300},
        "finetune": {"family": "bitwise", "layers": ("first:10", "last:10"), "steps": 40, "n_train": 100,
                     "batch_size": 8, "n_per_task": 20, "k": 10, "lr": 1e-3},
        "trajectory": {"n_per_basis": 50, "k": 10},
    }

def _preset(part: str, name: str, text: str) -> str:
    """A part setting's help: ``text`` and the two presets' values (read from :func:`demo_settings`)."""
    def show(v: object) -> str:
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    full, quick = demo_settings(False)[part][name], demo_settings(True)[part][name]
    return f"{text} (full {show(full)}, quick {show(quick)})"


def _train_configs() -> tuple[str, ...]:
    from .synthetic.train import TRAIN_CONFIGS

    return tuple(sorted(TRAIN_CONFIGS))


class _PresetPart:
    """A part's settings; ``None`` fields take the preset's value (:func:`demo_settings`, full or quick) when the
    :class:`DemoConfig` holding the part is built. Each set field is checked here, the whole part there."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:  # pragma: no cover - every part defines it
        raise NotImplementedError

    def _name(self, field_name: str) -> str:
        return f"DemoConfig.{PART_FIELDS[type(self)]}.{field_name}"

    def _int(self, field_name: str, minimum: int) -> None:
        check_optional_int(self._name(field_name), getattr(self, field_name), minimum)

    def _k(self, size_field: str) -> None:
        self._int("k", 1)
        if self.k is not None and getattr(self, size_field) is not None:  # type: ignore[attr-defined]
            check_knn_k(self._name("k"), self.k, getattr(self, size_field), size_field)  # type: ignore[attr-defined]


@dataclass
class DemoSyntheticConfig(_PresetPart):
    """(a) the synthetic model: trained with the named config, then analysed (``analyze_run``)."""

    config: str | None = opt(None, _preset("synthetic", "config", "named synthetic training config"),
                             choices=_train_configs)
    steps: int | None = opt(None, _preset("synthetic", "steps", "training steps"))
    n_per_basis: int | None = opt(None, _preset("synthetic", "n_per_basis", "test sequences per basis"))
    k: int | None = opt(None, _preset("synthetic", "k", "neighbours of the TD k-NN"))
    umap_checkpoints: int | None = opt(None, _preset("synthetic", "umap_checkpoints", "checkpoints of the UMAP grid"))

    def check(self) -> None:
        if self.config is not None:
            check_choice(self._name("config"), self.config, _train_configs())
        self._int("steps", 1)
        self._int("n_per_basis", 1)
        self._k("n_per_basis")
        self._int("umap_checkpoints", 0)


@dataclass
class DemoTDConfig(_PresetPart):
    """(b) the TD sweep of each family (:class:`~taskvec_interp.experiments.sweep.SweepConfig`)."""

    shots: tuple[int, ...] | None = opt(None, _preset("td", "shots", "shot counts, comma-separated"))
    n_per_task: int | None = opt(None, _preset("td", "n_per_task", "prompts per task"))
    k: int | None = opt(None, _preset("td", "k", "neighbours of the TD k-NN"))
    n_boot: int | None = opt(None, _preset("td", "n_boot", "bootstrap resamples"))

    def check(self) -> None:
        if self.shots is not None:
            self.shots = check_ints(self._name("shots"), self.shots, 0)
        self._int("n_per_task", 1)
        self._k("n_per_task")
        if self.n_boot is not None:
            check_n_boot(self._name("n_boot"), self.n_boot)


@dataclass
class DemoPatchConfig(_PresetPart):
    """(c) task-vector patching of each family at the sweep's peak layer
    (:class:`~taskvec_interp.experiments.patching.PatchConfig`)."""

    shots: int | None = opt(None, _preset("patch", "shots", "demonstrations per prompt"))
    n_per_task: int | None = opt(None, _preset("patch", "n_per_task", "evaluation prompts per task"))
    k: int | None = opt(None, _preset("patch", "k", "neighbours of the TD k-NN"))
    n_boot: int | None = opt(None, _preset("patch", "n_boot", "bootstrap resamples"))

    def check(self) -> None:
        self._int("shots", 1)
        self._int("n_per_task", 1)
        self._k("n_per_task")
        if self.n_boot is not None:
            check_n_boot(self._name("n_boot"), self.n_boot)


@dataclass
class DemoFinetuneConfig(_PresetPart):
    """(d) first-k vs last-k fine-tuning (:class:`~taskvec_interp.experiments.finetune.FinetuneConfig`), one run
    per layer spec."""

    family: str | None = opt(None, _preset("finetune", "family", "task family"))
    layers: tuple[str, ...] | None = opt(None, _preset("finetune", "layers", "layer specs, one run each, "
                                                                            "comma-separated"))
    steps: int | None = opt(None, _preset("finetune", "steps", "optimizer steps"))
    n_train: int | None = opt(None, _preset("finetune", "n_train", "training prompts per task"))
    batch_size: int | None = opt(None, _preset("finetune", "batch_size", "training prompts per step"))
    n_per_task: int | None = opt(None, _preset("finetune", "n_per_task", "evaluation prompts per task"))
    k: int | None = opt(None, _preset("finetune", "k", "neighbours of the TD k-NN"))
    lr: float | None = opt(None, _preset("finetune", "lr", "learning rate"))

    def check(self) -> None:
        if self.family is not None:
            check_str(self._name("family"), self.family)
        if self.layers is not None:
            if isinstance(self.layers, str) or not isinstance(self.layers, (list, tuple)) or not self.layers:
                raise ValueError(f"{self._name('layers')} must be a non-empty list of layer specs, got "
                                 f"{self.layers!r}")
            self.layers = tuple(self.layers)
            for spec in self.layers:
                if not isinstance(spec, str):
                    raise ValueError(f"{self._name('layers')} must be layer specs (strings), got {spec!r}")
                check_layer_spec(spec, FINETUNE_LAYERS, self._name("layers"))
        for name in ("steps", "n_train", "batch_size", "n_per_task"):
            self._int(name, 1)
        self._k("n_per_task")
        if self.lr is not None:
            check_number(self._name("lr"), self.lr, 0.0, low_open=True)


@dataclass
class DemoTrajectoryConfig(_PresetPart):
    """(e) the trajectory over the synthetic run's checkpoints (``synthetic_trajectory``)."""

    n_per_basis: int | None = opt(None, _preset("trajectory", "n_per_basis", "test sequences per basis"))
    k: int | None = opt(None, _preset("trajectory", "k", "neighbours of the TD k-NN"))

    def check(self) -> None:
        self._int("n_per_basis", 1)
        self._k("n_per_basis")


PART_FIELDS: dict[type, str] = {DemoSyntheticConfig: "synthetic", DemoTDConfig: "td", DemoPatchConfig: "patch",
                                DemoFinetuneConfig: "finetune", DemoTrajectoryConfig: "trajectory"}


@dataclass
class DemoConfig:
    """What the demo runs. ``quick``: the same parts on smaller settings (about 3 minutes on 2 cores).

    Each part has its settings (``td=DemoTDConfig(n_per_task=50)``); a setting left ``None`` takes the value
    of the preset (:func:`demo_settings`: full, or ``quick``), filled in when the config is built.
    """

    quick: bool = opt(False, "the same parts on smaller settings (about 3 min)")
    model: str = model_field()
    backend: str = backend_field()
    seed: int = opt(0, "seed of every part (prompts, training, the synthetic test set's offset)")
    families: tuple[str, ...] = opt(FAMILIES, "task families of the language-model parts, comma-separated",
                                    choices=FAMILIES)
    parts: tuple[str, ...] = opt(PARTS, "parts to run, comma-separated", choices=PARTS)
    synthetic: DemoSyntheticConfig = opt(factory=DemoSyntheticConfig)
    td: DemoTDConfig = opt(factory=DemoTDConfig)
    patch: DemoPatchConfig = opt(factory=DemoPatchConfig)
    finetune: DemoFinetuneConfig = opt(factory=DemoFinetuneConfig)
    trajectory: DemoTrajectoryConfig = opt(factory=DemoTrajectoryConfig)

    def __post_init__(self) -> None:
        check_bool("DemoConfig.quick", self.quick)
        check_str("DemoConfig.model", self.model)
        check_choice("DemoConfig.backend", self.backend, backend_names())
        check_seed("DemoConfig.seed", self.seed)
        self.families = check_choices("DemoConfig.families", self.families, FAMILIES)
        self.parts = check_choices("DemoConfig.parts", self.parts, PARTS)
        preset = demo_settings(self.quick)
        for cls, name in PART_FIELDS.items():
            part = getattr(self, name)
            if isinstance(part, dict):  # read back from demo_config.json
                unknown = sorted(set(part) - {f.name for f in fields(cls)})
                if unknown:
                    raise ValueError(f"DemoConfig.{name} must be a {cls.__name__} (or a dict of its fields), got "
                                     f"{part!r}: unknown keys {unknown}")
                part = cls(**part)
            if not isinstance(part, cls):
                raise ValueError(f"DemoConfig.{name} must be a {cls.__name__} (or a dict of its fields), got {part!r}")
            fill = {k: v for k, v in preset[name].items() if getattr(part, k) is None}
            setattr(self, name, replace(part, **fill) if fill else part)

    def resolved(self) -> dict:
        """Every part's settings, as plain dicts."""
        return {name: asdict(getattr(self, name)) for name in PART_FIELDS.values()}


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
DEMO_KEEP = ("demo_config.json", "report.html", "synthetic", "finetune", "trajectory",
             *(f"{p}_{f}" for p in ("td", "patch") for f in FAMILIES))
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

    def save(self, out: str | Path) -> Path:
        """``demo.json`` in ``out``, written whole (:func:`taskvec_interp.io.write_result_dir`): an older demo
        result is replaced (the parts' directories carried over), anything else there is refused."""
        from .io import write_result_dir

        record = {"config": asdict(self.config), "parts": [asdict(p) for p in self.parts], "seconds": self.seconds,
                  "model": self.model}
        with write_result_dir(out, DEMO_KIND, record["config"], keep=DEMO_KEEP) as tmp:
            (tmp / "demo.json").write_text(json.dumps(record, indent=2, default=str))
        return Path(out)

    @classmethod
    def load(cls, directory: str | Path) -> DemoResult:
        """Read back what :meth:`save` wrote (``out`` is ``directory``); ``ValueError`` naming the file when it
        is not a complete, intact demo result."""
        from .io import read_result_dir
        from .results import read_json

        d = read_result_dir(directory, DEMO_KIND)
        record = read_json(d / "demo.json")
        parts = [Part(**p) for p in record["parts"]]
        for part in parts:  # a figure or table outside the demo directory is refused, never read
            check_part_paths(part, d, str(d / "demo.json"))
        return cls(DemoConfig(**record["config"]), parts, d, record["seconds"],
                   record.get("model", {}))


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
    from .io import inside_or_raise

    figures, tables = part.figures, part.tables
    if not isinstance(figures, list) or not isinstance(tables, dict):
        raise ValueError(f"{source}: part {part.name!r} has malformed figures / tables ({figures!r}, {tables!r})")
    for rel in [*figures, *tables.values()]:
        inside_or_raise(out, rel, f"{source} (part {part.name!r})")


def _row(metric: str, ours: Any, paper: str = "") -> dict:
    return {"metric": metric, "ours": ours, "paper": paper}


def _rel(paths: list[Path], out: Path) -> list[str]:
    return [str(Path(p).relative_to(out)) for p in paths]


def _pos_available() -> str | None:
    """Why the POS family cannot be built here (no treebank offline), or ``None``."""
    from .tasks import get_family

    try:
        get_family("pos")
    except (ValueError, OSError) as err:
        return f"no Universal Dependencies treebank available ({str(err).splitlines()[0][:200]}); set TASKVEC_UD_PATH"
    return None


def check_demo(config: DemoConfig) -> None:
    """What the demo can check before its first part runs (the synthetic part trains for minutes first): the
    model resolves (a built-in name, a model directory, a hub id's shape), the backend is registered and
    importable, every family builds (``pos`` without a treebank is skipped with its reason, not refused).
    ``ValueError`` naming the value."""
    from .adapters.load import check_model_spec
    from .adapters.registry import get_backend
    from .tasks import get_family

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
    names = [f for f in config.families if f != "pos"] if {"td", "patch"} & set(config.parts) else []
    for name in names:
        get_family(name)
    if "finetune" in config.parts:
        try:
            get_family(config.finetune.family, split="train")
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
    from .io import check_result_owner, claim_result_dir

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
            from .adapters import load_model

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
            why = _pos_available() if fam == "pos" else None
            if why:
                parts.append(Part(f"td_{fam}", f"TD over layers and shots: {fam}", "", skipped=why))
                continue
            parts.append(run_part(f"td_{fam}", lambda d, fam=fam: _td(d, out, adapter(), fam, config.td, config,
                                                                          progress)))
            if "patch" in config.parts:
                parts.append(run_part(f"patch_{fam}", lambda d, fam=fam: _patch(d, out, adapter(), fam, config.patch,
                                                                                config, progress)))
    if "finetune" in config.parts:
        parts.append(run_part("finetune", lambda d: _finetune(d, out, adapter(), config.finetune, config, progress)))
    if "trajectory" in config.parts:
        parts.append(run_part("trajectory", lambda d: _trajectory(d, out, config.trajectory, config.seed, progress)))
    model = state["adapter"].identity() if "adapter" in state else {"name": config.model, "backend": config.backend}
    result = DemoResult(config, parts, out, round(time.perf_counter() - t0, 1), model)
    result.save(out)  # demo.json, whole; the parts' directories carried over
    return result


# ---------------------------------------------------------------------------------------------- resume
LM_PARTS = ("td", "patch", "finetune")
"""The parts that run the language model (their key holds the model's fingerprint)."""


def part_key(name: str, config: DemoConfig, fingerprint: Callable[[], str]) -> dict:
    """What part ``name`` (``synthetic``, ``td_<family>``, ``patch_<family>``, ``finetune``, ``trajectory``) is
    computed with: its resolved settings (and those of the parts it reads), the seed, ``quick``, and for the
    language-model parts the backend and the model's fingerprint (``fingerprint()``, called only for them: the
    weights, never the path string)."""
    kind, _, family = name.partition("_")
    reads = {"synthetic": ("synthetic",), "td": ("td",), "patch": ("td", "patch"), "finetune": ("finetune",),
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
    return names + [p for p in ("finetune", "trajectory") if p in config.parts]


def check_finished_parts(out: Path, config: DemoConfig) -> Any:
    """Refuse (``ValueError``, before any part runs and before anything is written) a demo directory whose
    finished parts were computed with another config: another model (its weights' fingerprint), seed,
    ``quick`` or part setting; the message names the part and every differing field with both values, and the
    finished parts are left as they are. Returns the adapter it loaded to read the model's fingerprint (only
    when a finished language-model part needs it), for the demo to reuse."""
    from .io import check_resume

    state: dict[str, Any] = {}

    def fingerprint() -> str:
        if "adapter" not in state:
            from .adapters import load_model

            state["adapter"] = load_model(config.model, backend=config.backend)
        return state["adapter"].fingerprint()["fingerprint"]

    for name in planned_parts(config):
        marker = out / name / "part.json"
        if not marker.exists():
            continue
        part = read_part(marker, out)
        check_resume(part.key, part_key(name, config, fingerprint), out / name, f"the demo part {name!r}")
    return state.get("adapter")


# ---------------------------------------------------------------------------------------------- parts


def _synthetic(d: Path, out: Path, s: DemoSyntheticConfig, seed: int, progress: bool) -> Part:
    from .figures import synthetic_figures
    from .synthetic import train, train_config
    from .synthetic.analysis import AnalysisConfig, analyze_run

    run = d / "run"
    train(train_config(s.config, steps=s.steps, seed=seed), run, progress=progress)
    result = analyze_run(run, AnalysisConfig(n_per_basis=s.n_per_basis, k=s.k,
                                             umap_checkpoints=s.umap_checkpoints), progress=progress)
    result.save(d / "analysis")
    figs = synthetic_figures(result, d / "analysis")
    sm = result.summary
    bases = sm["bases"]
    order = sorted((b["below_ridge_step"] if b["below_ridge_step"] is not None else 10**12, name)
                   for name, b in bases.items())
    gaps = [b["gap_closed"] for b in bases.values() if b["gap_closed"] is not None]
    headline = [
        _row(f"TD at the middle layer ({sm['td_layer']}), last checkpoint", f"{sm['td_last']:.3f} "
             f"(chance {sm['chance']:.2f}; first checkpoint {sm['td_first']:.3f})", PAPER["synthetic_td"]),
        _row("per-basis TD at the last checkpoint", ", ".join(f"{n} {b['final_td']:.2f}" for n, b in bases.items())),
        _row("order in which bases go below the basis-agnostic error",
             " < ".join(f"{n} ({'never' if st >= 10**12 else st})" for st, n in order), PAPER["synthetic_order"]),
        _row("share of the sparsity gap closed by the final loss (0 ridge, 1 rank-r oracle)",
             f"mean {sum(gaps) / len(gaps):.2f}" if gaps else "n/a"),
    ]
    cfg = read_json(run / "config.json")
    text = (f"A {cfg['model']['n_layer']}-layer GPT-2 (d_model {cfg['model']['d_model']}) trained for {s.steps} "
            f"steps on the Mixture of Sparse Linear Regression ({cfg['data']['n_bases']} bases, D = "
            f"{cfg['data']['n_dims']}). TD is the leave-one-out k-NN decodability of the basis from the residual "
            "stream at the y token of the last demonstration. Encoding (TD) and decoding (the basis's loss) emerge "
            "together.")
    return Part("synthetic", "(a) Synthetic emergence: encoding and decoding rise together", text, headline,
                _rel(figs, out), {"TD per layer and checkpoint (overall)": str((d / "analysis" / "td.parquet").relative_to(out))})


def _td(d: Path, out: Path, adapter, fam: str, s: DemoTDConfig, config: DemoConfig, progress: bool) -> Part:
    from .experiments.sweep import SweepConfig, run_sweep, summarize
    from .figures import sweep_figures

    cfg = SweepConfig(model=config.model, backend=config.backend, family=fam, shots=tuple(s.shots),
                      n_per_task=s.n_per_task, k=s.k, n_boot=s.n_boot, seed=config.seed)
    result = run_sweep(adapter, cfg, progress=progress)
    result.save(d / "sweep")
    figs = sweep_figures(result, d / "sweep", umap=False)
    summ = summarize(result)
    summ.to_parquet(d / "summary.parquet", index=False)
    four = summ[summ["shots"] == 4]
    mid = four.iloc[0] if len(four) else summ.iloc[-1]
    td_task = result.td[(result.td["level"] == "task") & (result.td["shots"] == int(mid["shots"]))
                        & (result.td["layer"] == int(mid["peak_layer"])) & (result.td["task"] != "null")]
    headline = [
        _row(f"peak-TD layer ({int(mid['shots'])}-shot)", f"{int(mid['peak_layer'])} of {adapter.n_layers}",
             PAPER[f"td_{fam}"]),
        _row(f"mean per-task TD at the peak ({int(mid['shots'])}-shot)",
             f"{td_task['td'].mean():.2f} +- {td_task['td'].std(ddof=0):.2f} (overall {mid['peak_td']:.3f}, "
             f"chance {mid['chance']:.3f})"),
        _row("peak TD by shots", ", ".join(f"{int(r.shots)}-shot {r.peak_td:.2f}" for r in summ.itertuples())),
        _row("mean exact-match accuracy by shots",
             ", ".join(f"{int(r.shots)}-shot {r.mean_exact:.2f}" for r in summ.itertuples())),
        _row(f"TD vs accuracy R^2 (layer {result.fit['layer']}, {result.fit['n_points']} points)",
             "undefined" if result.fit["r2"] != result.fit["r2"] else f"{result.fit['r2']:.2f}", PAPER[f"r2_{fam}"]),
    ]
    text = (f"{fam}: {cfg.n_per_task} prompts per task (Null included), shots {list(cfg.shots)}, on "
            f"{adapter.identity()['name']}. One forward pass per prompt batch gives every layer's activation at "
            "the token before the answer (the generation's prefill) and the greedy answer.")
    return Part(f"td_{fam}", f"(b) Task decodability over layers and shots: {fam}", text, headline, _rel(figs, out),
                {"peak TD and accuracy per shot count": str((d / "summary.parquet").relative_to(out))})


def _patch(d: Path, out: Path, adapter, fam: str, s: DemoPatchConfig, config: DemoConfig, progress: bool) -> Part:
    from .experiments.patching import PatchConfig, run_patching
    from .experiments.sweep import load_sweep
    from .figures import patching_figures

    sweep_td = load_sweep(out / f"td_{fam}" / "sweep").td
    cfg = PatchConfig(model=config.model, backend=config.backend, family=fam, shots=s.shots,
                      n_per_task=s.n_per_task, k=s.k, n_boot=s.n_boot, layers="peak",
                      modes=("add", "replace"), directions=("positive", "negative"), seed=config.seed,
                      logprob=True)
    result = run_patching(adapter, cfg, td_sweep=sweep_td[sweep_td["shots"] == s.shots]
                          if s.shots in set(sweep_td["shots"]) else sweep_td, progress=progress)
    result.save(d / "patching")
    figs = patching_figures(result, d / "patching")
    sm = result.summary
    rows = [_row("layer (peak TD of the sweep)", f"{sm['layer']} (TD {sm['peak_td']:.2f}, chance {sm['chance']:.2f})")]
    for key, vals in sm["at_peak"].items():
        mean = vals.get("mean")
        rows.append(_row(f"{key.replace('_', ' ')}: mean change in accuracy over tasks",
                         "n/a" if mean is None else f"{mean * 100:+.1f} points", PAPER["patch"] if "positive" in key
                         else ""))
    for key, vals in sm.get("logprob_at_peak", {}).items():
        mean = vals.get("mean")
        rows.append(_row(f"{key.replace('_', ' ')}: mean change in the answer's log-probability (nats per token)",
                         "n/a" if mean is None else f"{mean:+.3f}"))
    base = [v for t, v in sm["baseline"].items() if t != "null"]
    rows.insert(1, _row("baseline accuracy (mean over tasks)", f"{sum(base) / len(base):.2f}" if base else "n/a"))
    text = (f"{fam}: the task vector (mean residual at each demonstration's answer-preceding token, layer "
            f"{sm['layer']}) of the prompt's own task (positive) or of the Null task (negative), added to or "
            "replacing the query's last-token residual; exact match with paired bootstrap CIs, and the "
            "teacher-forced log-probability of the answer (continuous where exact match sits at the floor).")
    tables = {"accuracy per task and condition": str((d / "patching" / "accuracy.parquet").relative_to(out))}
    return Part(f"patch_{fam}", f"(c) Task-vector patching at the peak layer: {fam}", text, rows, _rel(figs, out),
                tables)


def _finetune(d: Path, out: Path, adapter, s: DemoFinetuneConfig, config: DemoConfig, progress: bool) -> Part:
    from .experiments.finetune import FinetuneConfig, compare_runs, finetune
    from .figures import finetune_figures

    module = adapter._hf_module()
    runs = []
    for layers in s.layers:
        cfg = FinetuneConfig(model=config.model, family=s.family, layers=layers, steps=s.steps,
                             n_train=s.n_train, batch_size=s.batch_size, n_per_task=s.n_per_task,
                             k=s.k, lr=s.lr, warmup_steps=max(1, s.steps // 10), ckpt_every=s.steps,
                             seed=config.seed, eval_before=not runs)
        runs.append(finetune(cfg, d / layers.replace(":", ""), model=module, tokenizer=adapter.tokenizer,
                             progress=progress))
    summary, per_task, td = compare_runs(runs)
    summary.to_parquet(d / "summary.parquet", index=False)
    figs = finetune_figures(per_task, td, d, title=f"{s.family}: first vs last layers")
    rows = [_row(f"{r.model}: accuracy / TD (layer {r.td_layer})", f"{r.accuracy_mean:.2f} / {r.td_mean:.2f}",
                 PAPER["finetune"] if i == 0 else "") for i, r in enumerate(summary.itertuples())]
    text = (f"LoRA (rank 16) on the first or the last 10 of {adapter.n_layers} layers, {s.steps} steps on "
            f"{s.family}'s train side; accuracy and TD on its test side before and after. A short run: the "
            "direction of the effect, not the paper's magnitude.")
    return Part("finetune", "(d) Fine-tuning the first vs the last layers", text, rows, _rel(figs, out),
                {"accuracy and TD per model": str((d / "summary.parquet").relative_to(out))})


def _trajectory(d: Path, out: Path, s: DemoTrajectoryConfig, seed: int, progress: bool) -> Part:
    from .figures import trajectory_figures
    from .synthetic.analysis import SYNTHETIC_TEST_SEED, synthetic_trajectory

    result = synthetic_trajectory(out / "synthetic" / "run", n_per_basis=s.n_per_basis, k=s.k, seed=SYNTHETIC_TEST_SEED + seed,
                                  out=d / "trajectory", progress=progress)  # saves it there
    figs = trajectory_figures(result, d / "trajectory", title="synthetic run: TD and loss over training")
    summ = result.tables["summary"]
    first, last = summ.iloc[0], summ.iloc[-1]
    td_col = "td" if "td" in summ else next(c for c in summ.columns if c.startswith("td"))
    rows = [_row("mean TD over tasks: first -> last checkpoint", f"{float(first[td_col]):.2f} -> {float(last[td_col]):.2f} "
                 f"(steps {int(first['step'])} -> {int(last['step'])})", PAPER["trajectory"])]
    return Part("trajectory", "(e) A trajectory over the synthetic run's checkpoints",
                "The generic checkpoint loop (experiments/trajectory.py) over the synthetic run of part (a): one model "
                "in memory at a time, TD at every layer and the per-basis loss at each checkpoint.", rows,
                _rel(figs, out), {"trajectory summary": str((d / "trajectory" / "summary.parquet").relative_to(out))})


__all__ = ["DemoConfig", "DemoFinetuneConfig", "DemoPatchConfig", "DemoResult", "DemoSyntheticConfig", "DemoTDConfig",
           "DemoTrajectoryConfig", "PAPER", "PARTS", "Part", "check_finished_parts", "demo_settings", "part_key",
           "planned_parts", "run_demo"]
