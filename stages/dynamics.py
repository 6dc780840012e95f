"""Stage `dynamics`: per-token training dynamics of one model across its checkpoints.

    python -m stages.dynamics [--params params.yaml] --losses cache/losses --planted cache/planted \
        --out cache/scaling/token_dynamics.parquet --metrics metrics/dynamics.json --plots plots/dynamics

On the planted suite it also fits each quantum's emergence step against its frequency
(theory: S_k ∝ 1/p_k).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from pipeline.core import config, files, stage
from pipeline.laws import dynamics
from pipeline.report import plots


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("per-token training dynamics", "losses", "planted", "out", "metrics", "plots")
    args = ap.parse_args(argv)

    params = config.load_params(args.params)
    cfg = config.section(params, "dynamics")
    suite = config.section(params, "suite")
    reason = dynamics.skip_reason(suite.models, suite.revisions, cfg)
    if reason:  # one checkpoint: skipped, not failed, so a one-model run reaches the report
        res = dynamics.skipped(dynamics.followed_model(suite.models, cfg), reason)
    else:
        res = dynamics.run(args.losses, suite.models, suite.revisions, cfg, planted_dir=args.planted)
    files.write_parquet(res.table, args.out, config=config.to_dict(cfg))
    files.write_json(res.metrics, args.metrics)
    plots.emergence(res, Path(args.plots) / "emergence_vs_frequency.png")
    m = res.metrics
    if reason:
        print(f"dynamics: skipped: {reason}")
        return
    share = m["abrupt_share_of_decrease"]
    line = (f"dynamics: {m['model']}: {100 * m['frac_abrupt']:.1f}% of tokens drop abruptly, "
            f"{'-' if share is None else f'{100 * share:.1f}%'} of the total loss decrease")
    if "emergence" in m:
        e = m["emergence"]
        line += f"; emergence slope {e['slope']} CI {e['slope_ci']} (theory 1) {e['reason']}"
    print(line)


if __name__ == "__main__":
    stage.run(main)
