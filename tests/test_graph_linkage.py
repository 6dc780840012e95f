"""Average linkage on the kNN graph and the excess-of-mass cut, against slow references."""

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.cluster.hierarchy import fcluster, is_monotonic, is_valid_linkage, linkage
from scipy.spatial.distance import squareform
from sklearn.metrics import adjusted_rand_score

from pipeline.core.config import ClusterConfig
from pipeline.core.errors import QuantaError
from pipeline.qdg import clustering
from pipeline.qdg import graph_linkage as gl
from pipeline.qdg import similarity as sim


def unit_rows(n, dim, rng):
    x = rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def zipf_blocks(rng, sizes, dim=64, spread=0.15, noise=0):
    """Samples around one random direction per block (sizes), plus `noise` samples around none."""
    centres = unit_rows(len(sizes), dim, rng)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[truth] + spread * rng.normal(size=(len(truth), dim)) / np.sqrt(dim)
    if noise:
        x = np.vstack([x, unit_rows(noise, dim, rng)])
        truth = np.r_[truth, -1 - np.arange(noise)]  # each noise sample its own class
    return x.astype(np.float32), truth


@pytest.mark.parametrize("switch", [0.0, 1.0])  # rounds of reciprocal pairs only; one round, then the heap
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_a_complete_graph_it_is_scipys_average_linkage(seed, switch):
    rng = np.random.default_rng(seed)
    x = unit_rows(60, 5, rng)
    w = np.clip((x @ x.T + 1) / 2, 1e-6, 1.0)
    np.fill_diagonal(w, 0.0)
    z = gl.average_linkage_tree(sp.csr_matrix(w), switch_fraction=switch)
    d = 1.0 - w
    np.fill_diagonal(d, 0.0)
    ref = linkage(squareform(d, checks=False), method="average")
    assert is_valid_linkage(z) and is_monotonic(z)
    np.testing.assert_allclose(z[:, 2], ref[:, 2], atol=1e-12)
    for k in range(2, 60):
        assert adjusted_rand_score(fcluster(z, k, "maxclust"), fcluster(ref, k, "maxclust")) == 1.0


def merge_sets(z):
    """{(frozenset, frozenset): height} of a scipy linkage."""
    n = len(z) + 1
    members = {i: frozenset([i]) for i in range(n)}
    out = {}
    for i, (a, b, h, _) in enumerate(z):
        pair = frozenset([members[int(a)], members[int(b)]])
        out[pair] = h
        members[n + i] = members[int(a)] | members[int(b)]
    return out


@pytest.mark.parametrize("switch", [0.0, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_on_a_sparse_graph_it_is_the_one_pair_at_a_time_definition(seed, switch):
    rng = np.random.default_rng(seed)
    x = unit_rows(40, 4, rng)
    graph = sim.knn_from_dense(sim.to_affinity((x @ x.T).astype(np.float32), "angular"), 5).toarray()
    np.fill_diagonal(graph, 0.0)
    z = gl.average_linkage_tree(sp.csr_matrix(graph), switch_fraction=switch)
    assert is_valid_linkage(z) and is_monotonic(z)
    ref = {frozenset([a, b]): h for a, b, h in gl.slow_reference_tree(graph)}
    got = merge_sets(z)
    edge_merges = {pair: h for pair, h in got.items() if h < gl.NO_EDGE_HEIGHT}
    assert set(edge_merges) == set(ref)
    for pair, h in ref.items():
        assert edge_merges[pair] == pytest.approx(h, abs=1e-9)


@pytest.mark.parametrize("switch", [0.0, 1.0])
def test_components_with_no_edge_between_them_join_last(switch):
    g = np.zeros((6, 6))
    g[0, 1] = g[1, 0] = 0.9
    g[1, 2] = g[2, 1] = 0.8
    g[3, 4] = g[4, 3] = 0.7
    z = gl.average_linkage_tree(sp.csr_matrix(g), switch_fraction=switch)
    assert is_valid_linkage(z) and is_monotonic(z)
    assert list(z[:, 2]) == pytest.approx([0.1, 0.2, 0.3, 1.0, 1.0])
    assert z[-1, 3] == 6 and z[-2, 3] == 5  # the largest components first, the lone sample 5 last


def test_edge_weights_outside_zero_one_are_refused():
    g = sp.csr_matrix(np.array([[0, 1.5], [1.5, 0]]))
    with pytest.raises(QuantaError, match="must lie in"):
        gl.average_linkage_tree(g)


def condensed_clusters(z, mcs):
    """By definition: each condensed cluster's (birth lambda, {sample: lambda at which it leaves})."""
    n = len(z) + 1
    kids = {n + i: (int(a), int(b)) for i, (a, b, _, _) in enumerate(z)}
    lam = {n + i: 1.0 - h for i, (_, _, h, _) in enumerate(z)}

    def leaves(x):
        return [x] if x < n else leaves(kids[x][0]) + leaves(kids[x][1])

    out = []

    def walk(x, birth):
        leave = {}
        while True:
            a, b = kids[x]
            big = [c for c in (a, b) if len(leaves(c)) >= mcs]
            for c in (a, b):
                if c not in big or len(big) == 2:
                    for p in leaves(c):
                        leave[p] = lam[x]
            if len(big) == 1:
                x = big[0]
                continue
            out.append((birth, leave))
            if len(big) == 2:
                for c in big:
                    walk(c, lam[x])
            return

    walk(2 * n - 2, 0.0)
    return out


@pytest.mark.parametrize("seed,mcs", [(0, 3), (1, 3), (2, 4), (3, 2), (4, 5)])
def test_excess_of_mass_is_the_best_antichain_by_brute_force(seed, mcs):
    rng = np.random.default_rng(seed)
    x, _ = zipf_blocks(rng, [9, 6, 4, 3], dim=8, spread=0.8, noise=3)
    aff = sim.dense_affinity(x)
    z = gl.average_linkage_tree(sim.knn_from_dense(aff, 8))
    clusters = condensed_clusters(z, mcs)
    stab = [sum(lv - birth for lv in leave.values()) for birth, leave in clusters]
    members = [set(leave) for _, leave in clusters]
    best, best_set = -1.0, ()
    for r in range(1, len(clusters)):
        for subset in itertools.combinations(range(1, len(clusters)), r):  # the root is never selected
            if all(members[i].isdisjoint(members[j]) for i, j in itertools.combinations(subset, 2)):
                total = sum(stab[i] for i in subset)
                if total > best + 1e-12:
                    best, best_set = total, subset
    want = np.full(len(x), -1)
    for label, i in enumerate(best_set):
        want[sorted(members[i])] = label
    got = gl.excess_of_mass(z, mcs)
    assert adjusted_rand_score(want, got) == 1.0
    assert ((want < 0) == (got < 0)).all()


def test_knn_average_finds_zipf_sized_blocks_and_keeps_the_noise_out_of_them():
    rng = np.random.default_rng(0)
    sizes = [400, 200, 133, 100, 80, 66, 57, 50, 44, 40]  # n_k ~ 1/k
    x, truth = zipf_blocks(rng, sizes, noise=20)
    aff = sim.knn_affinity(x, n_neighbors=15)
    cfg = ClusterConfig(n_clusters=(10, 5), method="knn_average", min_cluster_size=5)
    labels = clustering.knn_average(aff, [10, 5], cfg, main_from_data=True)
    main = labels[10]
    blocks = truth >= 0
    assert (main[blocks] >= 0).all() and adjusted_rand_score(truth[blocks], main[blocks]) == 1.0
    noise_clusters = set(main[~blocks]) - {-1}
    assert not noise_clusters & set(main[blocks])  # no block is polluted by a stray sample ...
    assert (main[~blocks] == -1).mean() >= 0.5  # ... most of which join nothing
    # without the outlier score, the strays join the block their edges reach first
    hdbscan_labels = clustering.data_cut(clustering.knn_average_tree(aff, 15), 5, max_outlier_score=1.0)
    assert set(hdbscan_labels[~blocks]) & set(hdbscan_labels[blocks])
    five = labels[5]
    assert len(clustering.cluster_sizes(five)) == 5


def test_cut_at_k_keeps_k_clusters_of_the_minimum_size_and_unassigns_the_rest():
    g = np.zeros((62, 62))
    for lo, hi in ((0, 30), (30, 50), (50, 60), (60, 62)):  # cliques of 30, 20, 10 and 2
        g[lo:hi, lo:hi] = 0.9
    g[0, 30] = g[30, 0] = g[30, 50] = g[50, 30] = 0.2  # the three large ones joined by one edge each
    np.fill_diagonal(g, 0.0)
    z = gl.average_linkage_tree(sp.csr_matrix(g))
    lab = gl.cut_at_k(z, 3, 3)
    assert sorted(np.bincount(lab[lab >= 0])) == [10, 20, 30]
    assert (lab[60:] == -1).all()
    assert sorted(np.bincount(gl.cut_at_k(z, 2, 3) + 1)) == [2, 10, 50]  # tied merges: the lower index first


def test_run_clustering_data_cut_metrics_and_dense_equals_knn():
    rng = np.random.default_rng(2)
    x, truth = zipf_blocks(rng, [120, 60, 40, 30, 24], noise=5)
    n = len(x)
    cfg = ClusterConfig(n_clusters=(3, 5), method="knn_average", min_cluster_size=4, n_neighbors=10)
    table, metrics = clustering.run_clustering(sim.knn_affinity(x, n_neighbors=10), np.arange(n), n, cfg)
    assert metrics["k"] == 5 and metrics["sweep"] == [5, 3] and "excess-of-mass" in metrics["k_from"]
    from scipy.sparse.csgraph import connected_components

    assert metrics["graph_components"] == connected_components(sim.knn_affinity(x, n_neighbors=10))[0]
    main = table.column("cluster").to_numpy()
    assert metrics["n_unassigned"] == int((main < 0).sum()) and 0 < metrics["n_unassigned"] <= 5
    assert table.column_names == ["sample", "cluster", "k5", "k3"]
    # a dense affinity gives the kNN graph similarity.mode: knn would have built, so the same clusters
    dense_table, _ = clustering.run_clustering(sim.dense_affinity(x), np.arange(n), n, cfg)
    assert adjusted_rand_score(main, dense_table.column("cluster").to_numpy()) == 1.0
    fixed = ClusterConfig(n_clusters=(3, 5), method="knn_average", min_cluster_size=4, n_neighbors=10, cut="k")
    _, m = clustering.run_clustering(sim.knn_affinity(x, n_neighbors=10), np.arange(n), n, fixed)
    assert m["k"] == 3 and m["k_from"] == "cluster.n_clusters[0]"


def test_a_cut_with_no_cluster_is_one_line():
    z = gl.average_linkage_tree(sp.csr_matrix(np.array([[0, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0]])))
    with pytest.raises(QuantaError, match="lower cluster.min_cluster_size or set cluster.cut: k"):
        clustering.data_cut(z, 3)


def test_cut_by_merges_is_scipys_cut_where_heights_do_not_tie():
    from scipy.cluster.hierarchy import cut_tree

    rng = np.random.default_rng(5)
    x = unit_rows(50, 6, rng)
    z = gl.average_linkage_tree(sim.knn_from_dense(sim.dense_affinity(x.astype(np.float32)), 6))
    for m in (1, 2, 7, 20, 50):
        assert adjusted_rand_score(cut_tree(z, n_clusters=[m])[:, 0], gl.cut_by_merges(z, m)) == 1.0
        assert len(np.unique(gl.cut_by_merges(z, m))) == m


def test_the_rounds_and_the_heap_build_the_same_tree_on_a_larger_graph():
    rng = np.random.default_rng(7)
    x, _ = zipf_blocks(rng, [200, 100, 66, 50, 40], dim=32, spread=1.0, noise=40)
    graph = sim.knn_affinity(x, n_neighbors=10)
    trees = [gl.average_linkage_tree(graph, switch_fraction=f) for f in (0.0, 0.01, 1.0)]
    for z in trees[1:]:
        assert merge_sets(z).keys() == merge_sets(trees[0]).keys()
        np.testing.assert_allclose(np.sort(z[:, 2]), np.sort(trees[0][:, 2]), atol=1e-12)
