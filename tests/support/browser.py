"""Headless Chromium for the web page and the docs: Debian's ``chromium`` (``.ci/run`` installs it), driven
by Playwright from PyPI. Playwright's own browser download is never used: the machine is offline."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Mark a test module that needs the browser: skipped, with the reason in the summary, where it is missing.
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium missing (.ci/run installs Debian's chromium)")


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium, closed on exit."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM is not None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()
