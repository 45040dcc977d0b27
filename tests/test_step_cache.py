"""Step caching: exact at threshold 0, a real skip above it, and every bad value refused at validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kleinbild import sampling
from kleinbild.config import get_preset
from kleinbild.images import InputError
from kleinbild.request import validate
from kleinbild.step_cache import CacheSpec, StepCache, relative_change
from kleinbild.transformer import Flux2Transformer


@pytest.fixture(scope="module")
def nano_base():
    from kleinbild import KleinPipeline

    return KleinPipeline.from_pretrained("nano-base", device="cpu")


@pytest.mark.parametrize("mode", ["first-block", "teacache"])
def test_threshold_zero_is_bit_equal_to_no_cache(nano_base, mode):
    args = dict(prompt="a big red circle at the top left on a blue background", seed=3, steps=12)
    plain = nano_base.generate(**args)
    cached = nano_base.generate(**args, cache=mode, cache_threshold=0.0)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(cached.images[0]))
    assert cached.settings["step_cache"] == {"mode": mode, "threshold": 0.0, "computed_steps": 12, "reused_steps": 0}
    assert plain.settings["step_cache"] is None


@pytest.mark.parametrize("mode", ["first-block", "teacache"])
def test_a_threshold_reuses_steps_and_stays_close(nano_base, mode):
    args = dict(prompt="a small green square at the bottom right on a white background", seed=5, steps=30)
    plain = nano_base.generate(**args).images[0]
    result = nano_base.generate(**args, cache=mode, cache_threshold=0.3)
    s = result.settings["step_cache"]
    assert s["reused_steps"] > 0 and s["computed_steps"] + s["reused_steps"] == 30
    a = torch.from_numpy(np.asarray(plain, dtype=np.float32))
    b = torch.from_numpy(np.asarray(result.images[0], dtype=np.float32))
    assert not torch.equal(a, b)  # something was skipped
    psnr = 10 * math.log10(255**2 / float(((a - b) ** 2).mean()))
    assert psnr > 20, psnr


def _tiny_model():
    preset = get_preset("nano-base")
    torch.manual_seed(0)
    model = Flux2Transformer(preset.dit).float().eval()
    for p in model.parameters():  # random modulation and output layers (the defaults start some at zero)
        torch.nn.init.normal_(p, std=0.05)
    n, c, d = 64, preset.dit.in_channels, preset.dit.context_dim
    inputs = (torch.randn(2, n, c), sampling.image_ids(8, 8), torch.randn(2, 16, d), sampling.text_ids(16))
    return model, inputs


@pytest.mark.parametrize("mode", ["first-block", "teacache"])
def test_a_reused_step_adds_the_stored_residual(mode):
    model, (img, img_ids, txt, txt_ids) = _tiny_model()
    t = torch.full((2,), 0.7)
    cache = StepCache(CacheSpec(mode, 1e9))
    with torch.no_grad():
        full = model(img, img_ids, txt, txt_ids, t, step_cache=cache)
        again = model(img, img_ids, txt, txt_ids, t, step_cache=cache)  # same input: reused, same answer
        other = model(img + 0.5, img_ids, txt, txt_ids, t)
    assert (cache.computed, cache.reused) == (1, 1)
    torch.testing.assert_close(again, full, rtol=1e-5, atol=1e-5)
    assert relative_change(other, full) > 1e-3  # a changed input would have given another answer


def test_first_block_compares_with_the_last_computed_step():
    cache = StepCache(CacheSpec("first-block", 0.15))
    base = torch.ones(4)
    assert not cache.reuse(base)
    cache.store(torch.zeros(4))
    assert cache.reuse(base * 1.1)  # 0.1 from the computed probe
    assert not cache.reuse(base * 1.2)  # 0.2 from it, though only 0.09 from the step before
    tea = StepCache(CacheSpec("teacache", 0.15))
    assert not tea.reuse(base)
    tea.store(torch.zeros(4))
    assert tea.reuse(base * 1.1)  # 0.1 so far
    assert not tea.reuse(base * 1.2)  # 0.1 + 0.09: the sum passed the threshold, computed, sum reset
    assert tea.reuse(base * 1.3)


@pytest.mark.parametrize(
    ("kw", "param", "words"),
    [
        ({"cache": "fastest"}, "cache", "first-block, teacache"),
        ({"cache": "teacache", "cache_threshold": -0.1}, "cache_threshold", "-0.1"),
        ({"cache": "first-block", "cache_threshold": float("nan")}, "cache_threshold", "nan"),
        ({"cache": "first-block", "cache_threshold": "0.1"}, "cache_threshold", "'0.1'"),
        ({"cache_threshold": 0.1}, "cache_threshold", "needs a cache"),
    ],
)
def test_bad_cache_values_are_refused_by_name(kw, param, words):
    with pytest.raises(InputError) as e:
        validate(get_preset("nano-base"), "a red circle", **kw)
    assert e.value.param == param and words in str(e.value)


def test_a_mode_alone_takes_its_default_threshold_and_splits_batches():
    preset = get_preset("nano-base")
    req = validate(preset, "a red circle", cache="first-block", seed=1)
    assert req.cache == CacheSpec("first-block", 0.08)
    assert validate(preset, "a red circle", cache="none", seed=1).cache is None
    assert req.batch_key() != validate(preset, "a red circle", seed=1).batch_key()


def test_cli_passes_the_cache_flags(tmp_path, capsys):
    import json

    from kleinbild import cli

    out = tmp_path / "x.png"
    assert cli.main(["generate", "a red circle", "-m", "nano-base", "--steps", "3", "--cache", "teacache",
                     "--cache-threshold", "0", "-o", str(out), "--json"]) == 0
    settings = json.loads(capsys.readouterr().out)
    assert settings["step_cache"] == {"mode": "teacache", "threshold": 0.0, "computed_steps": 3, "reused_steps": 0}
    assert out.is_file()


def test_from_png_makes_a_cached_image_again(tmp_path):
    from kleinbild import cli

    first, again = tmp_path / "a.png", tmp_path / "b.png"
    assert cli.main(["generate", "a small red circle at the top left on a blue background", "-m", "nano-base",
                     "--steps", "12", "--seed", "4", "--cache", "teacache", "--cache-threshold", "0.3", "-o",
                     str(first), "-q"]) == 0
    assert cli.main(["generate", "--from", str(first), "-o", str(again), "-q"]) == 0
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
