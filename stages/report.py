"""Stage `report`: the self-contained HTML cluster browser and the similarity-matrix figure.

    python stages/report.py [--params params.yaml] --clusters cache/qdg/clusters.parquet \
        --summary cache/qdg/cluster_summary.parquet --samples cache/qdg/samples.parquet \
        --tokens cache/corpus/tokens.parquet --similarity cache/qdg/similarity \
        --planted cache/planted --metrics metrics --plots plots --out cache/report/index.html

Figures made by other stages are read from --plots (a missing one shows a note in the
report); the reordered similarity matrix is written to <plots>/report/similarity_matrix.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from pipeline import config, io, planted, plots, report, stage
from pipeline import similarity as sim
from pipeline.select import read_samples

#: where each report figure's PNG lives under --plots
FIGURE_FILES = {
    "cluster_rank_frequency": "powerlaw/cluster_rank_frequency.png",
    "mean_loss_vs_n": "scaling/mean_loss_vs_n.png",
    "token_examples": "scaling/token_examples.png",
    "learning_curves": "scaling/learning_curves.png",
    "similarity_matrix": "report/similarity_matrix.png",
    "emergence_vs_frequency": "dynamics/emergence_vs_frequency.png",
}
METRICS = ("qdg", "validate", "powerlaw", "scaling", "dynamics", "theory", "planted")


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("clusters -> HTML report", "clusters", "summary", "samples", "tokens", "similarity", "planted", "metrics", "plots", "out")
    args = ap.parse_args(argv)
    cfg = config.load("report", args.params)

    clusters = pd.read_parquet(args.clusters)
    meta = io.read_config(args.clusters) or {}
    main_k = int(meta.get("main_k") or meta.get("n_clusters", [0])[0]) or None
    if main_k is None:
        main_k = config.load("cluster", args.params).n_clusters[0]
    samples = read_samples(args.samples)
    quanta = planted.sample_quanta(args.planted, samples)
    data = report.collect(clusters, samples, pd.read_parquet(args.summary), args.tokens, cfg, main_k, quanta)

    # The similarity matrix of the clustered rows, sorted by the browsed clustering.
    aff, ids, _ = sim.read(args.similarity, mmap=True)
    col, _ = report.cluster_column(clusters, cfg.k, main_k)
    label_of = clusters.set_index("sample")[col]
    plots.similarity_matrix(
        aff, label_of.loc[ids].to_numpy(), cfg.similarity_side, Path(args.plots) / FIGURE_FILES["similarity_matrix"],
        title=f"affinity, sorted by cluster (k = {data.k})",
    )

    metrics = {}
    for name in METRICS:
        p = Path(args.metrics) / f"{name}.json"
        if p.exists():
            metrics[name] = io.read_json(p)
    figures = {}
    for key, rel in FIGURE_FILES.items():
        p = Path(args.plots) / rel
        figures[key] = p.read_bytes() if p.exists() else None
    models = (metrics.get("scaling") or {}).get("models") or []
    subtitle = f"{data.n_samples:,} samples in {len(data.clusters)} clusters"
    if models:
        subtitle += " · models: " + ", ".join(map(str, models))
    page = report.render(data, metrics, figures, title="quanta report", subtitle=subtitle)
    with io.atomic_path(args.out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    print(f"report: {len(data.clusters)} clusters, {len(page) / 1e6:.1f} MB -> {args.out}")


if __name__ == "__main__":
    stage.run(main)
