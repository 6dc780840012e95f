"""Stage `select`: the QDG samples, tokens that one model predicts with loss < select.max_loss.

    python -m stages.select [--params params.yaml] --losses cache/losses \
        --tokens cache/corpus/tokens.parquet --out cache/qdg/samples.parquet

Reads the loss table of (select.model, select.revision) and writes samples.parquet
(sample, doc_id, pos, token_id, loss).
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

from pipeline.core import config, files, stage
from pipeline.lm import corpus, partitions
from pipeline.qdg import selection as select_lib


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("loss table -> QDG samples")
    ap.add_argument("--losses", required=True, help="the losses stage's output root (cache/losses)")
    ap.add_argument("--tokens", required=True, help="the corpus stage's tokens.parquet")
    ap.add_argument("--out", required=True, help="output samples.parquet")
    args = ap.parse_args(argv)

    params = config.load_params(args.params)
    cfg = config.section(params, "select")
    suite = config.section(params, "suite")
    # load_params checks these when the file writes them (as every DVC run does); a partial
    # params file leaves them at the planted default, which names no model of its suite
    config.check_member("select.model", cfg.model, suite.models, "suite.models",
                        "set select.model to one of them (its losses choose the samples)")
    config.check_member("select.revision", cfg.revision, suite.revisions, "suite.revisions",
                        "set select.revision to one of them")
    table = partitions.read_loss_partition(args.losses, cfg.model, cfg.revision).to_pandas()
    tokens = corpus.read_tokens(args.tokens)
    warnings.simplefilter("always", select_lib.SelectWarning)  # say it on every run, not once
    samples = select_lib.select_samples(table, tokens, cfg)
    files.write_parquet(samples, args.out, config=config.to_dict(cfg))
    print(f"select: {samples.num_rows} samples of {cfg.model}@{cfg.revision} with loss < {cfg.max_loss} nats -> {args.out}")


if __name__ == "__main__":
    stage.run(main)
