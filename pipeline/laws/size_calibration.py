"""The calibrated bias of the cluster-size exponent at a run's N, k and clustering method.

Why this module exists: the α a run reads off its cluster sizes carries two errors, the
clustering's (a cut at k above the quanta present splits them and flattens the sizes;
one below merges them) and the estimator's (CSN's tail MLE and the envelope OLS are biased
on tens of clusters). Neither is known from the run itself. bench/bench_size_calibration.py
measures their sum on planted runs, where α is known, for each (N, method, k or cut,
estimator), pooled over the planted α and seeds; its table ships beside this file as
``size_calibration.json`` (docs/cluster-size-calibration.md shows and reads it). The
powerlaw stage reports, next to each estimate, the bias read from the calibrated setting
nearest to the run's, that setting, and the estimate less the bias.

Settings: a fixed cut is its k (an int); the knn_average data-chosen cut is ``"data"``;
Leiden's own partition is ``"natural"``; the envelope across a k sweep is ``"sweep"``.
A bias is in α (estimate - truth), so the corrected α is the estimate minus it.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Mapping, Optional, Union

DATA = Path(__file__).with_name("size_calibration.json")

# Outside the table: a run's N or k more than this factor from the nearest calibrated one.
# The bias moves by tenths of α between N = 1000 and 4000 and between k = 25 and 100
# (docs/cluster-size-calibration.md), so reading it further out would be a guess.
MAX_RATIO = 2.0

# The powerlaw stage's metrics key of each calibrated estimator.
METRICS_KEY = {"rank_mle": "rank_mle", "csn": "mle", "envelope": "envelope"}


@functools.lru_cache(maxsize=4)
def load(path: Union[str, Path] = DATA) -> dict:
    """The calibration table (what bench/bench_size_calibration.py --calibration writes)."""
    return json.loads(Path(path).read_text())


def _log_distance(a: float, b: float) -> float:
    return abs(math.log(a) - math.log(b))


def calibrated_bias(n_samples: int, k: Union[int, str], method: str, estimator: str,
                    table: Optional[Mapping] = None) -> Optional[dict]:
    """The calibrated bias in α of `estimator` for `method` at the nearest calibrated (N, k or cut).

    n_samples: the samples clustered (N); k: the cut (an int) or a named setting ("data",
    "natural", "sweep"); method: a cluster.method or "perfect"; estimator: "rank_mle",
    "csn" or "envelope". A named setting must match exactly; an int k takes the nearest
    calibrated k of the method (on log scale), then N the nearest calibrated N for that
    setting (log scale). Returns {"bias", "sd", "n" (runs averaged), "by_alpha" (the mean bias
    at each planted α: the pooled bias hides how much it moves with α), "matched": {n_samples,
    method, k, estimator}, "exact"}; None when the method, estimator or named setting was
    not calibrated, or N or k lies more than MAX_RATIO from the nearest calibrated value.
    table: the calibration (default: the shipped file).
    """
    rows = [r for r in (table or load())["rows"]
            if r["method"] == method and r["estimator"] == estimator and r.get("bias") is not None]
    if isinstance(k, str) and not k.isdigit():
        rows = [r for r in rows if r["setting"] == k]
        setting = k
    else:
        ks = sorted({int(r["setting"]) for r in rows if str(r["setting"]).isdigit()})
        if not ks:
            return None
        near = min(ks, key=lambda c: _log_distance(c, int(k)))
        if _log_distance(near, int(k)) > math.log(MAX_RATIO):
            return None
        setting = str(near)
        rows = [r for r in rows if str(r["setting"]) == setting]
    if not rows:
        return None
    best = min(rows, key=lambda r: _log_distance(r["n_samples"], n_samples))
    if _log_distance(best["n_samples"], n_samples) > math.log(MAX_RATIO):
        return None
    matched_k = int(setting) if setting.isdigit() else setting
    return {
        "bias": best["bias"], "sd": best.get("sd"), "n": best["n"], "by_alpha": best.get("by_alpha"),
        "matched": {"n_samples": best["n_samples"], "method": method, "k": matched_k, "estimator": estimator},
        "exact": best["n_samples"] == n_samples and str(matched_k) == str(k),
    }


def run_setting(cluster_config: Optional[Mapping], k: int, k_given: bool) -> tuple[Optional[str], Union[int, str, None], str]:
    """(method, setting of the fitted clustering, why) from the clusters table's stored config.

    cluster_config: what the cluster stage stores in the table (its cluster params and
    ``main_k``), or None; k: the fitted clustering's k (the powerlaw metrics' ``k``);
    k_given: powerlaw.k named it (a fixed cut of the sweep), else it is the main clustering,
    which knn_average with ``cut: data`` and leiden choose from the data.
    """
    if not cluster_config or "method" not in cluster_config:
        return None, None, "the clusters table stores no cluster config (rerun the cluster stage)"
    method = cluster_config["method"]
    if not k_given and method == "knn_average" and cluster_config.get("cut") == "data":
        return method, "data", "the data-chosen cut (cluster.cut: data)"
    if not k_given and method == "leiden":
        return method, "natural", "Leiden's own partition"
    return method, int(k), f"the cut at k = {k}"


def calibration_metrics(metrics: Mapping, cluster_config: Optional[Mapping], n_samples: int, k_given: bool,
                        table: Optional[Mapping] = None) -> dict:
    """{estimator: calibration} for the powerlaw stage's metrics (:func:`cluster_sizes.analyze_clusters`).

    Each entry is {"bias", "sd", "n", "matched", "exact", "alpha", "corrected_alpha"} (α
    as estimated, and less the bias), or {"skipped": why} where the estimate or the
    calibration is missing. The envelope's setting is the sweep of the run's method.
    n_samples: the samples the cluster stage was given (the clusters table's rows).
    """
    method, setting, why = run_setting(cluster_config, metrics["k"], k_given)
    out = {}
    for est, key in METRICS_KEY.items():
        m = metrics.get(key) or {}
        alpha = m.get("alpha") if m.get("fittable", True) else None
        if method is None:
            out[est] = {"skipped": why}
            continue
        at = "sweep" if est == "envelope" else setting
        if alpha is None:
            out[est] = {"skipped": f"no {est} estimate to calibrate"}
            continue
        cal = calibrated_bias(n_samples, at, method, est, table)
        if cal is None:
            out[est] = {"skipped": f"no calibration within a factor {MAX_RATIO:g} of N = {n_samples}, "
                                   f"{method} at {at} (docs/cluster-size-calibration.md)"}
            continue
        out[est] = {**cal, "alpha": alpha, "corrected_alpha": alpha - cal["bias"]}
    out["setting"] = {"method": method, "k": setting, "n_samples": int(n_samples), "is": why}
    return out


def summary_line(calibration: Mapping) -> str:
    """One line of :func:`calibration_metrics`: each estimator's calibrated bias and corrected α."""
    parts = []
    for est in METRICS_KEY:
        c = calibration.get(est) or {}
        if "bias" in c:
            m = c["matched"]
            parts.append(f"{est} bias {c['bias']:+.3f} (N = {m['n_samples']}, k = {m['k']}) -> α {c['corrected_alpha']:.3f}")
        else:
            parts.append(f"{est}: {c.get('skipped', 'skipped')}")
    return "powerlaw calibration: " + "; ".join(parts)
