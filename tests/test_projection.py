"""The sparse JL projection: its hash against an independent reference, its structure
(each coordinate lands on nnz buckets, a chunk never collides with itself), determinism
across projector instances, parameter subsets and devices (what shards on different
workers rely on), a pinned golden table (so a silent change of the hash cannot
desynchronise old and new shards), unbiasedness, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.qdg import projection
from pipeline.qdg.projection import (
    LoGraProjector,
    NoProjection,
    ProjectionError,
    SparseJLProjector,
    StackedProjector,
    TensorSketchProjector,
    make_projector,
)


def fmix32_reference(x: int) -> int:
    """MurmurHash3's fmix32 in plain Python integers (the textbook definition)."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_mix32_matches_murmur3_fmix32_and_is_a_bijection():
    xs = [0, 1, 2, 3, 12345, 2**31 - 1, 2**31, 2**32 - 1] + list(np.random.default_rng(0).integers(0, 2**32, 200))
    got = projection.mix32(torch.tensor([int(x) for x in xs], dtype=torch.int64)).tolist()
    assert got == [fmix32_reference(int(x)) for x in xs]
    assert got[1] == 0x514E28B7  # the published fmix32(1)
    # a bijection: no ties when a chunk's slots are sorted by it
    many = projection.hash_index(torch.arange(1 << 16), (7, 11))
    assert len(torch.unique(many)) == 1 << 16


def test_golden_table_is_pinned():
    # Changing the hash would make shards computed before and after the change
    # incomparable; this pins one table (seed 0, name "w", d = 10, k = 8).
    p = SparseJLProjector([("w", 10)], k=8, seed=0)
    source, sign = p.tables("w", 0, torch.device("cpu"))
    assert source.tolist() == [6, 1, 5, 7, 3, 0, 4, 2, 0, 0, 0, 0, 8, 0, 0, 9]
    assert sign.tolist() == [-1, 1, -1, -1, -1, 1, -1, 1, 0, 0, 0, 0, -1, 0, 0, -1]


@pytest.mark.parametrize("nnz", [1, 2, 4])
def test_each_coordinate_lands_on_nnz_buckets(nnz):
    d, k = 1000, 64
    p = SparseJLProjector([("w", d)], k=k, seed=3, nnz=nnz)
    eye = torch.eye(d)  # row i = basis vector e_i, so row i of the output is column i of the matrix
    m = p.project({"w": eye})  # (d, k)
    nonzero = m != 0
    assert (nonzero.sum(1) == nnz).all()
    assert torch.allclose(m[nonzero].abs(), torch.full((int(nonzero.sum()),), nnz**-0.5))
    # one bucket per group of k / nnz
    for g in range(nnz):
        assert (nonzero[:, g * k // nnz : (g + 1) * k // nnz].sum(1) == 1).all()
    # within a chunk of k / nnz consecutive coordinates, a permutation: no self-collisions
    w = k // nnz
    buckets = nonzero[:, :w].float().argmax(1)
    for c in range(d // w):
        assert len(torch.unique(buckets[c * w : (c + 1) * w])) == w


def test_same_block_same_projection_on_any_worker():
    # A worker that selects other parameters, in another order, with other samples,
    # must project a shared parameter identically (bit for bit).
    rng = torch.Generator().manual_seed(0)
    g_attn = torch.randn(5, 7, 3, generator=rng)
    a = SparseJLProjector([("mlp.w", 100), ("attn.w", 21)], k=16, seed=9)
    b = SparseJLProjector([("attn.w", 21), ("other", 4)], k=16, seed=9)
    out_a = torch.zeros(5, 16)
    out_b = torch.zeros(5, 16)
    a.add_(out_a, "attn.w", g_attn)
    b.add_(out_b, "attn.w", g_attn)
    assert torch.equal(out_a, out_b)
    # one sample alone gives the same row as in a batch
    alone = torch.zeros(1, 16)
    b.add_(alone, "attn.w", g_attn[2:3])
    assert torch.equal(alone[0], out_a[2])
    # another seed is another projection
    c = SparseJLProjector([("attn.w", 21)], k=16, seed=10)
    assert not torch.equal(c.project({"attn.w": g_attn}), out_a)


def test_cache_off_gives_the_same_tables():
    sizes = [("a", 300), ("b", 50)]
    x = {"a": torch.randn(4, 300), "b": torch.randn(4, 50)}
    cached = SparseJLProjector(sizes, k=32, seed=1).project(x)
    uncached = SparseJLProjector(sizes, k=32, seed=1)
    uncached.cache_bytes = 0
    assert torch.equal(uncached.project(x), cached)
    assert uncached._cached_bytes == 0


def test_inner_products_unbiased_and_concentrated():
    # Over independent seeds the estimate <Sx, Sy> averages to <x, y>; its spread is
    # about sqrt((|x|^2 |y|^2 + <x,y>^2) / k) (CountSketch variance).
    d, k = 4000, 256
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(d, generator=gen)
    y = 0.5 * x + torch.randn(d, generator=gen)
    est = []
    for seed in range(200):
        p = SparseJLProjector([("v", d)], k=k, seed=seed)
        s = p.project({"v": torch.stack([x, y])})
        est.append(float(s[0] @ s[1]))
    est = np.array(est)
    true = float(x @ y)
    sd = np.sqrt((float(x @ x) * float(y @ y) + true**2) / k)
    assert abs(est.mean() - true) < 4 * sd / np.sqrt(len(est))
    assert 0.7 * sd < est.std() < 1.3 * sd


def test_no_projection_concatenates_in_order():
    p = NoProjection([("a", 3), ("b", 2)])
    assert p.dim == 5
    out = p.project([("b", torch.tensor([[1.0, 2.0]])), ("a", torch.tensor([[3.0, 4.0, 5.0]]))])
    assert out.tolist() == [[3.0, 4.0, 5.0, 1.0, 2.0]]


def test_errors():
    with pytest.raises(ProjectionError, match="dividing k"):
        SparseJLProjector([("a", 3)], k=10, nnz=3)
    p = make_projector("sjlt", [("a", 3)], k=4)
    with pytest.raises(ProjectionError, match="'b' is not one"):
        p.add_(torch.zeros(1, 4), "b", torch.zeros(1, 3))
    with pytest.raises(ProjectionError, match="expected 3 numbers"):
        p.add_(torch.zeros(1, 4), "a", torch.zeros(1, 4))
    with pytest.raises(ProjectionError, match="unknown projection 'gauss'"):
        make_projector("gauss", [("a", 3)])
    with pytest.raises(ProjectionError, match="no gradient blocks"):
        p.project({})


# --------------------------------------------------------------------------- logra


def test_logra_is_the_kronecker_projection_of_each_block():
    shapes = [("w", (6, 10)), ("b", (6,)), ("small", (3, 2))]
    p = LoGraProjector(shapes, k=1000, rank=4)
    assert p.rank == 4 and p.dim == 4 * 4 + 4 + 3 * 2  # w: 4x4; b: 4; small: kept whole
    gen = torch.Generator().manual_seed(0)
    g = {name: torch.randn(2, *shape, generator=gen) for name, shape in shapes}
    out = p.project(g)
    L, R = p.matrix("w", 0, torch.device("cpu")), p.matrix("w", 1, torch.device("cpu"))
    assert L.shape == (4, 6) and R.shape == (4, 10)
    assert set(L.abs().unique().tolist()) == {0.5}  # Rademacher / sqrt(r)
    want_w = torch.einsum("ia,nab,jb->nij", L, g["w"], R).reshape(2, -1)
    np.testing.assert_allclose(out[:, p.slices["w"]], want_w, rtol=1e-5, atol=1e-6)
    # a vector is one row: only its length is projected
    Rb = p.matrix("b", 1, torch.device("cpu"))
    assert p.matrix("b", 0, torch.device("cpu")) is None
    np.testing.assert_allclose(out[:, p.slices["b"]], g["b"] @ Rb.T, rtol=1e-5, atol=1e-6)
    # a side no longer than the rank is kept exactly
    assert p.matrix("small", 0, torch.device("cpu")) is None and p.matrix("small", 1, torch.device("cpu")) is None
    np.testing.assert_array_equal(out[:, p.slices["small"]], g["small"].reshape(2, -1))


def test_logra_picks_the_largest_rank_within_k_and_is_deterministic():
    shapes = [("a", (64, 32)), ("b", (32, 64)), ("c", (64,))]
    p = LoGraProjector(shapes, k=600)
    r = p.rank  # 2 r^2 + r <= 600 < 2 (r+1)^2 + (r+1)
    assert 2 * r * r + r <= 600 < 2 * (r + 1) ** 2 + (r + 1) and p.dim == 2 * r * r + r
    g = {name: torch.randn(3, *shape) for name, shape in shapes}
    again = LoGraProjector(list(reversed(shapes)), k=600)  # another worker, other block order
    np.testing.assert_array_equal(
        p.project(g)[:, p.slices["a"]], again.project(g)[:, again.slices["a"]]
    )
    other = LoGraProjector(shapes, k=600, seed=1)
    assert not torch.equal(p.matrix("a", 0, torch.device("cpu")), other.matrix("a", 0, torch.device("cpu")))


def test_logra_inner_products_are_unbiased():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24, 40, generator=gen)
    y = 0.5 * x + torch.randn(24, 40, generator=gen)
    est = []
    for seed in range(300):
        p = LoGraProjector([("w", (24, 40))], k=64, seed=seed)
        s = p.project({"w": torch.stack([x, y])})
        est.append(float(s[0] @ s[1]))
    est = np.array(est)
    true = float((x * y).sum())
    assert abs(est.mean() - true) < 4 * est.std() / np.sqrt(len(est))
    assert est.std() < abs(true)  # and informative: the estimate's spread is below the value


def test_logra_errors():
    with pytest.raises(ProjectionError, match="needs the parameters' shapes"):
        make_projector("logra", [("a", 3)])
    p = make_projector("logra", [("a", 6)], shapes=[("a", (2, 3))], k=4)
    with pytest.raises(ProjectionError, match="expected 6 numbers"):
        p.add_(torch.zeros(1, p.dim), "a", torch.zeros(1, 5))
    with pytest.raises(ProjectionError, match="k >= 1"):
        LoGraProjector([("a", (2, 3))], k=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tables_identical_on_gpu():
    p = SparseJLProjector([("w", 100_003)], k=8192, seed=5, nnz=2)
    for group in range(2):
        cpu = p.tables("w", group, torch.device("cpu"))
        gpu = p.tables("w", group, torch.device("cuda"))
        assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
    x = torch.randn(3, 100_003, dtype=torch.float64)
    out_cpu = p.project({"w": x})
    out_gpu = p.project({"w": x.cuda()}).cpu()
    assert torch.allclose(out_cpu, out_gpu, rtol=1e-5, atol=1e-5)


def test_stacked_projector_columns_are_each_projectors_own():
    sizes = [("a", 300), ("b", 77)]
    grads = {"a": torch.randn(4, 300), "b": torch.randn(4, 77)}
    parts = [SparseJLProjector(sizes, k=64, seed=s) for s in (0, 5)]
    stacked = StackedProjector(parts).project(grads)
    assert stacked.shape == (4, 128)
    assert torch.equal(stacked[:, :64], parts[0].project(grads))
    assert torch.equal(stacked[:, 64:], parts[1].project(grads))
    assert StackedProjector(parts).describe()["stability_seeds"] == [5]


# --------------------------------------------------------------------------- tensorsketch


def explicit_tensorsketch(p: TensorSketchProjector, name: str, G: torch.Tensor) -> torch.Tensor:
    """The count sketch of a formed (n, rows, cols) gradient, from the definition: entry
    (r, c) goes to bucket (h_r(r) + h_c(c)) mod k with sign s_r(r) s_c(c). Plain loops."""
    cpu = torch.device("cpu")
    (hr, sr), (hc, sc) = p.side(name, 0, cpu), p.side(name, 1, cpu)
    out = torch.zeros(G.shape[0], p.k, dtype=G.dtype)
    for r in range(G.shape[1]):
        for c in range(G.shape[2]):
            out[:, (int(hr[r]) + int(hc[c])) % p.k] += float(sr[r] * sc[c]) * G[:, r, c]
    return out


@pytest.mark.parametrize("k", [16, 7])  # 7: a side of 9 > k, in two chunks
def test_tensorsketch_of_factors_is_the_count_sketch_of_the_formed_gradient(k):
    shapes = [("q", (5, 9)), ("v", (3, 9)), ("o", (4, 6)), ("bias", (5,))]
    p = TensorSketchProjector(shapes, k=k, seed=2)
    gen = torch.Generator().manual_seed(0)
    n, T = 3, 4
    x = torch.randn(n, T, 9, dtype=torch.float64, generator=gen)  # one input read by q and v
    gq, gv = (torch.randn(n, T, d, dtype=torch.float64, generator=gen) for d in (5, 3))
    Gq, Gv = (torch.einsum("ntr,ntc->nrc", g, x) for g in (gq, gv))  # sum_t g_t x_t^T
    want = explicit_tensorsketch(p, "q", Gq) + explicit_tensorsketch(p, "v", Gv)
    got = p.sketch_outer(x, [("q", gq), ("v", gv)])
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-12)
    # the formed gradient through add_ (the dense path) gives the same numbers
    dense = torch.zeros(n, k, dtype=torch.float64)
    p.add_(dense, "q", Gq)
    p.add_(dense, "v", Gv)
    np.testing.assert_allclose(dense.numpy(), want.numpy(), rtol=0, atol=1e-12)
    # add_outer_ adds into a float32 output and returns the squared norm of what it added
    out = torch.zeros(n, k)
    sq = p.add_outer_(out, x.float(), [("q", gq.float()), ("v", gv.float())])
    np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sq.numpy(), (want**2).sum(1).numpy(), rtol=1e-4)
    # a non-matrix block takes the sjlt path with the same seed
    b = torch.randn(n, 5, generator=gen)
    got_b, want_b = torch.zeros(n, k), torch.zeros(n, k)
    p.add_(got_b, "bias", b)
    SparseJLProjector([("bias", 5)], k=k, seed=2).add_(want_b, "bias", b)
    assert torch.equal(got_b, want_b)


def test_tensorsketch_is_deterministic_across_instances_and_parameter_subsets():
    shapes = [("a.weight", (6, 10)), ("b.weight", (4, 10)), ("c.weight", (10, 8))]
    x = torch.randn(2, 5, 10)
    g = torch.randn(2, 5, 6)
    one = TensorSketchProjector(shapes, k=32, seed=5).sketch_outer(x, [("a.weight", g)])
    again = TensorSketchProjector(shapes, k=32, seed=5).sketch_outer(x, [("a.weight", g)])
    subset = TensorSketchProjector(shapes[:1], k=32, seed=5).sketch_outer(x, [("a.weight", g)])
    other = TensorSketchProjector(shapes, k=32, seed=6).sketch_outer(x, [("a.weight", g)])
    assert torch.equal(one, again) and torch.equal(one, subset)
    assert not torch.equal(one, other)
    made = make_projector("tensorsketch", [(n, int(np.prod(s))) for n, s in shapes], k=32, seed=5, shapes=shapes)
    assert torch.equal(made.sketch_outer(x, [("a.weight", g)]), one)
    assert made.describe()["projection"] == "tensorsketch" and made.factored
    with pytest.raises(ProjectionError, match="shapes"):
        make_projector("tensorsketch", [("a.weight", 60)], k=32)


def test_tensorsketch_inner_products_are_unbiased_over_seeds():
    """Over 2,000 seeds, the mean sketched inner product of two two-block gradients (the
    blocks share their column tables, as q and v do) is within 4 standard errors of the
    exact one, and so is the mean squared norm. A biased estimator (e.g. shared row
    signs, a scale off by a few %) fails: the standard error here is ~1% of the values."""
    gen = torch.Generator().manual_seed(1)
    shapes = [("p", (7, 9)), ("q", (5, 9))]
    n, T, k = 2, 3, 16
    x = torch.randn(n, T, 9, dtype=torch.float64, generator=gen)
    x[1] += 0.8 * x[0]  # correlated samples: the inner product is far from 0
    gp = torch.randn(n, T, 7, dtype=torch.float64, generator=gen)
    gq = torch.randn(n, T, 5, dtype=torch.float64, generator=gen)
    gp[1] += 0.8 * gp[0]
    gq[1] += 0.8 * gq[0]
    exact = torch.cat([torch.einsum("ntr,ntc->nrc", g, x).reshape(n, -1) for g in (gp, gq)], dim=1)
    true_ip, true_sq = float(exact[0] @ exact[1]), float(exact[0] @ exact[0])
    ips, sqs = [], []
    for seed in range(2000):
        s = TensorSketchProjector(shapes, k=k, seed=seed).sketch_outer(x, [("p", gp), ("q", gq)])
        ips.append(float(s[0] @ s[1]))
        sqs.append(float(s[0] @ s[0]))
    for est, true in ((np.array(ips), true_ip), (np.array(sqs), true_sq)):
        se = est.std() / np.sqrt(len(est))
        assert abs(est.mean() - true) <= 4 * se, (est.mean(), true, se)
        assert se <= 0.05 * abs(true)  # the test has power: its tolerance is a few % of the value
