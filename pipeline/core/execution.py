"""Running shards of a stage as tasks on dask.distributed, and per-process caches.

Why this module exists: the heavy stages (losses, gradients) split their work into
shards that are independent of each other. A researcher with one GPU wants them run
one after another in the stage's own process; one with a cluster (one Dask worker per
GPU, maybe many nodes) wants the same shards spread over it, without changing a line.
This module is the only place that knows about Dask:

- :func:`scheduler_address` decides *where* shards run: ``DASK_SCHEDULER_ADDRESS`` in
  the environment wins, then the config's ``scheduler`` (``"local"`` for a LocalCluster
  started here, ``"inprocess"`` for no Dask, anything else is a scheduler address).
- :func:`client` starts (and stops) that cluster, or connects to the existing one.
- :func:`map_unordered` submits a task per shard with a bounded number in flight, so
  that the shards' inputs never all sit in the scheduler's memory at once, and yields
  results as they finish.
- :func:`cached` is a per-process cache: a worker loads a model once and reuses it for
  every shard it gets. Models never travel through the task graph (they are GBs; a
  task carries the model's *name* and the worker loads it from its own disk/cache).

Tasks write their outputs themselves (to a file system shared with the driver), so
only small summaries come back through Dask. Every path a task carries is absolute
(:func:`for_workers`): a worker of an existing cluster starts in its own directory, and a
queued ``dvc exp run`` runs in a temporary copy of the repository, so a path relative to
the driver's directory would point elsewhere on the worker.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Optional, Sequence

log = logging.getLogger(__name__)

ENV_SCHEDULER = "DASK_SCHEDULER_ADDRESS"
LOCAL = "local"
INPROCESS = "inprocess"


def scheduler_address(configured: str) -> str:
    """Where shards run: ``"inprocess"``, ``"local"``, or a scheduler address.

    ``DASK_SCHEDULER_ADDRESS`` in the environment overrides the configured value, so
    that one params.yaml serves a laptop and a cluster.
    """
    env = os.environ.get(ENV_SCHEDULER, "").strip()
    return env or configured


def runs_here(configured: str) -> bool:
    """Whether shards run on this machine (in process or on a LocalCluster), so that the
    device they will use can be checked here before any work; on a remote cluster only
    the workers can say."""
    return scheduler_address(configured) in (LOCAL, INPROCESS)


def local_threads(threads_per_worker: int, n_workers: int) -> int:
    """Torch threads per process for `n_workers` processes sharing this machine's cores.

    0 in the config means: split the cores evenly (at least one thread each).
    """
    if threads_per_worker > 0:
        return threads_per_worker
    return max(1, (os.cpu_count() or 1) // max(1, n_workers))


@contextlib.contextmanager
def client(address: str, n_workers: int = 1) -> Iterator[Any]:
    """A dask Client on a new LocalCluster (``address == "local"``) or on `address`.

    The LocalCluster runs one single-threaded Dask worker per process: each task uses
    torch's own intra-op threads, and two tasks in one process would fight over them
    and hold two copies of the activations.
    """
    from distributed import Client, LocalCluster

    if address == LOCAL:
        t0 = time.perf_counter()
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # a free port: another Dask cluster on this machine may hold 8787
            silence_logs=logging.WARNING,
        )
        c = Client(cluster)
        log.info("started a LocalCluster of %d worker processes in %.1f s", n_workers, time.perf_counter() - t0)
        try:
            yield c
        finally:
            c.close()
            cluster.close()
    else:
        c = Client(address)
        log.info("connected to the Dask scheduler at %s (%d workers)", address, n_workers_of(c))
        try:
            yield c
        finally:
            c.close()


def n_workers_of(c: Any) -> int:
    """How many workers the scheduler behind client `c` has now (at least 1)."""
    return max(1, len(c.scheduler_info().get("workers", {})))


def map_unordered(
    c: Any,
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    max_in_flight: int,
    key_prefix: str = "task",
) -> Iterator[Any]:
    """Yield ``fn(item)`` for every item, computed on the cluster, in completion order.

    At most `max_in_flight` tasks are submitted at a time: each task carries its input
    (a shard's tokens), and submitting a whole corpus at once would hold all of it in
    the scheduler. The first task that raises cancels the rest and re-raises here (with
    its original type, so a QuantaError stays a one-line error).
    """
    from distributed import as_completed

    # Keys must be unique on a shared, long-lived cluster: two stages (or two runs of
    # one) may submit "the same" shard.
    run_id = uuid.uuid4().hex[:8]
    todo = iter(enumerate(items))
    pending = as_completed()
    futures = []

    def submit_next() -> bool:
        try:
            i, item = next(todo)
        except StopIteration:
            return False
        fut = c.submit(fn, item, key=f"{key_prefix}-{i:05d}-{run_id}", pure=False, retries=0)
        futures.append(fut)
        pending.add(fut)
        return True

    for _ in range(max(1, max_in_flight)):
        if not submit_next():
            break
    try:
        for fut in pending:
            result = fut.result()  # re-raises the task's exception
            fut.release()
            yield result
            submit_next()
    finally:
        for fut in futures:
            if not fut.done():
                fut.cancel()


def choose_mode(address: str, n_todo: int, n_workers: int) -> str:
    """Where a stage's tasks run: in this process when asked, or when a LocalCluster could
    run at most one of them at a time (it would add only its start-up, ~10 s per stage on 2
    cores: bench/RESULTS.md); else on the cluster at `address`."""
    if address == INPROCESS or (address == LOCAL and min(n_todo, n_workers) <= 1):
        return INPROCESS
    return address


def run_tasks(
    fn: Callable[..., dict],
    items: Sequence[Any],
    make_task: Callable[[Any, int], Any],
    *,
    mode: str,
    n_workers: int,
    threads_per_worker: int,
    key_prefix: str,
    on_result: Optional[Callable[[dict], None]] = None,
    inprocess_kwargs: Optional[dict] = None,
) -> list[dict]:
    """``fn(make_task(item, threads))`` for every item; the results in completion order.

    mode: :func:`choose_mode`'s answer. In this process, tasks get ``threads_per_worker``
    torch threads (0: leave torch's setting alone) and ``fn`` also gets `inprocess_kwargs`
    (e.g. a per-batch progress callback). On a cluster, a LocalCluster's workers split the
    cores (:func:`local_threads`) and an external one's use ``threads_per_worker``; at most
    two tasks per worker are in flight (:func:`map_unordered`). `on_result` sees each result
    as it arrives (progress bars).
    """
    results: list[dict] = []
    if mode == INPROCESS:
        for item in items:
            results.append(fn(make_task(item, threads_per_worker), **(inprocess_kwargs or {})))
            if on_result is not None:
                on_result(results[-1])
        return results
    if not items:
        return results
    with client(mode, n_workers) as c:
        workers = n_workers if mode == LOCAL else n_workers_of(c)
        threads = local_threads(threads_per_worker, workers) if mode == LOCAL else threads_per_worker
        tasks = (make_task(item, threads) for item in items)
        for res in map_unordered(c, fn, tasks, max_in_flight=2 * workers, key_prefix=key_prefix):
            results.append(res)
            if on_result is not None:
                on_result(res)
    return results


# --------------------------------------------------------------------------- per-process cache

_CACHE: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()
_CACHE_LOCK = threading.Lock()


def cached(key: Hashable, factory: Callable[[], Any], keep: int = 1) -> Any:
    """``factory()``, computed once per process for each `key` and kept for later calls.

    Only the `keep` most recently used entries stay: a long-lived worker serving a
    sweep of 36 (model, revision) stages must not end up holding 36 models.
    """
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        # Evict before loading, so two big models never sit in memory together.
        while len(_CACHE) >= max(1, keep):
            _CACHE.popitem(last=False)
        value = factory()
        _CACHE[key] = value
        return value


def clear_cache() -> None:
    """Drop everything :func:`cached` holds in this process."""
    with _CACHE_LOCK:
        _CACHE.clear()


def worker_device(device: str) -> str:
    """The device this process should use for the configured `device` string.

    On a machine with several GPUs and a LocalCluster with one worker per GPU, every
    worker would otherwise pick ``cuda:0``; worker *i* takes GPU *i mod n* instead.
    An explicit ``cuda:N`` (or cpu, mps) is respected, and so are clusters that pin
    GPUs themselves (dask-cuda sets CUDA_VISIBLE_DEVICES, so each sees one GPU).
    """
    if device not in ("auto", "cuda"):
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return device  # not inside a Dask worker
    try:
        import torch

        n_gpus = torch.cuda.device_count()
    except Exception:  # pragma: no cover - torch without CUDA support
        n_gpus = 0
    if n_gpus <= 1 or not isinstance(name, int):
        return device
    return f"cuda:{name % n_gpus}"


def absolute(path: str) -> str:
    """`path` made absolute against this (the driver's) working directory."""
    return str(Path(path).resolve())


def for_workers(spec: Any, load_kwargs: dict) -> tuple[Any, dict]:
    """The model spec and load arguments a task carries, with local paths made absolute.

    A spec's source that exists here (a local model directory or GGUF file) and the Hugging
    Face cache_dir are resolved; a hub id stays as it is. Only the task's copy changes: the
    stage's identity and outputs keep the paths as written in params.yaml, so outputs do
    not depend on where the repository is checked out.
    """
    kwargs = dict(load_kwargs)
    if kwargs.get("cache_dir"):
        kwargs["cache_dir"] = absolute(kwargs["cache_dir"])
    source = getattr(spec, "source", None)
    if isinstance(source, str) and dataclasses.is_dataclass(spec) and Path(source).exists():
        spec = dataclasses.replace(spec, source=absolute(source))
    return spec, kwargs


@contextlib.contextmanager
def process_pool(n_jobs: int) -> Iterator[Optional[Any]]:
    """Worker processes for `n_jobs` independent pure computations in a stage (bootstrap
    fits), one per core; None when there is one core or one job (then run them in order).

    The jobs are pure functions of their inputs, so the numbers do not depend on the number
    of processes. "spawn" starts workers that share no state (torch, thread pools) with
    the stage's process.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = min(cores, n_jobs)
    if n <= 1:
        yield None
        return
    with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool
