"""The gradients stage's outputs, read back: the (samples, k) gradient matrix and the flags of
its per-sample table.

A module of its own, without torch, so that the stages after `gradients` (similarity) read
the gradients without importing the per-sample machinery of :mod:`pipeline.qdg.gradients`,
which writes these files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.core.errors import QuantaError


def read_gradients(path: str | Path) -> np.ndarray:
    """``gradients.npy``: (samples, k) float32/float16, row i = sample i, memory-mapped
    (read-only; a 10^6 x 8192 matrix is not loaded at once)."""
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise QuantaError(f"{path} not found; run the gradients stage first (dvc repro gradients)") from None


def read_bad(table_path: str | Path) -> np.ndarray:
    """(samples,) bool: the ``bad`` column of ``gradients.parquet`` (a sample whose gradient
    is not finite or is zero, left out of the affinity)."""
    try:
        return pq.read_table(table_path, columns=["bad"]).column("bad").to_numpy()
    except FileNotFoundError:
        raise QuantaError(f"{table_path} not found; run the gradients stage first (dvc repro gradients)") from None
