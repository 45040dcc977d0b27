"""DiT parity against diffusers' Flux2Transformer2DModel on small random configurations (float32)."""

from __future__ import annotations

import pytest
import torch

from kleinbild.config import DiTConfig, dit_param_count
from kleinbild.convert import dit_from_diffusers
from kleinbild.sampling import image_ids, reference_ids, text_ids
from kleinbild.transformer import Flux2Transformer, prepacked_linear_available

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-5


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:  # norm scales around one
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:  # unit gain, so every layer matters to the output
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


@pytest.fixture()
def pair() -> tuple[torch.nn.Module, Flux2Transformer]:
    torch.manual_seed(0)
    ref = diffusers.Flux2Transformer2DModel(
        patch_size=1,
        in_channels=32,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=48,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    ).eval()
    _randomise(ref, 1)
    cfg = DiTConfig.from_diffusers(ref.config)
    with torch.device("meta"):
        ours = Flux2Transformer(cfg)
    ours.load_state_dict(dit_from_diffusers(ref.state_dict()), strict=True, assign=True)
    return ref, ours.eval()


def _inputs(b: int = 2, h: int = 3, w: int = 4, n_txt: int = 7, refs: tuple[tuple[int, int], ...] = ()):
    g = torch.Generator().manual_seed(3)
    img = torch.randn(b, h * w, 32, generator=g)
    txt = torch.randn(b, n_txt, 48, generator=g)
    ref = [torch.randn(b, rh * rw, 32, generator=g) for rh, rw in refs]
    ref_tok = torch.cat(ref, dim=1) if ref else None
    ref_id = reference_ids([(rh, rw) for rh, rw in refs]) if refs else None
    return img, image_ids(h, w), txt, text_ids(n_txt), ref_tok, ref_id


@torch.no_grad()
def test_plain_forward_matches(pair):
    ref_model, ours = pair
    img, iid, txt, tid, _, _ = _inputs()
    t = torch.tensor([0.9, 0.3])
    expect = ref_model(hidden_states=img, encoder_hidden_states=txt, timestep=t, img_ids=iid, txt_ids=tid,
                       guidance=None, return_dict=False)[0]
    got = ours(img, iid, txt, tid, t)
    assert got.shape == expect.shape
    torch.testing.assert_close(got, expect, atol=ATOL, rtol=0)


@torch.no_grad()
def test_forward_with_references_matches(pair):
    ref_model, ours = pair
    img, iid, txt, tid, rtok, rid = _inputs(refs=((2, 3), (4, 2)))
    t = torch.tensor([0.7, 0.7])
    expect = ref_model(hidden_states=torch.cat([img, rtok], 1), encoder_hidden_states=txt, timestep=t,
                       img_ids=torch.cat([iid, rid]), txt_ids=tid, guidance=None, return_dict=False)[0]
    got = ours(img, iid, txt, tid, t, ref=rtok, ref_ids=rid)
    torch.testing.assert_close(got, expect[:, : img.shape[1]], atol=ATOL, rtol=0)
    # References really condition the output.
    assert (got - ours(img, iid, txt, tid, t)).abs().max() > 1e-3


@torch.no_grad()
def test_kv_extract_and_cached_match(pair):
    ref_model, ours = pair
    img, iid, txt, tid, rtok, rid = _inputs(refs=((2, 3), (3, 3)))
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor,
    )

    for block in ref_model.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in ref_model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    t0 = torch.tensor([1.0, 1.0])
    expect0, cache = ref_model(hidden_states=torch.cat([rtok, img], 1), encoder_hidden_states=txt, timestep=t0,
                               img_ids=torch.cat([rid, iid]), txt_ids=tid, guidance=None, return_dict=False,
                               kv_cache_mode="extract", num_ref_tokens=rtok.shape[1])
    got0, ours_cache = ours.extract_kv(img, iid, txt, tid, t0, ref=rtok, ref_ids=rid)
    torch.testing.assert_close(got0, expect0, atol=ATOL, rtol=0)
    assert len(ours_cache.double) == 2 and len(ours_cache.single) == 2
    t1 = torch.tensor([0.6, 0.6])
    expect1 = ref_model(hidden_states=img, encoder_hidden_states=txt, timestep=t1, img_ids=iid, txt_ids=tid,
                        guidance=None, return_dict=False, kv_cache=cache, kv_cache_mode="cached")[0]
    got1 = ours(img, iid, txt, tid, t1, kv_cache=ours_cache)
    torch.testing.assert_close(got1, expect1, atol=ATOL, rtol=0)
    # The cached path differs from dropping the references: the cache is actually used.
    assert (got1 - ours(img, iid, txt, tid, t1)).abs().max() > 1e-3


def test_official_key_names_and_counts():
    from pathlib import Path

    for name, n_params in (("klein-4b", 3_875_544_576), ("klein-9b", 9_078_581_248)):
        from kleinbild.config import get_preset

        cfg = get_preset(name).dit
        with torch.device("meta"):
            model = Flux2Transformer(cfg)
        keys = Path(__file__).parent / "data" / f"keys-bfl-{name}.txt"
        expected = {}
        for line in keys.read_text().splitlines():
            k, shape = line.split(" ", 1)
            expected[k] = [int(x) for x in shape.strip("[]").split(",")]
        got = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert got == expected
        assert sum(p.numel() for p in model.parameters()) == n_params == dit_param_count(cfg)
        assert DiTConfig.from_state_dict_shapes({k: tuple(v) for k, v in expected.items()}) == cfg


def test_converters_round_trip():
    from kleinbild.config import AEConfig
    from kleinbild.convert import dit_to_diffusers, vae_from_diffusers, vae_to_diffusers

    g = torch.Generator().manual_seed(0)
    cfg = DiTConfig(hidden_size=64, num_heads=4, depth=2, depth_single=2, in_channels=32, context_dim=48,
                    axes_dim=(4, 4, 4, 4))
    sd = {k: torch.randn(v.shape, generator=g) for k, v in Flux2Transformer(cfg).state_dict().items()}
    back = dit_from_diffusers(dit_to_diffusers(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    ref = diffusers.Flux2Transformer2DModel(patch_size=1, in_channels=32, num_layers=2, num_single_layers=2,
                                            attention_head_dim=16, num_attention_heads=4, joint_attention_dim=48,
                                            timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4),
                                            guidance_embeds=False)
    ref.load_state_dict(dit_to_diffusers(sd), strict=True)

    from kleinbild.autoencoder import AutoEncoder

    ae_cfg = AEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
    ae_sd = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in AutoEncoder(ae_cfg).state_dict().items()}
    dif = vae_to_diffusers(ae_sd)
    vae = diffusers.AutoencoderKLFlux2(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                       up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4)
    vae.load_state_dict(dif, strict=True)
    back = vae_from_diffusers(dif)
    assert back.keys() == ae_sd.keys() and all(torch.equal(back[k], ae_sd[k]) for k in ae_sd)


def test_rotation_as_one_complex_product_equals_the_real_form():
    from kleinbild.transformer import apply_rope, rope_tables

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 50, 4), generator=g)
    cos, sin = rope_tables(ids, (8, 8, 8, 8), 2000)
    cos, sin = cos[:, None], sin[:, None]
    rot = torch.complex(cos, sin)
    x = torch.randn(2, 3, 50, 32, generator=g)
    torch.testing.assert_close(apply_rope(x, cos, sin, rot), apply_rope(x, cos, sin), atol=1e-6, rtol=1e-6)
    xb = x.bfloat16().transpose(1, 2).contiguous().transpose(1, 2)  # strided like the heads of a fused qkv
    fast, plain = apply_rope(xb, cos, sin, rot), apply_rope(xb, cos, sin)
    assert fast.dtype == torch.bfloat16
    assert (fast.float() - plain.float()).abs().max() <= 2 ** -7 * plain.float().abs().max()  # one bf16 ulp


def test_complex_rotation_except_where_compiled_or_on_mps(monkeypatch):
    from kleinbild.transformer import complex_rope

    assert all(complex_rope(torch.device(d)) for d in ("cpu", "cuda", "meta"))
    assert not complex_rope(torch.device("mps"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not complex_rope(torch.device("cuda")), "inductor fuses the real form; it has no complex kernels"
    assert complex_rope(torch.device("cpu")), "the CPU's compiled graphs keep the form they were tested with"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_equals_the_reference_form_bit_for_bit(dtype):
    from kleinbild.transformer import rms_norm

    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(2, 300, 3, 4, 64, generator=g) * 3).to(dtype).permute(2, 0, 3, 1, 4)  # heads of a fused qkv
    scale = (1 + 0.1 * torch.randn(64, generator=g)).to(dtype)
    for x in (qkv[0], qkv[1].contiguous()):
        fused, plain = rms_norm(x, scale, 1e-6, fused=True), rms_norm(x, scale, 1e-6, fused=False)
        assert fused.dtype == plain.dtype == dtype
        assert torch.equal(fused, plain)


@pytest.mark.skipif(not prepacked_linear_available(), reason="this PyTorch has no oneDNN bfloat16")
def test_prepacked_linears_equal_the_plain_path_bit_for_bit(pair):
    _, ours = pair
    ours = ours.to(torch.bfloat16)
    img, iid, txt, tid, ref, rid = _inputs(refs=((2, 3),))
    args = (img.bfloat16(), iid, txt.bfloat16(), tid, torch.tensor([0.9, 0.3]))
    with torch.inference_mode():
        plain = ours(*args, ref=ref.bfloat16(), ref_ids=rid)
        assert ours.use_prepacked_linears()
        fast = ours(*args, ref=ref.bfloat16(), ref_ids=rid)
    packed = [m for m in ours.modules() if "_pack" in m.__dict__]
    assert len(packed) == 2 * 8 + 2 * 2  # double blocks: 8 linears each; single blocks: 2
    assert torch.equal(fast, plain)
    # An in-place change of a weight (as a fused LoRA makes) must not leave a stale copy behind.
    with torch.no_grad():
        ours.single_blocks[0].linear2.weight.mul_(1.5)
    with torch.inference_mode():
        changed = ours(*args, ref=ref.bfloat16(), ref_ids=rid)
        ours.use_prepacked_linears(False)
        assert not any("_pack" in m.__dict__ for m in ours.modules())
        assert torch.equal(ours(*args, ref=ref.bfloat16(), ref_ids=rid), changed)
    assert not torch.equal(changed, plain)


def test_prepacked_linears_leave_training_and_float32_on_the_plain_path(pair):
    _, ours = pair
    ours.use_prepacked_linears()
    img, iid, txt, tid, _, _ = _inputs()
    ours(img, iid, txt, tid, torch.tensor([0.9, 0.3])).sum().backward()  # float32, with grad
    assert not any("_pack" in m.__dict__ for m in ours.modules())
    assert ours.single_blocks[0].linear1.weight.grad is not None
    bf = ours.to(torch.bfloat16)
    bf(img.bfloat16(), iid, txt.bfloat16(), tid, torch.tensor([0.9, 0.3])).float().sum().backward()  # bf16 training
    assert not any("_pack" in m.__dict__ for m in ours.modules())
