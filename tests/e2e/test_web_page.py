"""The web page at ``/``, driven end to end in headless Chromium against a real server on loopback.

Each test finds the page's controls by their visible labels (so they stay labelled) and asserts what a
person sees: the predicted label, the bars, the adaptation report, the server's error message. Screenshots
go to ``$TTA_SCREENSHOTS`` when it is set (to look at them), else to the test's temporary directory.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
from pydantic import SecretStr

from server.api import create_app
from server.settings import Settings
from tests.support.browser import chromium, needs_chromium
from tests.support.servers import ROOT, serve_in_thread

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Response

pytestmark = needs_chromium

EXAMPLES = ROOT / "docs" / "examples"
LABELS = ["red star", "blue square", "green circle"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
WAIT_MS = 120_000  # a failsafe against a hang on a busy machine; every wait ends when its condition holds


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture
def url(settings: Settings) -> Iterator[str]:
    with serve_in_thread(create_app(settings)) as served:
        yield served


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    context.set_default_timeout(WAIT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("TTA_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_page(page: Page, url: str) -> Response:
    """Load the page and wait until it has read the methods and label sets; return the page's response."""
    response = page.goto(url + "/")
    assert response is not None and response.ok
    page.wait_for_selector("body[data-ready=true]")
    return response


def classify(page: Page) -> tuple[Response, dict[str, Any]]:
    """Press Classify and return the server's answer to the page's request."""
    with page.expect_response(lambda r: urlsplit(r.url).path == "/v1/classify") as answer:
        page.get_by_role("button", name="Classify").click()
    response = answer.value
    return response, response.json()


def percent(p: float) -> str:
    return f"{100 * p:.1f}%"


def test_an_uploaded_image_gets_a_label_and_one_bar_per_label(page, url, shots):
    from playwright.sync_api import expect

    open_page(page, url)
    expect(page.get_by_label("Test-time method")).to_have_value("zero_shot")
    page.get_by_label("Choose images, or drop them here").set_input_files(EXAMPLES / "red_star.png")
    expect(page.get_by_role("list", name="Chosen images")).to_contain_text("red_star.png")
    page.get_by_label("Labels, separated by commas").fill("red star, blue square, green circle")
    response, body = classify(page)

    card = page.locator(".card")
    expect(card).to_have_count(1)
    result = body["results"][0]
    shown = card.locator(".prediction").inner_text()
    assert shown in LABELS
    assert shown == result["label"]
    bars = card.locator(".bar")
    expect(bars).to_have_count(3)
    assert sorted(card.locator(".bar-label").all_inner_texts()) == sorted(LABELS)
    # Calibrated confidence beside the raw probability of the same label, as the server answered them.
    expect(card.locator(".confidence")).to_have_text(percent(result["confidence"]))
    expect(card.locator(".raw")).to_have_text(percent(result["predictions"][0]["raw_probability"]))
    expect(card.locator(".none-of-these")).to_have_text(percent(result["none_of_these"]))
    # The server assigned the request id (the page sent none) and the page shows it.
    assert response.request.headers.get("x-request-id") is None
    expect(page.locator("#request-id")).to_have_text(f"Request id: {response.headers['x-request-id']}")
    expect(page.get_by_role("alert")).to_be_hidden()
    page.screenshot(path=shots / "web-zero-shot.png", full_page=True)
    # The page is for people: it stays out of the API's schema.
    schema = page.request.get(url + "/openapi.json").json()
    assert "/" not in schema["paths"]


def test_an_adapted_answer_shows_zero_shot_and_adapted_bars_and_the_report(page, url, shots):
    from playwright.sync_api import expect

    open_page(page, url)
    # Drop an image on the drop zone, as a person dragging a file would.
    data = base64.b64encode((EXAMPLES / "blue_square.png").read_bytes()).decode()
    page.evaluate(
        """data => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "blue_square.png", {type: "image/png"}));
            const drop = new DragEvent("drop", {dataTransfer: transfer, bubbles: true});
            document.getElementById("drop").dispatchEvent(drop);
        }""",
        data,
    )
    expect(page.get_by_role("list", name="Chosen images")).to_contain_text("blue_square.png")
    page.get_by_label("or a stored label set").select_option("tiny-colours")
    expect(page.get_by_label("Labels, separated by commas")).to_be_disabled()
    page.get_by_label("Test-time method").select_option("tps")
    expect(page.locator("#options-hint")).to_contain_text("views 64")
    page.get_by_label("Options (JSON, optional)").fill(json.dumps({"views": 8}))
    response, body = classify(page)
    assert response.status == 200
    result = body["results"][0]
    assert result["zero_shot"] is not None  # the page asked for the comparison (compare=true)

    card = page.locator(".card")
    expect(card).to_have_count(1)
    adaptation = result["adaptation"]
    expect(card.locator(".prediction")).to_have_text(result["label"])
    assert result["label"] in ("red", "green", "blue")
    expect(card.locator(".bar.zero-shot")).to_have_count(3)
    expect(card.locator(".bar.adapted")).to_have_count(3)
    expect(page.locator(".legend")).to_have_text(re.compile(r"zero-shot\s+tps"))
    # Each label's adapted bar carries its adapted probability, its zero-shot bar the zero-shot one.
    zero_shot = {p["label"]: p["probability"] for p in result["zero_shot"]["predictions"]}
    for i, prediction in enumerate(result["predictions"]):
        row = card.locator(".bar-row").nth(i)
        expect(row.locator(".bar-label")).to_have_text(prediction["label"])
        expect(row.locator(".bar.adapted .bar-value")).to_have_text(percent(prediction["probability"]))
        expect(row.locator(".bar.zero-shot .bar-value")).to_have_text(percent(zero_shot[prediction["label"]]))

    report = card.locator(".report")
    expect(report.locator("[data-field=method]")).to_have_text("tps")
    expect(report.locator("[data-field=views]")).to_have_text(f"{adaptation['selected_views']} of 8")
    expect(report.locator("[data-field=steps]")).to_have_text(str(adaptation["steps"]))
    before, after = adaptation["entropy_before"], adaptation["entropy_after"]
    expect(report.locator("[data-field=entropy]")).to_have_text(f"{before:.3f} → {after:.3f} nats")
    expect(report.locator("[data-field=seconds]")).to_have_text(f"{adaptation['seconds']:.3f}")
    changed, skipped = adaptation["changed"], adaptation["skipped"] is not None
    expect(report.locator("[data-field=changed]")).to_have_text(re.compile("^yes" if changed else "^no$"))
    expect(report.locator("[data-field=skipped]")).to_have_text(re.compile("^yes" if skipped else "^no$"))
    page.screenshot(path=shots / "web-adapted.png", full_page=True)

    # The bars can show raw probabilities instead; the page redraws without asking the server again.
    page.get_by_label("raw probability").check()
    first = result["predictions"][0]
    expect(card.locator(".bar-row").first.locator(".bar.adapted .bar-value")).to_have_text(
        percent(first["raw_probability"])
    )


def test_a_file_that_is_not_an_image_shows_the_servers_error(page, url, shots, tmp_path):
    from playwright.sync_api import expect

    notes = tmp_path / "notes.txt"
    notes.write_text("these are notes, not a picture\n")
    open_page(page, url)
    page.get_by_label("Choose images, or drop them here").set_input_files(notes)
    page.get_by_label("Labels, separated by commas").fill(", ".join(LABELS))
    response, body = classify(page)

    assert response.status == 422
    error = body["error"]
    assert error["code"] == "invalid_image"
    alert = page.get_by_role("alert")
    expect(alert).to_be_visible()
    expect(alert).to_contain_text(error["message"])
    expect(alert).to_contain_text("notes.txt")
    expect(alert).to_contain_text(f"422 invalid_image · request {error['request_id']}")
    expect(page.locator(".card")).to_have_count(0)
    page.screenshot(path=shots / "web-error.png", full_page=True)

    # A request that never reaches the server is reported too, not dropped in silence.
    page.route("**/v1/classify", lambda route: route.abort("connectionrefused"))
    page.get_by_label("Choose images, or drop them here").set_input_files(EXAMPLES / "red_star.png")
    page.get_by_role("button", name="Classify").click()
    expect(alert).to_contain_text("Could not reach the server.")
    expect(alert).not_to_contain_text(error["message"])


def test_the_page_works_air_gapped_and_asks_nothing_beyond_loopback(page, url, shots):
    from playwright.sync_api import Route, expect

    asked: list[str] = []
    refused: list[str] = []

    def only_loopback(route: Route) -> None:
        asked.append(route.request.url)
        if urlsplit(route.request.url).hostname in LOOPBACK:
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort("internetdisconnected")

    page.route("**/*", only_loopback)
    # The page's own policy (Content-Security-Policy) would block a foreign URL before it is requested, so a
    # blocked one shows as a console error instead: any console error or uncaught exception fails the test.
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    served = open_page(page, url)
    assert served.headers["content-security-policy"].startswith("default-src 'self'")
    # Two images in one request: one card each, in the order chosen.
    names = ["green_circle.png", "red_star.png"]
    page.get_by_label("Choose images, or drop them here").set_input_files([EXAMPLES / n for n in names])
    page.get_by_label("Labels, separated by commas").fill(", ".join(LABELS))
    _, body = classify(page)

    cards = page.locator(".card")
    expect(cards).to_have_count(2)
    for i, name in enumerate(names):
        expect(cards.nth(i).locator(".file")).to_have_text(name)
        expect(cards.nth(i).locator(".prediction")).to_have_text(body["results"][i]["label"])
        expect(cards.nth(i).locator(".bar")).to_have_count(3)
    # The stylesheet came from the server: the Classify button wears its accent colour.
    button = page.get_by_role("button", name="Classify")
    assert button.evaluate("b => getComputedStyle(b).backgroundColor") == "rgb(11, 92, 173)"
    paths = {urlsplit(u).path for u in asked}
    assert {"/", "/web/app.js", "/web/style.css", "/v1/methods", "/v1/label-sets", "/v1/classify"} <= paths
    assert refused == []
    assert problems == []
    page.screenshot(path=shots / "web-air-gapped.png", full_page=True)


def test_on_a_server_with_keys_the_page_asks_for_one_and_sends_it(browser, settings, shots):
    from playwright.sync_api import expect

    key = "web-page-key-0123456789"
    keyed = settings.model_copy(update={"api_keys": SecretStr(f"web:{key}")})
    with serve_in_thread(create_app(keyed)) as served:
        page = browser.new_page()
        try:
            open_page(page, served)
            expect(page.get_by_role("alert")).to_contain_text("could not load what the server offers")
            page.get_by_label("API key (only when the server asks for one)").fill(key)
            page.get_by_label("API key (only when the server asks for one)").dispatch_event("change")
            expect(page.get_by_role("alert")).to_be_hidden()
            expect(page.get_by_label("Test-time method")).to_have_value("zero_shot")
            page.get_by_label("Choose images, or drop them here").set_input_files(EXAMPLES / "red_star.png")
            page.get_by_label("Labels, separated by commas").fill("red star, blue square, green circle")
            response, body = classify(page)
            assert response.status == 200 and response.request.headers["authorization"] == f"Bearer {key}"
            expect(page.locator(".card .prediction")).to_have_text(body["results"][0]["label"])
            page.screenshot(path=shots / "web-with-key.png", full_page=True)
        finally:
            page.close()
