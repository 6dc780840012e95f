"""The embedded planted-quanta suite: a synthetic language with known quanta, and models trained on it.

Why it exists: the pipeline's claims (losses fall with size, skills are acquired one by one in
frequency order, gradient clusters are the skills) cannot be checked on Pythia, whose quanta
nobody knows. Here we plant them. The language has K quanta; quantum k is used on a fraction
p_k ∝ k^-(alpha+1) of instances, as the quantization model assumes. A family of GPT-NeoX
models of log-spaced width is trained on it and saved in Hugging Face format with
Pythia-style ``stepN`` revisions, so every later stage runs exactly the code path a Pythia run
uses, and the ground truth (which token is governed by which quantum) lets us score it.

The default language (``rule: pair``). Quantum k owns two cue words u_k, v_k. A document is
``doc_len`` tokens of uniform filler with ``quanta_per_doc`` three-token blocks, each with
equal odds

    u_k v_k !        a key of quantum k (label k on "!"; filler instead with prob. answer_noise)
    u_k v_j w        a decoy: j another quantum, w filler
    u_j v_k w        the other decoy

so neither cue alone predicts "!": a quantum is one two-word pattern to recognise, worth p_k
of the loss, and a model of limited width holds a limited number of them. Every quantum
answers the same word, so the answer token says nothing about the quantum (answer-token
baseline ARI 0), and one quantum's answers share one context pattern, so their gradients
agree (cosine 0.99 within a quantum, 0.25 between). The answer noise keeps a learned "!"
near 0.01 nats, above float32's resolution, so its gradient is signal, not rounding.
One layer by default: a second layer spreads the gradient over context-dependent attention.

Two more rules are options (``table``, ``gate``): there quantum k is a trigger word Q_k
after an argument x_j, answered by a per-quantum table (``table``) or one word on some
arguments (``gate``). On ``table`` a quantum is n_args facts with different answers, and
QDG separates the facts, not the quanta. docs/planted-languages.md has the measurements of
every language tried.

"Learned" (>= 90% of a quantum's answers under 0.1 nats) is decided on the probe set
(:func:`probe_docs`): held-out documents with ``n_probe`` instances of every quantum, as the
paper measured each sparse-parity subtask on its own test set. In the Zipf corpus most
quanta have 1-3 answers, and "learned" there is noise.

Positions follow the losses tables: the label at ``pos`` belongs to token ``pos``, whose loss is
predicting it from tokens ``0..pos-1``. Only answer tokens carry a quantum label (-1 elsewhere).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from pipeline.config import PlantedConfig, SuiteConfig, step_of, to_dict
from pipeline import layout
from pipeline.errors import QuantaError
from pipeline.io import atomic_path, read_meta, run_log_path, split_run, write_json, write_meta, write_parquet

EOS = "<|endoftext|>"  # Pythia's bos/eos/unk token, id 0 as in Pythia
PAD = "<|padding|>"  # Pythia's padding token, id 1 as in Pythia

# What "learned" means for a quantum: at least LEARNED_FRACTION of its answer tokens under
# LEARNED_LOSS nats (on the probe set; the paper scored each sparse-parity subtask alike).
LEARNED_LOSS = 0.1
LEARNED_FRACTION = 0.9

# Bump when the language or the training loop changes meaning, so that a resumed run never
# reuses a model trained by older code (models/<name>/train.json records it).
FORMAT_VERSION = 4  # 4: saved JSON files without transformers_version


RULES = ("pair", "table", "gate")


class PlantedError(QuantaError, ValueError):
    """A planted-suite problem (bad revision name, inconsistent params), in one line."""


# --------------------------------------------------------------------------- the language


@dataclasses.dataclass(frozen=True)
class Language:
    """Vocabulary and rules of the planted language. All ``*_ids`` are tokenizer ids."""

    vocab: tuple[str, ...]  # token id -> string
    filler_ids: np.ndarray  # (n_filler,)
    arg_ids: np.ndarray  # (n_args,) table/gate; (0,) for pair
    trigger_ids: np.ndarray  # (n_quanta,) trigger_ids[k] is quantum k's own word (pair: its first cue u_k)
    answer_ids: np.ndarray  # (n_answers,); pair: (1,), the shared answer "!"
    table: np.ndarray  # (n_quanta, n_args) answer index of quantum k on argument j; -1: filler follows
    freqs: np.ndarray  # (n_quanta,) p_k, sums to 1, decreasing in k
    doc_len: int
    quanta_per_doc: int
    rule: str = "table"
    answer_noise: float = 0.0  # an answer replaced by filler with this probability
    partner_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # pair: (n_quanta,) partner_ids[k] is quantum k's second cue v_k

    @property
    def n_quanta(self) -> int:
        return len(self.trigger_ids)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def zipf_frequencies(n_quanta: int, alpha: float) -> np.ndarray:
    """p_k ∝ k^-(alpha+1) for k = 1..n_quanta, normalised; (n_quanta,) float64."""
    k = np.arange(1, n_quanta + 1, dtype=np.float64)
    p = k ** -(alpha + 1.0)
    return p / p.sum()


def check_config(cfg: PlantedConfig) -> None:
    """Reject planted params that cannot make a well-formed language or suite (one line)."""
    problems = []
    if cfg.n_quanta < 1:
        problems.append("planted.n_quanta must be >= 1")
    if cfg.alpha <= 0:
        problems.append("planted.alpha must be > 0 (p_k ∝ k^-(alpha+1) must fall with k)")
    if cfg.n_filler < 1 or cfg.n_answers < 2:
        problems.append("planted.n_filler must be >= 1 and n_answers >= 2")
    if cfg.rule not in RULES:
        problems.append(f"planted.rule must be one of {list(RULES)}, got {cfg.rule!r}")
    if cfg.rule == "pair" and cfg.n_quanta < 2:
        problems.append("planted.n_quanta must be >= 2 for rule pair (a decoy pairs one quantum's cue with another's)")
    if cfg.rule == "table" and cfg.n_args != cfg.n_answers:
        problems.append(
            "planted.n_args must equal n_answers (each quantum's table is a permutation of the answers, "
            "so neither the trigger nor the argument alone tells the answer)"
        )
    if cfg.rule == "gate" and not 1 <= cfg.n_active < cfg.n_args:
        problems.append("planted.n_active must be in 1..n_args - 1 (a gate quantum answers on some arguments, not all)")
    if not 0 <= cfg.answer_noise < 1:
        problems.append("planted.answer_noise must be in [0, 1)")
    if not 0 <= cfg.distinct_from_top <= cfg.n_answers // 2:
        problems.append("planted.distinct_from_top must be in 0..n_answers // 2 (tables avoid that many others per argument)")
    if cfg.rule != "pair" and not 1 <= cfg.quanta_per_doc <= cfg.n_args:
        problems.append("planted.quanta_per_doc must be in 1..n_args (no (quantum, argument) pair repeats in a document)")
    if cfg.doc_len < 3 * cfg.quanta_per_doc:
        problems.append("planted.doc_len must be >= 3 * quanta_per_doc (an instance is 3 tokens)")
    if not cfg.widths:
        problems.append("planted.widths is empty")
    for w in cfg.widths:
        if w < 1 or w % cfg.n_heads or (w // cfg.n_heads) % 2:
            problems.append(f"planted.widths: {w} is not a positive multiple of 2 * n_heads (rotary needs an even head size)")
    if len(set(cfg.widths)) != len(cfg.widths):
        problems.append("planted.widths has repeats; one width per model")
    if min(cfg.steps, cfg.batch_size, cfg.n_eval_docs, cfg.n_probe, cfg.n_layers, cfg.n_heads, cfg.mlp_ratio) < 1:
        problems.append("planted.steps, batch_size, n_eval_docs, n_probe, n_layers, n_heads and mlp_ratio must be >= 1")
    if cfg.quanta_per_doc < 1:
        problems.append("planted.quanta_per_doc must be >= 1")
    if not 0 <= cfg.min_lr_ratio <= 1 or cfg.lr <= 0 or cfg.lr_base_width < 1:
        problems.append("planted.lr must be > 0, lr_base_width >= 1 and min_lr_ratio in [0, 1]")
    if problems:
        raise PlantedError("; ".join(problems))


def make_language(cfg: PlantedConfig) -> Language:
    """The planted language of `cfg`: a pure function of its fields (seeded by cfg.seed)."""
    check_config(cfg)
    rng = np.random.default_rng([cfg.seed, 0])  # streams 0: rules; 1: training data; 2: eval corpus; 3: probe
    if cfg.rule == "pair":
        return _pair_language(cfg)
    # Ids: Pythia's two specials first, then filler, arguments, triggers, answers. The names
    # say what a token is, so the report's highlighted contexts read easily.
    groups = [
        [f"w{i:03d}" for i in range(cfg.n_filler)],
        [f"x{j:02d}" for j in range(cfg.n_args)],
        [f"Q{k:03d}" for k in range(cfg.n_quanta)],
        [f"=y{a:02d}" for a in range(cfg.n_answers)],
    ]
    vocab, ids, start = [EOS, PAD], [], 2
    for g in groups:
        vocab += g
        ids.append(np.arange(start, start + len(g)))
        start += len(g)
    # Tables: random permutations, except that no table gives the answer of one of the
    # `distinct_from_top` most frequent quanta on any argument. Those dominate the
    # argument-only guess (quantum 1 alone is 42% of instances by default), so a table that
    # agreed with them would be partly known for free, and quanta would not be independent.
    if cfg.rule == "gate":
        table = gate_table(cfg, rng)
    else:
        top = min(cfg.distinct_from_top, cfg.n_quanta)
        table = np.empty((cfg.n_quanta, cfg.n_args), dtype=np.int64)  # (quantum, arg) -> answer index
        for k in range(cfg.n_quanta):
            while True:
                perm = rng.permutation(cfg.n_answers)
                if not (perm == table[: min(k, top)]).any():
                    break
            table[k] = perm
    return Language(
        vocab=tuple(vocab),
        filler_ids=ids[0],
        arg_ids=ids[1],
        trigger_ids=ids[2],
        answer_ids=ids[3],
        table=table,
        freqs=zipf_frequencies(cfg.n_quanta, cfg.alpha),
        doc_len=cfg.doc_len,
        quanta_per_doc=cfg.quanta_per_doc,
        rule=cfg.rule,
        answer_noise=cfg.answer_noise,
    )


def _pair_language(cfg: PlantedConfig) -> Language:
    """The pair rule's language: filler, cues u_k and v_k of every quantum, and the answer "!"."""
    K, f = cfg.n_quanta, cfg.n_filler
    vocab = [EOS, PAD] + [f"w{i:03d}" for i in range(f)] + [f"u{k:03d}" for k in range(K)]
    vocab += [f"v{k:03d}" for k in range(K)] + ["!"]
    return Language(
        vocab=tuple(vocab),
        filler_ids=np.arange(2, 2 + f),
        arg_ids=np.zeros(0, dtype=np.int64),
        trigger_ids=2 + f + np.arange(K),
        answer_ids=np.array([len(vocab) - 1]),
        table=np.zeros((K, 1), dtype=np.int64),
        freqs=zipf_frequencies(K, cfg.alpha),
        doc_len=cfg.doc_len,
        quanta_per_doc=cfg.quanta_per_doc,
        rule="pair",
        answer_noise=cfg.answer_noise,
        partner_ids=2 + f + K + np.arange(K),
    )


def gate_table(cfg: PlantedConfig, rng: np.random.Generator) -> np.ndarray:
    """The gate rule's (n_quanta, n_args) table: quantum k answers a(k) on its n_active
    arguments (a seeded random set) and -1 (filler follows) on the others.

    a(k) = k * n_answers // n_quanta: the quanta share the answers in blocks of frequency
    rank, so the most frequent ones share one answer and the answer token says little
    about the quantum (what validate's answer-token baseline measures).
    """
    answer = np.arange(cfg.n_quanta) * cfg.n_answers // cfg.n_quanta
    table = np.full((cfg.n_quanta, cfg.n_args), -1, dtype=np.int64)
    for k in range(cfg.n_quanta):
        table[k, rng.permutation(cfg.n_args)[: cfg.n_active]] = answer[k]
    return table


def _instance_starts(n_docs: int, T: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """(n_docs, m) sorted start positions of m non-overlapping 3-token blocks among T tokens.

    Stars and bars: choose m of T - 2m places, then shift the i-th by 2i for the blocks before it.
    """
    slots = rng.random((n_docs, T - 2 * m)).argsort(axis=1)[:, :m]
    return np.sort(slots, axis=1) + 2 * np.arange(m)


def sample_docs(
    lang: Language, n_docs: int, rng: np.random.Generator, keys: Optional[np.ndarray] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `n_docs` documents.

    Returns (tokens, quanta), both (n_docs, doc_len): tokens int64 ids; quanta int32, the
    quantum governing each token (answer tokens only), -1 elsewhere.

    keys (n_docs, n_keys), optional: force the quanta of the first n_keys instances of each
    document (the probe set). For the pair rule those instances are keys and the others
    decoys; for table/gate they are the first n_keys of quanta_per_doc instances.
    """
    if lang.rule == "pair":
        return _sample_pair_docs(lang, n_docs, rng, keys)
    T, m, n_args = lang.doc_len, lang.quanta_per_doc, len(lang.arg_ids)
    tokens = rng.choice(lang.filler_ids, size=(n_docs, T))  # (doc, pos): filler everywhere first
    quanta = np.full((n_docs, T), -1, dtype=np.int32)
    k = rng.choice(lang.n_quanta, size=(n_docs, m), p=lang.freqs)  # (doc, instance)
    if keys is not None:
        k[:, : keys.shape[1]] = keys
    # Arguments: within a doc, the instances of one quantum take distinct arguments. A random
    # candidate order per instance, then the first candidate that no earlier instance of the
    # same quantum took: a uniform draw without replacement within each quantum.
    arg = np.empty((n_docs, m), dtype=np.int64)
    order = rng.random((n_docs, m, n_args)).argsort(axis=-1)  # (doc, instance, candidate)
    for i in range(m):
        taken = np.zeros((n_docs, n_args), dtype=bool)
        for i2 in range(i):
            same = k[:, i2] == k[:, i]
            taken[same, arg[same, i2]] = True
        first_free = np.take_along_axis(taken, order[:, i], axis=1).argmin(axis=1)  # exists: m <= n_args
        arg[:, i] = order[np.arange(n_docs), i, first_free]
    starts = _instance_starts(n_docs, T, m, rng)  # (doc, instance)
    if keys is not None:  # forced instances at random places among the document's blocks
        starts = np.take_along_axis(starts, rng.random((n_docs, m)).argsort(axis=1), axis=1)
    rows = np.arange(n_docs)[:, None]
    tokens[rows, starts] = lang.arg_ids[arg]
    tokens[rows, starts + 1] = lang.trigger_ids[k]
    answer = lang.table[k, arg]  # (doc, instance); -1: the gate is closed, filler stays
    if lang.answer_noise > 0:
        answer = np.where(rng.random(answer.shape) < lang.answer_noise, -1, answer)
    fires = answer >= 0
    tokens[rows, starts + 2] = np.where(fires, lang.answer_ids[np.maximum(answer, 0)], tokens[rows, starts + 2])
    quanta[rows, starts + 2] = np.where(fires, k, -1)
    return tokens, quanta


def _sample_pair_docs(
    lang: Language, n_docs: int, rng: np.random.Generator, keys: Optional[np.ndarray] = None
) -> tuple[np.ndarray, np.ndarray]:
    """The pair rule's documents: each instance block is, with equal odds, a key or a decoy.

        u_k v_k !    key of quantum k (label k on "!"; filler instead with prob. answer_noise)
        u_k v_j w    left decoy, j uniform over the other quanta, w filler
        u_j v_k w    right decoy

    k follows the Zipf law; so does the quantum whose cue a decoy carries. Neither cue alone
    tells "!", so a quantum is one two-word pattern to recognise, a capacity-limited skill.
    keys (n_docs, n_keys): the first n_keys blocks (at random places) are keys of these quanta
    and the others decoys (the probe set).
    """
    T, m, K = lang.doc_len, lang.quanta_per_doc, lang.n_quanta
    tokens = rng.choice(lang.filler_ids, size=(n_docs, T))  # (doc, pos)
    quanta = np.full((n_docs, T), -1, dtype=np.int32)
    starts = _instance_starts(n_docs, T, m, rng)  # (doc, block)
    k = rng.choice(K, size=(n_docs, m), p=lang.freqs)  # (doc, block)
    kind = rng.integers(3, size=(n_docs, m))  # 0 key, 1 left decoy, 2 right decoy
    if keys is not None:
        n_key = keys.shape[1]
        starts = np.take_along_axis(starts, rng.random((n_docs, m)).argsort(axis=1), axis=1)
        kind = np.where(kind == 0, 1 + rng.integers(2, size=(n_docs, m)), kind)
        kind[:, :n_key] = 0
        k[:, :n_key] = keys
    other = (k + rng.integers(1, K, size=(n_docs, m))) % K  # uniform over the other quanta
    u = np.where(kind == 2, other, k)
    v = np.where(kind == 1, other, k)
    key = (kind == 0) & (rng.random((n_docs, m)) >= lang.answer_noise)
    rows = np.arange(n_docs)[:, None]
    tokens[rows, starts] = lang.trigger_ids[u]
    tokens[rows, starts + 1] = lang.partner_ids[v]
    tokens[rows, starts + 2] = np.where(key, lang.answer_ids[0], rng.choice(lang.filler_ids, size=(n_docs, m)))
    quanta[rows, starts + 2] = np.where(key, k, -1)
    return tokens, quanta


def docs_text(lang: Language, tokens: np.ndarray) -> list[str]:
    """Space-joined text of each document; the planted tokenizer maps it back to `tokens`."""
    vocab = np.array(lang.vocab, dtype=object)
    return [" ".join(row) for row in vocab[tokens]]


def make_tokenizer(lang: Language):
    """A real Hugging Face tokenizer for the language: WordLevel over whitespace-split words.

    It adds no special tokens, so a document's text encodes to exactly its token list.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={s: i for i, s in enumerate(lang.vocab)}, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=PAD,
        model_max_length=lang.doc_len,
    )


def quanta_table(lang: Language, eval_quanta: Optional[np.ndarray] = None) -> pd.DataFrame:
    """One row per quantum: id, frequency p_k, rank, trigger word, rule (and eval-token count)."""
    v = lang.vocab
    df = pd.DataFrame(
        {
            "quantum": np.arange(lang.n_quanta, dtype=np.int32),
            "frequency": lang.freqs,
            "rank": np.arange(1, lang.n_quanta + 1, dtype=np.int32),
            "trigger": [v[t] for t in lang.trigger_ids],
            "rule": _rule_strings(lang),
        }
    )
    if eval_quanta is not None:
        labels = eval_quanta[eval_quanta >= 0]
        df["n_eval_tokens"] = np.bincount(labels, minlength=lang.n_quanta).astype(np.int64)
    return df


def _rule_strings(lang: Language) -> list[str]:
    """One readable string per quantum: its cue pair and answer, or its table."""
    v = lang.vocab
    if lang.rule == "pair":
        return [f"{v[a]} {v[b]} -> {v[lang.answer_ids[0]]}" for a, b in zip(lang.trigger_ids, lang.partner_ids)]
    return [
        " ".join(f"{v[x]}->{v[lang.answer_ids[a]] if a >= 0 else '·'}" for x, a in zip(lang.arg_ids, row))
        for row in lang.table
    ]


def language_json(lang: Language) -> dict:
    """The whole language as JSON: vocabulary groups and every quantum's table."""
    v = lang.vocab
    if lang.rule == "pair":
        return {
            "doc_len": lang.doc_len,
            "quanta_per_doc": lang.quanta_per_doc,
            "rule": "pair",
            "instance": "u<k> v<k> ! (key; decoys u<k> v<j> and u<j> v<k> are followed by filler)",
            "answer_noise": lang.answer_noise,
            "vocab": list(v),
            "filler": [v[i] for i in lang.filler_ids],
            "cues": [[v[a], v[b]] for a, b in zip(lang.trigger_ids, lang.partner_ids)],
            "answers": [v[i] for i in lang.answer_ids],
            "frequencies": lang.freqs.tolist(),
        }
    return {
        "doc_len": lang.doc_len,
        "quanta_per_doc": lang.quanta_per_doc,
        "rule": lang.rule,
        "instance": "x<j> Q<k> =y<table[k][j]>" + (" (filler where table[k][j] is null)" if lang.rule == "gate" else ""),
        "answer_noise": lang.answer_noise,
        "vocab": list(v),
        "filler": [v[i] for i in lang.filler_ids],
        "args": [v[i] for i in lang.arg_ids],
        "triggers": [v[i] for i in lang.trigger_ids],
        "answers": [v[i] for i in lang.answer_ids],
        "tables": [
            {v[x]: (v[lang.answer_ids[a]] if a >= 0 else None) for x, a in zip(lang.arg_ids, row)} for row in lang.table
        ],
        "frequencies": lang.freqs.tolist(),
    }


# --------------------------------------------------------------------------- the suite


def parse_revisions(revisions: Sequence[str], steps: int) -> dict[str, int]:
    """Training step of each Pythia-style revision name ("step0" ... "step<steps>")."""
    out = {}
    for rev in revisions:
        n = step_of(rev)
        if n is None:
            raise PlantedError(
                f"suite.revisions: {rev!r} is not a planted checkpoint name; use 'stepN' with N in 0..{steps} "
                "(planted.steps)"
            )
        if n > steps:
            raise PlantedError(
                f"suite.revisions: {rev} is past the end of training (planted.steps={steps}); "
                f"use a step <= {steps} or raise planted.steps"
            )
        if n in out.values():
            raise PlantedError(f"suite.revisions: step {n} is named twice ({rev}); list each checkpoint once")
        out[rev] = n
    if not out:
        raise PlantedError("suite.revisions is empty; name at least one 'stepN' checkpoint to save")
    return out


def model_config(lang: Language, cfg: PlantedConfig, width: int):
    """GPTNeoXConfig of the suite member of `width`: Pythia's architecture, tiny."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=lang.vocab_size,
        hidden_size=width,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.mlp_ratio * width,
        max_position_embeddings=lang.doc_len,  # trained on doc_len tokens, no more
        rotary_pct=1.0,  # heads are tiny; Pythia's quarter of 8 dims would leave 2 rotary dims
        use_parallel_residual=True,  # as Pythia
        tie_word_embeddings=False,  # as Pythia: separate embed_in and unembedding
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


def non_embedding_params(model) -> int:
    """Pythia's parameter count: all parameters but the input embedding and the unembedding."""
    emb = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def peak_lr(cfg: PlantedConfig, width: int) -> float:
    """The peak learning rate of the model of `width`: lr * (lr_base_width / width) ** lr_width_exponent.

    Wider models take smaller steps (as in width-scaled recipes such as muP): with one lr for
    all widths, the widest models of the suite train least stably and the width at which a
    quantum is acquired becomes erratic (docs/planted-languages.md).
    """
    return cfg.lr * (cfg.lr_base_width / width) ** cfg.lr_width_exponent


def _lr_at(step: int, cfg: PlantedConfig, width: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * peak at the last step (Pythia's shape)."""
    peak = peak_lr(cfg, width)
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def training_batches(lang: Language, cfg: PlantedConfig) -> np.ndarray:
    """The training token stream, (steps, batch, doc_len) int64: one data order for every model."""
    rng = np.random.default_rng([cfg.seed, 1])
    tokens, _ = sample_docs(lang, cfg.steps * cfg.batch_size, rng)
    return tokens.reshape(cfg.steps, cfg.batch_size, lang.doc_len)


def eval_docs(lang: Language, cfg: PlantedConfig) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation corpus (tokens, quanta), (n_eval_docs, doc_len): disjoint stream from training."""
    return sample_docs(lang, cfg.n_eval_docs, np.random.default_rng([cfg.seed, 2]))


def probe_docs(lang: Language, cfg: PlantedConfig) -> tuple[np.ndarray, np.ndarray]:
    """The probe set (tokens, quanta), (n_docs, doc_len): cfg.n_probe instances of every quantum.

    Held-out documents of the corpus's form, in which the forced instances (two per
    document, a seeded random order over quanta) carry each quantum equally often. A
    quantum's "learned" is decided here, on ~n_probe answers, instead of on its few answers
    in the Zipf corpus (a rare quantum has 1-3 there, and "learned" would be noise): the
    paper measured each sparse-parity subtask on its own held-out set the same way.
    """
    rng = np.random.default_rng([cfg.seed, 3])
    per_doc = min(2, lang.quanta_per_doc)
    order = rng.permutation(np.repeat(np.arange(lang.n_quanta), cfg.n_probe))
    n_docs = -(-len(order) // per_doc)
    order = np.concatenate([order, rng.choice(lang.n_quanta, n_docs * per_doc - len(order))])
    return sample_docs(lang, n_docs, rng, keys=order.reshape(n_docs, per_doc))


def train_model(
    lang: Language,
    cfg: PlantedConfig,
    width: int,
    batches: np.ndarray,
    save_steps: Iterable[int] = (),
    save: Optional[Callable[[int, object], None]] = None,
    desc: str = "",
    progress: bool = True,
    position: Optional[int] = None,
):
    """Train the suite member of `width` on `batches`, calling ``save(step, model)`` at `save_steps`.

    `batches` is (steps, batch, doc_len). Step N is after N optimizer updates; step 0 is the
    initialisation. The initialisation is seeded by (cfg.seed, width), the data order is the
    same for every width. Returns the trained model (fp32, eval mode).
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(cfg.seed * 1_000_003 + width)  # HF initialises from the global generator
    model = GPTNeoXForCausalLM(model_config(lang, cfg, width)).float()
    # Weight decay on matrices only, as usual (not on biases, layer norms, embeddings).
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=peak_lr(cfg, width),
        betas=(0.9, 0.95),
    )
    save_steps = set(save_steps)
    if save is not None and 0 in save_steps:
        save(0, model.eval())
    model.train()
    data = torch.from_numpy(batches)  # (steps, batch, pos)
    for step in tqdm(range(cfg.steps), desc=desc or f"width {width}", disable=not progress, mininterval=2,
                     position=position):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg, width)
        x = data[step]  # (batch, pos)
        logits = model(input_ids=x).logits  # (batch, pos, vocab)
        # next-token shift: the logits at pos predict token pos + 1
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if save is not None and step + 1 in save_steps:
            save(step + 1, model.eval())
            model.train()
    return model.eval()


def _inside(path: str, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def planted_models(suite: SuiteConfig, root: Path) -> list[str]:
    """Names of suite models whose source lies inside `root` (the ones the planted stage trains)."""
    return [name for name in suite.models if _inside(suite.sources.get(name, ""), root)] if suite.sources else []


def planted_requested(suite: SuiteConfig, corpus_source: str, root: Path) -> bool:
    """Whether anything of the run reads from `root`: a suite source or the corpus source."""
    return bool(planted_models(suite, root)) or _inside(corpus_source, root)


MARKER = """\
# cache/planted: not used by this run

Neither `suite.sources` nor `corpus.source` in params.yaml points into this directory, so the
`planted` stage trained nothing. Point them here (see params.yaml's default) to run the
embedded planted-quanta suite.
"""

README = """\
# The planted-quanta suite

Written by the `planted` stage (pipeline/planted.py, whose docstring describes the language).

- `corpus.jsonl`: the evaluation corpus, one {{"text": ...}} per line; line i is doc_id i.
- `labels.parquet`: doc_id, pos, quantum (-1: none), one row per token of each document.
- `quanta.parquet`: one row per quantum: frequency p_k, rank, trigger word, rule (its table).
- `language.json`: the whole language (vocabulary groups and every quantum's table).
- `models/<name>/<revision>/`: save_pretrained of each GPTNeoXForCausalLM and its tokenizer.
- `suite.json`: per model: width, parameter counts, training seconds.

{n_quanta} quanta, p_k ∝ k^-{exponent}; models {models} at revisions {revisions}.
"""


def _train_stamp(cfg: PlantedConfig, name: str, width: int, steps: Mapping[str, int]) -> dict:
    """What a trained model depends on, in its JSON form (so a stamp read back compares equal)."""
    planted = {k: v for k, v in to_dict(cfg).items() if k != "workers"}  # workers: where, not what
    stamp = {"format": FORMAT_VERSION, "planted": planted, "name": name, "width": width, "revisions": dict(steps)}
    return json.loads(json.dumps(stamp))


def sample_quanta(planted_dir: str | Path, samples: pd.DataFrame, order: Optional[Sequence[int]] = None) -> Optional[np.ndarray]:
    """The planted quantum of each row of `samples` (doc_id, pos), -1 where none; None when
    `planted_dir` holds no ground truth (a real suite). The one join of samples to labels.

    order: sample ids (`samples["sample"]` values, e.g. a clusters table's rows); the labels
    are then given in that order, -1 for an id that `samples` lacks."""
    path = Path(planted_dir) / "labels.parquet"
    if not path.exists():
        return None
    labels = pd.read_parquet(path, columns=["doc_id", "pos", "quantum"])
    merged = samples[["doc_id", "pos"]].merge(labels, on=["doc_id", "pos"], how="left")
    quanta = merged["quantum"].fillna(-1).to_numpy(np.int64)
    if order is None:
        return quanta
    by_id = pd.Series(quanta, index=samples["sample"].to_numpy())
    return by_id.reindex(np.asarray(order)).fillna(-1).to_numpy(np.int64)


def label_table(quanta: np.ndarray) -> pd.DataFrame:
    """(doc, pos) quantum labels -> the labels table: doc_id int64, pos int32, quantum int32, every token."""
    n_docs, T = quanta.shape
    return pd.DataFrame(
        {
            "doc_id": np.repeat(np.arange(n_docs, dtype=np.int64), T),
            "pos": np.tile(np.arange(T, dtype=np.int32), n_docs),
            "quantum": quanta.reshape(-1).astype(np.int32),
        }
    )


def _check_sources(suite: SuiteConfig, names: Sequence[str], root: Path) -> None:
    """Every planted model's source must be the folder the stage saves it to."""
    for name in names:
        expected = (root / "models" / name).resolve()
        if Path(suite.sources[name]).resolve() != expected:
            raise PlantedError(
                f"suite.sources.{name} points into {root} but not at {root / 'models' / name}, where the "
                f"planted stage saves it; set suite.sources.{name}: {root / 'models' / name}"
            )


def _write_ground_truth(lang: "Language", cfg: PlantedConfig, root: Path, stage_config: dict) -> None:
    """The language, the evaluation corpus, its labels, the quanta table and the probe set."""
    tokens, quanta = eval_docs(lang, cfg)
    write_json(language_json(lang), root / "language.json")
    with atomic_path(root / "corpus.jsonl") as tmp:
        with tmp.open("w") as f:
            for text in docs_text(lang, tokens):
                f.write(json.dumps({"text": text}) + "\n")
    write_parquet(label_table(quanta), root / "labels.parquet", config=stage_config)
    write_parquet(quanta_table(lang, quanta), root / "quanta.parquet", config=stage_config)
    _, probe_quanta = probe_docs(lang, cfg)
    probe = label_table(probe_quanta)
    probe = probe[probe["quantum"] >= 0].reset_index(drop=True)
    write_parquet(probe, root / "probe.parquet", config=stage_config)


def build_suite(
    cfg: PlantedConfig,
    suite: SuiteConfig,
    corpus_source: str,
    root: str | Path,
    progress: bool = True,
) -> dict:
    """Write the planted suite under `root`; return a summary (what suite.json holds).

    Writes the language, the evaluation corpus and its labels, then trains every suite model
    whose source points into `root` (one width per name of suite.models, in order) and saves
    each revision of suite.revisions. If nothing of the run points into `root`, writes only a
    README marker and returns at once. A model directory appears whole (built aside, then
    renamed) with a train.json stamp; a rerun with the same params reuses finished models.
    """
    root = Path(root)
    if not planted_requested(suite, corpus_source, root):
        root.mkdir(parents=True, exist_ok=True)
        with atomic_path(root / "README.md") as tmp:
            tmp.write_text(MARKER)
        return {"planted": False}
    lang = make_language(cfg)
    names = planted_models(suite, root)
    if names and len(suite.models) != len(cfg.widths):
        raise PlantedError(
            f"planted.widths has {len(cfg.widths)} entries but suite.models has {len(suite.models)}; "
            "give one width per model name, in order"
        )
    steps = parse_revisions(suite.revisions, cfg.steps)
    _check_sources(suite, names, root)
    stage_config = {"planted": to_dict(cfg), "suite": {"models": list(suite.models), "revisions": list(suite.revisions)}}
    _write_ground_truth(lang, cfg, root, stage_config)  # cheap, always rewritten

    # Models: the same data order for all; each directory built aside and renamed into place.
    widths = dict(zip(suite.models, cfg.widths))
    summary = {"planted": True, "steps": cfg.steps, "revisions": steps, "models": {}}
    jobs = []
    for name in names:
        stamp = _train_stamp(cfg, name, widths[name], steps)
        stamp_path = root / "models" / name / "train.json"
        if stamp_path.exists() and json.loads(stamp_path.read_text()).get("stamp") == stamp:
            summary["models"][name] = read_meta(stamp_path)["summary"]  # with its training seconds, where logged
            continue  # finished by an earlier, interrupted run with these params
        jobs.append(dict(cfg=cfg, name=name, width=widths[name], steps=steps, stamp=stamp,
                         model_dir=str(root / "models" / name), progress=progress))
    for name, info in _run_training(jobs, cfg):
        summary["models"][name] = info
    summary["models"] = {name: summary["models"][name] for name in names}
    write_meta(summary, root / "suite.json")
    with atomic_path(root / "README.md") as tmp:
        tmp.write_text(
            README.format(
                n_quanta=cfg.n_quanta,
                exponent=cfg.alpha + 1,
                models=", ".join(names) or "(none trained)",
                revisions=", ".join(steps),
            )
        )
    return summary


def _n_workers(cfg: PlantedConfig, n_jobs: int) -> int:
    """Processes to train in: planted.workers, or (0) as many as the cores hold at cfg.threads each."""
    if cfg.workers > 0:
        return min(cfg.workers, max(1, n_jobs))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n_jobs, cores // max(1, cfg.threads)))


def _run_training(jobs: list[dict], cfg: PlantedConfig) -> Iterator[tuple[str, dict]]:
    """Train each job's model (see :func:`_train_job`); yield (name, summary) as each finishes.

    Tiny models use one core each well and two poorly, so the widths train side by side, one
    process per model, widest first (the longest jobs start first). With one worker they
    train in this process.
    """
    if not jobs:
        return
    jobs = sorted(jobs, key=lambda j: -j["width"])
    n = _n_workers(cfg, len(jobs))
    if n == 1:
        for job in jobs:
            yield job["name"], _train_job(job)
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    # spawn, not fork: a forked child inherits torch's OpenMP state and can hang in it.
    with cf.ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_train_job, dict(job, position=i % n)): job["name"] for i, job in enumerate(jobs)}
        for fut in cf.as_completed(futures):
            yield futures[fut], fut.result()


def _drop_library_version(model_dir: Path) -> None:
    """Remove the ``transformers_version`` that save_pretrained writes into the JSON files.

    It records the library that wrote the files, not the model, and would give two
    installs of the same params different DVC hashes; no loader needs it.
    """
    for path in sorted(model_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.pop("transformers_version", None) is not None:
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _train_job(job: dict) -> dict:
    """Train one planted model and save it whole at job["model_dir"]; return its summary.

    Each revision is saved with its tokenizer and scored on the probe set; the directory is
    built aside and renamed into place, with the train.json stamp that lets a rerun reuse it.
    Runs in a worker process as well as in the stage's own: it rebuilds what it needs from
    the config (language, data order, probe set), all seeded, so the result does not depend
    on where it runs.
    """
    cfg, width, steps = job["cfg"], job["width"], job["steps"]
    lang = make_language(cfg)
    tokenizer = make_tokenizer(lang)
    probe_tokens, probe_quanta = probe_docs(lang, cfg)
    probe = label_table(probe_quanta)
    probe = probe[probe["quantum"] >= 0].reset_index(drop=True)
    batches = training_batches(lang, cfg)
    by_step = {n: rev for rev, n in steps.items()}
    probe_losses = []
    from pipeline.memory import torch_threads

    with torch_threads(cfg.threads), atomic_path(job["model_dir"]) as tmp:

        def save(step: int, model) -> None:
            out = tmp / by_step[step]
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            _drop_library_version(out)
            loss = token_losses(model, probe_tokens)[probe["doc_id"], probe["pos"]]
            probe_losses.append(probe.assign(revision=by_step[step], loss=loss.astype(np.float32)))

        t0 = time.perf_counter()
        model = train_model(lang, cfg, width, batches, by_step, save, desc=job["name"],
                            progress=job["progress"], position=job.get("position"))
        seconds = time.perf_counter() - t0
        info = {
            "width": width,
            "non_embedding_params": non_embedding_params(model),
            "total_params": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(seconds, 2),
        }
        write_parquet(pd.concat(probe_losses, ignore_index=True), tmp / "probe_losses.parquet")
        data, run = split_run({"stamp": job["stamp"], "summary": info})
        (tmp / "train.json").write_text(json.dumps(data, indent=2) + "\n")
        write_json(run, run_log_path(Path(job["model_dir"]) / "train.json"))
    return info


# --------------------------------------------------------------------------- losses (reference)


def token_losses(model, tokens: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Reference per-token losses in nats: a plain fp32 forward of equal-length documents.

    `tokens` (doc, pos) -> losses (doc, pos) float32, NaN at pos 0 (nothing predicts it);
    the loss at pos is -log p(token pos | tokens 0..pos-1). Planted documents all have the
    same length, so no padding is involved: this is the per-document forward, batched.
    """
    import torch
    import torch.nn.functional as F

    out = np.full(tokens.shape, np.nan, dtype=np.float32)
    with torch.no_grad():
        for i in range(0, len(tokens), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(tokens[i : i + batch_size]))  # (batch, pos)
            logits = model(input_ids=x).logits.float()  # (batch, pos, vocab)
            logp = F.log_softmax(logits[:, :-1], dim=-1)  # row pos predicts token pos + 1
            out[i : i + batch_size, 1:] = -logp.gather(-1, x[:, 1:, None])[..., 0].numpy()
    return out


def loss_table(losses: np.ndarray) -> pd.DataFrame:
    """(doc, pos) losses -> the losses-stage table: doc_id int64, pos int32 (>= 1), loss float32."""
    n_docs, T = losses.shape
    return pd.DataFrame(
        {
            "doc_id": np.repeat(np.arange(n_docs, dtype=np.int64), T - 1),
            "pos": np.tile(np.arange(1, T, dtype=np.int32), n_docs),
            "loss": losses[:, 1:].reshape(-1).astype(np.float32),
        }
    )


def read_corpus_tokens(root: str | Path) -> np.ndarray:
    """The planted eval corpus under `root` as (doc, pos) ids, tokenized by the saved tokenizer."""
    from transformers import AutoTokenizer

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
    (:func:`token_losses`): what the losses stage must reproduce, for tests and checks.
    """
    from transformers import GPTNeoXForCausalLM

    root, losses_dir = Path(root), Path(losses_dir)
    tokens = read_corpus_tokens(root)
    for m in models:
        for r in revisions:
            model = GPTNeoXForCausalLM.from_pretrained(root / "models" / m / r, dtype="float32").eval()
            write_parquet(loss_table(token_losses(model, tokens)), layout.partition_dir(losses_dir, m, r) / "part-00000.parquet")
