"""Stage `sources`: the content hash of every local input file (corpus, models), one JSON per
input, so that editing one in place reruns exactly what it feeds (pipeline/lm/sources.py).

    python -m stages.sources [--params params.yaml] --out cache/sources

DVC runs it on every `dvc repro` (``always_changed``); its outputs change only when a source does.
"""

from __future__ import annotations

from typing import Optional, Sequence

from pipeline.core import config, stage
from pipeline.lm import sources


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("local sources -> content hashes", "out")
    args = ap.parse_args(argv)
    params = config.load_params(args.params)
    m = sources.write(args.out, config.section(params, "suite"), config.section(params, "corpus"))
    local = [name for name, e in m["models"].items() if e["kind"].startswith("local")]
    print(f"sources: corpus {m['corpus']['kind']}; {len(m['models'])} model(s), {len(local)} local -> {args.out}")


if __name__ == "__main__":
    stage.run(main)
