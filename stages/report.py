"""Stage `report`: the self-contained HTML cluster browser and the similarity-matrix figure.

    python -m stages.report [--params params.yaml] --clusters cache/qdg/clusters.parquet \
        --summary cache/qdg/cluster_summary.parquet --samples cache/qdg/samples.parquet \
        --tokens cache/corpus/tokens.parquet --similarity cache/qdg/similarity \
        --planted cache/planted --metrics metrics --plots plots --out cache/report/index.html \
        [--curves cache/qdg/cluster_curves.parquet --emergence cache/qdg/cluster_emergence.parquet]

Figures made by other stages are read from --plots (a missing one shows a note in the
report); the reordered similarity matrix is written to <plots>/report/similarity_matrix.png.
"""

from __future__ import annotations

from typing import Optional, Sequence

from pipeline.core import config, files, stage
from pipeline.report import page as report


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("clusters -> HTML report", "clusters", "summary", "samples", "tokens", "similarity", "planted",
                      "metrics", "plots", "out")
    ap.add_argument("--curves", default=None, help="cluster_curves.parquet: each cluster's loss over sizes and steps")
    ap.add_argument("--emergence", default=None, help="cluster_emergence.parquet: each cluster's N*, S*, abruptness")
    args = ap.parse_args(argv)
    cfg = config.load("report", args.params)
    page, data = report.build(args.clusters, args.summary, args.samples, args.tokens, args.similarity, args.planted,
                              args.metrics, args.plots, cfg, default_k=config.load("cluster", args.params).n_clusters[0],
                              curves_path=args.curves, emergence_path=args.emergence)
    with files.atomic_path(args.out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    print(f"report: {len(data.clusters)} clusters, {len(page) / 1e6:.1f} MB -> {args.out}")


if __name__ == "__main__":
    stage.run(main)
