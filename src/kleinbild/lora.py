"""LoRA adapters for the FLUX.2 transformer: read the published formats, apply several at once, write them back.

Formats read (prefixes `transformer.`, `diffusion_model.`, `model.diffusion_model.`, `base_model.model.`,
`lora_unet_`, `lora_transformer_` are all recognised):

* diffusers / PEFT: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` / `.lora_B.weight`, scaled by
  `lora_alpha / r` from the file's `lora_adapter_metadata` (with `rank_pattern` / `alpha_pattern`, `use_rslora`),
  else by 1 (what diffusers does without metadata).
* kohya / ComfyUI: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  scaled by `alpha / rank` (rank = rows of lora_down; no alpha: 1).
* official keys on the fused layers (ai-toolkit, ComfyUI): `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`,
  `single_blocks.3.linear1.lora_B.weight`; an `.alpha` beside them is honoured as in kohya files.

Module paths may be dotted or underscored, in official or diffusers naming. diffusers' separate q/k/v projections
land on row ranges of the fused `qkv` layer (each with its own A, so their A's are stacked and B becomes
block-diagonal: the same product); `norm_out.linear` has its output halves swapped, as in the weights. LoKr, LoHa,
DoRA and other LyCORIS adapters are recognised and refused by name. Keys that match no layer, shapes that do not fit
and files from which nothing applies are errors that list them.

Applying: each adapter contributes `scale * B @ (A @ x)` through a forward hook on its layers (exact, switchable
instantly: `set_scale`, `unload`), or is merged into the weights (`fuse`, for speed; quantized layers stay hooked).
Module names, and so the state dict, never change.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kleinbild.convert import _DIT_SIMPLE, _DOUBLE_QKV, _DOUBLE_SIMPLE, _SINGLE_SIMPLE

log = logging.getLogger(__name__)

LoraSource = str | Path | Mapping[str, Tensor]

_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.",
             "lora_unet_", "lora_transformer_")
_KEY = re.compile(r"^(?P<module>.+?)\.(?:(?P<a>lora_A|lora_down)|(?P<b>lora_B|lora_up))(?:\.[A-Za-z0-9_]+)?\.weight$")
# Markers of adapter types that are not plain LoRA.
_OTHER_KINDS = {
    r"\.lokr_": "LoKr (LyCORIS Kronecker)",
    r"\.hada_": "LoHa (LyCORIS Hadamard)",
    r"dora_scale|lora_magnitude_vector": "DoRA (weight-decomposed LoRA)",
    r"\.oft_": "OFT",
    r"\.lora_mid\.": "LoCon with a mid (Tucker) factor",
    r"\.diff(_b)?$": "full weight difference",
}
_METADATA_KEY = "lora_adapter_metadata"


# ---------------------------------------------------------------- where each published name lands


@dataclass(frozen=True)
class Target:
    """Where one source layer's LoRA lands: official module name, output rows (None: all) and whether the output
    halves are swapped between the naming schemes (diffusers' norm_out stores (scale, shift))."""

    module: str
    rows: tuple[int, int] | None = None
    swap_halves: bool = False


def linear_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every bias-free linear layer (quantized ones included), by official name."""
    from kleinbild.quant import QuantLinear

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.bias is None or isinstance(m, QuantLinear):
            out[name] = (m.out_features, m.in_features)
    return out


def name_table(model: nn.Module) -> dict[str, Target]:
    """Every name a LoRA may give a layer of `model` (official and diffusers, dotted and underscored) -> Target."""
    layers = linear_layers(model)
    table: dict[str, Target] = {}

    def add(name: str, target: Target) -> None:
        if target.module in layers:
            table[name] = target
            table[name.replace(".", "_")] = target

    for name in layers:
        add(name, Target(name))
    for dif, off in _DIT_SIMPLE.items():
        add(dif.removesuffix(".weight"), Target(off.removesuffix(".weight")))
    add("norm_out.linear", Target("final_layer.adaLN_modulation.1", swap_halves=True))
    doubles = {int(n.split(".")[1]) for n in layers if n.startswith("double_blocks.")}
    singles = {int(n.split(".")[1]) for n in layers if n.startswith("single_blocks.")}

    def bare(key: str) -> str:
        return key.removesuffix(".weight")

    for i in sorted(doubles):
        for dif, off in _DOUBLE_SIMPLE.items():
            add(f"transformer_blocks.{i}.{bare(dif)}", Target(f"double_blocks.{i}.{bare(off)}"))
        for off, parts in _DOUBLE_QKV.items():
            fused = f"double_blocks.{i}.{bare(off)}"
            if fused not in layers:
                continue
            third = layers[fused][0] // 3
            for j, part in enumerate(parts):
                add(f"transformer_blocks.{i}.{bare(part)}", Target(fused, (j * third, (j + 1) * third)))
        # diffusers' own fused projections (after fuse_qkv_projections).
        add(f"transformer_blocks.{i}.attn.to_qkv", Target(f"double_blocks.{i}.img_attn.qkv"))
        add(f"transformer_blocks.{i}.attn.to_added_qkv", Target(f"double_blocks.{i}.txt_attn.qkv"))
    for i in sorted(singles):
        for dif, off in _SINGLE_SIMPLE.items():
            add(f"single_transformer_blocks.{i}.{bare(dif)}", Target(f"single_blocks.{i}.{bare(off)}"))
    return table


def _strip(module: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if module.startswith(p):
                module, changed = module[len(p):], True
    return module


# ---------------------------------------------------------------- parsed adapters


@dataclass
class LoraModule:
    """One layer's adapter: delta W = scale * B @ A, A (rank, in), B (out, rank), in official output-row order."""

    A: Tensor
    B: Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.B.to(torch.float32) @ self.A.to(torch.float32) * self.scale).to(dtype)


@dataclass
class LoraWeights:
    """A parsed adapter: official module name -> LoraModule."""

    modules: dict[str, LoraModule]
    format: str = ""
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def delta(self, module: str) -> Tensor:
        return self.modules[module].delta()


def _read(source: LoraSource) -> tuple[dict[str, Tensor], dict[str, str], str]:
    if isinstance(source, Mapping):
        return dict(source), {}, "<state dict>"
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"LoRA file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"LoRA file {str(path)!r} is not a readable safetensors file ({e})") from None
        return tensors, meta, str(path)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here means: not a tensor dict we can read safely
            raise ValueError(f"LoRA file {str(path)!r} could not be read as a tensor dict ({e})") from None
        if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise ValueError(f"LoRA file {str(path)!r} does not hold a flat dict of tensors")
        return dict(obj), {}, str(path)
    raise ValueError(f"LoRA file {str(path)!r}: expected a .safetensors file (or .pt/.bin)")


def _peft_scales(meta: Mapping[str, str]) -> tuple[float, float, dict[str, float], dict[str, float], bool] | None:
    """(r, lora_alpha, rank_pattern, alpha_pattern, use_rslora) of the transformer adapter in diffusers metadata."""
    raw = meta.get(_METADATA_KEY)
    if not raw:
        return None
    try:
        conf = json.loads(raw)
    except ValueError:
        return None
    sub = {k.removeprefix("transformer."): v for k, v in conf.items() if k.startswith("transformer.")} or conf
    if "lora_alpha" not in sub:
        return None
    r = float(sub.get("r", sub["lora_alpha"]))
    return (r, float(sub["lora_alpha"]), {k: float(v) for k, v in (sub.get("rank_pattern") or {}).items()},
            {k: float(v) for k, v in (sub.get("alpha_pattern") or {}).items()}, bool(sub.get("use_rslora", False)))


def _pattern(patterns: Mapping[str, float], module: str) -> float | None:
    # PEFT's rule: the pattern matches the end of the module name on a dot boundary.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def parse_lora(source: LoraSource, model: nn.Module, metadata: Mapping[str, str] | None = None) -> LoraWeights:
    """Read a LoRA in any supported format and map it onto `model`'s layers; raises ValueError naming every key or
    shape that does not fit."""
    tensors, meta, where = _read(source)
    if not tensors:
        raise ValueError(f"{where} holds no tensors")
    _refuse_other_kinds(tensors, where)
    table = name_table(model)
    groups, fmt = _group_keys(tensors, table, where)
    parts = _scaled_pairs(groups, table, linear_layers(model), _peft_scales(dict(metadata or meta)), where)
    return LoraWeights(_assemble(parts, linear_layers(model)), "+".join(sorted(fmt)), where)


def _refuse_other_kinds(tensors: Mapping[str, Tensor], where: str) -> None:
    for marker, kind in _OTHER_KINDS.items():
        hits = [k for k in tensors if re.search(marker, k)]
        if hits:
            raise ValueError(
                f"{where} is a {kind} adapter (e.g. key {hits[0]!r}), which kleinbild does not load; it loads LoRA "
                "(lora_A/lora_B or lora_down/lora_up pairs). Merge it into the base weights with its training tool, "
                "or export it as a LoRA"
            )


def _key_format(key: str, name: str) -> str:
    if key.startswith("lora_unet_") or ".lora_down" in key:
        return "kohya"
    if name.split(".")[0] in ("transformer_blocks", "single_transformer_blocks") or name in (
            "x_embedder", "context_embedder", "proj_out", "norm_out.linear"):
        return "diffusers"
    return "official"


def _group_keys(tensors: Mapping[str, Tensor], table: Mapping[str, Target], where: str
                ) -> tuple[dict[str, dict[str, Tensor]], set[str]]:
    """{layer name: {"A", "B", "alpha": tensor}} and the formats seen; every key must land on a layer."""
    groups: dict[str, dict[str, Tensor]] = {}
    unmatched: list[str] = []
    fmt: set[str] = set()
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m:
            module, kind = m["module"], ("A" if m["a"] else "B")
        elif key.endswith(".alpha"):
            module, kind = key[: -len(".alpha")], "alpha"
        else:
            unmatched.append(key)
            continue
        name = _strip(module)
        if name not in table:
            unmatched.append(key)
            continue
        fmt.add(_key_format(key, name))
        groups.setdefault(name, {})[kind] = t
    if unmatched:
        te = [k for k in unmatched if re.match(r"^(lora_te\d?_|text_encoder|te\d?\.)", k)]
        hint = " (text-encoder LoRA weights are not supported)" if te else ""
        raise ValueError(
            f"{where}: {len(unmatched)} of {len(tensors)} keys match no layer of this FLUX.2 transformer{hint}: "
            f"{sorted(unmatched)[:12]}{' ...' if len(unmatched) > 12 else ''}. Expected names like "
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight (diffusers), "
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight (kohya) or "
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight (official)"
        )
    return groups, fmt


def _pair_scale(g: Mapping[str, Tensor], name: str, rank: int, peft: Any) -> float:
    if "alpha" in g:
        return float(g["alpha"].float().reshape(-1)[0]) / rank
    if peft is None:
        return 1.0
    base_r, base_alpha, rank_pat, alpha_pat, rslora = peft
    rr = _pattern(rank_pat, name) or base_r
    alpha = _pattern(alpha_pat, name) or base_alpha
    return alpha / math.sqrt(rr) if rslora else alpha / rr


def _scaled_pairs(groups: Mapping[str, Mapping[str, Tensor]], table: Mapping[str, Target],
                  layers: Mapping[str, tuple[int, int]], peft: Any, where: str
                  ) -> dict[str, list[tuple[Tensor, Tensor, Target]]]:
    """(A, scaled B, target) per official module, after checking each pair fits its layer."""
    problems: list[str] = []
    parts: dict[str, list[tuple[Tensor, Tensor, Target]]] = {}
    for name, g in sorted(groups.items()):
        if "A" not in g or "B" not in g:
            problems.append(f"{name}: has {'lora_A/down' if 'A' in g else 'lora_B/up'} but not the other half")
            continue
        a, b, target = g["A"], g["B"], table[name]
        out, inp = layers[target.module]
        rows = out if target.rows is None else target.rows[1] - target.rows[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{name}: A {tuple(a.shape)} and B {tuple(b.shape)} are not a rank-r pair")
            continue
        if a.shape[1] != inp or b.shape[0] != rows:
            problems.append(f"{name}: delta {b.shape[0]}x{a.shape[1]} vs layer {rows}x{inp}")
            continue
        scale = _pair_scale(g, name, a.shape[0], peft)
        parts.setdefault(target.module, []).append((a.float(), b.float() * scale, target))
    if problems:
        raise ValueError(
            f"{where}: {len(problems)} layers do not fit this transformer (a LoRA for another model size?): "
            + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else "")
        )
    if not parts:
        raise ValueError(f"{where} holds no LoRA weights that apply to this transformer")
    return parts


def _assemble(parts: Mapping[str, list[tuple[Tensor, Tensor, Target]]], layers: Mapping[str, tuple[int, int]]
              ) -> dict[str, LoraModule]:
    """One LoraModule per fused layer: the A's stacked, B block-placed on each part's output rows."""
    modules = {}
    for module, ps in parts.items():
        out, _ = layers[module]
        a_cat = torch.cat([p[0] for p in ps])
        b_full = torch.zeros(out, a_cat.shape[0])
        col = 0
        for a, b, target in ps:
            r = a.shape[0]
            if target.swap_halves:
                b = torch.cat(b.chunk(2, dim=0)[::-1])
            lo, hi = target.rows if target.rows is not None else (0, out)
            b_full[lo:hi, col : col + r] = b
            col += r
        modules[module] = LoraModule(a_cat, b_full, 1.0)
    return modules


# ---------------------------------------------------------------- writing


def _diffusers_parts(module: str, layers: Mapping[str, tuple[int, int]]) -> list[tuple[str, tuple[int, int] | None,
                                                                                           bool]]:
    """The diffusers layer(s) an official layer is stored as: (name, rows, swap_halves)."""
    if module == "final_layer.adaLN_modulation.1":
        return [("norm_out.linear", None, True)]
    for dif, off in _DIT_SIMPLE.items():
        if off.removesuffix(".weight") == module:
            return [(dif.removesuffix(".weight"), None, False)]
    m = re.match(r"double_blocks\.(\d+)\.(.+)$", module)
    if m:
        i, rest = m.groups()
        if rest + ".weight" in _DOUBLE_QKV:
            third = layers[module][0] // 3
            return [(f"transformer_blocks.{i}.{p.removesuffix('.weight')}", (j * third, (j + 1) * third), False)
                    for j, p in enumerate(_DOUBLE_QKV[rest + ".weight"])]
        for dif, off in _DOUBLE_SIMPLE.items():
            if off == rest + ".weight":
                return [(f"transformer_blocks.{i}.{dif.removesuffix('.weight')}", None, False)]
    m = re.match(r"single_blocks\.(\d+)\.(.+)$", module)
    if m:
        i, rest = m.groups()
        for dif, off in _SINGLE_SIMPLE.items():
            if off == rest + ".weight":
                return [(f"single_transformer_blocks.{i}.{dif.removesuffix('.weight')}", None, False)]
    raise ValueError(f"layer {module!r} has no diffusers name")


def _compact(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Drop rank components whose B column is all zero (a row range of a block-diagonal adapter)."""
    keep = b.abs().amax(dim=0) > 0
    if keep.all() or not keep.any():
        return a, b
    return a[keep], b[:, keep]


def to_state_dict(
    weights: LoraWeights, fmt: str, layers: Mapping[str, tuple[int, int]], alpha: float | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of an adapter in `fmt`: "diffusers", "kohya" or "official".

    The delta of every layer is exactly the adapter's. diffusers: if every layer shares one rank and scale, the scale
    goes to the metadata (`lora_alpha` = `alpha` or scale * rank), else it is folded into B (diffusers' rule without
    metadata is scale 1). kohya: `.alpha` = scale * rank. official: scale folded into B (diffusers' converter for
    this naming takes no alpha keys).
    """
    out: dict[str, Tensor] = {}
    meta: dict[str, str] = {"format": "pt"}
    mods = weights.modules
    if fmt == "diffusers":
        ranks = {m.rank for m in mods.values()}
        scales = {m.scale for m in mods.values()}
        uniform = len(ranks) == 1 and len(scales) == 1
        targets = set()
        for module, m in sorted(mods.items()):
            a, b = m.A, m.B if uniform else m.B * m.scale
            for name, rows, swap in _diffusers_parts(module, layers):
                bp = b if rows is None else b[rows[0] : rows[1]]
                if swap:
                    bp = torch.cat(bp.chunk(2, dim=0)[::-1])
                ap = a
                if not uniform:
                    ap, bp = _compact(a, bp)
                # Copies: q, k and v share one A, and safetensors refuses tensors that share memory.
                out[f"transformer.{name}.lora_A.weight"] = ap.clone()
                out[f"transformer.{name}.lora_B.weight"] = bp.clone()
                targets.add(name)
        if uniform:
            (r,), (s,) = ranks, scales
            conf = {"r": r, "lora_alpha": alpha if alpha is not None else s * r, "target_modules": sorted(targets),
                    "rank_pattern": {}, "alpha_pattern": {}, "lora_dropout": 0.0, "bias": "none",
                    "use_dora": False, "use_rslora": False, "init_lora_weights": True}
            meta[_METADATA_KEY] = json.dumps({f"transformer.{k}": v for k, v in conf.items()}, indent=2, sort_keys=True)
        return out, meta
    if fmt == "kohya":
        for module, m in sorted(mods.items()):
            key = "lora_unet_" + module.replace(".", "_")
            out[f"{key}.lora_down.weight"] = m.A.contiguous()
            out[f"{key}.lora_up.weight"] = m.B.contiguous()
            out[f"{key}.alpha"] = torch.tensor(m.scale * m.rank, dtype=torch.float32)
        return out, meta
    if fmt == "official":
        for module, m in sorted(mods.items()):
            out[f"diffusion_model.{module}.lora_A.weight"] = m.A.contiguous()
            out[f"diffusion_model.{module}.lora_B.weight"] = (m.B * m.scale).contiguous()
        return out, meta
    raise ValueError(f"unknown LoRA format {fmt!r}; choose diffusers, kohya or official")


def save_lora(weights: LoraWeights, path: str | Path, model: nn.Module, fmt: str = "diffusers",
              alpha: float | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write an adapter as a .safetensors file in `fmt` (see `to_state_dict`)."""
    import os

    from safetensors.torch import save_file

    tensors, meta = to_state_dict(weights, fmt, linear_layers(model), alpha)
    tensors = {k: (v.to(dtype) if k.endswith(".weight") else v).detach().cpu().contiguous() for k, v in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def parse_spec(spec: str) -> tuple[str, float]:
    """`FILE[:SCALE]` -> (FILE, SCALE); the suffix counts as a scale only if it is a number (so C:\\x works)."""
    path, sep, tail = str(spec).rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            return str(spec), 1.0
        if not math.isfinite(scale):
            raise ValueError(f"LoRA scale in {spec!r} must be a finite number")
        return path, scale
    return str(spec), 1.0


__all__ = [
    "LoraModule",
    "LoraWeights",
    "Target",
    "linear_layers",
    "name_table",
    "parse_lora",
    "parse_spec",
    "save_lora",
    "to_state_dict",
]
