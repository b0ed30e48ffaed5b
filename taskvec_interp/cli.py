"""``taskvec``: the command line. Thin: every command is a library call."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from .cli_config import config_command, own_out
from .cli_config import overwrite_option as _overwrite_option
from .config import backend_names
from .demo import DemoConfig
from .experiments.finetune import FinetuneConfig
from .experiments.heads_cli import fv as fv_command
from .experiments.heads_cli import heads as heads_command
from .experiments.patching import PatchConfig
from .experiments.sweep import SweepConfig
from .experiments.trajectory import TrajectoryConfig
from .experiments.zeroshot_cli import zeroshot as zeroshot_command
from .synthetic.analysis import SYNTHETIC_TEST_SEED, AnalysisConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Task vectors in in-context learning.")

# Every command's config options are built from its config dataclass (cli_config.config_command): type, default
# and help come from the fields. Declared here are only the options that are not config fields.
MODEL_HELP = "model: built-in name, local HF directory or hub id"


def _backend_option() -> typer.models.OptionInfo:
    names = backend_names()
    return typer.Option("torch", metavar="[" + "|".join(names) + "]", help="adapter backend: " + " | ".join(names))


@app.command()
@config_command(DemoConfig)
def demo(
    config: DemoConfig,
    out: Path = typer.Option(Path("runs/demo"), help="output directory: report.html + every part's tables"),
    overwrite: bool = _overwrite_option(),
) -> None:
    """The paper's story in one command: synthetic emergence, TD over layers and shots, task-vector patching,
    first- vs last-layer fine-tuning and a checkpoint trajectory, in ONE self-contained HTML report.
    Re-running with the same --out reuses finished parts (a killed demo resumes). A part's setting left unset
    takes the full or the --quick preset's value."""
    from .demo import DEMO_KIND, check_demo, run_demo
    from .figures import write_demo_report, write_results_page

    cfg = config
    check_demo(cfg)  # the whole config (model, backend, families) before the synthetic part trains
    own_out(out, DEMO_KIND, overwrite=overwrite)
    t0 = time.perf_counter()
    result = run_demo(out, cfg, log=typer.echo)
    path = write_demo_report(result)
    page = write_results_page(result, out / "results.md", figures_dir=out / "figures")
    for part in result.parts:
        if part.skipped:
            typer.echo(f"{part.title}: skipped ({part.skipped})")
            continue
        typer.echo(f"{part.title} ({part.seconds:.0f}s)")
        for row in part.headline:
            typer.echo(f"  {row['metric']}: {row['ours']}" + (f"   [paper: {row['paper']}]" if row["paper"] else ""))
    if result.findings is not None:
        typer.echo("findings scoreboard (verdicts computed from each statistic's CI and p-value):")
        for r in result.findings.to_dict("records"):
            typer.echo(f"  {r['finding']} {r['family']}: {r['verdict']} ({r['statistic']} {r['ours']})")
    typer.echo(f"report: {path}; results page: {page} ({time.perf_counter() - t0:.0f}s)")


@app.command("results-page")
def results_page(
    run: Path = typer.Argument(..., help="a finished demo's directory (taskvec demo --out)"),
    page: Path = typer.Argument(..., help="the Markdown page to write, e.g. docs/results/demo.md"),
    figures_dir: Path = typer.Option(None, help="where the page's figures go (default: <page dir>/figures/<stem>)"),
) -> None:
    """Write a measured-results page (Markdown) from a finished demo's own tables: date, machine, model, versions,
    wall times, the findings scoreboard and every part's numbers and figures. Never typed by hand."""
    from .demo import DemoResult
    from .figures import write_results_page

    typer.echo(f"wrote {write_results_page(DemoResult.load(run), page, figures_dir=figures_dir)}")


@app.command()
@config_command(SweepConfig)
def td(
    config: SweepConfig,
    out: Path = typer.Option(Path("runs/td"), help="output directory (results + config + figures)"),
    figures: bool = typer.Option(True, help="write PNG figures"),
    overwrite: bool = _overwrite_option(),
) -> None:
    """Task decodability over layers x shots and ICL accuracy per task; TD-vs-accuracy R^2."""
    from .adapters import load_model
    from .experiments.sweep import KIND, run_sweep, summarize

    cfg = config
    from .tasks import get_family

    get_family(cfg.family, **cfg.family_kwargs)  # a bad family fails before the model loads
    own_out(out, KIND, overwrite=overwrite)  # --out checked and locked before the model loads
    adapter = load_model(cfg.model, backend=cfg.backend)
    result = run_sweep(adapter, cfg)
    result.save(out)
    typer.echo(summarize(result).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    acc = result.accuracy.pivot_table(index="task", columns="shots", values="exact", sort=False)
    typer.echo("exact-match accuracy (task x shots):\n" + acc.to_string(float_format=lambda v: f"{v:.2f}"))
    typer.echo(f"TD vs accuracy at layer {result.fit['layer']}: R^2 = {result.fit['r2']:.3f} "
               f"({result.fit['n_points']} points)")
    if cfg.controls:  # TD gained from the context: k-shot TD minus each control's, per layer
        from .experiments.sweep import context_gain

        gain = context_gain(result).pivot_table(index="layer", columns=["control", "shots"], values="gain", sort=False)
        typer.echo("TD gained from the context (k-shot TD minus the control's TD, same queries; CIs in "
                   "context_gain):\n" + gain.to_string(float_format=lambda v: f"{v:+.2f}"))
    if figures:
        from .figures import sweep_figures

        for path in sweep_figures(result, out):
            typer.echo(f"wrote {path}")
    typer.echo(f"results in {out} ({result.seconds:.0f}s)")


def _check_out_dir(out: Path) -> None:
    from .results import check_out_dir

    try:
        check_out_dir(out)
    except ValueError as err:
        raise typer.BadParameter(f"--out: {err}") from None


@app.command()
@config_command(PatchConfig)
def patch(
    config: PatchConfig,
    td_sweep: Path = typer.Option(None, help="a `taskvec td` output directory to read the peak layer from"),
    vectors_file: Path = typer.Option(None, help="task vectors saved by an earlier run (vectors.safetensors) "
                                                 "instead of computing them; refused if from another model"),
    out: Path = typer.Option(Path("runs/patch"), help="output directory (results + config + figures)"),
    chunk: int = typer.Option(16, help="conditions per saved chunk (a killed run resumes from the last one)"),
    figures: bool = typer.Option(True, help="write PNG figures"),
    overwrite: bool = _overwrite_option(),
) -> None:
    """Task vectors patched in: positive (own task) / negative (Null), add / replace / ablate, over layers."""
    from .experiments.patching import KIND, run_patching
    from .experiments.sweep import load_sweep, peak_layer_of
    from .tasks import get_family

    _check_out_dir(out)
    cfg = config
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"--chunk must be an int >= 1 (conditions per saved chunk), got {chunk!r}")
    sweep_td = load_sweep(td_sweep).td if td_sweep is not None else None
    if sweep_td is not None:
        try:
            peak_layer_of(sweep_td, cfg.shots)  # the sweep must hold the shot count the vectors are read at
        except ValueError as err:
            raise ValueError(f"--td-sweep {td_sweep}: {err}; run `taskvec td` with --shots including "
                             f"{cfg.shots}, or give --shots of the sweep") from None
    fam = get_family(cfg.family, **cfg.family_kwargs)  # a bad family fails here, before the model loads
    from .adapters import load_model

    if vectors_file is not None and not vectors_file.is_file():
        raise typer.BadParameter(f"--vectors-file {vectors_file} does not exist")
    own_out(out, KIND, (".partial",), overwrite)  # --out checked and locked before the model loads
    adapter = load_model(cfg.model, backend=cfg.backend)
    from .probes.vectors import TaskVectors

    given = TaskVectors.load(vectors_file, adapter) if vectors_file is not None else None
    result = run_patching(adapter, cfg, fam, vectors=given, td_sweep=td_sweep, checkpoint_dir=out / ".partial",
                          chunk_size=chunk)
    result.save(out)
    s = result.summary
    if s["peak_td"] is not None:
        typer.echo(f"peak TD {s['peak_td']:.3f} at layer {s['peak_layer']} (chance {s['chance']:.3f}); "
                   f"interventions at layer {s['layer']}:")
    else:  # no TD computed (--td off) nor read from a sweep
        typer.echo(f"interventions at layer {s['layer']}:")
    typer.echo(result.at_layer().to_string(float_format=lambda v: f"{v:.2f}"))
    if figures:
        from .figures import patching_figures

        for path in patching_figures(result, out):
            typer.echo(f"wrote {path}")
    typer.echo(f"results in {out} ({result.seconds:.0f}s)")


@app.command()
def verify(
    model: str = typer.Argument(..., help=MODEL_HELP),
    backend: str = _backend_option(),
) -> None:
    """Check an adapter against the model's own forward (residuals, logits, padding, hooks)."""
    from .adapters import load_model, verify_adapter

    typer.echo(verify_adapter(load_model(model, backend=backend), raise_on_fail=False).to_string(index=False))


finetune_app = typer.Typer(help="Layer-subset fine-tuning (first-k vs last-k layers, LoRA via peft).")
app.add_typer(finetune_app, name="finetune")


@finetune_app.callback(invoke_without_command=True)
@config_command(FinetuneConfig)
def finetune_cmd(
    ctx: typer.Context,
    config: FinetuneConfig,
    out: Path = typer.Option(Path("runs/finetune"), help="run directory (resumes if it has checkpoints)"),
    overwrite: bool = _overwrite_option(),
) -> None:
    """Fine-tune a layer subset, then evaluate TD and accuracy before and after (subcommand: compare)."""
    if ctx.invoked_subcommand is not None:
        return
    from .experiments.finetune import KIND, finetune

    _check_out_dir(out)
    cfg = config
    from .tasks import get_family

    get_family(cfg.family, **cfg.family_kwargs, split="train")  # a bad family fails before the model loads
    own_out(out, KIND, overwrite=overwrite)  # --out checked and locked before the model loads
    run = finetune(cfg, out)
    from .experiments.finetune import compare_runs

    summary, _, _ = compare_runs([run])
    typer.echo(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo(f"run in {run.path}")


@finetune_app.command("compare")
def finetune_compare(
    runs: list[Path] = typer.Argument(..., help="fine-tuning run directories"),
    out: Path = typer.Option(None, help="where to write the tables and figures (default: print only)"),
    overwrite: bool = _overwrite_option(),
) -> None:
    """The Table-1-like comparison of runs (+ the pretrained model): accuracy and TD, figures."""
    from .experiments.finetune import COMPARISON_KIND, compare_runs

    if out is not None:
        own_out(out, COMPARISON_KIND, overwrite=overwrite)  # another command's result is refused before reading
    elif overwrite:
        raise ValueError("--overwrite applies to --out, and no --out was given")
    summary, per_task, td = compare_runs(runs)
    typer.echo(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo(per_task.pivot_table(index="task", columns="model", values="exact", sort=False)
               .to_string(float_format=lambda v: f"{v:.2f}"))
    if out is not None:
        from .experiments.finetune import FinetuneComparison
        from .figures import finetune_figures

        FinetuneComparison(summary, per_task, td).save(out)  # the tables, whole (kind "finetune_comparison")
        for path in finetune_figures(per_task, td, out):
            typer.echo(f"wrote {path}")


# attention heads on language models (Todd et al.'s function vectors): their commands live with the experiment
app.command("heads")(heads_command)
app.command("fv")(fv_command)
app.command("zeroshot")(zeroshot_command)  # Hendel et al.'s zero-shot task vectors, as published

synthetic_app = typer.Typer(no_args_is_help=True, help="The synthetic MSLR experiment (GPT-2 / Mamba-2).")
app.add_typer(synthetic_app, name="synthetic")


@synthetic_app.command("train")
def synthetic_train(
    out: Path = typer.Option(..., help="run directory (resumes if it has checkpoints)"),
    config: str = typer.Option("small", help="small | paper | tiny"),
    backbone: str = typer.Option("gpt2", help="gpt2 | mamba2"),
    tokens: str = typer.Option(None, help="token layout garg | xy (default: the config's: paper garg, small xy)"),
    steps: int = typer.Option(None, help="override the number of training steps"),
    seed: int = typer.Option(0),
    seeds: str = typer.Option(None, help="several seeds trained together as one stacked model, e.g. 0,1,2,3,4 "
                                         "(each written to OUT/seed_<n>); overrides --seed"),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    bf16: bool = typer.Option(False, help="bf16 autocast (GPU)"),
    compile: bool = typer.Option(False, help="torch.compile the model's forward and backward (GPU)"),
    compile_mode: str = typer.Option("reduce-overhead", help="torch.compile mode (reduce-overhead: CUDA graphs)"),
    overwrite: bool = _overwrite_option(),
) -> None:
    """Train the synthetic model on a Mixture of Sparse Linear Regression, checkpointing as it goes."""
    from .synthetic import train, train_config
    from .synthetic.stacked import check_seeds
    from .synthetic.train import train_seeds

    seed_list = None
    if seeds is not None:
        try:
            seed_list = check_seeds([int(v) for v in _split(seeds)])
        except ValueError as err:
            raise typer.BadParameter(f"--seeds {seeds!r}: {err}") from None

    overrides = {"seed": seed, "device": device, "backbone": backbone, "compile": compile,
                 "compile_mode": compile_mode}
    if steps is not None:
        overrides["steps"] = steps
    if tokens is not None:
        overrides["tokens"] = tokens
    if bf16:
        overrides["autocast_dtype"] = "bfloat16"
    cfg = train_config(config, **overrides)
    _claim_train_out(out, seed_list, overwrite)
    if seed_list is None:
        typer.echo(f"last checkpoint: {train(cfg, out)}")
    else:
        for path in train_seeds(cfg, seed_list, out):
            typer.echo(f"last checkpoint: {path}")


TRAIN_KIND, SEEDS_KIND = "synthetic_run", "synthetic_seeds"
"""The kinds a `taskvec synthetic train --out` directory is marked with: one run, or a --seeds run's parent."""
RUN_ENTRIES = ("config.json", "metrics.jsonl", "checkpoints", "analysis")
"""What a training run directory holds (one written before it had a marker is recognised by them)."""


def _claim_train_out(out: Path, seed_list: list[int] | None, overwrite: bool) -> None:
    """``--out`` of ``synthetic train``: missing, empty, or a run of the same shape (a solo run, or a --seeds
    run's parent with its seed_<n> runs), checked and locked before the model is built, then marked."""
    import re

    from .io import claim_result_dir

    if seed_list is None:
        kind, keep = TRAIN_KIND, RUN_ENTRIES
    else:
        held = tuple(p.name for p in out.iterdir() if re.fullmatch(r"seed_\d+", p.name)) if out.is_dir() else ()
        kind, keep = SEEDS_KIND, (*{f"seed_{s}" for s in seed_list} | set(held), "seeds.parquet", "seeds_summary.json")
    if seed_list is None and out.is_dir() and not (out / "result.json").exists() and any(out.iterdir()) \
            and not (out / "config.json").is_file():  # unmarked: a run of an older version has its config.json
        held = sorted(p.name for p in out.iterdir())
        raise ValueError(f"--out {out} is not empty and holds no training run (no result.json, no config.json): it "
                         f"holds {', '.join(held[:5])}{' ...' if len(held) > 5 else ''}; choose another --out or an "
                         "empty one")
    own_out(out, kind, keep, overwrite)
    if not out.exists() or not any(out.iterdir()):  # a new run is marked; one of an older version is left as it is
        claim_result_dir(out, kind, keep=keep)


@synthetic_app.command("analyze")
@config_command(AnalysisConfig)
def synthetic_analyze(
    config: AnalysisConfig,
    run: Path = typer.Argument(..., help="a run directory written by `taskvec synthetic train`"),
    out: Path = typer.Option(None, help="where to write (default: RUN/analysis; a --seeds run: RUN, each seed to OUT/seed_<n>/analysis, the spread to OUT)"),
    umap: bool = typer.Option(True, help="compute the UMAP grid"),
    overwrite: bool = _overwrite_option(),
) -> None:
    """TD per layer and checkpoint, per-basis loss, UMAP grid, patching matrix, head ablation, figures +
    summary.json. A `--seeds` run: every seed (RUN/seed_<n>/analysis) and the spread (RUN/seeds_summary.json)."""
    from .figures import synthetic_figures
    from .synthetic.analysis import analyze_run, analyze_seeds

    acfg = config
    if not (run / "config.json").exists() and any(run.glob("seed_*/config.json")):
        seeds_out = out or run  # each seed to OUT/seed_<n>/analysis, the spread to OUT
        _own_seeds_out(run, seeds_out, overwrite)  # before any checkpoint loads
        results, _, spread = analyze_seeds(run, acfg, umap=umap, out=seeds_out)
        for seed, result in results.items():
            for path in synthetic_figures(result, seeds_out / f"seed_{seed}" / "analysis"):
                typer.echo(f"wrote {path}")
        typer.echo(json.dumps(spread, indent=2))
        return
    if not (run / "config.json").is_file():
        raise ValueError(f"no run in {run} (no config.json, no seed_<n>/config.json): give a directory written by "
                         "`taskvec synthetic train`")
    out = out or run / "analysis"
    from .synthetic.analysis import ANALYSIS_KIND

    own_out(out, ANALYSIS_KIND, overwrite=overwrite)  # a directory of someone else's is refused before any work
    result = analyze_run(run, acfg, umap=umap)
    result.save(out)
    for path in synthetic_figures(result, out):
        typer.echo(f"wrote {path}")
    typer.echo(json.dumps({k: v for k, v in result.summary.items() if k != "oracles"}, indent=2))


def _own_seeds_out(run: Path, out: Path, overwrite: bool) -> None:
    """The --out of a --seeds run's analysis: the run itself (its seed_<n>/analysis results and the spread), or a
    directory that is missing, empty or an earlier such analysis; each seed_<n>/analysis must be missing or an
    analysis. Checked and locked before any work; --overwrite replaces the analyses, never the training run."""
    import re

    from .io import check_result_owner, claim_result_dir, remove_result_dir
    from .synthetic.analysis import ANALYSIS_KIND, seed_runs

    seeds = [seed for seed, _ in seed_runs(run)]
    held = tuple(p.name for p in out.iterdir() if re.fullmatch(r"seed_\d+", p.name)) if out.is_dir() else ()
    keep = (*{f"seed_{s}" for s in seeds} | set(held), "seeds.parquet", "seeds_summary.json")
    same = out.resolve() == run.resolve()
    kind = SEEDS_KIND if same else "synthetic_seeds_analysis"
    own_out(out, kind, keep, overwrite=overwrite and not same)  # the training run itself is never removed
    for seed in seeds:
        check_result_owner(out / f"seed_{seed}" / "analysis", ANALYSIS_KIND, overwrite=overwrite, what="--out")
    if overwrite:
        for seed in seeds:
            remove_result_dir(out / f"seed_{seed}" / "analysis", what="--out")
    if not same and (not out.exists() or not any(out.iterdir())):
        claim_result_dir(out, kind, keep=keep)


def _split(values: list[str] | str | None) -> list[str]:
    values = [values] if isinstance(values, str) else values or []
    return [v.strip() for text in values for v in text.split(",") if v.strip()]


@app.command()
@config_command(TrajectoryConfig)
def trajectory(
    config: TrajectoryConfig,
    checkpoints: list[str] = typer.Option(None, "--checkpoints", help="local HF model directories, comma-separated "
                                                                      "or the option repeated"),
    model: str = typer.Option(None, help="a hub id whose --revisions to run, e.g. allenai/OLMo-7B-0424-hf"),
    revisions: str = typer.Option(None, help="comma-separated revisions of --model, e.g. "
                                             "step1000-tokens4B,step10000-tokens41B"),
    synthetic_run: Path = typer.Option(None, help="a `taskvec synthetic train` run: TD and MSE per basis"),
    steps: str = typer.Option(None, help="comma-separated steps, one per checkpoint (default: read from the "
                                         "revision or directory name, else the position)"),
    out: Path = typer.Option(Path("runs/trajectory"), help="output directory (a rerun skips finished checkpoints)"),
    figures: bool = typer.Option(True, help="write PNG figures"),
    overwrite: bool = _overwrite_option(),
) -> None:
    """TD and ICL accuracy over checkpoints (paper Fig. 5): local directories, hub revisions or a synthetic run
    (its test sequences drawn with the synthetic analysis' test seed plus --seed: at --seed 0 the test set
    `taskvec synthetic analyze` reads).

    Exits with status 1, naming each bad checkpoint by its index, after writing the good ones.
    """
    from .experiments.trajectory import (
        KEEP,
        KIND,
        TrajectoryError,
        check_checkpoints,
        hub_checkpoints,
        local_checkpoints,
        run_checkpoints_of,
        run_trajectory,
    )

    paths, revs = _split(checkpoints), _split(revisions)
    if sum([bool(paths), model is not None or bool(revs), synthetic_run is not None]) != 1:
        raise typer.BadParameter("give exactly one of --checkpoints, --model with --revisions, --synthetic-run")
    if (model is None) != (not revs):
        raise typer.BadParameter(f"--model and --revisions go together (got --model {model!r}, --revisions "
                                 f"{revisions!r})")
    _check_out_dir(out)
    try:
        given = [int(s) for s in _split(steps)] if steps is not None else None
    except ValueError:
        raise typer.BadParameter(f"--steps must be comma-separated ints, got {steps!r}") from None
    try:
        if synthetic_run is not None:
            entries = run_checkpoints_of(synthetic_run, given)
        elif paths:
            entries = local_checkpoints(paths, given)
        else:
            entries = hub_checkpoints(model, revs, given)
        cfg = config
        if synthetic_run is None:
            from .tasks import get_family

            fam = get_family(cfg.family, **cfg.family_kwargs)
        bad = check_checkpoints(entries)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    for r in bad.itertuples():  # reported before any model loads; the others still run
        typer.echo(f"checkpoint {r.index} (step {r.step}): {r.reason}", err=True)
    if synthetic_run is None:
        _check_trajectory_layers(cfg, entries, set(bad["index"]))
    own_out(out, KIND, KEEP, overwrite)  # --out checked and locked before any checkpoint loads
    try:
        if synthetic_run is not None:
            from .synthetic.analysis import synthetic_trajectory

            result = synthetic_trajectory(synthetic_run, n_per_basis=cfg.n_per_task, k=cfg.k,
                                          seed=SYNTHETIC_TEST_SEED + cfg.seed, n_boot=cfg.n_boot, steps=given, out=out)
        else:
            result = run_trajectory(entries, cfg, fam, out=out)
    except TrajectoryError as err:
        typer.echo(f"every checkpoint failed: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(result.summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if figures:
        from .figures import trajectory_figures

        for path in trajectory_figures(result, out):
            typer.echo(f"wrote {path}")
    typer.echo(f"results in {out} ({result.seconds:.0f}s)")
    if not result.ok:
        for r in result.failed.itertuples():
            typer.echo(f"FAILED checkpoint {r.index} (step {r.step}, {r.checkpoint}) at {r.stage}: {r.reason}",
                       err=True)
        raise typer.Exit(1)


def _check_trajectory_layers(cfg: TrajectoryConfig, entries: list, bad: set) -> None:
    """--layers and --summary-layer against every local checkpoint's layer count (its config.json), before any
    model loads (a hub revision is checked when it loads)."""
    from .hooks import resolve_layers

    for entry in entries:
        if entry.kind != "local" or entry.index in bad:
            continue
        try:
            from transformers import AutoConfig

            n_layers = getattr(AutoConfig.from_pretrained(entry.location), "num_hidden_layers", None)
        except Exception:  # noqa: BLE001 - an unreadable config is the loader's to report, with the entry's index
            continue
        if not isinstance(n_layers, int):
            continue
        where = f"checkpoint {entry.index} ({entry.label}, {n_layers} layers)"
        try:
            layers = resolve_layers(cfg.layers, n_layers, "--layers")
        except ValueError as err:
            raise ValueError(f"{err} (at {where})") from None
        if cfg.summary_layer is not None and cfg.summary_layer not in layers:
            raise ValueError(f"--summary-layer {cfg.summary_layer} is not among the layers captured at {where}: "
                             f"{layers if len(layers) <= 12 else f'{layers[0]}..{layers[-1]}'}")


def main() -> None:
    """The ``taskvec`` console script: a bad value anywhere (config, data, model spec), an OS error (a read-only
    or full disk, a path whose parent is a file) and a locked ``--out`` are one line naming the value or the
    path, exit status 2, not a traceback (set TASKVEC_TRACEBACK=1 for the traceback)."""
    import os
    import sys

    from .io import OutputLockedError

    try:
        app()
    except (ValueError, TypeError, OSError, OutputLockedError) as err:  # FileNotFoundError is an OSError
        if os.environ.get("TASKVEC_TRACEBACK"):
            raise
        print("Error: " + " ".join(str(err).split()), file=sys.stderr)  # one line, whatever the message held
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
