"""The embedded planted-quanta suite: a synthetic language with known quanta, and models trained on it.

Why it exists: the pipeline's claims (losses fall with size, skills are acquired one by one in
frequency order, gradient clusters are the skills) cannot be checked on Pythia, whose quanta
nobody knows. Here we plant them. The language has K quanta; quantum k is used on a fraction
p_k ∝ k^-(alpha+1) of instances, as the quantization model assumes. A family of GPT-NeoX
models of log-spaced width is trained on it and saved in Hugging Face format with
Pythia-style ``stepN`` revisions, so every later stage runs exactly the code path a Pythia run
uses, and the ground truth (which token is governed by which quantum) lets us score it.

The language (:mod:`pipeline.planted.language`) is generated from ``planted`` params; this
module writes its corpus and ground truth, trains the models and saves their revisions.

"Learned" (>= 90% of a quantum's answers under 0.1 nats) is decided on the probe set
(:func:`probe_docs`): held-out documents with ``n_probe`` instances of every quantum, as the
paper measured each sparse-parity subtask on its own test set. In the Zipf corpus most
quanta have 1-3 answers, and "learned" there is noise.

Positions follow the losses tables: the label at ``pos`` belongs to token ``pos``, whose loss is
predicting it from tokens ``0..pos-1``. Only answer tokens carry a quantum label (-1 elsewhere).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from pipeline.core.config import PlantedConfig, SuiteConfig, inside, step_of, to_dict
from pipeline.core.files import atomic_path, read_meta, run_log_path, split_run, write_json, write_meta, write_parquet
from pipeline.planted.language import (  # noqa: F401 (re-exported: the suite's public names)
    Language,
    PlantedError,
    docs_text,
    language_json,
    make_language,
    make_tokenizer,
    quanta_table,
    sample_docs,
    zipf_frequencies,
)

# What "learned" means for a quantum: at least LEARNED_FRACTION of its answer tokens under
# LEARNED_LOSS nats (on the probe set; the paper scored each sparse-parity subtask alike).
LEARNED_LOSS = 0.1
LEARNED_FRACTION = 0.9

# Bump when the language or the training loop changes meaning, so that a resumed run never
# reuses a model trained by older code (models/<name>/train.json records it).
FORMAT_VERSION = 4  # 4: saved JSON files without transformers_version




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


def planted_models(suite: SuiteConfig, root: Path) -> list[str]:
    """Names of suite models whose source lies inside `root` (the ones the planted stage trains)."""
    return [name for name in suite.models if inside(suite.sources.get(name, ""), root)] if suite.sources else []


def planted_requested(suite: SuiteConfig, corpus_source: str, root: Path) -> bool:
    """Whether anything of the run reads from `root`: a suite source or the corpus source."""
    return bool(planted_models(suite, root)) or inside(corpus_source, root)


MARKER = """\
# cache/planted: not used by this run

Neither `suite.sources` nor `corpus.source` in params.yaml points into this directory, so the
`planted` stage trained nothing. Point them here (see params.yaml's default) to run the
embedded planted-quanta suite.
"""

README = """\
# The planted-quanta suite

Written by the `planted` stage (pipeline/planted/suite.py; pipeline/planted/language.py describes the language).

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


# --------------------------------------------------------------------------- ground truth, read back

#: The suite's ground truth under its directory (see README above); read through the functions below.
LABELS_FILE = "labels.parquet"
QUANTA_FILE = "quanta.parquet"
PROBE_FILE = "probe.parquet"
PROBE_LOSSES_FILE = "probe_losses.parquet"


def has_ground_truth(planted_dir: str | Path) -> bool:
    """Whether `planted_dir` holds a planted suite's labels (False on a real suite)."""
    return (Path(planted_dir) / LABELS_FILE).exists()


def read_labels(planted_dir: str | Path) -> pd.DataFrame:
    """``labels.parquet``: doc_id int64, pos int32, quantum int32 (-1: none), one row per token."""
    return pd.read_parquet(Path(planted_dir) / LABELS_FILE, columns=["doc_id", "pos", "quantum"])


def read_quanta(planted_dir: str | Path, columns: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """``quanta.parquet``: one row per quantum (quantum, frequency p_k, rank, trigger, rule), or
    only `columns` of it."""
    return pd.read_parquet(Path(planted_dir) / QUANTA_FILE, columns=None if columns is None else list(columns))


def read_cues(planted_dir: str | Path) -> list[list[str]]:
    """Per quantum, the words a label must name to name the quantum: its cue pair u_k v_k
    (rule pair), or its trigger word Q_k (table, gate); from ``language.json``."""
    lang = json.loads((Path(planted_dir) / "language.json").read_text())
    if lang["rule"] == "pair":
        return [list(pair) for pair in lang["cues"]]
    return [[t] for t in lang["triggers"]]


def read_probe_losses(planted_dir: str | Path, models: Sequence[str]) -> Optional[dict[str, pd.DataFrame]]:
    """model -> its probe-set losses (doc_id, pos, quantum, revision, loss), written while it
    trained; None when the suite has no probe set (``probe.parquet``)."""
    root = Path(planted_dir)
    if not (root / PROBE_FILE).exists():
        return None
    out = {}
    for m in models:
        path = root / "models" / m / PROBE_LOSSES_FILE
        if not path.exists():
            raise PlantedError(f"model {m} has no probe losses ({path}); rerun `dvc repro planted`")
        out[m] = pd.read_parquet(path)
    return out


def sample_quanta(planted_dir: str | Path, samples: pd.DataFrame, order: Optional[Sequence[int]] = None) -> Optional[np.ndarray]:
    """The planted quantum of each row of `samples` (doc_id, pos), -1 where none; None when
    `planted_dir` holds no ground truth (a real suite). The one join of samples to labels.

    order: sample ids (`samples["sample"]` values, e.g. a clusters table's rows); the labels
    are then given in that order, -1 for an id that `samples` lacks."""
    if not has_ground_truth(planted_dir):
        return None
    labels = read_labels(planted_dir)
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
    write_parquet(label_table(quanta), root / LABELS_FILE, config=stage_config)
    write_parquet(quanta_table(lang, quanta), root / QUANTA_FILE, config=stage_config)
    _, probe_quanta = probe_docs(lang, cfg)
    probe = label_table(probe_quanta)
    probe = probe[probe["quantum"] >= 0].reset_index(drop=True)
    write_parquet(probe, root / PROBE_FILE, config=stage_config)


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
    from pipeline.core.resources import torch_threads
    from pipeline.lm.models import param_counts

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
        counts = param_counts(model)
        info = {
            "width": width,
            "non_embedding_params": counts["non_embedding"],
            "total_params": counts["total"],
            "train_seconds": round(seconds, 2),
        }
        write_parquet(pd.concat(probe_losses, ignore_index=True), tmp / PROBE_LOSSES_FILE)
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
            # A reference, so a plain log-softmax over the full (batch, pos, vocab) logits, as
            # the paper evaluated; it stays apart from pipeline.lm.cross_entropy (logsumexp -
            # logit), which rounds differently in the last bit (up to ~2e-6 nats): routing it
            # there would change the planted reference tables and probe scores it feeds.
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
