"""Stage `losses@<model>`: the per-token loss of every corpus token under one model, at
every revision of the suite (or at those given).

    python -m stages.losses [--params params.yaml] --model pythia-70m [--revision step143000 ...] \
        --tokens cache/corpus/tokens.parquet --out cache/losses

Writes ``<out>/model=<model>/revision=<revision>/part-*.parquet`` (doc_id, pos, loss in
nats) and ``_meta.json`` there, one partition per revision. One process scores all of a
model's revisions, so torch and transformers are imported once per model, not once per
checkpoint. A killed run resumes: rerun the same command (or ``dvc repro``; the stage's outs
need ``persist: true`` so that DVC keeps finished parts). Where it runs: see params.yaml
``losses.scheduler`` and ``DASK_SCHEDULER_ADDRESS``.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from pipeline.core import config, execution, stage
from pipeline.lm import corpus, losses, models


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("tokens -> per-token losses of one model at its revisions")
    ap.add_argument("--model", required=True, help="a name in suite.models")
    ap.add_argument("--revision", action="append", default=None,
                    help="a name in suite.revisions (e.g. step143000); repeatable; default: every one of suite.revisions")
    ap.add_argument("--tokens", required=True, help="input: the corpus stage's tokens.parquet")
    ap.add_argument("--out", required=True, help="output root; the stage writes model=<m>/revision=<r>/ under it")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    params = config.load_params(args.params)
    suite = config.section(params, "suite")
    corpus_cfg = config.section(params, "corpus")
    losses_cfg = config.section(params, "losses")
    # every spec and the device first: a revision that is not in the suite, or a device this
    # machine lacks, fails before any finished part is looked at
    specs = [models.spec_from_suite(suite, args.model, r) for r in (args.revision or suite.revisions)]
    if execution.runs_here(losses_cfg.scheduler):
        models.resolve_device(suite.device)
    tokens = corpus.read_tokens(args.tokens)  # once for all revisions (a Pythia corpus is ~100M tokens)
    for spec in specs:
        losses.run_losses(spec, tokens, args.out, losses=losses_cfg, suite=suite, corpus=corpus_cfg)


if __name__ == "__main__":  # the guard also keeps Dask's spawned workers from rerunning main
    stage.run(main)
