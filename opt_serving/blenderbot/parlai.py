"""ParlAI's own BlenderBot files: ``PATH`` (the weights, read by the allow-list unpickler,
nothing executed), ``PATH.opt`` (the architecture and generation options, JSON), and the
dictionary with its byte-level BPE (``PATH.dict``, ``PATH.dict-vocab.json`` /
``PATH.dict-merges.txt``); and the history vector ParlAI builds from a conversation.

Paths stored inside ``PATH.opt`` are the trainer's: the files beside ``PATH`` are used, as
ParlAI falls back to them.
"""

from __future__ import annotations

import json
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
    tokenizer: "ByteLevelDictionary"


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
    tok = ByteLevelDictionary.beside(path)
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
        files = [Path(f"{path}.dict"), Path(f"{path}.dict-vocab.json"),
                 Path(f"{path}.dict-merges.txt")]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(str(path), f"has no dictionary beside it ({', '.join(missing)} "
                                  "missing)", "ParlAI's agent.save writes them with the model")
        tokens = [line.split("\t")[0] for line in files[0].read_text(encoding="utf-8")
                  .splitlines()]
        return cls(tokens, files[1], files[2])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """ParlAI's ``txt2vec`` for bytelevelbpe: BPE pieces mapped through the dictionary."""
        unk = self.ids["__unk__"]
        return [self.ids.get(piece, unk) for piece in self._bpe.encode(text).tokens]


def history_vector(tok: ByteLevelDictionary, turns: Sequence[str], *, delimiter: str = "  ",
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

