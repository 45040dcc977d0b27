"""Masked editing through the OpenAI door, on a real uvicorn on loopback with the tiny random model: the `openai`
client's `images.edit(image=..., mask=...)`, OpenAI's transparent-means-edit rule, JSON masks, `/v1/jobs`,
strength, crop-and-stitch and outpainting, and every bad mask. Generations are 64x64 with 2 steps."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serving import assert_openai_error, image_of, live, max_diff, png_bytes, sse_events  # noqa: E402
from tiny import reference_pipeline  # noqa: E402

from kleinbild.pipeline import KleinPipeline  # noqa: E402

W = H = 64
EDIT = "/v1/images/edits"


@pytest.fixture(scope="module")
def pipe() -> KleinPipeline:
    return KleinPipeline.from_pretrained(reference_pipeline("distilled", deep_text=True)[1], device="cpu",
                                         dtype="float32")


@pytest.fixture(scope="module")
def server(pipe: KleinPipeline):
    with live(pipe, max_pixels=96 * 96, max_image_pixels=256 * 256, max_queue=16) as srv:
        yield srv


def source() -> bytes:
    return png_bytes(W, H, 4)


def box_mask(box: tuple[int, int, int, int], w: int = W, h: int = H) -> np.ndarray:
    """uint8 (h, w): 255 inside the box (x1, y1, x2, y2), 0 elsewhere."""
    m = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    return m


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def openai_mask(edit: np.ndarray) -> bytes:
    """OpenAI's form: an RGBA PNG, fully transparent where to edit, opaque (any colour) elsewhere."""
    rgba = np.zeros((*edit.shape, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255 - edit
    return png(rgba, "RGBA")


def rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_openai_client_edit_with_a_mask_keeps_the_rest(server, pipe):
    """The openai client unchanged: the transparent box is repainted, every other pixel comes back bit-identical
    (keep_unmasked is on by default here); the same request through the engine gives the same image."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    edit = box_mask((8, 8, 40, 40))
    res = client.images.edit(image=("a.png", source(), "image/png"), mask=("m.png", openai_mask(edit), "image/png"),
                             prompt="a blue square", extra_body={"steps": 2, "seed": 3})
    assert res.size == f"{W}x{H}"
    info = res.model_extra["kleinbild"]
    assert info["edit"] == {"strength": 1.0, "masked": True, "keep_unmasked": True}
    out, src = rgb(base64.b64decode(res.data[0].b64_json)), rgb(source())
    outside = edit == 0
    assert (out[outside] == src[outside]).all(), "outside the mask every pixel is the source's"
    assert np.abs(out[8:40, 8:40] - src[8:40, 8:40]).mean() > 8, "inside it was repainted"
    mask_l = Image.fromarray(edit)
    ref = pipe.generate("a blue square", images=[Image.open(io.BytesIO(source()))], mask=mask_l, steps=2, seed=3,
                        keep_unmasked=True)
    assert max_diff(ref.images[0], Image.fromarray(out.astype(np.uint8))) <= 1


def test_mask_forms_agree(server):
    """An RGBA mask (transparent = edit), an opaque white-on-black one, multipart or JSON (base64, data URI,
    image_url object) and /v1/jobs: one mask, one image."""
    edit = box_mask((0, 0, 32, 64))
    alpha, opaque = openai_mask(edit), png(np.stack([edit] * 3, -1))
    src = source()
    b64 = base64.b64encode(src).decode()
    fields = {"prompt": "green", "seed": 2, "steps": 2, "strength": 0.75}
    form = {k: str(v) for k, v in fields.items()}
    c = server.client
    answers = [
        c.post(EDIT, data=form, files=[("image", ("a.png", src, "image/png")), ("mask", ("m.png", m, "image/png"))])
        for m in (alpha, opaque)
    ] + [
        c.post(EDIT, json={**fields, "image": b64, "mask": base64.b64encode(opaque).decode()}),
        c.post(EDIT, json={**fields, "image": b64,
                           "mask": {"image_url": "data:image/png;base64," + base64.b64encode(alpha).decode()}}),
    ]
    for r in answers:
        assert r.status_code == 200, r.text
        assert r.json()["kleinbild"]["edit"]["strength"] == 0.75
    images = [image_of(r.json()["data"][0]) for r in answers]
    for im in images[1:]:
        assert max_diff(images[0], im) == 0
    job = c.post("/v1/jobs", json={**fields, "images": [b64], "mask": "data:image/png;base64,"
                                   + base64.b64encode(alpha).decode()})
    assert job.status_code == 202, job.text
    done = sse_events(c, job.json()["id"])[-1][2]
    assert done["status"] == "succeeded" and done["kind"] == "edit"
    assert max_diff(images[0], image_of(done["result"]["data"][0])) == 0


def test_strength_alone_is_image_to_image(server):
    """No mask: strength restyles the whole image, less the lower it is; keep_unmasked stays off."""
    src = rgb(source())
    dist = {}
    for s in (0.25, 1.0):
        r = server.client.post(EDIT, json={"prompt": "a sunset", "image": base64.b64encode(source()).decode(),
                                           "strength": s, "steps": 4, "seed": 1})
        assert r.status_code == 200, r.text
        assert r.json()["kleinbild"]["edit"] == {"strength": s, "masked": False, "keep_unmasked": False}
        dist[s] = np.abs(rgb(base64.b64decode(r.json()["data"][0]["b64_json"])) - src).mean()
    assert dist[0.25] < dist[1.0]


def test_crop_and_stitch_and_outpaint_sizes(server):
    """mask_crop edits a crop and pastes it back at the source's size; expand grows the canvas and keeps the source
    where it was placed."""
    big = png_bytes(96, 96, 5)
    mask = png(box_mask((60, 60, 76, 76), 96, 96))
    r = server.client.post(EDIT, data={"prompt": "a dot", "steps": "2", "seed": "1", "mask_crop": "8", "size": "64x64"},
                           files=[("image", ("a.png", big, "image/png")), ("mask", ("m.png", mask, "image/png"))])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["size"] == "96x96" and body["kleinbild"]["edit"]["mask_crop"] == 8
    x1, y1, x2, y2 = body["kleinbild"]["edit"]["crop_box"]
    assert x1 <= 52 and y1 <= 52 and x2 >= 84 and y2 >= 84, "the crop holds the mask and its padding"
    out, src = rgb(base64.b64decode(body["data"][0]["b64_json"])), rgb(big)
    assert out.shape == (96, 96, 3) and (out[:y1] == src[:y1]).all(), "outside the crop the source stays"

    r = server.client.post(EDIT, json={"prompt": "more sky", "image": base64.b64encode(source()).decode(),
                                       "expand": [16, 0, 16, 0], "steps": 2, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.json()["size"] == "96x64" and r.json()["kleinbild"]["edit"]["expand"] == [16, 0, 16, 0]
    out = rgb(base64.b64decode(r.json()["data"][0]["b64_json"]))
    # keep_unmasked: the source's middle (away from the feathered seam) is its own pixels.
    assert (out[:, 16 + 16 : 16 + 48] == rgb(source())[:, 16:48]).all()


def bad_cases() -> list[tuple[dict, int, str, str]]:
    src = base64.b64encode(source()).decode()
    half = base64.b64encode(png(box_mask((0, 0, 16, 32), 32, 32))).decode()
    black = base64.b64encode(png(np.zeros((H, W), np.uint8))).decode()
    fine = base64.b64encode(png(box_mask((0, 0, 32, 32)))).decode()
    return [
        ({"image": src, "mask": half}, 400, "mask", "32x32"),
        ({"image": src, "mask": black}, 400, "mask", "nothing to repaint"),
        ({"image": src, "mask": base64.b64encode(openai_mask(np.zeros((H, W), np.uint8))).decode()}, 400, "mask",
         "no transparent pixel"),
        ({"image": src, "mask": base64.b64encode(b"not a png").decode()}, 400, "mask", "not a readable image"),
        ({"image": src, "mask": "https://example.com/m.png"}, 400, "mask", "not fetched"),
        ({"image": src, "mask": 7}, 400, "mask", "base64"),
        ({"image": src, "mask": fine, "strength": 0}, 400, "strength", "(0, 1]"),
        ({"image": src, "mask": fine, "strength": 1.5}, 400, "strength", "between 0 and 1"),
        ({"image": src, "mask": fine, "mask_crop": -1}, 400, "mask_crop", "between"),
        ({"image": src, "expand": [1, 2]}, 400, "expand", "four"),
        ({"image": src, "expand": "0,0,0,0"}, 400, "expand", "all zero"),
        ({"image": src, "keep_unmasked": True}, 400, "keep_unmasked", "needs a mask"),
        ({"mask": fine}, 400, "image", "reference image"),
    ]


@pytest.mark.parametrize("case", range(len(bad_cases())))
def test_bad_masks_get_a_400_naming_them(server, case):
    body, status, param, words = bad_cases()[case]
    r = server.client.post(EDIT, json={"prompt": "a", "steps": 2, **body})
    err = assert_openai_error(r, status, param)
    assert words in err["message"], err


def test_mask_is_refused_where_it_cannot_apply(server):
    fine = base64.b64encode(png(box_mask((0, 0, 32, 32)))).decode()
    r = server.client.post("/v1/images/generations", json={"prompt": "a", "mask": fine})
    assert_openai_error(r, 400, "mask", "unexpected_mask")
    raw = png(box_mask((0, 0, 32, 32)))
    r = server.client.post(EDIT, data={"prompt": "a"}, files=[("image", ("a.png", source(), "image/png")),
                                                              ("mask", ("m.png", raw, "image/png")),
                                                              ("mask", ("n.png", raw, "image/png"))])
    assert_openai_error(r, 400, "mask", "duplicate_parameter")
    assert server.client.get("/health").status_code == 200, "the server keeps serving"
