"""Stage `planted`: write the embedded planted-quanta suite (language, corpus, labels, models).

    python -m stages.planted [--params params.yaml] [--out cache/planted]

Trains the suite models whose `suite.sources` point into --out, one width of
`planted.widths` per name of `suite.models`, and saves each of `suite.revisions`. When
neither a suite source nor `corpus.source` points into --out (a real-model run), it writes
only a README marker and returns at once.
"""

from __future__ import annotations

from typing import Optional, Sequence

from pipeline.core import config, stage
from pipeline.planted import suite as planted


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("write the planted-quanta suite")
    ap.add_argument("--out", default="cache/planted", help="output directory (default: cache/planted)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = ap.parse_args(argv)

    params = config.load_params(args.params, planted_root=args.out)  # sources under --out: this stage writes them
    cfg = config.section(params, "planted")
    suite = config.section(params, "suite")
    corpus = config.section(params, "corpus")
    summary = planted.build_suite(cfg, suite, corpus.source, args.out, progress=not args.no_progress)
    if not summary["planted"]:
        print(f"planted: nothing in params points into {args.out}; wrote only its README marker")


if __name__ == "__main__":
    stage.run(main)
