"""2-D UMAP embeddings of one layer's representations (umap-learn), for the UMAP figures and the synthetic
analysis's embedding tables.

:func:`umap_embedding` puts torch's thread count back after the fit: umap-learn (numba's threading
layer) can reset it.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

__all__ = ["umap_embedding"]


def _as_points(acts: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(acts, torch.Tensor):
            acts = acts.detach().to("cpu", torch.float32).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    x = np.asarray(acts)
    if x.dtype.kind not in "fiu":
        raise ValueError(f"acts must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if x.ndim != 2:
        raise ValueError(f"acts must be [n, d] (one layer), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"acts is empty: shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("acts has NaN or inf values")
    return x


def umap_embedding(
    acts: Any,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "euclidean",
) -> np.ndarray:
    """2-D UMAP (umap-learn) of ``acts`` ``[n, d]`` (tensor or array): a float32 array ``[n, 2]``.

    ``random_state=seed`` makes it reproducible (and single-threaded); ``n_neighbors`` is capped at
    ``n - 1``. The first fit in a process pays umap's numba compilation (about 10 s).
    """
    x = _as_points(acts)
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"UMAP needs at least 4 points, got {n}")
    if n_neighbors < 2:
        raise ValueError(f"n_neighbors must be >= 2, got {n_neighbors}")
    import umap

    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, n - 1), min_dist=min_dist, metric=metric,
                        random_state=seed)
    import torch

    threads = torch.get_num_threads()  # umap-learn (numba's threading layer) resets torch's thread count
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*overridden to 1 by setting random_state.*")
            emb = reducer.fit_transform(x)
    finally:
        torch.set_num_threads(threads)
    return np.asarray(emb, dtype=np.float32)
