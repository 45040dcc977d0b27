"""Completing plain prompts for nano: what is rewritten, what is left alone, and that the model reads the result."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kleinbild.config import get_preset
from kleinbild.nano import shapes
from kleinbild.prompt_fill import complete_prompt
from kleinbild.request import validate

NANO = get_preset("nano")


@pytest.mark.parametrize(("prompt", "completed"), [
    ("a red circle on a blue background", "a big red circle at the centre on a blue background"),
    ("A blue square.", "a big blue square at the centre"),
    ("two green squares", "a big green square at the left and a big green square at the right"),
    ("a yellow square and a black square", "a big yellow square at the left and a big black square at the right"),
    ("a blue backdrop with two green squares",
     "a big green square at the left and a big green square at the right on a blue background"),
    ("blue background, a small red triangle", "a small red triangle at the centre on a blue background"),
    ("a red circle on the left on a blue background", "a big red circle at the left on a blue background"),
    ("three red circles on white", "a big red circle at the left and a big red circle at the centre and a big red "
     "circle at the right on a white background"),
    # a named place is kept and the other object takes the first free one
    ("a red circle and a blue square in the top left corner on a white background",
     "a big red circle at the left and a big blue square at the top left on a white background"),
])
def test_plain_prompts_are_completed_in_the_drill_phrasing(prompt, completed):
    assert complete_prompt(NANO, prompt) == completed


@pytest.mark.parametrize("prompt", [
    "a big red circle in the centre on a blue background",  # already names everything
    "a small red circle at the top left and a big blue square at the bottom right on a white background",
    "a cat", "a red circle, watercolor", "make it blue",  # words nano does not know: left as written
    "two circles at the top", "a circles", "two circle", "four red squares",  # counts that do not fit
    "a red circle at the left and a blue square on the left",  # one place for two objects
    "a red circle on a blue background on a green background",
])
def test_prompts_it_cannot_improve_are_left_alone(prompt):
    assert complete_prompt(NANO, prompt) is None


def test_the_official_models_read_every_prompt_as_written():
    assert get_preset("klein-4b").fill is None and complete_prompt(get_preset("klein-4b"), "a red circle") is None
    assert validate(get_preset("klein-4b"), "a red circle", width=512, height=512).completed_prompt is None


def test_the_presets_words_are_the_shapes_worlds():
    fill = NANO.fill
    assert NANO.objects == shapes.SHAPES and set(NANO.colours) == set(shapes.COLOURS)
    assert dict(fill.sizes) == shapes.SIZE_WORDS
    assert {pos: phrases for pos, phrases in fill.positions} == {
        pos: tuple(f"{prep} the {words}" for prep, words in ps) for pos, ps in shapes.POSITION_PHRASES.items()}
    assert fill.size in shapes.SIZES and all(p in shapes.POSITIONS for layout in fill.layouts for p in layout)


def test_the_request_carries_the_completion_and_says_so():
    req = validate(NANO, "two green squares", seed=1)
    assert req.prompt == "two green squares" and req.text == req.completed_prompt == complete_prompt(
        NANO, "two green squares")
    assert any(req.completed_prompt in note and "literal_prompt" in note for note in req.notes)
    assert req.settings()["completed_prompt"] == req.completed_prompt and "literal_prompt" not in req.settings()
    literal = validate(NANO, "two green squares", seed=1, literal_prompt=True)
    assert literal.text == "two green squares" and literal.completed_prompt is None and literal.notes == ()
    assert literal.settings()["literal_prompt"] is True
    edit = validate(NANO, "a red circle", [Image.new("RGB", (128, 128), "white")])
    assert edit.completed_prompt is None  # edits name what to change, not a scene


def test_a_bad_literal_prompt_flag_is_named():
    from kleinbild.images import InputError

    with pytest.raises(InputError, match="literal_prompt must be true or false, got 'yes'"):
        validate(NANO, "a red circle", literal_prompt="yes")


def test_nano_draws_the_completed_prompt():
    from kleinbild.pipeline import KleinPipeline

    pipe = KleinPipeline.from_pretrained("nano", device="cpu")
    plain = pipe.generate("a red circle on a blue background", seed=5)
    full = pipe.generate("a big red circle at the centre on a blue background", seed=5, literal_prompt=True)
    literal = pipe.generate("a red circle on a blue background", seed=5, literal_prompt=True)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(full.images[0]))
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(literal.images[0]))


def test_the_cli_records_a_literal_prompt_for_from(tmp_path):
    from kleinbild.cli import main
    from kleinbild.images import read_settings

    first, again = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", "a red circle", "--literal-prompt", "--seed", "2", "-o", str(first), "-q"]) == 0
    assert read_settings(first)["literal_prompt"] is True
    assert main(["generate", "--from", str(first), "-o", str(again), "-q"]) == 0
    assert read_settings(again).get("literal_prompt") is True and "completed_prompt" not in read_settings(again)
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
