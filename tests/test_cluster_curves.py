"""Cluster curves: each cluster's loss over sizes and checkpoints, its emergence with censoring
and member-bootstrap CIs, and the frequency ordering on clusters, on loss tables written
out by hand so that every number can be checked."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import CurvesConfig
from pipeline.core.files import write_meta, write_parquet
from pipeline.laws import cluster_curves as cc
from pipeline.lm import partitions


def test_emergence_index_is_the_first_learned_point():
    learned = np.array([[True, True, True], [False, True, False], [False, False, True], [False, False, False]])
    assert cc.emergence_index(learned).tolist() == [0, 1, 2, 3]  # 3 = learned at no point (right censored)


def test_abruptness_one_step_against_an_even_slide():
    assert cc.abruptness([2.0, 2.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert cc.abruptness([3.0, 2.0, 1.0, 0.0]) == pytest.approx(1 / 3)
    assert cc.abruptness([2.0, 1.0, 1.5, 0.5]) == pytest.approx(1.0 / 2.0)  # drops 1 and 1; the rise is not netted
    assert cc.abruptness([1.0, 1.0]) is None and cc.abruptness([1.0]) is None


def _write(root, model, revision, doc, pos, loss, n_params):
    out = partitions.partition_dir(root, model, revision)
    write_parquet(pd.DataFrame({"doc_id": np.asarray(doc, np.int64), "pos": np.asarray(pos, np.int32),
                                "loss": np.asarray(loss, np.float32)}), out / "part-00000.parquet")
    write_meta({"model": model, "revision": revision, "params": {"non_embedding": n_params}}, out / partitions.META_FILE)


def test_member_losses_align_on_doc_and_pos(tmp_path):
    _write(tmp_path, "m", "main", [5, 5, 2, 9], [1, 2, 1, 3], [0.5, 0.25, 1.0, 2.0], 10)
    got = cc.member_losses(tmp_path, "m", "main", np.array([2, 5, 9, 7]), np.array([1, 2, 3, 1]))
    assert got[:3].tolist() == [1.0, 0.25, 2.0] and np.isnan(got[3])  # (7, 1) is not in the table


def _suite(tmp_path, n_per=40):
    """Three sizes (N = 10, 100, 1000) at step2, and the largest at step1 and step2. Cluster c
    (n_per members each) is learned from size c on: cluster 0 by the smallest, cluster 3 by
    none; over training, clusters 0 and 1 are learned at step1, the others at step2 only."""
    k = 4
    labels = np.repeat(np.arange(k), n_per)
    doc = np.arange(labels.size, dtype=np.int64) + 100
    pos = np.ones(labels.size, np.int64)
    for i, (m, n) in enumerate((("s", 10), ("m", 100), ("l", 1000))):
        loss = np.where(labels <= i, 0.01, 3.0 - i)
        _write(tmp_path, m, "step2", doc, pos, loss, n)
        early = np.where(labels <= 1, 0.01, 3.5) if m == "l" else np.full(labels.size, 4.0)
        _write(tmp_path, m, "step1", doc, pos, early, n)
    samples = pd.DataFrame({"doc_id": doc, "pos": pos})
    summary = pd.DataFrame({"cluster": np.arange(k), "label": [f"r{c}" for c in range(k)],
                            "label_corpus_share": [0.4, 0.3, 0.2, 0.1]})
    return samples, labels, summary


def test_run_curves_emergence_and_ordering(tmp_path):
    samples, labels, summary = _suite(tmp_path)
    cfg = CurvesConfig(n_boot=200)
    res = cc.run(tmp_path, samples, labels, summary, models=["s", "m", "l"], revisions=["step1", "step2"],
                 select_model="l", size_revision="step2", step_model="l", max_loss=0.1, cfg=cfg)
    curves = res.curves.to_pandas()
    assert len(curves) == 4 * 3 * 2 and set(curves.columns) == set(cc.CURVE_SCHEMA.names)
    row = curves[(curves.cluster == 1) & (curves.model == "s") & (curves.revision == "step2")].iloc[0]
    assert row["n"] == 40 and row["mean_loss"] == pytest.approx(3.0) and row["frac_learned"] == 0.0
    assert row["n_params"] == 10 and row["step"] == 2
    e = res.emergence.set_index("cluster")
    assert e["n_star_index"].tolist() == [0, 1, 2, 3]
    assert e["n_star_censored"].tolist() == ["left", "none", "none", "right"]
    assert e.loc[1, "n_star"] == 100 and pd.isna(e.loc[3, "n_star"])
    # every member agrees: the bootstrap cannot move the CI off the point
    assert e.loc[2, "n_star_lo"] == e.loc[2, "n_star_hi"] == 1000
    assert e["s_star_index"].tolist() == [0, 0, 1, 2] and e.loc[2, "s_star"] == 2
    assert e.loc[1, "abrupt_size"] == pytest.approx(1.0)  # 3.0 -> 0.01 in one step, then flat
    assert e["share"].tolist() == [0.25] * 4
    size = res.metrics["size"]
    assert size["n_left_censored"] == 1 and size["n_right_censored"] == 1
    # the rule share falls as N* rises: a perfect negative rank correlation, censored clusters included
    assert size["rule_share_of_corpus"]["rho"] == pytest.approx(-1.0)
    assert size["rule_share_of_corpus"]["rho_uncensored"] is None  # two uncensored clusters: undefined
    assert size["share_of_samples"]["rho"] is None  # equal shares: undefined, not 0
    assert size["points"] == [["s", "step2"], ["m", "step2"], ["l", "step2"]] and size["x"] == [10.0, 100.0, 1000.0]


def test_bootstrap_ci_widens_with_a_split_cluster(tmp_path):
    """Half of a cluster's members learned from the middle size, half from the largest: with
    learned_fraction 0.5 the point is the middle size and resampling reaches both."""
    labels = np.zeros(40, int)
    labels[:2] = 1  # a second cluster, so that there is a clustering
    doc, pos = np.arange(40, dtype=np.int64), np.ones(40, np.int64)
    late = np.arange(40) % 2 == 0
    for m, n, loss in (("s", 10, np.full(40, 3.0)), ("m", 100, np.where(late, 3.0, 0.01)), ("l", 1000, np.full(40, 0.01))):
        _write(tmp_path, m, "main", doc, pos, loss, n)
    res = cc.run(tmp_path, pd.DataFrame({"doc_id": doc, "pos": pos}), labels, pd.DataFrame({"cluster": [0, 1]}),
                 models=["s", "m", "l"], revisions=["main"], select_model="l", size_revision="main", step_model="l",
                 max_loss=0.1, cfg=CurvesConfig(learned_fraction=0.5, n_boot=300))
    e = res.emergence.set_index("cluster")
    assert e.loc[0, "n_star"] == 100 and e.loc[0, "n_star_lo"] == 100 and e.loc[0, "n_star_hi"] == 1000
    assert "skipped" in res.metrics["step"]  # no stepN revision: no training axis


def test_one_model_skips_both_axes_with_a_reason(tmp_path):
    labels = np.array([0, 0, 1, 1])
    doc, pos = np.arange(4, dtype=np.int64), np.ones(4, np.int64)
    _write(tmp_path, "only", "main", doc, pos, [0.01] * 4, 10)
    res = cc.run(tmp_path, pd.DataFrame({"doc_id": doc, "pos": pos}), labels, pd.DataFrame({"cluster": [0, 1]}),
                 models=["only"], revisions=["main"], select_model="only", size_revision="main", step_model="only",
                 max_loss=0.1, cfg=CurvesConfig(n_boot=10))
    assert "at least 2" in res.metrics["size"]["skipped"] and "at least 2" in res.metrics["step"]["skipped"]
    assert res.emergence["n_star"].isna().all() and len(res.curves) == 2


def test_tokenizer_mismatch_names_the_models_skipped():
    out = cc.tokenizer_mismatch({"a": "t1", "b": "t1", "c": "t2"}, "a")
    assert list(out) == ["c"] and "select.model a" in out["c"]


def test_planted_check_against_the_majority_quantum():
    emergence = pd.DataFrame({"cluster": [0, 1, 2], "share": [0.5, 0.3, 0.2], "n_star_index": [0, 1, 2],
                              "s_star_index": [0, 1, 1]})
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    quanta = np.array([5, 5, 1, 1, 1, -1, -1, 0])  # cluster 0 -> quantum 5, 1 -> 1, 2 -> none (-1 majority)
    scorecard = {"sizes": ["a", "b", "c"], "per_quantum": {"first_size": ["c", "b", None, None, None, "a"],
                                                           "frequency": [0.1, 0.2, 0.0, 0.0, 0.0, 0.7]},
                 "emergence": {"step": [None, 50, None, None, None, 10]}}
    out = cc.planted_check(emergence, labels, quanta, scorecard)
    assert out["n_clusters"] == 2 and out["n_no_quantum"] == 1
    # two clusters: too few for a rank correlation, so the target is reported as failed, not passed
    assert out["size"]["spearman_vs_truth"] is None and not out["pass"]


def test_planted_check_passes_when_the_order_matches_the_truth():
    emergence = pd.DataFrame({"cluster": [0, 1, 2, 3], "share": [0.4, 0.3, 0.2, 0.1], "n_star_index": [0, 1, 2, 3],
                              "s_star_index": [0, 1, 1, 2]})
    labels = np.repeat(np.arange(4), 3)
    quanta = np.repeat([0, 1, 2, 3], 3)
    scorecard = {"sizes": ["a", "b", "c"], "per_quantum": {"first_size": ["a", "b", "c", None],
                                                           "frequency": [0.4, 0.3, 0.2, 0.1]},
                 "emergence": {"step": [10, 50, 50, None]}}
    out = cc.planted_check(emergence, labels, quanta, scorecard)
    assert out["size"]["spearman_vs_truth"] == pytest.approx(1.0) and out["step"]["spearman_vs_truth"] == pytest.approx(1.0)
    assert out["size"]["frequency_rho_truth"] == pytest.approx(-1.0) and out["pass"]
    flipped = emergence.assign(n_star_index=[3, 2, 1, 0])
    bad = cc.planted_check(flipped, labels, quanta, scorecard)
    assert not bad["pass"] and "size" in bad["failures"][0]
