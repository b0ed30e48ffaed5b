"""Probes on captured activations and generations: task decodability (``decodability``: leave-one-out k-NN
over all layers at once), ICL accuracy (``accuracy``: greedy exact match, bootstrap CIs), task vectors
(``vectors``: paper / hendel / mean, safetensors) and embeddings for figures (``embedding``: UMAP)."""

from taskvec_interp.probes.decodability import (
    Metric,
    TaskDecodability,
    encode_labels,
    knn_loo_predict,
    task_decodability,
)

__all__ = ["Metric", "TaskDecodability", "encode_labels", "knn_loo_predict", "task_decodability"]
