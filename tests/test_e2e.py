"""End to end: `dvc repro` of the real dvc.yaml on a tiny planted suite, in a scratch repo.

This is the pipeline as a user runs it: DVC parses dvc.yaml (the foreach over models, the
params of each stage), runs each stage file as its own process, and the
outputs are read back the way README says users read them.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = """\
planted:
  n_quanta: 12
  n_args: 4
  n_answers: 4
  n_filler: 16
  doc_len: 32
  quanta_per_doc: 4
  n_eval_docs: 40
  widths: [8, 16, 24]
  n_layers: 1
  n_heads: 2
  steps: 40
  batch_size: 16
  warmup_steps: 5
  seed: 3
  threads: 1
suite:
  models: [tiny-a, tiny-b, tiny-c]
  revisions: [step10, step40]
  sources:
    tiny-a: cache/planted/models/tiny-a
    tiny-b: cache/planted/models/tiny-b
    tiny-c: cache/planted/models/tiny-c
  device: cpu
corpus:
  source: cache/planted/corpus.jsonl
  max_len: 32
losses:
  batch_tokens: 512
  scheduler: inprocess
select:
  model: tiny-c
  revision: step40
  max_loss: 5.0           # 40 training steps: nothing is below the real 0.1 nats yet
  n_samples: 150
gradients:
  k: 256
  scheduler: inprocess
  shard_samples: 64
cluster:
  n_clusters: [4, 3]
  cut: k
  n_init: 2
scaling:
  n_boot: 20
dynamics:
  n_boot: 20
powerlaw:
  n_boot_ci: 20
  n_boot_gof: 10
"""


def tiny_params() -> str:
    """The repo's params.yaml (every key is there: DVC needs each key a stage lists) with
    the tiny overrides above merged in section by section; suite.sources is replaced."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, section in yaml.safe_load(TINY_PARAMS).items():
        params[name].update(section)
    return yaml.safe_dump(params, sort_keys=False)


def _env():
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    return env


def _run(args, cwd, check=True):
    r = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def _make_scratch(d: Path) -> Path:
    """A fresh repo at `d`: the pipeline's code, dvc.yaml and the tiny params, git + dvc initialised."""
    d.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "pyproject.toml"):
        shutil.copy(REPO / name, d / name)
    for name in ("stages", "pipeline"):
        shutil.copytree(REPO / name, d / name, ignore=shutil.ignore_patterns("__pycache__"))
    (d / "params.yaml").write_text(tiny_params())
    _run(["git", "init", "-q"], d)
    _run([sys.executable, "-m", "dvc", "init", "-q"], d)
    return d


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return _make_scratch(tmp_path_factory.mktemp("e2e"))


def _listed_stages(status: str) -> list[str]:
    """The stages `dvc status` lists as changed (its unindented "name:" lines)."""
    return [line[:-1] for line in status.splitlines() if line.endswith(":") and not line.startswith((" ", "\t"))]


def _out_hashes(lock_path: Path) -> dict:
    """stage -> {out path: md5} from a dvc.lock."""
    import yaml

    lock = yaml.safe_load(lock_path.read_text())
    return {name: {o["path"]: o.get("md5") for o in st.get("outs", [])} for name, st in lock["stages"].items()}


@pytest.mark.e2e
def test_dvc_repro_tiny_suite(scratch):
    r = _run([sys.executable, "-m", "dvc", "repro"], scratch)
    out = r.stdout + r.stderr
    assert "losses@tiny-c" in out

    import duckdb
    import pandas as pd
    import polars as pl

    losses = scratch / "cache" / "losses"
    df = pd.read_parquet(losses)
    assert set(df["model"].astype(str)) == {"tiny-a", "tiny-b", "tiny-c"}
    assert set(df["revision"].astype(str)) == {"step10", "step40"}
    tokens = pd.read_parquet(scratch / "cache/corpus/tokens.parquet")
    scored = tokens[tokens["pos"] >= 1]
    assert len(df) == 6 * len(scored), "every (model, revision) scores every token but the first"
    assert df["loss"].notna().all() and (df["loss"] >= 0).all()

    pl_df = pl.scan_parquet(str(losses / "**/*.parquet"), hive_partitioning=True).collect()
    assert pl_df.height == len(df)
    n = duckdb.sql(
        f"select count(*) from read_parquet('{losses}/**/*.parquet', hive_partitioning=true)"
    ).fetchall()[0][0]
    assert n == len(df)

    metrics = json.loads((scratch / "metrics/planted.json").read_text())
    assert metrics["sizes"] == ["tiny-a", "tiny-b", "tiny-c"] and len(metrics["n_learned_by_size"]) == 3
    assert isinstance(metrics["acceptance_failures"], list)

    # QDG: samples -> gradients -> affinity -> clusters -> validation against the planted quanta
    import numpy as np

    samples = pd.read_parquet(scratch / "cache/qdg/samples.parquet")
    assert 0 < len(samples) <= 150 and (samples["loss"] < 5.0).all()
    grads = np.load(scratch / "cache/qdg/gradients.npy")
    assert grads.shape == (len(samples), 256) and np.isfinite(grads).all()
    clusters = pl.read_parquet(scratch / "cache/qdg/clusters.parquet")
    assert clusters.columns == ["sample", "cluster", "k4", "k3"] and clusters.height == len(samples)
    summary = duckdb.sql(
        f"select k, sum(size) from read_parquet('{scratch}/cache/qdg/cluster_summary.parquet') group by k order by k"
    ).fetchall()
    assigned = {k: int((clusters[f"k{k}"].to_numpy() >= 0).sum()) for k in (3, 4)}  # knn_average leaves some at -1
    assert summary == [(3, assigned[3]), (4, assigned[4])] and assigned[4] > len(samples) // 2
    qdg = json.loads((scratch / "metrics/qdg.json").read_text())
    k4 = clusters["k4"].to_numpy()
    assert qdg["k"] == 4 and qdg["n_samples"] == len(samples)
    assert set(qdg["baselines"]) == {"answer", "previous", "previous_answer", "previous2_answer"}
    quality = pd.read_parquet(scratch / "cache/qdg/cluster_summary.parquet")
    multi = quality[quality["size"] >= 2]
    assert multi["coherence"].between(-1, 1).all() and multi["null_z"].notna().all()
    assert quality.loc[quality["size"] == 1, ["coherence", "separation", "null_z"]].isna().all().all()
    assert 0.0 <= qdg["above_null"] <= 1.0 and 0.0 <= qdg["explained_by_ngram"] <= 1.0
    assert multi["quality"].notna().all() and (multi["quality"] <= 1).all() and multi["stability"].between(0, 1).all()
    assert set(multi["label_kind"]) <= {"answer", "previous", "bigram", "trigram", "class", "none"}
    assert -1 <= qdg["stability"]["subsample_ari"] <= 1 and -1 <= qdg["stability"]["projection_ari"] <= 1
    assert np.load(scratch / "cache/qdg/gradients_projections.npy").shape == (1, len(samples), 256)
    assert all(-1.0 <= v["ari"] <= 1.0 and 0.0 <= v["nmi"] <= 1.0 for v in qdg["baselines"].values())
    assert qdg["largest_cluster"] == np.bincount(k4[k4 >= 0]).max()
    validate = json.loads((scratch / "metrics/validate.json").read_text())
    assert validate["planted"] is True and validate["n_scored"] == len(samples)
    assert {"qdg", "baseline_answer", "baseline_context"} <= validate.keys() or "skipped" in validate
    if "qdg" in validate:  # too few clusters to score an AUC on this tiny run: said, not reported as 1.0
        scored_q = validate["quality"]
        assert scored_q["quality_auc"] is not None or "at least" in scored_q["quality_auc_skipped"]

    # Each cluster across the suite: 4 clusters x 3 models x 2 revisions, and its emergence
    cc = pd.read_parquet(scratch / "cache/qdg/cluster_curves.parquet")
    assert len(cc) == 4 * 3 * 2 and cc["n"].sum() == 6 * int((clusters["cluster"].to_numpy() >= 0).sum())
    emergence = pd.read_parquet(scratch / "cache/qdg/cluster_emergence.parquet")
    assert emergence["cluster"].tolist() == [0, 1, 2, 3]
    assert set(emergence["n_star_censored"]) <= {"left", "none", "right"}
    curves_m = json.loads((scratch / "metrics/cluster_curves.json").read_text())
    assert [p[0] for p in curves_m["size"]["points"]] == ["tiny-a", "tiny-b", "tiny-c"]
    assert curves_m["step"]["points"] == [["tiny-c", "step10"], ["tiny-c", "step40"]]
    assert "spearman_vs_truth" in validate["emergence"]["size"] or "skipped" in validate["emergence"]["size"]
    assert "spearman_size_vs_n_learned" in metrics and isinstance(metrics["n_learned_strictly_increasing"], bool)

    # Scaling analysis: per-token curves and dynamics as tables, every exponent in metrics, PNG plots.
    curves = pd.read_parquet(scratch / "cache/scaling/token_curves.parquet")
    assert len(curves) == len(scored) and set(curves["kind"].astype(str)) <= {"monogenic", "polygenic", "other"}
    dyn = pl.read_parquet(scratch / "cache/scaling/token_dynamics.parquet")
    assert dyn.height == len(scored) and {"drop", "drop_step", "sharpness", "abrupt"} <= set(dyn.columns)
    n_abrupt = duckdb.sql(
        f"select count(*) from read_parquet('{scratch}/cache/scaling/token_dynamics.parquet') where abrupt"
    ).fetchall()[0][0]
    scaling_m = json.loads((scratch / "metrics/scaling.json").read_text())
    assert scaling_m["models"] == ["tiny-a", "tiny-b", "tiny-c"] and "alpha_N" in scaling_m["mean_loss"]
    assert set(scaling_m["learning_curves"]) == {"tiny-a", "tiny-b", "tiny-c"}
    dynamics_m = json.loads((scratch / "metrics/dynamics.json").read_text())
    assert dynamics_m["n_abrupt"] == n_abrupt and "emergence" in dynamics_m
    powerlaw_m = json.loads((scratch / "metrics/powerlaw.json").read_text())
    assert powerlaw_m["k"] == 4 and powerlaw_m["n_samples"] == assigned[4]
    theory_m = json.loads((scratch / "metrics/theory.json").read_text())
    assert theory_m["planted"] is True
    assert set(theory_m["routes"]) == {"alpha_N", "alpha_S", "zipf", "zipf_csn", "zipf_planted_partition"}
    for png in ("scaling/mean_loss_vs_n", "scaling/token_examples", "scaling/learning_curves",
                "dynamics/emergence_vs_frequency", "powerlaw/cluster_rank_frequency", "report/similarity_matrix"):
        assert (scratch / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    # The report: one file, its data block holds every cluster of the main k, its figures are embedded.
    page = (scratch / "cache/report/index.html").read_text()
    block = page.split('<script id="quanta-data" type="application/json">')[1].split("</script>")[0]
    data = json.loads(block)
    assert data["k"] == 4 and data["planted"] is True
    main_k = clusters["cluster"].to_numpy()
    browsed = [c for c in data["clusters"] if c["id"] >= 0]  # id -1: the unassigned, browsed apart
    assert [c["size"] for c in browsed] == np.bincount(main_k[main_k >= 0]).tolist()
    assert data["n_unassigned"] == int((main_k < 0).sum())
    assert all(len(c["curve_size"]) == 3 and len(c["curve_step"]) == 2 for c in browsed)
    assert page.count("data:image/png;base64,") == 6 and "http://" not in page and "https://" not in page
    shown = _run([sys.executable, "-m", "dvc", "metrics", "show"], scratch).stdout
    assert "metrics/theory.json" in shown and "metrics/scaling.json" in shown

    # The same params and seed from scratch give the same dvc.lock: every output's hash
    # depends on the data only (timings live in logs/, outside DVC's outputs).
    second = _make_scratch(scratch.parent / "e2e-second")
    _run([sys.executable, "-m", "dvc", "repro"], second)
    first_hashes, second_hashes = _out_hashes(scratch / "dvc.lock"), _out_hashes(second / "dvc.lock")
    differ = {st: [p for p in first_hashes[st] if first_hashes[st][p] != second_hashes.get(st, {}).get(p)]
              for st in first_hashes}
    assert not {st: ps for st, ps in differ.items() if ps}, "outputs whose hash differs between two identical runs"
    assert (scratch / "dvc.lock").read_text() == (second / "dvc.lock").read_text()


@pytest.mark.e2e
def test_unknown_params_key_fails_in_one_line(scratch):
    params = scratch / "params.yaml"
    good = params.read_text()
    try:
        params.write_text(good.replace("  batch_tokens: 512", "  batch_tokns: 512"))
        r = _run([sys.executable, "-m", "stages.losses", "--model", "tiny-a", "--revision", "step10",
                  "--tokens", "cache/corpus/tokens.parquet", "--out", "cache/losses"], scratch, check=False)
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and "batch_tokns" in last and "batch_tokens" in last
        assert "Traceback" not in r.stderr
    finally:
        params.write_text(good)


@pytest.mark.e2e
def test_params_typo_fails_dvc_repro_when_nothing_else_reruns(scratch):
    """A misspelled section appended to a finished run's params.yaml: no stage lists it, so
    only the check_params stage (which depends on the whole file) can catch it."""
    params = scratch / "params.yaml"
    good = params.read_text()
    _run([sys.executable, "-m", "dvc", "repro"], scratch)  # a no-op after test_dvc_repro_tiny_suite
    status = _run([sys.executable, "-m", "dvc", "status"], scratch).stdout
    # only the sources stage (always_changed: it hashes the local inputs on every run) is listed
    assert _listed_stages(status) == ["sources"], f"the finished run is not up to date:\n{status}"
    try:
        params.write_text(good + "gradient:\n  k: 64\n")
        r = _run([sys.executable, "-m", "dvc", "repro"], scratch, check=False)
        assert r.returncode != 0, f"dvc repro accepted a misspelled section:\n{r.stdout[-2000:]}"
        err = r.stdout + r.stderr
        assert "unknown section 'gradient'" in err and "check_params" in err
        assert "Running stage 'losses" not in err and "Running stage 'planted'" not in err
    finally:
        params.write_text(good)
    # the restored file is the one dvc.lock records: nothing reruns but sources, nothing was lost
    r = _run([sys.executable, "-m", "dvc", "repro"], scratch)
    assert re.findall(r"Running stage '([^']+)'", r.stdout) == ["sources"], r.stdout[-2000:]


@pytest.mark.e2e
@pytest.mark.slow
def test_one_model_run_reaches_the_report_with_default_params(scratch, tmp_path):
    """QDG on one model, as a new user first runs it: the repo's params with only suite,
    corpus and select changed. Every analysis that needs several models or checkpoints is
    skipped with its reason, in its metrics and in the report; nothing fails."""
    import yaml

    model = scratch / "cache/planted/models/tiny-c/step40"
    if not model.exists():
        _run([sys.executable, "-m", "dvc", "repro", "planted"], scratch)
    solo = _make_scratch(tmp_path / "solo")
    shutil.copytree(model, solo / "models/solo")
    (solo / "data").mkdir()
    shutil.copy(scratch / "cache/planted/corpus.jsonl", solo / "data/corpus.jsonl")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["suite"].update(models=["solo"], revisions=["main"], sources={"solo": "models/solo"})
    params["corpus"].update(source="data/corpus.jsonl")
    params["select"].update(model="solo", revision="main", max_loss=5.0, n_samples=150)  # 40 steps: nothing under 0.1
    (solo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    out = _run([sys.executable, "-m", "dvc", "repro"], solo)
    log = out.stdout + out.stderr
    assert "scaling: skipped" in log and "dynamics: skipped" in log
    curves = json.loads((solo / "metrics/cluster_curves.json").read_text())
    assert "at least 2" in curves["size"]["skipped"] and "at least 2" in curves["step"]["skipped"]
    assert "at least 3" in json.loads((solo / "metrics/scaling.json").read_text())["skipped"]
    page = (solo / "cache/report/index.html").read_text()
    assert "Skipped in this run" in page and "scaling.min_models" in page
    qdg = json.loads((solo / "metrics/qdg.json").read_text())  # the default cut: its k is the data's
    assert "excess-of-mass" in qdg["k_from"] and qdg["k"] >= 2 and 0 <= qdg["unassigned_fraction"] < 0.5

    # the local corpus is a dependency through its content hash: unchanged, nothing reruns;
    # edited in place (a null-text document appended), the corpus stage reruns and says what it dropped
    again = _run([sys.executable, "-m", "dvc", "repro", "corpus"], solo).stdout
    assert "Running stage 'sources'" in again and "Running stage 'corpus'" not in again
    with (solo / "data/corpus.jsonl").open("a") as f:
        f.write('{"text": null}\n{"text": "u000 v000 ! w001"}\n')
    edited = _run([sys.executable, "-m", "dvc", "repro", "corpus"], solo)
    assert "Running stage 'corpus'" in edited.stdout
    assert "dropped 1 of" in edited.stdout + edited.stderr and "1 with empty or null text" in edited.stdout + edited.stderr
