"""The suite's input files as DVC sees them: one small JSON per input, holding the content
hash of every local file it reads, so that editing a local corpus or model in place reruns
what it feeds.

DVC reruns a stage when one of its `deps` changes, and a params value such as
``corpus.source: data/corpus.jsonl`` names a file DVC does not watch: edited in place, it
would leave every result stale under "Data and pipelines are up to date". The `sources`
stage (``always_changed``: it runs on every ``dvc repro``) writes

- ``cache/sources/corpus.json``: the corpus source, and the sha256 of the file when it is
  a local one (the `corpus` stage depends on it);
- ``cache/sources/models/<name>.json``: each suite model's source and, for a local folder
  or GGUF file, the sha256 of every file in it (``losses@<name>`` and `gradients` depend on
  their model's).

Its outputs change only when a source's content does, so the rerun costs nothing
downstream. Hub sources are recorded by name (a hub revision names its weights), and
sources under ``cache/planted`` by the stage that builds them (DVC already tracks that
output). Hashes are cached in ``cache/.sources-hashes.json`` by (path, size, mtime), as DVC
caches its own, so a 24 GB local checkpoint is read once, not on every ``dvc repro``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pipeline.core import files
from pipeline.core.config import CorpusConfig, SuiteConfig, is_local_source, model_source
from pipeline.core.errors import QuantaError

#: what the planted stage writes: DVC tracks it as that stage's output
BUILT = Path("cache/planted")
HASH_CACHE = Path("cache/.sources-hashes.json")


class HashCache:
    """sha256 of files, remembered by (path, size, mtime_ns) between runs."""

    def __init__(self, path: Path = HASH_CACHE):
        self.path = path
        try:
            self.known = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            self.known = {}  # a damaged cache only costs a rehash
        self.used: dict = {}

    def sha256(self, f: Path) -> str:
        st = f.stat()
        key = str(f.resolve())
        stamp = [st.st_size, st.st_mtime_ns]
        hit = self.known.get(key)
        digest = hit[2] if hit and hit[:2] == stamp else files.sha256_file(f)
        self.used[key] = [*stamp, digest]
        return digest

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with files.atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.used, sort_keys=True))


def _built(path: Path) -> bool:
    return path.resolve() == BUILT.resolve() or BUILT.resolve() in path.resolve().parents


def describe(source: str, hashes: HashCache, *, local: bool, what: str) -> dict:
    """What a source is, for the manifest: a hub name, a path the pipeline builds, or a local
    file or folder with the sha256 of each file in it (names relative to the source)."""
    path = Path(source).expanduser()
    if not local:
        return {"source": source, "kind": "hub"}
    if _built(path):
        return {"source": source, "kind": "built by the planted stage (tracked by DVC)"}
    if not path.exists():
        raise QuantaError(f"{what} = {source}: no such file or folder; fix {what}")
    if path.is_file():
        return {"source": source, "kind": "local file", "sha256": hashes.sha256(path)}
    found = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    return {"source": source, "kind": "local folder",
            "files": {f.relative_to(path).as_posix(): hashes.sha256(f) for f in found}}


def manifest(suite: SuiteConfig, corpus: CorpusConfig, hashes: HashCache) -> dict:
    """{"corpus": ..., "models": {name: ...}} of the suite (see the module docstring)."""
    from pipeline.lm import corpus as corpus_lib  # torch-free, as this whole stage is

    out = {"corpus": describe(corpus.source, hashes, local=corpus_lib.is_local(corpus.source), what="corpus.source")}
    out["models"] = {}
    for name in suite.models:
        source = model_source(suite, name)
        if source is None:
            raise QuantaError(f"suite.models names '{name}', which has no source; add suite.sources.{name}")
        local = Path(source).expanduser().exists() or is_local_source(source)
        entry = describe(source, hashes, local=local, what=f"suite.sources.{name}")
        if suite.gguf_files.get(name):
            entry["gguf_file"] = suite.gguf_files[name]
        out["models"][name] = entry
    return out


def write(out_dir: str | Path, suite: SuiteConfig, corpus: CorpusConfig,
          hashes: Optional[HashCache] = None) -> dict:
    """Write ``<out_dir>/corpus.json`` and ``<out_dir>/models/<name>.json``; return the manifest.
    Files of models no longer in the suite are removed, so the folder holds this suite only."""
    hashes = hashes or HashCache()
    m = manifest(suite, corpus, hashes)
    out = Path(out_dir)
    files.write_json(m["corpus"], out / "corpus.json")
    for name, entry in m["models"].items():
        files.write_json(entry, model_path(out, name))
    models_dir = out / "models"
    for stale in models_dir.glob("*.json"):
        if stale.stem not in m["models"]:
            stale.unlink()
    hashes.save()
    return m


def model_path(out_dir: str | Path, name: str) -> Path:
    """``<out_dir>/models/<name>.json``: what ``losses@<name>`` depends on (dvc.yaml)."""
    return Path(out_dir) / "models" / f"{name}.json"
