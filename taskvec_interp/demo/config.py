"""The demo's configuration: which parts run, on which families, with which sizes (the full and ``quick``
presets of :func:`demo_settings`), one dataclass per part, and the paper's numbers shown beside ours."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from ..config import backend_field, backend_names, model_field, opt
from ..hooks import FINETUNE_LAYERS, check_layer_spec
from ..validate import (
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

PARTS = ("synthetic", "td", "patch", "zeroshot", "finetune", "trajectory")
FAMILIES = ("bitwise", "pos", "fv")
QUICK_FAMILIES = ("bitwise", "fv")
"""``--quick`` (CI's smoke run) leaves POS out: its parts run the same code as bitwise's."""

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
    "zeroshot": "Hendel et al.: baseline / task vector / ICL 0.13 / 0.72 / 0.83 (Pythia-2.8B, 18 tasks); no model "
                "under 1B reported",
}


FINETUNE_TASKS = ("person-sport", "country-capital", "singular-plural", "present-past", "next_item")
"""The function-vector tasks the demo fine-tunes on: tasks whose inputs differ from one another's, so the train /
test split of each task cannot leak a test query into another task's training prompts (the fine-tuning refuses
such a leak; country-capital and country-currency, or next_item and prev_item, share inputs)."""


QA_TEMPLATE = {"input_prefix": "Q: ", "output_prefix": "\nA:", "example_separator": "\n\n"}
"""The zero-shot part's prompt template: Todd et al.'s ``Q: x / A: y`` layout, in which the function-vector tasks are
written (with the default ``x -> y`` layout a patched vector of SmolLM2 carries the task but not the query:
docs/zeroshot.md)."""


def demo_settings(quick: bool) -> dict:
    """The sizes of each part: the full demo (<= 30 min on 2 CPU cores) or ``quick`` (<= 4 min)."""
    if quick:
        return {
            "synthetic": {"config": "tiny", "steps": 300, "n_per_basis": 30, "k": 5, "umap_checkpoints": 3},
            "td": {"shots": (1, 4), "n_per_task": 6, "k": 3, "n_boot": 50, "controls": ("input_only", "shuffled"),
                   "shuffled_shots": (4,)},
            "patch": {"shots": 4, "n_per_task": 4, "k": 2, "n_boot": 50},
            "zeroshot": {"families": ("fv",), "shots": 5, "n_dev": 3, "n_test": 6, "n_dummy": 2, "layers": "last:20",
                         "n_boot": 50, "template": dict(QA_TEMPLATE)},
            "finetune": {"family": "fv", "family_kwargs": {"tasks": list(FINETUNE_TASKS)},
                         "layers": ("first:10", "last:10"), "steps": 4, "n_train": 8, "batch_size": 4,
                         "n_per_task": 5, "k": 2, "lr": 5e-3},
            "trajectory": {"n_per_basis": 30, "k": 5},
        }
    return {
        "synthetic": {"config": "small", "steps": 5_000, "n_per_basis": 100, "k": 10, "umap_checkpoints": 5},
        "td": {"shots": (1, 4, 10), "n_per_task": 30, "k": 10, "n_boot": 300, "controls": ("input_only", "shuffled"),
               "shuffled_shots": (4,)},
        "patch": {"shots": 4, "n_per_task": 12, "k": 10, "n_boot": 300},
        "zeroshot": {"families": ("fv",), "shots": 5, "n_dev": 8, "n_test": 20, "n_dummy": 2, "layers": "all",
                     "n_boot": 1000, "template": dict(QA_TEMPLATE)},
        "finetune": {"family": "fv", "family_kwargs": {"tasks": list(FINETUNE_TASKS)},
                     "layers": ("first:10", "last:10"), "steps": 100, "n_train": 100, "batch_size": 8,
                     "n_per_task": 30, "k": 10, "lr": 5e-3},
        "trajectory": {"n_per_basis": 50, "k": 10},
    }

def _preset(part: str, name: str, text: str) -> str:
    """A part setting's help: ``text`` and the two presets' values (read from :func:`demo_settings`)."""
    def show(v: object) -> str:
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    full, quick = demo_settings(False)[part][name], demo_settings(True)[part][name]
    return f"{text} (full {show(full)}, quick {show(quick)})"


def _train_configs() -> tuple[str, ...]:
    from ..synthetic.train import TRAIN_CONFIGS

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
    controls: tuple[str, ...] | None = opt(None, _preset("td", "controls", "TD of the same queries without "
                                                         "demonstrations / with labels shuffled across tasks"))
    shuffled_shots: tuple[int, ...] | None = opt(None, _preset("td", "shuffled_shots", "shot counts of the "
                                                               "shuffled-label control, comma-separated"))

    def check(self) -> None:
        if self.shuffled_shots is not None:
            self.shuffled_shots = check_ints(self._name("shuffled_shots"), self.shuffled_shots, 1)
        if self.controls is not None:
            from ..tasks.controls import CONTROLS

            self.controls = tuple(self.controls)
            for c in self.controls:
                check_choice(self._name("controls"), c, CONTROLS)
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
class DemoZeroShotConfig(_PresetPart):
    """(c') zero-shot task vectors as Hendel et al. publish them, per family
    (:class:`~taskvec_interp.experiments.zeroshot.ZeroShotConfig`): per-query and per-task vectors, the layer
    chosen on the dev split, every number on the test split."""

    families: tuple[str, ...] | None = opt(None, _preset("zeroshot", "families", "families (among the demo's), "
                                                                                "comma-separated"))
    shots: int | None = opt(None, _preset("zeroshot", "shots", "demonstrations of each query"))
    n_dev: int | None = opt(None, _preset("zeroshot", "n_dev", "dev queries per task (choose the layer)"))
    n_test: int | None = opt(None, _preset("zeroshot", "n_test", "test queries per task (every reported number)"))
    n_dummy: int | None = opt(None, _preset("zeroshot", "n_dummy", "dummy queries averaged into each vector"))
    layers: str | None = opt(None, _preset("zeroshot", "layers", "layers swept (all | first:K | last:K | A-B | 3,5)"))
    n_boot: int | None = opt(None, _preset("zeroshot", "n_boot", "bootstrap resamples"))
    template: dict | None = opt(None, _preset("zeroshot", "template", "prompt template (PromptTemplate fields) as "
                                                                      "JSON"))

    def check(self) -> None:
        if self.template is not None and not isinstance(self.template, dict):
            raise ValueError(f"{self._name('template')} must be a dict (JSON object), got {self.template!r}")
        if self.families is not None:
            self.families = check_choices(self._name("families"), self.families, FAMILIES)
        self._int("shots", 1)
        for name in ("n_dev", "n_test", "n_dummy"):
            self._int(name, 1)
        if self.layers is not None:
            check_str(self._name("layers"), self.layers)
        if self.n_boot is not None:
            check_n_boot(self._name("n_boot"), self.n_boot)


@dataclass
class DemoFinetuneConfig(_PresetPart):
    """(d) first-k vs last-k fine-tuning (:class:`~taskvec_interp.experiments.finetune.FinetuneConfig`), one run
    per layer spec."""

    family: str | None = opt(None, _preset("finetune", "family", "task family"))
    family_kwargs: dict | None = opt(None, _preset("finetune", "family_kwargs", "the family's keyword arguments, "
                                                                              "as JSON"))
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
        if self.family_kwargs is not None and not isinstance(self.family_kwargs, dict):
            raise ValueError(f"{self._name('family_kwargs')} must be a dict (JSON object), got {self.family_kwargs!r}")
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
                                DemoZeroShotConfig: "zeroshot", DemoFinetuneConfig: "finetune",
                                DemoTrajectoryConfig: "trajectory"}


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
    families: tuple[str, ...] | None = opt(None, "task families of the language-model parts, comma-separated "
                                                 f"(full {','.join(FAMILIES)}, quick {','.join(QUICK_FAMILIES)})",
                                           choices=FAMILIES)
    parts: tuple[str, ...] = opt(PARTS, "parts to run, comma-separated", choices=PARTS)
    synthetic: DemoSyntheticConfig = opt(factory=DemoSyntheticConfig)
    td: DemoTDConfig = opt(factory=DemoTDConfig)
    patch: DemoPatchConfig = opt(factory=DemoPatchConfig)
    zeroshot: DemoZeroShotConfig = opt(factory=DemoZeroShotConfig)
    finetune: DemoFinetuneConfig = opt(factory=DemoFinetuneConfig)
    trajectory: DemoTrajectoryConfig = opt(factory=DemoTrajectoryConfig)

    def __post_init__(self) -> None:
        check_bool("DemoConfig.quick", self.quick)
        check_str("DemoConfig.model", self.model)
        check_choice("DemoConfig.backend", self.backend, backend_names())
        check_seed("DemoConfig.seed", self.seed)
        if self.families is None:
            self.families = QUICK_FAMILIES if self.quick else FAMILIES
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
            if name == "td" and "shuffled_shots" in fill and not set(self.td.shuffled_shots) <= set(self.td.shots):
                # the preset's shot count (the paper's default, 4) is not swept: the largest shot count instead
                self.td.shuffled_shots = tuple(s for s in (max(self.td.shots),) if s > 0)
        bad = [s for s in self.td.shuffled_shots if s not in self.td.shots]
        if bad:
            raise ValueError(f"DemoConfig.td.shuffled_shots must list shot counts of td.shots {list(self.td.shots)}, "
                             f"got {bad}")

    def resolved(self) -> dict:
        """Every part's settings, as plain dicts."""
        return {name: asdict(getattr(self, name)) for name in PART_FIELDS.values()}

