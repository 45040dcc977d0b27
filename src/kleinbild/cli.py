"""Command line: a thin shell over the engine (argv and files here, nothing else)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kleinbild import __version__, cli_memory, cli_train
from kleinbild.compiling import parse_sizes

if TYPE_CHECKING:
    from kleinbild.loading import LoadOptions
    from kleinbild.pipeline import KleinPipeline
    from kleinbild.request import Request
    from kleinbild.result import GenerationResult


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = minimum - 1
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be an integer >= {minimum}, got {text!r}")
        return v

    return parse


_positive_int = _int_at_least(1, "value")


def _port(text: str) -> int:
    v = _int_at_least(0, "port")(text)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"port must be from 0 to 65535, got {text!r}")
    return v
_seed = _int_at_least(0, "seed")
_QUANT_FORMATS = ("fp8", "nvfp4", "int8")
_DTYPES = ("bfloat16", "float16", "float32")


# ---------------------------------------------------------------- the model flags, declared once


def _default_model() -> str:
    return os.environ.get("KLEINBILD_MODEL") or "nano"


def add_source_flags(p: argparse.ArgumentParser, default: str | None) -> None:
    """Which model: --model and, for an official single file, its parts and its preset."""
    p.add_argument("--model", "-m", default=default,
                   help="diffusers folder, official .safetensors or .gguf file, preset name or Hugging Face repo id "
                   "(default: $KLEINBILD_MODEL, else the bundled nano model)")
    p.add_argument("--vae", help="autoencoder for a single-file model: ae.safetensors or a diffusers vae/ folder")
    p.add_argument("--text-encoder", help="for a single-file model: a Qwen3 folder, a diffusers folder, a llama.cpp "
                   "GGUF (Qwen3-4B-Q8_0.gguf) or one .safetensors file with its tokenizer.json beside it")
    p.add_argument("--preset", help="sampling behaviour for a single file with an unofficial name (e.g. klein-base-4b)")


def add_runtime_flags(p: argparse.ArgumentParser, offload: str) -> None:
    """Where and how it runs: --dtype, --device, --quant, --offload, --compile."""
    p.add_argument("--dtype", choices=_DTYPES)
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--quant", choices=_QUANT_FORMATS,
                   help="quantize the transformer's block linears on load (weight-only; int8 per output channel)")
    p.add_argument("--text-quant", choices=_QUANT_FORMATS,
                   help="quantize the text encoder's linears on load (its embedding table goes int8 per row)")
    p.add_argument("--offload", choices=("none", "model", "sequential"), default=offload,
                   help="memory mode: 'model' keeps the text encoder only while encoding (and on a GPU moves each "
                   "component over for its own stage); 'sequential' streams transformer blocks to the GPU one at "
                   f"a time (default: {offload})")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer and decoder (worth it on a "
                   "GPU for repeated generations: ~0.65x the time per image; compiling takes tens of seconds)")
    p.add_argument("--compile-shapes", choices=("dynamic", "auto", "static"), default="auto", help="with --compile: "
                   "'dynamic' compiles one graph for every image size, 'static' one per size, 'auto' (torch's "
                   "default) a static one for the first size and one dynamic graph for all others")


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA (diffusers/PEFT, kohya/ComfyUI or official keys), scale 1 unless given; "
                   "repeat for several")
    p.add_argument("--fuse-lora", action="store_true", help="merge the LoRAs into the weights (faster steps)")


def add_model_flags(p: argparse.ArgumentParser, *, default: str | None, offload: str = "none") -> None:
    add_source_flags(p, default)
    add_runtime_flags(p, offload)
    add_lora_flags(p)


def load_options(args: argparse.Namespace, **changes: Any) -> LoadOptions:
    """The LoadOptions the model flags ask for (flags a command lacks keep their defaults)."""
    from kleinbild.loading import LoadOptions

    given = dict(vae=getattr(args, "vae", None), text_encoder=getattr(args, "text_encoder", None),
                 preset=getattr(args, "preset", None), device=args.device, dtype=args.dtype,
                 quant=getattr(args, "quant", None), text_quant=getattr(args, "text_quant", None),
                 loras=tuple(getattr(args, "lora", ())),
                 fuse_loras=getattr(args, "fuse_lora", False), offload_mode=getattr(args, "offload", "none"),
                 compile=getattr(args, "compile", False), compile_shapes=getattr(args, "compile_shapes", "auto"),
                 warm_sizes=tuple(getattr(args, "warm", None) or ()))
    return LoadOptions(**{**given, **changes})


# ---------------------------------------------------------------- commands and their flags


def _generate_parser(sub: Any) -> None:
    g = sub.add_parser("generate", help="text-to-image, edit (--image) or multi-reference (--image ... --image ...)")
    g.add_argument("prompt", nargs="?", help="what to make (optional with --from)")
    add_model_flags(g, default=None, offload="model")
    cli_memory.add_budget_flag(g)
    g.add_argument("--from", dest="from_png", metavar="PNG", help="make again the image this kleinbild PNG holds "
                   "(its prompt, seed, size, references and model); flags given beside it win")
    g.add_argument("--image", "-i", action="append", default=[], help="reference image (repeat for several); "
                   "with --mask, --strength or --expand the first is the image edited")
    g.add_argument("--mask", help="mask of the first image's size: white = repaint, black = keep; a PNG with "
                   "transparency is read as OpenAI's masks are: transparent = repaint")
    g.add_argument("--strength", type=float, help="(0, 1]: how far from the source sampling starts (1: pure noise; "
                   "without --mask, image-to-image)")
    g.add_argument("--mask-crop", type=int, metavar="PAD", help="edit a crop around the mask, padded by PAD pixels, "
                   "at the model's size, and paste it back")
    g.add_argument("--expand", metavar="L,T,R,B", help="outpaint: pixels to add on the left, top, right, bottom")
    g.add_argument("--keep-unmasked", action="store_true", help="paste the source's own pixels back outside the "
                   "mask (the mask's soft edge blends)")
    size = "default: the first reference's, else the model's (nano 128, klein 1024)"
    g.add_argument("--width", "-W", type=_positive_int, help=f"pixels, rounded down to a multiple of 16 ({size})")
    g.add_argument("--height", "-H", type=_positive_int, help=f"pixels ({size})")
    g.add_argument("--steps", "-s", type=_positive_int, help="sampling steps (default: the model's, 4 distilled or "
                   "50 base)")
    g.add_argument("--guidance", "-g", type=float, help="CFG scale (base models only)")
    g.add_argument("--cache", choices=["none", "first-block", "teacache"], help="step caching for base models: "
                   "reuse the transformer's residual on steps that change little (default: none)")
    g.add_argument("--cache-threshold", type=float, metavar="X", help="relative change under which a step is "
                   "reused (0: none; default first-block 0.08, teacache 0.15)")
    g.add_argument("--negative-prompt", help="negative prompt (base models only; default empty)")
    g.add_argument("--literal-prompt", action="store_true", help="encode the prompt as written (nano otherwise "
                   "completes a prompt that leaves sizes or positions out)")
    g.add_argument("--seed", type=_seed, help="random seed; image i gets seed + i (default: a random one, printed)")
    g.add_argument("-n", "--num-images", type=_positive_int, default=1)
    g.add_argument("--out", "-o", default="out.png", help="output PNG; with -n > 1 files are NAME-0.png, NAME-1.png")
    g.add_argument("--json", action="store_true", help="print the settings used as JSON on stdout")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def _bench_parser(sub: Any) -> None:
    b = sub.add_parser("bench", help="time each stage and peak memory; --vs diffusers runs both on the same weights")
    b.add_argument("--preset", default="klein-4b", help="the architecture to build with random weights")
    b.add_argument("--random-weights", action="store_true", help="seeded random weights of the preset's full size "
                   "(written once to the cache folder); the only mode for now")
    b.add_argument("--size", type=_positive_int, default=512)
    b.add_argument("--steps", type=_positive_int, help="default 4 (--step-cache: 50, random weights 12)")
    b.add_argument("--threads", type=_positive_int, help="CPU threads for both engines (default: torch's)")
    b.add_argument("--vs", choices=["diffusers"], help="also run diffusers' Flux2KleinPipeline, alternating")
    b.add_argument("--repeats", type=_positive_int, default=3)
    b.add_argument("--cache-dir", help="where random checkpoints are written (default ~/.cache/kleinbild)")
    add_runtime_flags(b, offload="model")
    b.set_defaults(dtype="bfloat16", device="cpu")
    b.add_argument("--serve", action="store_true", help="measure the HTTP server instead: in-process vs 1 and 2 "
                   "Ray Serve replicas, the same load (needs kleinbild[ray])")
    cli_memory.add_bench_flag(b)
    b.add_argument("--serve-model", default="nano", help="--serve: the model served (default nano)")
    b.add_argument("--requests", type=_positive_int, default=40, help="--serve: requests per configuration")
    b.add_argument("--concurrency", type=_positive_int, default=4, help="--serve: client threads")
    b.add_argument("--step-cache", action="store_true", help="measure step caching instead: nano-base's eval "
                   "score, PSNR and time at several thresholds against no cache (with --random-weights also the "
                   "--preset's full size, e.g. klein-base-4b --size 128)")
    b.add_argument("--eval-n", type=_positive_int, default=40, help="--step-cache: examples per eval task")
    b.add_argument("--prequantized", action="store_true", help="with --quant: write the quantized transformer once "
                   "(as `kleinbild quantize` does; not timed) and load it, instead of quantizing on every load")


def _eval_parser(sub: Any) -> None:
    e = sub.add_parser("eval", help="score a model with the shapes-world analyser on held-out prompts")
    add_model_flags(e, default="nano")
    e.add_argument("--n", type=_positive_int, default=50, help="examples per task")
    e.add_argument("--tasks", default="single,double,edit,compose,held_out,masked,plain,plain_double")
    e.add_argument("--steps", type=_positive_int)
    e.add_argument("--seed", type=_seed, default=0)
    e.add_argument("--grid", help="write a PNG grid of prompts and outputs here")
    e.add_argument("--literal-prompt", action="store_true", help="score the model on the prompts as written "
                   "(nano otherwise completes the plain tasks' prompts, as it does for users)")
    e.add_argument("--json", action="store_true")


def _sizes(text: str) -> list[tuple[int, int]]:
    try:
        return parse_sizes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _serve_parser(sub: Any) -> None:
    v = sub.add_parser("serve", help="HTTP server: OpenAI-compatible images API, async jobs with progress, playground")
    add_model_flags(v, default=_default_model())
    cli_memory.add_budget_flag(v)
    v.add_argument("--warm", type=_sizes, metavar="WxH,...", help="generate once at these sizes (batches of 1 and 2) "
                   "after loading, before /health says ready: with --compile, requests then compile nothing")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    v.add_argument("--port", type=_port, default=8000, help="TCP port (default: 8000; 0: any free one)")
    v.add_argument("--api-key", action="append", default=[],
                   help="require 'Authorization: Bearer KEY' on /v1 and /metrics (repeatable; also "
                   "$KLEINBILD_API_KEYS, comma-separated)")
    v.add_argument("--cors-origin", action="append", default=[], help="allow browser calls from this origin "
                   "(repeatable; default: none)")
    v.add_argument("--allowed-host", action="append", default=[], help="answer requests for this Host name "
                   "(repeatable; default: on a loopback address only its loopback names, elsewhere any)")
    v.add_argument("--webhook-host", action="append", default=[], help="let BFL-style requests' webhook_url "
                   "call this host ('name' or 'name:port'; repeatable; default: none, no webhooks)")
    v.add_argument("--public-url", help="what url results start with, e.g. https://images.example.com behind a "
                   "proxy (default: the address the client used)")
    v.add_argument("--body-timeout", type=_positive_int, default=30, help="seconds a request body may take "
                   "(default: 30)")
    v.add_argument("--keep-alive-timeout", type=_positive_int, default=5, help="seconds an idle connection stays "
                   "open (default: 5)")
    v.add_argument("--max-pixels", type=_positive_int, default=4 * 1024 * 1024, help="most output pixels (W*H)")
    v.add_argument("--max-n", type=_positive_int, default=8, help="most images per request")
    v.add_argument("--max-images", type=_positive_int, default=4, help="most reference images per request")
    v.add_argument("--max-upload-bytes", type=_positive_int, default=32 * 2**20, help="largest request body")
    v.add_argument("--max-image-pixels", type=_positive_int, default=4096 * 4096,
                   help="largest uploaded image (W*H) before it is downsized")
    v.add_argument("--max-steps", type=_positive_int, default=100)
    v.add_argument("--max-queue", type=_positive_int, default=64, help="jobs that may wait; then 429")
    v.add_argument("--max-batch", type=_positive_int, default=8, help="most images in one batched forward")
    v.add_argument("--output-dir", help="where url results are written (default: a temporary folder)")
    v.add_argument("--ttl", type=_positive_int, default=3600, help="seconds finished jobs and url results are kept")
    v.add_argument("--preview-every", type=_int_at_least(0, "preview interval"), default=1,
                   help="steps between progress previews (0: none)")
    v.add_argument("--cache-size", type=_int_at_least(0, "cache size"), default=32,
                   help="prompt embeddings and reference latents kept, each (0: no caching)")
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _replica_flags(v.add_argument_group("replicas on Ray Serve (pip install 'kleinbild[ray]'; docs/scale-out.md)"))


def _replica_flags(r: Any) -> None:
    r.add_argument("--replicas", type=_positive_int, help="run the model in N Ray Serve replicas behind this "
                   "server (with --max-replicas: the count to start with)")
    r.add_argument("--ray-address", help="join this Ray cluster (auto: the one this node is part of); default: start "
                   "a local Ray, stopped with the server")
    r.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs each replica reserves (default 0)")
    r.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves, also its "
                   "torch threads on a CPU (default 1)")
    r.add_argument("--min-replicas", type=_positive_int, help="autoscaling: fewest replicas (with --max-replicas)")
    r.add_argument("--max-replicas", type=_positive_int, help="autoscaling: most replicas")
    r.add_argument("--target-ongoing", type=float, default=2.0, help="autoscaling: requests in flight per "
                   "replica to aim for (default 2)")
    r.add_argument("--max-retries", type=_int_at_least(0, "retries"), default=3, help="times a job runs again "
                   "when its replica is lost (default 3)")


class _Parser(argparse.ArgumentParser):
    """One line for a bad command line (what is wrong, and where the help is), not a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kleinbild", description="Run the FLUX.2 [klein] image models.")
    parser.add_argument("--version", action="version", version=f"kleinbild {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _generate_parser(sub)
    sub.add_parser("models", help="list the presets and where each is available locally")
    _bench_parser(sub)
    cli_train.add_parser(sub, _positive_int, _seed)
    _eval_parser(sub)
    _serve_parser(sub)
    cli_memory.add_quantize_parser(sub, _positive_int)
    cli_memory.add_parser(sub, add_source_flags, _positive_int)
    return parser


# ---------------------------------------------------------------- generate


def _progress(quiet: bool):
    start = time.perf_counter()

    def show(step: int, total: int, _latent) -> None:
        if quiet:
            return
        bar = "#" * int(20 * step / total)
        sys.stderr.write(f"\rstep {step}/{total} [{bar:<20}] {time.perf_counter() - start:5.1f}s")
        if step == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def output_paths(out: str, n: int) -> list[Path]:
    """The files to write: the name's own format (.png, .jpg, .webp; none given: .png), numbered when n > 1."""
    p = Path(out)
    if not p.suffix:
        p = p.with_suffix(".png")
    if p.suffix.lower() not in _FORMATS:
        raise ValueError(f"cannot write {p.suffix!r} images ({out}); name the output .png, .jpg or .webp")
    if n == 1:
        return [p]
    return [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(n)]


def image_meta(result: GenerationResult, index: int, image_paths: list[str], mask_path: str | None = None
               ) -> dict[str, Any]:
    """What the file of image `index` records: enough to make it again (`kleinbild generate --from`)."""
    meta = result.image_settings(index)
    for ref, path in zip(meta["references"], image_paths, strict=True):
        ref["path"] = str(Path(path).resolve())
    if mask_path is not None:
        meta["mask_path"] = str(Path(mask_path).resolve())
    meta.update(index=index, software=f"kleinbild {__version__}")
    return meta


def _from_png(args: argparse.Namespace) -> dict[str, Any]:
    """Fill what the flags leave open from a kleinbild PNG's settings (flags win)."""
    from kleinbild.images import read_settings

    s = read_settings(args.from_png)
    for name in ("prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", "dtype", "quant",
                 "text_quant"):  # a file's own format (a GGUF's Q4_K) comes back with the file, not as a flag
        value = s.get(name)
        if getattr(args, name, None) is None and value is not None and (not name.endswith("quant") or value in
                                                                          _QUANT_FORMATS):
            setattr(args, name, value)
    if args.model is None:
        args.model = s.get("model")
    if not args.image:
        missing = [i for i, r in enumerate(s.get("references", [])) if not r.get("path")]
        if missing:
            raise ValueError(f"{args.from_png} was made from references it does not name; pass them with --image")
        args.image = [r["path"] for r in s.get("references", [])]
    if not args.lora:
        args.lora = [f"{x['source']}:{x['scale']}" for x in s.get("loras") or [] if x.get("source")]
    _edit_from_png(args, s)
    return s


def _edit_from_png(args: argparse.Namespace, s: dict[str, Any]) -> None:
    for name in ("strength", "mask_crop", "expand"):
        if getattr(args, name) is None and s.get(name) is not None:
            setattr(args, name, s[name])
    cached = s.get("step_cache")
    if args.cache is None and cached:  # the steps it skipped are part of the image
        args.cache, args.cache_threshold = cached["mode"], cached["threshold"]
    args.keep_unmasked = args.keep_unmasked or bool(s.get("keep_unmasked"))
    args.literal_prompt = args.literal_prompt or bool(s.get("literal_prompt"))
    if s.get("masked") and args.mask is None:
        if not s.get("mask_path"):
            raise ValueError(f"{args.from_png} was a masked edit whose mask it does not name; pass it with --mask")
        args.mask = s["mask_path"]


def _check_references(original: dict[str, Any], req: Request) -> None:
    made_from = [r.get("digest") for r in original.get("references", [])]
    if made_from and list(req.reference_digests) != made_from:
        sys.stderr.write("warning: the references differ from the ones this image was made from; the result will "
                         "differ too\n")
    mask = original.get("mask_digest")
    if mask and (req.edit is None or req.edit.mask_digest != mask):
        sys.stderr.write("warning: the mask differs from the one this image was made with; the result will differ "
                         "too\n")


def cmd_generate(args: argparse.Namespace) -> int:
    from kleinbild.loading import locate_with
    from kleinbild.pipeline import KleinPipeline
    from kleinbild.request import validate

    original = _from_png(args) if args.from_png else None
    if args.prompt is None:
        raise ValueError("give a prompt (or --from PNG to make an image again)")
    args.model = args.model or _default_model()
    paths = output_paths(args.out, args.num_images)
    options = cli_memory.apply_budget(args, load_options(args), args.width, args.height)
    files = locate_with(args.model, options)
    # Checked against the model's preset before its weights are read: a bad size or image fails at once.
    req = validate(files.preset, args.prompt, args.image or None, width=args.width, height=args.height,
                   steps=args.steps, guidance=args.guidance, negative_prompt=args.negative_prompt, seed=args.seed,
                   num_images=args.num_images, mask=_mask(args.mask), strength=args.strength, mask_crop=args.mask_crop,
                   expand=args.expand, keep_unmasked=args.keep_unmasked, cache=args.cache,
                   cache_threshold=args.cache_threshold, literal_prompt=args.literal_prompt)
    t0 = time.perf_counter()
    pipe = KleinPipeline.from_located(files, options, source=str(args.model))
    if not args.quiet:
        sys.stderr.write(f"loaded {pipe.preset.name} on {pipe.device} ({time.perf_counter() - t0:.1f}s)\n")
    if original is not None:
        _check_references(original, req)
    result = pipe.run([req], _progress(args.quiet))[0]
    _report(pipe, result, paths, args)
    return 0


def _mask(path: str | None) -> Any:
    """The mask file, by OpenAI's rule when it has an alpha channel (transparent = repaint), else as the engine reads
    it (white = repaint)."""
    from PIL import Image, UnidentifiedImageError

    from kleinbild.masking import alpha_mask, has_alpha

    if path is None:
        return None
    try:
        with Image.open(path) as img:
            return alpha_mask(img) if has_alpha(img) else path
    except (OSError, UnidentifiedImageError):
        return path  # missing or unreadable: the engine's error says which


def _report(pipe: KleinPipeline, result: GenerationResult, paths: list[Path], args: argparse.Namespace) -> None:
    from kleinbild.images import encode_image

    for note in result.settings["notes"]:
        sys.stderr.write(f"note: {note}\n")
    for i, (img, path) in enumerate(zip(result.images, paths, strict=True)):
        if path.exists():
            sys.stderr.write(f"note: replacing {path}\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = image_meta(result, i, args.image, args.mask)
        path.write_bytes(encode_image(img, _FORMATS[path.suffix.lower()], meta))
        if not args.json:
            print(path)
    if args.json:  # one JSON object on stdout, nothing else
        outputs = [{"path": str(p), "seed": s} for p, s in zip(paths, result.settings["seeds"], strict=False)]
        print(json.dumps({**result.settings, "outputs": outputs}))
    elif not args.quiet:
        s = result.settings
        seeds = s["seeds"]
        which = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}..{seeds[-1]}"
        w, h = result.images[0].size  # with a crop pasted back: the whole picture's
        sys.stderr.write(f"{which}, {w}x{h}, {s['steps']} steps, {s['seconds']:.2f}s\n")


# ---------------------------------------------------------------- the other commands


def cmd_bench(args: argparse.Namespace) -> int:
    from kleinbild.bench import cpu as bench

    if args.memory:
        return cli_memory.cmd_bench_memory(args)
    if args.step_cache:
        from kleinbild.bench import step_cache

        return step_cache.cli(args)
    args.steps = args.steps or 4
    if args.serve:
        from kleinbild.bench import serve as bench_serve

        res = bench_serve.run(args.serve_model, requests=args.requests, concurrency=args.concurrency,
                              threads=args.threads or 1, rounds=args.repeats,
                              say=lambda m: print(m, file=sys.stderr, flush=True))
        print(bench_serve.format_table(res))
        print(json.dumps(res))
        return 0
    if not args.random_weights:
        raise ValueError("kleinbild bench measures random full-size weights for now: pass --random-weights")
    if args.device != "cpu":
        from kleinbild.bench import device as bench_device
        from kleinbild.loading import pick_device

        dev = pick_device(args.device)
        modes = ("model", "sequential") if args.offload == "model" else (() if args.offload == "none" else
                                                                          (args.offload,))
        res = bench_device.run(args.preset, device=str(dev), size=args.size, steps=args.steps, dtype=args.dtype,
                               repeats=args.repeats, vs=args.vs, compile=args.compile, offload_modes=modes,
                               say=lambda m: print(m, file=sys.stderr, flush=True))
        print(bench_device.format_table(res))
        print(json.dumps(res))
        return 0
    res = bench.run(args.preset, size=args.size, steps=args.steps, dtype=args.dtype, threads=args.threads,
                    vs=args.vs, repeats=args.repeats, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                    offload=args.offload, quant=args.quant, prequantized=args.prequantized,
                    say=lambda m: print(m, file=sys.stderr, flush=True))
    print(bench.format_table(res))
    print(json.dumps(res))
    return 0


def cmd_models() -> int:
    from kleinbild.config import PRESETS
    from kleinbild.loading import where_is

    print(f"{'preset':<15} {'steps':>5} {'cfg':>4}  {'available':<9} path / repo")
    for p in PRESETS.values():
        path = where_is(p)
        print(f"{p.name:<15} {p.default_steps:>5} {'yes' if p.uses_cfg else 'no':>4}  {'yes' if path else 'no':<9} "
              f"{path or p.repo_id}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kleinbild.nano.evaluate import evaluate, format_table, save_grid
    from kleinbild.pipeline import KleinPipeline

    pipe = KleinPipeline.from_pretrained(args.model, load_options(args))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    options = {"literal_prompt": True} if args.literal_prompt else None
    report = evaluate(pipe, tasks, n=args.n, seed=args.seed, steps=args.steps, options=options)
    print(format_table(report))
    if args.grid:
        save_grid(report, Path(args.grid))
        print(f"grid: {args.grid}")
    if args.json:
        print(json.dumps(report.summary()))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from kleinbild.serve import ServerSettings, api_keys_from_env, serve

    keys = tuple(dict.fromkeys([*args.api_key, *api_keys_from_env()]))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not keys:
        sys.stderr.write(f"warning: serving on {args.host} without an API key; anyone who can reach it can use it\n")
    settings = ServerSettings(
        api_keys=keys, cors_origins=tuple(args.cors_origin), max_pixels=args.max_pixels, max_n=args.max_n,
        max_images=args.max_images, max_upload_bytes=args.max_upload_bytes, max_image_pixels=args.max_image_pixels,
        max_steps=args.max_steps, max_queue=args.max_queue, max_batch=args.max_batch, output_dir=args.output_dir,
        ttl=float(args.ttl), preview_every=args.preview_every, prompt_cache=args.cache_size,
        reference_cache=args.cache_size, allowed_hosts=_allowed_hosts(args.host, args.allowed_host),
        public_url=args.public_url, body_timeout=float(args.body_timeout),
        keep_alive_timeout=float(args.keep_alive_timeout), webhook_hosts=tuple(args.webhook_host),
    )
    logging.getLogger("kleinbild").setLevel(args.log_level.upper())
    options = cli_memory.apply_budget(args, load_options(args), None, None)
    return serve(args.model, host=args.host, port=args.port, settings=settings, load_options=options,
                 log_level=args.log_level, replicas=_replica_options(args))


def _replica_options(args: argparse.Namespace) -> Any:
    """None (serve in this process) unless a replica flag is given."""
    from kleinbild.serve.settings import ReplicaOptions

    if args.replicas is None and args.max_replicas is None and args.min_replicas is None:
        if args.ray_address:
            raise ValueError("--ray-address needs --replicas N (or --max-replicas): how many replicas to run")
        return None
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # not ray.serve: finding a submodule imports ray, too early
        raise ValueError("--replicas runs on Ray Serve, which is not installed: pip install 'kleinbild[ray]'")
    return ReplicaOptions(replicas=args.replicas or args.min_replicas or 1, min_replicas=args.min_replicas,
                          max_replicas=args.max_replicas, target_ongoing=args.target_ongoing,
                          cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
                          ray_address=args.ray_address, max_retries=args.max_retries)


def _allowed_hosts(host: str, given: list[str]) -> tuple[str, ...]:
    loopback = host in ("127.0.0.1", "localhost", "::1")
    return tuple(dict.fromkeys([*given, *(("127.0.0.1", "localhost", "[::1]") if loopback else ())]))


def _commands() -> dict[str, Any]:
    return {"generate": cmd_generate, "models": lambda _args: cmd_models(), "bench": cmd_bench,
            "train": cli_train.cmd_train, "eval": cmd_eval, "serve": cmd_serve, "quantize": cli_memory.cmd_quantize,
            "memory": cli_memory.cmd_memory}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    command = _commands().get(args.command)
    if command is None:
        parser.error(f"unknown command {args.command!r}")
    notes = logging.getLogger("kleinbild.request")
    level = notes.level
    notes.setLevel(logging.ERROR)  # the request's notes are printed once, as notes, not also as warnings
    try:
        return command(args)
    except (ValueError, OSError) as e:
        # Our errors name the bad value and the fix; a traceback would only hide that.
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    finally:
        notes.setLevel(level)


if __name__ == "__main__":
    raise SystemExit(main())
