"""The `quanta` console script on a tiny local suite."""

import pytest

from pipeline import cli


def _params(tmp_path, revisions_dir):
    p = tmp_path / "params.yaml"
    p.write_text(
        "suite:\n"
        "  models: [tiny]\n"
        "  revisions: [step1, step2]\n"
        f"  sources: {{tiny: {revisions_dir}}}\n"
        "  device: cpu\n"
    )
    return p


def test_info_lists_counts_and_cache_state(tmp_path, tiny_revisions_dir, capsys):
    p = _params(tmp_path, tiny_revisions_dir)
    cli.main(["--params", str(p), "info", "--losses", str(tmp_path / "none"),
              "--tokens", str(tmp_path / "none.parquet")])
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("tiny ")]
    assert len(rows) == 2 and all(" yes " in r for r in rows)
    assert "?" not in rows[0].split()[2], "parameter count read from the config"


def test_check_names_a_bad_key(tmp_path, capsys):
    p = tmp_path / "params.yaml"
    p.write_text("losses:\n  batch_tokens: 8\n  oops: 1\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["--params", str(p), "check"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "oops" in err and "batch_tokens" in err


def test_revisions_prints_pythia_checkpoints(capsys):
    cli.main(["revisions"])
    names = capsys.readouterr().out.split()
    assert len(names) == 154 and names[0] == "step0" and names[-1] == "step143000"


def test_check_validates_the_suite_sources(tmp_path, tiny_revisions_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def check(sources: str, revisions: str = "[step1, step2]") -> str:
        p = tmp_path / "params.yaml"
        p.write_text(f"suite:\n  models: [m]\n  revisions: {revisions}\n  sources: {{m: {sources}}}\n")
        with pytest.raises(SystemExit) as e:
            cli.main(["--params", str(p), "check"])
        assert e.value.code == 2
        return capsys.readouterr().err

    assert f"suite.sources['m'] = '{tmp_path / 'missing.gguf'}': no such file or folder; fix suite.sources.m" in check(
        str(tmp_path / "missing.gguf"))
    assert "suite.sources['m'] = 'models/x': no such file or folder" in check("models/x")  # a path, not a hub id
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert "fix suite.revisions" in check(str(tmp_path / "model.gguf"))
    assert "no revision 'step9'" in check(str(tiny_revisions_dir), "[step9]")
    assert "step123456" in check("EleutherAI/pythia-70m", "[step123456]")
    # a source the planted stage writes is fine before the stage has run
    p = tmp_path / "params.yaml"
    p.write_text("suite:\n  models: [m]\n  revisions: [step1]\n  sources: {m: cache/planted/models/m}\n"
                 "planted:\n  widths: [8]\n")
    cli.main(["--params", str(p), "check"])
    assert "built by the pipeline: m" in capsys.readouterr().out


def test_info_says_why_a_model_is_not_loadable(tmp_path, capsys):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    p = tmp_path / "params.yaml"
    p.write_text(f"suite:\n  models: [m]\n  revisions: [step1]\n  sources: {{m: {tmp_path / 'model.gguf'}}}\n")
    cli.main(["--params", str(p), "info", "--losses", str(tmp_path / "none"), "--tokens", str(tmp_path / "none.parquet")])
    out = capsys.readouterr().out
    assert "m @ step1: " in out and "single revision 'main'" in out


def test_info_names_a_truncated_loss_part_and_lists_the_rest(tmp_path, capsys):
    from pipeline.lm import partitions

    d = partitions.partition_dir(tmp_path / "losses", "m", "step1")
    d.mkdir(parents=True)
    (d / "part-00000.parquet").write_bytes(b"PAR1 cut short")
    p = tmp_path / "params.yaml"
    p.write_text(f"suite:\n  models: [m]\n  revisions: [step1]\n  sources: {{m: org/m}}\n  cache_dir: {tmp_path / 'hf'}\n")
    cli.main(["--params", str(p), "info", "--losses", str(tmp_path / "losses"), "--tokens", str(tmp_path / "none.parquet")])
    out = capsys.readouterr().out
    assert "damaged" in out and "part-00000.parquet is unreadable" in out and "dvc repro losses@m" in out


def test_check_accepts_a_revision_the_planted_stage_will_add(tmp_path, capsys, monkeypatch):
    """A planted model already built at step1 is retrained at step1 and step2 when step2 is
    added: `dvc repro` builds it, so `quanta check` does not refuse it."""
    monkeypatch.chdir(tmp_path)
    built = tmp_path / "cache" / "planted" / "models" / "m" / "step1"
    built.mkdir(parents=True)
    (built / "config.json").write_text("{}")
    p = tmp_path / "params.yaml"
    p.write_text("suite:\n  models: [m]\n  revisions: [step1, step2]\n  sources: {m: cache/planted/models/m}\n"
                 "planted:\n  widths: [8]\n  steps: 10\n")
    cli.main(["--params", str(p), "check"])
    assert "ok" in capsys.readouterr().out
    p.write_text(p.read_text().replace("step2", "step20"))  # past planted.steps: never saved
    with pytest.raises(SystemExit):
        cli.main(["--params", str(p), "check"])
    assert "'step20' is not a checkpoint the planted stage saves" in capsys.readouterr().err


def test_info_says_local_files_only_only_when_it_is_set(tmp_path, capsys):
    """A hub model not in the cache is listed as such; "local_files_only is set" only when it is."""
    p = tmp_path / "params.yaml"
    for flag in ("false", "true"):
        p.write_text("suite:\n  models: [m]\n  revisions: [main]\n  sources: {m: org/m}\n"
                     f"  cache_dir: {tmp_path / 'hf'}\n  local_files_only: {flag}\n")
        cli.main(["--params", str(p), "info", "--losses", str(tmp_path / "none"), "--tokens", str(tmp_path / "none.parquet")])
        out = capsys.readouterr().out
        assert f"m @ main: org/m at revision main is not in the Hugging Face cache {tmp_path / 'hf'}; fetch it first" in out
        assert "local_files_only" not in out  # info asks the cache only, whatever the suite says
