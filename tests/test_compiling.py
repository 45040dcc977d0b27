"""Compiled graphs are counted: one graph for many sizes with dynamic shapes, and none on a warmed request."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from kleinbild.compiling import parse_sizes

SIZES = [(128, 128), (192, 128), (128, 256)]


@pytest.fixture
def nano():
    from kleinbild import KleinPipeline

    torch._dynamo.reset()  # dynamo remembers which sizes changed per function, across compile() calls
    pipe = KleinPipeline.from_pretrained("nano", device="cpu")
    yield pipe
    pipe.uncompile()
    torch._dynamo.reset()


def _generate(pipe, w, h, n=1):
    return pipe.generate("a big red circle at the top left on a blue background", width=w, height=h, seed=1,
                         num_images=n)


def test_dynamic_shapes_compile_one_graph_for_three_sizes(nano, caplog):
    nano.compile(dynamic=True, backend="eager")  # eager: dynamo's graphs without inductor's code generation
    with caplog.at_level(logging.INFO, logger="kleinbild.compiling"):
        for w, h in SIZES:
            _generate(nano, w, h)
    # The decoder too: its sub-pixel kernels are prepared before compiling, so nothing breaks the graph.
    assert nano.compilations == {"transformer": 1, "decode": 1}
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 and logged[0].startswith("compiling transformer: graph 1 (inputs [(1, 64, 32)")


def test_static_shapes_compile_a_graph_per_size(nano):
    nano.compile(dynamic=False, backend="eager", decoder=False)
    for w, h in SIZES:
        _generate(nano, w, h)
    assert nano.compilations == {"transformer": 3}


def test_torch_default_compiles_a_static_then_one_dynamic_graph(nano):
    nano.compile(dynamic=None, backend="eager", decoder=False)
    for w, h in SIZES:
        _generate(nano, w, h)
    assert nano.compilations == {"transformer": 2}  # static first, then one dynamic graph for the rest


def test_a_warmed_pipeline_compiles_nothing_on_a_request(nano):
    plain = _generate(nano, 192, 128).images[0]
    nano.compile(dynamic=True, backend="eager")
    warmed = nano.warm([(128, 128)], batches=(1, 2))
    assert warmed["transformer"] == 2  # a batch of one is its own graph (dynamo specialises size 1)
    for w, h in SIZES:
        out = _generate(nano, w, h, n=3)
    assert nano.compilations == warmed
    assert out.settings["compiled"] is True
    assert np.array_equal(np.asarray(_generate(nano, 192, 128).images[0]), np.asarray(plain))  # same images


def test_sizes_are_parsed_or_refused_by_name():
    assert parse_sizes("512x512, 1024X768") == [(512, 512), (1024, 768)]
    for bad in ("512", "512x", "0x512", "axb"):
        with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
            parse_sizes(bad)


def test_a_server_warmed_on_load_compiles_nothing_on_requests(monkeypatch):
    """LoadOptions(compile=True, warm_sizes=...) warms before the server sees the pipeline; /metrics counts graphs.
    Inductor's code generation is swapped for dynamo's graphs run eagerly (the counting is the same, minutes less)."""
    from serving import live

    from kleinbild import KleinPipeline
    from kleinbild.loading import LoadOptions

    monkeypatch.setattr(torch, "_TorchCompileInductorWrapper", lambda mode, options, dynamic: (
        lambda gm, example_inputs: gm.forward))
    torch._dynamo.reset()
    options = LoadOptions(device="cpu", compile=True, compile_shapes="dynamic", warm_sizes=((128, 128),))
    pipe = KleinPipeline.from_pretrained("nano", options)
    try:
        warmed = dict(pipe.compilations)
        assert warmed == {"transformer": 2, "decode": 2}  # batches of one and of two
        with live(pipe) as srv:
            for size in ("192x128", "128x256"):
                r = srv.client.post("/v1/images/generations", json={"prompt": "a red circle", "size": size, "n": 3})
                assert r.status_code == 200, r.text
            metrics = srv.client.get("/metrics").text
        assert pipe.compilations == warmed
        assert f'kleinbild_compilations_total{{module="transformer"}} {warmed["transformer"]}' in metrics
    finally:
        pipe.uncompile()
        torch._dynamo.reset()


def test_fp8_compute_compiles_without_breaking_the_graph():
    """The FP8 layers' kernel path (here its CPU emulation, with static scales after calibrating) traces into the
    transformer's one graph, so compiling keeps FP8 compute inside the fused code."""
    from kleinbild import KleinPipeline, quant
    from kleinbild.quantize import calibrate_input_scales

    torch._dynamo.reset()
    pipe = KleinPipeline.from_pretrained("nano", device="cpu", quant="fp8")
    quant.emulate_fp8_compute(True)
    try:
        calibrate_input_scales(pipe.transformer, lambda: _generate(pipe, 128, 128))
        pipe.compile(dynamic=True, backend="eager", decoder=False)
        for w, h in SIZES[:2]:
            _generate(pipe, w, h)
        assert pipe.compilations == {"transformer": 1}
    finally:
        quant.emulate_fp8_compute(False)
        pipe.uncompile()
        torch._dynamo.reset()
