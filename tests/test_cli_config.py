"""The command line is read from the config dataclasses: every field is an option (a new field without one fails
here), every default is the dataclass's, every help text is shown, and parsed options build the config the
library would."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import typer
from typer.testing import CliRunner

from taskvec_interp import cli
from taskvec_interp.cli import app
from taskvec_interp.cli_config import build_config, config_command, config_options
from taskvec_interp.config import PromptSetConfig
from taskvec_interp.demo import DemoConfig, DemoFinetuneConfig, DemoTDConfig
from taskvec_interp.experiments.finetune import FinetuneConfig
from taskvec_interp.experiments.function_vectors import FVConfig
from taskvec_interp.experiments.heads import HeadsConfig
from taskvec_interp.experiments.patching import PatchConfig
from taskvec_interp.experiments.sweep import SweepConfig
from taskvec_interp.experiments.trajectory import TrajectoryConfig
from taskvec_interp.experiments.zeroshot import ZeroShotConfig
from taskvec_interp.synthetic.analysis import AnalysisConfig

# command path -> (the config it is built from, its options that are not config fields)
COMMANDS: dict[tuple[str, ...], tuple[type, set[str]]] = {
    ("td",): (SweepConfig, {"--out", "--figures", "--overwrite"}),
    ("patch",): (PatchConfig, {"--td-sweep", "--vectors-file", "--out", "--chunk", "--figures", "--overwrite"}),
    ("finetune",): (FinetuneConfig, {"--out", "--overwrite"}),
    ("trajectory",): (TrajectoryConfig, {"--checkpoints", "--model", "--revisions", "--synthetic-run", "--steps",
                                         "--out", "--figures", "--overwrite"}),
    ("synthetic", "analyze"): (AnalysisConfig, {"--out", "--umap", "--overwrite"}),
    ("demo",): (DemoConfig, {"--out", "--overwrite"}),
    ("heads",): (HeadsConfig, {"--preset", "--out", "--figures", "--overwrite"}),
    ("fv",): (FVConfig, {"--heads-dir", "--out", "--figures", "--overwrite"}),
    ("zeroshot",): (ZeroShotConfig, {"--out", "--figures", "--overwrite"}),
}
CALLBACKS = {("td",): cli.td, ("patch",): cli.patch, ("finetune",): cli.finetune_cmd, ("trajectory",): cli.trajectory,
             ("synthetic", "analyze"): cli.synthetic_analyze, ("demo",): cli.demo,
             ("heads",): cli.heads_command, ("fv",): cli.fv_command, ("zeroshot",): cli.zeroshot_command}
runner = CliRunner(env={"COLUMNS": "2000", "NO_COLOR": "1"})


def _leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """Every leaf field of ``cls``, nested dataclasses flattened (``td.n_per_task``): what the CLI must offer."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f))
    return out


def _flag(path: str) -> str:
    return "--" + path.replace(".", "-").replace("_", "-")


def _field_default(f: dataclasses.Field) -> object:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _click_command(path: tuple[str, ...]):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def _options(cmd) -> dict:
    """Long flag -> option (the first long name; ``--x/--no-x`` flags by ``--x``)."""
    return {next(o for o in p.opts if o.startswith("--")): p for p in cmd.params
            if p.param_type_name == "option" and p.name != "help"}


@pytest.mark.parametrize("path", list(COMMANDS), ids=[" ".join(p) for p in COMMANDS])
def test_every_config_field_is_an_option_and_nothing_else(path):
    cls, extra = COMMANDS[path]
    fields = {_flag(p) for p, _ in _leaf_fields(cls)}
    options = set(_options(_click_command(path)))
    assert options == fields | extra, (f"missing: {sorted(fields | extra - options)}; "
                                       f"not a field nor declared: {sorted(options - fields - extra)}")
    assert not fields & extra


@pytest.mark.parametrize("path", list(COMMANDS), ids=[" ".join(p) for p in COMMANDS])
def test_every_cli_default_is_the_dataclass_default(path):
    cls, _ = COMMANDS[path]
    opts = _options(_click_command(path))
    builder = {o.flag: o for o in CALLBACKS[path].options}
    for field_path, f in _leaf_fields(cls):
        flag = _flag(field_path)
        shown = opts[flag].default
        assert builder[flag].parse(shown) == _field_default(f), (flag, shown)


@pytest.mark.parametrize("path", list(COMMANDS), ids=[" ".join(p) for p in COMMANDS])
def test_help_lists_every_field_with_its_help(path):
    cls, _ = COMMANDS[path]
    res = runner.invoke(app, [*path, "--help"], terminal_width=2000)
    assert res.exit_code == 0, res.output
    text = re.sub(r"\s+", " ", res.output)
    for field_path, f in _leaf_fields(cls):
        assert _flag(field_path) in text, field_path
        assert f.metadata.get("help"), f"{cls.__name__}.{field_path} has no help text"
        assert f.metadata["help"] in text, (field_path, f.metadata["help"])


def test_patch_help_shows_the_template_and_the_interventions():
    from taskvec_interp.interventions import intervention_names

    res = runner.invoke(app, ["patch", "--help"], terminal_width=2000)
    text = re.sub(r"\s+", " ", res.output)
    assert "--template" in text and "PromptTemplate fields" in text
    modes = text[text.index("--modes"):].split("--directions")[0]
    assert all(name in modes for name in intervention_names())
    backend = text[text.index("--backend") + 2:].split(" --", 1)[0]
    from taskvec_interp.adapters.registry import backend_names

    assert all(name in backend for name in backend_names())


def test_every_field_of_every_config_has_help():
    for cls in (SweepConfig, PatchConfig, FinetuneConfig, TrajectoryConfig, AnalysisConfig, DemoConfig,
                PromptSetConfig):
        for path, f in _leaf_fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{path}"


def _captured(cls: type, args: list[str]) -> object:
    """The config a command built from ``cls`` gets for ``args`` (a throwaway app with the same builder)."""
    got = {}
    probe = typer.Typer()

    @probe.command()
    @config_command(cls)
    def run(config: cls) -> None:  # type: ignore[valid-type]
        got["config"] = config

    res = runner.invoke(probe, args)
    if isinstance(res.exception, ValueError):
        raise res.exception
    assert res.exit_code == 0, res.output + repr(res.exception)
    return got["config"]


@pytest.mark.parametrize(("cls", "args", "want"), [
    (SweepConfig, [], SweepConfig()),
    (SweepConfig, ["--family", "bitwise", "--shots", "1,4", "--n-per-task", "12", "--k", "3", "--layers", "8,12",
                   "--template", '{"input_prefix": "Q: "}', "--fit-include-null", "--max-new-tokens", "5"],
     SweepConfig(family="bitwise", shots=(1, 4), n_per_task=12, k=3, layers=[8, 12],
                 template={"input_prefix": "Q: "}, fit_include_null=True, max_new_tokens=5)),
    (PatchConfig, ["--modes", "replace", "--directions", "matrix", "--layers", "peak", "--zero-shot",
                   "--no-share-prefix", "--template", '{"output_prefix": " =>"}', "--family-kwargs", '{"n_bits": 6}'],
     PatchConfig(modes=("replace",), directions=("matrix",), layers="peak", zero_shot=True, share_prefix=False,
                 template={"output_prefix": " =>"}, family_kwargs={"n_bits": 6})),
    (FinetuneConfig, ["--layers", "last:4", "--target-modules", "q_proj,v_proj", "--alpha", "8", "--n-per-task", "20",
                      "--no-eval-before"],
     FinetuneConfig(layers="last:4", target_modules=["q_proj", "v_proj"], alpha=8.0, n_per_task=20,
                    eval_before=False)),
    (TrajectoryConfig, ["--dtype", "bfloat16", "--summary-layer", "3", "--layers", "first:2"],
     TrajectoryConfig(dtype="bfloat16", summary_layer=3, layers="first:2")),
    (AnalysisConfig, ["--patch-position", "-3", "--checkpoints", "0,30", "--patch-checkpoints", "", "--no-heads"],
     AnalysisConfig(patch_position=-3, checkpoints=(0, 30), patch_checkpoints=(), heads=False)),
    (AnalysisConfig, ["--patch-position", "context", "--umap-layers", "0,1"],
     AnalysisConfig(patch_position="context", umap_layers=[0, 1])),
    (DemoConfig, ["--quick", "--families", "bitwise", "--td-n-per-task", "12", "--finetune-layers", "first:2,last:2"],
     DemoConfig(quick=True, families=("bitwise",), td=DemoTDConfig(n_per_task=12),
                finetune=DemoFinetuneConfig(layers=("first:2", "last:2")))),
])
def test_parsed_options_round_trip_to_the_library_config(cls, args, want):
    assert _captured(cls, args) == want


def test_demo_quick_fills_the_unset_settings_from_the_quick_preset():
    from taskvec_interp.demo import demo_settings

    cfg = _captured(DemoConfig, ["--quick", "--td-n-per-task", "12"])
    quick = demo_settings(True)
    assert cfg.td.n_per_task == 12 and cfg.td.k == quick["td"]["k"] and cfg.td.shots == quick["td"]["shots"]
    assert cfg.patch.n_per_task == quick["patch"]["n_per_task"]
    assert DemoConfig().td.n_per_task == demo_settings(False)["td"]["n_per_task"]


def test_unreadable_values_name_the_option():
    probe_args = [(SweepConfig, ["--shots", "1,x"], "--shots must be comma-separated ints, got '1,x'"),
                  (SweepConfig, ["--template", "{oops"], "--template must be a JSON object"),
                  (PatchConfig, ["--family-kwargs", "[1]"], "--family-kwargs must be a JSON object")]
    for cls, args, msg in probe_args:
        probe = typer.Typer()

        @probe.command()
        @config_command(cls)
        def run(config: cls) -> None:  # type: ignore[valid-type]
            pass

        res = runner.invoke(probe, args)
        assert res.exit_code == 2 and msg in re.sub(r"\s+", " ", res.output), res.output


def test_a_config_error_is_the_configs_own_message():
    with pytest.raises(ValueError, match=r"SweepConfig\.metric must be one of .*got 'manhattan'"):
        _captured(SweepConfig, ["--metric", "manhattan"])


def test_the_real_command_runs_the_library_with_the_built_config(monkeypatch, tmp_path):
    """`taskvec td` hands run_sweep the config a library user would build (the model load is stubbed)."""
    import taskvec_interp.adapters as adapters
    import taskvec_interp.experiments.sweep as sweep

    class Stop(Exception):
        pass

    got = {}

    def fake_run(adapter, config, *a, **k):
        got["config"] = config
        raise Stop

    monkeypatch.setattr(adapters, "load_model", lambda *a, **k: object())
    monkeypatch.setattr(sweep, "run_sweep", fake_run)
    res = runner.invoke(app, ["td", "--shots", "2", "--n-per-task", "8", "--k", "3", "--template",
                              '{"example_separator": " | "}', "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, Stop), res.output
    assert got["config"] == SweepConfig(shots=(2,), n_per_task=8, k=3, template={"example_separator": " | "})


def test_builder_covers_nested_configs_and_refuses_clashes():
    opts = {o.path: o for o in config_options(DemoConfig)}
    assert "td.n_per_task" in opts and opts["td.n_per_task"].flag == "--td-n-per-task"
    assert build_config(DemoConfig, {"td.k": 2, "quick": True}).td.k == 2
    with pytest.raises(TypeError, match="also fields"):
        @config_command(SweepConfig)
        def bad(config: SweepConfig, k: int = 3) -> None:
            pass


@pytest.mark.parametrize("cls", [SweepConfig, PatchConfig, FinetuneConfig, TrajectoryConfig, AnalysisConfig, DemoConfig])
def test_a_saved_config_reads_back_equal(cls):
    """``asdict`` -> JSON -> the constructor (what every loader does with a config.json) is the same config."""
    import json

    from taskvec_interp.config import upgrade_config

    cfg = cls()
    raw = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert cls(**upgrade_config(cls, raw)) == cfg


def test_a_finetune_config_from_before_the_rename_still_loads():
    from taskvec_interp.config import upgrade_config

    raw = dataclasses.asdict(FinetuneConfig(n_per_task=20, layers="3,5"))
    raw["eval_n_per_task"] = raw.pop("n_per_task")
    raw["layers"] = "3,5"  # written as the user gave it, before specs were canonicalised
    assert FinetuneConfig(**upgrade_config(FinetuneConfig, raw)) == FinetuneConfig(n_per_task=20, layers=[3, 5])
