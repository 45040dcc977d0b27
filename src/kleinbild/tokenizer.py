"""Prompt tokenisation for the Qwen3 text encoder, without transformers.

Reads a checkpoint's tokenizer folder (tokenizer.json, tokenizer_config.json, optionally chat_template.jinja)
and reproduces what the reference pipeline gets from transformers: the chat template rendered with
`add_generation_prompt=True, enable_thinking=False`, then `tokenizer(text, padding="max_length",
truncation=True, max_length=...)`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["QWEN3_CHAT_TEMPLATE", "PromptTokenizer", "train_qwen_style_tokenizer"]

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
        self.source_dir: Path | None = None

    @property
    def vocab_size(self) -> int:
        """Token ids in use, added tokens included (the text encoder's embedding needs at least this many rows)."""
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    @classmethod
    def from_dir(cls, path: str | Path) -> PromptTokenizer:
        """Load a tokenizer folder in the Hugging Face layout (a checkpoint's `tokenizer/`)."""
        from tokenizers import Tokenizer, processors

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
        try:
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises bare Exceptions on malformed files
            raise ValueError(f"{folder / 'tokenizer.json'} is not a valid tokenizer file ({e})") from None

        _add_config_tokens(tok, config, folder)

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

        template = _chat_template(folder, config)
        if named["pad_token"] is None:
            raise ValueError(f"{folder / 'tokenizer_config.json'} defines no pad_token; prompts cannot be padded")
        out = cls(
            tok,
            template,
            pad_token=named["pad_token"],
            padding_side=config.get("padding_side", "right"),
            truncation_side=config.get("truncation_side", "right"),
            template_variables=variables,
        )
        out.source_dir = folder
        return out

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


# Qwen3's chat template as shipped in the tokenizer_config.json of Qwen3-4B / Qwen3-8B (the revision that
# guards `message.content is string`). Kept byte for byte: the `\n` below are jinja escapes, not newlines.
QWEN3_CHAT_TEMPLATE = (
    r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are"""
    r""" provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and"""
    r""" arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>,"""
    r""" \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and"""
    r""" not(message.content.startswith('<tool_response>') and"""
    r""" message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content ="""
    r""" content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') +"""
    r""" '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
)

# Qwen's pre-tokenisation regex (the same one transformers hard-codes for Qwen2Tokenizer).
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# The added tokens of Qwen3, in checkpoint order; the flag is the checkpoint's `special`.
_QWEN_ADDED = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]


def train_qwen_style_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    *,
    vocab_size: int = 600,
    template_in_jinja_file: bool = False,
    padding_side: str = "right",
) -> Path:
    """Train a byte-level BPE on `texts` and write it in the layout of a Qwen3 checkpoint's tokenizer folder.

    Same pre-tokeniser, added tokens, pad token and chat template as Qwen3, so a model trained with it runs
    through exactly the code path of the official models (and loads in transformers as a Qwen2Tokenizer).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Same pipeline as Qwen3's tokenizer.json, which is also what transformers rebuilds for Qwen2Tokenizer.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    # Added after training so that, as in the real checkpoint, they take the ids after the BPE vocabulary.
    first_id = tok.get_vocab_size()
    for content, special in _QWEN_ADDED:
        token = AddedToken(content, special=special, normalized=False)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    tok.save(str(out_dir / "tokenizer.json"))

    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(first_id + i): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for i, (content, special) in enumerate(_QWEN_ADDED)
        },
        "additional_special_tokens": [c for c, s in _QWEN_ADDED if s and c != "<|endoftext|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if padding_side != "right":
        config["padding_side"] = padding_side
    if template_in_jinja_file:
        (out_dir / "chat_template.jinja").write_text(QWEN3_CHAT_TEMPLATE, encoding="utf-8")
    else:
        config["chat_template"] = QWEN3_CHAT_TEMPLATE
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return out_dir


def _add_config_tokens(tok: Any, config: Mapping[str, Any], folder: Path) -> None:
    """transformers takes the added tokens from the config; tokenizer.json normally lists the same ones. A token
    only the config knows is added here, and its id must come out where the config says."""
    from tokenizers import AddedToken

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


def _chat_template(folder: Path, config: Mapping[str, Any]) -> str:
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
    return template
