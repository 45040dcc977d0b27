"""The command line: files, numbering, PNG metadata, progress on stderr, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from tiny import reference_pipeline  # noqa: E402

from kleinbild.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def model_dir():
    # 28 text layers: the default taps and prompt length apply, as for a real checkpoint.
    return str(reference_pipeline("distilled", deep_text=True)[1])


def test_generate_writes_png_with_metadata(model_dir, tmp_path, capsys):
    out = tmp_path / "pic.png"
    rc = main(["generate", "a red circle", "--model", model_dir, "--width", "66", "--height", "64", "--seed", "5",
               "--dtype", "float32", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == str(out)
    assert "step 4/4" in cap.err and "rounded down to 64x64" in cap.err
    img = Image.open(out)
    assert img.size == (64, 64)
    assert img.text["prompt"] == "a red circle" and img.text["seed"] == "5" and img.text["steps"] == "4"
    assert img.text["width"] == "64" and img.text["model"] == model_dir
    assert json.loads(img.text["kleinbild"])["seed"] == 5


def test_numbered_outputs_and_edit(model_dir, tmp_path, capsys):
    src = tmp_path / "src.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(src)
    rc = main(["generate", "make it blue", "-m", model_dir, "--image", str(src), "-n", "2", "--seed", "1",
               "--dtype", "float32", "--out", str(tmp_path / "edit.png"), "--json"])
    assert rc == 0
    settings = json.loads(capsys.readouterr().out)  # with --json, stdout is one JSON object
    assert settings["outputs"] == [{"path": str(tmp_path / "edit-0.png"), "seed": 1},
                                   {"path": str(tmp_path / "edit-1.png"), "seed": 2}]
    assert settings["references"] == [[80, 64]] and settings["num_images"] == 2
    a, b = (np.asarray(Image.open(tmp_path / f"edit-{i}.png"), np.int16) for i in range(2))
    assert a.shape == (64, 80, 3) and np.abs(a - b).max() > 3, "two images from one batch differ"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "32", "--height", "64"], "too small"),
        (["--width", "4096", "--height", "2048"], "megapixels"),
        (["--image", "/no/such.png"], "does not exist"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_bad_input_is_a_clear_error(model_dir, tmp_path, capsys, args, message):
    rc = main(["generate", "x", "-m", model_dir, "--dtype", "float32", "-o", str(tmp_path / "x.png"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_unreadable_and_tiny_reference_images(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["generate", "x", "-m", model_dir, "--image", str(bad)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 100)).save(small)
    assert main(["generate", "x", "-m", model_dir, "--image", str(small)]) == 2
    assert "at least 64 px" in capsys.readouterr().err
    wide = tmp_path / "wide.png"
    Image.new("RGB", (900, 100)).save(wide)
    assert main(["generate", "x", "-m", model_dir, "--image", str(wide)]) == 2
    assert "aspect" in capsys.readouterr().err


def test_missing_model_and_unknown_preset(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KLEINBILD_MODEL", raising=False)
    assert main(["generate", "x", "-m", str(tmp_path)]) == 2
    assert "holds no model" in capsys.readouterr().err
    assert main(["generate", "x", "-m", "klein-7b"]) == 2
    assert "klein-4b" in capsys.readouterr().err


def _diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a.convert("RGB"), np.int16) - np.asarray(b.convert("RGB"), np.int16)).max())


def test_image_i_of_a_batch_is_seed_plus_i_and_its_png_makes_it_again(model_dir, tmp_path, capsys):
    common = ["-m", model_dir, "--dtype", "float32", "--device", "cpu", "-W", "64", "-H", "64", "-q"]
    assert main(["generate", "a red circle", "-n", "3", "--seed", "7", "-o", str(tmp_path / "b.png"), *common]) == 0
    assert main(["generate", "a red circle", "--seed", "9", "-o", str(tmp_path / "nine.png"), *common]) == 0
    capsys.readouterr()
    third, nine = Image.open(tmp_path / "b-2.png"), Image.open(tmp_path / "nine.png")
    meta = json.loads(third.text["kleinbild"])
    assert third.text["seed"] == "9" and meta["seed"] == 9 and meta["num_images"] == 1 and meta["index"] == 2
    assert [json.loads(Image.open(tmp_path / f"b-{i}.png").text["kleinbild"])["seed"] for i in range(3)] == [7, 8, 9]
    # The same noise, bit for bit; a batch of three rounds its float32 matmuls a little differently than one.
    assert _diff(third, nine) <= 1
    # Made again from its metadata alone: no prompt, model, seed or size on the command line.
    assert main(["generate", "--from", str(tmp_path / "b-2.png"), "-o", str(tmp_path / "again.png"), "-q"]) == 0
    again = Image.open(tmp_path / "again.png")
    assert _diff(again, nine) == 0 and json.loads(again.text["kleinbild"]) | {"index": 2} == meta
    # Flags beside --from win.
    assert main(["generate", "--from", str(tmp_path / "b-2.png"), "--seed", "7", "-o", str(tmp_path / "s7.png"),
                 "-q"]) == 0
    assert _diff(Image.open(tmp_path / "s7.png"), Image.open(tmp_path / "b-0.png")) <= 1


def test_from_png_reuses_the_references_and_warns_when_they_changed(model_dir, tmp_path, capsys):
    src = tmp_path / "src.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src)
    common = ["--dtype", "float32", "--device", "cpu", "-q"]
    assert main(["generate", "make it blue", "-m", model_dir, "--image", str(src), "--seed", "4",
                 "-o", str(tmp_path / "edit.png"), *common]) == 0
    meta = json.loads(Image.open(tmp_path / "edit.png").text["kleinbild"])
    assert meta["references"][0]["path"] == str(src.resolve()) and meta["references"][0]["size"] == [64, 64]
    assert len(meta["references"][0]["digest"]) == 40
    assert main(["generate", "--from", str(tmp_path / "edit.png"), "-o", str(tmp_path / "again.png"), *common]) == 0
    assert _diff(Image.open(tmp_path / "again.png"), Image.open(tmp_path / "edit.png")) == 0
    assert "warning" not in capsys.readouterr().err
    Image.new("RGB", (64, 64), "red").save(src)
    assert main(["generate", "--from", str(tmp_path / "edit.png"), "-o", str(tmp_path / "other.png"), *common]) == 0
    assert "references differ" in capsys.readouterr().err


def test_from_needs_a_kleinbild_png(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (64, 64)).save(plain)
    assert main(["generate", "--from", str(plain)]) == 2
    assert "carries no kleinbild settings" in capsys.readouterr().err
    assert main(["generate"]) == 2
    assert "give a prompt" in capsys.readouterr().err


def test_python_dash_m_and_every_command_parse():
    import subprocess
    import sys

    from kleinbild import __version__
    from kleinbild.cli import build_parser

    out = subprocess.run([sys.executable, "-m", "kleinbild", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"kleinbild {__version__}"
    parser = build_parser()
    for argv in (
        ["generate", "p", "-m", "m", "--vae", "a", "--text-encoder", "t", "--preset", "klein-4b", "-i", "x.png",
         "-W", "64", "-H", "64", "-s", "2", "-g", "3", "--negative-prompt", "n", "--seed", "1", "-n", "2",
         "--dtype", "float32", "--device", "cpu", "-o", "o.png", "--json", "--lora", "l:0.5", "--fuse-lora",
         "--quant", "int8", "--offload", "none", "--compile", "-q"],
        ["models"],
        ["bench", "--preset", "nano", "--random-weights", "--size", "128", "--steps", "2", "--dtype", "float32",
         "--threads", "1", "--vs", "diffusers", "--repeats", "1", "--cache-dir", "c", "--offload", "none",
         "--quant", "int8", "--prequantized", "--device", "cpu", "--compile"],
        ["train", "lora", "--base", "nano-base", "--data", "d", "--out", "o", "--rank", "4", "--alpha", "4",
         "--targets", "attn", "--size", "64", "--save-every", "10", "--sample-prompt", "s", "--caption-dropout",
         "0.1", "--lora", "l", "--concept", "bar", "-n", "3", "--prior", "2", "--prior-images", "model",
         "--device", "cpu", "--steps", "5", "--batch", "2", "--seed", "1", "--lr", "1e-3"],
        ["eval", "-m", "nano", "--n", "2", "--tasks", "single", "--steps", "2", "--seed", "1", "--dtype", "float32",
         "--device", "cpu", "--grid", "g.png", "--json", "--quant", "int8", "--lora", "l", "--offload", "none"],
        ["serve", "-m", "nano", "--host", "0.0.0.0", "--port", "0", "--api-key", "k", "--cors-origin", "o",
         "--max-pixels", "9", "--max-n", "2", "--max-images", "1", "--max-upload-bytes", "9",
         "--max-image-pixels", "9", "--max-steps", "9", "--max-queue", "2", "--max-batch", "2", "--output-dir",
         "d", "--ttl", "9", "--preview-every", "0", "--cache-size", "0", "--log-level", "debug", "--dtype",
         "float32", "--device", "cpu", "--vae", "v", "--text-encoder", "t", "--preset", "nano"],
        ["quantize", "m", "o", "--format", "nvfp4", "--report", "--quality", "2", "--matmul", "--device", "cpu"],
    ):
        args = parser.parse_args(argv)
        assert args.command == argv[0]
    gen = parser.parse_args(["generate", "p"])
    assert gen.offload == "model" and gen.num_images == 1 and gen.out == "out.png"
    bench = parser.parse_args(["bench"])
    assert (bench.dtype, bench.device, bench.offload) == ("bfloat16", "cpu", "model")


def test_notes_are_printed_once(model_dir, tmp_path, capsys):
    assert main(["generate", "x", "-m", model_dir, "--guidance", "3", "-W", "64", "-H", "64", "-s", "1",
                 "--dtype", "float32", "-o", str(tmp_path / "g.png")]) == 0
    assert capsys.readouterr().err.count("ignored") == 1


def test_nano_says_when_a_size_is_one_it_was_not_trained_at(tmp_path, capsys):
    assert main(["generate", "a big red circle in the centre on a blue background", "-W", "256", "-H", "256",
                 "-s", "1", "-o", str(tmp_path / "n.png")]) == 0
    assert "trained at 128 px only" in capsys.readouterr().err


def test_output_formats_overwrites_and_early_errors(model_dir, tmp_path, capsys):
    common = ["-m", model_dir, "--dtype", "float32", "-W", "64", "-H", "64", "-s", "1", "--seed", "3"]
    assert main(["generate", "a dot", *common, "-o", str(tmp_path / "a.jpg")]) == 0
    assert Image.open(tmp_path / "a.jpg").format == "JPEG" and not (tmp_path / "a.jpg.png").exists()
    assert "replacing" not in capsys.readouterr().err
    assert main(["generate", "a dot", *common, "-o", str(tmp_path / "a.jpg")]) == 0
    assert f"replacing {tmp_path / 'a.jpg'}" in capsys.readouterr().err
    # JPEG and WebP carry the settings too: --from works on them.
    assert main(["generate", "--from", str(tmp_path / "a.jpg"), "-o", str(tmp_path / "b.webp"), "-q"]) == 0
    assert Image.open(tmp_path / "b.webp").format == "WEBP"
    assert json.loads(Image.open(tmp_path / "b.webp").getexif()[0x010E])["kleinbild"]["seed"] == 3
    # Refused before any weight is read.
    for argv, message in ((["-o", str(tmp_path / "a.gif")], "name the output .png, .jpg or .webp"),
                          (["-W", "32"], "too small"), (["--image", str(tmp_path / "none.png")], "does not exist")):
        assert main(["generate", "a dot", "-m", model_dir, *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "loaded" not in err, err


def test_a_bad_command_line_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--steps", "zero"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--steps" in err and "see kleinbild generate --help" in err, err


def test_python_loads_nano_without_an_argument():
    from kleinbild import KleinPipeline

    assert KleinPipeline.from_pretrained().preset.name == "nano"
