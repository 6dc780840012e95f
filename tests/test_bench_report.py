"""Smoke test of bench/bench_report.py: a tiny report (300 samples, 12 clusters) built, written
and opened once in headless Chromium, in a subprocess. Checks that the page reached
body[data-ready='1'] with no console errors, that the search and the click were timed, and
that the JSON has the fields RESULTS.md quotes. Speed is never asserted in tests:
the targets (≤ 3 s, ≤ 20 MB at 10,000 samples and 400 clusters) are measured by the bench.

Skipped without /usr/bin/chromium or playwright; the required browser test of the report
is a different one."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: the report bench opens the page in it"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="playwright is not installed: the report bench drives Chromium with it"),
]


def test_bench_report_smoke(tmp_path):
    out = tmp_path / "bench.json"
    html = tmp_path / "report.html"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_report.py"), "--n", "300", "--k", "12", "--repeats", "1",
         "--chromium", str(CHROMIUM), "--html", str(html), "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())

    assert res["n"] == 300 and res["k"] == 12
    for key in ("collect_s", "render_s", "python_s", "page", "browser", "targets", "machine"):
        assert key in res, key
    page = res["page"]
    assert page["clusters"] == 12 and page["examples"] > 0 and page["context_tokens_total"] > 0
    assert page["size_mb"] > 0 and html.stat().st_size == page["total_bytes"]
    assert page["data_json_bytes"] > 0 and page["figures_bytes"] > 0  # real figures were embedded

    b = res["browser"]
    assert b["ready"] is True and b["repeats"] == 1 and not b["not_ready_errors"]
    assert b["console_errors"] == [] and b["load_console_errors"] == []
    assert b["rows"] == 12 and b["detail_examples"] > 0
    for key in ("load_s", "ready_performance_now_ms", "search_cold_s", "search_warm_s", "click_s", "click_in_page_ms"):
        assert b[key] is not None and b[key]["median"] > 0 and b[key]["max"] >= b[key]["median"], key
    assert all(v is not None and "clusters" in v for v in b["queries"].values())

    t = res["targets"]
    assert t["load_s_max"] == 3.0 and t["size_mb_max"] == 20.0
    assert isinstance(t["load_met"], bool) and isinstance(t["size_met"], bool) and t["no_console_errors"] is True
    assert "| load: goto → body[data-ready] (median / max)" in proc.stdout
