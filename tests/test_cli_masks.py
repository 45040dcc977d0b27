"""`kleinbild generate` with --mask, --strength, --mask-crop, --expand and --keep-unmasked: files, sizes, metadata
that makes the edit again, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from tiny import reference_pipeline  # noqa: E402

from kleinbild.cli import main  # noqa: E402

COMMON = ["--dtype", "float32", "--device", "cpu", "--steps", "2", "-q"]


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(reference_pipeline("distilled", deep_text=True)[1])


def rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.fixture
def files(tmp_path):
    src, mask = tmp_path / "src.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(src)
    m = np.zeros((64, 80), np.uint8)
    m[16:48, 0:40] = 255
    Image.fromarray(m).save(mask)
    return src, mask, m


def test_masked_edit_keeps_the_rest_and_its_png_makes_it_again(model_dir, tmp_path, files, capsys):
    src, mask, m = files
    out = tmp_path / "edit.png"
    assert main(["generate", "a blue square", "-m", model_dir, "--image", str(src), "--mask", str(mask),
                 "--strength", "0.9", "--keep-unmasked", "--seed", "3", "-o", str(out), *COMMON]) == 0
    got, source = rgb(out), rgb(src)
    assert got.shape == source.shape
    assert (got[m == 0] == source[m == 0]).all(), "outside the mask the source's own pixels"
    assert np.abs(got[m == 255] - source[m == 255]).mean() > 8, "inside it, repainted"
    meta = json.loads(Image.open(out).text["kleinbild"])
    assert meta["mask_path"] == str(mask.resolve()) and meta["strength"] == 0.9 and meta["keep_unmasked"]
    # No prompt, image, mask or strength on the command line: the PNG holds them.
    assert main(["generate", "--from", str(out), "-o", str(tmp_path / "again.png"), "-q"]) == 0
    assert (rgb(tmp_path / "again.png") == got).all()
    Image.fromarray(255 - m).save(mask)
    assert main(["generate", "--from", str(out), "-o", str(tmp_path / "other.png"), "-q"]) == 0
    assert "mask differs" in capsys.readouterr().err
    # The same mask in OpenAI's form (transparent = repaint): the same image.
    rgba = np.zeros((64, 80, 4), np.uint8)
    rgba[..., 3] = 255 - m
    Image.fromarray(rgba, "RGBA").save(tmp_path / "openai.png")
    assert main(["generate", "--from", str(out), "--mask", str(tmp_path / "openai.png"), "-o",
                 str(tmp_path / "alpha.png"), "-q"]) == 0
    assert (rgb(tmp_path / "alpha.png") == got).all()
    mask.unlink()
    assert main(["generate", "--from", str(out), "-o", str(tmp_path / "lost.png"), "-q"]) == 2
    assert "mask.png" in capsys.readouterr().err


def test_outpaint_and_crop_sizes(model_dir, tmp_path, files, capsys):
    src, mask, m = files
    out = tmp_path / "wide.png"
    assert main(["generate", "more of the scene", "-m", model_dir, "--image", str(src), "--expand", "16,0,16,0",
                 "--keep-unmasked", "--seed", "1", "-o", str(out), "--json", *COMMON]) == 0
    settings = json.loads(capsys.readouterr().out)
    assert settings["expand"] == [16, 0, 16, 0] and Image.open(out).size == (112, 64)
    assert (rgb(out)[:, 32:64] == rgb(src)[:, 16:48]).all(), "the source sits where the expansion put it"
    out = tmp_path / "crop.png"
    assert main(["generate", "a dot", "-m", model_dir, "--image", str(src), "--mask", str(mask), "--mask-crop", "4",
                 "-W", "64", "-H", "64", "--seed", "1", "-o", str(out), "--json", *COMMON]) == 0
    settings = json.loads(capsys.readouterr().out)
    assert Image.open(out).size == (80, 64), "the crop is pasted back into the whole picture"
    assert settings["mask_crop"] == 4 and settings["width"] == 64


@pytest.mark.parametrize(("extra", "message"), [
    (["--mask", "{mask}"], "needs the image it edits"),
    (["--image", "{src}", "--mask", "{small}"], "64x64 but the image it edits is 80x64"),
    (["--image", "{src}", "--mask", "{black}"], "nothing to repaint"),
    (["--image", "{src}", "--mask", "{mask}", "--strength", "0"], "strength must be a number in (0, 1]"),
    (["--image", "{src}", "--strength", "1.5"], "strength must be"),
    (["--image", "{src}", "--expand", "1,2"], "expand must be four pixel counts"),
    (["--image", "{src}", "--mask-crop", "4"], "mask_crop needs a mask"),
    (["--image", "{src}", "--mask", "/no/such/mask.png"], "does not exist"),
])
def test_bad_edits_are_one_clear_line(model_dir, tmp_path, files, capsys, extra, message):
    src, mask, _ = files
    Image.new("L", (64, 64), 255).save(tmp_path / "small.png")
    Image.new("L", (80, 64), 0).save(tmp_path / "black.png")
    paths = {"src": src, "mask": mask, "small": tmp_path / "small.png", "black": tmp_path / "black.png"}
    args = [a.format(**paths) for a in extra]
    assert main(["generate", "x", "-m", model_dir, "-o", str(tmp_path / "x.png"), *args, *COMMON]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
