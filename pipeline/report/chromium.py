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
from pathlib import Path
from typing import Iterator, Optional

from pipeline.core.errors import QuantaError

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


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1400, height: int = 900,
               cluster: Optional[int] = None, timeout_s: float = 30.0) -> Path:
    """A PNG of the report as a person first sees it (or with cluster `cluster` open).

    Waits for the page's script to finish rendering; console errors are an error here,
    since a report that logs one is broken.
    """
    html_path, png_path = Path(html_path).resolve(), Path(png_path)
    if not html_path.exists():
        raise QuantaError(f"no report at {html_path}; make it with: dvc repro report")
    errors: list[str] = []
    with browser() as b:
        page = b.new_page(viewport={"width": width, "height": height})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(html_path.as_uri() + (f"#cluster-{cluster}" if cluster is not None else ""))
        page.wait_for_selector("body[data-ready='1']", timeout=timeout_s * 1000)
        if errors:
            raise QuantaError(f"the report logged errors in Chromium: {errors[:3]}")
        png_path.parent.mkdir(parents=True, exist_ok=True)
        from pipeline.core import files

        with files.atomic_path(png_path) as tmp:
            page.screenshot(path=str(tmp.with_suffix(".png")))
            tmp.with_suffix(".png").rename(tmp)
    return png_path
