"""Each discovered cluster across scale and training: its members' loss at every (model,
revision) of the suite, where it emerges, and the quantization model's ordering tested on it.

The quantization model (Michaud et al. 2023) says quanta are learned in order of use: a
frequent quantum is learned by a smaller model and earlier in training. QDG finds the
clusters on one model; this module reads every other loss table of the suite at the same
tokens, so each cluster gets a loss curve over sizes and over checkpoints:

- ``cluster_curves.parquet``: per (cluster, model, revision) the members' ``n`` (members the
  table scores), ``mean_loss``, ``median_loss`` and ``frac_learned`` (the share under
  ``select.max_loss``, the bar that chose them as well-predicted), with ``n_params`` and ``step``.
- emergence, per cluster (``cluster_emergence.parquet``). A cluster is *learned* at a point
  when at least ``curves.learned_fraction`` (0.9) of its scored members are under the bar:
  the planted scorecard's definition of a learned quantum (90% of its answers under 0.1
  nats), so that a cluster's emergence and its planted quantum's are the same quantity. Its
  emergence on an axis (sizes at ``scaling.revision``, or the stepN checkpoints of
  ``dynamics.model``) is the first point at which it is learned: on the size axis N* (that
  model's non-embedding parameter count), on the step axis S*.
- censoring: a cluster already learned at the first point emerged at or before it (*left*
  censored, N* ≤ the smallest size); one learned at no point emerges beyond the suite
  (*right* censored). Neither is forced to a value: the emergence columns keep the
  point (null when right censored) and ``*_censored`` says which.
- CIs resample a cluster's members (``curves.n_boot``) and take the percentile points of the
  resampled emergence index; abruptness is the largest drop of the mean loss between
  adjacent points over the sum of its drops (1: one step; 1/(points - 1): an even slide).

The theory test (metrics/cluster_curves.json) is Spearman's rho between a cluster's use
frequency and its emergence index, with a percentile CI from resampling clusters. Two
frequencies: its share of the clustered samples, and its label rule's share of all corpus
targets (``label_corpus_share`` of :mod:`pipeline.qdg.labels`). Censoring on a grid of
points only widens the first and last bins: "learned by the smallest model" is the bin
below the first size, "not learned by the largest" the bin above the last, and their order
against every other bin is known. Ranks of the bin index (ties averaged) are therefore
exact for censored clusters; rho over the uncensored clusters alone is reported beside it.
The prediction is a negative rho (frequent -> small N*, early S*).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.core.config import CurvesConfig, step_of
from pipeline.core.errors import QuantaError
from pipeline.laws import scaling
from pipeline.lm import partitions

CURVE_SCHEMA = pa.schema([
    ("cluster", pa.int32()), ("model", pa.string()), ("revision", pa.string()), ("n_params", pa.float64()),
    ("step", pa.int64()), ("n", pa.int32()), ("mean_loss", pa.float64()), ("median_loss", pa.float64()),
    ("frac_learned", pa.float64()), ("learned", pa.bool_()),
])
AXES = {"size": "n_star", "step": "s_star"}  # axis -> the prefix of its emergence columns
PREDICTION = ("negative rho: frequent quanta are learned by smaller models and earlier in training "
              "(the quantization model, Michaud et al. 2023)")


@dataclasses.dataclass(frozen=True)
class Axis:
    """One emergence axis: the (model, revision) points in order and their x (N or step)."""

    name: str  # size | step
    points: tuple[tuple[str, str], ...]
    x: tuple[float, ...]
    skipped: str = ""  # why the axis has no emergence ('' when it has)


def read_curves(path) -> pd.DataFrame:
    """``cluster_curves.parquet`` (CURVE_SCHEMA) as a DataFrame."""
    return pd.read_parquet(path)


def read_emergence(path) -> pd.DataFrame:
    """``cluster_emergence.parquet`` as a DataFrame: one row per cluster (see the module docstring)."""
    return pd.read_parquet(path)


def member_losses(root, model: str, revision: str, doc_id: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """(N,) float64 loss of each (doc_id, pos) in one loss table; NaN where the table has no row."""
    doc, p, loss = scaling.read_loss_partition(root, model, revision)
    encode, _ = scaling.key_codec([doc, np.asarray(doc_id, np.int64)])
    key = encode(doc, p)
    order = np.argsort(key, kind="stable")
    key = key[order]
    want = encode(doc_id, pos)
    i = np.minimum(np.searchsorted(key, want), max(key.size - 1, 0))
    hit = key.size > 0
    found = (key[i] == want) if hit else np.zeros(want.shape, bool)
    out = np.full(want.shape, np.nan)
    out[found] = loss[order[i[found]]]
    return out


def curve_rows(labels: np.ndarray, loss: np.ndarray, max_loss: float, learned_fraction: float) -> pd.DataFrame:
    """Per cluster 0..k-1 of `labels` (-1 left out): n, mean_loss, median_loss, frac_learned,
    learned, over the members `loss` scores (NaN: not scored)."""
    k = int(labels.max()) + 1 if (labels >= 0).any() else 0
    ok = (labels >= 0) & np.isfinite(loss)
    frame = pd.DataFrame({"cluster": labels[ok], "loss": loss[ok], "low": loss[ok] < max_loss})
    g = frame.groupby("cluster")
    out = pd.DataFrame({"cluster": np.arange(k, dtype=np.int32)}).set_index("cluster")
    out["n"] = g.size().reindex(out.index, fill_value=0).astype(np.int32)
    out["mean_loss"] = g["loss"].mean().reindex(out.index)
    out["median_loss"] = g["loss"].median().reindex(out.index)
    out["frac_learned"] = g["low"].mean().reindex(out.index)
    out["learned"] = (out["frac_learned"] >= learned_fraction).fillna(False).astype(bool)
    return out.reset_index()


def emergence_index(learned: np.ndarray) -> np.ndarray:
    """Index of the first learned point of each row (the last axis runs over the points); the
    number of points when no point is learned."""
    learned = np.asarray(learned, bool)
    return np.where(learned.any(axis=-1), np.argmax(learned, axis=-1), learned.shape[-1])


def abruptness(mean_loss: np.ndarray) -> Optional[float]:
    """Largest drop of a curve between adjacent points over the sum of its drops; None
    without a drop (or fewer than two finite points)."""
    y = np.asarray(mean_loss, float)
    y = y[np.isfinite(y)]
    if y.size < 2:
        return None
    drops = np.clip(y[:-1] - y[1:], 0, None)
    total = drops.sum()
    return float(drops.max() / total) if total > 0 else None


def axis_emergence(losses: np.ndarray, labels: np.ndarray, axis: Axis, max_loss: float, cfg: CurvesConfig,
                   mean_loss: np.ndarray) -> pd.DataFrame:
    """One row per cluster: the emergence index on `axis`, its member-bootstrap CI, the
    censoring and the abruptness; losses (points, N) are the members' losses at the axis'
    points, mean_loss (clusters, points) the clusters' mean loss there."""
    prefix = AXES[axis.name]
    k = mean_loss.shape[0]
    n_pts = len(axis.points)
    x = np.asarray(axis.x, float)
    rng = np.random.default_rng(cfg.seed)
    lo_q, hi_q = (1 - cfg.level) / 2, 1 - (1 - cfg.level) / 2
    rows = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        scored = np.isfinite(losses[:, members])  # (points, n_c)
        low = scored & (np.nan_to_num(losses[:, members], nan=np.inf) < max_loss)
        n_c = members.size
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = low.sum(1) / scored.sum(1)
        idx = int(emergence_index(frac >= cfg.learned_fraction))
        # members resampled with replacement: counts (B, n_c) weigh the members
        counts = rng.multinomial(n_c, np.full(n_c, 1.0 / n_c), size=cfg.n_boot).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            bfrac = (counts @ low.T.astype(float)) / (counts @ scored.T.astype(float))  # (B, points)
        boot = emergence_index(np.nan_to_num(bfrac, nan=0.0) >= cfg.learned_fraction)
        lo = int(np.quantile(boot, lo_q, method="lower"))
        hi = int(np.quantile(boot, hi_q, method="higher"))
        at = lambda i: float(x[i]) if i < n_pts else None  # noqa: E731 (right censored: beyond the last point)
        rows.append({
            "cluster": c,
            f"{prefix}": at(idx),
            f"{prefix}_lo": at(lo),
            f"{prefix}_hi": at(hi),
            f"{prefix}_index": idx,
            f"{prefix}_censored": "left" if idx == 0 else ("right" if idx == n_pts else "none"),
            f"abrupt_{axis.name}": abruptness(mean_loss[c]),
        })
    frame = pd.DataFrame(rows)
    frame["cluster"] = frame["cluster"].astype("int32")
    for col in (prefix, f"{prefix}_lo", f"{prefix}_hi", f"abrupt_{axis.name}"):
        frame[col] = frame[col].astype("Float64")
    frame[f"{prefix}_index"] = frame[f"{prefix}_index"].astype("int32")
    return frame


def spearman(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Spearman's rho with averaged ranks for ties; None when undefined (< 3 points or a constant)."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(stats.spearmanr(a, b).statistic)


def spearman_ci(a: np.ndarray, b: np.ndarray, cfg: CurvesConfig) -> dict:
    """rho of (a, b) and its percentile CI over `cfg.n_boot` resamples of the pairs."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    rho = spearman(a, b)
    ci = None
    if rho is not None:
        rng = np.random.default_rng(cfg.seed)
        boots = [spearman(a[i], b[i]) for i in rng.integers(a.size, size=(cfg.n_boot, a.size))]
        boots = np.array([r for r in boots if r is not None])
        if boots.size >= 2:
            ci = [float(np.quantile(boots, (1 - cfg.level) / 2)), float(np.quantile(boots, 1 - (1 - cfg.level) / 2))]
    return {"rho": rho, "ci": ci, "n": int(a.size)}


def ordering_test(emergence: pd.DataFrame, axis: Axis, cfg: CurvesConfig) -> dict:
    """The quantization model's ordering on one axis: rho(use frequency, emergence index)."""
    if axis.skipped:
        return {"skipped": axis.skipped}
    prefix = AXES[axis.name]
    idx = emergence[f"{prefix}_index"].to_numpy(float)
    cens = emergence[f"{prefix}_censored"].to_numpy()
    out = {
        "points": [[m, r] for m, r in axis.points],  # (model, revision) in axis order
        "x": list(axis.x),
        "n_clusters": int(len(emergence)),
        "n_left_censored": int((cens == "left").sum()),
        "n_right_censored": int((cens == "right").sum()),
    }
    for name, column in (("share_of_samples", "share"), ("rule_share_of_corpus", "label_corpus_share")):
        if column not in emergence or emergence[column].isna().all():
            out[name] = {"skipped": f"no {column} column (the cluster summary has no label corpus shares)"}
            continue
        freq = emergence[column].astype(float).to_numpy()
        res = spearman_ci(freq, idx, cfg)
        unc = cens == "none"
        res["rho_uncensored"] = spearman(freq[unc], idx[unc])
        res["n_uncensored"] = int(unc.sum())
        out[name] = res
    return out


def tokenizer_mismatch(identities: Mapping[str, str], reference: str) -> dict[str, str]:
    """model -> why it is skipped, for every model whose tokenizer is not the select model's."""
    ref = identities[reference]
    return {m: f"its tokenizer ({ident}) is not select.model {reference}'s ({ref}): its losses are over other tokens"
            for m, ident in identities.items() if ident != ref}


def build_axes(models: Sequence[str], revisions: Sequence[str], n_params: Mapping[str, float],
               size_revision: str, step_model: Optional[str]) -> tuple[Axis, Axis]:
    """The size axis (models in order of N at `size_revision`) and the step axis (the stepN
    revisions of `step_model` in step order), each with why it is skipped when it must be."""
    order = sorted(models, key=lambda m: n_params[m])
    sizes = Axis("size", tuple((m, size_revision) for m in order), tuple(float(n_params[m]) for m in order))
    if len(order) < 2:
        sizes = dataclasses.replace(sizes, skipped=f"{len(order)} model ({', '.join(order) or 'none'}) with the select "
                                                   "model's tokenizer: emergence over sizes needs at least 2 "
                                                   "(add models to suite.models)")
    steps = sorted((step_of(r), r) for r in revisions if step_of(r) is not None)
    if step_model is None or step_model not in models:
        stepped = Axis("step", (), (), skipped=f"dynamics.model {step_model!r} is not among the compared models")
    else:
        stepped = Axis("step", tuple((step_model, r) for _, r in steps), tuple(float(s) for s, _ in steps))
        if len(steps) < 2:
            stepped = dataclasses.replace(stepped, skipped=f"{len(steps)} stepN revision(s) in suite.revisions: emergence "
                                                           "over training needs at least 2 checkpoints")
    return sizes, stepped


@dataclasses.dataclass(frozen=True)
class ClusterCurves:
    """What the cluster_curves stage writes."""

    curves: pa.Table  # CURVE_SCHEMA
    emergence: pd.DataFrame  # one row per cluster
    metrics: dict  # metrics/cluster_curves.json


def run(root, samples: pd.DataFrame, labels: np.ndarray, summary: pd.DataFrame, *, models: Sequence[str],
        revisions: Sequence[str], select_model: str, size_revision: str, step_model: Optional[str], max_loss: float,
        cfg: CurvesConfig, skipped_models: Optional[Mapping[str, str]] = None) -> ClusterCurves:
    """Curves, emergence and the ordering test of the main clustering `labels` (row i = sample i).

    root: the losses directory; samples: doc_id and pos of every sample; summary: the main
    clustering's rows of cluster_summary.parquet (cluster, size, label, label_corpus_share);
    models: the suite models to read (those with the select model's tokenizer);
    skipped_models: the others, with why.
    """
    if select_model not in models:
        raise QuantaError(f"select.model {select_model!r} is not in suite.models ({', '.join(models)}); fix select.model")
    labels = np.asarray(labels)
    doc, pos = samples["doc_id"].to_numpy(np.int64), samples["pos"].to_numpy(np.int64)
    rev_order = sorted(revisions, key=lambda r: (step_of(r) is None, step_of(r) or 0))
    n_params = {(m, r): partitions.read_n_params(root, m, r) for m in models for r in rev_order}
    frames, member = [], {}
    for m in models:
        for r in rev_order:
            loss = member_losses(root, m, r, doc, pos)
            member[(m, r)] = loss
            f = curve_rows(labels, loss, max_loss, cfg.learned_fraction)
            frames.append(f.assign(model=m, revision=r, n_params=n_params[(m, r)], step=step_of(r)))
    table = pd.concat(frames, ignore_index=True)
    table["step"] = table["step"].astype("Int64")
    curves = pa.Table.from_pandas(table[CURVE_SCHEMA.names], schema=CURVE_SCHEMA, preserve_index=False)

    k = int(labels.max()) + 1 if (labels >= 0).any() else 0
    sizes = np.bincount(labels[labels >= 0], minlength=k)
    emergence = pd.DataFrame({"cluster": np.arange(k, dtype=np.int32), "size": sizes.astype(np.int32),
                              "share": sizes / max(1, int((labels >= 0).sum()))})
    keep = [c for c in ("label", "label_kind", "label_corpus_share") if c in summary]
    emergence = emergence.merge(summary[["cluster", *keep]], on="cluster", how="left")
    size_axis, step_axis = build_axes(models, rev_order, {m: n_params[(m, size_revision)] for m in models},
                                      size_revision, step_model)
    metrics = {
        "learned_definition": (f">= {cfg.learned_fraction:.0%} of a cluster's scored members under select.max_loss = "
                               f"{max_loss} nats; emergence: the first point at which it is learned"),
        "prediction": PREDICTION,
        "censoring": ("learned at the first point: left censored (bin below the first); learned at no point: right "
                      "censored (bin above the last); rho ranks the bin index, ties averaged; CI: clusters resampled"),
        "models": list(models),
        "skipped_models": dict(skipped_models or {}),
        "n_clusters": k,
    }
    for axis in (size_axis, step_axis):
        if axis.skipped:
            prefix = AXES[axis.name]
            for col in (prefix, f"{prefix}_lo", f"{prefix}_hi", f"abrupt_{axis.name}"):
                emergence[col] = pd.array([None] * k, dtype="Float64")
            emergence[f"{prefix}_index"] = pd.array([None] * k, dtype="Int32")
            emergence[f"{prefix}_censored"] = pd.array([None] * k, dtype="string")
        else:
            losses = np.stack([member[p] for p in axis.points])  # (points, N)
            by = table.set_index(["model", "revision", "cluster"])["mean_loss"].sort_index()
            mean = np.stack([by.loc[(m, r)].reindex(range(k)).to_numpy(float) for m, r in axis.points], axis=1)
            emergence = emergence.merge(axis_emergence(losses, labels, axis, max_loss, cfg, mean), on="cluster")
        metrics[axis.name] = ordering_test(emergence, axis, cfg)
    return ClusterCurves(curves=curves, emergence=emergence, metrics=metrics)


# ---------------------------------------------------------------- against planted ground truth

TARGET_TRUTH_RHO = 0.8  # planted: Spearman(cluster N* or S*, its majority quantum's) must reach this


def planted_check(emergence: pd.DataFrame, labels: np.ndarray, quanta: np.ndarray, scorecard: Mapping) -> dict:
    """Each cluster's N* and S* against the truth of its majority planted quantum, and the
    frequency ordering on clusters against the one the truth gives on the same clusters.

    labels (N,): the main clustering (row i = sample i); quanta (N,): each sample's planted
    quantum (-1: none); scorecard: metrics/planted.json, whose ``per_quantum.first_size``
    (first size that learns each quantum on the probe set) and ``emergence.step`` (first
    checkpoint from which it stays learned) are the truth. A cluster whose majority is no
    quantum is left out; a quantum never learned ranks after every learned one.
    """
    labels, quanta = np.asarray(labels), np.asarray(quanta)
    per_q = scorecard["per_quantum"]
    sizes = list(scorecard["sizes"])
    size_idx = np.array([sizes.index(s) if s is not None else len(sizes) for s in per_q["first_size"]], float)
    freq = np.asarray(per_q["frequency"], float)
    steps = (scorecard.get("emergence") or {}).get("step")
    step_val = None if steps is None else np.array([np.inf if s is None else s for s in steps], float)
    major = np.full(len(emergence), -1)
    for c in emergence["cluster"].to_numpy():
        q = quanta[labels == c]
        if q.size:
            vals, counts = np.unique(q, return_counts=True)
            major[c] = vals[np.argmax(counts)]
    ok = major >= 0
    out: dict = {"n_clusters": int(ok.sum()), "n_no_quantum": int((~ok).sum()), "target_rho": TARGET_TRUTH_RHO,
                 "truth": "the cluster's majority quantum: its first learned size (probe set) and its emergence step"}
    share = emergence["share"].to_numpy(float)
    fails = []
    for axis, truth, name in (("size", size_idx, "n_star"), ("step", step_val, "s_star")):
        col = f"{name}_index"
        if truth is None or col not in emergence or emergence[col].isna().all():
            out[axis] = {"skipped": "no emergence on this axis (see metrics/cluster_curves.json)"}
            continue
        found = emergence[col].astype(float).to_numpy()
        t = truth[major[ok]]
        rho = spearman(found[ok], t)
        out[axis] = {
            "spearman_vs_truth": rho,
            "frequency_rho_discovered": spearman(share[ok], found[ok]),
            "frequency_rho_truth": spearman(freq[major[ok]], t),
        }
        if rho is None or rho < TARGET_TRUTH_RHO:
            fails.append(f"{axis}: Spearman(cluster {name}, truth) = {rho if rho is None else round(rho, 3)} "
                         f"< {TARGET_TRUTH_RHO}")
    out["failures"] = fails
    out["pass"] = not fails
    return out
