"""The FLUX.2 autoencoder: images in [-1, 1] <-> normalised, 2x2-patchified latents.

Module names are the official `ae.safetensors` tensor names, so the official file loads with
`load_state_dict(strict=True, assign=True)` into a model built on the meta device. Anything in the
diffusers layout goes through `kleinbild.convert.vae_from_diffusers` first.

Precision: every layer runs in the dtype of the weights (GroupNorm and attention included, as the
reference and diffusers do). Only the BatchNorm (de)normalisation of the latent is done in float32,
because it is a handful of elementwise operations on a small tensor and keeps bf16 models from
rounding the running statistics a second time. The BatchNorm buffers themselves follow the module
dtype like any other buffer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kleinbild.config import AEConfig

# Fixed by the architecture, not the checkpoint: every norm in the network uses it.
_NORM_EPS = 1e-6


def _group_norm(cfg: AEConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=_NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: AEConfig, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _group_norm(cfg, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _group_norm(cfg, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # Only blocks that change the width carry a projection; the official file has no identity tensors.
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        # Without autograd the activations and the residual sum can work in place: the same values, and at full
        # resolution two fewer image-sized tensors alive at once (training needs silu's input for its backward).
        lean = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=lean))
        h = self.conv2(F.silu(self.norm2(h), inplace=lean))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(skip) if lean else skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; projections are 1x1 convolutions as in the file."""

    def __init__(self, cfg: AEConfig, channels: int):
        super().__init__()
        self.norm = _group_norm(cfg, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # Tokens as (B, H*W, C) rows, the layout the fused attention kernels take (a channel-major view of the
        # convolutions' output has a strided last dimension, which sends a GPU's attention to its unfused path);
        # the 1x1 convolutions are then plain matrix products of the same weights.
        n = self.norm(x).flatten(2).transpose(1, 2).contiguous()
        q, k, v = (F.linear(n, m.weight.view(c, c), m.bias)[:, None] for m in (self.q, self.k, self.v))
        out = F.linear(F.scaled_dot_product_attention(q, k, v)[:, 0], self.proj_out.weight.view(c, c),
                       self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w).contiguous(memory_format=_memory_format(x))


def _memory_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric padding (right and bottom only) is what the weights were trained with; a symmetric
        # padding=1 would shift the sampling grid by one pixel.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


# For each output phase (row or column parity) of "nearest 2x, then a 3x3 convolution": which of the three kernel
# taps fall on the low-resolution pixel before and which on the one after (the taps on a repeated pixel add up).
_PHASE_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))


def subpixel_weight(w: Tensor) -> Tensor:
    """(C_out, C_in, 3, 3) -> (4 C_out, C_in, 2, 2): the 2x2 kernel of each output phase (a, b), groups in that order.

    Upsampling by repetition and then convolving 3x3 equals, per phase, a 2x2 convolution of the low-resolution
    input: 16 multiply-adds per input pixel and channel pair instead of 36 (the same sums in another order).
    """
    phases = []
    for rows in _PHASE_TAPS:
        for cols in _PHASE_TAPS:
            k = w.new_zeros(w.shape[0], w.shape[1], 2, 2)
            for i, r in enumerate(rows):
                for j, c in enumerate(cols):
                    k[:, :, i, j] = w[:, :, list(r)][:, :, :, list(c)].sum(dim=(2, 3))
            phases.append(k)
    return torch.cat(phases)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.subpixel = False  # see AutoEncoder.use_subpixel_upsample
        # The phase kernels and the bias repeated per phase, derived once per weight tensor (key: where it lives).
        self._phases: tuple[tuple[int, torch.dtype, torch.device], Tensor, Tensor | None] | None = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._phases = None  # new weights: the phase kernels are derived again
        super()._load_from_state_dict(*args, **kwargs)

    def phases(self) -> tuple[Tensor, Tensor | None]:
        """The phase kernels and the bias per phase, derived again only when the weight changed. Inside a compiled
        graph the prepared ones are used as they are (reading a data pointer would break the graph)."""
        w = self.conv.weight
        if torch.compiler.is_compiling() and self._phases is not None:
            return self._phases[1], self._phases[2]
        key = (w.data_ptr(), w.dtype, w.device)
        if self._phases is None or self._phases[0] != key:
            k = subpixel_weight(w.detach().float()).to(w.dtype)
            if w.is_contiguous(memory_format=torch.channels_last):
                k = k.contiguous(memory_format=torch.channels_last)
            bias = self.conv.bias.detach().repeat(4) if self.conv.bias is not None else None
            self._phases = (key, k, bias)
        return self._phases[1], self._phases[2]

    def forward(self, x: Tensor) -> Tensor:
        if not self.subpixel:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        w = self.conv.weight
        kernels, bias = self.phases()
        n, _, h, wd = x.shape
        co = w.shape[0]
        # Output (r, c) of the 2x2 convolution over the input padded by one sees input rows r-1, r and columns
        # c-1, c: phase 0 of pixel i sits at r = i, phase 1 at r = i + 1.
        y = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernels, bias)
        out = torch.empty((n, co, 2 * h, 2 * wd), dtype=y.dtype, device=y.device, memory_format=_memory_format(x))
        for a in (0, 1):
            for b in (0, 1):
                g = 2 * a + b
                out[:, :, a::2, b::2] = y[:, g * co : (g + 1) * co, a : a + h, b : b + wd]
        return out


class MidBlock(nn.Module):
    def __init__(self, cfg: AEConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    def __init__(self, cfg: AEConfig, in_ch: int, out_ch: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(cfg, in_ch if j == 0 else out_ch, out_ch) for j in range(cfg.num_res_blocks)
        )
        self.downsample = Downsample(out_ch) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    def __init__(self, cfg: AEConfig, in_ch: int, out_ch: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(cfg, in_ch if j == 0 else out_ch, out_ch) for j in range(cfg.num_res_blocks + 1)
        )
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Image -> (mean, logvar) moments, quant_conv included (it lives under `encoder.` in the file)."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(cfg, cfg.ch if i == 0 else widths[i - 1], widths[i], downsample=i != last)
            for i in range(len(widths))
        )
        self.mid = MidBlock(cfg, widths[-1])
        self.norm_out = _group_norm(cfg, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return self.quant_conv(h)


class Decoder(nn.Module):
    """Latent (z channels, unpatchified) -> image, post_quant_conv included."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        widths = [(cfg.decoder_ch or cfg.ch) * m for m in cfg.ch_mult]
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(cfg, widths[-1])
        # up[i] works at the resolution of down[i], so up[-1] runs first; index order is the file's.
        self.up = nn.ModuleList(
            UpLevel(cfg, widths[min(i + 1, len(widths) - 1)], widths[i], upsample=i != 0)
            for i in range(len(widths))
        )
        self.norm_out = _group_norm(cfg, widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid(h)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _patchify(z: Tensor, p: int) -> Tensor:
    # c (i p) (j p) -> (c p p) i j: channel-major, the patch offsets vary fastest.
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * p * p, h // p, w // p)


def _unpatchify(z: Tensor, p: int) -> Tensor:
    b, c, h, w = z.shape
    z = z.reshape(b, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c // (p * p), h * p, w * p)


class AutoEncoder(nn.Module):
    """The FLUX.2 VAE with the latent BatchNorm statistics; see the module docstring for precision."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # Only its running statistics are used (never its forward), so train/eval mode makes no difference.
        self.bn = nn.BatchNorm2d(cfg.latent_channels, eps=cfg.bn_eps, affine=False, track_running_stats=True)
        self._channels_last = False

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def use_channels_last(self) -> None:
        """Keep the convolution weights (and feed activations) channels-last: oneDNN's bf16 convolutions, 92% of a
        decode on CPU, skip a layout reorder per call (measured: decode 0.93x of diffusers' time, from 1.08x)."""
        if not self._channels_last:  # pipelines sharing one autoencoder each ask
            self.to(memory_format=torch.channels_last)
            self._channels_last = True

    def use_subpixel_upsample(self, enabled: bool = True) -> None:
        """Decode each "nearest 2x + 3x3 convolution" as four 2x2 convolutions of the low-resolution input (see
        `subpixel_weight`): 4/9 of those layers' work, the same result up to the order of the sums."""
        for m in self.decoder.modules():
            if isinstance(m, Upsample):
                m.subpixel = enabled

    def prepare_upsample(self) -> None:
        """Derive the sub-pixel phase kernels now (before compiling, so a compiled decoder finds them ready)."""
        for m in self.modules():
            if isinstance(m, Upsample) and m.subpixel:
                m.phases()

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last else x

    def _bn_stats(self) -> tuple[Tensor, Tensor]:
        mean = self.bn.running_mean.float().view(1, -1, 1, 1)
        std = torch.sqrt(self.bn.running_var.float().view(1, -1, 1, 1) + self.cfg.bn_eps)
        return mean, std

    def encode(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) image in [-1, 1] -> (B, latent_channels, H/ds, W/ds) normalised latent.

        H and W must be multiples of `cfg.downscale`. The posterior mean is used (no sampling). The result
        has the dtype of `x`.
        """
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"expected an image batch (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}"
            )
        ds = self.cfg.downscale
        if x.shape[-2] % ds or x.shape[-1] % ds:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of {ds}")
        moments = self.encoder(self._layout(x.to(self.dtype)))
        mean = moments[:, : self.cfg.z_channels]
        lat = _patchify(mean, self.cfg.patch).float()
        bn_mean, bn_std = self._bn_stats()
        return ((lat - bn_mean) / bn_std).to(x.dtype)

    def decode(self, z: Tensor) -> Tensor:
        """(B, latent_channels, h, w) normalised latent -> (B, out_channels, h*ds, w*ds) image, not clamped.

        The result has the dtype of `z`.
        """
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(
                f"expected a latent batch (B, {self.cfg.latent_channels}, h, w), got {tuple(z.shape)}"
            )
        bn_mean, bn_std = self._bn_stats()
        lat = z.float() * bn_std + bn_mean
        lat = _unpatchify(lat, self.cfg.patch).to(self.dtype)
        return self.decoder(self._layout(lat)).to(z.dtype).contiguous()


__all__ = ["AutoEncoder"]
