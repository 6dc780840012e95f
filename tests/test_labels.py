"""pipeline.qdg.labels: the context rule that names a cluster, learned on one half of its
members and scored on the other, on samples whose rules are known."""

import numpy as np
import pandas as pd
import pytest

from pipeline.qdg import labels as L
from pipeline.qdg import quality

STRINGS = {0: "\n", 1: "    ", 2: "42", 3: ")", 4: "(", 5: ",", 6: "Foo", 7: " bar", 8: "don", 9: "'", 10: "t", 11: "x",
           12: "y", 13: "z"}


def test_token_classes():
    got = {s: L.token_class(s) for s in ["\n", "    ", "42", ")", "(", ",", "Foo", " bar", "Ġbar", None, "é1"]}
    assert got == {"\n": "newline", "    ": "indent", "42": "digit", ")": "close", "(": "open", ",": "punct",
                   "Foo": "capital", " bar": "word", "Ġbar": "word", None: "start", "é1": "word"}


def test_halves_split_every_cluster_rounding_up():
    lab = np.array([0] * 5 + [1] * 2 + [2] + [-1] * 3)
    train = L.halves(lab, seed=0)
    assert [int(train[lab == c].sum()) for c in range(3)] == [3, 1, 1]
    assert not train[lab == -1].any()
    assert np.array_equal(train, L.halves(lab, seed=0)) and not np.array_equal(train, L.halves(lab, seed=5))


def _samples():
    """Cluster 0: "don ' → t" (the trigram holds for every member); cluster 1: answers after
    an opening bracket, many different; cluster 2: the answer "," after varied words;
    cluster 3: one member at position 1 (nothing before its one preceding token)."""
    rng = np.random.default_rng(0)
    ans, prev, lab = [], [], []
    for _ in range(20):
        ans.append(10), prev.append([11, 8, 9]), lab.append(0)
    for _ in range(20):
        ans.append(int(rng.choice([6, 7, 11, 12]))), prev.append([int(rng.choice([11, 12])), 13, 4]), lab.append(1)
    for _ in range(20):
        ans.append(5), prev.append([13, 13, int(rng.choice([6, 7, 11, 12, 13]))]), lab.append(2)
    ans.append(12), prev.append([L.START, L.START, 13]), lab.append(3)
    return np.array(ans), np.array(prev), np.array(lab)


def test_labels_name_the_rule_and_score_it_held_out():
    ans, prev, lab = _samples()
    t = L.label_clusters(lab, ans, prev, STRINGS, seed=0).set_index("cluster")
    # cluster 0: the three context tokens and the answer tie at F1 1; the most specific wins
    assert t.loc[0, "label"] == "'don' '\\'' → 't'" and t.loc[0, "label_kind"] == "trigram"
    assert t.loc[0, "label_f1"] == 1.0 and t.loc[0, "ngram_f1"] == 1.0
    assert t.loc[0, "label_context"] == [8, 9] and t.loc[0, "label_answer"] == 10
    # cluster 1: the token before is "(" for every member and for no one else
    assert t.loc[1, "label_kind"] == "previous" and t.loc[1, "label"].endswith("'(' → ·")
    assert t.loc[1, "label_f1"] == 1.0
    # cluster 2: the answer ","
    assert t.loc[2, "label"] == "→ ','" and t.loc[2, "label_kind"] == "answer" and t.loc[2, "label_f1"] == 1.0
    # one member: nothing held out to score, so no label
    assert t.loc[3, "label_kind"] == "none" and t.loc[3, ["label", "label_f1", "ngram_f1"]].isna().all()


def test_a_class_rule_when_no_token_rule_holds():
    # members: any digit after "(" or ","; non-members: words after the same tokens
    rng = np.random.default_rng(1)
    digits = {20 + i: str(i * 7) for i in range(30)}
    words = {60 + i: f"w{i}" for i in range(30)}
    strings = {**STRINGS, **digits, **words}
    n = 120
    member = np.arange(n) < 60
    ans = np.where(member, rng.choice(list(digits), n), rng.choice(list(words), n))
    prev = np.stack([rng.choice([11, 12], n), rng.choice([11, 12], n), rng.choice([4, 5], n)], axis=1)
    t = L.label_clusters(np.where(member, 0, 1), ans, prev, strings, seed=0).set_index("cluster")
    assert t.loc[0, "label"] == "→ [digit]" and t.loc[0, "label_kind"] == "class"
    assert t.loc[0, "label_context"] == [] and pd.isna(t.loc[0, "label_answer"])
    assert t.loc[0, "label_f1"] == 1.0 and t.loc[0, "ngram_f1"] < 0.5  # no single token explains it


def test_one_cluster_has_nothing_to_separate():
    ans, prev, _ = _samples()
    t = L.label_clusters(np.zeros(len(ans), int), ans, prev, STRINGS, seed=0)
    assert len(t) == 1 and t.loc[0, "label_kind"] == "none" and t["label_f1"].isna().all()


def test_unclustered_samples_are_left_out_and_explained_share():
    ans, prev, lab = _samples()
    lab = lab.copy()
    lab[:5] = -1  # bad gradients: not clustered
    t = L.label_clusters(lab, ans, prev, STRINGS, seed=0)
    assert len(t) == 4 and t.loc[0, "label_f1"] == 1.0
    share = quality.share_in_clusters(t, lab, "ngram_f1", L.NGRAM_F1)
    assert share == pytest.approx((15 + 20 + 20) / (len(lab) - 5))  # cluster 3 (one member) has no rule


def test_quote_escapes_what_would_break_a_line():
    assert L.quote("a\nb\t'") == "'a\\nb\\t\\''" and L.quote(None) == "⟨start⟩"


def test_corpus_share_counts_every_corpus_target_the_rule_matches():
    ans, prev, lab = _samples()
    # the corpus: the samples, plus 40 more targets: 10 more "don ' → t", 30 of other text
    c_ans = np.r_[ans, np.full(10, 10), np.full(30, 5)]
    c_prev = np.r_[prev, np.tile([11, 8, 9], (10, 1)), np.tile([4, 4, 4], (30, 1))]
    t = L.label_clusters(lab, ans, prev, STRINGS, seed=0, corpus=(c_ans, c_prev)).set_index("cluster")
    n = len(c_ans)
    assert t.loc[0, "label_corpus_share"] == pytest.approx(30 / n)  # 20 members + 10 more trigrams
    assert t.loc[2, "label_corpus_share"] == pytest.approx(50 / n)  # the answer "," anywhere: 20 + 30
    assert pd.isna(t.loc[3, "label_corpus_share"])  # no label, no share
    assert L.label_clusters(lab, ans, prev, STRINGS, seed=0)["label_corpus_share"].isna().all()  # no corpus given


def test_class_rule_share_uses_the_token_classes():
    strings = {**STRINGS, 20: "7", 21: "42"}
    lab = np.r_[np.zeros(20, int), np.ones(20, int)]
    ans = np.r_[np.resize([20, 21], 20), np.full(20, 11)]
    prev = np.tile([4, 4, 4], (40, 1))
    corpus = (np.r_[ans, [20, 21, 5, 5]], np.tile([4, 4, 4], (44, 1)))
    t = L.label_clusters(lab, ans, prev, strings, seed=0, corpus=corpus).set_index("cluster")
    assert t.loc[0, "label"] == "[open] → [digit]"  # two digits, each after "(": no one token rule holds
    assert t.loc[0, "label_corpus_share"] == pytest.approx(22 / 44)  # every digit after an open bracket
