"""Plain prompts: the eval task's captions and scoring, and the note for words nano cannot draw."""

from __future__ import annotations

import re

import pytest

from kleinbild.config import get_preset
from kleinbild.nano import shapes
from kleinbild.nano.analyze import analyze
from kleinbild.nano.plain import PLAIN_TASKS, plain_set, plain_verdict
from kleinbild.request import validate


@pytest.mark.parametrize("task", PLAIN_TASKS)
def test_plain_captions_say_less_than_the_scene(task):
    examples = plain_set(task, 60, seed=3)
    assert examples == plain_set(task, 60, seed=3) and examples != plain_set(task, 60, seed=4)
    positions = [w for ws in shapes.POSITION_PHRASES.values() for _, w in ws]
    for ex, names_bg in examples:
        scene, text = ex.target, ex.prompt
        assert not shapes.scene_problems(scene) and shapes.is_eval_scene(scene)
        assert len(scene.objects) == (1 if task == "plain" else 2)
        for o in scene.objects:
            assert o.colour in text and o.shape in text
        assert names_bg == (f"{scene.background} back" in text)  # "... background" or "... backdrop"
        sizes = any(re.search(rf"\b{w}\b", text) for ws in shapes.SIZE_WORDS.values() for w in ws)
        places = any(p in text for p in positions)
        assert not (sizes and places), text  # never both: that is the fully named caption
    if task == "plain_double":
        counted = [ex for ex, _ in examples if ex.prompt.split(",")[-1].strip().startswith("two ") or " two " in
                   f" {ex.prompt}"]
        assert len(counted) >= 20  # half the scenes are alike and counted in words
        assert all(len({(o.colour, o.shape) for o in ex.target.objects}) == 1 for ex in counted)


def test_plain_verdict_ignores_size_and_position():
    ex, _ = plain_set("plain_double", 1, seed=0)[0]
    scene = ex.target
    moved = shapes.Scene(scene.background, tuple(
        shapes.Obj(o.shape, o.colour, "big" if o.size == "small" else "small", p)
        for o, p in zip(scene.objects, [p for p in shapes.POSITIONS if p not in {o.position for o in scene.objects}],
                        strict=False)))
    assert plain_verdict(analyze(shapes.render(moved, 128)), scene, True)["all"]
    other = next(c for c in shapes.COLOURS if c not in (scene.background, *(o.colour for o in scene.objects)))
    recoloured = shapes.Scene(scene.background, (shapes.Obj(scene.objects[0].shape, other, "big", "centre"),
                                                 *moved.objects[1:]))
    verdict = plain_verdict(analyze(shapes.render(recoloured, 128)), scene, True)
    assert not verdict["all"] and not verdict["colour"] and verdict["count"]
    background = next(c for c in shapes.COLOURS if c not in (scene.background, *(o.colour for o in scene.objects)))
    elsewhere = shapes.Scene(background, moved.objects)
    assert not plain_verdict(analyze(shapes.render(elsewhere, 128)), scene, True)["all"]
    assert plain_verdict(analyze(shapes.render(elsewhere, 128)), scene, False)["all"]  # an unnamed background is free


def test_eval_runs_the_plain_tasks():
    from kleinbild.nano.evaluate import evaluate
    from kleinbild.pipeline import KleinPipeline

    rep = evaluate(KleinPipeline.from_pretrained("nano", device="cpu"), ["plain", "plain_double"], n=4)
    tasks = rep.summary()["tasks"]
    assert set(tasks) == {"plain", "plain_double"} and all(t["n"] == 4 and t["size"] == 1.0 for t in tasks.values())


@pytest.mark.parametrize("prompt", ["a cat", "a dog on the grass", "make a picture of a sunset"])
def test_words_nano_cannot_draw_get_a_note(prompt):
    notes = validate(get_preset("nano"), prompt).notes
    assert len(notes) == 1 and "draws only circles, squares or triangles" in notes[0]
    assert '"a red circle on a blue background"' in notes[0]


@pytest.mark.parametrize("prompt", ["a red circle on a blue background", "two green squares", "Triangles!"])
def test_prompts_naming_a_shape_get_none(prompt):
    assert validate(get_preset("nano"), prompt, literal_prompt=True).notes == ()
    assert not any("draws only" in note for note in validate(get_preset("nano"), prompt).notes)


def test_official_models_and_edits_stay_silent():
    from PIL import Image

    assert validate(get_preset("klein-4b"), "a cat").notes == ()
    ref = Image.new("RGB", (128, 128), "white")
    assert validate(get_preset("nano"), "make it blue", [ref]).notes == ()


def test_the_cli_prints_the_note(tmp_path, capsys):
    from kleinbild.cli import main

    assert main(["generate", "a cat", "--steps", "1", "-o", str(tmp_path / "cat.png")]) == 0
    assert "draws only circles" in capsys.readouterr().err


def test_plain_batches_for_training():
    import random

    from kleinbild.cli_train import _mix
    from kleinbild.nano.plain import sample_plain
    from kleinbild.nano.train import sample_batch

    rng = random.Random(5)
    b = sample_batch(rng, 16, (0, 0, 0, 0, 0, 1.0))
    assert b.kind == "plain" and len(b.prompts) == 16
    exs = [sample_plain(rng) for _ in range(200)]
    assert not any(shapes.is_eval_scene(e.target) or shapes.has_held_out(e.target) for e in exs)
    assert any(" two " in f" {e.prompt}" for e in exs)  # alike pairs are counted in words
    assert _mix("0.3,0.2,0.1,0.1,0.1,0.2") == (0.3, 0.2, 0.1, 0.1, 0.1, 0.2)
