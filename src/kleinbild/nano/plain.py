"""Plain prompts: what a new user types first. "a red circle on a blue background", "two green squares": captions
that leave out size and position (or name only one of them), counts written as words, the background sometimes
unnamed. They are scored on what they say: the objects' colours and shapes, their count, and the background when
the caption names it; size and position are free.
"""

from __future__ import annotations

import random
from dataclasses import replace

from kleinbild.nano import shapes
from kleinbild.nano.analyze import Analysis

PLAIN_TASKS = ("plain", "plain_double")
_NUMBERS = {2: "two", 3: "three"}


def _object_words(o: shapes.Obj, rng: random.Random, keep_size: bool) -> str:
    words = [rng.choice(shapes.SIZE_WORDS[o.size])] if keep_size else []
    return " ".join([*words, o.colour, o.shape])


def _article(text: str) -> str:
    return ("an " if text[0] in "aeiou" else "a ") + text


def plain_caption(scene: shapes.Scene, rng: random.Random) -> tuple[str, bool]:
    """(caption, whether it names the background). Objects alike in colour and shape are counted in words."""
    objs = scene.objects
    keep = rng.choice(("neither", "neither", "size", "position"))
    if len(objs) > 1 and len({(o.colour, o.shape) for o in objs}) == 1:
        items = [f"{_NUMBERS[len(objs)]} {objs[0].colour} {objs[0].shape}s"]
    else:
        items = []
        for o in objs:
            text = _article(_object_words(o, rng, keep == "size"))
            items.append(f"{text} {shapes._at(o.position, rng)}" if keep == "position" else text)
    things = items[0] if len(items) == 1 else " and ".join(items)
    bg, word = scene.background, rng.choice(shapes.BACKGROUND_WORDS)
    form = rng.choice(("on", "on", "with", "comma", "bare"))
    if form == "bare":
        return things, False
    back = _article(f"{bg} {word}")  # as people write it: "an orange background"
    text = {"on": f"{things} on {back}", "with": f"{back} with {things}", "comma": f"{bg} {word}, {things}"}[form]
    return text, True


def _twin(scene: shapes.Scene) -> shapes.Scene:
    """The scene with its second object made like the first (colour and shape), for "two green squares"."""
    first, second = scene.objects
    return replace(scene, objects=(first, replace(second, colour=first.colour, shape=first.shape)))


def plain_set(task: str, n: int, seed: int = 0) -> list[tuple[shapes.Example, bool]]:
    """`n` deterministic plain examples (example, names the background): one object for "plain", two for
    "plain_double" (half of them alike, counted in words). Targets come from the eval split."""
    if task not in PLAIN_TASKS:
        raise ValueError(f"unknown plain task {task!r}; expected one of {PLAIN_TASKS}")
    rng = random.Random(f"kleinbild-shapes-plain:{task}:{seed}")
    out = []
    while len(out) < n:
        scene = shapes._raw_scene(rng, 1 if task == "plain" else 2, False)  # training never draws eval scenes
        if task == "plain_double" and len(out) % 2 == 0:
            scene = _twin(scene)
        if shapes.scene_problems(scene) or not shapes.is_eval_scene(scene):
            continue
        text, names_bg = plain_caption(scene, rng)
        out.append((shapes.Example("t2i", text, scene), names_bg))
    return out


def plain_verdict(analysis: Analysis, expected: shapes.Scene, names_background: bool) -> dict[str, bool]:
    """Per-attribute verdicts on what a plain caption says: "count", "colour" and "shape" (the multisets of the
    objects' colours and shapes), "background" (free when unnamed), size and position always free; "all": the
    objects' (colour, shape) pairs are exactly the caption's and the background is right."""
    found = analysis.scene().objects
    want = sorted((o.colour, o.shape) for o in expected.objects)
    got = sorted((o.colour, o.shape) for o in found)
    verdict = {
        "background": not names_background or analysis.background == expected.background,
        "count": len(found) == len(expected.objects),
        "colour": sorted(c for c, _ in got) == sorted(c for c, _ in want),
        "shape": sorted(s for _, s in got) == sorted(s for _, s in want),
        "size": True,
        "position": True,
    }
    verdict["all"] = got == want and verdict["background"]
    return verdict


def sample_plain(rng: random.Random) -> shapes.Example:
    """A training example with a plain caption: one object, or two (half of those alike, counted in words), from
    the training split."""
    n = rng.choice((1, 1, 2))
    while True:
        scene = shapes.sample_scene(rng, n_objects=n)
        if n == 2 and rng.random() < 0.5:
            scene = _twin(scene)
        if not shapes.scene_problems(scene) and not shapes.is_eval_scene(scene) and not shapes.has_held_out(scene):
            return shapes.Example("t2i", plain_caption(scene, rng)[0], scene)
