"""Stage `cluster`: clustering of the affinity (cluster.method); each cluster is a candidate quantum.

    python -m stages.cluster [--params params.yaml] --similarity cache/qdg/similarity \
        --samples cache/qdg/samples.parquet --tokens cache/corpus/tokens.parquet \
        --out cache/qdg/clusters.parquet --summary cache/qdg/cluster_summary.parquet \
        --metrics metrics/qdg.json
"""

from __future__ import annotations

from typing import Optional, Sequence

import pyarrow.parquet as pq

from pipeline import cluster, config, io, stage
from pipeline import similarity as sim
from pipeline.select import read_samples


def token_strings(tokens_path: str) -> dict[int, str]:
    """token id -> its text, from the corpus tokens table."""
    t = pq.read_table(tokens_path, columns=["token_id", "token_str"]).to_pandas().drop_duplicates("token_id")
    return dict(zip(t["token_id"].astype(int), t["token_str"].astype(str)))


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
    table, metrics = cluster.run_clustering(aff, ids, len(samples), cfg)
    summary = cluster.summarise(table.to_pandas(), samples, token_strings(args.tokens), cfg)
    meta = {**config.to_dict(cfg), "main_k": metrics["k"]}  # leiden: the data's k, not n_clusters[0]
    io.write_parquet(table, args.out, config=meta)
    io.write_parquet(summary, args.summary, config=meta)
    metrics["similarity_mode"] = sim_meta["mode"]
    io.write_meta(metrics, args.metrics)
    print(f"cluster: k={metrics['k']}, stability ARI {metrics['stability_ari']} -> {args.out}")


if __name__ == "__main__":
    stage.run(main)
