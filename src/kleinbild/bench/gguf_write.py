"""Writing GGUF files with the `gguf` package's writer, laid out as the public converters lay them out: FLUX.2
transformers under the official names (ComfyUI-GGUF / stable-diffusion.cpp), Qwen3 under llama.cpp's names with its
tokenizer as llama.cpp's convert_hf_to_gguf.py stores it. For the memory benchmark and the tests: kleinbild itself
reads GGUF files and does not make them."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, SpecialVocab, TokenType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quant_shape_to_byte_shape, quantize

# Types gguf's Python code can quantize; the others get random blocks with finite scales (see random_blocks).
QUANTIZABLE = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}
# Byte offsets of each block's fp16 scale fields, which random bytes would often make NaN or Inf.
_F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}

_HF_TO_LLAMA = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


# fp16 scales that give random blocks values of about +-0.02, the size of trained weights: the quants' range
# (times the sub-block scales of the K-quants) divided out.
_SCALE = {"Q8_0": 0.02 / 64, "Q4_0": 0.02 / 8, "Q4_1": 0.02 / 16, "Q5_0": 0.02 / 16, "Q5_1": 0.02 / 32,
          "Q2_K": 0.02 / 24, "Q3_K": 0.02 / 64, "Q4_K": 0.02 / 256, "Q5_K": 0.02 / 512, "Q6_K": 0.02 / 1024}


def random_blocks(type_name: str, shape: tuple[int, ...], seed: int = 0, scale: float | None = None) -> np.ndarray:
    """Valid random bytes of a quantized tensor: every bit pattern of the quants is legal, the fp16 scales are
    set to small finite values (by default, weights of about +-0.02)."""
    scale = _SCALE[type_name] if scale is None else scale
    qtype = GGMLQuantizationType[type_name]
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    n_blocks = int(np.prod(shape)) // block
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in _F16_FIELDS[type_name]:
        vals = (rng.random(n_blocks) * scale).astype(np.float16)
        raw[:, off : off + 2] = vals.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(quant_shape_to_byte_shape(shape, qtype))


def encode(t: torch.Tensor, type_name: str, seed: int = 0) -> tuple[np.ndarray, GGMLQuantizationType]:
    qtype = GGMLQuantizationType[type_name]
    if type_name not in QUANTIZABLE:
        return random_blocks(type_name, tuple(t.shape), seed), qtype
    return quantize(t.detach().float().numpy(), qtype), qtype


def write(path: Path, tensors: Mapping[str, torch.Tensor], types: Callable[[str, torch.Tensor], str],
          arch: str = "flux", meta: Callable[[GGUFWriter], None] | None = None, spool: bool = False) -> Path:
    """One GGUF file; `types(name, tensor)` picks each tensor's GGML type. `spool`: through a temporary file, so a
    large model is not held in memory until the end."""
    w = GGUFWriter(str(path), arch, use_temp_file=spool)
    if meta is not None:
        meta(w)
    for i, (name, t) in enumerate(tensors.items()):
        data, qtype = encode(t, types(name, t), seed=i)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def linear_type(main: str, fallback: str = "F32") -> Callable[[str, torch.Tensor], str]:
    """`main` for 2-D weights whose rows split into its blocks, `fallback` for the rest (as converters do)."""
    block = GGML_QUANT_SIZES[GGMLQuantizationType[main]][0]

    def pick(name: str, t: torch.Tensor) -> str:
        return main if t.ndim == 2 and t.shape[-1] % block == 0 and name.endswith(".weight") else fallback

    return pick


def llama_name(hf: str) -> str:
    """A Hugging Face Qwen3 name -> llama.cpp's."""
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    _, _, index, rest = hf.split(".", 3)
    return f"blk.{index}.{_HF_TO_LLAMA[rest.removesuffix('.weight')]}.weight"


def qwen3_meta(config: Mapping, layers: int) -> Callable[[GGUFWriter], None]:
    def add(w: GGUFWriter) -> None:
        w.add_block_count(layers)
        w.add_context_length(int(config.get("max_position_embeddings", 4096)))
        w.add_embedding_length(int(config["hidden_size"]))
        w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_head_count(int(config["num_attention_heads"]))
        w.add_head_count_kv(int(config["num_key_value_heads"]))
        w.add_key_length(int(config["head_dim"]))
        w.add_value_length(int(config["head_dim"]))
        w.add_rope_freq_base(float(config["rope_theta"]))
        w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))

    return add


def looks_special(token: str) -> bool:
    # convert_hf_to_gguf.py TextModel.does_token_look_special
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def vocab_base(folder: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """convert_hf_to_gguf.py `get_vocab_base`, on the tokenizers library instead of AutoTokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = {int(i): spec for i, spec in config["added_tokens_decoder"].items()}
    reverse = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    assert max(reverse) < vocab_size
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            if not added[i].get("normalized", not added[i].get("special", False)):
                token = tok.decode(tok.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if added[i].get("special", False) or looks_special(token):
                types.append(TokenType.CONTROL)
            else:
                types.append(TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def tokenizer_meta(folder: Path, vocab_size: int) -> Callable[[GGUFWriter], None]:
    """The tokenizer of `folder` as `_set_vocab_gpt2` writes it."""

    def add(writer: GGUFWriter) -> None:
        tokens, types = vocab_base(folder, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)

    return add


def write_tokenizer_gguf(folder: Path, out: Path, vocab_size: int) -> Path:
    """A vocab-only GGUF of `folder`, written as `_set_vocab_gpt2` writes it."""
    tokens, types = vocab_base(folder, vocab_size)
    writer = GGUFWriter(out, "qwen3")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # add_token_merges, add_{bos,eos,pad}_token_id, add_add_bos_token, add_chat_template
    SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return out
