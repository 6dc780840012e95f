"""Atomic file output: every file appears whole or not at all.

A stage killed mid-write must not leave a file that a resumed run (or DVC) takes for a
finished one. So everything is written to a temporary name in the same directory and
renamed into place, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

CONFIG_KEY = b"quanta.config"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it to `path`.

    Works for files and for directories (the caller creates whichever it wants at the
    yielded path). On an exception the temporary is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # the caller creates it (a file or a directory)
    tmp = Path(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_parquet(table: pa.Table | Any, path: str | Path, config: Optional[dict] = None) -> Path:
    """Write a pyarrow Table (or a pandas DataFrame) to Parquet atomically.

    `config` (the stage's params, JSON-able) goes into the schema metadata under
    ``quanta.config`` so that every table says how it was made.
    """
    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    if config is not None:
        meta = dict(table.schema.metadata or {})
        meta[CONFIG_KEY] = json.dumps(config, sort_keys=True, default=str).encode()
        table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_config(path: str | Path) -> Optional[dict]:
    """The config stored by :func:`write_parquet` in a Parquet file, or None."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(CONFIG_KEY)
    return None if raw is None else json.loads(raw)


def write_json(obj: Any, path: str | Path) -> Path:
    """Write JSON atomically (sorted keys, indented: metrics files are read by people)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def read_json(path: str | Path) -> Any:
    """A JSON file (metrics, meta) as Python objects."""
    return json.loads(Path(path).read_text())


def _json_default(x: Any) -> Any:
    # numpy scalars and arrays show up in metrics all the time
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
