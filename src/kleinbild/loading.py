"""Finding and reading checkpoints: diffusers folders, official single files, Hugging Face repo ids.

Models are built on the meta device and the file's tensors are assigned to them (strict), so a
checkpoint is read once and never copied into freshly initialised weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kleinbild import gguf_file
from kleinbild.config import PRESETS, AEConfig, DiTConfig, ModelPreset, TextEncoderConfig, get_preset
from kleinbild.convert import dit_from_diffusers, is_diffusers_dit, is_diffusers_vae, vae_from_diffusers
from kleinbild.files import (
    ModelNotFoundError,
    read_shapes,
    read_tensors,
    release_file_pages,
    safetensors_files,
    strip_prefix,
)
from kleinbild.images import InputError
from kleinbild.quant_file import logical_shapes
from kleinbild.result import all_finite
from kleinbild.tokenizer import PromptTokenizer

log = logging.getLogger(__name__)

DIFFUSERS_PATTERNS = ["model_index.json", "transformer/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*"]
_PIPELINE_CLASSES = {"Flux2KleinPipeline", "Flux2KleinKVPipeline"}


def load_into(model: nn.Module, state: dict[str, Tensor], what: str, device: torch.device, dtype: torch.dtype) -> None:
    """Strict, named checks, then assign the (converted) tensors to a meta-built model."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if wrong:
            parts.append(f"shape mismatches {wrong[:4]}")
        raise ValueError(f"{what} does not match the model: " + "; ".join(parts))
    _check_dtypes(state, what, expected)
    converted = {}
    for k, t in state.items():
        keep_dtype = not t.is_floating_point() or k.startswith("bn.")  # BatchNorm statistics stay float32
        converted[k] = t.to(device=device, dtype=None if keep_dtype else dtype)
    _check_finite(converted, what, dtype)
    model.load_state_dict(converted, strict=True, assign=True)
    model.eval().requires_grad_(False)


def _check_finite(state: dict[str, Tensor], what: str, dtype: torch.dtype) -> None:
    """A NaN or Inf weight would turn every image black without a word: refuse it, naming the tensor. Checked in
    the load dtype, so a value that overflows it (float16) is caught too."""
    bad = [k for k, t in state.items() if t.is_floating_point() and t.dtype.itemsize > 1 and not all_finite(t)]
    if bad:
        raise ValueError(f"{what}: {len(bad)} tensor(s) hold NaN or Inf values in "
                         f"{str(dtype).removeprefix('torch.')}, e.g. {', '.join(bad[:3])}; the file is damaged "
                         "(or its values overflow this dtype: try bfloat16)")


def _check_dtypes(state: dict[str, Tensor], what: str, expected: dict[str, Tensor] | None = None) -> None:
    """Integer tensors where the model holds floats (every tensor, without `expected`) are a damaged file."""
    wrong = [f"{k} is {str(t.dtype).removeprefix('torch.')}" for k, t in state.items()
             if (expected is None or expected[k].is_floating_point()) and not t.is_floating_point()]
    if wrong:
        raise ValueError(f"{what}: tensors that must hold floating-point weights do not: {', '.join(wrong[:4])}"
                         f"{' ...' if len(wrong) > 4 else ''} (a damaged or mis-converted file?)")


def _config(build: Callable[[dict], Any], path: Path, what: str) -> Any:
    """A config object from a JSON file; missing or ill-typed fields are an error naming the file."""
    try:
        return build(_read_json(path))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, ModelNotFoundError):
            raise
        raise ModelNotFoundError(f"{path} is not a usable {what} config ({type(e).__name__}: {e})") from None


def _from_shapes(build: Callable[[dict], Any], shapes: dict, path: Path, what: str) -> Any:
    try:
        return build(shapes)
    except (KeyError, IndexError, ValueError) as e:
        detail = f"no tensor {e}" if isinstance(e, KeyError) else str(e)
        raise ModelNotFoundError(f"{path} does not hold a {what}: {detail}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ModelNotFoundError(f"{path} is not valid JSON ({e})") from None


# ---------------------------------------------------------------- where the parts are


# ---------------------------------------------------------------- how to load


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model, beside where it is: the one type every entry point (Python, CLI, server, LoRA training,
    benchmarks) passes on. See `KleinPipeline.from_pretrained` for what each field does."""

    vae: str | Path | None = None
    text_encoder: str | Path | None = None
    preset: str | None = None
    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    quant: str | None = None
    text_quant: str | None = None
    loras: tuple[str | tuple[str | Path, float], ...] = ()
    fuse_loras: bool = False
    offload_mode: str = "none"
    compile: bool = False
    compile_shapes: str = "auto"  # kleinbild.compiling.SHAPES: dynamic, auto (torch's default) or static
    warm_sizes: tuple[tuple[int, int], ...] = ()  # (width, height) generated once after loading (see warm())
    text_layers: tuple[int, ...] | None = None
    max_text_length: int | None = None

    def with_changes(self, **changes: Any) -> LoadOptions:
        """A copy with some fields changed; an unknown name is an error that lists the fields."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown load option(s) {unknown}; LoadOptions has {sorted(names)}")
        if "loras" in changes:
            changes["loras"] = tuple(changes["loras"] or ())
        return replace(self, **changes)


_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps", "device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but PyTorch sees no CUDA GPU here; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' was asked for but it is not available here; use --device cpu")
    return dev


def pick_dtype(dtype: str | torch.dtype | None = None) -> torch.dtype:
    """bfloat16 unless asked otherwise: fast on GPUs and on CPUs with AVX-512 bf16, and what the weights ship in."""
    if dtype is None:
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32") from None



@dataclass(frozen=True)
class ModelFiles:
    """Where each component lives, and in which layout."""

    preset: ModelPreset
    dit_files: list[Path]
    dit_layout: str  # "bfl" | "diffusers"
    ae_files: list[Path]
    ae_layout: str
    text_files: list[Path]
    text_config: dict
    tokenizer_dir: Path
    text_layout: str = "hf"  # "hf" (a Qwen3 folder or one .safetensors file) | "gguf"


def _text_encoder_parts(path: Path) -> tuple[list[Path], dict, Path, str]:
    """A Qwen3 folder (weights + tokenizer), a diffusers folder with text_encoder/ and tokenizer/, a llama.cpp GGUF
    (which holds its tokenizer), or one .safetensors file (ComfyUI's text encoders) with a tokenizer beside it."""
    path = Path(path)
    if path.is_file() and gguf_file.is_gguf(path):
        try:
            return [path], gguf_file.text_config(path), path, "gguf"
        except ValueError as e:
            raise ModelNotFoundError(str(e)) from None
    if path.is_file():
        return [path], _single_text_config(path), _beside_tokenizer(path), "hf"
    if (path / "text_encoder").is_dir():
        te, tok = path / "text_encoder", path / "tokenizer"
    elif (path / "config.json").is_file():
        te, tok = path, path
    else:
        raise ModelNotFoundError(
            f"text encoder {str(path)!r} is neither a Qwen3 model folder (config.json + safetensors + tokenizer) "
            "nor a diffusers folder with text_encoder/ and tokenizer/"
        )
    if not (tok / "tokenizer.json").is_file():
        raise ModelNotFoundError(f"no tokenizer.json in {tok}; the text encoder folder must hold its tokenizer")
    return safetensors_files(te, "model"), _read_json(te / "config.json"), tok, "hf"


def _beside_tokenizer(path: Path) -> Path:
    for folder in (path.parent, path.parent / "tokenizer", path.with_suffix("")):
        if (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file():
            return folder
    raise ModelNotFoundError(
        f"{path} is a single-file text encoder, which holds no tokenizer: put the model's tokenizer.json and "
        f"tokenizer_config.json beside it (or in {path.parent / 'tokenizer'}), or pass the Qwen3 folder or a GGUF"
    )


def _single_text_config(path: Path) -> dict:
    """A Qwen3 config read off one file's tensor shapes (eps and rope theta are Qwen3's own; they do not show)."""
    shapes = {_hf_text_key(k): v for k, v in logical_shapes([path]).items()}
    try:
        vocab, hidden = shapes["model.embed_tokens.weight"]
        layer = "model.layers.0."
        head_dim = shapes[layer + "self_attn.q_norm.weight"][0]
        layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("model.layers."))
        # Without the final norm the file is a cut-down export (as nano's): the full model had layers after these.
        layers += "model.norm.weight" not in shapes
        return {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers, "head_dim": head_dim,
                "num_attention_heads": shapes[layer + "self_attn.q_proj.weight"][0] // head_dim,
                "num_key_value_heads": shapes[layer + "self_attn.k_proj.weight"][0] // head_dim,
                "intermediate_size": shapes[layer + "mlp.gate_proj.weight"][0]}
    except (KeyError, ValueError) as e:
        raise ModelNotFoundError(f"{path} is not a Qwen3 text encoder file (no tensor {e})") from None


def _ae_parts(path: Path) -> tuple[list[Path], str]:
    path = Path(path)
    if path.is_file():
        return [path], "bfl"
    for folder in (path / "vae", path):
        if (folder / "config.json").is_file():
            return safetensors_files(folder, "diffusion_pytorch_model"), "diffusers"
    if (path / "ae.safetensors").is_file():
        return [path / "ae.safetensors"], "bfl"
    raise ModelNotFoundError(f"autoencoder {str(path)!r}: expected ae.safetensors or a diffusers vae/ folder")


def _behaviour(klass: str, is_distilled: bool, hidden: int) -> ModelPreset:
    """The family member whose sampling behaviour a diffusers pipeline config describes."""
    big = hidden >= 4096
    if klass == "Flux2KleinKVPipeline":
        return PRESETS["klein-9b-kv"]
    if is_distilled:
        return PRESETS["klein-9b" if big else "klein-4b"]
    return PRESETS["klein-base-9b" if big else "klein-base-4b"]


def _with_configs(template: ModelPreset, dit: DiTConfig, ae: AEConfig, text: TextEncoderConfig) -> ModelPreset:
    if (dit, ae, text) == (template.dit, template.ae, template.text):
        return template
    return replace(template, name=f"custom ({template.name} sampling)", dit=dit, ae=ae, text=text)


def _text_config(cfg: dict, path: Path, template: ModelPreset, text_layers: tuple[int, ...] | None,
                 max_len: int | None) -> TextEncoderConfig:
    over = {"out_layers": tuple(text_layers) if text_layers else template.text.out_layers}
    over["max_length"] = max_len or template.text.max_length
    try:
        return TextEncoderConfig.from_hf(cfg, **over)
    except (KeyError, TypeError) as e:  # a ValueError (layers vs taps) already says what is wrong
        raise ModelNotFoundError(f"{path} is not a usable text encoder "
                                 f"config ({type(e).__name__}: {e})") from None


def diffusers_files(
    root: Path, text_layers: tuple[int, ...] | None = None, max_text_length: int | None = None
) -> ModelFiles:
    index = _read_json(root / "model_index.json")
    klass = index.get("_class_name", "")
    if klass not in _PIPELINE_CLASSES:
        raise ModelNotFoundError(
            f"{root / 'model_index.json'} names pipeline {klass!r}; kleinbild runs {sorted(_PIPELINE_CLASSES)}"
        )
    dit_cfg = _config(DiTConfig.from_diffusers, root / "transformer" / "config.json", "transformer")
    template = _behaviour(klass, bool(index.get("is_distilled", False)), dit_cfg.hidden_size)
    ae_cfg = _config(AEConfig.from_diffusers, root / "vae" / "config.json", "autoencoder")
    text_files, text_cfg, tok, text_layout = _text_encoder_parts(root)
    text = _text_config(text_cfg, text_files[0].parent / "config.json", template, text_layers, max_text_length)
    return ModelFiles(
        preset=_with_configs(template, dit_cfg, ae_cfg, text),
        dit_files=safetensors_files(root / "transformer", "diffusion_pytorch_model"),
        dit_layout="diffusers",
        ae_files=safetensors_files(root / "vae", "diffusion_pytorch_model"),
        ae_layout="diffusers",
        text_files=text_files,
        text_config=text_cfg,
        tokenizer_dir=tok,
        text_layout=text_layout,
    )


def single_file_files(
    dit_path: Path,
    vae: Path | None,
    text_encoder: Path | None,
    preset: str | None = None,
    text_layers: tuple[int, ...] | None = None,
    max_text_length: int | None = None,
) -> ModelFiles:
    # Quantized files: scales dropped and packed weights at full width, so the architecture reads the same.
    gguf = gguf_file.is_gguf(dit_path)
    shapes = _gguf_dit_shapes(dit_path) if gguf else logical_shapes([dit_path])
    if is_diffusers_dit(set(shapes)):
        raise ModelNotFoundError(
            f"{dit_path} uses diffusers tensor names; pass the whole diffusers folder (with model_index.json)"
        )
    dit_cfg = _from_shapes(DiTConfig.from_state_dict_shapes, shapes, dit_path, "FLUX.2 transformer")
    if preset is not None:
        template = get_preset(preset)
    else:
        # A quantized build keeps the official name plus a suffix (flux-2-klein-base-4b-fp8.safetensors,
        # flux-2-klein-4b-Q4_K_M.gguf).
        plain = re.sub(_QUANT_SUFFIX, "", dit_path.stem, flags=re.IGNORECASE) + ".safetensors"
        by_file = [p for p in PRESETS.values() if p.dit_file in (dit_path.name, plain)]
        template = by_file[0] if by_file else _behaviour("", True, dit_cfg.hidden_size)
        if not by_file:
            log.warning("%s: unknown file name, sampling as %s (pass a preset to change)", dit_path, template.name)
    if vae is None:
        guess = dit_path.parent / template.ae_file
        if not guess.is_file():
            raise ModelNotFoundError(f"no autoencoder given and no {guess}; pass --vae ae.safetensors or a vae/ folder")
        vae = guess
    if text_encoder is None:
        example = f" (e.g. the text_encoder/ + tokenizer/ of {template.repo_id})" if template.repo_id else ""
        raise ModelNotFoundError(f"{dit_path} holds only the transformer; pass --text-encoder with a Qwen3 "
                                 f"folder{example}")
    ae_files, ae_layout = _ae_parts(vae)
    if ae_layout == "diffusers":
        ae_cfg = _config(AEConfig.from_diffusers, ae_files[0].parent / "config.json", "autoencoder")
    else:
        ae_cfg = _from_shapes(lambda s: AEConfig.from_state_dict_shapes(s, template.ae.norm_groups),
                              read_shapes(ae_files), ae_files[0], "FLUX.2 autoencoder")
    text_files, text_cfg, tok, text_layout = _text_encoder_parts(text_encoder)
    where = text_files[0].parent / "config.json" if Path(text_encoder).is_dir() else text_files[0]
    text = _text_config(text_cfg, where, template, text_layers, max_text_length)
    return ModelFiles(
        preset=_with_configs(template, dit_cfg, ae_cfg, text),
        dit_files=[dit_path],
        dit_layout="gguf" if gguf else "bfl",
        ae_files=ae_files,
        ae_layout=ae_layout,
        text_files=text_files,
        text_config=text_cfg,
        tokenizer_dir=tok,
        text_layout=text_layout,
    )


_QUANT_SUFFIX = r"[-_.](fp8|nvfp4|int8|f32|f16|bf16|q\d_k(_[sml])?|q\d_\d)$"


def _gguf_dit_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        gguf_file.check_architecture(path, gguf_file.DIT_ARCHITECTURES, "FLUX.2 transformer")
        return gguf_file.shapes(path, rename=strip_prefix)
    except ValueError as e:
        raise ModelNotFoundError(str(e)) from None


def snapshot(repo_id: str) -> Path:
    """A repo's diffusers layout from the local Hugging Face cache, downloading only when it is not there."""
    from huggingface_hub import snapshot_download

    cache = os.environ.get("HF_HUB_CACHE") or None  # read per call: the library reads it once, at import
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=DIFFUSERS_PATTERNS, local_files_only=True, cache_dir=cache)
        )
    except Exception as cached_error:  # noqa: BLE001 - any miss means: try the network
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise ModelNotFoundError(f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set") from None
        try:
            return Path(snapshot_download(repo_id, allow_patterns=DIFFUSERS_PATTERNS, cache_dir=cache))
        except Exception as e:  # noqa: BLE001
            raise ModelNotFoundError(
                f"{repo_id} is not in the local Hugging Face cache ({type(cached_error).__name__}) and could not be "
                f"downloaded ({type(e).__name__}: {e}); download it where the hub is reachable, or pass a local path"
            ) from None


def locate(
    model: str | Path,
    vae: str | Path | None = None,
    text_encoder: str | Path | None = None,
    preset: str | None = None,
    text_layers: tuple[int, ...] | None = None,
    max_text_length: int | None = None,
) -> ModelFiles:
    """Resolve a model argument: a diffusers folder, a single .safetensors file, a preset name or a repo id."""
    p = Path(model).expanduser()
    vae_p = Path(vae).expanduser() if vae else None
    te_p = Path(text_encoder).expanduser() if text_encoder else None
    if p.is_dir():
        if (p / "model_index.json").is_file():
            return diffusers_files(p, text_layers, max_text_length)
        singles = sorted(p.glob("flux-2-klein*.safetensors"))
        if singles:
            return single_file_files(singles[0], vae_p, te_p, preset, text_layers, max_text_length)
        raise ModelNotFoundError(
            f"{str(p)!r} holds no model: expected model_index.json (diffusers layout) or a flux-2-klein-*.safetensors"
        )
    if p.is_file():
        if p.suffix != ".safetensors" and not gguf_file.is_gguf(p):
            raise ModelNotFoundError(f"{str(p)!r} is neither a .safetensors nor a .gguf file")
        return single_file_files(p, vae_p, te_p, preset, text_layers, max_text_length)
    text = str(model)
    known = {q.name: q for q in PRESETS.values()}
    if text.lower() in known and known[text.lower()].bundled:
        p = known[text.lower()]
        folder = bundled_dir(p)
        if not (folder / p.dit_file).is_file():
            raise ModelNotFoundError(
                f"the bundled {p.name} weights are not in this install ({folder / p.dit_file}); "
                "reinstall kleinbild, or train them with `kleinbild train all`"
            )
        return single_file_files(
            folder / p.dit_file, folder / p.ae_file, folder / "text_encoder", p.name, text_layers, max_text_length
        )
    if text.lower() in known or ("/" in text and not text.startswith((".", "/", "~"))):
        repo = known[text.lower()].repo_id if text.lower() in known else text
        return diffusers_files(snapshot(repo), text_layers, max_text_length)
    raise ModelNotFoundError(
        f"model {text!r} is not a folder, a file, a preset ({', '.join(PRESETS)}) or a Hugging Face repo id"
    )


def locate_with(model: str | Path, options: LoadOptions) -> ModelFiles:
    """`locate` with the parts and overrides a LoadOptions names."""
    o = options
    return locate(model, o.vae, o.text_encoder, o.preset, o.text_layers, o.max_text_length)


def bundled_dir(preset: ModelPreset) -> Path:
    return Path(__file__).resolve().parent / "weights" / preset.bundle


def where_is(preset: ModelPreset) -> Path | None:
    """Where a preset's weights are on this machine (package bundle or HF cache), without any download."""
    if preset.bundled:
        folder = bundled_dir(preset)
        return folder if (folder / preset.dit_file).is_file() else None
    from huggingface_hub import snapshot_download

    try:
        cache = os.environ.get("HF_HUB_CACHE") or None
        return Path(
            snapshot_download(
                preset.repo_id, allow_patterns=DIFFUSERS_PATTERNS, local_files_only=True, cache_dir=cache
            )
        )
    except Exception:  # noqa: BLE001 - not cached is the only thing this can mean here
        return None


def dit_state(files: ModelFiles) -> dict[str, Tensor]:
    if files.dit_layout == "gguf":
        return gguf_file.as_state(gguf_file.tensors(files.dit_files[0], rename=strip_prefix))
    sd = read_tensors(files.dit_files, rename=strip_prefix if files.dit_layout == "bfl" else lambda k: k)
    if files.dit_layout != "diffusers":
        return sd
    # Checked before q/k/v are fused: concatenation would quietly promote an integer tensor to float.
    _check_dtypes(sd, f"transformer {files.dit_files[0]}")
    out = dit_from_diffusers(sd)
    # The re-fused q/k/v are new tensors; their mapped sources were read once and are not needed again.
    kept = {id(t) for t in out.values()}
    release_file_pages([t for t in sd.values() if id(t) not in kept])
    return out


def ae_state(files: ModelFiles) -> dict[str, Tensor]:
    sd = read_tensors(files.ae_files)
    return vae_from_diffusers(sd) if files.ae_layout == "diffusers" or is_diffusers_vae(set(sd)) else sd


def _hf_text_key(k: str) -> str:
    # A bare Qwen3Model checkpoint has no "model." prefix; Qwen3ForCausalLM has.
    return k if k.startswith(("model.", "lm_head.")) else "model." + k


def text_state(files: ModelFiles, wanted: Callable[[str], bool]) -> dict[str, Tensor]:
    if files.text_layout == "gguf":
        return gguf_file.text_state(files.text_files[0], wanted)
    return read_tensors(files.text_files, wanted=wanted, rename=_hf_text_key)


def load_tokenizer(files: ModelFiles) -> PromptTokenizer:
    if files.text_layout == "gguf":
        from kleinbild.tokenizer_gguf import tokenizer_from_metadata

        path = files.text_files[0]
        meta = gguf_file.metadata(path)
        # Some re-uploads of Qwen3 pad with another token; FLUX.2 was trained on prompts padded with <|endoftext|>,
        # and padded positions reach the transformer, so that pad wins wherever the vocabulary has it.
        pad = "<|endoftext|>" if "<|endoftext|>" in meta.get("tokenizer.ggml.tokens", ()) else None
        return tokenizer_from_metadata(meta, str(path), pad_token=pad)
    return PromptTokenizer.from_dir(files.tokenizer_dir)


def read_transformer(model: str | Path) -> dict[str, Tensor]:
    """The transformer of a model (a .safetensors file in official or diffusers naming, a diffusers folder, a preset
    or a repo id) as an official-named state dict, without loading anything else."""
    p = Path(model).expanduser()
    if p.is_file() and gguf_file.is_gguf(p):
        return gguf_file.as_state(gguf_file.tensors(p, rename=strip_prefix))
    if p.is_file():
        state = read_tensors([p], rename=strip_prefix)
        return dit_from_diffusers(state) if is_diffusers_dit(set(state)) else state
    if p.is_dir():
        # Only the transformer is read: a diffusers pipeline folder, or its transformer/ folder itself.
        folder = p / "transformer" if (p / "transformer").is_dir() else p
        if list(folder.glob("diffusion_pytorch_model*.safetensors")):
            return dit_from_diffusers(read_tensors(safetensors_files(folder, "diffusion_pytorch_model")))
    return dit_state(locate(model))
