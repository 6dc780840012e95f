"""The gradients stage's outputs, read back: the (samples, k) gradient matrix and the flags of
its per-sample table.

A module of its own, without torch, so that the stages after `gradients` (similarity) read
the gradients without importing the per-sample machinery of :mod:`pipeline.qdg.gradients`,
which writes these files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.core import files
from pipeline.core.errors import QuantaError

#: the key of gradients.parquet's config metadata that holds gradients.npy's sha256
CHECKSUM_KEY = "gradients_sha256"


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


def verify_gradients(path: str | Path, table_path: str | Path) -> None:
    """Raise unless ``gradients.npy`` has the sha256 its table recorded when the gradients stage
    wrote both: a matrix edited or replaced since (a finite change passes every other check)
    would otherwise feed the affinity silently. A table without a checksum (older runs) passes."""
    stored = (files.read_config(table_path) or {}).get(CHECKSUM_KEY)
    if stored is None:
        return
    if not Path(path).exists():
        raise QuantaError(f"{path} not found; run the gradients stage first (dvc repro gradients)")
    if files.sha256_file(path) != stored:
        raise QuantaError(f"{path} does not match the checksum the gradients stage recorded in {table_path}: it changed "
                          "after it was written; rerun dvc repro -f gradients")


def parts_dir(path: str | Path) -> Path:
    """Where the gradients stage keeps the finished parts of an unfinished run of ``path``:
    ``<folder>/.<stem>-parts`` (removed once the matrix is assembled)."""
    return Path(path).parent / f".{Path(path).stem}-parts"


def remove_leftover_parts(path: str | Path) -> bool:
    """Remove the parts folder of ``path`` once the matrix there is complete and verified: DVC
    restores a finished stage's outputs from its cache without running it, so a run killed
    before that leaves parts nothing would ever read again. True when it removed one."""
    d = parts_dir(path)
    if not d.is_dir():
        return False
    shutil.rmtree(d)
    return True
