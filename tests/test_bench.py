"""The benchmark: random checkpoints both engines load, per-stage numbers, ratios, and a final JSON line."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from kleinbild import bench  # noqa: E402
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
