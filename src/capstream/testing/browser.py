"""Headless Chromium for the browser tests and the scripts that measure or photograph the viewer.

Debian's ``chromium`` driven by Playwright's Python package (the ``browser`` extra); no browser is
ever downloaded. ``missing()`` says why a browser cannot be had here (the tests skip with it), and
``chromium()`` opens a fresh profile with flags that keep the browser off the network: no
background requests, no updates, no sync.

    >>> reason = missing()
    >>> with chromium() as context:
    ...     page = context.new_page()
    ...     watch = ConsoleWatch(page)
    ...     page.goto(index.as_uri())
    ...     assert not watch.errors
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Iterator

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def chromium_path() -> str | None:
    """The Chromium executable: ``$CAPSTREAM_CHROMIUM``, else Debian's ``chromium`` on PATH."""
    return os.environ.get("CAPSTREAM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def missing() -> str | None:
    """Why no browser can be driven here (None: one can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "needs Playwright's Python package: pip install -e '.[browser]'"
    if chromium_path() is None:
        return "needs Chromium: apt-get install chromium (or set CAPSTREAM_CHROMIUM)"
    return None


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A Playwright browser context of headless Chromium, with a fresh profile deleted afterwards."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="capstream-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=chromium_path(), headless=True, args=list(CHROMIUM_FLAGS),
                viewport={"width": width, "height": height})
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


class ConsoleWatch:
    """Every console error, uncaught exception and failed request of one page."""

    def __init__(self, page: Any):
        self.errors: list[str] = []
        page.on("console", lambda message: self.errors.append(f"console: {message.text}")
                if message.type == "error" else None)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("requestfailed", lambda request: self.errors.append(f"request failed: {request.url}"))


__all__ = ["chromium", "chromium_path", "missing", "ConsoleWatch", "CHROMIUM_FLAGS"]
