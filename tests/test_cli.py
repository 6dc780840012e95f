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

    assert "does not exist; fix suite.sources.m" in check(str(tmp_path / "missing.gguf"))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert "fix suite.revisions" in check(str(tmp_path / "model.gguf"))
    assert "no revision 'step9'" in check(str(tiny_revisions_dir), "[step9]")
    assert "step123456" in check("EleutherAI/pythia-70m", "[step123456]")
    # a source the planted stage writes is fine before the stage has run
    p = tmp_path / "params.yaml"
    p.write_text("suite:\n  models: [m]\n  revisions: [step1]\n  sources: {m: cache/planted/models/m}\n")
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
    p.write_text("suite:\n  models: [m]\n  revisions: [step1]\n  sources: {m: cache/planted/models/m}\n")
    cli.main(["--params", str(p), "info", "--losses", str(tmp_path / "losses"), "--tokens", str(tmp_path / "none.parquet")])
    out = capsys.readouterr().out
    assert "damaged" in out and "part-00000.parquet is unreadable" in out and "dvc repro losses@m" in out
