"""Per-token losses of one (model, revision) over the tokenized corpus.

Why this module exists: every later step (QDG sample selection, per-token scaling
curves, mean-loss fits, training dynamics) reads the loss of every corpus token under
every model of the suite, so this is the widest computation of the pipeline. The paper
ran one document per forward pass (batch 1, fp32) and a full log-softmax over the
vocabulary at every position. Here, with the same numbers in fp32:

- windows (``corpus.make_windows``) are sorted by length and packed into batches of at
  most ``losses.batch_tokens`` padded tokens, so short documents share a forward pass
  and padding stays small;
- the transformer body runs once per batch (bf16 autocast on CUDA) up to its final
  hidden states; only the hidden states that predict a scored token go through the
  unembedding (``model.get_output_embeddings()``), ``losses.logits_chunk`` rows at a
  time, and the cross-entropy is ``logsumexp(logits) - logits[target]`` in fp32
  (pipeline/lm/cross_entropy.py, which the gradients stage shares). So
  the (batch, pos, vocab) fp32 logits of a big batch never exist, and no log-softmax
  over the vocabulary is written out (on CPUs the vocabulary is also cut into
  cache-sized tiles, folded into an online logsumexp);
- the windows are cut into shards of about ``losses.shard_tokens`` scored tokens; each
  shard is one task (in this process, or on a Dask cluster) that writes one part file
  atomically; a rerun reuses a finished part only when its identity (config, input
  digest, weights, NUMERICS_VERSION) matches and its content verifies (checksum, row
  count, finite losses), so a killed run resumes where it stopped. The shard machinery
  is pipeline/core/sharded.py's; this module supplies :func:`compute_part`.

Units: nats. The row for ``pos`` is the loss of predicting token ``pos`` of a document
from its tokens ``0..pos-1`` (pos >= 1), DESIGN.md §4. Output layout (hive partitioned,
stable names)::

    <out>/model=<name>/revision=<rev>/part-00000.parquet   doc_id int64, pos int32, loss float32
    <out>/model=<name>/revision=<rev>/_meta.json           params, tokens, tokens/s, peak memory

Files starting with ``_`` or ``.`` are skipped by pyarrow/pandas dataset discovery, and
polars/duckdb read ``**/*.parquet``, so ``_meta.json`` and temp files never leak into a
table read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from pipeline.core import execution, files, sharded
from pipeline.core import shards as shards_lib
from pipeline.core.config import CorpusConfig, LossesConfig, SuiteConfig
from pipeline.core.errors import QuantaError
from pipeline.core.resources import peak_rss_bytes
from pipeline.lm import corpus as corpus_lib
from pipeline.lm import models as models_lib
from pipeline.lm.corpus import TokenTable, read_tokens
from pipeline.lm.cross_entropy import cross_entropy
from pipeline.lm.models import body_and_head, check_output_head, logit_transform, model_device
from pipeline.lm.partitions import META_FILE, partition_dir  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

# Bump when the meaning of a part file changes: old parts are then recomputed, not reused.
FORMAT_VERSION = 2  # 2: parts carry a content checksum (pipeline/core/shards.py)
#: Bump when a code change changes the numbers (a kernel, the batching, the cross-entropy):
#: it is in every part's identity, so parts computed by other code are recomputed, not reused.
NUMERICS_VERSION = 1
SCHEMA = pa.schema([("doc_id", pa.int64()), ("pos", pa.int32()), ("loss", pa.float32())])
#: a losses part: a Parquet table of SCHEMA (see pipeline/core/shards.py for the resume protocol)
PARTS = shards_lib.parquet_format(SCHEMA)


# --------------------------------------------------------------------------- shards and batches


@dataclasses.dataclass(frozen=True)
class Shard:
    """Consecutive windows whose losses go to one part file (and one task)."""

    index: int
    windows: tuple  # of corpus.Window

    @property
    def n_tokens(self) -> int:
        """Scored tokens = rows of the part file."""
        return sum(w.end - w.score_from for w in self.windows)


def make_shards(windows: Sequence[Any], shard_tokens: int) -> list[Shard]:
    """Cut `windows` (in corpus order) into shards of about `shard_tokens` scored tokens.

    Deterministic in (windows, shard_tokens) alone, so a rerun maps every window to the
    same part index. A window is never split; a shard is closed before the window that
    would take it over `shard_tokens` (so a single huge window makes a shard of its own).
    """
    if shard_tokens < 1:
        raise QuantaError(f"losses.shard_tokens must be >= 1, got {shard_tokens}")
    shards: list[Shard] = []
    current: list = []
    size = 0
    for w in windows:
        n = w.end - w.score_from
        if current and size + n > shard_tokens:
            shards.append(Shard(len(shards), tuple(current)))
            current, size = [], 0
        current.append(w)
        size += n
    if current:
        shards.append(Shard(len(shards), tuple(current)))
    return shards


# Rows of a batch are at least this fraction of its longest row, so padding stays under
# 1 - MIN_ROW_FILL of a batch's tokens whatever the corpus. (On a big corpus, length
# sorting alone does that; on a small one, a 16k-token batch would otherwise pad ten
# short documents to the length of one long one, and do up to 2x the work.)
MIN_ROW_FILL = 0.8


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[np.ndarray]:
    """Group sequence indices into batches of at most `batch_tokens` padded tokens.

    Longest first, so that sequences in a batch have similar lengths; a batch also
    closes before a sequence shorter than MIN_ROW_FILL x its longest, so padding
    (rows x longest - real tokens) stays under 20%. A sequence longer than
    `batch_tokens` gets a batch of its own rather than an error: the budget is a speed
    knob, not a limit.
    """
    if batch_tokens < 1:
        raise QuantaError(f"losses.batch_tokens must be >= 1, got {batch_tokens}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    current: list[int] = []
    width = 0
    for i in order:
        # descending order: the first sequence of a batch sets its width
        if current and (width * (len(current) + 1) > batch_tokens or lengths[i] < MIN_ROW_FILL * width):
            batches.append(np.asarray(current, dtype=np.int64))
            current = []
        if not current:
            width = int(lengths[i])
        current.append(int(i))
    if current:
        batches.append(np.asarray(current, dtype=np.int64))
    return batches


# --------------------------------------------------------------------------- the computation

# losses.batch_tokens / logits_chunk = 0 resolve by device type. GPUs want big batches
# to fill their matrix units. On CPUs big batches are slower (activations of a 16k-token
# batch spill to DRAM; bench/RESULTS.md has the numbers).
AUTO_SIZES = {"cpu": (1024, 256)}
AUTO_SIZES_ACCELERATOR = (16384, 4096)


def batch_sizes(device: torch.device, batch_tokens: int = 0, logits_chunk: int = 0) -> tuple[int, int]:
    """(batch_tokens, logits_chunk) for `device`, with 0 meaning the device's default."""
    auto = AUTO_SIZES.get(device.type, AUTO_SIZES_ACCELERATOR)
    return batch_tokens or auto[0], logits_chunk or auto[1]



def autocast_context(device: torch.device, mode: str):
    """The autocast context for `mode` (see LossesConfig.autocast) on `device`."""
    if mode == "none" or (mode == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.float16 if mode == "float16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


# A (chunk, block) fp32 tile of about 4 MiB stays in a CPU core's cache; the
# full-vocabulary unembedding + cross-entropy is memory-bound on CPUs, and tiling makes
# it faster (bench/RESULTS.md has the numbers).
CPU_TILE_ELEMENTS = 1 << 20


def cpu_vocab_block(chunk: int) -> int:
    """Vocabulary columns per tile for `chunk` rows on a CPU (at least 256)."""
    return max(256, CPU_TILE_ELEMENTS // max(1, chunk))


def next_token_losses(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    chunk: int,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    vocab_block: Optional[int] = None,
) -> torch.Tensor:
    """Cross-entropy in nats (fp32) of `targets` under ``head(hidden)``, `chunk` rows at a time.

    hidden: (n, d_model), the states that predict `targets`; targets: (n,) token ids.
    Returns (n,) float32. Per chunk, the logits (chunk, vocab) are made in the compute
    dtype, upcast to fp32, and reduced to ``logsumexp - logit[target]``, which is
    ``-log_softmax(logits)[target]`` without writing out the (chunk, vocab) log-softmax.
    Peak extra memory: about two (chunk, vocab) fp32 buffers, whatever the batch size.

    With `vocab_block` (an ``nn.Linear`` head only), each chunk's logits are made
    `vocab_block` columns at a time and folded into a running (online) logsumexp, so
    only a (chunk, vocab_block) tile ever exists: on a CPU that tile stays in cache,
    where a full (chunk, vocab) buffer would make every pass a trip to DRAM.
    """
    n = hidden.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    tiled = vocab_block is not None and isinstance(head, torch.nn.Linear) and vocab_block < head.out_features
    for c0 in range(0, n, max(1, chunk)):
        c1 = min(n, c0 + chunk)
        if tiled:
            out[c0:c1] = _tiled_cross_entropy(hidden[c0:c1], targets[c0:c1], head, vocab_block, transform)
            continue
        logits = head(hidden[c0:c1]).float()  # (chunk, vocab)
        if transform is not None:
            logits = transform(logits)
        out[c0:c1] = cross_entropy(logits, targets[c0:c1])  # (chunk,)
        del logits
    return out


def _tiled_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Linear,
    block: int,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]],
) -> torch.Tensor:
    """:func:`next_token_losses` for one chunk, over vocabulary blocks (online logsumexp).

    Kept apart from :func:`pipeline.lm.cross_entropy.cross_entropy`: that one needs the
    whole (chunk, vocab) row of logits at once, which is what this path exists to avoid;
    folding blocks into a running logsumexp rounds differently in the last bits, so it is
    a CPU speed path of its own, not a second definition of the loss.
    """
    rows = hidden.shape[0]
    running_max = torch.full((rows,), -torch.inf, dtype=torch.float32, device=hidden.device)
    running_sum = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    target_logit = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
    vocab = head.out_features
    for v0 in range(0, vocab, block):
        v1 = min(vocab, v0 + block)
        bias = None if head.bias is None else head.bias[v0:v1]
        logits = torch.nn.functional.linear(hidden, head.weight[v0:v1], bias).float()  # (chunk, block)
        if transform is not None:
            logits = transform(logits)
        # the target's logit, read from the very tile that holds it (same op, same rounding)
        idx = targets - v0
        here = (idx >= 0) & (idx < v1 - v0)
        picked = logits.gather(1, idx.clamp(0, v1 - v0 - 1)[:, None])[:, 0]
        target_logit = torch.where(here, picked, target_logit)
        new_max = torch.maximum(running_max, logits.amax(dim=-1))
        # rescale the old sum to the new max; exp(-inf) = 0 on the first block
        running_sum = running_sum * torch.exp(running_max - new_max) + logits.sub_(new_max[:, None]).exp_().sum(-1)
        running_max = new_max
    return running_max + running_sum.log() - target_logit


@torch.inference_mode()
def score_windows(
    model: torch.nn.Module,
    inputs: Sequence[np.ndarray],
    first: Sequence[int],
    *,
    batch_tokens: int = 0,
    logits_chunk: int = 0,
    autocast: str = "auto",
    on_batch: Optional[Callable[[int], None]] = None,
) -> list[np.ndarray]:
    """Next-token losses (nats, float32) of token sequences, batched by length.

    inputs[i]: the token ids (len_i,) fed to the model as one sequence (a window);
    1 <= first[i] < len_i: the index in inputs[i] of the first token to score. Returns, for
    each i, the losses of tokens ``inputs[i][first[i]:]`` in order, shape
    (len_i - first[i],). `on_batch(n_scored)` is called after every forward pass.
    `batch_tokens` and `logits_chunk` (0: the device's default, :func:`batch_sizes`)
    only change speed and memory, never the losses beyond fp32 rounding.

    The result does not depend on how sequences are grouped into batches: sequences
    are right-padded, and in a causal LM a real token never attends to positions after
    it, so the padding (whatever its ids) cannot reach any scored position. That is
    also why no attention mask is passed: without one, attention runs as a plain
    causal kernel (flash attention on GPU). Position ids are 0..T-1 in every row, as
    for an unpadded sequence.
    """
    body, head = body_and_head(model)
    transform = logit_transform(model)
    device = model_device(model)
    batch_tokens, logits_chunk = batch_sizes(device, batch_tokens, logits_chunk)
    vocab_block = cpu_vocab_block(logits_chunk) if device.type == "cpu" else None  # GPUs: one big matmul
    lengths = np.fromiter((len(x) for x in inputs), dtype=np.int64, count=len(inputs))
    first = np.asarray(first, dtype=np.int64)
    if len(first) != len(lengths):
        raise ValueError("inputs and first must have the same length")
    if np.any(first < 1) or np.any(first >= lengths):
        raise ValueError("every first[i] must be in 1..len(inputs[i]) - 1: position 0 has no context to predict it")
    out: list[Optional[np.ndarray]] = [None] * len(inputs)
    for batch in plan_batches(lengths, batch_tokens):
        width = int(lengths[batch].max())
        ids = np.zeros((len(batch), width), dtype=np.int64)  # (batch, pos), right-padded with id 0
        rows, cols = [], []
        for r, i in enumerate(batch):
            ids[r, : lengths[i]] = inputs[i]
            # The next-token shift happens here: the hidden state at position j - 1
            # (which has seen tokens 0..j-1) predicts token j. So the scored tokens
            # first..len-1 are read from hidden positions first-1..len-2.
            cols.append(np.arange(first[i] - 1, lengths[i] - 1))
            rows.append(np.full(lengths[i] - first[i], r))
        rows_np = np.concatenate(rows)
        cols_np = np.concatenate(cols)
        targets = torch.from_numpy(ids[rows_np, cols_np + 1]).to(device)  # (n_scored,)
        # No hidden state at the last position is ever used (it would predict the token
        # after the window), so the last column is not fed to the model at all.
        ids_t = torch.from_numpy(ids[:, : width - 1]).to(device)  # (batch, pos - 1)
        with autocast_context(device, autocast):
            hidden = body(input_ids=ids_t, use_cache=False).last_hidden_state  # (batch, pos, d_model)
            scoring = hidden[torch.from_numpy(rows_np).to(device), torch.from_numpy(cols_np).to(device)]
            del hidden  # (n_scored, d_model) is all we need from here on
            losses = next_token_losses(scoring, targets, head, logits_chunk, transform, vocab_block)
        losses_np = losses.cpu().numpy()
        sizes = lengths[batch] - first[batch]
        for i, piece in zip(batch, np.split(losses_np, np.cumsum(sizes)[:-1])):
            out[i] = piece
        if on_batch is not None:
            on_batch(int(len(losses_np)))
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- one shard = one task


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model as a worker keeps it between shards, with what the stage reports about it."""

    model: torch.nn.Module
    params: dict
    max_context: int
    compute: dict  # device type and dtypes actually used: written into every part


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to compute one part. Small and picklable: the model travels
    by name (spec + load arguments) and is loaded once per worker process."""

    spec: Any  # models.ModelSpec
    load_kwargs: dict  # dtype, device, cache_dir, local_files_only, trust_remote_code
    corpus: CorpusConfig
    batch_tokens: int
    logits_chunk: int
    autocast: str
    windows: tuple  # of corpus.Window
    tokens: tuple  # of np.ndarray: tokens[start:end] of each window
    weights: str  # the weights' fingerprint (stage_identity), part of the per-process model cache key


def _load(spec: Any, load_kwargs: dict, autocast: str) -> LoadedModel:
    model = models_lib.load_model(spec, **load_kwargs)
    check_output_head(model)
    device = model_device(model)
    weights = next(model.parameters()).dtype
    compute_dtype = weights
    if autocast != "none" and (autocast != "auto" or device.type == "cuda"):
        compute_dtype = torch.float16 if autocast == "float16" else torch.bfloat16
    counts = models_lib.param_counts(model)
    if not isinstance(counts, dict):
        total, non_embedding = counts
        counts = {"total": int(total), "non_embedding": int(non_embedding)}
    return LoadedModel(
        model=model,
        params=dict(counts),
        max_context=models_lib.max_context(model),
        compute={
            "device_type": device.type,
            "weights_dtype": str(weights).removeprefix("torch."),
            "compute_dtype": str(compute_dtype).removeprefix("torch."),
        },
    )


def loaded_model(task: ShardTask) -> LoadedModel:
    """The task's model, loaded at most once per process (pipeline.core.execution.cached)."""
    kwargs = dict(task.load_kwargs, device=execution.worker_device(task.load_kwargs["device"]))
    # the weights' fingerprint too: a long-lived worker must not serve a model retrained in place
    key = ("losses", _json(_spec_dict(task.spec)), _json(kwargs), task.autocast, task.weights)
    return execution.cached(key, lambda: _load(task.spec, kwargs, task.autocast))


def compute_part(task: ShardTask, on_rows: Optional[Callable[[int], None]] = None) -> sharded.PartOutput:
    """One part's losses (SCHEMA's columns), with the device and dtypes used as its `extra`.

    Runs in the stage's process or in a Dask worker (pipeline/core/sharded.py writes the
    part); `on_rows(n)` is called after every forward pass with the tokens it scored.
    Raises QuantaError on non-finite losses and on windows longer than the model's context.
    """
    loaded = loaded_model(task)
    corpus_lib.check_max_len(task.corpus, loaded.max_context, model=task.spec.name)
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    top = max((int(t.max()) for t in task.tokens if len(t)), default=0)
    if top >= vocab:
        raise QuantaError(
            f"token id {top} in the corpus is outside the vocabulary ({vocab}) of model "
            f"{task.spec.name}@{task.spec.revision}; tokenize the corpus with this model's tokenizer (corpus.tokenizer)"
        )
    device = model_device(loaded.model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t1 = time.perf_counter()
    losses = score_windows(
        loaded.model,
        task.tokens,
        [w.score_from - w.start for w in task.windows],
        batch_tokens=task.batch_tokens,
        logits_chunk=task.logits_chunk,
        autocast=task.autocast,
        on_batch=on_rows,
    )
    seconds = time.perf_counter() - t1
    arrays = part_arrays(task.windows, losses)
    check_finite(arrays, task.spec)
    summary = {
        "seconds": seconds,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "params": loaded.params,
        "compute": loaded.compute,
    }
    return sharded.PartOutput(arrays=arrays, summary=summary, extra={"compute": loaded.compute})


def part_arrays(windows: Sequence[Any], losses: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The rows of a part as SCHEMA's columns (doc_id, pos, loss), sorted by (doc_id, pos)."""
    doc = np.concatenate([np.full(w.end - w.score_from, w.doc_id, dtype=np.int64) for w in windows])
    pos = np.concatenate([np.arange(w.score_from, w.end, dtype=np.int32) for w in windows])
    loss = np.concatenate([np.asarray(x, dtype=np.float32) for x in losses])
    order = np.lexsort((pos, doc))
    doc, pos, loss = doc[order], pos[order], loss[order]
    dup = (doc[1:] == doc[:-1]) & (pos[1:] == pos[:-1])
    if dup.any():  # windows overlapping in their scored ranges: a bug in make_windows
        i = int(np.flatnonzero(dup)[0])
        raise RuntimeError(f"token (doc_id={doc[i]}, pos={pos[i]}) is scored by two windows")
    return {"doc_id": doc, "pos": pos, "loss": loss}


def check_finite(arrays: dict[str, np.ndarray], spec: Any) -> None:
    """NaN or infinite losses are bad input (a broken checkpoint, fp16 overflow): stop."""
    loss = arrays["loss"]
    bad = np.flatnonzero(~np.isfinite(loss))
    if len(bad):
        i = int(bad[0])
        raise QuantaError(
            f"{len(bad)} non-finite losses (first: {loss[i]} at doc_id={arrays['doc_id'][i]}, pos={arrays['pos'][i]}) "
            f"from model {spec.name}@{spec.revision}; the checkpoint or its dtype is broken (try suite.dtype: float32 "
            f"and losses.autocast: none)"
        )


# --------------------------------------------------------------------------- the stage


def _spec_dict(spec: Any) -> dict:
    return dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(vars(spec))


def _json(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists), for comparisons; a string key."""
    return json.dumps(obj, sort_keys=True, default=str)


def shard_digest(windows: Sequence[Any], tokens: Sequence[np.ndarray]) -> str:
    """sha256 of a shard's windows and their token ids: a part is reused only for the same input."""
    h = hashlib.sha256()
    h.update(np.asarray([(w.doc_id, w.start, w.end, w.score_from) for w in windows], dtype=np.int64).tobytes())
    for t in tokens:
        h.update(np.ascontiguousarray(t, dtype=np.int32).tobytes())
    return h.hexdigest()


#: LossesConfig keys that never change a part's numbers: where and how visibly the work runs
EXECUTION_KEYS = ("scheduler", "n_workers", "threads_per_worker", "progress")


def stage_identity(spec: Any, suite: SuiteConfig, corpus: CorpusConfig, losses: LossesConfig) -> dict:
    """What defines the numbers of a part file (goes into its metadata, checked on resume).

    Everything that changes the table is here, batch packing included (it changes the
    last bits of fp32 results); where the work runs (scheduler, workers, threads,
    progress bar) is not, so a run resumed on a cluster reuses parts made in-process.
    """
    return {
        "stage": "losses",
        "format": FORMAT_VERSION,
        "model": _spec_dict(spec),
        # a local model rewritten in place (a retrained planted suite) must not reuse parts
        "weights": models_lib.weights_fingerprint(spec, cache_dir=suite.cache_dir),
        "suite": {"dtype": suite.dtype, "device": suite.device},
        "corpus": {"context": corpus.context, "max_len": corpus.max_len, "min_context": corpus.min_context},
        # batch_tokens, logits_chunk, autocast, shard_tokens
        "losses": {k: v for k, v in dataclasses.asdict(losses).items() if k not in EXECUTION_KEYS},
    }


def run_losses(
    spec: Any,
    tokens_path: str | Path | TokenTable,
    out_root: str | Path,
    *,
    losses: LossesConfig,
    suite: SuiteConfig,
    corpus: CorpusConfig,
) -> dict:
    """Per-token losses of model `spec` on the corpus at `tokens_path` (tokens.parquet, or its
    TokenTable already read), written under `out_root`.

    Writes ``<out_root>/model=<name>/revision=<rev>/part-*.parquet`` and ``_meta.json``
    and returns the meta dict (the existing one, untouched, when every part was already
    done). Reuses valid parts from an earlier (killed) run (pipeline/core/sharded.py).
    """
    t_start = time.perf_counter()
    out_dir = partition_dir(out_root, spec.name, spec.revision)
    # a TokenTable: the caller scores several revisions and reads tokens.parquet once
    tokens = tokens_path if isinstance(tokens_path, TokenTable) else read_tokens(tokens_path)
    windows = corpus_lib.make_windows(tokens.doc_ids, tokens.lengths, corpus)
    if not windows:
        raise QuantaError("no tokens to score in the corpus' tokens.parquet: every document is shorter than two tokens")
    shards = make_shards(windows, losses.shard_tokens)
    identity = stage_identity(spec, suite, corpus, losses)
    store = shards_lib.ShardStore(out_dir, PARTS, f"{spec.name}@{spec.revision}", extra_keys=("compute",))
    inputs = [_shard_input(tokens, shard, len(shards)) for shard in shards]
    task_spec, task_kwargs = execution.for_workers(spec, models_lib.load_kwargs(suite, suite.dtype))

    def task_of(index: int) -> ShardTask:
        return ShardTask(
            spec=task_spec, load_kwargs=task_kwargs, corpus=corpus, batch_tokens=losses.batch_tokens,
            logits_chunk=losses.logits_chunk, autocast=losses.autocast, windows=shards[index].windows,
            tokens=tuple(inputs[index][0]), weights=identity["weights"],
        )

    work = sharded.ShardedWork(
        store=store, identity=identity, numerics=NUMERICS_VERSION, parts=[part for _, part in inputs],
        rows=[s.n_tokens for s in shards], compute=compute_part, make_task=task_of,
        desc=f"losses {spec.name}@{spec.revision}", unit="tok", key_prefix=f"losses-{spec.name}-{spec.revision}",
        finite=("loss",), up_to=out_root,  # a failed start leaves no empty folders
        # the output changes: the old _meta.json no longer describes it
        on_todo=lambda _: (out_dir / META_FILE).unlink(missing_ok=True),
    )
    return sharded.run_sharded(
        work, sharded.Execution.of(losses), lambda run: _write_meta(spec, store, run, shards, tokens, suite, t_start)
    )


def _shard_input(tokens: TokenTable, shard: Shard, n_parts: int) -> tuple[list[np.ndarray], dict]:
    """(the token ids of each of the shard's windows, the facts that identify the part's input)."""
    rows = tokens.index_of(np.asarray([w.doc_id for w in shard.windows], dtype=np.int64))
    pieces = [tokens.token_ids[tokens.offsets[r] + w.start : tokens.offsets[r] + w.end] for r, w in zip(rows, shard.windows)]
    part = {"index": shard.index, "n_parts": n_parts, "rows": shard.n_tokens, "sha256": shard_digest(shard.windows, pieces)}
    return pieces, part


def _write_meta(spec: Any, store: "shards_lib.ShardStore", run: sharded.ShardedRun, shards: list[Shard],
                tokens: TokenTable, suite: SuiteConfig, t_start: float) -> dict:
    """Write and return the partition's _meta.json, once every part is there."""
    out_dir = store.directory
    compute = check_compute_consistent(store, len(shards))
    meta_path = out_dir / META_FILE
    if not run.results and meta_path.exists():
        # Nothing recomputed: the existing _meta.json still describes the output. It is
        # written back through write_meta, which gives the same bytes, except that run
        # facts an older run left inside move to the run log.
        log.info("%s@%s: all %d parts were already done", spec.name, spec.revision, len(shards))
        meta = files.read_meta(meta_path)
        files.write_meta(meta, meta_path)
        return meta
    meta = stage_meta(
        spec, out_dir, run.results, shards, tokens, run.mode, compute, run.compute_seconds,
        time.perf_counter() - t_start,
    )
    if meta["params"] is None:  # killed between its last part and _meta.json: read the config
        meta["params"] = models_lib.config_param_counts(spec, cache_dir=suite.cache_dir)
    files.write_meta(meta, meta_path)
    log.info(
        "%s@%s: %d tokens in %d parts (%d computed at %.0f tokens/s)",
        spec.name, spec.revision, sum(s.n_tokens for s in shards), len(shards), meta["computed_tokens"],
        meta["tokens_per_s"] or 0,
    )
    return meta


def check_compute_consistent(store: "shards_lib.ShardStore", n_parts: int) -> dict:
    """All parts must come from the same device type and dtypes; a run resumed on another
    machine with ``dtype: auto`` could otherwise mix fp32 and bf16 losses silently."""
    seen: dict[str, list[int]] = {}
    for i in range(n_parts):
        cfg = files.read_config(store.path(i)) or {}
        seen.setdefault(_json(cfg.get("compute")), []).append(i)
    if len(seen) > 1:
        desc = "; ".join(f"parts {v[:3]}{'...' if len(v) > 3 else ''}: {k}" for k, v in seen.items())
        raise QuantaError(
            f"the parts in {store.directory} were computed with different devices/dtypes ({desc}); delete the folder "
            f"or set suite.dtype and suite.device explicitly, then rerun"
        )
    return json.loads(next(iter(seen))) if seen else {}


def stage_meta(
    spec: Any,
    out_dir: Path,
    results: list[dict],
    shards: list[Shard],
    tokens: TokenTable,
    mode: str,
    compute: dict,
    compute_seconds: float,
    wall_seconds: float,
) -> dict:
    """The `_meta.json` of a run: sizes, speed and memory, for scaling fits and for people."""
    previous: dict = {}
    meta_path = out_dir / META_FILE
    if meta_path.exists():
        with contextlib.suppress(Exception):
            previous = files.read_meta(meta_path)
    computed = sum(r["rows"] for r in results)
    busy = sum(r["seconds"] for r in results)
    cuda = [r["peak_cuda_bytes"] for r in results if r["peak_cuda_bytes"] is not None]
    params = results[0]["params"] if results else previous.get("params")
    return {
        "model": spec.name,
        "revision": spec.revision,
        "source": _spec_dict(spec).get("source"),
        "params": params,  # total, non_embedding: the N of scaling fits
        "tokens": sum(s.n_tokens for s in shards),
        "documents": int(len(tokens.doc_ids)),
        "windows": sum(len(s.windows) for s in shards),
        "parts": len(shards),
        "computed_parts": len(results),
        "reused_parts": len(shards) - len(results),
        "computed_tokens": computed,
        # wall clock of the compute phase (cluster start-up, imports and model loading
        # included) and of the whole run; forward_tokens_per_s counts forward passes only
        "compute_seconds": round(compute_seconds, 3),
        "wall_seconds": round(wall_seconds, 3),
        "tokens_per_s": round(computed / compute_seconds, 1) if computed else None,
        # per worker: tokens over the time spent in forward passes (no loading, no writing)
        "forward_tokens_per_s": round(computed / busy, 1) if busy else None,
        "peak_rss_bytes": max([r["peak_rss_bytes"] for r in results], default=peak_rss_bytes()),
        "peak_cuda_bytes": max(cuda) if cuda else None,
        "compute": compute,
        "execution": mode,
        "torch_threads": sorted({r["torch_threads"] for r in results}),
    }
