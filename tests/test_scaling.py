"""pipeline/laws/scaling.py: per-token scaling curves, population statistics, L(N), bad input.

Tiers: the vectorised per-token pass against a slow per-token reference loop (np.polyfit
and the paper's definitions written out literally); hand-made tokens at the edges of the
definitions; the join of loss tables (missing, shuffled, duplicated, NaN); the hive
loader end to end on a temporary directory; the L(N) fit recovering a planted α_N; bad
input (too few models, mismatched tokenizers, no common tokens).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import ConfigError
from pipeline.core.files import write_parquet
from pipeline.laws import scaling
from pipeline.laws.scaling import MONOGENIC, OTHER, POLYGENIC, ScalingConfig, ScalingError

N7 = np.array([19e6, 85e6, 302e6, 805e6, 1.2e9, 2.5e9, 6.4e9])  # Pythia-like non-embedding N
CFG = ScalingConfig()


def _suite(rng: np.random.Generator, T: int, N=N7) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, models) losses with planted kinds; returns the losses and the planted kind codes."""
    M = len(N)
    x = np.log(N)
    kinds = rng.integers(0, 3, T)
    L = np.empty((T, M), np.float32)
    for t in range(T):
        if kinds[t] == MONOGENIC:
            j = rng.integers(1, M)
            L[t] = np.where(np.arange(M) < j, rng.uniform(5.5, 9, M), rng.uniform(0, 0.25, M))
        elif kinds[t] == POLYGENIC:
            L[t] = 8.0 - rng.uniform(0.5, 1.0) * (x - x[0]) + rng.normal(0, 0.01, M)
        else:
            L[t] = rng.uniform(0, 8, M)
    return L, kinds


def _reference(L: np.ndarray, N: np.ndarray, cfg: ScalingConfig):
    """Slow per-token loop: np.polyfit for the line, the paper's definitions written out."""
    x = np.log(N)
    M = len(N)
    out = []
    for row in L.astype(np.float64):
        slope, icpt = np.polyfit(x, row, 1)
        ss_tot = np.sum((row - row.mean()) ** 2)
        r2 = 1 - np.sum((row - (slope * x + icpt)) ** 2) / ss_tot
        emerge = -1
        for j in range(1, M):
            if all(row[i] > cfg.mono_high for i in range(j)) and all(row[i] < cfg.mono_low for i in range(j, M)):
                emerge = j
        kind = MONOGENIC if emerge >= 0 else POLYGENIC if (slope < cfg.poly_slope and r2 > cfg.poly_r2) else OTHER
        first = next((i for i in range(M) if row[i] < cfg.mono_low), -1)
        pers = first >= 0 and all(row[i] < cfg.mono_low for i in range(first, M))
        out.append((slope, r2, kind, emerge, first, pers))
    return [np.array(c) for c in zip(*out)]


def test_vectorised_matches_reference_loop():
    rng = np.random.default_rng(0)
    L, planted = _suite(rng, 600)
    # chunk_tokens smaller than the sample, so chunk boundaries are exercised too
    cur = scaling.token_curves(L, N7, dataclasses.replace(CFG, chunk_tokens=97))
    slope, r2, kind, emerge, first, pers = _reference(L, N7, CFG)
    np.testing.assert_allclose(cur.slope, slope, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cur.r2, r2, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cur.kind, kind)
    np.testing.assert_array_equal(cur.emerge, emerge)
    np.testing.assert_array_equal(cur.first_below, first)
    np.testing.assert_array_equal(cur.persistent, pers)
    # and the planted kinds are what comes back (the "other" tokens are uniform noise)
    np.testing.assert_array_equal(cur.kind[planted != OTHER], planted[planted != OTHER])


def test_edges_of_the_definitions():
    N = N7[:4]
    L = np.array(
        [
            [6.0, 0.1, 0.2, 0.1],  # monogenic at model 1
            [6.0, 5.1, 5.5, 0.29],  # monogenic at model 3 (the last)
            [0.1, 0.1, 0.2, 0.1],  # below everywhere: j = 0 is not an emergence -> other
            [5.0, 0.1, 0.1, 0.1],  # 5.0 is not > 5.0
            [6.0, 0.3, 0.1, 0.1],  # 0.3 is not < 0.3
            [6.0, 0.1, 6.0, 0.1],  # learned, forgotten, relearned: not monogenic, not persistent
            [6.0, 4.0, 0.1, 0.1],  # no jump from > 5 straight to < 0.3
            [2.0, 2.0, 2.0, 2.0],  # flat: R² undefined
        ],
        np.float32,
    )
    c = scaling.token_curves(L, N, CFG)
    assert c.kind.tolist() == [MONOGENIC, MONOGENIC] + [OTHER] * 6
    assert c.emerge.tolist() == [1, 3, -1, -1, -1, -1, -1, -1]
    assert c.first_below.tolist() == [1, 3, 0, 1, 2, 1, 2, -1]
    assert c.persistent.tolist() == [True, True, True, True, True, False, True, False]
    assert np.isnan(c.r2[7]) and c.slope[7] == 0
    # a perfect line in ln N, steep enough, is polygenic; a shallow one is not
    x = np.log(N)
    lines = np.stack([6 - 0.5 * (x - x[0]), 6 - 0.2 * (x - x[0])]).astype(np.float32)
    c = scaling.token_curves(lines, N, CFG)
    assert c.kind.tolist() == [POLYGENIC, OTHER]
    np.testing.assert_allclose(c.slope, [-0.5, -0.2], rtol=1e-5)
    np.testing.assert_allclose(c.r2, [1, 1], rtol=1e-6)


def test_thresholds_are_config_fields():
    L = np.array([[3.0, 0.5, 0.4]], np.float32)
    N = N7[:3]
    assert scaling.token_curves(L, N, CFG).kind[0] == OTHER
    cfg = dataclasses.replace(CFG, mono_high=2.0, mono_low=0.6)
    assert scaling.token_curves(L, N, cfg).kind[0] == MONOGENIC


def test_population_stats_and_table():
    N = N7[:3]
    L = np.array(
        [[6, 0.1, 0.1], [6, 6, 0.1], [6, 6, 0.2], [0.1, 6, 0.1], [1, 1, 1]], np.float32
    )
    models = ["s", "m", "l"]
    c = scaling.token_curves(L, N, CFG)
    st = scaling.population_stats(c, models)
    assert st["n_tokens"] == 5
    assert st["kind_counts"] == {"monogenic": 3, "polygenic": 0, "other": 2}
    assert st["monogenic_by_model"] == {"m": 0.2, "l": 0.4}
    assert st["first_below_by_model"] == {"s": 0.2, "m": 0.2, "l": 0.4}
    assert st["persistence"]["n_ever_below"] == 4
    assert st["persistence"]["persistent_among_ever_below"] == 0.75  # token 3 relapses at "m"

    doc = np.array([0, 0, 1, 1, 1], np.int64)
    pos = np.array([1, 2, 1, 2, 3], np.int32)
    table = scaling.curves_table(doc, pos, c, models)
    assert table.column_names == ["doc_id", "pos", "slope", "r2", "kind", "emerge_model"]
    assert table.schema.equals(scaling.CURVES_SCHEMA)  # the skipped stage's empty table has the same schema
    assert pa.types.is_dictionary(table.schema.field("kind").type)
    assert pa.types.is_dictionary(table.schema.field("emerge_model").type)
    df = table.to_pandas()
    assert df["kind"].astype(str).tolist() == ["monogenic", "monogenic", "monogenic", "other", "other"]
    assert df["emerge_model"].astype(object).where(df["emerge_model"].notna(), None).tolist() == [
        "m", "l", "l", None, None]


def test_align_tokens_shuffled_missing_and_bad_rows():
    rng = np.random.default_rng(1)
    doc = np.repeat(np.arange(5, dtype=np.int64), 4)
    pos = np.tile(np.arange(1, 5, dtype=np.int32), 5)
    loss = rng.uniform(0, 5, (3, doc.size)).astype(np.float32)
    perm = rng.permutation(doc.size)
    keep = np.ones(doc.size, bool)
    keep[[3, 7]] = False  # model c lacks two tokens
    a = scaling.align_tokens(
        [doc, doc[perm], doc[keep]], [pos, pos[perm], pos[keep]], [loss[0], loss[1][perm], loss[2][keep]], "abc"
    )
    assert a.losses.shape == (18, 3)
    # two distinct tokens dropped: two rows each of a and b
    assert a.n_dropped == 2 and a.dropped_by_table == {"a": 2, "b": 2, "c": 0}
    np.testing.assert_array_equal(a.doc_id, doc[keep])
    np.testing.assert_array_equal(a.pos, pos[keep])
    np.testing.assert_array_equal(a.losses, loss[:, keep].T)

    with pytest.raises(ScalingError, match=r"losses of b list token \(doc_id=0, pos=1\) more than once"):
        scaling.align_tokens([doc, np.r_[doc, 0]], [pos, np.r_[pos, 1]], [loss[0], np.r_[loss[1], 1]], "ab")
    bad = loss[1].copy()
    bad[4] = np.nan
    with pytest.raises(ScalingError, match="losses of b contain 1 NaN"):
        scaling.align_tokens([doc, doc], [pos, pos], [loss[0], bad], "ab")
    with pytest.raises(ScalingError, match="no token .* in common"):
        scaling.align_tokens([doc, doc + 100], [pos, pos], [loss[0], loss[1]], "ab")


def test_align_tokens_huge_doc_ids():
    # doc ids spanning more than 2^32 (e.g. hashes) take the dense-renumbering path
    doc = np.array([-(2**40), 5, 2**50, 2**50], np.int64)
    pos = np.array([1, 1, 2, 1], np.int32)
    loss = np.arange(4, dtype=np.float32)
    a = scaling.align_tokens([doc, doc[::-1]], [pos, pos[::-1]], [loss, loss[::-1]], "ab")
    assert a.doc_id.tolist() == [-(2**40), 5, 2**50, 2**50]
    assert a.pos.tolist() == [1, 1, 1, 2]
    np.testing.assert_array_equal(a.losses[:, 0], a.losses[:, 1])
    assert a.losses[:, 0].tolist() == [0, 1, 3, 2]


def _write_suite(root, models, L, doc, pos, revision="step143000"):
    for j, m in enumerate(models):
        d = root / f"model={m}" / f"revision={revision}"
        d.mkdir(parents=True)
        half = len(doc) // 2  # two part files, as the loss stage shards
        for i, sl in enumerate([slice(0, half), slice(half, None)]):
            t = pa.table({"doc_id": doc[sl], "pos": pos[sl], "loss": L[sl, j]})
            pq.write_table(t, d / f"part-{i:05d}.parquet")
        (d / "_meta.json").write_text("{}")  # must be skipped by the loader


def test_analyze_suite_from_hive_dir(tmp_path):
    rng = np.random.default_rng(2)
    T, models = 400, ["m4", "m1", "m3", "m2"]  # listed out of size order on purpose
    N = {"m1": 1e6, "m2": 4e6, "m3": 1.6e7, "m4": 6.4e7}
    L, _ = _suite(rng, T, N=np.array(sorted(N.values())))
    doc = np.repeat(np.arange(40, dtype=np.int64), 10)
    pos = np.tile(np.arange(1, 11, dtype=np.int32), 40)
    cols = [sorted(N, key=N.get).index(m) for m in models]
    _write_suite(tmp_path, models, L[:, cols], doc, pos)
    cfg = dataclasses.replace(CFG, n_boot=20)
    res = scaling.analyze_suite(tmp_path, models, "step143000", N, cfg, tokenizers=dict.fromkeys(models, "v1"))
    assert res.models == ("m1", "m2", "m3", "m4") and not res.skipped
    ref = scaling.token_curves(L, sorted(N.values()), cfg)
    np.testing.assert_array_equal(res.curves.kind, ref.kind)
    m = res.metrics
    assert m["n_tokens"] == T and m["n_dropped"] == 0
    assert set(m["kinds"]) == {"monogenic", "polygenic", "other"}
    assert abs(sum(m["kinds"].values()) - 1) < 1e-12
    assert list(m["mean_loss"]["by_model"]) == ["m1", "m2", "m3", "m4"]
    assert "alpha_N" in m["mean_loss"]
    out = write_parquet(res.table, tmp_path / "token_curves.parquet", config=dataclasses.asdict(cfg))
    df = pd.read_parquet(out)
    assert len(df) == T and df["kind"].dtype.name == "category"


def test_mean_loss_fit_recovers_alpha():
    rng = np.random.default_rng(3)
    N = np.geomspace(1e6, 1e9, 6)
    E, A, alpha = 1.5, 40.0, 0.3
    n_docs, per_doc = 300, 20
    doc = np.repeat(np.arange(n_docs), per_doc)
    # per-token losses scattered around the law, with a per-document difficulty factor
    hard = rng.lognormal(0, 0.2, n_docs)[doc, None]
    L = ((E + A * N ** -alpha)[None, :] * hard * rng.lognormal(0, 0.1, (doc.size, 1))).astype(np.float32)
    boot = scaling.mean_loss_fit(doc, L, N, dataclasses.replace(CFG, n_boot=60))
    lo, hi = boot.alpha_ci
    assert boot.fit.converged and lo <= alpha <= hi and hi - lo < 0.2
    # token weighting: the mean of the units is the mean over tokens, even with unequal lengths
    doc2 = np.r_[np.zeros(3, int), np.ones(1, int)]
    L2 = np.array([[1.0], [2.0], [3.0], [10.0]], np.float32)
    _, v = scaling.doc_mean_losses(doc2, L2, "token")
    assert v.mean() == pytest.approx(4.0)
    _, v = scaling.doc_mean_losses(doc2, L2, "document")
    assert v[:, 0].tolist() == [2.0, 10.0]


def test_too_few_models_error_or_skip(tmp_path):
    N = {"a": 1e6, "b": 1e7}
    with pytest.raises(ScalingError, match=r"2 model\(s\) \(a, b\).*at least 3.*on_too_few_models: skip"):
        scaling.analyze_suite(tmp_path, ["a", "b"], "main", N, dataclasses.replace(CFG, on_too_few_models="error"))
    res = scaling.analyze_suite(tmp_path, ["a", "b"], "main", N, CFG)  # skip: the default
    assert res.table is None and "at least 3" in res.skipped and res.metrics == {"skipped": res.skipped}
    with pytest.raises(ScalingError, match="at least 3 models"):
        scaling.token_curves(np.zeros((4, 2), np.float32), [1e6, 1e7], CFG)


def test_mismatched_tokenizers_name_both(tmp_path):
    models = ["a", "b", "c"]
    N = {"a": 1e6, "b": 1e7, "c": 1e8}
    tok = {"a": "sha:111", "b": "sha:111", "c": "sha:999"}
    with pytest.raises(ScalingError, match=r"'a' and 'c' use different tokenizers \('sha:111' vs 'sha:999'\)"):
        scaling.analyze_suite(tmp_path, models, "main", N, CFG, tokenizers=tok)


def test_other_bad_input(tmp_path):
    models = ["a", "b", "c"]
    with pytest.raises(ScalingError, match="no non-embedding parameter count for model 'c'"):
        scaling.analyze_suite(tmp_path, models, "main", {"a": 1, "b": 2}, CFG)
    with pytest.raises(ScalingError, match="same parameter count"):
        scaling.suite_order(models, {"a": 1, "b": 2, "c": 2})
    with pytest.raises(ScalingError, match=r"no losses for model 'a' at revision 'main'.*dvc repro"):
        scaling.analyze_suite(tmp_path, models, "main", {"a": 1, "b": 2, "c": 3}, CFG)
    # no common tokens, through the loader
    for k, m in enumerate(models):
        d = tmp_path / f"model={m}" / "revision=main"
        d.mkdir(parents=True)
        t = pa.table({"doc_id": np.array([k], np.int64), "pos": np.array([1], np.int32),
                      "loss": np.array([1.0], np.float32)})
        pq.write_table(t, d / "part-00000.parquet")
    with pytest.raises(ScalingError, match="no token"):
        scaling.analyze_suite(tmp_path, models, "main", {"a": 1, "b": 2, "c": 3}, CFG)
    with pytest.raises(ConfigError, match="mono_low"):
        ScalingConfig(mono_low=6.0)
    with pytest.raises(ConfigError, match="min_models"):
        ScalingConfig(min_models=2)
