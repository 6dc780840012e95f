"""Exact per-target gradients for QDG: the public API and the gradients stage.

Why this module exists: QDG (Michaud et al. 2023) clusters samples by the gradient of
*one* token's loss: the cross-entropy of predicting token ``pos`` of a document from its
tokens ``0..pos-1``, with respect to the model's non-embedding, non-layer-norm weights
and biases. :func:`compute_gradients` gives those gradients, each computed exactly once,
many samples per forward/backward, projected as they go (pipeline/qdg/projection.py), so
the (n_samples x n_params) matrix never exists. Its layers:

- pipeline/qdg/per_sample.py: the maths (parameter selection, the per-layer rules, the
  engine that runs one batch of rows, its self-check), and why it is exact;
- pipeline/qdg/memory_plan.py: which targets share a row, which rows share a batch, and
  how many fit ``gradients.memory_gb``;
- here: samples in, (N, dim) gradients out, bad samples found and reported; and the
  stage, :func:`run_gradients`, whose shards run through pipeline/core/sharded.py.

Bad samples: a target whose exact gradient is all zeros (its loss is exactly 0, or the
selected parameters do not reach it) or not finite gets a warning naming it, a zero row
in the output, and True in the returned ``bad`` mask; the rest are unaffected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Sequence

import numpy as np
import torch

from pipeline.core import execution, sharded, shards
from pipeline.core.config import GradientsConfig
from pipeline.core.resources import peak_rss_bytes
from pipeline.lm import models as models_lib
from pipeline.lm.models import check_output_head, model_device
from pipeline.qdg import gradient_files
from pipeline.qdg.memory_plan import Row, plan, plan_memory
from pipeline.qdg.per_sample import Engine, GradientError, abbreviate, grad_mode, select_params
from pipeline.qdg.projection import NoProjection, Projector, StackedProjector, make_projector

#: Bump when a code change changes the numbers (here, in per_sample.py, memory_plan.py,
#: projection.py or the cross-entropy): it is in every part's identity, so parts
#: computed by other code are recomputed, not reused.
NUMERICS_VERSION = 1


class BadGradientWarning(UserWarning):
    """A sample's gradient is exactly zero or not finite; it is left out and recorded."""


# --------------------------------------------------------------------------- public API


@dataclasses.dataclass
class GradientResult:
    """Per-sample projected gradients, in the order of the samples given.

    grads (N, dim): float32 or float16, zero rows for bad samples; norms (N,) float32:
    L2 norms of the exact (unprojected) gradients (NaN where not finite; with
    ``projection: tensorsketch`` the weight blocks' share is their sketch's squared norm, an
    estimate, since their gradients are never formed); bad (N,) bool;
    reasons: sample index -> why it is bad; projection: the projector's settings;
    windowed: samples whose context was cut to max_len - 1 tokens.
    """

    grads: np.ndarray
    norms: np.ndarray
    bad: np.ndarray
    reasons: dict[int, str]
    projection: dict
    windowed: int
    seconds: float


def _column(samples: Any, key: str) -> Optional[np.ndarray]:
    try:
        col = samples[key]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if hasattr(col, "to_numpy"):
        return np.asarray(col.to_numpy())
    return np.asarray(col)


def resolve_max_len(model: torch.nn.Module, max_len: Optional[int]) -> int:
    """cfg.max_len, or the model's maximum context; an error when longer than the model's."""
    model_max = models_lib.max_context(model)
    if max_len is None:
        return model_max
    if max_len < 2:
        raise GradientError(f"gradients.max_len must be >= 2, got {max_len}")
    if max_len > model_max:
        raise GradientError(
            f"gradients.max_len is {max_len} but {type(model).__name__} was built for {model_max} positions; "
            f"use max_len <= {model_max} (or null)"
        )
    return max_len


def build_projector(model_params: Sequence[tuple[str, torch.nn.Parameter]], cfg: GradientsConfig) -> Projector:
    """The projector cfg asks for, over the selected parameters; with cfg.stability_seeds,
    the same projection at each of those seeds stacked after it (:class:`StackedProjector`)."""
    sizes = [(n, p.numel()) for n, p in model_params]
    shapes = [(n, tuple(p.shape)) for n, p in model_params]
    made = [make_projector(cfg.projection, sizes, k=cfg.k, seed=seed, nnz=cfg.nnz, shapes=shapes)
            for seed in (cfg.seed, *cfg.stability_seeds)]
    return made[0] if len(made) == 1 else StackedProjector(made)


def _iter_batches(
    model: torch.nn.Module,
    params: Sequence[tuple[str, torch.nn.Parameter]],
    projector: Projector,
    docs: Mapping[int, np.ndarray],
    doc_ids: np.ndarray,
    positions: np.ndarray,
    target_ids: np.ndarray,
    cfg: GradientsConfig,
    max_len: int,
    held_bytes: int = 0,
    calibrations: Optional[dict] = None,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Plan rows and batches, run them; yields (sample indices, (n, dim), (n,) norms).

    calibrations: the memory planner's measurements of this model, reused and filled in
    (see :class:`pipeline.qdg.per_sample.Engine`); None measures afresh."""
    engine = Engine(model, params, projector, calibrations)
    check_output_head(model)  # our logits path (body, then head) must be the model's own
    if engine.generic:
        warnings.warn(
            f"{len(engine.generic)} selected parameters ({abbreviate([n for n, _ in engine.generic], 4, 1)}) have no "
            "per-layer rule; their gradients are exact but computed one document window per batch (slow)",
            stacklevel=3,
        )
    # The generic route differentiates parameters directly, which sums over rows: so
    # then one row per batch (each row's targets are still separate slots).
    batch_rows = 1 if engine.generic else cfg.batch_rows

    def tokens_of(r: Row) -> np.ndarray:
        return docs[r.doc_id][r.start : r.end]

    with grad_mode(model, params):
        bound = plan_memory(engine, min(max_len, int(positions.max())), cfg.memory_gb, held_bytes)
        batches = plan(doc_ids, positions, max_len, cfg.share_context, cfg.batch_tokens, batch_rows, bound)
        for batch in batches:
            yield engine.run(batch, tokens_of, target_ids, cfg.verify)


def _check_samples(
    doc_ids: np.ndarray, positions: np.ndarray, token_ids: Optional[np.ndarray], tokens_by_doc: Mapping[int, Any]
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """(doc_id -> int64 tokens, (N,) target token ids), or an error naming the first bad sample."""
    docs: dict[int, np.ndarray] = {}
    targets = np.zeros(len(doc_ids), dtype=np.int64)
    for i, (d, p) in enumerate(zip(doc_ids.tolist(), positions.tolist())):
        if d not in docs:
            if d not in tokens_by_doc:
                raise GradientError(f"sample {i}: document {d} is not in the tokens table")
            docs[d] = np.asarray(tokens_by_doc[d], dtype=np.int64).reshape(-1)
        if not 1 <= p < len(docs[d]):
            raise GradientError(
                f"sample {i}: pos {p} is outside document {d} (length {len(docs[d])}); a target needs 1 <= pos < length"
            )
        targets[i] = docs[d][p]
        if token_ids is not None and int(token_ids[i]) != targets[i]:
            raise GradientError(
                f"sample {i}: token_id {int(token_ids[i])} but document {d} has token {targets[i]} at pos {p}; "
                "the samples were selected from a different tokenization"
            )
    return docs, targets


def compute_gradients(
    model: torch.nn.Module,
    samples: Any,
    tokens_by_doc: Mapping[int, Any],
    cfg: GradientsConfig = GradientsConfig(),  # noqa: B008 (frozen: one shared default is safe)
    projector: Optional[Projector] = None,
    *,
    params: Optional[Sequence[tuple[str, torch.nn.Parameter]]] = None,
    on_batch: Optional[Callable[[int], None]] = None,
    calibrations: Optional[dict] = None,
) -> GradientResult:
    """Projected exact per-target gradients of `samples`, in their order.

    samples: a table (pandas/pyarrow/dict of arrays) with ``doc_id`` and ``pos``
    (the target's index in its document, >= 1), optionally ``token_id`` (checked
    against the tokens). tokens_by_doc: doc_id -> token ids of the whole document.
    params: the selected parameters (default: :func:`select_params` with cfg's patterns).
    projector: default :func:`build_projector` (cfg.projection, k, seed, nnz).
    on_batch(n) is called after each batch with its number of samples.
    calibrations: a dict kept between calls on the same model, so that the memory planner
    (cfg.memory_gb) measures the model once rather than on every call; None: measure here.
    """
    t0 = time.perf_counter()
    doc_ids = _column(samples, "doc_id")
    positions = _column(samples, "pos")
    if doc_ids is None or positions is None:
        raise GradientError("samples need columns doc_id and pos")
    doc_ids, positions = doc_ids.astype(np.int64), positions.astype(np.int64)
    token_ids = _column(samples, "token_id")
    if params is None:
        params = select_params(model, cfg.include, cfg.exclude)
    if projector is None:
        projector = build_projector(params, cfg)
    max_len = resolve_max_len(model, cfg.max_len)
    docs, target_ids = _check_samples(doc_ids, positions, token_ids, tokens_by_doc)

    n = len(doc_ids)
    grads = np.zeros((n, projector.dim), dtype=np.float16 if cfg.out_dtype == "float16" else np.float32)
    norms = np.zeros(n, dtype=np.float32)
    if n:
        held = grads.nbytes + norms.nbytes
        batches = _iter_batches(model, params, projector, docs, doc_ids, positions, target_ids, cfg, max_len, held,
                                calibrations)
        for idx, out, nrm in batches:
            grads[idx] = out.cpu().numpy()
            norms[idx] = nrm.cpu().numpy()
            if on_batch is not None:
                on_batch(len(idx))

    # float16 tops out at 65504: a row that overflows it is as unusable as a NaN one
    overflow = np.isfinite(norms) & ~np.isfinite(grads).all(axis=1)
    bad = ~np.isfinite(norms) | (norms == 0) | overflow
    reasons: dict[int, str] = {}
    for i in np.flatnonzero(bad):
        if norms[i] == 0:
            reasons[int(i)] = "gradient is exactly zero"
        elif overflow[i]:
            reasons[int(i)] = "projected gradient overflows float16; use out_dtype: float32"
        else:
            reasons[int(i)] = "gradient is not finite (NaN or inf)"
        grads[i] = 0
    _warn_bad(reasons, doc_ids, positions)
    return GradientResult(
        grads=grads,
        norms=norms,
        bad=bad,
        reasons=reasons,
        projection=projector.describe(),
        windowed=int(np.sum(positions >= max_len)),
        seconds=time.perf_counter() - t0,
    )


def _warn_bad(reasons: dict[int, str], doc_ids: np.ndarray, positions: np.ndarray, show: int = 10) -> None:
    if not reasons:
        return
    items = sorted(reasons.items())
    lines = [f"sample {i} (doc {int(doc_ids[i])}, pos {int(positions[i])}): {why}" for i, why in items[:show]]
    more = f"; and {len(items) - show} more" if len(items) > show else ""
    warnings.warn(
        f"{len(items)} samples left out (zero rows, bad=True): " + "; ".join(lines) + more,
        BadGradientWarning,
        stacklevel=3,
    )


def per_target_gradients(
    model: torch.nn.Module,
    params: Sequence[tuple[str, torch.nn.Parameter]],
    doc_tokens: torch.Tensor,
    targets: torch.Tensor,
    *,
    projector: Optional[Projector] = None,
    max_len: Optional[int] = None,
    share_context: Literal["auto", "always", "never"] = "always",
    batch_tokens: int = 8192,
    batch_rows: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact gradients of the losses of tokens at positions `targets` (n,) of one
    document `doc_tokens` (T,), each with its own context.

    Returns ((n, dim) float32, (n,) float32 exact norms) on the model's device; without
    a projector dim is P: the selected parameters' gradients flattened and concatenated
    in `params` order. Bad samples are returned as they are (compute_gradients zeroes
    and reports them).
    """
    projector = projector or NoProjection([(n, p.numel()) for n, p in params])
    toks = torch.as_tensor(doc_tokens).reshape(-1).cpu().numpy().astype(np.int64)
    pos = torch.as_tensor(targets).reshape(-1).cpu().numpy().astype(np.int64)
    doc_ids = np.zeros(len(pos), dtype=np.int64)
    docs, target_ids = _check_samples(doc_ids, pos, None, {0: toks})
    cfg = GradientsConfig(
        max_len=max_len, batch_tokens=batch_tokens, batch_rows=batch_rows, share_context=share_context, verify=False
    )
    dev = model_device(model)
    out = torch.zeros(len(pos), projector.dim, dtype=torch.float32, device=dev)
    norms = torch.zeros(len(pos), dtype=torch.float32, device=dev)
    max_len_ = resolve_max_len(model, max_len)
    for idx, o, nrm in _iter_batches(model, params, projector, docs, doc_ids, pos, target_ids, cfg, max_len_):
        ix = torch.tensor(idx, device=dev)
        out[ix] = o
        norms[ix] = nrm
    return out, norms


# --------------------------------------------------------------------------- the stage: shards, resumable

GRADIENTS_FORMAT = 2  # 2: parts carry a content checksum (pipeline/core/shards.py)


@dataclasses.dataclass(frozen=True)
class GradientShardTask:
    """One part of the gradients stage; small and picklable (the model travels by name)."""

    spec: Any  # models.ModelSpec
    load_kwargs: dict
    cfg: GradientsConfig
    max_len: int
    index: int
    samples: dict  # doc_id, pos, token_id arrays of this shard
    docs: dict  # doc_id -> int32 tokens of the documents it needs
    weights: str  # the weights' fingerprint, part of the per-process model cache key


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model as a worker keeps it between shards, with the memory planner's measurements
    of it (filled in by the first shard, reused by the rest)."""

    model: torch.nn.Module
    calibrations: dict


def _load(spec: Any, load_kwargs: dict) -> LoadedModel:
    return LoadedModel(model=models_lib.load_model(spec, **load_kwargs), calibrations={})


def compute_part(task: GradientShardTask, on_rows: Optional[Callable[[int], None]] = None) -> sharded.PartOutput:
    """One shard's projected gradients: grads (n, dim), norms (n,), bad (n,), reasons (n,).

    Runs in the stage's process or in a Dask worker (pipeline/core/sharded.py writes the
    part); `on_rows(n)` is called after every batch with its number of samples. The bad
    samples' warnings are caught here and returned in the summary, so that the driver
    reports them once, wherever the shard ran.
    """
    kwargs = dict(task.load_kwargs, device=execution.worker_device(task.load_kwargs["device"]))
    # the weights' fingerprint too: a long-lived worker must not serve a model retrained in place
    key = ("gradients", repr(task.spec), repr(sorted(kwargs.items())), task.weights)
    loaded = execution.cached(key, lambda: _load(task.spec, kwargs))
    cfg = dataclasses.replace(task.cfg, max_len=task.max_len)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BadGradientWarning)
        res = compute_gradients(loaded.model, task.samples, task.docs, cfg, on_batch=on_rows,
                                calibrations=loaded.calibrations)
    reasons = np.array([res.reasons.get(i, "") for i in range(len(res.norms))], dtype=str)
    dim = res.projection["dim"]  # the main projection's columns; the stability seeds' follow
    return sharded.PartOutput(
        arrays={"grads": res.grads[:, :dim], "extra": res.grads[:, dim:], "norms": res.norms, "bad": res.bad,
                "reasons": reasons},
        summary={
            "seconds": res.seconds,
            "projection": res.projection,
            "windowed": res.windowed,
            "warnings": [str(w.message) for w in caught if issubclass(w.category, BadGradientWarning)],
        },
    )


def check_same_tokenizer(a: Any, b: Any, load: Callable[[Any], Any]) -> None:
    """Gradients of model `b` on samples selected (and tokenized) for model `a` need one tokenizer."""
    if (a.name, a.revision) == (b.name, b.revision):
        return
    ta, tb = load(a), load(b)
    if ta.get_vocab() != tb.get_vocab():
        raise GradientError(
            f"gradients.model {b.name}@{b.revision} has a different tokenizer ({type(tb).__name__}, "
            f"{len(tb)} tokens) from select.model {a.name}@{a.revision} ({type(ta).__name__}, {len(ta)} tokens), "
            "so the selected token ids mean other tokens; use a model of the same family or leave gradients.model null"
        )


def run_gradients(
    samples_path: str,
    tokens_path: str,
    out_npy: str,
    out_table: str,
    *,
    cfg: GradientsConfig,
    select_spec: Any,
    spec: Any,
    load_kwargs: dict,
    max_len: int,
    parts_dir: Optional[str] = None,
    tokenizer_loader: Optional[Callable[[Any], Any]] = None,
    out_projections: Optional[str] = None,
) -> dict:
    """The gradients stage: ``out_npy`` (N, dim), ``out_table`` (sample, norm, bad, reason)
    and ``out_projections`` (S, N, dim): the same gradients projected with each of the S
    cfg.stability_seeds (S = 0: an empty array; default path: ``<out_npy stem>_projections.npy``).

    Shards of cfg.shard_samples samples are computed in-process or on Dask workers (as
    the losses stage, through pipeline/core/sharded.py), each written as a part file in
    `parts_dir`; a killed run reuses the finished parts. When every part is there, the
    (N, dim) array is assembled into ``out_npy`` atomically and the parts are removed.
    Returns the stage's meta dict.
    """
    t_start = time.perf_counter()
    if tokenizer_loader is not None:
        check_same_tokenizer(select_spec, spec, tokenizer_loader)
    samples, tokens = _read_inputs(samples_path, tokens_path)
    store = shards.ShardStore(Path(parts_dir or gradient_files.parts_dir(out_npy)), shards.NPZ, "gradients")
    identity, shard_bounds, parts = _plan_shards(samples, cfg, spec, load_kwargs, max_len)
    work = sharded.ShardedWork(
        store=store, identity=identity, numerics=NUMERICS_VERSION, parts=parts,
        rows=[b - a for a, b in shard_bounds], compute=compute_part,
        make_task=_task_maker(shard_bounds, samples, tokens, cfg, spec, load_kwargs, max_len, identity["weights"]),
        desc="gradients", unit="sample", key_prefix="gradients", finite=("grads",),
    )
    run, meta = sharded.run_sharded(
        work, sharded.Execution.of(cfg),
        lambda run: (run, _assemble(store, shard_bounds, run.identity, samples, out_npy, out_table,
                                    out_projections or projections_path(out_npy))),
    )
    for res in run.results:
        for w in res["warnings"]:
            warnings.warn(w, BadGradientWarning, stacklevel=2)
    computed = sum(r["rows"] for r in run.results)
    busy = sum(r["seconds"] for r in run.results)
    meta.update({
        "reused_parts": run.reused_parts,
        "computed_samples": computed,
        "samples_per_s": round(computed / busy, 2) if busy else None,
        "compute_seconds": round(run.compute_seconds, 2),
        "peak_rss_bytes": max([r["peak_rss_bytes"] for r in run.results], default=peak_rss_bytes()),
        "projection": run.results[0]["projection"] if run.results else None,
        "windowed": sum(r["windowed"] for r in run.results),
        "execution": run.mode,
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "identity": run.identity,
    })
    return meta


def projections_path(out_npy: str | Path) -> Path:
    """Where the stability seeds' projections go by default: ``<stem>_projections.npy`` beside out_npy."""
    out_npy = Path(out_npy)
    return out_npy.with_name(f"{out_npy.stem}_projections.npy")


def _read_inputs(samples_path: str, tokens_path: str) -> tuple[Any, Any]:
    """(samples, tokens), with every sample's document present in the tokens table."""
    from pipeline.lm.corpus import read_tokens
    from pipeline.qdg.selection import read_samples

    samples = read_samples(samples_path)
    if len(samples) == 0:
        raise GradientError(f"{samples_path} has no samples; rerun the select stage")
    tokens = read_tokens(tokens_path)
    doc = samples["doc_id"].to_numpy(np.int64)
    rows = tokens.index_of(doc)
    missing = (rows >= len(tokens.doc_ids)) | (tokens.doc_ids[np.minimum(rows, len(tokens.doc_ids) - 1)] != doc)
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise GradientError(f"sample {i}: document {doc[i]} is not in {tokens_path}; rerun select after the corpus stage")
    return samples, tokens


def _sample_columns(samples: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_id, pos, token_id) of the samples, as int64."""
    return tuple(samples[c].to_numpy(np.int64) for c in ("doc_id", "pos", "token_id"))


#: GradientsConfig keys that never change a part's numbers (see _plan_shards); model and
#: revision are in the identity through the resolved spec instead
EXECUTION_KEYS = ("scheduler", "n_workers", "threads_per_worker", "progress", "model", "revision", "verify", "memory_gb")


def _plan_shards(samples: Any, cfg: GradientsConfig, spec: Any, load_kwargs: dict,
                 max_len: int) -> tuple[dict, list[tuple[int, int]], list[dict]]:
    """(the run's identity, each shard's [start, stop) of the samples, the facts that
    identify each part's input).

    A part is reused only under the same identity: the model and its weights, the config
    that changes the numbers, and a digest of the shard's own samples.

    Which keys are which: the parameters differentiated (include, exclude), dtype, device,
    max_len, the projection (projection, k, nnz, seed, stability_seeds), out_dtype,
    share_context, the packing (batch_tokens, batch_rows: other packings move fp32 results
    in the last bits, 1.6e-7 at most on the planted default) and shard_samples change the
    parts' numbers or their layout, and are in it. Where and how visibly it runs (scheduler,
    n_workers, threads_per_worker, progress, verify) is not, nor is the memory bound
    (memory_gb): it is a fact about the machine, lowered after running out of memory, and
    it only splits batches that would not fit (the same last-bit effect at most), so a run
    resumed under a lower bound keeps every finished part."""
    n = len(samples)
    doc, pos, tok = _sample_columns(samples)
    shard_bounds = [(s, min(n, s + cfg.shard_samples)) for s in range(0, n, cfg.shard_samples)]
    identity = {
        "stage": "gradients",
        "format": GRADIENTS_FORMAT,
        "model": dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else str(spec),
        # a local model rewritten in place (a retrained planted suite) must not reuse parts
        "weights": models_lib.weights_fingerprint(spec, cache_dir=load_kwargs.get("cache_dir")),
        "dtype": cfg.dtype,
        "device": load_kwargs.get("device"),
        "max_len": max_len,
        "gradients": {
            k: v
            for k, v in dataclasses.asdict(cfg).items()
            if k not in EXECUTION_KEYS
        },
    }
    parts = []
    for index, (a, b) in enumerate(shard_bounds):
        digest = hashlib.sha256(np.stack([doc[a:b], pos[a:b], tok[a:b]]).tobytes()).hexdigest()
        parts.append({"index": index, "start": a, "stop": b, "sha256": digest})
    return identity, shard_bounds, parts


def _task_maker(shard_bounds: list[tuple[int, int]], samples: Any, tokens: Any, cfg: GradientsConfig, spec: Any,
                load_kwargs: dict, max_len: int, weights: str) -> Callable[[int], GradientShardTask]:
    """index -> the task of part `index`: its samples and the token ids of just their documents."""
    doc, pos, tok = _sample_columns(samples)
    task_spec, task_kwargs = execution.for_workers(spec, load_kwargs)

    def task_of(index: int) -> GradientShardTask:
        a, b = shard_bounds[index]
        needed = np.unique(doc[a:b])
        r = tokens.index_of(needed)
        docs = {int(d): tokens.token_ids[tokens.offsets[i] : tokens.offsets[i + 1]] for d, i in zip(needed, r)}
        return GradientShardTask(
            spec=task_spec, load_kwargs=task_kwargs, cfg=cfg, max_len=max_len, index=index,
            samples={"doc_id": doc[a:b], "pos": pos[a:b], "token_id": tok[a:b]}, docs=docs, weights=weights,
        )

    return task_of


def _assemble(store: "shards.ShardStore", shard_bounds: list[tuple[int, int]], identity: dict, samples: Any,
              out_npy: str, out_table: str, out_projections: str) -> dict:
    """Every part exists now (computed or reused): write the (N, dim) array and the
    (S, N, dim) stability projections in one pass into memmaps, and the per-sample table;
    remove the parts. Returns the outputs' part of the meta."""
    import pyarrow as pa

    from pipeline.core import files

    n = len(samples)
    first = store.read(0)[1]
    dim, dtype = first["grads"].shape[1], first["grads"].dtype
    n_extra = first["extra"].shape[1] // dim
    del first
    norms = np.zeros(n, dtype=np.float32)
    bad = np.zeros(n, dtype=bool)
    reasons = np.full(n, "", dtype=object)
    with files.atomic_path(out_npy) as tmp, files.atomic_path(out_projections) as tmp_extra:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, dim))
        extra = np.lib.format.open_memmap(tmp_extra, mode="w+", dtype=dtype, shape=(n_extra, n, dim))
        for index, (a, b) in enumerate(shard_bounds):
            part = store.read(index)[1]
            arr[a:b] = part["grads"]
            extra[:, a:b] = part["extra"].reshape(b - a, n_extra, dim).transpose(1, 0, 2)
            norms[a:b] = part["norms"]
            bad[a:b] = part["bad"]
            reasons[a:b] = part["reasons"]
        arr.flush()
        extra.flush()
        del arr, extra
    table = pa.table(
        {
            "sample": pa.array(samples["sample"].to_numpy(np.int32)),
            "norm": pa.array(norms),
            "bad": pa.array(bad),
            "reason": pa.array([r or None for r in reasons], pa.string()),
        }
    )
    # the matrix's checksum rides with the table, so that similarity refuses a matrix changed since
    checksum = {gradient_files.CHECKSUM_KEY: files.sha256_file(out_npy)}
    files.write_parquet(table, out_table, config=dict(identity, **checksum))
    store.remove_parts()
    return {
        "n_samples": n,
        "dim": int(dim),
        "dtype": str(dtype),
        "n_bad": int(bad.sum()),
        "bad_samples": {int(i): reasons[i] for i in np.flatnonzero(bad)[:100]},
        "parts": len(shard_bounds),
    }
