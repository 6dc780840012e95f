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

from pipeline import config, io, planted, plots, powerlaw, stage
from pipeline.select import read_samples


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("cluster-size power laws", "clusters", "samples", "planted", "metrics", "plots")
    args = ap.parse_args(argv)

    cfg = config.load("powerlaw", args.params)
    clusters = pd.read_parquet(args.clusters)
    truth = planted.sample_quanta(args.planted, read_samples(args.samples), order=clusters["sample"])
    res = powerlaw.analyze_clusters(clusters, cfg, truth=truth)
    io.write_json(res.metrics, args.metrics)
    plots.cluster_rank_frequency(res, Path(args.plots) / "cluster_rank_frequency.png")
    print(powerlaw.summary_line(res.metrics))


if __name__ == "__main__":
    stage.run(main)
