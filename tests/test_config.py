"""Strict params: unknown keys, wrong types and duplicates are errors that name the fix."""

import dataclasses
from pathlib import Path

import pytest

from pipeline.core import config
from pipeline.core.config import ConfigError

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


def test_a_misspelled_key_fails_whichever_section_a_stage_reads(tmp_path):
    """The losses stage reads only suite, corpus and losses; a typo in cluster still stops it."""
    p = tmp_path / "params.yaml"
    p.write_text("cluster:\n  n_clustres: 8\n")
    with pytest.raises(ConfigError, match="unknown key 'n_clustres' in params section 'cluster'"):
        config.load("losses", p)


def test_n_samples_below_k_is_refused_before_anything_runs(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("select:\n  n_samples: 50\ncluster:\n  n_clusters: [20, 50]\n")
    with pytest.raises(ConfigError, match=r"cluster.n_clusters \[50\] needs more than select.n_samples = 50"):
        config.load("corpus", p)


def test_a_key_without_its_colon_is_reported_on_its_own_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("losses:\n  batch_tokens: 1\n  shard_tokens 64\n  autocast: none\n")
    with pytest.raises(ConfigError, match="line 3: not valid YAML"):
        config.load_params(p)


def test_a_float_that_yaml_reads_as_a_string_says_so(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("planted:\n  lr: 6e-3\n")
    with pytest.raises(ConfigError, match=r"planted.lr: expected float, got '6e-3' \(YAML reads 6e-3 as a string: "
                                          r"write it with a dot, e.g. 0.006\)"):
        config.load_params(p)
