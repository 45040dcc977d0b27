"""The one converter: other checkpoint layouts to the official (BFL) tensor names.

Every model in this package is named after the official single files, so anything else
(the diffusers layout today) is renamed and re-fused here, once, before `load_state_dict`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

# diffusers transformer suffix -> official suffix, for keys that map one to one.
_DIT_SIMPLE = {
    "x_embedder.weight": "img_in.weight",
    "context_embedder.weight": "txt_in.weight",
    "time_guidance_embed.timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
    "time_guidance_embed.timestep_embedder.linear_2.weight": "time_in.out_layer.weight",
    "double_stream_modulation_img.linear.weight": "double_stream_modulation_img.lin.weight",
    "double_stream_modulation_txt.linear.weight": "double_stream_modulation_txt.lin.weight",
    "single_stream_modulation.linear.weight": "single_stream_modulation.lin.weight",
    "proj_out.weight": "final_layer.linear.weight",
}
_DOUBLE_SIMPLE = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "attn.to_out.0.weight": "img_attn.proj.weight",
    "attn.to_add_out.weight": "txt_attn.proj.weight",
    "ff.linear_in.weight": "img_mlp.0.weight",
    "ff.linear_out.weight": "img_mlp.2.weight",
    "ff_context.linear_in.weight": "txt_mlp.0.weight",
    "ff_context.linear_out.weight": "txt_mlp.2.weight",
}
_DOUBLE_QKV = {
    "img_attn.qkv.weight": ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight"),
    "txt_attn.qkv.weight": ("attn.add_q_proj.weight", "attn.add_k_proj.weight", "attn.add_v_proj.weight"),
}
_SINGLE_SIMPLE = {
    "attn.to_qkv_mlp_proj.weight": "linear1.weight",
    "attn.to_out.weight": "linear2.weight",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
}


def _swap_halves(w: Tensor) -> Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _take(sd: dict[str, Tensor], key: str) -> Tensor:
    try:
        return sd.pop(key)
    except KeyError:
        raise ValueError(f"diffusers transformer checkpoint is missing tensor {key!r}") from None


def dit_from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers `Flux2Transformer2DModel` state dict to the official names (q/k/v re-fused)."""
    sd = dict(state_dict)
    out: dict[str, Tensor] = {}
    for src, dst in _DIT_SIMPLE.items():
        out[dst] = _take(sd, src)
    # diffusers stores the final modulation as (scale, shift); the official file as (shift, scale).
    out["final_layer.adaLN_modulation.1.weight"] = _swap_halves(_take(sd, "norm_out.linear.weight"))
    doubles = sorted({int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    for i in doubles:
        src_p, dst_p = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for src, dst in _DOUBLE_SIMPLE.items():
            out[dst_p + dst] = _take(sd, src_p + src)
        for dst, parts in _DOUBLE_QKV.items():
            out[dst_p + dst] = torch.cat([_take(sd, src_p + p) for p in parts], dim=0)
    singles = sorted(
        {int(m.group(1)) for k in sd if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))}
    )
    for i in singles:
        for src, dst in _SINGLE_SIMPLE.items():
            out[f"single_blocks.{i}.{dst}"] = _take(sd, f"single_transformer_blocks.{i}.{src}")
    if sd:
        raise ValueError(f"unexpected tensors in diffusers transformer checkpoint: {sorted(sd)[:10]}")
    return out


def _vae_rename(key: str, num_up: int) -> str:
    k = key
    if k.startswith("quant_conv."):
        return "encoder." + k
    if k.startswith("post_quant_conv."):
        return "decoder." + k
    k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
    k = k.replace(".mid_block.attentions.0.group_norm.", ".mid.attn_1.norm.")
    k = k.replace(".mid_block.attentions.0.to_q.", ".mid.attn_1.q.")
    k = k.replace(".mid_block.attentions.0.to_k.", ".mid.attn_1.k.")
    k = k.replace(".mid_block.attentions.0.to_v.", ".mid.attn_1.v.")
    k = k.replace(".mid_block.attentions.0.to_out.0.", ".mid.attn_1.proj_out.")
    k = k.replace(".conv_norm_out.", ".norm_out.")
    k = k.replace(".conv_shortcut.", ".nin_shortcut.")
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)

    def up(m: re.Match[str]) -> str:
        return f"decoder.up.{num_up - 1 - int(m.group(1))}.{m.group(2)}"

    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)", up, k)
    k = re.sub(r"^(decoder\.up\.\d+\.)resnets\.(\d+)\.", r"\1block.\2.", k)
    k = re.sub(r"^(decoder\.up\.\d+\.)upsamplers\.0\.", r"\1upsample.", k)
    return k


def vae_from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers `AutoencoderKLFlux2` state dict to the official `ae.safetensors` names."""
    num_up = 1 + max(
        (int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))),
        default=-1,
    )
    out: dict[str, Tensor] = {}
    for key, t in state_dict.items():
        new = _vae_rename(key, num_up)
        # The official attention projections are 1x1 convolutions; diffusers keeps them as linears.
        if ".mid.attn_1." in new and new.endswith(".weight") and t.ndim == 2:
            t = t[:, :, None, None]
        out[new] = t
    return out


def is_diffusers_dit(keys: list[str] | set[str]) -> bool:
    return any(k.startswith("transformer_blocks.") or k == "x_embedder.weight" for k in keys)


def is_diffusers_vae(keys: list[str] | set[str]) -> bool:
    return any(".down_blocks." in k or k.startswith("quant_conv.") for k in keys)


def dit_to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `dit_from_diffusers`: official names to a diffusers `Flux2Transformer2DModel` state dict.

    Works on any subset (e.g. one block at a time), so huge checkpoints can be converted piecewise.
    """
    top = {b: d for d, b in _DIT_SIMPLE.items()}
    out: dict[str, Tensor] = {}
    for key in state_dict:
        t = state_dict[key]
        if key in top:
            out[top[key]] = t
        elif key == "final_layer.adaLN_modulation.1.weight":
            out["norm_out.linear.weight"] = _swap_halves(t)
        elif m := re.match(r"double_blocks\.(\d+)\.(.+)$", key):
            i, rest = m.groups()
            p = f"transformer_blocks.{i}."
            if rest in _DOUBLE_QKV:
                for name, part in zip(_DOUBLE_QKV[rest], t.chunk(3, dim=0), strict=True):
                    out[p + name] = part
            else:
                (dif,) = [d for d, b in _DOUBLE_SIMPLE.items() if b == rest] or [None]
                if dif is None:
                    raise ValueError(f"unexpected tensor in official transformer checkpoint: {key!r}")
                out[p + dif] = t
        elif m := re.match(r"single_blocks\.(\d+)\.(.+)$", key):
            i, rest = m.groups()
            (dif,) = [d for d, b in _SINGLE_SIMPLE.items() if b == rest] or [None]
            if dif is None:
                raise ValueError(f"unexpected tensor in official transformer checkpoint: {key!r}")
            out[f"single_transformer_blocks.{i}.{dif}"] = t
        else:
            raise ValueError(f"unexpected tensor in official transformer checkpoint: {key!r}")
    return out


def vae_to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `vae_from_diffusers` (names found by renaming every diffusers-style candidate)."""
    num_up = 1 + max(
        (int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=-1
    )
    out: dict[str, Tensor] = {}
    for key, t in state_dict.items():
        k = key
        if k.startswith("encoder.quant_conv."):
            k = k.removeprefix("encoder.")
        elif k.startswith("decoder.post_quant_conv."):
            k = k.removeprefix("decoder.")
        k = re.sub(r"\.mid\.block_(\d+)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", k)
        for bfl, dif in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            k = k.replace(f".mid.attn_1.{bfl}.", f".mid_block.attentions.0.{dif}.")
        k = k.replace(".norm_out.", ".conv_norm_out.").replace(".nin_shortcut.", ".conv_shortcut.")
        k = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", k)
        k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
        k = re.sub(
            r"^decoder\.up\.(\d+)\.(block|upsample)",
            lambda m: f"decoder.up_blocks.{num_up - 1 - int(m.group(1))}.{m.group(2)}",
            k,
        )
        k = re.sub(r"^(decoder\.up_blocks\.\d+\.)block\.(\d+)\.", r"\1resnets.\2.", k)
        k = re.sub(r"^(decoder\.up_blocks\.\d+\.)upsample\.", r"\1upsamplers.0.", k)
        if ".mid_block.attentions.0." in k and k.endswith(".weight") and t.ndim == 4:
            t = t[:, :, 0, 0]
        out[k] = t
    return out
