"""One runner for the sharded stages (losses, gradients): plan, verify, compute, collect.

Why this module exists: both heavy stages cut their work into parts, and everything
around the numbers is the same for both: each part's identity, which finished parts
verify (:class:`pipeline.core.shards.ShardStore`), one task per part to compute, where
the tasks run (in this process or on Dask, :mod:`pipeline.core.execution`), their torch
threads, a progress bar, writing each part atomically, and handing the results back.
This module owns all of that, so a stage supplies only

- what defines its numbers (`identity`, plus its computing module's numerics version,
  stamped into every part so that a code change that changes the numbers never reuses
  a part made before it),
- per part: its row count and the facts that identify its own input,
- ``make_task(index)``: the small, picklable input of one part, and
- ``compute(task, on_rows) -> PartOutput``: the part's arrays, computed from the task
  alone (``on_rows(n)`` reports progress in rows, in this process only).

A part's file is written by :func:`run_job` right after its computation, in the process
that computed it, so a killed run keeps every finished part and resumes from there.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.core import execution, shards
from pipeline.core.resources import peak_rss_bytes, torch_threads

log = logging.getLogger(__name__)

T = TypeVar("T")

#: progress callback: called with the number of rows just finished
OnRows = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class PartOutput:
    """One part as a stage's computation returns it.

    arrays: the part file's content (name -> array, all with the part's rows first);
    summary: small facts for the driver (seconds, peak memory, ...), returned with the
    run's results; extra: facts written into the part's meta but not compared on reuse
    (see :func:`pipeline.core.shards.write_part`).
    """

    arrays: dict
    summary: dict = dataclasses.field(default_factory=dict)
    extra: Optional[dict] = None


@dataclasses.dataclass(frozen=True)
class Job:
    """One part to compute, as it travels to a worker. Small and picklable: `compute` is
    a module-level function and `task` carries names and token ids, never a model."""

    compute: Callable[[Any, Optional[OnRows]], PartOutput]
    task: Any
    fmt: shards.PartFormat
    path: str  # absolute: a Dask worker runs in its own directory
    identity: dict
    index: int
    torch_threads: int = 0  # 0: leave torch's setting alone


def run_job(job: Job, on_rows: Optional[OnRows] = None) -> dict:
    """Compute one part with the job's torch threads and write its file atomically.

    Returns the computation's summary with ``index``, ``rows``, ``torch_threads`` (as
    used) and ``peak_rss_bytes`` (of this process so far) added.
    """
    with torch_threads(job.torch_threads):
        out = job.compute(job.task, on_rows)
        shards.write_part(job.fmt, job.path, out.arrays, job.identity, extra=out.extra)
        threads = torch.get_num_threads()
    rows = len(next(iter(out.arrays.values())))
    return dict(out.summary, index=job.index, rows=int(rows), torch_threads=threads, peak_rss_bytes=peak_rss_bytes())


@dataclasses.dataclass(frozen=True)
class Execution:
    """Where and how parts run: the execution keys of a stage's config section.

    threads_per_worker: torch threads per task; 0 leaves torch's own setting in this
    process (all physical cores, or OMP_NUM_THREADS), splits the cores evenly between a
    LocalCluster's workers, and leaves an external cluster's workers as they are.
    """

    scheduler: str
    n_workers: int
    threads_per_worker: int
    progress: bool

    @classmethod
    def of(cls, cfg: Any) -> "Execution":
        """From a config section with scheduler, n_workers, threads_per_worker, progress."""
        return cls(cfg.scheduler, cfg.n_workers, cfg.threads_per_worker, cfg.progress)


@dataclasses.dataclass(frozen=True)
class ShardedWork:
    """A stage's parts: what the runner needs to plan, compute and collect them.

    identity: what defines the numbers of every part (the stage's config, a fingerprint
    of the weights), without where the work runs; numerics: the computing module's
    ``NUMERICS_VERSION``; parts[i]: the facts that identify part i's own input (its
    bounds, a digest of its inputs), stored under ``part``; rows[i]: its row count;
    finite: the arrays that must hold no NaN/inf on reuse; up_to: on a failed start, empty
    folders are removed up to this one (default: the store's own folder only); on_todo:
    called with the part indices to compute, when there are any, before the first starts.
    desc, unit: the progress bar's; key_prefix: names the tasks on a Dask cluster.
    """

    store: shards.ShardStore
    identity: dict
    numerics: int
    parts: Sequence[dict]
    rows: Sequence[int]
    compute: Callable[[Any, Optional[OnRows]], PartOutput]
    make_task: Callable[[int], Any]
    desc: str
    unit: str
    key_prefix: str
    finite: Sequence[str] = ()
    up_to: Optional[str | Path] = None
    on_todo: Optional[Callable[[list[int]], None]] = None


@dataclasses.dataclass(frozen=True)
class ShardedRun:
    """What a run did: results holds one summary per computed part (:func:`run_job`), in
    completion order; identity is the parts' shared identity (numerics included)."""

    results: list
    identity: dict
    n_parts: int
    reused_parts: int
    mode: str  # pipeline.core.execution.choose_mode's answer
    compute_seconds: float


def run_sharded(work: ShardedWork, how: Execution, assemble: Callable[[ShardedRun], T]) -> T:
    """Compute every part of `work` that does not verify, then ``assemble(run)``.

    Stale temp files are removed first; finished parts that verify are reused; parts that
    do not are replaced as their successors are written, and surplus parts (a run that had
    more) are removed once every part of this run is on disk. `assemble` runs once every part is on disk (computed or reused), and its
    answer is returned. A failure before the first part leaves no empty folders.
    """
    store = work.store
    # the identity each part file carries and ShardStore.verify compares
    identity = dict(work.identity, numerics=work.numerics)
    identities = [dict(identity, part=part) for part in work.parts]
    with store.cleanup_on_error(up_to=work.up_to):
        store.prepare(len(identities))
        todo = store.plan(identities, work.rows, finite=work.finite)
        if todo and work.on_todo is not None:
            work.on_todo(todo)
        results, mode, seconds = _execute(work, how, todo, identities)
        store.remove_surplus(len(identities))
        run = ShardedRun(results=results, identity=identity, n_parts=len(identities),
                         reused_parts=len(identities) - len(todo), mode=mode, compute_seconds=seconds)
        return assemble(run)


def _execute(work: ShardedWork, how: Execution, todo: list[int], identities: list[dict]) -> tuple[list, str, float]:
    """Run one job per part in `todo`, with a progress bar over all rows; (results, mode, seconds)."""
    address = execution.scheduler_address(how.scheduler)
    mode = execution.choose_mode(address, len(todo), how.n_workers)
    if mode == execution.INPROCESS and address == execution.LOCAL and todo:
        log.info(
            "%s: %d part(s) to compute with n_workers=%d: running in-process (a LocalCluster would "
            "only add its start-up time)", work.desc, len(todo), how.n_workers,
        )
    jobs = [
        Job(compute=work.compute, task=work.make_task(i), fmt=work.store.fmt,
            path=execution.absolute(str(work.store.path(i))), identity=identities[i], index=i)
        for i in todo
    ]
    total = int(np.sum(work.rows, dtype=np.int64))
    t0 = time.perf_counter()
    with tqdm(total=total, initial=total - sum(int(work.rows[i]) for i in todo), unit=work.unit, unit_scale=True,
              desc=work.desc, disable=not how.progress, mininterval=1.0) as bar:
        inprocess = mode == execution.INPROCESS  # then progress comes per batch, not per part
        results = execution.run_tasks(
            run_job, jobs, lambda job, threads: dataclasses.replace(job, torch_threads=threads),
            mode=mode, n_workers=how.n_workers, threads_per_worker=how.threads_per_worker,
            key_prefix=work.key_prefix,
            on_result=None if inprocess else (lambda r: bar.update(r["rows"])),
            inprocess_kwargs={"on_rows": bar.update} if inprocess else None,
        )
    return results, mode, time.perf_counter() - t0
