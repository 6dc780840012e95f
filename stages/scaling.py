"""Stage `scaling`: per-token scaling curves, mean-loss L(N) and learning-curve L(S) fits.

    python -m stages.scaling [--params params.yaml] --losses cache/losses \
        --out cache/scaling/token_curves.parquet --metrics metrics/scaling.json --plots plots/scaling

Every model of `suite.models` must share one tokenizer (checked on each model's tokenizer
at `scaling.revision`). Too few models: under `scaling.on_too_few_models: skip` (the default)
an empty table and the reason in the metrics, under `error` an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from pipeline.core import config, files, stage
from pipeline.laws import scaling
from pipeline.lm import models
from pipeline.report import plots


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("per-token scaling curves, L(N) and L(S)", "losses", "out", "metrics", "plots")
    args = ap.parse_args(argv)

    params = config.load_params(args.params)
    cfg = config.section(params, "scaling")
    suite = config.section(params, "suite")
    revision = cfg.revision or suite.revisions[-1]
    tokenizers = None
    if len(suite.models) >= cfg.min_models:
        tokenizers = {m: scaling.tokenizer_identity(models.suite_tokenizer(suite, m, revision)) for m in suite.models}
    res = scaling.run(args.losses, suite.models, suite.revisions, cfg, tokenizers=tokenizers)
    files.write_parquet(res.curves_table(), args.out, config=config.to_dict(cfg))
    files.write_json(res.metrics, args.metrics)
    out = Path(args.plots)
    plots.mean_loss_vs_n(res, out / "mean_loss_vs_n.png")
    plots.token_examples(res, out / "token_examples.png")
    plots.learning_curves(res, out / "learning_curves.png")
    print(res.summary_line())


if __name__ == "__main__":
    stage.run(main)
