"""Kernels and bytes of the GPU code path, counted without a GPU: both engines run on the meta device, where every
operation computes only shapes, and each one that is not a view is counted as a kernel with the bytes of its
tensor inputs and outputs (each read or written once: a lower bound of its memory traffic).

At eager speed on a GPU the DiT step's non-matmul work (norms, RoPE, modulation, activations) is bound by memory
bandwidth, so these bytes are what separates two engines that run the same matrix products. The meta device
takes kleinbild's GPU path (`transformer.complex_rope`, the fused RMSNorm), so the count models a CUDA run.
`python -m kleinbild.bench.traffic [--preset klein-4b --size 1024]` prints both engines per block and per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kleinbild.config import ModelPreset, get_preset

# Matrix products and attention: the same work in both engines, fused into one kernel each.
PRODUCTS = frozenset({"mm", "addmm", "bmm", "linear", "matmul", "conv2d", "convolution", "scaled_dot_product_attention",
                      "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                      "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"})
# Composite operations that are one kernel on a GPU (the meta device would count their reference decomposition).
_KERNELS = frozenset({"scaled_dot_product_attention", "rms_norm", "layer_norm", "group_norm", "upsample_nearest2d"})
# Creating or aliasing a tensor moves nothing.
_FREE = frozenset({"empty", "empty_strided", "empty_like", "lift_fresh", "detach", "alias", "_unsafe_view"})


class KernelCount(TorchDispatchMode):
    """Counts the operations that launch a kernel, and the bytes of their tensor operands, per operation name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        # Composite operations (reshape, linear, ...) reach the mode whole: their parts run through it, so that a
        # reshape that copies counts its copy and one that can view counts nothing.
        name = func._schema.name.split("::")[-1]
        if name not in _KERNELS:
            with self:
                parts = func.decompose(*args, **kwargs)
            if parts is not NotImplemented:
                return parts
        out = func(*args, **kwargs)
        returns = func._schema.returns
        if name in _FREE or (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)):
            return out
        results = [t for t in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(t, torch.Tensor)]
        operands = [*args, *kwargs.values(), *results]
        flat = [t for a in operands for t in (a if isinstance(a, (list, tuple)) else [a])]
        self.calls[name] += 1
        self.bytes[name] += sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
        if name == "scaled_dot_product_attention" and any(t.stride(-1) != 1 for t in args[:3]):
            # The fused GPU kernels need a unit stride in the head dim; otherwise the unfused path writes the float32
            # score matrix and reads it back through the softmax and the product with v (four passes).
            q, k = args[0], args[1]
            self.calls["attention_unfused"] += 1
            self.bytes["attention_unfused"] += 16 * q.shape[:-1].numel() * k.shape[-2]
        return out

    def summary(self) -> dict[str, Any]:
        other = {k: v for k, v in self.bytes.items() if k not in PRODUCTS}
        return {"kernels": sum(self.calls.values()),
                "other_kernels": sum(n for k, n in self.calls.items() if k not in PRODUCTS),
                "other_gb": round(sum(other.values()) / 1e9, 4),
                "top": {k: [self.calls[k], round(v / 1e9, 4)]
                        for k, v in sorted(other.items(), key=lambda kv: -kv[1])[:8]}}


def count(fn: Callable[[], Any]) -> dict[str, Any]:
    with torch.inference_mode(), KernelCount() as log:
        fn()
    return log.summary()


def _dit_runs(p: ModelPreset, depth: int, single: int, size: int, dtype: torch.dtype) -> dict[str, Callable]:
    """One forward of each engine's transformer with `depth` + `single` blocks, on meta inputs."""
    from diffusers import Flux2Transformer2DModel

    from kleinbild.bench.cpu import _diffusers_transformer_config
    from kleinbild.transformer import Flux2Transformer

    cfg = dataclasses.replace(p.dit, depth=depth, depth_single=single)
    peer_cfg = {k: v for k, v in _diffusers_transformer_config(cfg).items() if not k.startswith("_")}
    n, m = (size // p.ae.downscale) ** 2, p.text.max_length
    with torch.device("meta"):
        ours, peer = Flux2Transformer(cfg).to(dtype), Flux2Transformer2DModel(**peer_cfg).to(dtype)
        img, txt = torch.empty(1, n, cfg.in_channels, dtype=dtype), torch.empty(1, m, cfg.context_dim, dtype=dtype)
        img_ids, txt_ids = torch.zeros(n, 4, dtype=torch.long), torch.zeros(m, 4, dtype=torch.long)
        t = torch.empty(1)
    return {"kleinbild": lambda: ours(img, img_ids, txt, txt_ids, t),
            "diffusers": lambda: peer(hidden_states=img, encoder_hidden_states=txt, timestep=t, img_ids=img_ids[None],
                                      txt_ids=txt_ids[None], guidance=None, return_dict=False)}


def _minus(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"kernels": a["kernels"] - b["kernels"], "other_kernels": a["other_kernels"] - b["other_kernels"],
            "other_gb": round(a["other_gb"] - b["other_gb"], 4), "top": a["top"]}


def dit(preset: str, size: int = 1024, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Per engine: a double-stream block, a single-stream block and one whole step of the preset at `size`."""
    p = get_preset(preset)
    runs = {shape: _dit_runs(p, *shape, size, dtype) for shape in ((0, 0), (1, 0), (0, 1))}
    res: dict[str, Any] = {}
    for engine in ("kleinbild", "diffusers"):
        base, double, single = (count(runs[s][engine]) for s in ((0, 0), (1, 0), (0, 1)))
        d, s = _minus(double, base), _minus(single, base)
        step = {k: round(base[k] + p.dit.depth * d[k] + p.dit.depth_single * s[k], 4)
                for k in ("kernels", "other_kernels", "other_gb")}
        res[engine] = {"double_block": d, "single_block": s, "step": step}
    return res


def decoder(preset: str, size: int = 1024, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Per engine: one decode of a `size` x `size` latent to an image tensor."""
    from diffusers import AutoencoderKLFlux2

    from kleinbild.autoencoder import AutoEncoder
    from kleinbild.bench.cpu import _diffusers_vae_config

    p = get_preset(preset)
    h = size // p.ae.downscale
    with torch.device("meta"):
        ours = AutoEncoder(p.ae).to(dtype)
        peer = AutoencoderKLFlux2(**{k: v for k, v in _diffusers_vae_config(p.ae).items() if not k.startswith("_")})
        peer = peer.to(dtype)
        z = torch.empty(1, p.ae.latent_channels, h, h, dtype=dtype)
        z_peer = torch.empty(1, p.ae.z_channels, h * p.ae.patch, h * p.ae.patch, dtype=dtype)
    return {"kleinbild": count(lambda: ours.decode(z)),
            "diffusers": count(lambda: peer.decode(z_peer, return_dict=False))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kleinbild.bench.traffic", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="klein-4b")
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args(argv)
    print(json.dumps({"preset": args.preset, "size": args.size, "dit": dit(args.preset, args.size),
                      "decoder": decoder(args.preset, args.size)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
