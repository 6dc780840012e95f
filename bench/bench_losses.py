"""Benchmark: per-token losses, ours (pipeline/lm/losses.py) against the paper's evaluation.

Why: the loss stage runs once per (model, revision) over the whole corpus (the paper:
7 models x 106M tokens), so its throughput decides what a researcher can afford. This
script times, on the same machine, model and documents, in one run:

- ``paper``: a faithful re-implementation of the paper's script (quantization-model,
  experiments/pythia-2/eval.py): one document per forward pass, batch 1, fp32, the
  document truncated to 1024 tokens, ``model(input_ids, attention_mask).logits`` with
  autograd left on (the script has no ``torch.no_grad``), then
  ``cross_entropy(logits[0, :-1], targets[0, 1:], reduction='none').tolist()``;
- ``paper+nograd``: the same under ``torch.inference_mode()``, a stronger baseline, so
  that the speed-up is not just "turned autograd off";
- ``ours``: :func:`pipeline.lm.losses.score_windows`, the core of the loss stage, with the
  stage's default sizes (length-packed batches, hidden states then a chunked
  unembedding + logsumexp cross-entropy; fp32 on CPU, bf16 weights on CUDA).

The documents are dealt into interleaved rounds and every method runs in every round
(rotating order), so that load from other jobs on a shared machine hits all methods alike.

It reports tokens/s, the ratios, the peak memory of each (RSS sampled every 5 ms on
CPU; ``torch.cuda.max_memory_allocated`` on GPU), the largest difference between our
losses and the paper's and its mean (fp32: ~1e-6 nats; bf16 on GPU: the same weights,
rounded), and the fraction of peak bf16 FLOP/s (on GPU, or wherever --peak-tflops is
given; a forward pass costs ~2 N FLOPs per token, N = non-embedding + unembedding
parameters; attention's own FLOPs are left out, so the fraction is a lower bound).

The models have Pythia shapes with random weights (no hub here): losses of a random
model are not meaningful, but the time of a forward pass does not depend on the weights.
Documents are synthetic token ids with a lognormal length distribution whose mean after
truncation at 1024 is 532 tokens, the paper's own (106,396,004 tokens / 200,000 docs).

    python bench/bench_losses.py --threads 1          # CPU: pythia-70m shape, 2-6 min on 2 shared cores
    python bench/bench_losses.py --device cuda --shapes 160m,410m,1b --n-docs 1000
    python bench/bench_losses.py --cluster-overhead   # what a Dask LocalCluster costs one stage
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import PeakRSS  # noqa: E402

from pipeline.core.config import LossesConfig  # noqa: E402
from pipeline.lm import losses  # noqa: E402

# Pythia shapes (hidden, layers, heads); all: vocab 50304, rotary_pct 0.25, max_pos 2048.
SHAPES = {
    "14m": (128, 6, 4),  # the smallest Pythia: gpu_check.py's CPU dry run
    "70m": (512, 6, 8),
    "160m": (768, 12, 12),
    "410m": (1024, 24, 16),
    "1b": (2048, 16, 8),
    "1.4b": (2048, 24, 16),
}
VOCAB = 50304
PAPER_MEAN_TOKENS = 106_396_004 / 200_000  # 532 tokens per document after truncation
# Dense bf16 peak FLOP/s (no sparsity) by device name; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 125.0, "4090": 165.2}


def make_model(shape: str, dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hidden, layers, heads = SHAPES[shape]
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: a 1b shape takes seconds on a CPU
        model = GPTNeoXForCausalLM(cfg)
    return model.to(dtype=dtype).eval()


def forward_params(model: torch.nn.Module) -> int:
    """N in "2 N FLOPs per token": every matmul weight (the input embedding is a lookup)."""
    total = sum(p.numel() for p in model.parameters())
    return total - model.get_input_embeddings().weight.numel()


def lognormal_lengths(n: int, sigma: float, cap: int, rng: np.random.Generator) -> np.ndarray:
    """n document lengths, lognormal(mu, sigma) truncated to [2, cap], with mu chosen so the
    mean truncated length is the paper's 532 tokens (scaled by cap/1024 for other caps)."""
    target = PAPER_MEAN_TOKENS * cap / 1024
    z = np.random.default_rng(12345).standard_normal(200_000)
    lo, hi = 0.0, math.log(cap) + 3
    for _ in range(60):  # bisection on mu: the truncated mean grows with mu
        mu = (lo + hi) / 2
        if np.clip(np.exp(mu + sigma * z), 2, cap).mean() < target:
            lo = mu
        else:
            hi = mu
    return np.clip(np.exp(mu + sigma * rng.standard_normal(n)), 2, cap).astype(np.int64)





def paper_losses(model, docs, device, no_grad: bool) -> list[np.ndarray]:
    """The paper's loop: batch 1, fp32, full logits and cross-entropy per document."""
    out = []
    ctx = torch.inference_mode() if no_grad else torch.enable_grad()
    with ctx:
        for doc in docs:
            input_ids = torch.tensor(doc[None, :1024], device=device)
            attention_mask = torch.ones_like(input_ids)  # the tokenizer returns one
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            targets = input_ids
            ls = torch.nn.functional.cross_entropy(logits[0, :-1, :], targets[0, 1:], reduction="none")
            out.append(np.asarray(ls.tolist(), dtype=np.float32))
    return out


def our_losses(model, docs, args) -> list[np.ndarray]:
    return losses.score_windows(
        model,
        [d[:1024] for d in docs],
        [1] * len(docs),
        batch_tokens=args.batch_tokens,
        logits_chunk=args.logits_chunk,
        autocast=args.autocast,
    )


def timed(fn, device: str) -> dict:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    info = {"seconds": seconds, "peak_rss_bytes": mem.peak, "rss_before_bytes": mem.start}
    if device.startswith("cuda"):
        info["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        info["cuda_before_bytes"] = base
    return {"result": result, **info}


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def bench_shape(shape: str, docs: list[np.ndarray], args) -> dict:
    """Time every method on `docs` with one model shape.

    The documents are dealt into `args.rounds` interleaved subsets; each round runs every
    method on its subset, in a rotating order, and times are summed. On a machine shared
    with other work this spreads the interference evenly over the methods instead of
    handing all of it to whichever ran during a busy minute.
    """
    device = args.device
    n_tokens = int(sum(len(d) - 1 for d in docs))
    row: dict = {"shape": shape, "docs": len(docs), "tokens": n_tokens, "rounds": args.rounds}

    ref_model = make_model(shape, torch.float32, device)
    row["forward_params"] = forward_params(ref_model)
    # ours in the dtype the stage uses on this device: fp32 on CPU, bf16 on CUDA
    dtype = torch.bfloat16 if device.startswith("cuda") and args.autocast != "none" else torch.float32
    # the same weights, rounded: |ours - paper| is then the bf16 error alone
    model = ref_model if dtype == torch.float32 else copy.deepcopy(ref_model).to(dtype)
    runners = {}
    if "paper" not in args.skip:
        runners["paper"] = lambda ds: paper_losses(ref_model, ds, device, no_grad=False)
    if "paper+nograd" not in args.skip:
        runners["paper+nograd"] = lambda ds: paper_losses(ref_model, ds, device, no_grad=True)
    runners["ours"] = lambda ds: our_losses(model, ds, args)
    for fn in runners.values():
        fn(docs[:2])  # warm-up: first-call allocations, kernel selection

    results = {name: [None] * len(docs) for name in runners}
    stats = {name: {"seconds": 0.0, "peak_rss_bytes": 0, "peak_rss_over_start_bytes": 0} for name in runners}
    names = list(runners)
    for r in range(args.rounds):
        idx = list(range(r, len(docs), args.rounds))
        for name in names[r % len(names):] + names[: r % len(names)]:
            m = timed(lambda name=name, idx=idx: runners[name]([docs[i] for i in idx]), device)
            st = stats[name]
            st["seconds"] += m["seconds"]
            st["peak_rss_bytes"] = max(st["peak_rss_bytes"], m["peak_rss_bytes"])
            st["peak_rss_over_start_bytes"] = max(st["peak_rss_over_start_bytes"], m["peak_rss_bytes"] - m["rss_before_bytes"])
            if "peak_cuda_bytes" in m:
                st["peak_cuda_bytes"] = max(st.get("peak_cuda_bytes", 0), m["peak_cuda_bytes"])
                st["peak_cuda_over_start_bytes"] = max(
                    st.get("peak_cuda_over_start_bytes", 0), m["peak_cuda_bytes"] - m["cuda_before_bytes"]
                )
            for i, x in zip(idx, m["result"]):
                results[name][i] = x

    for name, st in stats.items():
        row[name] = dict(st, tokens_per_s=n_tokens / st["seconds"])
    reference = next((results[n] for n in ("paper", "paper+nograd") if n in results), None)
    if reference is not None:
        diffs = np.concatenate([np.abs(a - b) for a, b in zip(reference, results["ours"])])
        row["max_abs_diff_nats"] = float(diffs.max())
        row["mean_abs_diff_nats"] = float(diffs.mean(dtype=np.float64))
    for name in ("paper", "paper+nograd"):
        if name in row:
            row[f"speedup_vs_{name}"] = row["ours"]["tokens_per_s"] / row[name]["tokens_per_s"]
    peak = peak_tflops(args) if device.startswith("cuda") else args.peak_tflops
    if peak is not None or device.startswith("cuda"):
        flops = 2 * row["forward_params"] * row["ours"]["tokens_per_s"]
        row["ours"]["tflops"] = flops / 1e12
        row["ours"]["fraction_of_peak_bf16"] = flops / (peak * 1e12) if peak else None
        row["peak_bf16_tflops"] = peak
    return row


def machine() -> str:
    if args_device_is_cuda():
        return f"{torch.cuda.get_device_name()} ({platform.machine()}), torch {torch.__version__}"
    return _common.machine(f"{torch.get_num_threads()} torch threads", f"torch {torch.__version__}")


_DEVICE = "cpu"


def args_device_is_cuda() -> bool:
    return _DEVICE.startswith("cuda")


def cluster_overhead(args) -> dict:
    """What a LocalCluster costs a loss stage, measured end to end with the real stage code.

    A planted-suite-sized stage (tiny GPT-NeoX, 2000 documents x 64 tokens, the default
    run's shape) is run (a) in-process as one shard, (b) in-process as two shards, and
    (c) on a LocalCluster of two worker processes, one shard each. Then a bare
    LocalCluster of one worker is started, given one task that imports torch and
    transformers (what every worker does before its first shard), and closed.
    """
    import logging
    import tempfile

    import pyarrow as pa
    from distributed import Client, LocalCluster
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from pipeline.core import files
    from pipeline.core.config import CorpusConfig, SuiteConfig
    from pipeline.lm import models

    tmp = Path(tempfile.mkdtemp(prefix="bench_cluster_"))
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=128, rotary_pct=0.25)).save_pretrained(tmp / "model")
    rng = np.random.default_rng(0)
    n_docs, doc_len = 2000, 64
    files.write_parquet(pa.table({
        "doc_id": np.repeat(np.arange(n_docs, dtype=np.int64), doc_len),
        "pos": np.tile(np.arange(doc_len, dtype=np.int32), n_docs),
        "token_id": rng.integers(0, 512, n_docs * doc_len).astype(np.int32),
    }), tmp / "tokens.parquet")
    suite = SuiteConfig(models=("tiny",), sources={"tiny": str(tmp / "model")}, device="cpu", dtype="float32")
    spec = models.spec_from_suite(suite, "tiny", "main")
    half = n_docs * (doc_len - 1) // 2

    def stage(out: str, **kw) -> float:
        cfg = LossesConfig(progress=False, **kw)
        t0 = time.perf_counter()
        losses.run_losses(spec, tmp / "tokens.parquet", tmp / out, losses=cfg, suite=suite, corpus=CorpusConfig(max_len=64))
        return time.perf_counter() - t0

    from pipeline.core import execution as dist

    dist.clear_cache()
    row = {"tokens": n_docs * (doc_len - 1)}
    row["inprocess_1_shard_s"] = stage("a", scheduler="inprocess")  # includes loading the model
    dist.clear_cache()
    row["inprocess_2_shards_s"] = stage("b", scheduler="inprocess", shard_tokens=half)
    row["local_2_workers_2_shards_s"] = stage("c", scheduler="local", n_workers=2, shard_tokens=half)

    def imports() -> int:
        import transformers  # noqa: F401

        return 1

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=logging.WARNING)
    client = Client(cluster)
    t1 = time.perf_counter()
    client.submit(imports, pure=False).result()
    t2 = time.perf_counter()
    client.close()
    cluster.close()
    t3 = time.perf_counter()
    row.update(bare_start_s=t1 - t0, first_task_imports_s=t2 - t1, close_s=t3 - t2, bare_total_s=t3 - t0)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return row


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with the device's defaults filled in (shapes, documents, rounds, sizes)."""
    global _DEVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default=None, help="comma-separated Pythia shapes (default: 70m on CPU, 160m,410m,1b on CUDA)")
    ap.add_argument("--n-docs", type=int, default=None, help="documents (default: 40 on CPU, 1000 on CUDA)")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--sigma", type=float, default=1.3, help="lognormal sigma of document lengths")
    defaults = LossesConfig()
    ap.add_argument("--batch-tokens", type=int, default=defaults.batch_tokens,
                    help="ours: padded tokens per batch (losses.batch_tokens; 0: the device's default)")
    ap.add_argument("--logits-chunk", type=int, default=defaults.logits_chunk,
                    help="ours: rows per unembedding chunk (losses.logits_chunk; 0: the device's default)")
    ap.add_argument("--autocast", default="auto", choices=["auto", "bfloat16", "float16", "none"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip", default="", help="comma-separated methods to skip: paper, paper+nograd")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, TFLOP/s")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 4 on CPU, 1 on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--cluster-overhead", action="store_true", help="measure what a LocalCluster costs a stage, and stop")
    args = ap.parse_args(argv)
    _DEVICE = args.device
    cuda = args.device.startswith("cuda")
    args.shapes = (args.shapes or ("160m,410m,1b" if cuda else "70m")).split(",")
    args.n_docs = args.n_docs or (1000 if cuda else 40)
    args.rounds = max(1, min(args.rounds or (1 if cuda else 4), args.n_docs))
    args.skip = set(filter(None, args.skip.split(",")))
    if not args.cluster_overhead:
        args.batch_tokens, args.logits_chunk = losses.batch_sizes(torch.device(args.device), args.batch_tokens,
                                                                  args.logits_chunk)
    return args


def make_docs(args) -> list[np.ndarray]:
    """args.n_docs synthetic documents: random token ids, lognormal lengths of the paper's mean."""
    rng = np.random.default_rng(args.seed)
    lengths = lognormal_lengths(args.n_docs, args.sigma, args.max_len, rng)
    return [rng.integers(0, VOCAB, size=n).astype(np.int64) for n in lengths]


def main(argv=None) -> None:
    args = parse_args(argv)
    shapes = args.shapes
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.cluster_overhead:
        row = cluster_overhead(args)
        print(f"machine: {machine()}")
        for k, v in row.items():
            print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine(), "argv": sys.argv, "cluster": row}, indent=2) + "\n")
        return

    docs = make_docs(args)
    lengths = np.array([len(d) for d in docs])
    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"docs: {len(docs)}, tokens scored: {int(sum(lengths - 1))}, length mean {lengths.mean():.0f} "
        f"median {np.median(lengths):.0f} max {lengths.max()}; batch_tokens {args.batch_tokens}, "
        f"logits_chunk {args.logits_chunk}"
    )
    rows = []
    for shape in shapes:
        row = bench_shape(shape, docs, args)
        rows.append(row)
        print(f"\n== pythia-{shape} shape ({row['forward_params'] / 1e6:.1f}M forward params) ==")
        for name in ("paper", "paper+nograd", "ours"):
            if name not in row:
                continue
            m = row[name]
            mem = f"peak RSS {m['peak_rss_bytes'] / 2**20:.0f} MiB (+{m['peak_rss_over_start_bytes'] / 2**20:.0f} MiB during the run)"
            if "peak_cuda_bytes" in m:
                mem += (f", peak CUDA {m['peak_cuda_bytes'] / 2**30:.2f} GiB "
                        f"(+{m['peak_cuda_over_start_bytes'] / 2**30:.2f} GiB over the resident models)")
            extra = ""
            if "tflops" in m:
                frac = m["fraction_of_peak_bf16"]
                extra = f", {m['tflops']:.1f} TFLOP/s" + (f" = {100 * frac:.1f}% of bf16 peak" if frac else "")
            print(f"{name:>13}: {m['tokens_per_s']:10.1f} tokens/s  ({m['seconds']:.1f} s), {mem}{extra}")
        for name in ("paper", "paper+nograd"):
            if f"speedup_vs_{name}" in row:
                print(f"speed-up vs {name}: {row[f'speedup_vs_{name}']:.2f}x")
        if "max_abs_diff_nats" in row:
            print(f"|ours - paper|: max {row['max_abs_diff_nats']:.2e}, mean {row['mean_abs_diff_nats']:.2e} nats")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "argv": sys.argv, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
