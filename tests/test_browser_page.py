"""The upload page in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import shutil

import pytest

from .conftest import REPO
from .service_helpers import Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page_server(demo_model, tmp_path_factory):
    graphs = tmp_path_factory.mktemp("page_graphs")
    shutil.copy(demo_model.graph, graphs / "shapes.pb")
    server = Server(graphs, REPO / "sample_images")
    yield server
    server.close()


@pytest.fixture()
def page(page_server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(page_server.url + "/")
            yield page
        finally:
            browser.close()


def test_upload_shows_top_results_as_bars(page, tmp_path):
    assert page.title() == "imageclf"
    page.set_input_files("#file", str(REPO / "sample_images" / "triangle" / "triangle_007.jpg"))
    page.wait_for_selector("#results .row")
    rows = page.locator("#results .row")
    assert rows.count() == 3
    assert rows.nth(0).locator(".label").inner_text() == "triangle"
    widths = [rows.nth(i).locator(".bar").bounding_box()["width"] for i in range(3)]
    assert widths[0] > 100 and widths[0] > widths[1] >= widths[2]
    assert "shapes (version" in page.locator("#meta").inner_text()
    page.screenshot(path=str(tmp_path / "page.png"))


def test_dropping_a_picture_works_too(page):
    data = (REPO / "sample_images" / "circle" / "circle_002.jpg").read_bytes()
    page.evaluate("""async (bytes) => {
        const file = new File([new Uint8Array(bytes)], "dropped.jpg", { type: "image/jpeg" });
        const transfer = new DataTransfer();
        transfer.items.add(file);
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer }));
    }""", list(data))
    page.wait_for_selector("#results .row")
    assert page.locator("#results .row .label").first.inner_text() == "circle"


def test_a_non_image_shows_the_error(page, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    page.set_input_files("#file", str(text))
    # expect() polls without eval: the page's CSP (no 'unsafe-eval') refuses wait_for_function's polling.
    playwright.expect(page.locator("#error")).to_contain_text("not an image")
