"""The FLUX.2 flow transformer (DiT), with module names equal to the official single-file keys."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kleinbild.config import DiTConfig
from kleinbild.files import release_file_pages
from kleinbild.step_cache import StepCache

# A modulation triple: (shift, scale, gate), each (B, 1, H) or (B, S, H) when references carry their own.
Mod = tuple[Tensor, Tensor, Tensor]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of `t * factor` in [cos, sin] order, computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * factor)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[Tensor, Tensor]:
    """cos/sin tables (..., S, head_dim/2) for integer position ids (..., S, n_axes).

    Computed in float64 so that large position values stay exact before the cast.
    """
    cos, sin = [], []
    pos = ids.to(torch.float64)
    for i, d in enumerate(axes_dim):
        omega = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d))
        ang = pos[..., i : i + 1] * omega
        cos.append(torch.cos(ang))
        sin.append(torch.sin(ang))
    return torch.cat(cos, dim=-1).float(), torch.cat(sin, dim=-1).float()


def complex_rope(device: torch.device) -> bool:
    """Whether the rotation runs as one complex product (`apply_rope`'s `rot`): on the CPU, and on CUDA unless
    compiling (inductor fuses the real form into a single kernel). MPS keeps the real form: its complex kernels
    are incomplete. The meta device counts as CUDA, so the GPU path's kernels can be counted without a GPU."""
    if device.type == "cpu":
        return True
    return device.type in ("cuda", "meta") and not torch.compiler.is_compiling()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, rot: Tensor | None = None) -> Tensor:
    """Rotate adjacent pairs of the head dim. x: (B, heads, S, D); cos/sin: (B|1, 1, S, D/2).

    With `rot` (the same table as complex64, cos + i sin), the rotation is one complex product: the same
    arithmetic in one pass instead of eight over strided halves, and on a GPU about 0.4 of the bytes moved (see
    BENCHMARKS.md). Tested equal to the real form (float32 to 1e-6, bfloat16 within one unit in the last place).
    """
    xf = x.float().unflatten(-1, (-1, 2))
    if rot is not None:
        return torch.view_as_real(torch.view_as_complex(xf.contiguous()) * rot).flatten(-2).to(x.dtype)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear whose forward can use a copy of the weight in oneDNN's blocked layout (CPU, bfloat16, inference).

    F.linear hands oneDNN the plain weight, which it reorders on every call; the blocked copy is made once, at the
    first call, and the plain weight's mapped file pages are released, so memory stays what it was. The values are
    the same (tested bit for bit). Off by default: each matmul gets 3-5% faster, but making the copies costs about
    as much as four steps save (klein-4b, 2 cores: see BENCHMARKS.md), so it pays only in a process that generates
    many images. The copy is keyed by the weight's storage and version, so an in-place change (a fused LoRA) or a
    move makes a new one.
    """

    prepack = False  # set per instance by Flux2Transformer.use_prepacked_linears

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (
            self.prepack
            and x.device.type == "cpu"
            and x.dtype == w.dtype == torch.bfloat16
            and not (torch.is_grad_enabled() and w.requires_grad)
        ):
            return torch.ops.mkldnn._linear_pointwise(x, self._packed(x), self.bias, "none", [], "")
        return F.linear(x, w, self.bias)

    def _packed(self, x: Tensor) -> Tensor:
        w = self.weight
        try:
            key = (w.data_ptr(), w._version)
        except RuntimeError:  # an inference tensor has no version counter and cannot be changed in place later
            key = (w.data_ptr(), -1)
        cached = self.__dict__.get("_pack")
        if cached is None or cached[0] != key:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), max(1, x.numel() // x.shape[-1]))
            release_file_pages([w])
            self.__dict__["_pack"] = cached = (key, packed)
        return cached[1]


def prepacked_linear_available() -> bool:
    """Whether this PyTorch has oneDNN with bfloat16 support (the packed path's requirement)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class QKNorm(nn.Module):
    """RMSNorm of queries and keys over the head dim, in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.scale, self.eps, fused=x.device.type != "cpu")


def rms_norm(x: Tensor, scale: Tensor, eps: float, fused: bool) -> Tensor:
    """x / rms(x) in float32, rounded to x's dtype, then times the scale (the reference's two roundings).

    `fused` computes the first part with PyTorch's fused kernel: one pass instead of seven on a GPU (diffusers runs
    it too), bit for bit the same values (tested on the CPU, where the unfused form is the faster one)."""
    if fused:
        return F.rms_norm(x, x.shape[-1:], eps=eps) * scale.to(x.dtype)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * scale.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = Linear(dim, dim, bias=False)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return split_qkv(self.qkv(x), self.num_heads, self.norm)


def split_qkv(qkv: Tensor, num_heads: int, norm: QKNorm) -> tuple[Tensor, Tensor, Tensor]:
    """(B, S, 3*H) -> three (B, heads, S, head_dim), with q and k normalised."""
    b, s, _ = qkv.shape
    q, k, v = qkv.view(b, s, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return norm.query_norm(q), norm.key_norm(k), v


class GatedMLP(nn.Module):
    """silu(a) * b between the two linears; children named 0 and 2 like the official keys."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.add_module("0", Linear(dim, 2 * hidden, bias=False))
        self.add_module("2", Linear(hidden, dim, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self._modules["2"](swiglu(self._modules["0"](x)))


def swiglu(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


class Modulation(nn.Module):
    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.lin = nn.Linear(dim, 3 * sets * dim, bias=False)

    def forward(self, vec: Tensor) -> list[Mod]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.sets, dim=-1)
        return [tuple(out[3 * i : 3 * i + 3]) for i in range(self.sets)]  # type: ignore[misc]


def modulate(x: Tensor, mod: Mod) -> Tensor:
    shift, scale, _ = mod
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift


@dataclass
class KVCache:
    """Per-block post-norm, post-RoPE keys and values of the reference tokens."""

    double: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    single: list[tuple[Tensor, Tensor]] = field(default_factory=list)


@dataclass
class _Ctx:
    """What the attention of every block needs to know about the sequence layout."""

    cos: Tensor
    sin: Tensor
    n_txt: int
    rot: Tensor | None = None  # cos + i sin, for the one-pass rotation (apply_rope, complex_rope)
    n_ref: int = 0  # reference tokens present in this sequence, right after the text (KV extract)
    cached: tuple[Tensor, Tensor] | None = None  # reference K/V to insert after the text (KV cached)
    store: list[tuple[Tensor, Tensor]] | None = None  # where to put the extracted reference K/V


def joint_attention(q: Tensor, k: Tensor, v: Tensor, ctx: _Ctx, kv_slot: int | None = None) -> Tensor:
    """Attention over [text, (references), image] tokens; returns (B, S, heads*head_dim)."""
    q, k = apply_rope(q, ctx.cos, ctx.sin, ctx.rot), apply_rope(k, ctx.cos, ctx.sin, ctx.rot)
    t, r = ctx.n_txt, ctx.n_ref
    if ctx.cached is not None:
        k_ref, v_ref = ctx.cached
        k = torch.cat([k[:, :, :t], k_ref, k[:, :, t:]], dim=2)
        v = torch.cat([v[:, :, :t], v_ref, v[:, :, t:]], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
    elif r > 0:
        if ctx.store is not None:
            ctx.store.append((k[:, :, t : t + r], v[:, :, t : t + r]))
        # References attend only to themselves; text and image tokens attend to everything.
        q_ti = torch.cat([q[:, :, :t], q[:, :, t + r :]], dim=2)
        o_ti = F.scaled_dot_product_attention(q_ti, k, v)
        o_ref = F.scaled_dot_product_attention(q[:, :, t : t + r], k[:, :, t : t + r], v[:, :, t : t + r])
        out = torch.cat([o_ti[:, :, :t], o_ref, o_ti[:, :, t:]], dim=2)
    else:
        if v.device.type == "cpu":
            v = v.contiguous()  # the CPU flash kernel is ~3% faster on a dense v than on a view of the fused qkv
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.img_attn = SelfAttention(h, cfg.num_heads)
        self.img_mlp = GatedMLP(h, cfg.mlp_hidden)
        self.txt_attn = SelfAttention(h, cfg.num_heads)
        self.txt_mlp = GatedMLP(h, cfg.mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, mod_img: list[Mod], mod_txt: list[Mod], ctx: _Ctx) -> tuple[
        Tensor, Tensor
    ]:
        iq, ik, iv = self.img_attn.qkv_heads(modulate(img, mod_img[0]))
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(txt, mod_txt[0]))
        attn = joint_attention(
            torch.cat([tq, iq], dim=2), torch.cat([tk, ik], dim=2), torch.cat([tv, iv], dim=2), ctx
        )
        t = txt.shape[1]
        txt = txt + mod_txt[0][2] * _rows(self.txt_attn.proj, attn[:, :t])
        img = img + mod_img[0][2] * _rows(self.img_attn.proj, attn[:, t:])
        img = img + mod_img[1][2] * self.img_mlp(modulate(img, mod_img[1]))
        txt = txt + mod_txt[1][2] * self.txt_mlp(modulate(txt, mod_txt[1]))
        return img, txt


def _rows(linear: nn.Module, x: Tensor) -> Tensor:
    """`linear` on a token slice as one (tokens, features) matrix. Given the 3-D slice, F.linear takes a batched
    product and, on the CPU, copies the whole weight on every call (measured: 43 vs 10 ms, klein-4b's 3072x3072
    projection over 1024 tokens)."""
    return linear(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.mlp_hidden = cfg.mlp_hidden
        self.linear1 = Linear(h, 3 * h + 2 * cfg.mlp_hidden, bias=False)
        self.linear2 = Linear(h + cfg.mlp_hidden, h, bias=False)
        self.norm = QKNorm(cfg.head_dim)

    def forward(self, x: Tensor, mod: Mod, ctx: _Ctx) -> Tensor:
        h = x.shape[-1]
        qkv, mlp = self.linear1(modulate(x, mod)).split([3 * h, 2 * self.mlp_hidden], dim=-1)
        q, k, v = split_qkv(qkv, self.num_heads, self.norm)
        attn = joint_attention(q, k, v, ctx)
        return x + mod[2] * self.linear2(torch.cat([attn, swiglu(mlp)], dim=-1))


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, bias=False)
        self.out_layer = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=False))
        self.linear = nn.Linear(hidden, out_channels, bias=False)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift)


def _blend(ref: list[Mod], img: list[Mod], n_ref: int, n_img: int) -> list[Mod]:
    """Per-token modulation for an image stream laid out as [references, image]."""
    out = []
    for r_set, i_set in zip(ref, img, strict=True):
        out.append(
            tuple(
                torch.cat([r.expand(-1, n_ref, -1), i.expand(-1, n_img, -1)], dim=1)
                for r, i in zip(r_set, i_set, strict=True)
            )
        )
    return out  # type: ignore[return-value]


class Flux2Transformer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        if sum(cfg.axes_dim) != cfg.head_dim:
            raise ValueError(f"RoPE axes {cfg.axes_dim} must add up to the head dim {cfg.head_dim}")
        self.img_in = nn.Linear(cfg.in_channels, h, bias=False)
        self.time_in = MLPEmbedder(cfg.time_dim, h)
        self.txt_in = nn.Linear(cfg.context_dim, h, bias=False)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single))
        self.double_stream_modulation_img = Modulation(h, 2)
        self.double_stream_modulation_txt = Modulation(h, 2)
        self.single_stream_modulation = Modulation(h, 1)
        self.final_layer = LastLayer(h, cfg.in_channels)

    def use_prepacked_linears(self, enabled: bool = True) -> bool:
        """Block linears use a once-reordered weight on the CPU in bfloat16 (see `Linear`); off frees the copies.

        Returns whether it is on: a PyTorch without oneDNN bfloat16 keeps the plain path."""
        enabled = enabled and prepacked_linear_available()
        for m in self.modules():
            if isinstance(m, Linear):
                m.prepack = enabled
                if not enabled:
                    m.__dict__.pop("_pack", None)
        return enabled

    def _vec(self, timesteps: Tensor, dtype: torch.dtype) -> Tensor:
        return self.time_in(timestep_embedding(timesteps, self.cfg.time_dim).to(dtype))

    def _rope(self, ids: list[Tensor]) -> tuple[Tensor, Tensor]:
        cos, sin = rope_tables(torch.cat(ids, dim=-2), self.cfg.axes_dim, self.cfg.theta)
        if cos.ndim == 2:
            cos, sin = cos[None], sin[None]
        return cos[:, None], sin[:, None]

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        ref: Tensor | None = None,
        ref_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
        step_cache: StepCache | None = None,
    ) -> Tensor:
        """Velocity for the image tokens.

        img (B, N, C), txt (B, L, D), ids (B, *, 4) or (*, 4), timesteps (B,) in [0, 1].
        - `ref`: reference tokens appended after the image tokens (the plain path); their prediction is dropped.
        - `kv_cache` (KV models, steps after the first): no reference tokens; the cached K/V joins the attention.
        - `step_cache`: one generation's step cache (`kleinbild.step_cache`); a step it deems unchanged skips blocks.
        """
        if ref is not None and ref_ids is None:
            raise ValueError("reference tokens need their position ids")
        vec = self._vec(timesteps, img.dtype)
        mods = self._modulations(vec)
        x = self.img_in(img)
        if ref is not None:
            x = torch.cat([x, self.img_in(ref)], dim=1)
            cos, sin = self._rope([txt_ids, img_ids, ref_ids])
        else:
            cos, sin = self._rope([txt_ids, img_ids])
        return self._blocks(x, self.txt_in(txt), vec, mods, cos, sin, img.shape[1], kv_cache=kv_cache,
                            step_cache=step_cache)

    def extract_kv(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        ref: Tensor,
        ref_ids: Tensor,
        step_cache: StepCache | None = None,
    ) -> tuple[Tensor, KVCache]:
        """The first step of a KV model: the velocity, and the reference tokens' keys and values of every block.

        References are modulated at t=0 and attend only to themselves, so their K/V do not depend on the step and
        later steps can reuse them (`forward(..., kv_cache=)`).
        """
        dtype = img.dtype
        n_img, n_txt, n_ref = img.shape[1], txt.shape[1], ref.shape[1]
        vec = self._vec(timesteps, dtype)
        mod_img, mod_txt, mod_single = self._modulations(vec)
        ref_vec = self._vec(torch.zeros_like(timesteps), dtype)
        ref_img = self.double_stream_modulation_img(ref_vec)  # references have no text stream: no txt modulation
        (ref_single,) = self.single_stream_modulation(ref_vec)
        mod_img = _blend(ref_img, mod_img, n_ref, n_img)
        mod_single = tuple(
            torch.cat([s.expand(-1, n_txt, -1), r.expand(-1, n_ref, -1), s.expand(-1, n_img, -1)], dim=1)
            for s, r in zip(mod_single, ref_single, strict=True)
        )
        x = torch.cat([self.img_in(ref), self.img_in(img)], dim=1)
        cos, sin = self._rope([txt_ids, ref_ids, img_ids])
        store = KVCache()
        out = self._blocks(x, self.txt_in(txt), vec, (mod_img, mod_txt, mod_single), cos, sin, n_img,
                           n_ref=n_ref, store=store, step_cache=step_cache)
        return out, store

    def _modulations(self, vec: Tensor) -> tuple[list[Mod], list[Mod], Mod]:
        (single,) = self.single_stream_modulation(vec)
        return self.double_stream_modulation_img(vec), self.double_stream_modulation_txt(vec), single

    def _blocks(self, x: Tensor, txt_h: Tensor, vec: Tensor, mods: tuple, cos: Tensor, sin: Tensor, n_img: int,
                n_ref: int = 0, store: KVCache | None = None, kv_cache: KVCache | None = None,
                step_cache: StepCache | None = None) -> Tensor:
        """The double- and single-stream blocks and the final layer over [text, (references), image] tokens."""
        mod_img, mod_txt, mod_single = mods
        n_txt = txt_h.shape[1]
        rot = torch.complex(cos, sin) if complex_rope(cos.device) else None
        img = slice(n_ref, n_ref + n_img)  # the image tokens in the double stream (references first in a KV extract)
        start = x[:, img]
        mode = step_cache.spec.mode if step_cache is not None else None
        if mode == "teacache" and step_cache.reuse(modulate(start, mod_img[0])):  # type: ignore[union-attr]
            return self.final_layer(start + step_cache.residual, vec)  # type: ignore[union-attr]
        for i, block in enumerate(self.double_blocks):
            ctx = _Ctx(cos, sin, n_txt, n_ref=n_ref, store=store.double if store else None, rot=rot)
            if kv_cache is not None:
                ctx.cached = kv_cache.double[i]
            x, txt_h = block(x, txt_h, mod_img, mod_txt, ctx)
            if i == 0 and mode == "first-block":
                first = x[:, img]
                if step_cache.reuse(first - start):  # type: ignore[union-attr]
                    return self.final_layer(first + step_cache.residual, vec)  # type: ignore[union-attr]
                start = first
        x = torch.cat([txt_h, x], dim=1)
        for i, block in enumerate(self.single_blocks):
            ctx = _Ctx(cos, sin, n_txt, n_ref=n_ref, store=store.single if store else None, rot=rot)
            if kv_cache is not None:
                ctx.cached = kv_cache.single[i]
            x = block(x, mod_single, ctx)
        x = x[:, n_txt + n_ref : n_txt + n_ref + n_img]
        if step_cache is not None:
            step_cache.store(x - start)  # what the skipped blocks would add, kept beside the uncached result
        return self.final_layer(x, vec)
