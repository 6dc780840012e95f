"""Smoke test of bench/bench_gradients.py: a quick run (60 samples, blocks of 20, so the
reference recomputes j-blocks across i-blocks) in a subprocess. Checks that our exact
similarity matrix equals the paper-style reference's, that the reference did the
expected number of backward passes, and that the JSON has the fields RESULTS.md quotes.
Speed is not asserted here (DESIGN.md §5): only that the benchmark runs and agrees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gradients_quick(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_gradients.py"), "--quick", "--n", "60", "--block", "20",
         "--threads", "1", "--inprocess", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())

    assert res["n"] == 60 and res["block"] == 20 and res["shape"]["name"] == "planted"
    assert set(res["methods"]) == {"reference", "ours-exact", "ours-sjlt"}
    for row in res["methods"].values():
        for key in ("seconds", "samples_per_s", "peak_rss_bytes", "rss_before_bytes", "grad_s", "matmul_s",
                    "vector_dim", "useful_tflops"):
            assert key in row, key
        assert row["samples_per_s"] > 0 and row["peak_rss_bytes"] > 0
    # blocks of 20 over 60 samples: each i-block once (60) plus blocks j >= i (60 + 40 + 20)
    assert res["reference_backward_passes_expected"] == 180
    assert res["methods"]["reference"]["backward_passes"] == 180
    assert res["methods"]["reference"]["vector_dim"] == res["methods"]["ours-exact"]["vector_dim"]
    assert res["methods"]["ours-sjlt"]["vector_dim"] == res["k"] == 8192
    for key in ("speedup_ours-exact", "speedup_ours-sjlt"):
        assert res[key] > 0

    agree = res["agreement"]
    assert agree["max_abs_diff_exact_vs_reference"] <= 1e-5
    assert agree["sjlt_vs"] == "ours-exact"
    # k = 8192 on ~56k parameters: cosines within a few hundredths (the stage's targets)
    assert agree["sjlt_mae"] <= 0.02 and agree["sjlt_p999"] <= 0.1
    assert "| reference |" in proc.stdout and "max |C_ours-exact - C_reference|" in proc.stdout
