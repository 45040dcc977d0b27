"""The shapes world: determinism, valid scenes, renders, captions that state everything, edits, compose, splits."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter

import numpy as np
import pytest

from kleinbild.nano.shapes import (
    COLOURS,
    EDIT_KINDS,
    HELD_OUT,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    Example,
    Obj,
    Scene,
    caption,
    eval_set,
    has_held_out,
    is_eval_scene,
    render,
    sample_compose,
    sample_edit,
    sample_example,
    sample_scene,
    sample_t2i,
    scene_problems,
    unique_refs,
)

# The position wordings a caption may use, written out here independently of the module's tables.
POSITION_SYNONYMS = {
    "top left": ["top left", "upper left", "top-left corner", "top left corner", "upper-left corner"],
    "top": ["top", "top middle", "top centre", "top center", "top edge"],
    "top right": ["top right", "upper right", "top-right corner", "top right corner", "upper-right corner"],
    "left": ["left", "left side", "middle left", "left edge"],
    "centre": ["centre", "center", "middle"],
    "right": ["right", "right side", "middle right", "right edge"],
    "bottom left": ["bottom left", "lower left", "bottom-left corner", "bottom left corner", "lower left corner"],
    "bottom": ["bottom", "bottom middle", "bottom centre", "bottom center", "bottom edge"],
    "bottom right": ["bottom right", "lower right", "bottom-right corner", "bottom right corner", "lower right corner"],
}
SYNONYM_TO_POSITION = {s: p for p, syns in POSITION_SYNONYMS.items() for s in syns}
SIZE_WORD = {"small": "small", "little": "small", "big": "big", "large": "big"}
_COL = "|".join(COLOURS)
_POS = "|".join(sorted(SYNONYM_TO_POSITION, key=len, reverse=True))
_END = r"(?=$|[ ,;:.])"
OBJ_RE = re.compile(rf"\b(small|little|big|large) ({_COL}) ({'|'.join(SHAPES)})\b")
POS_AFTER_RE = re.compile(rf" (?:at|in|on|near) the ({_POS}){_END}")
POS_BEFORE_RE = re.compile(rf"(?:at|in|on|near) the ({_POS}), (?:add )?a $")
POS_MENTION_RE = re.compile(rf"\b(?:at|in|on|near|to) the ({_POS}){_END}")
BACKGROUND_RE = re.compile(rf"\b({_COL}) (?:background|backdrop)\b|\bon ({_COL}):")


def parse_objects(text: str) -> list[Obj]:
    """Objects described in full ("<size> <colour> <shape>" with a position phrase just after or before)."""
    objs = []
    for m in OBJ_RE.finditer(text):
        after = POS_AFTER_RE.match(text, m.end())
        before = POS_BEFORE_RE.search(text[: m.start()])
        assert after or before, f"no position for {m.group(0)!r} in {text!r}"
        words = (after or before).group(1)
        objs.append(Obj(m.group(3), m.group(2), SIZE_WORD[m.group(1)], SYNONYM_TO_POSITION[words]))
    return objs


def parse_caption(text: str) -> Scene:
    backgrounds = [a or b for a, b in BACKGROUND_RE.findall(text)]
    assert len(backgrounds) == 1, text
    return Scene(backgrounds[0], tuple(parse_objects(text)))


def canon(scene: Scene) -> tuple:
    return scene.background, tuple(sorted((o.position, o.shape, o.colour, o.size) for o in scene.objects))


def all_scenes(ex: Example) -> tuple[Scene, ...]:
    return (ex.target, *ex.sources)


def test_constants():
    assert set(PALETTE) == {"red", "green", "blue", "yellow", "orange", "purple", "white", "black"}
    distances = [np.linalg.norm(np.subtract(PALETTE[a], PALETTE[b])) for a, b in itertools.combinations(PALETTE, 2)]
    assert min(distances) > 85, "palette colours must stay far apart for the model and the analyzer"
    assert SHAPES == ("circle", "square", "triangle") and SIZES == ("small", "big")
    assert POSITIONS["top left"] == (1 / 6, 1 / 6) and POSITIONS["centre"] == (0.5, 0.5)
    assert POSITIONS["bottom right"] == (5 / 6, 5 / 6) and len(POSITIONS) == 9
    assert set(POSITIONS) == set(POSITION_SYNONYMS)
    assert HELD_OUT == frozenset({("green", "triangle")})


def test_determinism_and_no_global_random_state():
    state = random.getstate()

    def draw(seed: int) -> tuple[list[Example], list[bytes]]:
        rng = random.Random(seed)
        examples = [sample_example(rng) for _ in range(60)]
        return examples, [render(ex.target, 64).tobytes() for ex in examples[:20]]

    a, b, c = draw(7), draw(7), draw(8)
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]
    assert random.getstate() == state, "samplers must only use the rng they are given"
    assert eval_set("edit", 20, seed=3) == eval_set("edit", 20, seed=3) != eval_set("edit", 20, seed=4)


def test_sample_scene_rules():
    rng = random.Random(0)
    counts = Counter()
    for _ in range(2000):
        scene = sample_scene(rng)
        assert scene_problems(scene) == []
        assert 1 <= len(scene.objects) <= 3
        counts[len(scene.objects)] += 1
    assert counts[1] > counts[2] > counts[3] > 200
    for n in (1, 2, 3):
        assert all(len(sample_scene(rng, n).objects) == n for _ in range(50))
    held = [sample_scene(rng, held_out=True) for _ in range(300)]
    assert all(has_held_out(s) and scene_problems(s) == [] for s in held)
    with pytest.raises(ValueError):
        sample_scene(rng, 4)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_render_geometry(size):
    for shape, obj_size in itertools.product(SHAPES, SIZES):
        for position in ("top left", "bottom right", "centre"):
            scene = Scene("black", (Obj(shape, "yellow", obj_size, position),))
            img = np.asarray(render(scene, size), dtype=np.float64)
            assert img.shape == (size, size, 3)
            # Anti-aliased pixels are exact blends, so the green channel gives each pixel's coverage.
            bg, fg = PALETTE["black"][1], PALETTE["yellow"][1]
            coverage = (img[:, :, 1] - bg) / (fg - bg)
            side = {"small": 0.19, "big": 0.30}[obj_size] * size
            expected = side * side * {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape]
            assert coverage.sum() == pytest.approx(expected, rel=0.04)
            fx, fy = POSITIONS[position]
            assert coverage[int(fy * size), int(fx * size)] > 0.99
            # Objects stay inside the image: the outermost rows and columns are pure background.
            edges = np.concatenate((coverage[0], coverage[-1], coverage[:, 0], coverage[:, -1]))
            assert edges.max() < 0.01


def test_render_neighbours_keep_a_gap():
    # Big squares in neighbouring cells, the worst case: some columns between them stay background at 64 px.
    scene = Scene("white", (Obj("square", "red", "big", "left"), Obj("square", "blue", "big", "centre"),
                            Obj("square", "green", "big", "bottom")))
    img = np.asarray(render(scene, 64), dtype=np.int16)
    row = img[32]
    background_cols = np.flatnonzero(np.abs(row - PALETTE["white"]).max(1) <= 1)
    assert any(20 < c < 23 for c in background_cols)
    col = img[:, 32]
    background_rows = np.flatnonzero(np.abs(col - PALETTE["white"]).max(1) <= 1)
    assert any(41 < r < 45 for r in background_rows)
    assert render(Scene("green", ()), 32).getcolors() == [(32 * 32, PALETTE["green"])]


def test_captions_state_every_attribute():
    rng = random.Random(1)
    for i in range(500):
        scene = sample_scene(rng, held_out=i % 5 == 0)
        text = caption(scene, rng)
        parsed = parse_caption(text)
        assert canon(parsed) == canon(scene), text


def test_captions_vary():
    rng = random.Random(2)
    scene = Scene("blue", (Obj("circle", "red", "small", "centre"),))
    texts = {caption(scene, rng) for _ in range(300)}
    assert len(texts) > 40
    joined = " ".join(texts)
    for word in ("centre", "center", "middle", "little", "small", "backdrop", "background"):
        assert word in joined
    two = Scene("green", (Obj("circle", "red", "small", "top"), Obj("square", "blue", "big", "bottom right")))
    firsts = {OBJ_RE.search(caption(two, rng)).group(3) for _ in range(100)}
    assert firsts == {"circle", "square"}, "object order varies"
    assert caption(Scene("white", ()), rng).endswith(("white background", "white backdrop"))


def _training_samplers():
    return {
        "scene": lambda rng: Example("t2i", "", sample_scene(rng)),
        "t2i": sample_t2i,
        "edit": sample_edit,
        "compose": sample_compose,
        "example": sample_example,
    }


@pytest.mark.parametrize("kind", ["scene", "t2i", "edit", "compose", "example"])
def test_training_never_sees_held_out_pairs_or_eval_scenes(kind):
    rng = random.Random(3)
    sampler = _training_samplers()[kind]
    for _ in range(2000):
        ex = sampler(rng)
        for scene in all_scenes(ex):
            assert not has_held_out(scene), ex
            assert not any((o.colour, o.shape) in HELD_OUT for o in scene.objects)
            assert not is_eval_scene(scene), ex
            assert scene_problems(scene) == [], ex


def test_eval_split():
    rng = random.Random(4)
    singles = [Scene(bg, (Obj(shape, colour, size, pos),))
               for bg, colour, shape, size, pos in itertools.product(COLOURS, COLOURS, SHAPES, SIZES, POSITIONS)
               if colour != bg]
    share = sum(map(is_eval_scene, singles)) / len(singles)
    assert 0.08 < share < 0.12
    for scene in (sample_scene(rng, 3, held_out=True) for _ in range(200)):
        shuffled = list(scene.objects)
        rng.shuffle(shuffled)
        assert is_eval_scene(Scene(scene.background, tuple(shuffled))) == is_eval_scene(scene)
    # No training draw has its target (or a source) in the eval split.
    for _ in range(5000):
        assert not any(is_eval_scene(s) for s in all_scenes(sample_example(rng)))


@pytest.mark.parametrize("task", ["single", "double", "edit", "compose", "held_out"])
def test_eval_set(task):
    examples = eval_set(task, 50, seed=0)
    assert len(examples) == 50
    assert all(scene_problems(ex.target) == [] for ex in examples)
    # Held-out pairs are never trained on, so their examples need not come from the eval split.
    assert all(is_eval_scene(ex.target) for ex in examples) or task == "held_out"
    kinds = {"single": "t2i", "double": "t2i", "held_out": "t2i", "edit": "edit", "compose": "compose"}
    assert {ex.kind for ex in examples} == {kinds[task]}
    if task in ("single", "held_out"):
        assert all(len(ex.target.objects) == 1 for ex in examples)
    if task == "double":
        assert all(len(ex.target.objects) == 2 for ex in examples)
    if task == "held_out":
        assert all(has_held_out(ex.target) for ex in examples)
        assert len({canon(ex.target) for ex in examples}) > 40, "the whole held-out pool is used"
    else:
        assert not any(has_held_out(s) for ex in examples for s in all_scenes(ex))
        assert len({canon(ex.target) for ex in examples}) > 40, "targets are mostly distinct"
    if task == "edit":
        assert Counter(ex.edit for ex in examples) == {k: 10 for k in EDIT_KINDS}
    with pytest.raises(ValueError):
        eval_set("nope", 1)


def _mentions(prompt: str) -> dict[str, list[str]]:
    return {
        "colour": re.findall(rf"\b({_COL})\b", prompt),
        "shape": re.findall(rf"\b({'|'.join(SHAPES)})\b", prompt),
        "size": [SIZE_WORD[w] for w in re.findall(r"\b(small|little|big|large)\b", prompt)],
        "position": [SYNONYM_TO_POSITION[w] for w in POS_MENTION_RE.findall(prompt)],
    }


def _referent(source: Scene, ref: dict[str, list[str]]) -> list[Obj]:
    """The source objects that fit every attribute named in a referring expression."""
    return [o for o in source.objects if all(getattr(o, attr) in words for attr, words in ref.items() if words)]


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edits_change_exactly_what_they_say(kind):
    rng = random.Random(5)
    prompts = set()
    for _ in range(300):
        ex = sample_edit(rng, kind)
        (source,) = ex.sources
        target = ex.target
        assert ex.kind == "edit" and ex.edit == kind
        assert scene_problems(source) == [] and scene_problems(target) == []
        prompts.add(ex.prompt.split(" ")[0])
        said = _mentions(ex.prompt)
        src, tgt = set(source.objects), set(target.objects)
        if kind == "background":
            assert target.objects == source.objects and target.background != source.background
            assert said["colour"][-1] == target.background
            continue
        assert target.background == source.background
        if kind == "add":
            assert src < tgt and len(tgt - src) == 1
            assert parse_objects(ex.prompt) == list(tgt - src), ex.prompt
            continue
        if kind == "remove":
            assert len(source.objects) >= 2 and tgt < src and len(src - tgt) == 1
            (changed,) = src - tgt
            ref = said
        else:
            assert len(src - tgt) == 1 and len(tgt - src) == 1
            (changed,), (new,) = src - tgt, tgt - src
            if kind == "recolour":
                assert (new.shape, new.size, new.position) == (changed.shape, changed.size, changed.position)
                assert new.colour != changed.colour and said["colour"][-1] == new.colour
                ref = {**said, "colour": said["colour"][:-1]}
            else:
                assert (new.shape, new.size, new.colour) == (changed.shape, changed.size, changed.colour)
                assert new.position != changed.position and said["position"][-1] == new.position
                ref = {**said, "position": said["position"][:-1]}
        assert _referent(source, ref) == [changed], f"{ex.prompt!r} must pick out exactly {changed}"
    assert len(prompts) >= 3, "instructions are phrased in several ways"


def test_unique_refs():
    scene = Scene("white", (Obj("circle", "red", "small", "top"), Obj("circle", "red", "big", "left"),
                            Obj("square", "blue", "small", "right")))
    refs0 = [attrs for attrs, _ in unique_refs(scene, 0)]
    assert ("size", "colour", "shape") in refs0 and ("colour", "shape") not in refs0 and ("shape",) not in refs0
    refs2 = [attrs for attrs, _ in unique_refs(scene, 2)]
    assert ("shape",) in refs2 and ("colour",) in refs2


def test_held_out_samplers():
    rng = random.Random(6)
    for _ in range(200):
        for ex in (sample_t2i(rng, held_out=True), sample_edit(rng, held_out=True), sample_compose(rng, held_out=True)):
            assert has_held_out(ex.target)
            assert all(scene_problems(s) == [] for s in all_scenes(ex))


def test_compose():
    rng = random.Random(7)
    with_other = 0
    for _ in range(500):
        ex = sample_compose(rng)
        first, second = ex.sources
        assert ex.kind == "compose" and len(first.objects) == 1
        assert ex.target == Scene(second.background, first.objects)
        assert first.background != second.background and first.objects[0].colour != second.background
        assert set(_mentions(ex.prompt)["colour"]) <= {first.objects[0].colour, second.background}
        with_other += bool(second.objects)
    assert 150 < with_other < 350, "image 2 sometimes holds an object that is not carried over"


def test_sample_example_mix():
    rng = random.Random(8)
    assert {sample_example(rng, (1, 0, 0)).kind for _ in range(30)} == {"t2i"}
    assert {sample_example(rng, (0, 1, 0)).kind for _ in range(30)} == {"edit"}
    assert {sample_example(rng, (0, 0, 1)).kind for _ in range(30)} == {"compose"}
    kinds = Counter(sample_example(rng).kind for _ in range(2000))
    assert kinds["t2i"] > kinds["edit"] > kinds["compose"] > 150
