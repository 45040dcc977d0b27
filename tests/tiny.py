"""Tiny random FLUX.2 [klein] pipelines built with diffusers + transformers, saved in the diffusers layout."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

TEXT_LAYERS = (1, 2, 3)
MAX_TEXT = 32


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Unit-gain random weights so every layer visibly shapes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def build_components(seed: int = 0, text_layers: int = 4):
    import transformers
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from fixtures import make_tiny_tokenizer, tiny_qwen3_config

    tok_dir = make_tiny_tokenizer(Path(_tmp()) / f"tok{seed}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    hidden = 32
    te_cfg = tiny_qwen3_config(len(tokenizer), num_layers=text_layers, hidden=hidden)
    text_encoder = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**te_cfg)).eval()
    randomise(text_encoder, seed + 1)
    vae = AutoencoderKLFlux2(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=8,
    ).eval()
    randomise(vae, seed + 2)
    with torch.no_grad():
        vae.bn.running_mean.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 3))
        vae.bn.running_var.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed + 4))
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=32,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=hidden * len(TEXT_LAYERS),
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    ).eval()
    randomise(transformer, seed + 5)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential", shift=3.0)
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


@functools.cache
def _tmp() -> str:
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="kleinbild-tiny-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # shared by a whole test run, then gone
    return folder


@functools.cache
def reference_pipeline(kind: str, deep_text: bool = False):
    """kind: distilled | base | kv. Returns (diffusers pipeline, saved folder).

    `deep_text` gives the text encoder 28 layers, so the default taps (9, 18, 27) and 512 tokens apply
    and the folder loads with no overrides, as a real checkpoint does.
    """
    from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline

    parts = build_components(text_layers=28 if deep_text else 4)
    if kind == "kv":
        pipe = Flux2KleinKVPipeline(**parts)
    else:
        pipe = Flux2KleinPipeline(**parts, is_distilled=(kind == "distilled"))
    pipe.set_progress_bar_config(disable=True)
    folder = Path(_tmp()) / f"pipe-{kind}{'-deep' if deep_text else ''}"
    pipe.save_pretrained(folder)
    return pipe, folder
