"""Stage `corpus`: read the documents of params.yaml's corpus section and tokenize them.

    python stages/corpus.py [--params params.yaml] --docs cache/corpus/docs.parquet \
        --tokens cache/corpus/tokens.parquet

The tokenizer is that of `corpus.tokenizer` (a suite model name), else of the suite's
first model, at the suite's last revision. Both tables carry the corpus config and the
tokenizer's origin in their Parquet metadata.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from pipeline import config, corpus, models, stage
from pipeline.errors import QuantaError
from pipeline.io import write_parquet


def _warn_if_tokenizers_differ(suite, name: str, tokenizer) -> None:
    """Every model is scored on one tokenization; say so if some model's vocabulary differs."""
    vocab = tokenizer.get_vocab()
    for other in suite.models:
        if other == name:
            continue
        try:
            spec = models.spec_from_suite(suite, other, suite.revisions[-1])
            other_vocab = models.load_tokenizer(
                spec, cache_dir=suite.cache_dir, local_files_only=suite.local_files_only
            ).get_vocab()
        except QuantaError as e:
            print(f"warning: could not check the tokenizer of '{other}': {e}", file=sys.stderr)
            continue
        if other_vocab != vocab:
            print(
                f"warning: model '{other}' has a different tokenizer than '{name}'; its losses will be "
                f"computed on '{name}' tokens, which it was not trained on",
                file=sys.stderr,
            )


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = stage.parser("documents -> tokens")
    ap.add_argument("--docs", required=True, help="output: one row per document")
    ap.add_argument("--tokens", required=True, help="output: one row per token")
    args = ap.parse_args(argv)

    params = config.load_params(args.params)
    cfg = config.section(params, "corpus")
    suite = config.section(params, "suite")
    name = cfg.tokenizer or (suite.models[0] if suite.models else None)
    if name is None:
        raise config.ConfigError("suite.models is empty, so there is no tokenizer; list a model, or set corpus.tokenizer")
    if name not in suite.models:
        raise config.ConfigError(f"corpus.tokenizer '{name}' is not in suite.models ({', '.join(suite.models)})")
    spec = models.spec_from_suite(suite, name, suite.revisions[-1])
    load_kw = dict(cache_dir=suite.cache_dir, local_files_only=suite.local_files_only,
                   trust_remote_code=suite.trust_remote_code)
    tokenizer = models.load_tokenizer(spec, **load_kw)
    corpus.check_max_len(cfg, models.max_context(models.load_config(spec, **load_kw)), model=name)
    _warn_if_tokenizers_differ(suite, name, tokenizer)

    docs, tokens = corpus.build_corpus(cfg, tokenizer, cache_dir=str(Path(suite.cache_dir) / "datasets"), progress=True)
    meta = {
        "corpus": config.to_dict(cfg),
        "tokenizer": {"model": name, "source": spec.source, "revision": spec.revision, "gguf_file": spec.gguf_file},
    }
    # Both tables are complete before either is written: an error leaves the old outputs.
    write_parquet(docs, args.docs, config=meta)
    write_parquet(tokens, args.tokens, config=meta)
    print(f"corpus: {docs.num_rows:,} documents, {tokens.num_rows:,} tokens -> {args.docs}, {args.tokens}")


if __name__ == "__main__":
    stage.run(main)
