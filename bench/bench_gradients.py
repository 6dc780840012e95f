"""Benchmark: per-token loss gradients for QDG, ours (pipeline/qdg/gradients.py) against the paper's blocks of 250.

Why: QDG turns N selected tokens into an N x N cosine-similarity matrix of their
per-token loss gradients. The paper (quantization-model,
experiments/clustering-0/compute_similarity_full_more.py) could not keep 10,000 full
gradients in memory, so it walked the matrix in blocks of 250 samples and recomputed
every j-block for every i-block: 250 * (40 + 40 * 41 / 2) = 215,000 backward passes for
10,000 samples, ~21.5 per sample. This script times, on the same machine, model,
samples, contexts and parameter set, in one run:

- ``reference``: that loop, written out plainly (:func:`paper_similarity`). For each
  sample, batch size 1: ``model.zero_grad()``, ``model(input_ids, attention_mask).logits``
  on its own context (the document up to and including the target token; ``--ref-input
  document`` feeds the whole document as the paper's script did, which gives the same
  gradient at a higher cost), ``cross_entropy(logits[0, :-1], ids[0, 1:],
  reduction='none')`` (the next-token shift) and ``.backward()`` of the target's entry;
  the ``.grad`` of every parameter except embeddings, unembedding and layer norms,
  concatenated into one fp32 vector; rows L2-normalised. For every block i and every
  block j >= i the j-block's gradients are recomputed (j == i included, never cached
  across i), and ``C[i, j] = Gi @ Gj.T``, ``C[j, i] = C[i, j].T``. As in the paper's
  script, every parameter keeps ``requires_grad`` (so autograd also computes the
  embedding and unembedding gradients it then ignores). Two things of the script are left
  out, both of which only make the reference faster: tokenising each document inside the
  loop, and the second matrix ``C_abs = |Gi| @ |Gj|.T`` that it also filled. One thing is
  changed to keep the parameter set the same as ours: the script's name filter
  (``'layernorm' not in name and 'embed' not in name``) lets GPT-NeoX's
  ``final_layer_norm`` through (and, with transformers >= 5, which renamed ``embed_out``
  to ``lm_head``, the unembedding too); here the set is chosen by module (not the input
  embedding, the unembedding or any LayerNorm) and checked to equal ours.
- ``ours-exact``: :func:`pipeline.qdg.gradients.compute_gradients` with ``projection: none``
  (each exact gradient computed once, many targets per forward/backward), rows
  L2-normalised, then ``C = G @ G.T`` in fp32, upper-triangle blocks mirrored (the same
  ``N^2 P`` matmul FLOPs as the reference's block pairs).
- ``ours-sjlt``: the same with the stage default, a sparse JL projection to k = 8192;
  rows normalised by their projected norms, so C holds the estimated cosines.
- ``ours-logra`` (optional, ``--methods ...,ours-logra``): the same with the per-layer
  factored projection (``projection: logra``, at most k dimensions).
- ``ours-tensorsketch`` (optional): the same with ``projection: tensorsketch`` (weights
  sketched from layer inputs and output gradients, never formed; k dimensions).

Every method runs in its own child process (``--method``), which builds the model,
warms up on a few samples (excluded from the time), then times only the computation:
samples -> C, with C left where it was computed (for CUDA after a synchronize). Each
child reports its peak resident memory from ``getrusage(RUSAGE_SELF).ru_maxrss``
(torch, the model and the warm-up included; ``rss_before`` is the RSS just before the
timed part) and on CUDA ``torch.cuda.max_memory_allocated``. ``--inprocess`` runs the
methods in this process instead (faster start, for the smoke test) and samples the RSS
every 5 ms during each method.

Agreement: max |C_ours-exact - C_reference| over all entries (fp32: ~1e-6), and for
sjlt the mean and 99.9th percentile of |C_sjlt - C_exact| over the off-diagonal pairs
(C_exact: ours-exact, or the reference where ours-exact was not run).

FLOPs (printed as TFLOP/s, and as a fraction of ``--peak-tflops`` when given) count the
minimum work, the same for every method, not what a method actually executes: per sample
with a context of T tokens, ``6 P T + 4 V H`` (P = non-embedding parameters; 2 P T
forward, 2 P T backward to the activations, 2 P T the sample's own weight-gradient outer
products ``sum_t g_t x_t^T``; V H the unembedding row of the one target, forward and
backward), plus ``N^2 D`` for the upper triangle of ``G G^T`` (D: the vector length,
P_selected or k). Attention's T^2 terms are left out, so fractions are lower bounds. The
reference's recomputation is not counted as useful work.

Models: GPT-NeoX with random weights (no hub here) in Pythia's configuration
(rotary_pct 0.25, parallel residual, untied unembedding), fp32. Default ``--shape
planted``: the largest planted-suite model's shape (hidden 48, 2 layers, 2 heads,
intermediate 192, vocab 300, 32 positions), documents of 32 random tokens. Samples:
N distinct (document, position >= 1) targets drawn at random from N / 4 documents, so a
document holds several targets, as the selection stage produces.

    python bench/bench_gradients.py --threads 1                    # CPU default: planted shape, N = 10,000
    python bench/bench_gradients.py --shape pythia-14m --n 2000    # hidden 128, 6 layers, vocab 50304, 128 tokens
    python bench/bench_gradients.py --device cuda --n 2000 --peak-tflops 67   # pythia-70m shape, context 1024
    python bench/bench_gradients.py --quick                        # N = 500, a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere in the repo
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import PeakRSS  # noqa: E402

# name -> GPTNeoXConfig sizes; "context": document length in tokens (targets at 1..context-1)
SHAPES = {
    "planted": dict(hidden=48, layers=2, heads=2, intermediate=192, vocab=300, max_pos=32, context=32),
    "pythia-14m": dict(hidden=128, layers=6, heads=4, intermediate=512, vocab=50304, max_pos=2048, context=128),
    "pythia-70m": dict(hidden=512, layers=6, heads=8, intermediate=2048, vocab=50304, max_pos=2048, context=1024),
    "pythia-160m": dict(hidden=768, layers=12, heads=12, intermediate=3072, vocab=50304, max_pos=2048, context=1024),
}
METHODS = ("reference", "ours-exact", "ours-sjlt")  # the default run
PROJECTED = {"ours-sjlt": "sjlt", "ours-logra": "logra", "ours-tensorsketch": "tensorsketch"}  # method -> gradients.projection


# --------------------------------------------------------------------------- inputs


def make_model(shape: str, device: str, seed: int):
    """A random-weight GPT-NeoX of `shape`, fp32, eval mode, on `device`."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    s = SHAPES[shape]
    cfg = GPTNeoXConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        intermediate_size=s["intermediate"],
        max_position_embeddings=s["max_pos"],
        rotary_pct=0.25,  # Pythia's
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(cfg).float().eval().to(device)


def make_samples(n: int, context: int, vocab: int, per_doc: float, seed: int):
    """(docs (n_docs, context) int64, doc_ids (n,), positions (n,)): n distinct targets at
    positions 1..context-1 of ceil(n / per_doc) random documents, in random order."""
    rng = np.random.default_rng(seed)
    n_docs = max(1, math.ceil(n / per_doc))
    slots = context - 1  # target positions per document
    if n > n_docs * slots:
        raise SystemExit(f"{n} samples do not fit in {n_docs} documents of {context} tokens")
    docs = rng.integers(0, vocab, size=(n_docs, context)).astype(np.int64)
    flat = rng.choice(n_docs * slots, size=n, replace=False)
    return docs, (flat // slots).astype(np.int64), (flat % slots + 1).astype(np.int64)


def paper_param_names(model) -> list[str]:
    """The paper's parameter set, by name: every parameter but the input embedding, the
    unembedding and the layer norms (input_layernorm, post_attention_layernorm,
    final_layer_norm). By module, not by name: transformers 5 renamed GPT-NeoX's
    ``embed_out`` to ``lm_head``, which the script's ``'embed' not in name`` would keep."""
    import torch

    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            skip.update(id(p) for p in m.parameters(recurse=False))
    return [n for n, p in model.named_parameters() if id(p) not in skip]


# --------------------------------------------------------------------------- the reference


def paper_similarity(model, docs, doc_ids, positions, block: int, ref_input: str = "context", stats: dict | None = None):
    """The paper's QDG similarity matrix: (N, N) fp32 on the model's device.

    Blocks of `block` samples; for every block i and every block j >= i both blocks'
    gradients are computed afresh (one forward + backward at batch 1 per sample),
    normalised, and multiplied. `stats` (if given) gets the backward-pass count and the
    seconds spent in gradient loops and in block matmuls.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    names = paper_param_names(model)
    params = dict(model.named_parameters())
    n_grad = sum(params[n].numel() for n in names)  # P_selected
    N = len(doc_ids)
    blocks = [list(range(s, min(N, s + block))) for s in range(0, N, block)]
    counts = {"backward_passes": 0, "grad_s": 0.0, "matmul_s": 0.0}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def block_gradients(idx: list[int]) -> torch.Tensor:
        """(len(idx), P_selected) normalised gradients, one backward pass per sample."""
        t0 = time.perf_counter()
        G = torch.zeros(len(idx), n_grad, device=device)
        for r, s in enumerate(idx):
            model.zero_grad()
            doc = docs[doc_ids[s]]
            tokens = doc if ref_input == "document" else doc[: positions[s] + 1]  # context + target
            ids = torch.as_tensor(tokens, device=device)[None]  # (1, pos)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (1, pos, vocab)
            # next-token shift: logits at t predict token t + 1
            ls = F.cross_entropy(logits[0, :-1, :], ids[0, 1:], reduction="none")  # (pos - 1,) nats
            ls[positions[s] - 1].backward()  # the target's own loss
            G[r] = torch.cat([params[n].grad.flatten() for n in names])
            counts["backward_passes"] += 1
        G = F.normalize(G, p=2, dim=1)
        sync()
        counts["grad_s"] += time.perf_counter() - t0
        return G

    C = torch.zeros(N, N, device=device)
    for bi, iblock in enumerate(blocks):
        Gi = block_gradients(iblock)
        i0 = iblock[0]
        for jblock in blocks[bi:]:
            Gj = block_gradients(jblock)  # recomputed for every i, as in the paper
            t0 = time.perf_counter()
            j0 = jblock[0]
            Cij = Gi @ Gj.T  # (block, block)
            C[i0 : i0 + len(iblock), j0 : j0 + len(jblock)] = Cij
            C[j0 : j0 + len(jblock), i0 : i0 + len(iblock)] = Cij.T
            sync()
            counts["matmul_s"] += time.perf_counter() - t0
            del Gj
    if stats is not None:
        stats.update(counts, vector_dim=n_grad)
    return C


def reference_counts(n: int, block: int) -> tuple[int, int]:
    """(backward passes, block products) of :func:`paper_similarity` on n samples: every
    i-block once, plus every j-block with j >= i, recomputed. n = 10,000, block = 250:
    (215,000, 820)."""
    sizes = [min(block, n - a) for a in range(0, n, block)]
    passes = sum(sizes[i] + sum(sizes[i:]) for i in range(len(sizes)))
    return passes, len(sizes) * (len(sizes) + 1) // 2


# --------------------------------------------------------------------------- ours


def gradients_config(projection: str, k: int):
    try:
        from pipeline.qdg import gradients

        cls = gradients.GradientsConfig
    except (ImportError, AttributeError):  # it may move to pipeline.core.config
        from pipeline.core.config import GradientsConfig as cls
    return cls(projection=projection, k=k)


def gram_upper(G, block: int = 2048):
    """C = G @ G.T (N, N) from its upper-triangle row blocks, mirrored: N^2 D FLOPs."""
    import torch

    N = G.shape[0]
    C = torch.empty(N, N, dtype=G.dtype, device=G.device)
    for a in range(0, N, block):
        b = min(N, a + block)
        part = G[a:b] @ G[a:].T  # (b - a, N - a)
        C[a:b, a:] = part
        C[b:, a:b] = part[:, b - a :].T
    return C


def our_similarity(model, docs, doc_ids, positions, projection: str, k: int, stats: dict | None = None,
                   calibrations: dict | None = None):
    """Ours: each gradient once (pipeline.qdg.gradients), normalised rows, one fp32 Gram matrix.

    calibrations: kept between calls on one model, so the memory planner measures it once, as
    the stage does once per process (None: measured in this call, and timed with it)."""
    import torch

    from pipeline.qdg import gradients

    device = next(model.parameters()).device
    t0 = time.perf_counter()
    cfg = gradients_config(projection, k)
    samples = {"doc_id": doc_ids, "pos": positions}
    tokens_by_doc = {int(d): docs[d] for d in np.unique(doc_ids)}
    res = gradients.compute_gradients(model, samples, tokens_by_doc, cfg, calibrations=calibrations)
    t1 = time.perf_counter()
    G = torch.from_numpy(res.grads).to(device)  # (N, D) fp32; on CPU this shares the array
    G.div_(G.norm(dim=1, keepdim=True).clamp_min(1e-30))
    C = gram_upper(G)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if stats is not None:
        stats.update(grad_s=t1 - t0, matmul_s=time.perf_counter() - t1, backward_passes=None,
                     vector_dim=int(G.shape[1]), bad_samples=int(res.bad.sum()), projection=res.projection)
    return C


# --------------------------------------------------------------------------- one method, timed


def useful_flops(model, positions, vector_dim: int) -> float:
    """Minimum work of samples -> C (module docstring): sum_s (6 P T_s + 4 V H) + N^2 D."""
    from pipeline.lm.models import param_counts

    P = param_counts(model)["non_embedding"]
    V, H = model.get_output_embeddings().weight.shape
    T = positions.astype(np.float64)  # context tokens 0..pos-1
    return float((6 * P * T + 4 * V * H).sum() + len(positions) ** 2 * vector_dim)


def run_method(method: str, args, out_dir: Path, isolated: bool) -> dict:
    """Build the model and samples, warm up, time `method`; C goes to out_dir/<method>.npy."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline.qdg import gradients

    model = make_model(args.shape, args.device, args.seed)
    ours = {n for n, _ in gradients.select_params(model)}
    if set(paper_param_names(model)) != ours:  # "same parameter set for both", checked
        raise SystemExit(f"parameter sets differ: {sorted(set(paper_param_names(model)) ^ ours)}")
    docs, doc_ids, positions = make_samples(args.n, args.context, SHAPES[args.shape]["vocab"], args.per_doc, args.seed)
    cuda = args.device.startswith("cuda")

    def go(d, p, stats=None):
        if method == "reference":
            return paper_similarity(model, docs, d, p, args.block, args.ref_input, stats)
        return our_similarity(model, docs, d, p, PROJECTED.get(method, "none"), args.k, stats)

    # warm-up (not timed): first-call allocations, kernel choice, the projector's tables
    w = min(len(doc_ids), 8 if method == "reference" else 64)
    go(doc_ids[:w], positions[:w])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = PeakRSS.rss()
    stats: dict = {}
    load0 = os.getloadavg()[0]
    with PeakRSS() as sampled:
        t0 = time.perf_counter()
        C = go(doc_ids, positions, stats)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    row = dict(
        method=method,
        seconds=seconds,
        samples_per_s=len(doc_ids) / seconds,
        rss_before_bytes=before,
        peak_rss_sampled_bytes=sampled.peak,
        load_avg_1min=[load0, os.getloadavg()[0]],
        **stats,
    )
    if isolated:  # the child's whole life: torch, the model, warm-up and the timed run
        row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        row["peak_rss_kind"] = "ru_maxrss of its own process"
    else:
        row["peak_rss_bytes"] = sampled.peak
        row["peak_rss_kind"] = "sampled RSS of the shared process during the method"
    if cuda:
        row["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    flops = useful_flops(model, positions, stats["vector_dim"])
    row["useful_tflops"] = flops / seconds / 1e12
    if args.peak_tflops:
        row["fraction_of_peak"] = row["useful_tflops"] / args.peak_tflops
    np.save(out_dir / f"{method}.npy", C.cpu().numpy())
    del C
    return row


# --------------------------------------------------------------------------- agreement


def agreement(out_dir: Path, methods: list[str], n: int, rows: int = 512) -> dict:
    """Compare the saved C matrices, row block by row block (memory-mapped)."""
    C = {m: np.load(out_dir / f"{m}.npy", mmap_mode="r") for m in methods}
    res: dict = {}
    if "reference" in C and "ours-exact" in C:
        res["max_abs_diff_exact_vs_reference"] = float(max(
            np.abs(C["ours-exact"][a : a + rows] - C["reference"][a : a + rows]).max() for a in range(0, n, rows)
        ))
    exact = "ours-exact" if "ours-exact" in C else "reference" if "reference" in C else None
    for method, kind in PROJECTED.items():
        if method not in C or exact is None or n < 2:
            continue
        diffs = np.empty(n * (n - 1) // 2, dtype=np.float32)  # |C_projected - C_exact| over pairs i < j
        at = 0
        for a in range(0, n, rows):
            b = min(n, a + rows)
            d = np.abs(C[method][a:b] - C[exact][a:b])  # (b - a, n)
            for r in range(b - a):
                i = a + r
                diffs[at : at + n - i - 1] = d[r, i + 1 :]
                at += n - i - 1
        res[f"{kind}_vs"] = exact
        res[f"{kind}_mae"] = float(diffs.mean(dtype=np.float64))
        res[f"{kind}_p999"] = float(np.quantile(diffs, 0.999))
        res[f"{kind}_max"] = float(diffs.max())
    return res


# --------------------------------------------------------------------------- driver


def machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name()} ({platform.machine()}), torch {torch.__version__}"
    return _common.machine()


def child_argv(args, method: str, out_dir: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--method", method, "--workdir", str(out_dir),
            "--shape", args.shape, "--n", str(args.n), "--context", str(args.context), "--per-doc", str(args.per_doc),
            "--block", str(args.block), "--k", str(args.k), "--device", args.device, "--threads", str(args.threads),
            "--seed", str(args.seed), "--ref-input", args.ref_input]
    if args.peak_tflops:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    return argv


def exact_fits(args) -> tuple[bool, str]:
    """Whether ours-exact's (N, P_selected) fp32 matrix fits in half the memory there is."""
    s = SHAPES[args.shape]
    h, i, L = s["hidden"], s["intermediate"], s["layers"]
    p_sel = L * (3 * h * h + 3 * h + h * h + h + 2 * h * i + i + h)  # qkv, dense, the MLP; weights and biases
    need = args.n * p_sel * 4
    if args.device.startswith("cuda"):
        import torch

        have = torch.cuda.get_device_properties(torch.device(args.device)).total_memory
    else:
        with open("/proc/meminfo") as f:
            have = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable"))
    return need <= have / 2, f"N x P_selected fp32 = {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"


def fmt_bytes(b) -> str:
    return f"{b / 2**20:,.0f} MiB"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default=None, choices=list(SHAPES), help="default: planted on CPU, pythia-70m on CUDA")
    ap.add_argument("--n", type=int, default=None, help="samples (default 10,000; --quick: 500)")
    ap.add_argument("--quick", action="store_true", help="N = 500 unless --n is given: a smoke run")
    ap.add_argument("--context", type=int, default=None, help="document length in tokens (default: the shape's)")
    ap.add_argument("--per-doc", type=float, default=4.0, help="targets per document, on average")
    ap.add_argument("--block", type=int, default=250, help="the reference's block of samples (the paper: 250)")
    ap.add_argument("--k", type=int, default=8192, help="sjlt projection dimension (the stage default)")
    ap.add_argument("--ref-input", default="context", choices=["context", "document"],
                    help="reference forward on the context up to the target (default) or the whole document (the script)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, of {', '.join(METHODS)} (and optional ours-logra, ours-tensorsketch)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per method (0: torch's default)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for fp32 work, TFLOP/s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inprocess", action="store_true", help="run the methods in this process (no per-method ru_maxrss)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.shape = args.shape or ("pythia-70m" if cuda else "planted")
    args.n = args.n or (500 if args.quick else 10_000)
    args.context = args.context or SHAPES[args.shape]["context"]
    if args.context > SHAPES[args.shape]["max_pos"]:
        raise SystemExit(f"--context {args.context} is longer than the {args.shape} shape's {SHAPES[args.shape]['max_pos']} positions")

    if args.method:  # child: one method, results as JSON on the last line of stdout
        row = run_method(args.method, args, Path(args.workdir), isolated=True)
        print(json.dumps(row))
        return row

    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS + tuple(PROJECTED):
            raise SystemExit(f"unknown method {m!r}; use {', '.join(dict.fromkeys(METHODS + tuple(PROJECTED)))}")
    notes = []
    if "ours-exact" in methods:
        fits, why = exact_fits(args)
        if not fits:
            methods.remove("ours-exact")
            notes.append(f"ours-exact skipped: {why}")
    s = SHAPES[args.shape]
    result: dict = {
        "machine": machine(args.device),
        "command": " ".join(["python", *(sys.argv if argv is None else ["bench/bench_gradients.py", *argv])]),
        "n": args.n,
        "shape": dict(s, name=args.shape, context=args.context),
        "n_docs": math.ceil(args.n / args.per_doc),
        "block": args.block,
        "k": args.k,
        "threads": args.threads,
        "device": args.device,
        "ref_input": args.ref_input,
        "reference_backward_passes_expected": None,
        "methods": {},
        "notes": notes,
    }
    result["reference_backward_passes_expected"] = reference_counts(args.n, args.block)[0]
    print(f"machine: {result['machine']}")
    print(f"command: {result['command']}")
    print(f"N = {args.n} samples over {result['n_docs']} documents of {args.context} tokens; shape {args.shape} "
          f"(hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads, intermediate {s['intermediate']}, "
          f"vocab {s['vocab']}); reference blocks of {args.block}: "
          f"{result['reference_backward_passes_expected']:,} backward passes; sjlt k = {args.k}")
    for note in notes:
        print(note)

    with tempfile.TemporaryDirectory(prefix="bench_gradients_") as tmp:
        out_dir = Path(tmp)
        for m in methods:
            print(f"running {m} ...", flush=True)
            if args.inprocess:
                row = run_method(m, args, out_dir, isolated=False)
            else:
                proc = subprocess.run(child_argv(args, m, out_dir), capture_output=True, text=True, cwd=ROOT)
                if proc.returncode:
                    sys.stderr.write(proc.stdout + proc.stderr)
                    raise SystemExit(f"{m} failed (exit {proc.returncode})")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            result["methods"][m] = row
        result["agreement"] = agreement(out_dir, methods, args.n)

    ms = result["methods"]
    if "reference" in ms:
        for m in ("ours-exact", *PROJECTED):
            if m in ms:
                result[f"speedup_{m}"] = ms[m]["samples_per_s"] / ms["reference"]["samples_per_s"]
    print()
    print("| method | seconds | samples/s | x reference | gradients / s | grads : matmul s | peak RSS (before timed part) |"
          + (" peak CUDA | useful TFLOP/s |" if cuda else ""))
    print("| --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if cuda else ""))
    for m, r in ms.items():
        n_grads = r["backward_passes"] or args.n
        ratio = f"{result[f'speedup_{m}']:.1f}x" if f"speedup_{m}" in result else "1"
        line = (f"| {m} | {r['seconds']:.1f} | {r['samples_per_s']:.1f} | {ratio} | {n_grads / r['grad_s']:.0f} | "
                f"{r['grad_s']:.1f} : {r['matmul_s']:.1f} | {fmt_bytes(r['peak_rss_bytes'])} ({fmt_bytes(r['rss_before_bytes'])}) |")
        if cuda:
            frac = f" = {100 * r['fraction_of_peak']:.1f}% of peak" if "fraction_of_peak" in r else ""
            line += f" {r['peak_cuda_bytes'] / 2**30:.2f} GiB | {r['useful_tflops']:.2f}{frac} |"
        print(line)
    a = result["agreement"]
    if "max_abs_diff_exact_vs_reference" in a:
        print(f"max |C_ours-exact - C_reference| = {a['max_abs_diff_exact_vs_reference']:.2e}")
    for kind in PROJECTED.values():
        if f"{kind}_mae" in a:
            print(f"{kind} (k = {args.k}) vs {a[f'{kind}_vs']}, off-diagonal pairs: mean |dC| = {a[f'{kind}_mae']:.4f}, "
                  f"99.9th percentile = {a[f'{kind}_p999']:.4f}, max = {a[f'{kind}_max']:.4f}")
    print("(model build and warm-up are not timed; each method ran in "
          + ("this process)" if args.inprocess else "its own process, peak RSS = its ru_maxrss)"))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
