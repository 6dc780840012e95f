"""Stage `powerlaw`: the Zipf exponent of QDG cluster sizes by the rank MLE, with CSN's tail
MLE and the paper's envelope slope as the reported alternatives.

    python -m stages.powerlaw [--params params.yaml] --clusters cache/qdg/clusters.parquet \
        --samples cache/qdg/samples.parquet --planted cache/planted \
        --metrics metrics/powerlaw.json --plots plots/powerlaw

The rank MLE (a finite Zipf law fitted over the ranks of all clusters) is the exponent the
theory stage reads by default (`theory.zipf_from: rank_mle`). On the planted suite the stage
also fits the sizes of the planted quanta among the same samples (`planted_partition`): what
a perfect clustering would give. Next to each estimate, `calibration` gives the bias that
estimator showed on planted runs at the calibrated (N, k or cut, method) nearest to this run's
(pipeline/laws/size_calibration.py, docs/cluster-size-calibration.md), and the α less it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from pipeline.core import config, files, stage
from pipeline.laws import cluster_sizes, size_calibration
from pipeline.planted import suite
from pipeline.qdg import clustering
from pipeline.qdg.selection import read_samples
from pipeline.report import plots


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("cluster-size power laws", "clusters", "samples", "planted", "metrics", "plots")
    args = ap.parse_args(argv)

    cfg = config.load("powerlaw", args.params)
    clusters = clustering.read_clusters(args.clusters)
    truth = suite.sample_quanta(args.planted, read_samples(args.samples), order=clusters["sample"])
    res = cluster_sizes.analyze_clusters(clusters, cfg, truth=truth)
    # N is every sample the cluster stage was given (bad and unassigned ones included), as in the calibration
    res.metrics["calibration"] = size_calibration.calibration_metrics(
        res.metrics, files.read_config(args.clusters), n_samples=len(clusters), k_given=cfg.k is not None)
    files.write_json(res.metrics, args.metrics)
    plots.cluster_rank_frequency(res, Path(args.plots) / "cluster_rank_frequency.png")
    print(cluster_sizes.summary_line(res.metrics))
    print(size_calibration.summary_line(res.metrics["calibration"]))


if __name__ == "__main__":
    stage.run(main)
