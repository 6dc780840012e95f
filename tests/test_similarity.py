"""Similarity and affinity: values against plain formulas, invariances, modes, bad input."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline.core.config import SimilarityConfig
from pipeline.core.errors import QuantaError
from pipeline.qdg import similarity as sim


def vectors(n=60, dim=32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_cosine_and_affinities_match_the_formulas():
    x = vectors()
    ref = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in x.astype(np.float64)] for a in x.astype(np.float64)])
    c = sim.cosine(x)
    np.testing.assert_allclose(c, ref, atol=2e-6)
    assert (c == c.T).all() and (np.diag(c) == 1).all()
    ang = sim.dense_affinity(x, "angular")
    np.testing.assert_allclose(ang, 1 - np.arccos(np.clip(ref, -1, 1)) / math.pi, atol=1e-3)  # arccos is steep near 1
    np.testing.assert_allclose(sim.dense_affinity(x, "shifted"), (1 + ref) / 2, atol=2e-6)
    assert ang.min() >= 0 and ang.max() <= 1


def test_block_size_does_not_change_the_matrix():
    x = vectors(n=101)
    whole = sim.cosine(x, memory_gb=1.0)
    tiny = sim.cosine(x, memory_gb=1e-7)  # one row per block
    assert sim.block_rows(101, 32, 1e-7) == 1 and sim.block_rows(101, 32, 1.0) == 101
    np.testing.assert_allclose(whole, tiny, atol=1e-6)  # BLAS may round a row and a block differently


def test_permuting_samples_permutes_the_matrix():
    x = vectors()
    perm = np.random.default_rng(1).permutation(len(x))
    a = sim.dense_affinity(x)
    np.testing.assert_allclose(sim.dense_affinity(x[perm]), a[np.ix_(perm, perm)], atol=1e-6)


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_knn_graph_is_the_exact_neighbours_symmetrised(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    x = vectors(n=80)
    k = 5
    a = sim.knn_affinity(x, n_neighbors=k, backend=backend)
    dense = sim.dense_affinity(x)
    assert sp.issparse(a) and (abs(a - a.T)).max() < 1e-6
    assert np.allclose(a.diagonal(), 1)
    # the graph is (W + W^T)/2 of W[i, j] = max(0, 2 A_ij - 1) on each sample's k nearest
    w = np.zeros_like(dense)
    off = dense - np.eye(len(x)) * 10
    for i in range(len(x)):
        nbrs = np.argsort(-off[i])[:k]
        w[i, nbrs] = np.maximum(0, 2 * dense[i, nbrs] - 1)
    want = (w + w.T) / 2
    np.fill_diagonal(want, 1)
    np.testing.assert_allclose(a.toarray(), want, atol=1e-4)
    assert (a.toarray() > 0).sum() < 0.5 * len(x) ** 2  # and it is sparse


def test_faiss_and_sklearn_agree():
    pytest.importorskip("faiss")
    x = vectors(n=70)
    a = sim.knn_affinity(x, 6, backend="faiss")
    b = sim.knn_affinity(x, 6, backend="sklearn")
    assert (a != 0).nnz == (b != 0).nnz or abs((a - b)).max() < 1e-4
    np.testing.assert_allclose(a.toarray(), b.toarray(), atol=1e-4)


def test_compute_leaves_bad_rows_out_and_picks_the_mode(tmp_path):
    x = vectors(n=30)
    x[[3, 7]] = 0
    bad = np.zeros(30, dtype=bool)
    bad[[3, 7]] = True
    aff, ids, meta = sim.compute(x, bad, SimilarityConfig())
    assert meta["mode"] == "dense" and aff.shape == (28, 28) and 3 not in ids and meta["n_left_out"] == 2
    aff2, ids2, meta2 = sim.compute(x, bad, SimilarityConfig(dense_max=10, n_neighbors=4))
    assert meta2["mode"] == "knn" and sp.issparse(aff2)
    np.testing.assert_array_equal(ids, ids2)
    for a, name in ((aff, "dense"), (aff2, "knn")):
        out = tmp_path / name
        sim.write(out, a, ids, meta)
        back, ids_back, meta_back = sim.read(out)
        np.testing.assert_array_equal(ids_back, ids)
        np.testing.assert_allclose(back.toarray() if sp.issparse(back) else np.asarray(back), a.toarray() if sp.issparse(a) else a)
        assert not list(tmp_path.glob(".*.tmp"))


def test_bad_input():
    x = vectors(n=10)
    with pytest.raises(QuantaError, match="row 2 of the gradients is zero"):
        y = x.copy()
        y[2] = 0
        sim.normalise(y)
    with pytest.raises(QuantaError, match="n_neighbors .* must be < the number of samples"):
        sim.knn_affinity(x, n_neighbors=10)
    with pytest.raises(QuantaError, match="at least 2"):
        sim.compute(x[:1], None, SimilarityConfig())
    with pytest.raises(QuantaError, match="run the similarity stage first"):
        sim.read("/nonexistent/similarity")


def test_large_n_search_in_svd_dimensions_keeps_exact_weights():
    # clustered vectors: the top singular directions carry the clusters, not the noise
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((6, 128))
    label = rng.integers(0, 6, 300)
    x = (centres[label] + 0.7 * rng.standard_normal((300, 128))).astype(np.float32)
    exact = sim.knn_affinity(x, n_neighbors=8, backend="sklearn")
    approx = sim.knn_affinity(x, n_neighbors=8, backend="sklearn", exact_max=100, knn_dim=12)
    dense = sim.dense_affinity(x)
    for g in (exact, approx):
        r, c = g.nonzero()
        assert (label[r] == label[c]).all()  # every edge inside a cluster, in both graphs
    # weights: max(0, 2A - 1) of the exact affinity, symmetrised; an edge chosen by one end
    # only weighs half
    r, c = approx.nonzero()
    off = r != c
    w = np.maximum(0, 2 * dense[r[off], c[off]] - 1)
    got = approx.toarray()[r[off], c[off]]
    assert np.all(np.isclose(got, w, atol=1e-5) | np.isclose(got, w / 2, atol=1e-5))
    # the neighbours found in 12 dimensions are nearly as similar as the exact ones
    assert approx.sum() > 0.97 * exact.sum()


def test_dense_beyond_dense_max_is_refused_naming_the_params():
    x = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    with pytest.raises(QuantaError, match=r"similarity.mode: dense with 30 samples > similarity.dense_max \(20\).*"
                                          r"similarity.mode: knn .*cluster.method: knn_average"):
        sim.compute(x, None, SimilarityConfig(mode="dense", dense_max=20))
    aff, _, meta = sim.compute(x, None, SimilarityConfig(mode="auto", dense_max=20, n_neighbors=5))
    assert meta["mode"] == "knn" and sp.issparse(aff)


def test_knn_from_dense_is_the_graph_knn_mode_builds():
    x = np.random.default_rng(1).normal(size=(80, 16)).astype(np.float32)
    from_x = sim.knn_affinity(x, n_neighbors=7)
    from_dense = sim.knn_from_dense(sim.dense_affinity(x), 7)
    assert (from_x != 0).toarray().tolist() == (from_dense != 0).toarray().tolist()
    np.testing.assert_allclose(from_x.toarray(), from_dense.toarray(), atol=2e-3)
