"""The memory plan against what loading really holds, and the choice a budget makes."""

from __future__ import annotations

import json

import pytest

from kleinbild import memory
from kleinbild.cli import main
from kleinbild.loading import LoadOptions, locate_with
from kleinbild.pipeline import KleinPipeline
from kleinbild.quant import weight_bytes


def _held(pipe: KleinPipeline) -> dict[str, int]:
    return {"transformer": weight_bytes(pipe.transformer), "text_encoder": weight_bytes(pipe.text_encoder),
            "autoencoder": weight_bytes(pipe.autoencoder)}


@pytest.mark.parametrize(("quant", "text_quant"), [(None, None), ("fp8", "int8"), ("int8", "nvfp4")])
def test_computed_weights_are_what_loading_holds(quant, text_quant):
    files = locate_with("nano", LoadOptions())
    p = memory.plan(files, quant=quant, text_quant=text_quant, width=128, height=128)
    pipe = KleinPipeline.from_pretrained("nano", device="cpu", quant=quant, text_quant=text_quant)
    held = _held(pipe)
    for part, want in held.items():
        assert abs(p.weights[part] - want) <= 0.01 * want, (part, p.weights[part], want)
    assert p.formats == {"transformer": quant, "text_encoder": text_quant}
    assert p.peak_host > sum(held.values())


def test_gguf_weights_are_counted_as_stored(tmp_path):
    pytest.importorskip("gguf")
    from kleinbild.bench.gguf_write import linear_type, write
    from kleinbild.config import get_preset
    from kleinbild.loading import bundled_dir, read_transformer

    folder = bundled_dir(get_preset("nano"))
    path = write(tmp_path / "flux-2-nano-Q8_0.gguf", read_transformer(folder / "flux-2-nano.safetensors"),
                 linear_type("Q8_0"))
    opts = LoadOptions(vae=folder / "ae.safetensors", text_encoder=folder / "text_encoder")
    p = memory.plan(locate_with(path, opts), width=128, height=128)
    pipe = KleinPipeline.from_pretrained(path, opts, device="cpu")
    want = weight_bytes(pipe.transformer)
    assert p.formats["transformer"] == "Q8_0" and abs(p.weights["transformer"] - want) <= 0.01 * want
    assert p.working["denoise"] > memory.plan(locate_with("nano", LoadOptions()), width=128, height=128,
                                              device="cpu").working["denoise"]  # the dequantized layer counts


def test_gguf_text_encoder_counted_as_stored(tmp_path):
    from test_gguf import _nano_text_gguf

    path, folder = _nano_text_gguf(tmp_path, "Q8_0")
    opts = LoadOptions(vae=folder / "ae.safetensors", text_encoder=path, preset="nano")
    model = folder / "flux-2-nano.safetensors"
    p = memory.plan(locate_with(model, opts), width=128, height=128)
    pipe = KleinPipeline.from_pretrained(model, opts, device="cpu")
    want = weight_bytes(pipe.text_encoder)
    assert p.formats["text_encoder"] == "Q8_0" and abs(p.weights["text_encoder"] - want) <= 0.01 * want


def test_offload_lowers_the_device_peak():
    big = {m: memory.plan_preset("klein-4b", offload=m) for m in ("none", "model", "sequential")}
    assert big["none"].peak_device > big["model"].peak_device > big["sequential"].peak_device
    # The H200 measurement the GPU coefficients come from (GiB allocated, 1024x1024): 15.7, 7.8 and, not used to
    # set them, 3.8.
    for mode, measured in (("none", 15.7), ("model", 7.8), ("sequential", 3.8)):
        assert abs(big[mode].peak_device / memory.GIB - measured) < 0.2, mode
    files = locate_with("nano", LoadOptions())
    plans = {m: memory.plan(files, offload=m, width=512, height=512) for m in ("none", "model")}
    w = plans["none"].weights
    assert plans["model"].peak_device == max(w[c] + plans["model"].working[s] for c, s in (
        ("text_encoder", "text"), ("transformer", "denoise"), ("autoencoder", "decode")))


def test_budget_picks_the_first_plan_that_fits():
    opts = LoadOptions()
    full = memory.plan(locate_with("nano", opts), width=512, height=512)
    chosen, p = memory.fit_budget("nano", opts, full.peak_device / memory.GIB + 0.001, 512, 512)
    assert (chosen.quant, chosen.text_quant, chosen.offload_mode) == (None, None, "none")
    model = memory.plan(locate_with("nano", opts), offload="model", width=512, height=512)
    chosen, p = memory.fit_budget("nano", opts, (full.peak_device - 1) / memory.GIB, 512, 512)
    assert chosen.offload_mode == "model" and p.peak_device == model.peak_device
    chosen, _ = memory.fit_budget("nano", LoadOptions(quant="int8"), 100, 512, 512)
    assert chosen.quant == "int8"  # a format the user named is kept
    with pytest.raises(ValueError, match=r"does not fit 0.001 GiB at 512x512: the smallest plan .* needs"):
        memory.fit_budget("nano", opts, 0.001, 512, 512)


def test_cli_memory_and_budget(tmp_path, capsys):
    assert main(["memory", "nano", "--width", "256", "--height", "256", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["size"] == "256x256" and out["weights_gib"]["total"] > 0
    assert main(["memory", "nano", "--table"]) == 0
    table = capsys.readouterr().out
    assert table.count("\n") == 8 and "fp8" in table and "int8" in table
    rc = main(["generate", "a red circle", "--vram-budget", "0.05", "--device", "cpu", "--steps", "1", "--quiet",
               "-o", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert rc == 0 and "memory budget 0.05 GiB:" in err and (tmp_path / "a.png").is_file()
    assert main(["generate", "x", "--vram-budget", "0.0001", "-o", str(tmp_path / "b.png")]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_memory_benchmark_measures_each_configuration(tmp_path, capsys):
    from kleinbild.bench import memory as bench_memory

    res = bench_memory.run("nano", size=64, steps=1, cache_dir=tmp_path, threads=1, say=lambda m: None,
                           offloads=("none",))
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == [c for c, _, _ in bench_memory.CONFIGS]
    assert rows["fp8 DiT + int8 text"]["quant"] == "fp8" and rows["fp8 DiT + int8 text"]["text_quant"] == "int8"
    assert rows["Q4_K DiT + Q8_0 text"]["text_quant"] == "Q8_0"
    for r in rows.values():
        assert r["peak_rss"] >= r["after_load_rss"] > 0 and r["computed_host"] > sum(r["weights"].values())
    table = bench_memory.format_table(res)
    assert table.count("\n") == 2 + len(rows) and "measured peak RSS" in table


def test_quality_report_covers_text_encoders_and_gguf():
    from kleinbild.nano.quality import quality_report

    res = quality_report("nano", formats=("int8",), n=1, tasks=("single",), text_formats=("fp8",),
                         gguf_types=("Q8_0",))
    assert set(res) >= {"bfloat16", "int8", "text fp8", "gguf Q8_0"}
    assert 0 < res["text fp8"]["hidden_error"] < 0.05 and "hidden_error" not in res["int8"]
    assert res["gguf Q8_0"]["psnr_min"] > 20 and 0 <= res["gguf Q8_0"]["score"] <= 1


def test_decoder_benchmark_compares_both_widths(capsys):
    assert main(["bench", "--memory", "--decoders", "--size", "64", "--repeats", "1", "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    entry = res["sizes"]["64"]
    assert entry["standard"]["seconds"] > 0 and entry["small"]["seconds"] > 0 and entry["speedup"] > 0


def test_dequant_benchmark_runs_small():
    from kleinbild.bench.memory import dequant_report

    res = dequant_report(("Q8_0", "Q4_K"), m=4, k=256, n=64, repeats=1)
    assert res["Q4_K"]["bytes"] == 64 * 144 and res["Q8_0"]["ratio"] > 0 and res["bf16"]["seconds"] > 0


def test_cli_memory_of_a_preset_not_on_this_machine(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: klein-9b is nowhere here
    assert main(["memory", "klein-9b", "--quant", "Q4_K", "--text-quant", "Q8_0", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "computed from its official shapes" in captured.err
    assert out["formats"] == {"transformer": "Q4_K", "text_encoder": "Q8_0"}
    want = memory.plan_preset("klein-9b", quant="Q4_K", text_quant="Q8_0")
    assert out["peak_device_gib"] == round(want.peak_device / memory.GIB, 3)
    assert 4 < out["weights_gib"]["transformer"] < 6


def test_text_quant_and_budget_reach_every_loading_command():
    from kleinbild.cli import build_parser, load_options

    p = build_parser()
    for argv in (["generate", "x"], ["serve"], ["eval"]):
        args = p.parse_args([*argv, "--text-quant", "int8"])
        assert load_options(args).text_quant == "int8", argv
    assert p.parse_args(["serve", "--vram-budget", "12"]).vram_budget == 12.0
    assert p.parse_args(["generate", "x", "--vram-budget", "7.5"]).vram_budget == 7.5


def test_budget_tries_no_format_on_a_quantized_file(tmp_path):
    from kleinbild.bench.gguf_write import linear_type, write
    from kleinbild.config import get_preset
    from kleinbild.loading import bundled_dir, read_transformer

    folder = bundled_dir(get_preset("nano"))
    path = write(tmp_path / "flux-2-nano-Q8_0.gguf", read_transformer(folder / "flux-2-nano.safetensors"),
                 linear_type("Q8_0"))
    opts = LoadOptions(vae=folder / "ae.safetensors", text_encoder=folder / "text_encoder")
    full = memory.plan(locate_with(path, opts), width=512, height=512)
    chosen, p = memory.fit_budget(str(path), opts, (full.peak_device - 1) / memory.GIB, 512, 512)
    assert chosen.quant is None and chosen.offload_mode == "model"  # the GGUF stays as it is
    KleinPipeline.from_pretrained(path, chosen, device="cpu")  # and loads with what was chosen


def test_quality_report_measures_fp8_compute_per_call_and_calibrated():
    import torch

    from kleinbild import quant
    from kleinbild.nano.quality import quality_report

    res = quality_report("nano", formats=("fp8",), n=1, tasks=("single",))
    assert set(res) >= {"fp8", "fp8 compute", "fp8 compute, calibrated"}
    assert res["fp8"]["kernel"] == "dequantize just in time"
    for label in ("fp8 compute", "fp8 compute, calibrated"):
        assert "emulated" in res[label]["kernel"] and 20 < res[label]["psnr_min"] < float("inf")
    assert quant.native_kernel("fp8", torch.device("cpu")) is None, "the emulation is switched off afterwards"
