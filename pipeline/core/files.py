"""Atomic file output: every file appears whole or not at all; run facts kept apart.

A stage killed mid-write must not leave a file that a resumed run (or DVC) takes for a
finished one. So everything is written to a temporary name in the same directory and
renamed into place, which is atomic on POSIX file systems.

What a run measured about itself (seconds, speed, peak memory, how many parts it reused,
how it was executed) differs between two runs of the same data, so it stays out of the
outputs DVC hashes: :func:`write_meta` writes those keys (``RUN_KEYS``) to a run log
under ``logs/runs/`` (``$QUANTA_RUN_LOG`` to move it), mirroring the output's path, and
the output itself holds only what the data determines. Two runs with the same params and
seed then give the same ``dvc.lock``.
"""

from __future__ import annotations

import contextlib
import hashlib
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


#: keys that describe a run rather than its output (see the module docstring)
RUN_KEYS = frozenset({
    "seconds", "total_seconds", "compute_seconds", "wall_seconds", "train_seconds",
    "tokens_per_s", "forward_tokens_per_s", "samples_per_s", "peak_rss_bytes", "peak_cuda_bytes",
    "computed_parts", "reused_parts", "computed_tokens", "computed_samples", "execution", "torch_threads",
})


def run_log_path(path: str | Path) -> Path:
    """Where the run facts of output `path` go: its path (relative to the working
    directory where it lies inside it) under ``$QUANTA_RUN_LOG`` or ``logs/runs``."""
    root = Path(os.environ.get("QUANTA_RUN_LOG", "logs/runs"))
    p = Path(path).absolute()
    try:
        rel = p.relative_to(Path.cwd())
    except ValueError:
        rel = p.relative_to(p.anchor)
    return root / rel


def split_run(obj: Any) -> tuple[Any, Any]:
    """(obj less its RUN_KEYS, the RUN_KEYS alone), recursively through dicts; the
    second is None where there are none."""
    if not isinstance(obj, dict):
        return obj, None
    data, run = {}, {}
    for k, v in obj.items():
        if k in RUN_KEYS:
            run[k] = v
            continue
        data[k], sub = split_run(v)
        if sub is not None:
            run[k] = sub
    return data, (run or None)


def write_meta(obj: Any, path: str | Path) -> Path:
    """Write `obj` as JSON to `path` without its run facts, and those to the run log."""
    data, run = split_run(obj)
    if run is not None:
        write_json(run, run_log_path(path))
    return write_json(data, path)


def read_meta(path: str | Path) -> Any:
    """A file written by :func:`write_meta`, with its run facts merged back where the run log has them."""
    data = read_json(path)
    log = run_log_path(path)
    if log.exists():
        _merge(data, read_json(log))
    return data


def _merge(data: dict, run: dict) -> None:
    for k, v in run.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            _merge(data[k], v)
        else:
            data[k] = v


def read_json(path: str | Path) -> Any:
    """A JSON file (metrics, meta) as Python objects."""
    return json.loads(Path(path).read_text())


def _json_default(x: Any) -> Any:
    # numpy scalars and arrays show up in metrics all the time
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (a 3 GB gradient matrix in ~3 s)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
