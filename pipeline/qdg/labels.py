"""What a cluster is, in words: the context rule that best separates its members from
the other clustered samples, learned on one half of the samples and scored on the other.

A rule fixes some of: the answer token, the one to three tokens before it, or the class of
the answer or of the token before it (newline, indentation, digit, bracket, ...). It is
printed the way the paper writes a quantum's contexts: ``'don' ''' → 't'`` (a bigram with
its context), ``'u' 'v' → '!'``, ``[newline] → [indent]``.

How a label is chosen and scored, per clustering of the sweep:

1. The clustered samples are split in two, stratified by cluster (cluster.seed): within each
   cluster a seeded half (rounded up) is the *train* half, the rest the *test* half.
2. For each cluster, each family proposes the values its train members take most often
   (:data:`CANDIDATES` per family), and each candidate rule is scored by its F1 on the train
   half: members that match against every train sample that matches.
3. The label is the most specific rule (most context fixed, see :data:`FAMILIES`) among
   those within :data:`TIE_F1` of the best train F1: a rule that every member shares and
   that matches no more non-members says more about the cluster, and whether the extra
   context generalises is what the held-out score measures.
4. ``label_precision``, ``label_recall`` and ``label_f1`` are that rule's on the test half:
   test members it matches over all test samples it matches, and over all test members.
   Nothing matching gives precision 0 (as scikit-learn's ``zero_division=0``).

``label_corpus_share`` is the share of all the corpus' targets (every token with a token before
it, not only the clustered samples) that the label's rule matches: the rule's use frequency,
the quantity the quantization model orders quanta by (stage `cluster_curves`). It is null when
no corpus is given or the cluster has no label.

``ngram_f1`` is the held-out F1 of the best rule of the token families alone (no class): a
cluster with ``ngram_f1 >= NGRAM_F1`` is one an n-gram count explains (metrics/qdg.json
``explained_by_ngram``). A cluster of one member has no test half: its label is null,
``label_kind`` is ``none`` and its scores are null, as for a clustering with one cluster
(there are no non-members to separate it from).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import numpy as np
import pandas as pd

CANDIDATES = 3  # values tried per family and cluster: the train members' most common ones
TIE_F1 = 0.02  # rules within this train F1 of the best count as tied; the most specific wins
NGRAM_F1 = 0.9  # a cluster whose best token rule reaches this held-out F1 is an n-gram class
START = -1  # context before a document's first token


@dataclass(frozen=True)
class Family:
    """A family of rules: which context slots it fixes, and how specific it is."""

    name: str
    kind: str  # label_kind: answer | previous | bigram | trigram | class
    prev: int  # preceding tokens fixed (oldest first in the key)
    answer: bool  # whether the answer token is fixed
    classes: bool  # whether the slots hold token classes rather than tokens
    specificity: float  # exact tokens fixed; a class counts half


FAMILIES = (
    Family("trigram", "trigram", 2, True, False, 3.0),
    Family("previous3", "previous", 3, False, False, 3.0),
    Family("bigram", "bigram", 1, True, False, 2.0),
    Family("previous2", "previous", 2, False, False, 2.0),
    Family("answer", "answer", 0, True, False, 1.0),
    Family("previous", "previous", 1, False, False, 1.0),
    Family("class_pair", "class", 1, True, True, 1.0),
    Family("class_answer", "class", 0, True, True, 0.5),
    Family("class_previous", "class", 1, False, True, 0.5),
)
NGRAM_KINDS = ("answer", "previous", "bigram", "trigram")
COLUMNS = {
    "label": "string", "label_kind": "string", "label_precision": "Float64", "label_recall": "Float64",
    "label_f1": "Float64", "ngram_f1": "Float64", "label_context": "object", "label_answer": "Int64",
    "label_corpus_share": "Float64",
}


def token_class(text: Optional[str]) -> str:
    """The class of a token's text: start (before a document), newline, indent, digit,
    close (bracket), open (bracket), punct, capital (word with a capital first letter),
    word, or other. Leading spaces (and the ``Ġ``/``▁`` markers some tokenizers print) do
    not change a word's class."""
    if text is None:
        return "start"
    if "\n" in text or "Ċ" in text:
        return "newline"
    if text != "" and text.strip(" \t") == "":
        return "indent"
    core = text.lstrip(" \tĠ▁")
    if core == "":
        return "other"
    if core.isdigit():
        return "digit"
    if all(ch in ")]}" for ch in core):
        return "close"
    if all(ch in "([{" for ch in core):
        return "open"
    if all(unicodedata.category(ch).startswith("P") or unicodedata.category(ch).startswith("S") for ch in core):
        return "punct"
    if core[0].isupper():
        return "capital"
    if core[0].isalpha():
        return "word"
    return "other"


def _keys(family: Family, answer: np.ndarray, prev: np.ndarray, cls: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """(N, slots) int64 key of every sample under a family: preceding slots oldest first,
    then the answer; token ids, or class codes where the family uses classes."""
    cols = [prev[:, prev.shape[1] - family.prev + j] for j in range(family.prev)]
    if family.answer:
        cols.append(answer)
    if family.classes:
        cols = [cls(c) for c in cols]
    return np.stack(cols, axis=1)


def _row_ids(keys: np.ndarray) -> np.ndarray:
    """One int64 id per distinct row of keys."""
    return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)


def _f1(tp: np.ndarray, matched: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """precision, recall, F1 (0 where undefined) from true positives, matches and members."""
    tp = tp.astype(np.float64)
    precision = np.divide(tp, matched, out=np.zeros_like(tp), where=matched > 0)
    recall = np.divide(tp, members, out=np.zeros_like(tp), where=members > 0)
    s = precision + recall
    return precision, recall, np.divide(2 * precision * recall, s, out=np.zeros_like(tp), where=s > 0)


def halves(labels: np.ndarray, seed: int) -> np.ndarray:
    """Boolean train mask: within each cluster (label >= 0) a seeded half, rounded up."""
    rng = np.random.default_rng(seed)
    train = np.zeros(len(labels), dtype=bool)
    order = rng.permutation(len(labels))
    ranked = order[np.argsort(labels[order], kind="stable")]  # grouped by cluster, shuffled within
    lab = labels[ranked]
    starts = np.searchsorted(lab, lab, side="left")
    sizes = np.bincount(lab[lab >= 0]) if (lab >= 0).any() else np.zeros(0, int)
    within = np.arange(len(lab)) - starts
    ok = lab >= 0
    train[ranked[ok]] = within[ok] < (sizes[lab[ok]] + 1) // 2
    return train


def label_clusters(labels: np.ndarray, answer: np.ndarray, prev: np.ndarray, token_str: Mapping[int, str],
                   seed: int, corpus: Optional[tuple[np.ndarray, np.ndarray]] = None) -> pd.DataFrame:
    """One row per cluster 0..k-1 of `labels` (-1: not clustered, left out of every score):
    cluster and the :data:`COLUMNS` (see the module docstring).

    answer (N,): each sample's target token id; prev (N, 3): the three tokens before it,
    oldest first, :data:`START` before a document's start; token_str: token id -> text.
    ``label_context`` lists the rule's fixed preceding slots oldest first (token ids, or
    class names for a class rule); ``label_answer`` is its answer token id (null if free).
    corpus: (answer, prev) of every target of the corpus, as `answer` and `prev` are of the
    samples; when given, ``label_corpus_share`` is the share of them each label matches.
    """
    labels = np.asarray(labels)
    keep = labels >= 0
    k = int(labels.max()) + 1 if keep.any() else 0
    lab, ans, pre = labels[keep], np.asarray(answer, np.int64)[keep], np.asarray(prev, np.int64)[keep]
    rows = [dict(cluster=c, label=None, label_kind="none", label_precision=None, label_recall=None,
                 label_f1=None, ngram_f1=None, label_context=None, label_answer=None, label_corpus_share=None)
            for c in range(k)]
    if k < 2:
        return _frame(rows)
    class_names = sorted({token_class(t) for t in token_str.values()} | {"start", "other"})
    cls = _classifier(token_str, class_names)
    train = halves(lab, seed)
    size_tr = np.bincount(lab[train], minlength=k)
    size_te = np.bincount(lab[~train], minlength=k)
    # per family: candidate (cluster, key) pairs with their train and test counts
    cand = []  # (cluster, family index, key id, train F1, test P, R, F1)
    decode = {}
    for fi, fam in enumerate(FAMILIES):
        keys = _keys(fam, ans, pre, cls)
        ids = _row_ids(keys)
        n_keys = int(ids.max()) + 1
        first = np.full(n_keys, -1)
        first[ids[::-1]] = np.arange(len(ids))[::-1]
        decode[fi] = keys[first]  # key id -> its key
        match_tr = np.bincount(ids[train], minlength=n_keys)
        match_te = np.bincount(ids[~train], minlength=n_keys)
        pair_tr = pd.Series(1, index=pd.MultiIndex.from_arrays([lab[train], ids[train]])).groupby(level=[0, 1]).sum()
        pair_te = pd.Series(1, index=pd.MultiIndex.from_arrays([lab[~train], ids[~train]])).groupby(level=[0, 1]).sum()
        top = pair_tr.sort_values(ascending=False, kind="stable").groupby(level=0).head(CANDIDATES)
        c_arr = top.index.get_level_values(0).to_numpy()
        key_arr = top.index.get_level_values(1).to_numpy()
        tp_tr = top.to_numpy()
        tp_te = pair_te.reindex(top.index, fill_value=0).to_numpy()
        _, _, f_tr = _f1(tp_tr, match_tr[key_arr], size_tr[c_arr])
        p_te, r_te, f_te = _f1(tp_te, match_te[key_arr], size_te[c_arr])
        cand.append(pd.DataFrame({"cluster": c_arr, "family": fi, "key": key_arr, "f_train": f_tr,
                                  "p": p_te, "r": r_te, "f": f_te}))
    table = pd.concat(cand, ignore_index=True)
    table["spec"] = [FAMILIES[f].specificity for f in table["family"]]
    chosen: dict[int, tuple[int, np.ndarray]] = {}  # cluster -> (family index, key) of its label
    for c, g in table.groupby("cluster", sort=True):
        if size_te[c] == 0:
            continue  # one member: nothing held out
        best = g["f_train"].max()
        tied = g[g["f_train"] >= best - TIE_F1].sort_values(["spec", "f_train", "family"], ascending=[False, False, True],
                                                          kind="stable")
        pick = tied.iloc[0]
        fam = FAMILIES[int(pick["family"])]
        key = decode[int(pick["family"])][int(pick["key"])]
        grams = g[[not FAMILIES[f].classes for f in g["family"]]]
        ngram = grams.loc[grams["f_train"].idxmax()] if len(grams) else None
        chosen[int(c)] = (int(pick["family"]), key)
        context = key[: fam.prev]
        answer_id = int(key[-1]) if fam.answer and not fam.classes else None
        rows[c].update(
            label=render(fam, key, token_str, class_names), label_kind=fam.kind, label_precision=float(pick["p"]),
            label_recall=float(pick["r"]), label_f1=float(pick["f"]),
            ngram_f1=None if ngram is None else float(ngram["f"]),
            label_context=[class_names[int(t)] for t in context] if fam.classes else [int(t) for t in context],
            label_answer=answer_id,
        )
    if corpus is not None:
        for c, share in corpus_shares(chosen, *corpus, cls).items():
            rows[c]["label_corpus_share"] = share
    return _frame(rows)


def _classifier(token_str: Mapping[int, str], class_names: list[str]) -> Callable[[np.ndarray], np.ndarray]:
    """token ids (or :data:`START`) -> class codes (indices into `class_names`), by lookup table."""
    code = {name: i for i, name in enumerate(class_names)}
    top = max((int(t) for t in token_str), default=0)
    lut = np.full(top + 2, code["other"], np.int64)  # slot 0: START; slot t + 1: token t
    lut[0] = code["start"]
    for t, text in token_str.items():
        lut[int(t) + 1] = code[token_class(text)]

    def cls(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        inside = (ids >= START) & (ids <= top)
        return np.where(inside, lut[np.clip(ids + 1, 0, top + 1)], code["other"])

    return cls


def corpus_shares(chosen: Mapping[int, tuple[int, np.ndarray]], answer: np.ndarray, prev: np.ndarray,
                  cls: Callable[[np.ndarray], np.ndarray]) -> dict[int, float]:
    """cluster -> the share of the corpus' targets (answer (T,), prev (T, 3)) that its rule
    (family index, key) matches. One family's keys are built once for all its rules."""
    n = len(answer)
    if n == 0:
        return {}
    out = {}
    for fi in sorted({f for f, _ in chosen.values()}):
        keys = _keys(FAMILIES[fi], np.asarray(answer, np.int64), np.asarray(prev, np.int64), cls)
        uniq, counts = np.unique(keys, axis=0, return_counts=True)
        for c, (f, key) in chosen.items():
            if f != fi:
                continue
            hit = np.flatnonzero((uniq == key[None, :]).all(axis=1))
            out[c] = float(counts[hit[0]] / n) if hit.size else 0.0
    return out


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["cluster", *COLUMNS])
    frame["cluster"] = frame["cluster"].astype("int32")
    for name, dtype in COLUMNS.items():
        if dtype != "object":
            frame[name] = frame[name].astype(dtype)
    return frame


def quote(text: Optional[str]) -> str:
    """A token's text as a label shows it: single-quoted, newlines and tabs escaped."""
    if text is None:
        return "⟨start⟩"
    return "'" + text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("'", "\\'") + "'"


def render(fam: Family, key: np.ndarray, token_str: Mapping[int, str], class_names: list[str]) -> str:
    """A rule in words: preceding slots, an arrow, the answer (``·`` when the answer is free)."""
    def show(t: int) -> str:
        if fam.classes:
            return f"[{class_names[int(t)]}]"
        return quote(None if t == START else token_str.get(int(t), f"#{int(t)}"))

    slots = [show(t) for t in key[: fam.prev]]
    answer = show(key[-1]) if fam.answer else "·"
    return (" ".join(slots) + " → " if slots else "→ ") + answer


def sweep_labels(sweep: Mapping[int, np.ndarray], answer: np.ndarray, prev: np.ndarray, token_str: Mapping[int, str],
                 seed: int, corpus: Optional[tuple[np.ndarray, np.ndarray]] = None) -> pd.DataFrame:
    """:func:`label_clusters` for every clustering of a sweep (k -> labels): k, cluster, ..."""
    frames = [label_clusters(lab, answer, prev, token_str, seed, corpus).assign(k=np.int32(k))
              for k, lab in sweep.items()]
    if not frames:
        return _frame([]).assign(k=pd.Series([], dtype="int32"))
    return pd.concat(frames, ignore_index=True)
