"""Text <-> token ids and chat templates, for HF model directories and for GGUF files.

Both sources end up as one `tokenizers.Tokenizer` (Rust, fast) plus the few facts around it that the engine
needs: which ids are BOS/EOS/pad, whether encoding prepends BOS, and the jinja chat template. A GGUF file
carries no tokenizer.json, so `gguf_vocab.py` rebuilds the equivalent tokenizer from its vocabulary following
llama.cpp (`llama-vocab.cpp`), the reference for how those files are meant to be tokenized.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

from turboinfer.errors import InvalidRequestError, ModelLoadError

# Tokens that end a turn or a document in common chat formats (ChatML, Llama 3, Phi-3, Gemma, GPT-2 style);
# the same list llama.cpp uses to find "end of generation" tokens by their text.
END_OF_GENERATION_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>",
                            "<EOT>")


def _token_content(tok: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as {"content": ..., "lstrip": ...}."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


# End-of-turn markers of chat formats, recognised by text when a GGUF file names no eot_token_id.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")


class Tokenizer:
    def __init__(self, tok, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, add_bos: bool = False, add_eos: bool = False,
                 chat_template: str | dict[str, str] | None = None, extra_eos_ids: tuple[int, ...] = (),
                 name: str = "") -> None:
        self._tok = tok  # tokenizers.Tokenizer
        self.name = name  # where it came from, for error messages
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_id
        self.add_bos = bool(add_bos and bos_token_id is not None)
        self.add_eos = bool(add_eos and eos_token_id is not None)
        self.chat_template = chat_template
        self._templates: dict[str, Any] = {}  # template source -> compiled jinja template
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        special |= {i for i in (bos_token_id, eos_token_id) if i is not None}
        self.all_special_ids: list[int] = sorted(special)
        # EOS set: the model's EOS, ids the file names as other end tokens (GGUF eot/eom), and any token from
        # END_OF_GENERATION_TOKENS that this vocabulary marks special. Chat models end turns with such a
        # token rather than their document EOS, so generation must stop on either.
        eos = {i for i in (eos_token_id, *extra_eos_ids) if i is not None}
        for text in END_OF_GENERATION_TOKENS:
            i = tok.token_to_id(text)
            if i is not None and i in special:
                eos.add(i)
        self.eos_token_ids: frozenset[int] = frozenset(eos)

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """An HF model directory: tokenizer.json, plus tokenizer_config.json / chat_template.jinja if present."""
        from tokenizers import Tokenizer as RustTokenizer

        path = os.fspath(path)
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise ModelLoadError(f"{path} has no tokenizer.json (only fast tokenizers are supported)")
        try:
            tok = RustTokenizer.from_file(tj)
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise ModelLoadError(f"cannot read {tj}: {e}") from None
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))

        def special_id(key: str) -> int | None:
            content = _token_content(cfg.get(key))
            return tok.token_to_id(content) if content is not None else None

        template: Any = cfg.get("chat_template")
        jinja_file = os.path.join(path, "chat_template.jinja")  # where transformers >= 4.47 saves it
        if template is None and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        if template is None:
            template = _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = {t["name"]: t["template"] for t in template}
        # add_bos_token absent: the tokenizer.json post-processor alone decides (as transformers does).
        return cls(tok, bos_token_id=special_id("bos_token"), eos_token_id=special_id("eos_token"),
                   pad_token_id=special_id("pad_token"), add_bos=bool(cfg.get("add_bos_token", False)),
                   add_eos=bool(cfg.get("add_eos_token", False)), chat_template=template, name=path)

    @classmethod
    def from_gguf(cls, gguf_file) -> "Tokenizer":
        """The tokenizer embedded in a GGUF file's metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`)."""
        from turboinfer.tokenizer.gguf_vocab import build_gguf_tokenizer

        md = gguf_file.tokenizer_metadata()
        tok, add_bos = build_gguf_tokenizer(md, source=gguf_file.path)
        templates = {k.removeprefix("tokenizer.chat_template."): v for k, v in md.items()
                     if k.startswith("tokenizer.chat_template.")}
        template: Any = md.get("tokenizer.chat_template")
        if templates:
            template = {**templates, **({"default": template} if template else {})}
        n = tok.get_vocab_size(with_added_tokens=True)

        def ident(key: str) -> int | None:
            i = md.get(f"tokenizer.ggml.{key}")
            return int(i) if i is not None and 0 <= int(i) < n else None

        extra = tuple(i for i in (ident("eot_token_id"), ident("eom_token_id")) if i is not None)
        if ident("eot_token_id") is None:
            # as llama.cpp does for files without the key: a control token that ends a chat turn also stops
            # generation (Gemma's <end_of_turn> beside its <eos>)
            found = (tok.token_to_id(t) for t in END_OF_TURN_TOKENS)
            extra += tuple(i for i in found if i is not None and i != ident("eos_token_id"))
        return cls(tok, bos_token_id=ident("bos_token_id"), eos_token_id=ident("eos_token_id"),
                   pad_token_id=ident("padding_token_id"), add_bos=add_bos,
                   add_eos=bool(md.get("tokenizer.ggml.add_eos_token", False)), chat_template=template,
                   extra_eos_ids=extra, name=gguf_file.path)

    # ---- ids <-> text -------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special tokens written in `text` (e.g. "<|im_start|>") always become their single id.
        With `add_special_tokens`, BOS is prepended only when the model asks for it (and not twice)."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            if self.add_bos and (not ids or ids[0] != self.bos_token_id):
                ids.insert(0, self.bos_token_id)
            if self.add_eos and (not ids or ids[-1] != self.eos_token_id):
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs: Any) -> str:
        """Render a conversation the way transformers' `apply_chat_template(tokenize=False)` does."""
        import jinja2

        source = self.chat_template
        if isinstance(source, dict):  # named templates: "tool_use" when tools are given and it exists
            source = source.get("tool_use") if tools and "tool_use" in source else source.get("default")
        if not source:
            raise InvalidRequestError(f"the model {self.name or ''} has no chat template; send a plain prompt "
                                      "(completions) instead of chat messages")
        template = self._templates.get(source)
        if template is None:
            template = self._templates[source] = _compile(source)
        context = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                   "pad_token": self.id_to_token(self.pad_token_id) if self.pad_token_id is not None else "",
                   **kwargs}
        try:
            return template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                   **context)
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"chat template error: {e}") from None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def _compile(source: str):
    """A sandboxed jinja environment configured as transformers configures it for chat templates (templates
    come from model repos, so they are untrusted code)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps it.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_passthrough"), [], [], body).set_lineno(lineno)

        def _passthrough(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes; templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ModelLoadError(f"the model's chat template does not parse: {e}") from None
