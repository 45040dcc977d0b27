"""LoRA: parity with diffusers' load_lora_weights, the published formats mapping to the same weights, clear errors,
several adapters with their own scales, fusing, and LoRA on quantized layers."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kleinbild import lora, lora_host
from kleinbild.config import DiTConfig
from kleinbild.sampling import make_noise
from kleinbild.transformer import Flux2Transformer

TINY = DiTConfig(hidden_size=32, num_heads=2, depth=2, depth_single=2, in_channels=32, context_dim=96,
                 axes_dim=(4, 4, 4, 4), time_dim=32)


def tiny_dit(seed: int = 0) -> Flux2Transformer:
    torch.manual_seed(seed)
    dit = Flux2Transformer(TINY).eval().requires_grad_(False)
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn(p.shape) / max(1, p.shape[-1]) ** 0.5)
    return dit


def random_official(dit: Flux2Transformer, rank: int = 3, seed: int = 1) -> lora.LoraWeights:
    """A LoRA on every linear layer, in official (fused) naming, with a non-trivial scale."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, (out, inp) in lora.linear_layers(dit).items():
        mods[name] = lora.LoraModule(torch.randn(rank, inp, generator=g) / inp**0.5,
                                     torch.randn(out, rank, generator=g) * 0.3, 0.75)
    return lora.LoraWeights(mods, "official")


def dense(weights: lora.LoraWeights) -> dict[str, torch.Tensor]:
    return {m: lm.delta() for m, lm in weights.modules.items()}


def inputs(seed: int = 0, n_img: int = 16, n_txt: int = 8):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(2, n_img, 32, generator=g)
    txt = torch.randn(2, n_txt, 96, generator=g)
    from kleinbild.sampling import image_ids, text_ids

    return img, image_ids(4, 4), txt, text_ids(n_txt), torch.tensor([0.3, 0.8])


def run(dit: Flux2Transformer) -> torch.Tensor:
    with torch.inference_mode():
        return dit(*inputs())


# ---------------------------------------------------------------- formats map to the same weights


def test_every_published_format_maps_to_the_same_deltas(tmp_path):
    dit = tiny_dit()
    truth = random_official(dit)
    layers = lora.linear_layers(dit)
    for fmt in ("diffusers", "kohya", "official"):
        tensors, meta = lora.to_state_dict(truth, fmt, layers)
        path = tmp_path / f"{fmt}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        parsed = lora.parse_lora(path, dit)
        assert set(parsed.modules) == set(truth.modules), fmt
        for m, d in dense(truth).items():
            torch.testing.assert_close(parsed.modules[m].delta(), d, rtol=1e-5, atol=1e-6, msg=f"{fmt} {m}")
    # The diffusers file splits q/k/v and swaps norm_out's halves; the kohya file keeps the fused layers and alpha.
    dif, meta = lora.to_state_dict(truth, "diffusers", layers)
    assert "transformer.transformer_blocks.1.attn.add_v_proj.lora_B.weight" in dif
    assert "transformer.norm_out.linear.lora_A.weight" in dif
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == pytest.approx(0.75 * 3)
    koh, _ = lora.to_state_dict(truth, "kohya", layers)
    assert float(koh["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == pytest.approx(0.75 * 3)


def test_prefix_and_naming_variants_are_recognised():
    dit = tiny_dit()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    qkv_a, qkv_b = torch.randn(2, 32, generator=g), torch.randn(96, 2, generator=g)
    variants = {
        "comfy kohya": {"lora_unet_double_blocks_1_txt_attn_proj.lora_down.weight": a,
                        "lora_unet_double_blocks_1_txt_attn_proj.lora_up.weight": b,
                        "lora_unet_double_blocks_1_txt_attn_proj.alpha": torch.tensor(4.0)},
        "comfy official": {"diffusion_model.double_blocks.1.txt_attn.proj.lora_down.weight": a,
                           "diffusion_model.double_blocks.1.txt_attn.proj.lora_up.weight": b,
                           "diffusion_model.double_blocks.1.txt_attn.proj.alpha": torch.tensor(4.0)},
        "comfy checkpoint": {"model.diffusion_model.double_blocks.1.txt_attn.proj.lora_A.weight": a,
                             "model.diffusion_model.double_blocks.1.txt_attn.proj.lora_B.weight": b * 2},
        "peft raw": {"base_model.model.transformer_blocks.1.attn.to_add_out.lora_A.default.weight": a * 2,
                     "base_model.model.transformer_blocks.1.attn.to_add_out.lora_B.default.weight": b},
        "underscored diffusers": {"lora_unet_transformer_blocks_1_attn_to_add_out.lora_down.weight": a,
                                  "lora_unet_transformer_blocks_1_attn_to_add_out.lora_up.weight": b * 2},
    }
    for what, sd in variants.items():
        got = lora.parse_lora(sd, dit)
        assert list(got.modules) == ["double_blocks.1.txt_attn.proj"], what
        torch.testing.assert_close(got.modules["double_blocks.1.txt_attn.proj"].delta(), 2 * b @ a, msg=what)
    # A fused-qkv kohya adapter lands on the whole qkv layer; diffusers' to_k only on its middle third.
    fused = lora.parse_lora({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": qkv_a,
                             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": qkv_b}, dit)
    torch.testing.assert_close(fused.modules["double_blocks.0.img_attn.qkv"].delta(), qkv_b @ qkv_a)
    k_only = lora.parse_lora({"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": a,
                              "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": b}, dit)
    d = k_only.modules["double_blocks.0.img_attn.qkv"].delta()
    assert d[:32].abs().max() == 0 and d[64:].abs().max() == 0
    torch.testing.assert_close(d[32:64], b @ a)


def test_peft_metadata_alpha_and_patterns(tmp_path):
    dit = tiny_dit()
    g = torch.Generator().manual_seed(4)
    sd = {}
    for name, r in (("proj_out", 4), ("transformer_blocks.0.attn.to_out.0", 2)):
        out, inp = (32, 32)
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(r, inp, generator=g)
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(out, r, generator=g)
    proj = "transformer_blocks.0.attn.to_out.0"
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8,
                                                 "transformer.rank_pattern": {proj: 2},
                                                 "transformer.alpha_pattern": {proj: 1}})}
    path = tmp_path / "peft.safetensors"
    save_file(sd, str(path), metadata=meta)
    got = lora.parse_lora(path, dit)
    a, b = sd["transformer.proj_out.lora_A.weight"], sd["transformer.proj_out.lora_B.weight"]
    torch.testing.assert_close(got.modules["final_layer.linear"].delta(), 2.0 * b @ a)
    a, b = (sd[f"transformer.transformer_blocks.0.attn.to_out.0.lora_{x}.weight"] for x in "AB")
    torch.testing.assert_close(got.modules["double_blocks.0.img_attn.proj"].delta(), 0.5 * b @ a)
    # Without metadata diffusers uses scale 1, and so does kleinbild.
    plain = lora.parse_lora(sd, dit)
    a, b = sd["transformer.proj_out.lora_A.weight"], sd["transformer.proj_out.lora_B.weight"]
    torch.testing.assert_close(plain.modules["final_layer.linear"].delta(), b @ a)


# ---------------------------------------------------------------- bad files


def test_bad_lora_files_give_clear_errors(tmp_path):
    dit = tiny_dit()
    a, b = torch.randn(2, 32), torch.randn(32, 2)
    with pytest.raises(ValueError, match="does not exist"):
        lora.parse_lora(tmp_path / "missing.safetensors", dit)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        lora.parse_lora(junk, dit)
    # Nothing applies (an SD-style UNet LoRA): every key is listed.
    with pytest.raises(ValueError, match=r"2 of 2 keys match no layer.*down_blocks_0_attentions_0_proj_in"):
        lora.parse_lora({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": a,
                         "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": b}, dit)
    # Some keys apply, one does not: still an error naming it, nothing silently dropped.
    with pytest.raises(ValueError, match=r"1 of 3 keys.*double_blocks\.7\.img_attn\.proj"):
        lora.parse_lora({"transformer.proj_out.lora_A.weight": a, "transformer.proj_out.lora_B.weight": b,
                         "diffusion_model.double_blocks.7.img_attn.proj.lora_A.weight": a}, dit)
    with pytest.raises(ValueError, match="text-encoder LoRA weights are not supported"):
        lora.parse_lora({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": a}, dit)
    with pytest.raises(ValueError, match=r"proj_out: delta 32x64 vs layer 32x32"):
        lora.parse_lora({"transformer.proj_out.lora_A.weight": torch.randn(2, 64),
                         "transformer.proj_out.lora_B.weight": b}, dit)
    with pytest.raises(ValueError, match="has lora_A/down but not the other half"):
        lora.parse_lora({"transformer.proj_out.lora_A.weight": a}, dit)
    with pytest.raises(ValueError, match=r"LoKr.*does not load"):
        lora.parse_lora({"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": torch.randn(4, 4),
                         "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2": torch.randn(24, 8)}, dit)
    with pytest.raises(ValueError, match="DoRA"):
        lora.parse_lora({"transformer.proj_out.lora_A.weight": a, "transformer.proj_out.lora_B.weight": b,
                         "transformer.proj_out.lora_magnitude_vector.dora_scale": torch.ones(32)}, dit)
    with pytest.raises(ValueError, match="full weight difference"):
        lora.parse_lora({"diffusion_model.final_layer.linear.diff": torch.zeros(32, 32)}, dit)
    with pytest.raises(ValueError, match="holds no tensors"):
        lora.parse_lora({}, dit)


def test_parse_spec():
    assert lora.parse_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert lora.parse_spec("style.safetensors:0.6") == ("style.safetensors", 0.6)
    assert lora.parse_spec("C:\\loras\\style.safetensors") == ("C:\\loras\\style.safetensors", 1.0)
    assert lora.parse_spec("C:\\loras\\style.safetensors:-1") == ("C:\\loras\\style.safetensors", -1.0)
    with pytest.raises(ValueError, match="finite"):
        lora.parse_spec("x.safetensors:nan")


# ---------------------------------------------------------------- applying


def test_several_adapters_scales_fuse_and_unload():
    dit = tiny_dit()
    base = run(dit)
    one, two = random_official(dit, seed=5), random_official(dit, rank=2, seed=6)
    h = lora_host.host(dit)
    h.add(one, 0.5, name="one")
    h.add(two, 1.0, name="two")
    stacked = run(dit)
    # The same as one adapter whose delta is the scaled sum, merged into the weights.
    ref = tiny_dit()
    with torch.no_grad():
        for m in one.modules:
            w = ref.get_submodule(m).weight
            w += 0.5 * one.modules[m].delta() + two.modules[m].delta()
    torch.testing.assert_close(stacked, run(ref), rtol=1e-4, atol=1e-5)
    assert (stacked - base).abs().max() > 1e-2, "the adapters must change the output"
    h.set_scale("two", 0.0)
    h.set_scale("one", 0.0)
    torch.testing.assert_close(run(dit), base, rtol=0, atol=0)
    h.set_scale("one", 0.5)
    h.set_scale("two", 1.0)
    h.fuse()
    assert not h._hooks, "fused adapters need no hooks"
    torch.testing.assert_close(run(dit), stacked, rtol=1e-4, atol=1e-5)
    h.set_scale("one", 1.5)  # a fused adapter is re-fused at its new scale
    h.unfuse()
    h.set_scale("one", 0.5)
    torch.testing.assert_close(run(dit), stacked, rtol=1e-4, atol=1e-5)
    h.remove()
    torch.testing.assert_close(run(dit), base, rtol=1e-5, atol=1e-6)
    assert not h._hooks and h.info() == []
    with pytest.raises(ValueError, match="no LoRA named 'nope'"):
        h.set_scale("nope", 1.0)
    assert set(dit.state_dict()) == set(tiny_dit().state_dict()), "module names and state dict keys never change"


def test_lora_on_quantized_layers_stays_unfused():
    from kleinbild import quant

    dit = tiny_dit()
    quant.quantize_model(dit, "int8")
    base = run(dit)
    ad = random_official(dit, seed=8)
    h = lora_host.host(dit)
    h.add(ad, 1.0, name="a")
    kept = h.fuse()
    assert kept and all(m.startswith(("double_blocks", "single_blocks")) for m in kept)
    with_lora = run(dit)
    assert (with_lora - base).abs().max() > 1e-2
    h.unfuse()
    torch.testing.assert_close(run(dit), with_lora, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- parity with diffusers (float32 images)


@pytest.fixture
def pair():
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    return _pair()


@functools.cache
def _pair():
    """A tiny Flux2KleinPipeline of its own (the shared one must not get adapters) and kleinbild's copy of it."""
    import atexit
    import shutil
    import tempfile

    from diffusers import Flux2KleinPipeline
    from tiny import MAX_TEXT, TEXT_LAYERS, build_components

    from kleinbild.pipeline import KleinPipeline

    ref = Flux2KleinPipeline(**build_components(seed=21), is_distilled=True)
    ref.set_progress_bar_config(disable=True)
    root = tempfile.mkdtemp(prefix="kleinbild-lora-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    folder = Path(root) / "pipe"
    ref.save_pretrained(folder)
    ours = KleinPipeline.from_pretrained(folder, device="cpu", dtype="float32", text_layers=TEXT_LAYERS,
                                         max_text_length=MAX_TEXT)
    return ref, ours, folder


def _images_close(a, b) -> int:
    worst = 0
    for x, y in zip(a, b, strict=True):
        ax, ay = np.asarray(x, dtype=np.int16), np.asarray(y, dtype=np.int16)
        assert ax.std() > 5
        worst = max(worst, int(np.abs(ax - ay).max()))
    return worst


def _diffusers_random_lora(transformer, rank: int, seed: int, kohya_only: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in transformer.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if kohya_only and not name.startswith(("transformer_blocks", "single_transformer_blocks")):
            continue
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) / mod.in_features**0.5
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.4
    return sd


def _generate_both(ref, ours, seed: int):
    from tiny import MAX_TEXT, TEXT_LAYERS

    noise = make_noise(1, 32, 16, 16, seed=seed)
    prompt = "a small pink circle in the middle"
    expect = ref(prompt=prompt, height=64, width=64, num_inference_steps=3, latents=noise,
                 text_encoder_out_layers=TEXT_LAYERS, max_sequence_length=MAX_TEXT).images
    got = ours.generate(prompt, width=64, height=64, steps=3, noise=noise).images
    return got, expect


def test_diffusers_format_lora_matches_diffusers_load_lora_weights(tmp_path, pair):
    ref, ours, _ = pair
    sd = _diffusers_random_lora(ref.transformer, rank=4, seed=31)
    # Every layer, norm_out and the modulations included; alpha 6 on rank 4 (scale 1.5), one layer at rank 4 alpha 2.
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({
        "transformer.r": 4, "transformer.lora_alpha": 6,
        "transformer.target_modules": sorted({k.split(".lora_")[0].removeprefix("transformer.") for k in sd}),
        "transformer.alpha_pattern": {"single_transformer_blocks.1.attn.to_out": 2}})}
    save_file(sd, str(tmp_path / "pytorch_lora_weights.safetensors"), metadata=meta)
    plain, _ = _generate_both(ref, ours, seed=3)
    ref.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors", adapter_name="x")
    name = ours.load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    try:
        got, expect = _generate_both(ref, ours, seed=3)
        assert _images_close(got, expect) <= 1
        assert _images_close(got, plain) > 3, "the LoRA must change the image"
        ours.fuse_loras()
        fused, _ = _generate_both(ref, ours, seed=3)
        assert _images_close(fused, expect) <= 1
    finally:
        ref.unload_lora_weights()
        ours.unload_lora(name)
    assert _images_close(_generate_both(ref, ours, seed=3)[0], plain) <= 1


def test_kohya_lora_with_alpha_matches_diffusers(tmp_path, pair):
    ref, ours, _ = pair
    dif = _diffusers_random_lora(ref.transformer, rank=4, seed=41, kohya_only=True)
    # The same adapter in kohya naming: fused qkv (A stacked, B block-diagonal), alpha 2 on rank 12 (q, k, v of 4).
    from kleinbild.lora import parse_lora, to_state_dict

    parsed = parse_lora(dif, ours.transformer)
    for m in parsed.modules.values():
        m.B = m.B / (2.0 / m.rank)  # stored unscaled; the .alpha brings it back
        m.scale = 2.0 / m.rank
    sd, _ = to_state_dict(parsed, "kohya", lora.linear_layers(ours.transformer))
    assert any(k.endswith("img_attn_qkv.lora_down.weight") and v.shape[0] == 12 for k, v in sd.items())
    save_file(sd, str(tmp_path / "kohya.safetensors"))
    ref.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors", adapter_name="k")
    name = ours.load_lora(tmp_path / "kohya.safetensors", 1.0)
    try:
        got, expect = _generate_both(ref, ours, seed=5)
        assert _images_close(got, expect) <= 1
    finally:
        ref.unload_lora_weights()
        ours.unload_lora(name)


def test_two_loras_with_scales_match_diffusers_set_adapters(tmp_path, pair):
    ref, ours, _ = pair
    for i, seed in enumerate((51, 52)):
        save_file(_diffusers_random_lora(ref.transformer, rank=2, seed=seed),
                  str(tmp_path / f"l{i}.safetensors"))
    ref.load_lora_weights(str(tmp_path), weight_name="l0.safetensors", adapter_name="a")
    ref.load_lora_weights(str(tmp_path), weight_name="l1.safetensors", adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    a = ours.load_lora(tmp_path / "l0.safetensors", 0.7)
    b = ours.load_lora(tmp_path / "l1.safetensors", -0.4)
    try:
        assert [x["scale"] for x in ours.loras] == [0.7, -0.4]
        got, expect = _generate_both(ref, ours, seed=7)
        assert _images_close(got, expect) <= 1
    finally:
        ref.unload_lora_weights()
        ours.unload_lora(a)
        ours.unload_lora(b)


def test_pipeline_loads_loras_at_startup_and_reports_them(tmp_path, pair):
    from tiny import MAX_TEXT, TEXT_LAYERS

    from kleinbild.pipeline import KleinPipeline

    ref, _, folder = pair
    save_file(_diffusers_random_lora(ref.transformer, rank=2, seed=61), str(tmp_path / "s.safetensors"))
    pipe = KleinPipeline.from_pretrained(folder, device="cpu", dtype="float32", text_layers=TEXT_LAYERS,
                                         max_text_length=MAX_TEXT, loras=[f"{tmp_path / 's.safetensors'}:0.5"])
    res = pipe.generate("a dot", width=64, height=64, steps=2, seed=1)
    assert res.settings["loras"] == [{"name": "s", "source": str(tmp_path / "s.safetensors"), "scale": 0.5}]
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_input_blocks_1_0_emb_layers_1.lora_down.weight": torch.zeros(2, 8)}, str(bad))
    with pytest.raises(ValueError, match="match no layer"):
        KleinPipeline.from_pretrained(folder, device="cpu", dtype="float32", text_layers=TEXT_LAYERS,
                                      max_text_length=MAX_TEXT, loras=[str(bad)])


def test_cli_takes_loras_and_quant_for_every_loading_command():
    from kleinbild.cli import build_parser

    p = build_parser()
    g = p.parse_args(["generate", "x", "--lora", "a.safetensors:0.5", "--lora", "b.safetensors", "--quant", "int8",
                      "--fuse-lora"])
    assert g.lora == ["a.safetensors:0.5", "b.safetensors"] and g.quant == "int8" and g.fuse_lora
    s = p.parse_args(["serve", "--lora", "s.safetensors:0.7", "--quant", "fp8"])
    assert s.lora == ["s.safetensors:0.7"] and s.quant == "fp8"
    e = p.parse_args(["eval", "--quant", "nvfp4"])
    assert e.quant == "nvfp4" and e.lora == []
    with pytest.raises(SystemExit):
        p.parse_args(["generate", "x", "--quant", "fp4"])
