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


def _drag(page, box, size, points, steps=6):
    """Mouse strokes over the mask canvas, `points` in the image's pixels (the canvas is shown scaled)."""
    sx, sy = box["width"] / size[0], box["height"] / size[1]
    page.mouse.move(box["x"] + points[0][0] * sx, box["y"] + points[0][1] * sy)
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x * sx, box["y"] + y * sy, steps=steps)
    page.mouse.up()


def test_masked_edit_keeps_the_unmasked_half(tmp_path):
    """Paint the left half of the first reference (plus a dab that the eraser takes off again), run the edit: the
    request carries a PNG mask of the image's size, transparent where painted, and the right half comes back
    unchanged. Clear sends no mask at all."""
    folder = reference_pipeline("distilled", deep_text=True)[1]
    pipe = KleinPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    w, h = 96, 64
    source = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(source).save(buf, format="PNG")
    jobs = lambda r: r.method == "POST" and r.url.endswith("/v1/jobs")  # noqa: E731
    with live(pipe, max_pixels=96 * 96) as srv, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 400, "height": 900})  # a phone-sized window
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.goto(srv.url + "/")
            sync_api.expect(page.locator("#health")).to_have_class("ready")
            sync_api.expect(page.locator("#maskbox")).to_be_hidden()
            page.fill("#prompt", "repaint the left side")
            page.fill("#steps", "2")
            page.fill("#seed", "5")
            page.fill("#size", f"{w}x{h}")
            dt = page.evaluate_handle(DROP_FILE, [base64.b64encode(buf.getvalue()).decode(), "source.png"])
            page.dispatch_event("#drop", "drop", {"dataTransfer": dt})
            sync_api.expect(page.locator("#maskbox")).to_be_visible()
            mask = page.locator("#mask")
            sync_api.expect(mask).to_have_js_property("width", w)  # the image's natural size, not the shown one
            sync_api.expect(mask).to_have_js_property("height", h)
            box = mask.bounding_box()
            assert box == page.locator("#maskimg").bounding_box(), "the mask lies exactly over the image"
            assert box["x"] >= 0 and box["x"] + box["width"] <= 400 and box["width"] > 2 * w
            assert abs(box["width"] / box["height"] - w / h) < 0.02

            # A stroke, then Clear: a plain edit, neither mask nor strength sent.
            _drag(page, box, (w, h), [(20, 20), (70, 40)])
            page.click("#maskclear")
            with page.expect_request(jobs) as req:
                page.click("#generate")
            body = req.value.post_data_json
            assert "mask" not in body and "strength" not in body and "keep_unmasked" not in body
            assert len(body["images"]) == 1
            sync_api.expect(page.locator(".card img.result")).to_have_count(1, timeout=60_000)
            sync_api.expect(page.locator(".card .meta").first).to_contain_text("edit · 1 ref")
            sync_api.expect(page.locator(".card .meta").first).not_to_contain_text("masked")

            # The left half with a big brush (24 px: strokes end at x = 36, so paint reaches x = 48 at most) ...
            page.fill("#brush", "25")
            sync_api.expect(page.locator("#brushval")).to_have_text("25%")
            for y in range(2, h + 1, 12):
                _drag(page, box, (w, h), [(1, y), (36, y)])
            # ... and a dab on the right that the eraser takes off again.
            page.fill("#brush", "8")
            _drag(page, box, (w, h), [(76, 30), (80, 34)])
            page.click("#eraser")
            sync_api.expect(page.locator("#eraser")).to_have_attribute("aria-pressed", "true")
            page.fill("#brush", "40")
            _drag(page, box, (w, h), [(78, 32), (78, 33)])
            page.click("#eraser")
            sync_api.expect(page.locator("#eraser")).to_have_attribute("aria-pressed", "false")
            page.fill("#strength", "0.5")
            sync_api.expect(page.locator("#strengthval")).to_have_text("0.50")
            page.screenshot(path=str(tmp_path / "masked.png"), full_page=True)
            with page.expect_request(jobs) as req:
                page.click("#generate")
            body = req.value.post_data_json
            assert body["strength"] == 0.5 and "size" not in body and "keep_unmasked" not in body
            assert body["mask"].startswith("data:image/png;base64,")
            m = Image.open(io.BytesIO(base64.b64decode(body["mask"].split(",", 1)[1])))
            assert m.size == (w, h)
            alpha = np.asarray(m.convert("RGBA"))[..., 3]
            # OpenAI's form: transparent = edit; the left half, and the dab erased again.
            assert (alpha[:, :40] == 0).all() and (alpha[:, 50:] == 255).all()

            sync_api.expect(page.locator("#error")).to_have_text("")
            sync_api.expect(page.locator(".card img.result")).to_have_count(2, timeout=60_000)
            sync_api.expect(page.locator("#status")).to_contain_text("done")
            sync_api.expect(page.locator(".card .meta").first).to_contain_text("masked edit · 1 ref")
            result = page.locator(".card img.result").first
            sync_api.expect(result).to_have_js_property("naturalWidth", w)
            png = page.request.get(srv.url + result.get_attribute("src").removeprefix(srv.url)).body()
            out = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            assert out.shape == source.shape
            assert (out[:, 52:] == source[:, 52:]).all(), "keep_unmasked: the right half comes back unchanged"
            assert np.abs(out[:, :40].astype(int) - source[:, :40]).mean() > 8, "the left half was repainted"
            page.screenshot(path=str(tmp_path / "masked-result.png"), full_page=True)
        finally:
            browser.close()
        assert not problems, problems
