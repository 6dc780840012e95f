"""Where the loss tables live and how they are read: the one implementation of that contract.

DESIGN.md §4: the losses stage writes one hive partition per (model, revision),
``<root>/model=<model>/revision=<revision>/part-*.parquet`` (doc_id int64, pos int32, loss
float32 in nats) with ``_meta.json`` beside the parts. Every reader goes through this module,
which imports no torch, so that the analysis stages start fast. Files starting with ``.``
or ``_`` (temporaries, ``_meta.json``) are never read as data (pyarrow dataset discovery
skips them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.dataset as ds

from pipeline.core.errors import QuantaError

META_FILE = "_meta.json"
LOSS_COLUMNS = ("doc_id", "pos", "loss")
# Names used as hive partition values: no path separators, no '=' (it would split the
# key), no leading '.'/'_' (dataset discovery would skip the folder).
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class LayoutError(QuantaError, ValueError):
    """A loss table that is missing or malformed, in one line naming the stage to rerun."""


def stage_name(model: str) -> str:
    """The DVC name of `model`'s losses stage (all its revisions), as `dvc repro` takes it."""
    return f"losses@{model}"


def partition_dir(root: str | Path, model: str, revision: str) -> Path:
    """``<root>/model=<model>/revision=<revision>``, refusing names that break the layout."""
    for what, value in (("model name", model), ("revision", revision)):
        if not _SAFE_VALUE.match(value):
            raise QuantaError(
                f"{what} {value!r} cannot name an output folder (letters, digits, '.', '_', '+', '-' only, "
                f"not starting with '.' or '_'); rename it in params.yaml suite"
            )
    return Path(root) / f"model={model}" / f"revision={revision}"


def model_dir(root: str | Path, model: str) -> Path:
    """``<root>/model=<model>``: the partitions of every revision of one model."""
    return partition_dir(root, model, "main").parent


def read_loss_partition(root: str | Path, model: str, revision: str) -> pa.Table:
    """The loss table of one (model, revision): doc_id, pos, loss, in part order."""
    path = partition_dir(root, model, revision)
    if not path.is_dir() or not any(path.glob("part-*.parquet")):
        raise LayoutError(
            f"no losses for model {model!r} at revision {revision!r}: {path} holds no part files; "
            f"run its losses stage (dvc repro '{stage_name(model)}') or fix the model/revision name"
        )
    try:
        table = ds.dataset(path, format="parquet").to_table(columns=list(LOSS_COLUMNS))
    except (pa.ArrowInvalid, KeyError) as e:
        raise LayoutError(f"{path}: not a doc_id/pos/loss Parquet dataset ({e})") from e
    if table.num_rows == 0:
        raise LayoutError(f"{path} holds no rows: the losses of {model}@{revision} are empty; rerun its losses stage")
    return table


def read_n_params(root: str | Path, model: str, revision: str) -> float:
    """Non-embedding parameter count N of `model`, from its loss table's ``_meta.json`` (the
    count the losses stage made of the loaded model): the N of every scaling fit."""
    path = partition_dir(root, model, revision) / META_FILE
    try:
        meta = read_partition_meta(root, model, revision)
    except (OSError, ValueError) as e:
        raise LayoutError(
            f"cannot read the parameter count of {model}@{revision} from {path} ({e}); rerun its losses stage"
        ) from None
    if meta is None:
        raise LayoutError(
            f"cannot read the parameter count of {model}@{revision}: {path} does not exist; rerun its losses stage"
        )
    n = (meta.get("params") or {}).get("non_embedding")
    if n is None:
        raise LayoutError(f"{path} has no params.non_embedding; rerun the losses stage of {model}@{revision}")
    return float(n)


def count_loss_rows(root: str | Path, model: str, revision: str) -> int:
    """Rows of the loss table of one (model, revision) from its part files' footers (no data
    read); 0 when it has none."""
    import pyarrow.parquet as pq

    path = partition_dir(root, model, revision)
    total = 0
    for p in sorted(path.glob("part-*.parquet")):
        try:
            total += pq.ParquetFile(p).metadata.num_rows
        except Exception as e:  # truncated or foreign: arrow raises several types
            raise LayoutError(f"{p} is unreadable ({type(e).__name__}); rerun dvc repro losses@{model}, "
                              "which recomputes it") from None
    return total


def read_partition_meta(root: str | Path, model: str, revision: str) -> Optional[dict]:
    """The ``_meta.json`` of one partition (None when it has none)."""
    path = partition_dir(root, model, revision) / META_FILE
    return json.loads(path.read_text()) if path.exists() else None
