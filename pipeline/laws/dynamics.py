"""Training dynamics per token across the checkpoints of one model: are phase changes everywhere?

Why this module exists: the quantization model says a quantum is learned abruptly once the
model has seen it often enough, so over training steps S a token governed by quantum k
should show a sharp loss drop near S_k ∝ 1/p_k (Michaud et al. 2023, §3 and the sparse
parity toy, where each subtask's loss drops abruptly, roughly in frequency order). Whether
real language-model tokens behave like that, and how much of the total loss decrease such
drops account for, the paper did not measure. This module measures it for every token of
a model with Pythia-style ``stepN`` checkpoints, and on a suite with planted quanta it
checks the S_k ∝ 1/p_k prediction.

Per token (vectorised over tokens, chunked for memory; losses in nats, steps in optimizer
updates; u = log10(step + 1) is the "log step" coordinate, +1 so that step 0 is defined,
negligible past ~100 steps):

- windows: every run of ``window_checkpoints`` consecutive checkpoints (``window:
  checkpoints``), or, from each checkpoint, the checkpoints within ``window_log10``
  decades of log step (``window: log10``; a window always spans at least one interval).
- drop: the largest decrease L(start) - L(end) over all windows (the first such window on
  ties), in nats; negative when the loss never decreases.
- drop_step: the first checkpoint in that window at which the loss is at or below the
  halfway level (L(start) + L(end)) / 2, i.e. "the checkpoint after" the midpoint;
  drop_step_mid: the halfway crossing interpolated linearly in log step between the two
  checkpoints that bracket it (for a sigmoid in log step, its centre). Undefined (-1,
  NaN) when drop <= 0.
- sharpness: drop / (u(end) - u(start)), nats per decade of steps. (We do not fit a
  logistic curve per token: the drop-per-decade over the best window is closed-form,
  vectorises, and does not fail to converge.)
- net_decrease: L(first checkpoint) - L(last checkpoint), nats (negative if the loss rose).
- abrupt (the phase-change flag): drop >= ``min_drop`` (1 nat), net_decrease > 0, and
  drop >= ``min_share`` (0.8) × net_decrease: most of what the token ever learned, it
  learned inside one window. A drop followed by a partial rise also counts.

Population (metrics/dynamics.json): the fraction of tokens flagged abrupt, and their
share of the total decrease, where the total decrease is the sum over tokens of
max(net_decrease, 0) (only tokens whose loss fell, first to last checkpoint) and their
share is the sum of their net_decrease over it. The net share (over the sum of
net_decrease of all tokens, rising ones included) is reported beside it.

Emergence vs frequency (planted suite): for each quantum k, S_k is either the step at
which the mean loss over k's tokens first falls below ``emergence_loss`` (``mean_loss``,
the default; interpolated in log step between the two bracketing checkpoints), or the
median drop_step_mid of k's tokens whose drop >= ``min_drop`` (``median_drop``). Then OLS
of log10 S_k on log10(1/p_k): the theory predicts slope 1.

Warning for Pythia: every token falls from ~ln(vocab) = 10.8 nats to its unigram loss in
the first few hundred steps, a "phase change" that is not a quantum; set ``step_lo``
(e.g. 1000) to leave those checkpoints out.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import stats

from pipeline.core.config import ConfigError, DynamicsConfig, step_of  # noqa: F401 (re-exported: DynamicsConfig lives in config.py)
from pipeline.core.errors import QuantaError
from pipeline.laws import fits
from pipeline.laws.scaling import Aligned, align_tokens, key_codec, read_loss_partition
from pipeline.lm import partitions

_CHUNK_ELEMENTS = 1 << 18  # (tokens, windows) float32 temporaries of 1 MiB: cache-sized, ~2x faster than 16 MiB


class DynamicsError(QuantaError, ValueError):
    """A training-dynamics problem (too few checkpoints, bad revision names, no labels), in one line."""


# --------------------------------------------------------------------------- loading


def parse_step(revision: str) -> int:
    """N of a Pythia-style revision name ``stepN``."""
    n = step_of(revision)
    if n is None:
        raise DynamicsError(
            f"revision {revision!r} is not a checkpoint name 'stepN'; training dynamics need stepN revisions"
        )
    return n


@dataclasses.dataclass(frozen=True)
class Checkpoints:
    """One model's per-token losses at its checkpoints, steps ascending."""

    model: str
    revisions: tuple[str, ...]
    steps: np.ndarray  # (checkpoints,) int64, strictly increasing
    aligned: Aligned  # losses (tokens, checkpoints), columns in step order


def list_revisions(root: str | Path, model: str) -> list[str]:
    """The ``stepN`` revisions on disk under ``<root>/model=<model>/`` (others are ignored)."""
    base = partitions.model_dir(root, model)
    if not base.is_dir():
        raise DynamicsError(f"no losses for model {model!r}: {base} does not exist; run its losses stages first")
    return [p.name[len("revision="):] for p in sorted(base.glob("revision=step*")) if step_of(p.name[len("revision="):]) is not None]


def load_checkpoints(root: str | Path, model: str, revisions: Optional[Sequence[str]] = None) -> Checkpoints:
    """Read and align ``<root>/model=<model>/revision=stepN`` for the given revisions (default: all on disk).

    Revisions are sorted by N; two names with the same N (step1000, step01000) are an error.
    """
    revs = list(revisions) if revisions is not None else list_revisions(root, model)
    steps = [parse_step(r) for r in revs]
    if len(set(steps)) != len(steps):
        raise DynamicsError(f"model {model!r}: two revisions name the same step in {revs}")
    _check_count(len(revs), f"model {model!r} ({', '.join(revs) or 'no stepN revisions'})")
    order = np.argsort(steps, kind="stable")
    revs = [revs[i] for i in order]
    parts = [read_loss_partition(root, model, r) for r in revs]
    aligned = align_tokens([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], revs)
    return Checkpoints(model=model, revisions=tuple(revs), steps=np.sort(np.asarray(steps, np.int64)), aligned=aligned)


def _check_count(n: int, what: str) -> None:
    if n < 2:
        raise DynamicsError(
            f"training dynamics need at least 2 checkpoints, got {n} for {what}; "
            "add stepN revisions to suite.revisions (or widen dynamics.step_lo/step_hi)"
        )


# --------------------------------------------------------------------------- per-token dynamics


def log_step(steps: np.ndarray) -> np.ndarray:
    """u = log10(step + 1), the log-step coordinate (defined at step 0)."""
    return np.log10(np.asarray(steps, np.float64) + 1.0)


def select_steps(steps: np.ndarray, cfg: DynamicsConfig) -> np.ndarray:
    """Indices of the checkpoints inside [step_lo, step_hi]; at least 2 of them, else an error."""
    steps = np.asarray(steps, np.int64)
    if steps.ndim != 1 or np.any(np.diff(steps) <= 0):
        raise DynamicsError(f"checkpoint steps must be strictly increasing, got {steps.tolist()}")
    if steps.size and steps[0] < 0:
        raise DynamicsError(f"checkpoint steps must be >= 0, got {steps.tolist()}")
    keep = np.ones(steps.shape, bool)
    if cfg.step_lo is not None:
        keep &= steps >= cfg.step_lo
    if cfg.step_hi is not None:
        keep &= steps <= cfg.step_hi
    idx = np.flatnonzero(keep)
    _check_count(idx.size, f"steps {steps.tolist()} within [{cfg.step_lo}, {cfg.step_hi}]")
    return idx


def windows(steps: np.ndarray, cfg: DynamicsConfig) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends): checkpoint indices of every window, each (windows,) int64, end > start.

    ``checkpoints``: [i, i + W - 1] with W = min(window_checkpoints, checkpoints) (one
    window spanning the whole run when there are fewer checkpoints than W).
    ``log10``: from each i, the last j with u_j - u_i <= window_log10, at least i + 1.
    """
    C = len(steps)
    if cfg.window == "checkpoints":
        W = min(cfg.window_checkpoints, C)
        starts = np.arange(C - W + 1, dtype=np.int64)
        return starts, starts + (W - 1)
    u = log_step(steps)
    starts = np.arange(C - 1, dtype=np.int64)
    ends = np.searchsorted(u, u[:-1] + cfg.window_log10 * (1 + 1e-12), side="right") - 1
    return starts, np.maximum(ends, starts + 1).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class TokenDynamics:
    """Per-token results of :func:`token_dynamics`; every array is (tokens,). Steps are checkpoint steps."""

    drop: np.ndarray  # float32 nats, largest L(start) - L(end) over windows
    start_step: np.ndarray  # int64, the step where that window starts
    end_step: np.ndarray  # int64, ... and ends
    drop_step: np.ndarray  # int64, first checkpoint in it at or below the halfway level; -1 if drop <= 0
    drop_step_mid: np.ndarray  # float64, halfway crossing interpolated in log step; NaN if drop <= 0
    sharpness: np.ndarray  # float32 nats per decade of steps
    net_decrease: np.ndarray  # float32 nats, L(first) - L(last)
    abrupt: np.ndarray  # bool, the phase-change flag
    steps: np.ndarray  # (checkpoints,) the steps analysed (after step_lo/step_hi)
    window_starts: np.ndarray  # (windows,) checkpoint indices into `steps`
    window_ends: np.ndarray


def token_dynamics(losses: np.ndarray, steps: Sequence[int], cfg: DynamicsConfig) -> TokenDynamics:
    """Largest windowed drop, its step and sharpness, and the abrupt flag, for every token.

    losses: (tokens, checkpoints) nats, columns in ascending step order; steps:
    (checkpoints,) optimizer steps. Checkpoints outside [step_lo, step_hi] are dropped
    first. Definitions in the module docstring.
    """
    L_all = np.asarray(losses)
    steps = np.asarray(steps, np.int64)
    if L_all.ndim != 2 or L_all.shape[1] != steps.size:
        raise DynamicsError(f"losses must be (tokens, {steps.size}) to match steps, got shape {L_all.shape}")
    if L_all.shape[0] == 0:
        raise DynamicsError("no tokens: the loss matrix is empty")
    keep = select_steps(steps, cfg)
    if keep.size != steps.size:
        L_all, steps = L_all[:, keep], steps[keep]
    if not np.all(np.isfinite(L_all)):
        raise DynamicsError(f"losses contain {int(np.sum(~np.isfinite(L_all)))} NaN/inf values; rerun the losses stage")
    u = log_step(steps)  # (checkpoints,)
    ws, we = windows(steps, cfg)  # (windows,)
    width = u[we] - u[ws]  # (windows,) decades
    span = int(np.max(we - ws)) + 1  # most checkpoints in one window
    T = L_all.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // max(ws.size, span))

    out = dict(
        drop=np.empty(T, np.float32), start_step=np.empty(T, np.int64), end_step=np.empty(T, np.int64),
        drop_step=np.empty(T, np.int64), drop_step_mid=np.empty(T, np.float64),
        sharpness=np.empty(T, np.float32), net_decrease=np.empty(T, np.float32), abrupt=np.empty(T, bool),
    )
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        L = np.ascontiguousarray(L_all[s:e], dtype=np.float32)  # (chunk, checkpoints)
        r = np.arange(e - s)
        D = L[:, ws] - L[:, we]  # (chunk, windows) drop over each window
        best = np.argmax(D, axis=1)  # first window on ties
        drop = D[r, best]
        i0, i1 = ws[best], we[best]
        half = (L[r, i0] + L[r, i1]) * np.float32(0.5)
        # The window's losses, padded past its end with its last loss (which is <= half
        # whenever drop > 0, so the first "at or below half" is always inside the window).
        idx = np.minimum(i0[:, None] + np.arange(span)[None, :], i1[:, None])  # (chunk, span)
        G = np.take_along_axis(L, idx, axis=1)
        k = np.argmax(G <= half[:, None], axis=1)  # >= 1 when drop > 0, since G[:, 0] > half
        ok = drop > 0
        k = np.where(ok, k, 1)
        a, b = i0 + k - 1, i0 + k  # bracketing checkpoints
        La, Lb = G[r, k - 1].astype(np.float64), G[r, k].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            f = (La - half) / (La - Lb)
        umid = u[a] + f * (u[b] - u[a])
        net = L[:, 0] - L[:, -1]

        out["drop"][s:e] = drop
        out["start_step"][s:e] = steps[i0]
        out["end_step"][s:e] = steps[i1]
        out["drop_step"][s:e] = np.where(ok, steps[b], -1)
        out["drop_step_mid"][s:e] = np.where(ok, 10.0**umid - 1.0, np.nan)
        out["sharpness"][s:e] = drop / width[best]
        out["net_decrease"][s:e] = net
        out["abrupt"][s:e] = (drop >= cfg.min_drop) & (net > 0) & (drop >= cfg.min_share * net)
    return TokenDynamics(**out, steps=steps, window_starts=ws, window_ends=we)


def dynamics_table(doc_id: np.ndarray, pos: np.ndarray, dyn: TokenDynamics) -> pa.Table:
    """A per-token table: doc_id, pos, drop, start_step, end_step, drop_step (null if none),
    drop_step_mid, sharpness, net_decrease, abrupt."""
    none = dyn.drop_step < 0
    return pa.table(
        {
            "doc_id": pa.array(np.asarray(doc_id, np.int64)),
            "pos": pa.array(np.asarray(pos, np.int32)),
            "drop": pa.array(dyn.drop),
            "start_step": pa.array(dyn.start_step),
            "end_step": pa.array(dyn.end_step),
            "drop_step": pa.array(dyn.drop_step, mask=none),
            "drop_step_mid": pa.array(dyn.drop_step_mid, from_pandas=False),
            "sharpness": pa.array(dyn.sharpness),
            "net_decrease": pa.array(dyn.net_decrease),
            "abrupt": pa.array(dyn.abrupt),
        }
    )


def population_stats(dyn: TokenDynamics, cfg: DynamicsConfig) -> dict:
    """metrics/dynamics.json numbers: how common abrupt drops are, and how much loss they explain.

    frac_abrupt: flagged tokens / all tokens. decrease_total: sum over tokens of
    max(net_decrease, 0), nats. abrupt_share_of_decrease: the flagged tokens' summed
    net_decrease over decrease_total. net_total / abrupt_share_of_net: the same over the
    plain sum of net_decrease (rising tokens subtract). frac_abrupt_among_learned: among
    tokens with net_decrease >= min_drop. abrupt_by_step: flagged tokens by drop_step.
    """
    T = int(dyn.abrupt.size)
    net = dyn.net_decrease.astype(np.float64)
    ab = dyn.abrupt
    n_ab = int(np.count_nonzero(ab))
    dec_total = float(np.sum(np.maximum(net, 0.0)))
    net_total = float(net.sum())
    ab_net = float(net[ab].sum())
    learned = net >= cfg.min_drop
    n_learned = int(np.count_nonzero(learned))
    st, cnt = np.unique(dyn.drop_step[ab], return_counts=True)
    return {
        "n_tokens": T,
        "steps": dyn.steps.tolist(),
        "window": {
            "mode": cfg.window,
            "checkpoints": cfg.window_checkpoints if cfg.window == "checkpoints" else None,
            "log10": cfg.window_log10 if cfg.window == "log10" else None,
            "n_windows": int(dyn.window_starts.size),
            "max_span": int(np.max(dyn.window_ends - dyn.window_starts)) + 1,
        },
        "n_abrupt": n_ab,
        "frac_abrupt": n_ab / T,
        "frac_decreasing": float(np.count_nonzero(net > 0)) / T,
        "decrease_total": dec_total,
        "decrease_per_token": dec_total / T,
        "abrupt_share_of_decrease": ab_net / dec_total if dec_total > 0 else None,
        "net_total": net_total,
        "abrupt_share_of_net": ab_net / net_total if net_total > 0 else None,
        "n_learned": n_learned,
        "frac_abrupt_among_learned": float(np.count_nonzero(ab & learned)) / n_learned if n_learned else None,
        "abrupt_by_step": {str(int(s)): int(c) for s, c in zip(st, cnt)},
    }


# --------------------------------------------------------------------------- emergence vs frequency


@dataclasses.dataclass(frozen=True)
class EmergenceFit:
    """OLS of log10 S_k on log10(1/p_k) over the quanta that emerged; theory: slope 1.

    per_quantum: one row per quantum id 0..K-1: quantum, p, n_tokens, emergence_step
    (float steps; NaN unless status == "ok"), first_step (the first checkpoint past the
    threshold, mean_loss only), status ("ok", "no_tokens", "never" = did not emerge by the
    last checkpoint, "before_first" = already below at the first checkpoint).
    slope, intercept, r2: of the fit (None when fewer than 3 quanta emerged; ``reason``
    says so). ci: t-interval of the slope at ``level``; ci_boot: percentile bootstrap over
    quanta.
    """

    method: str
    per_quantum: pd.DataFrame
    n_fit: int
    slope: Optional[float]
    intercept: Optional[float]
    r2: Optional[float]
    ci: Optional[tuple[float, float]]
    ci_boot: Optional[tuple[float, float]]
    level: float
    reason: str = ""

    def metrics(self) -> dict:
        counts = self.per_quantum["status"].value_counts()
        return {
            "method": self.method,
            "n_quanta": int(len(self.per_quantum)),
            "n_fit": self.n_fit,
            "status_counts": {str(k): int(v) for k, v in counts.items()},
            "slope": self.slope,
            "slope_ci": list(self.ci) if self.ci else None,
            "slope_ci_boot": list(self.ci_boot) if self.ci_boot else None,
            "intercept": self.intercept,
            "r2": self.r2,
            "level": self.level,
            "predicted_slope": 1.0,
            "reason": self.reason,
        }


def token_quanta(
    doc_id: np.ndarray, pos: np.ndarray, label_doc: np.ndarray, label_pos: np.ndarray, label_quantum: np.ndarray
) -> np.ndarray:
    """(tokens,) int32 quantum of each (doc_id, pos) from a labels table; -1 for unlabelled tokens."""
    ld = np.asarray(label_doc, np.int64)
    lp = np.asarray(label_pos, np.int64)
    lq = np.asarray(label_quantum, np.int64)
    if not (ld.shape == lp.shape == lq.shape):
        raise DynamicsError("labels: doc_id, pos and quantum have different lengths")
    q = np.full(len(doc_id), -1, np.int32)
    if ld.size == 0:
        return q
    # One int64 key per (doc_id, pos), then a binary search of the tokens in the sorted labels.
    encode, _ = key_codec([np.asarray(doc_id, np.int64), ld])
    lk = encode(ld, lp)
    order = np.argsort(lk, kind="stable")
    lk, lq = lk[order], lq[order]
    if np.any(lk[1:] == lk[:-1]):
        raise DynamicsError("labels list a token (doc_id, pos) more than once; rebuild the labels table")
    tk = encode(doc_id, pos)
    j = np.minimum(np.searchsorted(lk, tk), lk.size - 1)
    hit = lk[j] == tk
    q[hit] = lq[j[hit]]
    return q


def _emergence_by_mean_loss(L: np.ndarray, q: np.ndarray, lab: np.ndarray, n_tok: np.ndarray, steps: np.ndarray,
                            u: np.ndarray, cfg: DynamicsConfig, S: np.ndarray, first: np.ndarray,
                            status: np.ndarray) -> None:
    """``emergence: mean_loss``: S_k is where quantum k's mean loss first crosses
    ``emergence_loss``, interpolated in log step between the checkpoints around the crossing.
    Fills S, first (the checkpoint after the crossing) and status in place."""
    K = n_tok.size
    # (K, checkpoints) mean loss of each quantum's tokens at each checkpoint
    mean = np.stack([np.bincount(q[lab], weights=L[lab, c], minlength=K) for c in range(steps.size)], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean /= n_tok[:, None]
    below = mean < cfg.emergence_loss
    c = np.argmax(below, axis=1)
    has = n_tok > 0
    never = has & ~below.any(axis=1)
    early = has & below.any(axis=1) & (c == 0)
    ok = has & ~never & ~early
    status[never], status[early] = "never", "before_first"
    ks = np.flatnonzero(ok)
    ca = c[ks] - 1
    ma, mb = mean[ks, ca], mean[ks, c[ks]]
    f = (ma - cfg.emergence_loss) / (ma - mb)  # ma >= thr > mb
    S[ks] = 10.0 ** (u[ca] + f * (u[c[ks]] - u[ca])) - 1.0
    first[ks] = steps[c[ks]]


def _emergence_by_drops(L: np.ndarray, q: np.ndarray, lab: np.ndarray, n_tok: np.ndarray, steps: np.ndarray,
                        cfg: DynamicsConfig, dyn: Optional[TokenDynamics], S: np.ndarray, status: np.ndarray) -> None:
    """``emergence: median_drop``: S_k is the median drop step of quantum k's tokens that drop
    by at least ``min_drop``. Fills S and status in place."""
    K = n_tok.size
    if dyn is None:
        dyn = token_dynamics(L, steps, dataclasses.replace(cfg, step_lo=None, step_hi=None))
    elif dyn.drop.shape != (L.shape[0],):
        raise DynamicsError("dyn must come from token_dynamics on the same tokens")
    use = lab & (dyn.drop >= cfg.min_drop)
    qs, mids = q[use], dyn.drop_step_mid[use]
    order = np.lexsort((mids, qs))
    qs, mids = qs[order], mids[order]
    starts = np.searchsorted(qs, np.arange(K), side="left")
    ends = np.searchsorted(qs, np.arange(K), side="right")
    n_use = ends - starts
    for k in np.flatnonzero(n_use > 0):  # a loop over quanta (hundreds), not tokens
        S[k] = np.median(mids[starts[k]:ends[k]])
    status[(n_tok > 0) & (n_use == 0)] = "never"


def emergence_vs_frequency(
    losses: np.ndarray,
    steps: Sequence[int],
    quantum: np.ndarray,
    freqs: Sequence[float],
    cfg: DynamicsConfig,
    *,
    dyn: Optional[TokenDynamics] = None,
) -> EmergenceFit:
    """Each quantum's emergence step S_k, and the fit of log10 S_k on log10(1/p_k).

    losses: (tokens, checkpoints) nats, steps ascending; quantum: (tokens,) int quantum
    id (-1 = none), e.g. from :func:`token_quanta`; freqs: (K,) p_k of quantum k (> 0).
    dyn: precomputed :func:`token_dynamics` (``median_drop`` only; computed if absent).
    """
    L = np.asarray(losses)
    q = np.asarray(quantum)
    p = np.asarray(freqs, np.float64)
    steps = np.asarray(steps, np.int64)
    K = p.size
    if L.ndim != 2 or q.shape != (L.shape[0],) or L.shape[1] != steps.size:
        raise DynamicsError(f"losses (tokens, {steps.size}) and quantum (tokens,) do not match: {L.shape}, {q.shape}")
    if K == 0 or np.any(~(p > 0)):
        raise DynamicsError("freqs must hold a positive frequency p_k for every quantum k")
    if q.size and q.max() >= K:
        raise DynamicsError(f"quantum id {int(q.max())} has no frequency (freqs has {K} entries)")
    keep = select_steps(steps, cfg)
    L, steps = L[:, keep], steps[keep]
    u = log_step(steps)
    lab = q >= 0
    n_tok = np.bincount(q[lab], minlength=K)  # (K,)
    status = np.where(n_tok > 0, "ok", "no_tokens").astype(object)
    S = np.full(K, np.nan)
    first = np.full(K, -1, np.int64)

    if cfg.emergence == "mean_loss":
        _emergence_by_mean_loss(L, q, lab, n_tok, steps, u, cfg, S, first, status)
    else:
        _emergence_by_drops(L, q, lab, n_tok, steps, cfg, dyn, S, status)

    table = pd.DataFrame(
        {"quantum": np.arange(K, dtype=np.int32), "p": p, "n_tokens": n_tok, "emergence_step": S,
         "first_step": first, "status": status.astype(str)}
    )
    ok = (status == "ok") & (S > 0)
    n_fit = int(np.count_nonzero(ok))
    base = dict(method=cfg.emergence, per_quantum=table, n_fit=n_fit, level=cfg.level)
    if n_fit < 3:
        return EmergenceFit(
            **base, slope=None, intercept=None, r2=None, ci=None, ci_boot=None,
            reason=f"only {n_fit} quanta emerged within the checkpoints: the slope needs at least 3",
        )
    x = np.log10(1.0 / p[ok])
    y = np.log10(S[ok])
    if np.ptp(x) == 0:
        return EmergenceFit(**base, slope=None, intercept=None, r2=None, ci=None, ci_boot=None,
                            reason="every emerged quantum has the same frequency: no slope")
    # linregress, not fits.ols: it gives the slope's standard error for the t interval, and
    # its sums (np.cov) round differently from ols' in the last bits of the reported slope.
    lr = stats.linregress(x, y)
    tq = stats.t.ppf(0.5 + cfg.level / 2, n_fit - 2)
    ci = (float(lr.slope - tq * lr.stderr), float(lr.slope + tq * lr.stderr))
    rng = np.random.default_rng(cfg.seed)
    idx = rng.integers(0, n_fit, (cfg.n_boot, n_fit))  # (reps, n_fit) quanta resampled
    bs, _ = fits.ols(x[idx], y[idx])
    bs = bs[np.isfinite(bs)]  # a replicate that drew one frequency only has no slope
    qlo = (1 - cfg.level) / 2
    ci_boot = (float(np.quantile(bs, qlo)), float(np.quantile(bs, 1 - qlo))) if bs.size >= 2 else None
    return EmergenceFit(
        **base, slope=float(lr.slope), intercept=float(lr.intercept), r2=float(lr.rvalue**2), ci=ci, ci_boot=ci_boot
    )


# --------------------------------------------------------------------------- one call


@dataclasses.dataclass(frozen=True)
class ModelDynamics:
    """Everything a dynamics stage writes for one model."""

    table: pa.Table  # per-token, see dynamics_table
    metrics: dict  # metrics/dynamics.json (with "emergence" when labels were given)
    dyn: TokenDynamics
    emergence: Optional[EmergenceFit] = None
    quantum_curves: Optional[np.ndarray] = None  # (K, checkpoints) mean loss per planted quantum


def analyze_model(
    ck: Checkpoints,
    cfg: DynamicsConfig,
    *,
    labels: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
    freqs: Optional[Sequence[float]] = None,
) -> ModelDynamics:
    """Per-token dynamics, population numbers and (given labels and p_k) emergence vs frequency.

    ck: from :func:`load_checkpoints`. labels: (doc_id, pos, quantum) arrays of a labels
    table (quantum -1 = none), e.g. cache/planted/labels.parquet; freqs: (K,) p_k.
    """
    a = ck.aligned
    dyn = token_dynamics(a.losses, ck.steps, cfg)
    metrics = {
        "model": ck.model,
        "revisions": list(ck.revisions),
        "n_dropped": a.n_dropped,
        **population_stats(dyn, cfg),
    }
    em = None
    if labels is not None:
        if freqs is None:
            raise DynamicsError("labels were given without quantum frequencies p_k; pass freqs too")
        q = token_quanta(a.doc_id, a.pos, *labels)
        if not np.any(q >= 0):
            raise DynamicsError(
                "no token of the loss tables has a quantum label; were the labels made for this corpus?"
            )
        em = emergence_vs_frequency(a.losses, ck.steps, q, freqs, cfg, dyn=dyn)
        metrics["emergence"] = em.metrics()
    return ModelDynamics(table=dynamics_table(a.doc_id, a.pos, dyn), metrics=metrics, dyn=dyn, emergence=em)


def read_planted(planted_dir: str | Path) -> Optional[tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]]:
    """((doc_id, pos, quantum), p_k) of a planted suite's ground truth, or None when there is none.

    labels.parquet: one row per token, quantum -1 off the rule answers; quanta.parquet:
    quantum id 0..K-1 and its frequency p_k. Both are read through :mod:`pipeline.planted.suite`.
    """
    from pipeline.planted import suite

    d = Path(planted_dir)
    if not suite.has_ground_truth(d) or not (d / suite.QUANTA_FILE).exists():
        return None
    lab = suite.read_labels(d)
    qt = suite.read_quanta(d, columns=["quantum", "frequency"]).sort_values("quantum")
    if not np.array_equal(qt["quantum"].to_numpy(), np.arange(len(qt))):
        raise DynamicsError(f"{d / suite.QUANTA_FILE}: quantum ids must be 0..K-1, one row each; rebuild the planted suite")
    labels = (lab["doc_id"].to_numpy(np.int64), lab["pos"].to_numpy(np.int64), lab["quantum"].to_numpy(np.int64))
    return labels, qt["frequency"].to_numpy(np.float64)


def followed_model(models: Sequence[str], cfg: DynamicsConfig) -> Optional[str]:
    """The model the dynamics stage follows: dynamics.model, else the last (largest) of the suite."""
    return cfg.model or (models[-1] if models else None)


def skip_reason(models: Sequence[str], revisions: Sequence[str], cfg: DynamicsConfig) -> str:
    """Why the dynamics stage has nothing to follow ('' when it has): fewer than two stepN
    revisions in the suite (a one-checkpoint run, e.g. one released model, or a GGUF file)."""
    revs = [r for r in revisions if step_of(r) is not None]
    if len(revs) >= 2:
        return ""
    return (f"training dynamics need at least 2 stepN checkpoints; suite.revisions has {len(revs)} "
            f"({', '.join(revisions) or 'none'}); list more stepN revisions to follow a model over training")


def skipped(model: Optional[str], reason: str) -> ModelDynamics:
    """What the stage writes when :func:`skip_reason` says there is nothing to follow: an empty
    table with the schema (readers and DVC still see a file) and metrics that say why."""
    f32, i64 = np.zeros(0, np.float32), np.zeros(0, np.int64)
    empty = TokenDynamics(drop=f32, start_step=i64, end_step=i64, drop_step=i64, drop_step_mid=np.zeros(0),
                          sharpness=f32, net_decrease=f32, abrupt=np.zeros(0, bool), steps=i64,
                          window_starts=i64, window_ends=i64)
    table = dynamics_table(np.zeros(0, np.int64), np.zeros(0, np.int32), empty)
    return ModelDynamics(table=table, metrics={"model": model, "skipped": reason}, dyn=empty)


def run(
    root: str | Path,
    models: Sequence[str],
    revisions: Sequence[str],
    cfg: DynamicsConfig,
    *,
    planted_dir: Optional[str | Path] = None,
) -> ModelDynamics:
    """The dynamics stage: :func:`analyze_model` of ``cfg.model`` (default: the last of
    ``models``) over its stepN revisions among ``revisions``, with emergence vs frequency
    when ``planted_dir`` holds planted ground truth."""
    model = followed_model(models, cfg)
    if model is None:
        raise DynamicsError("suite.models is empty: no model to follow over training; list one, or set dynamics.model")
    if model not in models:
        raise DynamicsError(f"dynamics.model {model!r} is not in suite.models ({', '.join(models)})")
    revs = [r for r in revisions if step_of(r) is not None]
    _check_count(len(revs), f"model {model!r}: stepN revisions in suite.revisions {list(revisions)}")
    ck = load_checkpoints(root, model, revs)
    truth = read_planted(planted_dir) if planted_dir is not None else None
    if truth is None:
        return analyze_model(ck, cfg)
    labels, freqs = truth
    out = analyze_model(ck, cfg, labels=labels, freqs=freqs)
    # per-quantum mean loss at each checkpoint: the learning curves of the plot
    q = token_quanta(ck.aligned.doc_id, ck.aligned.pos, *labels)
    lab = q >= 0
    K = len(freqs)
    n = np.bincount(q[lab], minlength=K)
    curves = np.stack([np.bincount(q[lab], weights=ck.aligned.losses[lab, c], minlength=K) for c in range(ck.steps.size)], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        curves = curves / n[:, None]  # (K, checkpoints); NaN for a quantum with no tokens
    return dataclasses.replace(out, quantum_curves=curves)
