"""The benchmark: random checkpoints both engines load, per-stage numbers, ratios, and a final JSON line."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from kleinbild.bench import cpu as bench  # noqa: E402
from kleinbild.cli import main  # noqa: E402
from kleinbild.config import get_preset  # noqa: E402
from kleinbild.pipeline import KleinPipeline  # noqa: E402


def test_random_checkpoint_loads_in_both_engines(tmp_path):
    from diffusers import Flux2KleinPipeline

    folder = bench.random_checkpoint("nano", tmp_path / "ck", seed=3, say=lambda m: None)
    p = get_preset("nano")
    ours = KleinPipeline.from_pretrained(folder, dtype="float32", text_layers=p.text.out_layers,
                                         max_text_length=p.text.max_length)
    assert ours.preset.dit == p.dit and ours.preset.ae == p.ae
    ref = Flux2KleinPipeline.from_pretrained(folder)
    assert sum(x.numel() for x in ref.transformer.parameters()) == sum(x.numel() for x in ours.transformer.parameters())
    # Written once: a second call reuses the folder.
    assert bench.random_checkpoint("nano", tmp_path / "ck", seed=3, say=lambda m: None) == folder


def test_dit_flops_match_the_parameter_count():
    cfg = get_preset("klein-4b").dit
    # Without attention, a forward is 2 FLOPs per weight per token; check the linear part against that.
    n = 1024
    linear_only = bench.dit_flops(cfg, n, 0) - (cfg.depth + cfg.depth_single) * 4 * n * n * cfg.hidden_size
    from kleinbild.config import dit_param_count

    params = dit_param_count(cfg) - cfg.context_dim * cfg.hidden_size  # no text tokens: txt_in unused
    h = cfg.hidden_size
    mods = 15 * h * h + 2 * h * h + h * h + cfg.time_dim * h  # modulations, final adaLN, time MLP: per sample
    params -= cfg.depth * (4 * h * h + 3 * h * cfg.mlp_hidden)  # the text stream's weights see no tokens here
    assert abs(linear_only - 2 * n * (params - mods)) / linear_only < 0.01


def test_bench_cli_prints_table_and_json(tmp_path, capsys):
    rc = main(["bench", "--preset", "nano", "--random-weights", "--size", "128", "--steps", "2", "--vs", "diffusers",
               "--repeats", "1", "--threads", "1", "--cache-dir", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    for engine in ("kleinbild", "diffusers"):
        e = res["engines"][engine]
        assert e["step"] > 0 and e["decode"] > 0 and e["text"] > 0 and e["peak_rss_gb"] > 0.1
    assert set(res["ratios"]) >= {"load", "text", "step", "decode", "total", "peak_rss_gb"}
    assert "DiT step (s)" in "\n".join(out)


def test_in_process_bench_gives_the_peer_the_same_weights():
    """The accelerator path (weights made on the device, diffusers given the same tensors) run on the CPU."""
    from kleinbild.bench import device as bench_device

    res = bench_device.run("nano", device="cpu", size=128, steps=2, dtype="float32", repeats=1, vs="diffusers",
                           offload_modes=("model", "sequential"), say=lambda m: None)
    for engine in ("kleinbild", "diffusers"):
        e = res["engines"][engine]
        assert e["text"] > 0 and e["step"] > 0 and e["decode"] > 0 and e["total"] > e["step"]
    assert res["psnr_vs_kleinbild_db"]["diffusers"] > 60, "same weights, same sampler: the same image"
    assert set(res["ratios"]) == {"text", "step", "decode", "total"}
    for mode in ("model", "sequential"):
        assert res["memory"][mode]["psnr_vs_plain_db"] == float("inf"), "memory modes change nothing"
    assert "end to end (s)" in bench_device.format_table(res)


def test_stage_times_add_up_every_decode_call():
    """diffusers decodes in two calls (the VAE, then its postprocess to PIL): the decode stage holds both."""
    import time
    from types import SimpleNamespace

    from kleinbild.bench.device import _stage_times

    calls: list[str] = []

    def pause(name: str, seconds: float):
        return lambda *a, **k: (calls.append(name), time.sleep(seconds))[0]

    text, vae, post = (SimpleNamespace(run=pause(n, s)) for n, s in (("text", 0.0), ("vae", 0.05), ("post", 0.04)))

    def generate(on_step):
        text.run()
        on_step()
        vae.run()
        post.run()

    st = _stage_times(generate, (text, "run"), [(vae, "run"), (post, "run")], torch.device("cpu"))
    assert calls == ["text", "vae", "post"]
    assert st["decode"] >= 0.09, "both decode calls are counted"
    assert text.run.__name__ == vae.run.__name__ == "<lambda>", "the hooks are removed afterwards"


def test_random_weights_refuse_uninitialised_buffers():
    from torch import nn

    from kleinbild.bench import device as bench_device

    with pytest.raises(ValueError, match="running_mean"):
        bench_device._materialise(lambda: nn.BatchNorm1d(4), torch.device("cpu"), torch.float32, 0)


def test_bench_cli_with_a_device_runs_in_process(monkeypatch, capsys):
    import kleinbild.loading

    monkeypatch.setattr(kleinbild.loading, "pick_device", lambda d: torch.device("cpu"))  # stands in for cuda
    rc = main(["bench", "--preset", "nano", "--random-weights", "--device", "cuda", "--size", "128", "--steps",
               "2", "--repeats", "1", "--offload", "none"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["device"] == "cpu" and list(res["engines"]) == ["kleinbild"] and "none" in res["memory"]


def test_bench_loads_a_prequantized_transformer(tmp_path, capsys):
    rc = main(["bench", "--preset", "nano", "--random-weights", "--size", "128", "--steps", "1", "--repeats", "1",
               "--threads", "1", "--cache-dir", str(tmp_path), "--quant", "int8", "--prequantized"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["prequantized"] and res["quant"] == "int8"
    assert res["quant_layers"] > 0, "the timed run did not use quantized layers"
    assert list(tmp_path.rglob("transformer-int8.safetensors")), "the quantized file was not written"


def test_serve_benchmark_prints_every_configuration(capsys):
    """`kleinbild bench --serve` end to end on the bundled model, at its smallest: one round of two requests."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'kleinbild[ray]')")
    assert main(["bench", "--serve", "--requests", "2", "--concurrency", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert set(res["results"]) == {"in-process", "1 replica", "2 replicas"}
    for r in res["results"].values():
        assert r["images_per_s"] > 0 and 0 < r["latency_median_s"] <= r["latency_p90_s"]
    assert res["cpu"] and "2 replicas / 1 throughput" in res["ratios"]
    assert any(line.startswith("in-process") for line in out)


def test_gpu_speed_probes_start_on_the_cpu(tmp_path, capsys):
    """The GPU speed script runs every probe, small, on the CPU (dynamo without inductor's code generation)."""
    import json

    from kleinbild.bench import speed

    out = tmp_path / "speed"
    assert speed.main(["--device", "cpu", "--preset", "nano", "--base-preset", "nano-base", "--size", "128",
                       "--sizes", "128,192,256", "--steps", "1", "--base-steps", "4", "--repeats", "1",
                       "--backend", "eager", "--cache-settings", "teacache:0.3", "--out", str(out)]) == 0
    res = json.loads((out / "speed.json").read_text())
    assert res["recompiles"]["dynamic"] == {"transformer": 1, "decode": 1}
    assert res["recompiles"]["static"]["transformer"] == 3
    assert set(res["compiled_shapes"]) == {"eager", "static", "dynamic"}
    paths = res["eager_paths"]
    assert set(paths) == {"current", "real_rope", "unfused_rms_norm", "both_previous"}
    assert paths["current"]["psnr_vs_current_db"] == 100.0 and paths["both_previous"]["psnr_vs_current_db"] > 30
    from kleinbild import transformer

    assert transformer.complex_rope(torch.device("cpu")), "the probe restores the forms it swapped"
    assert res["fp8"]["layers"] > 0 and res["fp8"]["fp8"]["psnr_vs_bf16_db"] > 20
    assert res["fp8"]["calibrated_layers"] == res["fp8"]["layers"] and "fp8-static-compiled" in res["fp8"]
    rows = res["step_cache"]["rows"]
    assert [r["mode"] for r in rows] == ["none", "teacache"] and rows[0]["psnr_db"] == 100.0
    assert res["profile"]["kleinbild"][0]["ms"] > 0 and (out / "trace-kleinbild.json").is_file()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == res


def test_kernel_count_sees_copies_and_not_views():
    import torch.nn.functional as F

    from kleinbild.bench.traffic import count

    with torch.device("meta"):
        a, w = torch.empty(1, 64, 32, dtype=torch.bfloat16), torch.empty(16, 32, dtype=torch.bfloat16)
    assert count(lambda: a.reshape(64, 32))["kernels"] == 0, "a view moves nothing"
    copy = count(lambda: a.transpose(1, 2).reshape(-1))
    assert copy["other_kernels"] == 1 and copy["other_gb"] == round(2 * 64 * 32 * 2 / 1e9, 4)
    product = count(lambda: F.linear(a, w))
    assert product["kernels"] == 1 and product["other_kernels"] == 0, "a linear is one matrix product"
    strided = count(lambda: F.scaled_dot_product_attention(*(a[:, None].transpose(-1, -2),) * 3))
    assert "attention_unfused" in strided["top"], "a strided head dim keeps a GPU off its fused attention"


def test_eager_gpu_path_moves_fewer_bytes_than_diffusers():
    """The GPU code path of both engines at klein-4b's full size, counted on the meta device: kleinbild's DiT step
    and decoder launch fewer non-product kernels and move fewer bytes through them than diffusers'."""
    from kleinbild.bench import traffic

    dit = traffic.dit("klein-4b", size=1024)
    ours, peer = dit["kleinbild"]["step"], dit["diffusers"]["step"]
    assert ours["other_gb"] < 0.8 * peer["other_gb"] and ours["other_kernels"] < peer["other_kernels"]
    for block in ("double_block", "single_block"):
        assert dit["kleinbild"][block]["other_gb"] < dit["diffusers"][block]["other_gb"]
    dec = traffic.decoder("klein-4b", size=1024)
    assert dec["kleinbild"]["other_gb"] < dec["diffusers"]["other_gb"]
    assert "attention_unfused" not in dec["kleinbild"]["top"]
