"""pipeline.qdg.quality: per-cluster coherence, separation and null z, against sums written
out by hand, on unit vectors whose block structure is known."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipeline.qdg import quality, similarity


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


def test_quality_matches_pair_means_written_out():
    u, labels = _blocks()
    cos = u @ u.T
    null = quality.null_coherence(cos, np.bincount(labels), draws=200, seed=0)
    q = quality.cluster_quality(cos, labels, null).set_index("cluster")
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


def test_assess_sweep_and_above_null():
    u, labels = _blocks()
    aff = similarity.to_affinity(np.clip(u @ u.T, -1, 1), "angular")
    clusters = pd.DataFrame({"sample": np.arange(len(labels)), "cluster": labels, "k5": labels,
                             "k2": (labels >= 2).astype(int)})
    table, m = quality.assess(aff, "angular", clusters, np.arange(len(labels)), draws=100, seed=0)
    assert sorted(set(table["k"])) == [2, 5] and len(table) == 5 + 2
    assert m["above_null"] == round(40 / 60, 4)  # the two blocks' samples, 40 of 60 (rounded for the metrics file)
    none, note = quality.assess(sp.csr_matrix(aff), "angular", clusters, np.arange(len(labels)), 100, 0)
    assert none is None and "kNN" in note["quality_note"]
