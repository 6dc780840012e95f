"""Stage `validate`: QDG clusters against the planted quanta, when the suite is planted.

    python -m stages.validate [--params params.yaml] --planted cache/planted \
        --samples cache/qdg/samples.parquet --similarity cache/qdg/similarity \
        --clusters cache/qdg/clusters.parquet --tokens cache/corpus/tokens.parquet \
        --out metrics/validate.json

Without planted ground truth (a real suite) it writes {"planted": false}.
"""

from __future__ import annotations

from typing import Optional, Sequence

from pipeline.core import config, files, stage
from pipeline.lm import corpus
from pipeline.planted import suite
from pipeline.qdg import clustering
from pipeline.qdg import similarity as sim
from pipeline.qdg.selection import read_samples


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("clusters vs planted quanta", "planted", "samples", "similarity", "clusters", "tokens", "out")
    args = ap.parse_args(argv)

    samples = read_samples(args.samples)
    quanta = suite.sample_quanta(args.planted, samples)
    if quanta is None:
        files.write_json({"planted": False}, args.out)
        print("validate: no planted ground truth (a real suite); wrote planted: false")
        return
    cfg = config.load("cluster", args.params)
    aff, ids, _ = sim.read(args.similarity, mmap=False)
    out = clustering.validate_planted(aff, ids, samples, quanta, corpus.read_tokens(args.tokens),
                                   clustering.read_clusters(args.clusters), cfg)
    files.write_json(out, args.out)
    print(f"validate: {out}")


if __name__ == "__main__":
    stage.run(main)
