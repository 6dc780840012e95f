"""How much each cluster looks like a quantum rather than noise: its coherence, its
separation from the nearest other cluster, and its coherence against random groups.

Every number is a mean of the cosine similarities C between members' gradients, read from
the dense affinity the cluster stage already holds (no gradient is reloaded):

- ``coherence``: the mean cosine over pairs of distinct members;
- ``separation``: coherence minus the mean cosine between this cluster's members and the
  members of its nearest other cluster (the one with the highest such mean), in cosine
  units: > 0 when members are closer to each other than to any other cluster;
- ``null_z``: (coherence - m) / s, where m and s are the mean and standard deviation of the
  coherence of ``cluster.null_draws`` random groups of the same size, drawn without
  replacement from all samples of the affinity with ``cluster.seed``. A cluster that any group
  of its size would match (z near 0) is not a quantum, whatever its contexts look like.

A cluster of one member has no pair: its coherence, separation and null z are null (not
NaN). A kNN affinity holds only the nearest neighbours' cosines, so these columns are null
there too, and ``quality_note`` in metrics/qdg.json says why.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.qdg.clustering import sweep_columns
from pipeline.qdg.similarity import cosines_from_affinity

_COLUMNS = {"cluster": "int32", "coherence": "Float64", "separation": "Float64", "null_z": "Float64"}
NULL_Z_MIN = 3.0  # metrics/qdg.json `above_null`: the share of samples in clusters this far above their null


def _pair_mean(cos: np.ndarray, idx: np.ndarray) -> float:
    """Mean of cos over ordered pairs of distinct rows in idx (len(idx) >= 2)."""
    sub = cos[np.ix_(idx, idx)]
    n = len(idx)
    return float((sub.sum(dtype=np.float64) - np.trace(sub, dtype=np.float64)) / (n * (n - 1)))


def null_coherence(cos: np.ndarray, sizes: np.ndarray, draws: int, seed: int) -> dict[int, tuple[float, float]]:
    """size -> (mean, standard deviation) of the coherence of `draws` random groups of that
    size from the rows of `cos` (seeded; one generator, sizes in increasing order)."""
    rng = np.random.default_rng(seed)
    out = {}
    n_rows = cos.shape[0]
    for size in sorted({int(s) for s in sizes if 2 <= s <= n_rows}):
        values = np.array([_pair_mean(cos, rng.choice(n_rows, size, replace=False)) for _ in range(draws)])
        out[size] = (float(values.mean()), float(values.std(ddof=1)) if draws > 1 else 0.0)
    return out


def cluster_quality(cos: np.ndarray, labels: np.ndarray, null: Mapping[int, tuple[float, float]]) -> pd.DataFrame:
    """One row per cluster 0..k-1 of `labels` (over the rows of `cos`; -1: not clustered):
    cluster, coherence, separation, null_z (nullable floats; see the module docstring).

    cos (N, N): cosine similarities of the clustered rows; null: :func:`null_coherence`.
    """
    labels = np.asarray(labels)
    if not (labels >= 0).any():
        return pd.DataFrame({name: pd.array([], dtype=t) for name, t in _COLUMNS.items()})
    k = int(labels.max()) + 1
    keep = np.flatnonzero(labels >= 0)
    onehot = np.zeros((len(labels), k), dtype=np.float32)  # (N, k)
    onehot[keep, labels[keep]] = 1.0
    sizes = onehot.sum(axis=0).astype(np.int64)  # (k,)
    block = onehot.T @ (cos @ onehot)  # (k, k): sums of cosines between clusters' members
    diag = np.bincount(labels[keep], weights=np.diagonal(cos)[keep], minlength=k)  # self-pairs
    coherence = np.full(k, np.nan)
    pairs = sizes * (sizes - 1)
    multi = pairs > 0
    coherence[multi] = (np.diagonal(block)[multi] - diag[multi]) / pairs[multi]
    cross = block / np.maximum(np.outer(sizes, sizes), 1)  # (k, k) mean cosine between clusters
    np.fill_diagonal(cross, -np.inf)
    nearest = cross.max(axis=1)  # -inf when there is no other cluster
    separation = np.where(multi & np.isfinite(nearest), coherence - nearest, np.nan)
    z = np.full(k, np.nan)
    for c in np.flatnonzero(multi):
        m, s = null.get(int(sizes[c]), (np.nan, np.nan))
        if s > 0:
            z[c] = (coherence[c] - m) / s
    frame = pd.DataFrame({"cluster": np.arange(k, dtype=np.int32)})
    for name, values in (("coherence", coherence), ("separation", separation), ("null_z", z)):
        frame[name] = pd.array([float(v) if np.isfinite(v) else None for v in values], dtype="Float64")
    return frame


def sweep_quality(cos: np.ndarray, sweep: Mapping[int, np.ndarray], draws: int, seed: int) -> pd.DataFrame:
    """:func:`cluster_quality` for every clustering of a sweep (k -> labels over the rows of
    `cos`), with one null table for all of them: k, cluster, coherence, separation, null_z."""
    sizes = np.concatenate([np.bincount(lab[lab >= 0]) for lab in sweep.values()]) if sweep else np.array([])
    null = null_coherence(cos, sizes, draws, seed)
    frames = [cluster_quality(cos, lab, null).assign(k=np.int32(k)) for k, lab in sweep.items()]
    if not frames:
        return pd.DataFrame({name: pd.array([], dtype=t) for name, t in {**_COLUMNS, "k": "int32"}.items()})
    return pd.concat(frames, ignore_index=True)


def share_above_null(quality: pd.DataFrame, labels: np.ndarray, z_min: float = NULL_Z_MIN) -> float:
    """The fraction of clustered samples whose cluster has null_z >= z_min."""
    labels = np.asarray(labels)
    keep = labels[labels >= 0]
    if keep.size == 0:
        return 0.0
    good = set(quality.loc[quality["null_z"].fillna(-np.inf) >= z_min, "cluster"].astype(int))
    return float(np.isin(keep, list(good)).mean())


def assess(affinity, kind: str, clusters: pd.DataFrame, ids: np.ndarray, draws: int,
           seed: int) -> tuple[Optional[pd.DataFrame], dict]:
    """The cluster stage's quality: (:func:`sweep_quality` of every clustering of the sweep,
    or None on a kNN affinity; the numbers for metrics/qdg.json).

    affinity: the similarity stage's, over the samples `ids`; kind: its ``similarity.affinity``;
    clusters: the clusters table (row i = sample i). ``above_null`` is the share of the main
    clustering's samples in clusters with null_z >= NULL_Z_MIN.
    """
    if sp.issparse(affinity):
        return None, {"quality_note": "a kNN affinity holds only neighbours' cosines: coherence, separation and "
                                      "null_z are null (similarity.mode: dense computes them)"}
    cos = cosines_from_affinity(affinity, kind)  # (used, used)
    sweep = {k: clusters[col].to_numpy()[ids] for k, col in sweep_columns(clusters).items()}
    table = sweep_quality(cos, sweep, draws, seed)
    main = clusters["cluster"].to_numpy()[ids]
    main_k = next((k for k, lab in sweep.items() if np.array_equal(lab, main)), None)
    # Leiden's own partition is not one of the sweep's cuts: it gets a table of its own
    main_q = table[table["k"] == main_k] if main_k is not None else sweep_quality(cos, {-1: main}, draws, seed)
    return table, {"above_null": round(share_above_null(main_q, main), 4), "above_null_z_min": NULL_Z_MIN}
