"""Stage `validate`: QDG clusters against the planted quanta, when the suite is planted.

    python stages/validate.py [--params params.yaml] --planted cache/planted \
        --samples cache/qdg/samples.parquet --similarity cache/qdg/similarity \
        --clusters cache/qdg/clusters.parquet --tokens cache/corpus/tokens.parquet \
        --out metrics/validate.json

Without planted ground truth (a real suite) it writes {"planted": false}.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from pipeline import cluster, config, io, losses, planted, stage
from pipeline import similarity as sim
from pipeline.select import read_samples

# The targets on the default planted suite (README "The embedded planted-quanta suite").
TARGET_QDG_ARI = 0.9
TARGET_BASELINE_ARI = 0.3


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("clusters vs planted quanta", "planted", "samples", "similarity", "clusters", "tokens", "out")
    args = ap.parse_args(argv)

    samples = read_samples(args.samples)
    quanta = planted.sample_quanta(args.planted, samples)
    if quanta is None:
        io.write_json({"planted": False}, args.out)
        print("validate: no planted ground truth (a real suite); wrote planted: false")
        return
    cfg = config.load("cluster", args.params)
    tokens = losses.read_tokens(args.tokens)
    flat = tokens.offsets[tokens.index_of(samples["doc_id"].to_numpy(np.int64))] + samples["pos"].to_numpy(np.int64)
    # the two tokens before each target (-1 where the target is at pos 1)
    before = np.stack([np.where(flat - 2 >= tokens.offsets[tokens.index_of(samples["doc_id"].to_numpy(np.int64))],
                                tokens.token_ids[np.maximum(flat - 2, 0)], -1), tokens.token_ids[flat - 1]], axis=1)
    aff, ids, _ = sim.read(args.similarity, mmap=False)
    clusters = pd.read_parquet(args.clusters)
    out = {"planted": True, **cluster.validate(aff, ids, samples, quanta, before, clusters, cfg)}
    if "qdg" in out:
        out["targets"] = {"qdg_ari_min": TARGET_QDG_ARI, "baseline_answer_ari_max": TARGET_BASELINE_ARI}
        out["pass"] = bool(
            out["qdg"]["ari"] >= TARGET_QDG_ARI and out["baseline_answer"]["ari"] <= TARGET_BASELINE_ARI
        )
    io.write_json(out, args.out)
    print(f"validate: {out}")


if __name__ == "__main__":
    stage.run(main)
