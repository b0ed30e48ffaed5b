"""Figures from tidy result tables, one module per subject, and the demo's HTML report.

* :mod:`~taskvec_interp.figures.td`: task decodability by layer, per task, against accuracy
  (:func:`sweep_figures`);
* :mod:`~taskvec_interp.figures.patching`: task-vector interventions, language model and synthetic
  (:func:`patching_figures`);
* :mod:`~taskvec_interp.figures.finetune`: layer-subset fine-tuning (:func:`finetune_figures`);
* :mod:`~taskvec_interp.figures.trajectory`: TD and the outcome over checkpoints (:func:`trajectory_figures`);
* :mod:`~taskvec_interp.figures.synthetic`: the synthetic experiment and the UMAP views
  (:func:`synthetic_figures`);
* :mod:`~taskvec_interp.figures.heads`: attention heads (synthetic head ablation; AIE, per-head TD, function vectors);
* :mod:`~taskvec_interp.figures.zeroshot`: zero-shot task vectors by layer (:func:`zero_shot_figures`);
* :mod:`~taskvec_interp.figures.report`: the demo's self-contained HTML report (:func:`write_demo_report`).
* :mod:`~taskvec_interp.figures.results_page`: a measured-results Markdown page from a run's own tables
  (:func:`write_results_page`).

Every ``plot_*`` function returns a :class:`matplotlib.figure.Figure` (without pyplot, no backend
touched) and, given ``path=``, writes it (:func:`save_figure`, PNG at :data:`DPI`). The ``*_figures``
functions take a result object and write its whole figure set under ``out/figures/``, returning the paths.
"""

from ._common import DPI, save_figure
from .finetune import finetune_figures, plot_finetune_accuracy, plot_finetune_td
from .heads import (
    fv_figures,
    heads_figures,
    plot_aie_heatmap,
    plot_fv_gain,
    plot_head_ablation,
    plot_head_td,
    plot_td_vs_aie,
)
from .patching import patching_figures, plot_patch_bars, plot_patch_heatmap, plot_patch_matrix, plot_patching
from .report import write_demo_report
from .results_page import write_results_page
from .synthetic import (
    plot_basis_emergence,
    plot_td_heatmap_steps,
    plot_umap,
    plot_umap_grid,
    synthetic_figures,
)
from .td import (
    plot_task_td,
    plot_task_td_heatmap,
    plot_td_by_layer,
    plot_td_context,
    plot_td_vs_accuracy,
    sweep_figures,
    td_peaks,
)
from .trajectory import plot_trajectory, trajectory_figures
from .zeroshot import plot_zero_shot_curve, plot_zero_shot_tasks, zero_shot_figures

__all__ = [
    "DPI",
    "finetune_figures",
    "fv_figures",
    "heads_figures",
    "plot_aie_heatmap",
    "plot_fv_gain",
    "plot_head_td",
    "plot_td_vs_aie",
    "patching_figures",
    "plot_basis_emergence",
    "plot_finetune_accuracy",
    "plot_finetune_td",
    "plot_head_ablation",
    "plot_patch_bars",
    "plot_patch_heatmap",
    "plot_patch_matrix",
    "plot_patching",
    "plot_task_td",
    "plot_task_td_heatmap",
    "plot_td_by_layer",
    "plot_td_context",
    "plot_td_heatmap_steps",
    "plot_td_vs_accuracy",
    "plot_trajectory",
    "plot_umap",
    "plot_umap_grid",
    "save_figure",
    "sweep_figures",
    "synthetic_figures",
    "td_peaks",
    "trajectory_figures",
    "plot_zero_shot_curve",
    "plot_zero_shot_tasks",
    "write_demo_report",
    "write_results_page",
    "zero_shot_figures",
]
