"""pipeline/qdg/clustering.py: agglomerative (the default), spectral and Leiden clustering recover
planted blocks; invariances, sweeps and their ``k<k>`` columns, summaries, validation, bad input."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.cluster import SpectralClustering
from sklearn.metrics import adjusted_rand_score

from pipeline.core.config import ClusterConfig, ConfigError, build
from pipeline.core.errors import QuantaError
from pipeline.qdg import clustering, graph_linkage
from pipeline.qdg import similarity as sim


def blobs(sizes=(40, 25, 15, 10, 6), dim=64, noise=0.35, seed=0):
    """Unit-norm vectors around random directions, one direction per block."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), dim))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[labels] + noise * rng.standard_normal((len(labels), dim)) * np.linalg.norm(centres[0]) / np.sqrt(dim)
    return x.astype(np.float32), labels


CFG = ClusterConfig(n_clusters=(5,), n_init=4, method="spectral")


def test_recovers_blocks_dense_and_knn():
    x, truth = blobs()
    dense = sim.dense_affinity(x)
    knn = sim.knn_affinity(x, n_neighbors=8, backend="sklearn")
    for aff in (dense, knn):
        labels = clustering.spectral(aff, [5], CFG)[5]
        assert adjusted_rand_score(truth, labels) == 1.0


def test_same_partition_as_sklearn_spectral_clustering():
    x, truth = blobs(seed=1)
    aff = sim.dense_affinity(x)
    ours = clustering.spectral(aff, [5], CFG)[5]
    theirs = SpectralClustering(5, affinity="precomputed", random_state=0, n_init=4).fit(aff.astype(np.float64)).labels_
    assert adjusted_rand_score(ours, theirs) == 1.0


def test_sweep_columns_equal_single_k_runs():
    x, _ = blobs(sizes=(30, 20, 20, 12, 8, 6), seed=2)
    aff = sim.dense_affinity(x)
    cfg = ClusterConfig(n_clusters=(6, 3, 4), n_init=4, method="spectral")
    sweep = clustering.spectral(aff, [6, 3, 4], cfg)
    for k in (3, 4, 6):
        single = clustering.spectral(aff, [k], cfg)[k]
        assert adjusted_rand_score(sweep[k], single) == 1.0


def test_labels_up_to_renaming_and_sample_order():
    x, truth = blobs(seed=3)
    perm = np.random.default_rng(0).permutation(len(x))
    a = clustering.spectral(sim.dense_affinity(x), [5], CFG)[5]
    b = clustering.spectral(sim.dense_affinity(x[perm]), [5], CFG)[5]
    assert adjusted_rand_score(a[perm], b) == 1.0
    # canonical names: 0 is the largest cluster
    assert np.bincount(a)[0] == np.bincount(a).max() == 40
    np.testing.assert_array_equal(clustering.canonical(np.array([7, 7, 3, 9, 9, 9])), [1, 1, 2, 0, 0, 0])


@pytest.mark.parametrize("how", ["cluster_qr", "discretize"])
def test_other_label_assignments(how):
    x, truth = blobs(seed=4, noise=0.2)
    labels = clustering.spectral(sim.dense_affinity(x), [5], ClusterConfig(n_clusters=(5,), assign_labels=how))[5]
    assert adjusted_rand_score(truth, labels) > 0.95


def test_run_clustering_table_metrics_and_summary():
    x, truth = blobs()
    n = len(x) + 2  # two bad samples, left out of the affinity
    ids = np.arange(2, n)
    aff = sim.dense_affinity(x)
    cfg = ClusterConfig(n_clusters=(5, 3), n_init=4, n_examples=3, top_tokens=2, method="spectral")
    table, metrics = clustering.run_clustering(aff, ids, n, cfg)
    df = table.to_pandas()
    assert list(df.columns) == ["sample", "cluster", "k5", "k3"]
    assert (df.loc[:1, ["cluster", "k5", "k3"]] == -1).all().all()
    assert (df["cluster"] == df["k5"]).all()
    assert metrics["stability_ari"] == 1.0 and metrics["k"] == 5 and metrics["n_clustered"] == n - 2
    samples = pd.DataFrame({"sample": np.arange(n), "token_id": np.r_[0, 0, truth % 2 + 10], "loss": np.linspace(0, 0.1, n)})
    summary = clustering.summarise(df, samples, {10: "ten", 11: "eleven"}, cfg).to_pandas()
    assert set(summary["k"]) == {5, 3}
    five = summary[summary["k"] == 5].sort_values("cluster")
    assert five["size"].tolist() == [40, 25, 15, 10, 6]
    assert all(len(e) == 3 for e in five["examples"]) and all(len(t) <= 2 for t in five["top_tokens"])
    first = five.iloc[0]
    assert first["top_tokens"][0] in ("ten", "eleven") and first["top_counts"][0] == 40


def test_validate_scores_every_method_and_the_baselines():
    x, truth = blobs()
    aff = sim.dense_affinity(x)
    ids = np.arange(len(x))
    tokens = np.where(truth < 2, 100, 200)  # the answer token tells only two groups apart
    samples = pd.DataFrame({"sample": ids, "token_id": tokens})
    context = np.stack([np.full_like(truth, 7), truth + 50], axis=1)  # the previous token names the block
    out = clustering.validate(aff, ids, samples, truth, context, clusters=None, cfg=CFG)
    assert out["k_present"] == 5 and out["qdg"]["ari"] == 1.0 and out["qdg_from"] == "clustered here"
    assert set(out["methods"]) == {"knn_average", "knn_average_at_k_present", "leiden", "spectral", "agglomerative"}
    assert out["methods"]["spectral"]["ari"] == 1.0 and out["methods"]["agglomerative"]["ari"] == 1.0
    assert out["baseline_answer"]["ari"] < 0.5
    assert out["baseline_context"]["ari"] == 1.0 and out["baseline_oracle_cue_pair"]["ari"] == 1.0
    knn = sim.knn_affinity(x, n_neighbors=8, backend="sklearn")  # sparse: no average linkage
    assert "agglomerative" not in clustering.validate(knn, ids, samples, truth, context, None, CFG)["methods"]
    # with the cluster stage's table, its main clustering is what QDG scores
    table, _ = clustering.run_clustering(aff, ids, len(ids), ClusterConfig(n_clusters=(3, 5), n_init=4, method="spectral"))
    again = clustering.validate(aff, ids, samples, truth, context, table.to_pandas(), CFG)
    assert again["qdg_from"] == "cluster stage (main clustering)" and again["qdg"]["k"] == 3
    assert again["cluster_stage"]["5"]["ari"] == 1.0 and again["cluster_stage"]["3"]["ari"] < 1


def zipf_blobs(n=1500, n_blocks=30, dim=64, noise=0.3, seed=0):
    """Unit vectors around random directions, block sizes Zipf (p_k ∝ k^-1.5), as planted quanta."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, n_blocks + 1) ** -1.5
    truth = rng.choice(n_blocks, size=n, p=p / p.sum())
    centres = rng.standard_normal((n_blocks, dim))
    x = centres[truth] + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


def test_leiden_keeps_zipf_sized_blocks_whole_where_spectral_splits_them():
    x, truth = zipf_blobs()
    aff = sim.dense_affinity(x)
    k = len(np.unique(truth))
    natural = clustering.leiden_natural(aff, ClusterConfig(n_neighbors=30))
    spectral = clustering.spectral(aff, [k], CFG)[k]
    assert adjusted_rand_score(truth, natural) >= 0.95
    assert adjusted_rand_score(truth, spectral) < 0.6
    # the same on the sparse kNN affinity (similarity.mode: knn)
    knn = sim.knn_affinity(x, n_neighbors=30, backend="sklearn")
    assert adjusted_rand_score(truth, clustering.leiden_natural(knn, ClusterConfig(n_neighbors=30))) >= 0.95


def test_leiden_sweep_gives_exactly_k_deterministically_and_up_to_renaming():
    x, truth = blobs()
    aff = sim.dense_affinity(x)
    cfg = ClusterConfig(n_clusters=(2, 5, 9))
    out = clustering.leiden(aff, [2, 5, 9], cfg)
    assert {k: len(np.unique(v)) for k, v in out.items()} == {2: 2, 5: 5, 9: 9}
    # below Leiden's own count the merge keeps each block whole: blocks are unions' parts
    natural = clustering.leiden_natural(aff, cfg)
    assert adjusted_rand_score(truth, natural) > 0.7
    assert all(len(np.unique(out[2][natural == c])) == 1 for c in np.unique(natural))
    again = clustering.leiden(aff, [2, 5, 9], cfg)
    assert all(np.array_equal(out[k], again[k]) for k in out)
    perm = np.random.default_rng(3).permutation(len(x))  # permuting samples permutes the labels
    shuffled = clustering.leiden(aff[np.ix_(perm, perm)], [5], cfg)[5]
    assert adjusted_rand_score(out[5][perm], shuffled) == 1.0


def test_merge_communities_of_singletons_is_scipys_average_linkage():
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    x, _ = blobs(sizes=(12, 9, 7, 5), noise=0.8, seed=4)
    aff = np.asarray(sim.dense_affinity(x), dtype=np.float64)
    n = len(x)
    singletons = np.arange(n)
    between, size = clustering.group_affinity(aff, clustering.knn_graph(aff, 5), singletons)
    dist = 1.0 - aff
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(dist, checks=False), method="average")
    for k in (2, 3, 6, 10):
        ours = clustering.merge_communities(between, size, singletons, k)
        ref = fcluster(tree, t=k, criterion="maxclust")
        assert adjusted_rand_score(ref, ours) == 1.0


def test_run_clustering_leiden_main_is_its_own_partition():
    x, truth = zipf_blobs(n=600, n_blocks=12)
    aff = sim.dense_affinity(x)
    table, metrics = clustering.run_clustering(aff, np.arange(len(x)), len(x), ClusterConfig(n_clusters=(4, 20), method="leiden"))
    df = table.to_pandas()
    main = metrics["k"]
    assert metrics["method"] == "leiden" and df["cluster"].nunique() == main
    assert {f"k{main}", "k4", "k20"} <= set(df.columns) and df["k20"].nunique() == 20
    assert metrics["stability_ari"] >= 0.9


def test_bad_input():
    x, _ = blobs(sizes=(3, 3))
    aff = sim.dense_affinity(x)
    with pytest.raises(QuantaError, match=r"cluster.n_clusters \[6\] needs more samples than the 6 usable") as e:
        clustering.spectral(aff, [6], CFG)
    # params already keep every k below select.n_samples: fewer samples qualified, so the fix is
    # to let more tokens qualify, not to ask for more of them
    assert "raise select.max_loss or use a stronger select.model" in str(e.value)
    assert "select.n_samples" not in str(e.value)
    with pytest.raises(ConfigError, match="one k >= 2"):
        build(ClusterConfig, {"n_clusters": 1}, "cluster")
    with pytest.raises(ConfigError, match="repeats"):
        build(ClusterConfig, {"n_clusters": [5, 5]}, "cluster")
    with pytest.raises(ConfigError, match="stability_seed must differ"):
        build(ClusterConfig, {"seed": 1, "stability_seed": 1}, "cluster")
    assert build(ClusterConfig, {"n_clusters": 7}, "cluster").n_clusters == (7,)


def test_sparse_lanczos_embedding_spans_sklearns_eigenvectors():
    import scipy.sparse as sp
    from scipy.linalg import subspace_angles

    x, truth = blobs(sizes=(30, 25, 20, 15), seed=5, noise=0.8)  # noisy: one connected graph
    dense = sim.dense_affinity(x).astype(np.float64)
    np.fill_diagonal(dense, 0)  # sklearn's Laplacian ignores the diagonal; make both see the same graph
    from sklearn.manifold import spectral_embedding

    ours = clustering.embedding(sp.csr_matrix(dense), 4, "arpack", 0)
    ours_dense = clustering.embedding(dense, 4, "arpack", 0)
    theirs = spectral_embedding(dense, n_components=4, eigen_solver="arpack", random_state=0, drop_first=False)
    assert np.degrees(subspace_angles(ours, theirs)).max() < 0.01
    assert np.degrees(subspace_angles(ours_dense, theirs)).max() < 0.01
    assert np.allclose(clustering.embedding(sp.csr_matrix(dense), 4, "arpack", 0), ours)  # deterministic


@pytest.mark.parametrize("solver", ["lobpcg", "amg"])
def test_other_eigensolvers_recover_blocks(solver):
    if solver == "amg":
        pytest.importorskip("pyamg")
    x, truth = blobs(sizes=(60, 50, 40, 30, 20), seed=6, noise=0.2)
    labels = clustering.spectral(sim.dense_affinity(x), [5], ClusterConfig(n_clusters=(5,), eigen_solver=solver, n_init=4))[5]
    assert adjusted_rand_score(truth, labels) > 0.95


def test_stability_rerun_reuses_only_a_seed_free_embedding():
    # The dense exact embedding does not depend on the seed (so the stability rerun reuses it);
    # the sparse Lanczos one starts from a seeded vector (so the rerun recomputes it).
    x, _ = blobs(seed=5, noise=0.6)
    aff = sim.dense_affinity(x)
    a = clustering.embedding(aff, 6, "arpack", seed=0)
    b = clustering.embedding(aff, 6, "arpack", seed=1)
    np.testing.assert_array_equal(a, b)
    cfg = ClusterConfig(n_clusters=(5,), n_init=1, seed=0, stability_seed=1, method="spectral")
    assert clustering.seed_free_embedding(aff, cfg)
    assert not clustering.seed_free_embedding(sp.csr_matrix(aff), cfg)
    assert not clustering.seed_free_embedding(aff, ClusterConfig(n_clusters=(5,), eigen_solver="lobpcg"))
    # and the stability score is the one a full, independent rerun gives
    _, metrics = clustering.run_clustering(aff, np.arange(len(x)), len(x), cfg)
    first = clustering.spectral(aff, [5], cfg)[5]
    again = clustering.spectral(aff, [5], cfg, seed=1)[5]
    assert metrics["stability_ari"] == round(adjusted_rand_score(first, again), 4)


# --------------------------------------------------------------------------- agglomerative


def test_agglomerative_recovers_zipf_sized_blocks_and_matches_sklearn():
    from sklearn.cluster import AgglomerativeClustering

    x, truth = blobs(sizes=(120, 40, 20, 10, 6, 3, 2), seed=4)
    aff = sim.dense_affinity(x)
    ours = clustering.agglomerative(aff, [7])[7]
    assert adjusted_rand_score(truth, ours) == 1.0
    assert np.bincount(ours)[0] == 120  # canonical: cluster 0 is the largest
    theirs = AgglomerativeClustering(n_clusters=7, metric="precomputed", linkage="average").fit_predict(1.0 - aff)
    assert adjusted_rand_score(ours, theirs) == 1.0


def test_agglomerative_sweep_is_one_tree_cut_at_every_k():
    x, _ = blobs(sizes=(30, 20, 20, 12, 8, 6), seed=5)
    labels = clustering.agglomerative(sim.dense_affinity(x), [2, 4, 6])
    for coarse, fine in ((2, 4), (4, 6)):
        # nested: every fine cluster lies inside one coarse cluster
        pairs = {(int(f), int(c)) for f, c in zip(labels[fine], labels[coarse])}
        assert len({f for f, _ in pairs}) == len(pairs)
        assert len(np.unique(labels[fine])) == fine


def test_agglomerative_run_clustering_metrics_and_bad_input():
    x, truth = blobs(sizes=(60, 30, 15, 8), seed=6)
    aff = sim.dense_affinity(x)
    cfg = ClusterConfig(n_clusters=(4, 2), method="agglomerative")
    table, metrics = clustering.run_clustering(aff, np.arange(len(x)), len(x), cfg)
    assert adjusted_rand_score(truth, table.column("cluster").to_numpy()) == 1.0
    # deterministic: no seed rerun; the cluster stage measures its stability on subsamples
    assert metrics["method"] == "agglomerative" and "stability_ari" not in metrics
    knn = sim.knn_affinity(x, n_neighbors=8, backend="sklearn")
    with pytest.raises(QuantaError, match="dense affinity"):
        clustering.run_clustering(knn, np.arange(len(x)), len(x), cfg)
    with pytest.raises(QuantaError, match="k must be < N"):
        clustering.agglomerative(aff, [len(x)])
    with pytest.raises(ConfigError):
        build(ClusterConfig, {"method": "ward"}, "cluster")


def test_min_size_cut_counts_are_those_of_every_plain_cut():
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    x = np.random.default_rng(3).normal(size=(60, 5))
    tree = linkage(pdist(x), method="average")
    big = graph_linkage.n_big_by_cut(tree, 4)
    for m in (1, 2, 7, 20, 59, 60):
        assert big[m] == (np.bincount(fcluster(tree, t=m, criterion="maxclust")) >= 4).sum()


def test_min_size_cut_attaches_outliers_instead_of_counting_them():
    # Three blocks of 20 that share a direction, and six outliers orthogonal to everything:
    # the plain cut at k = 3 keeps outliers as clusters and merges the blocks; counting
    # only clusters of >= 3 gives the blocks, and each outlier joins its nearest block.
    rng = np.random.default_rng(0)
    centres = np.eye(12)[:3] * 4 + 3 * np.eye(12)[11]
    outliers = 8 * np.eye(12)[3:9] + 0.5 * rng.normal(size=(6, 12)) * np.eye(12)[:3].sum(0)
    x = np.concatenate([c + 0.3 * rng.normal(size=(20, 12)) for c in centres] + [outliers])
    truth = np.repeat([0, 1, 2], 20)
    aff = sim.dense_affinity(x)
    plain = clustering.agglomerative(aff, [3])[3]
    sized = clustering.agglomerative(aff, [3], min_size=3)[3]
    assert adjusted_rand_score(truth, plain[:60]) < 0.9
    assert adjusted_rand_score(truth, sized[:60]) == 1.0 and len(np.unique(sized)) == 3
    nearest = np.argmax(np.stack([aff[60:, :60][:, sized[:60] == c].mean(1) for c in range(3)], 1), axis=1)
    assert (sized[60:] == nearest).all()


def test_ngram_baselines_score_a_clustering_against_each_ngram_partition():
    token = np.array([5, 5, 7, 7, 9, 9, 5, 7])
    context = np.array([[-1, 1], [2, 1], [3, 4], [3, 4], [2, 1], [3, 4], [2, 3], [2, 3]])  # oldest first
    parts = clustering.ngram_partitions(token, context)
    assert set(parts) == {"answer", "previous", "previous_answer", "previous2_answer"}
    assert parts["previous"].tolist() == [1, 1, 4, 4, 1, 4, 3, 3]
    # two samples share a key exactly when they share the tokens the key is made of
    for name, cols in {"previous_answer": [1], "previous2_answer": [0, 1]}.items():
        keys = [tuple(context[i, cols]) + (token[i],) for i in range(len(token))]
        same = [[keys[i] == keys[j] for j in range(len(token))] for i in range(len(token))]
        got = [[parts[name][i] == parts[name][j] for j in range(len(token))] for i in range(len(token))]
        assert got == same, name
    # a clustering that is the answer partition (with one sample left out as -1)
    labels = np.array([0, 0, 1, 1, 2, 2, -1, 1])
    b = clustering.ngram_baselines(labels, token, context)
    assert b["answer"]["ari"] == 1.0 and b["previous2_answer"]["ari"] < 1.0
    assert clustering.ngram_baselines(np.array([0, -1, -1]), token[:3], context[:3]) == {
        "skipped": "1 clustered sample(s): nothing to compare"}


def test_fewer_clusters_than_asked_are_counted_and_warned():
    # 5 samples, k = 4 with clusters of at least 3: the cut can hold one cluster only
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    aff = sim.dense_affinity(x)
    cfg = ClusterConfig(n_clusters=(4, 2), min_cluster_size=3, method="agglomerative")
    with pytest.warns(UserWarning, match=r"fewer clusters than asked \(k = 4 made 1, k = 2 made 1\)"):
        table, metrics = clustering.run_clustering(aff, np.arange(5), 5, cfg)
    assert metrics["clusters_made"] == {"4": 1, "2": 1}
    assert len(np.unique(table.column("k4").to_numpy())) == 1
    plain = ClusterConfig(n_clusters=(4, 2), min_cluster_size=1, method="agglomerative")
    _, metrics = clustering.run_clustering(aff, np.arange(5), 5, plain)
    assert metrics["clusters_made"] == {"4": 4, "2": 2}
