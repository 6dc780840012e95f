"""Stage `planted_metrics`: score the planted suite's losses against its ground truth.

    python -m stages.planted_metrics [--params params.yaml] [--planted cache/planted] \
        [--losses cache/losses] [--out metrics/planted.json]

Reads labels.parquet and quanta.parquet of the planted suite and the per-token losses of
every (model, revision) of `suite.models` x `suite.revisions`, and writes the scorecard of
pipeline.planted.scorecard.compute_metrics (loss and learned quanta by size, frequency order,
abruptness, emergence steps) with its `acceptance_failures` (empty when the suite shows
what the quantization model predicts). A run that is not on the planted suite gets a
one-line "skipped" metrics file.
"""

from __future__ import annotations

from typing import Optional, Sequence

from pipeline.core import config, stage
from pipeline.core.files import write_json
from pipeline.planted import scorecard
from pipeline.planted import suite as planted_suite


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("score planted quanta")
    ap.add_argument("--planted", default="cache/planted", help="the planted stage's output directory")
    ap.add_argument("--losses", default="cache/losses", help="the losses stage's output directory")
    ap.add_argument("--out", default="metrics/planted.json", help="output metrics file")
    args = ap.parse_args(argv)

    params = config.load_params(args.params)
    cfg = config.section(params, "planted")
    suite = config.section(params, "suite")
    if not planted_suite.has_ground_truth(args.planted):
        write_json({"skipped": f"no planted suite under {args.planted} (this run does not use it)"}, args.out)
        return
    metrics = scorecard.evaluate(args.planted, args.losses, suite.models, suite.revisions, alpha=cfg.alpha)
    write_json(metrics, args.out)
    fails = metrics["acceptance_failures"]
    print("planted: acceptance " + ("passed" if not fails else "FAILED: " + "; ".join(fails)))


if __name__ == "__main__":
    stage.run(main)
