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
  of its size would match (z near 0) is not a quantum, whatever its contexts look like;
- ``quality``: (coherence - m) / (1 - m), the cluster's coherence on a scale from a random
  group of its size (0) to identical gradients (1): the score the summary and the report
  rank clusters by.

Why quality is the null-relative coherence and not a product with stability or separation:
coherence is what says the members share one mechanism. On the planted suite it separates
clusters that hold one quantum (>= 90% of members) from mixed ones (< 60%) perfectly
(ROC AUC 1.0 pooled over k = 25, 50, 100, on seeds 0, 1 and 2), while stability (0.38-0.45)
and separation (0.40-0.49) do not: a quantum split in two gives two pure halves that are unstable and close to
each other, because the cut between them is arbitrary, not because either half is mixed.
Stability and separation say whether the *cut* is right; they stay beside quality as
columns of their own (docs/cluster-quality.md has the measured table).

A cluster of one member has no pair: its coherence, separation and null z are null (not
NaN). A kNN affinity holds only the nearest neighbours' cosines, so these columns are null
there too, and ``quality_note`` in metrics/qdg.json says why.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.core.config import ClusterConfig
from pipeline.qdg import labels, stability
from pipeline.qdg.clustering import sweep_columns
from pipeline.qdg.similarity import cosines_from_affinity

_COLUMNS = {"cluster": "int32", "coherence": "Float64", "separation": "Float64", "null_z": "Float64",
            "quality": "Float64"}
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
    cluster, coherence, separation, null_z, quality (nullable floats; see the module docstring).

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
    score = np.full(k, np.nan)
    for c in np.flatnonzero(multi):
        m, s = null.get(int(sizes[c]), (np.nan, np.nan))
        if s > 0:
            z[c] = (coherence[c] - m) / s
        if m < 1:
            score[c] = (coherence[c] - m) / (1 - m)
    frame = pd.DataFrame({"cluster": np.arange(k, dtype=np.int32)})
    for name, values in (("coherence", coherence), ("separation", separation), ("null_z", z), ("quality", score)):
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


def share_in_clusters(table: pd.DataFrame, labels: np.ndarray, column: str, minimum: float) -> float:
    """The fraction of clustered samples (label >= 0) whose cluster has table[column] >=
    minimum (a null value counts as below): ``above_null`` with null_z, ``explained_by_ngram``
    with ngram_f1."""
    labels = np.asarray(labels)
    keep = labels[labels >= 0]
    if keep.size == 0:
        return 0.0
    good = set(table.loc[table[column].astype(float).fillna(-np.inf) >= minimum, "cluster"].astype(int))
    return float(np.isin(keep, list(good)).mean())


def assess(affinity, kind: str, clusters: pd.DataFrame, ids: np.ndarray, cfg: ClusterConfig, *,
           answer: np.ndarray, prev: np.ndarray, token_str: Mapping[int, str],
           projections: Sequence = (), corpus: Optional[tuple[np.ndarray, np.ndarray]] = None
           ) -> tuple[pd.DataFrame, dict]:
    """The cluster stage's assessment of every clustering of the sweep: one row per (k,
    cluster) with coherence, separation, null_z, quality (this module), stability and
    projection_stability (:mod:`pipeline.qdg.stability`) and the label columns (:mod:`pipeline.qdg.labels`);
    and the numbers for metrics/qdg.json.

    affinity: the similarity stage's, over the samples `ids`; kind: its
    ``similarity.affinity``; clusters: the clusters table (row i = sample i); answer (N,)
    and prev (N, 3): every sample's target token and the three tokens before it;
    projections: affinities over the same `ids` from the gradients' extra projection seeds;
    corpus: (answer, prev) of every corpus target, for each label's ``label_corpus_share``.
    """
    sweep = {k: clusters[col].to_numpy()[ids] for k, col in sweep_columns(clusters).items()}
    main_k = next(iter(sweep))  # the clusters table lists the main clustering's k<k> column first
    main = sweep[main_k]
    metrics: dict = {}
    if sp.issparse(affinity):
        metrics["quality_note"] = ("a kNN affinity holds only neighbours' cosines: coherence, separation, null_z and "
                                   "quality are null (similarity.mode: dense computes them)")
        keys = [(k, c) for k, lab in sweep.items() for c in range(int(lab.max()) + 1)]
        table = pd.DataFrame({"k": np.array([k for k, _ in keys], np.int32),
                              "cluster": np.array([c for _, c in keys], np.int32)})
        for name, dtype in _COLUMNS.items():
            if name != "cluster":
                table[name] = pd.array([None] * len(table), dtype=dtype)
    else:
        table = sweep_quality(cosines_from_affinity(affinity, kind), sweep, cfg.null_draws, cfg.seed)
        metrics["above_null"] = round(share_in_clusters(table[table["k"] == main_k], main, "null_z", NULL_Z_MIN), 4)
        metrics["above_null_z_min"] = NULL_Z_MIN
    stab, stab_metrics = stability.subsample_stability(affinity, sweep, cfg)
    if projections:
        proj, aris = stability.projection_stability(projections, sweep, cfg)
        stab = stab.merge(proj, on=["k", "cluster"], how="left")
        stab_metrics["projection_ari"] = round(float(np.mean(aris)), 4)
        stab_metrics["projection_aris"] = [round(a, 4) for a in aris]
    else:
        stab["projection_stability"] = pd.array([None] * len(stab), dtype="Float64")
        stab_metrics["projection_ari"] = None
        stab_metrics["projection_note"] = "gradients.stability_seeds is empty: no second projection to compare"
    metrics["stability"] = stab_metrics
    named = labels.sweep_labels(sweep, np.asarray(answer)[ids], np.asarray(prev)[ids], token_str, cfg.seed, corpus)
    metrics["explained_by_ngram"] = round(share_in_clusters(named[named["k"] == main_k], main, "ngram_f1", labels.NGRAM_F1), 4)
    metrics["explained_by_ngram_f1_min"] = labels.NGRAM_F1
    table = table.merge(stab, on=["k", "cluster"], how="left").merge(named, on=["k", "cluster"], how="left")
    return table, metrics


# ---------------------------------------------------------------- against planted ground truth

PURE, IMPURE = 0.9, 0.6  # a cluster is pure when its majority quantum holds >= 90% of it, impure below 60%
MIN_CLASS = 5  # clusters of each kind needed before an ROC AUC means anything
TARGET_AUC, TARGET_CUES = 0.9, 0.9  # the planted targets (README "Which clusters are quanta")


def planted_scores(summary: pd.DataFrame, sweep: Mapping[int, np.ndarray], truth: np.ndarray,
                   cue_ids: Sequence[Sequence[int]]) -> dict:
    """How well the assessment knows the planted quanta (metrics/validate.json ``quality``).

    summary: the cluster summary (k, cluster, quality, label_context); sweep: k -> labels
    over the scored samples; truth: their planted quantum (-1: none); cue_ids[q]: the token
    ids a label must name for quantum q (:func:`pipeline.planted.suite.read_cues`).
    ``quality_auc``: ROC AUC of quality between pure and impure clusters, pooled over
    every k of the sweep (clusters of one member, which have no quality, are left out),
    or a ``quality_auc_skipped`` reason when either kind has fewer than MIN_CLASS
    clusters; ``labels_name_cues``: the share of pure clusters (majority a quantum) whose
    label's context holds every cue of that quantum.
    """
    from sklearn.metrics import roc_auc_score

    rows = []
    for k, lab in sweep.items():
        for c in range(int(lab.max()) + 1):
            t = np.asarray(truth)[lab == c]
            if t.size == 0:
                continue
            counts = np.bincount(t + 1)
            rows.append((int(k), c, counts.max() / t.size, int(counts.argmax()) - 1))
    purity = pd.DataFrame(rows, columns=["k", "cluster", "purity", "majority"])
    table = purity.merge(summary[["k", "cluster", "quality", "label_context"]], on=["k", "cluster"], how="left")
    kind = np.where(table["purity"] >= PURE, 1, np.where(table["purity"] < IMPURE, 0, -1))
    scored = (kind >= 0) & table["quality"].notna().to_numpy()
    n_pure, n_impure = int((kind[scored] == 1).sum()), int((kind[scored] == 0).sum())
    out: dict = {"pure_min": PURE, "impure_max": IMPURE, "n_pure": n_pure, "n_impure": n_impure,
                 "n_between": int((kind == -1).sum()), "pooled_k": [int(k) for k in sweep]}
    if min(n_pure, n_impure) < MIN_CLASS:
        out["quality_auc"] = None
        out["quality_auc_skipped"] = (f"{n_pure} pure and {n_impure} impure clusters: an ROC AUC needs at least "
                                      f"{MIN_CLASS} of each")
    else:
        q = table["quality"].to_numpy(dtype=float, na_value=np.nan)
        out["quality_auc"] = round(float(roc_auc_score(kind[scored], q[scored])), 4)
    pure = table[(kind == 1) & (table["majority"] >= 0)]
    named = [r.label_context is not None and all(str(t) in list(r.label_context) for t in cue_ids[r.majority])
             for r in pure.itertuples()]
    out["labels_name_cues"] = round(float(np.mean(named)), 4) if named else None
    out["n_pure_labelled"] = len(named)
    return out
