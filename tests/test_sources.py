"""The sources manifest: a content hash of every local input, so that an in-place edit of a
local corpus or model reruns what it feeds (the e2e test checks the rerun through DVC)."""

from __future__ import annotations

import json

import pytest

from pipeline.core import files
from pipeline.core.config import CorpusConfig, SuiteConfig
from pipeline.core.errors import QuantaError
from pipeline.lm import sources


def _suite(**sources_):
    return SuiteConfig(models=tuple(sources_), revisions=("main",), sources=dict(sources_))


def test_each_kind_of_source_and_an_in_place_edit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/corpus.jsonl").write_text('{"text": "a b c"}\n')
    (tmp_path / "models/local").mkdir(parents=True)
    (tmp_path / "models/local/config.json").write_text("{}")
    (tmp_path / "models/local/model.safetensors").write_bytes(b"weights")
    suite = _suite(local="models/local", hub="EleutherAI/pythia-70m", built="cache/planted/models/built")
    m = sources.write("out", suite, CorpusConfig(source="data/corpus.jsonl"))
    assert m["corpus"]["kind"] == "local file" and len(m["corpus"]["sha256"]) == 64
    assert set(m["models"]["local"]["files"]) == {"config.json", "model.safetensors"}
    assert m["models"]["hub"]["kind"] == "hub" and "sha256" not in m["models"]["hub"]
    assert m["models"]["built"]["kind"].startswith("built by the planted stage")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*.json")}

    sources.write("out", suite, CorpusConfig(source="data/corpus.jsonl"))  # nothing changed: same bytes
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*.json")} == before
    (tmp_path / "data/corpus.jsonl").write_text('{"text": "a b d"}\n')  # edited in place, same size
    sources.write("out", suite, CorpusConfig(source="data/corpus.jsonl"))
    assert (tmp_path / "out/corpus.json").read_bytes() != before["corpus.json"]
    assert (tmp_path / "out/models/local.json").read_bytes() == before["local.json"]  # only what changed


def test_a_missing_local_source_names_its_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QuantaError, match="corpus.source = data/none.jsonl: no such file"):
        sources.write("out", _suite(hub="EleutherAI/pythia-70m"), CorpusConfig(source="data/none.jsonl"))
    with pytest.raises(QuantaError, match="suite.sources.m = ./models/none: no such file"):
        sources.write("out", _suite(m="./models/none"), CorpusConfig(source="EleutherAI/pile"))


def test_hashes_are_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.jsonl").write_text('{"text": "x y"}\n')
    calls = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: calls.append(p) or real(p))
    for _ in range(3):
        sources.write("out", _suite(hub="EleutherAI/pythia-70m"), CorpusConfig(source="c.jsonl"))
    assert len(calls) == 1  # read once, then known by (size, mtime)
    cache = json.loads(sources.HASH_CACHE.read_text())
    assert list(cache) == [str((tmp_path / "c.jsonl").resolve())]


def test_models_that_left_the_suite_leave_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sources.write("out", _suite(a="EleutherAI/pythia-70m", b="EleutherAI/pythia-160m"), CorpusConfig(source="x/y"))
    sources.write("out", _suite(a="EleutherAI/pythia-70m"), CorpusConfig(source="x/y"))
    assert sorted(p.name for p in (tmp_path / "out/models").iterdir()) == ["a.json"]
