"""Strict params: unknown keys, wrong types and duplicates are errors that name the fix."""

import dataclasses
from pathlib import Path

import pytest

from pipeline import config
from pipeline.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_build_every_section():
    params = config.load_params(REPO / "params.yaml")
    for name in config.SECTIONS:
        cfg = config.section(params, name)
        assert dataclasses.is_dataclass(cfg)
    assert set(params) <= set(config.SECTIONS), "params.yaml has a section no code reads"


def test_unknown_key_names_key_section_and_valid_keys():
    with pytest.raises(ConfigError) as e:
        config.build(config.LossesConfig, {"batch_tokns": 10}, "losses")
    msg = str(e.value)
    assert "batch_tokns" in msg and "'losses'" in msg and "batch_tokens" in msg


def test_wrong_type_names_expected_type():
    with pytest.raises(ConfigError, match=r"losses.batch_tokens: expected int"):
        config.build(config.LossesConfig, {"batch_tokens": "big"}, "losses")
    with pytest.raises(ConfigError, match=r"expected int"):
        config.build(config.LossesConfig, {"batch_tokens": True}, "losses")  # bool is not an int here
    with pytest.raises(ConfigError, match=r"must be one of"):
        config.build(config.CorpusConfig, {"context": "sliding"}, "corpus")
    with pytest.raises(ConfigError, match=r"suite.sources.a: expected str"):
        config.build(config.SuiteConfig, {"sources": {"a": 3}}, "suite")


def test_lists_become_tuples_and_configs_are_frozen():
    cfg = config.build(config.SuiteConfig, {"models": ["a", "b"], "revisions": ["step1"]}, "suite")
    assert cfg.models == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.models = ("c",)


def test_optional_accepts_none_and_value():
    assert config.build(config.CorpusConfig, {"n_docs": None}, "corpus").n_docs is None
    assert config.build(config.CorpusConfig, {"n_docs": 5}, "corpus").n_docs == 5


def test_duplicate_yaml_key_is_an_error(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("losses:\n  batch_tokens: 1\n  batch_tokens: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'batch_tokens'"):
        config.load_params(p)


def test_missing_params_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load_params(tmp_path / "nope.yaml")


def test_yaml_syntax_error_is_one_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("losses:\n  batch_tokens: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load_params(p)


def test_every_stage_refuses_a_misspelled_section(tmp_path):
    """`gradient:` beside `gradients:` is an error for every reader of params.yaml, not just `quanta check`."""
    p = tmp_path / "params.yaml"
    p.write_text("gradients:\n  k: 64\ngradient:\n  k: 32\n")
    with pytest.raises(ConfigError, match="unknown section 'gradient'.*valid sections: planted, suite"):
        config.load("losses", p)
