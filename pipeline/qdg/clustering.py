"""Clustering of the gradient affinity: each cluster is a candidate quantum.

The default (``method: knn_average``) is average linkage on the kNN graph, cut where the
data say, with unassigned samples labelled -1 (pipeline/qdg/graph_linkage.py);
``agglomerative`` is average linkage on the dense affinity with a minimum cluster size;
``spectral`` is the paper's, ``leiden`` the kNN-graph communities (README "Which clustering").

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

Agglomerative clustering (``method: agglomerative``, dense affinities): average linkage on
the distance 1 - affinity (for the angular affinity that is the angle arccos(C)/pi, a
metric), one tree for the whole sweep, cut at every k. Why: spectral clustering minimises a
normalised cut, which favours clusters of similar volume. Quanta are Zipf-sized by hypothesis, and at k = the number of quanta present it
splits the largest ones (whose gradients vary a little along position and context) before
it isolates the small ones. On planted key-pair quanta whose gradients do separate (mean
cosine 0.993 within a quantum, 0.255 between), spectral clustering at that k scored ARI
0.150 and average linkage 0.9999, on the same affinity (bench/bench_qdg_language.py,
bench/RESULTS.md). It is deterministic, so its stability is measured on seeded subsamples
clustered alone (pipeline/qdg/stability.py).

Bad input: fewer usable samples than clusters (k >= N) is an error that names both.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from pipeline.core.config import ClusterConfig
from pipeline.core.errors import QuantaError
from pipeline.qdg import graph_linkage
from pipeline.qdg.graph_linkage import n_big_by_cut

METHODS = ("knn_average", "agglomerative", "leiden", "spectral")  # cluster.method; the first is the default


def check_k(ks: Sequence[int], n: int) -> None:
    """k must be < the number of samples clustered (spectral clustering needs k < N).

    params.yaml already has every k below select.n_samples (config.check_consistent), so
    fewer samples than that reached the clustering: too few tokens passed select.max_loss
    (the select stage warns and takes them all), or some gradients were bad. Raising
    select.n_samples would not help; letting more tokens qualify would.
    """
    big = [k for k in ks if k >= n]
    if big:
        raise QuantaError(
            f"cluster.n_clusters {big} needs more samples than the {n} usable ones (k must be < N); "
            "lower cluster.n_clusters, or let more tokens qualify: raise select.max_loss or use a stronger select.model"
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

    Why not sklearn's arpack path for dense input: shift-invert Lanczos for hundreds of
    eigenvectors of a dense Laplacian is several times slower than one dense
    tridiagonalisation (``eigh`` with ``subset_by_index``), which is exact (bench/RESULTS.md
    has the numbers). It runs in float32 (degrees in float64): the reduction to tridiagonal
    form is memory-bound, single precision makes it faster, and the leading eigenvectors
    equal float64's to 1 - |cos| < 1e-7. Same graph as sklearn's (the diagonal is ignored), same scaling
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


def _sklearn_assigner(how: str):
    """sklearn's ``cluster_qr`` or ``discretize``: the label assignments SpectralClustering uses.

    sklearn exposes them only inside SpectralClustering, which would recompute the
    embedding for every k of the sweep; so they are imported from its private module, and
    a sklearn that moves them gets a one-line error instead of a traceback.
    """
    try:
        from sklearn.cluster import _spectral

        return getattr(_spectral, how)
    except (ImportError, AttributeError):
        import sklearn

        raise QuantaError(
            f"cluster.assign_labels {how!r} needs sklearn.cluster._spectral.{how}, which sklearn {sklearn.__version__} "
            "does not have; use assign_labels: kmeans"
        ) from None


def assign(maps: np.ndarray, k: int, how: str, n_init: int, seed: int) -> np.ndarray:
    """Labels (N,) int32 from the leading k columns of the spectral embedding."""
    x = np.ascontiguousarray(maps[:, :k])
    if how == "kmeans":
        from sklearn.cluster import KMeans

        labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x).labels_
    elif how in ("cluster_qr", "discretize"):
        fn = _sklearn_assigner(how)
        labels = fn(x) if how == "cluster_qr" else fn(x, random_state=seed)
    else:
        raise QuantaError(f"cluster.assign_labels must be kmeans, discretize or cluster_qr, got {how!r}")
    return canonical(labels)


def canonical(labels: np.ndarray) -> np.ndarray:
    """Rename clusters 0, 1, ... by decreasing size (ties: first appearance), int32; -1
    (unassigned) stays -1.

    Cluster ids are arbitrary; naming them by size makes outputs stable across runs that
    agree up to renaming, and cluster 0 the largest.
    """
    labels = np.asarray(labels)
    out = np.full(labels.shape, -1, dtype=np.int32)
    assigned = labels >= 0
    uniq, first, counts = np.unique(labels[assigned], return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    rename = np.empty(len(uniq), dtype=np.int32)
    rename[order] = np.arange(len(uniq), dtype=np.int32)
    out[assigned] = rename[np.searchsorted(uniq, labels[assigned])]
    return out


def cluster_sizes(labels: np.ndarray) -> np.ndarray:
    """Sizes (k,) of clusters 0..k-1 of a labelling; unassigned samples (-1) are no cluster."""
    labels = np.asarray(labels)
    return np.bincount(labels[labels >= 0])


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


def agglomerative(affinity, ks: Sequence[int], min_size: int = 1) -> dict[int, np.ndarray]:
    """{k: labels (N,) int32}: average linkage on 1 - affinity, one tree cut for every k.

    scipy's hierarchy, not sklearn's AgglomerativeClustering: sklearn refits per k, scipy
    builds the tree once (nearest-neighbour chain, O(N^2) time) and cuts it for each k of
    the sweep. The condensed distance matrix takes N^2 / 2 float64 (400 MB at N = 10,000).

    With `min_size` > 1 a cut counts only clusters of at least that many samples: the
    tree is cut at the fewest clusters that hold k of that size, those k are the
    clusters, and every sample of a smaller one joins the cluster it has the highest mean
    affinity to. Why: on real gradients average linkage keeps outliers as singletons until
    the last merges, so a plain cut at k = 20 is one cluster of 85% of the samples beside
    outliers (SmolLM2-135M, README "Which clustering"); counting only clusters of
    `min_size` cuts below the outliers. Where no cut holds k such clusters, the cut with
    the most of them is taken and its k largest clusters are kept.
    """
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    if sp.issparse(affinity):
        raise QuantaError(
            "cluster.method 'agglomerative' needs a dense affinity; set similarity.mode: dense "
            "(N <= similarity.dense_max) or use cluster.method: knn_average (average linkage on the sparse kNN graph)"
        )
    a = np.asarray(affinity)
    check_k(ks, a.shape[0])
    dist = 1.0 - a.astype(np.float64)
    np.fill_diagonal(dist, 0.0)
    np.clip(dist, 0.0, None, out=dist)  # rounding can leave -1e-16 where C = 1
    tree = linkage(squareform(dist, checks=False), method="average")
    del dist
    big = n_big_by_cut(tree, min_size) if min_size > 1 else None
    return {k: _cut(tree, a, k, big) for k in ks}


def _cut(tree: np.ndarray, affinity: np.ndarray, k: int, big: Optional[np.ndarray]) -> np.ndarray:
    """Labels (N,) of the tree cut into k clusters; with `big` (:func:`pipeline.qdg.graph_linkage.n_big_by_cut`), k of
    at least its min_size (see :func:`agglomerative`)."""
    from scipy.cluster.hierarchy import fcluster

    if big is None:
        return canonical(fcluster(tree, t=k, criterion="maxclust"))
    reach = np.flatnonzero(big >= k)
    m = int(reach[0]) if len(reach) else int(np.argmax(big))
    raw = fcluster(tree, t=m, criterion="maxclust") - 1
    sizes = np.bincount(raw)
    keep = np.argsort(-sizes, kind="stable")[:k]
    out = np.full(len(raw), -1, dtype=np.int64)
    kept = np.isin(raw, keep)
    out[kept] = np.searchsorted(np.sort(keep), raw[kept])
    loose = np.flatnonzero(out < 0)
    if len(loose):
        members = sp.csr_matrix((np.ones(int(kept.sum())), (np.flatnonzero(kept), out[kept])), shape=(len(raw), k))
        mean = (affinity[loose] @ members) / np.asarray(members.sum(axis=0)).ravel()
        out[loose] = np.argmax(np.asarray(mean), axis=1)
    return canonical(out)


def knn_graph(affinity, n_neighbors: int) -> sp.csr_matrix:
    """The symmetric kNN graph (N, N) of an affinity, weighted by the affinity.

    A sparse affinity (similarity.mode: knn) is already such a graph and is returned as it
    is (symmetrised). A dense one keeps each row's n_neighbors largest off-diagonal entries,
    and an edge is kept when either end chose it.
    """
    if sp.issparse(affinity):
        w = sp.csr_matrix(affinity, dtype=np.float64)
    else:
        from pipeline.qdg.similarity import dense_top_k

        n = affinity.shape[0]
        k = min(n_neighbors, n - 1)
        rows, vals = dense_top_k(affinity, k, dtype=np.float64)
        w = sp.csr_matrix((vals.ravel(), rows.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))
    w = w.maximum(w.T).tocsr()
    w.setdiag(0)
    w.eliminate_zeros()
    return w


def _leiden_labels(graph, weights: np.ndarray, resolution: float, seed: int) -> np.ndarray:
    import leidenalg

    part = leidenalg.find_partition(
        graph, leidenalg.RBConfigurationVertexPartition, weights=weights,
        resolution_parameter=resolution, n_iterations=2, seed=seed,
    )
    return np.asarray(part.membership, dtype=np.int64)


def _igraph(w: sp.csr_matrix):
    import igraph

    up = sp.triu(w, k=1).tocoo()
    return igraph.Graph(n=w.shape[0], edges=np.column_stack([up.row, up.col]).tolist(), directed=False), up.data


def leiden_communities(w: sp.csr_matrix, resolution: float, seed: int, at_least: int = 0, steps: int = 6) -> np.ndarray:
    """Leiden communities (modularity at resolution γ, seeded) of the graph `w`, (N,) int64.

    With `at_least` > 0, γ is raised from `resolution` (doubling, then a bisection on log γ
    of `steps` halvings) to the smallest value found that gives at least that many
    communities: the least splitting that reaches them keeps each as coherent as it can be.
    """
    graph, weights = _igraph(w)
    found = {resolution: _leiden_labels(graph, weights, resolution, seed)}
    count = lambda r: len(np.unique(found[r]))  # noqa: E731
    if count(resolution) >= at_least:
        return found[resolution]
    lo, hi = resolution, resolution
    while count(hi) < at_least and hi < resolution * 2**20:
        lo, hi = hi, hi * 2
        found[hi] = _leiden_labels(graph, weights, hi, seed)
    if count(hi) < at_least:  # every sample its own community is as far as it goes
        return found[hi]
    for _ in range(steps):
        mid = float(np.sqrt(lo * hi))
        found[mid] = _leiden_labels(graph, weights, mid, seed)
        lo, hi = (lo, mid) if count(mid) >= at_least else (mid, hi)
    return found[hi]


def group_affinity(affinity, w: sp.csr_matrix, communities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(total affinity between every two communities (m, m), community sizes (m,)).

    From the dense affinity when there is one (every pair of samples counts), else from
    the kNN graph `w` (a missing edge counts 0).
    """
    m = int(communities.max()) + 1
    n = len(communities)
    a = sp.csr_matrix((np.ones(n), (np.arange(n), communities)), shape=(n, m))
    if sp.issparse(affinity):
        between = np.asarray((a.T @ w @ a).todense(), dtype=np.float64)
    else:
        between = np.asarray(a.T @ (a.T @ np.asarray(affinity, dtype=np.float64)).T, dtype=np.float64)
    return between, np.bincount(communities, minlength=m).astype(np.float64)


def merge_communities(between: np.ndarray, size: np.ndarray, communities: np.ndarray, k: int) -> np.ndarray:
    """Labels (N,) after average linkage over the communities, from their count m down to k.

    The similarity of two groups is the mean affinity over all their pairs (between / the
    product of their sizes); a merge updates it as UPGMA does, weighting by size. Written
    here rather than with scipy's linkage, which starts from singletons and cannot weigh
    the communities by their sizes. O(m^2) per merge.
    """
    m = len(size)
    sim = between / np.outer(size, size)
    np.fill_diagonal(sim, -np.inf)
    size = size.copy()
    parent = np.arange(m)
    for _ in range(m - k):
        i, j = np.unravel_index(np.argmax(sim), sim.shape)
        i, j = min(i, j), max(i, j)
        sim[i] = (size[i] * sim[i] + size[j] * sim[j]) / (size[i] + size[j])
        sim[:, i] = sim[i]
        sim[i, i] = -np.inf
        sim[j, :] = -np.inf
        sim[:, j] = -np.inf
        size[i] += size[j]
        parent[parent == j] = i
    return canonical(parent[communities])


def leiden_natural(affinity, cfg: ClusterConfig, seed: Optional[int] = None) -> np.ndarray:
    """Leiden's own partition of the kNN graph at cfg.resolution: the number of clusters is the data's."""
    seed = cfg.seed if seed is None else seed
    return canonical(leiden_communities(knn_graph(affinity, cfg.n_neighbors), cfg.resolution, seed))


def leiden(affinity, ks: Sequence[int], cfg: ClusterConfig, seed: Optional[int] = None) -> dict[int, np.ndarray]:
    """{k: labels (N,) int32}: Leiden communities of the kNN graph, merged to exactly k.

    Leiden (modularity at cfg.resolution, seeded) partitions the kNN graph into m
    communities, its own choice of number. For k < m, average linkage over the
    communities merges them down to k; for k > m, γ is raised until Leiden gives at
    least k communities, which are then merged down to k. Why this, and not spectral or
    average linkage alone: on Zipf-sized quanta a partition into parts of balanced weight
    (the normalised cut; modularity at a high γ) splits the largest quanta, while
    Leiden at its own resolution keeps them whole; on real gradients, average linkage
    over single samples leaves outliers as singletons and merges the bulk into one
    cluster, while Leiden places every outlier in its neighbours' community.
    """
    n = affinity.shape[0]
    check_k(ks, n)
    seed = cfg.seed if seed is None else seed
    w = knn_graph(affinity, cfg.n_neighbors)
    out = {}
    for k in ks:
        comm = leiden_communities(w, cfg.resolution, seed, at_least=k)
        between, size = group_affinity(affinity, w, comm)
        out[k] = merge_communities(between, size, comm, k) if len(size) > k else canonical(comm)
    return out


def knn_average_tree(affinity, n_neighbors: int, progress: bool = False) -> np.ndarray:
    """The average-linkage tree (scipy's linkage format) of the kNN affinity: a sparse one
    as it is, a dense one reduced to the kNN graph that similarity.mode: knn would build."""
    from pipeline.qdg.similarity import knn_from_dense

    graph = affinity if sp.issparse(affinity) else knn_from_dense(affinity, min(n_neighbors, affinity.shape[0] - 1))
    return graph_linkage.average_linkage_tree(graph, progress=progress)


def data_cut(tree: np.ndarray, min_size: int, max_outlier_score: float = 1.0) -> np.ndarray:
    """Labels (N,) int32 of the excess-of-mass cut of a tree (-1: unassigned), named by size."""
    labels = canonical(graph_linkage.excess_of_mass(tree, min_size, max_outlier_score))
    if labels.max() < 0:
        raise QuantaError(f"the data-chosen cut found no cluster of cluster.min_cluster_size = {min_size} samples; "
                          "lower cluster.min_cluster_size or set cluster.cut: k")
    return labels


def knn_average(affinity, ks: Sequence[int], cfg: ClusterConfig, main_from_data: bool = False,
                tree: Optional[np.ndarray] = None) -> dict[int, np.ndarray]:
    """{k: labels (N,) int32, -1 unassigned}: average linkage on the kNN graph, one tree cut at every k.

    A cut at k keeps k clusters of at least cfg.min_cluster_size (:func:`graph_linkage.cut_at_k`);
    with `main_from_data` the first k of `ks` holds the data-chosen cut instead (:func:`data_cut`),
    which is how the stability reruns ask for the main clustering of a ``cut: data`` run.
    """
    check_k(ks, affinity.shape[0])
    if tree is None:
        tree = knn_average_tree(affinity, cfg.n_neighbors)
    out = {k: canonical(graph_linkage.cut_at_k(tree, k, cfg.min_cluster_size)) for k in ks}
    if main_from_data:
        out[ks[0]] = data_cut(tree, cfg.min_cluster_size, cfg.max_outlier_score)
    return out


def cluster_at(affinity, ks: Sequence[int], cfg: ClusterConfig, seed: Optional[int] = None) -> dict[int, np.ndarray]:
    """{k: labels} by cfg.method: :func:`knn_average`, :func:`leiden`, :func:`spectral` or
    :func:`agglomerative`. knn_average with ``cut: data`` puts the data's cut at the first k."""
    if cfg.method == "knn_average":
        return knn_average(affinity, ks, cfg, main_from_data=cfg.cut == "data")
    if cfg.method == "agglomerative":
        return agglomerative(affinity, ks, cfg.min_cluster_size)
    if cfg.method == "leiden":
        return leiden(affinity, ks, cfg, seed=seed)
    if cfg.method != "spectral":
        raise QuantaError(f"cluster.method must be one of {list(METHODS)}, got {cfg.method!r}")
    return spectral(affinity, ks, cfg, seed=seed)


def seed_free_embedding(affinity, cfg: ClusterConfig) -> bool:
    """Whether the embedding does not depend on the seed: the exact LAPACK path (dense, arpack).

    Then the stability rerun can reuse it: recomputing would give the same matrix, bit for
    bit, at the cost of another O(N^3) eigendecomposition (about a minute at N = 10,000).
    """
    return cfg.eigen_solver == "arpack" and not sp.issparse(affinity)


# --------------------------------------------------------------------------- the clusters table


def sweep_column(k: int) -> str:
    """The clusters table's column that holds the clustering at `k`: ``k<k>``."""
    return f"k{k}"


def sweep_columns(clusters: Any) -> dict[int, str]:
    """k -> column name of every ``k<k>`` column of a clusters table (a pandas DataFrame),
    in column order: the main k first, then the sweep as cluster.n_clusters lists it."""
    return {int(c[1:]): c for c in clusters.columns if isinstance(c, str) and c[:1] == "k" and c[1:].isdigit()}


def read_clusters(path: str | Path) -> pd.DataFrame:
    """``clusters.parquet`` as a DataFrame: sample, cluster (-1: not clustered), one
    ``k<k>`` column per k of the sweep (see :func:`sweep_columns`)."""
    return pd.read_parquet(path)


def read_summary(path: str | Path) -> pd.DataFrame:
    """``cluster_summary.parquet`` as a DataFrame: one row per (k, cluster) (see :func:`summarise`)."""
    return pd.read_parquet(path)


def run_clustering(affinity, ids: np.ndarray, n_samples: int, cfg: ClusterConfig,
                   progress: bool = False) -> tuple[pa.Table, dict]:
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
    unassigned_from = graph_components = None
    if cfg.method == "knn_average":
        tree = knn_average_tree(affinity, cfg.n_neighbors, progress=progress)
        if cfg.cut == "data":
            natural = data_cut(tree, cfg.min_cluster_size, cfg.max_outlier_score)
            main = int(natural.max()) + 1  # the data's number of clusters
            labels = knn_average(affinity, [k for k in ks if k != main], cfg, tree=tree)
            labels[main] = natural
            ks = [main] + [k for k in ks if k != main]
            unassigned_from = ("in no cluster of cluster.min_cluster_size of the excess-of-mass cut, or an outlier of "
                               "its cluster (GLOSH score above cluster.max_outlier_score)")
        else:
            labels = knn_average(affinity, ks, cfg, tree=tree)
            unassigned_from = "outside the k largest clusters of cluster.min_cluster_size"
        t1 = time.perf_counter()
        stability, how = None, "subsample"  # deterministic: subsamples (pipeline/qdg/stability.py)
        # components of the kNN graph: each joined to the rest only at "no edge" (the method's limit:
        # a group of > n_neighbors mutual nearest neighbours is a component of its own)
        graph_components = 1 + int((tree[:, 2] >= graph_linkage.NO_EDGE_HEIGHT).sum())
    elif cfg.method == "leiden":
        natural = leiden_natural(affinity, cfg)
        main = int(natural.max()) + 1  # the main clustering is Leiden's own; its k is the data's
        labels = leiden(affinity, [k for k in ks if k != main], cfg)
        labels[main] = natural
        ks = [main] + [k for k in ks if k != main]
        t1 = time.perf_counter()
        stability = float(adjusted_rand_score(natural, leiden_natural(affinity, cfg, seed=cfg.stability_seed)))
        how = "seeds"
    elif cfg.method == "agglomerative":
        labels = agglomerative(affinity, ks, cfg.min_cluster_size)
        t1 = time.perf_counter()
        # No seed enters the tree: its stability is that of seeded subsamples (pipeline/qdg/stability.py)
        stability, how = None, "subsample"
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
    for k in [main] + sorted(set(ks), key=ks.index):
        full = np.full(n_samples, -1, dtype=np.int32)
        full[ids] = labels[k]
        cols["cluster" if "cluster" not in cols else sweep_column(k)] = pa.array(full)
    sizes = cluster_sizes(labels[main])
    k_from = {"leiden": "Leiden's own partition at cluster.resolution"}.get(cfg.method, "cluster.n_clusters[0]")
    if cfg.method == "knn_average" and cfg.cut == "data":
        k_from = "the excess-of-mass cut of the kNN average-linkage tree (cluster.cut: data)"
    metrics = {
        "n_samples": int(n_samples),
        "n_clustered": int(len(ids)),
        "k": int(main),
        "k_from": k_from,
        "sweep": ks,
        "method": cfg.method,
        "largest_cluster": int(sizes.max()),
        "median_cluster": float(np.median(sizes)),
        "singletons": int((sizes == 1).sum()),
        "seconds": round(t1 - t0, 2),
    }
    if graph_components is not None:
        metrics["graph_components"] = graph_components
    if unassigned_from is not None:
        n_un = int((labels[main] < 0).sum())
        metrics.update(n_unassigned=n_un, unassigned_fraction=round(n_un / max(len(ids), 1), 4),
                       unassigned_are=unassigned_from)
    # a min_cluster_size cut can make fewer clusters than asked: say how many each k made
    made = {k: int(len(cluster_sizes(labels[k]))) for k in ks}
    metrics["clusters_made"] = {str(k): m for k, m in made.items()}
    short = [f"k = {k} made {m}" for k, m in made.items() if m < k]
    if short:
        warnings.warn(f"cluster: fewer clusters than asked ({', '.join(short)}): too few samples form groups of "
                      f"cluster.min_cluster_size = {cfg.min_cluster_size}; lower it or cluster.n_clusters", stacklevel=2)
    if how == "seeds":
        metrics.update(stability_ari=round(stability, 4), stability_ari_is="ARI between two seeds",
                       stability_seeds=[cfg.seed, cfg.stability_seed])
    return pa.table(cols), metrics


SUMMARY_ASSESSMENT = [  # the assessment's columns in the summary (pipeline/qdg/quality.py.assess)
    ("coherence", pa.float32()), ("separation", pa.float32()), ("null_z", pa.float32()), ("quality", pa.float32()),
    ("stability", pa.float32()), ("projection_stability", pa.float32()), ("label", pa.string()), ("label_kind", pa.string()),
    ("label_precision", pa.float32()), ("label_recall", pa.float32()), ("label_f1", pa.float32()),
    ("ngram_f1", pa.float32()), ("label_context", pa.list_(pa.string())), ("label_answer", pa.int32()),
    ("label_corpus_share", pa.float64()),
]


def summarise(
    clusters: pd.DataFrame,
    samples: pd.DataFrame,
    token_str: dict[int, str],
    cfg: ClusterConfig,
    assessment: Optional[pd.DataFrame] = None,
) -> pa.Table:
    """One row per (k, cluster): size, top target tokens with counts, mean loss, example
    samples, then the assessment's columns (:data:`SUMMARY_ASSESSMENT`), rows ordered by k
    as the sweep lists it, then cluster.

    clusters: the clusters table; samples: sample, token_id, loss; token_str: token id ->
    its text; assessment: :func:`pipeline.qdg.quality.assess`'s table (k, cluster, ...), or
    None (those columns null). ``label_context`` holds the label rule's preceding slots as
    strings: token ids, or class names for a class rule. Examples are the first
    cfg.n_examples samples of a random (seeded) order.
    """
    merged = clusters.merge(samples[["sample", "token_id", "loss"]], on="sample", how="left")
    rng = np.random.default_rng(cfg.seed)
    merged["_order"] = rng.permutation(len(merged))
    rows = []
    for k, col in sweep_columns(clusters).items():
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
    extra = {}
    if assessment is not None:
        extra = {(int(r["k"]), int(r["cluster"])): r for r in assessment.to_dict("records")}

    def value(v: Any, name: str) -> Any:
        if v is None or (np.isscalar(v) and pd.isna(v)):
            return None
        if name == "label_context":
            return [str(x) for x in v]
        return v

    for row in rows:
        got = extra.get((row["k"], row["cluster"]), {})
        for name, _ in SUMMARY_ASSESSMENT:
            row[name] = value(got.get(name), name)
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
            *SUMMARY_ASSESSMENT,
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


def scored(truth: np.ndarray, labels: np.ndarray) -> dict:
    """A clustering against the truth: :func:`scores` with the unassigned samples (-1) as one
    more class, the number of clusters, the largest one's share and, where samples are left
    unassigned, their fraction and the scores over the assigned samples alone."""
    labels = np.asarray(labels)
    sizes = cluster_sizes(labels)
    out = {**scores(truth, labels), "k": int(len(sizes)),
           "largest_cluster_share": round(float(sizes.max() / len(labels)), 4) if len(sizes) else 0.0}
    assigned = labels >= 0
    if not assigned.all():
        out["unassigned_fraction"] = round(float(1 - assigned.mean()), 4)
        out["assigned"] = scores(np.asarray(truth)[assigned], labels[assigned]) if assigned.sum() > 1 else None
    return out


# The targets on the default planted suite (README "The embedded planted-quanta suite"):
# QDG's main clustering recovers the quanta; the answer token alone does not.
TARGET_QDG_ARI = 0.9
TARGET_BASELINE_ARI = 0.3


def ngram_partitions(token: np.ndarray, context: np.ndarray) -> dict[str, np.ndarray]:
    """The partitions of samples that need no gradients, one label per sample (int64):
    by answer token, by previous token, by (previous, answer) and by (previous two, answer).

    token (N,): each sample's target token id; context (N, 2): the two tokens before it,
    oldest first, -1 before a document's start (``TokenTable.preceding(..., 2)``). A
    clustering that matches one of these is an n-gram class, whatever its gradients say.
    """
    token = np.asarray(token, dtype=np.int64)
    ctx = np.asarray(context, dtype=np.int64)
    width = int(max(token.max(), ctx.max())) + 2  # ids and -1 (+1) fit below it: keys do not collide
    return {
        "answer": token,
        "previous": ctx[:, 1],
        "previous_answer": (ctx[:, 1] + 1) * width + token,
        "previous2_answer": ((ctx[:, 0] + 1) * width + ctx[:, 1] + 1) * width + token,
    }


def ngram_baselines(labels: np.ndarray, token: np.ndarray, context: np.ndarray) -> dict:
    """ARI and NMI of a clustering against each of :func:`ngram_partitions`, over the
    clustered samples (label >= 0): how much of the clustering an n-gram count reproduces.

    labels, token (N,); context (N, 2). A value near 1 says the clusters are n-gram
    classes; near 0, that no such count recovers them.
    """
    labels = np.asarray(labels)
    keep = labels >= 0
    if keep.sum() < 2:
        return {"skipped": f"{int(keep.sum())} clustered sample(s): nothing to compare"}
    grams = ngram_partitions(np.asarray(token)[keep], np.asarray(context)[keep])
    return {name: scores(part, labels[keep]) for name, part in grams.items()}


def validate_planted(affinity, ids: np.ndarray, samples: pd.DataFrame, quanta: np.ndarray, tokens: Any,
                     clusters: Optional[pd.DataFrame], cfg: ClusterConfig) -> dict:
    """metrics/validate.json on a planted suite: :func:`validate` with each target's two
    preceding tokens from `tokens` (a TokenTable), and the pass/fail against the targets."""
    context = tokens.preceding(samples["doc_id"].to_numpy(np.int64), samples["pos"].to_numpy(np.int64), 2)
    out = {"planted": True, **validate(affinity, ids, samples, quanta, context, clusters, cfg)}
    if "qdg" in out:
        out["targets"] = {"qdg_ari_min": TARGET_QDG_ARI, "baseline_answer_ari_max": TARGET_BASELINE_ARI}
        out["pass"] = bool(out["qdg"]["ari"] >= TARGET_QDG_ARI and out["baseline_answer"]["ari"] <= TARGET_BASELINE_ARI)
    return out


def validate(
    affinity,
    ids: np.ndarray,
    samples: pd.DataFrame,
    quanta: np.ndarray,
    context: np.ndarray,
    clusters: Optional[pd.DataFrame],
    cfg: ClusterConfig,
) -> dict:
    """QDG clusters against planted quanta, beside every other clustering method and the
    baselines that need no gradients.

    quanta (N,): the planted quantum of each sample (-1: none, scored as one more class);
    context (N, 2): the two tokens before each target. ``qdg`` scores the cluster stage's
    main clustering (cfg.method at its main k; unassigned samples as one more class, and
    apart: :func:`scored`). ``methods`` scores every method of :data:`METHODS` on the same
    affinity: the kNN average linkage's data-chosen cut (and its cut at the k present),
    Leiden's own partition, and spectral and dense average linkage at k = the number of
    classes present (dense average linkage on a dense affinity only). Baselines: the answer
    token; (previous token, answer); and, for information, the oracle (the two tokens
    before the answer, answer), which names the cue pair of a planted instance. ``cluster_stage`` scores every k of the stage's sweep.
    """
    truth = np.asarray(quanta)[ids]
    k_true = int(len(np.unique(truth)))
    out: dict = {"n_samples": int(len(samples)), "n_scored": int(len(ids)), "k_present": k_true}
    out["n_unlabelled"] = int((truth < 0).sum())
    if k_true < 2:
        out["skipped"] = f"the selected samples hold {k_true} planted class; nothing to separate"
        return out
    methods = {}
    for method in METHODS:
        if method == "agglomerative" and sp.issparse(affinity):
            continue
        c = dataclasses.replace(cfg, method=method)
        if method == "leiden":
            labels = leiden_natural(affinity, c)
        elif method == "knn_average":
            tree = knn_average_tree(affinity, c.n_neighbors)
            methods["knn_average_at_k_present"] = scored(truth, knn_average(affinity, [k_true], c, tree=tree)[k_true])
            labels = data_cut(tree, c.min_cluster_size, c.max_outlier_score)
        else:
            labels = cluster_at(affinity, [k_true], c)[k_true]
        methods[method] = scored(truth, labels)
    out["methods"] = methods
    out["method"] = cfg.method
    if clusters is not None and "cluster" in clusters.columns:
        out["qdg"] = {k: v for k, v in scored(truth, clusters["cluster"].to_numpy()[ids]).items()
                      if k != "largest_cluster_share"}
        out["qdg_from"] = "cluster stage (main clustering)"
    else:
        out["qdg"] = {k: v for k, v in methods[cfg.method].items() if k != "largest_cluster_share"}
        out["qdg_from"] = "clustered here"
    grams = ngram_partitions(samples["token_id"].to_numpy()[ids], np.asarray(context)[ids])
    out["baseline_answer"] = scores(truth, grams["answer"])
    out["baseline_context"] = scores(truth, grams["previous_answer"])
    out["baseline_oracle_cue_pair"] = scores(truth, grams["previous2_answer"])
    if clusters is not None:
        by_k = {}
        for k, col in sweep_columns(clusters).items():
            pred = clusters[col].to_numpy()[ids]
            by_k[str(k)] = scores(truth, pred)
        out["cluster_stage"] = by_k
    return out
