"""Small stand-ins for the real checkpoints, shared by the tests: a Qwen-layout tokenizer and Qwen3 configs.

Only `tokenizers` is needed to build them; transformers is used by the tests that compare against it.
"""

from __future__ import annotations

import random
from pathlib import Path

from kleinbild.tokenizer import QWEN3_CHAT_TEMPLATE, train_qwen_style_tokenizer  # noqa: E402,F401

_WORDS = {
    "adj": "red small quiet golden misty ancient bright tiny wooden frozen glowing lonely".split(),
    "noun": "cat lighthouse forest robot river castle garden dragon city mountain teapot violin".split(),
    "verb": "stands sleeps glows waits floats shines rests sings".split(),
    "place": "by the sea|under a full moon|in the rain|on a hill|at dawn|inside a museum".split("|"),
    "style": "oil painting|photo, 35mm|watercolor|pixel art|studio lighting".split("|"),
}


def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(1234)
    lines = []
    for i in range(n):
        w = {k: rng.choice(v) for k, v in _WORDS.items()}
        lines.append(f"A {w['adj']} {w['noun']} {w['verb']} {w['place']}, {w['style']}. It's scene {i}, isn't it?")
    return lines


def make_tiny_tokenizer(
    out_dir: Path, *, template_in_jinja_file: bool = False, padding_side: str = "right"
) -> Path:
    """A small byte-level BPE tokenizer in the layout of a Qwen3 checkpoint's tokenizer folder."""
    return train_qwen_style_tokenizer(
        _corpus(), out_dir, vocab_size=600, template_in_jinja_file=template_in_jinja_file, padding_side=padding_side
    )


def tiny_qwen3_config(vocab_size: int, num_layers: int = 4, hidden: int = 64) -> dict:
    """A transformers Qwen3 config dict with the proportions of the real ones (GQA, separate head_dim)."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 96,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1_000_000.0, "rope_type": "default"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }
