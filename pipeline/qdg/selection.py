"""Which tokens QDG studies: tokens one model predicts well, minus those another mechanism explains.

Why this module exists: QDG (Michaud et al. 2023) clusters the gradients of tokens the
model already predicts (loss < 0.1 nats): for those, the gradient says which learned
mechanism the prediction leans on. The paper took 10,000 such tokens of pythia-70m at a
fixed stride through the Pile test set, minus "induction" tokens (the target completes a
trigram seen earlier in the document: copying, one mechanism that would swamp the rest).
Here the sample is random and seeded by default, the stride is an option, and a second,
stricter filter drops tokens whose bigram (last context token, target) appeared earlier.

Positions follow the losses tables: the row for ``pos`` is the loss of predicting token
``pos`` from tokens ``0..pos-1``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.config import SelectConfig
from pipeline.core.errors import QuantaError
from pipeline.lm.corpus import TokenTable

SCHEMA = pa.schema(
    [
        ("sample", pa.int32()),
        ("doc_id", pa.int64()),
        ("pos", pa.int32()),
        ("token_id", pa.int32()),
        ("loss", pa.float32()),
    ]
)


class SelectWarning(UserWarning):
    """Fewer tokens qualify than were asked for; the stage takes what there is."""


def repeated_ngram(tokens: TokenTable, n: int) -> np.ndarray:
    """(n_tokens,) bool: the n-gram ending at each token occurred earlier in its document.

    Token ``t`` at position ``pos >= n - 1`` is marked when ``tokens[pos-n+1 : pos+1]``
    equals ``tokens[q-n+1 : q+1]`` for some ``q < pos`` of the same document. With n = 3
    this is the paper's induction filter; with n = 2, the bigram filter.
    """
    ids = tokens.token_ids.astype(np.int64)
    total = len(ids)
    doc_index = np.repeat(np.arange(len(tokens.doc_ids)), tokens.lengths)  # (n_tokens,)
    pos = np.arange(total) - np.repeat(tokens.offsets[:-1], tokens.lengths)
    base = int(ids.max()) + 1 if total else 1
    key = np.zeros(total, dtype=np.int64)
    valid = pos >= n - 1
    for j in range(n):  # key = t[pos-n+1] * base^(n-1) + ... + t[pos]; fits int64 for n <= 3 and base < 2^21
        shifted = np.zeros(total, dtype=np.int64)
        shifted[n - 1 - j :] = ids[: total - (n - 1 - j)] if n - 1 - j else ids
        key = key * base + shifted
    frame = pd.DataFrame({"doc": doc_index[valid], "key": key[valid]})
    out = np.zeros(total, dtype=bool)
    out[np.flatnonzero(valid)] = frame.duplicated(keep="first").to_numpy()  # rows come in position order
    return out


def select_samples(losses: pd.DataFrame, tokens: TokenTable, cfg: SelectConfig) -> pa.Table:
    """The QDG samples: (sample, doc_id, pos, token_id, loss), sorted by (doc_id, pos).

    losses: doc_id, pos, loss of one model (nats). Qualifying tokens have loss <
    cfg.max_loss and pass cfg.filters; of those, cfg.n_samples are taken at random
    (seeded) or at a fixed stride. Fewer qualifying tokens: a SelectWarning, and all are
    taken.
    """
    if len(tokens.doc_ids) == 0:
        raise QuantaError("the tokens table is empty; nothing to select from (check corpus.source)")
    doc = losses["doc_id"].to_numpy(np.int64)
    pos = losses["pos"].to_numpy(np.int64)
    loss = losses["loss"].to_numpy(np.float32)
    rows = tokens.index_of(doc)
    known = (rows < len(tokens.doc_ids)) & (tokens.doc_ids[np.minimum(rows, len(tokens.doc_ids) - 1)] == doc)
    if not known.all():
        i = int(np.flatnonzero(~known)[0])
        raise QuantaError(
            f"the loss table has document {doc[i]}, which the tokens table lacks; the losses were computed on "
            "another corpus (rerun the losses stage after the corpus stage)"
        )
    flat = tokens.offsets[rows] + pos  # index of each scored token in tokens.token_ids
    keep = np.isfinite(loss) & (loss < cfg.max_loss)
    for name in cfg.filters:
        repeated = repeated_ngram(tokens, 3 if name == "induction" else 2)
        keep &= ~repeated[flat]
    candidates = np.flatnonzero(keep)
    candidates = candidates[np.lexsort((pos[candidates], doc[candidates]))]  # reading order
    n = len(candidates)
    if n == 0:
        raise QuantaError(
            f"no token has loss < {cfg.max_loss} nats{' after the ' + '+'.join(cfg.filters) + ' filter' if cfg.filters else ''}; "
            "raise select.max_loss or pick a stronger select.model"
        )
    if n < cfg.n_samples:
        warnings.warn(
            f"only {n} tokens qualify (loss < {cfg.max_loss} nats{', filters ' + '+'.join(cfg.filters) if cfg.filters else ''}) "
            f"of the {cfg.n_samples} asked for (select.n_samples); taking all of them "
            "(for more: raise select.max_loss or use a stronger select.model)",
            SelectWarning,
            stacklevel=2,
        )
        chosen = candidates
    elif cfg.sampling == "stride":
        stride = n // cfg.n_samples  # the paper's: every stride-th qualifying token, from the start
        chosen = candidates[::stride][: cfg.n_samples]
    else:
        rng = np.random.default_rng(cfg.seed)
        chosen = np.sort(rng.choice(n, size=cfg.n_samples, replace=False))
        chosen = candidates[chosen]
    return pa.Table.from_arrays(
        [
            pa.array(np.arange(len(chosen), dtype=np.int32)),
            pa.array(doc[chosen]),
            pa.array(pos[chosen].astype(np.int32)),
            pa.array(tokens.token_ids[flat[chosen]].astype(np.int32)),
            pa.array(loss[chosen]),
        ],
        schema=SCHEMA,
    )


def read_samples(path: str | Path) -> pd.DataFrame:
    """samples.parquet as a DataFrame, with a clear error when it is missing."""
    path = Path(path)
    if not path.exists():
        raise QuantaError(f"samples table {path} not found; run the select stage first (dvc repro select)")
    return pq.read_table(path).to_pandas()
