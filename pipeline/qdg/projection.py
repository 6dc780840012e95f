"""Random projection of exact per-target gradients, the same on every worker and shard.

Why this module exists: QDG compares gradients by cosine similarity. The paper kept the
full gradient (~19M fp32 numbers per sample for pythia-70m), which caps it at ~10^4
samples and forces recomputation. A Johnson-Lindenstrauss projection to k dimensions
(default 8192) keeps every inner product, hence every cosine, up to an error of about
``(1 - cos^2) / sqrt(k)`` (~0.011 at k = 8192), so 10^5-10^6 samples fit in memory. The
projection is applied to the *exact* per-target gradient (pipeline/qdg/gradients.py): it
changes how the gradient is stored, never how it is computed.

The projection (``sjlt``) is a sparse JL transform (Kane & Nelson, "Sparser
Johnson-Lindenstrauss transforms", JACM 2014, block construction; with ``nnz = 1`` it is
the CountSketch of Charikar, Chen & Farach-Colton 2002). It belongs to the family of
Achlioptas (2003) and the "very sparse" projections of Li, Hastie & Church (KDD 2006),
with the fewest non-zeros per input coordinate: each coordinate of the gradient is
added, with a random sign, to ``nnz`` of the k outputs (one in each of nnz groups of
k / nnz), scaled by 1/sqrt(nnz). So projecting costs O(nnz * P) per sample, and the
inner-product estimate is unbiased with variance ``(|x|^2 |y|^2 + <x,y>^2 - 2 sum_i
x_i^2 y_i^2) / k`` for nnz = 1: never worse than a dense Gaussian matrix.

How it stays small and deterministic. No (P x k) matrix exists, not even a sparse one
for the whole model: the gradient arrives one parameter tensor ("block") at a time, and
a block of d numbers is cut into chunks of k/nnz consecutive coordinates; within each
chunk the coordinates go to the buckets through a random *permutation* (so a chunk
never collides with itself) with random signs. Permutations and signs come from a
counter-based integer hash of (seed, parameter name, group, coordinate index), in exact
integer tensor arithmetic on the gradient's own device: the same numbers on CPU and GPU,
on any worker, whatever other parameters or samples a shard holds. Applying a chunk is
a gather, a sign flip and a fixed-order sum: no atomic scatter-adds, so results are
reproducible run to run on GPUs too.

``logra`` is a per-layer factored projection in the manner of LoGra (Choe et al., "What is
Your Data Worth to GPT? LLM-Scale Data Valuation with Influence Functions", 2024): a weight
block's exact gradient G (a x b) becomes ``P_a G P_b^T`` (r_a x r_b), with seeded Rademacher
matrices P_a (r_a x a) and P_b (r_b x b) scaled to keep squared norms in expectation; a side
of at most r numbers is kept exactly (P = I). It is the Kronecker product P_a (x) P_b applied
to vec(G), so it stores two small matrices per block instead of a hash table over all of its
coordinates, and it reads the gradient's layer structure. The price: a Kronecker JL has a
larger variance than an unstructured one of the same dimension (bench/RESULTS.md measures
it), so ``sjlt`` stays the default. Here it is applied to the exact per-target gradient, as
every projection in this module is; LoGra's own speed-up (projecting inputs and output
gradients before their outer product) is not taken.

``tensorsketch`` sketches a weight block's per-target gradient G = sum_t g_t x_t^T (rows r,
columns c) without forming it: a count sketch whose bucket adds across the two indices,
``h(r, c) = h_r(r) + h_c(c) mod k`` with sign ``s_r(r) s_c(c)``, turns each outer product into
the circular convolution of the count sketches of g_t and x_t, so the sketch of G is
``irfft(sum_t rfft(CS_r(g_t)) * rfft(CS_c(x_t)))`` (TensorSketch, Pham & Pagh, KDD 2013):
O(T (rows + cols + k log k)) per block instead of O(T rows cols), one inverse FFT per sample
and block group. The per-layer engine (pipeline/qdg/per_sample.py) hands it the factors
(:meth:`TensorSketchProjector.add_outer_`); a block given densely (:meth:`Projector.add_`) gets
the same numbers from the explicit hash. Each side's buckets are a keyed random injection
into [0, k) per chunk of k indices, so one side never collides with itself within a chunk, and
the signs are independent per side, so inner products stay unbiased (sum over blocks into one
k-vector, as sjlt does). The column side's tables depend on (seed, number of columns) only:
blocks that read the same input (q, k, v; gate, up) then share its FFT, and blocks stay
unbiased against each other through their independent row signs. Blocks that are not
matrices (biases, norms) take the sjlt path with the same seed.

``none`` keeps the exact gradient (P columns, in :func:`pipeline.qdg.gradients.select_params`
order): for tiny models and for tests.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Iterable, Literal, Mapping, Optional, Sequence, Union

import torch

from pipeline.core.config import PROJECTIONS  # noqa: F401  (the list lives in the config)
from pipeline.core.errors import QuantaError

ProjectionKind = Literal["none", "sjlt", "logra", "tensorsketch"]

_MASK32 = 0xFFFFFFFF


class ProjectionError(QuantaError, ValueError):
    """A projection that cannot be built as asked (bad k, unknown parameter name)."""


# --------------------------------------------------------------------------- counter-based hash


def block_key(seed: int, name: str, group: int, stream: int) -> tuple[int, int]:
    """Two 32-bit keys for one (seed, parameter name, group, stream).

    sha256 rather than Python's ``hash`` (salted per process) so that every worker
    derives the same keys; the keys depend on nothing but these four values.
    """
    digest = hashlib.sha256(f"quanta-sjlt|{seed}|{name}|{group}|{stream}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for int64 `a` in [0, 2^32): split `c` in 16-bit halves so no
    intermediate product reaches 2^63 (signed overflow is not something to rely on)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 values in [0, 2^32): a bijection with full
    avalanche. Integer ops only, so it gives the same bits on every device."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def hash_index(index: torch.Tensor, keys: tuple[int, int]) -> torch.Tensor:
    """A keyed bijective hash of int64 indices in [0, 2^32) to [0, 2^32)."""
    k1, k2 = keys
    return mix32(mix32((index + k1) & _MASK32) ^ k2)


# --------------------------------------------------------------------------- projectors


class Projector:
    """Projects per-sample gradients given one parameter block at a time.

    Linear, so the projection of a whole gradient is the sum of its blocks' projections:
    :meth:`add_` accumulates one block into an (n, dim) output, and :meth:`project`
    does a whole gradient from ``{name: (n, *param.shape)}``.
    """

    #: output columns per sample
    dim: int
    #: parameter name -> number of elements, for every block this projector accepts
    sizes: dict[str, int]
    #: True when :meth:`add_outer_` takes a weight's gradient as its factors, unformed
    factored: bool = False

    def add_(self, out: torch.Tensor, name: str, grad: torch.Tensor) -> None:
        """out (n, dim) += projection of block `name`; grad (n, *shape), any float dtype."""
        raise NotImplementedError

    def project(
        self, grads_by_param: Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]
    ) -> torch.Tensor:
        """(n, dim) float32: the projection of the gradient given as blocks.

        Blocks not given count as zero. Pass a generator to stream: each block can be
        freed as soon as it has been added.
        """
        items = grads_by_param.items() if isinstance(grads_by_param, Mapping) else grads_by_param
        out: Optional[torch.Tensor] = None
        for name, grad in items:
            if out is None:
                out = torch.zeros(grad.shape[0], self.dim, dtype=torch.float32, device=grad.device)
            self.add_(out, name, grad)
        if out is None:
            raise ProjectionError("project() got no gradient blocks")
        return out

    def add_outer_(self, out: torch.Tensor, x: torch.Tensor,
                   blocks: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """out (n, dim) += projection of the weight blocks ``G_name = sum_t g[:, t] x[:, t]^T``
        (rows, cols) for each (name, g) in `blocks`, which share the column factor
        x (n, T, cols); g (n, T, rows). Returns the (n,) squared norm of what was added,
        or raises where the projector needs the formed gradient (``factored`` is False)."""
        raise NotImplementedError(f"{type(self).__name__} takes formed gradients only")

    def limit_cache(self, nbytes: int) -> None:
        """Keep at most `nbytes` of tables between calls (a memory bound's share); the
        projection itself does not change."""

    def cache_room(self) -> int:
        """Bytes of tables this projector may still cache."""
        return 0

    def _size(self, name: str, grad: torch.Tensor) -> int:
        if name not in self.sizes:
            raise ProjectionError(f"parameter '{name}' is not one this projector was built for")
        d = self.sizes[name]
        if grad[0].numel() != d:
            raise ProjectionError(f"parameter '{name}': expected {d} numbers per sample, got {grad[0].numel()}")
        return d

    def describe(self) -> dict:
        """JSON-able settings, for the output's metadata."""
        raise NotImplementedError


class NoProjection(Projector):
    """The identity: the exact gradient, blocks side by side in the order given."""

    def __init__(self, sizes: Sequence[tuple[str, int]]):
        self.sizes = dict(sizes)
        self.slices: dict[str, slice] = {}
        offset = 0
        for name, d in sizes:
            self.slices[name] = slice(offset, offset + d)
            offset += d
        self.dim = offset

    def add_(self, out: torch.Tensor, name: str, grad: torch.Tensor) -> None:
        self._size(name, grad)
        out[:, self.slices[name]] += grad.reshape(grad.shape[0], -1).to(out.dtype)

    def describe(self) -> dict:
        return {"projection": "none", "dim": self.dim}


class SparseJLProjector(Projector):
    """Sparse JL (Kane-Nelson block construction) to `k` dims, see the module docstring.

    `nnz`: outputs per input coordinate (k must be a multiple). `cache_bytes`: device
    memory for caching each block's (index, sign) tables between calls; blocks beyond it
    are rehashed on every call (cheap next to computing the gradient), so memory does
    not grow with the model.
    """

    def __init__(
        self,
        sizes: Sequence[tuple[str, int]],
        k: int = 8192,
        seed: int = 0,
        nnz: int = 1,
        cache_bytes: int = 1 << 30,
    ):
        if k < 1 or nnz < 1 or k % nnz:
            raise ProjectionError(f"sjlt needs k >= 1 and nnz >= 1 dividing k; got k={k}, nnz={nnz}")
        self.sizes = dict(sizes)
        self.dim = k
        self.k = k
        self.seed = seed
        self.nnz = nnz
        self.width = k // nnz  # buckets per group
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached_bytes = 0

    def cache_room(self) -> int:
        return max(0, self.cache_bytes - self._cached_bytes)

    def limit_cache(self, nbytes: int) -> None:
        self.cache_bytes = min(self.cache_bytes, max(0, nbytes))
        while self._cache and self._cached_bytes > self.cache_bytes:
            source, sign = self._cache.pop(next(reversed(self._cache)))
            self._cached_bytes -= source.numel() * (source.element_size() + sign.element_size())

    def tables(self, name: str, group: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, sign) of block `name`, group `group`: both (n_chunks * width,).

        Output bucket b of chunk c takes input coordinate ``source[c * width + b]``
        times ``sign[c * width + b]`` (+1, -1, or 0 for the padding past the block's end).
        """
        key = (name, f"{group}|{device}")
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        d = self.sizes[name]
        w = self.width
        n_chunks = -(-d // w)
        slots = torch.arange(n_chunks * w, dtype=torch.int64, device=device)  # (n_chunks * w,)
        # A random permutation of each chunk: sort its slots by a keyed hash. The hash is
        # a bijection, so there are no ties and the order is the same on every device.
        # The slots past d (padding of the last chunk) are hashed too, so a short block
        # lands on random buckets rather than always on the first ones.
        order = hash_index(slots, block_key(self.seed, name, group, 0)).view(n_chunks, w).argsort(dim=1)
        source = (order + torch.arange(n_chunks, device=device)[:, None] * w).view(-1)
        sign_bits = hash_index(source, block_key(self.seed, name, group, 1)) & 1
        real = source < d
        # stored small (int32 indices, int8 signs: 5 bytes an entry, not 12), so the cache
        # holds 2.4x more of a large model; the values, and so the projection, are the same
        sign = torch.where(real, 1 - 2 * sign_bits, 0).to(torch.int8)
        source = torch.where(real, source, 0).to(torch.int32 if d < 2**31 else torch.int64)
        tables = (source, sign)
        size = source.numel() * (source.element_size() + sign.element_size())
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = tables
            self._cached_bytes += size
        return tables

    def add_(self, out: torch.Tensor, name: str, grad: torch.Tensor) -> None:
        self._size(name, grad)
        n = grad.shape[0]
        flat = grad.reshape(n, -1)  # (n, d)
        scale = self.nnz**-0.5
        for group in range(self.nnz):
            source, sign = self.tables(name, group, grad.device)
            # (n, n_chunks * width) -> (n, n_chunks, width) -> sum over chunks, fixed order
            picked = flat.index_select(1, source).to(torch.float32).mul_(sign)
            part = picked.view(n, -1, self.width).sum(dim=1)  # (n, width)
            cols = slice(group * self.width, (group + 1) * self.width)
            if self.nnz == 1:
                out += part
            else:
                out[:, cols] += part * scale

    def describe(self) -> dict:
        return {"projection": "sjlt", "dim": self.k, "seed": self.seed, "nnz": self.nnz, "hash": "fmix32x2-sha256"}


class LoGraProjector(Projector):
    """Per-block factored projection (module docstring, ``logra``) to at most `k` dims.

    `shapes`: [(name, shape)]. A block of shape (a, b) (more dims fold into b) gets
    r_a x r_b outputs with r_a = min(a, r), r_b = min(b, r); a 1-D block of d gets min(d, r).
    `rank` = r; None: the largest r whose total dimension fits in `k`.
    """

    def __init__(self, shapes: Sequence[tuple[str, Sequence[int]]], k: int = 8192, seed: int = 0, rank: Optional[int] = None):
        if k < 1:
            raise ProjectionError(f"logra needs k >= 1; got k={k}")
        self.shapes = {name: self._matrix_shape(shape) for name, shape in shapes}
        self.sizes = {name: a * b for name, (a, b) in self.shapes.items()}
        if not self.shapes:
            raise ProjectionError("logra got no parameter blocks")
        self.seed = seed
        self.k = k
        if rank is None:
            rank = 1
            while rank < 1 << 16 and self._total(rank + 1) <= k:
                rank += 1
        if rank < 1:
            raise ProjectionError(f"logra needs rank >= 1; got {rank}")
        self.rank = rank
        self.slices: dict[str, slice] = {}
        offset = 0
        for name, (a, b) in self.shapes.items():
            n_out = self._dims(a, b, rank)
            self.slices[name] = slice(offset, offset + n_out[0] * n_out[1])
            offset += n_out[0] * n_out[1]
        self.dim = offset
        self._cache: dict[tuple[str, int, str], Optional[torch.Tensor]] = {}

    @staticmethod
    def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
        shape = tuple(int(x) for x in shape)
        if len(shape) <= 1:
            return 1, (shape[0] if shape else 1)  # a vector: one row, projected along its length
        rest = 1
        for x in shape[1:]:
            rest *= x
        return shape[0], rest

    @staticmethod
    def _dims(a: int, b: int, r: int) -> tuple[int, int]:
        return min(a, r), min(b, r)

    def _total(self, r: int) -> int:
        return sum(x * y for x, y in (self._dims(a, b, r) for a, b in self.shapes.values()))

    def matrix(self, name: str, side: int, device: torch.device) -> Optional[torch.Tensor]:
        """P for `side` 0 (rows, a) or 1 (columns, b) of block `name`: (r_side, n_side)
        float32 of +-1/sqrt(r_side), or None where the side is kept exactly."""
        key = (name, side, str(device))
        if key in self._cache:
            return self._cache[key]
        n = self.shapes[name][side]
        r = min(n, self.rank)
        mat = None
        if r < n:
            idx = torch.arange(r * n, dtype=torch.int64, device=device)
            bits = hash_index(idx, block_key(self.seed, name, side, 2)) & 1
            mat = (1.0 - 2.0 * bits.to(torch.float32)).view(r, n) * r**-0.5
        self._cache[key] = mat
        return mat

    def add_(self, out: torch.Tensor, name: str, grad: torch.Tensor) -> None:
        self._size(name, grad)
        a, b = self.shapes[name]
        g = grad.reshape(grad.shape[0], a, b).to(torch.float32)  # (n, a, b)
        left, right = self.matrix(name, 0, grad.device), self.matrix(name, 1, grad.device)
        if right is not None:
            g = g @ right.T  # (n, a, r_b)
        if left is not None:
            g = left @ g  # (n, r_a, r_b)
        out[:, self.slices[name]] += g.reshape(g.shape[0], -1)

    def describe(self) -> dict:
        return {"projection": "logra", "dim": self.dim, "rank": self.rank, "seed": self.seed, "hash": "fmix32x2-sha256"}


class TensorSketchProjector(Projector):
    """TensorSketch of matrix blocks, sjlt of the rest, to `k` dims (module docstring).

    `shapes`: [(name, shape)]. A block of two or more dims is a matrix (rows = shape[0],
    columns = the rest folded); its sketch is ``sum_{r, c} s_r(r) s_c(c) G[r, c]`` into bucket
    ``(h_r(r) + h_c(c)) mod k``, unbiased for inner products (scale 1). Other blocks go to a
    :class:`SparseJLProjector` with the same k, seed and nnz. `chunk_elements` bounds the
    (samples, T, k) buffers of :meth:`add_outer_` (float32 elements, each held ~4 times).
    """

    factored = True

    def __init__(self, shapes: Sequence[tuple[str, Sequence[int]]], k: int = 8192, seed: int = 0, nnz: int = 1,
                 cache_bytes: int = 1 << 30, chunk_elements: int = 1 << 24):
        if k < 2:
            raise ProjectionError(f"tensorsketch needs k >= 2; got k={k}")
        self.shapes = {name: LoGraProjector._matrix_shape(shape) for name, shape in shapes}
        self.sizes = {name: a * b for name, (a, b) in self.shapes.items()}
        self.matrices = {name for name, shape in shapes if len(tuple(shape)) >= 2}
        self.rest = SparseJLProjector([(n, d) for n, d in self.sizes.items() if n not in self.matrices],
                                      k=k, seed=seed, nnz=nnz, cache_bytes=cache_bytes)
        self.dim = k
        self.k = k
        self.seed = seed
        self.nnz = nnz
        self.chunk_elements = chunk_elements
        self._sides: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._flat: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def limit_cache(self, nbytes: int) -> None:
        self.rest.limit_cache(nbytes)

    def cache_room(self) -> int:
        return self.rest.cache_room()

    def side(self, name: str, side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(bucket int64 (d,), sign float32 (d,)) of side 0 (rows) or 1 (columns) of block `name`.

        Indices [c k, (c + 1) k) go to the first d - c k slots of a keyed random permutation
        of the k buckets (their own per chunk c): injective within a chunk. The rows' key
        is (seed, name); the columns' is (seed, number of columns), shared by every block
        of that width so that blocks reading one input share its FFT (unbiased all the
        same: the row signs of two blocks are independent)."""
        rows, cols = self.shapes[name]
        d = (rows, cols)[side]
        key_name = name if side == 0 else f"columns:{cols}"
        key = (key_name, side, str(device))
        hit = self._sides.get(key)
        if hit is not None:
            return hit
        k = self.k
        slots = torch.arange(k, dtype=torch.int64, device=device)
        buckets = []
        for chunk in range(-(-d // k)):
            perm = hash_index(slots, block_key(self.seed, f"tensorsketch|{key_name}", chunk, 3 + side)).argsort()
            buckets.append(perm[: min(k, d - chunk * k)])
        bucket = torch.cat(buckets)
        bits = hash_index(torch.arange(d, dtype=torch.int64, device=device),
                          block_key(self.seed, f"tensorsketch|{key_name}", 0, 5 + side)) & 1
        tables = (bucket, (1 - 2 * bits).to(torch.float32))
        self._sides[key] = tables
        return tables

    def count_sketch(self, v: torch.Tensor, name: str, side: int) -> torch.Tensor:
        """(..., k): the count sketch of v (..., d) under one side's tables, in v's dtype.
        Each chunk's buckets are distinct, so every index_add_ writes a bucket once: the
        same sums, in the same order, on every device."""
        bucket, sign = self.side(name, side, v.device)
        out = torch.zeros(*v.shape[:-1], self.k, dtype=v.dtype, device=v.device)
        signed = v * sign.to(v.dtype)
        for a in range(0, v.shape[-1], self.k):
            out.index_add_(-1, bucket[a : a + self.k], signed[..., a : a + self.k])
        return out

    def sketch_outer(self, x: torch.Tensor, blocks: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """(n, k) in x's dtype: the sketch of sum over `blocks` of G = sum_t g[:, t] x[:, t]^T.

        x (n, T, cols), each g (n, T, rows). Summing the row sides' spectra before the
        product is exact (the product is linear in them); the sum over t is in the
        frequency domain, so there is one inverse FFT per sample."""
        n, T, _ = x.shape
        out = torch.empty(n, self.k, dtype=x.dtype, device=x.device)
        step = max(1, self.chunk_elements // max(1, T * self.k))
        col_name = blocks[0][0]
        for a in range(0, n, step):
            b = min(n, a + step)
            spec = torch.fft.rfft(self.count_sketch(x[a:b], col_name, 1), dim=-1)  # (c, T, k // 2 + 1)
            rows = None
            for name, g in blocks:
                cs = self.count_sketch(g[a:b].to(x.dtype), name, 0)  # (c, T, k)
                rows = cs if rows is None else rows.add_(cs)
            spec.mul_(torch.fft.rfft(rows, dim=-1))
            del rows
            out[a:b] = torch.fft.irfft(spec.sum(dim=1), n=self.k, dim=-1)  # (c, k)
        return out

    def add_outer_(self, out: torch.Tensor, x: torch.Tensor,
                   blocks: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
        for name, g in blocks:
            if name not in self.matrices:
                raise ProjectionError(f"parameter '{name}' is not a matrix block of this projector")
            if tuple(g.shape[-1:] + x.shape[-1:]) != self.shapes[name]:
                raise ProjectionError(f"parameter '{name}': factors of {g.shape[-1]} x {x.shape[-1]}, "
                                      f"expected {self.shapes[name]}")
        part = self.sketch_outer(x, blocks).to(out.dtype)
        out += part
        return part.pow(2).sum(dim=1)

    def flat_tables(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, sign, ends) of matrix block `name`: its flat coordinates sorted by bucket,
        their signs in that order, and each bucket's end in it, (k + 1,) from 0."""
        key = (name, str(device))
        hit = self._flat.get(key)
        if hit is not None:
            return hit
        (hr, sr), (hc, sc) = self.side(name, 0, device), self.side(name, 1, device)
        bucket = ((hr[:, None] + hc[None, :]) % self.k).reshape(-1)  # (rows * cols,)
        order = bucket.argsort(stable=True)
        sign = (sr[:, None] * sc[None, :]).reshape(-1)[order].to(torch.int8)
        order = order.to(torch.int32 if order.numel() < 2**31 else torch.int64)
        counts = torch.bincount(bucket, minlength=self.k)
        ends = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        tables = (order, sign, ends)
        self._flat[key] = tables
        return tables

    def add_(self, out: torch.Tensor, name: str, grad: torch.Tensor) -> None:
        if name not in self.matrices:
            self.rest.add_(out, name, grad)
            return
        self._size(name, grad)
        n = grad.shape[0]
        order, sign, ends = self.flat_tables(name, grad.device)
        # a bucket's sum as a difference of float64 prefix sums: no scatter, so the same
        # order of additions on every device
        vals = grad.reshape(n, -1).index_select(1, order).to(torch.float64) * sign.to(torch.float64)
        prefix = torch.cat([vals.new_zeros(n, 1), vals.cumsum(dim=1)], dim=1)  # (n, rows * cols + 1)
        out += (prefix[:, ends[1:]] - prefix[:, ends[:-1]]).to(out.dtype)

    def describe(self) -> dict:
        return {"projection": "tensorsketch", "dim": self.k, "seed": self.seed, "nnz": self.nnz,
                "hash": "fmix32x2-sha256", "norms": "weight blocks' share estimated from their sketch"}


class StackedProjector(Projector):
    """Several projections of the same gradient side by side: columns [0, d_0) are the
    first projector's, [d_0, d_0 + d_1) the second's, and so on.

    The gradients stage projects each exact per-sample gradient with extra seeds
    (``gradients.stability_seeds``) in the same pass: what the random projection alone
    changes in the clustering costs a projection, not another backward. The first
    projector's columns are bit for bit what it gives alone.
    """

    def __init__(self, projectors: Sequence[Projector]):
        if not projectors:
            raise ProjectionError("StackedProjector needs at least one projector")
        self.parts = list(projectors)
        self.sizes = dict(self.parts[0].sizes)
        self.offsets = [0, *itertools.accumulate(p.dim for p in self.parts)]
        self.dim = self.offsets[-1]
        self.factored = all(p.factored for p in self.parts)

    def add_(self, out: torch.Tensor, name: str, grad: torch.Tensor) -> None:
        for p, a, b in zip(self.parts, self.offsets[:-1], self.offsets[1:]):
            p.add_(out[:, a:b], name, grad)

    def add_outer_(self, out: torch.Tensor, x: torch.Tensor,
                   blocks: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """Each part's projection of the factored blocks; the first part's squared norm."""
        norms = [p.add_outer_(out[:, a:b], x, blocks) for p, a, b in zip(self.parts, self.offsets[:-1], self.offsets[1:])]
        return norms[0]

    def limit_cache(self, nbytes: int) -> None:
        for p in self.parts:
            p.limit_cache(nbytes // len(self.parts))

    def cache_room(self) -> int:
        return sum(p.cache_room() for p in self.parts)

    def describe(self) -> dict:
        """The first projector's settings, with the extra copies' seeds and their columns."""
        return {**self.parts[0].describe(), "stability_seeds": [p.seed for p in self.parts[1:]],
                "stacked_dim": self.dim}


def make_projector(
    kind: str,
    sizes: Sequence[tuple[str, int]],
    *,
    k: int = 8192,
    seed: int = 0,
    nnz: int = 1,
    shapes: Optional[Sequence[tuple[str, Sequence[int]]]] = None,
) -> Projector:
    """The projector `kind` ("none", "sjlt", "logra" or "tensorsketch") for parameter blocks
    `sizes` = [(name, numel)]; logra and tensorsketch also need their `shapes` = [(name, shape)]."""
    if kind == "logra":
        if shapes is None:
            raise ProjectionError("logra needs the parameters' shapes (make_projector(..., shapes=...))")
        return LoGraProjector(shapes, k=k, seed=seed)
    if kind == "tensorsketch":
        if shapes is None:
            raise ProjectionError("tensorsketch needs the parameters' shapes (make_projector(..., shapes=...))")
        return TensorSketchProjector(shapes, k=k, seed=seed, nnz=nnz)
    if kind == "none":
        return NoProjection(sizes)
    if kind == "sjlt":
        return SparseJLProjector(sizes, k=k, seed=seed, nnz=nnz)
    raise ProjectionError(f"unknown projection '{kind}'; use one of {', '.join(PROJECTIONS)}")
