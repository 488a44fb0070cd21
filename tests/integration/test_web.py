"""The web page in a real browser: upload, DiffSeg on the toy model, overlay, download, a readable error.

Needs Gradio and Playwright (``pip install 'attnseg[app,test]'``) and Debian's Chromium (``apt-get install -y
chromium``); Playwright's own browser download is not used. Skipped, saying what to install, when one is missing.
Set ATTNSEG_SCREENSHOT=PATH to keep the page's screenshot.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def _missing() -> str | None:
    if importlib.util.find_spec("gradio") is None:
        return "the web app needs Gradio: pip install 'attnseg[app]'"
    if importlib.util.find_spec("playwright") is None:
        return "the browser test needs Playwright: pip install playwright (or 'attnseg[test]')"
    if _chromium() is None:
        return "the browser test needs Chromium: apt-get install -y chromium"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from attnseg.models.loading import load_model
    from attnseg.web.app import launch

    port = _free_port()
    workdir = tmp_path_factory.mktemp("serve")
    demo = launch(load_model("toyworld"), "toyworld", port=port, block=False, workdir=workdir)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # loopback only
                if r.status == 200:
                    break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    yield url
    demo.close()


def test_upload_segment_download_in_a_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    rng = np.random.default_rng(0)
    arr = np.full((90, 150, 3), (230, 230, 220), np.uint8)  # 150 wide, 90 high: not square
    arr[20:70, 15:65] = (220, 40, 40)
    arr[30:60, 95:135] = (45, 85, 225)
    arr = np.clip(arr.astype(int) + rng.integers(-6, 6, arr.shape), 0, 255).astype(np.uint8)
    upload = tmp_path / "shapes.png"
    Image.fromarray(arr).save(upload)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(server)
            expect(page.get_by_text("only knows the toy world")).to_be_visible(timeout=20_000)
            page.locator("#input-image input[type=file]").set_input_files(str(upload))
            page.locator("#method").get_by_text("diffseg", exact=True).click()
            page.locator("#run").click()
            expect(page.locator("#status")).to_contain_text("diffseg:", timeout=45_000)
            expect(page.locator("#overlay img")).to_be_visible(timeout=10_000)
            expect(page.locator("#legend-chips")).to_contain_text("segment 0")

            with page.expect_download(timeout=15_000) as download:
                page.locator("#download-labels").click()
            saved = tmp_path / "labels.png"
            download.value.save_as(saved)
            labels = np.asarray(Image.open(saved))
            assert labels.shape == (90, 150)  # the uploaded image's size, not the model's
            shot = Path(os.environ.get("ATTNSEG_SCREENSHOT", tmp_path / "serve.png"))
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            # a bad input gives a readable message on the page, not a stack trace
            page.locator("#method").get_by_text("goca", exact=True).click()
            page.locator("#classes textarea, #classes input").first.fill("")
            page.locator("#run").click()
            expect(page.locator("#status")).to_contain_text("GoCA needs class names", timeout=15_000)
            # the page asks nothing of the internet (no fonts, analytics or CDN)
            outside = [u for u in requested if not u.startswith((server, "data:", "blob:"))]
            assert not outside, outside
        finally:
            browser.close()


def test_serve_says_what_is_missing_or_wrong():
    from typer.testing import CliRunner

    from attnseg.cli.app import app

    res = CliRunner().invoke(app, ["serve", "--port", "0"])
    assert res.exit_code == 2 and "--port must be in 1..65535" in res.output
