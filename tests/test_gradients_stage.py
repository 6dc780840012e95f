"""The gradients stage: shards give the library's gradients, a crash resumes from finished
parts, Dask workers agree with in-process, and a model with another tokenizer is refused."""

import shutil

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core import execution, files
from pipeline.core.config import GradientsConfig
from pipeline.lm import models
from pipeline.qdg import gradients
from pipeline.qdg.gradients import GradientError, compute_gradients, run_gradients
from pipeline.qdg.selection import SCHEMA

VOCAB = 300  # the conftest model's tokenizer has 300 tokens


@pytest.fixture(autouse=True)
def _no_external_scheduler(monkeypatch):
    monkeypatch.delenv(execution.ENV_SCHEDULER, raising=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_neox_dir):
    d = tmp_path_factory.mktemp("qdg")
    rng = np.random.default_rng(0)
    docs = {5 * i + 2: rng.integers(0, VOCAB, size=int(rng.integers(8, 40))) for i in range(30)}
    doc = np.concatenate([np.full(len(t), k, dtype=np.int64) for k, t in docs.items()])
    pos = np.concatenate([np.arange(len(t), dtype=np.int32) for t in docs.values()])
    tok = np.concatenate(list(docs.values())).astype(np.int32)
    files.write_parquet(pa.table({"doc_id": doc, "pos": pos, "token_id": tok,
                               "token_str": pa.array([f"t{t}" for t in tok]).dictionary_encode()}), d / "tokens.parquet")
    chosen = np.sort(rng.choice(np.flatnonzero(pos >= 1), size=57, replace=False))
    samples = pa.Table.from_arrays(
        [pa.array(np.arange(57, dtype=np.int32)), pa.array(doc[chosen]), pa.array(pos[chosen]),
         pa.array(tok[chosen]), pa.array(np.zeros(57, dtype=np.float32))], schema=SCHEMA)
    files.write_parquet(samples, d / "samples.parquet")
    spec = models.ModelSpec("tiny", str(tiny_neox_dir))
    return d, spec, docs, samples.to_pandas()


def stage(d, spec, out, **cfg_kw):
    cfg = GradientsConfig(**{"k": 512, "shard_samples": 10, "scheduler": "inprocess", "progress": False,
                             "threads_per_worker": 1, **cfg_kw})
    return run_gradients(str(d / "samples.parquet"), str(d / "tokens.parquet"), str(out / "g.npy"),
                         str(out / "g.parquet"), cfg=cfg, select_spec=spec, spec=spec,
                         load_kwargs={"dtype": "float32", "device": "cpu", "cache_dir": None}, max_len=32)


def test_stage_output_equals_the_library_on_all_samples(tmp_path, inputs):
    d, spec, docs, samples = inputs
    meta = stage(d, spec, tmp_path)
    got = np.load(tmp_path / "g.npy")
    assert got.shape == (57, 512) and meta["parts"] == 6 and meta["n_bad"] == 0
    model = models.load_model(spec, dtype="float32", device="cpu")
    ref = compute_gradients(model, samples, docs, GradientsConfig(k=512, max_len=32))
    np.testing.assert_allclose(got, ref.grads, rtol=1e-5, atol=1e-6 * np.abs(ref.grads).max())
    table = pa.parquet.read_table(tmp_path / "g.parquet").to_pandas()
    assert table["sample"].tolist() == list(range(57))
    np.testing.assert_allclose(table["norm"], ref.norms, rtol=1e-5)
    assert not (tmp_path / ".g-parts").exists(), "parts are removed once assembled"


def dies_on_call(n: int, calls: list):
    """compute_part, killed (KeyboardInterrupt) on its n-th call; `calls` records the shards."""
    real = gradients.compute_part

    def part(task, on_rows=None):
        calls.append(task.index)
        if len(calls) == n:
            raise KeyboardInterrupt("killed")
        return real(task, on_rows)

    return part


def killed_run(monkeypatch, d, spec, out, n: int) -> None:
    """Run the stage into `out` until its n-th part computation is killed, then restore compute_part."""
    real = gradients.compute_part
    monkeypatch.setattr(gradients, "compute_part", dies_on_call(n, []))
    with pytest.raises(KeyboardInterrupt):
        stage(d, spec, out)
    monkeypatch.setattr(gradients, "compute_part", real)


def test_crash_leaves_no_output_and_the_rerun_reuses_finished_parts(tmp_path, inputs, monkeypatch):
    d, spec, _, _ = inputs
    real = gradients.compute_part
    calls = []
    dies_on_the_fourth = dies_on_call(4, calls)
    monkeypatch.setattr(gradients, "compute_part", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        stage(d, spec, tmp_path / "run")
    assert not (tmp_path / "run" / "g.npy").exists() and not (tmp_path / "run" / "g.parquet").exists()
    assert len(list((tmp_path / "run" / ".g-parts").glob("part-*.npz"))) == 3
    monkeypatch.setattr(gradients, "compute_part", real)
    meta = stage(d, spec, tmp_path / "run")
    assert meta["reused_parts"] == 3 and meta["computed_samples"] == 57 - 30
    clean = stage(d, spec, tmp_path / "clean")
    assert clean["reused_parts"] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "g.npy"), np.load(tmp_path / "clean" / "g.npy"))
    # a part made with other settings is never reused
    (tmp_path / "run" / "g.npy").unlink()
    monkeypatch.setattr(gradients, "compute_part", dies_on_the_fourth)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        stage(d, spec, tmp_path / "run")
    monkeypatch.setattr(gradients, "compute_part", real)
    assert stage(d, spec, tmp_path / "run", seed=1)["reused_parts"] == 0


def test_a_lower_memory_bound_or_no_progress_bar_after_a_kill_reuses_every_part(tmp_path, inputs, monkeypatch):
    """The usual reaction to running out of memory is a lower gradients.memory_gb: it must not
    cost the finished parts, nor must hiding the progress bar."""
    d, spec, _, _ = inputs
    killed_run(monkeypatch, d, spec, tmp_path / "run", 4)
    meta = stage(d, spec, tmp_path / "run", memory_gb=2.0, progress=True, verify=False, n_workers=2)
    assert meta["reused_parts"] == 3
    stage(d, spec, tmp_path / "clean")
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "g.npy"), np.load(tmp_path / "clean" / "g.npy"))


def test_damaged_or_nan_parts_are_logged_by_name_and_recomputed(tmp_path, inputs, monkeypatch, caplog):
    import logging

    from pipeline.core import shards

    d, spec, _, _ = inputs
    killed_run(monkeypatch, d, spec, tmp_path / "run", 4)
    parts = tmp_path / "run" / ".g-parts"
    meta, arrays = shards.NPZ.read(parts / "part-00000.npz")
    arrays["grads"][0, 0] += 1.0  # data changed after writing, stored checksum kept
    shards.NPZ.write(parts / "part-00000.npz", arrays, meta)
    meta, arrays = shards.NPZ.read(parts / "part-00001.npz")
    arrays["grads"][2, 5] = np.nan
    meta.pop(shards.CONTENT)
    shards.write_part(shards.NPZ, parts / "part-00001.npz", arrays, meta)  # a valid checksum over a NaN
    with caplog.at_level(logging.INFO, logger="pipeline"):
        got = stage(d, spec, tmp_path / "run")
    assert got["reused_parts"] == 1 and got["computed_samples"] == 57 - 10
    assert "part-00000.npz fails its content checksum" in caplog.text
    assert "part-00001.npz has 1 non-finite values in grads" in caplog.text
    stage(d, spec, tmp_path / "clean")
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "g.npy"), np.load(tmp_path / "clean" / "g.npy"))


def test_a_run_killed_before_its_first_part_leaves_no_parts_folder(tmp_path, inputs, monkeypatch):
    d, spec, _, _ = inputs
    monkeypatch.setattr(gradients, "compute_part", dies_on_call(1, []))
    with pytest.raises(KeyboardInterrupt):
        stage(d, spec, tmp_path / "run")
    assert not (tmp_path / "run" / ".g-parts").exists()


def test_a_model_rewritten_in_place_is_recomputed(tmp_path, inputs, tiny_tokenizer_dir, monkeypatch):
    from conftest import make_neox

    d, _, _, _ = inputs
    model_dir = make_neox(tmp_path / "model", tiny_tokenizer_dir, seed=3)
    spec = models.ModelSpec("tiny", str(model_dir))
    killed_run(monkeypatch, d, spec, tmp_path / "run", 2)
    shutil.rmtree(model_dir)
    make_neox(model_dir, tiny_tokenizer_dir, seed=4)  # retrained under the same path
    meta = stage(d, spec, tmp_path / "run")
    assert meta["reused_parts"] == 0
    stage(d, spec, tmp_path / "clean")
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "g.npy"), np.load(tmp_path / "clean" / "g.npy"))


def test_a_part_made_under_another_numerics_version_is_recomputed(tmp_path, inputs, monkeypatch, caplog):
    import logging

    d, spec, _, _ = inputs
    killed_run(monkeypatch, d, spec, tmp_path / "run", 4)
    monkeypatch.setattr(gradients, "NUMERICS_VERSION", gradients.NUMERICS_VERSION + 1)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        meta = stage(d, spec, tmp_path / "run")
    assert meta["reused_parts"] == 0 and meta["computed_samples"] == 57
    assert "part-00000.npz was made with a different config (differs in numerics)" in caplog.text
    assert meta["identity"]["numerics"] == gradients.NUMERICS_VERSION


@pytest.mark.slow
def test_local_cluster_of_two_workers_gives_the_inprocess_array(tmp_path, inputs):
    d, spec, _, _ = inputs
    stage(d, spec, tmp_path / "a")
    meta = stage(d, spec, tmp_path / "b", scheduler="local", n_workers=2)
    assert meta["execution"] == "local"
    np.testing.assert_allclose(np.load(tmp_path / "a" / "g.npy"), np.load(tmp_path / "b" / "g.npy"), rtol=1e-5, atol=1e-7)


def test_a_model_with_another_tokenizer_is_refused(tmp_path, inputs, tiny_tokenizer):
    from pipeline.core.config import PlantedConfig
    from pipeline.planted import suite

    d, spec, _, _ = inputs
    other = models.ModelSpec("planted", str(tmp_path / "unused"), revision="step10")
    toks = {"tiny": tiny_tokenizer, "planted": suite.make_tokenizer(suite.make_language(PlantedConfig()))}
    refused = r"gradients.model planted@step10 has a different tokenizer .* select.model tiny@main"
    with pytest.raises(GradientError, match=refused):
        run_gradients(str(d / "samples.parquet"), str(d / "tokens.parquet"), str(tmp_path / "g.npy"),
                      str(tmp_path / "g.parquet"), cfg=GradientsConfig(), select_spec=spec, spec=other,
                      load_kwargs={}, max_len=32, tokenizer_loader=lambda s: toks[s.name])
    assert not (tmp_path / "g.npy").exists()
    # the same tokenizer (another checkpoint of the same family) is fine
    gradients.check_same_tokenizer(spec, other, lambda s: tiny_tokenizer)


def test_samples_from_another_corpus_are_refused(tmp_path, inputs):
    d, spec, _, samples = inputs
    bad = pa.Table.from_pandas(samples.assign(doc_id=samples["doc_id"] + 1), schema=SCHEMA, preserve_index=False)
    files.write_parquet(bad, tmp_path / "samples.parquet")
    (tmp_path / "tokens.parquet").symlink_to(d / "tokens.parquet")
    with pytest.raises(GradientError, match="document 3 is not in"):
        stage(tmp_path, spec, tmp_path)


def test_stability_seeds_are_the_same_gradients_projected_with_each_seed(tmp_path, inputs):
    # one pass writes the main projection unchanged and each extra seed's as its own run would
    d, spec, _, _ = inputs
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    stage(d, spec, tmp_path / "a", stability_seeds=(3, 4))
    stage(d, spec, tmp_path / "b")
    stage(d, spec, tmp_path / "c", seed=4)
    extra = np.load(tmp_path / "a" / "g_projections.npy")
    assert extra.shape == (2, 57, 512)
    assert np.array_equal(np.load(tmp_path / "a" / "g.npy"), np.load(tmp_path / "b" / "g.npy"))
    np.testing.assert_allclose(extra[1], np.load(tmp_path / "c" / "g.npy"), rtol=1e-5, atol=1e-7)
    assert np.load(tmp_path / "b" / "g_projections.npy").shape == (0, 57, 512)  # no seeds: empty, still written


def test_similarity_refuses_a_gradient_matrix_changed_after_the_stage(tmp_path, inputs):
    """A finite edit of gradients.npy passes every shape and NaN check; its checksum does not."""
    from pipeline.core.errors import QuantaError
    from pipeline.qdg import gradient_files

    d, spec, _, _ = inputs
    stage(d, spec, tmp_path)
    gradient_files.verify_gradients(tmp_path / "g.npy", tmp_path / "g.parquet")  # as written: fine
    g = np.load(tmp_path / "g.npy")
    g[3, 5] += 0.25
    np.save(tmp_path / "g.npy", g)
    with pytest.raises(QuantaError, match="does not match the checksum.*dvc repro -f gradients"):
        gradient_files.verify_gradients(tmp_path / "g.npy", tmp_path / "g.parquet")


def test_parts_left_beside_a_finished_matrix_are_removed_once_it_verifies(tmp_path, inputs, monkeypatch):
    """A killed `dvc repro -f -s gradients` then a plain `dvc repro`: DVC restores the matrix from
    its cache, and the killed run's parts would stay forever; the next reader removes them."""
    from pipeline.qdg import gradient_files

    d, spec, _, _ = inputs
    stage(d, spec, tmp_path)  # the finished matrix
    killed_run(monkeypatch, d, spec, tmp_path / "killed", 2)
    shutil.copytree(tmp_path / "killed" / ".g-parts", gradient_files.parts_dir(tmp_path / "g.npy"))
    gradient_files.verify_gradients(tmp_path / "g.npy", tmp_path / "g.parquet")
    assert gradient_files.remove_leftover_parts(tmp_path / "g.npy")
    assert not gradient_files.parts_dir(tmp_path / "g.npy").exists()
    assert not gradient_files.remove_leftover_parts(tmp_path / "g.npy")  # nothing left: nothing to do
