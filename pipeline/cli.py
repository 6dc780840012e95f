"""The `quanta` console script: what is not a DVC stage.

    quanta info        models of the suite, their parameter counts, and what is cached
    quanta revisions   Pythia's 154 checkpoint names (for params.yaml suite.revisions)
    quanta download    fetch every (model, revision) of the suite into the HF cache, for offline runs
    quanta check       validate params.yaml (every section, and the suite's sources) without running anything
    quanta screenshot  a PNG of the HTML report in headless Chromium

Stages themselves run through DVC (`dvc repro`); see README.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from pipeline.core import config
from pipeline.core.errors import QuantaError, os_error_line


def _fmt_count(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def cmd_info(args) -> None:
    from pipeline.lm import corpus, models, partitions

    params = config.load_params(args.params)
    suite = config.section(params, "suite")
    losses_dir = Path(args.losses)
    print(f"suite: {len(suite.models)} models x {len(suite.revisions)} revisions "
          f"(dtype={suite.dtype}, device={suite.device} -> {models.resolve_device(suite.device)})")
    header = f"{'model':<22} {'revision':<12} {'params':>8} {'non-emb':>8} {'cached':>7} {'loss rows':>10}  source"
    print(header)
    print("-" * len(header))
    missing: list[str] = []
    for name in suite.models:
        for revision in suite.revisions:
            spec = models.spec_from_suite(suite, name, revision)
            counts = models.config_param_counts(spec, cache_dir=suite.cache_dir)
            why = models.unavailable_reason(spec, cache_dir=suite.cache_dir)
            cached = why is None
            if why is not None:
                missing.append(f"  {name} @ {revision}: {why}")
            try:
                rows = partitions.count_loss_rows(losses_dir, name, revision)
            except partitions.LayoutError as e:  # a truncated part: say so, list the rest
                rows = "damaged"
                missing.append(f"  {name} @ {revision}: {e}")
            total = counts["total"] if counts else None
            non_emb = counts["non_embedding"] if counts else None
            print(f"{name:<22} {revision:<12} {_fmt_count(total):>8} {_fmt_count(non_emb):>8} "
                  f"{'yes' if cached else 'no':>7} {rows:>10}  {spec.source}")
    if missing:
        print("\nnot loadable offline (params '?' and cached 'no'), or with a damaged loss table:")
        print("\n".join(missing))
    corpus_tokens = Path(args.tokens)
    if corpus_tokens.exists():
        n = corpus.count_tokens(corpus_tokens)
        print(f"\ncorpus: {corpus_tokens} holds {n:,} tokens")
    else:
        print(f"\ncorpus: {corpus_tokens} not built yet (dvc repro corpus)")


def cmd_revisions(args) -> None:
    from pipeline.lm import models

    print("\n".join(models.pythia_revisions()))


def cmd_download(args) -> None:
    from pipeline.lm import models

    suite = config.load("suite", args.params)
    for name in suite.models:
        for revision in suite.revisions:
            spec = models.spec_from_suite(suite, name, revision)
            path = models.download(spec, cache_dir=suite.cache_dir)
            print(f"{name} @ {revision}: {path}")


def cmd_check(args) -> None:
    params = config.load_params(args.params)  # refuses unknown sections
    for name in config.SECTIONS:
        config.section(params, name)
    from pipeline.lm import models

    suite = config.section(params, "suite")
    built = []
    for name in suite.models:
        for revision in suite.revisions:
            if not models.check_source(models.spec_from_suite(suite, name, revision), cache_dir=suite.cache_dir):
                built.append(name)
    later = f"; built by the pipeline: {', '.join(dict.fromkeys(built))}" if built else ""
    print(f"{args.params}: ok ({', '.join(config.SECTIONS)}){later}")


def cmd_screenshot(args) -> None:
    from pipeline.report import chromium

    out = chromium.screenshot(args.report, args.out, args.width, args.height, args.cluster)
    print(f"{out}: screenshot of {args.report}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="quanta", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    sub = ap.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="models, parameter counts, what is cached")
    info.add_argument("--losses", default="cache/losses")
    info.add_argument("--tokens", default="cache/corpus/tokens.parquet")
    info.set_defaults(fn=cmd_info)
    sub.add_parser("revisions", help="Pythia's checkpoint names").set_defaults(fn=cmd_revisions)
    sub.add_parser("download", help="fetch the suite into the HF cache").set_defaults(fn=cmd_download)
    sub.add_parser("check", help="validate params.yaml").set_defaults(fn=cmd_check)
    shot = sub.add_parser("screenshot", help="a PNG of the HTML report in headless Chromium")
    shot.add_argument("--report", default="cache/report/index.html")
    shot.add_argument("--out", default="report.png")
    shot.add_argument("--cluster", type=int, default=None, help="open this cluster (default: the largest)")
    shot.add_argument("--width", type=int, default=1400)
    shot.add_argument("--height", type=int, default=900)
    shot.set_defaults(fn=cmd_screenshot)
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except QuantaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
