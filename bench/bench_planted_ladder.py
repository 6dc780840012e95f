"""The planted suite's learned-count ladder over init replicates, without the rest of the pipeline.

    python bench/bench_planted_ladder.py --seed 0 --replicates 3 [--steps 3000] \
        [--widths 4,8,12,20,32,48] [--set lr_width_exponent=0.25 ...]

Trains every width `--replicates` times on one language and one data order (params.yaml
``planted`` with ``--seed`` and the ``--set`` overrides; replicate r initialises from
seed + 1000 r), scores each final model on the probe set, and prints the learned count per
replicate and two pooled ladders: on the replicates' mean probe loss per answer, and by
majority vote. "learned" is the suite's definition (suite.LEARNED_LOSS/_FRACTION). Two
training processes at a time, one thread each. Results: docs/planted-languages.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import multiprocessing as mp

import numpy as np
import pandas as pd
import yaml

from pipeline.core import config
from pipeline.planted import scorecard, suite


def _cfg(seed: int, steps: int, overrides: dict) -> config.PlantedConfig:
    cfg = config.section(config.load_params("params.yaml"), "planted")
    return dataclasses.replace(cfg, seed=seed, steps=steps, **overrides)


def train_and_probe(job: tuple) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(width, replicate, probe quanta, probe losses) of one trained model."""
    import torch

    torch.set_num_threads(1)
    seed, width, rep, steps, overrides = job
    cfg = _cfg(seed, steps, overrides)
    lang = suite.make_language(cfg)
    tokens, quanta = suite.probe_docs(lang, cfg)
    probe = suite.label_table(quanta)
    probe = probe[probe["quantum"] >= 0]
    model = suite.train_model(lang, dataclasses.replace(cfg, seed=seed + 1000 * rep), width,
                                suite.training_batches(lang, cfg), progress=False)
    loss = suite.token_losses(model, tokens)[probe["doc_id"], probe["pos"]]
    return width, rep, probe["quantum"].to_numpy(), loss


def learned(quantum: np.ndarray, loss: np.ndarray, n_quanta: int) -> np.ndarray:
    scores = scorecard.answer_scores(pd.DataFrame({"quantum": quantum, "loss": loss}), n_quanta)
    return scores["learned"].to_numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replicates", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="default: params.yaml planted.steps")
    ap.add_argument("--widths", default=None, help="comma-separated; default: params.yaml planted.widths")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="planted overrides (YAML values)")
    args = ap.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    base = _cfg(args.seed, 0, overrides)
    steps = args.steps or config.section(config.load_params("params.yaml"), "planted").steps
    widths = [int(w) for w in args.widths.split(",")] if args.widths else list(base.widths)
    jobs = [(args.seed, w, r, steps, overrides) for w in sorted(widths, reverse=True) for r in range(args.replicates)]
    runs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        for w, r, q, loss in pool.map(train_and_probe, jobs):
            runs[(w, r)] = (q, loss)
    K = base.n_quanta
    print(f"seed {args.seed}, {steps} steps, overrides {overrides or 'none'}; widths {widths}")
    for r in range(args.replicates):
        print(f"replicate {r}:", [int(learned(*runs[(w, r)], K).sum()) for w in widths])
    mean = [int(learned(runs[(w, 0)][0], np.mean([runs[(w, r)][1] for r in range(args.replicates)], axis=0), K).sum())
            for w in widths]
    vote = [int((np.mean([learned(*runs[(w, r)], K) for r in range(args.replicates)], axis=0) > 0.5).sum())
            for w in widths]
    print("on the mean probe loss:", mean)
    print("by majority vote:", vote)


if __name__ == "__main__":
    main()
