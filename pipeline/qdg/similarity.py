"""Cosine similarity of per-sample gradients, and the affinity spectral clustering reads.

Why this module exists: QDG clusters samples by the cosine similarity C of their
gradients. The paper built the dense N x N matrix and turned it into an affinity with
1 - arccos(C)/pi (angular; it is 1 for identical directions, 1/2 for orthogonal ones,
0 for opposite ones). Dense is right up to ~10^4 samples (10^4 x 10^4 float32 = 400 MB);
at 10^5 it is 40 GB. Above ``dense_max`` this module builds a sparse, symmetrised
k-nearest-neighbour graph instead (the standard input of spectral clustering at scale),
with faiss when it is installed and scikit-learn otherwise: exact up to ``knn_exact_max``
samples, and above that among candidates found in ``knn_dim`` SVD dimensions, whose exact
cosines then weigh the edges (bench/RESULTS.md has the recall).

Edge weights in kNN mode. Every sample gets n_neighbors edges, wanted or not. The angular
affinity scores orthogonal gradients 1/2, so a sample of a small cluster, whose 30 nearest
neighbours are mostly strangers, would tie itself to them at half the strength of a true
match and bridge clusters. In a dense matrix that floor is a constant shift spectral
clustering shrugs off; in a sparse graph it is not. So kNN edges weigh ``max(0, 2A - 1)``:
the affinity rescaled so that orthogonal is 0 and identical is 1 (for angular,
1 - 2 arccos(C)/pi; for shifted, max(0, C)), symmetrised as (W + W^T)/2, scikit-learn's
convention for kNN graphs. On synthetic clusters (bench/bench_cluster.py; 3,000 samples,
50 Zipf-sized clusters, within-cluster cosine 0.3 / 0.6 / 0.9) this took the ARI of
spectral clustering from 0.33 / 0.33 / 0.37 with raw angular weights to 0.68 / 0.68 / 0.99.

Everything is float32 and blockwise: the working set of one block is bounded by
``memory_gb`` (the output itself excepted, which is N^2 floats in dense mode and about
N * 2 * n_neighbors in kNN mode).

Outputs (a folder, so that one DVC out serves both modes): ``affinity.npy`` (dense,
float32, N x N) or ``affinity.npz`` (scipy CSR), ``samples.npy`` (the sample ids of its
rows: bad samples, whose gradients are zero or not finite, are left out) and
``meta.json``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import scipy.sparse as sp

from pipeline.core import files
from pipeline.core.config import SimilarityConfig, to_dict
from pipeline.core.errors import QuantaError

try:  # tqdm is a dependency; the guard keeps the library importable in odd environments
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


def normalise(grads: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (N, dim). Zero rows are an error: drop them first.

    inplace: scale `grads` itself when it is a float32 array we own (no second N x dim copy).
    """
    x = np.asarray(grads, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # (N, 1), without an N x dim temporary
    if (norms == 0).any() or not np.isfinite(norms).all():
        i = int(np.flatnonzero((norms[:, 0] == 0) | ~np.isfinite(norms[:, 0]))[0])
        raise QuantaError(f"row {i} of the gradients is zero or not finite; leave bad samples out before normalising")
    if inplace and x is grads and x.flags.writeable:
        x /= norms
        return x
    return x / norms


def to_affinity(c: np.ndarray, kind: str) -> np.ndarray:
    """Cosine similarities -> affinities in [0, 1], in place on float32 `c`, and returned."""
    np.clip(c, -1.0, 1.0, out=c)
    if kind == "angular":  # 1 - arccos(C)/pi, the paper's
        np.arccos(c, out=c)
        c *= np.float32(-1.0 / math.pi)
        c += np.float32(1.0)
    elif kind == "shifted":  # (1 + C)/2
        c += np.float32(1.0)
        c *= np.float32(0.5)
    else:
        raise QuantaError(f"similarity.affinity must be 'angular' or 'shifted', got {kind!r}")
    return c


def cosines_from_affinity(aff: np.ndarray, kind: str) -> np.ndarray:
    """The cosine similarities behind a dense affinity (the inverse of :func:`to_affinity`),
    as a new float32 array: cos(pi (1 - A)) for angular, 2A - 1 for shifted."""
    a = np.asarray(aff, dtype=np.float32)
    if kind == "angular":
        return np.cos(np.float32(math.pi) * (np.float32(1.0) - a))
    if kind == "shifted":
        return np.float32(2.0) * a - np.float32(1.0)
    raise QuantaError(f"similarity.affinity must be 'angular' or 'shifted', got {kind!r}")


def block_rows(n: int, dim: int, memory_gb: float) -> int:
    """Rows per block so that one (rows x n) product plus its (rows x dim) operand fit in memory_gb."""
    per_row = 4 * (n + dim)
    return max(1, min(n, int(memory_gb * 2**30 // per_row)))


def cosine(x: np.ndarray, memory_gb: float = 2.0, progress: bool = False) -> np.ndarray:
    """Dense cosine-similarity matrix (N, N) float32 of the rows of `x` (normalised here)."""
    x = normalise(x)
    n = len(x)
    out = np.empty((n, n), dtype=np.float32)
    step = block_rows(n, x.shape[1], memory_gb)
    starts = range(0, n, step)
    if progress and tqdm is not None:
        starts = tqdm(starts, desc="similarity", unit="block", total=math.ceil(n / step))
    for s in starts:
        np.matmul(x[s : s + step], x.T, out=out[s : s + step])
    # exact symmetry (the two triangles come from different BLAS calls) and exact 1 on the diagonal
    out += out.T
    out *= np.float32(0.5)
    np.fill_diagonal(out, 1.0)
    return out


def dense_affinity(x: np.ndarray, kind: str = "angular", memory_gb: float = 2.0, progress: bool = False) -> np.ndarray:
    """The dense affinity (N, N) float32 of the rows of `x`."""
    return to_affinity(cosine(x, memory_gb, progress), kind)


def _search(x: np.ndarray, k: int, backend: str, memory_gb: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-(k+1) inner products of each row of unit-norm `x` against all rows (self included)."""
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(x.shape[1])  # brute force on BLAS, exact
        index.add(x)
        return index.search(x, k + 1)
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(x)
    step = block_rows(len(x), x.shape[1], memory_gb)
    sims, nbrs = [], []
    for s in range(0, len(x), step):
        d, i = nn.kneighbors(x[s : s + step])
        sims.append(1.0 - d)
        nbrs.append(i)
    return np.vstack(sims).astype(np.float32), np.vstack(nbrs)


def _reduced_candidates(x: np.ndarray, k: int, dim: int, backend: str, memory_gb: float, seed: int) -> np.ndarray:
    """(N, 2k + 1) candidate neighbours of each row, searched in `dim` SVD dimensions.

    Exact search in 8192 dimensions costs N^2 * 8192 flops: 8e13 at N = 10^5, ~15 minutes
    on 2 cores. The top singular directions of the gradients keep what separates them
    (the clusters), so the search runs there; the candidates' exact cosines are taken
    afterwards (:func:`knn_affinity`).
    """
    from sklearn.decomposition import TruncatedSVD

    z = TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=4, random_state=seed).fit_transform(x)
    z = normalise(np.ascontiguousarray(z, dtype=np.float32), inplace=True)
    return _search(z, 2 * k, backend, memory_gb)[1]


def _exact_sims(x: np.ndarray, cand: np.ndarray, block: int = 256) -> np.ndarray:
    """(N, c) inner products of each row of `x` with its candidate rows `cand` (N, c)."""
    out = np.empty(cand.shape, dtype=np.float32)
    for s in range(0, len(x), block):
        c = cand[s : s + block]
        out[s : s + block] = np.einsum("bd,bcd->bc", x[s : s + block], x[c])
    return out


def knn_affinity(
    x: np.ndarray,
    n_neighbors: int = 30,
    kind: str = "angular",
    backend: str = "auto",
    memory_gb: float = 2.0,
    exact_max: int = 20_000,
    knn_dim: int = 256,
    seed: int = 0,
    owned: bool = False,
) -> sp.csr_matrix:
    """Sparse symmetrised kNN affinity (N, N) CSR float32 of the rows of `x`.

    Each sample keeps its `n_neighbors` most similar others, weighted max(0, 2A - 1) for
    the affinity A of `kind`; the graph is (W + W^T)/2 and the diagonal is 1. Up to
    `exact_max` samples the search is exact; above, neighbours are searched among 2k
    candidates found in `knn_dim` SVD dimensions (:func:`_reduced_candidates`), and the
    edge weights are the exact cosines. owned: `x` may be normalised in place (the
    caller's copy; saves N x dim floats).
    """
    x = normalise(x, inplace=owned)
    n = len(x)
    if n_neighbors >= n:
        raise QuantaError(f"similarity.n_neighbors ({n_neighbors}) must be < the number of samples ({n})")
    if backend == "auto":
        try:
            import faiss  # noqa: F401

            backend = "faiss"
        except ImportError:
            backend = "sklearn"
    if backend not in ("faiss", "sklearn"):
        raise QuantaError(f"similarity.knn_backend must be auto, faiss or sklearn, got {backend!r}")
    if n <= exact_max or knn_dim >= x.shape[1]:
        sims, nbrs = _search(x, n_neighbors, backend, memory_gb)
    else:  # neighbours found in knn_dim SVD dimensions; their cosines are exact
        cand = _reduced_candidates(x, n_neighbors, knn_dim, backend, memory_gb, seed)
        exact = _exact_sims(x, cand)
        keep = np.argsort(-exact, axis=1, kind="stable")[:, : n_neighbors + 1]
        nbrs = np.take_along_axis(cand, keep, axis=1)
        sims = np.take_along_axis(exact, keep, axis=1)
    return _graph(nbrs, to_affinity(sims.astype(np.float32), kind))


def _graph(nbrs: np.ndarray, aff: np.ndarray) -> sp.csr_matrix:
    """The kNN affinity from each row's neighbours (N, c) and their affinities (N, c): edges
    weigh max(0, 2A - 1) (orthogonal -> 0, module docstring), (W + W^T)/2, diagonal 1."""
    n = len(nbrs)
    rows = np.repeat(np.arange(n), nbrs.shape[1])
    cols = nbrs.reshape(-1)
    vals = np.maximum(np.float32(0), np.float32(2) * aff.reshape(-1).astype(np.float32) - np.float32(1))
    ok = (cols >= 0) & (cols != rows) & (vals > 0)  # faiss pads missing neighbours with -1; self-matches go
    a = sp.csr_matrix((vals[ok], (rows[ok], cols[ok])), shape=(n, n), dtype=np.float32)
    a = ((a + a.T) * np.float32(0.5)).tocsr()
    a.setdiag(1.0)
    a.sort_indices()
    return a


def knn_from_dense(aff: np.ndarray, n_neighbors: int) -> sp.csr_matrix:
    """The kNN affinity that :func:`knn_affinity` builds, from a dense affinity (N, N) instead of
    the gradients: each row's `n_neighbors` largest off-diagonal entries (the affinity is
    monotone in the cosine, so they are the nearest neighbours), weighted and symmetrised alike."""
    n = aff.shape[0]
    if n_neighbors >= n:
        raise QuantaError(f"n_neighbors ({n_neighbors}) must be < the number of samples ({n})")
    return _graph(*dense_top_k(aff, n_neighbors))


def dense_top_k(aff: np.ndarray, k: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(neighbours (N, k) int64, their values (N, k) `dtype`): each row's k largest off-diagonal
    entries of a dense (N, N) matrix, in no order, a block of rows at a time."""
    a = np.asarray(aff)
    n = a.shape[0]
    nbrs = np.empty((n, k), dtype=np.int64)
    vals = np.empty((n, k), dtype=dtype)
    for s in range(0, n, 2048):  # blocks of rows: argpartition copies the block
        blk = np.array(a[s : s + 2048], dtype=dtype)
        blk[np.arange(len(blk)), np.arange(s, s + len(blk))] = -np.inf  # no self-match
        idx = np.argpartition(-blk, k - 1, axis=1)[:, :k]
        nbrs[s : s + len(blk)] = idx
        vals[s : s + len(blk)] = np.take_along_axis(blk, idx, axis=1)
    return nbrs, vals


def compute(
    grads: np.ndarray, bad: Optional[np.ndarray], cfg: SimilarityConfig, progress: bool = False
) -> tuple[np.ndarray | sp.csr_matrix, np.ndarray, dict]:
    """(affinity, sample ids of its rows, meta) for gradients (N, dim); bad rows left out."""
    t0 = time.perf_counter()
    n_all = len(grads)
    keep = np.ones(n_all, dtype=bool) if bad is None else ~np.asarray(bad, dtype=bool)
    ids = np.flatnonzero(keep).astype(np.int32)
    if len(ids) < 2:
        raise QuantaError(f"{len(ids)} usable gradients of {n_all}; similarity needs at least 2")
    x = np.asarray(grads[ids], dtype=np.float32).view(np.ndarray)  # our own copy (fancy indexing)
    mode = cfg.mode if cfg.mode != "auto" else ("dense" if len(ids) <= cfg.dense_max else "knn")
    if mode == "dense" and len(ids) > cfg.dense_max:
        raise QuantaError(
            f"similarity.mode: dense with {len(ids):,} samples > similarity.dense_max ({cfg.dense_max:,}): the matrix "
            f"takes {4 * len(ids) ** 2 / 2**30:.1f} GiB; set similarity.mode: knn (or auto) with cluster.method: "
            "knn_average, or raise similarity.dense_max if this machine has the memory"
        )
    if mode == "dense":
        aff = dense_affinity(x, cfg.affinity, cfg.memory_gb, progress)
        nnz = aff.size
    else:
        aff = knn_affinity(
            x, cfg.n_neighbors, cfg.affinity, cfg.knn_backend, cfg.memory_gb,
            exact_max=cfg.knn_exact_max, knn_dim=cfg.knn_dim, owned=True,
        )
        nnz = aff.nnz
    meta = {
        "config": to_dict(cfg),
        "mode": mode,
        "n_samples": int(n_all),
        "n_used": int(len(ids)),
        "n_left_out": int(n_all - len(ids)),
        "stored_values": int(nnz),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return aff, ids, meta


def write(out_dir: str | Path, affinity, ids: np.ndarray, meta: dict) -> None:
    """Write a similarity folder atomically (the whole folder appears at once)."""
    out_dir = Path(out_dir)
    with files.atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        if sp.issparse(affinity):
            sp.save_npz(tmp / "affinity.npz", affinity, compressed=False)
        else:
            np.save(tmp / "affinity.npy", affinity)
        np.save(tmp / "samples.npy", ids)
        data, run = files.split_run(meta)
        (tmp / "meta.json").write_text(json.dumps(data, indent=2) + "\n")
    if run is not None:
        files.write_json(run, files.run_log_path(out_dir / "meta.json"))


def read(out_dir: str | Path, mmap: bool = True) -> tuple[np.ndarray | sp.csr_matrix, np.ndarray, dict]:
    """(affinity, sample ids of its rows, meta) of a similarity folder."""
    out_dir = Path(out_dir)
    if not (out_dir / "meta.json").exists():
        raise QuantaError(f"no similarity output in {out_dir}; run the similarity stage first (dvc repro similarity)")
    meta = files.read_meta(out_dir / "meta.json")
    if (out_dir / "affinity.npz").exists():
        aff = sp.load_npz(out_dir / "affinity.npz").tocsr()
    else:
        aff = np.load(out_dir / "affinity.npy", mmap_mode="r" if mmap else None)
    return aff, np.load(out_dir / "samples.npy"), meta
