"""Masked editing against diffusers' Flux2KleinInpaintPipeline (same seed, float32, tiny random pipelines), and the
geometry of crop-and-stitch, outpainting and image-to-image."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from test_pipeline import ours, pixels_close, random_image  # noqa: E402
from tiny import MAX_TEXT, TEXT_LAYERS, reference_pipeline  # noqa: E402

from kleinbild import masking  # noqa: E402
from kleinbild.images import InputError  # noqa: E402


def inpaint_reference(kind: str):
    from diffusers import Flux2KleinInpaintPipeline

    ref, _ = reference_pipeline(kind)
    pipe = Flux2KleinInpaintPipeline(**ref.components, is_distilled=kind == "distilled")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ref_inpaint(kind: str, seed: int, **kw) -> list[Image.Image]:
    pipe = inpaint_reference(kind)
    return pipe(text_encoder_out_layers=TEXT_LAYERS, max_sequence_length=MAX_TEXT,
                generator=torch.Generator().manual_seed(seed), **kw).images


def box_mask(w: int, h: int, box: tuple[int, int, int, int]) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    m.paste(255, box)
    return m


def test_base_model_with_cfg_and_strength_matches_diffusers():
    pipe = ours("base")
    src, mask = random_image(80, 64, 1), box_mask(80, 64, (8, 8, 56, 48))
    got = pipe.generate("a red ball", [src], mask=mask, strength=0.8, steps=10, guidance=3.5, seed=5)
    expect = ref_inpaint("base", 5, prompt="a red ball", image=src, mask_image=mask, strength=0.8,
                         num_inference_steps=10, guidance_scale=3.5)
    assert got.images[0].size == (80, 64)
    assert pixels_close(got.images, expect) <= 1
    assert got.settings["strength"] == 0.8 and got.settings["masked"]
    full = pipe.generate("a red ball", [src], mask=mask, steps=10, guidance=3.5, seed=5)
    assert pixels_close(got.images, full.images) > 3, "strength must change the result"


def test_distilled_model_at_strength_one_matches_diffusers():
    pipe = ours("distilled")
    src, mask = random_image(64, 64, 2), box_mask(64, 64, (0, 0, 32, 64))
    got = pipe.generate("a green cube", [src], mask=mask, strength=1.0, steps=4, seed=9)
    expect = ref_inpaint("distilled", 9, prompt="a green cube", image=src, mask_image=mask, strength=1.0,
                         num_inference_steps=4)
    assert pixels_close(got.images, expect) <= 1
    plain = pipe.generate("a green cube", [src], steps=4, seed=9)
    assert pixels_close(got.images, plain.images) > 3, "the mask must change the result"


def test_extra_reference_matches_diffusers():
    pipe = ours("distilled")
    src, extra = random_image(64, 80, 3), random_image(64, 64, 4)
    mask = box_mask(64, 80, (16, 16, 48, 64))
    got = pipe.generate("put the ball here", [src, extra], mask=mask, steps=4, seed=2)
    expect = ref_inpaint("distilled", 2, prompt="put the ball here", image=src, image_reference=extra,
                         mask_image=mask, strength=1.0, num_inference_steps=4)
    assert got.settings["references"] == [[64, 80], [64, 64]]
    assert pixels_close(got.images, expect) <= 1
    alone = pipe.generate("put the ball here", [src], mask=mask, steps=4, seed=2)
    assert pixels_close(got.images, alone.images) > 3, "the extra reference must change the result"


def test_mask_crop_matches_diffusers_and_stitches_into_the_source():
    pipe = ours("distilled")
    src, mask = random_image(128, 96, 5), box_mask(128, 96, (80, 8, 112, 40))
    got = pipe.generate("a blue star", [src], mask=mask, mask_crop=8, steps=4, seed=4)
    ref = inpaint_reference("distilled")
    # diffusers pastes the crop back through Flux2ImageProcessor's _resize_and_crop, which centre-crops without
    # scaling (a bug when the crop is smaller than the output); compare with the scaling paste-back it intends.
    from diffusers.image_processor import VaeImageProcessor

    ref.image_processor._resize_and_crop = types.MethodType(VaeImageProcessor._resize_and_crop, ref.image_processor)
    expect = ref(prompt="a blue star", image=src, mask_image=mask, padding_mask_crop=8, strength=1.0,
                 num_inference_steps=4, text_encoder_out_layers=TEXT_LAYERS, max_sequence_length=MAX_TEXT,
                 generator=torch.Generator().manual_seed(4)).images
    x1, y1, x2, y2 = got.settings["crop_box"]
    assert (x1, y1, x2, y2) == masking.crop_region(mask, 128, 96, 8) == ref.mask_processor.get_crop_region(
        mask, 128, 96, pad=8)
    assert got.images[0].size == (128, 96)
    assert pixels_close(got.images, expect) <= 1
    out, s = np.asarray(got.images[0], dtype=np.int16), np.asarray(src, dtype=np.int16)
    keep = np.asarray(mask) == 0
    assert (out[keep] == s[keep]).all(), "outside the mask the source comes back as it was"
    assert np.abs(out[~keep] - s[~keep]).mean() > 3


def test_kv_model_masked_edit_equals_the_uncached_computation(monkeypatch):
    pipe = ours("kv")
    src, extra, mask = random_image(64, 64, 6), random_image(64, 64, 7), box_mask(64, 64, (0, 16, 64, 48))
    cached = pipe.generate("paint it", [src, extra], mask=mask, strength=0.9, steps=6, seed=3)
    first = {}
    extract = pipe.transformer.extract_kv

    def spy(*args):
        first["refs"] = args[5:]
        return extract(*args)

    monkeypatch.setattr(pipe.transformer, "extract_kv", spy)
    # Every later step recomputes the references with the image instead of reading their cached K/V.
    pipe._compiled["transformer"] = lambda x, ii, txt, ti, t, kv_cache: extract(x, ii, txt, ti, t, *first["refs"])[0]
    try:
        uncached = pipe.generate("paint it", [src, extra], mask=mask, strength=0.9, steps=6, seed=3)
    finally:
        pipe.uncompile()
    assert pixels_close(cached.images, uncached.images) <= 1


def test_image_to_image_strength_keeps_the_composition():
    pipe = ours("distilled")
    src = random_image(64, 64, 8)
    plain = pipe.generate("restyle", [src], steps=8, seed=1)
    full = pipe.generate("restyle", [src], strength=1.0, steps=8, seed=1)
    assert np.array_equal(np.asarray(full.images[0]), np.asarray(plain.images[0])), "strength 1 is a plain edit"
    target = pipe.encode_images([src])[0].float()
    ends = {}

    def keep(strength):
        return lambda step, total, x: ends.__setitem__(strength, x.clone()) if step == total else None

    for s in (1.0, 0.6, 0.2):
        got = pipe.generate("restyle", [src], strength=s, steps=10, seed=1, callback=keep(s))
        assert got.settings["strength"] == s and not got.settings["masked"]
    far = {s: float((x - target).pow(2).mean()) for s, x in ends.items()}
    assert far[0.2] < far[0.6] < far[1.0], f"lower strength ends nearer the source's latent: {far}"


def test_keep_unmasked_returns_the_source_bit_identical_outside_the_mask():
    pipe = ours("distilled")
    src, mask = random_image(64, 64, 9), box_mask(64, 64, (0, 0, 64, 32))
    got = pipe.generate("a sky", [src], mask=mask, keep_unmasked=True, steps=4, seed=1)
    out, s = np.asarray(got.images[0], dtype=np.int16), np.asarray(src, dtype=np.int16)
    assert (out[32:] == s[32:]).all()
    assert np.abs(out[:32] - s[:32]).mean() > 3
    raw = pipe.generate("a sky", [src], mask=mask, steps=4, seed=1)
    assert not np.array_equal(np.asarray(raw.images[0])[32:], s[32:]), "off by default: the decoder's own pixels"


def test_outpainting_grows_the_canvas_and_places_the_source():
    pipe = ours("distilled")
    src = random_image(64, 64, 10)
    got = pipe.generate("more sky", [src], expand=(32, 16, 0, 16), keep_unmasked=True, steps=4, seed=2)
    assert got.images[0].size == (96, 96)
    assert got.settings["expand"] == [32, 16, 0, 16]
    out, s = np.asarray(got.images[0], dtype=np.int16), np.asarray(src, dtype=np.int16)
    f = masking.OUTPAINT_FEATHER
    # Past the feathered seam the source is exactly where expand put it (left 32, top 16).
    assert (out[16 + f : 80 - f, 32 + f : 96] == s[f : 64 - f, f:]).all()
    assert np.abs(out[:, :32] - out[:, :32].mean(axis=(0, 1))).std() > 0
    canvas, cmask = masking.outpaint(src, None, (32, 16, 0, 16))
    m = np.asarray(cmask)
    assert canvas.size == (96, 96) and (m[:, :32] == 255).all() and (m[16 + f : 80 - f, 32 + f :] == 0).all()
    assert 0 < m[40, 32 + f // 4] < 255 and m[40, 32] > m[40, 33] > m[40, 32 + f - 1], "the mask fades into the source"
    assert (m[16 + f : 80 - f, 32 + f :] == 0).all() and m[40, 95] == 0, "no seam on the side not grown"


def test_fit_fill_and_crop_region_follow_the_reference_rules():
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=16)
    img = random_image(50, 30, 11)
    for w, h in ((64, 64), (96, 32), (40, 80)):
        assert np.array_equal(np.asarray(masking.fit_fill(img, w, h)), np.asarray(proc._resize_and_fill(img, w, h)))
        assert np.array_equal(np.asarray(masking.cover_crop(img, w, h)), np.asarray(proc._resize_and_crop(img, w, h)))
    cases = (((3, 40, 9, 47), 4, (64, 48)), ((0, 0, 10, 90), 0, (128, 64)), ((90, 5, 100, 9), 12, (32, 96)))
    for box, pad, size in cases:
        mask = box_mask(100, 100, box)
        assert masking.crop_region(mask, *size, pad) == proc.get_crop_region(mask, *size, pad=pad)


def test_masks_from_arrays_files_and_alpha(tmp_path):
    arr = np.zeros((32, 48), np.float32)
    arr[:, :24] = 1.0
    assert np.asarray(masking.read_mask(arr))[:, :24].min() == 255
    assert np.array_equal(np.asarray(masking.read_mask(torch.from_numpy(arr))), np.asarray(masking.read_mask(arr)))
    assert np.asarray(masking.read_mask(arr > 0.5)).max() == 255
    path = tmp_path / "m.png"
    masking.read_mask(arr).save(path)
    assert np.array_equal(np.asarray(masking.read_mask(path)), np.asarray(masking.read_mask(arr)))
    rgba = np.zeros((32, 48, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:, 24:, 3] = 0  # OpenAI: transparent = edit
    assert (np.asarray(masking.alpha_mask(Image.fromarray(rgba)))[:, 24:] == 255).all()
    grey = np.asarray(masking.read_mask(arr))
    # Without alpha, luminance: white = edit. With alpha but nothing transparent: nothing to edit (not luminance).
    assert np.array_equal(np.asarray(masking.alpha_mask(Image.fromarray(np.dstack([grey] * 3)))), grey)
    opaque = Image.fromarray(np.dstack([grey] * 3 + [np.full((32, 48), 255, np.uint8)]))
    assert not np.asarray(masking.alpha_mask(opaque)).any()
    for bad in (np.full((32, 48), 2.0), np.full((32, 48), np.nan), np.zeros((2, 32, 48)), "nope.png", 5):
        with pytest.raises(InputError) as e:
            masking.read_mask(bad)
        assert e.value.param == "mask" or "does not exist" in str(e.value)


@pytest.mark.parametrize("kw, words", [
    (dict(mask=np.zeros((64, 64))), "nothing to repaint"),
    (dict(mask=np.ones((32, 32))), "32x32 but the image it edits is 64x64"),
    (dict(strength=0.0), "(0, 1]"),
    (dict(strength=1.5), "(0, 1]"),
    (dict(strength="0.5"), "(0, 1]"),
    (dict(mask_crop=8), "mask_crop needs a mask"),
    (dict(keep_unmasked=True), "keep_unmasked needs a mask"),
    (dict(expand=(1, 2, 3)), "four pixel counts"),
    (dict(expand=(0, 0, 0, 0)), "all zero"),
    (dict(mask=np.pad(np.ones((2, 2)), 31)), "too small to reach"),
])
def test_bad_edits_are_clear_errors(kw, words):
    pipe = ours("distilled")
    with pytest.raises(InputError) as e:
        pipe.generate("x", [random_image(64, 64, 1)], seed=1, **kw)
    assert words in str(e.value)


def test_a_mask_needs_the_image_it_edits():
    pipe = ours("distilled")
    with pytest.raises(InputError, match="needs the image it edits") as e:
        pipe.generate("x", mask=np.ones((64, 64)), width=64, height=64)
    assert e.value.param == "mask"
