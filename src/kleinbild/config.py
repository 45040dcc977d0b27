"""Model configurations: frozen dataclasses and the named presets of the FLUX.2 [klein] family."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class DiTConfig:
    """The flow transformer. Field names follow BFL's reference, not diffusers."""

    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 5  # double-stream blocks
    depth_single: int = 20
    in_channels: int = 128
    context_dim: int = 7680
    mlp_ratio: float = 3.0
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: int = 2000
    time_dim: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> DiTConfig:
        heads = int(cfg.get("num_attention_heads", 24))
        head_dim = int(cfg.get("attention_head_dim", 128))
        if cfg.get("guidance_embeds", False):
            raise ValueError("this transformer config has a guidance embedding; FLUX.2 [klein] has none")
        return cls(
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=int(cfg.get("num_layers", 5)),
            depth_single=int(cfg.get("num_single_layers", 20)),
            in_channels=int(cfg.get("in_channels", 128)),
            context_dim=int(cfg.get("joint_attention_dim", 7680)),
            mlp_ratio=float(cfg.get("mlp_ratio", 3.0)),
            axes_dim=tuple(int(a) for a in cfg.get("axes_dims_rope", (32, 32, 32, 32))),
            theta=int(cfg.get("rope_theta", 2000)),
            time_dim=int(cfg.get("timestep_guidance_channels", 256)),
        )

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> DiTConfig:
        """Infer the architecture of an official (BFL-named) single file from its tensor shapes."""
        try:
            hidden, in_channels = shapes["img_in.weight"]
            context_dim = shapes["txt_in.weight"][1]
            time_dim = shapes["time_in.in_layer.weight"][1]
            head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
            mlp_hidden = shapes["double_blocks.0.img_mlp.2.weight"][1]
        except KeyError as e:
            raise ValueError(
                f"not a FLUX.2 transformer in the official layout: tensor {e.args[0]!r} is missing"
            ) from None
        depth = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("double_blocks."))
        depth_single = 1 + max(
            (int(k.split(".")[1]) for k in shapes if k.startswith("single_blocks.")), default=-1
        )
        rope_dim = head_dim // 4
        return cls(
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single=depth_single,
            in_channels=in_channels,
            context_dim=context_dim,
            mlp_ratio=mlp_hidden / hidden,
            axes_dim=(rope_dim,) * 4,
            time_dim=time_dim,
        )


@dataclass(frozen=True)
class AEConfig:
    """The autoencoder. The decoder has one more resnet per level than the encoder; `decoder_ch` (None: `ch`) is
    the decoder's base width, 96 in BFL's small decoder (`full_encoder_small_decoder.safetensors`)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    decoder_ch: int | None = None
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    norm_groups: int = 32
    bn_eps: float = 1e-4
    patch: int = 2

    @property
    def downscale(self) -> int:
        """Pixels per latent token side: VAE downsampling times the 2x2 patch."""
        return 2 ** (len(self.ch_mult) - 1) * self.patch

    @property
    def latent_channels(self) -> int:
        return self.z_channels * self.patch * self.patch

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> AEConfig:
        chans = [int(c) for c in cfg.get("block_out_channels", (128, 256, 512, 512))]
        base = chans[0]
        if any(c % base for c in chans):
            raise ValueError(f"block_out_channels {chans} are not multiples of the first")
        dec = [int(c) for c in cfg.get("decoder_block_out_channels") or chans]
        if any(d % dec[0] for d in dec) or [d // dec[0] for d in dec] != [c // base for c in chans]:
            raise ValueError(f"decoder_block_out_channels {dec} do not scale block_out_channels {chans}")
        patch = cfg.get("patch_size", (2, 2))
        return cls(
            in_channels=int(cfg.get("in_channels", 3)),
            out_channels=int(cfg.get("out_channels", 3)),
            ch=base,
            decoder_ch=None if dec[0] == base else dec[0],
            ch_mult=tuple(c // base for c in chans),
            num_res_blocks=int(cfg.get("layers_per_block", 2)),
            z_channels=int(cfg.get("latent_channels", 32)),
            norm_groups=int(cfg.get("norm_num_groups", 32)),
            bn_eps=float(cfg.get("batch_norm_eps", 1e-4)),
            patch=int(patch[0]) if isinstance(patch, (list, tuple)) else int(patch),
        )


    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, tuple[int, ...]], norm_groups: int = 32) -> AEConfig:
        """Infer an official `ae.safetensors` layout from its shapes (GroupNorm groups cannot be seen: 32)."""
        try:
            ch, in_channels = shapes["encoder.conv_in.weight"][:2]
            out_channels = shapes["decoder.conv_out.weight"][0]
            z = shapes["decoder.post_quant_conv.weight"][0]
            bn = shapes["bn.running_mean"][0]
        except KeyError as e:
            raise ValueError(
                f"not a FLUX.2 autoencoder in the official layout: tensor {e.args[0]!r} is missing"
            ) from None
        levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down."))
        mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
        blocks = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block."))
        dec = shapes["decoder.conv_in.weight"][0] // mult[-1] if "decoder.conv_in.weight" in shapes else ch
        return cls(
            in_channels=in_channels,
            out_channels=out_channels,
            ch=ch,
            decoder_ch=None if dec == ch else dec,
            ch_mult=mult,
            num_res_blocks=blocks,
            z_channels=z,
            norm_groups=norm_groups,
            patch=round((bn / z) ** 0.5),
        )


@dataclass(frozen=True)
class TextEncoderConfig:
    """A Qwen3 decoder, run only up to the deepest tapped layer."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    num_layers: int = 36  # in the checkpoint; only max(out_layers) of them run
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 9728
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    out_layers: tuple[int, ...] = (9, 18, 27)
    max_length: int = 512

    @property
    def layers_to_run(self) -> int:
        return max(self.out_layers)

    @property
    def embed_dim(self) -> int:
        """Width of the prompt embedding handed to the DiT."""
        return self.hidden_size * len(self.out_layers)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], **overrides: Any) -> TextEncoderConfig:
        if "text_config" in cfg:
            cfg = cfg["text_config"]
        rope = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        out = cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
        )
        out = replace(out, **overrides)
        if out.layers_to_run > out.num_layers:
            raise ValueError(
                f"the text encoder has {out.num_layers} layers but layer {out.layers_to_run} is tapped"
            )
        return out


@dataclass(frozen=True)
class PromptFill:
    """How a small model with a closed vocabulary completes a plain prompt (`kleinbild.prompt_fill`).

    A model trained on captions that name every object's size and position draws such captions far better than
    "a red circle on a blue background"; the words it knows, and the size and places it gives an object whose
    prompt leaves them out, are the model's own and so live in its preset.
    """

    sizes: tuple[tuple[str, tuple[str, ...]], ...]  # (size, the words that name it)
    positions: tuple[tuple[str, tuple[str, ...]], ...]  # (position, the phrases that name it: "at the top left")
    size: str  # given to an object whose prompt names no size
    # Per object count (1, 2, ...): the places tried first for objects whose prompt names none; then the rest.
    layouts: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class ModelPreset:
    """Everything that differs between the members of the family."""

    name: str
    dit: DiTConfig
    ae: AEConfig
    text: TextEncoderConfig
    default_steps: int
    default_guidance: float
    uses_cfg: bool  # base models: classifier-free guidance every step
    kv_cache_refs: bool  # reference tokens are K/V-cached after step 0
    repo_id: str
    dit_file: str
    ae_file: str = "ae.safetensors"
    license: str = "apache-2.0"
    description: str = ""
    # Reference-image handling, from BFL's reference code.
    ref_time_offset: int = 10
    max_ref_pixels_single: int = 2024**2
    max_ref_pixels_multi: int = 1024**2
    # The image a masked or image-to-image edit works on is scaled to at most this (diffusers' inpainting bound).
    max_source_pixels: int = 1024**2
    default_size: int = 1024
    # Output areas (pixels) the model was trained on, lowest and highest; None: no known bound. Outside it a
    # model makes noise rather than a bigger picture, so a request there gets a note.
    trained_pixels: tuple[int, int] | None = None
    # CPU threads for a generation (None: torch's). A small model gains little from a second thread and, with
    # another process busy on the machine, loses several times over to OpenMP threads spinning against it.
    cpu_threads: int | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)
    bundled: bool = False  # weights ship inside the package (kleinbild/weights/<bundle>/)
    bundle: str = ""
    # None: the reference schedule, shifted by the empirical mu of the image's token count. A number: a fixed
    # shift for models trained for it. The empirical mu was fitted on megapixel images; at nano's 64 tokens it
    # puts 3 of 4 steps above t=0.7 and leaves the shapes to one jump from 0.7 to 0.
    schedule_shift: float | None = None
    # What a small model can draw, for a note when a prompt names none of it (empty: the model draws anything).
    objects: tuple[str, ...] = ()
    colours: tuple[str, ...] = ()
    # How a prompt that leaves sizes or positions out is completed before encoding (None: used as written).
    fill: PromptFill | None = None


_DIT_4B = DiTConfig()
_DIT_9B = DiTConfig(hidden_size=4096, num_heads=32, depth=8, depth_single=24, context_dim=12288)
_QWEN3_4B = TextEncoderConfig()
_QWEN3_8B = TextEncoderConfig(hidden_size=4096, intermediate_size=12288)
_AE = AEConfig()

# The nano family: the same architectures at small widths, trained in this project on the shapes world.
NANO_DIT = DiTConfig(
    hidden_size=192, num_heads=3, depth=3, depth_single=8, in_channels=32, context_dim=384, axes_dim=(16, 16, 16, 16)
)
NANO_AE = AEConfig(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=1, z_channels=8, norm_groups=8)
NANO_TEXT = TextEncoderConfig(
    vocab_size=547,  # the BPE trained on the shapes-world prompts (kleinbild train tokenizer)
    hidden_size=128,
    num_layers=8,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    intermediate_size=384,
    out_layers=(2, 4, 6),
    max_length=64,
)
_NANO = dict(
    dit=NANO_DIT,
    ae=NANO_AE,
    text=NANO_TEXT,
    kv_cache_refs=False,
    repo_id="",
    default_size=128,
    # Trained at 128x128 only, references included: larger ones are scaled to it.
    trained_pixels=(128 * 128, 128 * 128),
    cpu_threads=1,  # 2-core Zen 4, warm 128 px: 0.104 s vs 0.092 s idle, 0.119 s vs 0.346 s beside a busy core
    max_ref_pixels_single=128**2,
    max_ref_pixels_multi=128**2,
    max_source_pixels=128**2,
    bundled=True,
    bundle="nano",
    objects=("circle", "square", "triangle"),
    colours=("red", "green", "blue", "yellow", "orange", "purple", "white", "black"),
    # The shapes world's words (kleinbild.nano.shapes; a test keeps them equal). Completed prompts take the drills'
    # phrasing, "a big red circle at the centre on a blue background", which nano draws best.
    fill=PromptFill(
        sizes=(("small", ("small", "little")), ("big", ("big", "large"))),
        positions=tuple((pos, tuple(f"{prep} the {words}" for prep, words in phrases)) for pos, phrases in (
            ("top left", (("in", "top left corner"), ("in", "top-left corner"), ("at", "top left"),
                          ("in", "upper left"), ("in", "upper-left corner"))),
            ("top", (("at", "top"), ("at", "top middle"), ("at", "top centre"), ("at", "top center"),
                     ("near", "top edge"))),
            ("top right", (("in", "top right corner"), ("in", "top-right corner"), ("at", "top right"),
                           ("in", "upper right"), ("in", "upper-right corner"))),
            ("left", (("on", "left"), ("on", "left side"), ("at", "middle left"), ("near", "left edge"))),
            ("centre", (("in", "centre"), ("in", "center"), ("in", "middle"), ("at", "centre"), ("at", "center"))),
            ("right", (("on", "right"), ("on", "right side"), ("at", "middle right"), ("near", "right edge"))),
            ("bottom left", (("in", "bottom left corner"), ("in", "bottom-left corner"), ("at", "bottom left"),
                             ("in", "lower left"), ("in", "lower left corner"))),
            ("bottom", (("at", "bottom"), ("at", "bottom middle"), ("at", "bottom centre"), ("at", "bottom center"),
                        ("near", "bottom edge"))),
            ("bottom right", (("in", "bottom right corner"), ("in", "bottom-right corner"), ("at", "bottom right"),
                              ("in", "lower right"), ("in", "lower right corner"))),
        )),
        size="big",
        layouts=(("centre",), ("left", "right"), ("left", "centre", "right")),
    ),
)

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            name="klein-4b",
            dit=_DIT_4B,
            ae=_AE,
            text=_QWEN3_4B,
            default_steps=4,
            default_guidance=1.0,
            uses_cfg=False,
            kv_cache_refs=False,
            repo_id="black-forest-labs/FLUX.2-klein-4B",
            dit_file="flux-2-klein-4b.safetensors",
            description="4B, step- and guidance-distilled, 4 steps",
        ),
        ModelPreset(
            name="klein-9b",
            dit=_DIT_9B,
            ae=_AE,
            text=_QWEN3_8B,
            default_steps=4,
            default_guidance=1.0,
            uses_cfg=False,
            kv_cache_refs=False,
            repo_id="black-forest-labs/FLUX.2-klein-9B",
            dit_file="flux-2-klein-9b.safetensors",
            license="flux-non-commercial",
            description="9B, step- and guidance-distilled, 4 steps",
        ),
        ModelPreset(
            name="klein-base-4b",
            dit=_DIT_4B,
            ae=_AE,
            text=_QWEN3_4B,
            default_steps=50,
            default_guidance=4.0,
            uses_cfg=True,
            kv_cache_refs=False,
            repo_id="black-forest-labs/FLUX.2-klein-base-4B",
            dit_file="flux-2-klein-base-4b.safetensors",
            description="4B undistilled base, CFG, 50 steps",
        ),
        ModelPreset(
            name="klein-base-9b",
            dit=_DIT_9B,
            ae=_AE,
            text=_QWEN3_8B,
            default_steps=50,
            default_guidance=4.0,
            uses_cfg=True,
            kv_cache_refs=False,
            repo_id="black-forest-labs/FLUX.2-klein-base-9B",
            dit_file="flux-2-klein-base-9b.safetensors",
            license="flux-non-commercial",
            description="9B undistilled base, CFG, 50 steps",
        ),
        ModelPreset(
            name="klein-9b-kv",
            dit=_DIT_9B,
            ae=_AE,
            text=_QWEN3_8B,
            default_steps=4,
            default_guidance=1.0,
            uses_cfg=False,
            kv_cache_refs=True,
            repo_id="black-forest-labs/FLUX.2-klein-9b-kv",
            dit_file="flux-2-klein-9b-kv.safetensors",
            license="flux-non-commercial",
            description="9B distilled, reference tokens K/V-cached after step 0",
        ),
        ModelPreset(
            name="nano",
            default_steps=4,
            default_guidance=1.0,
            uses_cfg=False,
            # Times 1, 0.857, 0.667, 0.4, 0. nano-base at 4 steps (CFG 2, n=100): edits 0.57 vs 0.42 on the empirical
            # schedule, two objects 0.86 vs 0.74; the student is distilled on this grid.
            schedule_shift=2.0,
            dit_file="flux-2-nano.safetensors",
            description="shipped in the package: shapes world, 128 px, distilled to 4 steps",
            **_NANO,
        ),
        ModelPreset(
            name="nano-base",
            default_steps=50,
            # Measured on the shapes-world eval (n=50-100): CFG 2 beats 4 on every task, edits most (0.60 vs 0.52).
            default_guidance=2.0,
            uses_cfg=True,
            dit_file="flux-2-nano-base.safetensors",
            description="shipped in the package: shapes world, 128 px, undistilled, CFG",
            **_NANO,
        ),
    )
}


def get_preset(name: str) -> ModelPreset:
    """Look a preset up by name (case-insensitive), or by its Hugging Face repo id."""
    key = name.strip().lower()
    for p in PRESETS.values():
        if key in (p.name, p.repo_id.lower(), *p.aliases):
            return p
    raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")


def dit_param_count(cfg: DiTConfig) -> int:
    """Parameters of a DiT built from `cfg` (used to sanity-check presets against published counts)."""
    h, m = cfg.hidden_size, cfg.mlp_hidden
    hd = cfg.head_dim
    double = 2 * (h * 3 * h + 2 * hd + h * h + h * 2 * m + m * h)
    single = h * (3 * h + 2 * m) + (h + m) * h + 2 * hd
    embed = h * cfg.in_channels + cfg.time_dim * h + h * h + cfg.context_dim * h
    mods = 2 * h * 6 * h + h * 3 * h
    final = h * 2 * h + h * cfg.in_channels
    return cfg.depth * double + cfg.depth_single * single + embed + mods + final


__all__ = [
    "AEConfig",
    "DiTConfig",
    "ModelPreset",
    "PRESETS",
    "TextEncoderConfig",
    "dit_param_count",
    "get_preset",
]
