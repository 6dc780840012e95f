"""The data-chosen cut on planted runs: does kNN average linkage find the quanta without being told k?

For each finished planted run directory (a clone where `dvc repro` has run, any
`planted.alpha` and `planted.seed`), it rebuilds the kNN affinity from the run's gradients
with `similarity.mode: knn` (the sparse graph, never the dense matrix; the rest of the
run's similarity params as they are), clusters it with `cluster.method: knn_average` and
`cut: data` (the run's cluster params otherwise), and scores against the planted quanta:

- ARI with the unassigned samples as one more class, and ARI over the assigned alone;
- the number of clusters the cut chose beside the quanta present, and the unassigned fraction;
- for comparison, the same tree cut at k = the quanta present and at k = 50 (fixed-k cuts).

    python bench/bench_cut_planted.py /tmp/s0 /tmp/s1 /tmp/s2 [--min-cluster-size 3] [--json out.json]

Seconds per run on 2 cores (4,000 samples).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core import config  # noqa: E402
from pipeline.planted import suite  # noqa: E402
from pipeline.qdg import clustering, gradient_files  # noqa: E402
from pipeline.qdg import similarity as sim  # noqa: E402
from pipeline.qdg.selection import read_samples  # noqa: E402


def evaluate(run: Path, overrides: dict, n_neighbors: int | None = None) -> dict:
    params = run / "params.yaml"
    planted = config.load("planted", params)
    sim_cfg = dataclasses.replace(config.load("similarity", params), mode="knn")
    if n_neighbors is not None:
        sim_cfg = dataclasses.replace(sim_cfg, n_neighbors=n_neighbors)
    cl_cfg = dataclasses.replace(config.load("cluster", params), method="knn_average", cut="data", **overrides)
    grads = gradient_files.read_gradients(run / "cache/qdg/gradients.npy")
    bad = gradient_files.read_bad(run / "cache/qdg/gradients.parquet")
    samples = read_samples(run / "cache/qdg/samples.parquet")
    truth_all = suite.sample_quanta(run / "cache/planted", samples)
    t0 = time.perf_counter()
    aff, ids, _ = sim.compute(np.asarray(grads), bad, sim_cfg)
    t1 = time.perf_counter()
    tree = clustering.knn_average_tree(aff, cl_cfg.n_neighbors)
    from scipy.sparse.csgraph import connected_components

    n_components = int(connected_components(aff, directed=False)[0])
    main = clustering.data_cut(tree, cl_cfg.min_cluster_size, cl_cfg.max_outlier_score)
    t2 = time.perf_counter()
    truth = truth_all[ids]
    k_present = int(len(np.unique(truth)))
    fixed = clustering.knn_average(aff, [k_present, 50], cl_cfg, tree=tree)
    return {
        "run": str(run), "alpha": planted.alpha, "seed": planted.seed, "n": int(len(ids)), "k_present": k_present,
        "cut": clustering.scored(truth, main),
        "at_k_present": clustering.scored(truth, fixed[k_present]),
        "at_k_50": clustering.scored(truth, fixed[50]),
        "graph_components": n_components, "similarity_seconds": round(t1 - t0, 2), "tree_and_cut_seconds": round(t2 - t1, 2),
        "cluster": {"min_cluster_size": cl_cfg.min_cluster_size, "max_outlier_score": cl_cfg.max_outlier_score,
                    "n_neighbors": sim_cfg.n_neighbors},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--min-cluster-size", type=int, default=None)
    ap.add_argument("--max-outlier-score", type=float, default=None)
    ap.add_argument("--n-neighbors", type=int, default=None, help="similarity.n_neighbors (default: the run's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    overrides = {k: v for k, v in (("min_cluster_size", args.min_cluster_size),
                                   ("max_outlier_score", args.max_outlier_score)) if v is not None}
    rows = [evaluate(run, overrides, args.n_neighbors) for run in args.runs]
    print("| α | seed | N | kNN | graph components | quanta present | clusters chosen | unassigned "
          "| ARI (unassigned a class) | ARI (assigned) | ARI at k = quanta present | ARI at k = 50 | tree + cut s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        c = r["cut"]
        assigned = (c.get("assigned") or {}).get("ari", c["ari"])
        print(f"| {r['alpha']} | {r['seed']} | {r['n']:,} | {r['cluster']['n_neighbors']} | {r['graph_components']} | "
              f"{r['k_present']} | {c['k']} | "
              f"{c.get('unassigned_fraction', 0.0):.2%} | {c['ari']:.3f} | {assigned:.3f} | "
              f"{r['at_k_present']['ari']:.3f} | {r['at_k_50']['ari']:.3f} | {r['tree_and_cut_seconds']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
