"""Masked editing with the bundled nano model: through the `openai` client a mask over one object changes that
object and nothing else, and on the eval's masked task the analyser finds the edit done at a measured rate."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from kleinbild.config import get_preset
from kleinbild.loading import bundled_dir

NANO = get_preset("nano")
pytestmark = pytest.mark.skipif(not (bundled_dir(NANO) / NANO.dit_file).is_file(),
                                reason="bundled nano weights not built (kleinbild train all)")


@pytest.fixture(scope="module")
def nano():
    from kleinbild.pipeline import KleinPipeline

    return KleinPipeline.from_pretrained("nano", device="cpu")


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_openai_client_recolours_the_masked_object_only(nano):
    """A red square and a blue circle; the mask (transparent, OpenAI's way) covers the square; "make the red square
    green": the analyser finds a green square where the red one was, the circle as it was, and every pixel
    outside the mask within 1 level of the source."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from serving import live

    from kleinbild.nano import shapes
    from kleinbild.nano.analyze import analyze, matches

    square, circle = shapes.Obj("square", "red", "big", "top left"), shapes.Obj("circle", "blue", "big", "bottom right")
    source = shapes.render(shapes.Scene("white", (square, circle)), 128)
    mask = np.full((128, 128, 4), 255, np.uint8)
    x1, y1, x2, y2 = (int(v) for v in shapes.object_box(square, 128))
    mask[max(0, y1 - 6) : y2 + 6, max(0, x1 - 6) : x2 + 6, 3] = 0  # fully transparent: edit here
    with live(nano) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        res = client.images.edit(image=("scene.png", png(source), "image/png"),
                                 mask=("mask.png", png(Image.fromarray(mask, "RGBA")), "image/png"),
                                 prompt="make the red square green", extra_body={"seed": 1})
    out = Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))).convert("RGB")
    assert out.size == (128, 128) and res.model_extra["kleinbild"]["edit"]["keep_unmasked"]
    target = shapes.Scene("white", (shapes.Obj("square", "green", "big", "top left"), circle))
    verdict = matches(analyze(out), target)
    assert verdict["all"], (verdict, analyze(out))
    keep = mask[..., 3] == 255
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(source, np.int16)).max(axis=-1)
    assert diff[keep].max() <= 1, "outside the mask the source stays"
    assert diff[~keep].max() > 100, "inside it the square was repainted"


def test_masked_edits_take_effect_at_the_measured_rate(nano):
    """The eval's masked task (recolour, move, add and remove, a mask over what changes): the analyser reads the
    whole scene back; the same examples without a mask score lower and move pixels outside the mask."""
    from kleinbild.nano.analyze import analyze, matches
    from kleinbild.nano.evaluate import edit_mask, evaluate, masked_examples
    from kleinbild.nano.shapes import render

    report = evaluate(nano, ["masked"], n=40, seed=1000).results["masked"]
    assert all(s.verdict["unmasked_kept"] for s in report.samples), "keep_unmasked: the rest to 1 level"
    # Measured 0.725 here (0.86 at n=100, 0.74 at n=100 with seed 0, 0.81 on 300 with seed 500); 3 images of 40 below.
    assert report.score >= 0.65
    plain, moved = 0, 0
    for i, ex in enumerate(masked_examples(40, 1000)):
        src = render(ex.sources[0], 128)
        img = nano.generate(ex.prompt, [src], seed=1000 + i).images[0]
        plain += matches(analyze(img), ex.target)["all"]
        keep = np.asarray(edit_mask(ex, 128)) == 0
        moved += np.abs(np.asarray(img, np.int16) - np.asarray(src, np.int16)).max(axis=-1)[keep].max() > 1
    assert report.score >= plain / 40, "the mask does not make edits worse"
    assert moved > 20, "without the mask, pixels outside it change"
