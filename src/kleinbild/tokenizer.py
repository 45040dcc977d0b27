"""Prompt tokenisation for the Qwen3 text encoder, without transformers.

Reads a checkpoint's tokenizer folder (tokenizer.json, tokenizer_config.json, optionally chat_template.jinja)
and reproduces what the reference pipeline gets from transformers: the chat template rendered with
`add_generation_prompt=True, enable_thinking=False`, then `tokenizer(text, padding="max_length",
truncation=True, max_length=...)`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["PromptTokenizer"]

# The named special tokens transformers hands to every chat template as variables (bos_token, ...).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Older jinja2 releases have known sandbox escapes; chat templates come from the Hub, so refuse them
# (transformers draws the same line).
_MIN_JINJA = (3, 1, 6)


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string, or a serialised AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read special token {value!r}")


def _compile_chat_template(source: str) -> Any:
    """Compile a chat template in an environment equivalent to transformers' one.

    transformers renders templates with a sandboxed, immutable jinja environment with trim_blocks and
    lstrip_blocks, the loopcontrols extension, a `{% generation %}` block tag, a json.dumps-based `tojson`
    filter (no HTML escaping), and the globals `raise_exception`, `strftime_now`, `dict` and `namespace`.
    Templates are written against exactly that, so anything else changes the rendered whitespace or fails.
    """
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < _MIN_JINJA:
        raise ImportError(f"rendering chat templates needs jinja2>=3.1.6, found {jinja2.__version__}")

    class _GenerationBlock(jinja2.ext.Extension):
        # transformers uses this tag to find assistant tokens; for rendering it is transparent.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    class _Namespace(jinja2.utils.Namespace):
        # Underscore attributes would give templates a handle on interpreter internals.
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    class _DictFactory:
        # Exposes dict construction without exposing the dict type itself.
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


class PromptTokenizer:
    """Chat-template rendering plus fixed-length tokenisation, as transformers does it for Qwen3."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str,
        *,
        pad_token: str,
        padding_side: str = "right",
        truncation_side: str = "right",
        template_variables: Mapping[str, str] | None = None,
    ) -> None:
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', not {side!r}")
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"the pad token {pad_token!r} is not in the vocabulary")
        self._tokenizer = tokenizer
        self.chat_template = chat_template
        self.pad_token = pad_token
        self.pad_token_id = int(pad_id)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self._template_variables = dict(template_variables or {})
        self._compiled: Any = None

    @classmethod
    def from_dir(cls, path: str | Path) -> PromptTokenizer:
        """Load a tokenizer folder in the Hugging Face layout (a checkpoint's `tokenizer/`)."""
        from tokenizers import AddedToken, Tokenizer, processors

        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"no tokenizer at {folder}: not a directory")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (folder / name).is_file():
                raise ValueError(f"no tokenizer at {folder}: {name} is missing")
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{folder / 'tokenizer_config.json'} is not valid JSON: {e}") from None
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))

        # transformers takes the added tokens from the config; tokenizer.json normally lists the same ones.
        # A token only the config knows is added here, and its id must come out where the config says.
        for idx, spec in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            content = spec["content"]
            if tok.token_to_id(content) is None:
                token = AddedToken(
                    content,
                    single_word=spec.get("single_word", False),
                    lstrip=spec.get("lstrip", False),
                    rstrip=spec.get("rstrip", False),
                    normalized=spec.get("normalized", not spec.get("special", False)),
                    special=spec.get("special", False),
                )
                (tok.add_special_tokens if token.special else tok.add_tokens)([token])
            if tok.token_to_id(content) != int(idx):
                raise ValueError(
                    f"{folder}: added token {content!r} has id {tok.token_to_id(content)} in tokenizer.json "
                    f"but {idx} in tokenizer_config.json"
                )

        named = {name: _token_text(config.get(name)) for name in _NAMED_SPECIAL_TOKENS}
        # transformers also exposes any other `*_token` string in the config, and named extra tokens.
        for key, value in config.items():
            if key.endswith("_token") and key not in named and isinstance(value, str):
                named[key] = value
        extra = config.get("extra_special_tokens")
        if isinstance(extra, Mapping):
            named.update({k: _token_text(v) for k, v in extra.items()})
        variables = {k: v for k, v in named.items() if v is not None}

        # An explicit add_bos_token/add_eos_token (or no post-processor at all) makes transformers replace
        # the file's post-processor by a template adding exactly the requested BOS/EOS.
        if "add_bos_token" in config or "add_eos_token" in config or tok.post_processor is None:
            bos, eos = named["bos_token"], named["eos_token"]
            add_bos = bool(config.get("add_bos_token", False)) and bos is not None
            add_eos = bool(config.get("add_eos_token", False)) and eos is not None
            single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
            pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
            specials = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
            tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        tok.encode_special_tokens = bool(config.get("split_special_tokens", False))

        template_file = folder / "chat_template.jinja"
        if template_file.is_file():
            # transformers lets the standalone file win over the config entry.
            template = template_file.read_text(encoding="utf-8")
        else:
            template = config.get("chat_template")
            if isinstance(template, list):
                by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
                template = by_name.get("default")
            if not isinstance(template, str):
                raise ValueError(
                    f"no chat template at {folder}: chat_template.jinja is missing and tokenizer_config.json "
                    "has no (default) chat_template"
                )
        if named["pad_token"] is None:
            raise ValueError(f"{folder / 'tokenizer_config.json'} defines no pad_token; prompts cannot be padded")
        return cls(
            tok,
            template,
            pad_token=named["pad_token"],
            padding_side=config.get("padding_side", "right"),
            truncation_side=config.get("truncation_side", "right"),
            template_variables=variables,
        )

    def render(self, prompt: str) -> str:
        """The prompt as a single user turn, with the generation prompt and thinking switched off."""
        if self._compiled is None:
            self._compiled = _compile_chat_template(self.chat_template)
        variables = {**self._template_variables, "enable_thinking": False}
        return self._compiled.render(
            messages=[{"role": "user", "content": str(prompt)}],
            tools=None,
            documents=None,
            add_generation_prompt=True,
            **variables,
        )

    def encode(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both int64 of shape (len(prompts), max_length)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        texts = [self.render(p) for p in prompts]
        tok = self._tokenizer
        tok.enable_truncation(max_length, stride=0, strategy="longest_first", direction=self.truncation_side)
        tok.enable_padding(
            direction=self.padding_side,
            pad_id=self.pad_token_id,
            pad_type_id=0,
            pad_token=self.pad_token,
            length=max_length,
        )
        encodings = tok.encode_batch(texts, add_special_tokens=True)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64).reshape(len(texts), max_length)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64).reshape(len(texts), max_length)
        return ids, mask
