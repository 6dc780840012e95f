"""Spectral clustering of the gradient affinity: each cluster is a candidate quantum.

Why this module exists: the paper ran sklearn's SpectralClustering on the dense
angular affinity, once per k of a sweep (10 ... 1500), unseeded. Here:

- the spectral embedding is computed once, with as many eigenvectors as the largest k
  of the sweep, and each k takes its leading k columns. This is what SpectralClustering
  does for one k (``spectral_embedding(n_components=k, drop_first=False)``, then the
  label assignment), without redoing the eigendecomposition for every k;
- everything is seeded (the eigensolver's start vector and the k-means restarts), and
  a second seed at the main k measures stability (ARI between the two runs);
- the label assignment is sklearn's k-means (the paper's), discretize, or cluster_qr
  (no restarts, fast at N = 10^5);
- the summary says what a cluster is made of: its size, its most common target tokens
  with counts, its mean loss, and example samples to read.

Agglomerative clustering (``method: agglomerative``) is the alternative for dense
affinities: average linkage on the distance 1 - affinity (for the angular affinity that is
the angle arccos(C)/pi, a metric), one tree for the whole sweep, cut at every k. Why it is
here: spectral clustering minimises a normalised cut, which favours clusters of similar
volume. Quanta are Zipf-sized by hypothesis, and at k = the number of quanta present it
splits the largest ones (whose gradients vary a little along position and context) before
it isolates the small ones. On planted key-pair quanta whose gradients do separate (mean
cosine 0.993 within a quantum, 0.255 between), spectral clustering at that k scored ARI
0.150 and average linkage 0.9999, on the same affinity (bench/bench_qdg_language.py,
bench/RESULTS.md). It is deterministic, so its stability score is the ARI of a seeded 90%
subsample clustered alone against the full clustering.

Bad input: fewer usable samples than clusters (k >= N) is an error that names both.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from pipeline.config import ClusterConfig
from pipeline.errors import QuantaError


def check_k(ks: Sequence[int], n: int) -> None:
    """k must be < the number of samples clustered (spectral clustering needs k < N)."""
    big = [k for k in ks if k >= n]
    if big:
        raise QuantaError(
            f"cluster.n_clusters {big} needs more samples than the {n} usable ones (k must be < N); "
            "lower cluster.n_clusters or raise select.n_samples"
        )


def sparse_lanczos_embedding(affinity: sp.spmatrix, n_components: int, seed: int) -> np.ndarray:
    """Spectral embedding (N, n_components) of a sparse affinity by ARPACK Lanczos, no factorisation.

    Why not sklearn's arpack path here: it finds the smallest eigenvalues of the normalised
    Laplacian by shift-invert, which factorises the Laplacian; on a kNN graph the LU
    fill-in is huge (20,000 samples, 30 neighbours: still factorising after 15 minutes on
    2 cores). The same eigenvectors are the *largest* of the normalised adjacency
    M = D^-1/2 W D^-1/2 (L = I - M), which Lanczos finds with sparse products alone. As in
    sklearn, the embedding is the eigenvectors divided by sqrt(degree), the one of the
    largest eigenvalue first, signs fixed deterministically.
    """
    from scipy.sparse.linalg import eigsh

    w = sp.csr_matrix(affinity, dtype=np.float64)
    deg = np.asarray(w.sum(axis=1)).ravel()
    if (deg <= 0).any():
        raise QuantaError(f"sample {int(np.flatnonzero(deg <= 0)[0])} has no affinity to anything (degree 0)")
    s = 1.0 / np.sqrt(deg)
    m = sp.diags(s) @ w @ sp.diags(s)
    v0 = np.random.default_rng(seed).uniform(-1, 1, w.shape[0])
    _, vecs = eigsh(m, k=n_components, which="LA", v0=v0)  # ascending eigenvalues
    return _fixed_signs(vecs[:, ::-1] * s[:, None])


def dense_eigh_embedding(affinity: np.ndarray, n_components: int) -> np.ndarray:
    """Spectral embedding (N, n_components) of a dense affinity by LAPACK's symmetric eigensolver.

    Why not sklearn's arpack path for dense input: shift-invert Lanczos for 400 eigenvectors
    of a 10,000 x 10,000 Laplacian took ~3 minutes per embedding on 2 cores
    (bench/RESULTS.md); one dense tridiagonalisation (``eigh`` with ``subset_by_index``)
    is exact and faster. It runs in float32 (degrees in float64): the reduction to
    tridiagonal form is memory-bound, and single precision took it from 120 s to 75 s at
    N = 10,000 (AMD EPYC VM, one run), with the leading eigenvectors equal to float64's to
    1 - |cos| < 1e-7. Same graph as sklearn's (the diagonal is ignored), same scaling
    (eigenvectors of D^-1/2 W D^-1/2 divided by sqrt(degree)), signs fixed; float64 out.
    """
    from scipy.linalg import eigh

    w = np.array(affinity, dtype=np.float32)  # a copy: the diagonal goes
    np.fill_diagonal(w, 0.0)
    deg = w.sum(axis=1, dtype=np.float64)
    if (deg <= 0).any():
        raise QuantaError(f"sample {int(np.flatnonzero(deg <= 0)[0])} has no affinity to anything (degree 0)")
    s = 1.0 / np.sqrt(deg)
    s32 = s.astype(np.float32)
    w *= s32[:, None]
    w *= s32[None, :]
    n = len(w)
    _, vecs = eigh(w, subset_by_index=[n - n_components, n - 1], overwrite_a=True, check_finite=False)
    return _fixed_signs(vecs[:, ::-1].astype(np.float64) * s[:, None])  # largest eigenvalue first


def _fixed_signs(maps: np.ndarray) -> np.ndarray:
    big = np.abs(maps).argmax(axis=0)  # each vector's largest entry made positive: a fixed sign
    return maps * np.sign(maps[big, np.arange(maps.shape[1])])


def embedding(affinity, n_components: int, eigen_solver: str, seed: int) -> np.ndarray:
    """The spectral embedding (N, n_components) of a symmetric affinity, as SpectralClustering's.

    lobpcg / amg: sklearn's spectral_embedding, exactly as SpectralClustering calls it.
    arpack (the default): the same eigenvectors, found faster: :func:`dense_eigh_embedding`
    for a dense affinity (exact, LAPACK), :func:`sparse_lanczos_embedding` for a sparse one
    (no factorisation of the Laplacian).
    """
    from sklearn.manifold import spectral_embedding

    if eigen_solver == "arpack":
        if sp.issparse(affinity):
            return sparse_lanczos_embedding(affinity, n_components, seed)
        return dense_eigh_embedding(affinity, n_components)

    if eigen_solver == "amg":
        try:
            import pyamg  # noqa: F401
        except ImportError:
            raise QuantaError("cluster.eigen_solver 'amg' needs pyamg: pip install pyamg (or use arpack)") from None
    aff = affinity if sp.issparse(affinity) else np.asarray(affinity, dtype=np.float64)
    with warnings.catch_warnings():
        # a kNN graph with several connected components is legitimate input here
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        return spectral_embedding(
            aff, n_components=n_components, eigen_solver=eigen_solver, random_state=seed, drop_first=False
        )


def assign(maps: np.ndarray, k: int, how: str, n_init: int, seed: int) -> np.ndarray:
    """Labels (N,) int32 from the leading k columns of the spectral embedding."""
    x = np.ascontiguousarray(maps[:, :k])
    if how == "kmeans":
        from sklearn.cluster import KMeans

        labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x).labels_
    elif how == "cluster_qr":
        from sklearn.cluster._spectral import cluster_qr  # sklearn's own, as SpectralClustering calls it

        labels = cluster_qr(x)
    elif how == "discretize":
        from sklearn.cluster._spectral import discretize

        labels = discretize(x, random_state=seed)
    else:
        raise QuantaError(f"cluster.assign_labels must be kmeans, discretize or cluster_qr, got {how!r}")
    return canonical(labels)


def canonical(labels: np.ndarray) -> np.ndarray:
    """Rename clusters 0, 1, ... by decreasing size (ties: first appearance), int32.

    Cluster ids are arbitrary; naming them by size makes outputs stable across runs that
    agree up to renaming, and cluster 0 the largest.
    """
    labels = np.asarray(labels)
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    rename = np.empty(len(uniq), dtype=np.int32)
    rename[order] = np.arange(len(uniq), dtype=np.int32)
    return rename[np.searchsorted(uniq, labels)]


def spectral(
    affinity, ks: Sequence[int], cfg: ClusterConfig, seed: Optional[int] = None, maps: Optional[np.ndarray] = None
) -> dict[int, np.ndarray]:
    """{k: labels (N,) int32} for every k, from one spectral embedding of `affinity` (N, N).

    maps: a precomputed embedding (N, >= max(ks)) to reuse instead of computing one.
    """
    n = affinity.shape[0]
    check_k(ks, n)
    seed = cfg.seed if seed is None else seed
    if maps is None:
        maps = embedding(affinity, max(ks), cfg.eigen_solver, seed)
    return {k: assign(maps, k, cfg.assign_labels, cfg.n_init, seed) for k in ks}


def agglomerative(affinity, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """{k: labels (N,) int32}: average linkage on 1 - affinity, one tree cut at every k.

    scipy's hierarchy, not sklearn's AgglomerativeClustering: sklearn refits per k, scipy
    builds the tree once (nearest-neighbour chain, O(N^2) time) and cuts it for each k of
    the sweep. The condensed distance matrix takes N^2 / 2 float64 (400 MB at N = 10,000).
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    if sp.issparse(affinity):
        raise QuantaError(
            "cluster.method 'agglomerative' needs a dense affinity; set similarity.mode: dense "
            "(N <= similarity.dense_max) or use cluster.method: spectral for the sparse kNN graph"
        )
    n = affinity.shape[0]
    check_k(ks, n)
    dist = 1.0 - np.asarray(affinity, dtype=np.float64)
    np.fill_diagonal(dist, 0.0)
    np.clip(dist, 0.0, None, out=dist)  # rounding can leave -1e-16 where C = 1
    tree = linkage(squareform(dist, checks=False), method="average")
    del dist
    return {k: canonical(fcluster(tree, t=k, criterion="maxclust")) for k in ks}


def cluster_at(affinity, ks: Sequence[int], cfg: ClusterConfig, seed: Optional[int] = None) -> dict[int, np.ndarray]:
    """{k: labels} by cfg.method: :func:`spectral` or :func:`agglomerative`."""
    if cfg.method == "agglomerative":
        return agglomerative(affinity, ks)
    return spectral(affinity, ks, cfg, seed=seed)


def subsample_stability(affinity, labels: np.ndarray, k: int, seed: int, fraction: float = 0.9) -> float:
    """ARI of a seeded `fraction` subsample clustered alone (agglomerative) against `labels` on it."""
    from sklearn.metrics import adjusted_rand_score

    n = affinity.shape[0]
    keep = np.sort(np.random.default_rng(seed).choice(n, size=max(k + 1, int(round(fraction * n))), replace=False))
    sub = np.asarray(affinity)[np.ix_(keep, keep)]
    return float(adjusted_rand_score(labels[keep], agglomerative(sub, [k])[k]))


def seed_free_embedding(affinity, cfg: ClusterConfig) -> bool:
    """Whether the embedding does not depend on the seed: the exact LAPACK path (dense, arpack).

    Then the stability rerun can reuse it: recomputing would give the same matrix, bit for
    bit, at the cost of another O(N^3) eigendecomposition (about a minute at N = 10,000).
    """
    return cfg.eigen_solver == "arpack" and not sp.issparse(affinity)


def run_clustering(affinity, ids: np.ndarray, n_samples: int, cfg: ClusterConfig) -> tuple[pa.Table, dict]:
    """Cluster the samples `ids` (rows of `affinity`) of `n_samples`; (clusters table, metrics).

    The table has one row per sample: ``sample``, ``cluster`` (the main k, the first of
    cfg.n_clusters) and ``k<k>`` for every k of the sweep; samples left out of the
    affinity (bad gradients) get -1.
    """
    from sklearn.metrics import adjusted_rand_score

    t0 = time.perf_counter()
    ks = list(cfg.n_clusters)
    main = ks[0]
    check_k(ks, affinity.shape[0])
    if cfg.method == "agglomerative":
        labels = agglomerative(affinity, ks)
        t1 = time.perf_counter()
        # No seed enters the tree: stability is that of a seeded subsample clustered alone.
        stability = subsample_stability(affinity, labels[main], main, cfg.stability_seed)
        how = "subsample"
    else:
        maps = embedding(affinity, max(ks), cfg.eigen_solver, cfg.seed)
        labels = spectral(affinity, ks, cfg, maps=maps)
        t1 = time.perf_counter()
        # The stability rerun: k-means from another seed, and a new embedding where the seed enters it.
        reuse = maps if seed_free_embedding(affinity, cfg) else None
        again = spectral(affinity, [main], cfg, seed=cfg.stability_seed, maps=reuse)[main]
        stability = float(adjusted_rand_score(labels[main], again))
        how = "seeds"

    cols = {"sample": pa.array(np.arange(n_samples, dtype=np.int32))}
    for k in [main] + ks:
        full = np.full(n_samples, -1, dtype=np.int32)
        full[ids] = labels[k]
        cols["cluster" if "cluster" not in cols else f"k{k}"] = pa.array(full)
    sizes = np.bincount(labels[main])
    metrics = {
        "n_samples": int(n_samples),
        "n_clustered": int(len(ids)),
        "k": int(main),
        "sweep": ks,
        "stability_ari": round(stability, 4),
        "method": cfg.method,
        "stability": "ARI between two seeds" if how == "seeds" else "ARI of a 90% subsample clustered alone",
        "stability_seeds": [cfg.seed, cfg.stability_seed],
        "largest_cluster": int(sizes.max()),
        "median_cluster": float(np.median(sizes)),
        "singletons": int((sizes == 1).sum()),
        "seconds": round(t1 - t0, 2),
    }
    return pa.table(cols), metrics


def summarise(
    clusters: pd.DataFrame,
    samples: pd.DataFrame,
    token_str: dict[int, str],
    cfg: ClusterConfig,
) -> pa.Table:
    """One row per (k, cluster): size, top target tokens with counts, mean loss, example samples.

    clusters: the clusters table; samples: sample, token_id, loss; token_str: token id ->
    its text. Examples are the first cfg.n_examples samples of a random (seeded) order.
    """
    k_cols = [c for c in clusters.columns if c.startswith("k") and c[1:].isdigit()]
    merged = clusters.merge(samples[["sample", "token_id", "loss"]], on="sample", how="left")
    rng = np.random.default_rng(cfg.seed)
    merged["_order"] = rng.permutation(len(merged))
    rows = []
    for col in k_cols:
        k = int(col[1:])
        sub = merged[merged[col] >= 0]
        for c, g in sub.groupby(col, sort=True):
            counts = g["token_id"].value_counts().head(cfg.top_tokens)
            rows.append(
                {
                    "k": k,
                    "cluster": int(c),
                    "size": len(g),
                    "top_tokens": [token_str.get(int(t), str(t)) for t in counts.index],
                    "top_token_ids": [int(t) for t in counts.index],
                    "top_counts": [int(n) for n in counts.to_numpy()],
                    "mean_loss": float(g["loss"].mean()),
                    "examples": [int(s) for s in g.sort_values("_order")["sample"].head(cfg.n_examples)],
                }
            )
    schema = pa.schema(
        [
            ("k", pa.int32()),
            ("cluster", pa.int32()),
            ("size", pa.int32()),
            ("top_tokens", pa.list_(pa.string())),
            ("top_token_ids", pa.list_(pa.int32())),
            ("top_counts", pa.list_(pa.int32())),
            ("mean_loss", pa.float32()),
            ("examples", pa.list_(pa.int32())),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


# --------------------------------------------------------------------------- validation


def scores(truth: np.ndarray, pred: np.ndarray) -> dict:
    """ARI and NMI of a labelling against the truth, rounded for metrics files."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {
        "ari": round(float(adjusted_rand_score(truth, pred)), 4),
        "nmi": round(float(normalized_mutual_info_score(truth, pred)), 4),
    }


def validate(
    affinity,
    ids: np.ndarray,
    samples: pd.DataFrame,
    quanta: np.ndarray,
    prev_tokens: np.ndarray,
    clusters: Optional[pd.DataFrame],
    cfg: ClusterConfig,
) -> dict:
    """QDG clusters against planted quanta, beside the baselines that need no gradients.

    quanta (N,): the planted quantum of each sample (-1: none, scored as one more class);
    prev_tokens (N,): the token before each target. Clusters the affinity rows `ids` at
    k = the number of classes present (or takes the cluster stage's labels when its sweep
    has that k: the same computation), and scores it (ARI, NMI) on those samples, with
    the "answer token" baseline (cluster by target token id) and the "context" baseline
    (cluster by previous token and target token), and every k of the cluster stage. On a
    dense affinity the other clustering method is scored too (``other_method``).
    """
    truth = np.asarray(quanta)[ids]
    k_true = int(len(np.unique(truth)))
    out: dict = {"n_samples": int(len(samples)), "n_scored": int(len(ids)), "k": k_true}
    out["n_unlabelled"] = int((truth < 0).sum())
    if k_true < 2:
        out["skipped"] = f"the selected samples hold {k_true} planted class; nothing to separate"
        return out
    col = f"k{k_true}"
    if clusters is not None and col in clusters.columns:  # the cluster stage already ran this k
        labels = clusters[col].to_numpy()[ids]
        out["qdg_from"] = "cluster stage"
    else:
        labels = cluster_at(affinity, [k_true], cfg)[k_true]
        out["qdg_from"] = "clustered here at k"
    out["qdg"] = scores(truth, labels)
    out["method"] = cfg.method
    if not sp.issparse(affinity):  # the other clustering of the same affinity, for comparison
        other = "agglomerative" if cfg.method == "spectral" else "spectral"
        alt = cluster_at(affinity, [k_true], dataclasses.replace(cfg, method=other))[k_true]
        out["other_method"] = {"method": other, **scores(truth, alt)}
    token = samples["token_id"].to_numpy()[ids]
    out["baseline_answer"] = scores(truth, token)
    prev = np.asarray(prev_tokens)[ids]
    out["baseline_context"] = scores(truth, prev.astype(np.int64) * (int(token.max()) + 1) + token)
    if clusters is not None:
        by_k = {}
        for col in [c for c in clusters.columns if c.startswith("k") and c[1:].isdigit()]:
            pred = clusters[col].to_numpy()[ids]
            by_k[col[1:]] = scores(truth, pred)
        out["cluster_stage"] = by_k
    return out
