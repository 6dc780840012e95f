"""Per-token losses: the fast batched path against a plain per-document fp32 forward,
its invariances (batch composition, padding, chunking), the output layout as users read
it, resumability (a real SIGKILL), Dask execution, and the bad-input errors."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import devices

from pipeline.core import execution, files
from pipeline.core.config import CorpusConfig, LossesConfig, SuiteConfig
from pipeline.core.errors import QuantaError
from pipeline.lm import corpus, losses, models

REPO = Path(__file__).resolve().parents[1]
VOCAB = 320  # tiny_neox_dir's model vocabulary (conftest.MODEL_VOCAB)


# --------------------------------------------------------------------------- helpers


def random_docs(n: int, max_len: int, seed: int = 0, min_len: int = 2) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    # doc ids with gaps, as the corpus stage leaves them for skipped documents
    return {3 * i + 1: rng.integers(0, VOCAB, size=int(rng.integers(min_len, max_len + 1))) for i in range(n)}


def write_tokens(path: Path, docs: dict[int, np.ndarray]) -> Path:
    doc = np.concatenate([np.full(len(t), d, dtype=np.int64) for d, t in docs.items()])
    pos = np.concatenate([np.arange(len(t), dtype=np.int32) for t in docs.values()])
    tok = np.concatenate(list(docs.values())).astype(np.int32)
    token_str = pa.array([f"t{t}" for t in tok]).dictionary_encode()
    table = pa.table({"doc_id": doc, "pos": pos, "token_id": tok, "token_str": token_str})
    files.write_parquet(table, path)
    return path


def reference_losses(model, ids: np.ndarray) -> np.ndarray:
    """The slow reference: one sequence, plain model(input_ids).logits in fp32, full log-softmax."""
    with torch.no_grad():
        logits = model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].float()  # (pos, vocab)
    logp = torch.log_softmax(logits, dim=-1)
    return (-logp[:-1].gather(1, torch.as_tensor(ids[1:], dtype=torch.long)[:, None])[:, 0]).numpy()


def reference_table(model, docs: dict[int, np.ndarray], windows) -> dict[tuple[int, int], float]:
    out = {}
    for w in windows:
        ref = reference_losses(model, docs[w.doc_id][w.start : w.end])
        for p in range(w.score_from, w.end):
            out[(w.doc_id, p)] = ref[p - w.start - 1]  # ref[j] is the loss of token j + 1
    return out


def score_to_dict(model, docs, windows, **kw) -> dict[tuple[int, int], float]:
    kw = {"batch_tokens": 256, "logits_chunk": 37, **kw}
    inputs = [docs[w.doc_id][w.start : w.end] for w in windows]
    res = losses.score_windows(model, inputs, [w.score_from - w.start for w in windows], **kw)
    return {(w.doc_id, p): float(x[p - w.score_from]) for w, x in zip(windows, res) for p in range(w.score_from, w.end)}


def assert_close(a: dict, b: dict, atol: float) -> float:
    assert a.keys() == b.keys()
    keys = sorted(a)
    err = float(np.max(np.abs(np.array([a[k] for k in keys]) - np.array([b[k] for k in keys]))))
    assert err <= atol, f"max |difference| {err:.3g} nats > {atol}"
    return err


def read_dir(path: Path) -> pa.Table:
    parts = sorted(path.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]).sort_by([("doc_id", "ascending"), ("pos", "ascending")])


@pytest.fixture(autouse=True)
def _no_external_scheduler(monkeypatch):
    # DASK_SCHEDULER_ADDRESS overrides losses.scheduler; a developer's shell may set it
    monkeypatch.delenv(execution.ENV_SCHEDULER, raising=False)


@pytest.fixture(scope="module")
def tiny_model(tiny_neox_dir):
    return models.load_model(models.ModelSpec("tiny", str(tiny_neox_dir)), dtype="float32", device="cpu")


def suite_for(source: Path, names=("tiny",), revisions=("main",)) -> SuiteConfig:
    return SuiteConfig(models=tuple(names), revisions=tuple(revisions), sources={n: str(source) for n in names},
                       dtype="float32", device="cpu")


def run(spec_source: Path, tokens: Path, out: Path, *, name="tiny", revision="main", corpus_cfg=None, **losses_kw):
    suite = suite_for(spec_source, (name,), (revision,))
    cfg = LossesConfig(**{"scheduler": "inprocess", "progress": False, **losses_kw})
    spec = models.spec_from_suite(suite, name, revision)
    return losses.run_losses(spec, tokens, out, losses=cfg, suite=suite, corpus=corpus_cfg or CorpusConfig(max_len=64))


# --------------------------------------------------------------------------- correctness


def test_batched_losses_match_per_document_fp32_forward(tiny_model):
    docs = random_docs(30, 120, seed=1)  # some longer than max_len: truncated, as in the paper
    windows = corpus.make_windows(list(docs), [len(t) for t in docs.values()], CorpusConfig(max_len=64))
    ours = score_to_dict(tiny_model, docs, windows)
    assert_close(ours, reference_table(tiny_model, docs, windows), atol=1e-4)
    assert max(p for _, p in ours) == 63  # truncation at max_len: positions 1..63


def test_strided_windows_match_reference_and_score_every_token_once(tiny_model):
    docs = random_docs(12, 150, seed=2)
    cfg = CorpusConfig(context="strided", max_len=32, min_context=16)
    windows = corpus.make_windows(list(docs), [len(t) for t in docs.values()], cfg)
    assert any(w.start > 0 for w in windows)
    ours = score_to_dict(tiny_model, docs, windows)
    assert set(ours) == {(d, p) for d, t in docs.items() for p in range(1, len(t))}
    assert_close(ours, reference_table(tiny_model, docs, windows), atol=1e-4)


@pytest.mark.parametrize("device", devices())
def test_losses_on_each_device_match_the_cpu_fp32_reference(tiny_neox_dir, tiny_model, device):
    """fp32 on `device` is the per-document CPU fp32 forward to rounding; the device's default
    precision (dtype auto: bf16 weights under bf16 autocast on CUDA, fp32 on a CPU) is within bf16's."""
    docs = random_docs(30, 120, seed=11)
    windows = corpus.make_windows(list(docs), [len(t) for t in docs.values()], CorpusConfig(max_len=64))
    ref = reference_table(tiny_model, docs, windows)
    spec = models.ModelSpec("tiny", str(tiny_neox_dir))
    fp32 = models.load_model(spec, dtype="float32", device=device)
    assert_close(score_to_dict(fp32, docs, windows, autocast="none"), ref, atol=1e-4)
    auto = models.load_model(spec, dtype="auto", device=device)
    ours = score_to_dict(auto, docs, windows)
    diff = np.abs(np.array([ours[k] - ref[k] for k in sorted(ref)]))
    # bf16 weights and autocast on this model, emulated on a CPU: mean 5e-4, max 3e-3 nats
    assert diff.mean() <= 0.01 and diff.max() <= 0.05, f"mean {diff.mean():.3g}, max {diff.max():.3g} nats"


@pytest.mark.parametrize("batch_tokens,logits_chunk", [(1, 1), (100, 5), (10**6, 4096)])
def test_losses_do_not_depend_on_batch_composition_padding_or_chunks(tiny_model, batch_tokens, logits_chunk):
    docs = random_docs(25, 90, seed=3)
    windows = corpus.make_windows(list(docs), [len(t) for t in docs.values()], CorpusConfig(max_len=64))
    base = score_to_dict(tiny_model, docs, windows)
    shuffled = [windows[i] for i in np.random.default_rng(0).permutation(len(windows))]
    other = score_to_dict(tiny_model, docs, shuffled, batch_tokens=batch_tokens, logits_chunk=logits_chunk)
    assert_close(other, base, atol=1e-5)


def test_generic_causal_lms_llama_and_softcapped_gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           max_position_embeddings=128, final_logit_softcapping=0.5)).eval()
    docs = random_docs(10, 60, seed=4)
    windows = corpus.make_windows(list(docs), [len(t) for t in docs.values()], CorpusConfig(max_len=64))
    for model in (llama, gemma):
        models.check_output_head(model)
        assert_close(score_to_dict(model, docs, windows), reference_table(model, docs, windows), atol=1e-4)


def test_unknown_logit_postprocessing_is_refused(tiny_neox_dir):
    model = models.load_model(models.ModelSpec("tiny", str(tiny_neox_dir)), dtype="float32", device="cpu")
    model.config.logit_scale = 3.0  # our path would scale, the model's forward does not
    with pytest.raises(QuantaError, match="post-processes its logits"):
        models.check_output_head(model)


# --------------------------------------------------------------------------- shards and batches


def test_plan_batches_respects_the_padded_token_budget():
    lengths = np.random.default_rng(0).integers(1, 100, size=200)
    batches = losses.plan_batches(lengths, 300)
    assert sorted(np.concatenate(batches).tolist()) == list(range(200))
    for b in batches:
        assert len(b) == 1 or len(b) * lengths[b].max() <= 300
        assert lengths[b].min() >= losses.MIN_ROW_FILL * lengths[b].max()  # padding < 20%
    assert [len(b) for b in losses.plan_batches([500, 3], 100)] == [1, 1]  # too long: a batch of its own


def test_shards_are_deterministic_and_near_the_target_size():
    W = corpus.Window
    windows = [W(i, 0, 11, 1) for i in range(50)]  # 10 scored tokens each
    shards = losses.make_shards(windows, 35)
    assert [s.n_tokens for s in shards] == [30] * 16 + [20]
    assert [w for s in shards for w in s.windows] == windows
    assert losses.make_shards(windows, 35) == shards
    assert len(losses.make_shards(windows, 10**9)) == 1


# --------------------------------------------------------------------------- the stage's output


def test_stage_output_is_hive_partitioned_and_read_by_pandas_polars_duckdb(tmp_path, tiny_revisions_dir):
    import duckdb
    import pandas as pd
    import polars as pl

    docs = random_docs(20, 80, seed=5)
    tokens = write_tokens(tmp_path / "tokens.parquet", docs)
    params = {
        "suite": {"models": ["tiny-a", "tiny-b"], "revisions": ["step1", "step2"], "device": "cpu",
                  "sources": {"tiny-a": str(tiny_revisions_dir), "tiny-b": str(tiny_revisions_dir)}},
        "corpus": {"max_len": 64},
        "losses": {"scheduler": "local", "shard_tokens": 10**6, "progress": False},  # one shard: in-process
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    from stages import losses as losses_stage
    out = tmp_path / "losses"
    for m in ("tiny-a", "tiny-b"):
        for r in ("step1", "step2"):
            losses_stage.main(["--params", str(tmp_path / "params.yaml"), "--model", m, "--revision", r,
                           "--tokens", str(tokens), "--out", str(out)])
    n_scored = sum(min(len(t), 64) - 1 for t in docs.values())

    df = pd.read_parquet(out)
    assert len(df) == 4 * n_scored
    assert str(df["loss"].dtype) == "float32" and str(df["pos"].dtype) == "int32" and str(df["doc_id"].dtype) == "int64"
    assert set(zip(df["model"].astype(str), df["revision"].astype(str))) == {
        (m, r) for m in ("tiny-a", "tiny-b") for r in ("step1", "step2")}
    plf = pl.scan_parquet(str(out / "**/*.parquet"), hive_partitioning=True).collect()
    assert plf.height == len(df) and {"model", "revision", "doc_id", "pos", "loss"} <= set(plf.columns)
    con = duckdb.connect()
    per = con.sql(f"select model, revision, count(*), avg(loss) from read_parquet('{out}/**/*.parquet', "
                  f"hive_partitioning=true) group by all order by all").fetchall()
    assert [row[2] for row in per] == [n_scored] * 4
    # two revisions of one model have different weights, so different losses; two names of one
    # source at one revision are the same model
    means = {(m, r): avg for m, r, _, avg in per}
    assert means[("tiny-a", "step1")] != means[("tiny-a", "step2")]
    assert means[("tiny-a", "step1")] == pytest.approx(means[("tiny-b", "step1")], abs=1e-6)

    part_dir = out / "model=tiny-a" / "revision=step2"
    assert [p.name for p in part_dir.iterdir() if not p.name.startswith("_")] == ["part-00000.parquet"]
    cfg = files.read_config(part_dir / "part-00000.parquet")
    assert cfg["model"]["revision"] == "step2" and cfg["part"]["rows"] == n_scored
    assert cfg["compute"] == {"device_type": "cpu", "weights_dtype": "float32", "compute_dtype": "float32"}
    meta = files.read_meta(part_dir / "_meta.json")
    assert meta["tokens"] == n_scored and meta["params"]["total"] > meta["params"]["non_embedding"] > 0
    assert meta["tokens_per_s"] > 0 and meta["peak_rss_bytes"] > 0 and meta["execution"] == "inprocess"


def test_nan_losses_are_a_clear_error_and_write_nothing(tmp_path, tiny_neox_dir):
    from transformers import GPTNeoXForCausalLM

    broken = tmp_path / "broken"
    model = GPTNeoXForCausalLM.from_pretrained(tiny_neox_dir)
    with torch.no_grad():
        model.gpt_neox.layers[1].mlp.dense_4h_to_h.weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    tokens = write_tokens(tmp_path / "tokens.parquet", random_docs(5, 30))
    with pytest.raises(QuantaError, match=r"non-finite losses .* tiny@main"):
        run(broken, tokens, tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_bad_inputs_get_one_line_errors(tmp_path, tiny_neox_dir):
    with pytest.raises(QuantaError, match="not found; run the corpus stage"):
        corpus.read_tokens(tmp_path / "nope.parquet")
    empty = write_tokens(tmp_path / "empty.parquet", {1: np.array([], dtype=np.int64)})
    with pytest.raises(QuantaError, match="empty"):
        corpus.read_tokens(empty)
    gap = tmp_path / "gap.parquet"
    files.write_parquet(pa.table({"doc_id": [1, 1, 1], "pos": pa.array([0, 1, 3], pa.int32()),
                               "token_id": pa.array([1, 2, 3], pa.int32())}), gap)
    with pytest.raises(QuantaError, match="document 1 has position 3 where 2"):
        corpus.read_tokens(gap)
    with pytest.raises(QuantaError, match="cannot name an output folder"):
        losses.partition_dir(tmp_path, "../evil", "main")
    too_big = write_tokens(tmp_path / "big.parquet", {0: np.array([1, 2, VOCAB + 5])})
    with pytest.raises(QuantaError, match="outside the vocabulary"):
        run(tiny_neox_dir, too_big, tmp_path / "out")
    with pytest.raises(QuantaError, match="exceeds the context"):
        run(tiny_neox_dir, write_tokens(tmp_path / "t.parquet", random_docs(3, 20)), tmp_path / "out2",
            corpus_cfg=CorpusConfig(max_len=4096))


def test_tokens_table_in_any_row_order_gives_the_same_losses(tmp_path, tiny_neox_dir):
    docs = random_docs(8, 40, seed=6)
    tokens = write_tokens(tmp_path / "tokens.parquet", docs)
    shuffled = pq.read_table(tokens)
    shuffled = shuffled.take(np.random.default_rng(0).permutation(shuffled.num_rows))
    files.write_parquet(shuffled, tmp_path / "shuffled.parquet")
    run(tiny_neox_dir, tokens, tmp_path / "a")
    run(tiny_neox_dir, tmp_path / "shuffled.parquet", tmp_path / "b")
    part = Path("model=tiny") / "revision=main"
    assert read_dir(tmp_path / "a" / part).equals(read_dir(tmp_path / "b" / part))


# --------------------------------------------------------------------------- resuming


def test_rerun_reuses_valid_parts_and_recomputes_damaged_or_foreign_ones(tmp_path, tiny_neox_dir, caplog):
    tokens = write_tokens(tmp_path / "tokens.parquet", random_docs(30, 40, seed=7))
    out = tmp_path / "out"
    meta = run(tiny_neox_dir, tokens, out, shard_tokens=100, threads_per_worker=1)
    d = out / "model=tiny" / "revision=main"
    n_parts = meta["parts"]
    assert n_parts >= 5 and meta["computed_parts"] == n_parts
    first = read_dir(d)
    before = {p.name: p.stat().st_mtime_ns for p in d.glob("part-*.parquet")}
    meta_bytes = (d / losses.META_FILE).read_bytes()
    assert run(tiny_neox_dir, tokens, out, shard_tokens=100, threads_per_worker=1)["computed_parts"] == n_parts
    assert (d / losses.META_FILE).read_bytes() == meta_bytes  # a no-op rerun rewrites nothing
    assert {p.name: p.stat().st_mtime_ns for p in d.glob("part-*.parquet")} == before

    (d / "part-00001.parquet").write_bytes(b"PAR1 truncated by a crash")
    t = pq.read_table(d / "part-00002.parquet")
    cfg = files.read_config(d / "part-00002.parquet")
    cfg["model"]["source"] = "some/other-model"
    files.write_parquet(t.replace_schema_metadata(None), d / "part-00002.parquet", config=cfg)
    (d / ".part-00003.parquet.abc123.tmp").write_bytes(b"half a file")
    shutil.copy(d / "part-00000.parquet", d / "part-00999.parquet")  # left by a run with more shards

    with caplog.at_level(logging.INFO, logger="pipeline"):
        meta = run(tiny_neox_dir, tokens, out, shard_tokens=100, threads_per_worker=1)
    assert meta["computed_parts"] == 2 and meta["reused_parts"] == n_parts - 2
    assert "part-00001.parquet is unreadable" in caplog.text
    assert "part-00002.parquet was made with a different config (differs in model.source)" in caplog.text
    after = {p.name: p.stat().st_mtime_ns for p in d.glob("part-*.parquet")}
    assert set(after) == set(before)  # surplus part removed
    assert not list(d.glob(".*.tmp"))  # stale temp file removed
    assert all(after[k] == before[k] for k in before if k not in ("part-00001.parquet", "part-00002.parquet"))
    assert read_dir(d).equals(first)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        meta = run(tiny_neox_dir, tokens, out, shard_tokens=100, batch_tokens=64, threads_per_worker=1)
    assert meta["computed_parts"] == n_parts  # another config: nothing reused silently
    assert "differs in losses.batch_tokens" in caplog.text


def test_a_run_that_fails_keeps_every_finished_part_and_the_revert_reuses_them(tmp_path, tiny_neox_dir, monkeypatch):
    """A value that makes every part stale and then fails (a typo, a device that is not there)
    must not cost the finished parts: nothing is deleted before its successor is written."""
    tokens = write_tokens(tmp_path / "tokens.parquet", random_docs(30, 40, seed=7))
    out = tmp_path / "out"
    n_parts = run(tiny_neox_dir, tokens, out, shard_tokens=100, threads_per_worker=1)["parts"]
    d = out / "model=tiny" / "revision=main"
    before = {p.name: p.read_bytes() for p in d.glob("part-*.parquet")}

    def fails(task, on_rows=None):
        raise QuantaError("suite.device is 'cuda' but torch sees no CUDA device")

    monkeypatch.setattr(losses, "compute_part", fails)
    with pytest.raises(QuantaError):  # another batch size: every part is stale, and the work fails
        run(tiny_neox_dir, tokens, out, shard_tokens=100, batch_tokens=64, threads_per_worker=1)
    with pytest.raises(QuantaError):  # more, smaller shards: the surplus of the old run stays too
        run(tiny_neox_dir, tokens, out, shard_tokens=50, threads_per_worker=1)
    assert {p.name: p.read_bytes() for p in d.glob("part-*.parquet")} == before
    monkeypatch.undo()
    meta = run(tiny_neox_dir, tokens, out, shard_tokens=100, threads_per_worker=1)  # the value reverted
    assert meta["computed_parts"] == 0 and meta["reused_parts"] == n_parts
    assert {p.name: p.read_bytes() for p in d.glob("part-*.parquet")} == before


def test_execution_settings_are_not_in_a_parts_identity(tiny_neox_dir):
    suite = suite_for(tiny_neox_dir, ("tiny",), ("main",))
    spec = models.spec_from_suite(suite, "tiny", "main")
    base = losses.stage_identity(spec, suite, CorpusConfig(), LossesConfig())
    moved = LossesConfig(scheduler="inprocess", n_workers=4, threads_per_worker=2, progress=False)
    assert losses.stage_identity(spec, suite, CorpusConfig(), moved) == base
    assert losses.stage_identity(spec, suite, CorpusConfig(), LossesConfig(batch_tokens=64)) != base


def test_a_part_made_under_another_numerics_version_is_recomputed(tmp_path, tiny_neox_dir, monkeypatch, caplog):
    tokens = write_tokens(tmp_path / "tokens.parquet", random_docs(30, 40, seed=7))
    out = tmp_path / "out"
    meta = run(tiny_neox_dir, tokens, out, shard_tokens=100, threads_per_worker=1)
    d = out / "model=tiny" / "revision=main"
    first = read_dir(d)
    assert files.read_config(d / "part-00000.parquet")["numerics"] == losses.NUMERICS_VERSION
    monkeypatch.setattr(losses, "NUMERICS_VERSION", losses.NUMERICS_VERSION + 1)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        again = run(tiny_neox_dir, tokens, out, shard_tokens=100, threads_per_worker=1)
    assert again["computed_parts"] == meta["parts"] and again["reused_parts"] == 0
    assert "part-00000.parquet was made with a different config (differs in numerics)" in caplog.text
    assert files.read_config(d / "part-00000.parquet")["numerics"] == losses.NUMERICS_VERSION
    assert read_dir(d).equals(first)


def _flip_bytes_in_loss_pages(path: Path) -> None:
    """Overwrite 8 bytes in the middle of the loss column's pages; the footer stays intact."""
    col = pq.read_metadata(path).row_group(0).column(2)
    start = col.dictionary_page_offset or col.data_page_offset
    at = start + col.total_compressed_size // 2
    raw = bytearray(path.read_bytes())
    raw[at : at + 8] = bytes(b ^ 0xFF for b in raw[at : at + 8])
    path.write_bytes(bytes(raw))


def test_a_part_damaged_inside_its_data_pages_is_recomputed(tmp_path, tiny_neox_dir, caplog):
    tokens = write_tokens(tmp_path / "tokens.parquet", random_docs(30, 40, seed=7))
    out = tmp_path / "out"
    meta = run(tiny_neox_dir, tokens, out, shard_tokens=100, threads_per_worker=1)
    d = out / "model=tiny" / "revision=main"
    first = read_dir(d)
    _flip_bytes_in_loss_pages(d / "part-00001.parquet")
    assert files.read_config(d / "part-00001.parquet") is not None  # the footer still reads
    with caplog.at_level(logging.INFO, logger="pipeline"):
        again = run(tiny_neox_dir, tokens, out, shard_tokens=100, threads_per_worker=1)
    assert again["computed_parts"] == 1 and again["reused_parts"] == meta["parts"] - 1
    assert "part-00001.parquet" in caplog.text and "recomputing it" in caplog.text
    assert read_dir(d).equals(first)


def test_a_part_holding_nan_is_recomputed_not_reused(tmp_path, tiny_neox_dir, caplog):
    from pipeline.core import shards

    tokens = write_tokens(tmp_path / "tokens.parquet", random_docs(30, 40, seed=7))
    out = tmp_path / "out"
    run(tiny_neox_dir, tokens, out, shard_tokens=100, threads_per_worker=1)
    d = out / "model=tiny" / "revision=main"
    first = read_dir(d)
    part = d / "part-00000.parquet"
    meta, arrays = losses.PARTS.read(part)
    arrays["loss"] = arrays["loss"].copy()
    arrays["loss"][3] = np.nan
    extra = {"compute": meta.pop("compute")}
    meta.pop(shards.CONTENT)
    shards.write_part(losses.PARTS, part, arrays, meta, extra=extra)  # a valid checksum, over a NaN
    with caplog.at_level(logging.INFO, logger="pipeline"):
        again = run(tiny_neox_dir, tokens, out, shard_tokens=100, threads_per_worker=1)
    assert again["computed_parts"] == 1
    assert "part-00000.parquet has 1 non-finite values in loss; recomputing it" in caplog.text
    assert read_dir(d).equals(first)


def test_a_failed_start_leaves_no_empty_partition_folders(tmp_path, tiny_neox_dir):
    tokens = write_tokens(tmp_path / "tokens.parquet", random_docs(5, 40, seed=7))
    out = tmp_path / "out"
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_neox_dir, broken)
    for w in broken.glob("*.safetensors"):
        w.write_bytes(b"not weights")  # found and fingerprinted; fails only when loaded
    with pytest.raises(Exception):  # noqa: B017 (whatever the loader raises on bad weights)
        run(broken, tokens, out)
    assert out.is_dir() and not (out / "model=tiny").exists()


@pytest.mark.slow
def test_stage_killed_by_sigkill_resumes_to_identical_output(tmp_path, tiny_neox_dir):
    # 400 one-document shards: the stage needs seconds of work after its first part appears
    docs = random_docs(400, 20, seed=8, min_len=20)
    tokens = write_tokens(tmp_path / "tokens.parquet", docs)
    params = {"suite": {"models": ["tiny"], "revisions": ["main"], "sources": {"tiny": str(tiny_neox_dir)},
                        "device": "cpu", "dtype": "float32"},
              "corpus": {"max_len": 64},
              # one thread: on a busy 2-core machine, OpenMP's sync of 2 threads costs ~10 ms per op
              "losses": {"shard_tokens": 19, "scheduler": "inprocess", "progress": False, "threads_per_worker": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    d = out / "model=tiny" / "revision=main"
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.losses", "--params", str(tmp_path / "params.yaml"),
         "--model", "tiny", "--revision", "main", "--tokens", str(tokens), "--out", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(d.glob("part-*.parquet"))) < 5:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the stage wrote no part in 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = len(list(d.glob("part-*.parquet")))
    assert 5 <= done < 400, "the stage was killed mid-way"
    assert not (d / losses.META_FILE).exists()

    meta = run(tiny_neox_dir, tokens, out, shard_tokens=19, threads_per_worker=1)
    assert meta["reused_parts"] >= done - 1 and meta["computed_parts"] + meta["reused_parts"] == 400
    assert not list(d.glob(".*.tmp"))
    run(tiny_neox_dir, tokens, tmp_path / "clean", shard_tokens=19, threads_per_worker=1)
    resumed, clean = read_dir(d), read_dir(tmp_path / "clean" / "model=tiny" / "revision=main")
    assert resumed.num_rows == 400 * 19
    assert resumed.equals(clean)


@pytest.mark.parametrize("device", devices())
def test_stage_on_each_device_records_its_precision_and_matches_the_cpu_table(tmp_path, tiny_neox_dir, device):
    """The stage at the device's default precision (suite.dtype auto): its meta names the device
    and the dtypes, CUDA's its peak memory, and the table is the CPU fp32 one within bf16 rounding."""
    tokens = write_tokens(tmp_path / "tokens.parquet", random_docs(20, 60, seed=12))
    run(tiny_neox_dir, tokens, tmp_path / "cpu")  # fp32 on the CPU
    suite = SuiteConfig(models=("tiny",), revisions=("main",), sources={"tiny": str(tiny_neox_dir)}, dtype="auto",
                        device=device)
    meta = losses.run_losses(models.spec_from_suite(suite, "tiny", "main"), tokens, tmp_path / "dev",
                             losses=LossesConfig(scheduler="inprocess", progress=False), suite=suite,
                             corpus=CorpusConfig(max_len=64))
    cuda = device == "cuda"
    assert meta["compute"]["device_type"] == device
    assert meta["compute"]["compute_dtype"] == ("bfloat16" if cuda else "float32")
    assert (meta["peak_cuda_bytes"] is not None) == cuda
    part = Path("model=tiny") / "revision=main"
    a, b = read_dir(tmp_path / "cpu" / part), read_dir(tmp_path / "dev" / part)
    assert a.select(["doc_id", "pos"]).equals(b.select(["doc_id", "pos"]))
    diff = np.abs(a["loss"].to_numpy() - b["loss"].to_numpy())
    assert diff.mean() <= 0.01 and diff.max() <= 0.05, f"mean {diff.mean():.3g}, max {diff.max():.3g} nats"


# --------------------------------------------------------------------------- Dask


@pytest.mark.slow
def test_local_cluster_of_two_workers_gives_the_inprocess_table(tmp_path, tiny_neox_dir):
    tokens = write_tokens(tmp_path / "tokens.parquet", random_docs(40, 60, seed=9))
    ref = run(tiny_neox_dir, tokens, tmp_path / "inproc", shard_tokens=300)
    assert ref["parts"] >= 4
    meta = run(tiny_neox_dir, tokens, tmp_path / "dask", shard_tokens=300, scheduler="local", n_workers=2,
               threads_per_worker=1)
    assert meta["execution"] == "local" and meta["computed_parts"] == ref["parts"]
    part = Path("model=tiny") / "revision=main"
    a, b = read_dir(tmp_path / "inproc" / part), read_dir(tmp_path / "dask" / part)
    assert a.select(["doc_id", "pos"]).equals(b.select(["doc_id", "pos"]))
    np.testing.assert_allclose(a["loss"].to_numpy(), b["loss"].to_numpy(), atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_local_cluster_workers_score_on_cuda(tmp_path, tiny_neox_dir):
    """Workers of a LocalCluster load the model on the GPU (pipeline.core.execution.worker_device)
    and give the in-process CUDA table."""
    pytest.importorskip("distributed")
    tokens = write_tokens(tmp_path / "tokens.parquet", random_docs(40, 60, seed=9))
    suite = SuiteConfig(models=("tiny",), revisions=("main",), sources={"tiny": str(tiny_neox_dir)}, dtype="float32",
                        device="cuda")
    spec = models.spec_from_suite(suite, "tiny", "main")

    def stage(out: str, **kw) -> dict:
        cfg = LossesConfig(progress=False, shard_tokens=300, autocast="none", **kw)
        return losses.run_losses(spec, tokens, tmp_path / out, losses=cfg, suite=suite, corpus=CorpusConfig(max_len=64))

    ref = stage("inproc", scheduler="inprocess")
    meta = stage("dask", scheduler="local", n_workers=2, threads_per_worker=1)
    assert ref["parts"] >= 4 and meta["execution"] == "local" and meta["computed_parts"] == ref["parts"]
    assert meta["compute"]["device_type"] == "cuda" and meta["peak_cuda_bytes"] is not None
    part = Path("model=tiny") / "revision=main"
    a, b = read_dir(tmp_path / "inproc" / part), read_dir(tmp_path / "dask" / part)
    assert a.select(["doc_id", "pos"]).equals(b.select(["doc_id", "pos"]))
    np.testing.assert_allclose(a["loss"].to_numpy(), b["loss"].to_numpy(), atol=1e-5, rtol=0)


def test_a_model_rewritten_in_place_is_rescored(tmp_path, tiny_tokenizer_dir):
    """persist: true keeps part files across runs; a local model retrained under the same
    path (as the planted stage does when its params change) must not reuse them."""
    from conftest import make_neox

    tokens = write_tokens(tmp_path / "tokens.parquet", random_docs(6, 40, seed=9))
    model_dir = make_neox(tmp_path / "model", tiny_tokenizer_dir, seed=1)
    first = run(model_dir, tokens, tmp_path / "out", shard_tokens=50)
    assert first["reused_parts"] == 0
    assert run(model_dir, tokens, tmp_path / "out", shard_tokens=50) == first  # same weights: all reused, meta untouched
    shutil.rmtree(model_dir)
    make_neox(model_dir, tiny_tokenizer_dir, seed=2)  # other weights, same path
    again = run(model_dir, tokens, tmp_path / "out", shard_tokens=50)
    assert again != first and again["reused_parts"] == 0 and again["computed_parts"] == first["computed_parts"]
    fresh = run(model_dir, tokens, tmp_path / "fresh", shard_tokens=50)
    got = read_dir(tmp_path / "out" / "model=tiny" / "revision=main")
    assert got.equals(read_dir(tmp_path / "fresh" / "model=tiny" / "revision=main"))
    assert fresh["reused_parts"] == 0
    spec = models.ModelSpec("tiny", str(model_dir))
    assert models.weights_fingerprint(spec) == models.weights_fingerprint(spec)  # deterministic
    assert models.weights_fingerprint(models.ModelSpec("hub", "EleutherAI/pythia-70m", "step1000")) is None
    assert models.weights_fingerprint(object()) is None  # a model object handed in directly


def test_scheduler_address_and_per_process_cache(monkeypatch):
    monkeypatch.delenv(execution.ENV_SCHEDULER, raising=False)
    assert execution.scheduler_address("local") == "local"
    monkeypatch.setenv(execution.ENV_SCHEDULER, "tcp://10.0.0.1:8786")
    assert execution.scheduler_address("inprocess") == "tcp://10.0.0.1:8786"

    execution.clear_cache()
    calls = []
    make = lambda k: (lambda: calls.append(k) or k)  # noqa: E731
    assert execution.cached("a", make("a")) == "a"
    assert execution.cached("a", make("a")) == "a"
    assert execution.cached("b", make("b")) == "b"  # evicts "a": one model per process
    assert execution.cached("a", make("a")) == "a"
    assert calls == ["a", "b", "a"]
    execution.clear_cache()


def test_choose_mode_and_run_tasks_in_process():
    L, I = execution.LOCAL, execution.INPROCESS
    assert execution.choose_mode(I, 5, 4) == I
    assert execution.choose_mode(L, 1, 4) == I  # one task: a LocalCluster only adds start-up
    assert execution.choose_mode(L, 5, 1) == I
    assert execution.choose_mode(L, 5, 2) == L
    assert execution.choose_mode("tcp://h:1", 1, 1) == "tcp://h:1"  # an external cluster is always used
    seen = []
    out = execution.run_tasks(
        lambda task, scale=1: {"v": task[0] * scale, "threads": task[1]}, [1, 2, 3], lambda item, th: (item, th),
        mode=I, n_workers=2, threads_per_worker=3, key_prefix="t", on_result=seen.append,
        inprocess_kwargs={"scale": 10},
    )
    assert out == seen == [{"v": 10, "threads": 3}, {"v": 20, "threads": 3}, {"v": 30, "threads": 3}]


@pytest.mark.parametrize("vocab_block", [None, 7, 64, 299])
def test_vocab_tiled_cross_entropy_equals_full_log_softmax(vocab_block):
    # the tiled path runs on CPU with real vocabularies (50k); the tiny models' 320 never
    # reach it, so it is checked here directly, bias and logit soft-capping included
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=True)
    hidden, targets = torch.randn(50, 16) * 3, torch.randint(0, 300, (50,))
    cap = lambda x: torch.tanh(x / 2.0) * 2.0  # noqa: E731
    for transform in (None, cap):
        with torch.no_grad():
            logits = head(hidden) if transform is None else cap(head(hidden))
            ref = -torch.log_softmax(logits.double(), -1).gather(1, targets[:, None])[:, 0]
            got = losses.next_token_losses(hidden, targets, head, 13, transform, vocab_block)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5, rtol=0)


def test_tasks_carry_absolute_paths(tmp_path, monkeypatch):
    """Dask workers start in their own directory: a task's model source and cache are absolute."""
    from pipeline.core import execution
    from pipeline.lm.models import ModelSpec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    local = ModelSpec(name="m", source="models/m", revision="step1")
    spec, kwargs = execution.for_workers(local, {"cache_dir": "cache/hf", "dtype": "auto"})
    assert spec.source == str(tmp_path / "models" / "m") and spec.revision == "step1"
    assert kwargs == {"cache_dir": str(tmp_path / "cache" / "hf"), "dtype": "auto"}
    hub = ModelSpec(name="p", source="EleutherAI/pythia-70m")
    assert execution.for_workers(hub, {"cache_dir": None})[0] == hub  # a hub id is not a path
    assert local.source == "models/m"  # the stage's own spec (its identity) is untouched


def test_preceding_tokens_stop_at_the_document_start():
    table = corpus.TokenTable(doc_ids=np.array([3, 7]), offsets=np.array([0, 3, 7]),
                              token_ids=np.array([10, 11, 12, 20, 21, 22, 23], dtype=np.int32))
    got = table.preceding(np.array([3, 7, 7]), np.array([1, 1, 3]), 2)
    np.testing.assert_array_equal(got, [[-1, 10], [-1, 20], [21, 22]])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_fails_in_one_line_and_the_revert_reuses_every_part(tmp_path, tiny_revisions_dir,
                                                                                       capsys):
    """suite.device: cuda on a CPU machine: one line naming suite.device, before any part is
    looked at; back to cpu, every finished part is reused."""
    from pipeline.core import stage
    from stages import losses as losses_stage

    tokens = write_tokens(tmp_path / "tokens.parquet", random_docs(20, 80, seed=5))

    def params(device: str) -> str:
        p = {"suite": {"models": ["tiny-a"], "revisions": ["step1"], "device": device,
                       "sources": {"tiny-a": str(tiny_revisions_dir)}},
             "corpus": {"max_len": 64}, "losses": {"scheduler": "inprocess", "shard_tokens": 300, "progress": False}}
        (tmp_path / f"{device}.yaml").write_text(yaml.safe_dump(p))
        return str(tmp_path / f"{device}.yaml")

    argv = ["--model", "tiny-a", "--tokens", str(tokens), "--out", str(tmp_path / "out")]
    losses_stage.main(["--params", params("cpu"), *argv])
    d = tmp_path / "out" / "model=tiny-a" / "revision=step1"
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    assert len([n for n in before if n.startswith("part-")]) >= 3
    capsys.readouterr()  # the first run's progress bars
    with pytest.raises(SystemExit) as e:
        stage.run(losses_stage.main, ["--params", params("cuda"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "suite.device" in err[0]
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # parts and _meta.json untouched
    losses_stage.main(["--params", params("cpu"), *argv])
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # every part reused, nothing rewritten
