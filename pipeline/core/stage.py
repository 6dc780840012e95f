"""What every stage file shares: argument parsing of --params, one-line errors, and
interrupts that stop the stage.

A stage started with SIGINT ignored (anything launched in the background by a
non-interactive shell inherits that) would run on through Ctrl-C or ``kill -INT``;
SIGTERM would end it without running any ``finally``. So :func:`run` restores the
KeyboardInterrupt on SIGINT and turns SIGTERM into SystemExit: either way the stage's
clean-ups run (temporary files removed, worker pools shut down) and it exits non-zero,
leaving only whole files, which a rerun reuses."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable, Optional, Sequence

from pipeline.core.errors import QuantaError, os_error_line


def parser(description: str, *paths: str) -> argparse.ArgumentParser:
    """A stage's argument parser: --params, and a required --<name> for each of `paths`
    (the inputs and outputs dvc.yaml passes it)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    for name in paths:
        ap.add_argument(f"--{name}", required=True)
    return ap


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def interruptible() -> None:
    """SIGINT raises KeyboardInterrupt and SIGTERM SystemExit, whatever this process inherited."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)


def run(main: Callable[[Optional[Sequence[str]]], None], argv: Optional[Sequence[str]] = None) -> None:
    """Run a stage's main; a QuantaError or an OSError (read-only folder, full disk) becomes
    one line on stderr and exit status 2, an interrupt one line and status 130."""
    interruptible()
    try:
        main(argv)
    except QuantaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the machine refused: a read-only folder, a full disk
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: nothing half-written is left; a rerun resumes from finished parts where the stage has them",
              file=sys.stderr)
        sys.exit(130)
