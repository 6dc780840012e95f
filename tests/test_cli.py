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
