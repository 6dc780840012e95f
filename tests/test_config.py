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


def test_values_are_read_as_dvc_reads_them(tmp_path):
    """`planted.lr: 6e-3` is 0.006 to DVC (YAML 1.2), so it is 0.006 to every stage too: a
    value read otherwise than DVC reads it would be one whose change `dvc repro` never sees."""
    from dvc.utils.serialize import parse_yaml

    p = tmp_path / "params.yaml"
    text = "planted:\n  lr: 6e-3\n  weight_decay: 1E-1\ngradients:\n  memory_gb: 8\n"
    p.write_text(text)
    params = config.load_params(p)
    assert params == parse_yaml(text, str(p))
    assert config.section(params, "planted").lr == 0.006 and config.section(params, "planted").weight_decay == 0.1
    # YAML 1.1's booleans are strings to DVC: refused, not silently true
    p.write_text("losses:\n  progress: yes\n")
    with pytest.raises(ConfigError, match=r"losses.progress: expected bool, got 'yes'"):
        config.load_params(p)
    # a quoted number is a string to DVC as well
    p.write_text("planted:\n  lr: '6e-3'\n")
    with pytest.raises(ConfigError, match=r"planted.lr: expected float, got '6e-3' \(a string: write the number "
                                          r"without quotes, e.g. 0.006\)"):
        config.load_params(p)


# ------------------------------------------------------------------- references, checked when params are read

SUITE = "suite:\n  models: [a, b]\n  revisions: [step1, step2]\n  sources: {a: org/a, b: org/b}\n"


def _refused(tmp_path, text: str) -> str:
    """The one-line error load_params (every stage, `quanta check`) gives for `text`."""
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load_params(p)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("section, expected", [
    ("select:\n  model: c\n", "select.model 'c' is not in suite.models (a, b); set select.model to one of them"),
    ("select:\n  model: a\n  revision: step9\n",
     "select.revision 'step9' is not in suite.revisions (step1, step2); set select.revision to one of them"),
    ("gradients:\n  model: c\n", "gradients.model 'c' is not in suite.models (a, b); set gradients.model"),
    ("gradients:\n  revision: main\n", "gradients.revision 'main' is not in suite.revisions (step1, step2)"),
    ("cluster:\n  n_clusters: [4, 5]\n  cut: k\nreport:\n  k: 7\n",
     "report.k 7 is not in cluster.n_clusters (4, 5); set report.k to one of them, or null"),
    ("cluster:\n  n_clusters: [4, 5]\n  cut: k\npowerlaw:\n  k: 7\n", "powerlaw.k 7 is not in cluster.n_clusters (4, 5)"),
    ("dynamics:\n  model: c\n", "dynamics.model 'c' is not in suite.models (a, b)"),
    ("scaling:\n  alpha_s_model: c\n", "scaling.alpha_s_model 'c' is not in suite.models (a, b)"),
    ("scaling:\n  revision: step9\n",
     "scaling.revision 'step9' is not in suite.revisions (step1, step2); set scaling.revision to one of them, or null"),
    ("corpus:\n  tokenizer: c\n", "corpus.tokenizer 'c' is not in suite.models (a, b)"),
    ("losses:\n  shard_tokens: 0\n", "losses.shard_tokens must be >= 1, got 0"),
    ("losses:\n  batch_tokens: -1\n", "losses.batch_tokens must be >= 1, or 0 (auto by device), got -1"),
    ("planted:\n  steps: 0\n", "planted.steps, batch_size, n_eval_docs, n_probe, n_layers, n_heads and mlp_ratio must be >= 1"),
    ("planted:\n  n_quanta: 0\n", "planted.n_quanta must be >= 1"),
])
def test_every_reference_and_value_is_checked_before_any_stage_runs(tmp_path, section, expected):
    """What a stage found only when it ran (select.revision after every loss stage, report.k
    at the end of a run) is refused when params are read, by `quanta check` and every stage."""
    msg = _refused(tmp_path, SUITE + section)
    assert expected in msg, msg
    assert "fix suite.revisions" not in msg


def test_an_unknown_device_is_refused_when_params_are_read(tmp_path):
    assert "suite.device: 'gpu' is not a device; use auto, cpu, cuda, cuda:N or mps" in _refused(
        tmp_path, "suite:\n  device: gpu\n")
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert config.build(config.SuiteConfig, {"device": device}, "suite").device == device


def test_references_that_are_right_pass(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(SUITE + "select:\n  model: b\n  revision: step1\ngradients:\n  model: a\n  revision: step2\n"
                 "cluster:\n  n_clusters: [4, 5]\nreport:\n  k: 5\npowerlaw:\n  k: 4\ndynamics:\n  model: a\n"
                 "scaling:\n  revision: step1\n  alpha_s_model: a\ncorpus:\n  tokenizer: b\n")
    config.load_params(p)
    # leiden's main k is the data's: a k outside the sweep may be it, so it is not refused
    p.write_text(SUITE + "cluster:\n  n_clusters: [4, 5]\n  method: leiden\nreport:\n  k: 7\n")
    config.load_params(p)
    # so is knn_average's with the data-chosen cut (the default)
    p.write_text(SUITE + "cluster:\n  n_clusters: [4, 5]\n  method: knn_average\n  cut: data\nreport:\n  k: 7\n")
    config.load_params(p)
    # a reference the file leaves out (a partial file run by hand) keeps its default unchecked;
    # DVC refuses to run a stage whose listed params are missing, so its runs always write it
    p.write_text(SUITE)
    assert config.load_params(p)["suite"]["models"] == ["a", "b"]


def test_a_missing_local_source_is_refused_before_any_stage_runs(tmp_path, monkeypatch):
    """`models/x` is a path, not a hub id: it is said to be missing, with no network attempt;
    and it fails when params are read, so before the planted stage trains the rest."""
    monkeypatch.chdir(tmp_path)
    suite = "suite:\n  models: [m]\n  revisions: [main]\n  sources: {{m: {}}}\n"
    for source in ("models/x", "./x", "cache/x", "a/b/c", str(tmp_path / "x.gguf")):
        assert _refused(tmp_path, suite.format(source)).startswith(
            f"suite.sources['m'] = '{source}': no such file or folder; fix suite.sources.m")
    (tmp_path / "models" / "x").mkdir(parents=True)
    (tmp_path / "params.yaml").write_text(suite.format("models/x"))
    config.load_params(tmp_path / "params.yaml")
    assert "suite.gguf_files['m'] = 'w.gguf': no such file in models/x" in _refused(
        tmp_path, suite.format("models/x") + "  gguf_files: {m: w.gguf}\n")
    assert "suite.models names 'm', which has no source; add suite.sources.m" in _refused(
        tmp_path, "suite:\n  models: [m]\n")
    # pythia names need no source, hub ids are not looked up, planted sources are built later
    (tmp_path / "params.yaml").write_text("suite:\n  models: [pythia-70m, h, p]\n  revisions: [step1]\n"
                                          "  sources: {h: org/h, p: cache/planted/models/p}\nplanted:\n  widths: [4, 8, 12]\n")
    config.load_params(tmp_path / "params.yaml")


def test_planted_sources_are_checked_against_what_the_planted_stage_saves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    suite = "suite:\n  models: [p]\n  revisions: [{}]\n  sources: {{p: {}}}\nplanted:\n  widths: [{}]\n  steps: 100\n"
    (tmp_path / "params.yaml").write_text(suite.format("step0, step100", "cache/planted/models/p", "8"))
    config.load_params(tmp_path / "params.yaml")
    assert "'step200' is not a checkpoint the planted stage saves; use 'stepN' with N in 0..100 (planted.steps)" in _refused(
        tmp_path, suite.format("step200", "cache/planted/models/p", "8"))
    assert "'main' is not a checkpoint the planted stage saves" in _refused(
        tmp_path, suite.format("main", "cache/planted/models/p", "8"))
    assert "planted.widths has 2 entries but suite.models has 1" in _refused(
        tmp_path, suite.format("step1", "cache/planted/models/p", "8, 16"))
    assert "set suite.sources.p: cache/planted/models/p" in _refused(
        tmp_path, suite.format("step1", "cache/planted/p", "8"))
    # the planted stage run with --out elsewhere builds there
    (tmp_path / "params.yaml").write_text(suite.format("step1", "out/models/p", "8"))
    config.load_params(tmp_path / "params.yaml", planted_root="out")
