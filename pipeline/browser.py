"""Headless Chromium, for the report's browser test, its benchmark and the README screenshot.

Playwright drives the system's Chromium (Debian's `chromium` package): Playwright's own
browser download needs the internet, which CI machines do not have. The flags keep
Chromium from reaching out to the network at start-up (on a closed network those
connections fail noisily) and let it run as root in a container.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator

from pipeline.errors import QuantaError

CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_path() -> str:
    """The Chromium executable: $QUANTA_CHROMIUM, else chromium / chromium-browser on PATH."""
    path = os.environ.get("QUANTA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise QuantaError(
            "no Chromium found: install it (Debian/Ubuntu: apt-get install chromium) or set QUANTA_CHROMIUM"
        )
    return path


@contextlib.contextmanager
def browser() -> Iterator["object"]:
    """A headless Chromium (a Playwright Browser), closed on exit."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise QuantaError("playwright is not installed: pip install -e '.[test]' (or pip install playwright)") from e
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=list(CHROMIUM_ARGS))
        try:
            yield b
        finally:
            b.close()
