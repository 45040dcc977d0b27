"""tools/gpu_train.py, the time-boxed driver run on a GPU machine, run here on the CPU at toy sizes.

A failure on the GPU machine wastes its time, so the driver's code paths are checked on the CPU first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kleinbild.config import get_preset
from kleinbild.loading import bundled_dir

ROOT = Path(__file__).resolve().parents[1]
NANO = get_preset("nano")
WEIGHTS = bundled_dir(NANO)
pytestmark = pytest.mark.skipif(not (WEIGHTS / NANO.dit_file).is_file(), reason="bundled nano weights not built")


def _carried(root: Path) -> Path:
    """The `.gpu` folder as tools/gpu_prepare.sh builds it from the package's files on the GPU machine."""
    subprocess.run(["bash", str(ROOT / "tools" / "gpu_prepare.sh"), str(root / ".gpu")], cwd=ROOT, check=True)
    return root / ".gpu"


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_train.py"), "--src", str(tmp_path / ".gpu"), "--device", "cpu",
           "--workers", "1", *extra]
    env = {"OUT": str(tmp_path / "out"), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_distillation_alone_returns_a_student_of_the_carried_base(tmp_path):
    student = _carried(tmp_path) / "student.safetensors"
    res = _run(tmp_path, "--base-seconds", "0", "--distill-steps", "2", "--distill-chunks", "1", "--distill-batch",
               "2", "--distill-seed", "5", "--distill-lr", "3e-5", "--student-init", str(student), "--eval-n", "0")
    assert res.returncode == 0, res.stderr[-2000:]
    log = (tmp_path / "out" / "train.log").read_text()
    assert "seed=5" in log and "lr=3e-05" in log and "calibration" not in log
    got = load_file(str(tmp_path / "out" / "nano_dit.safetensors"))
    start = load_file(str(WEIGHTS / "flux-2-nano.safetensors"))
    assert got.keys() == start.keys()
    assert any(not (got[k] == start[k]).all() for k in got)  # it trained: the EMA moved off the start
    base = load_file(str(WEIGHTS / "flux-2-nano-base.safetensors"))
    off = {name: sum((got[k].float() - w[k].float()).abs().sum().item() for k in got) for name, w in
           (("start", start), ("base", base))}
    assert off["start"] < off["base"] / 10  # it went on from --student-init, not from the teacher


def test_distillation_alone_needs_a_step_count(tmp_path):
    _carried(tmp_path)
    res = _run(tmp_path, "--base-seconds", "0", "--eval-n", "0")
    assert res.returncode != 0 and "--distill-steps" in res.stderr
