"""GGUF transformers: quantized layers dequantized just in time, images against the float model, and bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from kleinbild import gguf_file, quant  # noqa: E402
from kleinbild.bench.gguf_write import linear_type, random_blocks, write  # noqa: E402
from kleinbild.ggml import GGML_TYPES  # noqa: E402
from kleinbild.images import psnr  # noqa: E402
from kleinbild.quant import GGML_QUANTIZED, QuantLinear, QuantWeight  # noqa: E402

QUANTIZED = sorted(GGML_QUANTIZED)


@pytest.mark.parametrize("type_name", QUANTIZED)
def test_quantized_layer_is_the_dequantized_matmul(type_name):
    """Each type as a layer: the reference's dequantized weight times x, in float32 and in bf16."""
    block = GGML_TYPES[type_name][0]
    shape = (48, 2 * max(block, 256))
    raw_np = random_blocks(type_name, shape, seed=3)
    want_w = torch.from_numpy(gguf_dequantize(raw_np, GGMLQuantizationType[type_name]).astype(np.float32))
    layer = QuantLinear(QuantWeight(type_name, shape, torch.from_numpy(raw_np), torch.ones(())))
    assert torch.equal(layer.dequantize(torch.float32), want_w)
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), F.linear(x, want_w), rtol=1e-5, atol=1e-6)
    got = layer(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, F.linear(x.bfloat16(), want_w.bfloat16()), rtol=0, atol=0)
    assert layer.quant_weight().nbytes() == raw_np.size + 4  # stays in its blocks: no float copy is kept


def test_quantized_embedding_reads_rows():
    raw_np = random_blocks("Q4_K", (10, 256), seed=2)
    qw = QuantWeight("Q4_K", (10, 256), torch.from_numpy(raw_np), torch.ones(()))
    table = quant.QuantEmbedding(qw)
    ids = torch.tensor([[3, 0, 9], [3, 3, 1]])
    torch.testing.assert_close(table(ids), F.embedding(ids, qw.dequantize()), rtol=0, atol=0)
    int8 = quant.quantize_weight(torch.randn(10, 64), "int8")
    torch.testing.assert_close(quant.QuantEmbedding(int8)(ids), F.embedding(ids, int8.dequantize()), rtol=0, atol=0)


# ---------------------------------------------------------------- whole pipelines


def _tiny():
    pytest.importorskip("diffusers")
    from tiny import MAX_TEXT, TEXT_LAYERS, reference_pipeline

    _, folder = reference_pipeline("distilled")
    return folder, {"device": "cpu", "dtype": "float32", "text_layers": TEXT_LAYERS, "max_text_length": MAX_TEXT}


def _gguf_dit(tmp_path, main: str, prefix: str = "", arch: str = "flux"):
    from kleinbild.loading import read_transformer

    folder, opts = _tiny()
    state = {prefix + k: v for k, v in read_transformer(folder).items()}
    path = write(tmp_path / f"flux-2-klein-4b-{main}.gguf", state, linear_type(main), arch=arch)
    return path, folder, opts


def _image(pipe, seed: int = 4):
    from kleinbild.sampling import make_noise

    noise = make_noise(1, 32, 16, 16, seed=seed)
    return pipe.generate("a red circle", width=64, height=64, noise=noise).images[0]


@pytest.mark.parametrize("main", ["F32", "F16"])
def test_float_gguf_equals_the_safetensors(tmp_path, main):
    from kleinbild.pipeline import KleinPipeline

    path, folder, opts = _gguf_dit(tmp_path, main, prefix="model.diffusion_model.")
    ref = KleinPipeline.from_pretrained(folder, **opts)
    pipe = KleinPipeline.from_pretrained(path, vae=folder / "vae", text_encoder=folder, **opts)
    assert pipe.quant is None and pipe.preset.name.startswith("custom (klein-4b")
    a, b = np.asarray(_image(ref), dtype=np.int16), np.asarray(_image(pipe), dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # within 1/255


def test_q8_0_gguf_keeps_the_image(tmp_path):
    from kleinbild.pipeline import KleinPipeline

    path, folder, opts = _gguf_dit(tmp_path, "Q8_0")
    ref = KleinPipeline.from_pretrained(folder, **opts)
    pipe = KleinPipeline.from_pretrained(path, vae=folder / "vae", text_encoder=folder, **opts)
    layers = quant.quant_summary(pipe.transformer)
    assert pipe.quant == "Q8_0" and layers["Q8_0"] >= 10
    db = psnr(_image(pipe), _image(ref))
    assert 35 <= db < float("inf"), db  # measured: 52.5 dB on this tiny random model
    with pytest.raises(ValueError, match=r"already quantized \(Q8_0\)"):
        KleinPipeline.from_pretrained(path, vae=folder / "vae", text_encoder=folder, quant="fp8", **opts)


def test_bad_gguf_transformers_are_named(tmp_path):
    from kleinbild.loading import read_transformer
    from kleinbild.pipeline import KleinPipeline

    folder, opts = _tiny()
    parts = {"vae": folder / "vae", "text_encoder": folder, **opts}
    state = read_transformer(folder)
    other = write(tmp_path / "sd3.gguf", state, linear_type("Q8_0"), arch="sd3")
    with pytest.raises(ValueError, match="architecture 'sd3', not a FLUX.2 transformer"):
        KleinPipeline.from_pretrained(other, **parts)
    text = write(tmp_path / "qwen.gguf", state, linear_type("Q8_0"), arch="qwen3")
    with pytest.raises(ValueError, match="pass it as --text-encoder"):
        KleinPipeline.from_pretrained(text, **parts)
    missing = dict(state)
    missing.pop("final_layer.linear.weight")
    cut = write(tmp_path / "cut.gguf", missing, linear_type("Q8_0"))
    with pytest.raises(ValueError, match="final_layer.linear.weight"):
        KleinPipeline.from_pretrained(cut, **parts)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        KleinPipeline.from_pretrained(tmp_path / "junk.gguf", **parts)


def test_unknown_tensor_type_is_named(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "iq.gguf"
    w = GGUFWriter(str(path), "flux")
    w.add_tensor("img_in.weight", np.zeros((4, 66), dtype=np.uint8), raw_shape=(4, 66),
                 raw_dtype=GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="img_in.weight is stored as IQ2_XXS; kleinbild reads F32, F16, BF16"):
        gguf_file.tensors(path)


# ---------------------------------------------------------------- Qwen3 text encoders


def _nano_text_gguf(tmp_path, main: str, block_count: int | None = None):
    import json

    from safetensors.torch import load_file

    from kleinbild.bench.gguf_write import llama_name, qwen3_meta, tokenizer_meta
    from kleinbild.config import get_preset
    from kleinbild.loading import bundled_dir

    folder = bundled_dir(get_preset("nano"))
    te = folder / "text_encoder"
    config = json.loads((te / "config.json").read_text())
    state = {llama_name(k): v.float() for k, v in load_file(te / "model.safetensors").items()}
    layers = block_count or config["num_hidden_layers"]

    def meta(w):
        qwen3_meta(config, layers)(w)
        tokenizer_meta(te, config["vocab_size"])(w)

    path = write(tmp_path / f"qwen3-nano-{main}.gguf", state, linear_type(main), arch="qwen3", meta=meta)
    return path, folder


def _nano(folder, **kw):
    from kleinbild.pipeline import KleinPipeline

    return KleinPipeline.from_pretrained(folder / "flux-2-nano.safetensors", vae=folder / "ae.safetensors",
                                         preset="nano", device="cpu", dtype="float32", **kw)


PROMPTS = ["a red circle on a blue background", "two green squares, top-left", "<|im_end|> odd words: cat ÿ 42"]


def test_f32_qwen3_gguf_equals_the_safetensors(tmp_path):
    path, folder = _nano_text_gguf(tmp_path, "F32")
    ref = _nano(folder, text_encoder=folder / "text_encoder")
    pipe = _nano(folder, text_encoder=path)
    assert pipe.files.text_layout == "gguf" and pipe.preset.text == ref.preset.text
    n = pipe.preset.text.max_length
    for a, b in zip(pipe.tokenizer.encode(PROMPTS, n), ref.tokenizer.encode(PROMPTS, n), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(pipe.encode_prompt(PROMPTS), ref.encode_prompt(PROMPTS))


def test_quantized_qwen3_gguf_within_bounds(tmp_path):
    path, folder = _nano_text_gguf(tmp_path, "Q8_0")
    ref = _nano(folder, text_encoder=folder / "text_encoder").encode_prompt(PROMPTS)
    pipe = _nano(folder, text_encoder=path)
    assert pipe.text_quant == "Q8_0"
    assert isinstance(pipe.text_encoder.model.embed_tokens, quant.QuantEmbedding)
    err = quant_err(pipe.encode_prompt(PROMPTS), ref)
    assert 0 < err < 0.02, err  # measured 0.0042


def quant_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_qwen3_gguf_with_too_few_layers_is_named(tmp_path):
    path, folder = _nano_text_gguf(tmp_path, "F32", block_count=3)
    with pytest.raises(ValueError, match="has 3 layers but layer 6 is tapped"):
        _nano(folder, text_encoder=path)


# Relative error of the stacked hidden states against the float encoder, measured: int8 0.010, fp8 0.017, nvfp4 0.064.
@pytest.mark.parametrize(("fmt", "bound"), [("int8", 0.02), ("fp8", 0.04), ("nvfp4", 0.15)])
def test_text_quant_on_load_within_bounds(fmt, bound):
    from kleinbild.config import get_preset
    from kleinbild.loading import bundled_dir

    folder = bundled_dir(get_preset("nano"))
    ref = _nano(folder, text_encoder=folder / "text_encoder").encode_prompt(PROMPTS)
    pipe = _nano(folder, text_encoder=folder / "text_encoder", text_quant=fmt)
    layers = quant.quant_summary(pipe.text_encoder)
    linears = 7 * pipe.preset.text.layers_to_run  # q, k, v, o, gate, up, down; the embedding table is int8
    assert pipe.text_quant == fmt and layers == ({"int8": linears + 1} if fmt == "int8" else {fmt: linears, "int8": 1})
    err = quant_err(pipe.encode_prompt(PROMPTS), ref)
    assert 0 < err < bound, err


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_comfyui_fp8_text_encoder_file_loads_as_it_is(tmp_path, prefix):
    """One .safetensors with fp8 linears and comfy_quant markers (ComfyUI's text-encoder files), tokenizer beside."""
    import shutil

    from safetensors.torch import load_file

    from kleinbild.components import text_quantizable
    from kleinbild.config import get_preset
    from kleinbild.loading import bundled_dir
    from kleinbild.quant_file import save_quantized

    folder = bundled_dir(get_preset("nano"))
    te = folder / "text_encoder"
    state = {k.removeprefix("model.") if not prefix else k: v for k, v in load_file(te / "model.safetensors").items()}
    which = (lambda k, s: text_quantizable("model." + k, s)) if not prefix else text_quantizable
    out = tmp_path / "qwen_3_nano_fp8_scaled.safetensors"
    assert save_quantized(state, out, "fp8", which=which)["layers"] == 7 * 6
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(te / name, tmp_path / name)
    ref = _nano(folder, text_encoder=te).encode_prompt(PROMPTS)
    pipe = _nano(folder, text_encoder=out)
    assert pipe.text_quant == "fp8" and pipe.files.text_files == [out]
    assert 0 < quant_err(pipe.encode_prompt(PROMPTS), ref) < 0.04
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="holds no tokenizer"):
        _nano(folder, text_encoder=out)


def test_only_the_tapped_layers_are_read(tmp_path):
    from kleinbild.text_encoder import text_encoder_wanted_keys

    path, _ = _nano_text_gguf(tmp_path, "Q8_0")
    from kleinbild.config import get_preset

    cfg = get_preset("nano").text
    state = gguf_file.text_state(path, text_encoder_wanted_keys(cfg))
    layers = {int(k.split(".")[2]) for k in state if k.startswith("model.layers.")}
    assert layers == set(range(cfg.layers_to_run)) and cfg.layers_to_run < cfg.num_layers


def test_comfyui_original_shapes_are_restored(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "flat.gguf"
    w = GGUFWriter(str(path), "flux")
    w.add_array("comfy.gguf.orig_shape.a.weight", [3, 4])
    w.add_tensor("a.weight", np.arange(12, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t = gguf_file.tensors(path)["a.weight"]
    assert t.shape == (3, 4) and torch.equal(t.data, torch.arange(12.0).reshape(3, 4))


def test_gguf_pages_can_be_released_without_changing_values(tmp_path):
    import sys

    from kleinbild.files import release_file_pages

    path, _ = _nano_text_gguf(tmp_path, "Q8_0")
    t = gguf_file.tensors(path, wanted=lambda k: k == "token_embd.weight")["token_embd.weight"]
    before = t.data.clone()
    released = release_file_pages([t.data])
    assert torch.equal(t.data, before)
    assert released > 0 or sys.platform != "linux"
