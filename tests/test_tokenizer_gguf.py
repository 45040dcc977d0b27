"""The GGUF-built prompt tokenizer against PromptTokenizer.from_dir on the same Qwen-style tokenizer.

The GGUF is written the way llama.cpp's convert_hf_to_gguf.py writes a Qwen3 checkpoint's tokenizer
(`Qwen2Model.set_vocab` -> `_set_vocab_gpt2`): `get_vocab_base` for the tokens and their types, then gguf-py's
`SpecialVocab(dir, load_merges=True).add_to_gguf` for the merges, special ids, add_bos_token and chat template.
"""

from __future__ import annotations

import json
import logging
import shutil
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import torch

from kleinbild.tokenizer import QWEN3_CHAT_TEMPLATE, PromptTokenizer
from kleinbild.tokenizer_gguf import read_metadata, tokenizer_from_gguf, tokenizer_from_metadata

gguf = pytest.importorskip("gguf")
from kleinbild.bench.gguf_write import looks_special, vocab_base, write_tokenizer_gguf  # noqa: E402

NANO = Path(__file__).resolve().parents[1] / "src" / "kleinbild" / "weights" / "nano" / "text_encoder"
# Larger than the tokenizer's 547 ids, as Qwen3-4B's embedding (151936 rows) is larger than its 151669 tokens.
MODEL_VOCAB = 600

PROMPTS = [
    "A red cat sleeps on a hill at dawn, oil painting.",
    "Wait... what?! top-left, bottom-right (yes); no: 'quoted' \"double\" - em—dash, #hash @at $5.99 100%",
    "digits 0 1 2 3 4 5 6 7 8 9 and numbers 12345, 3.14159, 1,000,000 and 2024-06-01",
    "multiple   spaces     here\t\ttabs  ",
    "line one\nline two\n\n    indented\r\nwindows\n\n\n",
    "Ünïcödé café, nai\u0308ve résumé (NFC!), 日本語の猫, emoji 🐱🚀👩‍🚀 and ∑∫≠ ß ﬁ",
    "special tokens in the text: <|im_end|> <think> </think> <|endoftext|><tool_call> <|fim_prefix|> [PAD560]",
    "the user's dog's ball, they'LL SAY 'RE and 'Ve",
    "",
    "a golden dragon floats above an ancient castle in the rain, watercolor. " * 12,
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The nano tokenizer with a Qwen3-style config.json (padded vocab, bos/eos ids as Qwen3-4B sets them)."""
    folder = tmp_path_factory.mktemp("qwen3-like")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(NANO / name, folder / name)
    config = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": MODEL_VOCAB, "bos_token_id": 521}
    config["eos_token_id"] = 523
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def gguf_file(checkpoint, tmp_path_factory) -> Path:
    return write_tokenizer_gguf(checkpoint, tmp_path_factory.mktemp("gguf") / "vocab.gguf", MODEL_VOCAB)


@pytest.fixture(scope="module")
def meta(gguf_file) -> dict[str, Any]:
    return read_metadata(gguf.GGUFReader(gguf_file))


@pytest.fixture(scope="module")
def pair(checkpoint, gguf_file) -> tuple[PromptTokenizer, PromptTokenizer]:
    return tokenizer_from_gguf(gguf_file), PromptTokenizer.from_dir(checkpoint)


def test_metadata_is_plain_python(meta) -> None:
    assert not any(k.startswith("GGUF.") for k in meta)
    assert meta["general.architecture"] == "qwen3"
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == MODEL_VOCAB and tokens[-1] == f"[PAD{MODEL_VOCAB - 1}]"
    assert all(type(t) is str for t in tokens) and all(type(t) is int for t in types)
    assert types[523] == gguf.TokenType.CONTROL and tokens[523] == "<|im_end|>"
    # not special in the checkpoint, but CONTROL in the GGUF because it looks special
    assert tokens[537] == "<|fim_prefix|>" and types[537] == gguf.TokenType.CONTROL
    assert tokens[546] == "</think>" and types[546] == gguf.TokenType.USER_DEFINED
    assert meta["tokenizer.ggml.add_bos_token"] is False
    # bos comes from config.json, as for Qwen3, although the tokenizer has no bos_token
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (521, 523)
    assert meta["tokenizer.ggml.padding_token_id"] == 521
    assert isinstance(meta["tokenizer.ggml.merges"][0], str) and " " in meta["tokenizer.ggml.merges"][0]


def test_writer_matches_convert_hf_to_gguf(checkpoint) -> None:
    """The test's get_vocab_base against the converter's own code path through transformers' AutoTokenizer."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(checkpoint)
    reverse = {i: t for t, i in hf.vocab.items()}
    added, decoder = hf.get_added_vocab(), hf.added_tokens_decoder
    expected = [(f"[PAD{i}]", gguf.TokenType.UNUSED) for i in range(MODEL_VOCAB)]
    for i, token in reverse.items():
        if token not in added:
            expected[i] = (token, gguf.TokenType.NORMAL)
            continue
        if not decoder[i].normalized:
            token = hf.decode(hf.encode(token, add_special_tokens=False))
        special = decoder[i].special or looks_special(token)
        expected[i] = (token, gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    assert list(zip(*vocab_base(checkpoint, MODEL_VOCAB), strict=True)) == expected


@pytest.mark.parametrize("max_length", [16, 64, 200])
def test_encode_matches_from_dir(pair, max_length: int) -> None:
    ours, ref = pair
    ids, mask = ours.encode(PROMPTS, max_length)
    ref_ids, ref_mask = ref.encode(PROMPTS, max_length)
    assert ids.shape == mask.shape == (len(PROMPTS), max_length)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(mask, ref_mask)
    if max_length == 64:  # the long prompt is cut, the short ones padded with <|endoftext|>
        assert mask[-1].all() and not mask[0].all()
        assert int(ids[0, -1]) == ours.pad_token_id == 521


def test_tokenizer_properties_match_from_dir(pair) -> None:
    ours, ref = pair
    assert ours.vocab_size == ref.vocab_size == 547
    assert (ours.pad_token, ours.padding_side, ours.truncation_side) == (ref.pad_token, "right", "right")
    assert ours._template_variables == ref._template_variables
    assert ours._template_variables == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert ours.chat_template == ref.chat_template == QWEN3_CHAT_TEMPLATE
    for prompt in PROMPTS:
        assert ours.render(prompt) == ref.render(prompt)
    # byte-level decoding gives the rendered text back (in NFC), added tokens included
    short = PROMPTS[:-1]
    ids, mask = ours.encode(short, 200)
    for prompt, row, keep in zip(short, ids, mask, strict=True):
        text = ours._tokenizer.decode(row[keep == 1].tolist(), skip_special_tokens=False)
        assert text == unicodedata.normalize("NFC", ours.render(prompt))


def test_missing_chat_template_falls_back_to_qwen3(meta, caplog) -> None:
    rest = {k: v for k, v in meta.items() if k != "tokenizer.chat_template"}
    with caplog.at_level(logging.WARNING, logger="kleinbild.tokenizer_gguf"):
        tok = tokenizer_from_metadata(rest, "x.gguf")
    assert tok.chat_template == QWEN3_CHAT_TEMPLATE
    assert "x.gguf" in caplog.text and "chat_template" in caplog.text


def test_add_bos_token_prepends_bos(meta, pair) -> None:
    tok = tokenizer_from_metadata({**meta, "tokenizer.ggml.add_bos_token": True}, "x.gguf")
    ids, _ = tok.encode(["hi"], 32)
    assert int(ids[0, 0]) == 521 and torch.equal(ids[0, 1:], pair[1].encode(["hi"], 31)[0][0])
    assert tok._template_variables["bos_token"] == "<|endoftext|>"


def test_pad_token_override(meta, pair) -> None:
    """unsloth's Qwen3 uploads pad with <|vision_pad|>; the reference pads with <|endoftext|>."""
    vision = {**meta, "tokenizer.ggml.padding_token_id": 532}
    assert tokenizer_from_metadata(vision, "x.gguf").pad_token == "<|vision_pad|>"
    fixed = tokenizer_from_metadata(vision, "x.gguf", pad_token="<|endoftext|>")
    assert torch.equal(fixed.encode(PROMPTS, 64)[0], pair[1].encode(PROMPTS, 64)[0])
    assert fixed._template_variables["pad_token"] == "<|endoftext|>"


def test_old_converters_user_defined_padding_is_skipped(meta, pair) -> None:
    types = [4 if t == 5 else t for t in meta["tokenizer.ggml.token_type"]]
    tok = tokenizer_from_metadata({**meta, "tokenizer.ggml.token_type": types}, "old.gguf")
    assert tok.vocab_size == 547
    assert torch.equal(tok.encode(PROMPTS, 64)[0], pair[1].encode(PROMPTS, 64)[0])


def test_added_tokens_inside_the_vocabulary_keep_their_ids() -> None:
    """A layout unlike Qwen's: an added token between BPE tokens, padding in the middle."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet[:3] + ["<|x|>", "[PAD4]"] + alphabet[3:] + ["ab", "<y>"]
    types = [1, 1, 1, 3, 5] + [1] * (len(alphabet) - 3) + [1, 4]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.padding_token_id": 3,
        "tokenizer.chat_template": "{{ messages[0]['content'] }}",
    }
    ids, mask = tokenizer_from_metadata(meta, "odd.gguf").encode(["ab<|x|><y>"], 5)
    assert ids.tolist() == [[len(tokens) - 2, 3, len(tokens) - 1, 3, 3]] and mask.tolist() == [[1, 1, 1, 0, 0]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer.ggml.model": "llama"}, "'llama'"),
        ({"tokenizer.ggml.pre": "unknown-pre"}, "'unknown-pre'"),
        ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.padding_token_id": None}, "tokenizer.ggml.padding_token_id"),
        ({"tokenizer.ggml.padding_token_id": MODEL_VOCAB - 1}, "no token"),
        ({"tokenizer.ggml.token_type": [1]}, "token types"),
        ({"tokenizer.ggml.merges": ["Ġ zzz"]}, "BPE"),
    ],
)
def test_errors_name_the_problem_and_the_file(meta, change: dict[str, Any], message: str) -> None:
    broken = {k: v for k, v in {**meta, **change}.items() if v is not None}
    with pytest.raises(ValueError, match="broken.gguf") as e:
        tokenizer_from_metadata(broken, "broken.gguf")
    assert message in str(e.value)
