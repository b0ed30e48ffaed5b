"""Probes on captured activations: task decodability (leave-one-out k-NN over all layers)."""

from taskvec_interp.probes.decodability import (
    Metric,
    TaskDecodability,
    encode_labels,
    knn_loo_predict,
    task_decodability,
)

__all__ = ["Metric", "TaskDecodability", "encode_labels", "knn_loo_predict", "task_decodability"]
