"""Stage `powerlaw`: power laws of QDG cluster sizes (CSN's MLE and the paper's envelope).

    python -m stages.powerlaw [--params params.yaml] --clusters cache/qdg/clusters.parquet \
        --samples cache/qdg/samples.parquet --planted cache/planted \
        --metrics metrics/powerlaw.json --plots plots/powerlaw

On the planted suite it also fits the sizes of the planted quanta among the same samples
(`planted_partition`): what a perfect clustering would give.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from pipeline.core import config
from pipeline.core import files
from pipeline.planted import suite
from pipeline.report import plots
from pipeline.laws import cluster_sizes
from pipeline.core import stage
from pipeline.qdg.selection import read_samples


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("cluster-size power laws", "clusters", "samples", "planted", "metrics", "plots")
    args = ap.parse_args(argv)

    cfg = config.load("powerlaw", args.params)
    clusters = pd.read_parquet(args.clusters)
    truth = suite.sample_quanta(args.planted, read_samples(args.samples), order=clusters["sample"])
    res = cluster_sizes.analyze_clusters(clusters, cfg, truth=truth)
    files.write_json(res.metrics, args.metrics)
    plots.cluster_rank_frequency(res, Path(args.plots) / "cluster_rank_frequency.png")
    print(cluster_sizes.summary_line(res.metrics))


if __name__ == "__main__":
    stage.run(main)
