"""The one request validation, on the presets alone (no model): defaults, rounding, fitting, notes, seeds,
references and the errors that name their field."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from kleinbild.config import get_preset
from kleinbild.images import InputError
from kleinbild.request import MAX_SEED, validate

NANO, KLEIN = get_preset("nano"), get_preset("klein-4b")


def test_defaults_rounding_and_seeds():
    r = validate(KLEIN, "a fox", width=1000, height=770, seed=7, num_images=3)
    assert (r.width, r.height, r.steps, r.guidance) == (992, 768, 4, None)
    assert r.notes == ("size 1000x770 rounded down to 992x768 (a multiple of 16)",)
    assert r.seeds == (7, 8, 9) and r.batch_key() == (992, 768, 4, None, (), None, None)
    noise = r.initial_noise(128, 16)
    alone = validate(KLEIN, "a fox", width=992, height=768, seed=9).initial_noise(128, 16)
    assert torch.equal(noise[2:], alone)
    assert [(c.seed, c.num_images) for c in r.split(2)] == [(7, 2), (9, 1)]
    assert torch.equal(torch.cat([c.initial_noise(128, 16) for c in r.split(2)]), noise)
    base = validate(get_preset("klein-base-4b"), "a fox", width=64, height=64)
    assert (base.steps, base.guidance, base.negative_prompt) == (50, 4.0, "")
    assert 0 <= base.seed < 2**32


def test_a_default_size_is_fitted_and_an_explicit_one_refused():
    fitted = validate(KLEIN, "x", max_pixels=512 * 512)
    assert (fitted.width, fitted.height) == (512, 512) and "scaled to 512x512" in fitted.notes[0]
    with pytest.raises(InputError, match="megapixels") as e:
        validate(KLEIN, "x", width=1024, height=1024, max_pixels=512 * 512)
    assert e.value.param == "width"


def test_nano_knows_its_trained_size():
    assert validate(NANO, "a big red circle in the centre").notes == ()
    big = validate(NANO, "a big red circle in the centre", width=256, height=256)
    assert "trained at 128 px only" in big.notes[0] and "use 128x128" in big.notes[0]
    ref = validate(NANO, "x", [Image.new("RGB", (512, 512), "red")])
    assert ref.references[0].size == (128, 128) and (ref.width, ref.height) == (128, 128) and ref.notes == ()


def test_exif_orientation_is_applied_to_references():
    img = Image.new("RGB", (64, 128), "red")
    img.paste(Image.new("RGB", (64, 32), "blue"), (0, 0))  # blue on top as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    ref = validate(KLEIN, "x", [Image.open(io.BytesIO(buf.getvalue()))]).references[0]
    assert ref.size == (128, 64), "shown upright: landscape"
    r, g, b = ref.getpixel((120, 32))
    assert b > 200 and r < 60, "the stored top is on the right once turned"


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"prompt": 3}, "prompt"),
    ({"num_images": 0}, "num_images"),
    ({"steps": 1.5}, "steps"),
    ({"width": 32, "height": 64}, "width"),
    ({"width": "64"}, "width"),
    ({"seed": -1}, "seed"),
    ({"seed": MAX_SEED, "num_images": 2}, "seed"),
    ({"images": [Image.new("RGB", (40, 100))]}, "images"),
    ({"images": ["/no/such.png"]}, "images"),
    ({"noise": torch.zeros(1, 128, 4, 4)}, "noise"),
])
def test_bad_values_name_their_field(kwargs, param):
    args = {"prompt": "x", **kwargs}
    with pytest.raises(InputError) as e:
        validate(KLEIN, args.pop("prompt"), args.pop("images", None), **args)
    assert e.value.param == param and str(e.value)


def test_guidance_on_a_base_model_must_be_finite():
    with pytest.raises(InputError, match="finite") as e:
        validate(get_preset("klein-base-4b"), "x", guidance=float("nan"))
    assert e.value.param == "guidance"
    note = validate(KLEIN, "x", guidance=3.0, negative_prompt="blur").notes
    assert note == ("guidance 3.0 ignored: klein-4b is guidance-distilled", "negative prompt ignored: klein-4b runs "
                    "without CFG")
