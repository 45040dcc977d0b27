"""Memory modes give the same images as the plain path, and really release or park what they say they do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from tiny import MAX_TEXT, TEXT_LAYERS, reference_pipeline  # noqa: E402

from kleinbild import offload  # noqa: E402
from kleinbild.pipeline import KleinPipeline  # noqa: E402
from kleinbild.sampling import make_noise  # noqa: E402


def load(mode: str) -> KleinPipeline:
    _, folder = reference_pipeline("distilled")
    return KleinPipeline.from_pretrained(folder, device="cpu", dtype="float32", text_layers=TEXT_LAYERS,
                                         max_text_length=MAX_TEXT, offload_mode=mode)


def run(pipe: KleinPipeline, prompt: str = "a red circle", **kw) -> np.ndarray:
    noise = make_noise(1, 32, 16, 16, seed=3)
    res = pipe.generate(prompt, width=64, height=64, steps=3, noise=noise, **kw)
    return np.asarray(res.images[0], dtype=np.int16)


@pytest.fixture(scope="module")
def plain() -> np.ndarray:
    img = run(load("none"))
    assert img.std() > 5
    return img


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_modes_match_plain_and_release_the_text_encoder(mode: str, plain: np.ndarray) -> None:
    pipe = load(mode)
    assert pipe._text_encoder is None, "with offload the text encoder is not kept after loading"
    assert np.array_equal(run(pipe), plain)
    assert pipe._text_encoder is None, "released again after encoding"
    assert pipe.text_encoder_loads == 1
    run(pipe)  # same prompt: the prompt cache answers, nothing is read again
    assert pipe.text_encoder_loads == 1
    run(pipe, prompt="a blue square")
    assert pipe.text_encoder_loads == 2


def test_plain_mode_keeps_the_text_encoder() -> None:
    pipe = load("none")
    te = pipe.text_encoder
    run(pipe)
    assert pipe.text_encoder is te and pipe.text_encoder_loads == 0


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_accelerator_parking_path_runs_on_cpu(mode: str, plain: np.ndarray) -> None:
    """The code a GPU takes (components parked on the host, visiting per stage) forced on with device cpu."""
    pipe = load(mode)
    pipe._park()
    assert np.array_equal(run(pipe), plain)
    if mode == "sequential":
        te_layer = pipe.files and pipe.text_encoder.model.layers[0]  # materialised with per-layer visits
        assert te_layer._forward_pre_hooks, "text encoder layers stream one at a time"
        pipe._text_encoder = None
    assert pipe._parked["autoencoder"].visits == 1  # decode (no references were encoded)
    if mode == "model":
        assert pipe._parked["transformer"].visits == 1  # one visit for the whole denoising loop
    else:
        assert "transformer" not in pipe._parked


def test_parked_visit_swaps_and_restores_the_same_storage() -> None:
    m = nn.Linear(4, 3)
    host = [p.data_ptr() for p in m.parameters()]
    parked = offload.Parked(m, torch.device("meta"))
    with parked.visit():
        assert all(p.device.type == "meta" for p in m.parameters())
    assert [p.data_ptr() for p in m.parameters()] == host, "parking again is a pointer swap, not a copy"
    assert parked.visits == 1


def test_sequential_blocks_visit_once_per_forward_in_order() -> None:
    torch.manual_seed(0)
    blocks = [nn.Linear(8, 8) for _ in range(3)]
    x = torch.randn(2, 8)
    expect = blocks[2](blocks[1](blocks[0](x)))
    order: list[int] = []
    parked = offload.sequential_blocks(blocks, torch.device("cpu"))
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(lambda _m, _a, i=i: order.append(i))
    got = blocks[2](blocks[1](blocks[0](x)))
    assert torch.equal(got, expect)
    assert order == [0, 1, 2] and [p.visits for p in parked] == [1, 1, 1]


def test_unknown_mode_is_named() -> None:
    with pytest.raises(ValueError, match="'disk'.*none, model, sequential"):
        load("disk")


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_modes_without_files_keep_the_text_encoder(mode: str, plain: np.ndarray) -> None:
    """A pipeline built from modules (random-weight benchmarks, custom code) has no file to re-read the encoder
    from: offload keeps it, parked with the rest on an accelerator (forced here with device cpu)."""
    src = load("none")
    te = src.text_encoder
    pipe = KleinPipeline(src.preset, src.transformer, src.autoencoder, te, src.tokenizer, src.device, src.dtype,
                         offload_mode=mode)
    assert np.array_equal(run(pipe), plain)
    assert pipe.text_encoder is te and pipe.text_encoder_loads == 0
    pipe._park()
    pipe._place_text_encoder(te)
    assert np.array_equal(run(pipe, prompt="a blue square"), run(src, prompt="a blue square"))
    assert pipe.text_encoder is te and pipe.text_encoder_loads == 0
    if mode == "sequential":
        assert te.model.layers[0]._forward_pre_hooks
