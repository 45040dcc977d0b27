"""The web playground in a real browser (Debian's chromium, headless, driven by playwright): generate, see the
image, send it back as a reference (and drop a file), run an edit."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from test_server import live  # noqa: E402
from tiny import reference_pipeline  # noqa: E402

from kleinbild.pipeline import KleinPipeline  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")

DROP_FILE = """([b64, name]) => {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, { type: "image/png" }));
  return dt;
}"""


def test_generate_then_edit_from_the_gallery(tmp_path):
    folder = reference_pipeline("distilled", deep_text=True)[1]
    pipe = KleinPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    with live(pipe, max_pixels=96 * 96) as srv, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            # The page's Content-Security-Policy stays on (it forbids eval): no wait_for_function here.
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.goto(srv.url + "/")
            sync_api.expect(page.locator("#health")).to_have_class("ready")
            sync_api.expect(page.locator("#steps")).to_have_value("4")  # the model's default arrived
            # Idle: the preview is a real (blank) image, not a broken one; the placeholder is a prompt nano draws.
            sync_api.expect(page.locator("#preview")).to_have_js_property("naturalWidth", 1)
            assert "at the top left on a blue background" in page.get_attribute("#prompt", "placeholder")
            page.screenshot(path=str(tmp_path / "idle.png"), full_page=True)

            page.fill("#prompt", "a small red circle at the top left on a blue background")
            page.fill("#size", "64x64")
            page.fill("#steps", "2")
            page.fill("#seed", "7")
            page.select_option("#n", "2")
            page.click("#generate")
            first = page.locator(".card img.result").first
            sync_api.expect(first).to_be_visible()
            sync_api.expect(first).to_have_js_property("naturalWidth", 64)
            sync_api.expect(page.locator("#status")).to_contain_text("done")
            sync_api.expect(page.locator("#bar")).to_have_attribute("style", re.compile(r"width: 100%"))
            assert page.get_attribute("#preview", "src").startswith("data:image/jpeg;base64,")
            # One job's images in seed order, and every button readable in full.
            sync_api.expect(page.locator(".card .meta").nth(0)).to_contain_text("seed 7")
            sync_api.expect(page.locator(".card .meta").nth(1)).to_contain_text("seed 8")
            for i in range(page.locator(".card .btns > *").count()):
                btn = page.locator(".card .btns > *").nth(i)
                clipped = btn.evaluate("e => e.scrollWidth > e.clientWidth || e.getBoundingClientRect().right > "
                                       "e.closest('.card').getBoundingClientRect().right")
                assert not clipped, f"button {btn.inner_text()!r} is clipped"
            page.screenshot(path=str(tmp_path / "result.png"), full_page=True)
            page.select_option("#n", "1")

            # Back as a reference, plus a dropped file that is then removed again.
            page.click(".card .use")
            sync_api.expect(page.locator("#drop .ref img")).to_have_count(1)
            dt = page.evaluate_handle(DROP_FILE, [base64.b64encode(buf.getvalue()).decode(), "dropped.png"])
            page.dispatch_event("#drop", "drop", {"dataTransfer": dt})
            sync_api.expect(page.locator("#drop .ref img")).to_have_count(2)
            page.locator("#drop .ref button.remove").nth(1).click()
            sync_api.expect(page.locator("#refcount")).to_have_text("1")

            page.fill("#prompt", "make the circle green")
            page.click("#generate")
            sync_api.expect(page.locator(".card img.result")).to_have_count(3)
            sync_api.expect(page.locator(".card img.result").first).to_have_js_property("naturalWidth", 64)
            sync_api.expect(page.locator(".card .meta").first).to_contain_text("edit · 1 ref")
            shot = os.environ.get("KLEINBILD_SCREENSHOT") or str(tmp_path / "playground.png")
            page.screenshot(path=shot, full_page=True)
        finally:
            browser.close()
        edits = [j for j in srv.app.state.worker.jobs.values() if j.delivery.kind == "edit"]
        assert len(edits) == 1 and edits[0].state == "succeeded" and edits[0].reference_sizes == ((64, 64),)
        assert edits[0].request.prompt == "make the circle green"
        assert not problems, problems
