"""The select stage's library: thresholds, filters, sampling, bad input."""

import warnings

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import ConfigError, SelectConfig, build
from pipeline.core.errors import QuantaError
from pipeline.lm.corpus import TokenTable
from pipeline.qdg.selection import SCHEMA, SelectWarning, repeated_ngram, select_samples


def make_tokens(docs):
    lengths = np.array([len(d) for d in docs])
    return TokenTable(
        doc_ids=np.arange(len(docs), dtype=np.int64) * 10,  # ids need not be 0..n-1
        offsets=np.r_[0, np.cumsum(lengths)].astype(np.int64),
        token_ids=np.concatenate(docs).astype(np.int32),
    )


def loss_frame(tokens, losses):
    rows = []
    for i, d in enumerate(tokens.doc_ids):
        n = tokens.offsets[i + 1] - tokens.offsets[i]
        for p in range(1, n):
            rows.append((d, p, losses[tokens.offsets[i] + p]))
    return pd.DataFrame(rows, columns=["doc_id", "pos", "loss"])


def naive_repeated(doc, n):
    out = np.zeros(len(doc), dtype=bool)
    for p in range(n - 1, len(doc)):
        gram = tuple(doc[p - n + 1 : p + 1])
        out[p] = any(tuple(doc[q - n + 1 : q + 1]) == gram for q in range(n - 1, p))
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_repeated_ngram_matches_a_plain_loop(n):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 4, size=rng.integers(1, 40)) for _ in range(30)]
    tokens = make_tokens(docs)
    got = repeated_ngram(tokens, n)
    want = np.concatenate([naive_repeated(list(d), n) for d in docs])
    np.testing.assert_array_equal(got, want)
    assert want.any() and (~want).any()


def test_threshold_sampling_and_schema():
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 50, size=30) for _ in range(40)]
    tokens = make_tokens(docs)
    loss = rng.exponential(0.3, size=len(tokens.token_ids)).astype(np.float32)
    frame = loss_frame(tokens, loss)
    cfg = SelectConfig(n_samples=50, max_loss=0.1, seed=3)
    table = select_samples(frame, tokens, cfg)
    assert table.schema == SCHEMA
    df = table.to_pandas()
    assert len(df) == 50 and (df["loss"] < 0.1).all()
    assert df["sample"].tolist() == list(range(50))
    # sorted in reading order, distinct, and the token ids are the documents' own
    assert df.sort_values(["doc_id", "pos"]).index.tolist() == list(range(50))
    assert not df.duplicated(["doc_id", "pos"]).any()
    idx = tokens.offsets[tokens.index_of(df["doc_id"].to_numpy())] + df["pos"].to_numpy()
    np.testing.assert_array_equal(df["token_id"].to_numpy(), tokens.token_ids[idx])
    # seeded: same seed, same sample; another seed, another
    assert select_samples(frame, tokens, cfg).equals(table)
    other = select_samples(frame, tokens, SelectConfig(n_samples=50, max_loss=0.1, seed=4)).to_pandas()
    assert not other[["doc_id", "pos"]].equals(df[["doc_id", "pos"]])


def test_stride_takes_every_nth_qualifying_token():
    docs = [np.arange(11) for _ in range(2)]
    tokens = make_tokens(docs)
    frame = loss_frame(tokens, np.zeros(22, dtype=np.float32))  # 20 qualifying tokens
    df = select_samples(frame, tokens, SelectConfig(n_samples=5, sampling="stride")).to_pandas()
    assert list(zip(df["doc_id"], df["pos"])) == [(0, 1), (0, 5), (0, 9), (10, 3), (10, 7)]


def test_filters_drop_induction_and_bigram_tokens():
    # doc: a b c a b c -> the second "c" completes the trigram "a b c"; its bigram "b c" too
    tokens = make_tokens([np.array([1, 2, 3, 1, 2, 3, 4, 2, 3])])
    frame = loss_frame(tokens, np.zeros(9, dtype=np.float32))
    def pos(**kw):
        return select_samples(frame, tokens, SelectConfig(n_samples=100, **kw)).to_pandas()["pos"].tolist()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SelectWarning)
        assert pos() == list(range(1, 9))
        assert pos(filters=("induction",)) == [1, 2, 3, 4, 6, 7, 8]  # pos 5 completes "1 2 3" again
        assert pos(filters=("bigram",)) == [1, 2, 3, 6, 7]  # "1 2" (pos 4), "2 3" (5, 8) were seen
        assert pos(filters=("induction", "bigram")) == [1, 2, 3, 6, 7]


def test_too_few_qualifying_tokens_warns_and_takes_them_all():
    tokens = make_tokens([np.arange(10)])
    loss = np.ones(10, dtype=np.float32)
    loss[[2, 5]] = 0.01
    with pytest.warns(SelectWarning, match=r"only 2 tokens qualify .* of the 100 asked for \(select.n_samples\); taking all "
                                           r"of them \(for more: raise select.max_loss or use a stronger select.model\)"):
        df = select_samples(loss_frame(tokens, loss), tokens, SelectConfig(n_samples=100)).to_pandas()
    assert df["pos"].tolist() == [2, 5]


def test_bad_input():
    tokens = make_tokens([np.arange(10)])
    frame = loss_frame(tokens, np.ones(10, dtype=np.float32))
    with pytest.raises(QuantaError, match="no token has loss < 0.1 nats; raise select.max_loss"):
        select_samples(frame, tokens, SelectConfig())
    foreign = frame.assign(doc_id=frame["doc_id"] + 7)
    with pytest.raises(QuantaError, match="document 7, which the tokens table lacks"):
        select_samples(foreign, tokens, SelectConfig())
    with pytest.raises(ConfigError, match="unknown filter 'trigram'"):
        build(SelectConfig, {"filters": ["trigram"]}, "select")
    with pytest.raises(ConfigError, match="n_samples must be >= 1"):
        build(SelectConfig, {"n_samples": 0}, "select")
