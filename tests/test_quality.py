"""pipeline.qdg.quality: per-cluster coherence, separation, null z and quality, against sums
written out by hand, on unit vectors whose block structure is known; the stage's assessment
and its scores against planted ground truth."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from pipeline.core.config import ClusterConfig
from pipeline.qdg import clustering, quality, similarity


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _blocks(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """60 unit vectors in 32 dims: two tight blocks of 20 around their own directions and 20
    random ones; labels: the two blocks, the random ones split in two groups, one singleton."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(2, 32))
    x = np.concatenate([centre[0] + 0.3 * rng.normal(size=(20, 32)), centre[1] + 0.3 * rng.normal(size=(20, 32)),
                        rng.normal(size=(20, 32))])
    labels = np.repeat([0, 1, 2, 3], [20, 20, 10, 10])
    labels[-1] = 4  # a cluster of one
    return _unit(x), labels


def _block_quality():
    """The blocks' cosines, labels, null table and quality table (indexed by cluster)."""
    u, labels = _blocks()
    cos = u @ u.T
    null = quality.null_coherence(cos, np.bincount(labels), draws=200, seed=0)
    return cos, labels, null, quality.cluster_quality(cos, labels, null).set_index("cluster")


def test_quality_matches_pair_means_written_out():
    cos, labels, _, q = _block_quality()
    for c in range(4):
        idx = np.flatnonzero(labels == c)
        pairs = [cos[i, j] for i in idx for j in idx if i != j]
        assert q.loc[c, "coherence"] == pytest.approx(np.mean(pairs), abs=1e-5)
        others = [np.mean(cos[np.ix_(idx, np.flatnonzero(labels == d))]) for d in range(5) if d != c]
        assert q.loc[c, "separation"] == pytest.approx(np.mean(pairs) - max(others), abs=1e-5)
    # the blocks stand far above random groups of their size; the random groups do not
    assert q.loc[0, "null_z"] > 10 and q.loc[1, "null_z"] > 10
    assert abs(q.loc[2, "null_z"]) < 3 and abs(q.loc[3, "null_z"]) < 3
    assert q.loc[0, "separation"] > 0.3 and q.loc[2, "separation"] < 0.1
    # one member: no pair, so null, not NaN
    assert q.loc[4, ["coherence", "separation", "null_z"]].isna().all()
    assert q["coherence"].dtype == "Float64"


def test_null_is_seeded_and_its_mean_is_the_population_pair_mean():
    u, _ = _blocks()
    cos = u @ u.T
    a = quality.null_coherence(cos, [10, 20], draws=300, seed=3)
    assert a == quality.null_coherence(cos, [10, 20], draws=300, seed=3)
    n = len(cos)
    population = (cos.sum(dtype=np.float64) - np.trace(cos)) / (n * (n - 1))
    for mean, sd in a.values():
        assert mean == pytest.approx(population, abs=4 * sd / np.sqrt(300))


@pytest.mark.parametrize("kind", ["angular", "shifted"])
def test_cosines_from_affinity_inverts_to_affinity(kind):
    u, _ = _blocks()
    cos = np.clip(u @ u.T, -1, 1)
    back = similarity.cosines_from_affinity(similarity.to_affinity(cos.copy(), kind), kind)
    assert np.abs(back - cos).max() < 1e-3


def test_quality_is_coherence_between_its_null_and_one():
    _, labels, null, q = _block_quality()
    for c in range(4):
        m = null[int((labels == c).sum())][0]
        assert q.loc[c, "quality"] == pytest.approx((q.loc[c, "coherence"] - m) / (1 - m), abs=1e-9)
    # a block scores near 1; a group of random vectors below 0 (under the all-pairs mean, which the blocks raise)
    assert q.loc[0, "quality"] > 0.8 and q.loc[2, "quality"] < 0
    assert pd.isna(q.loc[4, "quality"])  # one member


def _assess_inputs(labels):
    n = len(labels)
    answer = np.where(labels < 2, 100 + labels, 50 + np.arange(n) % 7)  # the blocks answer one token each
    prev = np.stack([np.full(n, 9), np.full(n, 8), np.arange(n) % 5], axis=1)
    return answer, prev, {t: f"t{t}" for t in range(200)}


def test_assess_sweep_labels_stability_and_the_global_numbers():
    u, labels = _blocks()
    aff = similarity.to_affinity(np.clip(u @ u.T, -1, 1), "angular")
    clusters = pd.DataFrame({"sample": np.arange(len(labels)), "cluster": labels, "k5": labels,
                             "k2": (labels >= 2).astype(int)})
    answer, prev, strings = _assess_inputs(labels)
    cfg = ClusterConfig(n_clusters=(5, 2), null_draws=100, min_cluster_size=1, stability_draws=3, method="agglomerative")
    table, m = quality.assess(aff, "angular", clusters, np.arange(len(labels)), cfg, answer=answer, prev=prev,
                              token_str=strings, projections=[aff])
    assert sorted(set(table["k"])) == [2, 5] and len(table) == 5 + 2
    assert m["above_null"] == round(40 / 60, 4)  # the two blocks' samples, 40 of 60 (rounded for the metrics file)
    main = table[table["k"] == 5].set_index("cluster")
    assert main.loc[0, "label"] == "→ 't100'" and main.loc[0, "label_kind"] == "answer"
    assert main.loc[0, "label_f1"] == 1.0 and main.loc[0, "stability"] > 0.75  # Hennig's "stable"
    assert m["explained_by_ngram"] == round(40 / 60, 4)  # only the blocks have a token rule of F1 >= 0.9
    # the hand-made partition against the method's own clustering of the (same) projection
    own = clustering.agglomerative(aff, [5], 1)[5]
    assert m["stability"]["projection_ari"] == round(adjusted_rand_score(labels, own), 4)
    assert {"subsample_ari", "subsample_draws"} <= set(m["stability"])


def test_assess_on_a_knn_affinity_leaves_the_cosine_columns_null():
    u, labels = _blocks()
    aff = similarity.knn_affinity(u, n_neighbors=10, backend="sklearn")
    clusters = pd.DataFrame({"sample": np.arange(len(labels)), "cluster": labels, "k5": labels})
    answer, prev, strings = _assess_inputs(labels)
    cfg = ClusterConfig(n_clusters=(5,), method="leiden", null_draws=10, stability_draws=2)
    table, m = quality.assess(aff, "angular", clusters, np.arange(len(labels)), cfg, answer=answer, prev=prev,
                              token_str=strings)
    assert "kNN" in m["quality_note"] and "above_null" not in m
    assert table[["coherence", "null_z", "quality"]].isna().all().all()
    assert table["label"].notna().sum() == 4  # every cluster but the singleton is labelled
    assert m["stability"]["projection_ari"] is None and "stability_seeds" in m["stability"]["projection_note"]


def test_planted_scores_auc_cues_and_too_few_impure():
    # k = 4: three pure clusters and a mixed one, twice over (k = 4 and k = 40 are the same cut)
    truth = np.repeat([0, 1, 2, 0, 1], [10, 10, 10, 5, 5])
    lab = np.repeat([0, 1, 2, 3, 3], [10, 10, 10, 5, 5])
    summary = pd.DataFrame({"k": [4] * 4, "cluster": range(4), "quality": [0.9, 0.8, 0.7, 0.1],
                            "label_context": [["1", "2"], ["3", "4"], ["9", "9"], None]})
    out = quality.planted_scores(summary, {4: lab}, truth, [[1, 2], [3, 4], [5, 6]])
    assert out["n_pure"] == 3 and out["n_impure"] == 1 and out["quality_auc"] is None
    assert "at least" in out["quality_auc_skipped"]
    assert out["labels_name_cues"] == round(2 / 3, 4)  # cluster 2's label misses quantum 2's cues
    many = pd.concat([summary.assign(k=k) for k in range(10, 16)])
    out = quality.planted_scores(many, {k: lab for k in range(10, 16)}, truth, [[1, 2], [3, 4], [5, 6]])
    assert out["n_impure"] == 6 and out["quality_auc"] == 1.0
