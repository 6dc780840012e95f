"""How reliably each cluster comes back when the data are perturbed.

Subsamples: ``cluster.stability_draws`` seeded subsamples of ``cluster.stability_fraction``
of the clustered samples are clustered alone, by the same method at every k of the sweep.
A cluster's ``stability`` is its best-match Jaccard index (Hennig 2007, "Cluster-wise
assessment of cluster stability"): |C ∩ D| / |C ∪ D| between its members in the
subsample and the subsample's cluster D that matches them best, averaged over the draws
that hold at least one of its members. Hennig reads a mean Jaccard below 0.5 as a
dissolved cluster and above 0.75 as a stable one. The global ``subsample_ari`` is the mean
ARI, over the draws, between the main clustering restricted to a subsample and that
subsample's own clustering.

Projections: the gradients stage can project the same exact per-sample gradient with more
SJLT seeds (``gradients.stability_seeds``). :func:`projection_stability` clusters each such
copy at every k the way the cluster stage clusters the main one: each cluster's
``projection_stability`` is its best-match Jaccard against the copy's clustering, and the
global ``projection_ari`` the copy's ARI against the main clustering: what the random
projection alone changes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.core.config import ClusterConfig
from pipeline.qdg.clustering import check_k, cluster_at


def best_jaccard(reference: np.ndarray, other: np.ndarray, k: int) -> np.ndarray:
    """(k,) for each cluster 0..k-1 of `reference`, the largest Jaccard index between its
    members and one cluster of `other` (both over the same samples, labels >= 0); NaN for
    a cluster with no member here."""
    reference = np.asarray(reference)
    other = np.asarray(other)
    ok = (reference >= 0) & (other >= 0)
    a, b = reference[ok], other[ok]
    k_other = int(b.max()) + 1 if b.size else 0
    table = sp.coo_matrix((np.ones(a.size), (a, b)), shape=(k, max(k_other, 1))).tocsr()  # (k, k')
    size_a = np.bincount(a, minlength=k).astype(np.float64)
    size_b = np.bincount(b, minlength=max(k_other, 1)).astype(np.float64)
    out = np.full(k, np.nan)
    coo = table.tocoo()
    jac = coo.data / (size_a[coo.row] + size_b[coo.col] - coo.data)
    best = np.zeros(k)
    np.maximum.at(best, coo.row, jac)
    present = size_a > 0
    out[present] = best[present]
    return out


def subsample_stability(affinity, sweep: Mapping[int, np.ndarray], cfg: ClusterConfig) -> tuple[pd.DataFrame, dict]:
    """(one row per (k, cluster): k, cluster, stability; metrics) over cfg.stability_draws
    subsamples of cfg.stability_fraction of the rows of `affinity` (see the module docstring).

    sweep: k -> labels over the rows of `affinity`; the first entry is the main clustering.
    """
    from sklearn.metrics import adjusted_rand_score

    n = affinity.shape[0]
    ks = list(sweep)
    size = int(round(cfg.stability_fraction * n))
    if size <= max(ks):  # a subsample too small to cut at every k: no stability, said so
        table = pd.concat([pd.DataFrame({"k": np.int32(k), "cluster": np.arange(int(lab.max()) + 1, dtype=np.int32),
                                         "stability": pd.array([None] * (int(lab.max()) + 1), dtype="Float64")})
                           for k, lab in sweep.items()], ignore_index=True)
        return table, {"subsample_ari": None, "subsample_note": f"a {cfg.stability_fraction:.0%} subsample holds {size} "
                       f"samples, not more than k = {max(ks)}: no subsample stability (lower cluster.n_clusters)"}
    check_k(ks, size)
    sums = {k: np.zeros(int(lab.max()) + 1) for k, lab in sweep.items()}
    counts = {k: np.zeros(int(lab.max()) + 1) for k, lab in sweep.items()}
    aris = []
    for r in range(cfg.stability_draws):
        rng = np.random.default_rng([cfg.stability_seed, r])
        keep = np.sort(rng.choice(n, size=size, replace=False))
        sub = affinity[keep][:, keep] if sp.issparse(affinity) else np.asarray(affinity)[np.ix_(keep, keep)]
        again = cluster_at(sub, ks, cfg, seed=cfg.stability_seed + r)
        for i, (k, lab) in enumerate(sweep.items()):
            jac = best_jaccard(lab[keep], again[k], len(sums[k]))
            seen = np.isfinite(jac)
            sums[k][seen] += jac[seen]
            counts[k][seen] += 1
            if i == 0:
                aris.append(float(adjusted_rand_score(lab[keep], again[k])))
    frames = []
    for k in sweep:
        value = np.divide(sums[k], counts[k], out=np.full(len(sums[k]), np.nan), where=counts[k] > 0)
        frames.append(pd.DataFrame({"k": np.int32(k), "cluster": np.arange(len(value), dtype=np.int32),
                                    "stability": pd.array([float(v) if np.isfinite(v) else None for v in value],
                                                          dtype="Float64")}))
    metrics = {"subsample_ari": round(float(np.mean(aris)), 4), "subsample_ari_min": round(float(np.min(aris)), 4),
               "subsample_draws": cfg.stability_draws, "subsample_fraction": cfg.stability_fraction}
    return pd.concat(frames, ignore_index=True), metrics


def projection_stability(affinities: Sequence, sweep: Mapping[int, np.ndarray],
                         cfg: ClusterConfig) -> tuple[pd.DataFrame, list[float]]:
    """Each affinity (one per extra projection seed, over the same rows) clustered at every k
    of the sweep with cfg's method: (one row per (k, cluster): k, cluster,
    projection_stability, the best-match Jaccard against the copies' clusterings averaged
    over copies; the ARI of each copy against the main clustering, the sweep's first entry).
    """
    from sklearn.metrics import adjusted_rand_score

    ks = list(sweep)
    sums = {k: np.zeros(int(lab.max()) + 1) for k, lab in sweep.items()}
    aris = []
    for aff in affinities:
        again = cluster_at(aff, ks, cfg)
        aris.append(float(adjusted_rand_score(sweep[ks[0]], again[ks[0]])))
        for k, lab in sweep.items():
            sums[k] += np.nan_to_num(best_jaccard(lab, again[k], len(sums[k])))
    frames = [pd.DataFrame({"k": np.int32(k), "cluster": np.arange(len(v), dtype=np.int32),
                            "projection_stability": pd.array(list(v / max(len(affinities), 1)), dtype="Float64")})
              for k, v in sums.items()]
    return pd.concat(frames, ignore_index=True), aris
