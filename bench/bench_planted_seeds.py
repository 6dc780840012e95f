"""Does the planted suite pass its own criteria on every seed, and by how much?

Trains the planted suite of `params.yaml`'s `planted` section (or of --planted overrides) for
each seed, outside DVC, and reports for each seed the acceptance criteria of
`planted_metrics.compute_metrics` (learned on the probe set, mean loss on the Zipf corpus), each
with its margin (how far the measured value lies from failing), and QDG on the largest
model: exact gradients of answers under 0.1 nats, every clustering method of
`pipeline.qdg.clustering` at k = the quanta present, with the answer-token and (previous token,
answer) baselines. One process per seed; run two at once on 2 cores at most.

    python bench/bench_planted_seeds.py --seed 0 --json /tmp/seed0.json
    python bench/bench_planted_seeds.py --seed 1 --planted lr_width_exponent=0 --json /tmp/seed1.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core import config
from pipeline.core.config import ClusterConfig, GradientsConfig  # noqa: E402
from pipeline.lm import models  # noqa: E402
from pipeline.planted import scorecard as planted_metrics  # noqa: E402
from pipeline.planted import suite
from pipeline.qdg import clustering, gradients
from pipeline.qdg import similarity as sim  # noqa: E402


def margins(m: dict) -> dict:
    """Each acceptance criterion's margin: > 0 passes, the smallest step is the one at risk."""
    ml, nl = m["mean_loss_by_size"], m["n_learned_by_size"]
    return {
        "mean_loss_smallest_drop": round(min((a - b for a, b in zip(ml, ml[1:])), default=float("nan")), 4),
        "n_learned_smallest_rise": min((b - a for a, b in zip(nl, nl[1:])), default=None),  # information only
        "n_learned_spearman_minus_0.9": None if m.get("spearman_size_vs_n_learned") is None
        else round(m["spearman_size_vs_n_learned"] - planted_metrics.LEARNED_COUNT_RHO, 3),
        "beta_ci_low": None if not m["learned_count_scaling"]["beta_ci"] else round(m["learned_count_scaling"]["beta_ci"][0], 3),
        "spearman_minus_0.8": None if m["spearman_rank_vs_first_size"] is None else round(m["spearman_rank_vs_first_size"] - 0.8, 3),
        "abruptness_median_minus_0.5": None if m["abruptness"]["median"] is None else round(m["abruptness"]["median"] - 0.5, 3),
    }


def qdg(model, tokens, quanta, losses, n: int, seed: int, methods, save=None) -> dict:
    """Exact non-embedding gradients of n corpus tokens under 0.1 nats; ARI of each method at k present."""
    from sklearn.metrics import adjusted_rand_score

    cand = np.argwhere(np.nan_to_num(losses, nan=np.inf) < suite.LEARNED_LOSS)
    rng = np.random.default_rng(seed)
    if len(cand) > n:
        cand = cand[np.sort(rng.choice(len(cand), n, replace=False))]
    truth = quanta[cand[:, 0], cand[:, 1]]
    samples = {"doc_id": cand[:, 0], "pos": cand[:, 1]}
    docs = {int(d): tokens[d] for d in np.unique(cand[:, 0])}
    res = gradients.compute_gradients(model, samples, docs, GradientsConfig(projection="none", verify=False))
    x = sim.normalise(res.grads.astype(np.float32))
    aff = sim.to_affinity(x @ x.T, "angular")
    k = int(len(np.unique(truth)))
    answer = tokens[cand[:, 0], cand[:, 1]]
    prev = tokens[cand[:, 0], cand[:, 1] - 1]
    out = {"n_samples": int(len(x)), "k": k, "unlabelled": int((truth < 0).sum()),
           "baseline_answer": round(float(adjusted_rand_score(truth, answer)), 4),
           "baseline_prev_answer": round(float(adjusted_rand_score(truth, prev * 100_000 + answer)), 4)}
    if save is not None:
        np.savez_compressed(save, affinity=aff.astype(np.float32), truth=truth, answer=answer, prev=prev)
    for method in methods:
        t = time.perf_counter()
        cfg = ClusterConfig(n_clusters=(k,), method=method)
        # Leiden is scored by its own partition (its number of clusters is the data's), the others at k
        labels = clustering.leiden_natural(aff, cfg) if method == "leiden" else clustering.cluster_at(aff, [k], cfg)[k]
        out[method] = {"ari": round(float(adjusted_rand_score(truth, labels)), 4),
                       "n_clusters": int(labels.max()) + 1,
                       "largest_cluster_share": round(float(np.bincount(labels).max() / len(labels)), 3),
                       "seconds": round(time.perf_counter() - t, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="planted.seed")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--planted", action="append", default=[], metavar="KEY=VALUE", help="override a planted param (YAML value)")
    ap.add_argument("--n-samples", type=int, default=3000, help="QDG samples (0: skip QDG)")
    ap.add_argument("--methods", default=",".join(clustering.METHODS), help="clustering methods, comma-separated")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--save-affinity", type=Path, default=None, help="write the QDG affinity and labels (.npz)")
    args = ap.parse_args()

    import torch
    import yaml

    torch.set_num_threads(1)
    base = config.section(config.load_params(args.params), "planted")
    extra = {}
    for item in args.planted:
        key, sep, value = item.partition("=")
        if not sep or key not in {f.name for f in dataclasses.fields(base)}:
            ap.error(f"--planted {item!r}: expected KEY=VALUE with KEY a planted param (see params.yaml)")
        extra[key] = yaml.safe_load(value)
    extra["seed"] = args.seed
    if "widths" in extra:
        extra["widths"] = tuple(extra["widths"])
    cfg = dataclasses.replace(base, **extra)
    lang = suite.make_language(cfg)
    batches = suite.training_batches(lang, cfg)
    tokens, quanta = suite.eval_docs(lang, cfg)
    probe_tokens, probe_quanta = suite.probe_docs(lang, cfg)
    probe = suite.label_table(probe_quanta)
    probe = probe[probe["quantum"] >= 0]
    labels = suite.label_table(quanta)
    t0 = time.perf_counter()
    losses, probes, sizes, model = {}, {}, {}, None
    for w in cfg.widths:
        model = suite.train_model(lang, cfg, w, batches, desc=f"seed {args.seed} width {w}")
        name = f"w{w}"
        corpus = suite.token_losses(model, tokens)
        losses[(name, "final")] = suite.loss_table(corpus)
        pl = suite.token_losses(model, probe_tokens)[probe["doc_id"], probe["pos"]]
        probes[(name, "final")] = probe.assign(loss=pl)
        sizes[name] = models.param_counts(model)["non_embedding"]
    m = planted_metrics.compute_metrics(labels, suite.quanta_table(lang, quanta), losses, sizes, ["final"],
                                alpha=cfg.alpha, probe=probes)
    out = {
        "planted": {k: v for k, v in dataclasses.asdict(cfg).items() if k in extra or k in ("rule", "n_layers", "lr")},
        "train_seconds": round(time.perf_counter() - t0, 1),
        "n_learned_by_size": m["n_learned_by_size"],
        "mean_loss_by_size": [round(x, 4) for x in m["mean_loss_by_size"]],
        "spearman": m["spearman_rank_vs_first_size"],
        "abruptness_median": m["abruptness"]["median"],
        "beta": m["learned_count_scaling"]["beta"],
        "answer_loss_alpha_N": m["answer_loss_alpha_N"],
        "margins": margins(m),
        "failures": m["acceptance_failures"],
    }
    print(json.dumps(out), flush=True)
    if args.n_samples:
        methods = [x for x in args.methods.split(",") if x]
        out["qdg"] = qdg(model, tokens, quanta, suite.token_losses(model, tokens), args.n_samples, args.seed, methods,
                         save=args.save_affinity)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
