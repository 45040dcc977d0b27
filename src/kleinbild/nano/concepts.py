"""The LoRA concept demo on the shapes world: teach nano a shape it has never seen, and measure that it learnt it.

`make_concept_data` renders shapes-world scenes with a shape the world does not have (a bar by default) and captions
that name it, in the data-folder layout `kleinbild.train_lora` reads; `concept_eval` measures with the shapes
analyser and shape templates that the new shape appears where and as prompted, and that prompts without it come out
as before.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from kleinbild import lora_host
from kleinbild.images import psnr
from kleinbild.nano import shapes
from kleinbild.nano.analyze import _box3, _classify, analyze, matches


def _cross(draw: ImageDraw.ImageDraw, box: shapes.Box) -> None:
    x0, y0, x1, y1 = box
    w, h = (x1 - x0) / 3, (y1 - y0) / 3
    draw.rectangle((x0 + w, y0, x1 - w, y1), fill=255)
    draw.rectangle((x0, y0 + h, x1, y1 - h), fill=255)


def _diamond(draw: ImageDraw.ImageDraw, box: shapes.Box) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)


def _ring(draw: ImageDraw.ImageDraw, box: shapes.Box) -> None:
    x0, y0, x1, y1 = box
    draw.ellipse(box, fill=255)
    m = (x1 - x0) * 0.25
    draw.ellipse((x0 + m, y0 + m, x1 - m, y1 - m), fill=0)


# Shapes the shapes world does not have. (A new *colour* cannot be taught to nano: its small autoencoder only
# reconstructs the palette, measured: pink comes back white, cyan blue, so no DiT adapter could draw one.)
def _bar(draw: ImageDraw.ImageDraw, box: shapes.Box) -> None:
    x0, y0, x1, y1 = box
    h = (y1 - y0) * 0.3
    cy = (y0 + y1) / 2
    draw.rectangle((x0, cy - h, x1, cy + h), fill=255)


CONCEPT_SHAPES: dict[str, Callable[[ImageDraw.ImageDraw, shapes.Box], None]] = {
    "bar": _bar, "ring": _ring, "cross": _cross, "diamond": _diamond}
_ALL_DRAWERS = {**shapes.DRAWERS, **CONCEPT_SHAPES}


def _check_concept(shape: str) -> None:
    if shape not in CONCEPT_SHAPES:
        raise ValueError(f"unknown concept shape {shape!r}; choose one of: {', '.join(CONCEPT_SHAPES)}")


def render_concept(scene: shapes.Scene, size: int = 128) -> Image.Image:
    """Render a scene that may hold concept shapes (drawn like the world's: same box, anti-aliasing)."""
    return shapes.render(scene, size, drawers=_ALL_DRAWERS)


def _concept_scene(rng: random.Random, shape: str) -> shapes.Scene:
    # Big only: nano's autoencoder (16x downscaling, 8x8 latents at 128 px) blurs a small ring or cross into a dot,
    # so no adapter could draw one (see concept_eval's autoencoder ceiling).
    bg = rng.choice(shapes.COLOURS)
    colour = rng.choice([c for c in shapes.COLOURS if c != bg])
    obj = shapes.Obj(shape, colour, "big", rng.choice(list(shapes.POSITIONS)))
    return shapes.Scene(bg, (obj,))


def make_concept_data(out: Path | str, shape: str = "bar", n: int = 20, seed: int = 0, size: int = 128,
                      prior: int = 0, prior_pipe: Any = None) -> Path:
    """Write `n` captioned single-object scenes of the concept shape (image + .txt), seeded, and `prior` ordinary
    shapes-world prompts with images: prior preservation (as in DreamBooth), so the adapter learns what is new
    without unlearning what the model already draws. The prior images are the rendered scenes, or with
    `prior_pipe` (the model to be adapted) the model's own images for those prompts: then the adapter is pulled
    towards what the model does now, not towards the world's ground truth, which the model only approximates
    (training on the truth moves unrelated prompts too). No prior scene is an evaluation scene."""
    _check_concept(shape)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"kleinbild-concept:{shape}:{seed}")
    for i in range(n):
        scene = _concept_scene(rng, shape)
        render_concept(scene, size).save(out / f"{shape}-{i:03d}.png")
        (out / f"{shape}-{i:03d}.txt").write_text(shapes.caption(scene, rng) + "\n")
    for i in range(prior):
        ex = shapes.sample_t2i(rng)
        if prior_pipe is None:
            img = shapes.render(ex.target, size)
        else:
            img = prior_pipe.generate(ex.prompt, width=size, height=size, seed=seed * 100_003 + i).images[0]
        img.save(out / f"prior-{i:03d}.png")
        (out / f"prior-{i:03d}.txt").write_text(ex.prompt + "\n")
    return out


@functools.lru_cache(maxsize=512)
def _template(shape: str, side: int) -> np.ndarray:
    ss = 4
    mask = Image.new("L", (side * ss, side * ss), 0)
    _ALL_DRAWERS[shape](ImageDraw.Draw(mask), (0, 0, side * ss - 1, side * ss - 1))
    return np.asarray(mask.resize((side, side), Image.Resampling.BOX), dtype=np.float64) / 255.0 >= 0.5


def concept_presence(image: Image.Image, shape: str, min_iou: float = 0.6) -> dict[str, Any]:
    """Find an object of the concept shape: the shapes analyser finds the objects (colour, size, position); each
    object's colour mask, in a square box around it, is compared with every shape's template (the world's and the
    concept's). Present when the concept's template fits best, with IoU >= `min_iou`. Returns whether it is
    present and, if so, the concept object as the analyser read it (`found`) with its IoU."""
    _check_concept(shape)
    rgb = np.asarray(image.convert("RGB"))
    analysis = analyze(rgb)
    classes = _classify(_box3(rgb.astype(np.float32)))
    best: dict[str, Any] = {"present": False, "found": None, "iou": 0.0, "analysis": analysis}
    for f in analysis.objects:
        x0, y0, x1, y1 = f.bbox
        side = max(x1 - x0, y1 - y0)
        if side < 4:
            continue
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left, top = round(cx - side / 2), round(cy - side / 2)
        pad = np.full((side, side), False)
        sub = classes[max(top, 0): top + side, max(left, 0): left + side] == shapes.COLOURS.index(f.colour)
        pad[max(-top, 0): max(-top, 0) + sub.shape[0], max(-left, 0): max(-left, 0) + sub.shape[1]] = sub
        ious = {}
        for name in _ALL_DRAWERS:
            t = _template(name, side)
            ious[name] = float((pad & t).sum() / max((pad | t).sum(), 1))
        winner = max(ious, key=ious.__getitem__)
        if winner == shape and ious[shape] >= min_iou and ious[shape] > best["iou"]:
            # The analyser sizes by covered area, which a ring or cross does not fill: size by the box instead.
            big = side / rgb.shape[1] >= (shapes.SIZE_FRACTIONS["small"] + shapes.SIZE_FRACTIONS["big"]) / 2
            best.update(present=True, found=dataclasses.replace(f, size="big" if big else "small"), iou=ious[shape])
    return best


def concept_eval(
    pipe: Any, shape: str = "bar", n: int = 20, seed: int = 1000, lora_name: str | None = None,
    steps: int | None = None,
) -> dict[str, Any]:
    """With the pipeline's LoRAs on and off: on fresh concept prompts, how often the concept shape appears (and with
    the prompted colour, size and position); on the eval set's unrelated prompts, the analyser score and the PSNR of
    with-LoRA against without-LoRA images (same seeds). `lora_name` (default: all attached) is switched off for the
    baseline by setting its scale to 0."""
    _check_concept(shape)
    size = pipe.preset.default_size
    h = lora_host.host(pipe.transformer)
    names = [lora_name] if lora_name else [a["name"] for a in h.info()]
    if not names:
        raise ValueError("attach the trained LoRA first (pipe.load_lora(...)); concept_eval compares it on and off")
    scales = {nm: h.adapters[nm].scale for nm in names}
    rng = random.Random(f"kleinbild-concept-eval:{shape}:{seed}")
    concept = [(sc, shapes.caption(sc, rng)) for sc in (_concept_scene(rng, shape) for _ in range(n))]
    unrelated = shapes.eval_set("single", n, seed) + shapes.eval_set("double", n, seed)

    def run(on: bool) -> dict[str, Any]:
        for nm in names:
            h.set_scale(nm, scales[nm] if on else 0.0)
        hits = attrs = 0
        for i, (scene, prompt) in enumerate(concept):
            img = pipe.generate(prompt, width=size, height=size, steps=steps, seed=seed + i).images[0]
            res = concept_presence(img, shape)
            hits += res["present"]
            if res["present"]:
                o, f = scene.objects[0], res["found"]
                attrs += (f.colour, f.size, f.position) == (o.colour, o.size, o.position)
        imgs, score, leaks = [], 0, 0
        for i, ex in enumerate(unrelated):
            img = pipe.generate(ex.prompt, width=size, height=size, steps=steps, seed=seed + i).images[0]
            imgs.append(img)
            score += matches(analyze(img), ex.target)["all"]
            leaks += concept_presence(img, shape)["present"]
        return {"concept_present": hits / n, "concept_all_right": attrs / n,
                "unrelated_score": score / len(unrelated), "unrelated_with_concept": leaks / len(unrelated),
                "images": imgs}

    # What the autoencoder alone lets through: the concept targets, encoded and decoded.
    refs = [render_concept(sc, size) for sc, _ in concept]
    ceiling = sum(concept_presence(im, shape)["present"] for im in pipe.decode(torch.cat(pipe.encode_images(refs))))
    try:
        with_lora = run(True)
        without = run(False)
    finally:
        for nm in names:
            h.set_scale(nm, scales[nm])
    psnrs = [psnr(a, b) for a, b in zip(with_lora.pop("images"), without.pop("images"), strict=True)]
    finite = [p for p in psnrs if math.isfinite(p)]
    return {"shape": shape, "n": n, "with_lora": with_lora, "without_lora": without, "autoencoder_ceiling": ceiling / n,
            "unrelated_psnr_mean": float(np.mean(finite)) if finite else float("inf"),
            "unrelated_psnr_min": float(min(psnrs)) if psnrs else float("inf")}


__all__ = [
    "CONCEPT_SHAPES",
    "concept_eval",
    "concept_presence",
    "make_concept_data",
    "render_concept",
]
