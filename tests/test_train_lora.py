"""LoRA training, shortened for CI: a tiny random base model, a handful of generated shapes-world images.

It trains, checkpoints (adapter, optimiser, sample image), resumes exactly where it stopped, lowers the loss on its
data, and writes a diffusers/PEFT file that diffusers' own load_lora_weights applies identically.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from kleinbild import train_lora as tl
from kleinbild.nano import concepts, shapes

pytest.importorskip("diffusers")

from tiny import MAX_TEXT, TEXT_LAYERS, reference_pipeline  # noqa: E402


def base_pipe():
    from kleinbild.pipeline import KleinPipeline

    _, folder = reference_pipeline("base")
    return KleinPipeline.from_pretrained(folder, device="cpu", dtype="float32", text_layers=TEXT_LAYERS,
                                         max_text_length=MAX_TEXT)


def make_data(folder, n: int = 4, edits: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    rows = []
    for i in range(n):
        scene = shapes.sample_scene(rng, 1)
        shapes.render(scene, 64).save(folder / f"img{i}.png")
        caption = shapes.caption(scene, rng)
        if edits:
            src = shapes.sample_scene(rng, 1)
            shapes.render(src, 64).save(folder / f"src{i}.png")
            rows.append({"file_name": f"img{i}.png", "text": "turn it into: " + caption, "references": [f"src{i}.png"]})
        else:
            (folder / f"img{i}.txt").write_text(caption)
    if edits:
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


ARGS = dict(rank=4, batch=2, size=64, sample_steps=2, lr=5e-3, warmup=1)


def test_train_checkpoint_resume_exactly(tmp_path):
    pipe = base_pipe()
    data = make_data(tmp_path / "data")
    straight = tmp_path / "straight"
    tl.train_lora(pipe, data, straight, tl.LoraArgs(steps=6, save_every=3, **ARGS), say=lambda m: None)
    for name in ("ckpt.pt", "lora-000003.safetensors", "lora-000006.safetensors", "lora.safetensors", "args.json",
                 "samples/step-000003.png", "samples/step-000006.png"):
        assert (straight / name).is_file(), name
    assert Image.open(straight / "samples" / "step-000006.png").size == (64, 64)
    assert pipe.loras == [], "training leaves no adapter attached"

    # The same run, interrupted after its first checkpoint and resumed, ends with the same adapter.
    class Stop(Exception):
        pass

    def stop_at_3(msg: str) -> None:
        if "checkpoint at step 3" in msg:
            raise Stop

    halted = tmp_path / "halted"
    with pytest.raises(Stop):
        tl.train_lora(pipe, data, halted, tl.LoraArgs(steps=6, save_every=3, **ARGS), say=stop_at_3)
    assert pipe.loras == []
    lines: list[str] = []
    tl.train_lora(pipe, data, halted, tl.LoraArgs(steps=6, save_every=3, **ARGS), say=lines.append)
    assert "lora: resumed at step 3" in lines
    one, two = (str(run / "lora.safetensors") for run in (straight, halted))
    with safe_open(one, "pt") as a, safe_open(two, "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
        meta = json.loads(a.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 4
    with pytest.raises(ValueError, match="holds a run with rank 4"):
        tl.train_lora(pipe, data, halted, tl.LoraArgs(steps=8, save_every=3, **{**ARGS, "rank": 8}),
                      say=lambda m: None)


def test_training_lowers_the_loss_and_diffusers_loads_the_result(tmp_path):
    from kleinbild.sampling import make_noise

    pipe = base_pipe()
    data = make_data(tmp_path / "data", n=2)
    before = tl.flow_loss(pipe, data, size=64)
    out = tl.train_lora(pipe, data, tmp_path / "run", tl.LoraArgs(steps=30, save_every=30, caption_dropout=0.0,
                                                                   **ARGS), say=lambda m: None)
    name = pipe.load_lora(out)
    after = tl.flow_loss(pipe, data, size=64)
    assert after < 0.9 * before, (before, after)

    # diffusers reads the file as a PEFT adapter and gives the same image (scaled up so the effect is plain).
    pytest.importorskip("peft")
    ref, _ = reference_pipeline("base")
    noise = make_noise(1, 32, 16, 16, seed=2)
    pipe.set_lora_scale(name, 8.0)
    got = pipe.generate("a small red circle", width=64, height=64, steps=3, noise=noise).images[0]
    pipe.set_lora_scale(name, 0.0)
    plain = pipe.generate("a small red circle", width=64, height=64, steps=3, noise=noise).images[0]
    ref.load_lora_weights(str(out.parent), weight_name=out.name, adapter_name="trained")
    try:
        ref.set_adapters(["trained"], adapter_weights=[8.0])
        expect = ref(prompt="a small red circle", height=64, width=64, num_inference_steps=3, latents=noise,
                     guidance_scale=4.0, text_encoder_out_layers=TEXT_LAYERS, max_sequence_length=MAX_TEXT).images[0]
    finally:
        ref.unload_lora_weights()
    a, b, c = (np.asarray(x, dtype=np.int16) for x in (got, expect, plain))
    assert np.abs(a - b).max() <= 1
    assert np.abs(a - c).max() > 3, "the trained adapter must change the image"


def test_edit_pairs_train(tmp_path):
    pipe = base_pipe()
    data = make_data(tmp_path / "edits", n=2, edits=True)
    assert all(len(ex.references) == 1 for ex in tl.load_dataset(data))
    out = tl.train_lora(pipe, data, tmp_path / "run", tl.LoraArgs(steps=2, save_every=2, **ARGS), say=lambda m: None)
    assert out.is_file()


def test_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        tl.load_dataset(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="holds no training images"):
        tl.load_dataset(tmp_path / "d")
    shapes.render(shapes.Scene("white", ()), 64).save(tmp_path / "d" / "a.png")
    with pytest.raises(ValueError, match=r"without a caption file \(NAME.txt\): \['a.png'\]"):
        tl.load_dataset(tmp_path / "d")
    (tmp_path / "d" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x", "references": ["b.png"]}\n')
    with pytest.raises(ValueError, match="do not exist.*b.png"):
        tl.load_dataset(tmp_path / "d")
    (tmp_path / "d" / "metadata.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        tl.load_dataset(tmp_path / "d")
    with pytest.raises(ValueError, match="unknown LoRA targets 'everything'"):
        tl.LoraArgs(targets="everything")


def test_concept_data_and_presence(tmp_path):
    folder = concepts.make_concept_data(tmp_path / "ring", "ring", n=5, seed=3, size=128, prior=3)
    ex = tl.load_dataset(folder)
    concept = [e for e in ex if "ring" in e.caption]
    assert len(ex) == 8 and len(concept) == 5, "5 concept examples and 3 prior-preservation ones"
    for e in concept:
        res = concepts.concept_presence(Image.open(e.image), "ring")
        assert res["present"] and res["iou"] > 0.75, e.caption
        f = res["found"]  # the analyser reads the ring's colour and position
        assert f.colour in e.caption and f.size == "big"
    for shape in concepts.CONCEPT_SHAPES:  # each is told apart from the others and from the world's shapes
        scene = shapes.Scene("white", (shapes.Obj(shape, "red", "big", "centre"),))
        img = concepts.render_concept(scene)
        found = {s for s in concepts.CONCEPT_SHAPES if concepts.concept_presence(img, s)["present"]}
        assert found == {shape}
    rng = random.Random(0)
    for _ in range(10):
        world = shapes.render(shapes.sample_scene(rng), 128)
        assert not any(concepts.concept_presence(world, s)["present"] for s in concepts.CONCEPT_SHAPES)
    with pytest.raises(ValueError, match="unknown concept shape 'star'"):
        concepts.make_concept_data(tmp_path / "x", "star")


def test_lora_training_does_not_depend_on_the_shapes_world():
    """train_lora works on any base model: no import of kleinbild.nano in it, at module or function level."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(tl.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert not [m for m in imported if m.startswith("kleinbild.nano")], imported


def test_cli_lora_data_and_errors(tmp_path):
    done = subprocess.run([sys.executable, "-m", "kleinbild.cli", "train", "lora-data", "--data",
                           str(tmp_path / "c"), "-n", "3"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "c").glob("*.png"))) == 3
    bad = subprocess.run([sys.executable, "-m", "kleinbild.cli", "train", "lora", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "needs --data DIR" in bad.stderr


def test_concept_data_priors_can_come_from_the_model(tmp_path):
    """Prior images generated by the model being adapted (its own answer to each prior prompt), not rendered."""

    class Recorder:
        def __init__(self):
            self.calls = []

        def generate(self, prompt, width, height, seed):
            self.calls.append((prompt, width, height, seed))
            return type("Out", (), {"images": [Image.new("RGB", (width, height), (1, 2, 3))]})()

    rec = Recorder()
    folder = concepts.make_concept_data(tmp_path / "bar", "bar", n=2, seed=4, size=64, prior=3, prior_pipe=rec)
    priors = sorted(folder.glob("prior-*.png"))
    assert len(priors) == 3 and len(rec.calls) == 3
    for path, (prompt, w, h, _) in zip(priors, rec.calls, strict=True):
        assert path.with_suffix(".txt").read_text().strip() == prompt
        assert (w, h) == (64, 64) and Image.open(path).getpixel((0, 0)) == (1, 2, 3)
    assert len({c[3] for c in rec.calls}) == 3, "each prior image has its own seed"
    rendered = concepts.make_concept_data(tmp_path / "bar2", "bar", n=2, seed=4, size=64, prior=3)
    assert [p.with_suffix(".txt").read_text() for p in sorted(rendered.glob("prior-*.png"))] == [
        p.with_suffix(".txt").read_text() for p in priors], "same prompts either way"
