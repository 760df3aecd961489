"""The tokenizers of served models: a checkpoint's own, or the byte-level one of the demo.

A model version names its tokenizer in its card (:mod:`tpm_faas.catalog`): ``hf`` is the
checkpoint's own ``tokenizer.json`` read with Hugging Face ``tokenizers`` (special tokens and
the chat template from ``tokenizer_config.json`` or ``chat_template.jinja``, end-of-sequence
ids from ``generation_config.json``), so ids, text and chat prompts are those of
``transformers``' fast tokenizer for the same files; ``bytes`` is :class:`ByteTokenizer`, kept
for models that declare it (the byte-level demo model and tests).

The gateway tokenizes (it prices and checks prompts in tokens, and the shard group runs the
ids it priced); the shard group only decodes, incrementally (:class:`Detokenizer`) so that stop
strings are seen as soon as they are generated. Torch-free.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from tpm_faas.errors import ConfigError, RequestError

BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
VOCAB_SIZE = 264

#: Files of a checkpoint that define its tokenizer (hashed into the receipt's model version).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)
#: The most JSON characters one byte of decoded text can take: a control character or
#: U+FFFD as ``\\uXXXX``; 2- to 4-byte UTF-8 characters take 6 or 12 characters for 2-4 bytes.
JSON_PER_BYTE = 6
#: At most this many bytes a tokenizer's vocabulary is read for (a bigger ``tokenizer.json``
#: is refused before it is parsed).
MAX_TOKENIZER_FILE = 64 * 2**20


class Tokenizer(ABC):
    """What serving needs of a tokenizer.

    :ivar vocab_size: ids the tokenizer knows (the model's embedding may have more rows)
    :ivar bos_id: the beginning-of-sequence id, if the model has one
    :ivar eos_ids: ids that end generation (``generation_config.json``'s ``eos_token_id``)
    :ivar chat_template: the Jinja chat template, if the checkpoint ships one
    """

    kind: str
    vocab_size: int
    eos_ids: tuple[int, ...]
    chat_template: str | None = None

    @abstractmethod
    def encode(self, text: str, *, add_special: bool = True) -> list[int]:
        """Token ids of ``text`` (with BOS and the like when ``add_special``)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens left out."""

    @abstractmethod
    def token_str(self, token_id: int) -> str:
        """A printable form of one token, for log-probs and logit-lens tables."""

    @property
    @abstractmethod
    def text_json_per_token(self) -> int:
        """The most JSON characters one generated token adds to a decoded text (a true bound:
        result sizes are priced with it before anything runs)."""

    @property
    @abstractmethod
    def token_str_json_max(self) -> int:
        """The longest JSON string (quotes included) :meth:`token_str` gives over the
        vocabulary."""

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """``messages`` as the prompt text the checkpoint's chat template makes of them."""
        if self.chat_template is None:
            raise RequestError(
                "this model has no chat template; send 'prompts' instead of chat messages"
            )
        return _render(
            self.chat_template,
            list(messages),
            add_generation_prompt=add_generation_prompt,
            special=self.special_tokens,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """The ids of a chat prompt: the rendered template, whose text already holds the
        special tokens (tokenized without adding more, as ``apply_chat_template`` does)."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special=False)

    @property
    def special_tokens(self) -> dict[str, str]:
        """``bos_token``, ``eos_token``, ... as the chat template sees them."""
        return {}

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self)


@dataclass(frozen=True)
class _ByteFields:
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    pad_id: int = PAD_ID
    vocab_size: int = VOCAB_SIZE


class ByteTokenizer(_ByteFields, Tokenizer):
    """UTF-8 bytes in, token ids out (ids 0-255; BOS, EOS and PAD follow, and the vocabulary
    is padded to a multiple of 8 so tensor-parallel shards split evenly); decoding replaces
    invalid byte runs. No vocabulary file, no chat template."""

    kind = "bytes"

    @property
    def eos_ids(self) -> tuple[int, ...]:  # type: ignore[override]
        return (self.eos_id,)

    def encode(self, text: str, *, add_special: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_special else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_str(self, token_id: int) -> str:
        if token_id == self.bos_id:
            return "<bos>"
        if token_id == self.eos_id:
            return "<eos>"
        if not 0 <= token_id < 256:
            return f"<{token_id}>"
        ch = bytes([token_id]).decode("latin-1")
        return ch if ch.isprintable() and ch != " " else repr(ch)[1:-1] if ch != " " else "␠"

    @property
    def text_json_per_token(self) -> int:
        return JSON_PER_BYTE  # one byte per token

    @property
    def token_str_json_max(self) -> int:
        return _byte_token_str_json_max()


@lru_cache(maxsize=1)
def _byte_token_str_json_max() -> int:
    tok = ByteTokenizer()
    return max(len(json.dumps(tok.token_str(i))) for i in range(tok.vocab_size))


class HFTokenizer(Tokenizer):
    """A checkpoint's own tokenizer (``tokenizer.json``), read with Hugging Face ``tokenizers``.

    :param model_dir: the checkpoint directory
    :param vocab_size: the model's embedding rows (ids past the tokenizer's own are printed as
        ``<id>``)
    """

    kind = "hf"

    def __init__(self, model_dir: Path, *, vocab_size: int | None = None) -> None:
        from tpm_faas._extras import require

        require("tokenizers", "gateway")
        from tokenizers import Tokenizer as RustTokenizer

        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{model_dir} has no tokenizer.json")
        if path.stat().st_size > MAX_TOKENIZER_FILE:
            raise ConfigError(f"{path} is larger than {MAX_TOKENIZER_FILE} bytes")
        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception subclass
            raise ConfigError(f"{path} is not a tokenizers file: {e}") from None
        config = _read_json(model_dir / "tokenizer_config.json")
        generation = _read_json(model_dir / "generation_config.json")
        model_config = _read_json(model_dir / "config.json")
        self._special = {
            key: text
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(config.get(key))) is not None
        }
        self.vocab_size = max(
            int(vocab_size or 0), self._tok.get_vocab_size(with_added_tokens=True)
        )
        self.bos_id: int | None = self._id_of(self._special.get("bos_token"))
        if self.bos_id is None:
            self.bos_id = _first_id(
                generation.get("bos_token_id", model_config.get("bos_token_id"))
            )
        eos = generation.get("eos_token_id", model_config.get("eos_token_id"))
        eos_ids = _ids(eos)
        if not eos_ids and (own := self._id_of(self._special.get("eos_token"))) is not None:
            eos_ids = [own]
        self.eos_ids = tuple(dict.fromkeys(eos_ids))
        self.chat_template = _chat_template(model_dir, config)
        self._cleanup = bool(config.get("clean_up_tokenization_spaces", False))

    def _id_of(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._special)

    def encode(self, text: str, *, add_special: bool = True) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=add_special).ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self._tok.decode(list(ids), skip_special_tokens=True)
        return _clean_up(text) if self._cleanup else text

    def token_str(self, token_id: int) -> str:
        return (
            self._token_strs[token_id] if 0 <= token_id < len(self._token_strs) else f"<{token_id}>"
        )

    @cached_property
    def _token_strs(self) -> list[str]:
        """Each id's own text (special tokens included); a piece of a multi-byte character,
        which has no text alone, is its vocabulary entry (``<0xE4>``, or a byte-level BPE piece)."""
        n = self._tok.get_vocab_size(with_added_tokens=True)
        texts = self._tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
        out = []
        for i, text in enumerate(texts):
            if not text or "\ufffd" in text:
                text = self._tok.id_to_token(i) or f"<{i}>"
            out.append(text)
        return out

    @cached_property
    def _token_bytes_max(self) -> int:
        """The most UTF-8 bytes one id decodes to alone: a bound on the bytes it adds to any
        decoded text (a piece of a character decodes alone to U+FFFD, three bytes, which
        stands for at most three of the piece's bytes)."""
        n = self._tok.get_vocab_size(with_added_tokens=True)
        texts = self._tok.decode_batch([[i] for i in range(n)], skip_special_tokens=True)
        return max((len(t.encode("utf-8")) for t in texts), default=0)

    @property
    def text_json_per_token(self) -> int:
        # One more byte per token for decoders that join tokens with a space (WordPiece).
        return JSON_PER_BYTE * (self._token_bytes_max + 1)

    @property
    def token_str_json_max(self) -> int:
        longest = max((len(json.dumps(s)) for s in self._token_strs), default=2)
        return max(longest, len(json.dumps(f"<{self.vocab_size - 1}>")))


class Detokenizer:
    """Text of a growing sequence of ids, piece by piece, correct across characters split
    between tokens: a piece ending in an incomplete character is held back until the
    character is complete, and each piece is decoded with the previous piece's ids as left
    context, so decoders that treat a sequence's first token apart (a leading space dropped)
    give the text of the whole sequence (the scheme vLLM and TGI use).
    """

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # ids[_prefix:_read] give the left context of the next piece
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one id; returns the text it completes (possibly empty)."""
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self._prefix : self._read])
        after = self.tok.decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += piece
            return piece
        return ""


def find_stop(text: str, stops: Iterable[str], *, start: int = 0) -> int:
    """Where the first of ``stops`` begins in ``text`` at or after ``start`` (-1: nowhere)."""
    found = [i for s in stops if s and (i := text.find(s, start)) >= 0]
    return min(found) if found else -1


# -- chat templates (as transformers renders them) ----------------------------------------
def _render(
    template: str,
    messages: list[Any],
    *,
    add_generation_prompt: bool,
    special: Mapping[str, str],
) -> str:
    from jinja2.exceptions import TemplateError

    try:
        text: str = _compiled(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special
        )
    except TemplateError as e:
        raise RequestError(f"the chat template refused these messages: {e}") from None
    return text


@lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    """The template compiled as ``transformers`` does: a sandboxed, immutable Jinja
    environment with ``trim_blocks``/``lstrip_blocks``, loop controls, its ``tojson``,
    ``raise_exception`` and ``strftime_now``, and ``{% generation %}`` blocks rendered as
    their body."""
    from tpm_faas._extras import require

    require("jinja2", "gateway")
    from jinja2 import nodes
    from jinja2.exceptions import TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}  # noqa: RUF012 (jinja2's declaration)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ConfigError(f"the model's chat template does not compile: {e}") from None


def _chat_template(model_dir: Path, config: Mapping[str, Any]) -> str | None:
    """``chat_template.jinja`` if present, else ``tokenizer_config.json``'s ``chat_template``
    (a string, or a list of named templates of which ``default`` is used)."""
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value else None


# transformers' clean_up_tokenization: no space before punctuation and English contractions.
_CLEANUP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def _clean_up(text: str) -> str:
    for a, b in _CLEANUP:
        text = text.replace(a, b)
    return text


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path.name} is not JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or an AddedToken
    record (``{"content": ...}``)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _first_id(value: Any) -> int | None:
    ids = _ids(value)
    return ids[0] if ids else None


@lru_cache(maxsize=8)
def _load(model_dir: str, vocab_size: int, stamp: tuple[int, int]) -> HFTokenizer:
    return HFTokenizer(Path(model_dir), vocab_size=vocab_size)


def load_tokenizer(kind: str, model_dir: Path | str | None, *, vocab_size: int) -> Tokenizer:
    """The tokenizer a model version declares (``bytes`` or ``hf``), kept in memory per
    directory and ``tokenizer.json`` version."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf" and model_dir:
        path = Path(model_dir) / "tokenizer.json"
        try:
            st = path.stat()
        except OSError:
            raise ConfigError(f"{model_dir} has no tokenizer.json") from None
        return _load(str(model_dir), vocab_size, (st.st_mtime_ns, st.st_size))
    raise ConfigError(f"unknown tokenizer {kind!r} (bytes, hf)")
