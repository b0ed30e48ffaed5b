"""``taskvec``: the command line. Thin: every command is a library call."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Task vectors in in-context learning.")

@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="output directory: report.html + every part's tables"),
    quick: bool = typer.Option(False, "--quick", help="the same parts on smaller settings (about 3 min)"),
    model: str = typer.Option("smollm2-135m", help="built-in name, local HF directory or hub id"),
    backend: str = typer.Option("torch", help="torch | transformer_lens | nnsight"),
    parts: str = typer.Option(",".join(("synthetic", "td", "patch", "finetune", "trajectory")),
                              help="comma-separated parts to run"),
    families: str = typer.Option("bitwise,pos", help="task families of the language-model parts"),
    seed: int = typer.Option(0),
) -> None:
    """The paper's story in one command: synthetic emergence, TD over layers and shots, task-vector patching,
    first- vs last-layer fine-tuning and a checkpoint trajectory, in ONE self-contained HTML report.
    Re-running with the same --out reuses finished parts (a killed demo resumes)."""
    from .demo import DemoConfig, run_demo
    from .report import write_demo_report

    _check_out_dir(out)
    cfg = DemoConfig(quick=quick, model=model, backend=backend, seed=seed,
                     parts=tuple(x.strip() for x in parts.split(",") if x.strip()),
                     families=tuple(x.strip() for x in families.split(",") if x.strip()))
    t0 = time.perf_counter()
    result = run_demo(out, cfg, log=typer.echo)
    path = write_demo_report(result)
    for part in result.parts:
        if part.skipped:
            typer.echo(f"{part.title}: skipped ({part.skipped})")
            continue
        typer.echo(f"{part.title} ({part.seconds:.0f}s)")
        for row in part.headline:
            typer.echo(f"  {row['metric']}: {row['ours']}" + (f"   [paper: {row['paper']}]" if row["paper"] else ""))
    typer.echo(f"report: {path} ({time.perf_counter() - t0:.0f}s)")


def _parse_shots(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as err:
        raise typer.BadParameter(f"--shots must be comma-separated ints, got {text!r}") from err


@app.command()
def td(
    model: str = typer.Option("smollm2-135m", help="built-in name, local HF directory or hub id"),
    family: str = typer.Option("bitwise", help="bitwise | pos | files:PATH"),
    shots: str = typer.Option("1,4,10", help="comma-separated shot counts"),
    n_per_task: int = typer.Option(100, help="prompts per task (Null included)"),
    out: Path = typer.Option(Path("runs/td"), help="output directory (results + config + figures)"),
    backend: str = typer.Option("torch", help="torch | transformer_lens | nnsight"),
    k: int = typer.Option(10, help="neighbours of the leave-one-out k-NN"),
    metric: str = typer.Option("euclidean", help="euclidean | cosine"),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(16),
    figures: bool = typer.Option(True, help="write PNG figures"),
) -> None:
    """Task decodability over layers x shots and ICL accuracy per task; TD-vs-accuracy R^2."""
    from .adapters import load_model
    from .experiments.sweep import SweepConfig, run_sweep, summarize

    _check_out_dir(out)
    cfg = SweepConfig(model=model, backend=backend, family=family, shots=_parse_shots(shots),
                      n_per_task=n_per_task, seed=seed, k=k, metric=metric, batch_size=batch_size)
    from .tasks import get_family

    get_family(cfg.family, **cfg.family_kwargs)  # a bad family fails before the model loads
    adapter = load_model(cfg.model, backend=cfg.backend)
    result = run_sweep(adapter, cfg)
    result.save(out)
    typer.echo(summarize(result).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    acc = result.accuracy.pivot_table(index="task", columns="shots", values="exact", sort=False)
    typer.echo("exact-match accuracy (task x shots):\n" + acc.to_string(float_format=lambda v: f"{v:.2f}"))
    typer.echo(f"TD vs accuracy at layer {result.fit['layer']}: R^2 = {result.fit['r2']:.3f} "
               f"({result.fit['n_points']} points)")
    if figures:
        from .report import sweep_figures

        for path in sweep_figures(result, out):
            typer.echo(f"wrote {path}")
    typer.echo(f"results in {out} ({result.seconds:.0f}s)")


def _parse_layers(text: str) -> str | list[int]:
    if text in ("all", "peak"):
        return text
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"--layers must be 'all', 'peak' or comma-separated ints, got {text!r}") from None


def _parse_choice(text: str, option: str, choices: tuple[str, ...], both: str | None = None) -> tuple[str, ...]:
    items = choices if both is not None and text == both else tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [x for x in items if x not in choices]
    if bad or not items:
        raise typer.BadParameter(f"{option} must be comma-separated values of {choices}, got {text!r}")
    return items


def _check_out_dir(out: Path) -> None:
    from .results import check_out_dir

    try:
        check_out_dir(out)
    except ValueError as err:
        raise typer.BadParameter(f"--out: {err}") from None


@app.command()
def patch(
    model: str = typer.Option("smollm2-135m", help="built-in name, local HF directory or hub id"),
    family: str = typer.Option("bitwise", help="bitwise | pos | files:PATH"),
    shots: int = typer.Option(4, help="demonstrations in the prompts the task vectors are read from"),
    n_per_task: int = typer.Option(50, help="evaluation prompts per task (Null included)"),
    layers: str = typer.Option("all", help="all | peak | comma-separated layers, e.g. 3,5"),
    mode: str = typer.Option("both", help="add | replace | both"),
    vectors: str = typer.Option("paper", help="paper | hendel | mean (task-vector definition)"),
    directions: str = typer.Option("positive,negative", help="comma-separated: positive, negative, matrix"),
    scale: float = typer.Option(1.0, help="scale of added vectors"),
    zero_shot: bool = typer.Option(False, "--zero-shot", help="evaluate queries without demonstrations"),
    logprob: bool = typer.Option(False, "--logprob", help="also score each answer's teacher-forced log-prob"),
    center: bool = typer.Option(False, "--center", help="add only the task-specific part (vector minus the "
                                                        "mean over tasks)"),
    td_sweep: Path = typer.Option(None, help="a `taskvec td` output directory to read the peak layer from"),
    vectors_file: Path = typer.Option(None, help="task vectors saved by an earlier run (vectors.safetensors) "
                                                 "instead of computing them; refused if from another model"),
    out: Path = typer.Option(Path("runs/patch"), help="output directory (results + config + figures)"),
    backend: str = typer.Option("torch", help="torch | transformer_lens | nnsight"),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(16),
    n_boot: int = typer.Option(1000, help="bootstrap resamples of the accuracy CIs"),
    k: int = typer.Option(10, help="neighbours of the baseline TD's leave-one-out k-NN"),
    chunk: int = typer.Option(16, help="conditions per saved chunk (a killed run resumes from the last one)"),
    figures: bool = typer.Option(True, help="write PNG figures"),
) -> None:
    """Task vectors patched in: positive (own task) / negative (Null), add / replace, over layers."""
    from .experiments.patching import DIRECTIONS, MODES, PatchConfig, run_patching
    from .experiments.sweep import load_sweep
    from .tasks import get_family

    _check_out_dir(out)
    cfg = PatchConfig(model=model, backend=backend, family=family, shots=shots, n_per_task=n_per_task, seed=seed,
                      definition=vectors, layers=_parse_layers(layers),
                      modes=_parse_choice(mode, "--mode", MODES, both="both"),
                      directions=_parse_choice(directions, "--directions", DIRECTIONS), scale=scale,
                      zero_shot=zero_shot, logprob=logprob, center=center, batch_size=batch_size, n_boot=n_boot, k=k)
    sweep_td = load_sweep(td_sweep).td if td_sweep is not None else None
    fam = get_family(cfg.family, **cfg.family_kwargs)  # a bad family fails here, before the model loads
    from .adapters import load_model

    if vectors_file is not None and not vectors_file.is_file():
        raise typer.BadParameter(f"--vectors-file {vectors_file} does not exist")
    adapter = load_model(cfg.model, backend=cfg.backend)
    from .probes.vectors import TaskVectors

    given = TaskVectors.load(vectors_file, adapter) if vectors_file is not None else None
    result = run_patching(adapter, cfg, fam, vectors=given, td_sweep=sweep_td, checkpoint_dir=out / ".partial",
                          chunk_size=chunk)
    result.save(out)
    s = result.summary
    typer.echo(f"peak TD {s['peak_td']:.3f} at layer {s['peak_layer']} (chance {s['chance']:.3f}); "
               f"interventions at layer {s['layer']}:")
    typer.echo(result.at_layer().to_string(float_format=lambda v: f"{v:.2f}"))
    if figures:
        from .report import patching_figures

        for path in patching_figures(result, out):
            typer.echo(f"wrote {path}")
    typer.echo(f"results in {out} ({result.seconds:.0f}s)")


@app.command()
def verify(
    model: str = typer.Argument(..., help="built-in name, local HF directory or hub id"),
    backend: str = typer.Option("torch", help="torch | transformer_lens | nnsight"),
) -> None:
    """Check an adapter against the model's own forward (residuals, logits, padding, hooks)."""
    from .adapters import load_model, verify_adapter

    typer.echo(verify_adapter(load_model(model, backend=backend), raise_on_fail=False).to_string(index=False))


finetune_app = typer.Typer(help="Layer-subset fine-tuning (first-k vs last-k layers, LoRA via peft).")
app.add_typer(finetune_app, name="finetune")


@finetune_app.callback(invoke_without_command=True)
def finetune_cmd(
    ctx: typer.Context,
    model: str = typer.Option("smollm2-135m", help="built-in name, local HF directory or hub id"),
    family: str = typer.Option("bitwise", help="bitwise | pos | files:PATH (trains on its train split)"),
    layers: str = typer.Option("first:10", help="first:k | last:k | a-b | 3,5,7 | td:encoder"),
    method: str = typer.Option("lora", help="lora | full (every parameter of those blocks)"),
    steps: int = typer.Option(200, help="optimizer steps"),
    out: Path = typer.Option(Path("runs/finetune"), help="run directory (resumes if it has checkpoints)"),
    shots: int = typer.Option(4),
    n_train: int = typer.Option(500, help="training prompts per task"),
    batch_size: int = typer.Option(8),
    grad_accum: int = typer.Option(1),
    lr: float = typer.Option(2e-4),
    rank: int = typer.Option(16, help="LoRA rank (alpha = rank unless --alpha)"),
    alpha: float = typer.Option(None, help="LoRA alpha"),
    dropout: float = typer.Option(0.1, help="LoRA dropout"),
    include_null: bool = typer.Option(False, help="train on the Null task too"),
    td_sweep: Path = typer.Option(None, help="a `taskvec td` output of this model (for td:encoder)"),
    eval_n_per_task: int = typer.Option(50, help="evaluation prompts per task (test split)"),
    k: int = typer.Option(10, help="neighbours of the evaluation TD's leave-one-out k-NN"),
    eval_before: bool = typer.Option(True, help="also evaluate the pretrained model (once per run directory)"),
    seed: int = typer.Option(0),
) -> None:
    """Fine-tune a layer subset, then evaluate TD and accuracy before and after (subcommand: compare)."""
    if ctx.invoked_subcommand is not None:
        return
    from .experiments.finetune import FinetuneConfig, check_layer_spec, finetune

    _check_out_dir(out)
    check_layer_spec(layers)
    cfg = FinetuneConfig(model=model, family=family, layers=layers, method=method, steps=steps, shots=shots,
                         n_train=n_train, batch_size=batch_size, grad_accum=grad_accum, lr=lr, rank=rank,
                         alpha=float(rank) if alpha is None else alpha, dropout=dropout, include_null=include_null,
                         td_sweep=None if td_sweep is None else str(td_sweep), eval_n_per_task=eval_n_per_task,
                         k=k, eval_before=eval_before, seed=seed)
    from .tasks import get_family

    get_family(cfg.family, **cfg.family_kwargs, split="train")  # a bad family fails before the model loads
    run = finetune(cfg, out)
    from .experiments.finetune import compare_runs

    summary, _, _ = compare_runs([run])
    typer.echo(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo(f"run in {run}")


@finetune_app.command("compare")
def finetune_compare(
    runs: list[Path] = typer.Argument(..., help="fine-tuning run directories"),
    out: Path = typer.Option(None, help="where to write the tables and figures (default: print only)"),
) -> None:
    """The Table-1-like comparison of runs (+ the pretrained model): accuracy and TD, figures."""
    from .experiments.finetune import compare_runs

    if out is not None:
        _check_out_dir(out)
    summary, per_task, td = compare_runs(runs)
    typer.echo(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo(per_task.pivot_table(index="task", columns="model", values="exact", sort=False)
               .to_string(float_format=lambda v: f"{v:.2f}"))
    if out is not None:
        from .report import finetune_figures

        out.mkdir(parents=True, exist_ok=True)
        for name, table in (("summary", summary), ("per_task", per_task), ("td", td)):
            table.to_parquet(out / f"{name}.parquet", index=False)
        for path in finetune_figures(per_task, td, out):
            typer.echo(f"wrote {path}")


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
    if seed_list is None:
        typer.echo(f"last checkpoint: {train(cfg, out)}")
    else:
        for path in train_seeds(cfg, seed_list, out):
            typer.echo(f"last checkpoint: {path}")


@synthetic_app.command("analyze")
def synthetic_analyze(
    run: Path = typer.Argument(..., help="a run directory written by `taskvec synthetic train`"),
    out: Path = typer.Option(None, help="where to write (default: RUN/analysis)"),
    n_per_basis: int = typer.Option(100),
    td_layer: int = typer.Option(None, help="layer for the loss/TD figure and summary (default: middle)"),
    patch_mode: str = typer.Option("replace", help="replace | add"),
    patch_position: str = typer.Option("context", help="'context' (every token before the query) or one "
                                                       "token's negative index, e.g. -3"),
    umap: bool = typer.Option(True, help="compute the UMAP grid"),
) -> None:
    """TD per layer and checkpoint, per-basis loss, UMAP grid, patching matrix, head ablation, figures +
    summary.json. A `--seeds` run: every seed (RUN/seed_<n>/analysis) and the spread (RUN/seeds_summary.json)."""
    from .report import synthetic_figures
    from .synthetic.analysis import AnalysisConfig, analyze_run, analyze_seeds

    out = out or run / "analysis"
    position: int | str = patch_position
    if patch_position != "context":
        try:
            position = int(patch_position)
        except ValueError:
            raise typer.BadParameter(f"--patch-position must be 'context' or an int, got {patch_position!r}") from None
    acfg = AnalysisConfig(n_per_basis=n_per_basis, td_layer=td_layer, patch_mode=patch_mode, patch_position=position)
    if not (run / "config.json").exists() and any(run.glob("seed_*/config.json")):
        results, _, spread = analyze_seeds(run, acfg, umap=umap)
        for seed, result in results.items():
            for path in synthetic_figures(result, run / f"seed_{seed}" / "analysis"):
                typer.echo(f"wrote {path}")
        typer.echo(json.dumps(spread, indent=2))
        return
    result = analyze_run(run, acfg, umap=umap)
    result.save(out)
    for path in synthetic_figures(result, out):
        typer.echo(f"wrote {path}")
    typer.echo(json.dumps({k: v for k, v in result.summary.items() if k != "oracles"}, indent=2))


def _split(values: list[str] | str | None) -> list[str]:
    values = [values] if isinstance(values, str) else values or []
    return [v.strip() for text in values for v in text.split(",") if v.strip()]


@app.command()
def trajectory(
    checkpoints: list[str] = typer.Option(None, "--checkpoints", help="local HF model directories, comma-separated "
                                                                      "or the option repeated"),
    model: str = typer.Option(None, help="a hub id whose --revisions to run, e.g. allenai/OLMo-7B-0424-hf"),
    revisions: str = typer.Option(None, help="comma-separated revisions of --model, e.g. "
                                             "step1000-tokens4B,step10000-tokens41B"),
    synthetic_run: Path = typer.Option(None, help="a `taskvec synthetic train` run: TD and MSE per basis"),
    steps: str = typer.Option(None, help="comma-separated steps, one per checkpoint (default: read from the "
                                         "revision or directory name, else the position)"),
    family: str = typer.Option("bitwise", help="bitwise | pos | files:PATH"),
    shots: int = typer.Option(4, help="demonstrations per prompt"),
    n_per_task: int = typer.Option(100, help="prompts per task, Null included (synthetic: test sequences per basis)"),
    seed: int = typer.Option(0),
    k: int = typer.Option(10, help="neighbours of the leave-one-out k-NN"),
    metric: str = typer.Option("euclidean", help="euclidean | cosine"),
    backend: str = typer.Option("torch", help="torch | transformer_lens | nnsight"),
    dtype: str = typer.Option(None, help="float32 | bfloat16 | float16 (default: float32)"),
    device: str = typer.Option(None, help="e.g. cuda (default: cpu)"),
    batch_size: int = typer.Option(16),
    n_boot: int = typer.Option(1000, help="bootstrap resamples of the TD CIs"),
    layer: int = typer.Option(None, help="layer of the summary's mean TD (default: each checkpoint's peak)"),
    out: Path = typer.Option(Path("runs/trajectory"), help="output directory (a rerun skips finished checkpoints)"),
    figures: bool = typer.Option(True, help="write PNG figures"),
) -> None:
    """TD and ICL accuracy over checkpoints (paper Fig. 5): local directories, hub revisions or a synthetic run.

    Exits with status 1, naming each bad checkpoint by its index, after writing the good ones.
    """
    from .experiments.trajectory import (
        TrajectoryConfig,
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
        cfg = TrajectoryConfig(family=family, shots=shots, n_per_task=n_per_task, seed=seed, k=k, metric=metric,
                               backend=backend, dtype=dtype, device=device, batch_size=batch_size, n_boot=n_boot,
                               summary_layer=layer)
        if synthetic_run is None:
            from .tasks import get_family

            fam = get_family(cfg.family, **cfg.family_kwargs)
        bad = check_checkpoints(entries)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    for r in bad.itertuples():  # reported before any model loads; the others still run
        typer.echo(f"checkpoint {r.index} (step {r.step}): {r.reason}", err=True)
    try:
        if synthetic_run is not None:
            from .synthetic.analysis import synthetic_trajectory

            result = synthetic_trajectory(synthetic_run, n_per_basis=n_per_task, k=k, seed=seed, n_boot=n_boot,
                                          steps=given, out=out)
        else:
            result = run_trajectory(entries, cfg, fam, out=out)
    except TrajectoryError as err:
        typer.echo(f"every checkpoint failed: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(result.summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if figures:
        from .report import trajectory_figures

        for path in trajectory_figures(result, out):
            typer.echo(f"wrote {path}")
    typer.echo(f"results in {out} ({result.seconds:.0f}s)")
    if not result.ok:
        for r in result.failed.itertuples():
            typer.echo(f"FAILED checkpoint {r.index} (step {r.step}, {r.checkpoint}) at {r.stage}: {r.reason}",
                       err=True)
        raise typer.Exit(1)


def main() -> None:
    """The ``taskvec`` console script: a bad value anywhere (config, data, model spec) is one line naming it,
    exit status 2, not a traceback (set TASKVEC_TRACEBACK=1 for the traceback)."""
    import os
    import sys

    try:
        app()
    except (ValueError, TypeError, FileNotFoundError) as err:
        if os.environ.get("TASKVEC_TRACEBACK"):
            raise
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
