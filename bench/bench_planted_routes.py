"""Why the planted suite's two training-time routes miss the theory: α_S and the emergence slope.

    python bench/bench_planted_routes.py [--seed 0] [--width 48] [--steps 3000] [--checkpoints 24] \
        [--schedules cosine,constant] [--out bench/out/planted_routes.json]

Trains the widest planted model (params.yaml ``planted``, one thread) once per learning-rate
schedule, with `--checkpoints` log-spaced checkpoints, and at each checkpoint scores

- the mean loss of every eval-corpus token (what the scaling stage's L(S) fits: E + A·S^-α_S),
- the mean loss of the eval corpus' answer tokens (the quanta's loss: a perfect model scores
  them ~0, so it needs no offset, as the scorecard's answer-loss α_N),
- which quanta are learned on the probe set (the scorecard's definition).

and reports, per schedule and for the suite's own six checkpoints and for the dense ones:
α_S of all tokens (fit_curve with offset, as the scaling stage), α_S of the answer tokens
(OLS of log loss on log S after warm-up), and the emergence slope (OLS of log S_k on log 1/p_k
over the quanta learned by the last checkpoint, S_k the first checkpoint from which quantum k
stays learned) with the number never learned, and the same slope over the most frequent quanta
up to the first never learned (no censoring inside). The theory: α_S = α/(α+1), slope 1.
``constant`` holds the peak learning rate after warm-up (min_lr_ratio 1); ``cosine`` is the
suite's schedule (cosine decay to planted.min_lr_ratio). Results: docs/planted-routes.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import config
from pipeline.laws import fits
from pipeline.planted import scorecard, suite
from pipeline.planted.language import make_language


def checkpoints(steps: int, n: int, first: int = 10) -> list[int]:
    """n log-spaced steps from `first` to `steps`, unique integers, the suite's own six included."""
    grid = np.unique(np.round(np.geomspace(first, steps, n)).astype(int))
    return sorted(set(grid.tolist()) | {16, 50, 160, 500, 1500, steps} & set(range(1, steps + 1)))


def train_and_score(cfg: config.PlantedConfig, width: int, steps_at: list[int]) -> pd.DataFrame:
    """One row per checkpoint: step, all-token loss, answer loss, and the learned flags per quantum."""
    import torch

    torch.set_num_threads(1)
    lang = make_language(cfg)
    ev_tok, ev_q = suite.eval_docs(lang, cfg)
    pr_tok, pr_q = suite.probe_docs(lang, cfg)
    probe = suite.label_table(pr_q)
    probe = probe[probe["quantum"] >= 0]
    answers = ev_q[:, 1:] >= 0  # losses are of positions 1.. (the first token has no context)
    rows = []

    def score(step: int, model) -> None:
        ev = suite.token_losses(model, ev_tok)[:, 1:]
        pl = suite.token_losses(model, pr_tok)[probe["doc_id"], probe["pos"]]
        learned = scorecard.answer_scores(pd.DataFrame({"quantum": probe["quantum"].to_numpy(), "loss": pl}),
                                          cfg.n_quanta)["learned"].to_numpy()
        rows.append({"step": step, "loss_all": float(ev.mean()), "loss_answers": float(ev[answers].mean()),
                     "learned": learned})

    suite.train_model(lang, cfg, width, suite.training_batches(lang, cfg), save_steps=steps_at, save=score,
                      progress=False)
    return pd.DataFrame(rows).sort_values("step").reset_index(drop=True)


def routes(table: pd.DataFrame, freq: np.ndarray, warmup: int) -> dict:
    """α_S (all tokens, with offset), α_S (answer tokens, no offset, after warm-up) and the
    emergence slope over the checkpoints of `table`."""
    s = table["step"].to_numpy(float)
    full = fits.fit_curve(s, table["loss_all"].to_numpy())
    after = s >= warmup
    ans = table["loss_answers"].to_numpy()
    alpha_ans = float(-fits.ols(np.log(s[after]), np.log(ans[after]))[0]) if after.sum() >= 2 else None
    learned = np.stack(table["learned"].to_numpy())  # (checkpoints, quanta)
    stays = np.flip(np.logical_and.accumulate(np.flip(learned, 0), axis=0), 0)
    ok = stays[-1]
    s_k = s[np.argmax(stays, axis=0)]
    slope = float(fits.ols(np.log(1 / freq[ok]), np.log(s_k[ok]))[0]) if ok.sum() > 2 else None
    # Censoring-free: the most frequent quanta up to the first one never learned. Leaving the
    # never-learned (the rarest, the latest) out of the fit above flattens it; this prefix
    # has none left out.
    order = np.argsort(-freq, kind="stable")
    prefix = order[: int(np.argmin(ok[order])) if not ok.all() else len(order)]
    slope_prefix = float(fits.ols(np.log(1 / freq[prefix]), np.log(s_k[prefix]))[0]) if prefix.size > 2 else None
    return {"alpha_S_all_tokens": full.alpha, "E": full.E, "alpha_S_answer_tokens": alpha_ans,
            "emergence_slope": slope, "emergence_slope_uncensored_prefix": slope_prefix,
            "uncensored_prefix": int(prefix.size), "n_learned_at_end": int(ok.sum()), "n_never_learned": int((~ok).sum()),
            "distinct_emergence_steps": int(np.unique(s_k[ok]).size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=48)
    ap.add_argument("--steps", type=int, default=None, help="default: planted.steps")
    ap.add_argument("--checkpoints", type=int, default=24)
    ap.add_argument("--schedules", default="cosine,constant")
    ap.add_argument("--out", default="bench/out/planted_routes.json")
    args = ap.parse_args()

    base = config.section(config.load_params("params.yaml"), "planted")
    base = dataclasses.replace(base, seed=args.seed, steps=args.steps or base.steps)
    alpha = base.alpha
    freq = np.asarray(make_language(base).freqs, float)  # p_k of quantum k
    steps_at = checkpoints(base.steps, args.checkpoints)
    suite_steps = [s for s in (16, 50, 160, 500, 1500, base.steps) if s in steps_at]
    out = {"seed": args.seed, "width": args.width, "steps": base.steps, "alpha": alpha,
           "predicted": {"alpha_S": alpha / (alpha + 1), "emergence_slope": 1.0}, "schedules": {}}
    for name in args.schedules.split(","):
        cfg = dataclasses.replace(base, min_lr_ratio=1.0) if name == "constant" else base
        t0 = time.perf_counter()
        table = train_and_score(cfg, args.width, steps_at)
        out["schedules"][name] = {
            "suite_checkpoints": routes(table[table["step"].isin(suite_steps)], freq, cfg.warmup_steps),
            "dense_checkpoints": routes(table, freq, cfg.warmup_steps),
            "n_checkpoints": len(table),
            "seconds": round(time.perf_counter() - t0, 1),
            "curve": table[["step", "loss_all", "loss_answers"]].round(5).to_dict("records"),
        }
        r = out["schedules"][name]
        print(f"{name}: suite checkpoints {r['suite_checkpoints']}\n{name}: dense checkpoints {r['dense_checkpoints']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
