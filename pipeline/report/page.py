"""The quanta report: one self-contained HTML file to browse the discovered clusters.

Researchers judge a cluster by reading its contexts. The paper's viewer was a streamlit app
that needed a server and refused to show any context containing HTML; this is a single file
that opens from disk with no network and shows every context as text.

Safety: corpus text is data. It reaches the page only as JSON inside a
``<script type="application/json">`` block, with ``<``, ``>`` and ``&`` written as JSON
escapes so that nothing in it can close the block, and the page's script puts it into the
DOM with ``textContent`` only. A Content-Security-Policy allows exactly the page's own
script and style (by hash) and ``data:`` images, so even a context that somehow became
markup could not run a handler or load anything.

What goes in (all read by :func:`collect`): the clusters of one k, the samples, the corpus
tokens (for contexts), the cluster summary (top tokens), planted labels when there are any
(purity), the metrics JSON files, and the PNG figures of the other stages, embedded as
``data:`` URIs.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import json
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from pipeline.core.config import ReportConfig
from pipeline.core.errors import QuantaError

#: The figures of the report, in order: (key, title, caption). Keys name PNG files given to
#: :func:`render` (a missing one shows a note saying which stage makes it).
FIGURES: tuple[tuple[str, str, str], ...] = (
    (
        "cluster_rank_frequency",
        "Cluster sizes: rank-frequency",
        "Sizes of one clustering against rank, the envelope over the k sweep (the paper's), the CSN "
        "maximum-likelihood power-law tail and the envelope's OLS slope. (stage powerlaw)",
    ),
    (
        "mean_loss_vs_n",
        "Mean loss against model size",
        "Mean per-token loss against non-embedding parameters N with the fit E + A·N^-α_N. (stage scaling)",
    ),
    (
        "token_examples",
        "Monogenic and polygenic tokens",
        "Example per-token loss curves against N: monogenic (one sharp drop) and polygenic (gradual). (stage scaling)",
    ),
    (
        "learning_curves",
        "Learning curves",
        "Mean loss against training step for each model, with the fits L(S) = E + A·S^-α_S. (stage scaling)",
    ),
    (
        "similarity_matrix",
        "Similarity matrix, reordered by cluster",
        "The affinity of the clustered samples, rows and columns sorted by cluster (largest first) "
        "and block-averaged; lines mark cluster boundaries. (stage report)",
    ),
    (
        "emergence_vs_frequency",
        "Emergence against frequency",
        "The step at which each planted quantum is learned against 1/p_k (theory: slope 1). (stage dynamics)",
    ),
)


@dataclasses.dataclass
class ReportData:
    """What the page's script renders: JSON-able, built by :func:`collect`."""

    k: int
    n_samples: int
    planted: bool
    strings: list[str]  # token texts used by the contexts; contexts index into this list
    clusters: list[dict]  # one per cluster: id, size, mean_loss, purity, quantum, top, examples (id -1: unassigned)
    n_unassigned: int = 0  # samples the clustering saw and left in no cluster

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------ data


def cluster_column(clusters: pd.DataFrame, k: Optional[int], main_k: int) -> tuple[str, int]:
    """The clusters table's column for k (None: the main k, column ``cluster``), and that k."""
    from pipeline.qdg.clustering import sweep_columns

    sweep = sweep_columns(clusters)
    if k is None or k == main_k:
        return "cluster", main_k
    if k not in sweep:
        raise QuantaError(f"report.k = {k} was not clustered; cluster.n_clusters has {list(sweep)}: choose one or set null")
    return sweep[k], k


#: the summary's assessment columns each cluster of the browser carries (pipeline/qdg/quality.py)
ASSESSMENT = ("quality", "stability", "projection_stability", "null_z", "coherence", "separation", "label", "label_kind", "label_precision",
              "label_recall", "label_f1", "ngram_f1")


#: each browsed cluster's emergence columns (pipeline/laws/cluster_curves.py), plus its two curves
SCALE = ("n_star", "n_star_index", "n_star_censored", "s_star", "s_star_index", "s_star_censored", "abrupt_size",
         "abrupt_step", "curve_size", "curve_step")


def scale_data(emergence: pd.DataFrame, curves: pd.DataFrame, axes: dict) -> dict[int, dict]:
    """cluster -> its SCALE entries: the emergence columns, and each axis' curve as
    [x, mean_loss, frac_learned] points (x: non-embedding parameters, or the step).

    axes: metrics/cluster_curves.json, whose ``size`` and ``step`` list each axis' (model,
    revision) points in order (absent when the axis was skipped)."""
    index = curves.set_index(["model", "revision", "cluster"]).sort_index()
    points = {axis: [tuple(p) for p in (axes.get(axis) or {}).get("points", [])] for axis in ("size", "step")}
    out: dict[int, dict] = {}
    for r in emergence.to_dict("records"):
        c = int(r["cluster"])
        entry = {key: _plain(r.get(key)) for key in SCALE if not key.startswith("curve_")}
        for axis, xcol in (("size", "n_params"), ("step", "step")):
            rows = [index.loc[(m, rev, c)] for m, rev in points[axis] if (m, rev, c) in index.index]
            entry[f"curve_{axis}"] = [[float(row[xcol]), _plain(row["mean_loss"]), _plain(row["frac_learned"])]
                                      for row in rows]
        out[c] = entry
    return out


def _plain(v: Any) -> Any:
    """A summary value as JSON: floats rounded to 4 places, missing values None."""
    if v is None or (np.isscalar(v) and pd.isna(v)):
        return None
    if isinstance(v, (float, np.floating)):
        return round(float(v), 4)
    if isinstance(v, np.integer):
        return int(v)
    return v


def collect(
    clusters: pd.DataFrame,
    samples: pd.DataFrame,
    summary: pd.DataFrame,
    tokens_path: str | Path,
    cfg: ReportConfig,
    main_k: int,
    quanta: Optional[np.ndarray] = None,
    across: Optional[tuple[pd.DataFrame, pd.DataFrame, dict]] = None,
    clustered: Optional[np.ndarray] = None,
) -> ReportData:
    """Gather the browser's data for one clustering.

    clusters: the cluster stage's table (sample, cluster, k<k>...); samples: sample, doc_id,
    pos, token_id, loss; summary: cluster_summary (k, cluster, top_tokens, top_counts, ...);
    main_k: the k of the ``cluster`` column (the first of the sweep); quanta: the planted
    quantum of each row of `samples` (-1: none), or None on a real suite.
    Examples per cluster are a seeded random choice of cfg.n_examples samples, shown with up
    to cfg.context_tokens tokens before the target. across: (cluster_emergence, cluster_curves,
    metrics/cluster_curves.json) of the main clustering; each browsed cluster of the main k then
    carries its N*, S*, abruptness and its curves over sizes and checkpoints. clustered: the
    sample ids the clustering saw (the similarity's rows); those it left at -1 are the
    unassigned, one more browsed row with id -1 (None: none are shown).
    """
    from pipeline.lm.corpus import read_token_texts, read_tokens

    col, k = cluster_column(clusters, cfg.k, main_k)
    df = clusters[["sample", col]].rename(columns={col: "c"}).merge(samples, on="sample", how="left")
    if df["doc_id"].isna().any():
        raise QuantaError("clusters and samples disagree (a sample id without a row); rerun dvc repro cluster")
    if quanta is not None:
        df = df.merge(pd.DataFrame({"sample": samples["sample"].to_numpy(), "q": np.asarray(quanta)}), on="sample")
    # -1: a bad sample, never clustered, or one the cut left unassigned (clustered=True);
    # the unassigned are browsed as one more row, id -1. Sorted by sample, so that the
    # seeded choice of examples does not depend on the order of the input rows.
    keep = df["c"] >= 0
    if clustered is not None:
        keep |= df["sample"].isin(np.asarray(clustered))
    df = df[keep].sort_values("sample", kind="stable")
    if not (df["c"] >= 0).any():
        raise QuantaError("no clustered samples to report")

    rng = np.random.default_rng(cfg.seed)
    df = df.assign(_order=rng.permutation(len(df))).sort_values(["c", "_order"])
    shown = df.groupby("c", sort=False).head(cfg.n_examples).sort_values(["c", "sample"])

    # Contexts: up to context_tokens tokens before the target, and the target (last).
    tok = read_tokens(tokens_path)
    doc_row = tok.index_of(shown["doc_id"].to_numpy(np.int64))
    pos = shown["pos"].to_numpy(np.int64)
    start = np.maximum(0, pos - cfg.context_tokens)
    lengths = pos - start + 1
    flat = np.concatenate([tok.offsets[d] + np.arange(a, p + 1) for d, a, p in zip(doc_row, start, pos)])
    index, strings = read_token_texts(tokens_path, flat)
    bounds = np.r_[0, np.cumsum(lengths)]

    top, assessed = {}, {}
    for r in summary[summary["k"] == k].to_dict("records"):
        top[int(r["cluster"])] = [[str(t), int(n)] for t, n in zip(r["top_tokens"], r["top_counts"])]
        assessed[int(r["cluster"])] = {key: _plain(r.get(key)) for key in ASSESSMENT}

    examples: dict[int, list[dict]] = {}
    has_q = quanta is not None
    for i, r in enumerate(shown.itertuples(index=False)):
        examples.setdefault(int(r.c), []).append(
            {
                "s": int(r.sample),
                "d": int(r.doc_id),
                "p": int(r.pos),
                "l": round(float(r.loss), 6),
                "q": int(r.q) if has_q else None,
                "start": int(start[i]),
                "ctx": index[bounds[i] : bounds[i + 1]].tolist(),
            }
        )

    scale = scale_data(*across) if across is not None and k == main_k else {}
    out = []
    for c, g in df.groupby("c", sort=True):
        purity = quantum = None
        if has_q:
            values, counts = np.unique(g["q"].to_numpy(), return_counts=True)
            best = int(np.argmax(counts))  # ties: the smallest quantum id
            quantum, purity = int(values[best]), round(float(counts[best] / len(g)), 4)
        out.append(
            {
                "id": int(c),
                "size": int(len(g)),
                "mean_loss": round(float(g["loss"].mean()), 6),
                "purity": purity,
                "quantum": quantum,
                "top": top.get(int(c), []),
                "examples": examples.get(int(c), []),
                **assessed.get(int(c), dict.fromkeys(ASSESSMENT)),
                **scale.get(int(c), dict.fromkeys(SCALE)),
            }
        )
    n_assigned = int((df["c"] >= 0).sum())
    return ReportData(k=k, n_samples=n_assigned, planted=has_q, strings=strings, clusters=out,
                      n_unassigned=int(len(df) - n_assigned))


# ------------------------------------------------------------------------------ HTML


def _json_for_script(obj: Any) -> str:
    """JSON that is safe inside a <script> block: no '<', '>' or '&' survives, nor U+2028/9."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _asset(name: str) -> str:
    return resources.files("pipeline.report").joinpath("assets", name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def _figure(key: str, title: str, caption: str, png: Optional[bytes]) -> str:
    e = html.escape
    if png is None:
        body = f'<p class="missing">not made in this run ({e(key)}.png)</p>'
    else:
        src = "data:image/png;base64," + base64.b64encode(png).decode()
        body = f'<img src="{src}" alt="{e(title)}">'
    return f'<figure id="fig-{e(key)}"><figcaption><b>{e(title)}</b></figcaption>{body}<figcaption>{e(caption)}</figcaption></figure>'


def _num(x: Any, d: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, (list, tuple)) and len(x) == 2:
        return f"[{_num(x[0], d)}, {_num(x[1], d)}]"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return f"{x:.{d}f}" if isinstance(x, float) else str(x)
    return str(x)


def _theory_table(theory: Optional[dict]) -> str:
    e = html.escape
    if not theory or "routes" not in theory:
        return '<p class="missing">no theory check in this run (stage theory)</p>'
    head = ("<tr><th>route</th><th>source</th><th class=num>measured</th><th class=num>95% CI</th>"
            "<th class=num>α</th><th class=num>α CI</th><th>converged</th>")
    planted = theory.get("planted")
    if planted:
        head += f"<th class=num>α − planted ({_num(theory.get('planted_alpha'))})</th><th>pass</th>"
    rows = []
    for name, r in theory["routes"].items():
        cells = [
            e(name),
            e(str(r.get("source", ""))),
            _num(r.get("measured")),
            _num(r.get("measured_ci")),
            _num(r.get("alpha")),
            _num(r.get("alpha_ci")),
            _num(r.get("converged")) + ("" if r.get("converged") else f" <small>{e(str(r.get('reason') or ''))}</small>"),
        ]
        cls = ["", "", "num", "num", "num", "num", ""]
        if planted:
            ok = r.get("pass")
            verdict = "–" if ok is None else f'<span class="{"pass" if ok else "fail"}">{"pass" if ok else "fail"}</span>'
            cells += [_num(r.get("error")), verdict + ("" if r.get("target") else " <small>(not a target)</small>")]
            cls += ["num", ""]
        rows.append("<tr>" + "".join(f'<td class="{c}">{v}</td>' for c, v in zip(cls, cells)) + "</tr>")
    verdict = ""
    if planted:
        ok = theory.get("pass")
        verdict = f'<p>Theory check on the planted suite: <span class="{"pass" if ok else "fail"}">{"pass" if ok else "fail"}</span></p>'
        fails = theory.get("failures") or []
        if fails:
            verdict += "<ul>" + "".join(f"<li>{e(str(f))}</li>" for f in fails) + "</ul>"
    return f"{verdict}<table><thead>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _cards(data: ReportData, metrics: dict[str, dict]) -> str:
    e = html.escape
    n_clusters = sum(1 for c in data.clusters if c["id"] >= 0)
    items = [(f"{data.n_samples:,}", "clustered samples"), (str(n_clusters), f"clusters (k = {data.k})")]
    if data.n_unassigned:
        share = data.n_unassigned / (data.n_samples + data.n_unassigned)
        items.append((f"{data.n_unassigned:,} ({share:.1%})", "unassigned: in no cluster (row 'unassigned')"))
    qdg = metrics.get("qdg") or {}
    stab = qdg.get("stability") or {}
    if stab.get("subsample_ari") is not None:
        items.append((_num(stab["subsample_ari"]), f"stability: ARI on {stab.get('subsample_draws')} subsamples"))
    elif "stability_ari" in qdg:
        items.append((_num(qdg["stability_ari"]), "stability (ARI between seeds)"))
    if stab.get("projection_ari") is not None:
        items.append((_num(stab["projection_ari"]), "stability: ARI across projection seeds"))
    if qdg.get("above_null") is not None:
        items.append((_num(qdg["above_null"]), f"samples in clusters above their null (z ≥ {qdg.get('above_null_z_min', 3):g})"))
    if qdg.get("explained_by_ngram") is not None:
        items.append((_num(qdg["explained_by_ngram"]), "samples in clusters an n-gram explains (held-out F1 ≥ 0.9)"))
    base = qdg.get("baselines") or {}
    for key, name in (("answer", "answer token"), ("previous", "previous token"), ("previous_answer", "(previous, answer)")):
        if isinstance(base.get(key), dict):
            items.append((_num(base[key]["ari"]), f"ARI of the clusters vs the {name} partition"))
    val = metrics.get("validate") or {}
    if val.get("planted") and "qdg" in val:
        items.append((_num(val["qdg"]["ari"]), f"ARI vs planted quanta (k = {val['qdg'].get('k', data.k)})"))
        items.append((_num(val["baseline_answer"]["ari"]), "ARI of the answer-token baseline"))
        auc = (val.get("quality") or {}).get("quality_auc")
        if auc is not None:
            items.append((_num(auc), "quality's ROC AUC, pure vs mixed clusters"))
    across = metrics.get("cluster_curves") or {}
    for axis, name in (("size", "N*"), ("step", "S*")):
        rho = ((across.get(axis) or {}).get("share_of_samples") or {}).get("rho")
        if rho is not None:
            items.append((_num(rho, 2), f"Spearman(cluster frequency, {name}); the theory: negative"))
    truth = (val.get("emergence") or {}) if val.get("planted") else {}
    for axis, name in (("size", "N*"), ("step", "S*")):
        rho = (truth.get(axis) or {}).get("spearman_vs_truth")
        if rho is not None:
            items.append((_num(rho, 2), f"Spearman(cluster {name}, its planted quantum's)"))
    # the theory's cluster-size route reads the rank MLE; CSN's tail MLE where it is absent
    fits = metrics.get("powerlaw") or {}
    for key, name in (("rank_mle", "rank MLE"), ("mle", "CSN tail MLE")):
        fit = fits.get(key) or {}
        if fit.get("rank_exponent") is not None:
            items.append((_num(fit["rank_exponent"], 2), f"cluster-size Zipf exponent ({name})"))
            break
    return '<div class="cards">' + "".join(f"<div class=card><b>{e(v)}</b><span>{e(t)}</span></div>" for v, t in items) + "</div>"


def skipped_parts(metrics: dict[str, dict]) -> list[tuple[str, str]]:
    """(what, why) of every analysis this run skipped: a metrics file's top-level ``skipped``,
    or one of its parts' (cluster_curves' axes); an empty reason means it ran."""
    out = []
    for name, m in sorted(metrics.items()):
        if not isinstance(m, dict):
            continue
        if isinstance(m.get("skipped"), str) and m["skipped"]:  # "" means it ran
            out.append((name, m["skipped"]))
        for part, v in sorted(m.items()):
            if isinstance(v, dict) and isinstance(v.get("skipped"), str) and v["skipped"]:
                out.append((f"{name}: {part}", v["skipped"]))
    return out


def _skipped_list(metrics: dict[str, dict]) -> str:
    e = html.escape
    parts = skipped_parts(metrics)
    if not parts:
        return ""
    items = "".join(f"<li><b>{e(what)}</b>: {e(why)}</li>" for what, why in parts)
    return f'<details class="skipped" open><summary>Skipped in this run ({len(parts)})</summary><ul>{items}</ul></details>'


def _page_data(data: ReportData, metrics: dict[str, dict]) -> dict:
    """The browser's JSON: the clusters, and the thresholds that mark them (metrics/qdg.json)."""
    qdg = metrics.get("qdg") or {}
    return {**data.to_json(), "null_z_min": qdg.get("above_null_z_min", 3.0),
            "ngram_f1_min": qdg.get("explained_by_ngram_f1_min", 0.9)}


def render(
    data: ReportData,
    metrics: dict[str, dict],
    figures: dict[str, Optional[bytes]],
    title: str = "quanta report",
    subtitle: str = "",
) -> str:
    """The whole page as one string. `metrics`: name -> parsed metrics JSON; `figures`:
    FIGURES key -> PNG bytes (None or absent: not made)."""
    e = html.escape
    css, js = _asset("report.css"), _asset("report.js")
    csp = f"default-src 'none'; img-src data:; style-src {_csp_hash(css)}; script-src {_csp_hash(js)}; base-uri 'none'; form-action 'none'"
    purity_head = '<th class=num data-key="purity">purity</th>' if data.planted else ""
    figs = "".join(_figure(k, t, c, figures.get(k)) for k, t, c in FIGURES)
    raw = "".join(
        f"<details><summary>metrics/{e(name)}.json</summary><pre>{e(json.dumps(m, indent=2, sort_keys=True))}</pre></details>"
        for name, m in sorted(metrics.items())
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{e(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>{e(title)}</h1>
<p>{e(subtitle)}</p>
<nav><a href="#browser">clusters</a><a href="#figures">figures</a><a href="#theory">theory check</a><a href="#metrics">metrics</a></nav>
</header>
<main>
<section id="summary">{_cards(data, metrics)}{_skipped_list(metrics)}</section>
<section id="browser">
<h2>Clusters (k = {data.k})</h2>
<div class="browser">
<div>
<input id="search" type="search" placeholder="search tokens, labels, contexts or #id" aria-label="search clusters">
<label class="filter"><input id="hide-ngram" type="checkbox"> hide clusters an n-gram explains (held-out F1 ≥ 0.9)</label>
<div id="count"></div>
<div class="list"><table id="clusters"><thead><tr>
<th class=num data-key="id">id</th><th class=num data-key="size">size</th><th data-key="label">label</th><th class=num data-key="label_f1" title="held-out F1 of the label">F1</th><th class=num data-key="quality" aria-sort="descending" title="coherence from a random group of its size (0) to identical gradients (1)">quality</th><th class=num data-key="stability" title="best-match Jaccard over subsamples">stability</th><th class=num data-key="null_z" title="coherence against random groups of its size, in standard deviations">null z</th><th class=num data-key="n_star_index" title="N*: the smallest model (non-embedding parameters) at which the cluster is learned">N*</th><th class=num data-key="s_star_index" title="S*: the first checkpoint at which the cluster is learned">S*</th><th class=num data-key="abrupt_size" title="largest drop of the members' mean loss between adjacent sizes over all its drops">abrupt</th><th>top answer tokens</th><th class=num data-key="mean_loss">mean loss</th>{purity_head}
</tr></thead><tbody></tbody></table></div>
</div>
<div id="detail" class="detail"></div>
</div>
</section>
<section id="figures"><h2>Figures</h2>{figs}</section>
<section id="theory"><h2>Theory check</h2>{_theory_table(metrics.get("theory"))}</section>
<section id="metrics"><h2>All metrics</h2>{raw}</section>
</main>
<svg id="svg-ns" width="0" height="0" aria-hidden="true"></svg>
<script id="quanta-data" type="application/json">{_json_for_script(_page_data(data, metrics))}</script>
<script>{js}</script>
</body>
</html>
"""


#: where each report figure's PNG lives under the plots directory
FIGURE_FILES = {
    "cluster_rank_frequency": "powerlaw/cluster_rank_frequency.png",
    "mean_loss_vs_n": "scaling/mean_loss_vs_n.png",
    "token_examples": "scaling/token_examples.png",
    "learning_curves": "scaling/learning_curves.png",
    "similarity_matrix": "report/similarity_matrix.png",
    "emergence_vs_frequency": "dynamics/emergence_vs_frequency.png",
}
#: the metrics files (under the metrics directory, without .json) the report shows
METRICS = ("qdg", "validate", "cluster_curves", "powerlaw", "scaling", "dynamics", "theory", "planted")


def build(clusters_path: str | Path, summary_path: str | Path, samples_path: str | Path, tokens_path: str | Path,
          similarity_dir: str | Path, planted_dir: str | Path, metrics_dir: str | Path, plots_dir: str | Path,
          cfg: ReportConfig, default_k: int, curves_path: Optional[str | Path] = None,
          emergence_path: Optional[str | Path] = None) -> tuple[str, "ReportData"]:
    """The report page from the pipeline's outputs, and its data; writes the reordered
    similarity-matrix figure to ``<plots_dir>/report/similarity_matrix.png`` on the way.

    `default_k` is the browsed k when the clusters table does not name its main k. A missing
    metrics file or figure shows as a note in the page; without cluster_curves' tables
    (`curves_path`, `emergence_path`) the clusters carry no curves.
    """
    from pipeline.core.files import read_config, read_json
    from pipeline.laws import cluster_curves
    from pipeline.planted import suite
    from pipeline.qdg import clustering
    from pipeline.qdg import similarity as sim
    from pipeline.qdg.selection import read_samples
    from pipeline.report import plots

    clusters = clustering.read_clusters(clusters_path)
    meta = read_config(clusters_path) or {}
    main_k = int(meta.get("main_k") or meta.get("n_clusters", [0])[0]) or default_k
    samples = read_samples(samples_path)
    quanta = suite.sample_quanta(planted_dir, samples)
    metrics = {n: read_json(p) for n in METRICS if (p := Path(metrics_dir) / f"{n}.json").exists()}
    across = None
    if curves_path and emergence_path and Path(curves_path).exists() and Path(emergence_path).exists():
        across = (cluster_curves.read_emergence(emergence_path), cluster_curves.read_curves(curves_path),
                  metrics.get("cluster_curves") or {})
    aff, ids, _ = sim.read(similarity_dir, mmap=True)
    data = collect(clusters, samples, clustering.read_summary(summary_path), tokens_path, cfg, main_k, quanta, across,
                   clustered=ids)

    # The similarity matrix of the clustered rows, sorted by the browsed clustering.
    col, _ = cluster_column(clusters, cfg.k, main_k)
    label_of = clusters.set_index("sample")[col]
    plots.similarity_matrix(
        aff, label_of.loc[ids].to_numpy(), cfg.similarity_side, Path(plots_dir) / FIGURE_FILES["similarity_matrix"],
        title=f"affinity, sorted by cluster (k = {data.k})",
    )

    figures = {key: (p.read_bytes() if (p := Path(plots_dir) / rel).exists() else None) for key, rel in FIGURE_FILES.items()}
    models = (metrics.get("scaling") or {}).get("models") or []
    subtitle = f"{data.n_samples:,} samples in {len(data.clusters)} clusters"
    if models:
        subtitle += " · models: " + ", ".join(map(str, models))
    return render(data, metrics, figures, title="quanta report", subtitle=subtitle), data
