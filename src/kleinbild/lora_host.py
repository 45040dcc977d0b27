"""Applying LoRA adapters to a transformer: several at once, each through forward hooks on its layers (exact and
switchable: `set_scale`, `remove`) or merged into the weights (`fuse`, for speed; quantized layers stay hooked).
Module names, and so the state dict, never change."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kleinbild.lora import LoraWeights

log = logging.getLogger(__name__)


@dataclass
class _Adapter:
    name: str
    modules: dict[str, tuple[Tensor, Tensor, float]]  # module -> (A, B, internal scale)
    scale: float
    source: str
    fused: bool = False
    fused_modules: list[str] = field(default_factory=list)


class LoraHost:
    """The adapters attached to one transformer, and the forward hooks that apply them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapters: dict[str, _Adapter] = {}
        self._hooks: dict[str, Any] = {}

    # -- bookkeeping

    def _refresh_hooks(self) -> None:
        wanted = {m for ad in self.adapters.values() for m in ad.modules if m not in ad.fused_modules}
        for m in list(self._hooks):
            if m not in wanted:
                self._hooks.pop(m).remove()
        for m in wanted - set(self._hooks):
            self._hooks[m] = self.model.get_submodule(m).register_forward_hook(self._make_hook(m))

    def _make_hook(self, module: str):
        def hook(_mod: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            x = args[0]
            for ad in self.adapters.values():
                entry = ad.modules.get(module)
                if entry is None or ad.scale == 0 or module in ad.fused_modules:
                    continue
                a, b, s = entry
                output = output + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * (s * ad.scale)
            return output

        return hook

    # -- public

    def add(self, weights: LoraWeights | Mapping[str, tuple[Tensor, Tensor, float]], scale: float = 1.0,
            name: str | None = None, source: str = "", device: torch.device | None = None,
            dtype: torch.dtype | None = None) -> str:
        """Attach an adapter (parsed weights, or live (A, B, scale) tensors such as a trainer's parameters)."""
        if not math.isfinite(float(scale)):
            raise ValueError(f"LoRA scale must be a finite number, got {scale!r}")
        if isinstance(weights, LoraWeights):
            entries = {m: (lm.A.to(device=device, dtype=dtype), lm.B.to(device=device, dtype=dtype), lm.scale)
                       for m, lm in weights.modules.items()}
            source = source or weights.source
        else:
            entries = dict(weights)
        name = name or Path(source).stem or "lora"
        base, i = name, 1
        while name in self.adapters:
            i += 1
            name = f"{base}-{i}"
        self.adapters[name] = _Adapter(name, entries, float(scale), source)
        self._refresh_hooks()
        return name

    def _get(self, name: str) -> _Adapter:
        if name not in self.adapters:
            raise ValueError(f"no LoRA named {name!r} is loaded; loaded: {sorted(self.adapters) or 'none'}")
        return self.adapters[name]

    def set_scale(self, name: str, scale: float) -> None:
        if not math.isfinite(float(scale)):
            raise ValueError(f"LoRA scale must be a finite number, got {scale!r}")
        ad = self._get(name)
        was_fused = ad.fused
        if was_fused:
            self.unfuse([name])
        ad.scale = float(scale)
        if was_fused:
            self.fuse([name])

    def remove(self, name: str | None = None) -> None:
        for n in [name] if name is not None else list(self.adapters):
            ad = self._get(n)
            if ad.fused:
                self.unfuse([n])
            del self.adapters[n]
        self._refresh_hooks()

    @torch.no_grad()
    def fuse(self, names: Iterable[str] | None = None) -> list[str]:
        """Merge adapters into the weights of plain linear layers; returns the layers that stay hooked (quantized)."""
        kept: list[str] = []
        for n in list(names) if names is not None else list(self.adapters):
            ad = self._get(n)
            if ad.fused:
                continue
            for m, (a, b, s) in ad.modules.items():
                layer = self.model.get_submodule(m)
                if not isinstance(layer, nn.Linear):
                    kept.append(m)
                    continue
                w = layer.weight
                delta = (b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)) * (s * ad.scale)
                w.copy_((w.float() + delta).to(w.dtype))
                ad.fused_modules.append(m)
            ad.fused = True
        self._refresh_hooks()
        if kept:
            log.info("LoRA on %d quantized layers stays unfused (applied at run time)", len(set(kept)))
        return sorted(set(kept))

    @torch.no_grad()
    def unfuse(self, names: Iterable[str] | None = None) -> None:
        """Take fused adapters back out of the weights (exact up to the rounding of the weight dtype)."""
        for n in list(names) if names is not None else list(self.adapters):
            ad = self._get(n)
            if not ad.fused:
                continue
            for m in ad.fused_modules:
                a, b, s = ad.modules[m]
                w = self.model.get_submodule(m).weight
                delta = (b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)) * (s * ad.scale)
                w.copy_((w.float() - delta).to(w.dtype))
            ad.fused, ad.fused_modules = False, []
        self._refresh_hooks()

    def info(self) -> list[dict[str, Any]]:
        out = []
        for ad in self.adapters.values():
            ranks = sorted({a.shape[0] for a, _, _ in ad.modules.values()})
            out.append({"name": ad.name, "source": ad.source, "scale": ad.scale, "fused": ad.fused,
                        "layers": len(ad.modules), "ranks": ranks})
        return out


def host(model: nn.Module) -> LoraHost:
    """The LoraHost of a transformer (created on first use)."""
    h = getattr(model, "_kleinbild_lora", None)
    if h is None:
        h = LoraHost(model)
        model._kleinbild_lora = h  # a plain attribute: not a submodule, so it never enters the state dict
    return h


__all__ = ["LoraHost", "host"]
