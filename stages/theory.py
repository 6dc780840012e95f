"""Stage `theory`: the quantization model's predictions against the measured exponents.

    python -m stages.theory [--params params.yaml] --planted cache/planted \
        --scaling metrics/scaling.json --powerlaw metrics/powerlaw.json \
        --planted-metrics metrics/planted.json --out metrics/theory.json

On the planted suite (cache/planted/labels.parquet present) it also compares each route's
α with the planted `planted.alpha`, against `theory.tolerance`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from pipeline.core import config, files, stage
from pipeline.laws import theory
from pipeline.planted import suite


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("theory check", "planted", "scaling", "powerlaw", "out")
    ap.add_argument("--planted-metrics", default=None, help="metrics/planted.json (planted suite: the learned-count exponent β)")
    args = ap.parse_args(argv)

    params = config.load_params(args.params)
    cfg = config.section(params, "theory")
    planted_alpha = None
    if suite.has_ground_truth(args.planted):
        planted_alpha = config.section(params, "planted").alpha
    read = lambda p: json.loads(Path(p).read_text())  # noqa: E731
    learned = None
    if planted_alpha is not None and args.planted_metrics and Path(args.planted_metrics).exists():
        learned = read(args.planted_metrics).get("learned_count_scaling")
    out = theory.theory_table(read(args.scaling), read(args.powerlaw), cfg, planted_alpha, learned)
    files.write_json(out, args.out)
    alphas = {k: (None if r["alpha"] is None else round(r["alpha"], 4)) for k, r in out["routes"].items()}
    line = f"theory: α by route {alphas}"
    if out["planted"]:
        line += f"; planted α = {planted_alpha}: " + ("PASS" if out["pass"] else "FAIL: " + "; ".join(out["failures"]))
    print(line)


if __name__ == "__main__":
    stage.run(main)
