"""Shared fixtures: tiny models, tokenizers and corpora that the tests build themselves.

Tests never reach a hub: offline mode is switched on here, before huggingface_hub or
datasets are imported (both read it once, at import). Without it a stray download
would not fail fast but retry for ~25 s per file on a machine with no network.

Fixtures (session-scoped, built once, read-only: copy before modifying):

- ``tiny_tokenizer_dir``: a real byte-level BPE tokenizer (GPT-NeoX style, 300 tokens,
  ``<|endoftext|>`` = id 0) saved with ``save_pretrained``.
- ``tiny_neox_dir``: a random ``GPTNeoXForCausalLM`` (2 layers, d_model 32, 4 heads,
  rotary on a quarter of each head like Pythia, max_position_embeddings 256) plus that
  tokenizer. Like Pythia, the model's vocabulary (320) is padded past the tokenizer's
  (300), so logits have columns no token id reaches.
- ``tiny_revisions_dir``: a Pythia-style multi-revision directory, ``step1/`` and
  ``step2/``, each a GPTNeoX as above with different random weights and its tokenizer.
- ``tiny_corpus_jsonl``: 12 documents, one JSON object per line with "text" and "meta".
  Ids 2 (empty) and 3 (one token) are shorter than 2 tokens and are skipped by the
  corpus stage; id 1 is ~300 tokens (longer than small max_len settings); id 4 holds
  HTML; id 5 is non-ASCII. Total ~850 tokens.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from pytest workers
# run facts (timings, peaks) of outputs written by tests go here, not into the checkout
import tempfile  # noqa: E402

os.environ.setdefault("QUANTA_RUN_LOG", tempfile.mkdtemp(prefix="quanta-runlog-"))

import json
import random
from pathlib import Path

import pytest

# The paper's published acceptance data (its QDG cluster labels, Pythia mean-loss curves).
# Its README asks projects to read it in place, not copy it: tests find it beside the
# checkout (../shared/data) or where QUANTA_DATA points, and skip with a message otherwise.
SHARED_DATA = Path(os.environ.get("QUANTA_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_data(relative: str) -> Path:
    """The published data file `relative` under SHARED_DATA; skips the test when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"published data {relative} not found under {SHARED_DATA} (set QUANTA_DATA to the folder "
                    "that holds original-quanta-clusters/ and pythia-mean-curves/)")
    return path


TOKENIZER_VOCAB = 300
MODEL_VOCAB = 320  # padded past the tokenizer, as Pythia pads 50277 to 50304

_WORDS = (
    "the quick brown fox jumps over lazy dog quanta are discrete skills that models learn one by one "
    "scaling laws emerge from many small steps language model loss drops when a skill is acquired "
    "induction heads copy tokens seen earlier in the context def return import numpy as np"
).split()


def _doc(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words)).capitalize() + "."


def corpus_texts() -> list[str]:
    """The 12 documents of ``tiny_corpus_jsonl``, in order (see the module docstring)."""
    rng = random.Random(0)
    docs = [
        "The quick brown fox jumps over the lazy dog.",
        " ".join(_doc(rng, 12) for _ in range(7)),  # ~300 tokens
        "",
        "a",
        "<script>alert('quanta')</script> <b>bold</b> & 'quoted' text",
        "naïve café — 量子 quanta ✓",
    ]
    docs += [_doc(rng, n) for n in (5, 20, 35, 8, 50, 15)]
    return docs


def make_tokenizer(path: Path) -> Path:
    """Train and save the tiny byte-level BPE tokenizer; returns `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts() * 4 + [" ".join(_WORDS)] * 8, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    hf.save_pretrained(path)
    return path


def make_neox(path: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """Save a random tiny GPTNeoXForCausalLM (and the tokenizer) to `path`; returns `path`."""
    import shutil

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    kwargs = dict(
        vocab_size=MODEL_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=256,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**kwargs)).eval()
    model.save_pretrained(path)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, Path(path) / f.name)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_neox_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return make_neox(tmp_path_factory.mktemp("tiny_neox"), tiny_tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_revisions_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("tiny_revisions")
    for seed, rev in enumerate(["step1", "step2"], start=1):
        make_neox(root / rev, tiny_tokenizer_dir, seed=seed)
    return root


@pytest.fixture(scope="session")
def tiny_corpus_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_corpus") / "corpus.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, text in enumerate(corpus_texts()):
            f.write(json.dumps({"text": text, "meta": {"source": "tiny", "i": i}}, ensure_ascii=False) + "\n")
    return path
