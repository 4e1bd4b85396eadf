"""The page `sdruntime serve` answers at GET / (sdruntime/web/index.html), driven in Debian's chromium through
Playwright: a typed prompt draws the PNG `sdruntime generate` writes for that seed, with a progress event per step;
the server's one-line errors and streamed previews show on the page.

Needs /usr/bin/chromium (`apt-get install -y chromium`; .ci/run installs it): Playwright drives that browser and
downloads none."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sdruntime.cli import main as sdruntime_main
from sdruntime.serving import error_body, sse_event

from tests.runtime.test_serve import Server, plain_server, request

CHROMIUM = "/usr/bin/chromium"
PROMPT = "a red circle on a blue background, center"
DATA_URL = "data:image/png;base64,"
# Every text the step counter takes, as it takes it: a drawing this small ends before a poll would see each step
RECORD_STEPS = """
window.stepsShown = [];
document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver((records) => {
    for (const record of records) for (const node of record.addedNodes) window.stepsShown.push(node.textContent);
  }).observe(document.getElementById("step"), { childList: true });
});
"""


@pytest.fixture(scope="module")
def web_server(tiny32, tmp_path_factory):
    yield from plain_server(tiny32, tmp_path_factory.mktemp("web") / "serve.log")


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install -y chromium (the page's tests need it)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, web_server: Server):
    context = browser.new_context()
    opened = context.new_page()
    opened.add_init_script(RECORD_STEPS)
    opened.goto(web_server.url + "/")
    expect(opened.get_by_role("button", name="Draw")).to_be_enabled()  # the model's facts came
    yield opened
    context.close()


def fill(page: Page, **fields: str) -> None:
    """Type into the inputs found by their labels (Prompt=..., Seed=...); Scheduler is chosen."""
    for label, value in fields.items():
        field = page.get_by_label(label.replace("_", " ").capitalize(), exact=True)
        if label == "scheduler":
            field.select_option(value)
        else:
            field.fill(value)


def shown_pngs(page: Page, count: int) -> list[tuple[bytes, str, str]]:
    """Each drawn image's PNG bytes (its download link's data), the link's file name and the caption's text, once
    `count` have come; the <img> shows that same PNG."""
    links = page.get_by_role("link", name="Download PNG")
    expect(links).to_have_count(count)
    shown = []
    for index, figure in enumerate(page.locator("#images figure").all()):
        href = links.nth(index).get_attribute("href")
        assert href.startswith(DATA_URL) and figure.get_by_role("img").get_attribute("src") == href
        caption = figure.locator("figcaption").inner_text()
        shown.append((base64.b64decode(href[len(DATA_URL) :]), links.nth(index).get_attribute("download"), caption))
    return shown


def test_the_page_draws_the_png_of_sdruntime_generate(page, tiny32, tmp_path):
    facts = json.loads(request(page.url + "v1/models")[2])["data"][0]
    assert page.get_by_label("Steps").input_value() == str(facts["default_steps"])  # the server's defaults
    assert page.get_by_label("Scheduler").input_value() == facts["default_scheduler"]
    fill(page, prompt=PROMPT, negative_prompt="blurry", steps="3", guidance="5", scheduler="euler-a", seed="42")
    fill(page, width="32", height="48", images="2")
    page.get_by_role("button", name="Draw").click()
    shown = shown_pngs(page, 2)
    assert page.evaluate("window.stepsShown") == ["Waiting for a replica…", "Step 1/3", "Step 2/3", "Step 3/3"]
    assert page.get_by_label("Progress").evaluate("p => [p.value, p.max]") == [3, 3]
    for seed, (png, filename, caption) in zip((42, 43), shown):
        out = tmp_path / f"cli-{seed}.png"
        options = ["--negative-prompt", "blurry", "--steps", "3", "--guidance", "5", "--scheduler", "euler-a"]
        options += ["--width", "32", "--height", "48", "--seed", str(seed), "-o", str(out)]
        assert sdruntime_main(["generate", str(tiny32), PROMPT, *options]) == 0
        drawn, local = Image.open(io.BytesIO(png)), Image.open(out)
        assert drawn.size == (32, 48) and np.array_equal(np.asarray(drawn), np.asarray(local))
        assert drawn.text["parameters"] == local.text["parameters"]
        assert filename == f"sdexport-{seed}.png" and caption.startswith(f"Seed {seed}")
        assert local.text["parameters"] in caption


def test_errors_show_as_the_server_line_and_a_seedless_draw_names_its_seed(page, web_server):
    status, headers, _ = request(web_server.url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    too_long = "a" * 4001
    _, _, refused = request(web_server.url + "/v1/images/generations", {"prompt": too_long, "stream": True})
    fill(page, prompt=too_long, steps="2", width="32", height="32")
    page.get_by_role("button", name="Draw").click()
    expect(page.get_by_role("alert")).to_have_text(json.loads(refused)["error"]["message"])
    expect(page.get_by_role("button", name="Draw")).to_be_enabled()
    fill(page, prompt=PROMPT)  # no seed: the server draws one, and the page names it
    page.get_by_role("button", name="Draw").click()
    [(png, filename, caption)] = shown_pngs(page, 1)
    seed = int(filename.removeprefix("sdexport-").removesuffix(".png"))
    assert f"Seed: {seed}," in Image.open(io.BytesIO(png)).text["parameters"] and caption.startswith(f"Seed {seed}")
    expect(page.get_by_role("alert")).to_have_text("")


def test_streamed_previews_show_and_an_error_event_ends_the_drawing(page):
    preview = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(preview, format="PNG")
    b64 = base64.b64encode(preview.getvalue()).decode("ascii")
    events = sse_event("progress", {"step": 1, "steps": 4, "previews": [b64]})
    events += sse_event("error", error_body("the replica drawing this request stopped: retry", 503))
    page.route("**/v1/images/generations", lambda route: route.fulfill(body=events, content_type="text/event-stream"))
    fill(page, prompt=PROMPT, width="32", height="32")
    page.get_by_role("button", name="Draw").click()
    expect(page.get_by_role("alert")).to_have_text("the replica drawing this request stopped: retry")
    expect(page.get_by_role("img", name="Preview 1")).to_have_attribute("src", DATA_URL + b64)
    assert page.evaluate("window.stepsShown").count("Step 1/4") == 1
    expect(page.get_by_role("link", name="Download PNG")).to_have_count(0)
    expect(page.get_by_role("button", name="Draw")).to_be_enabled()
