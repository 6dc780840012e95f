"""Scale of the similarity + cluster stages: N samples of dimension 8192 -> clusters.

What it measures: wall time and peak RSS of `pipeline.qdg.similarity.compute`
followed by `pipeline.qdg.clustering.run_clustering` (its main k, plus the stability rerun at a
second seed, as the cluster stage does), on synthetic clustered vectors:

- dense mode at N = 10,000 (target: <= 2 minutes);
- sparse kNN mode at N = 100,000 (target: <= 15 minutes and <= 12 GiB peak RSS).

The vectors: `n_clusters` random unit directions in `dim` dimensions with Zipf-distributed
cluster sizes (p_k ∝ k^-1.5, as planted quanta), each sample its cluster's direction plus
isotropic noise scaled so that the mean within-cluster cosine is about `--cos` (default
0.3; the planted suite's QDG gradients are far tighter). The ARI against these clusters is
reported so that speed is never bought with wrong answers; for kNN mode the recall of the
neighbour search (exact up to 20,000 samples, then in 256 SVD dimensions) against exact
search on 500 queries is reported too, with the similarity of the chosen neighbours relative
to the exact ones.

Each configuration runs in its own child process, so peak RSS is its own.

    python bench/bench_cluster.py                 # both configurations (about 15 min on 2 cores)
    python bench/bench_cluster.py --only dense    # or --only knn
    python bench/bench_cluster.py --n 3000 --k 50 --mode knn   # one custom run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def synthetic(n: int, dim: int, k: int, cos: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 vectors in k Zipf-sized clusters, and their labels; built in chunks."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, k + 1, dtype=np.float64) ** -1.5
    labels = rng.choice(k, size=n, p=p / p.sum())
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # x = c + s * e with e ~ N(0, I/dim): cos(x_i, x_j) ≈ 1 / (1 + s^2) within a cluster
    s = np.float32(np.sqrt(1.0 / cos - 1.0))
    x = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, 10_000):
        b = min(n, a + 10_000)
        noise = rng.standard_normal((b - a, dim), dtype=np.float32) * (s / np.float32(np.sqrt(dim)))
        x[a:b] = centres[labels[a:b]] + noise
    return x, labels


def knn_recall(x: np.ndarray, aff, n_neighbors: int, queries: int = 500, seed: int = 0) -> tuple[float, float]:
    """For `queries` random samples: the fraction of their exact top-n_neighbors present in
    the kNN graph (recall), and the mean cosine of the neighbours the graph chose over that
    of the exact ones (1.0: as similar; within a tight cluster any member is as good)."""
    rng = np.random.default_rng(seed)
    q = rng.choice(len(x), size=queries, replace=False)
    xq = x[q] / np.linalg.norm(x[q], axis=1, keepdims=True)
    norms = np.linalg.norm(x, axis=1)
    hits, got, best = 0, 0.0, 0.0
    for j, i in enumerate(q):
        s = (x @ xq[j]) / norms
        s[i] = -np.inf
        exact = np.argpartition(-s, n_neighbors)[:n_neighbors]
        row = aff.indices[aff.indptr[i] : aff.indptr[i + 1]]
        row = row[row != i]
        hits += len(set(row.tolist()).intersection(exact.tolist()))
        got += np.sort(s[row])[::-1][:n_neighbors].mean()
        best += s[exact].mean()
    return hits / (queries * n_neighbors), got / best


def run_one(args) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from pipeline.core.config import ClusterConfig, SimilarityConfig
    from pipeline.qdg import clustering, similarity

    t0 = time.perf_counter()
    x, truth = synthetic(args.n, args.dim, args.k, args.cos, args.seed)
    t_data = time.perf_counter() - t0
    sim_cfg = SimilarityConfig(
        mode=args.mode, n_neighbors=args.neighbors, memory_gb=args.memory_gb, knn_exact_max=args.knn_exact_max
    )
    cl_cfg = ClusterConfig(n_clusters=(args.k,), n_init=args.n_init, eigen_solver=args.solver, assign_labels=args.assign)
    t1 = time.perf_counter()
    aff, ids, meta = similarity.compute(x, None, sim_cfg)
    t_sim = time.perf_counter() - t1
    recall, sim_ratio = knn_recall(x, aff, args.neighbors) if meta["mode"] == "knn" else (None, None)
    del x
    t2 = time.perf_counter()
    table, metrics = clustering.run_clustering(aff, ids, args.n, cl_cfg)
    t_cluster = time.perf_counter() - t2
    labels = table.column("cluster").to_numpy()
    return {
        "n": args.n,
        "dim": args.dim,
        "k": args.k,
        "mode": meta["mode"],
        "n_neighbors": args.neighbors if meta["mode"] == "knn" else None,
        "solver": args.solver,
        "assign_labels": args.assign,
        "n_init": args.n_init,
        "within_cos": args.cos,
        "data_seconds": round(t_data, 1),
        "similarity_seconds": round(t_sim, 1),
        "cluster_seconds": round(t_cluster, 1),  # main k + the stability rerun
        "total_seconds": round(t_sim + t_cluster, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "ari_vs_truth": round(float(adjusted_rand_score(truth, labels)), 4),
        "stability_ari": metrics.get("stability_ari"),  # seeded methods only (the stage adds subsamples)
        "knn_recall": None if recall is None else round(float(recall), 4),
        "knn_similarity_ratio": None if sim_ratio is None else round(float(sim_ratio), 4),
    }


CONFIGS = {
    # the paper's setting (dense, k-means assignment) at its N
    "dense": ["--n", "10000", "--k", "400", "--mode", "dense", "--assign", "kmeans", "--n-init", "10"],
    # 10x the paper's N; cluster_qr needs no k-means restarts over 100,000 x 400 embeddings
    "knn": ["--n", "100000", "--k", "400", "--mode", "knn", "--assign", "cluster_qr", "--solver", "arpack"],

}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(CONFIGS), help="run one of the two standard configurations")
    ap.add_argument("--n", type=int, default=None, help="one custom run with this many samples")
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--k", type=int, default=400)
    ap.add_argument("--cos", type=float, default=0.3)
    ap.add_argument("--mode", default="auto", choices=["auto", "dense", "knn"])
    ap.add_argument("--neighbors", type=int, default=30)
    ap.add_argument("--solver", default="arpack", choices=["arpack", "lobpcg", "amg"])
    ap.add_argument("--assign", default="kmeans", choices=["kmeans", "discretize", "cluster_qr"])
    ap.add_argument("--n-init", type=int, default=10)
    ap.add_argument("--memory-gb", type=float, default=2.0)
    ap.add_argument("--knn-exact-max", type=int, default=20_000, help="exact kNN search up to this N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON line (used by the parent)")
    args = ap.parse_args()

    if args.n is not None:
        res = run_one(args)
        print(json.dumps(res) if args.json else json.dumps(res, indent=2))
        return
    names = [args.only] if args.only else list(CONFIGS)
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, *CONFIGS[name], "--dim", str(args.dim), "--json"]
        print("running:", " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        out = proc.stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(json.dumps(rows[-1]), flush=True)
    print()
    print("| mode | N | k | similarity s | cluster s | total s | peak RSS GiB | ARI vs truth | stability ARI "
          "| kNN recall | nbr cos ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['mode']} | {r['n']:,} | {r['k']} | {r['similarity_seconds']} | {r['cluster_seconds']} | "
            f"{r['total_seconds']} | {r['peak_rss_gib']} | {r['ari_vs_truth']} | {r['stability_ari']} | {r['knn_recall']} | "
            f"{r['knn_similarity_ratio']} |"
        )


if __name__ == "__main__":
    main()
