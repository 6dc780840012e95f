"""Stage `corpus`: read the documents of params.yaml's corpus section and tokenize them.

    python -m stages.corpus [--params params.yaml] --docs cache/corpus/docs.parquet \
        --tokens cache/corpus/tokens.parquet

The tokenizer is that of `corpus.tokenizer` (a suite model name), else of the suite's
first model, at the suite's last revision. Both tables carry the corpus config and the
tokenizer's origin in their Parquet metadata.
"""

from __future__ import annotations

from typing import Optional, Sequence

from pipeline.core import config, stage
from pipeline.core.files import write_parquet
from pipeline.lm import corpus


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("documents -> tokens")
    ap.add_argument("--docs", required=True, help="output: one row per document")
    ap.add_argument("--tokens", required=True, help="output: one row per token")
    args = ap.parse_args(argv)

    params = config.load_params(args.params)
    docs, tokens, meta = corpus.build_for_suite(config.section(params, "corpus"), config.section(params, "suite"),
                                                progress=True)
    # Both tables are complete before either is written: an error leaves the old outputs.
    write_parquet(docs, args.docs, config=meta)
    write_parquet(tokens, args.tokens, config=meta)
    n = meta["documents"]
    dropped = n["dropped_empty"] + n["dropped_short"]
    note = (f"; dropped {dropped:,} of {n['read']:,} documents ({n['dropped_empty']:,} with empty or null text, "
            f"{n['dropped_short']:,} of one token)") if dropped else ""
    print(f"corpus: {docs.num_rows:,} documents, {tokens.num_rows:,} tokens -> {args.docs}, {args.tokens}{note}")


if __name__ == "__main__":
    stage.run(main)
