"""Documents in, tokens out: the corpus on which every model of the suite is scored.

Why this module exists: every later table is keyed by (doc_id, pos), so documents need
ids that never move and a tokenization that is done once, the same way, for all models.
This module reads documents from a source, gives each a stable id, tokenizes it, and
says which slices of a document the model sees (:class:`Window`).

Sources (``corpus.source``):

- a Hugging Face dataset id, or a local dataset folder (data files such as
  ``data/test-*.parquet`` or ``test.jsonl``): both go through
  ``datasets.load_dataset(source, name=dataset_config, split=split, streaming=True)``,
  so nothing is downloaded past the documents used. A folder written by
  ``Dataset.save_to_disk`` is read with ``load_from_disk``.
- a local ``.jsonl`` file (one JSON object per line; blank lines are not documents),
  optionally compressed (``.jsonl.gz``, ``.jsonl.bz2``, ``.jsonl.xz``; ``.jsonl.zst``, the
  Pile's own format, with the ``zstandard`` package).
- a local ``.txt`` file: one document per paragraph, paragraphs being separated by one or
  more blank (whitespace-only) lines; line breaks inside a paragraph are kept. (This is
  ``datasets``' ``sample_by="paragraph"``; a one-line-per-document file is a special case
  whenever its documents are separated by blank lines.)
- a local ``.parquet`` file with a text column.

The text is ``record[text_field]``; every other field goes, as JSON, into ``meta``.

Doc ids: the 0-based index of a document in source order, counted before any filtering,
so a document skipped for being shorter than two tokens leaves a gap and never shifts
the ids of those after it (docs.parquet and tokens.parquet hold the same ids: the
documents that have tokens). ``n_docs`` reads the first n_docs documents (ids 0..n_docs-1);
``n_tokens`` stops once that many tokens are kept (the last document is cut to fit).

Tokenization: each document is tokenized once, as a whole, with no special tokens added
(Pythia's tokenizer adds none; a BOS would shift every position). ``truncate`` keeps the
first ``max_len`` tokens of each document; ``strided`` keeps them all.

Context handling, i.e. which tokens the model sees when it predicts a position:

- ``truncate`` (the paper's protocol): one forward pass per document on its first
  ``max_len`` tokens; positions 1..len-1 are scored. Everything after max_len is unseen.
- ``strided``: every position >= 1 of every document is scored exactly once, each with
  at least ``min(pos, min_context)`` tokens of context, by windows of ``max_len`` tokens
  that advance by ``stride = max_len - min_context``. Whole documents are covered, at the
  cost of about ``max_len / (max_len - min_context)`` times the compute of truncation
  (2x for the default min_context = max_len / 2), and losses late in a long document
  are measured with less context than a single long pass would give them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.config import ConfigError, CorpusConfig, SuiteConfig, to_dict
from pipeline.core.errors import QuantaError


class CorpusError(QuantaError):
    """A corpus that cannot be read or used as configured; the message names the fix."""


#: docs.parquet: one row per document that has tokens; meta is a JSON object.
DOCS_SCHEMA = pa.schema([("doc_id", pa.int64()), ("text", pa.string()), ("meta", pa.string())])
#: tokens.parquet: one row per kept token; pos counts from 0 in each document; token_str
#: is the token's text on its own (bytes of a partial UTF-8 character escaped as "\\xNN").
TOKENS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.int64()),
        ("pos", pa.int32()),
        ("token_id", pa.int32()),
        ("token_str", pa.dictionary(pa.int32(), pa.string())),
    ]
)

_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of the source, with its stable id (its 0-based index in the source)."""

    doc_id: int
    text: str
    meta: str  # JSON object, the source record's other fields


# --------------------------------------------------------------------------- reading sources


def _local_kind(source: str) -> Optional[str]:
    """The reader of a local file name: "jsonl", "txt" or "parquet"; None for a dataset."""
    name = source.lower()
    if name.endswith(".parquet"):
        return "parquet"
    for comp in ("", *_COMPRESSIONS):  # text formats may be compressed
        for suffix in (".jsonl", ".txt"):
            if name.endswith(suffix + comp):
                return suffix[1:]
    return None


def is_local(source: str) -> bool:
    """Whether corpus.source names a local file (.jsonl, .txt, .parquet, compressed text)
    rather than a hub dataset."""
    return _local_kind(source) is not None


def _meta(record: dict, text_field: str) -> str:
    return json.dumps({k: v for k, v in record.items() if k != text_field}, ensure_ascii=False, sort_keys=True, default=str)


def _text_of(record: Any, cfg: CorpusConfig, where: str) -> str:
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object with a '{cfg.text_field}' field, got {type(record).__name__}")
    if cfg.text_field not in record:
        fields = ", ".join(sorted(map(str, record))) or "(none)"
        raise CorpusError(
            f"{where}: no field '{cfg.text_field}'; the fields are {fields}; set corpus.text_field to one of them"
        )
    text = record[cfg.text_field]
    if text is None:
        return ""  # a missing text is an empty document: skipped as too short, id kept
    if not isinstance(text, str):
        raise CorpusError(
            f"{where}: field '{cfg.text_field}' holds {type(text).__name__}, not text; set corpus.text_field to a text field"
        )
    return text


def _open_binary(path: Path):
    if path.suffix.lower() in _COMPRESSIONS:
        import fsspec

        try:
            return fsspec.open(str(path), "rb", compression="infer").open()
        except (ValueError, ImportError) as e:
            raise CorpusError(f"{path}: cannot decompress ({e}); for .zst files: pip install zstandard") from e
    return open(path, "rb")


def _decoded_lines(path: Path, cfg: CorpusConfig) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 file, reporting bad bytes by offset."""
    errors = "replace" if cfg.on_decode_error == "replace" else "strict"
    offset = 0
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"{path}: invalid UTF-8 at byte offset {offset + e.start} (line {lineno}); "
                    "fix the file, or set corpus.on_decode_error: replace"
                ) from None
            offset += len(raw)
            yield lineno, line


def _iter_jsonl(path: Path, cfg: CorpusConfig) -> Iterator[tuple[str, str]]:
    for lineno, line in _decoded_lines(path, cfg):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path} line {lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        yield _text_of(record, cfg, f"{path} line {lineno}"), _meta(record, cfg.text_field)


def _iter_txt(path: Path, cfg: CorpusConfig) -> Iterator[tuple[str, str]]:
    lines: list[str] = []
    first = 0
    for lineno, line in _decoded_lines(path, cfg):
        if line.strip():
            if not lines:
                first = lineno
            lines.append(line)
        elif lines:
            yield "".join(lines).rstrip("\r\n"), json.dumps({"line": first})
            lines = []
    if lines:
        yield "".join(lines).rstrip("\r\n"), json.dumps({"line": first})


def _iter_parquet(path: Path, cfg: CorpusConfig) -> Iterator[tuple[str, str]]:
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if cfg.text_field not in names:
        raise CorpusError(
            f"{path}: no column '{cfg.text_field}'; the columns are {', '.join(names)}; "
            "set corpus.text_field to one of them"
        )
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield _text_of(record, cfg, str(path)), _meta(record, cfg.text_field)


def _offline() -> bool:
    from pipeline.lm.models import hub_offline

    return hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _open_dataset(cfg: CorpusConfig, cache_dir: Optional[str]):
    """The source as a streaming ``datasets.IterableDataset``, or a one-line CorpusError."""
    import datasets

    src = cfg.source
    path = Path(src).expanduser()
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        # written by save_to_disk: not a loadable dataset repo, but already local Arrow
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise CorpusError(f"{src}: no split '{cfg.split}'; it has {', '.join(ds)}; set corpus.split")
            ds = ds[cfg.split]
        return ds.to_iterable_dataset()
    try:
        return datasets.load_dataset(
            src, name=cfg.dataset_config, split=cfg.split, streaming=True, cache_dir=cache_dir
        )
    except QuantaError:
        raise
    except Exception as e:  # datasets raises many types; all mean "cannot open this source"
        raise _dataset_error(cfg, e) from e


def _dataset_error(cfg: CorpusConfig, e: Exception) -> CorpusError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    src = cfg.source
    if not Path(src).expanduser().exists() and _offline():
        return CorpusError(
            f"dataset '{src}' is not available offline (HF_HUB_OFFLINE=1: {msg}); download it where there is a "
            f"network: hf download {src} --repo-type dataset --local-dir <dir>, then set corpus.source: <dir>"
        )
    if "split" in msg.lower():
        return CorpusError(f"dataset '{src}': {msg}; set corpus.split")
    if "config" in msg.lower():
        return CorpusError(f"dataset '{src}': {msg}; set corpus.dataset_config")
    return CorpusError(
        f"cannot read dataset '{src}' (config {cfg.dataset_config}, split {cfg.split}): {type(e).__name__}: {msg}"
    )


def _iter_dataset(cfg: CorpusConfig, cache_dir: Optional[str]) -> Iterator[tuple[str, str]]:
    ds = _open_dataset(cfg, cache_dir)
    features = getattr(ds, "features", None)
    if features is not None and cfg.text_field not in features:
        raise CorpusError(
            f"dataset '{cfg.source}': no field '{cfg.text_field}'; the fields are {', '.join(features)}; "
            "set corpus.text_field to one of them"
        )
    it = iter(ds)
    for i in itertools.count():
        try:
            record = next(it)
        except StopIteration:
            return
        except QuantaError:
            raise
        except Exception as e:  # a stream can fail mid-way (network, a corrupt shard)
            raise _dataset_error(cfg, e) from e
        yield _text_of(record, cfg, f"dataset '{cfg.source}' record {i}"), _meta(record, cfg.text_field)


def iter_documents(cfg: CorpusConfig, cache_dir: Optional[str] = None) -> Iterator[Document]:
    """The documents of ``cfg.source`` in source order, with stable ids, at most n_docs.

    `cache_dir` is the ``datasets`` cache for dataset sources (unused for local files).
    """
    kind = _local_kind(cfg.source)
    path = Path(cfg.source).expanduser()
    if kind is not None:
        if not path.is_file():
            raise CorpusError(f"corpus.source {cfg.source} does not exist (run the stage that writes it, or fix the path)")
        records = {"jsonl": _iter_jsonl, "txt": _iter_txt, "parquet": _iter_parquet}[kind](path, cfg)
    else:
        records = _iter_dataset(cfg, cache_dir)
    for doc_id, (text, meta) in enumerate(itertools.islice(records, cfg.n_docs)):
        yield Document(doc_id, text, meta)


def docs_table(docs: Sequence[Document]) -> pa.Table:
    """Documents as a table (doc_id int64, text string, meta json string)."""
    return pa.table(
        {
            "doc_id": pa.array([d.doc_id for d in docs], pa.int64()),
            "text": pa.array([d.text for d in docs], pa.string()),
            "meta": pa.array([d.meta for d in docs], pa.string()),
        },
        schema=DOCS_SCHEMA,
    )


def build_docs(cfg: CorpusConfig, cache_dir: Optional[str] = None) -> pa.Table:
    """All documents the source yields under ``n_docs`` (``n_tokens`` needs a tokenizer:
    see :func:`build_corpus`), as a :data:`DOCS_SCHEMA` table."""
    docs = list(iter_documents(cfg, cache_dir))
    if not docs:
        raise _empty_error(cfg)
    return docs_table(docs)


def _empty_error(cfg: CorpusConfig) -> CorpusError:
    where = f"split '{cfg.split}' of " if _local_kind(cfg.source) is None else ""
    return CorpusError(f"the corpus is empty: {where}{cfg.source} has no documents; point corpus.source at a non-empty source")


# --------------------------------------------------------------------------- tokenizing


def _batches(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text on its own, e.g. " the".

    A byte-level BPE token that holds part of a multi-byte character decodes to U+FFFD,
    which would make distinct tokens look the same; such a token is written with its
    bytes escaped instead ("\\xe9"), and any other undecodable token by its vocabulary
    spelling (sentencepiece's "<0xE9>").
    """
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if not any("\ufffd" in t for t in texts):
        return texts
    try:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_of = {c: b for b, c in bytes_to_unicode().items()}
    except ImportError:  # pragma: no cover - older/newer transformers
        byte_of = {}
    raw = tokenizer.convert_ids_to_tokens(ids)
    out = []
    for text, spelling in zip(texts, raw):
        if "\ufffd" in text and spelling:
            if all(c in byte_of for c in spelling):
                text = bytes(byte_of[c] for c in spelling).decode("utf-8", errors="backslashreplace")
            else:
                text = spelling
        out.append(text)
    return out


def _token_strings(tokenizer, token_ids: np.ndarray) -> pa.DictionaryArray:
    """token_str as a dictionary column: each distinct id decoded once.

    The dictionary holds each string once (pandas reads it as a Categorical, which
    requires that), so two ids with the same text share an entry; token_id tells them apart.
    """
    uniq = np.unique(token_ids)  # sorted
    texts = pa.array(_token_texts(tokenizer, uniq.tolist()), pa.string()).dictionary_encode()
    # token -> its index in uniq -> that id's index in the dictionary of distinct strings
    indices = texts.indices.to_numpy()[np.searchsorted(uniq, token_ids)].astype(np.int32)
    return pa.DictionaryArray.from_arrays(pa.array(indices, pa.int32()), texts.dictionary)


def _tokenize_stream(
    docs: Iterable[Document], tokenizer, cfg: CorpusConfig, progress: bool = False, batch_docs: int = 256
) -> tuple[list[Document], pa.Table, dict]:
    """Tokenize documents in order until the stream or the n_tokens budget ends.

    Returns the documents kept (>= 2 tokens), their tokens (:data:`TOKENS_SCHEMA`) and the
    count of documents read and dropped: ``empty`` (no text, or a null one) and ``short``
    (one token, so no position to score).
    """
    from tqdm.auto import tqdm

    kept: list[Document] = []
    ids_parts: list[np.ndarray] = []  # per kept doc: (n_tokens_of_doc,) int32
    n_read = n_kept_tokens = n_empty = n_short = 0
    budget = cfg.n_tokens
    done = False
    with tqdm(total=cfg.n_docs, unit="doc", desc="tokenize", disable=not progress, mininterval=1) as bar:
        for batch in _batches(docs, batch_docs):
            # one call per batch: the fast tokenizer parallelizes over documents
            encoded = tokenizer([d.text for d in batch], add_special_tokens=False, verbose=False)["input_ids"]
            for doc, ids in zip(batch, encoded):
                n_read += 1
                if cfg.context == "truncate":
                    ids = ids[: cfg.max_len]
                if budget is not None:
                    ids = ids[: budget - n_kept_tokens]
                    done = n_kept_tokens + len(ids) >= budget
                if len(ids) >= 2:  # one token has nothing to predict it from: no scored position
                    kept.append(doc)
                    ids_parts.append(np.asarray(ids, dtype=np.int32))
                    n_kept_tokens += len(ids)
                elif doc.text == "":
                    n_empty += 1
                else:
                    n_short += 1
                if done:
                    break
            bar.update(n_read - bar.n)
            bar.set_postfix(tokens=n_kept_tokens, refresh=False)
            if done:
                break
    if n_read == 0:
        raise _empty_error(cfg)
    if not kept:
        raise CorpusError(
            f"all {n_read} documents of {cfg.source} are shorter than 2 tokens, so there is nothing to score; "
            f"check corpus.text_field ('{cfg.text_field}') and corpus.source"
        )
    lengths = np.array([len(p) for p in ids_parts], dtype=np.int64)
    token_ids = np.concatenate(ids_parts)  # (token,)
    doc_ids = np.repeat(np.array([d.doc_id for d in kept], dtype=np.int64), lengths)
    # pos restarts at 0 in each document: arange over all tokens minus each doc's start
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = (np.arange(len(token_ids), dtype=np.int64) - starts).astype(np.int32)
    tokens = pa.table(
        {
            "doc_id": pa.array(doc_ids, pa.int64()),
            "pos": pa.array(pos, pa.int32()),
            "token_id": pa.array(token_ids, pa.int32()),
            "token_str": _token_strings(tokenizer, token_ids),
        },
        schema=TOKENS_SCHEMA,
    )
    return kept, tokens, {"read": n_read, "kept": len(kept), "dropped_empty": n_empty, "dropped_short": n_short}


def _docs_of_table(docs: pa.Table) -> Iterator[Document]:
    for row in docs.select(["doc_id", "text", "meta"]).to_pylist():
        yield Document(row["doc_id"], row["text"], row["meta"])


def tokenize(docs: pa.Table, tokenizer, cfg: CorpusConfig) -> pa.Table:
    """Tokens of a :func:`build_docs` table (:data:`TOKENS_SCHEMA`): one row per kept token.

    Documents shorter than 2 tokens get no rows; ``truncate`` keeps each document's first
    max_len tokens; ``n_tokens`` caps the total (cutting the last document).
    """
    _, tokens, _ = _tokenize_stream(_docs_of_table(docs), tokenizer, cfg)
    return tokens


def build_corpus(
    cfg: CorpusConfig, tokenizer, cache_dir: Optional[str] = None, progress: bool = False
) -> tuple[pa.Table, pa.Table, dict]:
    """(docs, tokens) in one streaming pass: reading stops when n_docs or n_tokens is
    reached, so a large streamed dataset is read only as far as needed.

    docs holds exactly the documents that have tokens (the same doc_id set as tokens); the
    dict counts the documents read, kept and dropped (empty or null text; one token).
    """
    kept, tokens, counts = _tokenize_stream(iter_documents(cfg, cache_dir), tokenizer, cfg, progress=progress)
    return docs_table(kept), tokens, counts


def corpus_tokenizer(cfg: CorpusConfig, suite: SuiteConfig) -> str:
    """The suite model whose tokenizer makes the corpus: ``corpus.tokenizer``, else the first model."""
    name = cfg.tokenizer or (suite.models[0] if suite.models else None)
    if name is None:
        raise ConfigError("suite.models is empty, so there is no tokenizer; list a model, or set corpus.tokenizer")
    if name not in suite.models:
        raise ConfigError(f"corpus.tokenizer '{name}' is not in suite.models ({', '.join(suite.models)})")
    return name


def _warn_if_tokenizers_differ(suite: SuiteConfig, name: str, tokenizer) -> None:
    """Every model is scored on one tokenization; say so when some model's vocabulary differs."""
    from pipeline.lm import models

    vocab = tokenizer.get_vocab()
    for other in suite.models:
        if other == name:
            continue
        try:
            other_vocab = models.suite_tokenizer(suite, other, suite.revisions[-1]).get_vocab()
        except QuantaError as e:
            print(f"warning: could not check the tokenizer of '{other}': {e}", file=sys.stderr)
            continue
        if other_vocab != vocab:
            print(f"warning: model '{other}' has a different tokenizer than '{name}'; its losses will be "
                  f"computed on '{name}' tokens, which it was not trained on", file=sys.stderr)


def build_for_suite(cfg: CorpusConfig, suite: SuiteConfig, progress: bool = False) -> tuple[pa.Table, pa.Table, dict]:
    """(docs, tokens, meta) of the suite's corpus, tokenized by :func:`corpus_tokenizer` at the
    suite's last revision. `meta` (the corpus config, the tokenizer's origin and the count of
    documents read, kept and dropped) goes into both tables' Parquet metadata. ``corpus.max_len`` is checked against that model's context
    before any document is read. (pipeline.lm.models is imported here, not at the top, so that
    reading tokens never imports torch.)"""
    from pipeline.lm import models

    name = corpus_tokenizer(cfg, suite)
    spec = models.spec_from_suite(suite, name, suite.revisions[-1])
    tokenizer = models.load_tokenizer(spec, **models.hub_kwargs(suite))
    check_max_len(cfg, models.max_context(models.load_config(spec, **models.hub_kwargs(suite))), model=name)
    _warn_if_tokenizers_differ(suite, name, tokenizer)
    docs, tokens, counts = build_corpus(cfg, tokenizer, cache_dir=str(Path(suite.cache_dir) / "datasets"),
                                        progress=progress)
    meta = {
        "corpus": to_dict(cfg),
        "tokenizer": {"model": name, "source": spec.source, "revision": spec.revision, "gguf_file": spec.gguf_file},
        "documents": counts,
    }
    return docs, tokens, meta


# --------------------------------------------------------------------------- context windows


@dataclasses.dataclass(frozen=True)
class Window:
    """One forward pass: tokens[start:end] of document doc_id go to the model, and the
    losses of absolute positions score_from..end-1 are reported (score_from >= start + 1,
    so every scored position has at least one token of context)."""

    doc_id: int
    start: int
    end: int
    score_from: int


def make_windows(doc_ids: Sequence[int], lengths: Sequence[int], cfg: CorpusConfig) -> list[Window]:
    """The forward passes that score every position >= 1 of the documents exactly once.

    `lengths` are the documents' token counts in the tokens table. See the module
    docstring for ``truncate`` and ``strided``. In ``strided`` mode each window ends
    ``stride = max_len - min_context`` after the previous one and starts max_len before
    its end, so its first scored position has >= min_context tokens of context.
    """
    windows: list[Window] = []
    stride = cfg.max_len - cfg.min_context
    for doc_id, n in zip(doc_ids, lengths):
        doc_id, n = int(doc_id), int(n)
        if n < 2:
            continue
        end = min(n, cfg.max_len)
        windows.append(Window(doc_id, 0, end, 1))
        if cfg.context == "truncate":
            continue
        while end < n:
            score_from, end = end, min(n, end + stride)
            windows.append(Window(doc_id, end - cfg.max_len, end, score_from))
    return windows


def check_max_len(cfg: CorpusConfig, model_max_context: int, model: Optional[str] = None) -> None:
    """Refuse a corpus.max_len longer than the model's context (positions past it are
    untrained: rotary models give garbage, learned position tables have no row)."""
    if cfg.max_len > model_max_context:
        who = f"model '{model}'" if model else "the model"
        raise CorpusError(
            f"corpus.max_len {cfg.max_len} exceeds the context of {who} ({model_max_context} tokens); "
            f"set corpus.max_len to at most {model_max_context}"
        )


# --------------------------------------------------------------------------- token table


@dataclasses.dataclass(frozen=True)
class TokenTable:
    """The corpus' tokens, one contiguous array, documents in doc_id order.

    Document ``i`` (id ``doc_ids[i]``) is ``token_ids[offsets[i]:offsets[i + 1]]``.
    """

    doc_ids: np.ndarray  # (n_docs,) int64, increasing
    offsets: np.ndarray  # (n_docs + 1,) int64
    token_ids: np.ndarray  # (n_tokens,) int32

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def index_of(self, doc_ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.doc_ids, doc_ids)

    def targets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(doc_id int64, pos int64, token_id int64) of every token with a token before it: what a loss table scores."""
        lengths = self.lengths
        keep = np.ones(len(self.token_ids), dtype=bool)
        keep[self.offsets[:-1][lengths > 0]] = False  # a document's first token has no context
        doc = np.repeat(self.doc_ids, lengths)[keep]
        pos = (np.arange(len(self.token_ids)) - np.repeat(self.offsets[:-1], lengths))[keep]
        return doc, pos.astype(np.int64), self.token_ids[keep].astype(np.int64)

    def preceding(self, doc_ids: np.ndarray, pos: np.ndarray, n: int) -> np.ndarray:
        """(N, n) int64: the n tokens before each (doc_id, pos), oldest first; -1 before a document's start."""
        start = self.offsets[self.index_of(np.asarray(doc_ids, np.int64))]
        flat = start + np.asarray(pos, np.int64)
        back = flat[:, None] - np.arange(n, 0, -1)[None, :]  # (N, n): flat - n ... flat - 1
        return np.where(back >= start[:, None], self.token_ids[np.maximum(back, 0)], -1).astype(np.int64)


def read_tokens(path: str | Path) -> TokenTable:
    """Read ``tokens.parquet`` (doc_id, pos, token_id) into a :class:`TokenTable`.

    Rows may come in any order; every document must have positions exactly 0..len-1.
    """
    path = Path(path)
    if not path.exists():
        raise QuantaError(f"tokens table {path} not found; run the corpus stage first (dvc repro corpus)")
    try:
        table = pq.read_table(path, columns=["doc_id", "pos", "token_id"])
    except (pa.ArrowInvalid, KeyError) as e:
        raise QuantaError(f"tokens table {path} is not a doc_id/pos/token_id Parquet table ({e})") from e
    if table.num_rows == 0:
        raise QuantaError(f"tokens table {path} is empty: the corpus has no tokens (check corpus.source)")
    doc = table.column("doc_id").to_numpy().astype(np.int64, copy=False)
    pos = table.column("pos").to_numpy().astype(np.int64, copy=False)
    tok = table.column("token_id").to_numpy().astype(np.int32, copy=False)
    in_order = np.all((doc[1:] > doc[:-1]) | ((doc[1:] == doc[:-1]) & (pos[1:] > pos[:-1])))
    if not in_order:
        order = np.lexsort((pos, doc))
        doc, pos, tok = doc[order], pos[order], tok[order]
    starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
    offsets = np.r_[starts, len(doc)].astype(np.int64)
    expected = np.arange(len(doc)) - np.repeat(starts, np.diff(offsets))
    bad = np.flatnonzero(pos != expected)
    if len(bad):
        i = bad[0]
        raise QuantaError(
            f"tokens table {path}: document {doc[i]} has position {pos[i]} where {expected[i]} was expected "
            f"(positions must be 0..len-1, each once); rebuild it with the corpus stage"
        )
    return TokenTable(doc_ids=doc[starts], offsets=offsets, token_ids=tok)


def count_tokens(path: str | Path) -> int:
    """Rows (tokens) of ``tokens.parquet``, from its footer (no data read)."""
    return pq.ParquetFile(path).metadata.num_rows


def read_token_strings(path: str | Path) -> dict[int, str]:
    """token id -> its text, from the ``token_str`` column of ``tokens.parquet``.

    Reads token_id and the dictionary-encoded token_str only; no tokenizer (and no torch) is
    loaded, so the cluster stage names its clusters' top tokens cheaply.
    """
    t = pq.read_table(path, columns=["token_id", "token_str"]).to_pandas().drop_duplicates("token_id")
    return dict(zip(t["token_id"].astype(int), t["token_str"].astype(str)))


def read_token_texts(path: str | Path, flat: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Token texts at row indices `flat` of ``tokens.parquet`` in (doc_id, pos) order, i.e.
    at flat positions of :func:`read_tokens`' ``token_ids``.

    Returns (index into the returned list of distinct strings per entry of flat, that list).
    Reads only doc_id, pos and the dictionary-encoded token_str, so a 100M-token corpus costs
    a few hundred MB once.
    """
    t = pq.read_table(path, columns=["doc_id", "pos", "token_str"])
    doc = t.column("doc_id").to_numpy()
    pos = t.column("pos").to_numpy()
    in_order = bool(np.all((doc[1:] > doc[:-1]) | ((doc[1:] == doc[:-1]) & (pos[1:] > pos[:-1]))))
    rows = flat if in_order else np.lexsort((pos, doc))[flat]
    col = t.column("token_str").take(rows).combine_chunks()
    if hasattr(col, "dictionary"):  # the corpus stage writes a dictionary column
        col = col.cast(col.type.value_type)
    texts = col.to_pylist()
    strings, index = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    return index.astype(np.int64), [str(s) for s in strings]
