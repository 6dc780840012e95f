"""Benchmark: the HTML report (pipeline/report/page.py) at the paper's size, opened in headless Chromium.

Targets: a report for 10,000 samples in 400 clusters loads in headless Chromium
in <= 3 s and weighs <= 20 MB.

What it builds (seeded, in a temporary directory): a corpus of `--docs` documents of
`--doc-len` tokens (tokens.parquet as the corpus stage writes it: doc_id, pos, token_id and a
dictionary-encoded token_str) over a `--vocab`-string vocabulary that looks like a real
tokenizer's: words with and without a leading space, punctuation, whitespace runs and
newlines, HTML (`<div>`, `</script>`, `&amp;`...), code, non-ASCII and escaped partial bytes
(`\\xe2`), with Zipf token frequencies. `--n` samples, one per document by default, each at a
position with a full `--context`-token context (the worst case for the page's size), are
dealt into `--k` clusters with Zipf sizes (p ∝ rank^-`--zipf`, every cluster at least one
sample); each cluster prefers a few answer tokens, as real clusters do. The cluster summary
is `pipeline.qdg.clustering.summarise`'s; the figures are real matplotlib PNGs (the similarity
matrix by `pipeline.report.plots.similarity_matrix` on a block affinity, five line plots), and the
metrics are the repository's metrics/*.json where present.

What it measures:
- Python: `report.collect` and `report.render` (wall time), the page's size and what it is
  made of (data JSON, embedded figures, the rest);
- Chromium (playwright, `--repeats` times, each in a fresh browser context and page): load
  = wall time from `page.goto("file://...")` until `body[data-ready='1']` (the page's script
  sets it once the cluster table and the first cluster are rendered), and the page's own
  `performance.now()` at that moment (taken by a MutationObserver added before the page
  loads); console errors and uncaught exceptions during load; the JS heap and DOM size;
  a search (fill `#search`, wait until the count line changes; the first search of a page
  builds every cluster's search text, so it is timed cold, then a second query is timed with
  the texts built; the default second query matches every cluster, so it shows all rows); a click on the
  second row (the second-largest cluster), until its detail is shown.

Timings are reported as median and max over the repeats; the load target is judged on the max.
The two load numbers differ: the page's script sets data-ready before Chromium's first style
and layout of the table, and playwright sees the attribute only once the main thread is
free again, so the wall time includes that first layout (it is close to DOMContentLoaded)
and `performance.now()` at ready does not. The wall time is the one judged.
The figures are about twice the bytes of the committed plots/ (noisier), which errs on the
heavy side.

    python bench/bench_report.py --json /tmp/bench_report.json           # the target size (~1 min)
    python bench/bench_report.py --n 300 --k 12 --repeats 1 --json out.json   # smoke (tests)
"""

from __future__ import annotations

import argparse
import io as _io
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere in the repo

from pipeline.core.config import ClusterConfig, ReportConfig  # noqa: E402
from pipeline.report import chromium  # noqa: E402
from pipeline.report import page as report  # noqa: E402

TARGET_LOAD_S = 3.0
TARGET_SIZE_MB = 20.0  # 10^6 bytes
CHROMIUM_ARGS = list(chromium.CHROMIUM_ARGS)  # the flags of the tests and `quanta screenshot`
METRICS = report.METRICS

# ----------------------------------------------------------------------------- synthetic inputs

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no will more what out up who about "
    "model loss token layer gradient cluster quanta scaling law data training step learning rate function value "
    "return import class self print list string number time year people way day man thing woman life child world "
    "school state family student group country problem hand part place case week company system program question "
    "work government night point home water room mother area money story fact month lot right study book eye job "
    "word business issue side kind head house service friend father power hour game line end member law car city "
    "community name president team minute idea kid body information back parent face others level office door "
    "health person art war history party result change morning reason research girl guy moment air teacher force"
).split()
_PUNCT = [".", ",", ":", ";", "!", "?", "(", ")", '"', "'", "-", " -", "...", " (", ").", "),", "'s", " \"", ".\"",
          " [", "]", " {", "}", " =", " ==", " +", " *", "/", " //", " #", "_", "->", " |", "%", " $"]
_SPACE = ["\n", "\n\n", " ", "  ", "   ", "    ", "        ", "\t", "\t\t", " \n", "\r\n", ".\n", ",\n", ":\n",
          "\n    ", "\n\t"]
_HTML = ["<", ">", "</", "/>", "<div>", "</div>", "<div", " class", '="', '">', "<p>", "</p>", "<span", "</span>",
         "<script>", "</script>", "<a", ' href="', "</a>", "<br/>", "<br>", "&amp;", "&lt;", "&gt;", "&nbsp;",
         "<!--", "-->", "<li>", "</li>", "<ul>", "</ul>", "<td>", "</td>", "<tr>", "</tr>", "<img", ' src="',
         "<style>", "</style>", "<h1>", "</h1>", "<b>", "</b>", ' onclick="', "alert(", "javascript:", "<?php",
         "?>", "<html>", "</body>", "&#39;", "&quot;"]
_CODE = ["def", " def", "return", " return", "import", " import", " from", " np", ".", "()", "(self", " self",
         "    return", " if", " else", ":", " for", " in", " range", "(i", "])", " None", " True", " False",
         " print", "print(", "#include", " int", " void", " const", " let", " var", " function", "};", "{\n",
         "}\n", "\\n", "\\t", "\\", "`", "``", "```", " lambda", "__init__", " np.", "array", "df", " pd"]
_UNICODE = ["é", " é", "ü", " naïve", "—", " —", "–", "“", "”", "‘", "’", "…", "中", "文", "日本", "语", " Привет",
            "мир", "αβ", " λ", "→", "≤", "≥", "×", "°", "€", "£", "🙂", "👍", "\\xe2", "\\x80", "\\x9c", "\\xf0",
            "\u00a0", "\u200b", "ß", "ø", "å", "ñ", " São", "Zürich"]


def vocabulary(size: int, rng: np.random.Generator) -> list[str]:
    """`size` distinct token texts, most frequent first (frequency rank = index)."""
    head = [" " + w for w in _WORDS] + _PUNCT + _SPACE
    mid = [w for w in _WORDS] + [" " + w.capitalize() for w in _WORDS] + _HTML + _CODE + _UNICODE
    head = list(dict.fromkeys(head))
    mid = [t for t in dict.fromkeys(mid) if t not in set(head)]
    order_h, order_m = rng.permutation(len(head)), rng.permutation(len(mid))
    texts = [head[i] for i in order_h[:40]] + sorted(
        [head[i] for i in order_h[40:]] + [mid[i] for i in order_m], key=lambda _: rng.random()
    )
    seen = set(texts)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    while len(texts) < size:  # subword pieces: "ing", " prot", "ation"...
        n = int(rng.integers(2, 9))
        piece = ("" if rng.random() < 0.45 else " ") + "".join(rng.choice(letters, n))
        if rng.random() < 0.1:
            piece = piece.title()
        if piece not in seen:
            seen.add(piece)
            texts.append(piece)
    return texts[:size]


def synthetic(args, tmp: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, Path, dict]:
    """(clusters, samples, summary, tokens_path, facts) as the cluster and select stages write them."""
    from pipeline.qdg import clustering

    rng = np.random.default_rng(args.seed)
    V = args.vocab
    texts = vocabulary(V, rng)
    p_tok = 1.0 / (np.arange(V) + 3.0) ** 1.05
    p_tok /= p_tok.sum()

    # documents: Zipf tokens, doc_len each
    n_docs = args.docs or args.n
    if n_docs < 1:
        raise SystemExit("--docs must be >= 1")
    L = args.doc_len
    tok = rng.choice(V, size=(n_docs, L), p=p_tok).astype(np.int32)

    # samples: distinct (doc, pos) with a full context where the document allows it
    lo = min(args.context, L - 1)
    slots = L - lo
    if args.n > n_docs * slots:
        raise SystemExit(f"--n {args.n} samples do not fit in {n_docs} documents x {slots} positions")
    pick = rng.choice(n_docs * slots, size=args.n, replace=False)
    doc, pos = pick // slots, lo + pick % slots
    order = np.lexsort((pos, doc))
    doc, pos = doc[order], pos[order]

    # clusters: Zipf sizes, each >= 1 sample, each preferring a few answer tokens
    k = args.k
    if k > args.n:
        raise SystemExit(f"--k {k} > --n {args.n}")
    p_c = np.arange(1, k + 1, dtype=np.float64) ** -args.zipf
    labels = np.r_[np.arange(k), rng.choice(k, size=args.n - k, p=p_c / p_c.sum())]
    labels = rng.permutation(labels)
    prefer = rng.choice(V, size=(k, 3), p=p_tok)
    own = rng.random(args.n) < 0.7
    answer = np.where(own, prefer[labels, rng.integers(0, 3, args.n)], rng.choice(V, size=args.n, p=p_tok))
    tok[doc, pos] = answer  # the target token is the answer

    tokens_path = tmp / "tokens.parquet"
    dict_texts = pa.array(texts, pa.string())
    table = pa.table(
        {
            "doc_id": pa.array(np.repeat(np.arange(n_docs, dtype=np.int64), L)),
            "pos": pa.array(np.tile(np.arange(L, dtype=np.int32), n_docs)),
            "token_id": pa.array(tok.ravel()),
            "token_str": pa.DictionaryArray.from_arrays(pa.array(tok.ravel(), pa.int32()), dict_texts),
        }
    )
    pq.write_table(table, tokens_path)

    loss = rng.gamma(2.0, 1.5, size=args.n).astype(np.float32)
    samples = pd.DataFrame(
        {"sample": np.arange(args.n, dtype=np.int64), "doc_id": doc.astype(np.int64), "pos": pos.astype(np.int32),
         "token_id": answer.astype(np.int32), "loss": loss}
    )
    clusters = pd.DataFrame({"sample": samples["sample"], "cluster": labels.astype(np.int32),
                             f"k{k}": labels.astype(np.int32)})
    summary = clustering.summarise(clusters, samples, dict(enumerate(texts)), ClusterConfig(n_clusters=(k,))).to_pandas()
    sizes = np.bincount(labels, minlength=k)
    facts = {"n_docs": n_docs, "corpus_tokens": n_docs * L, "vocab": V, "largest_cluster": int(sizes.max()),
             "smallest_cluster": int(sizes.min()), "clusters_under_n_examples": int((sizes < args.n_examples).sum())}
    return clusters, samples, summary, tokens_path, facts


def figures(labels: np.ndarray, tmp: Path, seed: int) -> dict[str, bytes]:
    """Real PNGs for every report figure: the similarity matrix as the stage draws it, line plots for the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.report import plots

    rng = np.random.default_rng(seed)
    m = min(2000, len(labels))
    lab = labels[rng.choice(len(labels), size=m, replace=False)]
    aff = (0.5 + 0.3 * (lab[:, None] == lab[None, :]) + 0.05 * rng.standard_normal((m, m))).astype(np.float32)
    aff = (aff + aff.T) / 2
    out = {"similarity_matrix": plots.similarity_matrix(aff, lab, 400, tmp / "similarity_matrix.png",
                                                        title="affinity, sorted by cluster").read_bytes()}
    for key, _, _ in report.FIGURES:
        if key in out:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        x = np.logspace(5, 9, 40)
        for j in range(6):
            y = 2 + 3 * (x / 1e5) ** -(0.1 + 0.03 * j) + 0.05 * rng.standard_normal(40)
            ax.plot(x, y, "o-", ms=3, lw=1, label=f"series {j}")
        ax.set_xscale("log")
        ax.set_title(key)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = _io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        out[key] = buf.getvalue()
    return out


def read_metrics(folder: Path) -> dict[str, dict]:
    out = {}
    for name in METRICS:
        p = folder / f"{name}.json"
        if p.exists():
            out[name] = json.loads(p.read_text())
    return out


def composition(page: str) -> dict:
    """Bytes of the page (UTF-8) by part: the data JSON block, the embedded figures, the rest."""
    total = len(page.encode("utf-8"))
    m = re.search(r'<script id="quanta-data" type="application/json">(.*?)</script>', page, re.S)
    data = len(m.group(1).encode("utf-8")) if m else 0
    figs = sum(len(s) for s in re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]*"', page))
    return {"total_bytes": total, "data_json_bytes": data, "figures_bytes": figs, "other_bytes": total - data - figs}


# ----------------------------------------------------------------------------- browser

# Added before the page's own script: records performance.now() when body gets data-ready.
READY_HOOK = """
(() => {
  new MutationObserver((_, obs) => {
    if (document.body && document.body.dataset.ready === "1" && window.__quantaReadyAt === undefined) {
      window.__quantaReadyAt = performance.now();
      obs.disconnect();
    }
  }).observe(document, {subtree: true, attributes: true, attributeFilter: ["data-ready"]});
})();
"""

WAIT_COUNT_CHANGED = "old => document.getElementById('count').textContent !== old"
WAIT_DETAIL = "id => { const h = document.querySelector('#detail h3'); return !!h && h.textContent === 'Cluster #' + id; }"
# in-page: click a row, then force style and layout, as the next frame would
CLICK_IN_PAGE = """
id => {
  const row = document.querySelector(`#clusters tbody tr[data-id="${id}"]`);
  const t0 = performance.now();
  row.click();
  document.body.offsetHeight;
  return performance.now() - t0;
}
"""


def one_load(browser, url: str, queries: tuple[str, str], timeout_ms: int) -> dict:
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type in ("error", "assert") else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.add_init_script(READY_HOOK)
    cdp = ctx.new_cdp_session(page)
    cdp.send("Performance.enable")  # Chromium's own counters: script, layout and style time, JS heap
    res: dict = {}
    try:
        t0 = time.perf_counter()
        page.goto(url, wait_until="commit", timeout=timeout_ms)
        page.wait_for_selector("body[data-ready='1']", state="attached", timeout=timeout_ms)
        res["load_s"] = time.perf_counter() - t0
        res["ready"] = True
    except Exception as e:  # noqa: BLE001 — report, don't hide: the JSON says the page never got ready
        res.update(ready=False, error=f"{type(e).__name__}: {e}".splitlines()[0], console_errors=errors)
        ctx.close()
        return res
    res["ready_performance_now_ms"] = page.evaluate("window.__quantaReadyAt === undefined ? null : window.__quantaReadyAt")
    res["load_console_errors"] = list(errors)
    page.wait_for_load_state("load", timeout=timeout_ms)
    res.update(page.evaluate(
        """() => {
          const n = performance.getEntriesByType('navigation')[0] || {};
          return {
            dom_content_loaded_ms: n.domContentLoadedEventEnd ?? null,
            load_event_ms: n.loadEventEnd ?? null,
            first_contentful_paint_ms: (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime ?? null,
            dom_nodes: document.getElementsByTagName('*').length,
            rows: document.querySelectorAll('#clusters tbody tr').length,
            detail_examples: document.querySelectorAll('#detail .example').length,
            count_text: document.getElementById('count').textContent,
          };
        }"""
    ))

    m = {x["name"]: x["value"] for x in cdp.send("Performance.getMetrics")["metrics"]}
    res["js_heap_mb"] = m.get("JSHeapUsedSize", 0) / 1e6
    for key, name in (("script_ms", "ScriptDuration"), ("layout_ms", "LayoutDuration"),
                      ("style_ms", "RecalcStyleDuration"), ("task_ms", "TaskDuration")):
        res[key] = m[name] * 1000 if name in m else None

    # search: cold (builds every cluster's search text), then warm
    for name, q in zip(("search_cold", "search_warm"), queries):
        old = page.text_content("#count")
        t0 = time.perf_counter()
        page.fill("#search", q)
        page.wait_for_function(WAIT_COUNT_CHANGED, arg=old, timeout=timeout_ms)
        res[f"{name}_s"] = time.perf_counter() - t0
        res[f"{name}_count"] = page.text_content("#count")
    old = page.text_content("#count")
    page.fill("#search", "")
    page.wait_for_function(WAIT_COUNT_CHANGED, arg=old, timeout=timeout_ms)

    # click: the second row (the second-largest cluster; the largest is shown on load)
    ids = page.eval_on_selector_all("#clusters tbody tr", "rows => rows.slice(0, 3).map(r => Number(r.dataset.id))")
    if len(ids) >= 2:
        t0 = time.perf_counter()
        page.click(f"#clusters tbody tr[data-id='{ids[1]}']", timeout=timeout_ms)
        page.wait_for_function(WAIT_DETAIL, arg=ids[1], timeout=timeout_ms)
        res["click_s"] = time.perf_counter() - t0
        res["click_examples"] = page.eval_on_selector_all("#detail .example", "e => e.length")
    if len(ids) >= 3:
        res["click_in_page_ms"] = page.evaluate(CLICK_IN_PAGE, ids[2])
    res["console_errors"] = list(errors)
    ctx.close()
    return res


def browse(html_path: Path, args) -> dict:
    from playwright.sync_api import sync_playwright

    url = html_path.resolve().as_uri()
    runs = []
    with sync_playwright() as p:
        t0 = time.perf_counter()
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        launch_s = time.perf_counter() - t0
        version = browser.version
        for i in range(args.repeats):
            runs.append(one_load(browser, url, (args.query, args.query2), args.timeout * 1000))
            r = runs[-1]
            print(f"  load {i + 1}/{args.repeats}: " + (
                f"{r['load_s']:.2f} s (in page {r['ready_performance_now_ms']:.0f} ms), search cold "
                f"{r.get('search_cold_s', float('nan')):.3f} s, click {r.get('click_s', float('nan')):.3f} s"
                if r["ready"] else f"NOT READY: {r['error']}"), flush=True)
        browser.close()

    ok = [r for r in runs if r["ready"]]

    def stat(key: str) -> dict:
        v = [r[key] for r in ok if r.get(key) is not None]
        return {"median": round(statistics.median(v), 4), "max": round(max(v), 4), "all": [round(x, 4) for x in v]} if v else None

    errors = sorted({e for r in runs for e in r.get("console_errors", [])})
    return {
        "chromium": version,
        "executable": args.chromium,
        "launch_s": round(launch_s, 3),
        "repeats": args.repeats,
        "ready": bool(runs) and len(ok) == len(runs),
        "not_ready_errors": [r["error"] for r in runs if not r["ready"]],
        "load_s": stat("load_s"),
        "ready_performance_now_ms": stat("ready_performance_now_ms"),
        "dom_content_loaded_ms": stat("dom_content_loaded_ms"),
        "load_event_ms": stat("load_event_ms"),
        "first_contentful_paint_ms": stat("first_contentful_paint_ms"),
        # Chromium's counters up to the load event: time in script, layout, style, all tasks
        "script_ms": stat("script_ms"),
        "layout_ms": stat("layout_ms"),
        "style_ms": stat("style_ms"),
        "task_ms": stat("task_ms"),
        "search_cold_s": stat("search_cold_s"),
        "search_warm_s": stat("search_warm_s"),
        "click_s": stat("click_s"),
        "click_in_page_ms": stat("click_in_page_ms"),
        "js_heap_mb": stat("js_heap_mb"),
        "dom_nodes": ok[0]["dom_nodes"] if ok else None,
        "rows": ok[0]["rows"] if ok else None,
        "detail_examples": ok[0]["detail_examples"] if ok else None,
        "queries": {args.query: ok[0].get("search_cold_count") if ok else None,
                    args.query2: ok[0].get("search_warm_count") if ok else None},
        "console_errors": errors,
        "load_console_errors": sorted({e for r in runs for e in r.get("load_console_errors", [])}),
    }


# ----------------------------------------------------------------------------- main


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args) -> dict:
    res: dict = {
        "n": args.n, "k": args.k, "doc_len": args.doc_len, "context_tokens": args.context,
        "n_examples": args.n_examples, "zipf": args.zipf, "seed": args.seed,
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
    }
    with tempfile.TemporaryDirectory(prefix="bench_report_") as tmpdir:
        tmp = Path(tmpdir)
        t0 = time.perf_counter()
        clusters, samples, summary, tokens_path, facts = synthetic(args, tmp)
        res["synthetic_s"] = round(time.perf_counter() - t0, 3)
        res["inputs"] = facts
        t0 = time.perf_counter()
        figs = figures(clusters["cluster"].to_numpy(), tmp, args.seed)
        res["figures_s"] = round(time.perf_counter() - t0, 3)
        metrics = read_metrics(Path(args.metrics))
        res["metrics_files"] = sorted(metrics)

        cfg = ReportConfig(n_examples=args.n_examples, context_tokens=args.context, seed=args.seed)
        t0 = time.perf_counter()
        import pipeline.lm.losses  # noqa: F401 — collect imports it (and torch): timed apart from collect

        res["import_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        data = report.collect(clusters, samples, summary, tokens_path, cfg, main_k=args.k, quanta=None)
        res["collect_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        page = report.render(data, metrics, figs, title="quanta report (bench)",
                             subtitle=f"{data.n_samples:,} samples in {len(data.clusters)} clusters (synthetic)")
        res["render_s"] = round(time.perf_counter() - t0, 3)
        res["python_s"] = round(res["collect_s"] + res["render_s"], 3)
        html_path = Path(args.html) if args.html else tmp / "index.html"
        html_path.parent.mkdir(parents=True, exist_ok=True)
        html_path.write_text(page, encoding="utf-8")
        ex = [e for c in data.clusters for e in c["examples"]]
        res["page"] = {
            **composition(page),
            "size_mb": round(html_path.stat().st_size / 1e6, 3),
            "clusters": len(data.clusters),
            "examples": len(ex),
            "context_tokens_total": sum(len(e["ctx"]) for e in ex),
            "distinct_strings": len(data.strings),
            "html_path": str(html_path) if args.html else None,
        }
        res["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(f"python: collect {res['collect_s']} s, render {res['render_s']} s, page {res['page']['size_mb']} MB "
              f"({res['page']['examples']} examples, {res['page']['context_tokens_total']:,} context tokens)", flush=True)

        if args.no_browser:
            res["browser"] = None
        else:
            res["browser"] = browse(html_path, args)

    b = res["browser"]
    load_max = b["load_s"]["max"] if b and b["load_s"] else None
    res["targets"] = {
        "load_s_max": TARGET_LOAD_S,
        "size_mb_max": TARGET_SIZE_MB,
        "load_met": None if load_max is None else bool(b["ready"] and load_max <= TARGET_LOAD_S),
        "size_met": res["page"]["size_mb"] <= TARGET_SIZE_MB,
        "no_console_errors": None if b is None else not b["console_errors"],
    }
    return res


def _fmt(s: dict | None, scale: float = 1.0, unit: str = "s", d: int = 2) -> str:
    if not s:
        return "–"
    return f"{s['median'] * scale:.{d}f} / {s['max'] * scale:.{d}f} {unit}"


def table(res: dict) -> str:
    b, pg = res["browser"], res["page"]
    rows = [
        ("N samples / k clusters", f"{res['n']:,} / {res['k']}"),
        ("examples shown / context tokens", f"{pg['examples']:,} / {pg['context_tokens_total']:,}"),
        ("collect + render (Python)", f"{res['collect_s']:.2f} + {res['render_s']:.2f} = {res['python_s']:.2f} s"),
        ("page size", f"{pg['size_mb']:.2f} MB (data JSON {pg['data_json_bytes'] / 1e6:.2f}, figures "
                      f"{pg['figures_bytes'] / 1e6:.2f}, rest {pg['other_bytes'] / 1e6:.2f}) — target ≤ {TARGET_SIZE_MB:g} MB"),
    ]
    if b:
        rows += [
            ("Chromium", f"{b['chromium']} (launch {b['launch_s']:.2f} s, not counted)"),
            ("load: goto → body[data-ready] (median / max)", _fmt(b["load_s"]) + f" — target ≤ {TARGET_LOAD_S:g} s"),
            ("page's performance.now() at ready", _fmt(b["ready_performance_now_ms"], unit="ms", d=0)),
            ("DOMContentLoaded; load event; first contentful paint",
             f"{_fmt(b['dom_content_loaded_ms'], unit='ms', d=0)}; {_fmt(b['load_event_ms'], unit='ms', d=0)}; "
             f"{_fmt(b['first_contentful_paint_ms'], unit='ms', d=0)}"),
            ("Chromium busy until load: script; layout; style",
             f"{_fmt(b['script_ms'], unit='ms', d=0)}; {_fmt(b['layout_ms'], unit='ms', d=0)}; "
             f"{_fmt(b['style_ms'], unit='ms', d=0)}"),
            ("search, first (cold) — fill → count changed", _fmt(b["search_cold_s"], 1000, "ms", 0)),
            ("search, second query (texts already built)", _fmt(b["search_warm_s"], 1000, "ms", 0)),
            ("click a row → detail shown", _fmt(b["click_s"], 1000, "ms", 0)),
            ("click, in page (handler + layout)", _fmt(b["click_in_page_ms"], unit="ms", d=0)),
            ("JS heap after load", _fmt(b["js_heap_mb"], unit="MB", d=1)),
            ("DOM elements / table rows", f"{b['dom_nodes']} / {b['rows']}"),
            ("console errors", str(len(b["console_errors"]))
             + ("" if not b["console_errors"] else ": " + "; ".join(b["console_errors"][:3]))),
        ]
    t = res["targets"]
    rows.append(("targets", f"load {'met' if t['load_met'] else 'MISSED' if t['load_met'] is False else 'not measured'}, "
                            f"size {'met' if t['size_met'] else 'MISSED'}"))
    w = max(len(a) for a, _ in rows)
    return "\n".join(["| what | result |", "| --- | --- |"] + [f"| {a.ljust(w)} | {v} |" for a, v in rows])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="samples")
    ap.add_argument("--k", type=int, default=400, help="clusters")
    ap.add_argument("--zipf", type=float, default=1.0, help="cluster sizes p ∝ rank^-zipf")
    ap.add_argument("--docs", type=int, default=0, help="documents in the corpus (0: one per sample)")
    ap.add_argument("--doc-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--context", type=int, default=100, help="report.context_tokens")
    ap.add_argument("--n-examples", type=int, default=10, help="report.n_examples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--metrics", default=str(ROOT / "metrics"), help="folder of metrics JSON to embed (missing: none)")
    ap.add_argument("--repeats", type=int, default=5, help="page loads, each in a fresh browser context")
    ap.add_argument("--query", default="<div>", help="first (cold) search")
    ap.add_argument("--query2", default=" the", help="second (warm) search")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--timeout", type=int, default=120, help="seconds to wait for the page at most")
    ap.add_argument("--no-browser", action="store_true", help="Python side only")
    ap.add_argument("--html", default=None, help="also keep the page at this path")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if not args.no_browser and not Path(args.chromium).exists():
        ap.error(f"no Chromium at {args.chromium} (give --chromium PATH, or --no-browser)")

    res = run(args)
    try:
        res["machine"]["chromium_version"] = subprocess.run(
            [args.chromium, "--version"], capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        res["machine"]["chromium_version"] = None
    print()
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    b = res["browser"]
    if b is not None and not b["ready"]:
        sys.exit("the page never reached body[data-ready='1']: " + "; ".join(b["not_ready_errors"][:3]))


if __name__ == "__main__":
    main()
