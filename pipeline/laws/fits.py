"""Scaling-curve fits: L(x) = E + A·x^-α (and L = A·x^-α), with honest uncertainty.

Why this module exists: the quantization model predicts exponents of mean-loss curves,
α_N = α over model size N and α_S = α/(α+1) over training steps S (Michaud et al. 2023,
"The Quantization Model of Neural Scaling"), so the pipeline needs one careful way to
fit a power law to a loss curve, used by the L(N) and L(S) stages alike. The paper fitted
OLS of log L on log N; that cannot separate a floor E from the power-law part, and says
nothing about uncertainty.

Method (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"
(Chinchilla), §3.3, approach 3): minimise the Huber loss (δ = 1e-3) of the log-residuals
log L_pred(x) - log L_obs(x) with L-BFGS-B from several starting points, and keep the
best. Our starts come from a profile grid over E (see ``_profile_starts``), which puts
L-BFGS-B next to each candidate optimum, plus two fixed far starts. Log residuals weight
every point by its relative error, so the high-loss start of a curve does not dominate;
the Huber loss keeps a few outliers (a loss spike, a bad checkpoint) from steering the fit.
Bounds: 0 <= E < min L_obs (the floor lies below every observation), α in (0, alpha_max].
scipy's minimize is the field's optimiser; we supply the analytic gradient so that
bootstrap refits are cheap.

Uncertainty, two ways:

- :func:`bootstrap_units` (preferred): the input is a matrix of per-unit values,
  (units, x), e.g. per-document mean losses under each model; units (documents) are
  resampled with replacement, the mean curve recomputed and refitted each time
  (percentile CIs). This is the variance a different sample of documents would give.
- :func:`bootstrap_residuals`: when only a mean curve exists (the Pythia learning curves
  in ../shared/data have no per-document values), resample the fit's log-residuals
  (optionally in moving blocks, since residuals along a learning curve are correlated:
  with block=1 the CI is too narrow for a curve whose misfit is systematic). Either
  way it is the uncertainty of fitting one curve, not of training: the four
  pythia-160m seeds give α_S from 0.70 to 0.76, a wider spread than any one curve's
  ±0.02 residual-bootstrap CI.

Units: x is whatever the caller uses (parameters, tokens, steps; must be > 0 in the
window); L in nats (any positive unit works, and α does not depend on it). A is reported
in the caller's units: L_pred(x) = E + A·x^-α. Internally x is rescaled by x0, the
geometric mean of the window, so that A and α are not nearly collinear for the optimiser.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
from scipy import optimize

from pipeline.core.errors import QuantaError

HUBER_DELTA = 1e-3  # Chinchilla's δ, on natural-log residuals
ALPHA_MAX = 10.0  # upper bound of α; an estimate there is reported as not converged
_ALPHA_MIN = 1e-6  # optimiser bound; α must stay > 0 for A·x^-α to decrease
_ALPHA_TINY = 1e-4  # below this a "fit" is noise around a constant (E and A trade off freely)
_A_BOUNDS = (-60.0, 60.0)  # bounds on a = ln(A·x0^-α), the power-law term at x0
N_STARTS = 4  # at most this many profile-grid starts (+2 fixed far ones in point fits; see _profile_starts)


def _single_blas_thread():
    """Context that limits BLAS to one thread (threadpoolctl; a no-op if it is missing).

    Why: scipy's L-BFGS-B makes a few tiny BLAS/LAPACK calls per iteration, and a
    multi-threaded OpenBLAS spends milliseconds waking its threads for each of them: on
    2 busy cores a 3-parameter fit took 136 ms with default threads and 4 ms with one.
    threadpoolctl ships with scikit-learn, a dependency of the project.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - only without scikit-learn's dependency
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


@dataclasses.dataclass(frozen=True)
class ScalingFit:
    """One fit of L(x) = E + A·x^-α (offset=True) or L(x) = A·x^-α (offset=False).

    E: the irreducible loss (asymptote), in L's units; 0.0 for the pure power law.
    A: amplitude in L's units times x's units^α. alpha: the exponent α (> 0), which is
    α_N for L(N) and α_S for L(S) in the paper's notation. loss: mean Huber loss of the
    log-residuals at the optimum (dimensionless). converged: False with ``reason`` when
    the optimiser failed, a parameter sits on a bound that makes it meaningless, or the
    data cannot identify the curve (too few points, flat data); then the numbers are the
    best attempt (or None when no fit was attempted), never silently NaN.
    """

    offset: bool
    E: Optional[float]
    A: Optional[float]
    alpha: Optional[float]
    loss: Optional[float]
    converged: bool
    reason: str  # "" when converged
    n_starts: int
    n_points: int
    x_lo: float  # the window actually used (smallest and largest x fitted)
    x_hi: float
    on_bound: tuple[str, ...] = ()  # parameters at a bound, e.g. ("E",) for E = 0 (allowed)

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        """L_pred(x) = E + A·x^-α, in L's units."""
        if self.A is None:
            raise QuantaError(f"this fit has no parameters ({self.reason})")
        return self.E + self.A * np.asarray(x, dtype=np.float64) ** (-self.alpha)

    @property
    def params(self) -> dict[str, Optional[float]]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha}


def _window(x: np.ndarray, x_lo: Optional[float], x_hi: Optional[float]) -> np.ndarray:
    """Boolean mask of x in [x_lo, x_hi] (inclusive; None = unbounded)."""
    m = np.ones(x.shape, dtype=bool)
    if x_lo is not None:
        m &= x >= x_lo
    if x_hi is not None:
        m &= x <= x_hi
    return m


def _check_curve(x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim != 1 or y.shape != x.shape:
        raise QuantaError(f"x and L must be 1-d arrays of the same length, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise QuantaError("x or L contains NaN or inf; drop those points (or fix the losses) before fitting")
    if np.any(x <= 0):
        raise QuantaError(
            f"x must be > 0 inside the fit window (x^-α is undefined at {x[x <= 0][0]:g}); "
            "set x_lo above it (e.g. skip step 0)"
        )
    if np.any(y <= 0):
        raise QuantaError("L must be > 0 to fit log-residuals; losses in nats are positive")


def _objective(theta: np.ndarray, t: np.ndarray, logy: np.ndarray, offset: bool, delta: float):
    """Huber(log L_pred - log L_obs)/δ² summed over points, and its gradient.

    theta = (E, a, α) (offset) or (a, α); t = ln(x/x0); L_pred = E + exp(a - α t).
    Dividing by δ² makes the objective O(1) per point near the optimum, so L-BFGS-B's
    default-scale tolerances mean something.
    """
    if offset:
        E, a, al = theta
    else:
        E, (a, al) = 0.0, theta
    u = np.exp(a - al * t)  # the power-law term at each x
    pred = E + u
    r = np.log(pred) - logy
    absr = np.abs(r)
    quad = absr <= delta
    h = np.where(quad, 0.5 * r * r, delta * (absr - 0.5 * delta))
    # The same ufunc calls np.clip and np.sum make, without their Python wrappers: this
    # function runs ~100 times per fit and 1000 fits per bootstrap, on a handful of points.
    dh = np.minimum(np.maximum(r, -delta), delta) / pred  # dHuber/dr · dr/dL_pred
    g_a = (dh * u).sum()
    g_al = (dh * (-t) * u).sum()
    s = 1.0 / (delta * delta)
    if offset:
        return h.sum() * s, np.array([dh.sum(), g_a, g_al]) * s
    return h.sum() * s, np.array([g_a, g_al]) * s


def _profile_starts(t, logy, y_min, offset, n_starts, delta, diverse=True) -> list[np.ndarray]:
    """Initial points from a profile grid over E (Chinchilla fitted from a grid of starts).

    For each E on a grid from 0 to just below min(L) (dense near min L, where the floor of
    a learning curve usually is), ln(L - E) = a - α·t is a straight line, so OLS gives
    (a, α) in closed form; the Huber objective then ranks the grid points. The starts are
    the best grid points at the local minima of this profile (one per basin, best first,
    at most n_starts), so L-BFGS-B begins near each candidate optimum: ~15 iterations
    instead of ~150 from a blind start, which is what makes a 1000-replicate bootstrap
    affordable; with ``diverse`` two fixed far starts are added (see below). The pure
    power law is Huber regression on a line (convex): the OLS start plus one more suffice.
    """
    y = np.exp(logy)
    if offset:
        fr = np.concatenate([[0.0], 1.0 - np.geomspace(0.7, 1e-4, 40)])
    else:
        fr = np.zeros(1)
    E = fr * y_min  # (nE,)
    Y = np.log(y[None, :] - E[:, None])  # (nE, n) ln(L - E)
    tc = t - t.mean()
    slope = (Y - Y.mean(axis=1, keepdims=True)) @ tc / (tc @ tc)  # (nE,) OLS slopes = -α
    al = np.clip(-slope, 2 * _ALPHA_MIN, ALPHA_MAX / 2)
    a = np.clip(Y.mean(axis=1) + al * t.mean(), *_A_BOUNDS)
    cand = [np.array([e, ai, ali]) if offset else np.array([ai, ali]) for e, ai, ali in zip(E, a, al)]
    if not offset:
        return [cand[0], np.array([cand[0][0], 1.0])]
    # the objective of every grid point at once (each row as _objective computes it)
    u = np.exp(a[:, None] - al[:, None] * t)  # (nE, n)
    pred = E[:, None] + u
    r = np.log(pred) - logy
    absr = np.abs(r)
    h = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta))
    f = h.sum(axis=1) * (1.0 / (delta * delta))  # (nE,)
    # Local minima of the profile along the E grid (ends included), best first.
    left = np.concatenate([[np.inf], f[:-1]])
    right = np.concatenate([f[1:], [np.inf]])
    minima = np.nonzero((f <= left) & (f <= right))[0]
    minima = list(minima[np.argsort(f[minima])][:n_starts])
    if diverse:
        # Also start from the pure-power-law end (E = 0) and from E = min(L)/2, whatever
        # the profile says: a second opinion from far away costs ~10 ms. Bootstrap
        # replicates skip these (they start at the point fit, which already had them).
        minima += [i for i in (0, int(np.argmin(np.abs(E - 0.5 * y_min)))) if i not in minima]
    return [cand[i] for i in minima]


_LBFGSB_OPTIONS = {"maxiter": 5000, "ftol": 1e-11, "gtol": 1e-7}


def _minimize(t, logy, offset, delta, starts, bounds):
    """Best L-BFGS-B result over the starts (by objective), or None if all were non-finite.

    L-BFGS-B sometimes stops with ABNORMAL_TERMINATION_IN_LNSRCH at a minimum, when the
    line search cannot find a decrease at the limit of float precision. We restart it
    once from there (a fresh memory often finishes cleanly); if it stops again without
    lowering the objective, the point is a minimum to precision and is accepted.
    """
    lo = np.array([b[0] for b in bounds])
    hi = np.array([b[1] for b in bounds])
    best = None
    for th0 in starts:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            res = optimize.minimize(
                _objective, np.clip(th0, lo, hi), args=(t, logy, offset, delta),
                jac=True, method="L-BFGS-B", bounds=bounds, options=_LBFGSB_OPTIONS,
            )
            if not res.success and "ABNORMAL" in str(res.message) and np.isfinite(res.fun):
                again = optimize.minimize(
                    _objective, res.x, args=(t, logy, offset, delta),
                    jac=True, method="L-BFGS-B", bounds=bounds, options=_LBFGSB_OPTIONS,
                )
                if not again.success and again.fun >= res.fun - 1e-9 * max(1.0, abs(res.fun)):
                    again.success = True
                    again.message = f"{res.message} (restarted: no further decrease)"
                res = again
        if not np.isfinite(res.fun):
            continue
        if best is None or res.fun < best.fun:
            best = res
    return best


def _fit_window(
    xw: np.ndarray,
    yw: np.ndarray,
    *,
    offset: bool,
    delta: float,
    alpha_max: float,
    n_starts: int,
    warm: Optional[ScalingFit] = None,
) -> ScalingFit:
    """Fit validated, windowed points; see :func:`fit_curve`. ``warm``: an extra start."""
    n_par = 3 if offset else 2
    base = dict(offset=offset, n_points=int(xw.size), x_lo=float(xw.min()), x_hi=float(xw.max()))
    none = dict(E=None, A=None, alpha=None, loss=None, converged=False, n_starts=0)

    if xw.size < n_par + 1:
        return ScalingFit(**none, **base, reason=(
            f"{xw.size} points for {n_par} parameters: a fit needs at least {n_par + 1} "
            "(one degree of freedom); widen the x window or add models/checkpoints"))
    if np.unique(xw).size < n_par:
        reason = f"only {np.unique(xw).size} distinct x values for {n_par} parameters"
        return ScalingFit(**none, **base, reason=reason)
    logy = np.log(yw)
    if np.ptp(logy) < 1e-12:
        reason = "L is constant over the window: no decrease, so α is not identified"
        return ScalingFit(**none, **base, reason=reason)

    x0 = math.exp(float(np.mean(np.log(xw))))
    t = np.log(xw / x0)  # centred: mean(t) = 0
    y_min = float(yw.min())
    e_hi = y_min * (1.0 - 1e-9)  # E < min L: the floor lies below every observation
    bounds = ([(0.0, e_hi)] if offset else []) + [_A_BOUNDS, (_ALPHA_MIN, alpha_max)]
    starts = _profile_starts(t, logy, y_min, offset, n_starts, delta, diverse=warm is None)
    if warm is not None and warm.A is not None:
        a = math.log(warm.A) - warm.alpha * math.log(x0)  # caller's units -> a = ln(A x0^-α)
        starts.insert(0, np.array([warm.E, a, warm.alpha]) if offset else np.array([a, warm.alpha]))
    res = _minimize(t, logy, offset, delta, starts, bounds)
    if res is None:
        reason = "every start gave a non-finite objective"
        return ScalingFit(**dict(none, n_starts=len(starts)), **base, reason=reason)

    E, a, al = (res.x if offset else (0.0, *res.x))
    A = math.exp(a + al * math.log(x0))  # A·x^-α = e^a·(x/x0)^-α
    loss = float(res.fun * delta * delta / xw.size)  # mean Huber loss per point, unscaled
    on_bound, reasons = [], []
    if offset and E <= 1e-12 * y_min:
        on_bound.append("E")  # a pure power law fits best: allowed, but say so
    if offset and E >= e_hi * (1 - 1e-7):
        on_bound.append("E")
        reasons.append("E reached its bound min(L): the data do not determine an asymptote below them")
    if al >= alpha_max * (1 - 1e-6):
        on_bound.append("alpha")
        reasons.append(f"α reached its upper bound {alpha_max}")
    if al <= _ALPHA_TINY:
        on_bound.append("alpha")
        reasons.append(f"α ≈ 0 (< {_ALPHA_TINY:g}): L does not decrease measurably; α is not identified")
    if a <= _A_BOUNDS[0] + 1e-6 or a >= _A_BOUNDS[1] - 1e-6:
        on_bound.append("A")
        reasons.append("the amplitude A reached its bound")
    # A power-law term that hardly changes over the window leaves α unidentified even when
    # the optimiser is content (e.g. noise around a constant).
    span = math.exp(a) * abs(math.exp(-al * t.min()) - math.exp(-al * t.max()))
    if span < 1e-6 * y_min:
        reasons.append("the fitted A·x^-α term is flat over the window: α is not identified")
    if not res.success:
        reasons.append(f"L-BFGS-B did not converge: {res.message}")
    return ScalingFit(
        E=float(E), A=float(A), alpha=float(al), loss=loss, converged=not reasons,
        reason="; ".join(reasons), n_starts=len(starts), on_bound=tuple(on_bound), **base,
    )


def _windowed(x, L, x_lo, x_hi) -> tuple[np.ndarray, np.ndarray]:
    """Validated (x, L) inside [x_lo, x_hi] (inclusive, None = open), sorted by x."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(L, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise QuantaError(f"x and L must be 1-d arrays of the same length, got {x.shape} and {y.shape}")
    m = _window(x, x_lo, x_hi)
    if not m.any():
        raise QuantaError(
            f"no x inside the window [{x_lo}, {x_hi}] (x spans {x.min():g}..{x.max():g}); widen the window"
        )
    order = np.argsort(x[m], kind="stable")
    xw, yw = x[m][order], y[m][order]
    _check_curve(xw, yw)
    return xw, yw


def ols(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slope, intercept) of the least-squares line of y on x along the last axis; batched
    over leading axes, e.g. (replicates, n) for a bootstrap. A constant x gives NaN.

    The straight-line fit of the pipeline: the log-log slopes of the planted scorecard
    (answer-token loss against N, learned count against N, emergence against 1/p) and the
    bootstrap of emergence against frequency call it. Curves with an offset, L = E + A·x^-α,
    go through :func:`fit_curve`. Three fits keep their own arithmetic, because theirs
    rounds differently in the last bits and their outputs are published as they compute
    them: the point fit of emergence against frequency and the envelope slope of cluster
    sizes use ``scipy.stats.linregress`` (which also gives the slope's standard error and
    r), and :func:`pipeline.laws.scaling.token_curves` fits every token at once with
    matrix products over a models-major layout, which is also ~3x faster there."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xm, ym = x.mean(axis=-1, keepdims=True), y.mean(axis=-1, keepdims=True)
    xc = x - xm
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.sum(xc * (y - ym), axis=-1) / np.sum(xc * xc, axis=-1)
    return b, ym[..., 0] - b * xm[..., 0]


def fit_curve(
    x: Sequence[float] | np.ndarray,
    L: Sequence[float] | np.ndarray,
    *,
    offset: bool = True,
    x_lo: Optional[float] = None,
    x_hi: Optional[float] = None,
    delta: float = HUBER_DELTA,
    alpha_max: float = ALPHA_MAX,
    n_starts: int = N_STARTS,
) -> ScalingFit:
    """Fit L(x) = E + A·x^-α (offset=True) or A·x^-α to one curve, without bootstrap.

    x: (n,) positive abscissae (model parameters N, training steps S, tokens D).
    L: (n,) mean losses at each x (nats). x_lo, x_hi: inclusive window on x, e.g. the
    steps [S_lo, S_hi] of a learning curve; points outside are ignored.
    delta: Huber δ on natural-log residuals (Chinchilla: 1e-3). n_starts: at most this
    many L-BFGS-B starts (see :func:`_profile_starts`). Returns :class:`ScalingFit`.
    """
    xw, yw = _windowed(x, L, x_lo, x_hi)
    with _single_blas_thread():
        return _fit_window(xw, yw, offset=offset, delta=delta, alpha_max=alpha_max, n_starts=n_starts)


@dataclasses.dataclass(frozen=True)
class CurveBootstrap:
    """A point fit with percentile bootstrap CIs of its parameters.

    method: "units" (resampled units, e.g. documents) or "residuals" (resampled
    log-residuals of the point fit, in blocks of ``block`` consecutive points).
    ci: parameter name ("E", "A", "alpha") -> (lo, hi) at ``level``, from the converged
    replicates only; None when the point fit did not converge or fewer than half of the
    replicates did (``reason`` says which).
    """

    fit: ScalingFit
    method: str
    ci: Optional[dict[str, tuple[float, float]]]
    level: float
    n_boot: int  # replicates requested
    n_failed: int  # replicates whose refit did not converge (excluded from the CI)
    seed: int
    block: int = 1
    reason: str = ""

    @property
    def alpha_ci(self) -> Optional[tuple[float, float]]:
        return None if self.ci is None else self.ci["alpha"]


def _bootstrap(fit, replicates, *, method, n_boot, seed, level, block, fit_kwargs) -> CurveBootstrap:
    """Refit every replicate (x, L), warm-started at the point fit; percentile CIs."""
    base = dict(fit=fit, method=method, level=level, n_boot=n_boot, seed=seed, block=block)
    if not fit.converged:
        reason = f"the point fit did not converge: {fit.reason}"
        return CurveBootstrap(ci=None, n_failed=0, reason=reason, **base)
    params, failed = [], 0
    for xb, yb in replicates:
        f = _fit_window(xb, yb, warm=fit, **fit_kwargs)
        if f.converged:
            params.append((f.E, f.A, f.alpha))
        else:
            failed += 1
    if len(params) < max(2, (n_boot + 1) // 2):
        reason = f"only {len(params)} of {n_boot} bootstrap refits converged: no CI"
        return CurveBootstrap(ci=None, n_failed=failed, reason=reason, **base)
    q = (1.0 - level) / 2.0
    arr = np.asarray(params)  # (n_ok, 3): E, A, alpha
    lo, hi = np.quantile(arr, q, axis=0), np.quantile(arr, 1.0 - q, axis=0)
    ci = {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(("E", "A", "alpha"))}
    return CurveBootstrap(ci=ci, n_failed=failed, **base)


def _check_boot(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise QuantaError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise QuantaError(f"CI level must be in (0, 1), got {level}")


def bootstrap_units(
    values: np.ndarray,
    x: Sequence[float] | np.ndarray,
    *,
    offset: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    x_lo: Optional[float] = None,
    x_hi: Optional[float] = None,
    delta: float = HUBER_DELTA,
    alpha_max: float = ALPHA_MAX,
    n_starts: int = N_STARTS,
) -> CurveBootstrap:
    """Fit the mean curve of ``values`` and bootstrap CIs by resampling units.

    values: (units, n_x) per-unit losses (nats), e.g. row = document, column = model
      (mean loss of that document under each model) or checkpoint. Every entry must be
      finite: a NaN would silently change which units a column averages over.
    x: (n_x,) positive abscissae of the columns. The point fit is on values.mean(axis=0);
    each replicate draws ``units`` rows with replacement (numpy default_rng(seed)),
    averages them and refits (warm-started at the point fit, plus the profile starts).
    Percentile CIs at ``level``. Returns :class:`CurveBootstrap`.
    """
    v = np.asarray(values, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    _check_boot(n_boot, level)
    if v.ndim != 2 or x.ndim != 1 or v.shape[1] != x.size:
        raise QuantaError(f"values must be (units, {x.size}) to match x, got shape {v.shape}")
    if v.shape[0] < 2:
        raise QuantaError(f"resampling units needs at least 2 units (rows), got {v.shape[0]}")
    if not np.all(np.isfinite(v)):
        raise QuantaError(
            f"values has {int(np.sum(~np.isfinite(v)))} NaN/inf entries; every unit needs a value at every x"
        )
    m = _window(x, x_lo, x_hi)
    if not m.any():
        raise QuantaError(f"no x inside the window [{x_lo}, {x_hi}]; widen the window")
    order = np.argsort(x[m], kind="stable")
    xw, vw = x[m][order], v[:, m][:, order]  # (n_w,), (units, n_w)
    _check_curve(xw, vw.mean(axis=0))
    kw = dict(offset=offset, delta=delta, alpha_max=alpha_max, n_starts=n_starts)
    rng = np.random.default_rng(seed)

    def replicates():
        for _ in range(n_boot):
            yield xw, vw[rng.integers(0, vw.shape[0], vw.shape[0])].mean(axis=0)

    with _single_blas_thread():
        fit = _fit_window(xw, vw.mean(axis=0), **kw)
        return _bootstrap(
            fit, replicates(), method="units", n_boot=n_boot, seed=seed, level=level, block=1, fit_kwargs=kw
        )


def bootstrap_residuals(
    x: Sequence[float] | np.ndarray,
    L: Sequence[float] | np.ndarray,
    *,
    offset: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    block: int = 1,
    x_lo: Optional[float] = None,
    x_hi: Optional[float] = None,
    delta: float = HUBER_DELTA,
    alpha_max: float = ALPHA_MAX,
    n_starts: int = N_STARTS,
) -> CurveBootstrap:
    """Fit a mean curve and bootstrap CIs by resampling its log-residuals.

    For curves with no per-unit values (only the mean, as the published Pythia curves).
    With the point fit's prediction P(x) and log-residuals r = ln L - ln P, each replicate
    is ln L* = ln P + r*, where r* resamples r with replacement: one point at a time
    (block=1, iid), or as a moving-block bootstrap of ``block`` consecutive points (in x
    order), which keeps the serial correlation of a learning curve's residuals and gives
    wider, more honest intervals. Seeded; percentile CIs. Returns :class:`CurveBootstrap`.
    """
    _check_boot(n_boot, level)
    if block < 1:
        raise QuantaError(f"block must be >= 1, got {block}")
    xw, yw = _windowed(x, L, x_lo, x_hi)
    n = xw.size
    if block > n:
        raise QuantaError(f"block={block} is longer than the {n} points in the window")
    kw = dict(offset=offset, delta=delta, alpha_max=alpha_max, n_starts=n_starts)
    rng = np.random.default_rng(seed)

    def replicates(fit):
        logp = np.log(fit.predict(xw))
        r = np.log(yw) - logp  # (n,) log-residuals, in x order
        n_blocks = -(-n // block)
        for _ in range(n_boot):
            starts = rng.integers(0, n - block + 1, n_blocks)
            rb = np.concatenate([r[s : s + block] for s in starts])[:n]
            yield xw, np.exp(logp + rb)

    with _single_blas_thread():
        fit = _fit_window(xw, yw, **kw)
        reps = replicates(fit) if fit.converged else iter(())
        return _bootstrap(
            fit, reps, method="residuals", n_boot=n_boot, seed=seed, level=level, block=block, fit_kwargs=kw
        )
