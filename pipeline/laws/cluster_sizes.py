"""Power laws in cluster sizes: the paper's envelope slope, and a proper discrete MLE beside it.

Why this module exists: the quantization model (Michaud et al. 2023) predicts that
quantum k is used on a fraction p_k ∝ k^-(α+1) of tokens, so if QDG recovers the quanta,
the number of samples in the r-th largest cluster falls as rank^-(α+1). The paper tested
this with ordinary least squares on a log-log rank plot (the "envelope" of sorted sizes
across a sweep of k, ranks 100-1000: slope -1.24 against a predicted -(α_N + 1) = -1.083).
OLS on log-log plots is biased and has no goodness-of-fit test (Clauset, Shalizi & Newman
2009, "Power-law distributions in empirical data", SIAM Review 51:661, hereafter CSN,
§3 and their appendix on regression). So this module provides both:

- the paper's method, reproduced exactly (:func:`envelope_slope`), so its -1.2376 on the
  paper's own labels is a regression test of our plumbing;
- CSN's method on the multiset of cluster sizes of one clustering: discrete power-law MLE
  with xmin chosen by minimising the KS distance over every candidate (:func:`fit_discrete_power_law`),
  a bootstrap CI of the exponent, CSN's semi-parametric bootstrap goodness-of-fit p-value
  (:func:`gof_pvalue`), and likelihood-ratio tests against lognormal and exponential tails
  (:func:`likelihood_ratio_tests`), all in one call by :func:`analyze_cluster_sizes`.

Three exponents, never to be confused (every function says which it takes or returns):

- ``gamma`` (γ): the *pdf* exponent of cluster sizes s, p(s) ∝ s^-γ, i.e. the number of
  clusters that have exactly s samples. This is what an MLE fits. CSN and the ``powerlaw``
  package call it "alpha"; we do not, because of the next one.
- ``alpha`` (α): the quantization model's exponent, p_k ∝ k^-(α+1), and L(N) ∝ N^-α.
- ``rank_exponent`` (b): the Zipf exponent, size of the r-th largest cluster ∝ r^-b. The
  paper's prediction is b = α + 1, and its envelope slope is -b.

They are related by b = 1/(γ - 1) (the CCDF P(S ≥ s) ∝ s^-(γ-1) and rank r ≈ n·P(S ≥ s)
give s ∝ r^-1/(γ-1); Newman 2005, "Power laws, Pareto distributions and Zipf's law"),
so α = b - 1 = (2 - γ)/(γ - 1), and the prediction b = α + 1 is γ = 1 + 1/(α + 1) =
(α + 2)/(α + 1). A rank slope of -1.24 is γ ≈ 1.81; α = 0.083 predicts γ ≈ 1.92. (γ < 2:
an unbounded power law has no finite mean, so the largest clusters hold most samples.)

Why our own MLE rather than ``powerlaw.Fit`` (Alstott, Bullmore & Plenz 2014; installed:
2.0.0, whose source we read). Its 2.0 xmin scan does visit every unique value (there is no
``test_all_xmin`` switch any more), but for our use it has pitfalls, each checked in
tests/test_powerlaw.py:

1. ``Power_Law.DEFAULT_PARAMETER_RANGES`` is alpha in (0, 3) and ``find_xmin`` silently
   treats every candidate xmin whose exponent reaches the edge as invalid, so a steep
   tail (γ > 3) is never found: it comes back pinned at 3 (γ = 3.5 data: 3.0), or at
   another xmin, with a warning that verbose=0 hides.
2. For discrete data with xmin >= 10 it defaults to ``estimate_discrete=True``: CSN's
   approximate formula (CSN §3), not the exact MLE, unless ``estimate_discrete=False``.
3. Its exponent error is ``(alpha - 1)/sqrt(n)``, the continuous asymptotic formula, for
   discrete data too (CSN §3 give the discrete one, used here).
4. It has no goodness-of-fit test; CSN's bootstrap p-value is written here.
5. ``Fit.distribution_compare`` reads ``if (d1 in d2) or (d2 in d1) and nested is None``;
   ``and`` binds tighter than ``or``, so for ('power_law', 'truncated_power_law') it sets
   nested=True even when the caller passes nested=False. Still present in 2.0.0. We never
   call it: :func:`likelihood_ratio_tests` computes the ratio from per-point
   log-likelihoods, with nesting taken from an explicit table, not from name substrings.
6. Its exponential fit is flagged as "noise" whenever Lambda < 0.01 (a near-boundary test
   with a fixed eps), which is any exponential of mean size > 100; we fit the discrete
   exponential in closed form instead.
7. ``discrete_normalization='sum'`` normalises a discrete pmf over [xmin, max(data)] only,
   which inflates the likelihood of the alternative; we use the default 'round'.

We do use it for the lognormal and truncated power-law alternatives (its 'round' discrete
lognormal and its Lerch-phi-normalised discrete truncated power law are sound pmfs, and
the field knows them). The package is imported lazily: it pulls in matplotlib.

A third fit reads the sizes as ranked counts (:func:`fit_rank_mle`): the multinomial MLE of
a finite Zipf law p_r ∝ r^-b over the ranks 1..K of the K clusters. It asks what the
quantization model states (the r-th most used quantum has weight ∝ r^-(α+1)) rather than
what the size distribution's tail looks like, and it uses every cluster, not only the ones
above xmin. With tens of clusters, which is what a planted suite or a small QDG run has,
it is the one of the three that is unbiased: on multinomial draws of 4,000 samples over
50-88 Zipf quanta with b = 1.5, CSN's tail MLE is off by -0.10 to -0.12 (sd 0.07-0.09), OLS
on the rank plot by +0.06 to +0.09, the rank MLE by under 0.01 (sd 0.015); see
docs/cluster-size-estimators.md and ``python bench/bench_size_estimators.py``.

Our MLE itself is vectorised over all candidate xmin at once (golden-section search on the
convex negative log-likelihood log ζ(γ, xmin) + γ·mean(log s)), so one full CSN fit on a few
hundred clusters takes milliseconds, and a 1000-replicate bootstrap seconds.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import special, stats

from pipeline.core import execution
from pipeline.core.errors import QuantaError

# NOTE: this file is pipeline/laws/cluster_sizes.py; `import powerlaw` inside it resolves to the
# installed package (absolute imports), as long as pipeline/ itself is not on sys.path.

GAMMA_MAX = 50.0  # upper end of the exponent search; an MLE this steep means "no tail"
_GAMMA_MIN = 1.0 + 1e-9  # ζ(γ, xmin) diverges at γ = 1: a discrete power law needs γ > 1
MIN_CLUSTERS = 10  # fewer cluster sizes than this: refuse to fit (CSN warn below ~50)

# Alternatives for the likelihood-ratio test, and whether each nests the power law.
# Explicit, because powerlaw's name-substring rule is both fragile and buggy (pitfall 5).
NESTED = {"lognormal": False, "exponential": False, "truncated_power_law": True}


# --------------------------------------------------------------------------- exponents


def rank_exponent_from_gamma(gamma: float) -> float:
    """Zipf exponent b (size ∝ rank^-b) from the pdf exponent γ (p(s) ∝ s^-γ): b = 1/(γ-1)."""
    if not gamma > 1:
        raise QuantaError(f"pdf exponent gamma={gamma} must be > 1 to have a rank exponent")
    return 1.0 / (gamma - 1.0)


def gamma_from_rank_exponent(b: float) -> float:
    """pdf exponent γ (p(s) ∝ s^-γ) from the Zipf exponent b (size ∝ rank^-b): γ = 1 + 1/b."""
    if not b > 0:
        raise QuantaError(f"rank exponent b={b} must be > 0 (sizes must fall with rank)")
    return 1.0 + 1.0 / b


def predicted_rank_exponent(alpha: float) -> float:
    """The paper's prediction for the Zipf exponent of cluster sizes: b = α + 1.

    α is the quantization model's exponent (p_k ∝ k^-(α+1), L(N) ∝ N^-α), so cluster
    sizes ∝ rank^-(α+1) if clusters are quanta (Michaud et al. 2023, "The Quantization
    Model of Neural Scaling").
    """
    return alpha + 1.0


def alpha_from_gamma(gamma: float) -> float:
    """The quantization exponent α implied by a pdf exponent γ: α = 1/(γ-1) - 1."""
    return rank_exponent_from_gamma(gamma) - 1.0


# --------------------------------------------------------------------------- sizes, ranks


def cluster_sizes(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Number of samples in each non-empty cluster, (n_clusters,) int64, unsorted.

    Negative labels mean "unassigned" (as in sklearn's DBSCAN) and are not counted.
    """
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.size == 0:
        raise QuantaError(f"cluster labels must be a non-empty 1-d array, got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise QuantaError(f"cluster labels must be integers, got dtype {lab.dtype}")
    counts = np.bincount(lab[lab >= 0])
    return counts[counts > 0].astype(np.int64)


def rank_frequency(sizes: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ranks, sizes) with sizes sorted descending and ranks 1-indexed (rank 1 = largest)."""
    s = np.sort(np.asarray(sizes, dtype=np.int64))[::-1]
    return np.arange(1, s.size + 1), s


def size_envelope(labels_by_k: Mapping[int, Sequence[int] | np.ndarray]) -> np.ndarray:
    """The paper's envelope: the largest cluster size at each rank across a sweep of k.

    ``labels_by_k`` maps k to the labels of one clustering. Each k's sizes are sorted
    descending; entry r-1 of the result is the max over k of the r-th largest size
    (ranks 1-indexed), over as many ranks as the largest clustering has clusters.
    """
    if not labels_by_k:
        raise QuantaError("size_envelope needs at least one clustering (labels_by_k is empty)")
    sorted_sizes = [rank_frequency(cluster_sizes(lab))[1] for lab in labels_by_k.values()]
    env = np.zeros(max(s.size for s in sorted_sizes), dtype=np.int64)
    for s in sorted_sizes:
        env[: s.size] = np.maximum(env[: s.size], s)
    return env


@dataclasses.dataclass(frozen=True)
class EnvelopeFit:
    """OLS of ln(size) on ln(rank) over ranks [rank_lo, rank_hi] (1-indexed, inclusive).

    ``slope`` is -b, minus the Zipf exponent (size ∝ rank^slope); ``slope_se`` is OLS's
    standard error, which assumes independent residuals and is far too small for an
    envelope (neighbouring ranks are strongly correlated): report it, do not trust it.
    """

    slope: float
    intercept: float  # ln(size) at rank 1 on the fitted line
    slope_se: float
    r2: float
    rank_lo: int
    rank_hi: int
    n_points: int

    @property
    def rank_exponent(self) -> float:
        """b = -slope."""
        return -self.slope

    @property
    def gamma(self) -> float:
        """The pdf exponent this slope implies, γ = 1 + 1/b (see the module docstring)."""
        return gamma_from_rank_exponent(self.rank_exponent)


def envelope_slope(
    labels_by_k: Mapping[int, Sequence[int] | np.ndarray], rank_lo: int = 100, rank_hi: int = 1000
) -> EnvelopeFit:
    """The paper's cluster-size exponent: OLS slope of the envelope on log-log axes.

    Ranks are 1-indexed and both ends are included: the defaults fit ranks 100..1000
    (901 points), which reproduces the -1.2376 that the paper's own labels give (ranks
    101..1000, or 0-indexed ranks, give -1.2374 and -1.2337). Returns :class:`EnvelopeFit`.
    """
    env = size_envelope(labels_by_k)
    if not 1 <= rank_lo < rank_hi:
        raise QuantaError(f"envelope ranks need 1 <= rank_lo < rank_hi, got {rank_lo}, {rank_hi}")
    if rank_hi > env.size:
        raise QuantaError(
            f"the envelope has only {env.size} ranks (the largest k), fewer than rank_hi={rank_hi}; "
            f"lower rank_hi (and rank_lo) or add larger k to the sweep"
        )
    ranks = np.arange(rank_lo, rank_hi + 1)
    sizes = env[rank_lo - 1 : rank_hi]
    if np.all(sizes == sizes[0]):
        raise QuantaError(
            f"the envelope is flat (every size is {sizes[0]}) over ranks {rank_lo}..{rank_hi}: "
            "no slope to fit; choose a rank window where sizes still fall"
        )
    # linregress, not fits.ols: it gives the slope's standard error and r, and its sums
    # (np.cov) round differently from ols' in the last bits of the reported slope.
    res = stats.linregress(np.log(ranks), np.log(sizes))
    return EnvelopeFit(
        slope=float(res.slope),
        intercept=float(res.intercept),
        slope_se=float(res.stderr),
        r2=float(res.rvalue**2),
        rank_lo=rank_lo,
        rank_hi=rank_hi,
        n_points=int(ranks.size),
    )


# --------------------------------------------------------------------------- discrete MLE


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """A discrete power law p(s) = s^-γ / ζ(γ, xmin) for s >= xmin, fitted as CSN do.

    What it is fit on: a multiset of positive integers, here the sizes of the clusters of
    ONE clustering (one observation per cluster), treated as independent draws. The MLE
    uses only the tail s >= xmin (n_tail of the n values); xmin minimises the KS distance.
    The sizes of an envelope across k are not independent draws (each rank is a max over
    clusterings), so fit a single k's sizes, not the envelope.

    When ``fittable`` is False (e.g. all sizes equal: no tail has two distinct values, so
    the MLE is γ = ∞), ``reason`` says why and the numeric fields are None, never NaN.
    """

    fittable: bool
    reason: str  # "" when fittable
    n: int  # number of sizes given
    gamma: Optional[float] = None  # pdf exponent, p(s) ∝ s^-γ
    xmin: Optional[int] = None
    n_tail: Optional[int] = None  # sizes >= xmin, the ones the MLE uses
    ks_distance: Optional[float] = None  # sup |S_data - P_fit| over the tail
    loglik: Optional[float] = None  # nats, summed over the tail
    gamma_se: Optional[float] = None  # asymptotic (Fisher) s.e. at fixed xmin (CSN §3)
    xmin_fixed: bool = False  # True: xmin was given, not scanned (bootstraps then keep it)

    @property
    def rank_exponent(self) -> Optional[float]:
        """Zipf exponent b = 1/(γ-1) of the fitted tail (size ∝ rank^-b)."""
        return None if self.gamma is None else rank_exponent_from_gamma(self.gamma)


def _as_sizes(sizes: Sequence[int] | np.ndarray, min_n: int) -> np.ndarray:
    """Validated positive integer sizes as float64 (n,)."""
    x = np.asarray(sizes)
    if x.ndim != 1:
        raise QuantaError(f"cluster sizes must be a 1-d array, got shape {x.shape}")
    if x.size and not np.all(np.isfinite(x)):
        raise QuantaError("cluster sizes contain NaN or inf")
    if x.size and (np.any(x != np.round(x)) or np.any(x < 1)):
        raise QuantaError("cluster sizes must be positive integers (a discrete power law has s >= 1)")
    if x.size < min_n:
        raise QuantaError(
            f"only {x.size} cluster sizes; a power-law fit needs at least {min_n} "
            f"(CSN advise >= 50 in the tail): cluster with a larger k, or more samples"
        )
    return x.astype(np.float64)


def _log_zeta(g: np.ndarray | float, q: np.ndarray | float) -> np.ndarray:
    """ln ζ(γ, q), the Hurwitz zeta Σ_{k>=0} (k+q)^-γ: the discrete power law's normaliser."""
    return np.log(special.zeta(g, q))


def _mle_gamma(xmins: np.ndarray, mean_log: np.ndarray) -> np.ndarray:
    """Exact discrete MLE of γ for each (xmin, mean ln s of its tail), vectorised.

    Minimises f(γ) = ln ζ(γ, xmin) + γ·mean_log, the per-point negative log-likelihood.
    ln ζ is convex in γ (log of a sum of exponentials), so f is convex and golden-section
    search on [1, GAMMA_MAX] finds the minimum; 64 steps shrink the bracket to ~1e-12.
    We avoid scipy's minimize_scalar here only for speed: one vector search replaces a
    Python-level optimiser call per candidate xmin (hundreds per fit, times the bootstrap).
    """
    invphi = (math.sqrt(5.0) - 1.0) / 2.0
    lo = np.full(xmins.shape, _GAMMA_MIN)
    hi = np.full(xmins.shape, GAMMA_MAX)
    c = hi - invphi * (hi - lo)
    d = lo + invphi * (hi - lo)
    fc = _log_zeta(c, xmins) + c * mean_log
    fd = _log_zeta(d, xmins) + d * mean_log
    for _ in range(64):
        left = fc < fd  # minimum lies in [lo, d]
        hi = np.where(left, d, hi)
        lo = np.where(left, lo, c)
        c_new = hi - invphi * (hi - lo)
        d_new = lo + invphi * (hi - lo)
        # Golden section reuses one interior point; recomputing both keeps the vector code
        # simple at the cost of 2x zeta calls, which are cheap.
        c, d = c_new, d_new
        fc = _log_zeta(c, xmins) + c * mean_log
        fd = _log_zeta(d, xmins) + d * mean_log
    return (lo + hi) / 2.0


def _ks_distance(gamma: float, xmin: float, uniq: np.ndarray, counts: np.ndarray) -> float:
    """KS distance between the tail's empirical CDF and the fitted discrete power law.

    ``uniq`` are the distinct tail values (ascending, uniq[0] = xmin) with ``counts``.
    Both CDFs are step functions; the empirical one is flat between data values while the
    model's still climbs at every integer, so the supremum over all s is attained at a
    data value u_j or just before the next one (u_{j+1} - 1). Checking only the data
    values, as a continuous KS does, would miss gaps in sparse tails.
    """
    log_z0 = _log_zeta(gamma, xmin)
    emp = np.cumsum(counts) / counts.sum()  # S(u_j) = P_data(s <= u_j)
    # Model CDF P(s <= u) = 1 - ζ(γ, u+1)/ζ(γ, xmin).
    at = 1.0 - np.exp(_log_zeta(gamma, uniq + 1.0) - log_z0)
    before_next = 1.0 - np.exp(_log_zeta(gamma, uniq[1:]) - log_z0)  # P(s <= u_{j+1} - 1)
    d = np.abs(emp - at).max()
    if before_next.size:
        d = max(d, np.abs(emp[:-1] - before_next).max())
    return float(d)


def _fisher_se(gamma: float, xmin: float, n_tail: int) -> float:
    """Asymptotic s.e. of the discrete MLE at fixed xmin (CSN §3).

    Var(γ) = 1 / (n_tail · d²/dγ² ln ζ(γ, xmin)); the second derivative by a central
    difference (ln ζ is smooth; h = 1e-3 gives ~1e-6 relative error). This ignores the
    uncertainty of xmin itself; the bootstrap CI includes it.
    """
    h = 1e-3
    g = np.array([gamma - h, gamma, gamma + h])
    if g[0] <= 1.0:
        g = g - g[0] + _GAMMA_MIN + 1e-6
    f = _log_zeta(g, xmin)
    d2 = (f[0] - 2.0 * f[1] + f[2]) / (h * h)
    return float(1.0 / math.sqrt(n_tail * d2)) if d2 > 0 else float("inf")


def _fit_sorted(
    x: np.ndarray, min_tail: int, xmin: Optional[float] = None
) -> tuple[Optional[tuple[float, float, int, float]], str]:
    """Core CSN fit on validated sizes; returns ((γ, xmin, n_tail, D), "") or (None, reason)."""
    uniq, counts = np.unique(x, return_counts=True)
    if uniq.size < 2:
        return None, (
            f"all {x.size} cluster sizes are equal ({int(uniq[0])}): no tail with two distinct "
            "values, so the power-law MLE is infinite (the clustering is balanced, not heavy-tailed)"
        )
    # Tail sums for every candidate start j: n_tail(j) and Σ ln s over s >= uniq[j].
    n_tail = np.cumsum(counts[::-1])[::-1]
    sum_log = np.cumsum((counts * np.log(uniq))[::-1])[::-1]
    if xmin is None:
        # CSN: every distinct value is a candidate xmin, except the largest (a tail of one
        # value has an infinite MLE); we also drop tails with fewer than min_tail points.
        cand = np.nonzero((np.arange(uniq.size) < uniq.size - 1) & (n_tail >= min_tail))[0]
        if cand.size == 0:
            return None, (
                f"no candidate xmin leaves >= {min_tail} sizes with two distinct values "
                f"({x.size} sizes, {uniq.size} distinct): lower min_tail or use more clusters"
            )
    else:
        j = np.searchsorted(uniq, xmin)
        if j >= uniq.size - 1:
            return None, f"fewer than two distinct sizes >= xmin={xmin}: nothing to fit"
        cand = np.array([j])
        if uniq[j] != xmin:
            # A fixed xmin that is not a data value: the tail starts at xmin regardless.
            uniq = np.concatenate([uniq[:j], [float(xmin)], uniq[j:]])
            counts = np.concatenate([counts[:j], [0], counts[j:]])
            n_tail = np.cumsum(counts[::-1])[::-1]
            sum_log = np.cumsum((counts * np.log(uniq))[::-1])[::-1]
    gammas = _mle_gamma(uniq[cand], sum_log[cand] / n_tail[cand])
    ds = np.array([_ks_distance(g, uniq[j], uniq[j:], counts[j:]) for g, j in zip(gammas, cand)])
    # Estimates at the search bound mean "no power-law tail here" (e.g. almost all mass at
    # xmin); they cannot be the answer.
    ok = gammas < GAMMA_MAX - 1e-6
    if not ok.any():
        return None, f"every candidate xmin gives gamma at the search bound {GAMMA_MAX}: no power-law tail"
    best = int(np.argmin(np.where(ok, ds, np.inf)))  # ties: the smallest xmin (first)
    j = cand[best]
    return (float(gammas[best]), float(uniq[j]), int(n_tail[j]), float(ds[best])), ""


def fit_discrete_power_law(
    sizes: Sequence[int] | np.ndarray,
    *,
    xmin: Optional[int] = None,
    min_tail: int = 10,
    min_n: int = MIN_CLUSTERS,
) -> PowerLawFit:
    """CSN's discrete power-law fit of cluster sizes: exact MLE, xmin by minimum KS distance.

    sizes: positive integers (samples per cluster), one per cluster of one clustering.
    xmin: fix the lower cutoff instead of scanning (then no KS selection happens). Use
      xmin = 1 to test "all cluster sizes follow one power law": the KS scan otherwise
      finds the tail that looks most like a power law, and a short far tail of almost any
      light-tailed distribution passes (CSN §4 discuss the power of the test).
    min_tail: skip candidate xmin that leave fewer sizes than this in the tail. CSN scan
      every distinct value; with a handful of points in the tail the KS distance is noise
      and a "best" xmin there is spurious, so we default to 10 (min_tail=2 is CSN's scan).
    min_n: fewer sizes than this raise :class:`QuantaError`.

    Returns :class:`PowerLawFit` (γ is the pdf exponent, p(s) ∝ s^-γ); all sizes equal
    gives ``fittable=False`` with the reason.
    """
    x = _as_sizes(sizes, min_n)
    res, reason = _fit_sorted(x, min_tail, None if xmin is None else float(xmin))
    if res is None:
        return PowerLawFit(fittable=False, reason=reason, n=int(x.size), xmin_fixed=xmin is not None)
    gamma, xm, n_tail, d = res
    tail = x[x >= xm]
    loglik = float(-n_tail * _log_zeta(gamma, xm) - gamma * np.log(tail).sum())
    return PowerLawFit(
        fittable=True,
        reason="",
        n=int(x.size),
        gamma=gamma,
        xmin=int(xm),
        n_tail=n_tail,
        ks_distance=d,
        loglik=loglik,
        gamma_se=_fisher_se(gamma, xm, n_tail),
        xmin_fixed=xmin is not None,
    )


# --------------------------------------------------------------------------- sampling


class DiscretePowerLawSampler:
    """Draws from p(s) = s^-γ / ζ(γ, xmin), s >= xmin integer, by inverting the CCDF.

    Exact inversion against a table of P(S >= s) = ζ(γ, s)/ζ(γ, xmin) up to ``s_table``;
    the rare draws beyond it use CSN's continuous approximation (their Appendix D,
    s = floor((xmin - 1/2)·u^(-1/(γ-1)) + 1/2)), whose error is negligible that far out.
    Build once and reuse: the bootstrap draws thousands of samples from one fit.
    """

    def __init__(self, gamma: float, xmin: int, s_table: Optional[int] = None):
        if not gamma > 1 or xmin < 1:
            raise QuantaError(f"a discrete power law needs gamma > 1 and xmin >= 1, got {gamma}, {xmin}")
        self.gamma, self.xmin = float(gamma), int(xmin)
        s_table = s_table or max(100_000, 1000 * self.xmin)
        s = np.arange(self.xmin, s_table + 2, dtype=np.float64)
        ccdf = np.exp(_log_zeta(self.gamma, s) - _log_zeta(self.gamma, float(self.xmin)))
        self._ccdf_rev = ccdf[::-1].copy()  # ascending, for searchsorted
        self._ccdf_last = ccdf[-1]  # P(S >= s_table + 1)
        self._s_table = s_table

    def sample(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """(size,) int64 draws."""
        u = 1.0 - rng.random(size)  # in (0, 1]
        # s = max{s : P(S >= s) >= u}: the count of table entries >= u, minus one, past xmin.
        n_ge = self._ccdf_rev.size - np.searchsorted(self._ccdf_rev, u, side="left")
        out = self.xmin + n_ge - 1
        far = u < self._ccdf_last
        if far.any():
            approx = np.floor((self.xmin - 0.5) * u[far] ** (-1.0 / (self.gamma - 1.0)) + 0.5)
            out = out.astype(np.float64)
            out[far] = np.maximum(approx, self._s_table + 1)
        return np.asarray(out, dtype=np.int64)


# --------------------------------------------------------------------------- bootstrap


@dataclasses.dataclass(frozen=True)
class GofResult:
    """CSN's semi-parametric bootstrap goodness-of-fit test (CSN §4.1).

    ``p`` is the fraction of synthetic data sets (power law above xmin, the data's own
    values below it, each refitted with the full xmin scan) whose KS distance is at least
    the data's. CSN rule: p <= 0.1 rules the power law out; a high p does not prove it.
    The Monte-Carlo error of p is about sqrt(p(1-p)/n_boot) (CSN use n_boot = 2500 for ±0.01).
    """

    p: float
    ks_distance: float
    n_boot: int  # replicates that were fittable and counted
    n_failed: int  # replicates that could not be fitted (not counted)
    seed: int


def gof_pvalue(
    sizes: Sequence[int] | np.ndarray,
    fit: Optional[PowerLawFit] = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    min_tail: int = 10,
    min_n: int = MIN_CLUSTERS,
) -> GofResult:
    """CSN's bootstrap p-value of the power-law hypothesis for these sizes (see :class:`GofResult`).

    Each replicate has n values: each, independently with probability n_tail/n, is drawn
    from the fitted discrete power law (s >= xmin), otherwise uniformly from the observed
    sizes below xmin; then the replicate is refitted the way ``fit`` was (with the xmin
    scan, or at its fixed xmin) and its KS distance recorded. Seeded (numpy
    default_rng(seed)); same inputs, same p.
    """
    x = _as_sizes(sizes, min_n)
    if fit is None:
        fit = fit_discrete_power_law(x, min_tail=min_tail, min_n=min_n)
    if not fit.fittable:
        raise QuantaError(f"no goodness-of-fit test for an unfittable power law: {fit.reason}")
    if n_boot < 1:
        raise QuantaError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    sampler = DiscretePowerLawSampler(fit.gamma, fit.xmin)
    below = x[x < fit.xmin]
    p_tail = fit.n_tail / fit.n
    n = int(x.size)
    ds, failed = [], 0
    fixed = float(fit.xmin) if fit.xmin_fixed else None
    for _ in range(n_boot):
        if below.size:
            n_t = int(rng.binomial(n, p_tail))
            synth = np.concatenate([sampler.sample(n_t, rng), rng.choice(below, n - n_t)])
        else:
            synth = sampler.sample(n, rng)
        res, _ = _fit_sorted(synth.astype(np.float64), min_tail, fixed)
        if res is None:
            failed += 1
            continue
        ds.append(res[3])
    if not ds:
        raise QuantaError(f"all {n_boot} bootstrap replicates were unfittable; the fit cannot be tested")
    ds = np.asarray(ds)
    return GofResult(
        p=float(np.mean(ds >= fit.ks_distance)),
        ks_distance=float(fit.ks_distance),
        n_boot=int(ds.size),
        n_failed=failed,
        seed=seed,
    )


def bootstrap_gamma_ci(
    sizes: Sequence[int] | np.ndarray,
    *,
    xmin: Optional[int] = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    min_tail: int = 10,
    min_n: int = MIN_CLUSTERS,
) -> tuple[float, float, int]:
    """Percentile bootstrap CI of γ (pdf exponent): (lo, hi, n_used).

    Nonparametric: resample the cluster sizes with replacement and refit with the full
    xmin scan each time, so the interval includes the uncertainty of xmin, which the
    asymptotic ``PowerLawFit.gamma_se`` does not (CSN §3 recommend this bootstrap).
    With ``xmin`` given, every refit uses that xmin instead.
    """
    x = _as_sizes(sizes, min_n)
    if not 0 < level < 1:
        raise QuantaError(f"CI level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    gs = []
    for _ in range(n_boot):
        res, _ = _fit_sorted(rng.choice(x, x.size), min_tail, None if xmin is None else float(xmin))
        if res is not None:
            gs.append(res[0])
    if len(gs) < max(10, n_boot // 2):
        raise QuantaError(
            f"only {len(gs)} of {n_boot} bootstrap resamples were fittable: no CI; the sizes "
            "are too few or too uniform for a power-law exponent"
        )
    q = (1.0 - level) / 2.0
    lo, hi = np.quantile(gs, [q, 1.0 - q])
    return float(lo), float(hi), len(gs)


# --------------------------------------------------------------------------- likelihood ratios


@dataclasses.dataclass(frozen=True)
class LikelihoodRatio:
    """Power law against one alternative on the same tail s >= xmin (CSN §5).

    ``R`` = Σ ln p_powerlaw(s) - Σ ln p_alt(s) in nats: > 0 favours the power law.
    ``R_normalized`` = R / (σ·sqrt(n_tail)), σ the s.d. of the pointwise differences
    (Vuong's statistic, ~N(0,1) under "equally good"). ``p`` is Vuong's two-sided
    p = erfc(|R_normalized|/sqrt 2) for non-nested alternatives, and Wilks'
    chi²(1) p of 2|R| for a nested one (truncated power law). ``favored`` is the
    alternative's name, "power_law", or "neither" when p > threshold (CSN use 0.1).
    """

    alternative: str
    R: float
    R_normalized: float
    p: float
    nested: bool
    favored: str
    alt_params: dict
    alt_fit_ok: bool  # False if the alternative's parameters left their range or gave inf


def _discrete_exponential(tail: np.ndarray, xmin: float) -> tuple[np.ndarray, dict, bool]:
    """Per-point log pmf of the discrete exponential p(s) = (1-e^-λ) e^-λ(s-xmin), s >= xmin.

    Closed-form MLE: s - xmin is geometric, so λ = ln(1 + 1/mean(s - xmin)) (exact; written
    here because powerlaw's numerical fit flags λ < 0.01 as noise, pitfall 6).
    """
    m = float(np.mean(tail - xmin))
    if m <= 0:
        return np.full(tail.shape, 0.0), {"Lambda": float("inf")}, False
    lam = math.log1p(1.0 / m)
    return np.log(-np.expm1(-lam)) - lam * (tail - xmin), {"Lambda": lam}, True


def _powerlaw_pkg_alternative(tail: np.ndarray, xmin: float, name: str) -> tuple[np.ndarray, dict, bool]:
    """Per-point log pmf of an alternative fitted by the ``powerlaw`` package at fixed xmin."""
    import powerlaw as plpkg  # lazy: it imports matplotlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns per optimiser step; we check the result below
        pf = plpkg.Fit(
            np.sort(tail),
            discrete=True,
            xmin=xmin,
            estimate_discrete=False,
            discrete_normalization="round",  # not 'sum' (pitfall 7)
            # Widen the exponent range of the truncated power law (default (0, 3)).
            parameter_ranges={"alpha": [0.0, GAMMA_MAX]},
            verbose=0,
        )
        dist = getattr(pf, name)
        ll = np.asarray(dist.loglikelihoods(pf.data), dtype=np.float64)
    params = {k: float(getattr(dist, k)) for k in dist.parameter_names}
    # Not dist.noise_flag: it also fires when a parameter is within 0.01 of a range end,
    # i.e. for every Lambda < 0.01 (pitfall 6), which says nothing about the fit.
    ok = bool(dist.in_range()) and bool(np.all(np.isfinite(ll)))
    return ll, params, ok


def likelihood_ratio_tests(
    sizes: Sequence[int] | np.ndarray,
    fit: PowerLawFit,
    alternatives: Sequence[str] = ("lognormal", "exponential"),
    *,
    threshold: float = 0.1,
) -> dict[str, LikelihoodRatio]:
    """Vuong / Wilks likelihood-ratio tests of the fitted power law against alternatives.

    Every alternative is fitted by MLE to the same tail (s >= fit.xmin) as a discrete
    distribution; see :class:`LikelihoodRatio` for the statistics. Alternatives:
    "lognormal", "exponential", "truncated_power_law" (nested; slow, it uses mpmath).
    """
    if not fit.fittable:
        raise QuantaError(f"no likelihood-ratio test for an unfittable power law: {fit.reason}")
    x = np.asarray(sizes, dtype=np.float64)
    tail = np.sort(x[x >= fit.xmin])
    ll_pl = -fit.gamma * np.log(tail) - _log_zeta(fit.gamma, float(fit.xmin))
    out: dict[str, LikelihoodRatio] = {}
    for name in alternatives:
        if name not in NESTED:
            raise QuantaError(f"unknown alternative {name!r}; choose from {sorted(NESTED)}")
        if name == "exponential":
            ll_alt, params, ok = _discrete_exponential(tail, float(fit.xmin))
        else:
            ll_alt, params, ok = _powerlaw_pkg_alternative(tail, float(fit.xmin), name)
        diff = ll_pl - ll_alt  # (n_tail,) nats
        R = float(diff.sum())
        sd = float(diff.std())  # population s.d., as Vuong (1989) and CSN §5
        n = diff.size
        R_norm = R / (sd * math.sqrt(n)) if sd > 0 else 0.0
        if NESTED[name]:
            p = float(stats.chi2.sf(2.0 * abs(R), df=1))
        else:
            p = float(special.erfc(abs(R_norm) / math.sqrt(2.0))) if sd > 0 else 1.0
        favored = "neither" if p > threshold else ("power_law" if R > 0 else name)
        out[name] = LikelihoodRatio(
            alternative=name,
            R=R,
            R_normalized=float(R_norm),
            p=p,
            nested=NESTED[name],
            favored=favored,
            alt_params=params,
            alt_fit_ok=ok,
        )
    return out


# --------------------------------------------------------------------------- ranked counts


def _rank_nll(b: float, n_sorted: np.ndarray, log_r: np.ndarray) -> float:
    """Negative multinomial log-likelihood of descending counts under p_r = r^-b / Σ r'^-b."""
    w = -b * log_r
    return -float(n_sorted @ (w - np.logaddexp.reduce(w)))


def fit_rank_mle(sizes: Sequence[int] | np.ndarray, b_max: float = 10.0) -> float:
    """Zipf exponent b (size ∝ rank^-b) by maximum likelihood over the ranks of the clusters.

    The K sizes, sorted descending, are read as a multinomial sample of sum(sizes) draws
    from p_r ∝ r^-b, r = 1..K (a finite Zipf law), and b maximises its likelihood. The
    negative log-likelihood is convex in b (a log-partition function minus a linear term),
    so a bounded scalar search finds the optimum. Ranks come from the same counts, so the
    smallest clusters' order is noisy; on Zipf draws of the sizes we fit, that costs
    under 0.01 in b (module docstring). Needs at least two distinct sizes.
    """
    from scipy import optimize

    n = np.sort(_as_sizes(sizes, 2))[::-1].astype(np.float64)
    if n[0] == n[-1]:
        raise QuantaError(f"all {n.size} cluster sizes are {int(n[0])}: no rank exponent to fit")
    log_r = np.log(np.arange(1, n.size + 1, dtype=np.float64))
    res = optimize.minimize_scalar(_rank_nll, bounds=(0.0, b_max), args=(n, log_r), method="bounded",
                                   options={"xatol": 1e-6})
    return float(res.x)


def bootstrap_rank_ci(
    sizes: Sequence[int] | np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile CI of :func:`fit_rank_mle`'s b: the samples resampled with replacement.

    A resample draws sum(sizes) samples over the clusters in proportion to their sizes
    (a cluster can vanish), sorts the counts again and refits.
    """
    n = _as_sizes(sizes, 2)
    rng = np.random.default_rng(seed)
    p = n / n.sum()
    boots = []
    for _ in range(n_boot):
        m = rng.multinomial(int(n.sum()), p)
        m = m[m > 0]
        if m.size >= 2 and m.min() != m.max():
            boots.append(fit_rank_mle(m))
    if len(boots) < max(2, n_boot // 2):
        raise QuantaError(f"only {len(boots)} of {n_boot} resamples had a rank exponent")
    q = (1 - level) / 2
    return float(np.quantile(boots, q)), float(np.quantile(boots, 1 - q))


def rank_mle_metrics(sizes: np.ndarray, cfg) -> dict:
    """The rank MLE's metrics: b, its CI (cfg.n_boot_ci, cfg.level, cfg.seed), α = b - 1; or why not."""
    try:
        b = fit_rank_mle(sizes)
        ci = bootstrap_rank_ci(sizes, cfg.n_boot_ci, cfg.seed, cfg.level) if cfg.n_boot_ci > 0 else None
    except QuantaError as e:
        return {"fittable": False, "reason": str(e), "n": int(np.size(sizes))}
    return {
        "fittable": True, "reason": "", "n": int(np.size(sizes)), "rank_exponent": b,
        "rank_exponent_ci": list(ci) if ci else None, "alpha": b - 1.0,
        "alpha_ci": [ci[0] - 1.0, ci[1] - 1.0] if ci else None, "ci_level": cfg.level, "n_boot_ci": cfg.n_boot_ci,
    }


# --------------------------------------------------------------------------- one call


@dataclasses.dataclass(frozen=True)
class PowerLawReport:
    """Everything CSN ask for about one set of cluster sizes (see :func:`analyze_cluster_sizes`)."""

    fit: PowerLawFit
    gamma_ci: Optional[tuple[float, float]] = None  # percentile bootstrap, pdf exponent
    ci_level: float = 0.95
    n_boot_ci: int = 0
    gof: Optional[GofResult] = None
    lr: dict = dataclasses.field(default_factory=dict)  # name -> LikelihoodRatio

    @property
    def rank_exponent_ci(self) -> Optional[tuple[float, float]]:
        """CI of the Zipf exponent b = 1/(γ-1); b decreases in γ, so the ends swap."""
        if self.gamma_ci is None:
            return None
        return (rank_exponent_from_gamma(self.gamma_ci[1]), rank_exponent_from_gamma(self.gamma_ci[0]))

    def as_dict(self) -> dict:
        """Plain JSON-ready numbers (None where not computed), for metrics files."""
        f = self.fit
        d = {
            "fittable": f.fittable,
            "reason": f.reason,
            "n": f.n,
            "gamma": f.gamma,
            "gamma_se_asymptotic": f.gamma_se,
            "gamma_ci": list(self.gamma_ci) if self.gamma_ci else None,
            "ci_level": self.ci_level,
            "n_boot_ci": self.n_boot_ci,
            "rank_exponent": f.rank_exponent,
            "rank_exponent_ci": list(self.rank_exponent_ci) if self.rank_exponent_ci else None,
            "xmin": f.xmin,
            "xmin_fixed": f.xmin_fixed,
            "n_tail": f.n_tail,
            "ks_distance": f.ks_distance,
            "gof_p": self.gof.p if self.gof else None,
            "n_boot_gof": self.gof.n_boot if self.gof else 0,
        }
        for name, t in self.lr.items():
            d[f"lr_{name}"] = {"R": t.R, "R_normalized": t.R_normalized, "p": t.p, "favored": t.favored}
        return d


def analyze_cluster_sizes(
    sizes: Sequence[int] | np.ndarray,
    *,
    xmin: Optional[int] = None,
    n_boot_ci: int = 1000,
    n_boot_gof: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    min_tail: int = 10,
    min_n: int = MIN_CLUSTERS,
    alternatives: Sequence[str] = ("lognormal", "exponential"),
) -> PowerLawReport:
    """Fit, bootstrap CI, goodness of fit and likelihood-ratio tests for one clustering's sizes.

    sizes: samples per cluster (one value per cluster of ONE clustering, e.g. k = 400).
    xmin: None scans it (CSN); a value fixes it for the fit and both bootstraps.
    n_boot_ci / n_boot_gof: bootstrap replicates (0 skips that part); CSN use 2500 for GOF.
    seed: the CI uses ``seed``, the GOF ``seed + 1``, so the two are independent.
    An unfittable input (all sizes equal) returns the flagged fit and nothing else.
    """
    fit = fit_discrete_power_law(sizes, xmin=xmin, min_tail=min_tail, min_n=min_n)
    if not fit.fittable:
        return PowerLawReport(fit=fit, ci_level=level)
    ci, n_ci = None, 0
    if n_boot_ci > 0:
        lo, hi, n_ci = bootstrap_gamma_ci(
            sizes, xmin=xmin, n_boot=n_boot_ci, seed=seed, level=level, min_tail=min_tail, min_n=min_n
        )
        ci = (lo, hi)
    gof = None
    if n_boot_gof > 0:
        gof = gof_pvalue(sizes, fit, n_boot=n_boot_gof, seed=seed + 1, min_tail=min_tail, min_n=min_n)
    lr = likelihood_ratio_tests(sizes, fit, alternatives) if alternatives else {}
    return PowerLawReport(fit=fit, gamma_ci=ci, ci_level=level, n_boot_ci=n_ci, gof=gof, lr=lr)


# --------------------------------------------------------------------------- the powerlaw stage


def sweep_labels(clusters) -> dict[int, np.ndarray]:
    """k -> labels of every ``k<k>`` column of a clusters table (pandas DataFrame), k ascending;
    the columns are those of :func:`pipeline.qdg.clustering.sweep_columns`."""
    from pipeline.qdg.clustering import sweep_columns

    return {k: clusters[col].to_numpy() for k, col in sorted(sweep_columns(clusters).items())}


def tail_rank_curve(fit: PowerLawFit, s_max: int) -> tuple[np.ndarray, np.ndarray]:
    """(ranks, sizes) of a fitted tail on rank-frequency axes: rank(s) = n_tail·P(S >= s), xmin <= s <= s_max."""
    s = np.unique(np.geomspace(fit.xmin, max(s_max, fit.xmin + 1), 200).round()).astype(np.float64)
    ccdf = np.exp(_log_zeta(fit.gamma, s) - _log_zeta(fit.gamma, float(fit.xmin)))
    return fit.n_tail * ccdf, s


@dataclasses.dataclass(frozen=True)
class ClusterPowerLaw:
    """What the powerlaw stage writes: metrics, and the data of the rank-frequency plot."""

    metrics: dict
    sizes: np.ndarray  # (clusters,) sizes of the fitted clustering, descending
    envelope: Optional[np.ndarray]  # (ranks,) envelope across the sweep
    report: PowerLawReport
    envelope_fit: Optional[EnvelopeFit]

    def tail_curve(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """(ranks, sizes) of the MLE tail on rank-frequency axes, up to the largest cluster;
        None when the sizes were not fittable. The plot reads it here, so that the
        plotting code needs none of this module."""
        f = self.report.fit
        return tail_rank_curve(f, int(self.sizes.max())) if f.fittable else None


def _mle(sizes: np.ndarray, cfg) -> tuple[PowerLawReport, dict]:
    """analyze_cluster_sizes per cfg, and its metrics with the implied α = b - 1."""
    try:
        report = analyze_cluster_sizes(
            sizes, xmin=cfg.xmin, n_boot_ci=cfg.n_boot_ci, n_boot_gof=cfg.n_boot_gof, seed=cfg.seed,
            level=cfg.level, min_tail=cfg.min_tail, alternatives=cfg.alternatives,
        )
    except QuantaError as e:
        # Too few clusters, or a bootstrap with too few fittable resamples: the sizes
        # cannot support an exponent. Reported (fittable: false, the reason), so that the
        # envelope and the rest of the pipeline still run.
        report = PowerLawReport(fit=PowerLawFit(fittable=False, reason=str(e), n=int(sizes.size)), ci_level=cfg.level)
    mle = report.as_dict()
    if report.fit.fittable:
        b_ci = report.rank_exponent_ci
        mle["alpha"] = alpha_from_gamma(report.fit.gamma)
        mle["alpha_ci"] = [b_ci[0] - 1.0, b_ci[1] - 1.0] if b_ci else None
    return report, mle


def analyze_clusters(clusters, cfg, truth: Optional[np.ndarray] = None) -> ClusterPowerLaw:
    """The rank MLE of one clustering's sizes, with CSN's tail MLE of the same sizes and the
    paper's envelope across the k sweep as the reported alternatives.

    clusters: the cluster stage's table (pandas: sample, cluster, k<k> per k; -1 = a bad
    sample, not counted). cfg: :class:`pipeline.core.config.PowerlawConfig`. An envelope the
    sweep cannot support (too few ranks, flat) is reported with its reason, not fitted;
    all sizes equal gives an unfittable MLE with its reason. truth: (samples,) planted
    quantum of each row (-1 = none), planted suite only: adds ``planted_partition``.
    """
    from pipeline.qdg.clustering import sweep_columns

    sweep = sweep_labels(clusters)
    if cfg.k is None:
        if "cluster" not in clusters.columns:
            raise QuantaError("the clusters table has no 'cluster' column; rerun the cluster stage")
        labels = clusters["cluster"].to_numpy()
        # The main clustering's k is its k<k> column, the first one (the cluster stage writes
        # them so; leiden's is the data's k), whatever number of clusters it made. The labels
        # cannot tell it: a cut can make fewer clusters than its k, and two cuts of the sweep
        # the same clusters. Without k<k> columns, its k is the count it made.
        columns = sweep_columns(clusters)
        k = next(iter(columns)) if columns else int(np.unique(labels[labels >= 0]).size)
    else:
        if cfg.k not in sweep:
            raise QuantaError(
                f"powerlaw.k = {cfg.k} is not in the cluster sweep (k = {', '.join(map(str, sweep)) or 'none'}); "
                "add it to cluster.n_clusters or pick one of those"
            )
        k, labels = cfg.k, sweep[cfg.k]
    sizes = cluster_sizes(labels)
    t_sizes = None
    if truth is not None:
        t = np.asarray(truth)
        if t.shape != labels.shape:
            raise QuantaError(f"planted labels ({t.shape}) do not match the clusters table ({labels.shape})")
        t_sizes = cluster_sizes(np.where(labels >= 0, t, -1))
    truth_mle = None
    with execution.process_pool(1 if t_sizes is None else 2) as pool:
        if pool is None:
            report, mle = _mle(sizes, cfg)
            if t_sizes is not None:
                truth_mle = _mle(t_sizes, cfg)[1]
        else:  # the planted partition's fit (two bootstraps) beside the clustering's
            mine, theirs = pool.submit(_mle, sizes, cfg), pool.submit(_mle, t_sizes, cfg)
            (report, mle), truth_mle = mine.result(), theirs.result()[1]
    metrics = {
        "k": k,
        "n_samples": int(np.count_nonzero(labels >= 0)),
        "n_clusters": int(sizes.size),
        "size_max": int(sizes.max()),
        "size_min": int(sizes.min()),
        "mle": mle,
        "rank_mle": rank_mle_metrics(sizes, cfg),
    }
    env, efit = None, None
    if sweep:
        env = size_envelope(sweep)
        hi = cfg.envelope_rank_hi if cfg.envelope_rank_hi is not None else env.size
        try:
            efit = envelope_slope(sweep, cfg.envelope_rank_lo, hi)
        except QuantaError as e:
            metrics["envelope"] = {"skipped": str(e), "sweep": list(sweep)}
        else:
            metrics["envelope"] = {
                "slope": efit.slope, "rank_exponent": efit.rank_exponent, "alpha": efit.rank_exponent - 1.0,
                "slope_se_ols": efit.slope_se, "r2": efit.r2, "rank_lo": efit.rank_lo, "rank_hi": efit.rank_hi,
                "n_points": efit.n_points, "sweep": list(sweep),
            }
    else:
        metrics["envelope"] = {"skipped": "the clusters table has no k<k> columns: no sweep", "sweep": []}
    if truth_mle is not None:
        # The same fit on the planted quanta of the same samples: what a perfect clustering
        # would give, which separates the clustering's error from the fit's.
        tm = truth_mle
        tm["n_quanta"] = tm["n"]
        tm["rank_mle"] = rank_mle_metrics(t_sizes, cfg)
        metrics["planted_partition"] = tm
    return ClusterPowerLaw(
        metrics=metrics, sizes=np.sort(sizes)[::-1], envelope=env, report=report, envelope_fit=efit
    )


def summary_line(metrics: Mapping) -> str:
    """The powerlaw stage's one-line summary of :func:`analyze_clusters`' metrics: the rank
    MLE first (the cluster-size exponent the theory check reads, ``theory.zipf_from``), then
    the reported alternatives, CSN's tail MLE and the paper's envelope."""
    r, m, e = metrics["rank_mle"], metrics["mle"], metrics["envelope"]
    rank = (f"Zipf b = {r['rank_exponent']:.3f} CI {r['rank_exponent_ci']}" if r["fittable"]
            else f"no fit: {r['reason']}")
    csn = (f"b = {m['rank_exponent']:.3f} CI {m['rank_exponent_ci']}, GOF p {m['gof_p']}"
           if m["fittable"] else f"no fit: {m['reason']}")
    env = f"slope {e['slope']:.4f}" if "slope" in e else f"skipped: {e['skipped']}"
    line = (f"powerlaw: k = {metrics['k']}, {metrics['n_clusters']} clusters; rank MLE {rank}; "
            f"alternatives: CSN MLE {csn}; envelope {env}")
    t = metrics.get("planted_partition")
    if t is not None:
        tr = t.get("rank_mle") or {}
        line += (f"; planted quanta of the samples: rank MLE Zipf b = {tr['rank_exponent']:.3f}" if tr.get("fittable")
                 else f"; planted quanta: {tr.get('reason', '')}")
    return line
