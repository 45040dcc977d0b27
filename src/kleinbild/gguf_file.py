"""GGUF files, read memory-mapped with the `gguf` package: FLUX.2 transformers (the official single-file tensor names,
as ComfyUI-GGUF and stable-diffusion.cpp write them) and Qwen3 text encoders (llama.cpp's names and metadata).

A file becomes an official-named state dict like a quantized safetensors file: F32/F16/BF16 tensors are views of
the file's pages, and each quantized 2-D weight stays in its block format, marked as ComfyUI marks quantized layers
(`X.comfy_quant`, here `{"format": "gguf", "type": "Q4_K"}`), so `quant_file.from_file_tensors` turns it into a
QuantWeight that a QuantLinear (QuantEmbedding) dequantizes just in time. Other quantized tensors (rare: the
converters keep 1-D tensors in F32) are dequantized once, at load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kleinbild.ggml import GGML_TYPES, dequantize

DIT_ARCHITECTURES = ("flux", "flux2")  # ComfyUI-GGUF labels FLUX.2 transformers "flux"
TEXT_ARCHITECTURES = ("qwen3",)
_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# llama.cpp's Qwen3 tensor names -> the Hugging Face checkpoint's.
_TEXT_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str
    shape: tuple[int, ...]  # torch order (GGUF lists dimensions innermost first)
    data: Tensor  # a float view for F32/F16/BF16, else uint8 (rows, bytes per row)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


@lru_cache(maxsize=4)
def _reader(path: str, mtime: float) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(path, "c")  # copy-on-write: writable views for torch, the file itself untouched
    except (ValueError, OSError, KeyError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def reader(path: Path | str) -> Any:
    p = Path(path)
    return _reader(str(p), p.stat().st_mtime)


def metadata(path: Path | str) -> dict[str, Any]:
    """The file's key/value metadata as plain Python values (read once per file version; do not modify it)."""
    p = Path(path)
    return _metadata(str(p), p.stat().st_mtime)


@lru_cache(maxsize=4)
def _metadata(path: str, mtime: float) -> dict[str, Any]:
    from kleinbild.tokenizer_gguf import read_metadata

    return read_metadata(_reader(path, mtime))


def architecture(path: Path | str) -> str | None:
    arch = metadata(path).get("general.architecture")
    return None if arch is None else str(arch)


def _tensor(t: Any, path: Path, orig: Mapping[str, Any]) -> GGUFTensor:
    type_name = t.tensor_type.name
    if type_name not in GGML_TYPES:
        raise ValueError(f"{path}: tensor {t.name} is stored as {type_name}; kleinbild reads "
                         f"{', '.join(GGML_TYPES)}")
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    data = torch.from_numpy(t.data)
    if type_name == "BF16":
        data = data.view(torch.bfloat16)
    if type_name in _FLOATS:
        data = data.reshape(shape)
    # ComfyUI-GGUF stores some tensors flattened and records the original shape in the metadata.
    key = f"comfy.gguf.orig_shape.{t.name}"
    if key in orig:
        shape = tuple(int(d) for d in orig[key])
        if type_name in _FLOATS:
            data = data.reshape(shape)
    return GGUFTensor(t.name, type_name, shape, data)


def tensors(path: Path | str, wanted: Callable[[str], bool] = lambda k: True,
            rename: Callable[[str], str] = lambda k: k) -> dict[str, GGUFTensor]:
    """The (renamed) tensors whose new name is wanted; nothing is read from disk until a tensor's data is used."""
    p = Path(path)
    r = reader(p)
    meta = metadata(p) if any(f.startswith("comfy.gguf.orig_shape.") for f in r.fields) else {}
    out: dict[str, GGUFTensor] = {}
    for t in r.tensors:
        name = rename(t.name)
        if name is not None and wanted(name):
            out[name] = _tensor(t, p, meta)
    return out


def shapes(path: Path | str, rename: Callable[[str], str] = lambda k: k) -> dict[str, tuple[int, ...]]:
    return {k: t.shape for k, t in tensors(path, rename=rename).items()}


def _marker(type_name: str) -> Tensor:
    return torch.tensor(list(json.dumps({"format": "gguf", "type": type_name}).encode()), dtype=torch.uint8)


def as_state(found: Mapping[str, GGUFTensor]) -> dict[str, Tensor]:
    """An official-named state dict: plain tensors, and quantized 2-D weights with their marker (module doc)."""
    state: dict[str, Tensor] = {}
    for name, t in found.items():
        if t.type_name in _FLOATS:
            state[name] = t.data
        elif len(t.shape) == 2 and name.endswith(".weight"):
            state[name] = t.data.reshape(t.shape[0], -1)
            state[name.removesuffix(".weight") + ".comfy_quant"] = _marker(t.type_name)
        else:
            state[name] = dequantize(t.data, t.type_name, t.shape)
    return state


# ---------------------------------------------------------------- the two kinds of file


def check_architecture(path: Path, kinds: tuple[str, ...], what: str) -> None:
    arch = architecture(path)
    if arch is None or arch in kinds:
        return
    hint = ""
    if arch in TEXT_ARCHITECTURES and kinds == DIT_ARCHITECTURES:
        hint = "; it is a text encoder: pass it as --text-encoder"
    elif arch in DIT_ARCHITECTURES and kinds == TEXT_ARCHITECTURES:
        hint = "; it is a transformer: pass it as the model"
    raise ValueError(f"{path} is a GGUF of architecture {arch!r}, not a {what} ({' or '.join(kinds)}){hint}")


def text_name(name: str) -> str | None:
    """llama.cpp's name of a Qwen3 tensor -> the Hugging Face checkpoint's (None: not part of the encoder)."""
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _TEXT_NAMES:
        return f"model.layers.{m.group(1)}.{_TEXT_NAMES[m.group(2)]}.weight"
    return None  # output_norm, output (the LM head): never used


def text_config(path: Path) -> dict[str, Any]:
    """A Qwen3 GGUF's shape, from its metadata, as the Hugging Face config.json would give it."""
    check_architecture(path, TEXT_ARCHITECTURES, "Qwen3 text encoder")
    meta = metadata(path)
    arch = str(meta.get("general.architecture", "qwen3"))

    def get(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            raise ValueError(f"{path}: the metadata has no {full}; not a llama.cpp Qwen3 file?")
        return meta[full]

    found = tensors(path, wanted=lambda k: k == "token_embd.weight")
    if not found:
        raise ValueError(f"{path}: no tensor token_embd.weight; not a llama.cpp Qwen3 file?")
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    return {
        "vocab_size": found["token_embd.weight"].shape[0],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        "intermediate_size": int(get("feed_forward_length")),
        "rms_norm_eps": _f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 1_000_000.0)),
    }


def _f32(value: Any) -> float:
    """GGUF stores these as float32: 1e-6 reads back as 9.99999997e-07. The decimal the converter wrote is the
    shortest one that rounds to the same float32."""
    return float(f"{float(value):.7g}") if float(value) else 0.0


def text_state(path: Path, wanted: Callable[[str], bool]) -> dict[str, Tensor]:
    """The wanted tensors of a Qwen3 GGUF under the Hugging Face names (deeper layers are never read)."""
    return as_state(tensors(path, wanted=wanted, rename=text_name))
