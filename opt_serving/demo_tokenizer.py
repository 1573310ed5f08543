"""A byte-level stand-in for the GPT-2 tokenizer, for random demo models only.

``opt-serve --demo-tokenizer`` uses it when no gpt2 assets are found: id = 4 + byte, the four
fairseq specials below. A real OPT checkpoint read through it answers gibberish, which is why
it is never chosen silently (the server logs a warning).
"""

from __future__ import annotations

from typing import Sequence

from opt_serving.config import DICT_SIZE
from opt_serving.tokenizer import ByteDecoding, normalize

OFFSET = 4  # <s> <pad> </s> <unk>
SPECIAL_BYTES = (b"<s>", b"<pad>", b"</s>", b"<unk>")


class ByteTokenizer(ByteDecoding):
    """An ``opt_serving.tokenizer.TextTokenizer``."""

    @property
    def vocab_size(self) -> int:
        return DICT_SIZE

    def encode(self, text: str) -> list[int]:
        return [OFFSET + b for b in normalize(text).encode("utf-8")]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < DICT_SIZE:
            raise ValueError(f"token id {token_id} is outside the dictionary "
                             f"(0..{DICT_SIZE - 1})")
        if token_id < OFFSET:
            return SPECIAL_BYTES[token_id]
        # Ids past the 256 bytes mean nothing here: a random model produces them anyway.
        return bytes([token_id - OFFSET]) if token_id < OFFSET + 256 else b""
