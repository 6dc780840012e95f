"""Stage `cluster`: clustering of the affinity (cluster.method); each cluster is a candidate quantum.

    python -m stages.cluster [--params params.yaml] --similarity cache/qdg/similarity \
        --samples cache/qdg/samples.parquet --tokens cache/corpus/tokens.parquet \
        --out cache/qdg/clusters.parquet --summary cache/qdg/cluster_summary.parquet \
        --metrics metrics/qdg.json
"""

from __future__ import annotations

from typing import Optional, Sequence

from pipeline.core import config, files, stage
from pipeline.lm import corpus
from pipeline.qdg import clustering, quality
from pipeline.qdg import similarity as sim
from pipeline.qdg.selection import read_samples


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("affinity -> clusters")
    ap.add_argument("--similarity", required=True)
    ap.add_argument("--samples", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--summary", required=True)
    ap.add_argument("--metrics", required=True)
    args = ap.parse_args(argv)

    cfg = config.load("cluster", args.params)
    aff, ids, sim_meta = sim.read(args.similarity, mmap=False)
    samples = read_samples(args.samples)
    table, metrics = clustering.run_clustering(aff, ids, len(samples), cfg)
    frame = table.to_pandas()
    qual, qual_metrics = quality.assess(aff, sim_meta["config"]["affinity"], frame, ids, cfg.null_draws, cfg.seed)
    metrics.update(qual_metrics)
    summary = clustering.summarise(frame, samples, corpus.read_token_strings(args.tokens), cfg, qual)
    context = corpus.read_tokens(args.tokens).preceding(samples["doc_id"].to_numpy(), samples["pos"].to_numpy(), 2)
    main = table.column("cluster").to_numpy()  # row i = sample i
    metrics["baselines"] = clustering.ngram_baselines(main, samples["token_id"].to_numpy(), context)
    meta = {**config.to_dict(cfg), "main_k": metrics["k"]}  # leiden: the data's k, not n_clusters[0]
    files.write_parquet(table, args.out, config=meta)
    files.write_parquet(summary, args.summary, config=meta)
    metrics["similarity_mode"] = sim_meta["mode"]
    files.write_meta(metrics, args.metrics)
    print(f"cluster: k={metrics['k']}, stability ARI {metrics['stability_ari']} -> {args.out}")


if __name__ == "__main__":
    stage.run(main)
