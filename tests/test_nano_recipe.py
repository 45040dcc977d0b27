"""The recipe of the shipped nano weights (tools/nano_recipe.sh): its commands parse, and what it takes from the
repository's history is there and matches what the package ships."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from kleinbild.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "nano_recipe.sh"
WEIGHTS = "src/kleinbild/weights/nano"


def _commands() -> list[list[str]]:
    text = SCRIPT.read_text().replace("\\\n", " ")
    found = [line.split("kleinbild train ", 1)[1].split(";")[0] for line in text.splitlines()
             if "kleinbild train " in line and not line.lstrip().startswith("#")]
    return [["train", *shlex.split(c)] for c in found]


def _start() -> str:
    return re.search(r"START=\$\{START:-(\w+)\}", SCRIPT.read_text()).group(1)


def _at_start(path: str) -> bytes | None:
    out = subprocess.run(["git", "-C", str(ROOT), "show", f"{_start()}:{path}"], capture_output=True)
    return out.stdout if out.returncode == 0 else None


def test_recipe_commands_parse_with_six_weight_mixes():
    commands = _commands()
    assert [c[1] for c in commands] == ["base", "distill", "bundle"]
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)  # exits on an unknown flag or a bad value
        if args.stage != "bundle":
            assert len(args.mix) == 6 and args.mix[5] > 0  # plain captions are in the batches
            assert args.init and args.lr and args.steps


def test_recipe_starts_from_the_history_and_keeps_its_tokenizer_and_autoencoder():
    if _at_start(f"{WEIGHTS}/ae.safetensors") is None:
        pytest.skip(f"commit {_start()} is not in this clone (shallow?)")
    for name in ("flux-2-nano-base.safetensors", "flux-2-nano.safetensors", "text_encoder/model.safetensors"):
        assert _at_start(f"{WEIGHTS}/{name}")
    # The recipe trains neither: the shipped files must be the ones it started from.
    for name in ("ae.safetensors", "text_encoder/tokenizer.json", "text_encoder/tokenizer_config.json",
                 "text_encoder/config.json"):
        assert _at_start(f"{WEIGHTS}/{name}") == (ROOT / WEIGHTS / name).read_bytes(), name
