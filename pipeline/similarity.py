"""Cosine similarity of per-sample gradients, and the affinity spectral clustering reads.

Why this module exists: QDG clusters samples by the cosine similarity C of their
gradients. The paper built the dense N x N matrix and turned it into an affinity with
1 - arccos(C)/pi (angular; it is 1 for identical directions, 1/2 for orthogonal ones,
0 for opposite ones). Dense is right up to ~10^4 samples (10^4 x 10^4 float32 = 400 MB);
at 10^5 it is 40 GB. Above ``dense_max`` this module builds a sparse, symmetrised
k-nearest-neighbour graph instead (the standard input of spectral clustering at scale),
with faiss when it is installed and scikit-learn otherwise.

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

from pipeline import io
from pipeline.config import SimilarityConfig, to_dict
from pipeline.errors import QuantaError

try:  # tqdm is a dependency; the guard keeps the library importable in odd environments
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


def normalise(grads: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (N, dim). Zero rows are an error: drop them first."""
    x = np.asarray(grads, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any() or not np.isfinite(norms).all():
        i = int(np.flatnonzero((norms[:, 0] == 0) | ~np.isfinite(norms[:, 0]))[0])
        raise QuantaError(f"row {i} of the gradients is zero or not finite; leave bad samples out before normalising")
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


def _knn_faiss(x: np.ndarray, k: int, exact_max: int, nprobe: int, seed: int):
    import faiss

    n, d = x.shape
    if n <= exact_max:
        index = faiss.IndexFlatIP(d)
    else:
        # Inverted lists: exact inner products within the nprobe nearest of ~4 sqrt(N)
        # coarse cells; bench/RESULTS.md reports its recall against exact search.
        nlist = int(4 * math.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = x[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
        index.cp.seed = seed
        index.train(train)
        index.nprobe = nprobe
    index.add(x)
    sims, nbrs = index.search(x, k + 1)
    return sims, nbrs


def _knn_sklearn(x: np.ndarray, k: int, memory_gb: float):
    # Exact brute-force search, blockwise: sklearn's kneighbors on cosine distance.
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(x)
    step = block_rows(len(x), x.shape[1], memory_gb)
    sims, nbrs = [], []
    for s in range(0, len(x), step):
        d, i = nn.kneighbors(x[s : s + step])
        sims.append(1.0 - d)
        nbrs.append(i)
    return np.vstack(sims).astype(np.float32), np.vstack(nbrs)


def knn_affinity(
    x: np.ndarray,
    n_neighbors: int = 30,
    kind: str = "angular",
    backend: str = "auto",
    memory_gb: float = 2.0,
    exact_max: int = 20_000,
    nprobe: int = 16,
    seed: int = 0,
) -> sp.csr_matrix:
    """Sparse symmetrised kNN affinity (N, N) CSR float32 of the rows of `x`.

    Each sample keeps its `n_neighbors` most similar others, weighted max(0, 2A - 1) for
    the affinity A of `kind`; the graph is (W + W^T)/2 and the diagonal is 1.
    """
    x = normalise(x)
    n = len(x)
    if n_neighbors >= n:
        raise QuantaError(f"similarity.n_neighbors ({n_neighbors}) must be < the number of samples ({n})")
    if backend == "auto":
        try:
            import faiss  # noqa: F401

            backend = "faiss"
        except ImportError:
            backend = "sklearn"
    if backend == "faiss":
        sims, nbrs = _knn_faiss(x, n_neighbors, exact_max, nprobe, seed)
    elif backend == "sklearn":
        sims, nbrs = _knn_sklearn(x, n_neighbors, memory_gb)
    else:
        raise QuantaError(f"similarity.knn_backend must be auto, faiss or sklearn, got {backend!r}")
    rows = np.repeat(np.arange(n), nbrs.shape[1])
    cols = nbrs.reshape(-1)
    vals = to_affinity(sims.reshape(-1).astype(np.float32), kind)
    vals = np.maximum(np.float32(0), np.float32(2) * vals - np.float32(1))  # orthogonal -> 0 (module docstring)
    ok = (cols >= 0) & (cols != rows) & (vals > 0)  # faiss pads missing neighbours with -1; self-matches go
    a = sp.csr_matrix((vals[ok], (rows[ok], cols[ok])), shape=(n, n), dtype=np.float32)
    a = ((a + a.T) * np.float32(0.5)).tocsr()
    a.setdiag(1.0)
    a.sort_indices()
    return a


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
    x = np.asarray(grads[ids], dtype=np.float32)
    mode = cfg.mode if cfg.mode != "auto" else ("dense" if len(ids) <= cfg.dense_max else "knn")
    if mode == "dense":
        aff = dense_affinity(x, cfg.affinity, cfg.memory_gb, progress)
        nnz = aff.size
    else:
        aff = knn_affinity(x, cfg.n_neighbors, cfg.affinity, cfg.knn_backend, cfg.memory_gb)
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
    with io.atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        if sp.issparse(affinity):
            sp.save_npz(tmp / "affinity.npz", affinity, compressed=False)
        else:
            np.save(tmp / "affinity.npy", affinity)
        np.save(tmp / "samples.npy", ids)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def read(out_dir: str | Path, mmap: bool = True) -> tuple[np.ndarray | sp.csr_matrix, np.ndarray, dict]:
    """(affinity, sample ids of its rows, meta) of a similarity folder."""
    out_dir = Path(out_dir)
    if not (out_dir / "meta.json").exists():
        raise QuantaError(f"no similarity output in {out_dir}; run the similarity stage first (dvc repro similarity)")
    meta = json.loads((out_dir / "meta.json").read_text())
    if (out_dir / "affinity.npz").exists():
        aff = sp.load_npz(out_dir / "affinity.npz").tocsr()
    else:
        aff = np.load(out_dir / "affinity.npy", mmap_mode="r" if mmap else None)
    return aff, np.load(out_dir / "samples.npy"), meta
