"""ParlAI's own BlenderBot files: ``PATH`` (the weights, read by the allow-list unpickler,
nothing executed), ``PATH.opt`` (the architecture and generation options, JSON), and the
dictionary with its byte-level BPE (``PATH.dict``, ``PATH.dict-vocab.json`` /
``PATH.dict-merges.txt``); and the history vector ParlAI builds from a conversation.

Paths stored inside ``PATH.opt`` are the trainer's: the files beside ``PATH`` are used, as
ParlAI falls back to them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from opt_serving.checkpoint import torch_file
from opt_serving.checkpoint.errors import CheckpointError
from opt_serving.checkpoint.lazy_tensor import LazyTensor

from .config import END_ID, BlenderbotConfig
from .model import BlenderbotModel
from .search import SearchOptions

_OPT_NAMES = {"embed_dim": "embedding_size", "ffn_dim": "ffn_size", "num_heads": "n_heads",
              "max_positions": "n_positions", "num_encoder_layers": "n_encoder_layers",
              "num_decoder_layers": "n_decoder_layers"}
MAX_OPT_BYTES = 1 << 20


def _read_opt(path: Path) -> dict:
    where = Path(f"{path}.opt")
    if not where.is_file():
        raise CheckpointError(str(where), "is missing", f"ParlAI writes {path.name}.opt beside "
                              "the model file; copy it from the same folder")
    if where.stat().st_size > MAX_OPT_BYTES:
        raise CheckpointError(str(where), f"is over {MAX_OPT_BYTES} bytes", "it is not a "
                              "ParlAI .opt file")
    try:
        opt = json.loads(where.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(str(where), f"is not JSON ({e})", "copy it again") from None
    if not isinstance(opt, dict):
        raise CheckpointError(str(where), "is not a JSON object", "copy it again")
    return opt


def config_from_opt(opt: dict, vocab_size: int, name: str) -> BlenderbotConfig:
    """The architecture a ParlAI ``.opt`` describes (ParlAI's defaults where it is silent)."""
    layers = opt.get("n_layers", 2)
    try:
        return BlenderbotConfig(
            name=name, variant=opt.get("variant", "aiayn"), embed_dim=opt["embedding_size"],
            num_encoder_layers=opt.get("n_encoder_layers") or layers,
            num_decoder_layers=opt.get("n_decoder_layers") or layers,
            num_heads=opt.get("n_heads", 2), ffn_dim=opt["ffn_size"], vocab_size=vocab_size,
            max_positions=opt.get("n_positions") or 1024,
            embeddings_scale=bool(opt.get("embeddings_scale", True)))
    except (KeyError, ValueError, TypeError) as e:
        message = str(e)
        for ours, theirs in _OPT_NAMES.items():  # in the file's own vocabulary
            message = message.replace(ours, theirs)
        raise ValueError(f"the .opt does not describe a BlenderBot this toolkit runs: "
                         f"{message}") from None


def search_options(opt: dict) -> SearchOptions:
    """The model's own generation options (``.opt``), else the gen/blenderbot recipe."""
    recipe = SearchOptions()
    return SearchOptions(
        inference=opt.get("inference") if opt.get("inference") in ("beam", "greedy")
        else recipe.inference,
        beam_size=int(opt.get("beam_size") or recipe.beam_size),
        beam_min_length=int(opt.get("beam_min_length", recipe.beam_min_length)),
        beam_block_ngram=int(opt.get("beam_block_ngram", recipe.beam_block_ngram)),
        beam_context_block_ngram=int(opt.get("beam_context_block_ngram",
                                             recipe.beam_context_block_ngram)),
        beam_length_penalty=float(opt.get("beam_length_penalty",
                                          recipe.beam_length_penalty)),
        max_tokens=int(opt.get("label_truncate") or recipe.max_tokens))


@dataclass
class ParlaiFiles:
    model: BlenderbotModel
    opt: dict
    tokenizer: "ByteLevelDictionary | SubwordDictionary"


def load(path: str | Path) -> ParlaiFiles:
    """A ParlAI BlenderBot model file and what sits beside it."""
    path = Path(path)
    opt = _read_opt(path)
    ckpt = torch_file.load(path)
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "embeddings.weight" not in state:
        raise CheckpointError(str(path), "holds no BlenderBot weights (no model."
                              "embeddings.weight)", "pass the model file ParlAI saved")
    emb = state["embeddings.weight"]
    cfg = config_from_opt(opt, emb.shape[0], path.parent.name or "blenderbot")
    if tuple(emb.shape) != (cfg.vocab_size, cfg.embed_dim):  # before allocating anything
        raise CheckpointError(str(path), f"has embeddings of shape {tuple(emb.shape)} but its "
                              f".opt says embedding_size {cfg.embed_dim}", "copy the .opt of "
                              "the same model")
    tok = dictionary_beside(path, opt)
    if len(tok) != cfg.vocab_size:
        raise CheckpointError(str(path), f"has {cfg.vocab_size} embedding rows but its "
                              f"dictionary {len(tok)} entries", "the .dict belongs to another "
                              "model: copy the files of one model together")
    model = BlenderbotModel(cfg)
    model.load_state_dict({k: v.read() if isinstance(v, LazyTensor) else v
                           for k, v in state.items()})
    return ParlaiFiles(model.eval(), opt, tok)


class ByteLevelDictionary:
    """ParlAI's dictionary for the byte-level models: line order is the id (``__FP16_PAD__``
    rows included), the four specials first; text is encoded by HF ``tokenizers``' byte-level
    BPE with a leading space, and a ParlAI id is the BPE id + 4."""

    def __init__(self, tokens: list[str], vocab: Path, merges: Path):
        from tokenizers import ByteLevelBPETokenizer

        self.tokens = tokens
        self.ids = {t: i for i, t in enumerate(tokens)}
        self._bpe = ByteLevelBPETokenizer(str(vocab), str(merges), add_prefix_space=True)

    @classmethod
    def beside(cls, path: Path) -> "ByteLevelDictionary":
        files = _beside(path, ".dict", ".dict-vocab.json", ".dict-merges.txt")
        return cls(_dict_tokens(files[0]), files[1], files[2])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """ParlAI's ``txt2vec`` for bytelevelbpe: BPE pieces mapped through the dictionary."""
        unk = self.ids["__unk__"]
        return [self.ids.get(piece, unk) for piece in self._bpe.encode(text).tokens]

    def decode(self, ids: Sequence[int]) -> str:
        """ParlAI's ``vec2txt`` for bytelevelbpe: the pieces' bytes, the added leading space
        removed (specials and padding rows decode to nothing)."""
        vocab = self._bpe.get_vocab()
        bpe = [vocab[t] for t in (self.tokens[i] for i in ids if 0 <= i < len(self.tokens))
               if t in vocab]
        return self._bpe.decode(bpe, skip_special_tokens=False).lstrip(" ")


class SubwordDictionary:
    """ParlAI's dictionary for the 90M (``dict_tokenizer bpe``): text lower-cased, newlines
    as `` __newln__ ``, split on ``\\w+|[^\\w\\s]``, each piece segmented by subword-nmt's BPE
    (``PATH.dict.codecs``, version 0.2, ``@@`` continuation), unknown pieces ``__unk__``.
    Written here because subword-nmt's ``apply_bpe`` is the whole of what is needed (about
    forty lines: merges applied by rank until none applies)."""

    RETOK = re.compile(r"\w+|[^\w\s]", re.UNICODE)

    def __init__(self, tokens: list[str], codecs: Path, lower: bool = True):
        self.tokens, self.lower = tokens, lower
        self.ids = {t: i for i, t in enumerate(tokens)}
        lines = codecs.read_text(encoding="utf-8").splitlines()
        if lines and lines[0].startswith("#version:"):
            lines = lines[1:]
        ranks: dict[tuple[str, str], int] = {}
        for rank, line in enumerate(lines):
            pair = tuple(line.strip("\r\n ").split(" "))
            if len(pair) == 2:
                ranks.setdefault(pair, rank)
        self.ranks = ranks
        self._cache: dict[str, tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def _segment(self, word: str) -> tuple[str, ...]:
        """subword-nmt's ``encode`` for one word (codecs version 0.2)."""
        if word in self._cache:
            return self._cache[word]
        if len(word) == 1:
            return (word,)
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(self.ranks[p], i, p) for i, p in enumerate(zip(parts, parts[1:]))
                     if p in self.ranks]
            if not pairs:
                break
            best = min(pairs)[2]
            merged, i = [], 0
            for j in (i for _, i, p in pairs if p == best):
                if j < i:
                    continue  # overlapping pairs: "x x x" -> "xx x"
                merged += parts[i:j] + ["".join(best)]
                i = j + 2
            parts = merged + parts[i:]
        if parts[-1] == "</w>":
            parts = parts[:-1]
        elif parts[-1].endswith("</w>"):
            parts[-1] = parts[-1][:-4]
        self._cache[word] = tuple(parts)
        return self._cache[word]

    def pieces(self, text: str) -> list[str]:
        if self.lower:
            text = text.lower()
        out = []
        for word in self.RETOK.findall(text.replace("\n", " __newln__ ")):
            seg = self._segment(word)
            out += [p + "@@" for p in seg[:-1]] + [seg[-1]]
        return out

    def encode(self, text: str) -> list[int]:
        unk = self.ids["__unk__"]
        return [self.ids.get(piece, unk) for piece in self.pieces(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """ParlAI's ``vec2txt`` for bpe: pieces joined by spaces, ``@@ `` joins removed,
        ``__newln__`` back to a newline."""
        text = " ".join(self.tokens[i] for i in ids if 0 <= i < len(self.tokens))
        text = text.replace("@@ ", "")
        if text.endswith("@@"):
            text = text[:-2]
        return text.replace("__newln__", "\n")


def dictionary_beside(path: Path, opt: dict):
    """The dictionary the model's ``.opt`` names, from the files beside the model."""
    kind = opt.get("dict_tokenizer", "bytelevelbpe")
    if kind == "bytelevelbpe":
        return ByteLevelDictionary.beside(path)
    if kind == "bpe":
        files = _beside(path, ".dict", ".dict.codecs")
        return SubwordDictionary(_dict_tokens(files[0]), files[1],
                                 lower=bool(opt.get("dict_lower", True)))
    raise CheckpointError(str(path), f"uses dict_tokenizer {kind!r}", "this toolkit reads the "
                          "BlenderBot dictionaries: bytelevelbpe (400M .. 9.4B) and bpe (90M)")


def _beside(path: Path, *suffixes: str) -> list[Path]:
    """The dictionary files next to the model file, all of them or a CheckpointError."""
    files = [Path(f"{path}{suffix}") for suffix in suffixes]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(str(path), f"has no dictionary beside it ({', '.join(missing)} "
                              "missing)", "ParlAI's agent.save writes them with the model")
    return files


def _dict_tokens(path: Path) -> list[str]:
    """A ParlAI ``.dict``: ``token\\tcount`` lines, the line order is the id; ``\\n``, ``\\t``
    and ``\\r`` escaped in tokens (ParlAI's ``escape``)."""
    out = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line:
            continue
        token = line.split("\t")[0]
        out.append(token.replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r"))
    return out


def history_vector(tok, turns: Sequence[str], *, delimiter: str = "  ",
                   add_end: bool = True, truncate: int = 128) -> list[int]:
    """ParlAI's history vector: each turn tokenised on its own, joined by the tokenised
    delimiter, the end token appended (``history_add_global_end_token``), then cut from the
    left to ``truncate`` tokens (the end stays)."""
    sep = tok.encode(delimiter) if delimiter else []
    vec: list[int] = []
    for i, turn in enumerate(turns):
        if i:
            vec += sep
        vec += tok.encode(turn)
    if add_end:
        vec.append(END_ID)
    return vec[-truncate:] if truncate and len(vec) > truncate else vec

