"""Benchmark: per-token scaling curves (pipeline/laws/scaling.py) on a Pythia-sized suite.

Why: the paper's per-token matrix is 106M tokens x 7 models; the scaling stage classifies
every token (OLS slope and R² against ln N, monogenic emergence, persistence), so it must
be vectorised and bounded in memory. This script times :func:`pipeline.laws.scaling.token_curves`
(plus the population statistics and the output table) on a synthetic float32 matrix of
``--tokens`` x 7 models (default 10^7, a tenth of the paper's) and reports the peak
resident memory (sampled every 5 ms) and its rise over the input matrix alone.

For scale it also times a plain per-token Python loop (np.polyfit and the definitions
written out, as tests/test_scaling.py's reference) on ``--ref-tokens`` tokens and
extrapolates it to the full matrix: the ratio is what vectorising buys, not a comparison
with the paper, which showed example curves only. ``--align`` adds the join of 7 loss
tables on (doc_id, pos) (:func:`pipeline.laws.scaling.align_tokens`, already-sorted inputs, the
usual case: every table lists the same tokens in the same order), whose inputs alone
take ~1.1 GB at 10^7 tokens.

    python bench/bench_scaling.py                     # ~10-30 s on 2 cores; prints the numbers
    python bench/bench_scaling.py --append bench/RESULTS.md      # also appends a section there
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import PeakRSS  # noqa: E402

from pipeline.laws import scaling  # noqa: E402
from pipeline.laws.scaling import ScalingConfig  # noqa: E402

N7 = np.array([18.9e6, 85.1e6, 302e6, 805e6, 1.21e9, 2.52e9, 6.44e9])  # Pythia 70m..6.9b, non-embedding
MODELS = ["70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b"]





def synthetic(T: int, seed: int = 0, chunk: int = 1_000_000) -> np.ndarray:
    """(T, 7) float32 losses: ~10% monogenic steps, ~30% smooth declines in ln N, the rest noise."""
    rng = np.random.default_rng(seed)
    x = np.log(N7) - np.log(N7[0])  # (models,)
    out = np.empty((T, N7.size), np.float32)  # (tokens, models)
    for s in range(0, T, chunk):
        c = min(T, s + chunk) - s
        kind = rng.random(c)
        L = rng.gamma(2.0, 1.2, (c, N7.size)).astype(np.float32)  # "other": unstructured
        poly = kind < 0.3
        slope = rng.uniform(0.2, 1.0, (c, 1))
        L[poly] = (7.0 - slope[poly] * x + rng.normal(0, 0.05, (int(poly.sum()), N7.size)))
        mono = (kind >= 0.3) & (kind < 0.4)
        j = rng.integers(1, N7.size, c)[:, None]
        step = np.where(np.arange(N7.size) < j, rng.uniform(5.2, 9, (c, N7.size)), rng.uniform(0, 0.29, (c, N7.size)))
        L[mono] = step[mono]
        out[s : s + c] = L
    return out


def reference_loop(L: np.ndarray, cfg: ScalingConfig) -> float:
    """Seconds for a per-token Python loop over L's rows (np.polyfit + the definitions)."""
    x = np.log(N7)
    M = N7.size
    t0 = time.perf_counter()
    for row in L.astype(np.float64):
        b, a = np.polyfit(x, row, 1)
        r2 = 1 - np.sum((row - (b * x + a)) ** 2) / np.sum((row - row.mean()) ** 2)
        mono = any(
            all(row[:j] > cfg.mono_high) and all(row[j:] < cfg.mono_low) for j in range(1, M)
        )
        _ = mono or (b < cfg.poly_slope and r2 > cfg.poly_r2)
    return time.perf_counter() - t0


def machine() -> str:
    return _common.machine(f"numpy {np.__version__}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--chunk-tokens", type=int, default=ScalingConfig().chunk_tokens)
    ap.add_argument("--ref-tokens", type=int, default=5_000)
    ap.add_argument("--align", action="store_true", help="also time the join of 7 loss tables")
    ap.add_argument("--append", default="",
                    help="a Markdown file to append a section to (default: none; RESULTS.md keeps the current numbers only)")
    args = ap.parse_args(argv)
    cfg = dataclasses.replace(ScalingConfig(), chunk_tokens=args.chunk_tokens)
    T = args.tokens

    t0 = time.perf_counter()
    L = synthetic(T)
    t_gen = time.perf_counter() - t0
    rss_input = PeakRSS.rss()
    print(f"synthetic matrix {T:,} x {N7.size} float32 ({L.nbytes / 2**20:.0f} MiB) in {t_gen:.1f} s")

    res = {}
    if args.align:
        doc = np.repeat(np.arange(-(-T // 1000), dtype=np.int64), 1000)[:T]
        pos = (np.arange(T) % 1000 + 1).astype(np.int32)
        # Separate arrays per table, as read from separate files (equal, not identical objects).
        docs, poss = [doc.copy() for _ in MODELS], [pos.copy() for _ in MODELS]
        cols = [L[:, j].copy() for j in range(N7.size)]
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            al = scaling.align_tokens(docs, poss, cols, MODELS)
            res["align_s"] = time.perf_counter() - t0
        res["align_peak_rise"] = mem.peak - mem.start
        assert al.losses.shape == L.shape
        del al, doc, pos, docs, poss, cols
        print(f"align_tokens: {res['align_s']:.1f} s, peak RSS rise {res['align_peak_rise'] / 2**20:.0f} MiB")

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        curves = scaling.token_curves(L, N7, cfg)
        t_curves = time.perf_counter() - t0
        stats = scaling.population_stats(curves, MODELS)
        table = scaling.curves_table(np.zeros(T, np.int64), np.ones(T, np.int32), curves, MODELS)
        t_all = time.perf_counter() - t0
    del table
    kinds = stats["kinds"]
    print(f"token_curves: {t_curves:.2f} s ({T / t_curves / 1e6:.2f} M tokens/s); "
          f"+ population_stats + curves_table: {t_all:.2f} s")
    print(f"peak RSS {mem.peak / 2**20:.0f} MiB; over the input matrix: +{(mem.peak - rss_input) / 2**20:.0f} MiB")
    print("kinds: " + ", ".join(f"{k} {v:.3f}" for k, v in kinds.items()))

    t_ref = reference_loop(L[: args.ref_tokens], cfg)
    ref_full = t_ref / args.ref_tokens * T
    print(f"per-token Python loop: {args.ref_tokens / t_ref:,.0f} tokens/s -> {ref_full / 60:.0f} min for {T:,} tokens "
          f"({ref_full / t_curves:,.0f}x slower than token_curves)")

    if args.append:
        cmd = "python " + " ".join(sys.argv if argv is None else ["bench/bench_scaling.py", *argv])
        lines = [
            "",
            "## Per-token scaling curves",
            "",
            f"Machine: {machine()} (2-core CPU, shared with other jobs while measured).",
            f"Command: `{cmd}`",
            "",
            f"- input: synthetic {T:,} tokens x 7 models float32 ({L.nbytes / 2**20:.0f} MiB), "
            f"chunk_tokens {cfg.chunk_tokens:,}",
            f"- `token_curves`: {t_curves:.2f} s ({T / t_curves / 1e6:.2f} M tokens/s); with population "
            f"statistics and the output table: {t_all:.2f} s (budget: 120 s)",
            f"- peak RSS {mem.peak / 2**20:.0f} MiB, of which {(mem.peak - rss_input) / 2**20:.0f} MiB above "
            "the input matrix (chunk temporaries and the output columns)",
            f"- per-token Python loop (np.polyfit), for scale: {args.ref_tokens / t_ref:,.0f} tokens/s, "
            f"{ref_full / 60:.0f} min extrapolated, {ref_full / t_curves:,.0f}x slower",
        ]
        lines.append(f"- process peak RSS (ru_maxrss; synthetic data{' and align inputs' if args.align else ''} "
                     f"included): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
        if args.align:
            lines.append(f"- `align_tokens` of 7 sorted tables: {res['align_s']:.1f} s, "
                         f"peak RSS rise {res['align_peak_rise'] / 2**20:.0f} MiB")
        path = Path(args.append)
        with path.open("a") as f:
            if not path.exists() or path.stat().st_size == 0:
                f.write("# Benchmark results\n")
            f.write("\n".join(lines) + "\n")
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
