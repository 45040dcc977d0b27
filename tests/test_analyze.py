"""The pixel analyzer: exact on clean renders at any size, robust to noise/blur/colour shifts, and it catches errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from kleinbild.nano.analyze import Analysis, Found, analyze, label_components, matches, score
from kleinbild.nano.shapes import COLOURS, PALETTE, POSITIONS, SHAPES, SIZES, Obj, Scene, render, sample_scene


def scenes(seed: int, n: int) -> list[Scene]:
    # Training-like scenes plus some with held-out pairs, so every colour/shape combination is exercised.
    rng = random.Random(seed)
    return [sample_scene(rng, held_out=i % 5 == 0) for i in range(n)]


def perturb(img: Image.Image, rng: np.random.Generator, noise: float = 12.0, blur: float = 1.0,
            shift: float = 12.0) -> Image.Image:
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)
    arr = arr + rng.uniform(-shift, shift, 3) + rng.normal(0.0, noise, arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


@pytest.mark.parametrize(("size", "n"), [(128, 1000), (64, 1000), (256, 300)])
def test_clean_renders_are_read_exactly(size, n):
    expected = scenes(size, n)
    assert score([render(s, size) for s in expected], expected) >= 0.995


@pytest.mark.parametrize(("size", "n"), [(128, 400), (64, 400)])
def test_robust_to_noise_blur_and_colour_shift(size, n):
    rng = np.random.default_rng(size)
    expected = scenes(size + 1, n)
    images = [perturb(render(s, size), rng) for s in expected]
    assert score(images, expected) >= 0.95


def test_found_objects_describe_the_render():
    scene = Scene("blue", (Obj("circle", "yellow", "big", "top left"), Obj("triangle", "red", "small", "centre"),
                           Obj("square", "white", "small", "bottom right")))
    analysis = analyze(render(scene, 128))
    assert analysis.background == "blue" and analysis.scene() == scene  # objects come in reading order
    circle, triangle, square = analysis.objects
    assert circle.area == pytest.approx(np.pi / 4 * (0.30 * 128) ** 2, rel=0.03)
    assert triangle.area == pytest.approx(0.5 * (0.19 * 128) ** 2, rel=0.05)
    assert square.area == pytest.approx((0.19 * 128) ** 2, rel=0.03)
    # Boxes hug the drawn extent: the square spans 5/6 * 128 -+ 0.095 * 128 = 94.5 .. 118.8.
    assert square.bbox == pytest.approx((94.5, 94.5, 119, 119), abs=1)
    assert circle.bbox == pytest.approx((2, 2, 41, 41), abs=1)


def test_every_attribute_value_is_recognised():
    # Each palette colour as an object and as a background, every shape, size and position.
    for i, (bg, colour) in enumerate((b, c) for b in COLOURS for c in COLOURS if b != c):
        for j, (shape, size) in enumerate((s, z) for s in SHAPES for z in SIZES):
            position = list(POSITIONS)[(i + j) % 9]
            scene = Scene(bg, (Obj(shape, colour, size, position),))
            assert analyze(render(scene, 96)).scene() == scene


def test_array_inputs_agree():
    scene = Scene("purple", (Obj("circle", "green", "small", "top"), Obj("triangle", "orange", "big", "right")))
    img = render(scene, 64)
    arr = np.asarray(img)
    reference = analyze(img)
    assert reference.scene() == scene
    assert analyze(arr) == reference
    assert analyze(arr.astype(np.float32) / 255.0) == reference
    assert analyze(arr.transpose(2, 0, 1).copy()) == reference
    with pytest.raises(ValueError):
        analyze(np.zeros((4, 4, 5)))


def _flagged(expected: Scene, actual: Scene) -> set[str]:
    verdict = matches(analyze(render(actual, 128)), expected)
    return {k for k, v in verdict.items() if not v}


def test_errors_are_caught_and_attributed():
    rng = random.Random(11)
    for _ in range(60):
        expected = sample_scene(rng)
        bg, objs = expected.background, list(expected.objects)
        i = rng.randrange(len(objs))
        o = objs[i]
        used = {p.position for p in objs}

        def variant(new: Obj, objs: list[Obj] = objs, i: int = i, bg: str = bg) -> Scene:
            return Scene(bg, tuple(objs[:i] + [new] + objs[i + 1:]))

        colour = rng.choice([c for c in COLOURS if c not in (o.colour, bg)])
        assert _flagged(expected, variant(Obj(o.shape, colour, o.size, o.position))) == {"colour", "all"}
        shape = rng.choice([s for s in SHAPES if s != o.shape])
        assert _flagged(expected, variant(Obj(shape, o.colour, o.size, o.position))) == {"shape", "all"}
        size = "small" if o.size == "big" else "big"
        assert _flagged(expected, variant(Obj(o.shape, o.colour, size, o.position))) == {"size", "all"}
        position = rng.choice([p for p in POSITIONS if p not in used])
        assert _flagged(expected, variant(Obj(o.shape, o.colour, o.size, position))) == {"position", "all"}
        colours = {p.colour for p in objs}
        background = rng.choice([c for c in COLOURS if c != bg and c not in colours])
        assert _flagged(expected, Scene(background, expected.objects)) == {"background", "all"}
        if len(objs) < 3:
            extra = Obj(rng.choice(SHAPES), rng.choice([c for c in COLOURS if c != bg]), rng.choice(SIZES), position)
            assert _flagged(expected, Scene(bg, (*objs, extra))) == {"count", "all"}
        if len(objs) > 1:
            missing = Scene(bg, tuple(objs[:i] + objs[i + 1:]))
            assert _flagged(expected, missing) == {"count", "colour", "shape", "size", "position", "all"}


def test_matches_and_score_edge_cases():
    scene = Scene("white", (Obj("square", "red", "big", "centre"),))
    perfect = matches(analyze(render(scene, 64)), scene)
    assert perfect == dict.fromkeys(("background", "count", "colour", "shape", "size", "position", "all"), True)
    empty = Analysis("white", ())
    assert matches(empty, scene)["count"] is False and matches(empty, scene)["colour"] is False
    assert matches(empty, Scene("white", ()))["all"] is True
    assert analyze(Image.new("RGB", (64, 64), PALETTE["black"])) == Analysis("black", ())
    images = [render(scene, 64), render(Scene("black", scene.objects), 64)]
    assert score(images, [scene, scene]) == 0.5
    assert score([], []) == 0.0
    with pytest.raises(ValueError):
        score(images, [scene])


def test_specks_and_fringes_are_not_objects():
    rng = np.random.default_rng(0)
    scene = Scene("yellow", (Obj("circle", "red", "big", "centre"),))  # red on yellow: an orange anti-aliased rim
    arr = np.asarray(render(scene, 128)).copy()
    for y, x in rng.integers(0, 128, (30, 2)):
        arr[y, x] = PALETTE["blue"]  # isolated wrong-colour pixels
    arr[5:7, 60:63] = PALETTE["green"]  # a 6-pixel blob, well under 0.4% of the image
    assert analyze(arr).scene() == scene


def test_fragments_of_one_object_merge():
    scene = Scene("black", (Obj("square", "white", "big", "left"),))
    img = render(scene, 128)
    draw = ImageDraw.Draw(img)
    draw.line([(21, 0), (21, 127)], fill=PALETTE["black"])  # a one-pixel crack through the square
    analysis = analyze(img)
    assert analysis.scene() == scene
    assert len(analysis.objects) == 1 and isinstance(analysis.objects[0], Found)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_same_colour_neighbours_stay_apart(size):
    # Four objects (more than a scene holds) so that one image tests every neighbour direction; reading order.
    objs = (Obj("circle", "red", "big", "top"), Obj("square", "red", "big", "left"),
            Obj("square", "red", "big", "centre"), Obj("triangle", "red", "big", "bottom"))
    for bg in ("yellow", "blue"):  # red on yellow has an orange rim, red on blue does not
        scene = Scene(bg, objs)
        assert analyze(render(scene, size)).scene() == scene


def test_label_components():
    grid = np.array([
        [0, 0, -1, 1, -1],
        [-1, 0, -1, 1, -1],
        [-1, -1, 0, -1, 1],
        [2, -1, -1, -1, -1],
        [2, 2, -1, 0, 0],
    ])
    labels, count = label_components(grid)
    assert count == 4  # the diagonal joins the 0s top left; the 1s join diagonally; the 2s; the 0s bottom right
    assert labels[0, 0] == labels[2, 2] != labels[4, 3] == labels[4, 4]
    assert labels[0, 3] == labels[2, 4] and labels[3, 0] == labels[4, 1]
    assert (labels[grid < 0] == -1).all()
    assert label_components(np.full((3, 3), -1))[1] == 0
