"""The planted-quanta suite: language statistics, files and layout, determinism, metrics.

Everything runs on a tiny suite built here (two 1-layer models of width 8 and 16, a few
steps). Whether the *default* suite shows the quantization model's predictions is checked
by the end-to-end `dvc repro` (metrics/planted.json, via scorecard.check_acceptance).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import read_corpus_tokens, write_reference_losses

from pipeline.core.config import ConfigError, PlantedConfig, SuiteConfig
from pipeline.lm import models
from pipeline.planted import scorecard
from pipeline.planted import suite as planted

TINY = PlantedConfig(
    n_quanta=6,
    n_args=4,
    n_answers=4,
    n_filler=8,
    doc_len=24,
    quanta_per_doc=3,
    n_eval_docs=20,
    widths=(8, 16),
    n_layers=1,
    n_heads=2,
    steps=6,
    batch_size=4,
    warmup_steps=2,
    seed=7,
    threads=1,
)
REVISIONS = ("step0", "step2", "step6")
TABLE = PlantedConfig(rule="table", answer_noise=0.0)  # the table rule, as it was the default


def tiny_suite(root: Path, revisions=REVISIONS) -> SuiteConfig:
    return SuiteConfig(
        models=("tiny-a", "tiny-b"),
        revisions=tuple(revisions),
        sources={"tiny-a": str(root / "models" / "tiny-a"), "tiny-b": str(root / "models" / "tiny-b")},
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    summary = planted.build_suite(TINY, tiny_suite(root), str(root / "corpus.jsonl"), root, progress=False)
    return root, summary


# --------------------------------------------------------------------------- language


def test_quantum_frequencies_follow_zipf_within_sampling_error():
    for cfg in (dataclasses.replace(PlantedConfig(), n_eval_docs=12000), dataclasses.replace(TABLE, n_eval_docs=4000)):
        lang = planted.make_language(cfg)
        p = planted.zipf_frequencies(cfg.n_quanta, cfg.alpha)
        assert np.allclose(p[0] / p[1:], np.arange(2, cfg.n_quanta + 1) ** (cfg.alpha + 1))
        _, quanta = planted.eval_docs(lang, cfg)
        counts = np.bincount(quanta[quanta >= 0], minlength=cfg.n_quanta)
        n = counts.sum()
        if cfg.rule == "table":
            assert n == cfg.n_eval_docs * cfg.quanta_per_doc
        else:  # a third of the blocks are keys, less the answer noise
            expect = cfg.n_eval_docs * cfg.quanta_per_doc / 3 * (1 - cfg.answer_noise)
            assert abs(n - expect) < 4 * np.sqrt(expect)
        z = (counts - n * p) / np.sqrt(n * p * (1 - p))  # binomial z-score of each quantum
        assert np.abs(z).max() < 4.5, z
        chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
        assert chi2 < cfg.n_quanta + 5 * np.sqrt(2 * cfg.n_quanta)  # mean K-1, sd sqrt(2(K-1))


def test_pair_documents_follow_the_rule():
    cfg = dataclasses.replace(PlantedConfig(), answer_noise=0.05)
    lang = planted.make_language(cfg)
    tokens, quanta = planted.sample_docs(lang, 3000, np.random.default_rng(0))
    u = {int(t): k for k, t in enumerate(lang.trigger_ids)}
    v = {int(t): k for k, t in enumerate(lang.partner_ids)}
    bang = int(lang.answer_ids[0])
    for doc, lab in zip(tokens[:300], quanta[:300]):
        for pos in np.flatnonzero(lab >= 0):  # every label is a "!" after its own cue pair
            k = int(lab[pos])
            assert doc[pos] == bang and u[int(doc[pos - 2])] == k and v[int(doc[pos - 1])] == k
        assert ((doc == bang) == (lab >= 0)).all()  # "!" occurs only as a labelled answer
    # keys, left and right decoys in equal shares; neither cue alone tells "!"
    first = np.isin(tokens[:, :-2], lang.trigger_ids)
    second = np.vectorize(lambda t: v.get(int(t), -1))(tokens[:, 1:-1])
    cue = np.vectorize(lambda t: u.get(int(t), -2))(tokens[:, :-2])
    key = first & (cue == second)
    answered = tokens[:, 2:] == bang
    assert abs(answered[key].mean() - (1 - cfg.answer_noise)) < 0.02
    assert not answered[first & ~key].any()  # decoys are followed by filler
    assert 0.25 < answered[first].mean() < 0.40  # "!" after a first cue: about 1/3
    assert abs(key[first].mean() - 1 / 3) < 0.03


def test_probe_set_holds_every_quantum_equally():
    cfg = PlantedConfig()
    lang = planted.make_language(cfg)
    tokens, quanta = planted.probe_docs(lang, cfg)
    counts = np.bincount(quanta[quanta >= 0], minlength=cfg.n_quanta)
    # n_probe keys of each quantum are forced (a few less by the answer noise, a few more
    # from the padding of the last document and from the other blocks' own keys)
    assert counts.min() >= 0.8 * cfg.n_probe and counts.max() <= 1.5 * cfg.n_probe
    eval_tokens, _ = planted.eval_docs(lang, cfg)
    assert not np.array_equal(tokens[: len(eval_tokens)], eval_tokens[: len(tokens)])  # held out
    again, _ = planted.probe_docs(lang, cfg)
    assert np.array_equal(tokens, again)  # seeded


def test_table_documents_follow_the_rules():
    cfg = TABLE
    lang = planted.make_language(cfg)
    tokens, quanta = planted.sample_docs(lang, 400, np.random.default_rng(0))
    assert tokens.shape == quanta.shape == (400, cfg.doc_len)
    trig = {int(t): k for k, t in enumerate(lang.trigger_ids)}
    args = {int(t): j for j, t in enumerate(lang.arg_ids)}
    for doc, lab in zip(tokens, quanta):
        assert (lab >= 0).sum() == cfg.quanta_per_doc
        seen = set()
        for pos in np.flatnonzero(lab >= 0):
            k, j = int(lab[pos]), args[int(doc[pos - 2])]
            assert trig[int(doc[pos - 1])] == k
            assert doc[pos] == lang.answer_ids[lang.table[k, j]]
            assert (k, j) not in seen, "a (quantum, argument) pair repeats within a document"
            seen.add((k, j))
        # triggers occur only inside instances, so every trigger is followed by its answer
        for pos in np.flatnonzero(np.isin(doc, lang.trigger_ids)):
            assert lab[pos + 1] == trig[int(doc[pos])]
        assert np.isin(doc[lab >= 0], lang.answer_ids).all()
    # each table is a permutation: neither the trigger nor the argument alone tells the answer
    assert all(sorted(row) == list(range(cfg.n_answers)) for row in lang.table.tolist())
    assert all(len(set(col)) > 1 for col in lang.table.T.tolist())
    # no table agrees with those of the most frequent quanta (they dominate the argument-only guess)
    top = 3
    table = planted.make_language(dataclasses.replace(cfg, distinct_from_top=top)).table
    for k in range(1, cfg.n_quanta):
        assert not (table[k] == table[: min(k, top)]).any()


def test_answer_vocabulary_is_shared_so_the_answer_does_not_reveal_the_quantum():
    from sklearn.metrics import adjusted_rand_score

    cfg = TABLE
    lang = planted.make_language(cfg)
    tokens, quanta = planted.sample_docs(lang, 3000, np.random.default_rng(1))
    k, y = quanta[quanta >= 0], tokens[quanta >= 0]
    for q in range(10):  # every frequent quantum uses every answer
        assert set(y[k == q].tolist()) == set(lang.answer_ids.tolist())
    for a in lang.answer_ids:  # every answer serves many quanta
        assert len(set(k[y == a].tolist())) >= cfg.n_quanta // 2
    assert abs(adjusted_rand_score(k, y)) < 0.05


def test_gate_rule_answers_on_active_arguments_only():
    from sklearn.metrics import adjusted_rand_score

    cfg = PlantedConfig(rule="gate", n_active=4, answer_noise=0.05)
    lang = planted.make_language(cfg)
    # each quantum: one answer, in blocks of frequency rank, on exactly n_active arguments
    assert ((lang.table >= 0).sum(axis=1) == 4).all()
    answers = np.array([row[row >= 0][0] for row in lang.table])
    assert all((row[row >= 0] == a).all() for row, a in zip(lang.table, answers))
    assert answers.tolist() == (np.arange(cfg.n_quanta) * cfg.n_answers // cfg.n_quanta).tolist()
    tokens, quanta = planted.sample_docs(lang, 4000, np.random.default_rng(2))
    trig = {int(t): k for k, t in enumerate(lang.trigger_ids)}
    args = {int(t): j for j, t in enumerate(lang.arg_ids)}
    fired = closed = noisy = 0
    for doc, lab in zip(tokens, quanta):
        for pos in np.flatnonzero(np.isin(doc, lang.trigger_ids)):  # every instance
            k, j = trig[int(doc[pos])], args[int(doc[pos - 1])]
            if lang.table[k, j] < 0:  # closed gate: filler follows, unlabelled
                assert doc[pos + 1] in lang.filler_ids and lab[pos + 1] == -1
                closed += 1
            elif lab[pos + 1] == k:
                assert doc[pos + 1] == lang.answer_ids[lang.table[k, j]]
                fired += 1
            else:  # open gate, answer replaced by filler (answer_noise)
                assert lab[pos + 1] == -1 and doc[pos + 1] in lang.filler_ids
                noisy += 1
        assert (lab >= 0).sum() <= cfg.quanta_per_doc
    assert abs(closed / (fired + closed + noisy) - 0.5) < 0.02  # n_active / n_args
    assert abs(noisy / (fired + noisy) - 0.05) < 0.01
    # the top quanta share one answer, so the answer token barely tells the quantum
    k, y = quanta[quanta >= 0], tokens[quanta >= 0]
    assert adjusted_rand_score(k, y) < 0.3
    with pytest.raises(ConfigError, match="n_active"):
        dataclasses.replace(cfg, n_active=8)
    with pytest.raises(ConfigError, match="planted.rule"):
        dataclasses.replace(cfg, rule="lookup")
    with pytest.raises(ConfigError, match="answer_noise"):
        dataclasses.replace(cfg, answer_noise=1.0)


def test_config_errors_are_one_line_and_name_the_key():
    """The planted section is checked when params are read (PlantedConfig), so `quanta check`
    and every stage refuse it, not only the planted stage when it builds the language."""
    for bad, match in [(dict(rule="table", n_args=3), "n_args must equal n_answers"), (dict(doc_len=8), "doc_len"),
                       (dict(rule="table", quanta_per_doc=5), "quanta_per_doc"),
                       (dict(n_quanta=1), "n_quanta must be >= 2 for rule pair"),
                       (dict(widths=(10,)), "widths"),  # head size 5 is odd
                       (dict(n_heads=0), "n_heads"),  # not a ZeroDivisionError
                       (dict(steps=0), "planted.steps"), (dict(rule="table", n_quanta=0), "planted.n_quanta must be >= 1")]:
        with pytest.raises(ConfigError, match=match) as e:
            dataclasses.replace(TINY, **bad)
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- revisions


@pytest.mark.parametrize("bad", ["main", "step", "Step10", "step-1", "ckpt100", "step10a"])
def test_bad_revision_names_error_clearly(bad):
    with pytest.raises(planted.PlantedError, match=r"'stepN'"):
        planted.parse_revisions(["step1", bad], steps=100)


def test_revisions_past_training_or_repeated_error():
    with pytest.raises(planted.PlantedError, match="past the end of training"):
        planted.parse_revisions(["step10", "step101"], steps=100)
    with pytest.raises(planted.PlantedError, match="named twice"):
        planted.parse_revisions(["step10", "step010"], steps=100)
    with pytest.raises(planted.PlantedError, match="empty"):
        planted.parse_revisions([], steps=100)
    assert planted.parse_revisions(["step100", "step0", "step7"], steps=100) == {"step100": 100, "step0": 0, "step7": 7}


def test_build_rejects_bad_revision_before_training(tmp_path):
    suite = tiny_suite(tmp_path, revisions=("step2", "main"))
    with pytest.raises(planted.PlantedError, match="'main'"):
        planted.build_suite(TINY, suite, str(tmp_path / "corpus.jsonl"), tmp_path, progress=False)
    assert not (tmp_path / "models").exists()


def test_build_rejects_inconsistent_suite(tmp_path):
    suite = tiny_suite(tmp_path)
    with pytest.raises(planted.PlantedError, match="one width per model"):
        planted.build_suite(dataclasses.replace(TINY, widths=(8,)), suite, "x.jsonl", tmp_path, progress=False)
    wrong = dataclasses.replace(suite, sources={**suite.sources, "tiny-b": str(tmp_path / "models" / "elsewhere")})
    with pytest.raises(planted.PlantedError, match="suite.sources.tiny-b"):
        planted.build_suite(TINY, wrong, "x.jsonl", tmp_path, progress=False)


def test_real_model_run_writes_only_a_marker(tmp_path):
    suite = SuiteConfig(models=("pythia-70m",), revisions=("step143000",), sources={"pythia-70m": "EleutherAI/pythia-70m"})
    out = planted.build_suite(TINY, suite, "EleutherAI/some-dataset", tmp_path / "planted", progress=False)
    assert out == {"planted": False}
    assert [p.name for p in (tmp_path / "planted").iterdir()] == ["README.md"]


def test_stage_refuses_a_missing_source_before_training(tmp_path, monkeypatch):
    """A suite of planted models and one local model that is not there: the planted stage
    fails on the missing one before it trains the others."""
    import yaml

    from pipeline.core.config import to_dict
    from stages import planted as planted_stage

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "planted"
    params = {"planted": {**to_dict(dataclasses.replace(TINY, widths=(8, 16, 24))), "widths": [8, 16, 24]},
              "suite": {"models": ["tiny-a", "tiny-b", "mine"], "revisions": list(REVISIONS),
                        "sources": {"tiny-a": str(out / "models" / "tiny-a"), "tiny-b": str(out / "models" / "tiny-b"),
                                    "mine": "models/mine"}},
              "corpus": {"source": str(out / "corpus.jsonl")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"suite.sources\['mine'\] = 'models/mine': no such file or folder"):
        planted_stage.main(["--params", str(tmp_path / "params.yaml"), "--out", str(out), "--no-progress"])
    assert not (out / "models").exists()
    # with the model there, the stage goes on to build the suite: sources under its --out need not exist yet
    (tmp_path / "models" / "mine").mkdir(parents=True)
    built = []
    monkeypatch.setattr(planted_stage.planted, "build_suite", lambda *a, **k: built.append(a[3]) or {"planted": True})
    planted_stage.main(["--params", str(tmp_path / "params.yaml"), "--out", str(out), "--no-progress"])
    assert built == [str(out)]


# --------------------------------------------------------------------------- the built suite


def test_layout_and_saved_models_load(built):
    from transformers import AutoConfig, AutoTokenizer, GPTNeoXForCausalLM

    root, summary = built
    for name in ("tiny-a", "tiny-b"):
        revs = sorted(p.name for p in (root / "models" / name).iterdir() if p.is_dir())
        assert revs == sorted(REVISIONS)
        for rev in REVISIONS:
            model = GPTNeoXForCausalLM.from_pretrained(root / "models" / name / rev)
            tok = AutoTokenizer.from_pretrained(root / "models" / name / rev)
            assert model.config.vocab_size == len(tok)
        config = AutoConfig.from_pretrained(root / "models" / name / "step6")
        assert summary["models"][name]["non_embedding_params"] == models.param_counts_of_config(config)["non_embedding"]
    w0 = GPTNeoXForCausalLM.from_pretrained(root / "models/tiny-a/step0").state_dict()
    w6 = GPTNeoXForCausalLM.from_pretrained(root / "models/tiny-a/step6").state_dict()
    assert any(not np.array_equal(w0[k].numpy(), w6[k].numpy()) for k in w0), "training changed nothing"
    for f in ("corpus.jsonl", "labels.parquet", "quanta.parquet", "language.json", "suite.json", "README.md"):
        assert (root / f).exists(), f
    assert not list(root.rglob("*.tmp"))
    # what wrote the files is not part of them: two installs give the same bytes (and DVC hashes)
    assert not [p for p in root.rglob("*.json") if "transformers_version" in p.read_text()]


def test_corpus_tokenizes_to_the_labelled_tokens(built):
    from transformers import AutoTokenizer

    root, _ = built
    lang = planted.make_language(TINY)
    tokens, quanta = planted.eval_docs(lang, TINY)
    tok = AutoTokenizer.from_pretrained(root / "models/tiny-b/step2")
    lines = (root / "corpus.jsonl").read_text().splitlines()
    assert len(lines) == TINY.n_eval_docs
    ids = [tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] for line in lines]
    assert np.array_equal(np.array(ids), tokens)
    assert tok(json.loads(lines[0])["text"])["input_ids"] == ids[0]  # no special tokens added by default
    labels = pd.read_parquet(root / "labels.parquet")
    assert list(labels.columns) == ["doc_id", "pos", "quantum"]
    assert [str(t) for t in labels.dtypes] == ["int64", "int32", "int32"]
    assert len(labels) == tokens.size
    lab = labels.pivot(index="doc_id", columns="pos", values="quantum").to_numpy()
    assert np.array_equal(lab, quanta)
    q = pd.read_parquet(root / "quanta.parquet")
    assert np.allclose(q["frequency"], planted.zipf_frequencies(TINY.n_quanta, TINY.alpha))
    assert q["n_eval_tokens"].sum() == (quanta >= 0).sum()
    from pipeline.core.files import read_config

    assert read_config(root / "labels.parquet")["planted"]["seed"] == TINY.seed


def test_same_seed_same_suite_other_seed_other_corpus(built, tmp_path):
    """Same seed, same bytes: also between models trained side by side and one after another."""
    root, _ = built
    again = tmp_path / "again"
    sequential = dataclasses.replace(TINY, workers=1)
    assert planted._n_workers(TINY, 2) == min(2, len(os.sched_getaffinity(0)))
    planted.build_suite(sequential, tiny_suite(again), str(again / "corpus.jsonl"), again, progress=False)
    assert (again / "corpus.jsonl").read_bytes() == (root / "corpus.jsonl").read_bytes()
    for name in ("tiny-a", "tiny-b"):
        for rev in REVISIONS:
            a = (root / "models" / name / rev / "model.safetensors").read_bytes()
            b = (again / "models" / name / rev / "model.safetensors").read_bytes()
            assert a == b, f"{name}/{rev} weights differ between two runs with one seed"
    lang = planted.make_language(dataclasses.replace(TINY, seed=8))
    other, _ = planted.eval_docs(lang, dataclasses.replace(TINY, seed=8))
    assert not np.array_equal(other, planted.eval_docs(planted.make_language(TINY), TINY)[0])


def test_rerun_reuses_finished_models(built, monkeypatch):
    root, summary = built

    def no_training(*a, **k):
        raise AssertionError("a finished model was trained again")

    monkeypatch.setattr(planted, "train_model", no_training)
    again = planted.build_suite(TINY, tiny_suite(root), str(root / "corpus.jsonl"), root, progress=False)
    assert again["models"] == summary["models"]


# --------------------------------------------------------------------------- metrics


def test_reference_losses_and_metrics_on_the_tiny_suite(built, tmp_path):
    import torch
    from transformers import GPTNeoXForCausalLM

    root, _ = built
    losses = tmp_path / "losses"
    write_reference_losses(root, losses, ["tiny-a", "tiny-b"], REVISIONS)
    table = pd.read_parquet(losses / "model=tiny-a" / "revision=step6")
    tokens = read_corpus_tokens(root)
    assert len(table) == tokens.shape[0] * (tokens.shape[1] - 1) and table["pos"].min() == 1
    # the batched reference equals a one-document forward with the HF loss
    model = GPTNeoXForCausalLM.from_pretrained(root / "models/tiny-a/step6").eval()
    x = torch.from_numpy(tokens[3:4])
    with torch.no_grad():
        hf = model(input_ids=x, labels=x).loss.item()  # mean over positions 1..T-1
    assert np.isclose(table[table.doc_id == 3]["loss"].mean(), hf, atol=1e-5)

    m = scorecard.evaluate(root, losses, ["tiny-a", "tiny-b"], REVISIONS, alpha=TINY.alpha)
    assert m["sizes"] == ["tiny-a", "tiny-b"] and m["final_revision"] == "step6"
    assert m["models"]["tiny-b"]["non_embedding_params"] > m["models"]["tiny-a"]["non_embedding_params"]
    assert len(m["emergence"]["step"]) == len(m["per_quantum"]["rank"]) == TINY.n_quanta
    assert isinstance(m["acceptance_failures"], list)
    json.dumps(m)  # JSON-ready as it is


def _synthetic_losses(learned: np.ndarray, n_tok: int = 20):
    """Loss tables where quantum k is learned (0.01 nats) or not (2 nats) per size."""
    K = learned.shape[1]
    labels = pd.DataFrame({"doc_id": np.arange(K * n_tok), "pos": np.ones(K * n_tok, np.int32),
                           "quantum": np.repeat(np.arange(K, dtype=np.int32), n_tok)})
    losses = {}
    for i, row in enumerate(learned):
        loss = np.where(row[labels.quantum], 0.01, 2.0).astype(np.float32)
        losses[(f"m{i}", "step10")] = pd.DataFrame({"doc_id": labels.doc_id, "pos": labels.pos, "loss": loss})
    p = planted.zipf_frequencies(K, 0.5)
    quanta = pd.DataFrame({"quantum": np.arange(K, dtype=np.int32), "frequency": p})
    counts = {f"m{i}": 100 * 2**i for i in range(len(learned))}
    return labels, quanta, losses, counts


def test_metrics_on_a_perfect_quantized_suite_pass_acceptance():
    K, sizes = 30, 5
    # size i knows the 5 (i + 1) most frequent quanta: the quantization model, exactly
    learned = np.array([[k < 5 * (i + 1) for k in range(K)] for i in range(sizes)])
    m = scorecard.compute_metrics(*_synthetic_losses(learned), ["step10"])
    assert m["n_learned_by_size"] == [5, 10, 15, 20, 25]
    assert m["spearman_rank_vs_first_size"] > 0.95
    assert m["abruptness"]["median"] == pytest.approx(1.0)
    assert m["acceptance_failures"] == []


def test_metrics_catch_a_suite_that_breaks_each_criterion():
    K, sizes = 30, 5
    rng = np.random.default_rng(0)
    # learned at random, regardless of frequency and size
    learned = rng.random((sizes, K)) < 0.5
    m = scorecard.compute_metrics(*_synthetic_losses(learned), ["step10"])
    fails = " ".join(m["acceptance_failures"])
    assert "Spearman" in fails and "learned quanta" in fails
    # a slow slide: every quantum's loss falls the same amount at every size step
    labels, quanta, losses, counts = _synthetic_losses(np.zeros((sizes, K), bool))
    for i in range(sizes):
        t = losses[(f"m{i}", "step10")]
        t["loss"] = np.float32(2.0 * (1 - i / (sizes - 1)) + 0.01)
    m = scorecard.compute_metrics(labels, quanta, losses, counts, ["step10"])
    assert m["abruptness"]["median"] == pytest.approx(0.25)
    assert any("slide" in f for f in scorecard.check_acceptance(m))
