"""Whole generate() runs against diffusers' Flux2KleinPipeline / Flux2KleinKVPipeline, same noise, float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from tiny import MAX_TEXT, TEXT_LAYERS, reference_pipeline  # noqa: E402

from kleinbild.pipeline import KleinPipeline  # noqa: E402
from kleinbild.sampling import make_noise  # noqa: E402


def ours(kind: str) -> KleinPipeline:
    _, folder = reference_pipeline(kind)
    return KleinPipeline.from_pretrained(
        folder, device="cpu", dtype="float32", text_layers=TEXT_LAYERS, max_text_length=MAX_TEXT
    )


def ref_call(kind: str, **kw) -> list[Image.Image]:
    pipe, _ = reference_pipeline(kind)
    return pipe(text_encoder_out_layers=TEXT_LAYERS, max_sequence_length=MAX_TEXT, **kw).images


def pixels_close(a: list[Image.Image], b: list[Image.Image]) -> int:
    """Largest per-pixel difference, in 1/255 steps; asserts the images are not flat."""
    assert len(a) == len(b)
    worst = 0
    for x, y in zip(a, b, strict=True):
        ax, ay = np.asarray(x, dtype=np.int16), np.asarray(y, dtype=np.int16)
        assert ax.shape == ay.shape
        assert ax.std() > 5, "image is flat: the comparison would prove nothing"
        worst = max(worst, int(np.abs(ax - ay).max()))
    return worst


def random_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


def test_text_to_image_matches_diffusers():
    pipe = ours("distilled")
    noise = make_noise(2, 32, 24, 16, seed=7)
    got = pipe.generate("a red circle on a blue background", width=64, height=96, steps=4, num_images=2, noise=noise)
    expect = ref_call("distilled", prompt="a red circle on a blue background", height=96, width=64,
                      num_inference_steps=4, num_images_per_prompt=2, latents=noise)
    assert got.images[0].size == (64, 96)
    assert pixels_close(got.images, expect) <= 1
    assert got.settings["steps"] == 4 and got.settings["guidance"] is None


def test_two_reference_edit_matches_diffusers():
    pipe = ours("distilled")
    refs = [random_image(80, 64, 1), random_image(66, 75, 2)]  # the second is cropped to 64x72
    noise = make_noise(1, 32, 16, 20, seed=3)
    got = pipe.generate("put the cat on the hill", refs, steps=4, noise=noise)
    expect = ref_call("distilled", image=refs, prompt="put the cat on the hill", num_inference_steps=4, latents=noise)
    assert got.images[0].size == (80, 64), "output takes the first reference's size"
    assert got.settings["references"] == [[80, 64], [64, 72]]
    assert pixels_close(got.images, expect) <= 1
    plain = pipe.generate("put the cat on the hill", steps=4, noise=noise, width=80, height=64)
    assert pixels_close(got.images, plain.images) > 3, "references must change the result"


def test_base_model_cfg_matches_diffusers():
    pipe = ours("base")
    assert pipe.preset.uses_cfg
    noise = make_noise(1, 32, 16, 16, seed=11)
    got = pipe.generate("a green square", width=64, height=64, steps=5, guidance=3.5, noise=noise)
    expect = ref_call("base", prompt="a green square", height=64, width=64, num_inference_steps=5,
                      guidance_scale=3.5, latents=noise)
    assert pixels_close(got.images, expect) <= 1
    assert got.settings["guidance"] == 3.5 and got.settings["negative_prompt"] == ""


def test_base_model_negative_prompt_matches_diffusers():
    pipe = ours("base")
    ref, _ = reference_pipeline("base")
    noise = make_noise(1, 32, 16, 16, seed=12)
    got = pipe.generate("a green square", width=64, height=64, steps=3, negative_prompt="blurry", noise=noise)
    neg, _ = ref.encode_prompt("blurry", device="cpu", max_sequence_length=MAX_TEXT,
                               text_encoder_out_layers=TEXT_LAYERS)
    expect = ref_call("base", prompt="a green square", height=64, width=64, num_inference_steps=3,
                      guidance_scale=4.0, latents=noise, negative_prompt_embeds=neg)
    assert pixels_close(got.images, expect) <= 1
    default = pipe.generate("a green square", width=64, height=64, steps=3, noise=noise)
    assert pixels_close(got.images, default.images) > 3


def test_kv_model_matches_diffusers():
    pipe = ours("kv")
    assert pipe.preset.kv_cache_refs and not pipe.preset.uses_cfg
    refs = [random_image(64, 80, 5), random_image(72, 64, 6)]
    noise = make_noise(1, 32, 16, 16, seed=5)
    got = pipe.generate("swap the colours", refs, width=64, height=64, steps=4, noise=noise)
    expect = ref_call("kv", image=refs, prompt="swap the colours", height=64, width=64, num_inference_steps=4,
                      latents=noise)
    assert pixels_close(got.images, expect) <= 1


def test_seeded_noise_is_reproducible_and_device_independent():
    pipe = ours("distilled")
    a = pipe.generate("a dot", width=64, height=64, seed=42)
    b = pipe.generate("a dot", width=64, height=64, seed=42, noise=None)
    c = pipe.generate("a dot", width=64, height=64, noise=make_noise(1, 32, 16, 16, 42))
    assert a.settings["seed"] == 42
    assert pixels_close(a.images, b.images) == 0 and pixels_close(a.images, c.images) == 0
    d = pipe.generate("a dot", width=64, height=64, seed=43)
    assert pixels_close(a.images, d.images) > 3


def test_image_i_of_a_request_is_the_image_of_seed_plus_i():
    """One seed rule: the noise of image i is the noise of seed + i alone, so each image reproduces by itself."""
    assert torch.equal(make_noise(3, 32, 16, 16, seed=7)[2:], make_noise(1, 32, 16, 16, seed=9))
    pipe = ours("distilled")
    batch = pipe.generate("a dot", width=64, height=64, seed=7, num_images=3)
    assert batch.settings["seeds"] == [7, 8, 9]
    alone = pipe.generate("a dot", width=64, height=64, seed=9)
    assert pixels_close(batch.images[2:], alone.images) <= 1  # batched float32 matmuls round a little differently
    third = batch.image_settings(2)
    assert third["seed"] == 9 and third["num_images"] == 1
    again = pipe.generate(third["prompt"], width=third["width"], height=third["height"], steps=third["steps"],
                          seed=third["seed"])
    assert pixels_close(again.images, alone.images) == 0


def test_progress_callback_sees_every_step():
    pipe = ours("distilled")
    seen = []
    pipe.generate("a dot", width=64, height=64, steps=3, seed=1, callback=lambda i, n, x: seen.append((i, n, x.shape)))
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    assert seen[0][2] == torch.Size([1, 32, 16, 16])


def test_guidance_on_distilled_model_is_ignored_with_warning(caplog):
    pipe = ours("distilled")
    noise = make_noise(1, 32, 16, 16, seed=2)
    with caplog.at_level("WARNING"):
        got = pipe.generate("a dot", width=64, height=64, guidance=5.0, noise=noise)
    assert "ignored" in caplog.text
    plain = pipe.generate("a dot", width=64, height=64, noise=noise)
    assert pixels_close(got.images, plain.images) == 0
    assert got.settings["steps"] == 4


def test_bfloat16_default_runs_close_to_float32():
    _, folder = reference_pipeline("distilled")
    fast = KleinPipeline.from_pretrained(folder, device="cpu", text_layers=TEXT_LAYERS, max_text_length=MAX_TEXT)
    assert fast.dtype == torch.bfloat16 and next(fast.transformer.parameters()).dtype == torch.bfloat16
    noise = make_noise(1, 32, 16, 16, seed=4)
    a = np.asarray(fast.generate("a dot", width=64, height=64, noise=noise).images[0], np.float32)
    b = np.asarray(ours("distilled").generate("a dot", width=64, height=64, noise=noise).images[0], np.float32)
    assert np.abs(a - b).mean() < 3  # measured 0.7: bf16 rounding, not a different image
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_import_does_no_work():
    import subprocess
    import sys

    code = "import sys, kleinbild, kleinbild.cli; assert 'torch' not in sys.modules, 'torch imported at import time'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compiled_pipeline_matches_plain_path():
    """torch.compile (the GPU fast path) computes the same images; the modules are shared, not replaced."""
    pipe = ours("distilled")
    noise = make_noise(1, 32, 16, 16, seed=5)
    plain = pipe.generate("a red circle", width=64, height=64, steps=3, noise=noise).images
    dit = pipe.transformer
    pipe.compile()
    assert pipe.compiled and pipe.transformer is dit
    fast = pipe.generate("a red circle", width=64, height=64, steps=3, noise=noise)
    assert fast.settings["compiled"] is True
    assert pixels_close(fast.images, plain) <= 1
    pipe.uncompile()
    assert pixels_close(pipe.generate("a red circle", width=64, height=64, steps=3, noise=noise).images, plain) == 0
    off = KleinPipeline(pipe.preset, dit, pipe.autoencoder, pipe.text_encoder, pipe.tokenizer, pipe.device,
                        pipe.dtype, offload_mode="model")
    with pytest.raises(ValueError, match="offload mode 'none'.*'model'"):
        off.compile()


def test_schedule_shift_overrides_the_empirical_mu():
    from kleinbild import sampling

    fixed = sampling.schedule(4, 64, 3.0)
    assert fixed == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    # shift = exp(mu) reproduces the reference schedule exactly
    mu = sampling.empirical_mu(4096, 4)
    assert sampling.schedule(4, 4096, float(np.exp(mu))) == pytest.approx(sampling.schedule(4, 4096))
    with pytest.raises(ValueError, match="shift must be positive, got 0"):
        sampling.schedule(4, 64, 0.0)


def test_a_small_model_runs_on_its_presets_cpu_threads(monkeypatch):
    """nano's preset asks for one CPU thread per generation (see tools/threads_bench.py); OMP_NUM_THREADS wins."""
    from kleinbild import KleinPipeline as Pipe

    pipe = Pipe.from_pretrained("nano", device="cpu")
    seen = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pipe.generate("a dot", steps=1, seed=0, callback=lambda *_: seen.append(torch.get_num_threads()))
        assert seen == [1] and torch.get_num_threads() == 2, "one thread inside, the caller's count after"
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        seen.clear()
        pipe.generate("a dot", steps=1, seed=0, callback=lambda *_: seen.append(torch.get_num_threads()))
        assert seen == [2]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_image_bytes_equal_diffusers_postprocess(dtype):
    from diffusers.image_processor import VaeImageProcessor

    from kleinbild.images import to_pil

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 40, 24, generator=g) * 0.8).to(dtype)
    # Values whose scaled form lands exactly on a half (ties round to even), and values outside [-1, 1].
    x[0, 0, 0, :6] = torch.tensor([-1.5, -1.0, 1.0, 1.5, 2 * (0.5 / 255) - 1, 2 * (1.5 / 255) - 1], dtype=dtype)
    got = to_pil(x)
    # Given bfloat16, diffusers would round x / 2 + 0.5 to bfloat16 before scaling (up to one level off); kleinbild
    # converts to float32 first, so its reference is the float32 postprocess of the same values.
    expect = VaeImageProcessor().postprocess(x.float(), output_type="pil")
    for a, b in zip(got, expect, strict=True):
        assert a.mode == "RGB" and a.size == (24, 40)
        assert np.array_equal(np.asarray(a), np.asarray(b))
