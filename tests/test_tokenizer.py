"""PromptTokenizer against transformers' AutoTokenizer on a small tokenizer in the Qwen3 checkpoint layout."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from fixtures import QWEN3_CHAT_TEMPLATE, make_tiny_tokenizer

from kleinbild.tokenizer import PromptTokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "",
    "A red cat sleeps on a hill at dawn, oil painting.",
    "Ünïcödé café, nai\u0308ve résumé (NFC!), 日本語の猫, emoji 🐱🚀👩‍🚀 and ∑∫≠",
    "line one\nline two\n\n    indented\ttab\r\nwindows line\n",
    "tokens in the text: <|im_end|> <think> {{ not_a_variable }} {% raw %}",
    "a golden dragon floats above an ancient castle in the rain, watercolor. " * 12,
]
MAX_LENGTHS = (48, 64)


@pytest.fixture(scope="module", params=[("config", "right"), ("jinja", "right"), ("config", "left"), ("jinja", "left")])
def pair(request, tmp_path_factory) -> tuple[PromptTokenizer, object]:
    where, side = request.param
    path = make_tiny_tokenizer(
        tmp_path_factory.mktemp(f"tok-{where}-{side}"), template_in_jinja_file=where == "jinja", padding_side=side
    )
    return PromptTokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)


def _hf_render(hf, prompt: str) -> str:
    return hf.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )


@pytest.mark.parametrize("prompt", PROMPTS)
def test_render_matches_transformers(pair, prompt: str) -> None:
    ours, hf = pair
    text = ours.render(prompt)
    assert text == _hf_render(hf, prompt)
    assert text == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.mark.parametrize("max_length", MAX_LENGTHS)
def test_encode_matches_transformers(pair, max_length: int) -> None:
    ours, hf = pair
    ids, mask = ours.encode(PROMPTS, max_length)
    assert ids.dtype == mask.dtype == torch.int64
    assert ids.shape == mask.shape == (len(PROMPTS), max_length)
    # One call per prompt, exactly as the reference pipeline tokenises.
    for row, prompt in enumerate(PROMPTS):
        ref = hf(
            _hf_render(hf, prompt), return_tensors="pt", padding="max_length", truncation=True, max_length=max_length
        )
        assert ids[row].tolist() == ref["input_ids"][0].tolist(), prompt
        assert mask[row].tolist() == ref["attention_mask"][0].tolist(), prompt
    # The batch really exercises both padding and truncation, on the configured side.
    assert mask[0].sum() < max_length and mask[-1].sum() == max_length
    pad_at = 0 if ours.padding_side == "left" else -1
    assert ids[0, pad_at] == ours.pad_token_id and mask[0, pad_at] == 0
    im_start = hf.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1, 0] == im_start  # truncated on the right: the chat header survives


def test_batched_transformers_call_agrees(pair) -> None:
    ours, hf = pair
    ref = hf(
        [_hf_render(hf, p) for p in PROMPTS], return_tensors="pt", padding="max_length", truncation=True, max_length=40
    )
    ids, mask = ours.encode(PROMPTS, 40)
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


def test_jinja_file_takes_precedence(tmp_path: Path) -> None:
    path = make_tiny_tokenizer(tmp_path, template_in_jinja_file=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ 'wrong template' }}"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = PromptTokenizer.from_dir(path)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert ours.chat_template == QWEN3_CHAT_TEMPLATE
    assert ours.render("hi") == _hf_render(hf, "hi")
    assert "wrong" not in ours.render("hi")


def test_template_sees_special_tokens_and_helpers(tmp_path: Path) -> None:
    # Variables and helpers transformers provides to templates: the named special tokens, namespace,
    # loop controls, the json.dumps-style tojson filter and {% generation %} blocks.
    # The line breaks and indentation check trim_blocks / lstrip_blocks.
    template = (
        "{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "    {% if m.role == 'x' %}{% continue %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "  {% generation %}{{ eos_token }}|{{ pad_token }}|{{ m | tojson }}\n"
        "  {% endgeneration %}\n"
        "{% endfor %}\n"
        "{{ ns.n }} {{ bos_token is defined }} {{ enable_thinking }} {{ add_generation_prompt }}\n"
    )
    path = make_tiny_tokenizer(tmp_path)
    (path / "chat_template.jinja").write_text(template)
    ours = PromptTokenizer.from_dir(path)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    for prompt in ('<b>&"quoted"</b> ✓', ""):
        assert ours.render(prompt) == _hf_render(hf, prompt)


def test_raise_exception_in_template(tmp_path: Path) -> None:
    import jinja2

    path = make_tiny_tokenizer(tmp_path)
    (path / "chat_template.jinja").write_text("{{ raise_exception('no user turns allowed') }}")
    with pytest.raises(jinja2.TemplateError, match="no user turns allowed"):
        PromptTokenizer.from_dir(path).render("x")


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        PromptTokenizer.from_dir(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty.*tokenizer\.json is missing"):
        PromptTokenizer.from_dir(empty)
    full = make_tiny_tokenizer(tmp_path / "full")
    (full / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is missing"):
        PromptTokenizer.from_dir(full)


def test_missing_template_and_pad_token(tmp_path: Path) -> None:
    path = make_tiny_tokenizer(tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    no_template = {k: v for k, v in config.items() if k != "chat_template"}
    (path / "tokenizer_config.json").write_text(json.dumps(no_template))
    with pytest.raises(ValueError, match="no chat template"):
        PromptTokenizer.from_dir(path)
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": None}))
    with pytest.raises(ValueError, match="pad_token"):
        PromptTokenizer.from_dir(path)


def test_src_does_not_import_transformers() -> None:
    src = Path(__file__).resolve().parents[1] / "src" / "kleinbild"
    for name in ("tokenizer.py", "text_encoder.py"):
        tree = ast.parse((src / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not roots & {"transformers", "diffusers"}, f"{name} imports {roots}"
