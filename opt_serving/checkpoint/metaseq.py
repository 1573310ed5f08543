"""The non-tensor parts of a checkpoint that metaseq's loader requires.

metaseq's ``load_checkpoint_to_cpu`` / ``build_model`` need: ``cfg`` (a dict whose "model" is an
argparse.Namespace with ``use_sharded_state`` and ``criterion``), ``optimizer_history`` (it
reads the last entry), ``extra_state`` with ``train_iterator`` (or ``epoch``), and ``args``.
Training-only state (``last_optimizer_state``, ``shard_metadata``, tokenization caches) is
dropped; anything we could not unpickle safely (inert placeholders) is dropped too.
"""

from __future__ import annotations

import argparse
import copy

from ..config import OPTConfig
from .safe_pickle import Placeholder

CRITERION = "vocab_parallel_cross_entropy"


def _plain(obj):
    """A deep copy without placeholders (values we refused to instantiate)."""
    if isinstance(obj, Placeholder):
        return None
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if not isinstance(v, Placeholder)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj if not isinstance(v, Placeholder))
    if isinstance(obj, argparse.Namespace):
        return argparse.Namespace(**_plain(vars(obj)))
    return copy.deepcopy(obj)


def _model_namespace(source_cfg, cfg: OPTConfig, mp: int) -> argparse.Namespace:
    base = cfg.to_metaseq(mp)
    if isinstance(source_cfg, argparse.Namespace):
        merged = {**vars(base), **vars(_plain(source_cfg))}
    elif isinstance(source_cfg, dict):
        merged = {**vars(base), **_plain(source_cfg)}
    else:
        merged = vars(base)
    merged.update(model_parallel_size=mp, use_sharded_state=True)
    merged.setdefault("criterion", CRITERION)
    if not merged.get("criterion"):
        merged["criterion"] = CRITERION
    return argparse.Namespace(**merged)


def part_metadata(source: dict | None, cfg: OPTConfig, mp: int, *, qkv_layout: str = "kvq",
                  origin: str = "") -> dict:
    """Everything but "model" for one output part at degree ``mp``."""
    source = source or {}
    src_cfg = source.get("cfg") if isinstance(source.get("cfg"), dict) else {}
    out_cfg = {k: _plain(v) for k, v in src_cfg.items()
               if k != "model" and not isinstance(v, Placeholder)}
    out_cfg["model"] = _model_namespace(src_cfg.get("model", source.get("args")), cfg, mp)
    for section, key, value in (("common", "model_parallel_size", mp),
                                ("distributed_training", "use_sharded_state", True)):
        sec = out_cfg.get(section)
        out_cfg[section] = {**(sec if isinstance(sec, dict) else {}), key: value}
    crit = out_cfg.get("criterion")
    if not isinstance(crit, dict) or not crit.get("_name"):
        out_cfg["criterion"] = {"_name": CRITERION}

    history = source.get("optimizer_history")
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        last = _plain(history[-1])
        history = [{"criterion_name": last.get("criterion_name", "VocabParallelCrossEntropyCriterion"),
                    "optimizer_name": last.get("optimizer_name", "MemoryEfficientFP16Optimizer"),
                    "lr_scheduler_state": last.get("lr_scheduler_state", {}),
                    "num_updates": last.get("num_updates", 0)}]
    else:
        history = [{"criterion_name": "VocabParallelCrossEntropyCriterion",
                    "optimizer_name": "MemoryEfficientFP16Optimizer",
                    "lr_scheduler_state": {}, "num_updates": 0}]

    extra = source.get("extra_state") if isinstance(source.get("extra_state"), dict) else {}
    iterator = extra.get("train_iterator")
    epoch = iterator.get("epoch", 1) if isinstance(iterator, dict) else extra.get("epoch", 1)
    if not isinstance(epoch, int):
        epoch = 1
    extra_out = {"train_iterator": {"epoch": epoch}, "epoch": epoch,
                 "reshard": {"tool": "opt-serving reshard", "mp": mp, "qkv_layout": qkv_layout,
                             "origin": origin}}
    return {"cfg": out_cfg, "optimizer_history": history, "extra_state": extra_out,
            "args": None}
