"""The planted language: K quanta at Zipf frequencies, its documents, tokenizer and ground truth.

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

Positions follow the losses tables: the label at ``pos`` belongs to token ``pos``, whose loss is
predicting it from tokens ``0..pos-1``. Only answer tokens carry a quantum label (-1 elsewhere).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import pandas as pd

from pipeline.core.config import PlantedConfig
from pipeline.core.errors import QuantaError

EOS = "<|endoftext|>"  # Pythia's bos/eos/unk token, id 0 as in Pythia
PAD = "<|padding|>"  # Pythia's padding token, id 1 as in Pythia


class PlantedError(QuantaError, ValueError):
    """A planted-suite problem (bad revision name, inconsistent params), in one line."""




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


def make_language(cfg: PlantedConfig) -> Language:
    """The planted language of `cfg`: a pure function of its fields (seeded by cfg.seed)."""
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
