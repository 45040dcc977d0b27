"""The Qwen3 prompt encoder: a Qwen3 decoder run only as deep as the deepest tapped layer.

FLUX.2 [klein] conditions on the residual stream after a few decoder layers (9, 18 and 27 of Qwen3's 36), so
the final norm, the LM head and every layer past the deepest tap are never built or loaded. Parameter names
are those of the Hugging Face Qwen3ForCausalLM checkpoint, so its tensors load with `load_state_dict`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextEncoderConfig

__all__ = ["Qwen3TextEncoder", "text_encoder_wanted_keys"]


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32, cast back before the scale: the order Qwen3 was trained (and HF runs) with,
        # which keeps bf16 results bit-close to the reference.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Attention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = _RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = _RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            # Query head h reads KV head h // groups, as in the checkpoint's layout.
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.head_dim**-0.5)
        if mask is not None:
            # A query with no visible key (a left-pad position) gets a zero attention output. Recent torch
            # SDPA kernels already return zeros there, which is what the reference sees; pinning it keeps
            # the result independent of the backend (the math kernel of older torch gives NaN).
            out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class _MLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _DecoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.self_attn = _Attention(cfg)
        self.mlp = _MLP(cfg)
        self.input_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Qwen3Body(nn.Module):
    """Holds the weights under the names `model.embed_tokens` / `model.layers.{i}` of the checkpoint."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(_DecoderLayer(cfg) for _ in range(cfg.layers_to_run))


class Qwen3TextEncoder(nn.Module):
    """Prompt embeddings: the hidden states after decoder layers `cfg.out_layers`, concatenated per token.

    `hidden_states[k]` is numbered as in transformers (0 is the embedding output, k the output of decoder
    layer k, before any final norm), and the result has shape (B, L, len(out_layers) * hidden_size).
    """

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        if not cfg.out_layers or min(cfg.out_layers) < 0:
            raise ValueError(f"out_layers must be non-negative hidden-state indices, got {cfg.out_layers}")
        if cfg.layers_to_run >= cfg.num_layers:
            # transformers returns the *normed* last layer as hidden_states[num_layers]; tapping it would
            # need the final norm, which this encoder deliberately does not have.
            raise ValueError(
                f"out_layers {cfg.out_layers} reach layer {cfg.layers_to_run} of a {cfg.num_layers}-layer "
                "model; only layers before the last can be tapped"
            )
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError(f"{cfg.num_heads} query heads cannot share {cfg.num_kv_heads} KV heads evenly")
        self.cfg = cfg
        self.model = _Qwen3Body(cfg)

    def _rope(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        hd = self.cfg.head_dim
        # Frequencies built in fp32 on the CPU, as the reference builds its buffer at load time, then
        # positions 0..n-1 for every row: HF uses a plain arange when no position_ids are given, padding
        # or not, so left-padded prompts do not start at position 0.
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        pos = torch.arange(n, device=device, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq.to(device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def _mask(attention_mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        keep = attention_mask.to(torch.bool)
        if bool(keep.all()):
            # Nothing padded: plain causal attention (SDPA's is_causal), the path HF takes as well.
            return None
        causal = torch.ones(n, n, dtype=torch.bool, device=keep.device).tril()
        # Causal and key-side padding only; padded queries still compute (and reach the DiT).
        return causal[None, None] & keep[:, None, None, :]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask: (B, L) integer tensors. Returns (B, L, len(out_layers) * hidden)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        # The first norm's weight says where and in which dtype the encoder runs: the embedding table may be a
        # quantized one that returns float32.
        body = self.model
        ref = body.layers[0].input_layernorm.weight if len(body.layers) else body.embed_tokens.weight
        device = ref.device
        x = self.model.embed_tokens(input_ids.to(device)).to(ref.dtype)
        n = x.shape[1]
        cos, sin = self._rope(n, device, x.dtype)
        mask = self._mask(None if attention_mask is None else attention_mask.to(device), n)

        wanted = set(self.cfg.out_layers)
        taps: dict[int, torch.Tensor] = {0: x} if 0 in wanted else {}
        for i, layer in enumerate(self.model.layers, start=1):
            x = layer(x, cos, sin, mask)
            if i in wanted:
                taps[i] = x
        return torch.cat([taps[k] for k in self.cfg.out_layers], dim=-1)


def text_encoder_wanted_keys(cfg: TextEncoderConfig) -> Callable[[str], bool]:
    """Which checkpoint tensors (names with the `model.` prefix) the encoder needs: the embeddings and the
    decoder layers below `cfg.layers_to_run`. Deeper layers, `model.norm` and `lm_head` are never read."""
    run = cfg.layers_to_run
    prefix = "model.layers."

    def wanted(key: str) -> bool:
        if key == "model.embed_tokens.weight":
            return True
        if not key.startswith(prefix):
            return False
        index = key[len(prefix) :].split(".", 1)[0]
        return index.isdigit() and int(index) < run

    return wanted
