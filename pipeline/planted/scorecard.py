"""The planted suite's scorecard (metrics/planted.json): is each quantum learned, by which size and when.

The `planted_metrics` stage scores the suite's per-token losses against the ground truth that
:mod:`pipeline.planted.suite` wrote: per quantum, whether it is learned (LEARNED_FRACTION of its
answers under LEARNED_LOSS nats, decided on the probe set) at each size and checkpoint; then
the criteria a quantized suite must meet (the learned count rises with size, frequent quanta
are learned first, learning is abrupt) and the scaling quantities the theory check reads
(the answer-loss exponent α_N and the learned-count exponent β).

Two quantities share a name with others of the pipeline and differ on purpose:

- the answer-loss α_N is the log-log slope of the answer tokens' mean loss against N with no
  offset, since a perfect model scores them at 0 nats; scaling's α_N fits L = E + A·N^-α to the
  mean loss of all tokens (:func:`pipeline.laws.fits.fit_curve`), where E is unknown;
- a quantum's emergence step here is the first checkpoint from which it stays learned on the
  probe set (the ground truth decides "learned"); :func:`pipeline.laws.dynamics.emergence_vs_frequency`
  has no ground truth on a real model and reads emergence from the loss curves alone.

Every straight-line fit is :func:`pipeline.laws.fits.ols`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from pipeline.core.config import step_of
from pipeline.laws import fits
from pipeline.lm import partitions
from pipeline.planted import suite
from pipeline.planted.suite import LEARNED_FRACTION, LEARNED_LOSS, PlantedError


def quantum_scores(labels: pd.DataFrame, losses: pd.DataFrame, n_quanta: int) -> pd.DataFrame:
    """Per quantum: n answer tokens scored, mean loss (nats), fraction under LEARNED_LOSS, learned."""
    return answer_scores(labels[labels["quantum"] >= 0].merge(losses, on=["doc_id", "pos"], how="inner"), n_quanta)


def answer_scores(ans: pd.DataFrame, n_quanta: int) -> pd.DataFrame:
    """:func:`quantum_scores` of answers already joined to their losses (quantum, loss columns)."""
    if ans["loss"].isna().any():
        raise PlantedError("NaN losses on labelled answer tokens; rerun the losses stage (fp32) and check the model")
    g = ans.groupby("quantum")["loss"]
    out = pd.DataFrame({"quantum": np.arange(n_quanta, dtype=np.int32)}).set_index("quantum")
    out["n_tokens"] = g.size().reindex(out.index, fill_value=0)
    out["mean_loss"] = g.mean().reindex(out.index)
    out["frac_low"] = g.apply(lambda s: float((s < LEARNED_LOSS).mean())).reindex(out.index)
    out["learned"] = out["frac_low"] >= LEARNED_FRACTION
    return out.reset_index()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho, NaN when it is undefined (fewer than 3 points, or a constant input)."""
    from scipy import stats

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def compute_metrics(
    labels: pd.DataFrame,
    quanta: pd.DataFrame,
    losses: Mapping[tuple[str, str], pd.DataFrame],
    param_counts: Mapping[str, int],
    revisions: Sequence[str],
    alpha: Optional[float] = None,
    probe: Optional[Mapping[tuple[str, str], pd.DataFrame]] = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """The planted-suite scorecard (metrics/planted.json) from labels and per-token losses.

    `losses[(model, revision)]` has doc_id, pos, loss (nats) on the Zipf corpus;
    `param_counts[model]` is the non-embedding count, which orders models by size; the last
    of `revisions` (in step order) is the final checkpoint. Sizes are compared at the final
    checkpoint; emergence steps are read over the checkpoints of the largest model.
    `probe[(model, revision)]` (quantum, loss per probe answer), when given, decides which
    quanta are learned (and their per-quantum losses); the corpus then gives only the mean
    losses. The learned-count exponent's CI resamples quanta `n_boot` times.
    """
    models = sorted(param_counts, key=lambda m: param_counts[m])
    revs = sorted(revisions, key=lambda r: (step_of(r) is None, step_of(r) or 0))
    final = revs[-1]
    K = len(quanta)
    freq = quanta.sort_values("quantum")["frequency"].to_numpy()
    rank = np.argsort(np.argsort(-freq, kind="stable"), kind="stable") + 1  # 1 = most frequent

    corpus_scores = {(m, r): quantum_scores(labels, losses[(m, r)], K) for (m, r) in losses}
    scores = corpus_scores if probe is None else {key: answer_scores(df, K) for key, df in probe.items()}
    at_final = [scores[(m, final)] for m in models]
    n_tok = corpus_scores[(models[0], final)]["n_tokens"].to_numpy()  # answers in the corpus
    # quanta scored: those with an answer in the probe set (all), or in the corpus
    present = (at_final[0]["n_tokens"].to_numpy() if probe is not None else n_tok) > 0
    if not present.any():
        raise PlantedError("no labelled answer token has a loss; do the losses tables and labels.parquet share doc_ids?")
    learned = np.stack([s["learned"].to_numpy() for s in at_final])  # (size, quantum)
    qloss = np.stack([s["mean_loss"].to_numpy() for s in at_final])  # (size, quantum)
    corpus_qloss = np.stack([corpus_scores[(m, final)]["mean_loss"].to_numpy() for m in models])

    per_model = {}
    for i, m in enumerate(models):
        lt = losses[(m, final)]["loss"].to_numpy()
        per_model[m] = {
            "non_embedding_params": int(param_counts[m]),
            "mean_loss": float(np.mean(lt)),
            "answer_loss": float(np.nansum(corpus_qloss[i] * n_tok) / max(1, n_tok.sum())),
            "n_learned": int(learned[i, present].sum()),
        }

    # Smallest size that learns each quantum; never learned -> len(models) (past the largest).
    first = np.where(learned.any(axis=0), learned.argmax(axis=0), len(models))
    rho = _spearman(rank[present], first[present])
    some = present & learned.any(axis=0)
    rho_learned = _spearman(rank[some], first[some])
    # Learned by a size but not by the next larger one: the quantization model says never.
    unlearned_again = int((learned[:-1] & ~learned[1:])[:, present].sum())

    # Reducible-loss scaling: answer tokens are (nearly) 0 nats for a perfect model, so their
    # mean loss is L - L_inf; the quantization model predicts a power law in N with exponent alpha.
    n_params = np.array([param_counts[m] for m in models], dtype=float)
    ans_loss = np.array([per_model[m]["answer_loss"] for m in models])
    alpha_n = float(-fits.ols(np.log(n_params), np.log(ans_loss))[0]) if len(models) > 1 else float("nan")

    metrics = {
        "models": per_model,
        "sizes": models,
        "final_revision": final,
        "n_quanta": int(K),
        "n_quanta_in_corpus": int((n_tok > 0).sum()),
        "n_quanta_scored": int(present.sum()),
        "learned_on": "probe set" if probe is not None else "corpus",
        "learned_definition": f">= {LEARNED_FRACTION:.0%} of a quantum's answer tokens under {LEARNED_LOSS} nats"
        + (" on the probe set" if probe is not None else " in the corpus"),
        "mean_loss_by_size": [per_model[m]["mean_loss"] for m in models],
        "n_learned_by_size": [per_model[m]["n_learned"] for m in models],
        "spearman_size_vs_n_learned": _spearman(np.arange(len(models)), learned[:, present].sum(axis=1)),
        "n_learned_strictly_increasing": bool(np.all(np.diff(learned[:, present].sum(axis=1)) > 0)),
        "spearman_rank_vs_first_size": float(rho),
        "spearman_rank_vs_first_size_learned_only": float(rho_learned),
        "n_never_learned": int((present & ~learned.any(axis=0)).sum()),
        "n_unlearned_at_larger_size": unlearned_again,
        "abruptness": _abruptness(learned, qloss, present),
        "answer_loss_alpha_N": alpha_n,
        "alpha_N_predicted": alpha,  # the quantization model: alpha_N = alpha
        "learned_count_scaling": learned_count_scaling(n_params, learned[:, present], n_boot, seed),
        "per_quantum": {
            "rank": rank.tolist(),
            "frequency": freq.tolist(),
            "n_eval_tokens": n_tok.tolist(),
            "first_size": [models[i] if i < len(models) else None for i in first],
            "loss_by_size": np.round(qloss, 4).T.tolist(),
        },
    }

    emergence = _emergence(scores, models, revs, freq, rank, present)
    if emergence is not None:
        metrics["emergence"] = emergence
    metrics["acceptance_failures"] = check_acceptance(metrics)
    return _nan_to_none(metrics)


def _abruptness(learned: np.ndarray, qloss: np.ndarray, present: np.ndarray) -> dict:
    """Abruptness over sizes, for quanta that the suite sees being acquired (not learned by the
    smallest size, learned by the largest): the largest drop of a quantum's loss between
    adjacent sizes as a fraction of its loss range over sizes. A slow slide over n sizes gives
    ~1/(n-1); a step gives ~1. learned, qloss: (size, quantum); present: (quantum,)."""
    n_models = learned.shape[0]
    trans = present & ~learned[0] & learned[-1]
    drops = qloss[:-1] - qloss[1:]  # (size pair, quantum)
    spread = qloss.max(axis=0) - qloss.min(axis=0)
    if n_models > 1:
        abrupt = np.where(trans & (spread > 0), drops.max(axis=0) / np.where(spread > 0, spread, 1), np.nan)[trans]
    else:  # one size: nothing is acquired between sizes
        abrupt = np.zeros(0)
    return {
        "definition": "max drop of a quantum's mean answer loss between adjacent sizes / its loss range over sizes",
        "n_quanta": int(trans.sum()),
        "median": float(np.median(abrupt)) if abrupt.size else float("nan"),
        "mean": float(np.mean(abrupt)) if abrupt.size else float("nan"),
        "q25": float(np.quantile(abrupt, 0.25)) if abrupt.size else float("nan"),
        "fraction_ge_0.5": float(np.mean(abrupt >= 0.5)) if abrupt.size else float("nan"),
        "slow_slide_reference": 1.0 / max(1, n_models - 1),
    }


def _emergence(scores: Mapping, models: Sequence[str], revs: Sequence[str], freq: np.ndarray, rank: np.ndarray,
               present: np.ndarray) -> Optional[dict]:
    """Emergence over training: the first checkpoint of the largest model from which on each
    quantum stays learned (None: not learned at the final checkpoint), and the log-log slope
    of that step against 1/p (the theory predicts 1). None without stepN checkpoints."""
    big = models[-1]
    step_revs = [r for r in revs if (big, r) in scores and step_of(r) is not None]
    if not step_revs:
        return None
    K = freq.size
    lr = np.stack([scores[(big, r)]["learned"].to_numpy() for r in step_revs])  # (ckpt, quantum)
    stays = np.flip(np.logical_and.accumulate(np.flip(lr, 0), axis=0), 0)  # learned here and after
    steps = np.array([step_of(r) for r in step_revs])
    emerge = [int(steps[stays[:, k].argmax()]) if stays[-1, k] else None for k in range(K)]
    ok = np.array([e is not None and e > 0 for e in emerge]) & present
    fit = {}
    if ok.sum() > 2:
        e = np.array([emerge[k] for k in np.flatnonzero(ok)], dtype=float)
        slope = fits.ols(np.log(1 / freq[ok]), np.log(e))[0]
        fit = {"slope_log_step_vs_log_inv_p": float(slope), "spearman_rank_vs_step": _spearman(rank[ok], e)}
    return {
        "model": big,
        "revisions": step_revs,
        "n_learned_by_revision": lr[:, present].sum(axis=1).astype(int).tolist(),
        "step": emerge,
        "predicted_slope": 1.0,
        **fit,
    }


def learned_count_scaling(n_params: np.ndarray, learned: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """β of n(N) ∝ N^β, the number of learned quanta against non-embedding parameters.

    n_params (size,), learned (size, quantum) bool. OLS of ln n on ln N over the sizes that
    learn at least one quantum; the percentile CI (95%) resamples quanta with replacement.
    The quantization model ties it to the loss exponent: L - L_inf ∝ n^-α gives
    α_N = α·β, so α_N / β estimates α (theory.py).
    """
    def fit(lrn: np.ndarray) -> float:
        n = lrn.sum(axis=1).astype(float)
        ok = n > 0
        if ok.sum() < 2:
            return float("nan")
        return float(fits.ols(np.log(n_params[ok]), np.log(n[ok]))[0])

    beta = fit(learned)
    rng = np.random.default_rng(seed)
    q = learned.shape[1]
    boots = np.array([fit(learned[:, rng.integers(q, size=q)]) for _ in range(n_boot)]) if q else np.array([])
    boots = boots[np.isfinite(boots)]
    ci = [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))] if boots.size else None
    return {"beta": beta, "beta_ci": ci, "n_learned": learned.sum(axis=1).astype(int).tolist(),
            "fit": "OLS of ln n_learned on ln N; CI: 95% percentile bootstrap over quanta"}


def _nan_to_none(x):
    """NaN -> None throughout, so metrics files are strict JSON (null, not NaN)."""
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


# The learned count must grow with size: rank correlation, not a rise at every step. The
# recipe's expected count (over init seeds) is itself not monotone at every width step
# (bench/RESULTS.md, "The planted ladder over init replicates"), so one run cannot be required.
LEARNED_COUNT_RHO = 0.9


def check_acceptance(metrics: dict) -> list[str]:
    """What the default planted suite must show (its acceptance criteria); [] when all hold.

    ``n_learned_strictly_increasing`` is reported beside them, as information."""
    fails = []
    ml, nl = metrics["mean_loss_by_size"], metrics["n_learned_by_size"]
    if not all(b < a for a, b in zip(ml, ml[1:])):
        fails.append(f"mean loss does not fall with every size step: {[round(x, 4) for x in ml]}")
    rho_n = metrics["spearman_size_vs_n_learned"]
    if rho_n is None or not rho_n >= LEARNED_COUNT_RHO:
        fails.append(f"the number of learned quanta does not grow with size: Spearman(size, n_learned) = "
                     f"{rho_n if rho_n is None else round(rho_n, 3)} < {LEARNED_COUNT_RHO} ({nl})")
    ci = metrics["learned_count_scaling"]["beta_ci"]
    if ci is None or not ci[0] > 0:
        fails.append(f"the learned-count exponent's CI {ci} does not exclude 0")
    rho = metrics["spearman_rank_vs_first_size"]
    if rho is None or not rho >= 0.8:
        fails.append(f"Spearman(frequency rank, smallest learning size) = {rho if rho is None else round(rho, 3)} < 0.8")
    ab = metrics["abruptness"]
    if not ab["n_quanta"] >= 10:
        fails.append(f"only {ab['n_quanta']} quanta are acquired within the suite (< 10): abruptness is not measurable")
    elif ab["median"] is None or not ab["median"] >= 0.5:
        fails.append(f"median abruptness {ab['median']:.3f} < 0.5: quanta slide rather than drop with size")
    return fails


def evaluate(
    root: str | Path,
    losses_dir: str | Path,
    models: Sequence[str],
    revisions: Sequence[str],
    alpha: Optional[float] = None,
) -> dict:
    """Read the planted ground truth under `root` and the losses tables under `losses_dir`; score them."""
    root, losses_dir = Path(root), Path(losses_dir)
    labels = suite.read_labels(root)
    quanta = suite.read_quanta(root)
    final = sorted(revisions, key=lambda r: (step_of(r) is None, step_of(r) or 0))[-1]
    losses = {}
    for m in models:
        for r in revisions:
            losses[(m, r)] = partitions.read_loss_partition(losses_dir, m, r).to_pandas()
    probe = None
    by_model = suite.read_probe_losses(root, models)
    if by_model is not None:
        probe = {(m, r): df[df["revision"] == r] for m, df in by_model.items() for r in revisions}
    # N as every scaling fit takes it: the losses stage's count of the loaded model
    counts = {m: int(partitions.read_n_params(losses_dir, m, final)) for m in models}
    return compute_metrics(labels, quanta, losses, counts, revisions, alpha=alpha, probe=probe)
