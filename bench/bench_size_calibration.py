"""Calibration of the cluster-size exponent: each estimator's bias in α on clusterings of planted runs.

The planted suite knows its exponent (rule k is used with frequency ∝ k^-(α+1), so the
sizes of the recovered quanta should fall as rank^-b with b = α + 1). A clustering and
an estimator each add their own error to the b a run reports; this script measures the
sum, estimate - truth in α, for every (α, seed, N, method, k or cut, estimator):

- runs: finished planted run directories (a clone where `dvc repro` has run); α and the
  seed come from each run's params.yaml;
- N: seeded subsamples of the run's selected samples (the run's own size included), the
  affinity rebuilt from their gradients as the similarity stage builds it, in mode knn
  for the kNN methods and dense for the dense ones (the run's other similarity params);
- methods (pipeline.qdg.clustering, the run's cluster params otherwise):
  knn_average with the data-chosen cut (``data``) and cut at fixed k; agglomerative
  (dense) at fixed k; leiden at its own resolution (``natural``); spectral at k = 50
  (dense, ``--spectral``); and ``perfect``, the planted quanta of the subsample, which
  is the estimator's error alone;
- estimators (pipeline.laws.cluster_sizes): ``rank_mle`` (finite-Zipf MLE over the ranks),
  ``csn`` (discrete tail MLE, xmin by KS; its b = 1/(γ-1)) on each clustering, and
  ``envelope`` (the paper's OLS of the envelope across the method's k sweep, every rank,
  as the powerlaw stage fits it with envelope_rank_lo: 1, envelope_rank_hi: null) once
  per sweep (setting ``sweep``). A single cut (data, natural, spectral at one k) has no
  sweep, so no envelope; for ``perfect`` the envelope of the one partition is OLS over
  its ranks.

    python bench/bench_size_calibration.py /tmp/s0 /tmp/s1 ... --json rows.json \
        [--sizes 1000 2000 4000] [--ks 25 50 100] [--spectral] [--table out.md] \
        [--calibration pipeline/laws/size_calibration.json]

It prints two markdown tables of the bias in α (mean ± sd (runs)) per (method, setting,
estimator): pooled over α and seeds, by N; and per planted α (over seeds), by α and N. With
--calibration it writes the pooled one, with each α's mean beside it, as the file
pipeline/laws/size_calibration.py reads. --rows adds rows of earlier runs (their --json).
It reports the seconds each part took per run and N.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core import config  # noqa: E402
from pipeline.core.errors import QuantaError  # noqa: E402
from pipeline.laws import cluster_sizes as pl  # noqa: E402
from pipeline.planted import suite  # noqa: E402
from pipeline.qdg import clustering, gradient_files  # noqa: E402
from pipeline.qdg import similarity as sim  # noqa: E402
from pipeline.qdg.selection import read_samples  # noqa: E402

ESTIMATORS = ("rank_mle", "csn", "envelope")


def one_cut(sizes: np.ndarray) -> dict[str, dict]:
    """{estimator: {b} or {reason}} for the rank MLE and CSN on one clustering's sizes."""
    out = {}
    for name, fit in (("rank_mle", pl.fit_rank_mle), ("csn", lambda s: pl.fit_discrete_power_law(s).rank_exponent)):
        try:
            b = fit(sizes)
        except QuantaError as e:
            out[name] = {"reason": str(e)}
            continue
        out[name] = {"reason": "not fittable"} if b is None else {"b": float(b)}
    return out


def envelope(labels_by_k: dict) -> dict:
    """{b} of the envelope OLS over every rank of the sweep, or {reason}."""
    try:
        env = pl.size_envelope(labels_by_k)
        return {"b": pl.envelope_slope(labels_by_k, 1, int(env.size)).rank_exponent}
    except QuantaError as e:
        return {"reason": str(e)}


def ari(truth: np.ndarray, labels: np.ndarray) -> float:
    """ARI over the samples the clustering assigned (-1 left out)."""
    from sklearn.metrics import adjusted_rand_score

    keep = labels >= 0
    return round(float(adjusted_rand_score(truth[keep], labels[keep])), 4)


def result_rows(base: dict, method: str, setting, fits: dict, extra: dict | None) -> list[dict]:
    """One row per estimator of `fits`, with α = b - 1 and its bias against base["alpha"]."""
    rows = []
    for est, r in fits.items():
        row = {**base, "method": method, "setting": str(setting), "estimator": est, **r, **(extra or {})}
        if r.get("b") is not None:
            row["alpha_hat"] = r["b"] - 1.0
            row["bias"] = r["b"] - 1.0 - base["alpha"]
        rows.append(row)
    return rows


def evaluate_run(run: Path, sizes: list[int], ks: list[int], with_spectral: bool,
                 n_neighbors: int | None = None) -> list[dict]:
    params = run / "params.yaml"
    planted = config.load("planted", params)
    sim_cfg = config.load("similarity", params)
    cl_cfg = config.load("cluster", params)
    if n_neighbors is not None:  # the kNN graphs of similarity and of the cluster stage alike
        sim_cfg = dataclasses.replace(sim_cfg, n_neighbors=n_neighbors)
        cl_cfg = dataclasses.replace(cl_cfg, n_neighbors=n_neighbors)
    grads = np.asarray(gradient_files.read_gradients(run / "cache/qdg/gradients.npy"))
    bad = gradient_files.read_bad(run / "cache/qdg/gradients.parquet")
    truth_all = suite.sample_quanta(run / "cache/planted", read_samples(run / "cache/qdg/samples.parquet"))
    rows = []
    for n in sizes:
        if n > len(grads):
            print(f"{run}: N = {n} > its {len(grads)} samples, skipped", file=sys.stderr)
            continue
        rng = np.random.default_rng([planted.seed, n])
        sub = np.sort(rng.choice(len(grads), n, replace=False)) if n < len(grads) else np.arange(len(grads))
        sub_bad = None if bad is None else np.asarray(bad)[sub]
        base = {"run": str(run), "alpha": planted.alpha, "seed": planted.seed, "n_samples": int(n)}

        def add(method, setting, fits, extra=None, base=base):
            rows.extend(result_rows(base, method, setting, fits, extra))

        t0 = time.perf_counter()
        knn, ids, _ = sim.compute(grads[sub], sub_bad, dataclasses.replace(sim_cfg, mode="knn"))
        truth = truth_all[sub][ids]
        quanta = truth[truth >= 0]
        add("perfect", "planted", {**one_cut(pl.cluster_sizes(truth)), "envelope": envelope({0: truth})},
            extra={"n_clusters": int(np.unique(quanta).size)})

        tree = clustering.knn_average_tree(knn, cl_cfg.n_neighbors)
        natural = clustering.data_cut(tree, cl_cfg.min_cluster_size, cl_cfg.max_outlier_score)
        add("knn_average", "data", one_cut(pl.cluster_sizes(natural)),
            extra={"n_clusters": int(natural.max()) + 1, "unassigned": round(float(np.mean(natural < 0)), 4),
                   "ari": ari(truth, natural)})
        fixed = clustering.knn_average(knn, ks, cl_cfg, tree=tree)
        for k in ks:
            add("knn_average", k, one_cut(pl.cluster_sizes(fixed[k])),
                extra={"n_clusters": int(pl.cluster_sizes(fixed[k]).size), "ari": ari(truth, fixed[k])})
        add("knn_average", "sweep", {"envelope": envelope(fixed)}, extra={"sweep": ks})
        lei = clustering.leiden_natural(knn, cl_cfg)
        add("leiden", "natural", one_cut(pl.cluster_sizes(lei)),
            extra={"n_clusters": int(lei.max()) + 1, "ari": ari(truth, lei)})
        t1 = time.perf_counter()

        dense, ids_d, _ = sim.compute(grads[sub], sub_bad, dataclasses.replace(sim_cfg, mode="dense"))
        assert np.array_equal(ids, ids_d)
        agg = clustering.agglomerative(dense, ks, cl_cfg.min_cluster_size)
        for k in ks:
            add("agglomerative", k, one_cut(pl.cluster_sizes(agg[k])),
                extra={"n_clusters": int(pl.cluster_sizes(agg[k]).size), "ari": ari(truth, agg[k])})
        add("agglomerative", "sweep", {"envelope": envelope(agg)}, extra={"sweep": ks})
        t2 = time.perf_counter()
        if with_spectral:
            spec = clustering.spectral(dense, [50], cl_cfg)[50]
            add("spectral", 50, one_cut(pl.cluster_sizes(spec)),
                extra={"n_clusters": int(pl.cluster_sizes(spec).size), "ari": ari(truth, spec)})
        t3 = time.perf_counter()
        del dense
        print(f"{run} α={planted.alpha} seed={planted.seed} N={n}: knn + leiden {t1 - t0:.1f} s, "
              f"agglomerative {t2 - t1:.1f} s, spectral {t3 - t2:.1f} s", file=sys.stderr, flush=True)
    return rows


def aggregate(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Mean, sd (ddof 1; None for one value) and count of the bias per group of `keys`;
    the fits that failed are counted apart (n_failed)."""
    groups: dict[tuple, list] = defaultdict(list)
    failed: dict[tuple, int] = defaultdict(int)
    for r in rows:
        key = tuple(r[k] for k in keys)
        if r.get("bias") is None:
            failed[key] += 1
            groups.setdefault(key, [])
        else:
            groups[key].append(r["bias"])
    out = []
    for key, v in groups.items():
        a = np.asarray(v, dtype=np.float64)
        out.append({**dict(zip(keys, key)), "bias": float(a.mean()) if a.size else None,
                    "sd": float(a.std(ddof=1)) if a.size > 1 else None, "n": int(a.size), "n_failed": failed[key]})
    return out


def setting_order(s: str) -> tuple:
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


METHOD_ORDER = ["perfect", "knn_average", "agglomerative", "leiden", "spectral"]


def table(agg: list[dict], columns: tuple[str, ...]) -> str:
    """A wide markdown table: one line per (method, k or cut, estimator), one column per value
    of `columns` (e.g. ("n_samples",) or ("alpha", "n_samples")), cells "mean ± sd (n)"."""
    cols = sorted({tuple(r[c] for c in columns) for r in agg})
    lines = sorted({(r["method"], r["setting"], r["estimator"]) for r in agg},
                   key=lambda m: (METHOD_ORDER.index(m[0]), setting_order(m[1]), ESTIMATORS.index(m[2])))
    cell = {(r["method"], r["setting"], r["estimator"], tuple(r[c] for c in columns)): r for r in agg}

    def name(c):
        return ", ".join(f"α = {v}" if k == "alpha" else f"N = {v:,}" for k, v in zip(columns, c))

    def fmt(r):
        if r is None:
            return ""
        if r["bias"] is None:
            return f"– ({r['n_failed']} failed)"
        sd = "" if r["sd"] is None else f" ± {r['sd']:.3f}"
        failed = f", {r['n_failed']} failed" if r["n_failed"] else ""
        return f"{r['bias']:+.3f}{sd} ({r['n']}{failed})"

    out = ["| method | k or cut | estimator | " + " | ".join(name(c) for c in cols) + " |",
           "|" + " --- |" * (3 + len(cols))]
    for m in lines:
        out.append(f"| {m[0]} | {m[1]} | {m[2]} | " + " | ".join(fmt(cell.get((*m, c))) for c in cols) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000])
    ap.add_argument("--ks", type=int, nargs="+", default=[25, 50, 100])
    ap.add_argument("--spectral", action="store_true", help="also spectral at k = 50 (dense; slower)")
    ap.add_argument("--n-neighbors", type=int, default=None, help="similarity and cluster n_neighbors (default: the run's)")
    ap.add_argument("--json", type=Path, default=None, help="every row")
    ap.add_argument("--rows", type=Path, nargs="*", default=[], help="rows from earlier runs to aggregate with")
    ap.add_argument("--table", type=Path, default=None, help="the markdown tables")
    ap.add_argument("--calibration", type=Path, default=None, help="the pooled table for pipeline/laws/size_calibration.py")
    args = ap.parse_args()
    rows = [r for p in args.rows for r in json.loads(p.read_text())]
    for run in args.runs:
        if not (run / "cache/qdg/similarity").exists():
            print(f"{run}: no cache/qdg/similarity (not a finished run), skipped", file=sys.stderr)
            continue
        rows += evaluate_run(run, args.sizes, args.ks, args.spectral, args.n_neighbors)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
    by_alpha = aggregate(rows, ("alpha", "n_samples", "method", "setting", "estimator"))
    pooled = aggregate(rows, ("n_samples", "method", "setting", "estimator"))
    text = ("## Bias in α pooled over planted α and seeds: mean ± sd (runs)\n\n" + table(pooled, ("n_samples",))
            + "\n\n## Bias in α per planted α: mean ± sd over seeds (runs)\n\n" + table(by_alpha, ("alpha", "n_samples"))
            + "\n")
    print(text)
    if args.table:
        args.table.write_text(text)
    if args.calibration:
        alphas = sorted({r["alpha"] for r in rows})
        for p in pooled:
            p["by_alpha"] = {str(a): next((q["bias"] for q in by_alpha if q["alpha"] == a and all(
                q[k] == p[k] for k in ("n_samples", "method", "setting", "estimator"))), None) for a in alphas}
        doc = {
            "what": "bias in α (estimate - truth) of each cluster-size exponent estimator, per (N, method, k or cut), "
                    "on planted runs; pooled over planted α and seeds",
            "made_by": "python bench/bench_size_calibration.py (docs/cluster-size-calibration.md)",
            "alphas": alphas, "seeds": sorted({r["seed"] for r in rows}),
            "rows": sorted(pooled, key=lambda r: (r["method"], r["estimator"], setting_order(r["setting"]), r["n_samples"])),
        }
        args.calibration.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
