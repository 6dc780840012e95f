"""pipeline.qdg.stability: best-match Jaccard written out by hand, subsample stability on
clear and on structureless data, and the projection-seed ARI."""

import numpy as np
import pytest

from pipeline.core.config import ClusterConfig
from pipeline.qdg import clustering, stability
from pipeline.qdg import similarity as sim


def _blobs(sizes, seed, spread=0.15, dim=24):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim))
    x = np.concatenate([c + spread * rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)])
    return x.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


def test_best_jaccard_by_hand():
    ref = np.array([0, 0, 0, 1, 1, 2, -1])
    other = np.array([5, 5, 1, 1, 1, 1, 1])
    j = stability.best_jaccard(ref, other, 4)
    # cluster 0 {0,1,2}: best is other 5 {0,1}: 2/3; cluster 1 {3,4}: other 1 {2,3,4,5}: 2/4;
    # cluster 2 {5}: 1/4; cluster 3 has no member; sample 6 (reference -1) is left out
    assert j[:3] == pytest.approx([2 / 3, 2 / 4, 1 / 4])
    assert np.isnan(j[3])


def test_subsample_stability_high_on_blobs_low_on_noise():
    x, truth = _blobs((60, 30, 15, 8), seed=6)
    aff = sim.dense_affinity(x)
    cfg = ClusterConfig(n_clusters=(4, 2), stability_draws=4, min_cluster_size=1, method="agglomerative")
    table, m = stability.subsample_stability(aff, {4: truth, 2: clustering.agglomerative(aff, [2])[2]}, cfg)
    assert m["subsample_ari"] == 1.0 and m["subsample_draws"] == 4
    assert (table["stability"] == 1.0).all() and len(table) == 4 + 2
    noise = np.random.default_rng(7).standard_normal((200, 32)).astype(np.float32)
    aff = sim.dense_affinity(noise)
    labels = clustering.agglomerative(aff, [10])[10]
    table, m = stability.subsample_stability(aff, {10: labels}, ClusterConfig(n_clusters=(10,), min_cluster_size=1, method="agglomerative"))
    assert m["subsample_ari"] < 0.9
    assert table["stability"].mean() < 0.75  # below Hennig's "stable" on average
    # seeded: the same numbers again
    again, m2 = stability.subsample_stability(
        aff, {10: labels}, ClusterConfig(n_clusters=(10,), min_cluster_size=1, method="agglomerative"))
    assert m2 == m and again.equals(table)


def test_projection_stability_falls_with_the_projection_noise():
    x, truth = _blobs((50, 30, 20), seed=2, spread=0.3)
    cfg = ClusterConfig(n_clusters=(3, 2), min_cluster_size=1, method="agglomerative")
    main = clustering.agglomerative(sim.dense_affinity(x), [3, 2])
    rng = np.random.default_rng(0)
    near = sim.dense_affinity(x + 0.01 * rng.normal(size=x.shape).astype(np.float32))
    far = sim.dense_affinity(rng.normal(size=x.shape).astype(np.float32))
    table, (close, random) = stability.projection_stability([near, far], main, cfg)
    assert close == 1.0 and random < 0.2
    # each cluster: Jaccard 1 against the near copy, less against the random one, averaged
    assert len(table) == 3 + 2 and table["projection_stability"].between(0.5, 0.99).all()
    alone, _ = stability.projection_stability([near], main, cfg)
    assert (alone["projection_stability"] == 1.0).all()


def test_too_few_samples_for_a_subsample_gives_null_stability_not_an_error():
    x, truth = _blobs((3, 2), seed=1)
    aff = sim.dense_affinity(x)
    table, m = stability.subsample_stability(aff, {4: np.array([0, 0, 1, 2, 3])}, ClusterConfig(n_clusters=(4,)))
    assert m["subsample_ari"] is None and "k = 4" in m["subsample_note"]
    assert len(table) == 4 and table["stability"].isna().all()


def test_a_data_cut_main_clustering_is_compared_with_each_subsamples_own_cut():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 32))
    truth = np.repeat(np.arange(4), [60, 30, 20, 10])
    x = (centres[truth] + 0.1 * rng.normal(size=(len(truth), 32))).astype(np.float32)
    aff = sim.knn_affinity(x, n_neighbors=8)
    cfg = ClusterConfig(n_clusters=(3,), method="knn_average", min_cluster_size=4, stability_draws=3)
    table, _ = clustering.run_clustering(aff, np.arange(len(x)), len(x), cfg)
    main = table.column("cluster").to_numpy()
    assert len(clustering.cluster_sizes(main)) == 4  # the data's k, not n_clusters[0]
    sweep = {4: main, 3: table.column("k3").to_numpy()}
    scores, m = stability.subsample_stability(aff, sweep, cfg)
    # every subsample's own cut finds the same four blocks: each cluster comes back whole
    assert m["subsample_ari"] == 1.0
    assert scores[scores["k"] == 4]["stability"].min() == 1.0
