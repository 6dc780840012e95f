"""Stage `gradients`: the exact loss gradient of every QDG sample, projected as configured.

    python -m stages.gradients [--params params.yaml] --samples cache/qdg/samples.parquet \
        --tokens cache/corpus/tokens.parquet --out cache/qdg/gradients.npy \
        --table cache/qdg/gradients.parquet --meta cache/qdg/gradients_meta.json \
        --projections cache/qdg/gradients_projections.npy

Writes an (N, k) float32/float16 array (row i = sample i) and a table of per-sample
exact gradient norms and bad-sample flags, and an (S, N, k) array of the same gradients
projected with each of the S `gradients.stability_seeds` (S = 0 by choice: empty). Shards run in-process or on Dask (params
`gradients.scheduler`, or DASK_SCHEDULER_ADDRESS); a killed run resumes from its parts.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from pipeline.core import config, execution, files, stage
from pipeline.lm import models
from pipeline.qdg import gradients


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("QDG samples -> per-sample gradients")
    ap.add_argument("--samples", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--out", required=True, help="output (N, k) .npy")
    ap.add_argument("--table", required=True, help="output per-sample table (.parquet)")
    ap.add_argument("--meta", required=True, help="output run summary (.json)")
    ap.add_argument("--projections", default=None, help="output (S, N, k) .npy: the stability seeds' projections")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    params = config.load_params(args.params)
    cfg = config.section(params, "gradients")
    sel = config.section(params, "select")
    suite = config.section(params, "suite")
    corpus = config.section(params, "corpus")
    select_spec = models.spec_from_suite(suite, sel.model, sel.revision)
    spec = models.spec_from_suite(suite, cfg.model or sel.model, cfg.revision or sel.revision)
    if execution.runs_here(cfg.scheduler):  # a device this machine lacks fails before any part is looked at
        models.resolve_device(suite.device)
    hub = models.hub_kwargs(suite)
    meta = gradients.run_gradients(
        args.samples, args.tokens, args.out, args.table, cfg=cfg, select_spec=select_spec, spec=spec,
        load_kwargs=models.load_kwargs(suite, cfg.dtype),
        max_len=cfg.max_len or corpus.max_len,  # null: the context the losses were computed with
        tokenizer_loader=lambda s: models.load_tokenizer(s, **hub), out_projections=args.projections,
    )
    files.write_meta(meta, args.meta)
    print(
        f"gradients: {meta['n_samples']} samples x {meta['dim']} ({meta['n_bad']} bad) "
        f"at {meta['samples_per_s']} samples/s -> {args.out}"
    )


if __name__ == "__main__":
    stage.run(main)
