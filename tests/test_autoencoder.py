"""Autoencoder: official key layout, and parity with diffusers' AutoencoderKLFlux2 + Flux2KleinPipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from kleinbild.autoencoder import AutoEncoder
from kleinbild.config import AEConfig
from kleinbild.convert import vae_from_diffusers

ATOL = 1e-5
KEYS_FILE = Path(__file__).parent / "data" / "keys-bfl-ae.txt"

# Small configurations: (block_out_channels, layers_per_block, latent_channels, norm_num_groups,
# decoder_block_out_channels); the last is the shape of BFL's small decoder (a narrower decoder).
CONFIGS = {
    "2-levels": ((32, 64), 1, 8, 8, None),
    "3-levels": ((16, 32, 32), 2, 4, 8, None),
    "small-decoder": ((32, 64, 64), 1, 8, 8, (16, 32, 32)),
}


def _official_shapes() -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for line in KEYS_FILE.read_text().splitlines():
        name, rest = line.split(" ", 1)
        shape, dtype = rest.rsplit(" ", 1)
        out[name] = (tuple(ast.literal_eval(shape)), dtype)
    return out


def test_full_size_matches_official_keys() -> None:
    with torch.device("meta"):
        ae = AutoEncoder(AEConfig())
    ours = {k: (tuple(t.shape), str(t.dtype)) for k, t in ae.state_dict().items()}
    official = _official_shapes()
    assert sorted(ours) == sorted(official), (
        f"missing: {sorted(official.keys() - ours.keys())}, extra: {sorted(ours.keys() - official.keys())}"
    )
    assert ours == official


def test_full_size_parameter_count() -> None:
    with torch.device("meta"):
        ae = AutoEncoder(AEConfig())
    params = sum(p.numel() for p in ae.parameters())
    buffers = sum(b.numel() for b in ae.buffers())
    # The BatchNorm is affine=False, so it has no parameters, only buffers: running_mean and running_var
    # (128 each) and num_batches_tracked (a scalar). 84,046,372 is the element count of the whole file.
    assert params == 84_046_115
    assert buffers == 128 + 128 + 1
    assert params + buffers == 84_046_372


def test_small_decoder_inferred_from_its_tensors() -> None:
    """BFL's full_encoder_small_decoder: the standard encoder, a decoder of base width 96 (diffusers' config:
    decoder_block_out_channels [96, 192, 384, 384]), about 28M decoder parameters against 50M."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        small = AutoEncoder(AEConfig(decoder_ch=96))
        full = AutoEncoder(AEConfig())
        ref = diffusers.AutoencoderKLFlux2(decoder_block_out_channels=(96, 192, 384, 384))
    shapes = {k: tuple(t.shape) for k, t in small.state_dict().items()}
    assert AEConfig.from_state_dict_shapes(shapes) == AEConfig(decoder_ch=96)
    assert AEConfig.from_diffusers(ref.config) == AEConfig(decoder_ch=96)
    assert shapes["decoder.conv_in.weight"] == (384, 32, 3, 3)
    assert shapes["decoder.conv_out.weight"] == (3, 96, 3, 3)
    converted = {k: tuple(t.shape) for k, t in vae_from_diffusers(ref.state_dict()).items()}
    assert converted == shapes
    count = {n: sum(p.numel() for p in m.decoder.parameters()) for n, m in (("small", small), ("full", full))}
    assert 27e6 < count["small"] < 29e6 and 49e6 < count["full"] < 51e6


def test_full_size_diffusers_layout_loads() -> None:
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        vae = diffusers.AutoencoderKLFlux2()
    cfg = AEConfig.from_diffusers(vae.config)
    assert cfg == AEConfig()
    with torch.device("meta"):
        ae = AutoEncoder(cfg)
    ae.load_state_dict(vae_from_diffusers(vae.state_dict()), strict=True, assign=True)


def _randomise(vae: torch.nn.Module, seed: int) -> None:
    """Make every tensor non-trivial: no identity norms, zero biases or unit BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.ndim > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.running_mean.shape, generator=g))
        vae.bn.running_var.copy_(0.3 + torch.rand(vae.bn.running_var.shape, generator=g))
        vae.bn.num_batches_tracked.fill_(7)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request: pytest.FixtureRequest):
    diffusers = pytest.importorskip("diffusers")
    chans, layers, z, groups, dec = CONFIGS[request.param]
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLFlux2(
        block_out_channels=chans,
        decoder_block_out_channels=dec,
        down_block_types=("DownEncoderBlock2D",) * len(chans),
        up_block_types=("UpDecoderBlock2D",) * len(chans),
        layers_per_block=layers,
        latent_channels=z,
        norm_num_groups=groups,
    ).eval()
    _randomise(vae, 1)
    cfg = AEConfig.from_diffusers(vae.config)
    with torch.device("meta"):
        ours = AutoEncoder(cfg)
    ours.load_state_dict(vae_from_diffusers(vae.state_dict()), strict=True, assign=True)
    return vae, ours.eval()


def _pipeline():
    mod = pytest.importorskip("diffusers.pipelines.flux2.pipeline_flux2_klein")
    return mod.Flux2KleinPipeline, mod.retrieve_latents


def _bn(vae) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


def _image(cfg: AEConfig, b: int = 2) -> torch.Tensor:
    # Non-square, so a transposed patchify or attention reshape cannot pass.
    g = torch.Generator().manual_seed(5)
    ds = cfg.downscale
    return torch.rand(b, 3, 3 * ds, 5 * ds, generator=g) * 2 - 1


@torch.no_grad()
def test_encode_matches_pipeline(pair) -> None:
    vae, ours = pair
    pipe, retrieve_latents = _pipeline()
    img = _image(ours.cfg)
    # Flux2KleinPipeline._encode_vae_image, step by step.
    ref = retrieve_latents(vae.encode(img), sample_mode="argmax")
    ref = pipe._patchify_latents(ref)
    mean, std = _bn(vae)
    ref = (ref - mean) / std
    got = ours.encode(img)
    assert got.shape == (2, ours.cfg.latent_channels, 3, 5)
    assert got.dtype == torch.float32
    assert ref.abs().max() > 0.5  # the comparison is not between near-zero tensors
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@torch.no_grad()
def test_decode_matches_pipeline(pair) -> None:
    vae, ours = pair
    pipe, _ = _pipeline()
    g = torch.Generator().manual_seed(6)
    lat = torch.randn(2, ours.cfg.latent_channels, 3, 4, generator=g)
    # The tail of Flux2KleinPipeline.__call__ after the denoising loop.
    mean, std = _bn(vae)
    ref = pipe._unpatchify_latents(lat * std + mean)
    ref = vae.decode(ref).sample
    got = ours.decode(lat)
    ds = ours.cfg.downscale
    assert got.shape == (2, 3, 3 * ds, 4 * ds)
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@torch.no_grad()
def test_bf16_close_to_fp32(pair) -> None:
    _, ours = pair
    ours16 = AutoEncoder(ours.cfg)
    ours16.load_state_dict(ours.state_dict())
    ours16 = ours16.to(torch.bfloat16).eval()
    img = _image(ours.cfg)
    lat32 = ours.encode(img)
    lat16 = ours16.encode(img.bfloat16())
    assert lat16.dtype == torch.bfloat16
    rel = (lat16.float() - lat32).abs().max() / lat32.abs().max()
    assert rel < 0.05, rel

    img32 = ours.decode(lat32)
    img16 = ours16.decode(lat32.bfloat16())
    assert img16.dtype == torch.bfloat16
    rel = (img16.float() - img32).abs().max() / img32.abs().max()
    assert rel < 0.05, rel


def _copy(ae: AutoEncoder) -> AutoEncoder:
    """A second autoencoder with the same weights, in eval mode, to switch a fast path on."""
    other = AutoEncoder(ae.cfg)
    other.load_state_dict(ae.state_dict())
    return other.eval()


@torch.no_grad()
def test_channels_last_matches_plain(pair) -> None:
    """The CPU fast path (channels-last convolutions) computes the same encode and decode."""
    _, ours = pair
    fast = _copy(ours)
    fast.use_channels_last()
    assert fast.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    img = _image(ours.cfg)
    lat = ours.encode(img)
    assert torch.allclose(fast.encode(img), lat, rtol=1e-4, atol=1e-5)
    out = fast.decode(lat)
    assert out.is_contiguous()
    assert torch.allclose(out, ours.decode(lat), rtol=1e-4, atol=1e-5)


def test_strict_loading_names_the_tensor(pair) -> None:
    vae, _ = pair
    sd = vae_from_diffusers(vae.state_dict())
    cfg = AEConfig.from_diffusers(vae.config)

    missing = dict(sd)
    del missing["decoder.up.0.block.0.nin_shortcut.weight"]
    with torch.device("meta"):
        ae = AutoEncoder(cfg)
    with pytest.raises(RuntimeError, match=r"decoder\.up\.0\.block\.0\.nin_shortcut\.weight"):
        ae.load_state_dict(missing, strict=True, assign=True)

    extra = dict(sd)
    extra["encoder.mid.attn_2.q.weight"] = torch.zeros(1)
    with torch.device("meta"):
        ae = AutoEncoder(cfg)
    with pytest.raises(RuntimeError, match=r"encoder\.mid\.attn_2\.q\.weight"):
        ae.load_state_dict(extra, strict=True, assign=True)


def test_rejects_bad_shapes() -> None:
    cfg = AEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_groups=4)
    ae = AutoEncoder(cfg)
    with pytest.raises(ValueError, match="multiple of 4"):
        ae.encode(torch.zeros(1, 3, 8, 6))
    with pytest.raises(ValueError, match="latent batch"):
        ae.decode(torch.zeros(1, 4, 2, 2))


@torch.no_grad()
def test_subpixel_upsample_matches_plain(pair) -> None:
    """The CPU fast path for the decoder's upsampling layers (four 2x2 convolutions) decodes the same image."""
    _, ours = pair
    fast = _copy(ours)
    fast.use_subpixel_upsample()
    lat = ours.encode(_image(ours.cfg))
    want = ours.decode(lat)
    torch.testing.assert_close(fast.decode(lat), want, rtol=1e-4, atol=1e-5)
    fast.use_channels_last()
    torch.testing.assert_close(fast.decode(lat), want, rtol=1e-4, atol=1e-5)
    # New weights loaded in place: the derived kernels follow them.
    changed = {k: v * 1.5 if ".upsample." in k else v for k, v in ours.state_dict().items()}
    ours.load_state_dict(changed)
    fast.load_state_dict(changed)
    torch.testing.assert_close(fast.decode(lat), ours.decode(lat), rtol=1e-4, atol=1e-5)
    ups = [m for m in fast.decoder.modules() if type(m).__name__ == "Upsample"]
    assert ups and all(m.subpixel for m in ups)
