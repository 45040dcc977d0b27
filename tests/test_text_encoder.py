"""Qwen3TextEncoder against transformers' Qwen3ForCausalLM, through diffusers' own prompt-embedding code."""

from __future__ import annotations

import pytest
import torch
from fixtures import make_tiny_tokenizer, tiny_qwen3_config

from kleinbild.config import TextEncoderConfig
from kleinbild.text_encoder import Qwen3TextEncoder, text_encoder_wanted_keys
from kleinbild.tokenizer import PromptTokenizer

transformers = pytest.importorskip("transformers")
klein = pytest.importorskip("diffusers.pipelines.flux2.pipeline_flux2_klein")

OUT_LAYERS = (1, 2, 4)
NUM_LAYERS = 5
MAX_LENGTH = 32
ATOL = 1e-5

PROMPT_SETS = {
    # One prompt padded, one filling the window exactly after truncation: a masked batch.
    "padded": ["a red cat", "a golden dragon floats above an ancient castle in the rain, watercolor. " * 3],
    # Both truncated, nothing padded: the plain causal path.
    "full": ["a quiet lighthouse by the sea at dawn, oil painting " * 3, "a tiny robot, pixel art. " * 6],
    "empty": ["", "🐱"],
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    # Larger-than-default weights and non-unit norm scales, so that every tensor (q_norm vs k_norm included)
    # visibly shapes the output.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[1] ** 0.5))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    hf_tok = transformers.AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("vocab")))
    cfg = tiny_qwen3_config(vocab_size=len(hf_tok), num_layers=NUM_LAYERS)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg)).eval().float()
    _randomise(model, 1)
    return cfg, model


@pytest.fixture(scope="module", params=["right", "left"])
def tokenizers_pair(request, tmp_path_factory):
    path = make_tiny_tokenizer(tmp_path_factory.mktemp(f"tok-{request.param}"), padding_side=request.param)
    return PromptTokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)


def _ours(cfg_dict: dict, hf: torch.nn.Module, dtype: torch.dtype = torch.float32) -> Qwen3TextEncoder:
    cfg = TextEncoderConfig.from_hf(cfg_dict, out_layers=OUT_LAYERS, max_length=MAX_LENGTH)
    with torch.device("meta"):
        enc = Qwen3TextEncoder(cfg)
    wanted = text_encoder_wanted_keys(cfg)
    state = {k: v.to(dtype) for k, v in hf.state_dict().items() if wanted(k)}
    enc.load_state_dict(state, strict=True, assign=True)
    return enc.eval()


def _reference(hf, hf_tok, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return klein.Flux2KleinPipeline._get_qwen3_prompt_embeds(
            hf, hf_tok, prompts, max_sequence_length=MAX_LENGTH, hidden_states_layers=list(OUT_LAYERS)
        )


@pytest.mark.parametrize("prompt_set", sorted(PROMPT_SETS))
def test_matches_diffusers_prompt_embeds(hf_model, tokenizers_pair, prompt_set: str) -> None:
    cfg_dict, hf = hf_model
    tok, hf_tok = tokenizers_pair
    prompts = PROMPT_SETS[prompt_set]
    ids, mask = tok.encode(prompts, MAX_LENGTH)
    if prompt_set == "full":
        assert bool(mask.all())
    else:
        assert not bool(mask.all())
    enc = _ours(cfg_dict, hf)
    with torch.no_grad():
        ours = enc(ids, mask)
    ref = _reference(hf, hf_tok, prompts)
    assert ours.shape == ref.shape == (2, MAX_LENGTH, len(OUT_LAYERS) * cfg_dict["hidden_size"])
    assert ours.dtype == torch.float32
    assert ref.abs().max() > 0.1  # a meaningful signal, not a vanishing one
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_concatenation_order_and_taps(hf_model) -> None:
    cfg_dict, hf = hf_model
    enc = _ours(cfg_dict, hf)
    ids = torch.randint(0, cfg_dict["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        out = enc(ids, mask)
        hs = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    h = cfg_dict["hidden_size"]
    for j, k in enumerate(OUT_LAYERS):
        torch.testing.assert_close(out[..., j * h : (j + 1) * h], hs[k], atol=ATOL, rtol=0)


def test_embedding_tap_and_no_mask(hf_model) -> None:
    cfg_dict, hf = hf_model
    cfg = TextEncoderConfig.from_hf(cfg_dict, out_layers=(2, 0))
    with torch.device("meta"):
        enc = Qwen3TextEncoder(cfg)
    wanted = text_encoder_wanted_keys(cfg)
    enc.load_state_dict({k: v for k, v in hf.state_dict().items() if wanted(k)}, strict=True, assign=True)
    assert len(enc.model.layers) == 2
    ids = torch.arange(10).reshape(1, 10) * 7
    with torch.no_grad():
        out = enc(ids)
        hs = hf(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(out, torch.cat([hs[2], hs[0]], dim=-1), atol=ATOL, rtol=0)


def test_wanted_keys(hf_model) -> None:
    cfg_dict, hf = hf_model
    cfg = TextEncoderConfig.from_hf(cfg_dict, out_layers=OUT_LAYERS)
    wanted = text_encoder_wanted_keys(cfg)
    keys = list(hf.state_dict())
    kept = {k for k in keys if wanted(k)}
    assert "model.embed_tokens.weight" in kept
    assert not any(k.startswith("model.layers.4.") for k in kept)
    assert all(k in kept for k in keys if k.startswith(("model.layers.0.", "model.layers.3.")))
    assert "model.norm.weight" not in kept and "lm_head.weight" not in kept
    assert not wanted("model.layers.40.mlp.up_proj.weight") and not wanted("model.layers.x.weight")
    with torch.device("meta"):
        enc = Qwen3TextEncoder(cfg)
    assert kept == set(enc.state_dict())  # exactly what the module holds, no more, no less


def test_missing_or_extra_key_raises(hf_model) -> None:
    cfg_dict, hf = hf_model
    cfg = TextEncoderConfig.from_hf(cfg_dict, out_layers=OUT_LAYERS)
    wanted = text_encoder_wanted_keys(cfg)
    state = {k: v for k, v in hf.state_dict().items() if wanted(k)}
    with torch.device("meta"):
        enc = Qwen3TextEncoder(cfg)
    missing = dict(state)
    del missing["model.layers.2.self_attn.k_norm.weight"]
    with pytest.raises(RuntimeError, match="k_norm"):
        enc.load_state_dict(missing, strict=True, assign=True)
    with pytest.raises(RuntimeError, match="model.norm.weight"):
        enc.load_state_dict({**state, "model.norm.weight": hf.model.norm.weight}, strict=True, assign=True)


def test_rejects_tapping_the_last_layer(hf_model) -> None:
    cfg_dict, _ = hf_model
    # HF's hidden_states[num_layers] is the final-normed output, which this encoder cannot produce.
    cfg = TextEncoderConfig.from_hf(cfg_dict, out_layers=(1, NUM_LAYERS))
    with pytest.raises(ValueError, match="before the last"):
        Qwen3TextEncoder(cfg)


def test_bfloat16_close_to_reference(hf_model, tokenizers_pair, tmp_path) -> None:
    cfg_dict, hf = hf_model
    tok, hf_tok = tokenizers_pair
    prompts = PROMPT_SETS["padded"]
    ids, mask = tok.encode(prompts, MAX_LENGTH)
    enc = _ours(cfg_dict, hf, torch.bfloat16)
    with torch.no_grad():
        ours = enc(ids, mask)
    assert ours.dtype == torch.bfloat16
    fp32 = _reference(hf, hf_tok, prompts)
    # Loaded the way the pipelines load it: from_pretrained(dtype=bf16) keeps the RoPE frequencies in fp32
    # (a plain `.to(bfloat16)` would round them too, which no real pipeline does).
    hf.save_pretrained(tmp_path)
    hf_bf16 = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ref = _reference(hf_bf16, hf_tok, prompts)
    gap = (ours.float() - fp32).abs().max()
    assert 0 < gap <= 0.03 * fp32.abs().max()  # bf16 is close to fp32 ...
    # ... and far closer to HF in bf16, since the casts happen in the same places.
    assert (ours.float() - ref.float()).abs().max() <= 0.05 * gap
