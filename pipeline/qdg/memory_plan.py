"""How the targets of a shard are packed into rows and batches, within a memory bound.

Why this module exists: the engine (pipeline/qdg/per_sample.py) runs whatever batches it
is given; which targets share a row, which rows share a forward pass, and how many fit in
``gradients.memory_gb`` is planning, decided here from the targets' positions and from a
per-row memory model measured on the model itself. A plan changes speed and memory only:
every target's gradient is exact whatever batch it lands in.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, MutableMapping, Optional, Sequence

import numpy as np

from pipeline.core.resources import Peak, resident_bytes
from pipeline.qdg.per_sample import GradientError

if TYPE_CHECKING:
    from pipeline.qdg.per_sample import Engine


@dataclasses.dataclass(frozen=True)
class Row:
    """One context fed to the model: ``tokens[start:end]`` of document `doc_id`, and the
    targets read from it (indices into the sample list, and their positions)."""

    doc_id: int
    start: int
    end: int
    samples: tuple[int, ...]
    positions: tuple[int, ...]

    @property
    def length(self) -> int:
        return self.end - self.start


def plan_rows(
    doc_ids: np.ndarray, positions: np.ndarray, max_len: int, share_context: str = "auto"
) -> list[Row]:
    """Group targets into rows (contexts), see the module docstring, point 1.

    Targets share a row only if they share the document and the window start. With
    ``auto``, a target of context length l joins a row of length L when ``2 L <= 3 l``:
    a row costs about one forward (1 per token) plus one backward and one per-target
    weight-gradient pass (2 per token) per target, so joining adds 2 L where a row of
    its own would cost 3 l.
    """
    if share_context not in ("auto", "always", "never"):
        raise ValueError(f"share_context must be auto, always or never, got {share_context!r}")
    starts = np.maximum(0, positions - (max_len - 1))
    groups: dict[tuple[int, int], list[int]] = {}
    for i in np.lexsort((-positions, starts, doc_ids)):  # by doc, start, then pos descending
        groups.setdefault((int(doc_ids[i]), int(starts[i])), []).append(int(i))
    rows: list[Row] = []
    for (doc, start), members in groups.items():
        current: list[int] = []
        for i in members:
            length = int(positions[i]) - start
            if current:
                row_len = int(positions[current[0]]) - start
                join = share_context == "always" or (share_context == "auto" and 2 * row_len <= 3 * length)
                if not join:
                    rows.append(_row(doc, start, current, positions))
                    current = []
            current.append(i)
        rows.append(_row(doc, start, current, positions))
    return rows


def _row(doc: int, start: int, members: list[int], positions: np.ndarray) -> Row:
    # the input ends before the last target: the target token itself is never fed in
    return Row(doc, start, int(positions[members[0]]), tuple(members), tuple(int(positions[i]) for i in members))


MIN_FILL = 0.8  # real tokens / padded tokens of a batch, at least


def plan_batches(
    rows: Sequence[Row], batch_tokens: int, batch_rows: int, memory: Optional["RowMemory"] = None
) -> list[list[Row]]:
    """Pack rows into forward passes of at most `batch_tokens` padded tokens, `batch_rows`
    rows and, given `memory`, an estimated peak within its budget (a row over any bound
    goes alone). Sorted by (targets per row, length) and cut into length buckets at least
    MIN_FILL real tokens, so padding is small and few backward slots run with idle rows."""
    order = sorted(rows, key=lambda r: (len(r.samples), r.length, r.doc_id, r.start))
    batches: list[list[Row]] = []
    cur: list[Row] = []
    cur_width = 0  # the longest row of cur
    cur_tokens = 0  # its real (unpadded) tokens
    for row in order:
        width = max(row.length, cur_width)
        over = (len(cur) + 1) * width > batch_tokens or len(cur) >= batch_rows
        # length buckets: every pass (forward, each slot's backward, the per-target
        # weight-gradient products) runs over the padded width, so a batch closes
        # rather than fill with less than MIN_FILL real tokens
        over = over or cur_tokens + row.length < MIN_FILL * (len(cur) + 1) * width
        if memory is not None and not over:
            over = memory.batch_bytes(len(cur) + 1, width) > memory.budget
        if cur and over:
            batches.append(cur)
            cur, width, cur_tokens = [], row.length, 0
        cur.append(row)
        cur_width = width
        cur_tokens += row.length
    if cur:
        batches.append(cur)
    return batches


def planned_work(batches: Sequence[Sequence[Row]]) -> int:
    """Padded token-passes of a plan: per batch, rows x width x (1 forward + 2 per slot).

    Each slot's backward runs over the whole padded batch, and its per-target weight
    gradients over the slot's positions: about two forward's worth per slot.
    """
    return sum(len(b) * max(r.length for r in b) * (1 + 2 * max(len(r.samples) for r in b)) for b in batches)


def plan(
    doc_ids: np.ndarray, positions: np.ndarray, max_len: int, share_context: str, batch_tokens: int,
    batch_rows: int, memory: Optional["RowMemory"] = None,
) -> list[list[Row]]:
    """Rows and batches for these targets. With ``auto``, the rows of :func:`plan_rows`'s
    rule and rows of one target each are both packed, and the plan with less
    :func:`planned_work` runs: sharing saves forwards but lengthens backwards, and which
    wins depends on how the lengths fall into batches, so auto is never worse than never."""
    batches = plan_batches(plan_rows(doc_ids, positions, max_len, share_context), batch_tokens, batch_rows, memory)
    if share_context == "auto":
        alone = plan_batches(plan_rows(doc_ids, positions, max_len, "never"), batch_tokens, batch_rows, memory)
        if planned_work(alone) < planned_work(batches):
            return alone
    return batches


@dataclasses.dataclass(frozen=True)
class RowMemory:
    """Estimated peak bytes of a batch above what the process holds: a per-row model,
    calibrated on one measured row.

    A row of length L keeps ``per_token * L + per_token2 * L**2`` bytes for the backward
    (what autograd saves, and the layer inputs the weight-gradient matmuls read; the
    quadratic term is attention). Both are measured on the model (:meth:`pipeline.qdg.per_sample.Engine.measure`).
    While a slot runs, the output gradients and temporaries add about as much again
    (``ACTIVATION_FACTOR``), and each row's per-target gradient of the largest parameter
    exists in a few copies (the block, its flat view's products, the projector's input).
    `scale` (>= 1) corrects that model by the measured peak of one real row of the
    longest length (:func:`plan_memory`), so what the allocator and the kernels add
    beyond the saved tensors is counted too.
    """

    per_token: float
    per_token2: float
    grad_block: int  # bytes of one target's gradient of the largest selected parameter
    budget: float  # bytes for batches: memory_gb less what the process holds and a reserve
    scale: float = 1.0

    ACTIVATION_FACTOR = 2.0
    GRAD_COPIES = 3

    def row_bytes(self, length: int) -> float:
        return self.per_token * length + self.per_token2 * length * length

    def batch_bytes(self, rows: int, width: int) -> float:
        return rows * self.scale * (self.ACTIVATION_FACTOR * self.row_bytes(width) + self.GRAD_COPIES * self.grad_block)


RESERVE_BYTES = 512 * 2**20  # kept free under memory_gb: allocator fragmentation, the stage's own bookkeeping


def _calibrate(engine: "Engine", l2: int, largest: int) -> tuple[float, float, float]:
    """Measure the bytes one row keeps at l2 and about l2 / 2 tokens (linear and quadratic
    terms), then run one row of l2 dummy tokens and scale the model up to its peak."""
    dev = engine.device
    l1 = max(1, l2 // 2)
    b1, b2 = engine.measure(l1), engine.measure(l2)
    if l2 > l1:
        quad = max(0.0, (b2 / l2 - b1 / l1) / (l2 - l1))
        lin = max(0.0, b2 / l2 - quad * l2)
    else:
        quad, lin = 0.0, b2 / l2
    model = RowMemory(per_token=lin, per_token2=quad, grad_block=4 * largest, budget=0.0)
    probe = Row(doc_id=-1, start=0, end=l2, samples=(0,), positions=(l2,))
    resident_bytes(dev)  # trim, so the peak starts from what is in use
    with Peak(dev) as peak:
        engine.run([probe], lambda r: np.ones(r.length, dtype=np.int64), np.ones(1, dtype=np.int64), verify=False)
    after = resident_bytes(dev)  # the projector's tables, built by the probe, stay: not part of a row's peak
    return lin, quad, max(1.0, (peak.bytes - after) / model.batch_bytes(1, l2))


def plan_memory(
    engine: "Engine", max_len: int, memory_gb: Optional[float], held_bytes: int = 0
) -> Optional[RowMemory]:
    """The memory model of `engine`'s model for rows up to max_len, or None without a bound.

    The bound covers the whole process (CPU: its resident set; CUDA: the device memory
    torch allocates), so the budget for batches is memory_gb less what is resident now
    (interpreter, libraries, model, data), less `held_bytes` (outputs allocated but not yet
    written) and a reserve. The projector's table cache is capped at a quarter of that
    room. The per-row model (:func:`_calibrate`: two measured lengths and one probe row of
    max_len tokens) is made once per length and parameter set and kept in
    ``engine.calibrations``, so engines sharing that dict measure once. Raises a one-line
    error naming gradients.memory_gb when the process alone leaves no room, or when one row
    of max_len tokens does not fit.
    """
    if memory_gb is None:
        return None
    dev = engine.device
    bound = memory_gb * 2**30
    held = held_bytes if dev.type == "cpu" else 0

    def room(resident: int) -> float:
        return bound - resident - held - RESERVE_BYTES

    before = resident_bytes(dev)
    if room(before) <= 0:
        raise GradientError(
            f"gradients.memory_gb = {memory_gb} leaves no room: the process already holds {(before + held) / 2**30:.2f} GiB "
            f"(model, data, libraries) and {RESERVE_BYTES / 2**30:.1f} GiB is kept free; raise gradients.memory_gb"
        )
    engine.projector.limit_cache(int(room(before) // 4))
    l2 = max(2, max_len)
    largest = max(p.numel() for _, p in engine.params)
    names = tuple(n for n, _ in engine.params)
    # (row length, selected names, device type) -> (per_token, per_token2, scale), kept by
    # the engine's owner so that the shards of one process measure and probe once
    known: MutableMapping = engine.calibrations
    # one made at a length >= l2 serves: the fitted terms hold for shorter rows
    fits = sorted(k for k in known if k[1:] == (names, dev.type) and k[0] >= l2)
    if not fits:
        fits = [(l2, names, dev.type)]
        known[fits[0]] = _calibrate(engine, l2, largest)
    lin, quad, scale = known[fits[0]]
    after = resident_bytes(dev)
    # tables the projector has yet to cache will stay too
    fitted = RowMemory(per_token=lin, per_token2=quad, grad_block=4 * largest, scale=scale,
                       budget=room(after) - engine.projector.cache_room())
    if fitted.batch_bytes(1, l2) > fitted.budget:
        raise GradientError(
            f"one row of {l2} tokens needs about {fitted.batch_bytes(1, l2) / 2**30:.2f} GiB beyond the "
            f"{(after + held) / 2**30:.2f} GiB the process holds, over gradients.memory_gb = {memory_gb}; "
            "raise gradients.memory_gb or lower gradients.max_len"
        )
    return fitted
