"""Synthetic experiment of Han et al. (ICML 2025): Mixture of Sparse Linear Regression (MSLR).

``data``  the MSLR sampler, a fixed balanced test set and Bayes / least-squares oracles.
``families`` the appendix's mixture of regression families (linear, sparse, leaky-ReLU, quadratic).
``model`` ``SyntheticRegressor``: linear read-in -> GPT-2 or Mamba-2 backbone (transformers) -> read-out.
``train`` training with log-spaced + regular checkpoints (safetensors + JSON) and exact resume.

Typical use::

    from taskvec_interp.synthetic import train, train_config, list_checkpoints, load_checkpoint
    last = train(train_config("small"), "runs/mslr-small")
    for step, path in list_checkpoints("runs/mslr-small"):
        model = load_checkpoint(path)
"""

from .data import (
    ORACLES,
    MSLRBatch,
    MSLRConfig,
    basis_masks,
    basis_matrices,
    make_test_set,
    oracle_errors,
    oracle_summary,
    sample_batch,
)
from .families import FAMILIES, FAMILY_ORACLES, FamilyMixtureConfig
from .model import (
    MODEL_CONFIGS,
    ModelConfig,
    SyntheticRegressor,
    interleave,
    model_config,
    x_positions,
    y_positions,
)
from .train import (
    TRAIN_CONFIGS,
    TrainConfig,
    checkpoint_steps,
    evaluate,
    list_checkpoints,
    load_checkpoint,
    load_run_config,
    read_metrics,
    train,
    train_config,
)

__all__ = [
    "ORACLES",
    "MSLRBatch",
    "MSLRConfig",
    "basis_masks",
    "basis_matrices",
    "make_test_set",
    "oracle_errors",
    "oracle_summary",
    "sample_batch",
    "FAMILIES",
    "FAMILY_ORACLES",
    "FamilyMixtureConfig",
    "MODEL_CONFIGS",
    "ModelConfig",
    "SyntheticRegressor",
    "interleave",
    "model_config",
    "x_positions",
    "y_positions",
    "TRAIN_CONFIGS",
    "TrainConfig",
    "checkpoint_steps",
    "evaluate",
    "list_checkpoints",
    "load_checkpoint",
    "load_run_config",
    "read_metrics",
    "train",
    "train_config",
]
