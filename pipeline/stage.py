"""What every stage file shares: argument parsing of --params and one-line errors."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from pipeline.errors import QuantaError


def parser(description: str, *paths: str) -> argparse.ArgumentParser:
    """A stage's argument parser: --params, and a required --<name> for each of `paths`
    (the inputs and outputs dvc.yaml passes it)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    for name in paths:
        ap.add_argument(f"--{name}", required=True)
    return ap


def run(main: Callable[[Optional[Sequence[str]]], None], argv: Optional[Sequence[str]] = None) -> None:
    """Run a stage's main; a QuantaError becomes one line on stderr and exit status 2."""
    try:
        main(argv)
    except QuantaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
