"""Speed of task_decodability against the scikit-learn loops a researcher would write.

Data: synthetic clusters, 7 tasks x 100 prompts, 30 layers, d_model 576 (float32, like captured
residuals), with cluster separation rising to a peak mid-depth and falling again; two of the tasks overlap.

Baselines (both produce leave-one-out 10-NN predictions):
* naive: per layer, ``cross_val_predict(KNeighborsClassifier(10), X, y, cv=LeaveOneOut())``
  (700 fits per layer). It is slow, so it runs on ``--naive-layers`` evenly spaced layers and its
  time is extrapolated linearly to all layers (said so in the JSON).
* fast: per layer, ``KNeighborsClassifier(10, algorithm="brute").fit(X, y).predict(None)``, which
  scikit-learn documents as predicting every indexed point without counting it as its own neighbour.

Each scikit-learn baseline is timed both with default threading and with
``threadpool_limits(1)`` on one layer; the faster setting is used (reported as ``*_threads``).
Ours (float64, the default) is the median of ``--repeats`` runs, without the bootstrap (n_boot=0,
what the baselines compute) and with the default n_boot=1000 CI, at default torch threads and at
one thread; the faster is used (``ours_threads``). float32 distances are timed for information. The last printed line is a JSON object.

Run: ``.venv/bin/python benchmarks/td_speed.py``

``--smoke``: the same code on 4 layers x 7 tasks x 12 points x 32 dims, k = 3, one repeat (seconds; checks
that it runs, not its speed).
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.model_selection import LeaveOneOut, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from taskvec_interp.probes import task_decodability

N_LAYERS, PER_TASK, N_TASKS, D_MODEL, K = 30, 100, 7, 576, 10


def use_smoke_sizes() -> None:
    global N_LAYERS, PER_TASK, D_MODEL, K
    N_LAYERS, PER_TASK, D_MODEL, K = 4, 12, 32, 3


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N_TASKS).repeat_interleave(PER_TASK)
    centres = torch.randn(N_LAYERS, N_TASKS, D_MODEL, generator=g)
    centres[:, -1] = 0.9 * centres[:, -2] + 0.44 * centres[:, -1]  # two overlapping tasks
    depth = torch.linspace(0, 1, N_LAYERS)
    sep = 0.045 * torch.exp(-((depth - 0.45) ** 2) / 0.05)  # peak around layer 13
    offset = 3.0 * torch.randn(N_LAYERS, 1, D_MODEL, generator=g)  # shared residual offset
    noise = torch.randn(N_LAYERS, len(y), D_MODEL, generator=g)
    x = offset + noise + sep.view(-1, 1, 1) * centres[:, y] * D_MODEL**0.5 / 4
    return x.float(), y


def naive_layer(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return cross_val_predict(KNeighborsClassifier(n_neighbors=K), x, y, cv=LeaveOneOut())


def fast_layer(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return KNeighborsClassifier(n_neighbors=K, algorithm="brute").fit(x, y).predict(None)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def pick_threads(layer_fn: Callable, x: np.ndarray, y: np.ndarray) -> int | None:
    """1 if single-threaded scikit-learn is faster on one layer, else None (library default)."""
    t_default, _ = timed(lambda: layer_fn(x, y))
    with threadpool_limits(1):
        t_one, _ = timed(lambda: layer_fn(x, y))
    return 1 if t_one < t_default else None


def run_layers(layer_fn: Callable, x: np.ndarray, y: np.ndarray, layers: list[int], threads: int | None):
    with threadpool_limits(threads):
        t, preds = timed(lambda: np.stack([layer_fn(x[layer], y) for layer in layers]))
    return t, preds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--naive-layers", type=int, default=3, help="layers the naive LOO loop really runs")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds): CI's check that it runs")
    args = ap.parse_args()
    if args.smoke:
        use_smoke_sizes()
        args.repeats, args.naive_layers = 1, 2

    x, y = make_data()
    xn, yn = x.numpy(), y.numpy()
    print(f"data: {N_LAYERS} layers x {len(y)} points x {D_MODEL} dims, {N_TASKS} tasks, k={K}")
    print(f"torch threads: {torch.get_num_threads()}")

    # ours: default torch threads and 1 thread (the machine may be shared); keep the faster
    default_threads = torch.get_num_threads()
    task_decodability(x, y, k=K, n_boot=0)  # warm-up
    times: dict[tuple[int, int], list[float]] = {}
    results = {}
    for _ in range(args.repeats):
        for threads in sorted({default_threads, 1}):
            torch.set_num_threads(threads)
            for n_boot in (0, 1000):
                t, out = timed(lambda n_boot=n_boot: task_decodability(x, y, k=K, n_boot=n_boot))
                times.setdefault((threads, n_boot), []).append(t)
                results[n_boot] = out
    torch.set_num_threads(default_threads)
    med = {key: statistics.median(v) for key, v in times.items()}
    ours_threads = min((th for th, nb in med if nb == 0), key=lambda th: med[(th, 0)])
    ours, ours_ci = med[(ours_threads, 0)], med[(ours_threads, 1000)]
    res, res_ci = results[0], results[1000]
    for (th, nb), v in sorted(med.items()):
        print(f"ours: median {v:.3f} s (torch threads={th}, n_boot={nb}) over {args.repeats} repeats")
    print("TD by layer:", " ".join(f"{v:.2f}" for v in res.td.tolist()), f"(peak layer {res.peak_layer})")
    torch.set_num_threads(ours_threads)
    t32 = statistics.median(
        timed(lambda: task_decodability(x, y, k=K, n_boot=0, dtype=torch.float32))[0]
        for _ in range(args.repeats)
    )
    res32 = task_decodability(x, y, k=K, n_boot=0, dtype=torch.float32)
    torch.set_num_threads(default_threads)
    agree32 = float((res32.predictions == res.predictions).double().mean())
    print(f"ours float32: median {t32:.3f} s, predictions agree with float64 on {agree32:.4%}")

    # fast honest baseline: all layers
    fast_threads = pick_threads(fast_layer, xn[0], yn)
    t_fast, fast_preds = run_layers(fast_layer, xn, yn, list(range(N_LAYERS)), fast_threads)
    print(f"sklearn predict(None) loop, all {N_LAYERS} layers: {t_fast:.2f} s (threads={fast_threads})")

    # naive LeaveOneOut baseline: a subset of layers, extrapolated
    naive_layers = np.linspace(0, N_LAYERS - 1, args.naive_layers).round().astype(int).tolist()
    naive_threads = pick_threads(naive_layer, xn[naive_layers[0]], yn)
    t_naive_sub, naive_preds = run_layers(naive_layer, xn, yn, naive_layers, naive_threads)
    t_naive = t_naive_sub / len(naive_layers) * N_LAYERS
    print(
        f"sklearn cross_val_predict(LeaveOneOut) on layers {naive_layers}: {t_naive_sub:.2f} s "
        f"-> {t_naive:.1f} s extrapolated to {N_LAYERS} layers (threads={naive_threads})"
    )

    ours_preds = res.predictions.numpy()
    identical_fast = bool((ours_preds == fast_preds).all())
    identical_naive = bool((ours_preds[naive_layers] == naive_preds).all())
    td_fast = (fast_preds == yn).mean(1)
    identical_td = bool(np.array_equal(res.td.numpy(), td_fast)) and bool(
        np.array_equal(res.td.numpy()[naive_layers], (naive_preds == yn).mean(1))
    )
    ci_same = bool(torch.equal(res_ci.td, res.td))
    summary = {
        "benchmark": "td_speed",
        "smoke": args.smoke,
        "shape": [N_LAYERS, len(y), D_MODEL],
        "n_tasks": N_TASKS,
        "k": K,
        "repeats": args.repeats,
        "ours_s": round(ours, 4),
        "ours_with_ci_s": round(ours_ci, 4),
        "ours_threads": ours_threads,
        "ours_float32_s": round(t32, 4),
        "ours_float32_agreement": round(agree32, 6),
        "naive_loo_s": round(t_naive, 2),
        "naive_loo_extrapolated": True,
        "naive_loo_layers_run": naive_layers,
        "naive_loo_measured_s": round(t_naive_sub, 2),
        "naive_threads": naive_threads,
        "fast_predict_none_s": round(t_fast, 3),
        "fast_threads": fast_threads,
        "speedup_vs_naive": round(t_naive / ours, 1),
        "speedup_vs_naive_with_ci": round(t_naive / ours_ci, 1),
        "speedup_vs_fast": round(t_fast / ours, 2),
        "peak_layer": res.peak_layer,
        "peak_td": round(res.peak_td, 4),
        "identical": identical_fast and identical_naive and identical_td and ci_same,
        "identical_vs_fast_all_layers": identical_fast,
        "identical_vs_naive_subset": identical_naive,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
