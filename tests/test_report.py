"""The HTML report: its data, its escaping, and the page itself in a real headless Chromium.

The browser test is the one a person would do: open the file, see the clusters, search,
click, read a context whose text is hostile HTML, and find that nothing ran.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.core import files
from pipeline.core.config import ClusterConfig, ReportConfig
from pipeline.core.errors import QuantaError
from pipeline.qdg import clustering
from pipeline.report import page as report

REPO = Path(__file__).resolve().parents[1]

# Corpus text that would run or break a page that trusted it.
HOSTILE = (
    "<script>window.__pwned = 1; alert(1)</script>",
    '<img src=x onerror="window.__pwned = 2">',
    "</div>",
    "</script><script>window.__pwned = 3</script>",
    "&lt;b&gt;",
)
VOCAB = ("The", " cat", " sat", " on", " mat", ".", "\n", " ", "\t", "(", ")", "=", " x", " y") + HOSTILE


def make_inputs(tmp_path: Path, n_docs: int = 30, doc_len: int = 40, n_samples: int = 90, k: int = 4, seed: int = 0):
    """A corpus with HTML in it, samples, a clustering (main k and k - 1) and its summary."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, len(VOCAB), size=(n_docs, doc_len)).astype(np.int32)
    ids[0, :5] = [VOCAB.index(h) for h in HOSTILE]  # every hostile string in one context
    doc = np.repeat(np.arange(n_docs, dtype=np.int64), doc_len)
    pos = np.tile(np.arange(doc_len, dtype=np.int32), n_docs)
    strs = pa.DictionaryArray.from_arrays(pa.array(ids.ravel()), pa.array(list(VOCAB)))
    tokens = pa.table({"doc_id": doc, "pos": pos, "token_id": ids.ravel(), "token_str": strs})
    files.write_parquet(tokens, tmp_path / "tokens.parquet")

    flat = rng.choice(np.flatnonzero(pos >= 1), size=n_samples, replace=False)
    flat[0] = 5  # doc 0, pos 5: its context is the five hostile tokens
    samples = pd.DataFrame(
        {
            "sample": np.arange(n_samples, dtype=np.int32),
            "doc_id": doc[flat],
            "pos": pos[flat],
            "token_id": ids.ravel()[flat],
            "loss": rng.uniform(0, 0.1, n_samples).astype(np.float32),
        }
    )
    main = rng.integers(0, k, n_samples)
    main[:k] = np.arange(k)  # every cluster non-empty
    clusters = pd.DataFrame({"sample": samples["sample"], "cluster": main, f"k{k}": main, f"k{k - 1}": main % (k - 1)})
    clusters.loc[n_samples - 1, ["cluster", f"k{k}", f"k{k - 1}"]] = -1  # one bad sample, never clustered
    # the assessment of the main k (pipeline/qdg/quality.py): cluster 1 ranks first, cluster 2
    # is below its null, cluster 0 is explained by an n-gram, and a label carries hostile text
    assessment = pd.DataFrame({
        "k": k, "cluster": range(k), "quality": ([0.5, 0.9, 0.1, 0.7] + [0.3] * k)[:k],
        "null_z": ([5.0, 8.0, 1.0, 6.0] + [4.0] * k)[:k], "stability": 0.8,
        "label": ([f"'{HOSTILE[1]}' → ' x'", "→ ' cat'", None, "[newline] → [indent]"] + ["→ '.'"] * k)[:k],
        "label_kind": (["bigram", "answer", "none", "class"] + ["answer"] * k)[:k],
        "label_f1": ([0.97, 0.4, None, 0.6] + [0.5] * k)[:k], "ngram_f1": ([0.97, 0.4, None, 0.2] + [0.5] * k)[:k],
    })
    summary = clustering.summarise(clusters, samples, dict(enumerate(VOCAB)), ClusterConfig(n_clusters=(k, k - 1)),
                                   assessment)
    quanta = rng.integers(-1, 3, n_samples)
    return tokens, samples, clusters, summary.to_pandas(), quanta


def test_collect_contexts_end_at_their_target(tmp_path):
    tokens, samples, clusters, summary, quanta = make_inputs(tmp_path)
    cfg = ReportConfig(n_examples=5, context_tokens=7)
    data = report.collect(clusters, samples, summary, tmp_path / "tokens.parquet", cfg, main_k=4, quanta=quanta)
    assert data.k == 4 and data.planted
    assert [c["id"] for c in data.clusters] == [0, 1, 2, 3]
    assert data.n_samples == len(samples) - 1  # the bad sample is not in any cluster
    by_sample = samples.set_index("sample")
    ids = tokens.column("token_id").to_numpy().reshape(30, 40)
    for c in data.clusters:
        members = clusters.loc[clusters["cluster"] == c["id"], "sample"]
        assert c["size"] == len(members)
        assert len(c["examples"]) == min(5, len(members))
        for ex in c["examples"]:
            row = by_sample.loc[ex["s"]]
            assert (ex["d"], ex["p"]) == (row["doc_id"], row["pos"])
            want = ids[ex["d"], max(0, ex["p"] - 7) : ex["p"] + 1]
            assert [data.strings[i] for i in ex["ctx"]] == [VOCAB[t] for t in want]
            assert ex["start"] == max(0, ex["p"] - 7)
        q = quanta[members.to_numpy()]
        values, counts = np.unique(q, return_counts=True)
        assert c["purity"] == pytest.approx(counts.max() / len(q), abs=1e-4)
        assert c["quantum"] in values[counts == counts.max()]
        top = summary[(summary["k"] == 4) & (summary["cluster"] == c["id"])].iloc[0]
        assert [t for t, _ in c["top"]] == list(top["top_tokens"])


def test_collect_is_invariant_to_row_order(tmp_path):
    _, samples, clusters, summary, quanta = make_inputs(tmp_path)
    cfg = ReportConfig()
    a = report.collect(clusters, samples, summary, tmp_path / "tokens.parquet", cfg, main_k=4, quanta=quanta)
    perm = np.random.default_rng(1).permutation(len(samples))
    b = report.collect(
        clusters.iloc[perm], samples.iloc[perm], summary, tmp_path / "tokens.parquet", cfg, main_k=4, quanta=quanta[perm]
    )
    assert a.to_json() == b.to_json()


def test_collect_other_k_and_unknown_k(tmp_path):
    _, samples, clusters, summary, _ = make_inputs(tmp_path)
    data = report.collect(clusters, samples, summary, tmp_path / "tokens.parquet", ReportConfig(k=3), main_k=4)
    assert data.k == 3 and len(data.clusters) == 3 and not data.planted
    assert all(c["purity"] is None for c in data.clusters)
    with pytest.raises(QuantaError, match="report.k = 7 was not clustered"):
        report.collect(clusters, samples, summary, tmp_path / "tokens.parquet", ReportConfig(k=7), main_k=4)


def test_json_for_script_cannot_close_its_block():
    obj = {"s": list(HOSTILE) + ["\u2028", "a & b"]}
    text = report._json_for_script(obj)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == obj


SIZES = (("a", 100.0), ("b", 1000.0), ("c", 10000.0))  # the curves' models and their N


def make_across(k: int = 4) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """cluster_curves' outputs for k clusters: three sizes at step100, two steps of model c.
    Cluster 0 is learned by the smallest model (left censored), cluster 2 by none (right
    censored), the others first by model b and at step 100."""
    rows = []
    for c in range(k):
        for i, (m, n) in enumerate(SIZES):
            learned = c == 0 or (c != 2 and i >= 1)
            rows.append(dict(cluster=c, model=m, revision="step100", n_params=n, step=100,
                             mean_loss=0.05 if learned else 2.0 - 0.1 * i, frac_learned=1.0 if learned else 0.0))
        rows.append(dict(cluster=c, model="c", revision="step10", n_params=10000.0, step=10, mean_loss=2.0,
                         frac_learned=0.0))
    curves = pd.DataFrame(rows)
    censored = ["left", "none", "right", "none"] + ["none"] * k
    emergence = pd.DataFrame({
        "cluster": np.arange(k), "n_star": [100.0, 1000.0, None, 1000.0][:k] + [1000.0] * (k - 4),
        "n_star_index": [0, 1, 3, 1][:k] + [1] * (k - 4), "n_star_censored": censored[:k],
        "s_star": [100.0, 100.0, None, 100.0][:k] + [100.0] * (k - 4), "s_star_index": [1, 1, 2, 1][:k] + [1] * (k - 4),
        "s_star_censored": ["none", "none", "right", "none"][:k] + ["none"] * (k - 4),
        "abrupt_size": [None, 1.0, 0.5, 1.0][:k] + [1.0] * (k - 4), "abrupt_step": 1.0,
    })
    axes = {"size": {"points": [[m, "step100"] for m, _ in SIZES]}, "step": {"points": [["c", "step10"], ["c", "step100"]]}}
    return emergence, curves, axes


def test_scale_data_orders_each_axis_and_keeps_censoring():
    out = report.scale_data(*make_across())
    assert [p[0] for p in out[1]["curve_size"]] == [100.0, 1000.0, 10000.0]
    assert out[1]["curve_size"][0][1:] == [2.0, 0.0] and out[1]["curve_size"][1][1:] == [0.05, 1.0]
    assert out[3]["curve_step"] == [[10.0, 2.0, 0.0], [100.0, 0.05, 1.0]]  # model c only, in step order
    assert out[0]["n_star_censored"] == "left" and out[2]["n_star"] is None and out[2]["n_star_index"] == 3
    json.dumps(out)  # plain JSON: no numpy scalars left


def _page(tmp_path, cfg: ReportConfig = ReportConfig(), **kw) -> tuple[str, report.ReportData]:  # noqa: B008 (frozen)
    tokens, samples, clusters, summary, quanta = make_inputs(tmp_path, **kw)
    data = report.collect(clusters, samples, summary, tmp_path / "tokens.parquet", cfg, 4, quanta, make_across())
    theory = {"planted": True, "pass": False, "planted_alpha": 0.5, "failures": ["<b>bold</b> claim"], "routes": {}}
    qdg = {"stability": {"subsample_ari": 0.9, "subsample_draws": 5, "projection_ari": 0.95}, "above_null": 0.8,
           "above_null_z_min": 3.0, "explained_by_ngram": 0.3, "explained_by_ngram_f1_min": 0.9,
           "baselines": {"answer": {"ari": 0.1, "nmi": 0.2}, "previous": {"ari": 0.4, "nmi": 0.5}}}
    page = report.render(data, {"theory": theory, "qdg": qdg}, {}, subtitle="<i>sub</i>")
    return page, data


def test_page_has_only_its_own_markup(tmp_path):
    page, data = _page(tmp_path)
    assert page.count("<script") == 2  # the JSON data block and the page's script
    # the data block runs to its own end: everything up to the first </script> is the whole JSON
    block = page.split('<script id="quanta-data" type="application/json">')[1].split("</script>")[0]
    assert json.loads(block) == {**data.to_json(), "null_z_min": 3.0, "ngram_f1_min": 0.9}
    assert any(h in data.strings for h in HOSTILE)
    for bad in ("<img", "<b>bold", "<i>sub", "<script>window", "</script><script>window"):
        assert bad not in page
    assert "&lt;b&gt;bold&lt;/b&gt; claim" in page and "&lt;i&gt;sub&lt;/i&gt;" in page


def test_csp_allows_exactly_the_page_script(tmp_path):
    page, _ = _page(tmp_path)
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    script = page.rsplit("<script>", 1)[1].split("</script>")[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp.replace("&#x27;", "'")
    assert "unsafe-inline" not in csp and "default-src 'none'" in csp.replace("&#x27;", "'")


# ------------------------------------------------------------------------------ in Chromium


def _browser_or_fail():
    """The browser test is required (CI installs Chromium); QUANTA_SKIP_BROWSER=1 opts out."""
    if os.environ.get("QUANTA_SKIP_BROWSER") == "1":
        pytest.skip("QUANTA_SKIP_BROWSER=1")
    from pipeline.report import chromium

    try:
        chromium.chromium_path()
        import playwright  # noqa: F401
    except (QuantaError, ImportError) as e:
        pytest.fail(f"{e} (the README test command installs both; QUANTA_SKIP_BROWSER=1 skips this test)")
    return chromium


@pytest.mark.browser
def test_report_in_chromium(tmp_path):
    chromium = _browser_or_fail()
    # every sample shown, so that sample 0 (the hostile context) is among the examples
    page_html, _ = _page(tmp_path, ReportConfig(n_examples=200), n_docs=60, n_samples=200)
    path = tmp_path / "index.html"
    path.write_text(page_html, encoding="utf-8")
    artifacts = Path(os.environ.get("QUANTA_ARTIFACTS", REPO / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)

    problems, dialogs = [], []
    with chromium.browser() as b:
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)

        rows = page.locator("#clusters tbody tr")
        assert rows.count() == 4
        assert page.locator("#clusters tbody tr:not([hidden])").count() == 4
        assert page.inner_text("#count").startswith("4 of 4 clusters")
        # ranked by quality, the best cluster selected first with its examples and its label
        ids = [rows.nth(i).get_attribute("data-id") for i in range(4)]
        assert ids == ["1", "3", "0", "2"]
        assert page.locator("#clusters tbody tr.below-null").get_attribute("data-id") == "2"
        assert "below null" in rows.nth(3).inner_text()
        assert rows.nth(2).locator("td").nth(2).inner_text() == f"'{HOSTILE[1]}' → ' x'"  # a label is text
        for i in range(4):  # purity as a plain fraction with the majority quantum
            assert re.fullmatch(r"[01]\.\d\d \(q-?\d+\)", rows.nth(i).locator("td").nth(12).inner_text())
        # N* with its censoring: learned by the smallest (≤), by none (>)
        n_star = {rows.nth(i).get_attribute("data-id"): rows.nth(i).locator("td").nth(7).inner_text() for i in range(4)}
        assert n_star == {"0": "\u2264 100", "1": "1.0k", "2": "> 10k", "3": "1.0k"}
        # the selected cluster's two curves, drawn in the page
        assert page.locator("#detail svg.chart").count() == 2
        assert page.locator("#detail svg.chart polyline.loss").count() == 2
        assert page.locator("#detail svg.chart circle.loss").count() == 3 + 2
        page.click("th[data-key='n_star_index']")
        page.click("th[data-key='n_star_index']")  # ascending: the earliest emergence first
        assert [rows.nth(i).get_attribute("data-id") for i in range(4)] == ["0", "1", "3", "2"]
        page.click("th[data-key='quality']")  # back to the ranking by quality
        n_examples = page.locator("#detail .example").count()
        assert n_examples == int(rows.nth(0).locator("td").nth(1).inner_text())
        assert "label: → ' cat'" in page.inner_text("#detail")
        # hide what an n-gram explains: cluster 0 (n-gram F1 0.97)
        page.check("#hide-ngram")
        assert page.locator("#clusters tbody tr:not([hidden])").count() == 3
        assert page.locator("#clusters tbody tr[data-id='0']").is_hidden()
        page.uncheck("#hide-ngram")
        # sortable by size
        page.click("th[data-key='size']")
        sizes = [int(rows.nth(i).locator("td").nth(1).inner_text()) for i in range(4)]
        assert sizes == sorted(sizes, reverse=True)
        assert page.locator("#detail .tok.target").count() == n_examples
        assert page.locator("#detail .example .loss").count() == n_examples

        # sort by id, then search: "#2" keeps one cluster; a token only in contexts filters too
        page.click("th[data-key='id']")
        ids = [rows.nth(i).locator("td").first.inner_text() for i in range(4)]
        assert ids == ["#0", "#1", "#2", "#3"]
        page.fill("#search", "#2")
        assert page.locator("#clusters tbody tr:not([hidden])").count() == 1
        assert page.locator("#clusters tbody tr:not([hidden]) td").first.inner_text() == "#2"
        page.fill("#search", "no such text anywhere")
        assert page.locator("#clusters tbody tr:not([hidden])").count() == 0
        assert page.inner_text("#count").startswith("0 of 4")
        page.fill("#search", "onerror")  # hostile text is searchable text
        hit = page.locator("#clusters tbody tr:not([hidden])")
        assert hit.count() >= 1
        page.fill("#search", "")

        # the cluster of sample 0, whose context is the hostile strings: shown as text
        page.goto(path.as_uri() + "#cluster-0")
        page.wait_for_selector("body[data-ready='1']")
        detail = page.locator("#detail")
        target_cluster = None
        for i in range(4):
            page.locator(f"#clusters tbody tr[data-id='{i}']").click()
            if "sample 0 " in detail.inner_text():
                target_cluster = i
                break
        assert target_cluster is not None
        text = detail.inner_text()
        for h in HOSTILE:
            shown = h.replace(" ", "\u00b7")  # whitespace is made visible
            assert shown in text, h
        assert page.locator("#detail img").count() == 0
        assert page.locator("#detail script").count() == 0
        assert page.evaluate("window.__pwned") is None
        # whitespace tokens are visible glyphs, newlines are marked
        assert page.locator("#detail .tok.ws").count() > 0
        assert "\u21b5" in text and "\u2192" in text
        page.locator("#detail .example", has_text="sample 0 ").scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "report-e2e.png"))

    assert dialogs == [], dialogs
    assert problems == [], problems


@pytest.mark.browser
def test_quanta_screenshot(tmp_path, capsys):
    _browser_or_fail()
    from pipeline import cli

    page_html, _ = _page(tmp_path)
    (tmp_path / "index.html").write_text(page_html, encoding="utf-8")
    cli.main(["screenshot", "--report", str(tmp_path / "index.html"), "--out", str(tmp_path / "shot.png"),
              "--cluster", "2", "--width", "900", "--height", "600"])
    png = (tmp_path / "shot.png").read_bytes()
    assert png[:4] == b"\x89PNG" and int.from_bytes(png[16:20], "big") == 900
    assert list(tmp_path.glob(".shot.png*")) == []  # no temporary left behind
    with pytest.raises(SystemExit) as e:
        cli.main(["screenshot", "--report", str(tmp_path / "missing.html")])
    assert e.value.code == 2 and "dvc repro report" in capsys.readouterr().err


def test_skipped_analyses_are_listed_with_their_reason(tmp_path):
    tokens, samples, clusters, summary, quanta = make_inputs(tmp_path)
    data = report.collect(clusters, samples, summary, tmp_path / "tokens.parquet", ReportConfig(), 4, quanta)
    metrics = {"scaling": {"skipped": "1 model(s) (solo): <needs> 3"}, "qdg": {"k": 4}, "dynamics": {"skipped": ""},
               "cluster_curves": {"size": {"skipped": "one model"}, "step": {"rho": 1}}}
    assert report.skipped_parts(metrics) == [("cluster_curves: size", "one model"), ("scaling", "1 model(s) (solo): <needs> 3")]
    page = report.render(data, metrics, {})
    assert "Skipped in this run (2)" in page and "&lt;needs&gt; 3" in page
    assert "Skipped in this run" not in report.render(data, {"qdg": {"k": 4}}, {})


def test_unassigned_samples_are_one_more_row_in_chromium(tmp_path):
    chromium = _browser_or_fail()
    tokens, samples, clusters, summary, quanta = make_inputs(tmp_path, n_docs=60, n_samples=200)
    clusters = clusters.copy()
    assigned = clusters["sample"].to_numpy()[clusters["cluster"].to_numpy() >= 0]
    left = assigned[:7]  # the cut left these in no cluster; the fixture's other -1 were never clustered
    clusters.loc[clusters["sample"].isin(left), "cluster"] = -1
    data = report.collect(clusters, samples, summary, tmp_path / "tokens.parquet", ReportConfig(n_examples=50), 4,
                          quanta, clustered=assigned)
    assert data.n_unassigned == 7 and data.n_samples == len(assigned) - 7
    unassigned = [c for c in data.clusters if c["id"] == -1]
    assert len(unassigned) == 1 and unassigned[0]["size"] == 7 and len(unassigned[0]["examples"]) == 7
    path = tmp_path / "index.html"
    path.write_text(report.render(data, {}, {}), encoding="utf-8")
    with chromium.browser() as b:
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        assert page.locator("#clusters tbody tr").count() == len(data.clusters)
        n = len(data.clusters) - 1  # the unassigned row is no cluster
        assert page.inner_text("#count").startswith(f"{n} of {n} clusters")
        page.click("#clusters tbody tr[data-id='-1']")
        assert page.inner_text("#detail h3") == "Unassigned samples (in no cluster)"
        assert page.locator("#detail .example").count() == 7
        assert f"7 ({7 / len(assigned):.1%})" in page.inner_text("#summary")
        assert page.locator("#clusters tbody tr[data-id='-1'] td").first.inner_text() == "unassigned"
