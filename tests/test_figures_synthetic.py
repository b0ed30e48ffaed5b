"""UMAP views and the synthetic experiment's figures (taskvec_interp.figures.synthetic), with the UMAP
embedding they draw (taskvec_interp.probes.embedding.umap_embedding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from taskvec_interp import figures
from taskvec_interp.probes.embedding import umap_embedding

MIN_PNG = 5_000


def _png_ok(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > MIN_PNG
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- UMAP ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 8)) * 10
    x = np.concatenate([c + rng.normal(0, 1, (20, 8)) for c in centres]).astype(np.float32)
    labels = ["copy"] * 20 + ["reverse"] * 20 + ["sort"] * 20
    return x, labels


@pytest.fixture(scope="module")
def embedding(clusters):
    return umap_embedding(clusters[0], seed=0)  # pays numba's compilation once


def _loo_1nn_accuracy(emb: np.ndarray, labels) -> float:
    d = ((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    y = np.asarray(labels)
    return float((y[d.argmin(1)] == y).mean())


def test_umap_embedding_separates_and_is_reproducible(clusters, embedding):
    x, labels = clusters
    assert embedding.shape == (60, 2) and embedding.dtype == np.float32
    assert _loo_1nn_accuracy(embedding, labels) == 1.0
    again = umap_embedding(torch.from_numpy(x), seed=0)  # a tensor works too
    np.testing.assert_array_equal(again, embedding)


def test_plot_umap(tmp_path, clusters):
    x, labels = clusters
    codes = [["copy", "reverse", "sort"].index(name) for name in labels]
    fig = figures.plot_umap(torch.from_numpy(x), codes, label_names=["copy", "reverse", "sort"], seed=0,
                        path=tmp_path / "u" / "umap.png", title="layer 3")
    _png_ok(tmp_path / "u" / "umap.png")
    (ax,) = fig.axes
    assert ax.get_title() == "layer 3"
    assert [c.get_label() for c in ax.collections] == ["copy", "reverse", "sort"]
    assert [len(c.get_offsets()) for c in ax.collections] == [20, 20, 20]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["copy", "reverse", "sort"]


def test_umap_errors(clusters):
    x, labels = clusters
    with pytest.raises(ValueError, match="labels has 59 entries but acts has 60 points"):
        figures.plot_umap(x, labels[:-1])
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        umap_embedding(x[None])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        umap_embedding(bad)
    with pytest.raises(ValueError, match="at least 4 points"):
        umap_embedding(x[:3])
    with pytest.raises(ValueError, match="label_names"):
        figures.plot_umap(x, [0] * 30 + [5] * 30, label_names=["a", "b"])


def test_plot_umap_grid(tmp_path, embedding, clusters):
    _, labels = clusters
    grid = {(layer, step): (embedding + layer, labels) for layer in (2, 6) for step in (100, 1000, 5000)}
    del grid[(6, 100)]  # a blank cell
    fig = figures.plot_umap_grid(grid, path=tmp_path / "grid.png", row_label="layer", col_label="step")
    _png_ok(tmp_path / "grid.png")
    assert len(fig.axes) == 6
    assert [a.get_title() for a in fig.axes[:3]] == ["step 100", "step 1000", "step 5000"]
    assert fig.axes[0].get_ylabel() == "layer 2" and fig.axes[3].get_ylabel() == "layer 6"
    assert len(fig.axes[3].collections) == 0 and len(fig.axes[4].collections) == 3
    # the same class has the same colour in every panel
    colors = {tuple(c.get_facecolor()[0]) for a in fig.axes for c in a.collections if c.get_label() == "sort"}
    assert len(colors) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["copy", "reverse", "sort"]

    with pytest.raises(ValueError, match="empty"):
        figures.plot_umap_grid({})
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        figures.plot_umap_grid({(0, 0): (np.zeros((60, 3)), labels)})
    with pytest.raises(ValueError, match=r"labels has 60 entries but embedding \(0, 0\) has 10 points"):
        figures.plot_umap_grid({(0, 0): (embedding[:10], labels)})
    with pytest.raises(ValueError, match="pairs"):
        figures.plot_umap_grid({0: (embedding, labels)})


def test_umap_embedding_keeps_torch_thread_count(clusters, monkeypatch):
    # umap-learn's first fit in a process (numba compiling its parallel functions) can reset torch's thread
    # count; simulate that deterministically and check umap_embedding puts the caller's count back
    import torch
    import umap

    fit = umap.UMAP.fit_transform

    def resetting_fit(self, *args, **kwargs):
        torch.set_num_threads(3)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(umap.UMAP, "fit_transform", resetting_fit)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        umap_embedding(clusters[0], seed=0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ---- The synthetic analysis' figure set ----------------------------------------------------------------
def _analysis_tables(steps=(0, 100, 1000), bases=("B1", "B2"), layers=(0, 1, 2)):
    loss = pd.DataFrame([{"step": s, "basis": b, "mse": 1.0 / (1 + s * (i + 1))}
                         for s in steps for i, b in enumerate(bases)])
    td = pd.DataFrame([{"step": s, "layer": layer, "level": level, "task": task, "td": min(1.0, 0.1 + s / 1000)}
                       for s in steps for layer in layers
                       for level, task in (("overall", "all"), *(("task", b) for b in bases))])
    patching = pd.DataFrame([{"step": s, "source": src, "target": tgt, "mse": 0.5 + i, "mode": "replace",
                              "layer": 1} for s in steps[1:] for i, src in enumerate(bases)
                             for tgt in ("none", *bases)])
    heads = pd.DataFrame([{"layer": layer, "head": h, "mode": "mean", "basis": b, "delta": 0.1 * h - 0.05}
                          for layer in layers for h in range(2) for b in bases])
    return loss, td, patching, heads


def test_synthetic_figures_from_a_result_object(tmp_path, embedding, clusters):
    """Only the attributes are read: the figures need no runtime import of the synthetic package."""
    from types import SimpleNamespace

    loss, td, patching, heads = _analysis_tables()
    codes = [["copy", "reverse", "sort"].index(name) % 2 for name in clusters[1]]  # basis indices 0 / 1
    result = SimpleNamespace(loss=loss, td=td, patching=patching, heads=heads,
                             embeddings={(1, 1000): (embedding, codes)},
                             summary={"td_layer": 1, "bases": {"B1": {}, "B2": {}}})
    paths = figures.synthetic_figures(result, tmp_path)
    assert [p.name for p in paths] == ["loss_and_td.png", "td_heatmap.png", "umap_grid.png", "patching.png",
                                       "head_ablation.png"]
    for p in paths:
        _png_ok(p)
    fig = figures.plot_umap_grid(result.embeddings, label_names=["B1", "B2"])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["B1", "B2"]
    fig = figures.plot_td_heatmap_steps(td)
    assert fig.axes[0].images[0].get_array().shape == (3, 3)
    with pytest.raises(ValueError, match="layer 7 is not in the TD table"):
        figures.plot_basis_emergence(loss, td, 7)
