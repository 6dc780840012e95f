"""Exact per-target gradients for QDG, each computed once, batched, projected as they go.

Why this module exists: QDG (Michaud et al. 2023) clusters samples by the gradient of
*one* token's loss: the cross-entropy of predicting token ``pos`` of a document from its
tokens ``0..pos-1``, with respect to the model's non-embedding, non-layer-norm weights
and biases. The paper ran one backward pass per sample on its own truncated context and,
to fit memory, recomputed every gradient ~21 times. Here each gradient is computed
exactly once, many samples per forward/backward, and streamed one parameter tensor at a
time into a projector (pipeline/qdg/projection.py), so the (n_samples x n_params) matrix
never exists.

How it stays exact (DESIGN.md §5: never a slice of a summed-loss backward pass):

1. *Rows.* A target's context is its document up to the target, at most
   ``max_len - 1`` tokens (a window of max_len tokens holds context + target, as in the
   losses stage): ``tokens[start:pos]`` with ``start = max(0, pos - max_len + 1)``. One
   row of a batch feeds one context to the model; targets of the same document and
   window may share a row (``share_context``), because in a causal LM the hidden state
   at position t has seen tokens <= t only, so one forward of the longest context serves
   every shorter target in it exactly. Rows are right-padded without an attention mask:
   padding sits after every target and no real position attends to it.
2. *Per-target backward.* Each row's targets are numbered 0..m-1 ("slots"). One
   backward pass per slot differentiates the sum of the slot's losses, at most one per
   row, with respect to the *outputs* of the layers that own the selected parameters.
   Rows of a batch never interact (attention, layer norm and MLPs act within a row), so
   row b's output gradient G_b is exactly d loss_b / d output_b: nothing of another
   target is mixed in. Parameter gradients are never summed over the batch.
3. *Per-target parameter gradients from the layer's own factors.* A linear layer
   y = x W^T + b gives the target's exact gradient ``dW = G_b^T X_b`` (out, in),
   ``db = sum_t G_b[t]`` from its input X_b (recorded by a forward hook) and G_b:
   one batched matmul per layer. GPT-2's Conv1D (W stored transposed) and LayerNorm
   (``dw = sum_t G ⊙ x_hat``) have rules too. Any other selected parameter (embeddings,
   RMSNorm, tied weights, custom modules) takes the generic route: rows of one document
   window at a time, ``autograd.grad`` of one target's loss with respect to the
   parameter itself; exact, and slower.
4. *A self-check.* On the first batch, the sum of the per-target gradients is compared
   with an ordinary backward pass of the summed loss; a model that uses a weight outside
   its module's forward, or rewrites a layer output in place, fails loudly here rather
   than giving silently wrong gradients.

Cost: per target, a share of one forward plus one backward over its row and one batched
matmul per layer, i.e. each gradient once; rows are sorted by length, so padding is
small, and on GPUs the batch keeps the device busy where the paper ran batch size 1.
Why not ``torch.func.vmap`` over ``grad``: each vmapped call runs its own forward. Why
not ``autograd.grad(..., is_grads_batched=True)`` with one-hot cotangents over all
targets of a batch: each of them backpropagates (zeros) through every other row too.
A slot's backward here serves one target in every row at once. Sharing a row between
targets saves their forwards but makes the shorter one's backward as long as the row,
so ``share_context: auto`` shares only when that is cheaper (see :func:`plan_rows`).

Parameter selection: ``include`` / ``exclude`` are Python regular expressions matched
with ``re.search`` against the names of ``model.named_parameters()`` (e.g.
``gpt_neox.layers.0.mlp.dense_h_to_4h.weight``), plus two named groups: ``@embeddings``
(the input and output embeddings, and every ``nn.Embedding``, e.g. learned positions)
and ``@norms`` (parameters of every module whose class name contains "Norm": LayerNorm,
RMSNorm, ...). A parameter is selected when some include pattern matches it and no
exclude pattern does. The default, ``include: [".*"]``, ``exclude: ["@embeddings",
"@norms"]``, is the paper's set: all weights and biases except embeddings, unembedding
and layer norms.

Bad samples: a target whose exact gradient is all zeros (its loss is exactly 0, or the
selected parameters do not reach it) or not finite gets a warning naming it, a zero row
in the output, and True in the returned ``bad`` mask; the rest are unaffected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Sequence

import numpy as np
import torch

from pipeline.lm import models as models_lib
from pipeline.core import shards
from pipeline.core.config import GRADIENT_GROUPS as GROUPS
from pipeline.core.config import ConfigError, GradientsConfig  # noqa: F401  (GradientsConfig: re-exported)
from pipeline.core.errors import QuantaError
from pipeline.lm.models import check_output_head, logit_transform, model_device
from pipeline.core.resources import Peak, peak_rss_bytes, resident_bytes
from pipeline.qdg.projection import NoProjection, Projector, make_projector

class GradientError(QuantaError, ValueError):
    """Samples, tokens or parameter choices the gradient stage cannot use as given."""


class BadGradientWarning(UserWarning):
    """A sample's gradient is exactly zero or not finite; it is left out and recorded."""


# --------------------------------------------------------------------------- parameter selection

def _abbrev(names: Sequence[str], head: int = 12, tail: int = 4) -> str:
    if len(names) <= head + tail + 1:
        return ", ".join(names)
    return ", ".join(names[:head]) + ", ..., " + ", ".join(names[-tail:]) + f" ({len(names)} in all)"


def _group_members(model: torch.nn.Module, group: str) -> set[int]:
    """ids of the parameter tensors in a named group."""
    ids: set[int] = set()
    if group == "@embeddings":
        mods = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        if hasattr(model, "get_input_embeddings"):  # any transformers model
            mods += [model.get_input_embeddings(), model.get_output_embeddings()]
        for m in mods:
            if m is not None:
                ids.update(id(p) for p in m.parameters())
    elif group == "@norms":
        for m in model.modules():
            if "norm" in type(m).__name__.lower():
                ids.update(id(p) for p in m.parameters(recurse=False))
    return ids


def select_params(
    model: torch.nn.Module, include: Sequence[str] = (".*",), exclude: Sequence[str] = ("@embeddings", "@norms")
) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters whose gradient QDG takes, as [(name, parameter)] in model order.

    See the module docstring for the pattern language. A regular expression that matches
    no parameter is an error listing the model's parameter names (likely a typo); a group
    may be empty (a model without layer norms). Tied tensors appear once.
    """
    named = list(model.named_parameters())  # unique tensors, first name of a tied pair
    names = [n for n, _ in named]

    def matcher(pats: Sequence[str], key: str) -> Callable[[str, torch.nn.Parameter], bool]:
        regexes, group_ids = [], set()
        for pat in pats:
            if pat.startswith("@"):
                if pat not in GROUPS:
                    raise GradientError(f"gradients.{key}: unknown group '{pat}'; groups are {', '.join(GROUPS)}")
                group_ids |= _group_members(model, pat)
                continue
            rx = re.compile(pat)
            if not any(rx.search(n) for n in names):
                raise GradientError(
                    f"gradients.{key}: pattern '{pat}' (a regular expression, matched with re.search) matches no "
                    f"parameter of {type(model).__name__}; its parameters: {_abbrev(names)}"
                )
            regexes.append(rx)
        return lambda n, p: id(p) in group_ids or any(rx.search(n) for rx in regexes)

    inc, exc = matcher(include, "include"), matcher(exclude, "exclude")
    chosen = [(n, p) for n, p in named if inc(n, p) and not exc(n, p)]
    if not chosen:
        raise GradientError(
            f"gradients.include {list(include)} minus gradients.exclude {list(exclude)} selects no parameter of "
            f"{type(model).__name__}; its parameters: {_abbrev(names)}"
        )
    return chosen


# --------------------------------------------------------------------------- layer rules


@dataclasses.dataclass
class _Site:
    """A module whose selected parameters get their per-target gradient from its
    recorded input and its output gradient (see the module docstring, point 3)."""

    module: torch.nn.Module
    kind: str  # "linear" | "conv1d" | "layernorm"
    weight: Optional[str]  # selected parameter names, or None when not selected
    bias: Optional[str]
    calls: list = dataclasses.field(default_factory=list)  # [(input, output)] of this forward


def _conv1d_class() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def _kind(module: torch.nn.Module) -> Optional[str]:
    conv1d = _conv1d_class()
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, torch.nn.LayerNorm) and len(module.normalized_shape) == 1 and module.elementwise_affine:
        return "layernorm"
    return None


def _plan_sites(
    model: torch.nn.Module, params: Sequence[tuple[str, torch.nn.Parameter]]
) -> tuple[list[_Site], list[tuple[str, torch.nn.Parameter]]]:
    """Split the selected parameters into rule sites and the generic (slow, exact) route."""
    owners: dict[int, list[tuple[str, torch.nn.Module, str]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mname, module, pname))
    sites: dict[int, _Site] = {}
    generic = []
    for name, p in params:
        own = owners.get(id(p), [])
        modules = {id(m) for _, m, _ in own}
        kind = _kind(own[0][1]) if len(modules) == 1 else None  # tied across modules: generic
        if kind is None or own[0][2] not in ("weight", "bias"):
            generic.append((name, p))
            continue
        module = own[0][1]
        site = sites.setdefault(id(module), _Site(module=module, kind=kind, weight=None, bias=None))
        setattr(site, own[0][2], name)
    return list(sites.values()), generic


@contextlib.contextmanager
def _recording(sites: Sequence[_Site]) -> Iterator[None]:
    """Record each site's (input, output) on every call of its forward."""

    def hook_for(site: _Site):
        def hook(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            # the input is data for the weight-gradient matmuls, not part of any graph we build
            site.calls.append((x.detach(), output))

        return hook

    handles = [s.module.register_forward_hook(hook_for(s), with_kwargs=True) for s in sites]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for s in sites:
            s.calls.clear()


@contextlib.contextmanager
def _grad_mode(model: torch.nn.Module, params: Sequence[tuple[str, torch.nn.Parameter]]) -> Iterator[None]:
    """Eval mode (no dropout) and requires_grad on the selected parameters, restored after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for _, p in params]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _site_grads(
    site: _Site, grads: Sequence[Optional[torch.Tensor]], rows: torch.Tensor, width: int, batch: int
) -> dict[str, torch.Tensor]:
    """Per-target gradients of a site's selected parameters, fp32.

    grads[c] (batch, pos, out) is d(slot loss)/d(output) of call c (None: unused);
    rows (n,) are the batch rows of the slot's targets; positions past `width` carry
    zero gradient (they come after every target of the slot) and are skipped.
    """
    out: dict[str, torch.Tensor] = {}
    for (x, _), g in zip(site.calls, grads):
        if g is None:
            continue
        if x.shape[0] != batch:
            # e.g. mixture-of-experts layers run on a gathered (tokens, feat) input
            raise GradientError(
                f"{type(site.module).__name__} with parameters {site.weight or site.bias} is called on an input "
                f"of shape {tuple(x.shape)} whose first dimension is not the batch ({batch} rows); its per-target "
                "gradients cannot be read from its input: exclude it (gradients.exclude)"
            )
        feat_in, feat_out = x.shape[-1], g.shape[-1]
        # any middle dims (heads, ...) fold into pos: the weight sees them all alike
        if x.dim() == 3:  # (batch, pos, feat): the usual case, cut at the slot's last target
            x, g = x[:, :width], g[:, :width]
        xs = x[rows].reshape(len(rows), -1, feat_in).float()  # (n, pos, in)
        gs = g[rows].reshape(len(rows), -1, feat_out).float()  # (n, pos, out)
        parts: dict[str, torch.Tensor] = {}
        if site.kind == "linear" and site.weight:
            parts[site.weight] = torch.bmm(gs.transpose(1, 2), xs)  # (n, out, in), as Linear.weight
        elif site.kind == "conv1d" and site.weight:
            parts[site.weight] = torch.bmm(xs.transpose(1, 2), gs)  # (n, in, out), as Conv1D.weight
        elif site.kind == "layernorm" and site.weight:
            xhat = torch.nn.functional.layer_norm(xs, (feat_in,), eps=site.module.eps)  # (n, pos, d)
            parts[site.weight] = (gs * xhat).sum(dim=1)  # (n, d)
        if site.bias:
            parts[site.bias] = gs.sum(dim=1)  # (n, out)
        for name, t in parts.items():
            out[name] = out[name] + t if name in out else t
    return out


# --------------------------------------------------------------------------- planning


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
    quadratic term is attention). Both are measured on the model (:meth:`_Engine.measure`).
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


#: per model: (row length, selected names, device type) -> (per_token, per_token2, scale),
#: so the shards of one process measure and probe once
_CALIBRATIONS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _calibrate(engine: "_Engine", l2: int, largest: int) -> tuple[float, float, float]:
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
    engine: "_Engine", max_len: int, memory_gb: Optional[float], held_bytes: int = 0
) -> Optional[RowMemory]:
    """The memory model of `engine`'s model for rows up to max_len, or None without a bound.

    The bound covers the whole process (CPU: its resident set; CUDA: the device memory
    torch allocates), so the budget for batches is memory_gb less what is resident now
    (interpreter, libraries, model, data), less `held_bytes` (outputs allocated but not yet
    written) and a reserve. The projector's table cache is capped at a quarter of that
    room. The per-row model (:func:`_calibrate`: two measured lengths and one probe row of
    max_len tokens) is made once per model, length and parameter set in a process. Raises a one-line error naming
    gradients.memory_gb when the process alone leaves no room, or when one row of max_len
    tokens does not fit.
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
    known = _CALIBRATIONS.setdefault(engine.model, {})
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


# --------------------------------------------------------------------------- the engine


class _Engine:
    """Runs batches of rows: one forward, one backward per slot, per-target gradients
    streamed into a projector. Holds the model's layer plan between batches."""

    def __init__(self, model: torch.nn.Module, params: Sequence[tuple[str, torch.nn.Parameter]], projector: Projector):
        self.model = model
        self.params = list(params)
        self.projector = projector
        self.sites, self.generic = _plan_sites(model, self.params)
        self.body = model.base_model
        self.head = model.get_output_embeddings()
        if self.body is model or self.head is None:
            raise GradientError(
                f"{type(model).__name__} is not a Hugging Face causal LM with a base model and an output embedding"
            )
        self.transform = logit_transform(model)
        self.device = model_device(model)
        self.verified = False

    def run(
        self, batch: Sequence[Row], tokens_of: Callable[[Row], np.ndarray], target_ids: np.ndarray, verify: bool
    ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """(sample indices, (n, dim) float32 projections, (n,) float32 exact norms).

        target_ids[s]: the token id sample s predicts (a row's input stops before its
        last target, so the row's tokens do not hold it).
        """
        dev = self.device
        width = max(r.length for r in batch)
        ids = np.zeros((len(batch), width), dtype=np.int64)  # (batch, pos), right-padded with id 0
        for b, r in enumerate(batch):
            ids[b, : r.length] = tokens_of(r)
        # slot j holds the j-th target of every row that has one
        n_slots = max(len(r.samples) for r in batch)
        slot_of, rows, cols, samples = [], [], [], []
        for b, r in enumerate(batch):
            for j, (s, p) in enumerate(zip(r.samples, r.positions)):
                slot_of.append(j)
                rows.append(b)
                # The next-token shift: the hidden state at position p - 1 - start (which
                # has seen tokens start..p-1) predicts token p.
                cols.append(p - 1 - r.start)
                samples.append(s)
        targets = torch.from_numpy(target_ids[samples]).to(dev)  # (n,)
        rows_t = torch.tensor(rows, device=dev)
        cols_t = torch.tensor(cols, device=dev)
        # per slot, on the host (no device syncs): its targets, and the positions it needs
        slot_np, cols_np = np.array(slot_of), np.array(cols)
        slots = [np.flatnonzero(slot_np == j) for j in range(n_slots)]
        widths = [int(cols_np[ix].max()) + 1 for ix in slots]  # positions after these carry zero gradient

        n = len(samples)
        out = torch.zeros(n, self.projector.dim, dtype=torch.float32, device=dev)
        sq = torch.zeros(n, dtype=torch.float32, device=dev)
        with _recording(self.sites):
            ids_t = torch.from_numpy(ids).to(dev)
            hidden = self.body(input_ids=ids_t, use_cache=False).last_hidden_state  # (batch, pos, d_model)
            logits = self.head(hidden[rows_t, cols_t]).float()  # (n, vocab): only the targets' positions
            del hidden
            if self.transform is not None:
                logits = self.transform(logits)
            losses = torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None])[:, 0]  # (n,) nats
            outputs = [o for s in self.sites for _, o in s.calls]
            check = verify and not self.verified and bool(torch.isfinite(losses).all())
            sums: dict[str, torch.Tensor] = {}
            for j in range(n_slots):
                idx = torch.from_numpy(slots[j]).to(dev)  # (n_j,) targets of slot j, one per row
                wrt = outputs + [p for _, p in self.generic]
                # The sum runs over distinct rows, which do not interact: row b's output
                # gradients are exactly those of its own target's loss (module docstring, 2).
                grads = torch.autograd.grad(
                    losses[idx].sum(), wrt, retain_graph=check or j < n_slots - 1, allow_unused=True
                )
                part = torch.zeros(len(idx), self.projector.dim, dtype=torch.float32, device=dev)
                for name, g in self._blocks(grads, rows_t[idx], widths[j], len(batch)):
                    flat = g.reshape(len(idx), -1)  # (n_j, numel): one parameter's exact gradients
                    sq[idx] += flat.pow(2).sum(dim=1)
                    self.projector.add_(part, name, flat)
                    if check:
                        sums[name] = sums[name] + flat.sum(0) if name in sums else flat.sum(0)
                    del flat, g
                out[idx] = part
                del grads
            if check:
                self._verify(losses, sums)
        return samples, out, sq.sqrt()

    def measure(self, length: int) -> int:
        """Bytes one row of `length` tokens keeps between its forward and its backward.

        Runs the row's forward as :meth:`run` does (dummy token ids) and counts the
        distinct storages autograd saves and the layer inputs the hooks record, less the
        weights. Device-independent, and exact for this model's own forward (its
        attention implementation included), where a formula from the config would guess.
        """
        weights = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        seen: dict[int, int] = {}
        kept: list[torch.Tensor] = []  # alive until the end, as in a real graph: no address is reused

        def pack(t: torch.Tensor) -> None:
            st = t.untyped_storage()
            if st.data_ptr() not in weights:
                seen[st.data_ptr()] = st.nbytes()
                kept.append(t)
            # the graph itself keeps nothing: it is never differentiated, and a saved
            # output handed back to it would close a cycle (tensor -> grad_fn -> tensor)
            # that keeps the row's activations alive after this returns
            return None

        def unpack(_: None) -> torch.Tensor:
            raise AssertionError("measure() builds a graph for counting only")

        ids = torch.ones(1, length, dtype=torch.long, device=self.device)
        with _recording(self.sites), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            hidden = self.body(input_ids=ids, use_cache=False).last_hidden_state
            logits = self.head(hidden[:, -1]).float()
            for site in self.sites:
                for x, _ in site.calls:
                    st = x.untyped_storage()
                    if st.data_ptr() not in weights:
                        seen[st.data_ptr()] = st.nbytes()
            del hidden, logits
        kept.clear()
        return int(sum(seen.values()))

    def _blocks(self, grads, rows: torch.Tensor, width: int, batch: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Per-target gradient blocks, one site at a time: a generator, so that at most
        one layer's (n, out, in) gradients exist at once."""
        i = 0
        for site in self.sites:
            calls = len(site.calls)
            yield from _site_grads(site, grads[i : i + calls], rows, width, batch).items()
            i += calls
        for (name, p), g in zip(self.generic, grads[i:]):
            # generic route: one row per batch (see _iter_batches), so this is one target
            if len(rows) != 1:
                raise AssertionError("generic parameters need one row per batch")
            yield name, (torch.zeros_like(p) if g is None else g).float()[None]

    def _verify(self, losses: torch.Tensor, sums: dict[str, torch.Tensor]) -> None:
        names = [n for n, _ in self.params]
        ref = torch.autograd.grad(losses.sum(), [p for _, p in self.params], allow_unused=True)
        dtype = next(self.model.parameters()).dtype
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
        for name, r in zip(names, ref):
            r = torch.zeros(1, device=self.device) if r is None else r.float().reshape(-1)
            ours = sums.get(name, torch.zeros_like(r))
            err = (ours - r).norm().item()
            scale = r.norm().item() + ours.norm().item()
            if not err <= tol * scale + 1e-30:
                raise GradientError(
                    f"per-target gradients of '{name}' do not add up to the batch gradient (relative error "
                    f"{err / max(scale, 1e-30):.3g}): {type(self.model).__name__} uses this parameter outside its "
                    "module's forward, or changes the module's output in place; exclude it (gradients.exclude)"
                )
        self.verified = True


# --------------------------------------------------------------------------- public API


@dataclasses.dataclass
class GradientResult:
    """Per-sample projected gradients, in the order of the samples given.

    grads (N, dim): float32 or float16, zero rows for bad samples; norms (N,) float32:
    L2 norms of the exact (unprojected) gradients (NaN where not finite); bad (N,) bool;
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
    """The projector cfg asks for, over the selected parameters."""
    sizes = [(n, p.numel()) for n, p in model_params]
    shapes = [(n, tuple(p.shape)) for n, p in model_params]
    return make_projector(cfg.projection, sizes, k=cfg.k, seed=cfg.seed, nnz=cfg.nnz, shapes=shapes)


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
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Plan rows and batches, run them; yields (sample indices, (n, dim), (n,) norms)."""
    engine = _Engine(model, params, projector)
    check_output_head(model)  # our logits path (body, then head) must be the model's own
    if engine.generic:
        warnings.warn(
            f"{len(engine.generic)} selected parameters ({_abbrev([n for n, _ in engine.generic], 4, 1)}) have no "
            "per-layer rule; their gradients are exact but computed one document window per batch (slow)",
            stacklevel=3,
        )
    # The generic route differentiates parameters directly, which sums over rows: so
    # then one row per batch (each row's targets are still separate slots).
    batch_rows = 1 if engine.generic else cfg.batch_rows

    def tokens_of(r: Row) -> np.ndarray:
        return docs[r.doc_id][r.start : r.end]

    with _grad_mode(model, params):
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
    cfg: GradientsConfig = GradientsConfig(),
    projector: Optional[Projector] = None,
    *,
    params: Optional[Sequence[tuple[str, torch.nn.Parameter]]] = None,
    on_batch: Optional[Callable[[int], None]] = None,
) -> GradientResult:
    """Projected exact per-target gradients of `samples`, in their order.

    samples: a table (pandas/pyarrow/dict of arrays) with ``doc_id`` and ``pos``
    (the target's index in its document, >= 1), optionally ``token_id`` (checked
    against the tokens). tokens_by_doc: doc_id -> token ids of the whole document.
    params: the selected parameters (default: :func:`select_params` with cfg's patterns).
    projector: default :func:`build_projector` (cfg.projection, k, seed, nnz).
    on_batch(n) is called after each batch with its number of samples.
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
        batches = _iter_batches(model, params, projector, docs, doc_ids, positions, target_ids, cfg, max_len, held)
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


# --------------------------------------------------------------------------- the stage: shards on Dask, resumable

GRADIENTS_FORMAT = 2  # 2: parts carry a content checksum (pipeline/core/shards.py)


@dataclasses.dataclass(frozen=True)
class GradientShardTask:
    """One part file of the gradients stage; small and picklable (the model travels by name)."""

    spec: Any  # models.ModelSpec
    load_kwargs: dict
    cfg: GradientsConfig
    max_len: int
    torch_threads: int
    index: int
    samples: dict  # doc_id, pos, token_id arrays of this shard
    docs: dict  # doc_id -> int32 tokens of the documents it needs
    path: str
    identity: dict


def _load_for_gradients(spec: Any, load_kwargs: dict) -> torch.nn.Module:
    return models_lib.load_model(spec, **load_kwargs)


# Set while shards run in this process: called with each batch's sample count, so the
# progress bar moves per batch, not per shard (worker processes report per shard).
_on_batch: Optional[Callable[[int], None]] = None


def compute_part(task: GradientShardTask) -> dict:
    """Compute one shard's projected gradients and write its part file (.npz) atomically."""
    from pipeline.core import execution
    from pipeline.core.resources import peak_rss_bytes, torch_threads

    with torch_threads(task.torch_threads):
        kwargs = dict(task.load_kwargs, device=execution.worker_device(task.load_kwargs["device"]))
        # the weights' fingerprint too: a long-lived worker must not serve a model retrained in place
        key = ("gradients", repr(task.spec), repr(sorted(kwargs.items())), task.identity.get("weights"))
        model = execution.cached(key, lambda: _load_for_gradients(task.spec, kwargs))
        cfg = dataclasses.replace(task.cfg, max_len=task.max_len)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BadGradientWarning)
            res = compute_gradients(model, task.samples, task.docs, cfg, on_batch=_on_batch)
        reasons = np.array([res.reasons.get(i, "") for i in range(len(res.norms))], dtype=str)
        arrays = {"grads": res.grads, "norms": res.norms, "bad": res.bad, "reasons": reasons}
        shards.write_part(shards.NPZ, task.path, arrays, task.identity)
    return {
        "index": task.index,
        "n": len(res.norms),
        "seconds": res.seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "projection": res.projection,
        "windowed": res.windowed,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, BadGradientWarning)],
    }


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
) -> dict:
    """The gradients stage: ``out_npy`` (N, dim) and ``out_table`` (sample, norm, bad, reason).

    Shards of cfg.shard_samples samples are computed in-process or on Dask workers (as
    the losses stage), each written as a part file in `parts_dir`; a killed run reuses
    the finished parts. When every part is there, the (N, dim) array is assembled into
    ``out_npy`` atomically and the parts are removed. Returns the stage's meta dict.

    The steps: read and check the inputs; plan the shards and their identities; compute
    the parts that do not verify; assemble every part into the outputs.
    """
    t_start = time.perf_counter()
    if tokenizer_loader is not None:
        check_same_tokenizer(select_spec, spec, tokenizer_loader)
    samples, tokens = _read_inputs(samples_path, tokens_path)
    store = shards.ShardStore(Path(parts_dir or Path(out_npy).parent / f".{Path(out_npy).stem}-parts"), shards.NPZ,
                              "gradients")
    identity_base, shard_bounds, identities = _plan_shards(samples, cfg, spec, load_kwargs, max_len)
    with store.cleanup_on_error():  # a failed start leaves no empty parts folder
        store.prepare(len(shard_bounds))
        todo_index = store.plan(identities, [b - a for a, b in shard_bounds], finite=("grads",))
        todo = _tasks(todo_index, shard_bounds, identities, samples, tokens, store, cfg, spec, load_kwargs, max_len)
        results, mode, compute_seconds = _compute(todo, cfg)
        meta = _assemble(store, shard_bounds, identities, samples, out_npy, out_table)
    computed = sum(r["n"] for r in results)
    busy = sum(r["seconds"] for r in results)
    meta.update({
        "reused_parts": len(shard_bounds) - len(todo),
        "computed_samples": computed,
        "samples_per_s": round(computed / busy, 2) if busy else None,
        "compute_seconds": round(compute_seconds, 2),
        "peak_rss_bytes": max([r["peak_rss_bytes"] for r in results], default=peak_rss_bytes()),
        "projection": results[0]["projection"] if results else None,
        "windowed": sum(r["windowed"] for r in results),
        "execution": mode,
        "wall_seconds": round(time.perf_counter() - t_start, 2),
        "identity": identity_base,
    })
    return meta


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


def _plan_shards(samples: Any, cfg: GradientsConfig, spec: Any, load_kwargs: dict,
                 max_len: int) -> tuple[dict, list[tuple[int, int]], list[dict]]:
    """(the run's identity, each shard's [start, stop) of the samples, each part's identity).

    A part is reused only under the same identity: the model and its weights, the config
    that changes the numbers, and a digest of the shard's own samples."""
    n = len(samples)
    doc, pos, tok = _sample_columns(samples)
    shard_bounds = [(s, min(n, s + cfg.shard_samples)) for s in range(0, n, cfg.shard_samples)]
    identity_base = {
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
            if k not in ("scheduler", "n_workers", "threads_per_worker", "progress", "model", "revision", "verify")
        },
    }
    identities = []
    for index, (a, b) in enumerate(shard_bounds):
        digest = hashlib.sha256(np.stack([doc[a:b], pos[a:b], tok[a:b]]).tobytes()).hexdigest()
        identities.append(dict(identity_base, part={"index": index, "start": a, "stop": b, "sha256": digest}))
    return identity_base, shard_bounds, identities


def _tasks(todo_index: list[int], shard_bounds: list[tuple[int, int]], identities: list[dict], samples: Any,
           tokens: Any, store: "shards.ShardStore", cfg: GradientsConfig, spec: Any, load_kwargs: dict,
           max_len: int) -> list["GradientShardTask"]:
    """One task per part to compute: its samples and the token ids of just their documents."""
    from pipeline.core import execution

    doc, pos, tok = _sample_columns(samples)
    task_spec, task_kwargs = execution.for_workers(spec, load_kwargs)
    todo = []
    for index in todo_index:
        a, b = shard_bounds[index]
        needed = np.unique(doc[a:b])
        r = tokens.index_of(needed)
        docs = {int(d): tokens.token_ids[tokens.offsets[i] : tokens.offsets[i + 1]] for d, i in zip(needed, r)}
        todo.append(GradientShardTask(
            spec=task_spec, load_kwargs=task_kwargs, cfg=cfg, max_len=max_len, torch_threads=0, index=index,
            samples={"doc_id": doc[a:b], "pos": pos[a:b], "token_id": tok[a:b]}, docs=docs,
            path=execution.absolute(store.path(index)), identity=identities[index],
        ))
    return todo


def _compute(todo: list["GradientShardTask"], cfg: GradientsConfig) -> tuple[list[dict], str, float]:
    """Run the tasks in-process or on Dask, with a progress bar; (their results, the mode, seconds)."""
    from pipeline.core import execution

    global _on_batch
    bar = None
    if cfg.progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(t.samples["pos"]) for t in todo), desc="gradients", unit="sample")
    t_compute = time.perf_counter()
    mode = execution.choose_mode(execution.scheduler_address(cfg.scheduler), len(todo), cfg.n_workers)
    # in this process, 0 threads means all the cores (a shard is one big job)
    threads = execution.local_threads(cfg.threads_per_worker, 1) if mode == execution.INPROCESS else cfg.threads_per_worker
    per_batch = bar is not None and mode == execution.INPROCESS
    _on_batch = bar.update if per_batch else None
    try:
        results = execution.run_tasks(
            compute_part, todo, lambda t, th: dataclasses.replace(t, torch_threads=th),
            mode=mode, n_workers=cfg.n_workers, threads_per_worker=threads, key_prefix="gradients",
            on_result=None if bar is None or per_batch else (lambda r: bar.update(r["n"])),
        )
    finally:
        _on_batch = None
        if bar is not None:
            bar.close()
    for res in results:
        for w in res["warnings"]:
            warnings.warn(w, BadGradientWarning, stacklevel=3)
    return results, mode, time.perf_counter() - t_compute


def _assemble(store: "shards.ShardStore", shard_bounds: list[tuple[int, int]], identities: list[dict], samples: Any,
              out_npy: str, out_table: str) -> dict:
    """Every part exists now (computed or reused): write the (N, dim) array in one pass into a
    memmap, and the per-sample table; remove the parts. Returns the outputs' part of the meta."""
    import pyarrow as pa

    from pipeline.core import files

    n = len(samples)
    first = store.read(0)[1]["grads"]
    dim, dtype = first.shape[1], first.dtype
    del first
    norms = np.zeros(n, dtype=np.float32)
    bad = np.zeros(n, dtype=bool)
    reasons = np.full(n, "", dtype=object)
    with files.atomic_path(out_npy) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, dim))
        for index, (a, b) in enumerate(shard_bounds):
            part = store.read(index)[1]
            arr[a:b] = part["grads"]
            norms[a:b] = part["norms"]
            bad[a:b] = part["bad"]
            reasons[a:b] = part["reasons"]
        arr.flush()
        del arr
    table = pa.table(
        {
            "sample": pa.array(samples["sample"].to_numpy(np.int32)),
            "norm": pa.array(norms),
            "bad": pa.array(bad),
            "reason": pa.array([r or None for r in reasons], pa.string()),
        }
    )
    files.write_parquet(table, out_table, config={k: v for k, v in identities[0].items() if k != "part"})
    store.remove_parts()
    return {
        "n_samples": n,
        "dim": int(dim),
        "dtype": str(dtype),
        "n_bad": int(bad.sum()),
        "bad_samples": {int(i): reasons[i] for i in np.flatnonzero(bad)[:100]},
        "parts": len(shard_bounds),
    }
