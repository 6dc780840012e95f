"""Stage `scaling`: per-token scaling curves, mean-loss L(N) and learning-curve L(S) fits.

    python stages/scaling.py [--params params.yaml] --losses cache/losses \
        --out cache/scaling/token_curves.parquet --metrics metrics/scaling.json --plots plots/scaling

Every model of `suite.models` must share one tokenizer (checked on each model's tokenizer
at `scaling.revision`). Too few models: an error, or under `scaling.on_too_few_models: skip`
an empty table and the reason in the metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence


from pipeline import config, io, models, plots, scaling, stage


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("per-token scaling curves, L(N) and L(S)", "losses", "out", "metrics", "plots")
    args = ap.parse_args(argv)

    params = config.load_params(args.params)
    cfg = config.section(params, "scaling")
    suite = config.section(params, "suite")
    revision = cfg.revision or suite.revisions[-1]
    tokenizers = None
    if len(suite.models) >= cfg.min_models:
        kw = dict(cache_dir=suite.cache_dir, local_files_only=suite.local_files_only,
                  trust_remote_code=suite.trust_remote_code)
        tokenizers = {
            m: scaling.tokenizer_identity(models.load_tokenizer(models.spec_from_suite(suite, m, revision), **kw))
            for m in suite.models
        }
    res = scaling.run(args.losses, suite.models, suite.revisions, cfg, tokenizers=tokenizers)
    table = res.suite.table
    if table is None:  # skipped: an empty table with the schema, so readers and DVC see a file
        table = scaling.CURVES_SCHEMA.empty_table()
    io.write_parquet(table, args.out, config=config.to_dict(cfg))
    io.write_json(res.metrics, args.metrics)
    out = Path(args.plots)
    plots.mean_loss_vs_n(res, out / "mean_loss_vs_n.png")
    plots.token_examples(res, out / "token_examples.png")
    plots.learning_curves(res, out / "learning_curves.png")

    m = res.metrics
    if m.get("skipped"):
        print(f"scaling: skipped: {m['skipped']}")
        return
    ml, s = m["mean_loss"], m["alpha_S"]

    def fmt(v, ci, ok, reason):
        return f"{v:.4g} CI {ci}" if ok else f"{v} NOT CONVERGED ({reason})"

    print(f"scaling: {m['n_tokens']} tokens, kinds {m['kinds']}; "
          f"alpha_N {fmt(ml['alpha_N'], ml['alpha_ci'], ml['converged'], ml['reason'])}; "
          f"alpha_S({s['model']}) {fmt(s['alpha_S'], s['alpha_ci'], s['converged'], s['reason'])}")


if __name__ == "__main__":
    stage.run(main)
