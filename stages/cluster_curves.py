"""Stage `cluster_curves`: every cluster of the main clustering across the suite's sizes and
checkpoints, its emergence N* and S*, and the quantization model's ordering on clusters.

    python -m stages.cluster_curves [--params params.yaml] --losses cache/losses \
        --clusters cache/qdg/clusters.parquet --summary cache/qdg/cluster_summary.parquet \
        --samples cache/qdg/samples.parquet --out cache/qdg/cluster_curves.parquet \
        --emergence cache/qdg/cluster_emergence.parquet --metrics metrics/cluster_curves.json

Models whose tokenizer is not the select model's are skipped with the reason in the metrics;
a one-model or one-checkpoint suite skips that axis, so a one-model run reaches the report.
"""

from __future__ import annotations

from typing import Optional, Sequence

from pipeline.core import config, files, stage
from pipeline.laws import cluster_curves, scaling
from pipeline.lm import models as lm_models
from pipeline.qdg import clustering
from pipeline.qdg.selection import read_samples


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("cluster curves over sizes and checkpoints", "losses", "clusters", "summary", "samples", "out",
                      "metrics")
    ap.add_argument("--emergence", required=True, help="cluster_emergence.parquet: N*, S*, CIs, abruptness per cluster")
    args = ap.parse_args(argv)

    params = config.load_params(args.params)
    cfg = config.section(params, "curves")
    suite = config.section(params, "suite")
    select = config.section(params, "select")
    size_revision = config.section(params, "scaling").revision or suite.revisions[-1]
    step_model = config.section(params, "dynamics").model or suite.models[-1]
    skipped = {}
    if len(suite.models) > 1:  # one model has nothing to compare its tokenizer with
        ident = {m: scaling.tokenizer_identity(lm_models.suite_tokenizer(suite, m, size_revision)) for m in suite.models}
        skipped = cluster_curves.tokenizer_mismatch(ident, select.model)
    models = [m for m in suite.models if m not in skipped]

    clusters = clustering.read_clusters(args.clusters)
    summary = clustering.read_summary(args.summary)
    main_k = next(iter(clustering.sweep_columns(clusters)))
    res = cluster_curves.run(
        args.losses, read_samples(args.samples), clusters["cluster"].to_numpy(), summary[summary["k"] == main_k],
        models=models, revisions=suite.revisions, select_model=select.model, size_revision=size_revision,
        step_model=step_model, max_loss=select.max_loss, cfg=cfg, skipped_models=skipped,
    )
    res.metrics["k"] = int(main_k)
    meta = config.to_dict(cfg)
    files.write_parquet(res.curves, args.out, config=meta)
    files.write_parquet(res.emergence, args.emergence, config=meta)
    files.write_json(res.metrics, args.metrics)
    parts = []
    for axis in ("size", "step"):
        m = res.metrics[axis]
        if "skipped" in m:
            parts.append(f"{axis}: skipped ({m['skipped']})")
        else:
            r = m["share_of_samples"]
            parts.append(f"{axis}: rho(share, emergence) = {r.get('rho')} CI {r.get('ci')}, "
                         f"censored {m['n_left_censored']} left / {m['n_right_censored']} right")
    print(f"cluster_curves: {res.metrics['n_clusters']} clusters over {len(models)} model(s); " + "; ".join(parts))


if __name__ == "__main__":
    stage.run(main)
