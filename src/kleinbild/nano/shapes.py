"""The "shapes world": procedural scenes, their captions, edit and compose examples, and a deterministic eval split.

The nano model is trained on this world. Every sampler takes an explicit `random.Random`, so a seed reproduces the
same scenes, prompts and pixels; nothing here touches the global random state.

Geometry: the image is a 3x3 grid of cells and each object is centred in its own cell. Small objects span
`SIZE_FRACTIONS["small"]` of the image side, big ones `SIZE_FRACTIONS["big"]`; big is a little under a third so that
objects in neighbouring cells (and corner objects and the image border) keep a visible gap even at 64 px, which
keeps them separable for the pixel analyzer in `kleinbild.nano.analyze`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from kleinbild.config import get_preset

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    # Pushed a little away from the brief's (245, 140, 30): orange/yellow and orange/red are the closest pairs,
    # and this puts both near 90 apart in RGB, which the analyzer's noise margin depends on.
    "orange": (248, 128, 24),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "big")
# Bounding-box side as a fraction of the image side.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.19, "big": 0.30}
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (1 / 6, 1 / 6),
    "top": (1 / 2, 1 / 6),
    "top right": (5 / 6, 1 / 6),
    "left": (1 / 6, 1 / 2),
    "centre": (1 / 2, 1 / 2),
    "right": (5 / 6, 1 / 2),
    "bottom left": (1 / 6, 5 / 6),
    "bottom": (1 / 2, 5 / 6),
    "bottom right": (5 / 6, 5 / 6),
}
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("green", "triangle")})
EDIT_KINDS: tuple[str, ...] = ("recolour", "move", "add", "remove", "background")
EVAL_TASKS: tuple[str, ...] = ("single", "double", "edit", "compose", "held_out")
# Share of all scenes that belongs to the eval split (by hash, see is_eval_scene).
EVAL_FRACTION = 0.10

_N_OBJECT_WEIGHTS = (0.45, 0.35, 0.20)
_SUPERSAMPLE = 4
# Rejection sampling normally succeeds within a handful of draws; the cap only turns a logic error into an exception.
_MAX_TRIES = 100_000


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """A background colour and 1..3 objects in distinct cells, none in the background's colour.

    Not validated on construction: `kleinbild.nano.analyze` builds scenes from arbitrary pixels, which may break
    the rules.
    """

    background: str
    objects: tuple[Obj, ...]


@dataclass(frozen=True)
class Example:
    kind: str  # "t2i" | "edit" | "compose"
    prompt: str
    target: Scene
    sources: tuple[Scene, ...] = ()
    edit: str = ""  # for edits: one of EDIT_KINDS


def scene_problems(scene: Scene) -> list[str]:
    """Why `scene` breaks the world's rules (empty when it is a valid scene)."""
    problems = []
    if scene.background not in PALETTE:
        problems.append(f"unknown background {scene.background!r}")
    positions = [o.position for o in scene.objects]
    if len(set(positions)) != len(positions):
        problems.append("two objects share a position")
    if len(scene.objects) > 3:
        problems.append("more than 3 objects")
    for o in scene.objects:
        if o.shape not in SHAPES or o.colour not in PALETTE or o.size not in SIZES or o.position not in POSITIONS:
            problems.append(f"unknown attribute in {o}")
        if o.colour == scene.background:
            problems.append(f"{o.colour} {o.shape} has the background's colour")
    return problems


def has_held_out(scene: Scene) -> bool:
    return any((o.colour, o.shape) in HELD_OUT for o in scene.objects)


def _canonical(scene: Scene) -> str:
    objs = sorted(f"{o.shape},{o.colour},{o.size},{o.position}" for o in scene.objects)
    return scene.background + "|" + ";".join(objs)


def is_eval_scene(scene: Scene) -> bool:
    """Whether `scene` belongs to the eval split: a stable hash of its canonical form, independent of object order."""
    digest = hashlib.sha256(_canonical(scene).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < round(EVAL_FRACTION * 1000)


# ---------------------------------------------------------------------------------------------------------------------
# Scenes


def _random_obj(rng: random.Random, background: str, position: str, allow_held_out: bool) -> Obj:
    while True:
        colour = rng.choice([c for c in COLOURS if c != background])
        shape = rng.choice(SHAPES)
        if allow_held_out or (colour, shape) not in HELD_OUT:
            return Obj(shape, colour, rng.choice(SIZES), position)


def _raw_scene(rng: random.Random, n_objects: int | None, held_out: bool) -> Scene:
    """A valid scene with no split filtering. held_out=False: no HELD_OUT pair; True: at least one."""
    n = n_objects if n_objects is not None else rng.choices((1, 2, 3), weights=_N_OBJECT_WEIGHTS)[0]
    if not 1 <= n <= 3:
        raise ValueError(f"n_objects must be 1..3, got {n}")
    positions = rng.sample(list(POSITIONS), n)
    if not held_out:
        background = rng.choice(COLOURS)
        return Scene(background, tuple(_random_obj(rng, background, p, False) for p in positions))
    colour, shape = rng.choice(sorted(HELD_OUT))
    background = rng.choice([c for c in COLOURS if c != colour])
    special = rng.randrange(n)
    objs = tuple(
        Obj(shape, colour, rng.choice(SIZES), p) if i == special else _random_obj(rng, background, p, True)
        for i, p in enumerate(positions)
    )
    return Scene(background, objs)


def sample_scene(rng: random.Random, n_objects: int | None = None, held_out: bool = False) -> Scene:
    """A random scene. n_objects None: 1..3 objects.

    held_out=False (training): no HELD_OUT pair and never an eval-split scene. held_out=True: at least one object uses a
    HELD_OUT pair (such scenes are never trained on, so the eval split is not excluded).
    """
    for _ in range(_MAX_TRIES):
        scene = _raw_scene(rng, n_objects, held_out)
        if held_out or not is_eval_scene(scene):
            return scene
    raise RuntimeError("sample_scene: no acceptable scene found")


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def object_box(o: Obj, side: float) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the square an object is drawn in, on an image `side` pixels wide."""
    fx, fy = POSITIONS[o.position]
    half = SIZE_FRACTIONS[o.size] * side / 2
    cx, cy = fx * side, fy * side
    return cx - half, cy - half, cx + half, cy + half


Box = tuple[float, float, float, float]


def _triangle(draw: ImageDraw.ImageDraw, box: Box) -> None:
    # Upright isosceles triangle filling the same square box: apex at top centre, base along the bottom.
    draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=255)


# How each shape fills its square box (inclusive PIL box on the supersampled canvas).
DRAWERS: dict[str, Callable[[ImageDraw.ImageDraw, Box], None]] = {
    "circle": lambda draw, box: draw.ellipse(box, fill=255),
    "square": lambda draw, box: draw.rectangle(box, fill=255),
    "triangle": _triangle,
}


def render(scene: Scene, size: int = 128, drawers: dict[str, Callable[[ImageDraw.ImageDraw, Box], None]] | None = None
           ) -> Image.Image:
    """The scene as an RGB image of `size` x `size`, anti-aliased by drawing at 4x and box-filtering down.
    `drawers` adds shapes the world does not have (LoRA concept demos); it defaults to DRAWERS."""
    drawers = drawers or DRAWERS
    img = Image.new("RGB", (size, size), PALETTE[scene.background])
    ss = _SUPERSAMPLE
    for o in scene.objects:
        x0, y0, x1, y1 = object_box(o, size * ss)
        # Supersample only the pixel-aligned patch around the object (a tenth of the full 4x canvas) into a coverage
        # mask, then blend the colour in through it: the same anti-aliasing, several times faster.
        px0, py0 = max(0, int(x0) // ss), max(0, int(y0) // ss)
        px1, py1 = min(size, -(-round(x1) // ss)), min(size, -(-round(y1) // ss))
        mask = Image.new("L", ((px1 - px0) * ss, (py1 - py0) * ss), 0)
        draw = ImageDraw.Draw(mask)
        # PIL's rectangle/ellipse include their right/bottom edge, so the last covered supersample is round(x1) - 1.
        box = (round(x0) - px0 * ss, round(y0) - py0 * ss, round(x1) - 1 - px0 * ss, round(y1) - 1 - py0 * ss)
        if o.shape not in drawers:
            raise ValueError(f"unknown shape {o.shape!r}")
        drawers[o.shape](draw, box)
        coverage = mask.resize((px1 - px0, py1 - py0), Image.Resampling.BOX)
        img.paste(PALETTE[o.colour], (px0, py0, px1, py1), coverage)
    return img


# ---------------------------------------------------------------------------------------------------------------------
# Language

# Per position: (preposition, words after "the"). Destinations use "to the <words>".
# The words come from nano's preset (its `fill`, which completes plain prompts): one table for both.
_FILL = get_preset("nano").fill
assert _FILL is not None
POSITION_PHRASES: dict[str, tuple[tuple[str, str], ...]] = {
    pos: tuple(tuple(p.split(" the ", 1)) for p in phrases) for pos, phrases in _FILL.positions  # (prep, words)
}
SIZE_WORDS: dict[str, tuple[str, ...]] = dict(_FILL.sizes)
BACKGROUND_WORDS: tuple[str, ...] = ("background", "backdrop")
_NUMBER_WORDS = {2: "two", 3: "three"}


def _at(position: str, rng: random.Random) -> str:
    prep, words = rng.choice(POSITION_PHRASES[position])
    return f"{prep} the {words}"


def _to(position: str, rng: random.Random) -> str:
    return f"to the {rng.choice(POSITION_PHRASES[position])[1]}"


def _noun(o: Obj, rng: random.Random) -> str:
    return f"{rng.choice(SIZE_WORDS[o.size])} {o.colour} {o.shape}"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene, rng: random.Random) -> str:
    """An English description stating every attribute: each object's size, colour, shape and position, and the
    background colour. Phrasing, synonyms and object order vary with `rng`."""
    bg, bgw = scene.background, rng.choice(BACKGROUND_WORDS)
    objs = list(scene.objects)
    rng.shuffle(objs)
    if not objs:
        return rng.choice((f"a plain {bg} {bgw}", f"an empty {bg} {bgw}", f"nothing but a {bg} {bgw}"))
    if len(objs) == 1:
        o = objs[0]
        noun, at = _noun(o, rng), _at(o.position, rng)
        templates = (
            f"a {noun} {at} on a {bg} {bgw}",
            f"{bg} {bgw}, {noun} {at}",
            f"{bg} {bgw}, a {noun} {at}",
            f"a {noun} {at} against a {bg} {bgw}",
            f"a {noun} {at}, {bg} {bgw}",
            f"a {bg} {bgw} with a {noun} {at}",
            f"{at}, a {noun} on a {bg} {bgw}",
            f"an image of a {noun} {at} on a plain {bg} {bgw}",
            f"a picture with a {bg} {bgw} and a {noun} {at}",
        )
        return rng.choice(templates)
    items = [f"a {_noun(o, rng)} {_at(o.position, rng)}" for o in objs]
    things = rng.choice(("shapes", "objects"))
    count = _NUMBER_WORDS[len(objs)]
    templates = (
        f"{count} {things} on {bg}: {_join(items)}",
        f"{count} {things} on a {bg} {bgw}: {_join(items)}",
        f"{_join(items)} on a {bg} {bgw}",
        f"a {bg} {bgw} with {_join(items)}",
        f"{bg} {bgw}; " + "; ".join(items),
        f"{_join(items)}, all against a {bg} {bgw}",
    )
    return rng.choice(templates)


# ---------------------------------------------------------------------------------------------------------------------
# Referring expressions for edits

# Which attributes a reference names; position-only and position-qualified refs are rarer but always unambiguous.
_REF_KINDS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("colour", "shape"), 3.0),
    (("shape",), 2.0),
    (("colour",), 1.0),
    (("size", "shape"), 1.0),
    (("size", "colour", "shape"), 1.0),
    (("colour", "shape", "position"), 0.5),
    (("position",), 0.5),
)


def _ref_matches(attrs: tuple[str, ...], target: Obj, other: Obj) -> bool:
    return all(getattr(target, a) == getattr(other, a) for a in attrs)


def unique_refs(scene: Scene, index: int) -> list[tuple[tuple[str, ...], float]]:
    """Reference kinds (attribute tuples, weights) that pick out object `index` and no other object of `scene`."""
    target = scene.objects[index]
    return [
        (attrs, w)
        for attrs, w in _REF_KINDS
        if sum(_ref_matches(attrs, target, o) for o in scene.objects) == 1
    ]


def _ref_text(o: Obj, attrs: tuple[str, ...], rng: random.Random) -> str:
    if attrs == ("position",):
        return f"the {rng.choice(('shape', 'object'))} {_at(o.position, rng)}"
    words = []
    if "size" in attrs:
        words.append(rng.choice(SIZE_WORDS[o.size]))
    if "colour" in attrs:
        words.append(o.colour)
    words.append(o.shape if "shape" in attrs else rng.choice(("shape", "one", "object")))
    text = "the " + " ".join(words)
    if "position" in attrs:
        text += " " + _at(o.position, rng)
    return text


def _pick_ref(scene: Scene, index: int, rng: random.Random) -> tuple[str, tuple[str, ...]]:
    refs = unique_refs(scene, index)  # never empty: position alone is unique
    attrs = rng.choices([a for a, _ in refs], weights=[w for _, w in refs])[0]
    return _ref_text(scene.objects[index], attrs, rng), attrs


# ---------------------------------------------------------------------------------------------------------------------
# Examples

_TRAIN, _HELD, _EVAL = "train", "held_out", "eval"


def _acceptable(target: Scene, sources: Sequence[Scene], mode: str) -> bool:
    scenes = (target, *sources)
    if mode == _TRAIN:
        return not any(has_held_out(s) or is_eval_scene(s) for s in scenes)
    if mode == _HELD:
        return has_held_out(target)
    return is_eval_scene(target) and not any(has_held_out(s) for s in scenes)


def _retry(make: Callable[[], Example | None], mode: str) -> Example:
    for _ in range(_MAX_TRIES):
        ex = make()
        if ex is not None and _acceptable(ex.target, ex.sources, mode):
            return ex
    raise RuntimeError("no acceptable example found")


def _try_t2i(rng: random.Random, n_objects: int | None, mode: str) -> Example:
    target = _raw_scene(rng, n_objects, held_out=mode == _HELD)
    return Example("t2i", caption(target, rng), target)


def sample_t2i(rng: random.Random, n_objects: int | None = None, held_out: bool = False) -> Example:
    """Text-to-image: a scene and its caption."""
    mode = _HELD if held_out else _TRAIN
    return _retry(lambda: _try_t2i(rng, n_objects, mode), mode)


def _free_positions(scene: Scene) -> list[str]:
    used = {o.position for o in scene.objects}
    return [p for p in POSITIONS if p not in used]


def _try_edit(rng: random.Random, kind: str, mode: str) -> Example | None:
    # In held-out mode half the sources already carry a held-out pair; the rest can gain one through the edit.
    source_held = mode == _HELD and rng.random() < 0.5
    n = {"add": rng.choice((1, 2)), "remove": rng.choice((2, 3))}.get(kind)
    source = _raw_scene(rng, n, source_held)
    objs = list(source.objects)
    allow_held = mode == _HELD
    bg = source.background
    if kind == "background":
        options = [c for c in COLOURS if c != bg and all(o.colour != c for o in objs)]
        if not options:
            return None
        new = rng.choice(options)
        target = Scene(new, source.objects)
        bgw = rng.choice(BACKGROUND_WORDS)
        prompt = rng.choice((
            f"make the {bgw} {new}",
            f"change the {bgw} to {new}",
            f"set the {bgw} to {new}",
            f"turn the {bgw} {new}",
            f"replace the {bg} {bgw} with a {new} one",
            f"put everything on a {new} {bgw}",
            f"change the {bgw} colour to {new}",
        ))
    elif kind == "add":
        free = _free_positions(source)
        new_obj = _random_obj(rng, bg, rng.choice(free), allow_held)
        target = Scene(bg, (*objs, new_obj))
        noun, at = _noun(new_obj, rng), _at(new_obj.position, rng)
        prompt = rng.choice((
            f"add a {noun} {at}",
            f"put a {noun} {at}",
            f"also draw a {noun} {at}",
            f"insert a {noun} {at}",
            f"add a {noun} {at} as well",
            f"{at}, add a {noun}",
        ))
    else:
        i = rng.randrange(len(objs))
        o = objs[i]
        ref, attrs = _pick_ref(source, i, rng)
        if kind == "remove":
            target = Scene(bg, tuple(objs[:i] + objs[i + 1:]))
            prompt = rng.choice((f"remove {ref}", f"delete {ref}", f"take away {ref}", f"get rid of {ref}",
                                 f"erase {ref}", f"remove {ref} from the picture"))
        elif kind == "move":
            new_pos = rng.choice(_free_positions(source))
            objs[i] = Obj(o.shape, o.colour, o.size, new_pos)
            target = Scene(bg, tuple(objs))
            to = _to(new_pos, rng)
            prompt = rng.choice((f"move {ref} {to}", f"put {ref} {_at(new_pos, rng)}", f"shift {ref} {to}",
                                 f"place {ref} {_at(new_pos, rng)}", f"move {ref} over {to}"))
        elif kind == "recolour":
            options = [c for c in COLOURS if c not in (o.colour, bg) and (allow_held or (c, o.shape) not in HELD_OUT)]
            new = rng.choice(options)
            objs[i] = Obj(o.shape, new, o.size, o.position)
            target = Scene(bg, tuple(objs))
            colour_word = rng.choice(("colour", "color"))
            templates = [f"make {ref} {new}", f"recolour {ref} {new}", f"recolor {ref} {new}", f"turn {ref} {new}",
                         f"paint {ref} {new}", f"change the {colour_word} of {ref} to {new}"]
            if "position" not in attrs:  # "the circle at the top's colour" reads badly
                templates.append(f"change {ref}'s {colour_word} to {new}")
            prompt = rng.choice(templates)
        else:
            raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
    return Example("edit", prompt, target, (source,), kind)


def sample_edit(rng: random.Random, kind: str | None = None, held_out: bool = False) -> Example:
    """An instruction edit of one source scene: recolour, move, add, remove or background (random when kind is None).

    The instruction names its object unambiguously within the source; everything not asked for stays the same.
    """
    if kind is not None and kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
    mode = _HELD if held_out else _TRAIN
    # Drawn once, outside the retries, so kinds that get rejected more often are not under-represented.
    kind = kind or rng.choice(EDIT_KINDS)
    return _retry(lambda: _try_edit(rng, kind, mode), mode)


def _try_compose(rng: random.Random, mode: str) -> Example | None:
    first = _raw_scene(rng, 1, held_out=mode == _HELD)
    o = first.objects[0]
    options = [c for c in COLOURS if c not in (first.background, o.colour)]
    bg2 = rng.choice(options)
    # Image 2 sometimes holds its own object, which the target must not inherit.
    others = (_random_obj(rng, bg2, rng.choice(list(POSITIONS)), False),) if rng.random() < 0.5 else ()
    second = Scene(bg2, others)
    target = Scene(bg2, (o,))
    what = rng.choice((f"{o.colour} {o.shape}", f"{rng.choice(SIZE_WORDS[o.size])} {o.colour} {o.shape}",
                       o.shape, "shape", "object"))
    one, two = rng.choice((("image 1", "image 2"), ("picture one", "picture two"), ("the first image", "the second"),
                           ("the first picture", "the second picture")))
    bgw = rng.choice(BACKGROUND_WORDS)
    prompt = rng.choice((
        f"put the {what} from {one} on the {bgw} of {two}",
        f"the {what} from {one} on the {bgw} of {two}",
        f"combine: {what} of {one}, {bgw} of {two}",
        f"take the {what} from {one} and place it on the {bg2} {bgw} of {two}",
        f"keep the {what} from {one}, use the {bgw} from {two}",
        f"the {what} from {one} on the {bg2} {bgw} of {two}",
        f"put the {what} from {one} on the {bgw} of {two}, nothing else from {two}",
    ))
    return Example("compose", prompt, target, (first, second))


def sample_compose(rng: random.Random, held_out: bool = False) -> Example:
    """Two references: image 1 holds one object, image 2 another background (and maybe an object that is not carried
    over). The target is image 1's object, unchanged, on image 2's background."""
    mode = _HELD if held_out else _TRAIN
    return _retry(lambda: _try_compose(rng, mode), mode)


def sample_drill(rng: random.Random) -> Example:
    """A drill: one or two objects, described in a single fixed phrasing ("a big red square at the top left and a
    small blue circle at the bottom right on a white background"). Small models learn to tie position words to
    places much sooner from these than from the varied captions alone (measured: the varied ones alone did not get
    there in 6,000 steps); the two-object half drills which colour and shape go where."""
    ex = sample_t2i(rng, n_objects=rng.choice((1, 2)))
    objs = " and ".join(f"a {o.size} {o.colour} {o.shape} at the {o.position}" for o in ex.target.objects)
    return Example("t2i", f"{objs} on a {ex.target.background} background", ex.target)


def loose_caption(scene: Scene, rng: random.Random) -> str:
    """A caption that leaves out each object's size, or position, or both (at least one attribute is left out of
    the whole caption); the scene still has them, drawn at random. People write "a red circle on a blue background",
    and a model trained only on fully specified captions draws nothing for it."""
    bg, bgw = scene.background, rng.choice(BACKGROUND_WORDS)
    while True:
        keep = [(rng.random() < 0.4, rng.random() < 0.4) for _ in scene.objects]
        if not all(size and pos for size, pos in keep):
            break
    items = []
    for o, (size, pos) in zip(scene.objects, keep, strict=True):
        words = [rng.choice(SIZE_WORDS[o.size])] if size else []
        words += [o.colour, o.shape]
        text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
        items.append(text + (" " + _at(o.position, rng) if pos else ""))
    return rng.choice((f"{_join(items)} on a {bg} {bgw}", f"{bg} {bgw}, {_join(items)}",
                       f"a {bg} {bgw} with {_join(items)}", f"{_join(items)}"))


def sample_loose(rng: random.Random) -> Example:
    """Text-to-image with a loose caption (see `loose_caption`): one or two objects. Captions that leave out the
    background too are a quarter of these; the background is then drawn at random like the rest."""
    ex = sample_t2i(rng, n_objects=rng.choice((1, 1, 2)))
    return Example("t2i", loose_caption(ex.target, rng), ex.target)


def sample_example(rng: random.Random, mix: tuple[float, float, float] = (0.6, 0.25, 0.15)) -> Example:
    """A training example: t2i, edit or compose with the given weights."""
    kind = rng.choices(("t2i", "edit", "compose"), weights=mix)[0]
    if kind == "t2i":
        return sample_t2i(rng)
    if kind == "edit":
        return sample_edit(rng)
    return sample_compose(rng)


def eval_set(task: str, n: int, seed: int = 0) -> list[Example]:
    """`n` deterministic evaluation examples whose targets are never trained on.

    Targets are in the eval split, except for "held_out", whose colour-shape pair is absent from training anyway.

    task: "single" / "double" (t2i with 1 / 2 objects), "edit" (the 5 kinds in turn), "compose", or "held_out" (t2i, one
    object using a HELD_OUT pair). Targets are distinct while the split has enough of them; the held-out pool is
    small, so larger `n` repeats targets (with fresh captions).
    """
    if task not in EVAL_TASKS:
        raise ValueError(f"unknown eval task {task!r}; expected one of {EVAL_TASKS}")
    rng = random.Random(f"kleinbild-shapes-eval:{task}:{seed}")
    mode = _HELD if task == "held_out" else _EVAL

    def make(i: int) -> Example | None:
        if task == "single":
            return _try_t2i(rng, 1, _EVAL)
        if task == "double":
            return _try_t2i(rng, 2, _EVAL)
        if task == "held_out":
            return _try_t2i(rng, 1, _HELD)
        if task == "edit":
            return _try_edit(rng, EDIT_KINDS[i % len(EDIT_KINDS)], _EVAL)
        return _try_compose(rng, _EVAL)

    out: list[Example] = []
    seen: set[tuple[str, ...]] = set()
    exhausted = False  # once new targets have become rare (small pools), repeats are accepted straight away
    for i in range(n):
        fallback = None
        for attempt in range(_MAX_TRIES):
            ex = make(i)
            # Held-out pairs never occur in training at all, so their whole pool (not just the split) is fair game.
            in_split = task == "held_out" or is_eval_scene(ex.target)
            if ex is None or not (in_split and _acceptable(ex.target, ex.sources, mode)):
                continue
            key = (_canonical(ex.target), *(_canonical(s) for s in ex.sources))
            if key not in seen:
                break
            fallback = fallback or ex
            if exhausted or attempt > 500:
                exhausted, ex = True, fallback
                break
        else:
            raise RuntimeError(f"eval_set({task!r}): no example found")
        seen.add(key)
        out.append(ex)
    return out
