"""Exact per-target gradients of a causal LM: the layer rules and the engine that runs batches.


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
   one batched matmul per layer; a factored projector (``tensorsketch``) takes X_b and
   G_b themselves and never forms dW. GPT-2's Conv1D (W stored transposed) and LayerNorm
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
so ``share_context: auto`` shares only when that is cheaper
(:func:`pipeline.qdg.memory_plan.plan_rows`).

Parameter selection: ``include`` / ``exclude`` are Python regular expressions matched
with ``re.search`` against the names of ``model.named_parameters()`` (e.g.
``gpt_neox.layers.0.mlp.dense_h_to_4h.weight``), plus two named groups: ``@embeddings``
(the input and output embeddings, and every ``nn.Embedding``, e.g. learned positions)
and ``@norms`` (parameters of every module whose class name contains "Norm": LayerNorm,
RMSNorm, ...). A parameter is selected when some include pattern matches it and no
exclude pattern does. The default, ``include: [".*"]``, ``exclude: ["@embeddings",
"@norms"]``, is the paper's set: all weights and biases except embeddings, unembedding
and layer norms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from pipeline.core.config import GRADIENT_GROUPS as GROUPS
from pipeline.core.errors import QuantaError
from pipeline.lm.cross_entropy import cross_entropy
from pipeline.lm.models import logit_transform, model_device
from pipeline.qdg.projection import Projector

if TYPE_CHECKING:
    from pipeline.qdg.memory_plan import Row


class GradientError(QuantaError, ValueError):
    """Samples, tokens or parameter choices the gradient stage cannot use as given."""


# --------------------------------------------------------------------------- parameter selection

def abbreviate(names: Sequence[str], head: int = 12, tail: int = 4) -> str:
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
                    f"parameter of {type(model).__name__}; its parameters: {abbreviate(names)}"
                )
            regexes.append(rx)
        return lambda n, p: id(p) in group_ids or any(rx.search(n) for rx in regexes)

    inc, exc = matcher(include, "include"), matcher(exclude, "exclude")
    chosen = [(n, p) for n, p in named if inc(n, p) and not exc(n, p)]
    if not chosen:
        raise GradientError(
            f"gradients.include {list(include)} minus gradients.exclude {list(exclude)} selects no parameter of "
            f"{type(model).__name__}; its parameters: {abbreviate(names)}"
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
def grad_mode(model: torch.nn.Module, params: Sequence[tuple[str, torch.nn.Parameter]]) -> Iterator[None]:
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
    site: _Site, grads: Sequence[Optional[torch.Tensor]], rows: torch.Tensor, width: int, batch: int,
    factors: Optional[list] = None,
) -> dict[str, torch.Tensor]:
    """Per-target gradients of a site's selected parameters, fp32.

    grads[c] (batch, pos, out) is d(slot loss)/d(output) of call c (None: unused);
    rows (n,) are the batch rows of the slot's targets; positions past `width` carry
    zero gradient (they come after every target of the slot) and are skipped.
    With a `factors` list, a Linear weight's gradient is not formed: each call appends
    (recorded input, xs (n, pos, in), weight name, gs (n, pos, out)) to it instead.
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
        recorded = x
        feat_in, feat_out = x.shape[-1], g.shape[-1]
        # any middle dims (heads, ...) fold into pos: the weight sees them all alike
        if x.dim() == 3:  # (batch, pos, feat): the usual case, cut at the slot's last target
            x, g = x[:, :width], g[:, :width]
        xs = x[rows].reshape(len(rows), -1, feat_in).float()  # (n, pos, in)
        gs = g[rows].reshape(len(rows), -1, feat_out).float()  # (n, pos, out)
        parts: dict[str, torch.Tensor] = {}
        if site.kind == "linear" and site.weight and factors is not None:
            factors.append((recorded, xs, site.weight, gs))  # G = gs^T xs, left to the projector
        elif site.kind == "linear" and site.weight:
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



def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two recorded inputs are views of the same data (the hook's detach() makes a
    new tensor object for every call, so identity of the objects says nothing)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.device == b.device


# --------------------------------------------------------------------------- the engine


class Engine:
    """Runs batches of rows: one forward, one backward per slot, per-target gradients
    streamed into a projector. Holds the model's layer plan between batches.

    `calibrations` holds the memory planner's measurements of this model
    (pipeline/qdg/memory_plan.py: (row length, selected names, device type) ->
    (per_token, per_token2, scale)); pass the same dict to engines of one model so that
    it is measured once, as the gradients stage does for every shard of a process.
    """

    def __init__(self, model: torch.nn.Module, params: Sequence[tuple[str, torch.nn.Parameter]], projector: Projector,
                 calibrations: Optional[dict] = None):
        self.model = model
        self.calibrations: dict = {} if calibrations is None else calibrations
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
            # the full (n, vocab) logits at once, differentiable: each slot's backward reads them
            losses = cross_entropy(logits, targets)  # (n,) nats
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
                    if name is None:  # g = (xs, [(weight name, gs)]): weights the projector sketches unformed
                        xs, outer = g
                        sq[idx] += self.projector.add_outer_(part, xs, outer)
                        if check:  # the self-check still needs them formed, on its one batch
                            for wname, gs in outer:
                                full = torch.bmm(gs.transpose(1, 2), xs).sum(0).reshape(-1)
                                sums[wname] = sums[wname] + full if wname in sums else full
                        del xs, outer, g
                        continue
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

    def _blocks(self, grads, rows: torch.Tensor, width: int, batch: int) -> Iterator[tuple[Optional[str], Any]]:
        """Per-target gradient blocks, one site at a time: a generator, so that at most
        one layer's (n, out, in) gradients exist at once.

        With a factored projector, Linear weights come unformed instead, as
        (None, (xs (n, pos, in), [(name, gs (n, pos, out)), ...])): consecutive sites that
        read the same recorded input (q, k, v; gate, up) in one group, so that the
        projector transforms that input once."""
        i = 0
        factored = self.projector.factored
        pending: list = []  # [(recorded input, xs, name, gs)] of one input

        def flush():
            group = [(name, gs) for _, _, name, gs in pending]
            xs = pending[0][1]
            pending.clear()
            return None, (xs, group)

        for site in self.sites:
            calls = len(site.calls)
            factors: Optional[list] = [] if factored else None
            dense = _site_grads(site, grads[i : i + calls], rows, width, batch, factors)
            i += calls
            for f in factors or ():
                if pending and not _same_tensor(pending[0][0], f[0]):
                    yield flush()
                pending.append(f)
            yield from dense.items()
        if pending:
            yield flush()
        for (name, p), g in zip(self.generic, grads[i:]):
            # generic route: one row per batch (gradients._iter_batches), so this is one target
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
