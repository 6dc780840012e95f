"""Typed, strict configuration: one frozen dataclass per section of params.yaml.

Why strict: a misspelled key in a YAML file that is silently ignored changes numbers
without anyone noticing (lm-evaluation-harness users have been bitten by exactly this).
So every section is built with :func:`build`, which rejects unknown keys (naming the
valid ones) and wrong types (naming the expected type) before any work starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml

from pipeline.core.errors import QuantaError


class ConfigError(QuantaError, ValueError):
    """A params.yaml problem, phrased as one line that names the key and the fix."""


# --------------------------------------------------------------------------- sections

# The planted language's rules (pipeline/planted/language.py explains each).
PLANTED_RULES = ("pair", "table", "gate")


@dataclasses.dataclass(frozen=True)
class PlantedConfig:
    """The embedded planted-quanta suite (pipeline/planted/suite.py, pipeline/planted/language.py): a language, a model family."""

    n_quanta: int = 100
    # p_k ∝ k^-(alpha+1); the quantization model predicts alpha_N = alpha.
    alpha: float = 0.5
    # pair: quantum k is the cue pair u_k v_k, answered by one word "!" shared by all quanta;
    # table: quantum k maps each argument to an answer (a permutation); gate: quantum k
    # answers its one word on n_active of the arguments, filler follows on the others
    # (pipeline/planted/language.py explains all three; docs/planted-languages.md compares them).
    rule: str = "pair"
    n_active: int = 4  # gate: arguments on which a quantum answers
    answer_noise: float = 0.01  # an instance's answer replaced by filler with this probability
    n_args: int = 8  # table/gate: argument words; quantum k's table maps them onto the answers
    n_answers: int = 8  # table/gate: answer words shared by all quanta (= n_args: tables are permutations)
    # table: no table shares an answer (on any argument) with those of this many most frequent quanta
    distinct_from_top: int = 1
    n_filler: int = 64  # unpredictable (uniform) filler words
    doc_len: int = 32  # tokens per document
    quanta_per_doc: int = 6  # rule instances (3 tokens each) per document
    n_eval_docs: int = 2500
    # The probe set: held-out documents with n_probe key instances of every quantum, on
    # which "learned" is decided (as the paper's per-subtask test sets).
    n_probe: int = 32
    widths: tuple[int, ...] = (4, 8, 12, 20, 32, 48)  # one per suite.models name, in order
    n_layers: int = 1
    n_heads: int = 2
    mlp_ratio: int = 4  # intermediate size / width, as Pythia
    steps: int = 3000
    batch_size: int = 32
    # Peak learning rate of width w: lr * (lr_base_width / w) ** lr_width_exponent (wider
    # models take smaller steps, as in muP-style width scaling; 0 = one lr for all).
    lr: float = 6e-3
    lr_base_width: int = 8
    lr_width_exponent: float = 0.5
    min_lr_ratio: float = 0.0  # cosine decay to this fraction of the peak lr
    weight_decay: float = 0.1  # AdamW, on matrices only
    warmup_steps: int = 100
    seed: int = 0
    threads: int = 1  # torch intra-op threads for training; 0 = torch's default
    # Models trained at once, one process each; 0 = as many as cores / threads allow.
    # Results do not depend on it (each model's training is its own seeded computation).
    workers: int = 0

    def __post_init__(self):
        # Checked here, when params are read, not when the planted stage builds the language:
        # `quanta check` and every stage then refuse a suite that cannot be trained.
        problems = []
        if self.n_quanta < 1:
            problems.append("planted.n_quanta must be >= 1")
        if self.alpha <= 0:
            problems.append("planted.alpha must be > 0 (p_k ∝ k^-(alpha+1) must fall with k)")
        if self.n_filler < 1 or self.n_answers < 2:
            problems.append("planted.n_filler must be >= 1 and n_answers >= 2")
        if self.rule not in PLANTED_RULES:
            problems.append(f"planted.rule must be one of {list(PLANTED_RULES)}, got {self.rule!r}")
        if self.rule == "pair" and self.n_quanta < 2:
            problems.append("planted.n_quanta must be >= 2 for rule pair (a decoy pairs one quantum's cue with another's)")
        if self.rule == "table" and self.n_args != self.n_answers:
            problems.append(
                "planted.n_args must equal n_answers (each quantum's table is a permutation of the answers, "
                "so neither the trigger nor the argument alone tells the answer)"
            )
        if self.rule == "gate" and not 1 <= self.n_active < self.n_args:
            problems.append("planted.n_active must be in 1..n_args - 1 (a gate quantum answers on some arguments, not all)")
        if not 0 <= self.answer_noise < 1:
            problems.append("planted.answer_noise must be in [0, 1)")
        if not 0 <= self.distinct_from_top <= self.n_answers // 2:
            problems.append("planted.distinct_from_top must be in 0..n_answers // 2 (tables avoid that many others per argument)")
        if self.rule != "pair" and not 1 <= self.quanta_per_doc <= self.n_args:
            problems.append("planted.quanta_per_doc must be in 1..n_args (no (quantum, argument) pair repeats in a document)")
        if self.doc_len < 3 * self.quanta_per_doc:
            problems.append("planted.doc_len must be >= 3 * quanta_per_doc (an instance is 3 tokens)")
        if not self.widths:
            problems.append("planted.widths is empty")
        for w in self.widths:
            if w < 1 or self.n_heads < 1 or w % self.n_heads or (w // self.n_heads) % 2:
                problems.append(f"planted.widths: {w} is not a positive multiple of 2 * n_heads (rotary needs an even head size)")
        if len(set(self.widths)) != len(self.widths):
            problems.append("planted.widths has repeats; one width per model")
        if min(self.steps, self.batch_size, self.n_eval_docs, self.n_probe, self.n_layers, self.n_heads, self.mlp_ratio) < 1:
            problems.append("planted.steps, batch_size, n_eval_docs, n_probe, n_layers, n_heads and mlp_ratio must be >= 1")
        if self.quanta_per_doc < 1:
            problems.append("planted.quanta_per_doc must be >= 1")
        if not 0 <= self.min_lr_ratio <= 1 or self.lr <= 0 or self.lr_base_width < 1:
            problems.append("planted.lr must be > 0, lr_base_width >= 1 and min_lr_ratio in [0, 1]")
        if problems:
            raise ConfigError("; ".join(problems))


_PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
# Deduplicated-Pile twins exist for the eight original sizes only.
_PYTHIA_DEDUPED = ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")

#: suite model name -> hub id, so params.yaml may list ``pythia-70m`` without a source.
PYTHIA_MODELS: dict[str, str] = {
    **{f"pythia-{s}": f"EleutherAI/pythia-{s}" for s in _PYTHIA_SIZES},
    **{f"pythia-{s}-deduped": f"EleutherAI/pythia-{s}-deduped" for s in _PYTHIA_DEDUPED},
}

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """Which models to evaluate: names used in paths, where each comes from, at which revisions.

    `sources[name]` is a hub id (``EleutherAI/pythia-70m``), a local Hugging Face
    directory, or a ``.gguf`` file. A local directory that has one sub-directory per
    revision (``<dir>/step1000/``) is read at those revisions, as the planted suite is.
    """

    models: tuple[str, ...] = ()
    revisions: tuple[str, ...] = ("main",)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    gguf_files: dict[str, str] = dataclasses.field(default_factory=dict)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    cache_dir: str = "cache/hf"
    local_files_only: bool = False
    trust_remote_code: bool = False

    def __post_init__(self):
        # Names become hive partition values (model=<name>/revision=<rev>), so they must
        # be unique and path-safe. sources may name models not in `models`, so that a
        # sweep can evaluate a subset without editing sources.
        for key, names in (("models", self.models), ("revisions", self.revisions)):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ConfigError(f"suite.{key}: '{dup[0]}' is listed twice")
            bad = [n for n in names if not n or any(c in n for c in "/\\=")]
            if bad:
                raise ConfigError(f"suite.{key}: {bad[0]!r} cannot be used in a path; "
                                  "use a name without '/', '\\' or '=' (the source goes in suite.sources)")
        if not self.revisions:
            raise ConfigError("suite.revisions is empty; name at least one (e.g. main or step143000)")
        # The form only: whether this machine has the device is known when a stage resolves it
        # (pipeline.lm.models.resolve_device), which says so in one line naming suite.device.
        if not _DEVICE.match(self.device):
            raise ConfigError(f"suite.device: '{self.device}' is not a device; use auto, cpu, cuda, cuda:N or mps")


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Documents and their tokenization (pipeline/lm/corpus.py)."""

    # A Hugging Face dataset id (streamed), a local .jsonl/.txt/.parquet file.
    source: str = "cache/planted/corpus.jsonl"
    dataset_config: Optional[str] = None
    split: str = "test"
    text_field: str = "text"
    n_docs: Optional[int] = None
    n_tokens: Optional[int] = None
    tokenizer: Optional[str] = None  # a model name of the suite; default: its first model
    # truncate: score tokens 1..max_len-1 of each document (the paper).
    # strided: score every token of every document, each with >= min_context tokens of
    # context (or all it has, near the start), using windows of max_len.
    context: Literal["truncate", "strided"] = "truncate"
    max_len: int = 1024
    min_context: int = 512
    on_decode_error: Literal["error", "replace"] = "error"

    def __post_init__(self):
        if self.max_len < 2:
            raise ConfigError(f"corpus.max_len must be >= 2 (one context token and one target), got {self.max_len}")
        if self.n_docs is not None and self.n_docs < 1:
            raise ConfigError(f"corpus.n_docs must be >= 1 or null (all documents), got {self.n_docs}")
        if self.n_tokens is not None and self.n_tokens < 2:
            raise ConfigError(f"corpus.n_tokens must be >= 2 or null (no limit), got {self.n_tokens}")
        # min_context only matters for strided windows: there it sets the overlap, and
        # every window must advance by at least one token.
        if self.context == "strided" and not 1 <= self.min_context < self.max_len:
            raise ConfigError(
                f"corpus.min_context must be in [1, max_len-1] = [1, {self.max_len - 1}] for context: strided, "
                f"got {self.min_context}"
            )


@dataclasses.dataclass(frozen=True)
class LossesConfig:
    """Per-token loss evaluation (pipeline/lm/losses.py)."""

    # Padded tokens per forward pass, and positions per chunk of the unembedding +
    # cross-entropy. 0 = auto by device: 16384 / 4096 on GPUs, 1024 / 256 on CPUs (whose
    # memory bandwidth favours cache-sized batches; bench/RESULTS.md).
    batch_tokens: int = 0
    logits_chunk: int = 0
    # Mixed precision of the forward pass. auto: bfloat16 autocast on CUDA, none elsewhere
    # (the CPU runs in the model's dtype: fp32 by default, as the paper did).
    autocast: Literal["auto", "bfloat16", "float16", "none"] = "auto"
    shard_tokens: int = 1_000_000  # tokens per output part file (and Dask task)
    # "local": a dask LocalCluster; "inprocess": no Dask at all; anything else is a
    # scheduler address. DASK_SCHEDULER_ADDRESS in the environment overrides it.
    scheduler: str = "local"
    n_workers: int = 1
    threads_per_worker: int = 0  # torch threads per task; 0: torch's own in-process, cores / workers on a LocalCluster
    progress: bool = True

    def __post_init__(self):
        for key in ("batch_tokens", "logits_chunk"):
            if getattr(self, key) < 0:
                raise ConfigError(f"losses.{key} must be >= 1, or 0 (auto by device), got {getattr(self, key)}")
        if self.shard_tokens < 1:
            raise ConfigError(f"losses.shard_tokens must be >= 1, got {self.shard_tokens}")
        if self.n_workers < 1:
            raise ConfigError(f"losses.n_workers must be >= 1, got {self.n_workers}")
        if self.threads_per_worker < 0:
            raise ConfigError(f"losses.threads_per_worker must be >= 0 (0: torch's own), got {self.threads_per_worker}")


# Parameter groups that gradients.include / exclude may name besides regular expressions.
GRADIENT_GROUPS = ("@embeddings", "@norms")
PROJECTIONS = ("none", "sjlt", "logra", "tensorsketch")


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """Which tokens QDG studies (pipeline/qdg/selection.py): low-loss tokens of one model."""

    # The model and checkpoint whose loss table decides (a name in suite.models and one in
    # suite.revisions). Explicit, not null: dvc.yaml names that loss table as a dependency.
    model: str = "planted-w48"
    revision: str = "step3000"
    max_loss: float = 0.1  # nats; the paper's threshold
    # Drop tokens another mechanism explains: "induction" (the paper's: the target
    # completes a trigram seen earlier in the document) and/or "bigram" (the last
    # context token followed by the target was seen earlier).
    filters: tuple[str, ...] = ()
    sampling: Literal["random", "stride"] = "random"  # seeded random, or the paper's fixed stride
    n_samples: int = 10_000
    seed: int = 0

    def __post_init__(self):
        bad = sorted(set(self.filters) - {"induction", "bigram"})
        if bad:
            raise ConfigError(f"select.filters: unknown filter '{bad[0]}'; use 'induction' and/or 'bigram'")
        if self.n_samples < 1:
            raise ConfigError(f"select.n_samples must be >= 1, got {self.n_samples}")
        if not self.max_loss > 0:
            raise ConfigError(f"select.max_loss must be > 0 nats, got {self.max_loss}")


@dataclasses.dataclass(frozen=True)
class GradientsConfig:
    """Per-target gradients and their projection (pipeline/qdg/gradients.py, projection.py)."""

    # The model whose gradients are taken; null: select.model / select.revision (the
    # paper's choice). Another model must share the corpus tokenizer.
    model: Optional[str] = None
    revision: Optional[str] = None
    # Regular expressions (re.search on parameter names) and the groups @embeddings, @norms.
    include: tuple[str, ...] = (".*",)
    exclude: tuple[str, ...] = ("@embeddings", "@norms")
    # Tokens of context + target; null: corpus.max_len (the context the losses saw). A
    # target at pos >= max_len sees the max_len - 1 tokens before it.
    max_len: Optional[int] = None
    dtype: Literal["float32", "float64"] = "float32"  # the model's weights (the paper: fp32)
    batch_tokens: int = 8192  # padded context tokens per forward pass
    batch_rows: int = 32  # rows per forward pass: bounds rows x largest parameter of per-target gradients
    # Peak memory of a batch (GiB, on the model's device): batches are sized from the
    # activations one row keeps, measured on the model; null: only batch_tokens/batch_rows.
    memory_gb: Optional[float] = 8.0
    # Several targets of one document window in one row: auto = when it saves work
    # (see plan_rows), always, never. Never changes results beyond fp32 rounding.
    share_context: Literal["auto", "always", "never"] = "auto"
    # tensorsketch: weight blocks sketched from their factors, never formed; the norms
    # column then holds their sketch's norm (an estimate) rather than the exact one
    projection: Literal["none", "sjlt", "logra", "tensorsketch"] = "sjlt"
    k: int = 8192  # projection dimension (logra: at most k, a square r x r per weight)
    nnz: int = 1  # sjlt (and tensorsketch's non-matrix blocks): outputs per gradient coordinate (Kane-Nelson s)
    seed: int = 0  # of the projection
    # More projection seeds of the same exact gradients, computed in the same pass: the
    # cluster stage clusters each copy and reports its ARI against the main clustering.
    stability_seeds: tuple[int, ...] = ()
    out_dtype: Literal["float32", "float16"] = "float32"
    verify: bool = True  # check the first batch against a summed backward pass
    # Where it runs, as the losses stage: samples per shard (= part file, = Dask task).
    shard_samples: int = 2000
    scheduler: str = "local"
    n_workers: int = 1
    threads_per_worker: int = 0
    progress: bool = True

    def __post_init__(self):
        import re

        if not self.include:
            raise ConfigError("gradients.include is empty; use ['.*'] for every parameter")
        for key in ("include", "exclude"):
            for pat in getattr(self, key):
                if pat.startswith("@"):
                    if pat not in GRADIENT_GROUPS:
                        raise ConfigError(
                            f"gradients.{key}: unknown group '{pat}'; groups are {', '.join(GRADIENT_GROUPS)}"
                        )
                    continue
                try:
                    re.compile(pat)
                except re.error as e:
                    raise ConfigError(f"gradients.{key}: '{pat}' is not a regular expression ({e})") from None
        if self.max_len is not None and self.max_len < 2:
            raise ConfigError(f"gradients.max_len must be >= 2 (one context token and one target), got {self.max_len}")
        if self.batch_tokens < 1 or self.batch_rows < 1 or self.shard_samples < 1 or self.n_workers < 1:
            raise ConfigError("gradients.batch_tokens, batch_rows, shard_samples and n_workers must be >= 1")
        if self.stability_seeds and self.projection == "none":
            raise ConfigError("gradients.stability_seeds needs a random projection (projection: sjlt, logra or "
                              "tensorsketch); "
                              "use stability_seeds: [] with projection: none")
        if self.seed in self.stability_seeds or len(set(self.stability_seeds)) != len(self.stability_seeds):
            raise ConfigError(f"gradients.stability_seeds must be distinct and differ from gradients.seed ({self.seed}), "
                              f"got {list(self.stability_seeds)}")
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise ConfigError(f"gradients.memory_gb must be > 0 or null, got {self.memory_gb}")
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"gradients.projection must be one of {list(PROJECTIONS)}, got {self.projection!r}")
        if self.projection in ("sjlt", "tensorsketch") and (self.k < 1 or self.nnz < 1 or self.k % self.nnz):
            raise ConfigError(f"gradients.k ({self.k}) must be a positive multiple of gradients.nnz ({self.nnz})")
        if self.projection == "tensorsketch" and self.k < 2:
            raise ConfigError(f"gradients.k must be >= 2 for tensorsketch, got {self.k}")
        if self.projection == "logra" and self.k < 1:
            raise ConfigError(f"gradients.k must be >= 1 for logra, got {self.k}")


@dataclasses.dataclass(frozen=True)
class SimilarityConfig:
    """Cosine similarity of the gradients and the affinity clustering uses (pipeline/qdg/similarity.py)."""

    # angular: 1 - arccos(C)/pi (the paper's); shifted: (1 + C)/2. Both map [-1, 1] to [0, 1].
    affinity: Literal["angular", "shifted"] = "angular"
    # dense: the N x N matrix; knn: a sparse symmetrised k-nearest-neighbour graph;
    # auto: dense up to dense_max samples, knn above.
    mode: Literal["auto", "dense", "knn"] = "auto"
    dense_max: int = 20_000
    n_neighbors: int = 60  # knn: neighbours per sample (excluding itself)
    knn_backend: Literal["auto", "faiss", "sklearn"] = "auto"  # auto: faiss when installed
    # kNN search is exact up to knn_exact_max samples; above, neighbours are searched among
    # candidates found in knn_dim SVD dimensions, and their exact cosines weigh the edges.
    knn_exact_max: int = 20_000
    knn_dim: int = 256
    memory_gb: float = 2.0  # bound on the float32 working blocks of the similarity computation

    def __post_init__(self):
        if self.dense_max < 2 or self.n_neighbors < 1 or not self.memory_gb > 0:
            raise ConfigError("similarity.dense_max must be >= 2, n_neighbors >= 1 and memory_gb > 0")


def data_chooses_k(cluster: "ClusterConfig") -> bool:
    """Whether the main clustering's number of clusters is an output (leiden; knn_average, cut: data)."""
    return cluster.method == "leiden" or (cluster.method == "knn_average" and cluster.cut == "data")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Clustering of the affinity (pipeline/qdg/clustering.py)."""

    # One k, or a sweep (the paper: 10 ... 1500). The first is the main k: it gets the
    # `cluster` column, the summary's order and the stability score.
    n_clusters: Union[int, tuple[int, ...]] = (400,)
    # knn_average (the default): average linkage on the kNN graph (pipeline/qdg/graph_linkage.py;
    # any N, no dense matrix), its main clustering cut where the data say (cut: data);
    # agglomerative: average linkage on the dense distance 1 - affinity, one tree cut at every
    # k, counting only clusters of min_cluster_size (dense affinities only); leiden: Leiden
    # communities of the kNN graph (its own number of clusters is the main one; each k of the
    # sweep merges communities by average linkage); spectral (the paper's: SpectralClustering
    # on the affinity). README "Which clustering" compares them.
    method: Literal["knn_average", "agglomerative", "leiden", "spectral"] = "knn_average"
    # knn_average: data: the main clustering is the excess-of-mass cut of the tree, its number
    # of clusters an output, samples in no cluster of min_cluster_size unassigned (-1);
    # k: the main clustering is the tree cut at n_clusters[0]. The other k of n_clusters are
    # fixed-k cuts either way.
    cut: Literal["data", "k"] = "data"
    # knn_average, cut: data: a sample whose GLOSH outlier score (1 - the similarity at which it
    # joined its cluster / the cluster's highest) exceeds this is unassigned too; 1: HDBSCAN's labels
    max_outlier_score: float = 0.7
    # agglomerative, knn_average: a cut counts only clusters of at least this many samples;
    # agglomerative: smaller ones join the cluster they are most similar to (1: the plain
    # cut); knn_average: they are unassigned (-1).
    min_cluster_size: int = 3
    # leiden, knn_average: neighbours per sample of the graph built from a dense affinity (a
    # sparse kNN affinity is used as it is); leiden: the modularity resolution γ of the main
    # clustering.
    n_neighbors: int = 60
    resolution: float = 1.0
    n_init: int = 10  # k-means restarts in the spectral embedding (the paper: 30)
    eigen_solver: Literal["arpack", "lobpcg", "amg"] = "arpack"
    # kmeans (the paper's), discretize, or cluster_qr (no restarts; fast for large N)
    assign_labels: Literal["kmeans", "discretize", "cluster_qr"] = "kmeans"
    seed: int = 0
    stability_seed: int = 1  # seeds the stability reruns (pipeline/qdg/stability.py)
    # per-cluster stability: best-match Jaccard over this many seeded subsamples of this share
    stability_draws: int = 5
    stability_fraction: float = 0.8
    top_tokens: int = 5  # answer tokens listed per cluster in the summary
    n_examples: int = 10  # example sample ids per cluster in the summary
    # random groups per cluster size whose coherence is each cluster's null (null_z in the summary)
    null_draws: int = 200

    def __post_init__(self):
        if isinstance(self.n_clusters, int):  # one k: a sweep of one
            object.__setattr__(self, "n_clusters", (self.n_clusters,))
        if not self.n_clusters or min(self.n_clusters) < 2:
            raise ConfigError(f"cluster.n_clusters must be one k >= 2 or a list of them, got {list(self.n_clusters)}")
        if len(set(self.n_clusters)) != len(self.n_clusters):
            raise ConfigError(f"cluster.n_clusters has repeats: {list(self.n_clusters)}")
        if self.n_init < 1:
            raise ConfigError("cluster.n_init must be >= 1")
        if self.min_cluster_size < 1:
            raise ConfigError(f"cluster.min_cluster_size must be >= 1, got {self.min_cluster_size}")
        if not 0 < self.max_outlier_score <= 1:
            raise ConfigError(f"cluster.max_outlier_score must be in (0, 1], got {self.max_outlier_score}")
        if self.method == "knn_average" and self.cut == "data" and self.min_cluster_size < 2:
            raise ConfigError("cluster.min_cluster_size must be >= 2 with cluster.cut: data (a cluster of one is no "
                              f"cluster), got {self.min_cluster_size}")
        if self.n_neighbors < 1 or not self.resolution > 0:
            raise ConfigError("cluster.n_neighbors must be >= 1 and cluster.resolution > 0")
        if self.seed == self.stability_seed:
            raise ConfigError("cluster.stability_seed must differ from cluster.seed (their ARI is the stability score)")
        if self.stability_draws < 1 or not 0 < self.stability_fraction < 1:
            raise ConfigError("cluster.stability_draws must be >= 1 and cluster.stability_fraction in (0, 1), "
                              f"got {self.stability_draws} and {self.stability_fraction}")
        if self.null_draws < 2:
            raise ConfigError(f"cluster.null_draws must be >= 2 (a standard deviation needs two), got {self.null_draws}")


# ------------------------------------------------------ scaling analysis (scaling, dynamics, powerlaw, theory)


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
    """Per-token scaling curves, mean-loss L(N) and learning-curve L(S) fits (pipeline/laws/scaling.py). Nats."""

    mono_high: float = 5.0  # monogenic: every model smaller than the emergence size is above this
    mono_low: float = 0.3  # ... and the emergence size and every larger one are below this
    poly_slope: float = -0.3  # polygenic: d loss / d ln N below this (nats per e-fold of N)
    poly_r2: float = 0.98  # ... and R² of the OLS line above this
    min_models: int = 3  # fewer models: skip with the reason in the metrics, or error (with 2, R² is always 1)
    # skip: a one-model run (QDG on one model, the most common first use) reaches the report
    on_too_few_models: Literal["error", "skip"] = "skip"
    # Tokens per chunk of the per-token pass. Small on purpose: the temporaries (~1 MiB
    # each) stay in cache and reuse freed memory; 1M-token chunks page-fault fresh 56 MiB
    # arrays and ran 5x slower (bench/bench_scaling.py).
    chunk_tokens: int = 32_768
    # Mean-loss fit L(N) = E + A·N^-α (fit_offset) or A·N^-α, over N in [fit_n_lo, fit_n_hi].
    fit_offset: bool = True
    fit_n_lo: Optional[float] = None
    fit_n_hi: Optional[float] = None
    # token: every token counts once (the paper's mean loss); document: every document once.
    doc_weighting: Literal["token", "document"] = "token"
    n_boot: int = 1000  # document-bootstrap replicates of the fit
    seed: int = 0
    level: float = 0.95  # CI level
    # The revision whose losses give the per-token curves and L(N); null: suite.revisions' last.
    revision: Optional[str] = None
    # Learning curves L(S) of every model over its stepN revisions in [step_lo, step_hi]
    # (null: open), fitted as L(N) is; α_S of alpha_s_model (null: the largest) is the headline.
    step_lo: Optional[int] = None
    step_hi: Optional[int] = None
    alpha_s_model: Optional[str] = None
    n_examples: int = 4  # monogenic and polygenic example tokens in the plot

    def __post_init__(self):
        if not self.mono_low < self.mono_high:
            raise ConfigError(
                f"scaling.mono_low ({self.mono_low}) must be below scaling.mono_high ({self.mono_high})"
            )
        if not 0.0 <= self.poly_r2 <= 1.0:
            raise ConfigError(f"scaling.poly_r2 must be in [0, 1], got {self.poly_r2}")
        if self.min_models < 3:
            raise ConfigError(
                f"scaling.min_models must be >= 3 (with 2 models every token has R² = 1), got {self.min_models}"
            )
        if self.chunk_tokens < 1:
            raise ConfigError(f"scaling.chunk_tokens must be >= 1, got {self.chunk_tokens}")
        if self.n_boot < 1:
            raise ConfigError(f"scaling.n_boot must be >= 1, got {self.n_boot}")
        if not 0.0 < self.level < 1.0:
            raise ConfigError(f"scaling.level must be in (0, 1), got {self.level}")
        if self.step_lo is not None and self.step_hi is not None and self.step_lo > self.step_hi:
            raise ConfigError(f"scaling.step_lo ({self.step_lo}) is above scaling.step_hi ({self.step_hi})")
        if self.n_examples < 0:
            raise ConfigError(f"scaling.n_examples must be >= 0, got {self.n_examples}")


@dataclasses.dataclass(frozen=True)
class DynamicsConfig:
    """Per-token training dynamics and emergence vs frequency (pipeline/laws/dynamics.py). Losses in nats."""

    model: Optional[str] = None  # whose checkpoints (its stepN revisions in suite.revisions); null: the last of suite.models
    # log10: a window is half a decade of steps (x3.2), whatever the checkpoint spacing;
    # a fixed count of checkpoints means very different step ranges early and late in a
    # Pythia run (log-spaced to step 512, then every 1000). A window never spans less
    # than one interval, so coarse checkpoints widen it.
    window: Literal["checkpoints", "log10"] = "log10"
    window_log10: float = 0.5  # decades of log step per window (window: log10)
    window_checkpoints: int = 3  # checkpoints per window (window: checkpoints)
    step_lo: Optional[int] = None  # checkpoints outside [step_lo, step_hi] are left out
    step_hi: Optional[int] = None
    min_drop: float = 1.0  # abrupt: a drop of at least this many nats ...
    min_share: float = 0.8  # ... that is at least this fraction of the token's net decrease
    emergence: Literal["mean_loss", "median_drop"] = "mean_loss"
    emergence_loss: float = 1.0  # mean_loss: S_k is where the quantum's mean loss falls below this
    n_boot: int = 1000  # bootstrap over quanta of the emergence slope
    seed: int = 0
    level: float = 0.95

    def __post_init__(self):
        if self.window_checkpoints < 2:
            raise ConfigError(
                f"dynamics.window_checkpoints must be >= 2 (a drop needs two), got {self.window_checkpoints}"
            )
        if not self.window_log10 > 0:
            raise ConfigError(f"dynamics.window_log10 must be > 0 decades, got {self.window_log10}")
        if self.step_lo is not None and self.step_hi is not None and self.step_lo > self.step_hi:
            raise ConfigError(f"dynamics.step_lo ({self.step_lo}) is above dynamics.step_hi ({self.step_hi})")
        if not self.min_drop > 0:
            raise ConfigError(f"dynamics.min_drop must be > 0 nats, got {self.min_drop}")
        if not 0 < self.min_share <= 1:
            raise ConfigError(f"dynamics.min_share must be in (0, 1], got {self.min_share}")
        if not self.emergence_loss > 0:
            raise ConfigError(f"dynamics.emergence_loss must be > 0 nats, got {self.emergence_loss}")
        if self.n_boot < 1:
            raise ConfigError(f"dynamics.n_boot must be >= 1, got {self.n_boot}")
        if not 0 < self.level < 1:
            raise ConfigError(f"dynamics.level must be in (0, 1), got {self.level}")


POWERLAW_ALTERNATIVES = ("lognormal", "exponential", "truncated_power_law")


@dataclasses.dataclass(frozen=True)
class PowerlawConfig:
    """Cluster-size power laws (pipeline/laws/cluster_sizes.py): CSN's discrete MLE, and the paper's envelope."""

    # The clustering whose sizes the MLE fits (a k of cluster.n_clusters); null: the main clustering
    # (cluster.n_clusters[0]; leiden: its own k), however many clusters it made.
    k: Optional[int] = None
    xmin: Optional[int] = None  # null: chosen by KS over every candidate (CSN); a value fixes it
    min_tail: int = 10  # fewest sizes >= xmin a candidate xmin may leave
    n_boot_ci: int = 1000  # resamples of the exponent's percentile CI (0: none)
    n_boot_gof: int = 1000  # CSN's goodness-of-fit replicates (0: none; CSN use 2500 for ±0.01)
    alternatives: tuple[str, ...] = ("lognormal", "exponential")  # likelihood-ratio tests
    seed: int = 0
    level: float = 0.95
    # The paper's envelope (largest size at each rank across the k sweep), OLS over these
    # 1-indexed ranks; null rank_hi: the largest k. A sweep too short for them is reported, not fitted.
    envelope_rank_lo: int = 100
    envelope_rank_hi: Optional[int] = 1000

    def __post_init__(self):
        bad = sorted(set(self.alternatives) - set(POWERLAW_ALTERNATIVES))
        if bad:
            raise ConfigError(f"powerlaw.alternatives: unknown '{bad[0]}'; choose from {list(POWERLAW_ALTERNATIVES)}")
        if self.min_tail < 2 or self.n_boot_ci < 0 or self.n_boot_gof < 0:
            raise ConfigError("powerlaw.min_tail must be >= 2, n_boot_ci and n_boot_gof >= 0")
        if self.xmin is not None and self.xmin < 1:
            raise ConfigError(f"powerlaw.xmin must be >= 1 or null, got {self.xmin}")
        if not 0 < self.level < 1:
            raise ConfigError(f"powerlaw.level must be in (0, 1), got {self.level}")
        if self.envelope_rank_lo < 1 or (self.envelope_rank_hi is not None and self.envelope_rank_hi <= self.envelope_rank_lo):
            raise ConfigError(
                f"powerlaw.envelope_rank_lo ({self.envelope_rank_lo}) must be >= 1 and below envelope_rank_hi "
                f"({self.envelope_rank_hi})"
            )


@dataclasses.dataclass(frozen=True)
class TheoryConfig:
    """The quantization model's predictions against the measured exponents (pipeline/laws/theory.py)."""

    tolerance: float = 0.1  # planted suite: a route passes when |α recovered - α planted| <= this
    # Which cluster-size exponent feeds the Zipf route: rank_mle (finite-Zipf MLE over ranks,
    # unbiased with tens of clusters), mle (CSN's tail MLE), envelope (the paper's OLS).
    zipf_from: Literal["rank_mle", "mle", "envelope"] = "rank_mle"

    def __post_init__(self):
        if not self.tolerance > 0:
            raise ConfigError(f"theory.tolerance must be > 0, got {self.tolerance}")


# ------------------------------------------------------------------------------ cluster curves


@dataclasses.dataclass(frozen=True)
class CurvesConfig:
    """Each cluster's loss over model sizes and checkpoints, its emergence, and the quantization
    model's ordering tested on the discovered clusters (pipeline/laws/cluster_curves.py)."""

    # A cluster is learned where at least this share of its members has a loss under
    # select.max_loss (the bar that chose them as well-predicted tokens): the planted
    # scorecard's definition of a learned quantum (90% of its answers under 0.1 nats).
    learned_fraction: float = 0.9
    n_boot: int = 1000  # bootstrap replicates: members for N*/S* CIs, clusters for the Spearman CIs
    seed: int = 0
    level: float = 0.95

    def __post_init__(self):
        if not 0 < self.learned_fraction <= 1:
            raise ConfigError(f"curves.learned_fraction must be in (0, 1], got {self.learned_fraction}")
        if self.n_boot < 1:
            raise ConfigError(f"curves.n_boot must be >= 1, got {self.n_boot}")
        if not 0 < self.level < 1:
            raise ConfigError(f"curves.level must be in (0, 1), got {self.level}")


# ------------------------------------------------------------------------------ report


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """The HTML cluster browser (pipeline/report/page.py)."""

    k: Optional[int] = None  # which clustering of the sweep to browse; null = the main k (cluster.n_clusters[0])
    n_examples: int = 10  # example contexts shown per cluster (seeded random choice)
    context_tokens: int = 100  # tokens of context shown before each target
    similarity_side: int = 400  # the reordered similarity matrix is block-averaged to at most this many rows
    seed: int = 0

    def __post_init__(self):
        if self.k is not None and self.k < 2:
            raise ConfigError(f"report.k must be null (the main k) or a k of cluster.n_clusters, got {self.k}")
        if self.n_examples < 1:
            raise ConfigError("report.n_examples must be >= 1")
        if self.context_tokens < 1:
            raise ConfigError("report.context_tokens must be >= 1")
        if not 16 <= self.similarity_side <= 4096:
            raise ConfigError(f"report.similarity_side must be in 16..4096, got {self.similarity_side}")


SECTIONS: dict[str, type] = {
    "planted": PlantedConfig,
    "suite": SuiteConfig,
    "corpus": CorpusConfig,
    "losses": LossesConfig,
    "select": SelectConfig,
    "gradients": GradientsConfig,
    "similarity": SimilarityConfig,
    "cluster": ClusterConfig,
    "scaling": ScalingConfig,
    "dynamics": DynamicsConfig,
    "curves": CurvesConfig,
    "powerlaw": PowerlawConfig,
    "theory": TheoryConfig,
    "report": ReportConfig,
}


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it in the dataclass's form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        k_tp, v_tp = args if args else (Any, Any)
        return {
            _coerce(k, k_tp, f"{where} key"): _coerce(v, v_tp, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ""
            if isinstance(value, str):
                # load_params reads `6e-3` as DVC does, a float; a string here was quoted
                with contextlib.suppress(ValueError):
                    if math.isfinite(float(value)):
                        hint = f" (a string: write the number without quotes, e.g. {float(value)!r})"
            raise ConfigError(f"{where}: expected float, got {value!r}{hint}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected int, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"config.py does not know how to check {tp!r} ({where})")


def build(cls: type, data: Optional[dict], section: str):
    """Build the frozen dataclass `cls` from the mapping `data` of params.yaml's `section`.

    Unknown keys and wrong types raise :class:`ConfigError`; missing keys take the
    dataclass defaults (which are the documented defaults of params.yaml).
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"params section '{section}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"unknown key '{unknown[0]}' in params section '{section}'; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in data.items()}
    return cls(**kwargs)


# --------------------------------------------------------------------------- across sections

#: Where the planted stage writes its suite (dvc.yaml: ``--out cache/planted``): a source under
#: it exists once that stage has run, so its absence before then is no error.
PLANTED_ROOT = Path("cache/planted")

# A hub id is "name" or "org/name". "models" is no hub organisation (huggingface.co/models is
# the hub's own list of models) and "cache" is the folder this pipeline writes: a source that
# starts with either is meant as a local folder.
_LOCAL_PREFIXES = ("cache/", "models/")


def is_local_source(source: str) -> bool:
    """Whether a suite.sources value names a local file or folder; if not, it is a hub id.

    Said by its form, whether or not it exists: a typo in a local path is then reported as
    a missing file, never sent to the hub (which retries for ~25 s, then names a repository).
    """
    return (
        source.startswith((".", "/", "~", *_LOCAL_PREFIXES))
        or source.count("/") > 1
        or "\\" in source
        or source.endswith(".gguf")
    )


def model_source(suite: "SuiteConfig", name: str) -> Optional[str]:
    """Where suite model `name` comes from: ``suite.sources[name]``, else the hub id of a Pythia
    name (``pythia-70m``); None when it has neither."""
    return suite.sources.get(name) or PYTHIA_MODELS.get(name)


def missing_source(name: str, source: str) -> str:
    """The one-line error for suite model `name` whose local `source` does not exist."""
    return (f"suite.sources['{name}'] = '{source}': no such file or folder; fix suite.sources.{name} "
            "(a local Hugging Face folder, a .gguf file, or a hub id such as EleutherAI/pythia-70m)")


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether `path` is `root` or lies under it (both resolved against the working directory)."""
    return Path(path).expanduser().resolve().is_relative_to(Path(root).expanduser().resolve())


def check_member(key: str, value: Any, allowed: Sequence, allowed_key: str, fix: str) -> None:
    """A ConfigError when params key `key` names `value`, which is not in `allowed` (params
    key `allowed_key`); `fix` says what to write instead."""
    if value not in allowed:
        listed = ", ".join(map(str, allowed)) or "empty"
        raise ConfigError(f"{key} {value!r} is not in {allowed_key} ({listed}); {fix}")


def check_consistent(cfgs: dict, written: Optional[dict] = None, planted_root: str | Path = PLANTED_ROOT) -> None:
    """Cross-section checks of typed sections (name -> config), one ConfigError each: every
    key that names a model, a revision, a k or a source against what it names.

    written: the params as read (section -> mapping). A reference left out of the file takes
    its default, which names the planted suite (select.model: planted-w48), and is checked
    only when written: DVC refuses to run a stage whose params (dvc.yaml lists select.model)
    are missing from the file, so a run through DVC always writes it, while a stage run by
    hand on a partial file (a suite and a corpus, to compute losses) need not. None: every
    reference counts as written.
    """
    select, cluster, suite = cfgs["select"], cfgs["cluster"], cfgs["suite"]

    def given(sec: str, key: str) -> bool:
        return written is None or key in (written.get(sec) or {})

    big = [k for k in cluster.n_clusters if k >= select.n_samples]
    if big:
        raise ConfigError(
            f"cluster.n_clusters {big} needs more than select.n_samples = {select.n_samples} samples (k must be < N); "
            "lower cluster.n_clusters or raise select.n_samples"
        )
    models, revisions = suite.models, suite.revisions
    if given("select", "model"):
        check_member("select.model", select.model, models, "suite.models",
                     "set select.model to one of them (its losses choose the samples), or add it to suite.models")
    if given("select", "revision"):
        check_member("select.revision", select.revision, revisions, "suite.revisions",
                     "set select.revision to one of them, or add it to suite.revisions")
    grads = cfgs["gradients"]
    if grads.model is not None:
        check_member("gradients.model", grads.model, models, "suite.models",
                     "set gradients.model to one of them, or null (select.model)")
    if grads.revision is not None:
        check_member("gradients.revision", grads.revision, revisions, "suite.revisions",
                     "set gradients.revision to one of them, or null (select.revision)")
    # With leiden, or knn_average cut by the data, the main clustering's k is the data's, known
    # only once it has run; the cluster stage's table then holds that k beside the listed ones.
    if not data_chooses_k(cluster):
        for sec in ("report", "powerlaw"):
            k = cfgs[sec].k
            if k is not None:
                check_member(f"{sec}.k", k, cluster.n_clusters, "cluster.n_clusters",
                             f"set {sec}.k to one of them, or null (the main k), or add it to cluster.n_clusters")
    dyn, scal, corp = cfgs["dynamics"], cfgs["scaling"], cfgs["corpus"]
    if dyn.model is not None:
        check_member("dynamics.model", dyn.model, models, "suite.models",
                     "set dynamics.model to one of them, or null (the last)")
    if scal.alpha_s_model is not None:
        check_member("scaling.alpha_s_model", scal.alpha_s_model, models, "suite.models",
                     "set scaling.alpha_s_model to one of them, or null (the largest)")
    if scal.revision is not None:
        check_member("scaling.revision", scal.revision, revisions, "suite.revisions",
                     "set scaling.revision to one of them, or null (the last)")
    if corp.tokenizer is not None:
        check_member("corpus.tokenizer", corp.tokenizer, models, "suite.models",
                     "set corpus.tokenizer to one of them, or null (the first)")
    _check_sources(suite, cfgs["planted"], Path(planted_root))


def _check_sources(suite: SuiteConfig, planted: PlantedConfig, planted_root: Path) -> None:
    """Every suite model has a source that exists, or that the planted stage will write; the
    planted ones where that stage saves them, at revisions it can save."""
    trained = []
    for name in suite.models:
        source = model_source(suite, name)
        if source is None:
            raise ConfigError(f"suite.models names '{name}', which has no source; "
                              f"add suite.sources.{name}: <hub id | local folder | file.gguf>")
        path = Path(source).expanduser()
        if inside(path, planted_root):
            trained.append(name)
            if path.resolve() != (planted_root / "models" / name).resolve():
                raise ConfigError(
                    f"suite.sources.{name} points into {planted_root} but not at {planted_root / 'models' / name}, "
                    f"where the planted stage saves it; set suite.sources.{name}: {planted_root / 'models' / name}"
                )
            continue
        if is_local_source(source) and not path.exists():
            raise ConfigError(missing_source(name, source))
        gguf = suite.gguf_files.get(name)
        if gguf is not None and path.is_dir() and not (path / gguf).is_file():
            raise ConfigError(f"suite.gguf_files['{name}'] = '{gguf}': no such file in {source}; fix suite.gguf_files.{name}")
    if not trained:
        return
    # The planted stage trains one width per model name and saves every revision: what it
    # cannot save is refused here, before it trains anything.
    if len(planted.widths) != len(suite.models):
        raise ConfigError(f"planted.widths has {len(planted.widths)} entries but suite.models has {len(suite.models)}; "
                          "give one width per model name, in order")
    steps: dict[int, str] = {}
    for rev in suite.revisions:
        n = step_of(rev)
        if n is None or n > planted.steps:
            raise ConfigError(
                f"suite.revisions: {rev!r} is not a checkpoint the planted stage saves; use 'stepN' with N in "
                f"0..{planted.steps} (planted.steps), or raise planted.steps"
            )
        if n in steps:
            raise ConfigError(f"suite.revisions: {steps[n]} and {rev} name the same step {n}; list each checkpoint once")
        steps[n] = rev


def load_params(path: str | Path = "params.yaml", planted_root: str | Path = PLANTED_ROOT) -> dict:
    """Read params.yaml as DVC reads it, refusing duplicate keys (PyYAML would keep the last
    one), unknown sections, and whatever :func:`check_consistent` finds.

    planted_root: where the planted stage writes its suite (its ``--out``); a source under it
    need not exist yet.
    """

    class StrictLoader(yaml.SafeLoader):
        pass

    def no_duplicates(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            # a scalar key as written: `yes` and `true` are two keys to DVC's YAML 1.2 reader
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{path}: duplicate key '{key}' (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return loader.construct_mapping(node, deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, no_duplicates)
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file {path} not found; run from the repository root or pass --params")
    text = path.read_text()
    try:
        yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        # A key without its colon is found only on the next line; the scanner's context
        # mark points at the line with the typo.
        if str(getattr(e, "context", "")).startswith("while scanning a simple key"):
            mark = getattr(e, "context_mark", None) or mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    # The values are read as DVC reads them. DVC reads params.yaml with ruamel.yaml's safe
    # loader, which follows YAML 1.2: `6e-3` is the float 0.006, `yes` and `on` are strings,
    # `017` is 17. PyYAML follows YAML 1.1, where `6e-3` is a string (a float needs a dot),
    # `yes` is true and `017` is octal 15. A stage that read a value otherwise than DVC would
    # run on something `dvc repro` never saw (DVC decides what to rerun from the params as it
    # reads them; `planted.lr: 0.006` -> `6e-3` is no change to it), so the values come from
    # DVC's own reader; PyYAML only checks the syntax and the duplicate keys above, because
    # its messages point at the line to fix (a key without its colon: that line, not the next).
    from ruamel.yaml import YAML
    from ruamel.yaml import YAMLError as RuamelYAMLError

    try:
        params = YAML(typ="safe").load(text) or {}
    except RuamelYAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    # strict at the top too: a misspelled section (`gradient:`) would otherwise be ignored
    # by every stage, and its keys with it
    unknown = sorted(set(params) - set(SECTIONS), key=str)
    if unknown:
        raise ConfigError(f"unknown section '{unknown[0]}' in {path}; valid sections: {', '.join(SECTIONS)}")
    # Every section is checked whichever stage reads the file, and the sections against
    # each other, so that a run never fails late on something knowable at the start.
    check_consistent({name: section(params, name) for name in SECTIONS}, written=params, planted_root=planted_root)
    return params


_STEP = re.compile(r"^step(\d+)$")


def step_of(revision: object) -> Optional[int]:
    """N of a Pythia-style checkpoint name ``stepN`` (None for any other revision, e.g. ``main``).

    The one parser of suite.revisions names; it lives here, with the suite's config, so that
    the stages that need it do not import torch (as pipeline.lm.models does).
    """
    m = _STEP.match(revision) if isinstance(revision, str) else None
    return int(m.group(1)) if m else None


def section(params: dict, name: str):
    """The typed config of section `name` of a loaded params mapping."""
    return build(SECTIONS[name], params.get(name), name)


def load(name: str, path: str | Path = "params.yaml"):
    """Shortcut: the typed config of section `name` of the params file at `path`."""
    return section(load_params(path), name)


def to_dict(cfg) -> dict:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(cfg)
