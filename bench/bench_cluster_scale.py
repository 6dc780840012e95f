"""Time and memory of the default similarity + clustering against N, and the 10^6 figure.

What it measures, for each N, in a child process of its own (so that peak RSS is its own):
`pipeline.qdg.similarity.compute` in kNN mode (similarity.n_neighbors, search in
similarity.knn_dim SVD dimensions above knn_exact_max, exact edge weights), then the
cluster stage's clustering work with the defaults (`cluster.method: knn_average`,
`cut: data`): `clustering.run_clustering` (the tree, the data-chosen cut and the fixed-k
cuts of the sweep) and the per-cluster subsample stability
(`stability.subsample_stability`: cluster.stability_draws trees of 80% of the samples).
The vectors are real-model-shaped: 8192 dimensions (the gradients stage's default
projection), Zipf-sized clusters (p_k ∝ k^-1.5) whose members have a mean cosine of
`--cos`, and `--noise` of the samples random directions that belong to no cluster. The ARI
against the clusters (unassigned as one more class, and over the assigned alone) and the
unassigned fraction are reported, so speed is never bought with wrong answers.

Then it fits, per phase, seconds = a N^b on the measured points (least squares in log-log)
and peak RSS = c + d N, and writes the figures at N = 10^6 with the model stated.

    python bench/bench_cluster_scale.py                       # N = 12,500 ... 100,000
    python bench/bench_cluster_scale.py --n 25000 50000 --json /tmp/scale.json

Targets (issue 29): N = 10^5 within 15 minutes and 12 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def vectors(n: int, dim: int, k: int, cos: float, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 in k Zipf-sized clusters plus a `noise` share of random directions
    (label -1 - i: each its own class), and the labels."""
    from bench_cluster import synthetic

    x, labels = synthetic(n, dim, k, cos, seed)
    rng = np.random.default_rng(seed + 1)
    stray = rng.random(n) < noise
    x[stray] = rng.standard_normal((int(stray.sum()), dim), dtype=np.float32)
    labels = np.where(stray, -1 - np.arange(n), labels)
    return x, labels


def run_one(args) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from pipeline.core.config import ClusterConfig, SimilarityConfig
    from pipeline.qdg import clustering, stability
    from pipeline.qdg import similarity as sim

    x, truth = vectors(args.one, args.dim, args.k, args.cos, args.noise, args.seed)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    sim_cfg = SimilarityConfig(mode="knn")
    cl_cfg = ClusterConfig(n_clusters=(50, 25, 100))
    t0 = time.perf_counter()
    aff, ids, meta = sim.compute(x, None, sim_cfg)
    t1 = time.perf_counter()
    del x
    table, metrics = clustering.run_clustering(aff, ids, args.one, cl_cfg)
    t2 = time.perf_counter()
    main = table.column("cluster").to_numpy()
    sweep = {metrics["k"]: main, **{int(c[1:]): table.column(c).to_numpy() for c in table.column_names
                                    if c.startswith("k") and c[1:].isdigit() and int(c[1:]) != metrics["k"]}}
    _, stab = stability.subsample_stability(aff, sweep, cl_cfg)
    t3 = time.perf_counter()
    assigned = main >= 0
    return {
        "n": args.one, "dim": args.dim, "clusters_planted": args.k, "within_cos": args.cos, "noise": args.noise,
        "n_neighbors": sim_cfg.n_neighbors, "edges": int(aff.nnz),
        "similarity_s": round(t1 - t0, 1), "cluster_s": round(t2 - t1, 1), "stability_s": round(t3 - t2, 1),
        "total_s": round(t3 - t0, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "input_rss_gib": round(rss_data, 2),
        "k_chosen": metrics["k"], "unassigned_fraction": metrics.get("unassigned_fraction"),
        "ari": round(float(adjusted_rand_score(truth, main)), 4),
        "ari_assigned": round(float(adjusted_rand_score(truth[assigned], main[assigned])), 4),
        "subsample_ari": stab.get("subsample_ari"),
    }


def fit_power(ns, ys) -> tuple[float, float]:
    """(a, b) of y = a n^b, least squares on log y."""
    b, log_a = np.polyfit(np.log(ns), np.log(ys), 1)
    return float(np.exp(log_a)), float(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[12_500, 25_000, 50_000, 100_000])
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the child's N
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--k", type=int, default=400, help="planted clusters")
    ap.add_argument("--cos", type=float, default=0.3)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for n in args.n:
        cmd = [sys.executable, __file__, "--one", str(n), "--dim", str(args.dim), "--k", str(args.k),
               "--cos", str(args.cos), "--noise", str(args.noise), "--seed", str(args.seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"N = {n} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| N | edges | similarity s | cluster s | stability s | total s | peak RSS GiB (input) | clusters chosen "
          "| unassigned | ARI (unassigned a class) | ARI (assigned) | subsample ARI |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['n']:,} | {r['edges']:,} | {r['similarity_s']} | {r['cluster_s']} | {r['stability_s']} | "
              f"{r['total_s']} | {r['peak_rss_gib']} ({r['input_rss_gib']}) | {r['k_chosen']} | "
              f"{r['unassigned_fraction']} | {r['ari']} | {r['ari_assigned']} | {r['subsample_ari']} |")
    out = {"rows": rows}
    if len(rows) >= 2:
        ns = np.array([r["n"] for r in rows], dtype=float)
        model = {}
        for key in ("similarity_s", "cluster_s", "stability_s", "total_s"):
            a, b = fit_power(ns, [max(r[key], 0.1) for r in rows])
            model[key] = {"a": a, "b": round(b, 3), "at_1e6": round(a * 1e6**b, 0)}
        d, c = np.polyfit(ns, [r["peak_rss_gib"] for r in rows], 1)
        model["peak_rss_gib"] = {"c": round(float(c), 3), "d_per_sample": float(d), "at_1e6": round(float(c + d * 1e6), 1)}
        out["model"] = model
        print("\nExtrapolated to N = 10^6 (seconds = a N^b per phase, fitted on the points above; "
              "peak RSS = c + d N):")
        for key, m in model.items():
            print(f"- {key}: {m}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
