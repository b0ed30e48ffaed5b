"""The ``taskvec zeroshot`` command (Hendel et al.'s zero-shot task-vector protocol), ready to be registered on the
app: ``app.command("zeroshot")(zeroshot)``. Every option but ``--out``, ``--figures`` and ``--overwrite`` comes from
:class:`~taskvec_interp.experiments.zeroshot.ZeroShotConfig` (:func:`~taskvec_interp.cli_config.config_command`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..cli_config import config_command, overwrite_option, own_out
from .zeroshot import ZeroShotConfig

__all__ = ["zeroshot"]


@config_command(ZeroShotConfig)
def zeroshot(
    config: ZeroShotConfig,
    out: Path = typer.Option(Path("runs/zeroshot"), help="output directory (results + config + figures)"),
    figures: bool = typer.Option(True, help="write PNG figures"),
    overwrite: bool = overwrite_option(),
) -> None:
    """Zero-shot task vectors as Hendel et al. published them: each query's own vector (its demonstrations + dummy
    queries) and the per-task mean patched into the zero-shot `x ->` prompt, the layer chosen on a dev split, baseline
    / task vector / ICL accuracy on a disjoint test split with CIs and McNemar tests."""
    from ..adapters import load_model
    from ..results import check_out_dir
    from .zeroshot import KIND, run_zero_shot, zero_shot_prompts

    try:
        check_out_dir(out)
    except ValueError as err:
        raise typer.BadParameter(f"--out: {err}") from None
    fam = config.build_family()  # a bad family fails before the model loads
    zero_shot_prompts(fam, config)  # and so do splits or shots that do not fit it
    own_out(out, KIND, overwrite=overwrite)  # --out checked and locked before the model loads
    adapter = load_model(config.model, backend=config.backend)
    result = run_zero_shot(adapter, config, fam)
    result.save(out)
    table = result.table()
    shown = ["task", "n", *[c for c in table.columns if c.startswith("layer_")], "baseline",
             *[v for v in config.vectors], "icl", *[f"p_{v}" for v in config.vectors]]
    typer.echo(f"test split, {config.scoring} accuracy; layers chosen on the dev split: {result.chosen_layer}")
    typer.echo(table[shown].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if figures:
        from ..figures.zeroshot import zero_shot_figures

        for path in zero_shot_figures(result, out):
            typer.echo(f"wrote {path}")
    typer.echo(f"results in {out} ({result.seconds:.0f}s)")
