"""Loading: official single files, Qwen3 folders, sharded weights, the Hugging Face cache, and clear errors."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

from tiny import MAX_TEXT, TEXT_LAYERS, reference_pipeline  # noqa: E402

import kleinbild.files as files  # noqa: E402
from kleinbild.convert import vae_from_diffusers  # noqa: E402
from kleinbild.pipeline import KleinPipeline  # noqa: E402
from kleinbild.sampling import make_noise  # noqa: E402

DATA = Path(__file__).parent / "data"
KW = dict(device="cpu", dtype="float32", text_layers=TEXT_LAYERS, max_text_length=MAX_TEXT)


def to_official_names(diffusers_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent of kleinbild.convert: follows the published BFL <-> diffusers table, block by block."""
    rows = [line.split("\t") for line in (DATA / "keys-klein-4b-bfl-to-diffusers.tsv").read_text().splitlines()[1:]]
    patterns: dict[str, list[tuple[str, str]]] = {}
    for bfl, dif, _shape, note in (r + [""] * (4 - len(r)) for r in rows):
        block = re.compile(r"^((?:double_|single_|single_transformer_|transformer_)blocks)\.\d+\.")
        patterns.setdefault(block.sub(r"\1.{i}.", bfl), []).append((block.sub(r"\1.{i}.", dif), note))
    out = {}
    for bfl_pat, sources in patterns.items():
        for i in range(64):
            bfl = bfl_pat.format(i=i)
            difs = [(d.format(i=i), note) for d, note in dict.fromkeys(sources)]
            if not all(d in diffusers_sd for d, _ in difs):
                continue
            if "fused qkv" in difs[0][1]:
                out[bfl] = torch.cat([diffusers_sd[d] for d, _ in difs])
            elif "swapped" in difs[0][1]:
                a, b = diffusers_sd[difs[0][0]].chunk(2)
                out[bfl] = torch.cat([b, a])
            else:
                out[bfl] = diffusers_sd[difs[0][0]]
            if "{i}" not in bfl_pat:
                break
    return out


def image_of(pipe: KleinPipeline, **kw) -> np.ndarray:
    noise = make_noise(1, 32, 16, 16, seed=9)
    return np.asarray(pipe.generate("a blue triangle", width=64, height=64, noise=noise, **kw).images[0], np.int16)


@pytest.fixture(scope="module")
def official_files(tmp_path_factory) -> dict[str, Path]:
    ref, folder = reference_pipeline("distilled")
    d = tmp_path_factory.mktemp("official")
    dit = to_official_names(ref.transformer.state_dict())
    # Each double block's six q/k/v projections become two fused qkv tensors.
    assert len(dit) == len(ref.transformer.state_dict()) - 4 * len(ref.transformer.transformer_blocks)
    save_file({k: v.contiguous() for k, v in dit.items()}, d / "flux-2-klein-4b.safetensors")
    save_file(vae_from_diffusers(ref.vae.state_dict()), d / "ae.safetensors")
    qwen = d / "qwen3"
    qwen.mkdir()
    for src in (folder / "text_encoder").iterdir():
        shutil.copy(src, qwen / src.name)
    for src in (folder / "tokenizer").iterdir():
        shutil.copy(src, qwen / src.name)
    return {"dir": d, "dit": d / "flux-2-klein-4b.safetensors", "ae": d / "ae.safetensors", "qwen": qwen,
            "diffusers": folder}


def test_single_file_loads_into_the_same_outputs(official_files):
    f = official_files
    plain = KleinPipeline.from_pretrained(f["diffusers"], **KW)
    base = image_of(plain)
    single = KleinPipeline.from_pretrained(f["dit"], vae=f["ae"], text_encoder=f["qwen"], **KW)
    assert single.preset.default_steps == 4 and not single.preset.uses_cfg  # known file name -> klein-4b sampling
    for part in ("transformer", "autoencoder", "text_encoder"):
        a, b = getattr(single, part).state_dict(), getattr(plain, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert single.preset.dit == plain.preset.dit and single.preset.ae == plain.preset.ae
    # Same weights; memory layout may differ (fused vs split-then-fused), so allow one rounding step.
    assert np.abs(image_of(single) - base).max() <= 1
    # A diffusers vae/ folder and a diffusers folder for text encoder + tokenizer work the same.
    mixed = KleinPipeline.from_pretrained(f["dit"], vae=f["diffusers"] / "vae", text_encoder=f["diffusers"], **KW)
    assert np.abs(image_of(mixed) - base).max() <= 1
    # The folder holding the single file finds ae.safetensors next to it.
    by_dir = KleinPipeline.from_pretrained(f["dir"], text_encoder=f["qwen"], **KW)
    assert np.abs(image_of(by_dir) - base).max() <= 1


def test_preset_override_for_an_unofficially_named_file(official_files, tmp_path):
    f = official_files
    renamed = tmp_path / "my-finetune.safetensors"
    shutil.copy(f["dit"], renamed)
    pipe = KleinPipeline.from_pretrained(renamed, vae=f["ae"], text_encoder=f["qwen"], preset="klein-base-4b", **KW)
    assert pipe.preset.uses_cfg and pipe.preset.default_steps == 50


def test_sharded_checkpoints(tmp_path):
    ref, folder = reference_pipeline("distilled")
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (sharded / "text_encoder" / "model.safetensors.index.json").is_file()
    pa, pb = KleinPipeline.from_pretrained(sharded, **KW), KleinPipeline.from_pretrained(folder, **KW)
    for part in ("transformer", "text_encoder"):
        a, b = getattr(pa, part).state_dict(), getattr(pb, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    # Same weights; buffer alignment can change the kernels' summation order, so allow one rounding step.
    assert np.abs(image_of(pa) - image_of(pb)).max() <= 1


def test_text_encoder_loader_never_reads_skipped_layers(monkeypatch):
    _, folder = reference_pipeline("distilled")
    read: list[str] = []
    real_open = files.safe_open

    class Spy:
        def __init__(self, path, framework):
            self.inner = real_open(path, framework=framework)

        def __enter__(self):
            self.fh = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.fh.keys()

        def get_slice(self, k):
            return self.fh.get_slice(k)

        def get_tensor(self, k):
            read.append(k)
            return self.fh.get_tensor(k)

    monkeypatch.setattr(files, "safe_open", Spy)
    KleinPipeline.from_pretrained(folder, **KW)
    text_keys = [k for k in read if k.startswith(("model.", "lm_head"))]
    assert any(k.startswith("model.layers.2.") for k in text_keys)
    # Taps (1, 2, 3) need decoder layers 0..2 only: layer 3, the final norm and the LM head stay on disk.
    assert not [k for k in text_keys if k.startswith(("model.layers.3.", "model.norm", "lm_head"))]


def test_hugging_face_cache_resolution(tmp_path, monkeypatch):
    _, folder = reference_pipeline("distilled")
    repo = tmp_path / "hub" / "models--someone--tiny-klein"
    snap = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(folder, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = KleinPipeline.from_pretrained("someone/tiny-klein", **KW)
    assert np.abs(image_of(pipe) - image_of(KleinPipeline.from_pretrained(folder, **KW))).max() <= 1
    with pytest.raises(ValueError, match="someone/missing.*not in the Hugging Face cache"):
        KleinPipeline.from_pretrained("someone/missing", **KW)


def test_missing_and_unexpected_tensors_are_named(official_files, tmp_path):
    f = official_files
    sd = load_file(f["dit"])
    dropped = sd.pop("single_blocks.1.linear2.weight")
    broken = tmp_path / "flux-2-klein-4b.safetensors"
    save_file(sd, broken)
    with pytest.raises(ValueError, match=r"missing tensors \['single_blocks.1.linear2.weight'\]"):
        KleinPipeline.from_pretrained(broken, vae=f["ae"], text_encoder=f["qwen"], **KW)
    sd["single_blocks.1.linear2.weight"] = dropped
    sd["double_blocks.0.extra.weight"] = torch.zeros(2)
    save_file(sd, broken)
    with pytest.raises(ValueError, match=r"unexpected tensors \['double_blocks.0.extra.weight'\]"):
        KleinPipeline.from_pretrained(broken, vae=f["ae"], text_encoder=f["qwen"], **KW)


def test_paths_that_hold_no_model(tmp_path):
    with pytest.raises(ValueError, match="holds no model"):
        KleinPipeline.from_pretrained(tmp_path, **KW)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline"):
        KleinPipeline.from_pretrained(tmp_path, **KW)
    with pytest.raises(ValueError, match="not a folder, a file, a preset"):
        KleinPipeline.from_pretrained("no-such-model", **KW)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="neither a .safetensors nor a .gguf file"):
        KleinPipeline.from_pretrained(tmp_path / "notes.txt", **KW)


def test_single_file_without_text_encoder_says_what_to_pass(official_files):
    with pytest.raises(ValueError, match="--text-encoder"):
        KleinPipeline.from_pretrained(official_files["dit"], vae=official_files["ae"], **KW)


def test_unknown_preset_lists_the_choices(official_files):
    f = official_files
    with pytest.raises(ValueError, match="unknown model preset 'klein-5b'.*klein-4b"):
        KleinPipeline.from_pretrained(f["dit"], vae=f["ae"], text_encoder=f["qwen"], preset="klein-5b", **KW)


@pytest.mark.skipif(sys.platform != "linux", reason="madvise on file mappings: Linux only")
def test_release_file_pages_keeps_values_and_skips_anonymous_memory(tmp_path):
    from kleinbild.files import read_tensors, release_file_pages

    save_file({"a": torch.randn(512, 1024), "b": torch.randn(7)}, str(tmp_path / "w.safetensors"))
    t = read_tensors([tmp_path / "w.safetensors"])
    before = t["a"].clone()
    assert release_file_pages([t["a"], t["b"]]) >= t["a"].nbytes - 2 * 4096  # whole pages of "a"; "b" is smaller
    assert torch.equal(t["a"], before), "released pages are read back from the file"
    anon = torch.randn(1024, 1024)
    copy = anon.clone()
    assert release_file_pages([anon]) == 0 and torch.equal(anon, copy)


def _cli_error(capsys, *argv: str) -> str:
    from kleinbild.cli import main

    argv = ["generate", "x", "--dtype", "float32", "--device", "cpu", "-W", "64", "-H", "64", "-s", "1", "-q", *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_corrupt_single_files_are_one_line_naming_the_file(tmp_path, capsys):
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    good = tmp_path / "good.safetensors"
    save_file({"img_in.weight": torch.zeros(64, 32)}, str(good))
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    header = tmp_path / "header.safetensors"
    header.write_bytes(raw[:8] + b"\xff" * 12 + raw[20:])  # the JSON header broken
    for f in (junk, empty, truncated, header):
        err = _cli_error(capsys, "--model", str(f), "--vae", str(f), "--text-encoder", str(tmp_path))
        assert str(f) in err and "not a readable .safetensors file" in err, err
    err = _cli_error(capsys, "--model", str(good), "--vae", str(good), "--text-encoder", str(tmp_path))
    assert str(good) in err and "does not hold a FLUX.2 transformer" in err


def _damaged_copy(tmp_path: Path, capsys) -> Path:
    import shutil

    _, folder = reference_pipeline("distilled", deep_text=True)
    capsys.readouterr()
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def test_damaged_folders_are_one_line_naming_what_is_wrong(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = _damaged_copy(tmp_path, capsys)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    for key in ("x_embedder.weight", next(k for k in state if k.endswith("attn.to_q.weight"))):
        save_file({**state, key: state[key].to(torch.int32)}, str(weights))
        err = _cli_error(capsys, "--model", str(model))
        assert "floating-point" in err and f"{key} is int32" in err, err

    model = _damaged_copy(tmp_path / "b", capsys)
    (model / "tokenizer" / "tokenizer.json").write_text('{"model": {"vocab": [1, 2]}}')
    err = _cli_error(capsys, "--model", str(model))
    assert "tokenizer.json is not a valid tokenizer file" in err, err

    model = _damaged_copy(tmp_path / "c", capsys)
    (model / "transformer" / "config.json").write_text('{"num_layers": "two"}')
    err = _cli_error(capsys, "--model", str(model))
    assert "transformer/config.json is not a usable transformer config" in err, err

    model = _damaged_copy(tmp_path / "d", capsys)
    (model / "text_encoder" / "config.json").write_text('{"hidden_size": 8, "num_hidden_layers": 28}')
    err = _cli_error(capsys, "--model", str(model))
    assert "text_encoder/config.json is not a usable text encoder config" in err, err


def test_non_finite_weights_in_a_file_are_refused_naming_the_tensor(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    for part, stem, value in (("transformer", "diffusion_pytorch_model", float("nan")),
                              ("vae", "diffusion_pytorch_model", float("inf")),
                              ("text_encoder", "model", float("nan"))):
        model = _damaged_copy(tmp_path / part, capsys)
        files = sorted((model / part).glob(f"{stem}*.safetensors"))
        state = load_file(str(files[0]))
        # A tensor the loader reads: the text encoder's loader skips the layers after the last tap.
        key = next(k for k, t in state.items() if t.ndim >= 2 and (part != "text_encoder" or "layers.0." in k))
        bad = state[key].clone()
        bad.view(-1)[0] = value
        save_file({**state, key: bad}, str(files[0]))
        err = _cli_error(capsys, "--model", str(model))
        assert "NaN or Inf" in err and str(files[0]) in err, err


def test_a_stage_that_makes_nan_is_named_instead_of_a_black_image():
    from kleinbild.pipeline import NonFiniteError

    _, folder = reference_pipeline("distilled", deep_text=True)
    pipe = KleinPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    for module, component in ((pipe.text_encoder.model.layers[0].mlp.down_proj, "text encoder"),
                              (pipe.transformer.final_layer.linear, "transformer"),
                              (pipe.autoencoder.decoder.conv_out, "decoder")):
        saved = module.weight.detach().clone()
        with torch.no_grad():
            module.weight[(0,) * module.weight.ndim] = float("nan")
        try:
            with pytest.raises(NonFiniteError, match=component):
                pipe.generate("a dot", width=64, height=64, steps=1, seed=0)
        finally:
            with torch.no_grad():
                module.weight.copy_(saved)
    pipe.clear_caches()
    assert np.asarray(pipe.generate("a dot", width=64, height=64, steps=1, seed=0).images[0]).std() > 0


def test_a_lone_nano_transformer_file_asks_for_its_text_encoder_without_an_empty_placeholder(capsys):
    from kleinbild.config import get_preset
    from kleinbild.loading import bundled_dir

    dit = bundled_dir(get_preset("nano")) / "flux-2-nano.safetensors"
    err = _cli_error(capsys, "--model", str(dit))
    assert err.endswith("pass --text-encoder with a Qwen3 folder") and "()" not in err and " of )" not in err
