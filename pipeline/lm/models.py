"""Where a model comes from, and loading it the same way for every kind of source.

Why this module exists: every stage that runs a model (corpus for its tokenizer, losses,
gradients) must agree on *which* weights a (model name, revision) pair means, and must
fail early and in one readable line when those weights are not there. A Pythia run
names hub ids at ``stepN`` revisions; the embedded planted suite names local
directories with one sub-directory per revision; a user may bring a single local
Hugging Face directory or a GGUF file. :func:`spec_from_suite` turns params.yaml's
``suite`` section into a :class:`ModelSpec`, and :func:`load_model` /
:func:`load_tokenizer` resolve it to files, offline-aware, with transformers' own loaders.

Source kinds (see :func:`source_kind`):

- ``hub``: a Hugging Face hub id, read at ``revision`` through the cache ``cache_dir``
  (``cache/hf``); with ``suite.gguf_files[name]`` the weights are that GGUF file of the
  repo. With ``HF_HUB_OFFLINE=1`` or ``local_files_only`` only the cache is used, and a
  missing (model, revision) raises :class:`ModelNotAvailableError` naming the
  ``hf download`` command that fetches it.
- ``local``: a directory with ``config.json`` (one version; its revision is ``main``).
- ``local_revisions``: a directory with one sub-directory per revision
  (``<dir>/<revision>/config.json``), as the planted stage writes them.
- ``gguf``: a local ``.gguf`` file (revision ``main``).

GGUF weights are read by transformers' GGUF loader (which needs ``accelerate``) and
dequantized to a plain dense model: the gradient stage needs ordinary parameters.

Device and dtype are strings in params ("auto", "cuda:1", "bfloat16"), resolved once
here at the edge: "auto" means CUDA with bfloat16 where available, else CPU with float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from pipeline.core.config import (
    PLANTED_ROOT,
    PYTHIA_MODELS,  # noqa: F401 (re-exported: the suite name -> hub id table lives in config)
    ConfigError,
    SuiteConfig,
    inside,
    is_local_source,
    missing_source,
    model_source,
)
from pipeline.core.errors import QuantaError

# --------------------------------------------------------------------------- errors


class ModelError(QuantaError):
    """A model source that cannot be used as given (missing files, wrong layout)."""


class ModelNotAvailableError(ModelError):
    """The (model, revision) is not on this machine and cannot be downloaded now."""


class UnknownRevisionError(ModelError):
    """The revision does not exist for this model; the message lists valid ones."""


# --------------------------------------------------------------------------- Pythia

# PYTHIA_MODELS (suite name -> hub id) lives in pipeline.core.config, which checks the suite's
# sources when params are read.


def pythia_revisions() -> list[str]:
    """Pythia's 154 checkpoint branch names, in training order.

    step0, then log-spaced step1, 2, 4, ..., 512, then every 1000 steps to step143000
    (= ``main``). Each step is 2M tokens (1024 sequences of 2048).
    """
    return ["step0"] + [f"step{2**i}" for i in range(10)] + [f"step{k}" for k in range(1000, 143_001, 1000)]


def _is_pythia(repo_id: str) -> bool:
    return repo_id.lower().startswith("eleutherai/pythia-")


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


# --------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model at one revision: what the suite calls it and where its files are.

    `source` is a hub id, a local directory, or a local ``.gguf`` file; `gguf_file` names
    the GGUF file inside a hub repo (or a local directory) when the weights are GGUF.
    """

    name: str
    source: str
    revision: str = "main"
    gguf_file: Optional[str] = None


def spec_from_suite(suite: SuiteConfig, name: str, revision: Optional[str] = None) -> ModelSpec:
    """The :class:`ModelSpec` of suite model `name` at `revision` (default: the suite's last).

    The source is ``suite.sources[name]``, or for a Pythia name (``pythia-70m``) without
    one, its hub id.
    """
    if name not in suite.models and name not in suite.sources:
        valid = ", ".join(suite.models) or "(none: suite.models is empty)"
        raise ConfigError(f"unknown model '{name}'; suite.models: {valid}")
    source = model_source(suite, name)
    if source is None:
        raise ConfigError(
            f"model '{name}' has no source; add suite.sources.{name}: <hub id | local directory | file.gguf>"
        )
    revision = suite.revisions[-1] if revision is None else revision
    return ModelSpec(name=name, source=source, revision=revision, gguf_file=suite.gguf_files.get(name))


def hub_kwargs(suite: SuiteConfig) -> dict:
    """The keywords every ``load_*`` call takes from the suite: where the hub cache is,
    whether the hub may be reached, and whether remote code may run."""
    return {"cache_dir": suite.cache_dir, "local_files_only": suite.local_files_only,
            "trust_remote_code": suite.trust_remote_code}


def load_kwargs(suite: SuiteConfig, dtype: str) -> dict:
    """:func:`load_model`'s keywords for the suite: :func:`hub_kwargs`, `dtype`, the suite's device."""
    return dict(hub_kwargs(suite), dtype=dtype, device=suite.device)


def suite_tokenizer(suite: SuiteConfig, name: str, revision: Optional[str] = None):
    """The tokenizer of suite model `name` at `revision` (default: the model's default revision)."""
    return load_tokenizer(spec_from_suite(suite, name, revision), **hub_kwargs(suite))


def _has_config(d: Path) -> bool:
    return (d / "config.json").is_file()


def _revision_dirs(d: Path) -> list[str]:
    """Sub-directories of `d` that hold a model (have config.json), naturally sorted."""
    if not d.is_dir():
        return []
    return sorted((p.name for p in d.iterdir() if p.is_dir() and _has_config(p)), key=_natural_key)


def _natural_key(s: str) -> list:
    # step2 < step16 < step1000, as a person (and Pythia's branch list) orders them
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def source_kind(spec: ModelSpec) -> str:
    """One of ``hub``, ``local``, ``local_revisions``, ``gguf`` (see the module docstring).

    ``gguf`` is a local GGUF file (a ``.gguf`` path, or a directory + ``gguf_file``); a
    hub id with ``gguf_file`` is ``hub``.
    """
    path = Path(spec.source).expanduser()
    if spec.source.endswith(".gguf") and path.is_file():
        return "gguf"
    if path.is_dir():
        if spec.gguf_file is not None:
            return "gguf"
        return "local" if _has_config(path) else "local_revisions"
    if is_local_source(spec.source):  # before any network attempt: the hub would retry a path for ~25 s
        raise ModelError(missing_source(spec.name, spec.source))
    return "hub"


# --------------------------------------------------------------------------- locating files


@dataclasses.dataclass(frozen=True)
class _Location:
    """What transformers' from_pretrained needs: a path or hub id plus keyword arguments."""

    path: str
    kwargs: dict
    hub: bool


def _abbrev(names: list[str], head: int = 4, tail: int = 2) -> str:
    if len(names) <= head + tail + 1:
        return ", ".join(names)
    return ", ".join(names[:head]) + ", ..., " + ", ".join(names[-tail:]) + f" ({len(names)} in all)"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether downloads are off for the hub (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``).

    huggingface_hub reads the variable once, at import; the environment is read again
    here so that setting it later (a test, a notebook) still takes effect for quanta,
    which then passes ``local_files_only=True`` to every loader.
    """
    from huggingface_hub import constants

    return constants.is_offline_mode() or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def download_command(spec: ModelSpec, cache_dir: Optional[str]) -> str:
    """The shell command (huggingface_hub's ``hf`` CLI) that puts `spec` in `cache_dir`."""
    parts = ["hf download", spec.source]
    if spec.gguf_file:
        parts.append(spec.gguf_file)
    parts += ["--revision", spec.revision]
    if cache_dir is not None:
        parts += ["--cache-dir", str(cache_dir)]
    return " ".join(parts)


def _check_hub_revision(spec: ModelSpec) -> None:
    if _is_pythia(spec.source):
        revs = pythia_revisions()
        if spec.revision != "main" and spec.revision not in revs and not _COMMIT.match(spec.revision):
            raise UnknownRevisionError(
                f"{spec.source} has no revision '{spec.revision}'; Pythia's are main and {_abbrev(revs)}; "
                "`quanta revisions` prints them all"
            )


def _hub_cached(spec: ModelSpec, cache_dir: Optional[str]) -> Optional[Path]:
    """The cached snapshot directory of `spec` (its GGUF file for a GGUF repo), or None."""
    from huggingface_hub import try_to_load_from_cache

    # config.json stands for the snapshot: it is fetched with the weights, and a GGUF
    # repo is represented by its GGUF file, which holds the config too.
    filename = spec.gguf_file or "config.json"
    found = try_to_load_from_cache(spec.source, filename, cache_dir=cache_dir, revision=spec.revision)
    if not isinstance(found, str):  # None, or the "known not to exist" sentinel
        return None
    return Path(found) if spec.gguf_file else Path(found).parent


def _locate(spec: ModelSpec, *, cache_dir: Optional[str], local_files_only: bool, probe: bool = False) -> _Location:
    """Check that `spec` can be loaded now, and say how; raise a one-line error if not.

    probe: only the cache is asked whatever the suite says (`quanta info`), so a missing hub
    model is not said to be missing because downloads are off: they may well be on.
    """
    kind = source_kind(spec)
    path = Path(spec.source).expanduser()
    if kind == "local":
        if spec.revision != "main":
            raise UnknownRevisionError(
                f"model '{spec.name}': {path} holds a single version (config.json at its top), so its only "
                f"revision is 'main', not '{spec.revision}'; put one sub-directory per revision in it, "
                "or list revision main"
            )
        return _Location(str(path), {"local_files_only": True}, hub=False)
    if kind == "local_revisions":
        revs = _revision_dirs(path)
        if not revs:
            raise ModelError(
                f"model '{spec.name}': {path} has no config.json and no <revision>/config.json sub-directories; "
                "point suite.sources at a Hugging Face model directory (save_pretrained) or a .gguf file"
            )
        if spec.revision not in revs:
            raise UnknownRevisionError(
                f"model '{spec.name}': no revision '{spec.revision}' in {path}; it has {_abbrev(revs)} "
                "(fix suite.revisions)"
            )
        return _Location(str(path / spec.revision), {"local_files_only": True}, hub=False)
    if kind == "gguf":
        file = path if spec.source.endswith(".gguf") else path / spec.gguf_file
        if not file.is_file():
            raise ModelError(f"model '{spec.name}': GGUF file {file} does not exist; fix suite.sources/gguf_files")
        if spec.revision != "main":
            raise UnknownRevisionError(
                f"model '{spec.name}': a local GGUF file has the single revision 'main', not '{spec.revision}' "
                "(fix suite.revisions: list main)"
            )
        # transformers takes an existing gguf_file path as is, but joins a relative one onto the
        # directory (cache/x.gguf would become cache/cache/x.gguf): so the path is made absolute.
        file = file.resolve()
        return _Location(str(file.parent), {"gguf_file": str(file), "local_files_only": True}, hub=False)

    # hub id, possibly with a GGUF file in the repo
    _check_hub_revision(spec)
    offline = local_files_only or hub_offline()
    if offline and _hub_cached(spec, cache_dir) is None:
        where = f"the Hugging Face cache {cache_dir}" if cache_dir else "the default Hugging Face cache"
        if probe:
            off = ""
        else:
            off = " and downloads are off ({})".format("suite.local_files_only is set" if local_files_only else "HF_HUB_OFFLINE=1")
        raise ModelNotAvailableError(
            f"{spec.source} at revision {spec.revision} is not in {where}{off}; fetch it first: {download_command(spec, cache_dir)}"
        )
    kwargs: dict[str, Any] = {"revision": spec.revision, "cache_dir": cache_dir, "local_files_only": offline}
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    return _Location(spec.source, kwargs, hub=True)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json")


def weights_fingerprint(spec: Any, *, cache_dir: Optional[str] = "cache/hf") -> Optional[str]:
    """sha256 of a local model's files (weights and configs); None for a hub model, or for a
    `spec` that is not a ModelSpec (a model object handed in directly names nothing on disk).

    Resumable stages (losses, gradients) keep finished part files and reuse them when their
    recorded identity matches. A local directory can be rewritten in place (the planted
    suite retrains its models under the same path when its params change; so can a user's
    own checkpoints), so its identity must include what it holds, not only its path. A
    hub revision names its weights already. Reads every weight file once, about 1 s per GB.
    """
    if not isinstance(spec, ModelSpec) or source_kind(spec) not in ("local", "local_revisions", "gguf"):
        return None
    loc = _locate(spec, cache_dir=cache_dir, local_files_only=True)
    gguf = loc.kwargs.get("gguf_file")
    files = [Path(gguf)] if gguf else sorted(
        f for f in Path(loc.path).iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES)
    )
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _from_pretrained(loader, spec: ModelSpec, loc: _Location, cache_dir: Optional[str], **kwargs):
    """Call a transformers ``from_pretrained`` and turn its file errors into one-line errors."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return loader(loc.path, **loc.kwargs, **kwargs)
    except (OSError, RevisionNotFoundError, RepositoryNotFoundError) as e:
        chain = [e, e.__cause__, e.__context__]
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not loc.hub:
            raise ModelError(f"model '{spec.name}': could not load {loc.path}: {first}") from e
        if any(isinstance(c, RevisionNotFoundError) for c in chain) or "valid git identifier" in str(e):
            raise UnknownRevisionError(
                f"{spec.source} has no revision '{spec.revision}' on the hub; "
                f"see its branches at https://huggingface.co/{spec.source}/tree/main"
            ) from e
        if any(isinstance(c, RepositoryNotFoundError) for c in chain):
            raise ModelNotAvailableError(
                f"model '{spec.name}': no hub repository {spec.source} (or it is gated/private: run `hf auth login`)"
            ) from e
        if loc.kwargs.get("local_files_only"):
            raise ModelNotAvailableError(
                f"{spec.source} at revision {spec.revision} is only partly in the cache ({first}) and downloads "
                f"are off; fetch it first: {download_command(spec, cache_dir)}"
            ) from e
        raise ModelNotAvailableError(
            f"{spec.source} at revision {spec.revision} could not be loaded ({first}); "
            f"check the network, or fetch it where there is one: {download_command(spec, cache_dir)} "
            "and run with HF_HUB_OFFLINE=1"
        ) from e


def _gguf_ready(spec: ModelSpec) -> None:
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        raise ModelError(
            f"model '{spec.name}': transformers needs the accelerate package to read GGUF files; "
            "pip install accelerate (or pip install 'quanta[gguf]')"
        )


# --------------------------------------------------------------------------- device, dtype

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """The torch device a params string names; "auto" is CUDA when there is one, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"suite.device: '{device}' is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"suite.device is '{device}' but torch sees no CUDA device (torch {torch.__version__}); "
                "use device: auto or cpu, or install a CUDA build of torch"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"suite.device is '{device}' but there are {torch.cuda.device_count()} CUDA devices "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"suite.device is '{device}' but MPS is not available here; use device: auto or cpu")
    return dev


def resolve_dtype(dtype: Union[str, torch.dtype] = "auto", device: Union[str, torch.device] = "auto") -> torch.dtype:
    """The torch dtype a params string names, for `device`.

    "auto" is bfloat16 on a CUDA device that supports it (the speed/memory default of
    current GPUs), else float32 (the paper's precision; CPUs gain nothing from bf16).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    dev = resolve_device(device)
    if dtype == "auto":
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"suite.dtype: '{dtype}' is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


# --------------------------------------------------------------------------- loading


def load_model(
    spec: ModelSpec,
    *,
    dtype: Union[str, torch.dtype] = "auto",
    device: Union[str, torch.device] = "auto",
    cache_dir: Optional[str] = "cache/hf",
    local_files_only: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: Optional[str] = None,
):
    """The causal LM of `spec`, in eval mode, on `device`, with parameters in `dtype`.

    Gradients stay enabled (the QDG stage needs them); wrap inference in
    ``torch.inference_mode()``. Raises :class:`ModelNotAvailableError` /
    :class:`UnknownRevisionError` / :class:`ModelError` with the fix in the message.
    """
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    loc = _locate(spec, cache_dir=cache_dir, local_files_only=local_files_only)
    kwargs: dict[str, Any] = {"dtype": dt, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if "gguf_file" in loc.kwargs:
        from transformers import GgufConfig

        _gguf_ready(spec)
        # Quantized blocks would stay packed in GgufLinear modules; unpack them into
        # ordinary parameters, which per-sample gradients and param_counts need.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, spec, loc, cache_dir, **kwargs)
    return model.to(dev).eval()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(
    spec: ModelSpec,
    *,
    cache_dir: Optional[str] = "cache/hf",
    local_files_only: bool = False,
    trust_remote_code: bool = False,
):
    """The tokenizer of `spec` (at its revision; for a multi-revision directory, the
    revision's own tokenizer files if it has them, else the directory's)."""
    from transformers import AutoTokenizer

    loc = _locate(spec, cache_dir=cache_dir, local_files_only=local_files_only)
    if source_kind(spec) == "local_revisions" and not any((Path(loc.path) / f).is_file() for f in _TOKENIZER_FILES):
        top = Path(spec.source).expanduser()
        if not any((top / f).is_file() for f in _TOKENIZER_FILES):
            raise ModelError(
                f"model '{spec.name}': no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {loc.path} or {top}"
            )
        loc = dataclasses.replace(loc, path=str(top))
    return _from_pretrained(
        AutoTokenizer.from_pretrained, spec, loc, cache_dir, trust_remote_code=trust_remote_code
    )


def load_config(
    spec: ModelSpec,
    *,
    cache_dir: Optional[str] = "cache/hf",
    local_files_only: bool = False,
    trust_remote_code: bool = False,
):
    """The transformers config of `spec`, without its weights (for context length, sizes)."""
    from transformers import AutoConfig

    loc = _locate(spec, cache_dir=cache_dir, local_files_only=local_files_only)
    return _from_pretrained(AutoConfig.from_pretrained, spec, loc, cache_dir, trust_remote_code=trust_remote_code)


def unavailable_reason(spec: ModelSpec, *, cache_dir: Optional[str] = "cache/hf") -> Optional[str]:
    """Why `spec` cannot be loaded without the network (the loader's one-line error), or None."""
    try:
        _locate(spec, cache_dir=cache_dir, local_files_only=True, probe=True)
    except QuantaError as e:
        return str(e)
    return None


def check_source(spec: ModelSpec, *, cache_dir: Optional[str] = "cache/hf", planted_root: Path = PLANTED_ROOT) -> bool:
    """Raise the loader's one-line error if `spec` can never load as written (a local path
    that does not exist, a revision it does not have, a hub revision name Pythia lacks);
    never touches the network. False for a source the planted stage writes (under
    `planted_root`), True otherwise.

    A planted source is not read here even when it exists: the planted stage retrains it
    at every revision of suite.revisions, so a revision it does not hold yet is one it will
    (:func:`pipeline.core.config.check_consistent` checks the names against planted.steps).
    """
    if inside(spec.source, planted_root):
        return False
    if source_kind(spec) == "hub":  # source_kind raises for a local path that does not exist
        _check_hub_revision(spec)
        return True
    _locate(spec, cache_dir=cache_dir, local_files_only=True)
    return True


def download(spec: ModelSpec, *, cache_dir: Optional[str] = "cache/hf") -> Path:
    """Fetch `spec` into `cache_dir` (no-op for local sources); the local path of its files.

    Downloads only what loading needs: config, tokenizer and weights, preferring
    safetensors over pickled ``.bin`` weights when a revision has both.
    """
    from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download

    if source_kind(spec) != "hub":
        return Path(_locate(spec, cache_dir=cache_dir, local_files_only=True).path)
    _check_hub_revision(spec)
    if hub_offline():
        cached = _hub_cached(spec, cache_dir)
        if cached is not None:
            return cached
        raise ModelNotAvailableError(
            f"cannot download {spec.source} at revision {spec.revision} with HF_HUB_OFFLINE=1; "
            f"unset it, or fetch it elsewhere: {download_command(spec, cache_dir)}"
        )
    try:
        if spec.gguf_file:
            return Path(hf_hub_download(spec.source, spec.gguf_file, revision=spec.revision, cache_dir=cache_dir))
        files = list_repo_files(spec.source, revision=spec.revision)
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        patterns = ["*.json", "*.txt", "*.model", "*.py", *weights]
        return Path(snapshot_download(spec.source, revision=spec.revision, cache_dir=cache_dir, allow_patterns=patterns))
    except Exception as e:  # network and hub errors: one line with the command to retry
        raise ModelNotAvailableError(
            f"could not download {spec.source} at revision {spec.revision} ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); retry with: {download_command(spec, cache_dir)}"
        ) from e


# --------------------------------------------------------------------------- facts about a model


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts as Pythia reports them: ``total`` and ``non_embedding``.

    ``non_embedding`` leaves out the input embedding and the unembedding (lm head), and
    nothing else (Pythia and Llama have no learned position embeddings; GPT-2's would be
    counted here). Shared (tied) tensors are counted once. Works on meta-device models.
    """
    emb = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            emb.update(id(p) for p in module.parameters())
    params = list(model.parameters())  # unique tensors: tied weights appear once
    total = sum(p.numel() for p in params)
    return {"total": total, "non_embedding": total - sum(p.numel() for p in params if id(p) in emb)}


def param_counts_of_config(config: Any) -> dict[str, int]:
    """:func:`param_counts` of the model a transformers config describes, built on the meta
    device (no weights allocated or read)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return param_counts(model)


def config_param_counts(spec: ModelSpec, *, cache_dir: Optional[str] = "cache/hf") -> Optional[dict[str, int]]:
    """:func:`param_counts` from the config alone (a meta-device model, no weights read),
    or None when the config is not on this machine. Never touches the network."""
    try:
        cfg = load_config(spec, cache_dir=cache_dir, local_files_only=True)
    except QuantaError:
        return None
    return param_counts_of_config(cfg)


_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length")


def max_context(model_or_config: Any) -> int:
    """The longest input, in tokens, the model was built for (from its config)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    for attr in _CONTEXT_ATTRS:
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelError(
        f"cannot tell the context length of {type(cfg).__name__}: none of {', '.join(_CONTEXT_ATTRS)} is set"
    )


# --------------------------------------------------------------------------- the output head


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters (library functions follow their inputs)."""
    return next(model.parameters()).device


def logit_transform(model: torch.nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """What the model's forward does to ``head(hidden)`` before returning logits, if anything.

    Most causal LMs (GPT-NeoX, Llama, Mistral, Qwen...) return the unembedding as is;
    a few rescale or soft-cap it. The ones known from their config are handled here;
    :func:`check_output_head` catches any other, so none is silently wrong.
    """
    cfg = model.config
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
    scale = getattr(cfg, "logit_scale", None)  # Cohere: logits * scale
    divide = getattr(cfg, "logits_scaling", None)  # Granite: logits / scaling
    steps = []
    if isinstance(scale, (int, float)) and scale != 1:
        steps.append(lambda x: x * scale)
    if isinstance(divide, (int, float)) and divide != 1:
        steps.append(lambda x: x / divide)
    if isinstance(cap, (int, float)) and cap:
        steps.append(lambda x: torch.tanh(x / cap) * cap)
    if not steps:
        return None

    def apply(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        return x

    return apply


def body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    body = model.base_model
    head = model.get_output_embeddings()
    if body is model or head is None:
        raise QuantaError(
            f"{type(model).__name__} is not a Hugging Face causal LM with a base model and an output "
            f"embedding; pipeline/lm/losses.py needs both (any *ForCausalLM does)"
        )
    return body, head


@torch.inference_mode()
def check_output_head(model: torch.nn.Module, n_positions: int = 8) -> None:
    """Check, on a few tokens, that our logits path equals the model's own ``.logits``.

    Our fast path runs ``model.base_model`` and then ``get_output_embeddings()`` (plus
    :func:`logit_transform`); an architecture that does something else between the two
    would give wrong losses without this check.
    """
    body, head = body_and_head(model)
    device = model_device(model)
    vocab = head.weight.shape[0]
    ids = (torch.arange(n_positions, device=device) * 7919 % vocab)[None]  # (1, pos)
    ref = model(input_ids=ids, use_cache=False).logits[0].float()  # (pos, vocab)
    ours = head(body(input_ids=ids, use_cache=False).last_hidden_state[0]).float()
    transform = logit_transform(model)
    if transform is not None:
        ours = transform(ours)
    if not torch.isfinite(ref).all():
        return  # a broken checkpoint: the non-finite loss check names it, with doc and position
    err = (ours - ref).abs().max().item()
    dtype = next(model.parameters()).dtype
    tol = (1e-4 if dtype == torch.float32 else 2e-2) * (1.0 + ref.abs().max().item())
    if not err <= tol:
        raise QuantaError(
            f"{type(model).__name__}: model(...).logits differs from get_output_embeddings()(last_hidden_state) "
            f"by {err:.3g}; this architecture post-processes its logits in a way pipeline/lm/losses.py does not "
            f"know (add it to models.logit_transform)"
        )
