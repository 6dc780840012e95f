"""Files appear whole or not at all."""

import pyarrow as pa
import pytest

from pipeline.core import files


def test_write_parquet_round_trips_config(tmp_path):
    path = tmp_path / "t.parquet"
    files.write_parquet(pa.table({"x": [1, 2]}), path, config={"a": 1})
    assert files.read_config(path) == {"a": 1}
    assert pa.parquet.read_table(path).column("x").to_pylist() == [1, 2]


def test_crash_inside_atomic_path_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_a_directory(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "old").write_text("old")
    with files.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]


def test_write_json_handles_numpy(tmp_path):
    import json

    import numpy as np

    files.write_json({"a": np.float32(1.5), "b": np.arange(2)}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1.5, "b": [0, 1]}


def test_run_facts_stay_out_of_the_output(tmp_path, monkeypatch):
    """Timings and peaks go to the run log, so identical data gives identical bytes."""
    monkeypatch.setenv("QUANTA_RUN_LOG", str(tmp_path / "log"))
    monkeypatch.chdir(tmp_path)
    first = {"tokens": 10, "wall_seconds": 1.5, "models": {"a": {"width": 4, "train_seconds": 2.0}}}
    second = {"tokens": 10, "wall_seconds": 9.0, "models": {"a": {"width": 4, "train_seconds": 7.0}}}
    out = tmp_path / "out" / "_meta.json"
    files.write_meta(first, out)
    data = out.read_bytes()
    assert files.read_json(out) == {"tokens": 10, "models": {"a": {"width": 4}}}
    assert files.read_meta(out) == first
    assert files.run_log_path(out) == tmp_path / "log" / "out" / "_meta.json"
    files.write_meta(second, out)
    assert out.read_bytes() == data and files.read_meta(out) == second
