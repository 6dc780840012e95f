"""The theory check: what the quantization model predicts from each measured exponent.

Why this module exists: the quantization model (Michaud et al. 2023, "The Quantization
Model of Neural Scaling") ties three measurable exponents to one number α, the Zipf
exponent of quanta frequencies p_k ∝ k^-(α+1):

- mean loss over model size, L(N) - E ∝ N^-α_N, with α_N = α (if capacity buys quanta in
  order, n ∝ N);
- mean loss over training steps, L(S) - E ∝ S^-α_S, with α_S = α/(α+1);
- cluster sizes (if QDG clusters are quanta), size of the r-th largest ∝ r^-b, with the
  Zipf exponent b = α + 1.

Each measured exponent is therefore a *route* to α: α = α_N, α = α_S/(1 - α_S),
α = b - 1. This module inverts each route (CIs map through the monotone inversions),
says what each recovered α predicts for the other two exponents, and on the planted
suite compares every route with the α that was planted. Nothing here fits anything: the
numbers come from metrics/scaling.json and metrics/powerlaw.json, and the targets are
fixed in params (theory.tolerance), never tuned to the measurement.
"""

from __future__ import annotations

from typing import Optional

from pipeline.core.config import TheoryConfig

ROUTES = ("alpha_N", "alpha_S", "zipf")
# The target on the planted suite: the cluster-size route. α_N = α holds only if capacity
# buys quanta in proportion to N (β = 1); the α_N route is reported with β instead.
TARGET_ROUTES = ("zipf",)


def predictions(alpha: float) -> dict:
    """The three exponents the quantization model predicts from α."""
    return {"alpha_N": alpha, "alpha_S": alpha / (alpha + 1.0), "zipf": alpha + 1.0}


def alpha_from(route: str, value: float) -> Optional[float]:
    """α implied by one measured exponent (None when no α >= 0 gives it)."""
    if route == "alpha_N":
        return value if value >= 0 else None
    if route == "alpha_S":
        return value / (1.0 - value) if 0 <= value < 1 else None
    if route == "zipf":
        return value - 1.0 if value >= 1 else None
    raise ValueError(f"unknown route {route!r}")


def _route(route: str, measured: Optional[float], ci, ok: bool, reason: str, source: str) -> dict:
    row = {"source": source, "measured": measured, "measured_ci": list(ci) if ci else None,
           "converged": bool(ok and measured is not None), "reason": reason,
           "alpha": None, "alpha_ci": None, "predicts": None}
    if measured is None:
        row["reason"] = reason or "not measured"
        return row
    a = alpha_from(route, measured)
    if a is None:
        row["reason"] = (reason + "; " if reason else "") + f"{route} = {measured:.4g} implies no α >= 0"
        return row
    row["alpha"] = a
    if ci:
        lo, hi = alpha_from(route, ci[0]), alpha_from(route, ci[1])
        # α_S close to 1 sends α to infinity: an upper end beyond it is unbounded
        row["alpha_ci"] = [lo if lo is not None else 0.0, hi if hi is not None else float("inf")]
    row["predicts"] = predictions(a)
    return row


def _zipf_route(fit: Optional[dict], source: str) -> dict:
    """The Zipf route's row from a powerlaw fit's metrics (rank_exponent, its CI, fittable, reason)."""
    m = fit or {}
    return _route("zipf", m.get("rank_exponent"), m.get("rank_exponent_ci"), bool(m.get("fittable")),
                  m.get("reason") or "", source)


def alpha_over_beta(alpha_n: dict, learned: Optional[dict]) -> dict:
    """α = α_N / β, the quantization model's α when n(N) ∝ N^β quanta are learned.

    L - L_inf ∝ n^-α and n ∝ N^β give L - L_inf ∝ N^-αβ, so α_N = α·β; the paper's
    α_N = α assumes β = 1. alpha_n: the α_N route's row; learned: planted.json's
    learned_count_scaling (β with its CI). The CI combines the two CIs' ends (each
    ratio of an α_N end to a β end), a conservative interval.
    """
    row = {"source": "α_N (scaling) / β (learned quanta n(N) ∝ N^β, planted probe set)",
           "alpha_N": alpha_n.get("measured"), "alpha_N_ci": alpha_n.get("measured_ci"),
           "beta": None, "beta_ci": None, "alpha": None, "alpha_ci": None}
    if not learned or learned.get("beta") is None or alpha_n.get("measured") is None:
        row["reason"] = "needs α_N and the planted suite's learned-count exponent β"
        return row
    beta = learned["beta"]
    row.update(beta=beta, beta_ci=learned.get("beta_ci"))
    if not beta > 0:
        row["reason"] = f"β = {beta:.3g}: the number of learned quanta does not grow with N"
        return row
    row["alpha"] = alpha_n["measured"] / beta
    a_ci, b_ci = alpha_n.get("measured_ci"), learned.get("beta_ci")
    if a_ci and b_ci and b_ci[0] > 0:
        ends = [a / b for a in a_ci for b in b_ci]
        row["alpha_ci"] = [min(ends), max(ends)]
    return row


def theory_table(
    scaling: dict, powerlaw: dict, cfg: TheoryConfig, planted_alpha: Optional[float] = None,
    learned: Optional[dict] = None,
) -> dict:
    """metrics/theory.json from the scaling and powerlaw metrics.

    scaling: metrics/scaling.json (mean_loss.alpha_N, alpha_S); powerlaw: metrics/powerlaw.json,
    whose ``rank_mle`` (the default ``cfg.zipf_from``), ``mle`` (CSN's tail MLE) or
    ``envelope`` (the paper's OLS slope) gives the target route ``zipf``; CSN's MLE is also
    reported beside it as ``zipf_csn`` when it is not the target, and on the planted suite
    the same estimator on the planted quanta as ``zipf_planted_partition``. Either input may
    be {} when that stage did not run. planted_alpha: the planted α (planted suite only). A route that did not converge
    keeps its best-attempt value, flagged, and fails its target.
    """
    ml = scaling.get("mean_loss") or {}
    rows = {
        "alpha_N": _route("alpha_N", ml.get("alpha_N"), ml.get("alpha_ci"), bool(ml.get("converged")),
                          ml.get("reason") or scaling.get("skipped") or "", "scaling: mean loss L(N) over models"),
    }
    s = scaling.get("alpha_S") or {}
    rows["alpha_S"] = _route("alpha_S", s.get("alpha_S"), s.get("alpha_ci"), bool(s.get("converged")),
                             s.get("reason") or "", f"scaling: learning curve L(S) of {s.get('model')}")
    k = powerlaw.get("k")
    csn = f"powerlaw: CSN discrete MLE of cluster sizes (k = {k})"
    if cfg.zipf_from == "rank_mle":
        rows["zipf"] = _zipf_route(powerlaw.get("rank_mle"), f"powerlaw: rank MLE of cluster sizes, finite Zipf (k = {k})")
    elif cfg.zipf_from == "mle":
        rows["zipf"] = _zipf_route(powerlaw.get("mle"), csn)
    else:
        e = powerlaw.get("envelope") or {}
        rows["zipf"] = _route("zipf", e.get("rank_exponent"), None, "skipped" not in e, e.get("skipped", ""),
                              "powerlaw: the paper's envelope slope (OLS; no CI)")
    if cfg.zipf_from != "mle" and powerlaw.get("mle"):  # CSN's tail fit, reported beside the target (no target)
        rows["zipf_csn"] = _zipf_route(powerlaw["mle"], csn)
    t = powerlaw.get("planted_partition")
    if t is not None:  # planted suite: the same fit on the true quanta of the QDG samples (no target)
        rank = cfg.zipf_from == "rank_mle"
        rows["zipf_planted_partition"] = _zipf_route(
            t.get("rank_mle") if rank else t,
            f"powerlaw: {'rank MLE' if rank else 'CSN discrete MLE'} of the planted quanta's sizes among the QDG "
            "samples (a perfect clustering)")
    out = {"routes": rows, "planted": planted_alpha is not None, "tolerance": cfg.tolerance}
    if planted_alpha is None:
        return out
    ratio = alpha_over_beta(rows["alpha_N"], learned)
    if ratio["alpha"] is not None:
        ratio["error"] = ratio["alpha"] - planted_alpha
        ratio["alpha_ci_covers_planted"] = (
            None if not ratio["alpha_ci"] else bool(ratio["alpha_ci"][0] <= planted_alpha <= ratio["alpha_ci"][1]))
        ratio["within_tolerance"] = bool(abs(ratio["error"]) <= cfg.tolerance)
    out["alpha_N_over_beta"] = ratio
    out["planted_alpha"] = planted_alpha
    out["planted_predicts"] = predictions(planted_alpha)
    fails = []
    for name, row in rows.items():
        row["target"] = name in TARGET_ROUTES
        a = row["alpha"]
        row["error"] = None if a is None else a - planted_alpha
        within = a is not None and abs(a - planted_alpha) <= cfg.tolerance
        row["alpha_ci_covers_planted"] = (
            None if not row["alpha_ci"] else bool(row["alpha_ci"][0] <= planted_alpha <= row["alpha_ci"][1])
        )
        row["pass"] = bool(within and row["converged"])
        if row["target"] and not row["pass"]:
            if a is None:
                fails.append(f"{name}: no α recovered ({row['reason']})")
            else:
                why = "" if row["converged"] else f" (and the fit did not converge: {row['reason']})"
                fails.append(f"{name}: α = {a:.3f}, off by {a - planted_alpha:+.3f} (tolerance ±{cfg.tolerance}){why}")
    out["pass"] = not fails
    out["failures"] = fails
    return out
