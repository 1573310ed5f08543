"""OPT's tokenizer: GPT-2 byte-level BPE over metaseq's fairseq-remapped vocabulary.

Owns finding the two asset files, refusing the wrong vocabulary (OpenAI's GPT-2
``encoder.json``, metaseq #128), encoding prompts as metaseq does (no special tokens added) and
decoding at the byte level, so text-level stop sequences and character offsets stay exact when
a UTF-8 character is split across tokens.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from tokenizers import ByteLevelBPETokenizer

from assets import BASE_URL, FILES, asset_dir
from opt_serving.vocab import DICT_SIZE

VOCAB_FILE, MERGES_FILE = FILES  # "gpt2-vocab.json", "gpt2-merges.txt"
OPENAI_GPT2_SIZE = 50257
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
DOWNLOAD_HINT = (
    "Run `opt-assets fetch` to fetch them, or download metaseq's files from "
    f"{BASE_URL}{VOCAB_FILE} and .../{MERGES_FILE}")


class AssetError(RuntimeError):
    """Tokenizer files missing or wrong; the message says what to do."""


@dataclass(frozen=True)
class AssetPaths:
    vocab: Path
    merges: Path


def default_assets_dir() -> Path:
    """The toolkit's own ``assets/`` folder (where ``opt-assets fetch`` puts the files)."""
    return asset_dir()


def locate_assets(checkpoint_folder: str | Path | None = None,
                  assets_dir: str | Path | None = None, *,
                  assets_option: str = "--assets DIR") -> AssetPaths:
    """The first folder holding both files: ``assets_dir`` (named explicitly, so it wins),
    the checkpoint folder, then the toolkit's own assets folder. ``assets_option``: how the
    caller's user names ``assets_dir`` (for the message when nothing is found)."""
    candidates = [Path(p) for p in (assets_dir, checkpoint_folder) if p is not None]
    candidates.append(default_assets_dir())
    for folder in candidates:
        vocab, merges = folder / VOCAB_FILE, folder / MERGES_FILE
        if vocab.is_file() and merges.is_file():
            return AssetPaths(vocab, merges)
    looked = ", ".join(str(c) for c in candidates)
    raise AssetError(f"no {VOCAB_FILE} + {MERGES_FILE} found (looked in: {looked}). "
                     f"{DOWNLOAD_HINT}; then pass {assets_option} or put them next to the "
                     f"checkpoint parts.")


def check_vocab(vocab: dict[str, int], path: Path | str = VOCAB_FILE) -> None:
    """Refuse anything but metaseq's remapped vocabulary: with OpenAI's file every id is
    shifted by the four fairseq specials and the model reads garbage without any error."""
    if vocab.get("!") == 0 and len(vocab) == OPENAI_GPT2_SIZE:
        raise AssetError(
            f"{path} is OpenAI's GPT-2 encoder.json ({OPENAI_GPT2_SIZE} entries, '!' = 0), not "
            f"metaseq's gpt2-vocab.json. OPT was trained with fairseq's remapped dictionary "
            f"({DICT_SIZE} entries, <s>=0 <pad>=1 </s>=2 <unk>=3): with this file every token "
            f"id is wrong and the model answers gibberish (metaseq #128). {DOWNLOAD_HINT}.")
    specials_ok = all(vocab.get(s) == i for i, s in enumerate(SPECIALS))
    if len(vocab) != DICT_SIZE or not specials_ok:
        raise AssetError(
            f"{path} has {len(vocab)} entries and specials "
            f"{ {s: vocab.get(s) for s in SPECIALS} }; OPT needs metaseq's gpt2-vocab.json "
            f"({DICT_SIZE} entries, <s>=0 <pad>=1 </s>=2 <unk>=3). {DOWNLOAD_HINT}.")


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character standing for each byte."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def normalize(text: str) -> str:
    """metaseq's prompt clean-up: Windows and old-Mac newlines become ``\\n``."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


class TextTokenizer(Protocol):
    """What the server, the engine and ``LLM`` need of a tokenizer: metaseq's BPE
    (``Tokenizer``) and the demo's byte-level stand-in (``demo_tokenizer``) both are."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def decode_token(self, token_id: int) -> str: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def single_token_ids(self, texts: Sequence[str]) -> tuple[int, ...]: ...

    @property
    def max_token_bytes(self) -> int: ...


class ByteDecoding:
    """What every tokenizer here derives from ``token_bytes`` and ``encode_batch``: decoding
    at the byte level, the single-token stop ids and the longest token."""

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """Bytes of the longest token: no n tokens span more than n times this."""
        return max(len(self.token_bytes(i)) for i in range(self.vocab_size))

    def decode_token(self, token_id: int) -> str:
        """One token alone, as metaseq's ``tokens`` list (a split character shows as U+FFFD)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def single_token_ids(self, texts: Sequence[str]) -> tuple[int, ...]:
        """Ids of the texts that are exactly one token (``"\\n"`` -> 50118): the stop tokens
        that min_tokens blocks, as metaseq does."""
        encoded = self.encode_batch(list(texts))
        return tuple(sorted({ids[0] for ids in encoded if len(ids) == 1}))


class Tokenizer(ByteDecoding):
    """Encode with HF ``tokenizers`` (as metaseq's hf_byte_bpe); decode from a byte table."""

    def __init__(self, paths: AssetPaths):
        with open(paths.vocab, encoding="utf-8") as f:
            vocab = json.load(f)
        check_vocab(vocab, paths.vocab)
        self._bpe = ByteLevelBPETokenizer(str(paths.vocab), str(paths.merges))
        decoder = _byte_decoder()
        pieces = [b""] * DICT_SIZE
        for token, i in vocab.items():
            pieces[i] = bytes(decoder[c] for c in token)
        self._pieces = tuple(pieces)  # id -> the bytes it stands for

    @classmethod
    def from_folder(cls, checkpoint_folder=None, assets_dir=None) -> "Tokenizer":
        return cls(locate_assets(checkpoint_folder, assets_dir))

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def encode(self, text: str) -> list[int]:
        return self._bpe.encode(normalize(text)).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._bpe.encode_batch([normalize(t) for t in texts])]

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < len(self._pieces):
            raise ValueError(f"token id {token_id} is outside the dictionary "
                             f"(0..{len(self._pieces) - 1})")
        return self._pieces[token_id]
