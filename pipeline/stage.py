"""What every stage file shares: argument parsing of --params and one-line errors."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from pipeline.errors import QuantaError


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return ap


def run(main: Callable[[Optional[Sequence[str]]], None], argv: Optional[Sequence[str]] = None) -> None:
    """Run a stage's main; a QuantaError becomes one line on stderr and exit status 2."""
    try:
        main(argv)
    except QuantaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
