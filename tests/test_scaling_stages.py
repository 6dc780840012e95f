"""The scaling-analysis stages: scaling.run (L(N) and L(S) from hive loss tables),
dynamics.run, cluster_sizes.analyze_clusters, theory.theory_table, the plots, and the stage
mains' one-line errors. Loss tables, labels and cluster tables are built here, small.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core import config, files, stage
from pipeline.core.config import DynamicsConfig, PowerlawConfig, ScalingConfig, TheoryConfig
from pipeline.laws import cluster_sizes, dynamics, scaling, theory
from pipeline.report import plots

N4 = {"m-s": 1e4, "m-m": 4e4, "m-l": 1.6e5, "m-xl": 6.4e5}  # 4 models: E + A·N^-α needs >= 4 points
STEPS = [100, 300, 1000, 3000, 10000]


def write_losses(root: Path, model: str, revision: str, doc, pos, loss, n_params: float) -> None:
    d = root / f"model={model}" / f"revision={revision}"
    d.mkdir(parents=True, exist_ok=True)
    files.write_parquet(pd.DataFrame({"doc_id": np.asarray(doc, np.int64), "pos": np.asarray(pos, np.int32),
                                   "loss": np.asarray(loss, np.float32)}), d / "part-00000.parquet")
    (d / "_meta.json").write_text(json.dumps({"params": {"non_embedding": n_params, "total": n_params * 2}}))


def power_suite(root: Path, alpha_n=0.4, alpha_s=0.3, E=1.5, n_docs=60, doc_len=20, seed=0, models=N4, steps=STEPS):
    """Every token's loss = E + (A N^-α_N + B S^-α_S)·(1 + noise): known α_N and α_S."""
    rng = np.random.default_rng(seed)
    doc = np.repeat(np.arange(n_docs), doc_len)
    pos = np.tile(np.arange(1, doc_len + 1), n_docs)
    noise = rng.normal(0, 0.2, doc.size)  # per token, the same under every model and step
    for m, N in models.items():
        for s in steps:
            loss = E + (50.0 * N ** -alpha_n + 20.0 * s ** -alpha_s) * (1 + noise)
            write_losses(root, m, f"step{s}", doc, pos, loss, N)
    return list(models), [f"step{s}" for s in steps]


CFG = ScalingConfig(n_boot=50)


def test_run_recovers_alpha_n_and_alpha_s(tmp_path):
    models, revs = power_suite(tmp_path)
    res = scaling.run(tmp_path, models, revs, CFG)
    m = res.metrics
    assert m["revision"] == "step10000" and m["models"] == ["m-s", "m-m", "m-l", "m-xl"]
    # At the last step the S term is a constant: L(N) = E' + 50(1+ε) N^-0.4
    assert m["mean_loss"]["converged"] and m["mean_loss"]["alpha_N"] == pytest.approx(0.4, abs=0.02)
    lo, hi = m["mean_loss"]["alpha_ci"]
    assert lo <= m["mean_loss"]["alpha_N"] <= hi
    for model in models:  # L(S) = E'' + 20(1+ε) S^-0.3 for every model
        c = m["learning_curves"][model]
        assert c["converged"] and c["alpha_S"] == pytest.approx(0.3, abs=0.02), c
        assert c["steps"] == STEPS and len(c["mean_loss"]) == len(STEPS)
    assert m["alpha_S"]["model"] == "m-xl" and m["alpha_S"]["alpha_S"] == pytest.approx(0.3, abs=0.02)
    json.dumps(m)  # the metrics are plain JSON


def test_learning_curve_window_and_too_few_checkpoints(tmp_path):
    models, revs = power_suite(tmp_path)
    c = scaling.learning_curve_fit(tmp_path, "m-l", revs, dataclasses.replace(CFG, step_lo=300, step_hi=3000))
    assert c["steps"] == [300, 1000, 3000]
    assert c["converged"] is False and "points for 3 parameters" in c["reason"]  # 3 points, 3 parameters
    assert c["alpha_S"] is None  # not fitted: None, never NaN
    c = scaling.learning_curve_fit(tmp_path, "m-l", revs + ["main"], dataclasses.replace(CFG, step_lo=5000))
    assert "skipped" in c and "at least 2" in c["skipped"]


def test_flat_curve_is_reported_not_converged(tmp_path):
    doc, pos = np.repeat(np.arange(5), 4), np.tile(np.arange(1, 5), 5)
    for m, N in N4.items():
        for s in STEPS:
            write_losses(tmp_path, m, f"step{s}", doc, pos, np.full(doc.size, 2.0), N)
    res = scaling.run(tmp_path, list(N4), [f"step{s}" for s in STEPS], CFG)
    ml = res.metrics["mean_loss"]
    assert ml["converged"] is False and ml["alpha_ci"] is None and "constant" in ml["reason"]
    a = res.metrics["alpha_S"]
    assert a["converged"] is False and a["reason"]
    json.dumps(res.metrics, allow_nan=False)  # no NaN anywhere


def test_too_few_models_error_or_skip(tmp_path):
    two = dict(list(N4.items())[:2])
    models, revs = power_suite(tmp_path, models=two)
    with pytest.raises(scaling.ScalingError, match="at least 3.*on_too_few_models: skip"):
        scaling.run(tmp_path, models, revs, dataclasses.replace(CFG, on_too_few_models="error"))
    res = scaling.run(tmp_path, models, revs, CFG)  # skip: the default
    assert res.suite.table is None and "at least 3" in res.metrics["skipped"]


def test_different_tokenizers_name_both(tmp_path, tiny_tokenizer):
    models, revs = power_suite(tmp_path)
    same = scaling.tokenizer_identity(tiny_tokenizer)
    assert same == scaling.tokenizer_identity(tiny_tokenizer) and "300 tokens" in same

    class Other:
        def get_vocab(self):
            return {"a": 0, "b": 1}

    other = scaling.tokenizer_identity(Other())
    with pytest.raises(scaling.ScalingError) as e:
        scaling.run(tmp_path, models, revs, CFG, tokenizers={"m-s": same, "m-m": same, "m-l": other, "m-xl": same})
    assert "'m-s'" in str(e.value) and "'m-l'" in str(e.value) and same in str(e.value) and other in str(e.value)


def test_revisions_covering_different_tokens_are_an_error(tmp_path):
    models, revs = power_suite(tmp_path)
    write_losses(tmp_path, "m-l", "step300", [0, 0], [1, 2], [1.0, 1.0], N4["m-l"])
    with pytest.raises(scaling.ScalingError, match="cover different tokens"):
        scaling.learning_curve_units(tmp_path, "m-l", revs)


def test_units_match_token_means(tmp_path):
    models, revs = power_suite(tmp_path, n_docs=7)
    v = scaling.learning_curve_units(tmp_path, "m-m", revs)
    for j, r in enumerate(revs):
        df = pd.read_parquet(tmp_path / "model=m-m" / f"revision={r}")
        assert v[:, j].mean() == pytest.approx(df["loss"].astype(np.float64).mean(), rel=1e-9)


# --------------------------------------------------------------------------- dynamics


def test_dynamics_run_with_planted_truth(tmp_path):
    K, per = 6, 30
    p = np.arange(1, K + 1, dtype=np.float64) ** -1.5
    p /= p.sum()
    steps = np.array([10, 30, 100, 300, 1000, 3000, 10000])
    S = 20.0 / p  # S_k ∝ 1/p_k
    q = np.repeat(np.arange(K), per)
    doc, pos = np.arange(q.size) // 10, np.arange(q.size) % 10 + 1
    for s in steps:  # each quantum's loss: a sigmoid in log step centred at S_k
        loss = 0.05 + 2.0 / (1 + np.exp(8 * (np.log10(s) - np.log10(S[q]))))
        write_losses(tmp_path, "m", f"step{s}", doc, pos, loss, 1e4)
    planted = tmp_path / "planted"
    planted.mkdir()
    pd.DataFrame({"doc_id": doc, "pos": pos, "quantum": q.astype(np.int32)}).to_parquet(planted / "labels.parquet")
    pd.DataFrame({"quantum": np.arange(K, dtype=np.int32), "frequency": p}).to_parquet(planted / "quanta.parquet")
    cfg = DynamicsConfig(n_boot=50)
    revs = [f"step{s}" for s in steps] + ["main"]  # non-stepN revisions are ignored
    res = dynamics.run(tmp_path, ["m"], revs, cfg, planted_dir=planted)
    em = res.metrics["emergence"]
    assert em["n_fit"] == K and em["slope"] == pytest.approx(1.0, abs=0.1)
    assert res.quantum_curves.shape == (K, steps.size)
    assert res.metrics["n_tokens"] == q.size and res.metrics["steps"] == steps.tolist()
    plots.emergence(res, tmp_path / "e.png")
    # nothing emerges when every checkpoint is before the earliest S_k: a note, not a crash
    late = dynamics.run(tmp_path, ["m"], ["step10", "step30"], cfg, planted_dir=planted)
    assert late.emergence.slope is None and late.emergence.reason
    plots.emergence(late, tmp_path / "e2.png")
    assert (tmp_path / "e.png").exists() and (tmp_path / "e2.png").exists()
    assert len(res.table) == q.size
    no_truth = dynamics.run(tmp_path, ["m"], revs, cfg, planted_dir=tmp_path / "nothing")
    assert "emergence" not in no_truth.metrics


def test_dynamics_needs_two_checkpoints(tmp_path):
    write_losses(tmp_path, "m", "step10", [0], [1], [1.0], 1e4)
    with pytest.raises(dynamics.DynamicsError, match="at least 2 checkpoints"):
        dynamics.run(tmp_path, ["m"], ["step10", "main"], DynamicsConfig())
    with pytest.raises(dynamics.DynamicsError, match="not in suite.models"):
        dynamics.run(tmp_path, ["m"], ["step10"], DynamicsConfig(model="x"))


# --------------------------------------------------------------------------- powerlaw


def _clusters(sweep: dict[int, np.ndarray]) -> pd.DataFrame:
    first = next(iter(sweep.values()))
    return pd.DataFrame({"sample": np.arange(first.size, dtype=np.int32), "cluster": first,
                         **{f"k{k}": lab for k, lab in sweep.items()}})


def _zipf_labels(k: int, b: float, n: int, rng) -> np.ndarray:
    p = np.arange(1, k + 1) ** -b
    return rng.choice(k, n, p=p / p.sum()).astype(np.int32)


def test_analyze_clusters_mle_and_envelope():
    rng = np.random.default_rng(0)
    sweep = {60: _zipf_labels(60, 1.5, 6000, rng), 30: _zipf_labels(30, 1.5, 6000, rng)}
    cfg = PowerlawConfig(n_boot_ci=40, n_boot_gof=20, envelope_rank_lo=1, envelope_rank_hi=None)
    res = cluster_sizes.analyze_clusters(_clusters(sweep), cfg)
    m = res.metrics
    assert m["k"] == 60 and m["n_clusters"] == 60 and m["n_samples"] == 6000
    assert m["mle"]["fittable"] and m["mle"]["alpha"] == pytest.approx(m["mle"]["rank_exponent"] - 1)
    lo, hi = m["mle"]["alpha_ci"]
    assert lo <= m["mle"]["alpha"] <= hi
    assert m["envelope"]["rank_hi"] == 60 and m["envelope"]["sweep"] == [30, 60]
    # sizes of a Zipf(1.5) draw: the envelope's OLS slope is near -1.5 at these ranks
    assert -2.0 < m["envelope"]["slope"] < -1.0
    # the paper's default ranks 100..1000 do not fit a sweep of k <= 60: reported, not fitted
    short = cluster_sizes.analyze_clusters(_clusters(sweep), dataclasses.replace(cfg, envelope_rank_lo=100, envelope_rank_hi=1000))
    assert "only 60 ranks" in short.metrics["envelope"]["skipped"]
    with pytest.raises(cluster_sizes.QuantaError, match="powerlaw.k = 7 is not in the cluster sweep"):
        cluster_sizes.analyze_clusters(_clusters(sweep), dataclasses.replace(cfg, k=7))
    assert cluster_sizes.analyze_clusters(_clusters(sweep), dataclasses.replace(cfg, k=30)).metrics["n_clusters"] == 30
    # planted truth: the same fit on the true partition, reported beside the clustering's
    truth = np.where(np.arange(6000) % 2 == 0, sweep[30], -1)
    t = cluster_sizes.analyze_clusters(_clusters(sweep), cfg, truth=truth).metrics["planted_partition"]
    assert t["fittable"] and t["n_quanta"] == np.unique(sweep[30][::2]).size


def test_powerlaw_k_null_is_the_main_clustering_whatever_it_made():
    """n_clusters [4, 3] on samples that form one group: both cuts make one cluster. The main
    clustering is k = 4 (as the cluster stage calls it), with 1 cluster, never "k = 3"."""
    one = np.zeros(12, dtype=np.int32)
    m = cluster_sizes.analyze_clusters(_clusters({4: one, 3: one}), PowerlawConfig(n_boot_ci=0, n_boot_gof=0)).metrics
    assert m["k"] == 4 and m["n_clusters"] == 1
    two = np.arange(12, dtype=np.int32) % 2  # a main clustering that made 2 clusters of its 5
    m = cluster_sizes.analyze_clusters(_clusters({5: two, 2: two}), PowerlawConfig(n_boot_ci=0, n_boot_gof=0)).metrics
    assert m["k"] == 5 and m["n_clusters"] == 2


def test_all_cluster_sizes_equal_is_reported():
    lab = np.repeat(np.arange(20), 5).astype(np.int32)
    res = cluster_sizes.analyze_clusters(_clusters({20: lab}), PowerlawConfig(n_boot_ci=10, n_boot_gof=10, envelope_rank_lo=1,
                                                                        envelope_rank_hi=None))
    assert res.metrics["mle"]["fittable"] is False and res.metrics["mle"]["reason"]
    assert "flat" in res.metrics["envelope"]["skipped"]
    json.dumps(res.metrics, allow_nan=False)
    few = cluster_sizes.analyze_clusters(_clusters({4: np.arange(40, dtype=np.int32) % 4}), PowerlawConfig())
    assert few.metrics["mle"]["fittable"] is False and "only 4 cluster sizes" in few.metrics["mle"]["reason"]


# --------------------------------------------------------------------------- theory


def test_route_inversions():
    for a in (0.083, 0.5, 2.0):
        pred = theory.predictions(a)
        for route in theory.ROUTES:
            assert theory.alpha_from(route, pred[route]) == pytest.approx(a)
    assert theory.alpha_from("alpha_S", 1.2) is None and theory.alpha_from("zipf", 0.8) is None


def _metrics(alpha_n=0.5, alpha_s=1 / 3, b=1.5, n_ok=True):
    scaling_m = {"mean_loss": {"alpha_N": alpha_n, "alpha_ci": [alpha_n - 0.05, alpha_n + 0.05], "converged": n_ok,
                               "reason": "" if n_ok else "E reached its bound"},
                 "alpha_S": {"model": "m", "alpha_S": alpha_s, "alpha_ci": [alpha_s - 0.02, alpha_s + 0.02],
                             "converged": True, "reason": ""}}
    pl = {"k": 40, "rank_mle": {"fittable": True, "reason": "", "rank_exponent": b, "rank_exponent_ci": [b - 0.1, b + 0.1]},
          "mle": {"fittable": True, "reason": "", "rank_exponent": b - 0.2, "rank_exponent_ci": [b - 0.6, b + 0.2]},
          "envelope": {"rank_exponent": b + 0.3}}
    return scaling_m, pl


def test_theory_table_planted_pass_and_fail():
    s, p = _metrics()
    out = theory.theory_table(s, p, TheoryConfig(), planted_alpha=0.5)
    assert out["pass"] and out["failures"] == []
    r = out["routes"]
    assert r["alpha_S"]["alpha"] == pytest.approx(0.5) and r["zipf"]["alpha"] == pytest.approx(0.5)
    assert r["alpha_S"]["alpha_ci"][0] < 0.5 < r["alpha_S"]["alpha_ci"][1]
    assert r["alpha_N"]["predicts"]["zipf"] == pytest.approx(1.5)
    # CSN's tail MLE is reported beside the target, and is the target when asked for
    assert r["zipf_csn"]["alpha"] == pytest.approx(0.3) and r["zipf_csn"]["target"] is False
    csn = theory.theory_table(s, p, TheoryConfig(zipf_from="mle"), planted_alpha=0.5)
    assert not csn["pass"] and "zipf_csn" not in csn["routes"] and "off by -0.200" in csn["failures"][0]

    s, p = _metrics(b=1.75)
    out = theory.theory_table(s, p, TheoryConfig(), planted_alpha=0.5)
    assert not out["pass"] and out["routes"]["zipf"]["error"] == pytest.approx(0.25)
    assert len(out["failures"]) == 1 and "off by +0.250" in out["failures"][0]
    # the envelope route, when asked for
    s, p = _metrics()
    p["planted_partition"] = {"fittable": True, "reason": "", "rank_exponent": 1.2, "rank_exponent_ci": [1.0, 1.6],
                              "rank_mle": {"fittable": True, "reason": "", "rank_exponent": 1.45,
                                           "rank_exponent_ci": [1.3, 1.6]}}
    row = theory.theory_table(s, p, TheoryConfig(), planted_alpha=0.5)["routes"]["zipf_planted_partition"]
    assert row["alpha"] == pytest.approx(0.45) and row["target"] is False and row["pass"]
    row = theory.theory_table(s, p, TheoryConfig(zipf_from="mle"), planted_alpha=0.5)["routes"]["zipf_planted_partition"]
    assert row["alpha"] == pytest.approx(0.2)
    out = theory.theory_table(*_metrics(), TheoryConfig(zipf_from="envelope"), planted_alpha=0.5)
    assert out["routes"]["zipf"]["alpha"] == pytest.approx(0.8) and out["routes"]["zipf"]["alpha_ci"] is None

    # a fit that did not converge fails its target even when its value is close, and says so
    s, p = _metrics()
    p["rank_mle"]["fittable"] = False
    p["rank_mle"]["reason"] = "too few clusters"
    out = theory.theory_table(s, p, TheoryConfig(), planted_alpha=0.5)
    assert not out["routes"]["zipf"]["pass"] and "did not converge" in out["failures"][0]
    # α_N is reported, not a target: with β < 1 the quantization model predicts α_N = α·β < α
    s, p = _metrics(alpha_n=0.3)
    learned = {"beta": 0.6, "beta_ci": [0.5, 0.75]}
    out = theory.theory_table(s, p, TheoryConfig(), planted_alpha=0.5, learned=learned)
    assert out["pass"] and not out["routes"]["alpha_N"]["target"] and not out["routes"]["alpha_N"]["pass"]
    ratio = out["alpha_N_over_beta"]
    assert ratio["alpha"] == pytest.approx(0.5) and ratio["within_tolerance"] and ratio["alpha_ci_covers_planted"]
    assert ratio["alpha_ci"] == pytest.approx([0.25 / 0.75, 0.35 / 0.5])
    out = theory.theory_table(s, p, TheoryConfig(), planted_alpha=0.5, learned={"beta": -0.1, "beta_ci": None})
    assert out["alpha_N_over_beta"]["alpha"] is None and "does not grow" in out["alpha_N_over_beta"]["reason"]


def test_theory_table_without_planted_or_measurements():
    out = theory.theory_table({"skipped": "2 model(s)"}, {}, TheoryConfig())
    assert out["planted"] is False and "pass" not in out
    assert out["routes"]["alpha_N"]["alpha"] is None and "2 model(s)" in out["routes"]["alpha_N"]["reason"]
    json.dumps(out, allow_nan=False)


# --------------------------------------------------------------------------- plots and stage mains


def test_plots_are_written(tmp_path):
    models, revs = power_suite(tmp_path / "l", n_docs=10)
    res = scaling.run(tmp_path / "l", models, revs, CFG)
    for fn, name in ((plots.mean_loss_vs_n, "a.png"), (plots.token_examples, "b.png"), (plots.learning_curves, "c.png")):
        fn(res, tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rng = np.random.default_rng(1)
    cpl = cluster_sizes.analyze_clusters(_clusters({30: _zipf_labels(30, 1.5, 3000, rng)}),
                                    PowerlawConfig(n_boot_ci=10, n_boot_gof=0, envelope_rank_lo=1, envelope_rank_hi=None))
    plots.cluster_rank_frequency(cpl, tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 1000


def _params(tmp_path: Path, **sections) -> Path:
    """A params file of `sections`; every suite model gets a (hub id) source, as params need."""
    p = tmp_path / "params.yaml"
    import yaml

    if "suite" in sections:
        sections["suite"] = {"sources": {m: f"org/{m}" for m in sections["suite"]["models"]}, **sections["suite"]}
    p.write_text(yaml.safe_dump(sections))
    return p


def _stage(name: str):
    """The stage module `stages.<name>`."""
    import importlib

    return importlib.import_module(f"stages.{name}")


def test_stage_errors_are_one_line(tmp_path, capsys):
    scaling_stage, dyn_stage = _stage("scaling"), _stage("dynamics")

    models, _ = power_suite(tmp_path / "l", models=dict(list(N4.items())[:2]))
    params = _params(tmp_path, suite={"models": models, "revisions": ["step100"]}, scaling={"on_too_few_models": "error"})
    argv = ["--params", str(params), "--losses", str(tmp_path / "l"), "--out", str(tmp_path / "t.parquet"),
            "--metrics", str(tmp_path / "s.json"), "--plots", str(tmp_path / "plots")]
    with pytest.raises(SystemExit) as e:
        stage.run(scaling_stage.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "at least 3" in err[0]

    # skip (the default): an empty table and the reason, and exit 0
    params = _params(tmp_path, suite={"models": models, "revisions": ["step100"]})
    stage.run(scaling_stage.main, argv)
    assert pd.read_parquet(tmp_path / "t.parquet").empty
    assert "at least 3" in json.loads((tmp_path / "s.json").read_text())["skipped"]

    # dynamics with one checkpoint: skipped (an empty table and the reason), exit 0, so the report is reachable
    params = _params(tmp_path, suite={"models": models, "revisions": ["step100"]})
    stage.run(dyn_stage.main, ["--params", str(params), "--losses", str(tmp_path / "l"), "--planted",
                               str(tmp_path / "none"), "--out", str(tmp_path / "d.parquet"), "--metrics",
                               str(tmp_path / "d.json"), "--plots", str(tmp_path / "plots")])
    assert pd.read_parquet(tmp_path / "d.parquet").empty
    assert "at least 2 stepN checkpoints" in json.loads((tmp_path / "d.json").read_text())["skipped"]


def test_config_sections_are_strict():
    with pytest.raises(config.ConfigError, match="alternatives"):
        config.build(PowerlawConfig, {"alternatives": ["weibull"]}, "powerlaw")
    with pytest.raises(config.ConfigError, match="unknown key 'tolerence'"):
        config.build(TheoryConfig, {"tolerence": 0.2}, "theory")
    assert scaling.ScalingConfig is config.ScalingConfig and dynamics.DynamicsConfig is config.DynamicsConfig
