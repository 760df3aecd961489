"""Byte-level tokenizer for the demo model: no vocabulary file, nothing to download.

Ids 0-255 are the bytes of the UTF-8 text; a few special ids follow. The vocabulary is
padded to a multiple of 8 so tensor-parallel shards of the embedding and unembedding split
evenly.
"""

from __future__ import annotations

from dataclasses import dataclass

BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
VOCAB_SIZE = 264


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes in, token ids out; decoding replaces invalid byte runs."""

    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    pad_id: int = PAD_ID
    vocab_size: int = VOCAB_SIZE

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_str(self, token_id: int) -> str:
        """A printable form of one token, for tables such as the logit lens."""
        if token_id == self.bos_id:
            return "<bos>"
        if token_id == self.eos_id:
            return "<eos>"
        if token_id >= 256:
            return f"<{token_id}>"
        ch = bytes([token_id]).decode("latin-1")
        return ch if ch.isprintable() and ch != " " else repr(ch)[1:-1] if ch != " " else "␠"
