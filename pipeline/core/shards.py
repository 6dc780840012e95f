"""Resumable sharded outputs: the one protocol of the losses and gradients stages.

A stage that takes long splits its work into shards and writes each as a part file, so
that a killed run (``kill -9``, a lost Dask worker, a full disk) resumes where it stopped.
That is only safe if a part is reused when it is exactly what this run would compute, so
every part carries, inside the file:

- its **identity**: what defines its numbers (the stage's config, a digest of its inputs,
  the model's weights fingerprint). A part made for anything else is recomputed;
- a **content checksum**: sha256 of its arrays (dtype, shape and bytes), stored when the
  part is written and recomputed from the decoded arrays on reuse. A part whose bytes were
  damaged after writing (a bad disk, a copy cut short, a hand edit) fails it even where
  the file still parses;
- the names of the arrays that must be finite, checked on reuse as when computed.

Anything that fails is logged by name with the reason and recomputed. Nothing finished is
deleted before its successor exists: a part that fails verification stays on disk until the
recomputed part replaces it (parts are written through :func:`pipeline.core.files.atomic_path`,
so a part file is whole or absent, and the rename is the replacement), and parts beyond this
run's count are removed only once every part of the run is written. A stage that stops on a
bad value (a device that is not there, a typo) therefore leaves every finished part as it was,
and reverting the value reuses them.

The checksum is of the decoded arrays rather than of the file's bytes so that it is one
definition for Parquet and npz parts alike, and so that it lives inside the part (no
side file to lose or to keep in step). Both formats also checksum themselves (Parquet
page CRCs are not written by default; npz members have zip CRCs), but a damaged float in
an uncompressed Parquet page decodes silently, which is the case this protocol exists for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from pipeline.core import files

log = logging.getLogger(__name__)

#: the meta key that holds the content checksum; never part of a part's identity
CONTENT = "content"


def content_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the named arrays in name order: each one's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class PartFormat:
    """How a part file stores named arrays and a JSON-able meta dict (suffix includes the dot)."""

    suffix: str
    write: Callable[[Path, Mapping[str, np.ndarray], dict], None]  # (tmp path, arrays, meta)
    read: Callable[[Path], tuple[dict, dict[str, np.ndarray]]]  # path -> (meta, arrays)


def write_part(fmt: PartFormat, path: str | Path, arrays: Mapping[str, np.ndarray], identity: dict,
               extra: Optional[dict] = None) -> Path:
    """Write one part atomically: its arrays, identity, `extra` facts and content checksum.

    `extra` holds what the part records but is not asked to match on reuse (for losses,
    the device and dtypes it was computed with, which the stage checks across parts).
    """
    meta = dict(identity, **(extra or {}))
    meta[CONTENT] = {"sha256": content_digest(arrays), "rows": int(len(next(iter(arrays.values()))))}
    with files.atomic_path(path) as tmp:
        fmt.write(tmp, arrays, json.loads(json.dumps(meta, sort_keys=True, default=str)))
    return Path(path)


def _flat(d: object, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


class ShardStore:
    """The part files ``part-NNNNN<suffix>`` of one stage output in `directory`.

    `what` names the output in log lines; `extra_keys` are meta keys written with each
    part (see :func:`write_part`) that reuse does not compare.
    """

    def __init__(self, directory: str | Path, fmt: PartFormat, what: str, extra_keys: Sequence[str] = ()):
        self.directory = Path(directory)
        self.fmt = fmt
        self.what = what
        self.extra_keys = frozenset(extra_keys) | {CONTENT}
        self._re = re.compile(rf"^part-(\d{{5,}}){re.escape(fmt.suffix)}$")

    def path(self, index: int) -> Path:
        return self.directory / f"part-{index:05d}{self.fmt.suffix}"

    def parts(self) -> list[Path]:
        """The part files on disk, in index order."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self._re.match(p.name))]
        return [p for _, p in sorted(found)]

    def prepare(self, n_parts: int) -> None:
        """Create the directory and remove temp files of a killed writer (never a finished part)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for p in sorted(self.directory.iterdir()):
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                log.info("removing %s, left by a killed run", p)
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def remove_surplus(self, n_parts: int) -> None:
        """Remove part-like files that are not parts 0..n_parts-1 of this run: called once all
        of them are written, so that a run stopped early never loses a finished part."""
        if not self.directory.is_dir():
            return
        for p in sorted(self.directory.iterdir()):
            m = self._re.match(p.name)
            if (m and int(m.group(1)) >= n_parts) or (p.suffix == self.fmt.suffix and not m):
                log.warning("removing %s: not one of this run's %d parts", p, n_parts)
                p.unlink()

    def verify(self, index: int, identity: dict, n_rows: int, finite: Sequence[str] = ()) -> Optional[str]:
        """Why part `index` cannot be reused for `identity` (None: it can).

        Checks, in order: the file reads; its identity matches; its arrays hash to the
        stored checksum; it has `n_rows` rows; the arrays named in `finite` hold no NaN/inf.
        """
        path = self.path(index)
        if not path.exists():
            return "missing"
        try:
            meta, arrays = self.fmt.read(path)
        except Exception as e:  # truncated, damaged or foreign: recompute, never trust it
            return f"is unreadable ({type(e).__name__}: {e})"
        found = {k: v for k, v in meta.items() if k not in self.extra_keys}
        want = json.loads(json.dumps(identity, sort_keys=True, default=str))
        if found != want:
            a, b = _flat(found), _flat(want)
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            return f"was made with a different config (differs in {', '.join(diff[:5])})"
        stored = (meta.get(CONTENT) or {}).get("sha256")
        if stored is None:
            return "has no content checksum"
        if content_digest(arrays) != stored:
            return "fails its content checksum (the data changed after it was written)"
        rows = len(next(iter(arrays.values()))) if arrays else 0
        if rows != n_rows:
            return f"has {rows} rows where {n_rows} were expected"
        for name in finite:
            bad = int((~np.isfinite(arrays[name])).sum())
            if bad:
                return f"has {bad} non-finite values in {name}"
        return None

    def plan(self, identities: Sequence[dict], n_rows: Sequence[int], finite: Sequence[str] = ()) -> list[int]:
        """The part indices to compute: every part that fails :meth:`verify`. A failing part
        is not deleted: its recomputed successor replaces it when written.

        Logs each failing part with its reason and the number reused.
        """
        todo = []
        for index, (identity, n) in enumerate(zip(identities, n_rows)):
            why = self.verify(index, identity, n, finite)
            if why is None:
                continue
            if why != "missing":
                log.warning("%s: %s %s; recomputing it (it stays until its successor is written)", self.what,
                            self.path(index).name, why)
            todo.append(index)
        reused = len(identities) - len(todo)
        if reused:
            log.info("%s: reusing %d of %d finished parts", self.what, reused, len(identities))
        return todo

    def read(self, index: int) -> tuple[dict, dict[str, np.ndarray]]:
        return self.fmt.read(self.path(index))

    def remove_parts(self) -> None:
        """Delete the part files, then the directory if nothing else is in it."""
        for p in self.parts():
            p.unlink()
        self.remove_if_empty()

    def remove_if_empty(self, up_to: Optional[str | Path] = None) -> None:
        """Remove the directory if it is empty, then each empty parent below `up_to`."""
        d = self.directory.resolve()
        stop = Path(up_to).resolve() if up_to is not None else d.parent
        while stop in d.parents and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent

    @contextlib.contextmanager
    def cleanup_on_error(self, up_to: Optional[str | Path] = None) -> Iterator[None]:
        """On an exception, leave no empty folders behind (finished parts stay, for the resume)."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(OSError):
                self.remove_if_empty(up_to)
            raise


# --------------------------------------------------------------------------- formats


def _write_parquet(schema):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(tmp: Path, arrays: Mapping[str, np.ndarray], meta: dict) -> None:
        table = pa.Table.from_arrays([pa.array(np.asarray(arrays[f.name])) for f in schema], schema=schema)
        table = table.replace_schema_metadata({files.CONFIG_KEY: json.dumps(meta, sort_keys=True).encode()})
        pq.write_table(table, tmp)

    return write


def _read_parquet(schema):
    import pyarrow.parquet as pq

    def read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
        table = pq.read_table(path)
        if not table.schema.remove_metadata().equals(schema):
            raise ValueError(f"schema {table.schema.remove_metadata()} is not {schema}")
        meta = json.loads((table.schema.metadata or {}).get(files.CONFIG_KEY, b"{}"))
        return meta, {f.name: table.column(f.name).to_numpy() for f in schema}

    return read


def parquet_format(schema) -> PartFormat:
    """Parts as Parquet tables of `schema` (a pyarrow schema), the meta under quanta.config."""
    return PartFormat(".parquet", _write_parquet(schema), _read_parquet(schema))


_META = "__meta__"


def _write_npz(tmp: Path, arrays: Mapping[str, np.ndarray], meta: dict) -> None:
    with open(tmp, "wb") as f:
        np.savez(f, **{_META: np.array(json.dumps(meta, sort_keys=True))}, **arrays)


def _read_npz(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads(str(arrays.pop(_META))), arrays


#: parts as uncompressed npz archives, the meta as a JSON string member
NPZ = PartFormat(".npz", _write_npz, _read_npz)
