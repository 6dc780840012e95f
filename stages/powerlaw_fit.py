"""Stage `powerlaw`: power laws of QDG cluster sizes (CSN's MLE and the paper's envelope).

(Not named powerlaw.py: as the script, it would shadow the `powerlaw` package that
pipeline/powerlaw.py imports, since Python puts the script's folder first on sys.path.)

    python stages/powerlaw_fit.py [--params params.yaml] --clusters cache/qdg/clusters.parquet \
        --samples cache/qdg/samples.parquet --planted cache/planted \
        --metrics metrics/powerlaw.json --plots plots/powerlaw

On the planted suite it also fits the sizes of the planted quanta among the same samples
(`planted_partition`): what a perfect clustering would give.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from pipeline import config, io, planted, plots, powerlaw, stage
from pipeline.select import read_samples


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("cluster-size power laws", "clusters", "samples", "planted", "metrics", "plots")
    args = ap.parse_args(argv)

    cfg = config.load("powerlaw", args.params)
    clusters = pd.read_parquet(args.clusters)
    samples = read_samples(args.samples)
    quanta = planted.sample_quanta(args.planted, samples)
    truth = None
    if quanta is not None:  # in the clusters table's row order
        truth = pd.Series(quanta, index=samples["sample"].to_numpy()).reindex(clusters["sample"].to_numpy()).fillna(-1)
        truth = truth.to_numpy(np.int64)
    res = powerlaw.analyze_clusters(clusters, cfg, truth=truth)
    io.write_json(res.metrics, args.metrics)
    plots.cluster_rank_frequency(res, Path(args.plots) / "cluster_rank_frequency.png")
    m, e = res.metrics["mle"], res.metrics["envelope"]
    mle = (f"Zipf b = {m['rank_exponent']:.3f} CI {m['rank_exponent_ci']}, GOF p {m['gof_p']}"
           if m["fittable"] else f"no MLE: {m['reason']}")
    env = f"slope {e['slope']:.4f}" if "slope" in e else f"skipped: {e['skipped']}"
    line = f"powerlaw: k = {res.metrics['k']}, {res.metrics['n_clusters']} clusters; MLE {mle}; envelope {env}"
    t = res.metrics.get("planted_partition")
    if t is not None:
        line += f"; planted quanta of the samples: Zipf b = {t['rank_exponent']}" if t["fittable"] else f"; planted quanta: {t['reason']}"
    print(line)


if __name__ == "__main__":
    stage.run(main)
