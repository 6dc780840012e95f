"""pipeline/laws/size_calibration.py: the nearest calibrated bias of a cluster-size exponent, and
the powerlaw stage reporting it next to each estimate (metrics/powerlaw.json ``calibration``)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.core import files, stage
from pipeline.laws import size_calibration as sc


def _row(n, method, setting, estimator, bias, sd=0.01, count=3):
    return {"n_samples": n, "method": method, "setting": str(setting), "estimator": estimator,
            "bias": bias, "sd": sd, "n": count, "n_failed": 0}


TABLE = {"rows": [
    _row(1000, "knn_average", "data", "rank_mle", -0.10),
    _row(4000, "knn_average", "data", "rank_mle", -0.02),
    _row(1000, "knn_average", 25, "rank_mle", -0.30),
    _row(1000, "knn_average", 50, "rank_mle", -0.50),
    _row(4000, "knn_average", 50, "rank_mle", -0.05),
    _row(4000, "knn_average", 100, "rank_mle", -0.40),
    _row(4000, "knn_average", "sweep", "envelope", -0.20),
    _row(4000, "leiden", "natural", "rank_mle", None),  # every fit failed: not a calibration
]}


def test_exact_match():
    c = sc.calibrated_bias(4000, "data", "knn_average", "rank_mle", TABLE)
    assert c["bias"] == -0.02 and c["exact"] is True
    assert c["matched"] == {"n_samples": 4000, "method": "knn_average", "k": "data", "estimator": "rank_mle"}
    c = sc.calibrated_bias(4000, 100, "knn_average", "rank_mle", TABLE)
    assert c["bias"] == -0.40 and c["matched"]["k"] == 100 and c["exact"] is True


def test_nearest_n_and_k_on_log_scale():
    # N = 3000 is nearer 4000 than 1000 on a log scale (and on a linear one); 1500 nearer 1000
    assert sc.calibrated_bias(3000, "data", "knn_average", "rank_mle", TABLE)["matched"]["n_samples"] == 4000
    c = sc.calibrated_bias(1500, "data", "knn_average", "rank_mle", TABLE)
    assert c["matched"]["n_samples"] == 1000 and c["bias"] == -0.10 and c["exact"] is False
    # k = 40: 50 (log ratio 1.25) before 25 (1.6); then N = 1000's row for k = 50
    c = sc.calibrated_bias(1200, 40, "knn_average", "rank_mle", TABLE)
    assert c["matched"] == {"n_samples": 1000, "method": "knn_average", "k": 50, "estimator": "rank_mle"}
    assert c["bias"] == -0.50
    # k = 70: log-nearer 50 (1.4) than 100 (1.43); the k is matched first, then N among its rows
    c = sc.calibrated_bias(3000, 70, "knn_average", "rank_mle", TABLE)
    assert c["matched"]["k"] == 50 and c["matched"]["n_samples"] == 4000
    assert sc.calibrated_bias(4000, "sweep", "knn_average", "envelope", TABLE)["bias"] == -0.20


def test_outside_the_table_is_none():
    assert sc.calibrated_bias(10_000, "data", "knn_average", "rank_mle", TABLE) is None  # > 2x the largest N
    assert sc.calibrated_bias(400, "data", "knn_average", "rank_mle", TABLE) is None  # < half the smallest
    assert sc.calibrated_bias(4000, 400, "knn_average", "rank_mle", TABLE) is None  # k > 2x the largest k
    assert sc.calibrated_bias(4000, 50, "spectral", "rank_mle", TABLE) is None  # method not calibrated
    assert sc.calibrated_bias(4000, "natural", "knn_average", "rank_mle", TABLE) is None  # setting not calibrated
    assert sc.calibrated_bias(4000, "data", "knn_average", "csn", TABLE) is None  # estimator not calibrated
    assert sc.calibrated_bias(4000, "natural", "leiden", "rank_mle", TABLE) is None  # no bias: failed fits


def test_shipped_table_covers_the_default_run():
    """The file in the package is what the stage reads: the default run's setting is in it."""
    rows = sc.load()["rows"]
    assert {"n_samples", "method", "setting", "estimator", "bias", "sd", "n"} <= set(rows[0])
    for est, at in (("rank_mle", "data"), ("csn", "data"), ("envelope", "sweep")):
        c = sc.calibrated_bias(4000, at, "knn_average", est)
        assert c is not None and c["exact"] and c["n"] >= 2


def _stage_inputs(tmp_path, meta, n=4000, seed=0):
    """A clusters table of n samples in Zipf-sized clusters (sweep k = 50, 25), its config
    stored as the cluster stage stores it (or none), samples, and a planted dir without truth."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, 51) ** -1.5
    lab = rng.choice(50, n, p=p / p.sum()).astype(np.int32)
    lab25 = np.minimum(lab, 24).astype(np.int32)
    clusters = pd.DataFrame({"sample": np.arange(n, dtype=np.int32), "cluster": lab, "k50": lab, "k25": lab25})
    files.write_parquet(clusters, tmp_path / "clusters.parquet", config=meta)
    samples = pd.DataFrame({"sample": np.arange(n, dtype=np.int32), "doc_id": np.arange(n, dtype=np.int64),
                            "pos": np.ones(n, dtype=np.int32), "token_id": np.zeros(n, dtype=np.int32)})
    files.write_parquet(samples, tmp_path / "samples.parquet")
    (tmp_path / "planted").mkdir()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"powerlaw": {"n_boot_ci": 0, "n_boot_gof": 0, "envelope_rank_lo": 1,
                                                   "envelope_rank_hi": None}}))
    return ["--params", str(params), "--clusters", str(tmp_path / "clusters.parquet"),
            "--samples", str(tmp_path / "samples.parquet"), "--planted", str(tmp_path / "planted"),
            "--metrics", str(tmp_path / "powerlaw.json"), "--plots", str(tmp_path / "plots")]


def test_powerlaw_stage_reports_the_calibration_next_to_each_estimate(tmp_path):
    from stages import powerlaw

    meta = {"method": "knn_average", "cut": "data", "n_clusters": [50, 25], "main_k": 50}
    stage.run(powerlaw.main, _stage_inputs(tmp_path, meta))
    m = json.loads((tmp_path / "powerlaw.json").read_text())
    cal = m["calibration"]
    assert cal["setting"]["method"] == "knn_average" and cal["setting"]["k"] == "data"
    assert cal["setting"]["n_samples"] == 4000
    for est, key, at in (("rank_mle", "rank_mle", "data"), ("csn", "mle", "data"), ("envelope", "envelope", "sweep")):
        want = sc.calibrated_bias(4000, at, "knn_average", est)
        c = cal[est]
        assert c["bias"] == want["bias"] and c["matched"] == want["matched"]
        assert c["alpha"] == m[key]["alpha"]
        assert c["corrected_alpha"] == pytest.approx(m[key]["alpha"] - want["bias"])


def test_powerlaw_stage_fixed_cut_and_missing_config(tmp_path):
    from stages import powerlaw

    # agglomerative, main k = 50 (cut: data is knn_average's alone): the rank MLE is read at k = 50
    meta = {"method": "agglomerative", "cut": "data", "n_clusters": [50, 25], "main_k": 50}
    (tmp_path / "a").mkdir()
    stage.run(powerlaw.main, _stage_inputs(tmp_path / "a", meta))
    cal = json.loads((tmp_path / "a" / "powerlaw.json").read_text())["calibration"]
    assert cal["setting"]["k"] == 50 and cal["rank_mle"]["matched"]["k"] == 50
    assert cal["rank_mle"]["matched"]["method"] == "agglomerative"
    # a clusters table without the stored config: each estimate says why it has no calibration
    (tmp_path / "b").mkdir()
    stage.run(powerlaw.main, _stage_inputs(tmp_path / "b", None))
    cal = json.loads((tmp_path / "b" / "powerlaw.json").read_text())["calibration"]
    assert all("no cluster config" in cal[e]["skipped"] for e in ("rank_mle", "csn", "envelope"))
