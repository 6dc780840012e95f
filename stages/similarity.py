"""Stage `similarity`: cosine similarity of the gradients, as the affinity clustering reads.

    python -m stages.similarity [--params params.yaml] --gradients cache/qdg/gradients.npy \
        --table cache/qdg/gradients.parquet --out cache/qdg/similarity

Writes a folder: affinity.npy (dense) or affinity.npz (sparse kNN), samples.npy (the
sample ids of its rows; bad samples are left out) and meta.json.
"""

from __future__ import annotations

from typing import Optional, Sequence

from pipeline.core import config, stage
from pipeline.qdg import gradient_files
from pipeline.qdg import similarity as sim


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("gradients -> affinity")
    ap.add_argument("--gradients", required=True)
    ap.add_argument("--table", required=True, help="the gradients stage's per-sample table (bad flags)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    cfg = config.load("similarity", args.params)
    gradient_files.verify_gradients(args.gradients, args.table)
    if gradient_files.remove_leftover_parts(args.gradients):
        print(f"similarity: removed {gradient_files.parts_dir(args.gradients)}, the parts of an interrupted gradients "
              "run whose finished matrix is here")
    grads = gradient_files.read_gradients(args.gradients)
    bad = gradient_files.read_bad(args.table)
    aff, ids, meta = sim.compute(grads, bad, cfg, progress=not args.no_progress)
    sim.write(args.out, aff, ids, meta)
    print(f"similarity: {meta['mode']} affinity of {meta['n_used']} samples ({meta['seconds']} s) -> {args.out}")


if __name__ == "__main__":
    stage.run(main)
