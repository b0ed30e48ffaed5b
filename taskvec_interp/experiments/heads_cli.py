"""The ``taskvec heads`` and ``taskvec fv`` commands, as plain functions ready to be registered on the app.

Register them in ``taskvec_interp/cli.py`` (two lines; every option comes from the config dataclasses through
:func:`~taskvec_interp.cli_config.config_command`)::

    from .experiments.heads_cli import fv, heads

    app.command("heads")(heads)
    app.command("fv")(fv)

``taskvec heads``: the causal indirect effect of every attention head (AIE heatmap, top heads, per-head TD) and
the function vector of the top heads, written as one result directory (Parquet + config.json + safetensors +
figures). ``taskvec fv``: the function vector injected zero-shot (a layer sweep), into shuffled-label and
natural-text prompts, beside the paper's and Hendel et al.'s task vectors. The defaults are Todd et al.'s
(``todd`` preset: 10-shot ``Q:`` / ``A:`` prompts, 25 prompts per task for the CIE, top 10 heads);
``--preset quick`` takes a small run's values for every option left at its default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from ..cli_config import config_command, overwrite_option, own_out
from .function_vectors import FVConfig
from .heads import PRESETS, HeadsConfig

__all__ = ["apply_preset", "fv", "heads"]


def apply_preset(config: HeadsConfig, name: str | None) -> HeadsConfig:
    """``config`` with preset ``name``'s values (:data:`~taskvec_interp.experiments.heads.PRESETS`) for every field
    still at its default (an option given on the command line wins)."""
    if name is None:
        return config
    if name not in PRESETS:
        raise typer.BadParameter(f"--preset must be one of {sorted(PRESETS)}, got {name!r}")
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(HeadsConfig)}
    current = dataclasses.asdict(config)
    changed = {k: v for k, v in PRESETS[name].items() if current[k] == defaults[k]}
    return HeadsConfig(**(current | changed))


def _check_out(out: Path) -> None:
    from ..results import check_out_dir

    try:
        check_out_dir(out)
    except ValueError as err:
        raise typer.BadParameter(f"--out: {err}") from None


def _load(config, out: Path, kind: str, overwrite: bool) -> tuple[object, object]:
    from ..adapters import load_model
    from ..tasks import get_family

    fam = get_family(config.family, **config.family_kwargs)  # a bad family fails before the model loads
    own_out(out, kind, overwrite=overwrite)  # --out checked (missing, empty or a result of this kind) and locked
    return fam, load_model(config.model, backend=config.backend)


@config_command(HeadsConfig)
def heads(
    config: HeadsConfig,
    preset: str = typer.Option(None, help=f"named preset for options left at their defaults: {' | '.join(PRESETS)} "
                                          "(the defaults are the 'todd' preset)"),
    out: Path = typer.Option(Path("runs/heads"), help="output directory (results + config + figures)"),
    figures: bool = typer.Option(True, help="write PNG figures"),
    overwrite: bool = overwrite_option(),
) -> None:
    """Which attention heads carry the task: the causal indirect effect of every head (every head a branch of one
    shared prompt prefix), its average over prompts and tasks with CIs, per-head TD, and the function vector of
    the top heads (function_vectors.safetensors: `taskvec patch --vectors-file` injects it)."""
    from .heads import KIND, run_heads

    _check_out(out)
    cfg = apply_preset(config, preset)
    fam, adapter = _load(cfg, out, KIND, overwrite)
    # finished chunks of heads (--chunk-heads) are kept beside --out until the result is written: a rerun resumes
    result = run_heads(adapter, cfg, fam, checkpoint_dir=out.parent / f".{out.name}.partial"
                       if cfg.chunk_heads is not None else None)
    result.save(out)
    s = result.summary
    typer.echo(f"top {s['top_k']} heads by average indirect effect (mean P(answer) before patching: "
               f"{s['p_base_mean']:.3f}):")
    typer.echo(result.top_heads.head(s["top_k"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    typer.echo(f"per-head TD vs AIE: Spearman {s['td_vs_aie_spearman']}, top-{s['top_k']} overlap "
               f"{s['td_top_k_overlap']}; peak per-head TD {s['peak_td_head']}")
    if "atp_vs_exact_spearman" in s:
        typer.echo(f"attribution patching vs exact CIE: Spearman {s['atp_vs_exact_spearman']}, top-{s['top_k']} "
                   f"overlap {s['atp_top_k_overlap']} ({s['atp_verified_heads']} heads verified)")
    if figures:
        from ..figures.heads import heads_figures

        for path in heads_figures(result, out):
            typer.echo(f"wrote {path}")
    typer.echo(f"results in {out} ({result.seconds:.0f}s); function vectors: {out / 'function_vectors.safetensors'}")


@config_command(FVConfig)
def fv(
    config: FVConfig,
    heads_dir: Path = typer.Option(None, help="a `taskvec heads` output directory (its head means and ranking); "
                                              "without it the head analysis runs first"),
    out: Path = typer.Option(Path("runs/fv"), help="output directory (results + config + figures)"),
    figures: bool = typer.Option(True, help="write PNG figures"),
    overwrite: bool = overwrite_option(),
) -> None:
    """Function vectors injected: zero-shot (a layer sweep), shuffled-label and natural-text prompts, beside the
    paper's and Hendel et al.'s task vectors (zero-shot gain by layer, cosine similarities)."""
    from .function_vectors import KIND, run_function_vectors
    from .heads import HeadsResult

    _check_out(out)
    given = None
    if heads_dir is not None:
        try:
            given = HeadsResult.load(heads_dir)
        except ValueError as err:
            raise typer.BadParameter(f"--heads-dir: {err}") from None
    fam, adapter = _load(config, out, KIND, overwrite)
    result = run_function_vectors(adapter, config, fam, heads=given)
    result.save(out)
    s = result.summary
    typer.echo(f"function vector of heads {s['heads']}; best zero-shot layer {s['fv_best_layer']}, other settings at "
               f"layer {s['fv_layer']}")
    for vec, info in s["zero_shot"].items():
        if vec == "baseline":
            continue
        pooled = info["gain"].get("all", {})
        typer.echo(f"  zero-shot {vec}: best layer {info['best_layer']}, gain {pooled.get('delta')} "
                   f"(CI {pooled.get('ci')})")
    for setting in ("shuffled", "natural"):
        if setting in s:
            typer.echo(f"  {setting}: gain {s[setting].get('all', {}).get('delta')} (CI "
                       f"{s[setting].get('all', {}).get('ci')})")
    if figures:
        from ..figures.heads import fv_figures

        for path in fv_figures(result, out):
            typer.echo(f"wrote {path}")
    typer.echo(f"results in {out} ({result.seconds:.0f}s)")
