"""Training stages: each runs, checkpoints, resumes where it stopped, and exports loadable weights."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from kleinbild import sampling
from kleinbild.config import get_preset
from kleinbild.nano import distill, train
from kleinbild.pipeline import KleinPipeline
from kleinbild.transformer import Flux2Transformer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder taken through every stage for a handful of steps."""
    run = tmp_path_factory.mktemp("run")
    say = lambda msg: None  # noqa: E731
    tok = train.train_tokenizer(run / "tokenizer", seed=0, n_texts=3000, say=say)
    preset = get_preset("nano-base")
    preset = replace(preset, text=replace(preset.text, vocab_size=tok.vocab_size))
    train.train_autoencoder(run, preset, train.AEArgs(steps=2, batch=2, save_every=1), say=say)
    train.train_base(run, preset, train.FlowArgs(steps=2, batch=2, save_every=1), say=say)
    distill.train_distill(
        run, preset, distill.DistillArgs(chunks=2, batch=2, substeps=1, steps=2, save_every=1), say=say
    )
    return run, preset


def test_stages_write_checkpoints_and_weights(run):
    folder, _ = run
    for part in ("ae/ckpt.pt", "ae/ae.safetensors", "base/ckpt.pt", "base/dit.safetensors",
                 "base/text_encoder/model.safetensors", "base/text_encoder/tokenizer.json",
                 "distill/ckpt.pt", "distill/dit.safetensors", "distill/traj/00000.pt"):
        assert (folder / part).is_file(), part
    states = torch.load(folder / "distill" / "traj" / "00000.pt", weights_only=True)
    assert states.shape[:2] == (2, 5)  # 2 examples, noise + one state per student step


def test_resume_continues_from_the_checkpoint(run):
    folder, preset = run
    before = torch.load(folder / "base" / "ckpt.pt", weights_only=True)
    assert before["step"] == 2
    lines: list[str] = []
    train.train_base(folder, preset, train.FlowArgs(steps=3, batch=2, save_every=1), say=lines.append)
    assert "base: resumed at step 2" in lines
    after = torch.load(folder / "base" / "ckpt.pt", weights_only=True)
    assert after["step"] == 3
    changed = [k for k in before["dit"] if not torch.equal(before["dit"][k], after["dit"][k])]
    assert changed, "the resumed step trained the model"


def test_stop_at_keeps_the_schedule_and_checkpoints(run):
    folder, preset = run
    lines: list[str] = []
    start = torch.load(folder / "base" / "ckpt.pt", weights_only=True)["step"]
    args = train.FlowArgs(steps=50, stop_at=start + 1, batch=2, save_every=100, mix=(0, 0, 0, 1))
    train.train_base(folder, preset, args, say=lines.append)
    assert torch.load(folder / "base" / "ckpt.pt", weights_only=True)["step"] == start + 1
    assert f"base: done at step {start + 1}" in lines


def test_drill_batches_are_one_or_two_objects_in_one_phrasing():
    import random

    from kleinbild.nano import shapes

    counts = set()
    for seed in range(4):
        b = train.sample_batch(random.Random(seed), 6, (0, 0, 0, 1))
        assert b.kind == "drill"
        for prompt, target in zip(b.prompts, b.targets, strict=True):
            counts.add(len(target.objects))
            objs = " and ".join(f"a {o.size} {o.colour} {o.shape} at the {o.position}" for o in target.objects)
            assert prompt == f"{objs} on a {target.background} background"
            assert not shapes.is_eval_scene(target), "drills never show evaluation scenes"
    assert counts == {1, 2}


def test_training_data_is_reproducible_from_the_seed():
    import random

    a = train.sample_batch(random.Random(5), 4, (0.5, 0.3, 0.2))
    b = train.sample_batch(random.Random(5), 4, (0.5, 0.3, 0.2))
    assert a == b
    assert train.sample_batch(random.Random(6), 4, (0.5, 0.3, 0.2)) != a


def test_bundle_loads_as_a_pipeline(run, tmp_path):
    folder, preset = run
    dest = train.export_bundle(folder, tmp_path / "nano", say=lambda m: None)
    assert {p.name for p in dest.iterdir()} >= {"flux-2-nano.safetensors", "flux-2-nano-base.safetensors",
                                               "ae.safetensors", "text_encoder"}
    pipe = KleinPipeline.from_pretrained(dest / "flux-2-nano.safetensors", vae=dest / "ae.safetensors",
                                         text_encoder=dest / "text_encoder", preset="nano", dtype="float32")
    out = pipe.generate("a small red circle at the top left on a blue background", seed=0)
    assert out.images[0].size == (128, 128) and out.settings["steps"] == 4


def test_bundle_goes_to_the_package_weights_by_default():
    from kleinbild.loading import bundled_dir

    assert train.bundle_dir() == bundled_dir(get_preset("nano"))


def test_worker_batches_train_like_the_cached_ones(run, tmp_path):
    """Batches drawn by DataLoader workers (pixels rendered there, latents encoded per step) train the same model
    as the in-process path with its latent cache; --init starts both from the same weights."""
    import shutil

    folder, preset = run
    states = []
    for workers in (0, 2):
        copy = tmp_path / f"w{workers}"
        for part in ("tokenizer", "ae"):
            shutil.copytree(folder / part, copy / part)
        args = train.FlowArgs(steps=2, batch=3, save_every=10, workers=workers, init=str(folder / "base"),
                              mix=(0.3, 0.4, 0.3))
        lines: list[str] = []
        train.train_base(copy, preset, args, say=lines.append)
        assert f"base: starting from the weights in {folder / 'base'}" in lines
        states.append(torch.load(copy / "base" / "ckpt.pt", weights_only=True))
    start = train.load_file(str(folder / "base" / "dit.safetensors"))
    a, b = states
    assert a["step"] == b["step"] == 2
    for k, v in a["dit"].items():
        torch.testing.assert_close(v, b["dit"][k], atol=2e-5, rtol=1e-4)
    moved = sum(not torch.equal(v.to(start[k].dtype), start[k]) for k, v in a["dit"].items())
    assert moved > 0, "two steps from the init changed the weights"


def test_init_folder_must_hold_the_weights(run, tmp_path):
    import shutil

    folder, preset = run
    for part in ("tokenizer", "ae"):
        shutil.copytree(folder / part, tmp_path / part)
    with pytest.raises(FileNotFoundError, match="dit.safetensors"):
        train.train_base(tmp_path, preset, train.FlowArgs(steps=1, batch=2, init=str(tmp_path / "nowhere")),
                         say=lambda m: None)


def test_loose_batches_leave_attributes_out():
    import random

    from kleinbild.nano import shapes

    left_out = {"size": 0, "position": 0}
    for seed in range(6):
        b = train.sample_batch(random.Random(seed), 8, (0, 0, 0, 0, 1))
        assert b.kind == "loose"
        for prompt, target in zip(b.prompts, b.targets, strict=True):
            assert not shapes.is_eval_scene(target)
            words = prompt.split()
            sizes = [w for w in words if w in ("small", "little", "big", "large")]
            has_pos = any(w in words for w in ("top", "bottom", "left", "right", "centre", "middle"))
            left_out["size"] += len(sizes) < len(target.objects)
            left_out["position"] += not has_pos
            for o in target.objects:
                assert f"{o.colour} {o.shape}" in prompt
            assert len(sizes) < len(target.objects) or not has_pos or len(target.objects) == 2, prompt
    assert left_out["size"] > 5 and left_out["position"] > 5


def test_decoder_only_keeps_the_encoder_and_latent_space(run, tmp_path):
    folder, preset = run
    start = folder / "ae" / "ae.safetensors"
    before = load_file(str(start))
    args = train.AEArgs(steps=3, batch=2, crop=32, save_every=100, init=str(start), decoder_only=True, lr=1e-2)
    train.train_autoencoder(tmp_path, preset, args, say=lambda m: None)
    after = load_file(str(tmp_path / "ae" / "ae.safetensors"))
    assert after.keys() == before.keys()
    kept = [k for k in before if not k.startswith("decoder.")]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept), "encoder or latent statistics changed"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    with pytest.raises(ValueError, match="--init"):
        train.train_autoencoder(tmp_path / "x", preset, replace(args, init=""), say=lambda m: None)
    with pytest.raises(FileNotFoundError, match="no-such.safetensors"):
        train.train_autoencoder(tmp_path / "y", preset, replace(args, init="no-such.safetensors"), say=lambda m: None)


@torch.no_grad()
def test_grown_dit_starts_as_the_smaller_one():
    from kleinbild.transformer import Flux2Transformer

    cfg = get_preset("nano").dit
    torch.manual_seed(0)
    small = Flux2Transformer(replace(cfg, depth_single=2)).eval()
    for p in small.parameters():  # random everywhere, so every block matters to the output
        p.copy_(torch.randn(p.shape) * 0.1)
    big = Flux2Transformer(replace(cfg, depth_single=4)).eval()
    assert train.load_dit_grown(big, small.state_dict()) == 2
    assert not any(torch.equal(b.linear1.weight, torch.zeros_like(b.linear1.weight)) for b in big.single_blocks[2:])
    img, txt = torch.randn(2, 16, cfg.in_channels), torch.randn(2, 5, cfg.context_dim)
    iid = torch.zeros(2, 16, 4, dtype=torch.long)
    iid[..., 1], iid[..., 2] = torch.arange(16) // 4, torch.arange(16) % 4
    tid = torch.zeros(2, 5, 4, dtype=torch.long)
    tid[..., 3] = torch.arange(5)
    t = torch.tensor([0.9, 0.3])
    torch.testing.assert_close(big(img, iid, txt, tid, t), small(img, iid, txt, tid, t), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="only single-stream blocks"):
        train.load_dit_grown(Flux2Transformer(replace(cfg, depth=4)), small.state_dict())
    with pytest.raises(ValueError, match="lacks"):
        train.load_dit_grown(Flux2Transformer(replace(cfg, depth_single=1)), small.state_dict())


def test_cli_mix_reaches_the_stage_and_bad_mixes_are_refused(monkeypatch, tmp_path, capsys):
    from kleinbild.cli import main

    seen = []
    monkeypatch.setattr(train, "train_base", lambda run, preset, args, say: seen.append(args))
    monkeypatch.setattr(distill, "train_distill", lambda run, preset, args, say: seen.append(args))
    assert main(["train", "base", "--run", str(tmp_path), "--mix", "0.2,0.6,0.1,0.05,0.05", "--lr", "1e-4"]) == 0
    assert seen[-1].mix == (0.2, 0.6, 0.1, 0.05, 0.05) and seen[-1].lr == 1e-4
    assert main(["train", "distill", "--run", str(tmp_path), "--mix", "0,1,0"]) == 0
    assert isinstance(seen[-1], distill.DistillArgs) and seen[-1].mix == (0.0, 1.0, 0.0)
    assert main(["train", "distill", "--run", str(tmp_path), "--on-policy", "0.5"]) == 0
    assert seen[-1].on_policy == 0.5
    assert main(["train", "distill", "--run", str(tmp_path), "--plain-substeps", "4"]) == 0
    assert seen[-1].plain_substeps == 4 and seen[-1].substeps == 1
    assert main(["train", "distill", "--run", str(tmp_path), "--image-guidance", "0"]) == 0
    assert seen[-1].image_guidance == 0.0  # passed on, so make_trajectories refuses it rather than using the default
    assert main(["train", "base", "--run", str(tmp_path)]) == 0
    assert seen[-1].mix == train.FlowArgs().mix
    for bad in ("0.5,0.5", "a,b,c", "0,0,0", "-1,1,1"):
        with pytest.raises(SystemExit) as e:
            main(["train", "base", "--run", str(tmp_path), f"--mix={bad}"])
        assert e.value.code == 2
        assert f"got {bad!r}" in capsys.readouterr().err


def _trajectories(run, tmp, preset, **kw):
    folder = tmp / "_".join(f"{k}{v}" for k, v in kw.items())
    (folder / "base").mkdir(parents=True)
    for part in ("tokenizer", "ae", "base/text_encoder"):
        (folder / part).symlink_to(run / part)
    # The run's base trained for two steps from zeroed output layers and barely reacts to anything; random weights do.
    save_file(_random_dit(preset, 0).state_dict(), str(folder / "base" / "dit.safetensors"))
    args = distill.DistillArgs(chunks=1, batch=2, substeps=1, **kw)
    distill.make_trajectories(folder, preset, args, get_preset("nano"), say=lambda msg: None)
    return torch.load(folder / "distill" / "traj" / "00000.pt", weights_only=True)


def test_image_guidance_changes_only_batches_with_references(run, tmp_path):
    folder, preset = run
    edit = dict(mix=(0.0, 1.0, 0.0))
    plain = _trajectories(folder, tmp_path, preset, image_guidance=1.0, **edit)
    guided = _trajectories(folder, tmp_path, preset, image_guidance=1.5, **edit)
    assert torch.equal(plain[:, 0], guided[:, 0])  # same noise
    assert not torch.allclose(plain[:, 1:].float(), guided[:, 1:].float())
    t2i = dict(mix=(1.0, 0.0, 0.0))
    assert torch.equal(_trajectories(folder, tmp_path, preset, image_guidance=1.0, **t2i),
                       _trajectories(folder, tmp_path, preset, image_guidance=1.5, **t2i))
    with pytest.raises(ValueError, match="image_guidance must be > 0"):
        _trajectories(folder, tmp_path, preset, image_guidance=0.0)


def test_plain_substeps_refine_only_the_free_captions(run, tmp_path):
    folder, preset = run
    plain, t2i = dict(mix=(0.0, 0.0, 0.0, 0.0, 0.0, 1.0)), dict(mix=(1.0, 0.0, 0.0))
    coarse = _trajectories(folder, tmp_path, preset, plain_substeps=1, **plain)
    fine = _trajectories(folder, tmp_path, preset, plain_substeps=3, **plain)
    assert coarse.shape == fine.shape  # still one state per student step
    assert torch.equal(coarse[:, 0], fine[:, 0])  # same noise
    assert not torch.allclose(coarse[:, 1:].float(), fine[:, 1:].float())
    assert torch.equal(_trajectories(folder, tmp_path, preset, plain_substeps=1, **t2i),
                       _trajectories(folder, tmp_path, preset, plain_substeps=3, **t2i))


def _random_dit(preset, seed):
    torch.manual_seed(seed)
    return Flux2Transformer(preset.dit).float().eval().requires_grad_(False)


def test_on_policy_states_are_the_students_and_targets_the_teachers(run):
    """States come from the rollout model's own Euler steps; the target is the guided teacher at those states."""
    folder, preset = run
    tok, ae = train._load_run_models(folder, preset)
    _, te = distill._teacher(folder, preset, torch.device("cpu"))
    cond = train.Conditioner(tok, te, ae, preset, 128)
    student, teacher = _random_dit(preset, 1), _random_dit(preset, 2)  # random weights react to their inputs
    hw, ch = 128 // preset.ae.downscale, preset.ae.latent_channels
    nano = get_preset("nano")
    ts = torch.tensor(sampling.schedule(nano.default_steps, hw * hw, nano.schedule_shift))
    img_ids, txt_ids = sampling.image_ids(hw, hw), sampling.text_ids(preset.text.max_length)
    args = distill.DistillArgs(batch=6, mix=(0.0, 1.0, 0.0), image_guidance=1.5, seed=3)

    def draw(step):
        return distill._on_policy_batch(args, step, student, teacher, cond, ts, img_ids, txt_ids, hw, ch,
                                        torch.device("cpu"))

    b, x, i, target, txt, ref_tok, ref_ids = draw(7)
    assert len(set(i.tolist())) > 1 and ref_tok is not None
    noise = torch.randn((6, hw * hw, ch), generator=torch.Generator().manual_seed(3 * 11_000_027 + 7))
    states = [noise]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for k in range(int(i.max())):
            v = student(states[-1], img_ids, txt, txt_ids, ts[k].repeat(6), ref=ref_tok, ref_ids=ref_ids).float()
            states.append(states[-1] + float(ts[k + 1] - ts[k]) * v)
        for j, k in enumerate(i.tolist()):
            assert torch.allclose(x[j], states[k][j], atol=1e-5), (j, k)
            empty = cond.text([""])
            one = dict(ref=ref_tok[j:j + 1], ref_ids=ref_ids)
            xj, tj = x[j:j + 1], ts[k:k + 1]
            v_text = teacher(xj, img_ids, txt[j:j + 1], txt_ids, tj, **one).float()
            v_ref = teacher(xj, img_ids, empty, txt_ids, tj, **one).float()
            v_bare = teacher(xj, img_ids, empty, txt_ids, tj).float()
            want = v_bare + 1.5 * (v_ref - v_bare) + 2.0 * (v_text - v_ref)
            assert (target[j] - want[0]).norm() / want.norm() < 2e-2, (j, k)  # bf16, batched vs one at a time
    again = draw(7)
    assert torch.equal(again[1], x) and torch.equal(again[3], target)
    assert not torch.equal(draw(8)[1], x)


def test_on_policy_distillation_trains_and_bad_fractions_are_refused(run, tmp_path):
    folder, preset = run
    for part in ("tokenizer", "ae", "base"):
        (tmp_path / part).symlink_to(folder / part)
    # A random student: the run's two-step base barely reacts, so as its own student its loss would be ~0.
    save_file(_random_dit(preset, 1).state_dict(), str(tmp_path / "student.safetensors"))
    args = distill.DistillArgs(chunks=1, batch=2, steps=2, save_every=1, on_policy=1.0,
                               init=str(tmp_path / "student.safetensors"))
    lines: list[str] = []
    distill.train_distill(tmp_path, preset, args, say=lines.append)
    assert "distill: done at step 2" in lines
    ck = torch.load(tmp_path / "distill" / "ckpt.pt", weights_only=True)
    start = load_file(str(tmp_path / "student.safetensors"))
    assert any(not torch.equal(ck["dit"][k], start[k]) for k in start), "the student trained"
    with pytest.raises(ValueError, match="on_policy is a fraction"):
        distill.train_distill(tmp_path / "bad", preset, replace(args, on_policy=1.5), say=lines.append)
    assert not (tmp_path / "bad").exists()  # refused before any trajectory was recorded
