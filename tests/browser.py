"""Real headless Chromium for tests, driven by Playwright (no browser download: the system one).

    from browser import chromium

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(path.as_uri())

The binary is ``$CHROMIUM`` if set, else the first of ``chromium``, ``chromium-browser``,
``google-chrome`` and ``google-chrome-stable`` on PATH. Without one, or without the ``playwright``
package, tests skip with one line saying how to enable them (nothing is installed for you); under
CI (``$CI`` set) they fail instead, so a broken CI image cannot pass by skipping every browser test.
``.ci/run`` installs Chromium when it is missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Quiet and offline: no first-run UI, no update or sync traffic. --no-sandbox: CI runs as root.
_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> str | None:
    """The Chromium binary to use, or None if there is none."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return next(filter(None, map(shutil.which, _NAMES)), None)


def _unavailable(reason: str, fix: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser tests: {fix} (.ci/run installs chromium)")
    pytest.skip(f"browser tests skipped: {reason}; to run them, {fix}")


@contextmanager
def chromium() -> Iterator:
    """A headless Chromium ``playwright.sync_api.Browser``, closed on exit.

    Playwright gives every launch a fresh temporary profile and deletes it afterwards.
    """
    binary = find_chromium()
    if binary is None and os.environ.get("CHROMIUM"):
        _unavailable(
            f"$CHROMIUM is {os.environ['CHROMIUM']!r}, which is not an executable",
            "point $CHROMIUM at a Chromium or Chrome binary, or unset it",
        )
    if binary is None:
        _unavailable(
            f"no Chromium found (none of {', '.join(_NAMES)} is on PATH)",
            "apt-get install chromium, or set $CHROMIUM to a Chromium or Chrome binary",
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed", "pip install -e '.[dev]'")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, headless=True, args=_ARGS)
        try:
            yield browser
        finally:
            browser.close()
