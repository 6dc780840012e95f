"""Helpers that only the tests use: synthetic data and slow references the pipeline itself never calls.

Imported as ``from helpers import ...`` (pytest puts tests/ on sys.path, as for conftest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def devices() -> list:
    """pytest params "cpu" and "cuda" for a test that compares a device's results with the CPU
    fp32 reference: "cuda" is marked gpu and skipped without a CUDA device (bench/gpu_check.py
    runs it on a GPU); "cpu" runs the same test body everywhere, so a GPU test cannot rot unseen."""
    import pytest
    import torch

    no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return [pytest.param("cpu"), pytest.param("cuda", marks=(pytest.mark.gpu, no_cuda))]


def pythia_steps() -> np.ndarray:
    """The 154 published Pythia checkpoint steps, in order: 0, 1, 2, 4, ..., 512, 1000, ..., 143000."""
    return np.array([0] + [2**i for i in range(10)] + list(range(1000, 143001, 1000)), dtype=np.int64)


def predicted_gamma(alpha: float) -> float:
    """The paper's prediction as a pdf exponent of cluster sizes: γ = 1 + 1/(α+1)."""
    from pipeline.laws.cluster_sizes import gamma_from_rank_exponent, predicted_rank_exponent

    return gamma_from_rank_exponent(predicted_rank_exponent(alpha))


def sample_discrete_power_law(gamma: float, xmin: int, size: int, rng: np.random.Generator | int) -> np.ndarray:
    """(size,) int64 draws from the discrete power law p(s) ∝ s^-γ, s >= xmin (γ: pdf exponent)."""
    from pipeline.laws.cluster_sizes import DiscretePowerLawSampler

    rng = np.random.default_rng(rng)
    return DiscretePowerLawSampler(gamma, xmin).sample(size, rng)


def is_cached(spec, *, cache_dir: Optional[str] = "cache/hf") -> bool:
    """Whether the model `spec` (a :class:`pipeline.lm.models.ModelSpec`) loads without the network."""
    from pipeline.lm.models import unavailable_reason

    return unavailable_reason(spec, cache_dir=cache_dir) is None


def read_corpus_tokens(root: str | Path) -> np.ndarray:
    """The planted eval corpus under `root` as (doc, pos) ids, tokenized by the saved tokenizer."""
    from transformers import AutoTokenizer

    from pipeline.planted.suite import PlantedError

    root = Path(root)
    model_dirs = sorted(p for p in (root / "models").glob("*/*") if (p / "tokenizer.json").exists())
    if not model_dirs:
        raise PlantedError(f"no saved tokenizer under {root / 'models'}; run `dvc repro planted` first")
    tok = AutoTokenizer.from_pretrained(model_dirs[0])
    texts = [json.loads(line)["text"] for line in (root / "corpus.jsonl").read_text().splitlines()]
    return np.array(tok(texts, add_special_tokens=False)["input_ids"], dtype=np.int64)


def write_reference_losses(
    root: str | Path, losses_dir: str | Path, models: Sequence[str], revisions: Sequence[str]
) -> None:
    """Per-token losses of every (model, revision) of the planted suite, in the losses layout.

    ``<losses_dir>/model=<m>/revision=<r>/part-00000.parquet`` by the slow reference forward
    (:func:`pipeline.planted.suite.token_losses`): what the losses stage must reproduce; and
    the partition's ``_meta.json`` with the parameter counts, as the losses stage writes it.
    """
    from transformers import GPTNeoXForCausalLM

    from pipeline.core.files import write_meta, write_parquet
    from pipeline.lm import models as models_lib
    from pipeline.lm import partitions
    from pipeline.planted.suite import loss_table, token_losses

    root, losses_dir = Path(root), Path(losses_dir)
    tokens = read_corpus_tokens(root)
    for m in models:
        for r in revisions:
            model = GPTNeoXForCausalLM.from_pretrained(root / "models" / m / r, dtype="float32").eval()
            out = partitions.partition_dir(losses_dir, m, r)
            write_parquet(loss_table(token_losses(model, tokens)), out / "part-00000.parquet")
            write_meta({"model": m, "revision": r, "params": models_lib.param_counts(model)}, out / partitions.META_FILE)
