"""Stage `validate`: QDG clusters against the planted quanta, when the suite is planted.

    python -m stages.validate [--params params.yaml] --planted cache/planted \
        --samples cache/qdg/samples.parquet --similarity cache/qdg/similarity \
        --clusters cache/qdg/clusters.parquet --summary cache/qdg/cluster_summary.parquet \
        --tokens cache/corpus/tokens.parquet --emergence cache/qdg/cluster_emergence.parquet \
        --planted-metrics metrics/planted.json --out metrics/validate.json

Without planted ground truth (a real suite) it writes {"planted": false}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from pipeline.core import config, files, stage
from pipeline.laws import cluster_curves
from pipeline.lm import corpus
from pipeline.planted import suite
from pipeline.qdg import clustering, quality
from pipeline.qdg import similarity as sim
from pipeline.qdg.selection import read_samples


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("clusters vs planted quanta", "planted", "samples", "similarity", "clusters", "tokens", "out")
    ap.add_argument("--summary", required=True, help="the cluster stage's summary (quality and labels)")
    ap.add_argument("--emergence", default=None, help="cluster_emergence.parquet: each cluster's N* and S*")
    ap.add_argument("--planted-metrics", default=None, help="metrics/planted.json: each quantum's true emergence")
    args = ap.parse_args(argv)

    samples = read_samples(args.samples)
    quanta = suite.sample_quanta(args.planted, samples)
    if quanta is None:
        files.write_json({"planted": False}, args.out)
        print("validate: no planted ground truth (a real suite); wrote planted: false")
        return
    cfg = config.load("cluster", args.params)
    aff, ids, _ = sim.read(args.similarity, mmap=False)
    clusters = clustering.read_clusters(args.clusters)
    out = clustering.validate_planted(aff, ids, samples, quanta, corpus.read_tokens(args.tokens), clusters, cfg)
    if "qdg" in out:
        id_of = {text: t for t, text in corpus.read_token_strings(args.tokens).items()}
        cue_ids = [[id_of.get(w, -1) for w in words] for words in suite.read_cues(args.planted)]
        sweep = {k: clusters[col].to_numpy()[ids] for k, col in clustering.sweep_columns(clusters).items()}
        scored = quality.planted_scores(clustering.read_summary(args.summary), sweep, quanta[ids], cue_ids)
        scored["targets"] = {"quality_auc_min": quality.TARGET_AUC, "labels_name_cues_min": quality.TARGET_CUES}
        scored["pass"] = bool((scored["quality_auc"] is None or scored["quality_auc"] >= quality.TARGET_AUC)
                              and (scored["labels_name_cues"] or 0) >= quality.TARGET_CUES)
        out["quality"] = scored
    if args.emergence and args.planted_metrics and Path(args.planted_metrics).exists() and Path(args.emergence).exists():
        scorecard = json.loads(Path(args.planted_metrics).read_text())
        out["emergence"] = cluster_curves.planted_check(cluster_curves.read_emergence(args.emergence),
                                                        clusters["cluster"].to_numpy(), quanta, scorecard)
    files.write_json(out, args.out)
    print(f"validate: {out}")


if __name__ == "__main__":
    stage.run(main)
