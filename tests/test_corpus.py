"""pipeline.lm.corpus and stages.corpus: sources, stable ids, tokens, windows, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import corpus_texts, make_neox, make_tokenizer

from pipeline.core.config import ConfigError, CorpusConfig
from pipeline.core.errors import QuantaError
from pipeline.core.files import read_config
from pipeline.lm import corpus
from pipeline.lm.corpus import CorpusError, Window, make_windows

REPO = Path(__file__).resolve().parents[1]
N_DOCS = len(corpus_texts())
SHORT = {2, 3}  # ids of the fixture's documents with fewer than 2 tokens


def cfg_for(source, **kw) -> CorpusConfig:
    return CorpusConfig(source=str(source), **kw)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- documents


def test_build_docs_jsonl(tiny_corpus_jsonl):
    docs = corpus.build_docs(cfg_for(tiny_corpus_jsonl))
    assert docs.schema.equals(corpus.DOCS_SCHEMA)
    assert docs["doc_id"].to_pylist() == list(range(N_DOCS))
    assert docs["text"].to_pylist() == corpus_texts()
    assert json.loads(docs["meta"][4].as_py()) == {"meta": {"source": "tiny", "i": 4}}
    assert corpus.build_docs(cfg_for(tiny_corpus_jsonl, n_docs=3))["doc_id"].to_pylist() == [0, 1, 2]


def test_tokenize_truncate(tiny_corpus_jsonl, tiny_tokenizer):
    cfg = cfg_for(tiny_corpus_jsonl, max_len=64)
    tokens = corpus.tokenize(corpus.build_docs(cfg), tiny_tokenizer, cfg)
    assert tokens.schema.equals(corpus.TOKENS_SCHEMA)
    df = tokens.to_pandas()
    # short documents have no tokens, and the others keep their ids
    assert sorted(df.doc_id.unique()) == [i for i in range(N_DOCS) if i not in SHORT]
    for doc_id, g in df.groupby("doc_id"):
        ids = tiny_tokenizer(corpus_texts()[doc_id], add_special_tokens=False)["input_ids"]
        assert g.token_id.tolist() == ids[:64]  # the first max_len tokens, no BOS
        assert g.pos.tolist() == list(range(len(g)))
    assert df.groupby("doc_id").size()[1] == 64
    # token_str is each token decoded on its own
    row = df[(df.doc_id == 0) & (df.pos == 1)].iloc[0]
    assert row.token_str == tiny_tokenizer.decode([row.token_id])
    assert "".join(df[df.doc_id == 0].token_str) == corpus_texts()[0]


def test_tokenize_strided_keeps_all(tiny_corpus_jsonl, tiny_tokenizer):
    cfg = cfg_for(tiny_corpus_jsonl, context="strided", max_len=64, min_context=16)
    df = corpus.tokenize(corpus.build_docs(cfg), tiny_tokenizer, cfg).to_pandas()
    full = len(tiny_tokenizer(corpus_texts()[1], add_special_tokens=False)["input_ids"])
    assert full > 64 and (df.doc_id == 1).sum() == full


def test_n_tokens_limit(tiny_corpus_jsonl, tiny_tokenizer):
    cfg = cfg_for(tiny_corpus_jsonl, max_len=64, n_tokens=100)
    docs, tokens, _ = corpus.build_corpus(cfg, tiny_tokenizer)
    assert tokens.num_rows == 100
    assert set(docs["doc_id"].to_pylist()) == set(tokens["doc_id"].to_pylist()) == {0, 1, 4}
    df = tokens.to_pandas()
    assert (df.doc_id == 4).sum() == 100 - 28 - 64  # the last document is cut to fit


def test_limits_stop_reading(tmp_path, tiny_tokenizer):
    # a bad line far past the limit is never read: the stream stops once n_docs/n_tokens is met
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": f"the quick fox {i}"} for i in range(600)])
    with path.open("a") as f:
        f.write("{not json\n")
    docs, tokens, _ = corpus.build_corpus(cfg_for(path, n_tokens=50), tiny_tokenizer)
    assert tokens.num_rows == 50
    docs, _, _ = corpus.build_corpus(cfg_for(path, n_docs=10), tiny_tokenizer)
    assert docs.num_rows == 10
    with pytest.raises(CorpusError, match=r"big.jsonl line 601: not valid JSON"):
        corpus.build_corpus(cfg_for(path), tiny_tokenizer)


def test_txt_paragraphs(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first doc\nstill first\n\n  \nsecond doc\n\n\n\nthird\n", encoding="utf-8")
    docs = corpus.build_docs(cfg_for(path))
    assert docs["text"].to_pylist() == ["first doc\nstill first", "second doc", "third"]
    assert [json.loads(m) for m in docs["meta"].to_pylist()] == [{"line": 1}, {"line": 5}, {"line": 9}]


def test_parquet_source(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["one two three", "four five"], "src": ["a", "b"]}), path)
    docs = corpus.build_docs(cfg_for(path, text_field="body"))
    assert docs["text"].to_pylist() == ["one two three", "four five"]
    assert json.loads(docs["meta"][1].as_py()) == {"src": "b"}
    with pytest.raises(CorpusError, match="no column 'text'; the columns are body, src; set corpus.text_field"):
        corpus.build_docs(cfg_for(path))


def test_gzip_jsonl(tmp_path):
    import gzip

    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "zipped doc"}) + "\n")
    assert corpus.build_docs(cfg_for(path))["text"].to_pylist() == ["zipped doc"]


# --------------------------------------------------------------------------- Hugging Face datasets


@pytest.fixture
def dataset_folder(tmp_path, tiny_corpus_jsonl) -> Path:
    """A dataset repo laid out as on the hub: data files whose names give the split."""
    folder = tmp_path / "my-dataset"
    (folder / "data").mkdir(parents=True)
    records = [json.loads(line) for line in tiny_corpus_jsonl.read_text(encoding="utf-8").splitlines()]
    pq.write_table(pa.Table.from_pylist(records), folder / "data" / "test-00000-of-00001.parquet")
    return folder


def test_hf_dataset_streamed(dataset_folder, tiny_corpus_jsonl, tiny_tokenizer, monkeypatch):
    import datasets

    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    cfg = cfg_for(dataset_folder, max_len=64)
    docs, tokens, _ = corpus.build_corpus(cfg, tiny_tokenizer)
    # the hub-id code path: load_dataset(source, name=..., split=..., streaming=True)
    assert calls and calls[0][0] == (str(dataset_folder),)
    assert calls[0][1]["streaming"] is True and calls[0][1]["split"] == "test"
    ref_docs, ref_tokens, _ = corpus.build_corpus(cfg_for(tiny_corpus_jsonl, max_len=64), tiny_tokenizer)
    assert docs.equals(ref_docs) and tokens.equals(ref_tokens)


def test_hf_dataset_errors(dataset_folder):
    with pytest.raises(CorpusError, match="set corpus.split"):
        corpus.build_docs(cfg_for(dataset_folder, split="train"))
    with pytest.raises(CorpusError, match="no field 'content'; the fields are text, meta; set corpus.text_field"):
        corpus.build_docs(cfg_for(dataset_folder, text_field="content"))


def test_hf_dataset_not_available_offline():
    with pytest.raises(CorpusError) as e:
        corpus.build_docs(cfg_for("someorg/some-corpus-that-is-not-here"))
    msg = str(e.value)
    assert "\n" not in msg and "not available offline" in msg
    assert "hf download someorg/some-corpus-that-is-not-here --repo-type dataset" in msg


def test_save_to_disk_folder(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["alpha beta", "gamma"]}).save_to_disk(str(folder))
    assert corpus.build_docs(cfg_for(folder))["text"].to_pylist() == ["alpha beta", "gamma"]


# --------------------------------------------------------------------------- bad input


def test_empty_corpus(tmp_path, tiny_tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(CorpusError, match="the corpus is empty: .*empty.jsonl has no documents"):
        corpus.build_corpus(cfg_for(path), tiny_tokenizer)


def test_all_docs_too_short(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "short.jsonl", [{"text": ""}, {"text": "a"}, {"text": None}])
    with pytest.raises(CorpusError, match="all 3 documents of .* are shorter than 2 tokens"):
        corpus.build_corpus(cfg_for(path), tiny_tokenizer)


def test_missing_text_field(tiny_corpus_jsonl):
    with pytest.raises(CorpusError) as e:
        corpus.build_docs(cfg_for(tiny_corpus_jsonl, text_field="content"))
    assert "line 1: no field 'content'; the fields are meta, text; set corpus.text_field" in str(e.value)


def test_non_utf8(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = (json.dumps({"text": "fine"}) + "\n").encode()
    path.write_bytes(good + b'{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError) as e:
        corpus.build_docs(cfg_for(path))
    offset = len(good) + len(b'{"text": "caf')
    assert f"bad.jsonl: invalid UTF-8 at byte offset {offset} (line 2)" in str(e.value)
    assert "on_decode_error: replace" in str(e.value)
    docs = corpus.build_docs(cfg_for(path, on_decode_error="replace"))
    assert docs["text"].to_pylist() == ["fine", "caf\ufffd"]


def test_missing_local_file(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        corpus.build_docs(cfg_for(tmp_path / "nope.jsonl"))


def test_check_max_len():
    corpus.check_max_len(CorpusConfig(max_len=256), 256)
    with pytest.raises(CorpusError, match=r"corpus.max_len 2048 exceeds the context of model 'm' \(1024 tokens\)"):
        corpus.check_max_len(CorpusConfig(max_len=2048), 1024, model="m")


def test_config_validation():
    with pytest.raises(ConfigError, match="min_context"):
        CorpusConfig(context="strided", max_len=64, min_context=64)
    with pytest.raises(ConfigError, match="max_len"):
        CorpusConfig(max_len=1)
    CorpusConfig(context="truncate", max_len=64, min_context=512)  # min_context unused: fine
    assert issubclass(CorpusError, QuantaError)


# --------------------------------------------------------------------------- windows


def test_windows_truncate():
    cfg = CorpusConfig(max_len=8)
    assert make_windows([0, 1, 2], [5, 20, 1], cfg) == [Window(0, 0, 5, 1), Window(1, 0, 8, 1)]


@pytest.mark.parametrize("max_len,min_context", [(8, 1), (8, 4), (8, 7), (16, 5)])
def test_windows_strided_cover_each_position_once(max_len, min_context):
    cfg = CorpusConfig(context="strided", max_len=max_len, min_context=min_context)
    lengths = list(range(0, 60))
    windows = make_windows(list(range(len(lengths))), lengths, cfg)
    scored = {}
    for w in windows:
        assert 0 <= w.start < w.score_from < w.end <= lengths[w.doc_id]
        assert w.end - w.start <= max_len
        for p in range(w.score_from, w.end):
            assert (w.doc_id, p) not in scored
            scored[(w.doc_id, p)] = p - w.start  # tokens of context
    for doc_id, n in enumerate(lengths):
        for p in range(1, n):
            assert scored[(doc_id, p)] >= min(p, min_context)
    assert len(scored) == sum(max(n - 1, 0) for n in lengths)


def test_windows_strided_cost():
    # about max_len / (max_len - min_context) forward tokens per scored token on long documents
    cfg = CorpusConfig(context="strided", max_len=64, min_context=32)
    windows = make_windows([0], [10_000], cfg)
    fed = sum(w.end - w.start for w in windows)
    assert 1.9 < fed / 9_999 < 2.1


# --------------------------------------------------------------------------- the stage


def write_params(path: Path, suite: dict, corpus_section: dict) -> Path:
    path.write_text(yaml.safe_dump({"suite": suite, "corpus": corpus_section}))
    return path


def stage_main():
    """main() of the stage module stages.corpus."""
    from stages import corpus as corpus_stage

    return corpus_stage.main


def run_stage(argv, capsys):
    from pipeline.core import stage

    main = stage_main()
    with pytest.raises(SystemExit) as e:
        stage.run(main, argv)
    # progress bars share stderr; the error is the one line that says "error:"
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    return e.value.code, errors[0]


def test_stage_writes_tables(tmp_path, tiny_revisions_dir, tiny_corpus_jsonl, tiny_tokenizer):
    main = stage_main()
    suite = {"models": ["tiny"], "revisions": ["step1", "step2"], "sources": {"tiny": str(tiny_revisions_dir)}}
    params = write_params(tmp_path / "params.yaml", suite, {"source": str(tiny_corpus_jsonl), "max_len": 64})
    docs_path, tokens_path = tmp_path / "out" / "docs.parquet", tmp_path / "out" / "tokens.parquet"
    main(["--params", str(params), "--docs", str(docs_path), "--tokens", str(tokens_path)])
    docs, tokens = pq.read_table(docs_path), pq.read_table(tokens_path)
    assert docs.num_rows == N_DOCS - len(SHORT)
    assert set(tokens["doc_id"].to_pylist()) == set(docs["doc_id"].to_pylist())
    meta = read_config(tokens_path)
    assert meta["corpus"]["max_len"] == 64 and meta["tokenizer"]["revision"] == "step2"
    assert read_config(docs_path) == meta
    # the same params give the same bytes
    again = tmp_path / "again.parquet"
    main(["--params", str(params), "--docs", str(tmp_path / "d2.parquet"), "--tokens", str(again)])
    assert again.read_bytes() == tokens_path.read_bytes()


def test_stage_max_len_error_no_output(tmp_path, tiny_neox_dir, tiny_corpus_jsonl):
    """Run as DVC does (a subprocess): one line on stderr, exit status 2, nothing written."""
    suite = {"models": ["tiny"], "revisions": ["main"], "sources": {"tiny": str(tiny_neox_dir)}}
    params = write_params(tmp_path / "params.yaml", suite, {"source": str(tiny_corpus_jsonl), "max_len": 512})
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "stages.corpus", "--params", str(params),
         "--docs", str(out / "docs.parquet"), "--tokens", str(out / "tokens.parquet")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: corpus.max_len 512 exceeds the context of model 'tiny' (256 tokens); set corpus.max_len to at most 256"
    ]
    assert not out.exists() or not any(out.iterdir())


def test_stage_bad_input_is_one_line(tmp_path, tiny_neox_dir, capsys):
    suite = {"models": ["tiny"], "revisions": ["main"], "sources": {"tiny": str(tiny_neox_dir)}}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    params = write_params(tmp_path / "params.yaml", suite, {"source": str(empty), "max_len": 64})
    code, err = run_stage(["--params", str(params), "--docs", str(tmp_path / "d.parquet"),
                           "--tokens", str(tmp_path / "t.parquet")], capsys)
    assert code == 2 and err.startswith("error: the corpus is empty")
    assert not (tmp_path / "d.parquet").exists() and not (tmp_path / "t.parquet").exists()
    params = write_params(tmp_path / "p2.yaml", suite, {"source": str(empty), "tokenizer": "other"})
    code, err = run_stage(["--params", str(params), "--docs", "d", "--tokens", "t"], capsys)
    assert code == 2 and "corpus.tokenizer 'other' is not in suite.models (tiny)" in err


def test_stage_warns_on_different_tokenizers(tmp_path, tiny_neox_dir, tiny_corpus_jsonl, capsys):
    main = stage_main()
    other_tok = tmp_path / "tok"
    make_tokenizer(other_tok)
    spec = json.loads((other_tok / "tokenizer.json").read_text())
    spec["model"]["vocab"]["extra"] = spec["model"]["vocab"].pop(next(iter(spec["model"]["vocab"])))
    (other_tok / "tokenizer.json").write_text(json.dumps(spec))
    other = make_neox(tmp_path / "other", other_tok, seed=3)
    suite = {"models": ["tiny", "other"], "revisions": ["main"],
             "sources": {"tiny": str(tiny_neox_dir), "other": str(other)}}
    params = write_params(tmp_path / "params.yaml", suite, {"source": str(tiny_corpus_jsonl), "max_len": 64})
    main(["--params", str(params), "--docs", str(tmp_path / "d.parquet"), "--tokens", str(tmp_path / "t.parquet")])
    assert "warning: model 'other' has a different tokenizer than 'tiny'" in capsys.readouterr().err


def test_token_str_partial_characters(tmp_path, tiny_tokenizer):
    # "量子" is split into byte pieces by the tiny tokenizer: each must stay distinguishable
    path = write_jsonl(tmp_path / "u.jsonl", [{"text": "naïve café — 量子 quanta ✓"}])
    _, tokens, _ = corpus.build_corpus(cfg_for(path), tiny_tokenizer)
    df = tokens.to_pandas()  # pandas needs the dictionary's strings to be distinct
    strs = df.token_str.astype(str).tolist()
    assert "\ufffd" not in "".join(strs) and any("\\x" in s for s in strs)
    assert len(set(zip(df.token_id, strs))) == len(set(df.token_id))  # one string per id


def test_dropped_documents_are_counted(tmp_path, tiny_tokenizer):
    """A null or empty text, or a one-token document, is dropped and counted, never silently."""
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "the quick brown fox"}, {"text": None}, {"text": ""},
                                                   {"text": "a"}, {"text": "jumps over the dog"}])
    docs, _, counts = corpus.build_corpus(cfg_for(path), tiny_tokenizer)
    assert docs.num_rows == 2
    assert counts == {"read": 5, "kept": 2, "dropped_empty": 2, "dropped_short": 1}
