"""pipeline/laws/dynamics.py: per-token drops across checkpoints, phase-change flags, emergence vs p_k.

Tiers: planted sigmoid drops (in log step, at known steps) are found within one
checkpoint and flagged; smooth power-law declines are not flagged; the vectorised pass
equals a slow per-token loop on a random sample, in both window modes; the population
numbers on a hand example; emergence steps S_k ∝ 1/p_k planted on a toy suite give a
slope of 1; the hive loader; bad input.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import ConfigError
from pipeline.laws import dynamics
from pipeline.laws.dynamics import DynamicsConfig, DynamicsError

STEPS = np.unique(np.round(np.logspace(1, 5, 33)).astype(np.int64))  # 10 .. 1e5, 8 per decade
LOG = DynamicsConfig(window="log10", window_log10=0.5)


def _sigmoid_losses(rng, centres_u, steps=STEPS, scale=0.02, amp=(1.5, 4.0), floor=(0.05, 2.0)) -> np.ndarray:
    """(tokens, checkpoints): floor + amplitude·(1 - logistic((u - centre)/scale)) + noise, u = log10(step + 1)."""
    u = dynamics.log_step(steps)[None, :]
    a = rng.uniform(*amp, (centres_u.size, 1))
    floor = rng.uniform(*floor, (centres_u.size, 1))
    z = (u - centres_u[:, None]) / scale
    return (floor + a / (1 + np.exp(z)) + rng.normal(0, 0.01, z.shape)).astype(np.float32)


# Adjacent pairs (window_checkpoints=2) are too narrow here: a drop that straddles a
# checkpoint is split between two intervals; three checkpoints always hold it.
@pytest.mark.parametrize("cfg", [LOG, DynamicsConfig(window="checkpoints", window_checkpoints=3)])
def test_planted_sigmoid_drops_are_recovered(cfg):
    rng = np.random.default_rng(0)
    u = dynamics.log_step(STEPS)
    centres = rng.uniform(u[2], u[-3], 300)  # away from the ends, so the whole drop is observed
    L = _sigmoid_losses(rng, centres)
    d = dynamics.token_dynamics(L, STEPS, cfg)
    assert d.abrupt.all()
    # drop_step is the checkpoint after the centre, or one checkpoint off
    after = np.searchsorted(u, centres)  # first checkpoint at or past the centre
    got = np.searchsorted(STEPS, d.drop_step)
    assert np.max(np.abs(got - after)) <= 1
    # the log-step interpolated crossing is close to the centre (interval is 0.125 decades)
    assert np.max(np.abs(np.log10(d.drop_step_mid + 1) - centres)) < 0.07
    assert np.all(d.sharpness > 0)


def test_smooth_power_law_declines_are_not_flagged():
    rng = np.random.default_rng(1)
    T = 300
    E = rng.uniform(0.5, 3, (T, 1))
    A = rng.uniform(10, 40, (T, 1))
    alpha = rng.uniform(0.2, 0.7, (T, 1))
    L = (E + A * STEPS[None, :] ** -alpha + rng.normal(0, 0.01, (T, STEPS.size))).astype(np.float32)
    assert np.all(L[:, 0] - L[:, -1] > 1.0)  # they do learn more than min_drop in total
    for cfg in (LOG, DynamicsConfig(window="checkpoints", window_checkpoints=3)):
        d = dynamics.token_dynamics(L, STEPS, cfg)
        assert not d.abrupt.any()


def _reference(L: np.ndarray, steps: np.ndarray, cfg: DynamicsConfig):
    """Slow per-token loop with the module docstring's definitions written out."""
    u = np.log10(steps.astype(float) + 1)
    C = len(steps)
    if cfg.window == "checkpoints":
        W = min(cfg.window_checkpoints, C)
        wins = [(i, i + W - 1) for i in range(C - W + 1)]
    else:
        wins = []
        for i in range(C - 1):
            j = max(j for j in range(C) if u[j] - u[i] <= cfg.window_log10 * (1 + 1e-12))
            wins.append((i, max(j, i + 1)))
    rows = []
    for row in L:
        best, bi = -np.inf, None
        for i, j in wins:
            if row[i] - row[j] > best:
                best, bi = row[i] - row[j], (i, j)
        i, j = bi
        drop = np.float32(row[i] - row[j])
        half = (row[i] + row[j]) * np.float32(0.5)
        if drop > 0:
            k = next(k for k in range(i, j + 1) if row[k] <= half)
            f = (float(row[k - 1]) - half) / (float(row[k - 1]) - float(row[k]))
            mid = 10 ** (u[k - 1] + f * (u[k] - u[k - 1])) - 1
            step = steps[k]
        else:
            mid, step = np.nan, -1
        net = row[0] - row[-1]
        abrupt = drop >= cfg.min_drop and net > 0 and drop >= cfg.min_share * net
        rows.append((drop, steps[i], steps[j], step, mid, drop / (u[j] - u[i]), net, abrupt))
    return [np.array(c) for c in zip(*rows)]


@pytest.mark.parametrize(
    "cfg",
    [
        LOG,
        DynamicsConfig(window="checkpoints", window_checkpoints=4),
        DynamicsConfig(window="log10", window_log10=0.05),
    ],
)
def test_vectorised_matches_reference_loop(cfg, monkeypatch):
    rng = np.random.default_rng(2)
    steps = np.array([0, 1, 2, 4, 8, 16, 64, 128, 512, 1000, 2000, 3000, 5000, 8000])
    # random walks: rises, falls, ties of the halfway level with noise; some monotone rises
    L = np.abs(3 + np.cumsum(rng.normal(0, 0.7, (150, steps.size)), axis=1)).astype(np.float32)
    L[:5] = np.sort(L[:5], axis=1)  # never decreasing: drop <= 0, no step
    monkeypatch.setattr(dynamics, "_CHUNK_ELEMENTS", 300)  # several chunks
    d = dynamics.token_dynamics(L, steps, cfg)
    drop, s0, s1, step, mid, sharp, net, abrupt = _reference(L, steps, cfg)
    np.testing.assert_allclose(d.drop, drop, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(d.start_step, s0)
    np.testing.assert_array_equal(d.end_step, s1)
    np.testing.assert_array_equal(d.drop_step, step)
    np.testing.assert_allclose(d.drop_step_mid, mid, rtol=1e-6)
    np.testing.assert_allclose(d.sharpness, sharp, rtol=1e-5)
    np.testing.assert_allclose(d.net_decrease, net, rtol=1e-6)
    np.testing.assert_array_equal(d.abrupt, abrupt)
    assert (d.drop_step[:5] == -1).all() and np.isnan(d.drop_step_mid[:5]).all()


def test_population_numbers_on_a_hand_example():
    steps = np.array([10, 100, 1000])
    L = np.array(
        [
            [5.0, 1.0, 1.0],  # abrupt: net 4, drop 4
            [5.0, 4.0, 3.0],  # smooth: net 2, best drop 1 < 0.8 * 2
            [2.0, 2.0, 3.0],  # rises: net -1
            [3.0, 2.5, 2.5],  # small: net 0.5 < min_drop
        ],
        np.float32,
    )
    cfg = DynamicsConfig()
    d = dynamics.token_dynamics(L, steps, cfg)
    assert d.abrupt.tolist() == [True, False, False, False]
    st = dynamics.population_stats(d, cfg)
    assert st["frac_abrupt"] == 0.25
    assert st["decrease_total"] == pytest.approx(6.5)
    assert st["abrupt_share_of_decrease"] == pytest.approx(4 / 6.5)
    assert st["net_total"] == pytest.approx(5.5)
    assert st["abrupt_share_of_net"] == pytest.approx(4 / 5.5)
    assert st["frac_abrupt_among_learned"] == 0.5
    assert st["abrupt_by_step"] == {"100": 1}
    t = dynamics.dynamics_table(np.arange(4), np.ones(4, np.int32), d)
    assert t.column("drop_step").null_count == 1  # the rising token has no drop step


@pytest.mark.parametrize("method", ["mean_loss", "median_drop"])
def test_emergence_follows_frequency(method):
    rng = np.random.default_rng(3)
    K, per_q = 8, 40
    p = np.arange(1, K + 1) ** -1.5
    p /= p.sum()
    S = 20.0 / p  # planted S_k ∝ 1/p_k
    steps = np.unique(np.round(np.logspace(1, 4.5, 57)).astype(np.int64))
    q = np.repeat(np.arange(K), per_q)
    # ~2.8 nats (ln 16, a planted answer) down to ~0.05: the mean crosses 1 nat near S_k
    L = _sigmoid_losses(rng, np.log10(S[q] + 1), steps=steps, scale=0.03, amp=(2.7, 2.8), floor=(0.03, 0.07))
    q_all = np.r_[q, -np.ones(50, int)]
    L_all = np.r_[L, rng.uniform(3, 4, (50, steps.size)).astype(np.float32)]  # unlabelled tokens
    freqs = np.r_[p, 0.01]  # a ninth quantum with no tokens
    cfg = DynamicsConfig(window="log10", window_log10=0.3, emergence=method, n_boot=200)
    fit = dynamics.emergence_vs_frequency(L_all, steps, q_all, freqs, cfg)
    tab = fit.per_quantum
    assert tab["status"].tolist() == ["ok"] * K + ["no_tokens"]
    np.testing.assert_allclose(np.log10(tab["emergence_step"][:K]), np.log10(S), atol=0.1)
    assert fit.n_fit == K and abs(fit.slope - 1) < 0.05
    assert fit.ci[0] <= 1 <= fit.ci[1] and fit.ci_boot[0] <= 1 <= fit.ci_boot[1]
    m = fit.metrics()
    assert m["predicted_slope"] == 1.0 and m["n_fit"] == K


def test_emergence_never_and_before_first():
    steps = np.array([10, 100, 1000])
    L = np.array([[3, 0.5, 0.1], [3, 3, 3], [0.5, 0.4, 0.1], [3, 2, 0.5], [3, 3, 0.2]], np.float32)
    q = np.array([0, 1, 2, 3, 4])
    fit = dynamics.emergence_vs_frequency(L, steps, q, [0.5, 0.2, 0.1, 0.1, 0.1], DynamicsConfig())
    assert fit.per_quantum["status"].tolist() == ["ok", "never", "before_first", "ok", "ok"]
    assert fit.per_quantum["first_step"].tolist() == [100, -1, -1, 1000, 1000]
    # quantum 0 crosses 1 nat 0.8 of the way from 3 to 0.5 nats, in log10(step + 1)
    u = np.log10(steps + 1.0)
    assert fit.per_quantum["emergence_step"][0] == pytest.approx(10 ** (u[0] + 0.8 * (u[1] - u[0])) - 1)
    assert fit.n_fit == 3 and fit.slope is not None


def test_load_checkpoints_and_labels(tmp_path):
    model = "m"
    doc = np.repeat(np.arange(3, dtype=np.int64), 4)
    pos = np.tile(np.arange(1, 5, dtype=np.int32), 3)
    for s in (200, 20, 2000):  # written in no particular order
        d = tmp_path / f"model={model}" / f"revision=step{s}"
        d.mkdir(parents=True)
        loss = np.full(doc.size, 1000.0 / s, np.float32)
        pq.write_table(pa.table({"doc_id": doc, "pos": pos, "loss": loss}), d / "part-00000.parquet")
    (tmp_path / f"model={model}" / "revision=main").mkdir()  # not a checkpoint: ignored
    ck = dynamics.load_checkpoints(tmp_path, model)
    assert ck.revisions == ("step20", "step200", "step2000") and ck.steps.tolist() == [20, 200, 2000]
    np.testing.assert_allclose(ck.aligned.losses[0], [50, 5, 0.5])
    q = dynamics.token_quanta(ck.aligned.doc_id, ck.aligned.pos, [2, 0, 9], [3, 1, 1], [7, 4, 1])
    assert q.tolist() == [4, -1, -1, -1, -1, -1, -1, -1, -1, -1, 7, -1]
    res = dynamics.analyze_model(ck, DynamicsConfig(), labels=([2, 0, 9], [3, 1, 1], [7, 4, 1]), freqs=[0.1] * 8)
    assert res.table.num_rows == 12 and res.metrics["frac_abrupt"] == 1.0  # 45 of 49.5 nats in one window
    em = res.metrics["emergence"]
    assert em["status_counts"] == {"no_tokens": 6, "ok": 2} and em["slope"] is None and "at least 3" in em["reason"]
    with pytest.raises(DynamicsError, match="at least 2 checkpoints, got 1"):
        dynamics.load_checkpoints(tmp_path, model, ["step20"])
    with pytest.raises(DynamicsError, match="'main' is not a checkpoint name"):
        dynamics.load_checkpoints(tmp_path, model, ["step20", "main"])
    with pytest.raises(DynamicsError, match="no losses for model 'x'"):
        dynamics.load_checkpoints(tmp_path, "x")


def test_bad_input():
    L = np.ones((3, 1), np.float32)
    with pytest.raises(DynamicsError, match="at least 2 checkpoints, got 1"):
        dynamics.token_dynamics(L, [100], DynamicsConfig())
    with pytest.raises(DynamicsError, match="at least 2 checkpoints, got 1"):
        dynamics.token_dynamics(np.ones((3, 3)), [1, 10, 100], DynamicsConfig(step_lo=50))
    with pytest.raises(DynamicsError, match="strictly increasing"):
        dynamics.token_dynamics(np.ones((3, 2)), [10, 10], DynamicsConfig())
    bad = np.ones((3, 2))
    bad[1, 1] = np.nan
    with pytest.raises(DynamicsError, match="1 NaN"):
        dynamics.token_dynamics(bad, [1, 10], DynamicsConfig())
    with pytest.raises(ConfigError, match="window_checkpoints"):
        DynamicsConfig(window_checkpoints=1)
    # two checkpoints are enough; a window longer than the run is clamped to it
    cfg = DynamicsConfig(window="checkpoints", window_checkpoints=5)
    d = dynamics.token_dynamics(np.array([[3.0, 1.0]]), [0, 10], cfg)
    assert d.abrupt.tolist() == [True] and d.drop_step.tolist() == [10]
    assert dataclasses.is_dataclass(d)


def test_one_checkpoint_is_skipped_with_the_schema_and_a_reason():
    from pipeline.core.config import DynamicsConfig

    cfg = DynamicsConfig()
    assert dynamics.skip_reason(["m"], ["step1", "step2"], cfg) == ""
    why = dynamics.skip_reason(["m"], ["main"], cfg)
    assert "at least 2 stepN" in why and "suite.revisions" in why
    out = dynamics.skipped("m", why)
    assert out.table.num_rows == 0 and out.metrics == {"model": "m", "skipped": why}
    rng = np.random.default_rng(0)
    real = dynamics.token_dynamics(rng.random((5, 4)).astype(np.float32), [1, 10, 100, 1000], cfg)
    full = dynamics.dynamics_table(np.arange(5), np.arange(5), real)
    assert out.table.schema == full.schema
