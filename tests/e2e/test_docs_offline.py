"""The API docs work on an air-gapped machine: Swagger UI and ReDoc render the operations in Chromium while every
request that would leave loopback is aborted."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from server.api import create_app
from tests.support.apps import PATIENCE_S
from tests.support.browser import chromium, needs_chromium
from tests.support.servers import serve_in_thread

pytestmark = needs_chromium

CLASSIFY_SUMMARY = "Classify images zero-shot or with test-time adaptation"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@pytest.fixture
def url(settings) -> Iterator[str]:
    with serve_in_thread(create_app(settings)) as served:
        yield served


def render_offline(url: str, path: str, wait_for: str) -> tuple[list[str], list[str]]:
    """Open ``url + path`` with the network cut off; wait until ``wait_for`` is visible.

    Returns the URLs it asked for on loopback and the ones it tried to fetch elsewhere (aborted).
    """
    from playwright.sync_api import Route, expect

    local: list[str] = []
    blocked: list[str] = []

    def only_loopback(route: Route) -> None:
        target = route.request.url
        if urlsplit(target).hostname in LOOPBACK or target.startswith(("data:", "blob:")):
            local.append(target)
            route.continue_()
        else:
            blocked.append(target)
            route.abort("internetdisconnected")

    with chromium() as browser:
        page = browser.new_page()
        page.route("**/*", only_loopback)
        page.goto(url + path)
        expect(page.get_by_text(wait_for).filter(visible=True).first).to_be_visible(timeout=PATIENCE_S * 1000)
        page.close()
    return local, blocked


def test_swagger_ui_renders_the_operations_offline(url):
    local, blocked = render_offline(url, "/docs", CLASSIFY_SUMMARY)
    assert blocked == []
    assert any("/docs/assets/swagger-ui-bundle.js" in u for u in local)
    assert any(u.endswith("/openapi.json") for u in local)


def test_redoc_renders_the_operations_offline(url):
    local, blocked = render_offline(url, "/redoc", CLASSIFY_SUMMARY)
    assert blocked == []
    assert any("/docs/assets/redoc.standalone.js" in u for u in local)
    assert any(u.endswith("/openapi.json") for u in local)


def test_the_assets_come_with_their_licences(client):
    for name in ("swagger-ui.LICENSE", "swagger-ui.NOTICE", "redoc.LICENSE"):
        answer = client.get(f"/docs/assets/{name}")
        assert answer.status_code == 200 and "Copyright" in answer.text, name
