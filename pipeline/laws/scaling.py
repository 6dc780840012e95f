"""Per-token scaling curves across a model suite, and the mean-loss scaling law L(N).

Why this module exists: the quantization model (Michaud et al. 2023, "The Quantization
Model of Neural Scaling", §5) says smooth mean-loss scaling is a sum of many per-token
curves, some of which drop abruptly at one model size ("monogenic": one quantum decides
the token) while others decline smoothly with ln N ("polygenic": many quanta contribute).
The paper showed a handful of example curves. This module classifies *every* token of a
suite and reports the population: what fraction is monogenic, at which size they emerge,
what fraction is polygenic, and whether a token once learned stays learned at larger sizes.

Definitions (models are ordered by non-embedding parameter count N, smallest first;
losses in nats; thresholds are :class:`ScalingConfig` fields, defaults the paper's):

- slope, r2: OLS of a token's loss on ln N across the models. slope is in nats per
  e-fold of N (d loss / d ln N); r2 is the coefficient of determination, NaN for a token
  whose loss is the same under every model (R² is undefined there).
- monogenic at size j (the paper, exactly): loss > ``mono_high`` (5.0) for every model
  smaller than j, and < ``mono_low`` (0.3) for j and every larger model. We require
  j >= 1 (at least one smaller model above 5.0): with j = 0 the first condition is
  vacuous, and every token the smallest model already predicts would count as
  "emerging" at a size where nothing emerged. Such tokens are ``other`` (see
  ``first_below`` in the metrics). The model j is the ``emerge_model`` column.
- polygenic: slope < ``poly_slope`` (-0.3) and r2 > ``poly_r2`` (0.98), and not
  monogenic (monogenic takes precedence; with >= 3 models a 5.0 -> 0.3 step has
  R² <= 0.75 anyway, so the two rarely compete).
- other: everything else.
- persistent: a token whose loss, once below ``mono_low`` at some size, stays below it at
  every larger size. Reported as a fraction of the tokens that ever go below it.

Mean-loss L(N): per-document mean losses (documents are the bootstrap units) are fitted
with :func:`pipeline.laws.fits.bootstrap_units`, L = E + A·N^-α_N (or A·N^-α_N), which gives
α_N with a percentile CI. The paper fitted OLS of log L on log N (in bits); α is the
same in bits or nats.

Memory: the per-token pass runs in chunks of ``chunk_tokens`` rows, so peak memory is the
float32 (tokens, models) input, the outputs (11 bytes per token), and O(chunk)
temporaries (see bench/bench_scaling.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa

from pipeline.core import execution
from pipeline.core.config import ConfigError, ScalingConfig, step_of  # noqa: F401 (re-exported: ScalingConfig lives in config.py)
from pipeline.core.errors import QuantaError
from pipeline.laws import fits
from pipeline.lm import partitions

KINDS = ("monogenic", "polygenic", "other")  # dictionary of the `kind` column; codes 0, 1, 2
MONOGENIC, POLYGENIC, OTHER = 0, 1, 2

_POS_BITS = 31  # pos is int32 >= 0, so (doc_id << 31) | pos is a unique int64 key


class ScalingError(QuantaError, ValueError):
    """A per-token scaling problem (too few models, mismatched tokenizers, no common tokens)."""


# --------------------------------------------------------------------------- loading and alignment


@dataclasses.dataclass(frozen=True)
class Aligned:
    """Loss tables joined on (doc_id, pos): one row per token present in every table.

    Rows are sorted by (doc_id, pos). losses is (tokens, tables) float32 in nats, columns
    in the order the tables were given. n_dropped: tokens present in some table but not
    in all (dropped); dropped_by_table: rows of each table that were dropped.
    """

    doc_id: np.ndarray  # (tokens,) int64
    pos: np.ndarray  # (tokens,) int32
    losses: np.ndarray  # (tokens, tables) float32
    names: tuple[str, ...]
    n_dropped: int
    dropped_by_table: dict[str, int]


def read_loss_partition(root: str | Path, model: str, revision: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_id int64, pos int32, loss float32) of one loss partition (pipeline/lm/partitions.py)."""
    try:
        table = partitions.read_loss_partition(root, model, revision)
    except partitions.LayoutError as e:
        raise ScalingError(str(e)) from None
    doc = table.column("doc_id").to_numpy().astype(np.int64, copy=False)
    pos = table.column("pos").to_numpy().astype(np.int32, copy=False)
    loss = table.column("loss").to_numpy().astype(np.float32, copy=False)
    return doc, pos, loss


def key_codec(doc_ids: Sequence[np.ndarray]):
    """(encode, decode) between (doc_id, pos) and one int64 key per token, order-preserving.

    key = (doc_id - lo) << 31 | pos, lo the smallest doc_id in any of ``doc_ids`` (pos is
    int32 >= 0). If the doc_ids span 2^32 values or more they are first renumbered densely
    (a sort of all of them, rarely needed). decode returns (doc_id int64, pos int32).
    """
    lo = min(int(np.min(d)) for d in doc_ids if len(d))
    hi = max(int(np.max(d)) for d in doc_ids if len(d))
    mask = (1 << _POS_BITS) - 1
    if hi - lo < 2**32:
        def encode(d, p):
            return ((np.asarray(d, np.int64) - lo) << _POS_BITS) | np.asarray(p, np.int64)

        def decode(k):
            return (k >> _POS_BITS) + lo, (k & mask).astype(np.int32)
    else:
        uniq = np.unique(np.concatenate([np.asarray(d, np.int64) for d in doc_ids]))

        def encode(d, p):
            return (np.searchsorted(uniq, d).astype(np.int64) << _POS_BITS) | np.asarray(p, np.int64)

        def decode(k):
            return uniq[k >> _POS_BITS], (k & mask).astype(np.int32)
    return encode, decode


def _sorted_unique(key: np.ndarray, name: str, decode) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """key sorted, and the sorting permutation (None when already sorted); duplicates raise."""
    d = np.diff(key)
    if d.size == 0 or np.all(d > 0):
        return key, None  # loss parts are usually written in (doc_id, pos) order: no sort needed
    order = np.argsort(key, kind="stable")
    sk = key[order]
    dup = np.flatnonzero(sk[1:] == sk[:-1])
    if dup.size:
        doc, pos = decode(sk[dup[:1]])
        raise ScalingError(
            f"losses of {name} list token (doc_id={int(doc[0])}, pos={int(pos[0])}) more than once "
            f"({dup.size} duplicate rows); a loss table has one row per token: rebuild it"
        )
    return sk, order


def _in_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mask of the elements of sorted `a` that occur in sorted `b` (binary search, no sort)."""
    if b.size == 0:
        return np.zeros(a.shape, dtype=bool)
    i = np.searchsorted(b, a)
    return b[np.minimum(i, b.size - 1)] == a


def align_tokens(
    doc_ids: Sequence[np.ndarray],
    positions: Sequence[np.ndarray],
    losses: Sequence[np.ndarray],
    names: Sequence[str],
) -> Aligned:
    """Join per-table (doc_id, pos, loss) arrays on (doc_id, pos); keep tokens present in all.

    doc_ids, positions, losses: one (rows_t,) array per table (model or checkpoint), any
    row order. Every loss must be finite (a NaN would silently leave a token out of a
    mean). Tokens missing from any table are dropped and counted. Raises
    :class:`ScalingError` on duplicate tokens, NaN losses or no common tokens.
    """
    names = tuple(names)
    if not (len(doc_ids) == len(positions) == len(losses) == len(names)) or not names:
        raise ScalingError("align_tokens needs one doc_id, pos and loss array per name, and at least one name")
    for name, d, p, l in zip(names, doc_ids, positions, losses):
        if not (len(d) == len(p) == len(l)):
            raise ScalingError(f"losses of {name}: doc_id, pos and loss have different lengths")
        if len(l) == 0:
            raise ScalingError(f"losses of {name} are empty")
        bad = int(np.count_nonzero(~np.isfinite(l)))
        if bad:
            raise ScalingError(
                f"losses of {name} contain {bad} NaN/inf values; rerun its losses stage (a NaN loss is a model "
                "or precision bug, never a token to skip)"
            )
        if np.min(p) < 0:
            raise ScalingError(f"losses of {name} have negative positions")

    encode, decode = key_codec(doc_ids)
    d0, p0 = doc_ids[0], positions[0]
    if all(np.array_equal(d, d0) and np.array_equal(p, p0) for d, p in zip(doc_ids[1:], positions[1:])):
        # The usual case: every table lists the same tokens in the same row order (the
        # loss stage shards one corpus the same way for every model). One key array, not M.
        sk, order = _sorted_unique(encode(d0, p0), names[0], decode)
        keys, orders = [sk] * len(names), [order] * len(names)
        common, n_union = sk, sk.size
    else:
        keys, orders = [], []
        for name, d, p in zip(names, doc_ids, positions):
            sk, order = _sorted_unique(encode(d, p), name, decode)
            keys.append(sk)
            orders.append(order)
        common = keys[0]
        for k in keys[1:]:
            common = common[_in_sorted(common, k)]
        n_union = int(np.unique(np.concatenate(keys)).size)
    if common.size == 0:
        raise ScalingError(
            f"the loss tables of {', '.join(names)} have no token (doc_id, pos) in common; "
            "were they scored on the same corpus with the same tokenizer and context settings?"
        )
    out = np.empty((common.size, len(names)), dtype=np.float32)  # (tokens, tables)
    for j, (k, order, l) in enumerate(zip(keys, orders, losses)):
        idx = np.searchsorted(k, common) if k.size != common.size else None
        if order is not None:
            idx = order if idx is None else order[idx]
        l = np.asarray(l)
        out[:, j] = l if idx is None else l[idx]
    doc, pos = decode(common)
    return Aligned(
        doc_id=doc,
        pos=pos,
        losses=out,
        names=names,
        n_dropped=int(n_union - common.size),
        dropped_by_table={n: int(k.size - common.size) for n, k in zip(names, keys)},
    )


# --------------------------------------------------------------------------- suite checks


def check_tokenizers(tokenizers: Mapping[str, str], models: Sequence[str]) -> None:
    """Every model of the suite must use the same tokenizer (identity strings, e.g. a vocab hash).

    Per-token losses can only be compared across models when (doc_id, pos) means the
    same token for all of them.
    """
    missing = [m for m in models if m not in tokenizers]
    if missing:
        raise ScalingError(f"no tokenizer identity given for model {missing[0]!r}; pass one for every model")
    ref = models[0]
    for m in models[1:]:
        if tokenizers[m] != tokenizers[ref]:
            raise ScalingError(
                f"models {ref!r} and {m!r} use different tokenizers ({tokenizers[ref]!r} vs {tokenizers[m]!r}): "
                "their per-token losses are over different tokens and cannot be compared; "
                "use a suite that shares one tokenizer"
            )


def suite_order(models: Sequence[str], n_params: Mapping[str, float]) -> list[str]:
    """The models sorted by non-embedding parameter count N, smallest first.

    Raises when a model has no N, N <= 0, or two models share one N (the size order,
    which the monogenic definition depends on, would be ambiguous).
    """
    if len(set(models)) != len(models):
        raise ScalingError(f"a model is listed twice in {list(models)}")
    for m in models:
        if m not in n_params:
            raise ScalingError(f"no non-embedding parameter count for model {m!r}; pass one for every model")
        if not (n_params[m] > 0 and math.isfinite(n_params[m])):
            raise ScalingError(f"model {m!r}: parameter count must be a positive number, got {n_params[m]!r}")
    order = sorted(models, key=lambda m: n_params[m])
    for a, b in zip(order, order[1:]):
        if n_params[a] == n_params[b]:
            raise ScalingError(f"models {a!r} and {b!r} have the same parameter count {n_params[a]}: no size order")
    return order


def too_few_models(models: Sequence[str], cfg: ScalingConfig) -> str:
    """'' when the suite is large enough; else the reason (returned under skip, raised under error)."""
    if len(models) >= cfg.min_models:
        return ""
    reason = (
        f"{len(models)} model(s) ({', '.join(models) or 'none'}): per-token scaling curves need at least "
        f"{cfg.min_models} (scaling.min_models); add models to suite.models"
    )
    if cfg.on_too_few_models == "error":
        raise ScalingError(reason + " or set scaling.on_too_few_models: skip")
    return reason


# --------------------------------------------------------------------------- per-token curves


@dataclasses.dataclass(frozen=True)
class TokenCurves:
    """Per-token results of :func:`token_curves`; every array is (tokens,).

    Model indices refer to the size order (0 = smallest).
    """

    slope: np.ndarray  # float32, nats per e-fold of N: OLS d loss / d ln N
    r2: np.ndarray  # float32, R² of that line; NaN for a flat token
    kind: np.ndarray  # int8 code into KINDS
    emerge: np.ndarray  # int8, model index of monogenic emergence; -1 if not monogenic
    first_below: np.ndarray  # int8, first model index with loss < mono_low; -1 if none
    persistent: np.ndarray  # bool, below mono_low from first_below on at every larger size


def token_curves(losses: np.ndarray, n_params: Sequence[float], cfg: ScalingConfig) -> TokenCurves:
    """Classify every token's scaling curve; vectorised over tokens, chunked for memory.

    losses: (tokens, models) per-token losses in nats, columns in ascending order of
    n_params (see :func:`suite_order`). n_params: (models,) non-embedding parameter
    counts N. Returns :class:`TokenCurves`; definitions in the module docstring.
    """
    L_all = np.asarray(losses)
    n = np.asarray(n_params, dtype=np.float64)
    if L_all.ndim != 2 or L_all.shape[1] != n.size:
        raise ScalingError(f"losses must be (tokens, {n.size}) to match n_params, got shape {L_all.shape}")
    M = n.size
    if M < 3:
        raise ScalingError(f"per-token scaling curves need at least 3 models, got {M}")
    if M > 127:
        raise ScalingError(f"at most 127 models fit the int8 model index, got {M}")
    if not np.all(np.diff(n) > 0) or n[0] <= 0:
        raise ScalingError("n_params must be positive and strictly increasing (columns in size order)")
    T = L_all.shape[0]
    # OLS of L on ln N for every token at once, with matrix products over (models, chunk):
    # the same line as pipeline.laws.fits.ols, vectorised for this layout and giving R² too.
    x = np.log(n)
    xc = x - x.mean()  # (models,) centred ln N
    sxx = float(xc @ xc)

    slope = np.empty(T, np.float32)
    r2 = np.empty(T, np.float32)
    kind = np.empty(T, np.int8)
    emerge = np.empty(T, np.int8)
    first_below = np.empty(T, np.int8)
    persistent = np.empty(T, bool)
    for s in range(0, T, cfg.chunk_tokens):
        e = min(T, s + cfg.chunk_tokens)
        # Models-major (models, chunk) float64: every reduction over models is then a
        # sum of M contiguous rows, which numpy vectorises; (chunk, models) with M = 7
        # reduces along a 7-long inner axis, ~3x slower.
        L = np.ascontiguousarray(L_all[s:e].T, dtype=np.float64)  # (models, chunk)
        mean = L.mean(axis=0)  # (chunk,)
        Lc = L - mean
        sxy = xc @ Lc  # (chunk,)
        sst = np.einsum("mc,mc->c", Lc, Lc)
        b = sxy / sxx
        with np.errstate(divide="ignore", invalid="ignore"):
            r = b * sxy / sst  # explained / total sum of squares
        # A flat token (every model gives the same float32 loss) has sst = 0 up to the
        # rounding of the float64 mean (~M (1e-16 mean)^2); R² is undefined there, not 0
        # or 1. Distinct float32 losses give sst >= ~1e-15 mean^2, far above the cut.
        flat = sst <= M * 1e-24 * (1.0 + mean * mean)
        r[flat] = np.nan

        below = L < cfg.mono_low  # (models, chunk)
        above = L > cfg.mono_high
        # p: length of the leading run of "above"; q: length of the trailing run of "below".
        p = np.where(above.all(axis=0), M, np.argmin(above, axis=0))
        q = np.where(below.all(axis=0), M, np.argmin(below[::-1], axis=0))
        mono = (p >= 1) & (q >= 1) & (p + q == M)  # above for all j' < j = p, below for all j' >= p
        poly = (b < cfg.poly_slope) & (r > cfg.poly_r2) & ~mono  # NaN r2 compares False
        fb = np.where(below.any(axis=0), np.argmax(below, axis=0), -1)

        slope[s:e] = b
        r2[s:e] = r
        kind[s:e] = np.where(mono, MONOGENIC, np.where(poly, POLYGENIC, OTHER))
        emerge[s:e] = np.where(mono, p, -1)
        first_below[s:e] = fb
        # Once below, below at every larger size: the first "below" starts the trailing run.
        persistent[s:e] = (fb >= 0) & (fb == M - q)
    return TokenCurves(slope=slope, r2=r2, kind=kind, emerge=emerge, first_below=first_below, persistent=persistent)


#: the schema of ``token_curves.parquet`` (what :func:`curves_table` gives)
CURVES_SCHEMA = pa.schema([
    ("doc_id", pa.int64()), ("pos", pa.int32()), ("slope", pa.float32()), ("r2", pa.float32()),
    ("kind", pa.dictionary(pa.int8(), pa.string())), ("emerge_model", pa.dictionary(pa.int8(), pa.string())),
])


def curves_table(doc_id: np.ndarray, pos: np.ndarray, curves: TokenCurves, models: Sequence[str]) -> pa.Table:
    """The ``token_curves.parquet`` table: doc_id, pos, slope, r2, kind, emerge_model.

    kind and emerge_model are dictionary-encoded strings; emerge_model is null for tokens
    that are not monogenic. models: names in size order (the indices of ``curves``).
    """
    kind = pa.DictionaryArray.from_arrays(pa.array(curves.kind, pa.int8()), pa.array(KINDS, pa.string()))
    none = curves.emerge < 0
    emerge = pa.DictionaryArray.from_arrays(
        pa.array(np.where(none, 0, curves.emerge).astype(np.int8), pa.int8(), mask=none),
        pa.array(list(models), pa.string()),
    )
    return pa.table(
        {
            "doc_id": pa.array(np.asarray(doc_id, np.int64)),
            "pos": pa.array(np.asarray(pos, np.int32)),
            "slope": pa.array(curves.slope),
            "r2": pa.array(curves.r2, from_pandas=False),
            "kind": kind,
            "emerge_model": emerge,
        }
    )


def population_stats(curves: TokenCurves, models: Sequence[str]) -> dict:
    """Population statistics of :class:`TokenCurves` (fractions of all tokens unless named otherwise).

    kinds: fraction of tokens of each kind. monogenic_by_model: fraction of all tokens
    whose monogenic emergence is at each model (sizes 1.. in order; the smallest model
    cannot be an emergence size). first_below_by_model: fraction whose loss first goes
    below mono_low at each model, whatever happens before or after. persistence: among
    tokens that ever go below mono_low, the fraction that stay below at every larger size.
    """
    T = int(curves.kind.size)
    M = len(models)
    kc = np.bincount(curves.kind, minlength=len(KINDS))
    ec = np.bincount(curves.emerge[curves.emerge >= 0], minlength=M)
    fc = np.bincount(curves.first_below[curves.first_below >= 0], minlength=M)
    n_ever = int(fc.sum())
    n_pers = int(np.count_nonzero(curves.persistent))
    frac = (lambda c: float(c) / T) if T else (lambda c: float("nan"))
    return {
        "n_tokens": T,
        "kinds": {k: frac(kc[i]) for i, k in enumerate(KINDS)},
        "kind_counts": {k: int(kc[i]) for i, k in enumerate(KINDS)},
        "monogenic_by_model": {models[j]: frac(ec[j]) for j in range(1, M)},
        "first_below_by_model": {models[j]: frac(fc[j]) for j in range(M)},
        "persistence": {
            "n_ever_below": n_ever,
            "frac_ever_below": frac(n_ever),
            "n_persistent": n_pers,
            "persistent_among_ever_below": n_pers / n_ever if n_ever else None,
        },
    }


# --------------------------------------------------------------------------- mean-loss L(N)


def doc_mean_losses(
    doc_id: np.ndarray, losses: np.ndarray, weighting: Literal["token", "document"] = "token"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-document mean losses, the units of the document bootstrap.

    doc_id: (tokens,) sorted (as :func:`align_tokens` returns it); losses: (tokens,
    models) nats. Returns (docs,) doc ids and (docs, models) values whose column means
    are the suite's mean losses: with ``token`` weighting each document's mean is scaled
    by its token count over the mean count, so the plain mean over documents equals the
    mean over tokens (the paper's L). A bootstrap replicate then scales every model's L
    by the same factor, which leaves α_N unchanged and widens the CIs of E and A only.
    With ``document`` weighting the values are plain per-document means.
    """
    doc_id = np.asarray(doc_id)
    L = np.asarray(losses)
    if doc_id.size and np.any(doc_id[1:] < doc_id[:-1]):
        raise ScalingError("doc_id must be sorted (as align_tokens returns it)")
    starts = np.flatnonzero(np.r_[True, doc_id[1:] != doc_id[:-1]])  # (docs,)
    counts = np.diff(np.r_[starts, doc_id.size]).astype(np.float64)
    sums = np.empty((starts.size, L.shape[1]), np.float64)  # (docs, models)
    for j in range(L.shape[1]):  # a column at a time: no float64 copy of the whole matrix
        sums[:, j] = np.add.reduceat(L[:, j], starts, dtype=np.float64)
    denom = counts.mean() if weighting == "token" else counts
    return doc_id[starts], sums / (denom if np.ndim(denom) == 0 else denom[:, None])


def mean_loss_fit(
    doc_id: np.ndarray, losses: np.ndarray, n_params: Sequence[float], cfg: ScalingConfig
) -> fits.CurveBootstrap:
    """α_N with a document-bootstrap CI: fit L(N) = E + A·N^-α_N to the suite's mean losses.

    doc_id: (tokens,) sorted; losses: (tokens, models) nats, columns in size order;
    n_params: (models,) non-embedding parameter counts. Calls
    :func:`pipeline.laws.fits.bootstrap_units` on :func:`doc_mean_losses`.
    """
    _, values = doc_mean_losses(doc_id, losses, cfg.doc_weighting)
    return fits.bootstrap_units(
        values,
        np.asarray(n_params, np.float64),
        offset=cfg.fit_offset,
        n_boot=cfg.n_boot,
        seed=cfg.seed,
        level=cfg.level,
        x_lo=cfg.fit_n_lo,
        x_hi=cfg.fit_n_hi,
    )


def _fit_metrics(boot: fits.CurveBootstrap) -> dict:
    f = boot.fit
    return {
        "alpha_N": f.alpha,
        "alpha_ci": list(boot.alpha_ci) if boot.alpha_ci else None,
        "E": f.E,
        "A": f.A,
        "offset": f.offset,
        "converged": f.converged,
        "reason": f.reason or boot.reason,
        "level": boot.level,
        "n_boot": boot.n_boot,
        "n_failed": boot.n_failed,
        "n_lo": f.x_lo,
        "n_hi": f.x_hi,
    }


# --------------------------------------------------------------------------- one call


@dataclasses.dataclass(frozen=True)
class SuiteScaling:
    """Everything the scaling stage writes. skipped: '' or why nothing was computed."""

    models: tuple[str, ...]  # size order
    n_params: tuple[float, ...]
    skipped: str
    table: Optional[pa.Table]  # token_curves.parquet
    metrics: dict  # metrics/scaling.json
    curves: Optional[TokenCurves] = None
    fit: Optional[fits.CurveBootstrap] = None


def _skipped(models, n_params, reason: str) -> SuiteScaling:
    return SuiteScaling(
        models=tuple(models), n_params=tuple(n_params), skipped=reason, table=None,
        metrics={"skipped": reason},
    )


def analyze(
    aligned: Aligned,
    n_params: Mapping[str, float],
    cfg: ScalingConfig,
    *,
    fit_mean_loss: bool = True,
    pool=None,
) -> SuiteScaling:
    """Per-token curves, population statistics and the L(N) fit of aligned suite losses.

    aligned: from :func:`align_tokens`, one column per model (any order; sorted here by
    n_params). Too few models: :class:`ScalingError`, or a result with ``skipped`` set
    under ``on_too_few_models: skip``. pool: an executor (``execution.process_pool``) that
    fits L(N) while the per-token curves are computed here; the numbers are the same.
    """
    reason = too_few_models(aligned.names, cfg)
    if reason:
        return _skipped(aligned.names, [], reason)
    models = suite_order(aligned.names, n_params)
    cols = [aligned.names.index(m) for m in models]
    L = aligned.losses if cols == list(range(len(cols))) else aligned.losses[:, cols]  # (tokens, models)
    N = [float(n_params[m]) for m in models]
    pending = pool.submit(mean_loss_fit, aligned.doc_id, L, N, cfg) if fit_mean_loss and pool is not None else None
    curves = token_curves(L, N, cfg)
    metrics = {
        "skipped": "",
        "models": models,
        "n_params": N,
        "n_dropped": aligned.n_dropped,
        "dropped_by_model": aligned.dropped_by_table,
        **population_stats(curves, models),
    }
    boot = None
    if fit_mean_loss:
        boot = pending.result() if pending is not None else mean_loss_fit(aligned.doc_id, L, N, cfg)
        metrics["mean_loss"] = {
            "by_model": {m: float(v) for m, v in zip(models, L.mean(axis=0, dtype=np.float64))},
            **_fit_metrics(boot),
        }
    table = curves_table(aligned.doc_id, aligned.pos, curves, models)
    return SuiteScaling(
        models=tuple(models), n_params=tuple(N), skipped="", table=table, metrics=metrics, curves=curves, fit=boot
    )


def analyze_suite(
    root: str | Path,
    models: Sequence[str],
    revision: str,
    n_params: Mapping[str, float],
    cfg: ScalingConfig,
    *,
    tokenizers: Optional[Mapping[str, str]] = None,
    fit_mean_loss: bool = True,
) -> SuiteScaling:
    """Load ``<root>/model=<m>/revision=<revision>`` for every model and :func:`analyze` them.

    tokenizers: model -> tokenizer identity (e.g. a hash of the vocabulary); when given,
    all must agree. The cheap checks (model count, tokenizers, parameter counts) run
    before any table is read.
    """
    reason = too_few_models(list(models), cfg)
    if reason:
        return _skipped(models, [], reason)
    if tokenizers is not None:
        check_tokenizers(tokenizers, list(models))
    return analyze(_read_aligned(root, models, revision, n_params), n_params, cfg, fit_mean_loss=fit_mean_loss)


def _read_aligned(root: str | Path, models: Sequence[str], revision: str, n_params: Mapping[str, float]) -> Aligned:
    """The suite's loss tables at `revision`, aligned on (doc_id, pos), once the size order
    (:func:`suite_order`) is known to exist."""
    suite_order(models, n_params)
    parts = [read_loss_partition(root, m, revision) for m in models]
    return align_tokens([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], models)


# --------------------------------------------------------------------------- the scaling stage


def tokenizer_identity(tokenizer) -> str:
    """A short identity of a tokenizer's vocabulary: class, size and a hash of (token, id) pairs.

    Two tokenizers with the same identity map every token id to the same string, which is
    what aligning per-token losses across models by (doc_id, pos) needs.
    """
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha1(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:12]
    return f"{type(tokenizer).__name__}, {len(vocab)} tokens, vocab sha1 {digest}"


def doc_sums(doc_id: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(docs,) sorted unique doc ids, their token counts (int64) and loss sums (float64, nats)."""
    docs, inv = np.unique(np.asarray(doc_id, np.int64), return_inverse=True)
    counts = np.bincount(inv, minlength=docs.size).astype(np.int64)
    sums = np.bincount(inv, weights=np.asarray(loss, np.float64), minlength=docs.size)
    return docs, counts, sums


def learning_curve_units(
    root: str | Path, model: str, revisions: Sequence[str], weighting: Literal["token", "document"] = "token"
) -> np.ndarray:
    """(docs, revisions) per-document mean losses of one model at each revision (nats).

    One loss table at a time (never all of a model's tokens x checkpoints in memory): each
    is reduced to per-document sums. Every revision must have scored the same documents
    with the same number of tokens each, else the curve would mix corpora (an error).
    Column means equal the mean loss over tokens (``token``) or documents (``document``),
    as :func:`doc_mean_losses`.
    """
    ref_docs = ref_counts = None
    cols = []
    for r in revisions:
        d, _, l = read_loss_partition(root, model, r)
        if not np.all(np.isfinite(l)):
            raise ScalingError(f"losses of {model}@{r} contain NaN/inf values; rerun its losses stage")
        docs, counts, sums = doc_sums(d, l)
        if ref_docs is None:
            ref_docs, ref_counts = docs, counts
        elif not (np.array_equal(docs, ref_docs) and np.array_equal(counts, ref_counts)):
            raise ScalingError(
                f"the losses of {model} at {revisions[0]} and {r} cover different tokens "
                f"({int(ref_counts.sum())} vs {int(counts.sum())} in {ref_docs.size} vs {docs.size} documents); "
                "rerun their losses stages on one corpus"
            )
        cols.append(sums)
    sums = np.stack(cols, axis=1)  # (docs, revisions)
    denom = ref_counts.mean() if weighting == "token" else ref_counts[:, None].astype(np.float64)
    return sums / denom


def step_revisions(revisions: Sequence[str], step_lo: Optional[int], step_hi: Optional[int]) -> tuple[list[str], list[int]]:
    """The ``stepN`` revisions (others are ignored) with N in [step_lo, step_hi], sorted by N."""
    found = []
    for r in revisions:
        s = step_of(r)
        if s is not None:
            if (step_lo is None or s >= step_lo) and (step_hi is None or s <= step_hi):
                found.append((s, r))
    found.sort()
    return [r for _, r in found], [s for s, _ in found]


def learning_curve_fit(root: str | Path, model: str, revisions: Sequence[str], cfg: ScalingConfig) -> dict:
    """α_S of one model: L(S) = E + A·S^-α_S over its stepN revisions in [step_lo, step_hi].

    Document bootstrap, as L(N). Returns a JSON-ready dict (steps, mean_loss, the fit
    and its CI); with fewer than 2 checkpoints in the window, ``skipped`` says why.
    """
    revs, steps = step_revisions(revisions, cfg.step_lo, cfg.step_hi)
    out: dict = {"revisions": revs, "steps": steps}
    if len(revs) < 2:
        out["skipped"] = (
            f"{len(revs)} stepN revision(s) of {model} in [{cfg.step_lo}, {cfg.step_hi}]: a learning curve needs "
            "at least 2 (4 for E + A·S^-α); add stepN revisions to suite.revisions or widen scaling.step_lo/step_hi"
        )
        return out
    values = learning_curve_units(root, model, revs, cfg.doc_weighting)
    out["mean_loss"] = [float(v) for v in values.mean(axis=0)]
    if any(s <= 0 for s in steps):
        out["skipped"] = f"{model}: step 0 is in the window (S^-α is undefined there); set scaling.step_lo >= 1"
        return out
    boot = fits.bootstrap_units(
        values, np.asarray(steps, np.float64), offset=cfg.fit_offset, n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level
    )
    m = _fit_metrics(boot)
    m["alpha_S"] = m.pop("alpha_N")
    m["step_lo"], m["step_hi"] = m.pop("n_lo"), m.pop("n_hi")
    out.update(m)
    out["_boot"] = boot  # for plots; dropped from the metrics
    return out


@dataclasses.dataclass(frozen=True)
class ScalingRun:
    """What the scaling stage writes: the token table, metrics, and the data of its plots."""

    suite: SuiteScaling
    metrics: dict  # metrics/scaling.json
    learning_curves: dict  # model -> learning_curve_fit() (with its "_boot")
    examples: dict  # kind -> (n_params (models,), losses (examples, models)) for the example plot

    def curves_table(self) -> pa.Table:
        """token_curves.parquet: the per-token table; when skipped, an empty one with the
        schema, so that readers and DVC still see a file."""
        return self.suite.table if self.suite.table is not None else CURVES_SCHEMA.empty_table()

    def summary_line(self) -> str:
        """The scaling stage's one-line summary."""
        m = self.metrics
        if m.get("skipped"):
            return f"scaling: skipped: {m['skipped']}"
        ml, s = m["mean_loss"], m["alpha_S"]

        def fmt(v, ci, ok, reason):
            return f"{v:.4g} CI {ci}" if ok else f"{v} NOT CONVERGED ({reason})"

        return (f"scaling: {m['n_tokens']} tokens, kinds {m['kinds']}; "
                f"alpha_N {fmt(ml['alpha_N'], ml['alpha_ci'], ml['converged'], ml['reason'])}; "
                f"alpha_S({s['model']}) {fmt(s['alpha_S'], s['alpha_ci'], s['converged'], s['reason'])}")


def _examples(aligned: Aligned, res: SuiteScaling, n: int) -> dict:
    """Up to n example tokens of each kind: monogenic spread over emergence sizes, polygenic by R²."""
    out = {}
    if res.curves is None or n == 0:
        return out
    cols = [aligned.names.index(m) for m in res.models]
    c = res.curves
    mono = np.flatnonzero(c.kind == MONOGENIC)
    if mono.size:
        # the first token of each emergence size, round-robin, so the plot shows several sizes
        order = np.lexsort((mono, c.emerge[mono]))
        by = {}
        for i in mono[order]:
            by.setdefault(int(c.emerge[i]), []).append(i)
        pick, lists = [], list(by.values())
        while len(pick) < n and any(lists):
            for lst in lists:
                if lst and len(pick) < n:
                    pick.append(lst.pop(0))
        out["monogenic"] = aligned.losses[np.sort(pick)][:, cols]
    poly = np.flatnonzero(c.kind == POLYGENIC)
    if poly.size:
        top = poly[np.argsort(-c.r2[poly], kind="stable")[:n]]
        out["polygenic"] = aligned.losses[np.sort(top)][:, cols]
    return out


def run(
    root: str | Path,
    models: Sequence[str],
    revisions: Sequence[str],
    cfg: ScalingConfig,
    *,
    tokenizers: Optional[Mapping[str, str]] = None,
) -> ScalingRun:
    """The scaling stage: per-token curves and L(N) at ``cfg.revision`` (default: the last
    revision), and L(S) of every model over its stepN revisions.

    root: the losses directory (hive partitions); models: suite.models; revisions:
    suite.revisions; tokenizers: model -> :func:`tokenizer_identity` (all must agree).
    N comes from each loss table's ``_meta.json``.
    """
    revision = cfg.revision or revisions[-1]
    if revision not in revisions:
        raise ScalingError(f"scaling.revision {revision!r} is not in suite.revisions ({', '.join(revisions)}); "
                           "set scaling.revision to one of them, or null (the last)")
    if cfg.alpha_s_model is not None and cfg.alpha_s_model not in models:  # before the fits, not after them
        raise ScalingError(f"scaling.alpha_s_model {cfg.alpha_s_model!r} is not in suite.models ({', '.join(models)}); "
                           "set scaling.alpha_s_model to one of them, or null (the largest)")
    reason = too_few_models(list(models), cfg)
    if reason:
        res = _skipped(models, [], reason)
        return ScalingRun(suite=res, metrics={"skipped": reason, "revision": revision}, learning_curves={}, examples={})
    if tokenizers is not None:
        check_tokenizers(tokenizers, list(models))
    n_params = {m: partitions.read_n_params(root, m, revision) for m in models}
    aligned = _read_aligned(root, models, revision, n_params)
    with execution.process_pool(len(models) + 1) as pool:
        # The bootstrap fits (L(N) and each model's L(S), 1000 replicates each) are most of
        # the stage's time and independent of one another: they run in the pool.
        pending = {m: pool.submit(learning_curve_fit, root, m, revisions, cfg) for m in models} if pool else {}
        res = analyze(aligned, n_params, cfg, pool=pool)
        examples = _examples(aligned, res, cfg.n_examples)
        del aligned
        curves = {m: pending[m].result() if pool else learning_curve_fit(root, m, revisions, cfg) for m in res.models}
    head = cfg.alpha_s_model or res.models[-1]
    h = curves[head]
    metrics = dict(res.metrics)
    metrics["revision"] = revision
    if tokenizers is not None:
        metrics["tokenizer"] = tokenizers[models[0]]
    metrics["learning_curves"] = {m: {k: v for k, v in c.items() if k != "_boot"} for m, c in curves.items()}
    metrics["alpha_S"] = {
        "model": head,
        "alpha_S": h.get("alpha_S"),
        "alpha_ci": h.get("alpha_ci"),
        "converged": h.get("converged", False),
        "reason": h.get("skipped") or h.get("reason", ""),
        "level": cfg.level,
    }
    return ScalingRun(suite=res, metrics=metrics, learning_curves=curves, examples=examples)
