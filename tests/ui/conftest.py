"""A real browser for the console tests: Debian's chromium (apt-get install chromium; .ci/run does), headless,
driven by playwright's Python package (the test extra), with a new empty profile and no host but 127.0.0.1."""
from __future__ import annotations

from typing import Iterator

import pytest

from tests.deploy.conftest import require_tool

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]  # offline: nothing but this machine


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator:
    """Chromium with a new empty profile (a persistent context in a fresh directory)."""
    from playwright.sync_api import sync_playwright

    chromium = require_tool("chromium", "apt-get install chromium (done by .ci/run)")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("profile")),
                                                       executable_path=chromium, args=CHROMIUM_FLAGS,
                                                       viewport={"width": 1280, "height": 900})
        yield context
        context.close()


@pytest.fixture()
def browser_page(browser) -> Iterator:
    """A new tab (its sessionStorage is its own)."""
    page = browser.new_page()
    yield page
    page.close()
