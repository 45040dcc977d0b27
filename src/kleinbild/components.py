"""Building a model's three networks from located files: meta-built, quantized layers installed, weights assigned.

The text encoder can be quantized on load (`text_quant`) with the transformer's quantized linear layers: every
decoder-layer linear in the chosen format, and the embedding table as int8 rows (a lookup dequantizes only the rows
it reads, so the 8-bit table costs nothing in speed and halves the largest single tensor). Files that are already
quantized (ComfyUI's fp8 text encoders, llama.cpp GGUFs) load as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from kleinbild.autoencoder import AutoEncoder
from kleinbild.loading import ModelFiles, ae_state, dit_state, load_into, text_state
from kleinbild.quant import install, quantize_state
from kleinbild.quant_file import collect_quantized, prepare_quantized
from kleinbild.text_encoder import Qwen3TextEncoder, text_encoder_wanted_keys
from kleinbild.transformer import Flux2Transformer

_TEXT_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
EMBEDDING = "model.embed_tokens"


def text_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """The Qwen3 decoder layers' linears (attention q/k/v/o, MLP gate/up/down)."""
    return len(shape) == 2 and _TEXT_LINEAR.fullmatch(name) is not None


@dataclass
class Networks:
    transformer: Flux2Transformer
    autoencoder: AutoEncoder
    text_encoder: Qwen3TextEncoder
    quant: str | None  # the transformer's quantized format(s), if any
    text_quant: str | None  # the text encoder's


def build(files: ModelFiles, home: torch.device, dtype: torch.dtype, quant: str | None = None,
          text_quant: str | None = None) -> Networks:
    """All three networks on `home` (the compute device, or the host under offload)."""
    p = files.preset
    with torch.device("meta"):
        dit = Flux2Transformer(p.dit)
        ae = AutoEncoder(p.ae)
    dit_sd = dit_state(files)
    quant_used = prepare_quantized(dit, dit_sd, quant, home)
    load_into(dit, dit_sd, f"transformer {files.dit_files[0]}", home, dtype)
    del dit_sd
    load_into(ae, ae_state(files), f"autoencoder {files.ae_files[0]}", home, dtype)
    te, text_used = load_text_encoder(files, home, dtype, text_quant)
    return Networks(dit, ae, te, quant_used, text_used)


def load_text_encoder(files: ModelFiles, home: torch.device, dtype: torch.dtype,
                      text_quant: str | None = None) -> tuple[Qwen3TextEncoder, str | None]:
    """The prompt encoder, only as deep as its deepest tap, and the quantized format(s) it holds."""
    with torch.device("meta"):
        te = Qwen3TextEncoder(files.preset.text)
    state = text_state(files, text_encoder_wanted_keys(te.cfg))
    used = quantize_text(te, state, text_quant, home, str(files.text_files[0]))
    load_into(te, state, f"text encoder {files.text_files[0]}", home, dtype)
    return te, used


def quantize_text(te: Qwen3TextEncoder, state: dict[str, Tensor], text_quant: str | None, device: torch.device,
                  source: str) -> str | None:
    """Before strict loading: install the file's quantized layers and, with `text_quant`, quantize the rest."""
    layers, used = collect_quantized(state, text_quant, device, which=text_quantizable,
                                     what=f"the text encoder {source}")
    if text_quant is not None and f"{EMBEDDING}.weight" in state:
        layers.update(quantize_state(state, "int8", device=device, which=lambda k, s: k == f"{EMBEDDING}.weight"))
    if layers:
        install(te, layers, device)
    return used
