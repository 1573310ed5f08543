"""Finding and loading a BlenderBot 1 wherever a user keeps it: a ParlAI model file, a
``zoo:`` path under ParlAI's data folder, or a Hugging Face folder; and the history settings
(``delimiter``, the global end token, ``text_truncate``) that turn a conversation into the
encoder's input.

    zoo:blender/blender_3B/model  ->  $PARLAI_DATAPATH/models/blender/blender_3B/model
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from opt_serving.checkpoint.errors import CheckpointError

from . import parlai
from .model import BlenderbotModel
from .search import SearchOptions

ZOO = "zoo:"


def resolve(path: str | os.PathLike, datapath: str | None = None) -> Path:
    """A ``zoo:`` path under ``datapath`` (else ``$PARLAI_DATAPATH``); other paths as given.
    A missing zoo model is an error naming the files expected where."""
    text = str(path)
    if not text.startswith(ZOO):
        return Path(text)
    root = datapath or os.environ.get("PARLAI_DATAPATH")
    rel = text[len(ZOO):]
    if not root:
        raise CheckpointError(text, "is a ParlAI zoo path but no data folder is known",
                              "pass --datapath DIR (or set PARLAI_DATAPATH) to the folder "
                              "that holds models/" + rel)
    where = Path(root) / "models" / rel
    needed = [where, Path(f"{where}.opt"), Path(f"{where}.dict")]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise CheckpointError(text, f"is not under {root} ({', '.join(missing)} missing)",
                              "download the model with ParlAI once (parlai interactive -mf "
                              f"{text}) or copy its files there; nothing is downloaded here")
    return where


def is_blenderbot(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a BlenderBot 1 (so that ``LLM`` and ``opt-serve`` pick this
    engine): a zoo path, a file with ParlAI's ``.opt`` beside it, or an HF Blenderbot folder."""
    text = str(path)
    if text.startswith(ZOO):
        return True
    p = Path(text)
    if p.is_file() and Path(f"{text}.opt").is_file():
        return True
    config = p / "config.json"
    if p.is_dir() and config.is_file() and config.stat().st_size < (1 << 20):
        try:
            arch = json.loads(config.read_text(encoding="utf-8")).get("architectures") or ()
        except (ValueError, UnicodeDecodeError, AttributeError):
            return False
        return any(str(a).startswith("Blenderbot") for a in arch)
    return False


@dataclass(frozen=True)
class History:
    """How ParlAI turns a conversation into the encoder's input (its ``.opt``)."""

    delimiter: str = "\n"
    add_end: bool = False  # history_add_global_end_token == "end"
    truncate: int | None = None  # text_truncate

    @classmethod
    def from_opt(cls, opt: dict) -> "History":
        delimiter = opt.get("delimiter")
        truncate = opt.get("text_truncate")
        if not truncate and isinstance(opt.get("truncate"), int) and opt["truncate"] > 0:
            truncate = opt["truncate"]  # ParlAI: text_truncate falls back to truncate
        return cls("\n" if delimiter is None else str(delimiter),
                   opt.get("history_add_global_end_token") == "end",
                   int(truncate) if truncate else None)

    def vector(self, tok, turns: Sequence[str]) -> list[int]:
        return parlai.history_vector(tok, turns, delimiter=self.delimiter, add_end=self.add_end,
                                     truncate=self.truncate or 0)


@dataclass
class Loaded:
    model: BlenderbotModel
    tokenizer: object | None  # .encode(text) / .decode(ids); None: token ids only
    search: SearchOptions  # the model's own defaults, else the recipe
    history: History
    opt: dict
    name: str


def load(path: str | os.PathLike, *, datapath: str | None = None,
         overrides: dict | None = None) -> Loaded:
    """A BlenderBot from ParlAI's files or an HF folder; ``overrides``: ParlAI options that
    replace the file's (its ``-o`` / command line: ``delimiter``, ``beam_size``, ...)."""
    where = resolve(path, datapath)
    overrides = dict(overrides or {})
    if where.is_dir():
        from .hf import load_folder

        model = load_folder(where)
        opt = {**_hf_generation(where), **overrides}
        tok = _hf_tokenizer(where)
        name = where.name
    else:
        files = parlai.load(where)
        model, tok, opt = files.model, files.tokenizer, {**files.opt, **overrides}
        name = where.parent.name or where.name
    return Loaded(model, tok, parlai.search_options(opt), History.from_opt(opt), opt, name)


def _hf_generation(folder: Path) -> dict:
    """An HF folder's generation settings in ParlAI's names (HF's Blenderbot configs carry
    the recipe: num_beams 10, min_length 20, no_repeat_ngram_size 3, length_penalty 0.65)."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {"delimiter": "  ", "history_add_global_end_token": "end",
           "text_truncate": cfg.get("max_position_embeddings")}
    for ours, theirs in (("beam_size", "num_beams"), ("beam_min_length", "min_length"),
                         ("beam_block_ngram", "no_repeat_ngram_size"),
                         ("beam_context_block_ngram", "encoder_no_repeat_ngram_size"),
                         ("beam_length_penalty", "length_penalty"),
                         ("label_truncate", "max_length")):
        if isinstance(cfg.get(theirs), (int, float)) and not isinstance(cfg[theirs], bool):
            out[ours] = cfg[theirs]
    if out.get("beam_size", 1) > 1:
        out["inference"] = "beam"
    return out


class HFByteLevel:
    """An HF Blenderbot folder's tokenizer (``vocab.json`` + ``merges.txt``): byte-level BPE
    whose ids are the model's, as HF's BlenderbotTokenizer (a leading space added)."""

    def __init__(self, vocab: Path, merges: Path):
        from tokenizers import ByteLevelBPETokenizer

        self._bpe = ByteLevelBPETokenizer(str(vocab), str(merges), add_prefix_space=True)

    def encode(self, text: str) -> list[int]:
        return self._bpe.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._bpe.decode([i for i in ids if i > 3]).lstrip(" ")


def _hf_tokenizer(folder: Path):
    """BlenderbotSmall's (90M) tokenizer is ParlAI's subword BPE under other file names: only
    the byte-level one is read here; otherwise prompts are token ids."""
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") == "blenderbot" and vocab.is_file() and merges.is_file():
        return HFByteLevel(vocab, merges)
    return None


def describe(path: str | os.PathLike, *, datapath: str | None = None) -> dict:
    """What a BlenderBot file or folder holds, without reading its weights (``reshard
    inspect``): the architecture, the closest preset, parameters, dtype, the generation and
    history options, the dictionary files and the bytes on disk."""
    from opt_serving.checkpoint import torch_file

    from .config import PRESETS
    from .hf import ARCHITECTURES, config_from_hf

    where = resolve(path, datapath)
    if where.is_dir():
        hf = json.loads((where / "config.json").read_text(encoding="utf-8"))
        cfg = config_from_hf(hf, where.name)
        weights = [p for p in (where / "model.safetensors", where / "pytorch_model.bin")
                   if p.is_file()]
        dtypes = _safetensors_dtypes(weights[0]) if weights and \
            weights[0].suffix == ".safetensors" else _torch_dtypes(weights[0]) if weights \
            else []
        kind = "Hugging Face " + next((a for a in hf.get("architectures") or ()
                                       if a in ARCHITECTURES), "Blenderbot") + " folder"
        extra = [p.name for p in (where / "vocab.json", where / "merges.txt") if p.is_file()]
        files = weights + [where / "config.json"]
        opt = _hf_generation(where)
    else:
        opt = parlai._read_opt(where)
        state = torch_file.load(where).get("model") or {}
        emb = state.get("embeddings.weight")
        if emb is None:
            raise CheckpointError(str(where), "holds no BlenderBot weights",
                                         "pass the model file ParlAI saved")
        cfg = parlai.config_from_opt(opt, emb.shape[0], where.parent.name or where.name)
        dtypes = sorted({str(t.dtype).removeprefix("torch.")
                         for name, t in torch_file.tensors(state) if name != "START"})
        kind = "ParlAI model file (" + opt.get("model", "transformer/generator") + ")"
        files = [p for p in where.parent.glob(where.name + "*") if p.is_file()]
        extra = sorted(p.name for p in files if p.name != where.name)
    closest = min(PRESETS.values(), key=lambda p: abs(p.param_count() - cfg.param_count()))
    search = parlai.search_options(opt)
    return {
        "blenderbot": True, "path": str(path), "kind": kind, "model": cfg.name, "variant": cfg.variant,
        "config": {"encoder_layers": cfg.num_encoder_layers,
                   "decoder_layers": cfg.num_decoder_layers, "embed_dim": cfg.embed_dim,
                   "num_heads": cfg.num_heads, "ffn_dim": cfg.ffn_dim,
                   "vocab_size": cfg.vocab_size, "max_positions": cfg.max_positions},
        "closest_preset": closest.name, "parameters": cfg.param_count(),
        "dtype": dtypes[0] if len(dtypes) == 1 else " + ".join(dtypes) or "unknown",
        "generation": dataclasses.asdict(search),
        "history": dataclasses.asdict(History.from_opt(opt)),
        "files": extra, "bytes_on_disk": sum(p.stat().st_size for p in files),
    }


def _safetensors_dtypes(path: Path) -> list[str]:
    """dtypes from a safetensors header (its first 8 bytes are the header's length)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > 100 << 20:
            return []
        header = json.loads(f.read(n))
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    return sorted({names.get(v.get("dtype"), str(v.get("dtype")).lower())
                   for k, v in header.items() if k != "__metadata__"})


def _torch_dtypes(path: Path) -> list[str]:
    from opt_serving.checkpoint import torch_file

    return sorted({str(t.dtype).removeprefix("torch.")
                   for _, t in torch_file.tensors(torch_file.load(path))})
