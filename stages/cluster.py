"""Stage `cluster`: clustering of the affinity (cluster.method); each cluster is a candidate quantum,
assessed for quality, stability and its best context rule (pipeline/qdg/quality.py).

    python -m stages.cluster [--params params.yaml] --similarity cache/qdg/similarity \
        --samples cache/qdg/samples.parquet --tokens cache/corpus/tokens.parquet \
        --projections cache/qdg/gradients_projections.npy --gradients-table cache/qdg/gradients.parquet \
        --out cache/qdg/clusters.parquet --summary cache/qdg/cluster_summary.parquet \
        --metrics metrics/qdg.json
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from pipeline.core import config, files, stage
from pipeline.core.errors import QuantaError
from pipeline.lm import corpus
from pipeline.qdg import clustering, gradient_files, quality
from pipeline.qdg import similarity as sim
from pipeline.qdg.selection import read_samples


def projection_affinities(path: Optional[str], table: Optional[str], ids: np.ndarray, params: str) -> list:
    """The affinity of each extra projection seed's gradients (gradients.stability_seeds),
    built as the similarity stage builds the main one, over the same samples `ids`."""
    if not path:
        return []
    copies = gradient_files.read_gradients(path)  # (S, N, dim)
    if copies.ndim != 3 or copies.shape[0] == 0:
        return []
    cfg = config.load("similarity", params)
    bad = gradient_files.read_bad(table) if table else None
    out = []
    for s in range(copies.shape[0]):
        aff, used, _ = sim.compute(copies[s], bad, cfg)
        if not np.array_equal(used, ids):
            raise QuantaError(f"{path}: projection {s} leaves out other samples than the main gradients; "
                              "rerun the gradients stage (dvc repro gradients)")
        out.append(aff)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("affinity -> clusters")
    ap.add_argument("--similarity", required=True)
    ap.add_argument("--samples", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--projections", default=None, help="the gradients stage's (S, N, k) stability projections")
    ap.add_argument("--gradients-table", default=None, help="the gradients stage's per-sample table (bad flags)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--summary", required=True)
    ap.add_argument("--metrics", required=True)
    args = ap.parse_args(argv)

    cfg = config.load("cluster", args.params)
    aff, ids, sim_meta = sim.read(args.similarity, mmap=False)
    samples = read_samples(args.samples)
    table, metrics = clustering.run_clustering(aff, ids, len(samples), cfg, progress=True)
    frame = table.to_pandas()
    tokens = corpus.read_tokens(args.tokens)
    token_str = corpus.read_token_strings(args.tokens)
    context = tokens.preceding(samples["doc_id"].to_numpy(), samples["pos"].to_numpy(), 3)  # (N, 3), oldest first
    answer = samples["token_id"].to_numpy()
    doc_all, pos_all, answer_all = tokens.targets()
    every_target = (answer_all, tokens.preceding(doc_all, pos_all, 3))
    assessment, assessed = quality.assess(
        aff, sim_meta["config"]["affinity"], frame, ids, cfg, answer=answer, prev=context, token_str=token_str,
        projections=projection_affinities(args.projections, args.gradients_table, ids, args.params),
        corpus=every_target,
    )
    metrics.update(assessed)
    if "stability_ari" not in metrics:  # a deterministic method: its stability is the subsamples'
        metrics.update(stability_ari=metrics["stability"]["subsample_ari"],
                       stability_ari_is=f"mean ARI of {cfg.stability_draws} seeded {cfg.stability_fraction:.0%} "
                                        "subsamples clustered alone")
    summary = clustering.summarise(frame, samples, token_str, cfg, assessment)
    main_labels = table.column("cluster").to_numpy()  # row i = sample i
    metrics["baselines"] = clustering.ngram_baselines(main_labels, answer, context[:, 1:])
    meta = {**config.to_dict(cfg), "main_k": metrics["k"]}  # leiden: the data's k, not n_clusters[0]
    files.write_parquet(table, args.out, config=meta)
    files.write_parquet(summary, args.summary, config=meta)
    metrics["similarity_mode"] = sim_meta["mode"]
    files.write_meta(metrics, args.metrics)
    stab = metrics["stability"]
    unassigned = f", {metrics['n_unassigned']} unassigned" if "n_unassigned" in metrics else ""
    print(f"cluster: k={metrics['k']}{unassigned}, subsample ARI {stab['subsample_ari']}, projection ARI {stab['projection_ari']}, "
          f"above null {metrics.get('above_null')}, explained by an n-gram {metrics['explained_by_ngram']} -> {args.out}")


if __name__ == "__main__":
    stage.run(main)
