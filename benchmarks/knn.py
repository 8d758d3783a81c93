"""Benchmark: ``knn_scores`` vs scikit-learn brute-force K-NN on the paper's evaluation shape.

5,000 reference x 1,000 query embeddings, K=7, 27 classes, at D=6 (the paper's triplet
embedding size) and D=128. Both run side by side in one process on the same float32 data;
each figure is the median of ``--repeats`` runs after one warm-up. scikit-learn times
``KNeighborsClassifier(algorithm="brute").fit(...).predict(...)``; ours times the full
``knn_scores`` (prediction, recalls, CMC) and ``knn_predict`` alone.

    python benchmarks/knn.py [--repeats 7] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations, thread-pool start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run(n_ref: int, n_query: int, dims: list[int], k: int, n_classes: int, repeats: int, seed: int) -> list[dict]:
    import numpy as np
    import torch
    from sklearn.neighbors import KNeighborsClassifier

    from raytumor.evaluate import knn_predict, knn_scores, nearest_neighbors

    rng = np.random.default_rng(seed)
    rows = []
    for dim in dims:
        ref = rng.normal(size=(n_ref, dim)).astype(np.float32)
        query = rng.normal(size=(n_query, dim)).astype(np.float32)
        ref_labels = rng.integers(0, n_classes, n_ref)
        query_labels = rng.integers(0, n_classes, n_query)

        def sklearn_knn():
            return KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(ref, ref_labels).predict(query)

        def ours_scores():
            return knn_scores(ref, ref_labels, query, query_labels, k=k, rare_classes=range(14, n_classes))

        def ours_predict():
            return knn_predict(ref, ref_labels, query, k=k)

        sk_ms = _median_ms(sklearn_knn, repeats)
        scores_ms = _median_ms(ours_scores, repeats)
        predict_ms = _median_ms(ours_predict, repeats)
        # Vote ties are broken differently (sklearn: smallest label, ours: nearest member), and
        # with 27 classes and k=7 most random queries tie, so compare on untied queries too.
        same = sklearn_knn() == ours_predict()
        _, idx = nearest_neighbors(ref, query, k)
        counts = np.stack([np.bincount(row, minlength=n_classes) for row in ref_labels[idx]])
        untied = (counts == counts.max(axis=1, keepdims=True)).sum(axis=1) == 1
        agreement, agreement_untied = float(same.mean()), float(same[untied].mean())
        rows.append(
            {
                "dim": dim,
                "n_ref": n_ref,
                "n_query": n_query,
                "k": k,
                "sklearn_brute_ms": round(sk_ms, 2),
                "knn_scores_ms": round(scores_ms, 2),
                "knn_predict_ms": round(predict_ms, 2),
                "speedup_vs_sklearn": round(sk_ms / scores_ms, 2),
                "prediction_agreement": round(agreement, 4),
                "agreement_untied_votes": round(agreement_untied, 4),
                "untied_queries": int(untied.sum()),
                "torch_threads": torch.get_num_threads(),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-ref", type=int, default=5000)
    parser.add_argument("--n-query", type=int, default=1000)
    parser.add_argument("--dims", type=int, nargs="+", default=[6, 128])
    parser.add_argument("--k", type=int, default=7)
    parser.add_argument("--classes", type=int, default=27)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args()

    rows = run(args.n_ref, args.n_query, args.dims, args.k, args.classes, args.repeats, args.seed)
    print(f"K-NN, {args.n_ref} reference x {args.n_query} query, k={args.k}, median of {args.repeats}")
    print(
        f"{'D':>5} {'sklearn brute':>14} {'knn_scores':>11} {'knn_predict':>12} {'speedup':>8}"
        f" {'agree':>6} {'agree untied':>13}"
    )
    for r in rows:
        print(
            f"{r['dim']:>5} {r['sklearn_brute_ms']:>11.1f} ms {r['knn_scores_ms']:>8.1f} ms "
            f"{r['knn_predict_ms']:>9.1f} ms {r['speedup_vs_sklearn']:>7.1f}x {r['prediction_agreement']:>6.3f}"
            f" {r['agreement_untied_votes']:>6.3f} ({r['untied_queries']})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
