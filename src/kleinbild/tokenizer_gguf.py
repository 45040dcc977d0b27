"""The prompt tokenizer of a llama.cpp GGUF text encoder, rebuilt from the file's own metadata.

llama.cpp's convert_hf_to_gguf.py (`_set_vocab_gpt2`, `get_vocab_base`, gguf-py's `SpecialVocab`) stores a Hugging
Face byte-level BPE tokenizer as:

- ``tokenizer.ggml.tokens``: every id below the model's vocab size in id order; byte-level strings ("Ġcat") for the
  BPE vocabulary, the plain text for added tokens, and ``[PAD{id}]`` where the checkpoint has no token (Qwen3's
  embedding has 151936 rows for 151669 tokens).
- ``tokenizer.ggml.token_type``: NORMAL for the BPE vocabulary, CONTROL for added tokens that are special *or look
  special* (``<|...|>``), USER_DEFINED for the other added tokens, UNUSED for the padding entries.
- ``tokenizer.ggml.merges``: "left right" strings in rank order.
- the special ids from tokenizer_config.json, then config.json for those still unset (so Qwen3 gets a bos id although
  its tokenizer has no bos_token), ``tokenizer.ggml.add_bos_token`` from tokenizer_config.json, and
  ``tokenizer.chat_template``.

The pre-tokeniser itself is not stored, only its name in ``tokenizer.ggml.pre``; for "qwen2" it is Qwen's split regex
(llama.cpp compiles an equivalent one in). The normaliser is not stored either: Qwen2Tokenizer's is NFC.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .tokenizer import _QWEN_SPLIT, QWEN3_CHAT_TEMPLATE, PromptTokenizer

if TYPE_CHECKING:
    import gguf
    from tokenizers import Tokenizer

__all__ = ["read_metadata", "tokenizer_from_gguf", "tokenizer_from_metadata"]

logger = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType), spelled out so that no gguf import is needed here.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_ADDED_TYPES = (CONTROL, USER_DEFINED)
_SUPPORTED_PRE = ("qwen2",)
_KEY = "tokenizer.ggml."


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every key/value field of a GGUF file as plain Python values, without the GGUF.* header fields."""
    from gguf import GGUFValueType

    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if len(field.types) > 2 and field.types[1] == GGUFValueType.ARRAY:
            # The reader flattens nested arrays and loses their shape; no tokenizer key uses them.
            logger.warning("skipping GGUF field %s: nested arrays are not supported", name)
            continue
        try:
            meta[name] = field.contents()
        except UnicodeDecodeError as e:
            raise ValueError(f"GGUF field {name} holds a string that is not UTF-8 ({e})") from None
    return meta


def tokenizer_from_gguf(path: str | Path, *, pad_token: str | None = None) -> PromptTokenizer:
    """Read a GGUF file's metadata and build its prompt tokenizer (the tensors are memory-mapped, not read)."""
    from gguf import GGUFReader

    return tokenizer_from_metadata(read_metadata(GGUFReader(path)), str(path), pad_token=pad_token)


def tokenizer_from_metadata(meta: Mapping[str, Any], source: str, *, pad_token: str | None = None) -> PromptTokenizer:
    """The PromptTokenizer of a GGUF file's llama.cpp tokenizer keys; `source` names the file in errors.

    `pad_token` replaces the file's padding token: re-uploads such as unsloth's set Qwen3's to <|vision_pad|>
    where Qwen's own checkpoints (and FLUX.2's tokenizer) pad with <|endoftext|>.
    """
    model = _required(meta, _KEY + "model", source)
    if model != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported")
    pre = _required(meta, _KEY + "pre", source)
    if pre not in _SUPPORTED_PRE:
        raise ValueError(
            f"{source}: unsupported pre-tokenizer tokenizer.ggml.pre={pre!r} (supported: {', '.join(_SUPPORTED_PRE)})"
        )
    tokens = list(_required(meta, _KEY + "tokens", source))
    types = list(_required(meta, _KEY + "token_type", source))
    merges = list(_required(meta, _KEY + "merges", source))
    if len(types) != len(tokens):
        raise ValueError(f"{source}: {len(tokens)} tokens but {len(types)} token types")

    def token_of(key: str) -> str | None:
        idx = meta.get(_KEY + key)
        if idx is None:
            return None
        if not 0 <= int(idx) < len(tokens) or types[int(idx)] == UNUSED:
            raise ValueError(f"{source}: {_KEY + key} is {idx}, which is no token")
        return tokens[int(idx)]

    pad = pad_token if pad_token is not None else token_of("padding_token_id")
    if pad is None:
        raise ValueError(f"{source}: {_KEY}padding_token_id is missing; prompts cannot be padded")
    bos, eos, unk = token_of("bos_token_id"), token_of("eos_token_id"), token_of("unknown_token_id")
    add_bos = bool(meta.get(_KEY + "add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get(_KEY + "add_eos_token", False)) and eos is not None

    tok = _build_tokenizer(tokens, types, merges, source)
    _set_post_processor(tok, bos if add_bos else None, eos if add_eos else None)
    # The converter falls back to config.json's bos_token_id, which Qwen3 sets although its tokenizer has no
    # bos_token; transformers hands templates only the tokenizer's own, so a bos that is never added stays hidden.
    named = {"bos_token": bos if add_bos else None, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    return PromptTokenizer(
        tok,
        _chat_template(meta, source),
        pad_token=pad,
        template_variables={k: v for k, v in named.items() if v is not None},
    )


def _required(meta: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in meta:
        raise ValueError(f"{source}: the GGUF metadata has no {key}; cannot build the tokenizer")
    return meta[key]


def _chat_template(meta: Mapping[str, Any], source: str) -> str:
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        return template
    logger.warning("%s has no tokenizer.chat_template; using Qwen3's chat template", source)
    return QWEN3_CHAT_TEMPLATE


def _build_tokenizer(tokens: Sequence[str], types: Sequence[int], merges: Sequence[str], source: str) -> Tokenizer:
    """Byte-level BPE with Qwen2Tokenizer's normaliser, pre-tokeniser and decoder, and the added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    ids: dict[str, int] = {}
    for i, (text, kind) in enumerate(zip(tokens, types, strict=True)):
        # The converter's [PAD{i}] fillers (UNUSED; older converters typed them USER_DEFINED): no text maps to them
        # in transformers either.
        if kind == UNUSED or (kind == USER_DEFINED and text == f"[PAD{i}]"):
            continue
        if text in ids:
            raise ValueError(f"{source}: token {text!r} appears twice (ids {ids[text]} and {i})")
        ids[text] = i
    added = [(text, i) for text, i in ids.items() if types[i] in _ADDED_TYPES]
    vocab = {text: i for text, i in ids.items() if types[i] not in _ADDED_TYPES}
    # tokenizers gives a new added token the id after the vocabulary, which is right in Qwen's layout (BPE tokens
    # 0..n-1, added tokens after them, in order). Added tokens anywhere else must sit in the vocabulary to keep ids.
    if sorted(vocab.values()) != list(range(len(vocab))) or [i for _, i in added] != list(
        range(len(vocab), len(vocab) + len(added))
    ):
        vocab = ids
    try:
        bpe = models.BPE(vocab, [_split_merge(m, source) for m in merges], unk_token=None, ignore_merges=False)
    except Exception as e:  # tokenizers raises bare Exceptions for merges it cannot resolve
        raise ValueError(f"{source}: the GGUF vocabulary and merges do not form a BPE model ({e})") from None
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Qwen's tokenizer.json has them all normalized=False; CONTROL ones are special there (or look it). Runs of one
    # kind go in one call, which keeps the id order and spares rebuilding the matcher per token.
    for special, run in groupby(added, key=lambda t: types[t[1]] == CONTROL):
        batch = [AddedToken(text, special=special, normalized=False) for text, _ in run]
        (tok.add_special_tokens if special else tok.add_tokens)(batch)
    for text, i in added:
        if tok.token_to_id(text) != i:
            raise ValueError(f"{source}: added token {text!r} got id {tok.token_to_id(text)}, not {i}")
    return tok


def _split_merge(merge: str, source: str) -> tuple[str, str]:
    # llama.cpp splits at the first space after the first character (`word.find(' ', 1)`), so a left part that is
    # itself a space survives.
    pos = merge.find(" ", 1)
    if pos < 0:
        raise ValueError(f"{source}: merge {merge!r} is not two tokens separated by a space")
    return merge[:pos], merge[pos + 1 :]


def _set_post_processor(tok: Tokenizer, bos: str | None, eos: str | None) -> None:
    """BOS/EOS around each sequence exactly when the file asks for them, as from_dir does for add_*_token."""
    from tokenizers import processors

    single = " ".join([f"{bos}:0"] * (bos is not None) + ["$A:0"] + [f"{eos}:0"] * (eos is not None))
    pair = " ".join([single] + [f"{bos}:1"] * (bos is not None) + ["$B:1"] + [f"{eos}:1"] * (eos is not None))
    specials = {t: tok.token_to_id(t) for t in (bos, eos) if t is not None}
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(specials.items()))
