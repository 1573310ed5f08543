"""What a checkpoint file or folder holds, from its pickles alone (no tensor bytes are read).

``inspect_path`` returns a JSON-ready dict (kind, config, closest preset, parameter count,
dtype, model-parallel degree and FSDP shards per part, valid degrees, size on disk);
``format_report`` renders it for a terminal.
"""

from __future__ import annotations

import os
from pathlib import Path

from opt_serving.checkpoint import torch_file
from opt_serving.checkpoint.assemble import saved_layout
from opt_serving.checkpoint.errors import CheckpointError
from opt_serving.checkpoint.formats import PART_RE, Part, discover, dtype_name, model_config
from opt_serving.capacity.planner import DTYPES as DTYPE_SIZES
from opt_serving.config import closest_preset, same_shape
from opt_serving.split_rules import is_buffer

from .core import ASSETS
from .manifest import ManifestError, read_manifest

_KINDS = {
    "fused": "consolidated checkpoint, fused qkv_proj",
    "separate": "consolidated checkpoint, separate q_proj/k_proj/v_proj",
    "parts": "model-parallel parts",
    "part": "one model-parallel part",
    "fsdp": "flattened FSDP shards",
    "fsdp-shard": "one flattened FSDP shard",
}


def _raw_checkpoint(path: str) -> dict:
    obj = torch_file.load(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(path, "is a torch file but not a metaseq checkpoint (no 'model' "
                              "state dict)", "pass a metaseq checkpoint (consolidated.pt, "
                              "*-model_part-N.pt or FSDP shards)")
    return obj


def cfg_degree(ckpt: dict):
    cfg = ckpt.get("cfg")
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else ckpt.get("args")
    if isinstance(model_cfg, dict):
        return model_cfg.get("model_parallel_size")
    return getattr(model_cfg, "model_parallel_size", None)


def inspect_path(path: str) -> dict:
    """Describe the checkpoint at ``path`` (a file, a folder, a glob or <folder>/reshard.pt).

    A single part or shard file is described on its own; anything else is grouped into
    parts[r][shard] by ``discover``, which also reports missing parts.
    """
    from opt_serving.blenderbot.files import describe, is_blenderbot

    if is_blenderbot(path):  # nothing to reshard: described for what it is
        return describe(path)
    single = os.path.isfile(path)
    files = [[path]] if single else discover([path])
    first = files[0][0]
    ckpt = _raw_checkpoint(first)
    model = ckpt["model"]
    lazy = dict(torch_file.tensors(model))
    flattened = any(k.endswith("flat_param_0") for k in model)
    separate = any(k.endswith("self_attn.q_proj.weight") for k in model)
    cfg = model_config(Part(0, [first], ckpt))
    preset = closest_preset(cfg)
    match = PART_RE.match(os.path.basename(first))

    if flattened:
        kind = "fsdp-shard" if single else "fsdp"
    elif single and match and cfg_degree(ckpt) not in (None, 1):
        kind = "part"
    elif single or len(files) == 1:
        kind = "separate" if separate else "fused"
    else:
        kind = "parts"

    if kind == "fused":
        layout = saved_layout(Part(0, [first], ckpt))
        qkv = ("[K; V; Q] (metaseq's global order)" if layout else
               "ambiguous: cfg says degree > 1, so the row order cannot be told apart; "
               "resharding needs --input-qkv global or --input-qkv concat:N")
    elif separate:
        qkv = "separate k, v, q (fused per rank when resharded)"
    else:
        qkv = "per-rank [K_r; V_r; Q_r] (metaseq's model-parallel order)"

    dtypes = sorted({dtype_name(t.dtype) for name, t in lazy.items() if not is_buffer(name)})
    all_files = [f for shards in files for f in shards]
    folder = Path(first).parent
    report = {
        "path": path,
        "kind": _KINDS[kind],
        "files": len(all_files),
        "model": cfg.name,
        "closest_preset": preset.name,
        "exact_preset": same_shape(preset, cfg),
        "config": {"num_layers": cfg.num_layers, "embed_dim": cfg.embed_dim,
                   "num_heads": cfg.num_heads, "ffn_dim": cfg.ffn_dim,
                   "vocab_size": cfg.vocab_size, "max_positions": cfg.max_positions},
        "parameters": cfg.param_count(),
        "dtype": dtypes[0] if len(dtypes) == 1 else "mixed " + " + ".join(dtypes),
        # A lone part or shard: the degree is what its cfg says; a set: how many parts there are.
        "mp": (cfg_degree(ckpt) or 1) if single else len(files),
        "dp_shards_per_part": len(files[0]) if not single else None,
        "cfg_model_parallel_size": cfg_degree(ckpt),
        "qkv": qkv,
        "valid_mp": cfg.valid_mp_degrees(),
        "bytes_on_disk": sum(os.path.getsize(f) for f in all_files),
        "training_state": sorted(k for k in ("last_optimizer_state", "shard_metadata")
                                 if k in ckpt),
        "assets": [a for a in ASSETS if (folder / a).is_file()],
    }
    if single and match:
        report["part"] = int(match["part"])
        report["shard"] = int(match["shard"]) if match["shard"] is not None else None
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            m = read_manifest(manifest)
            source = m.get("source")
            files = source.get("files") if isinstance(source, dict) else None
            report["manifest"] = {"mp": m.get("mp"), "dtype": m.get("dtype"),
                                  "parts": len(m["parts"]),
                                  "source": files[:1] if isinstance(files, list) else []}
        except (OSError, ManifestError) as e:
            report["manifest"] = f"unreadable: {e}"
    return report


def _size(n: float) -> str:
    for prefix in ("", "k", "M", "G"):
        if n < 1000:
            return f"{n:.1f} {prefix}B" if prefix else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} TB"


def _count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return str(n)


def format_report(r: dict) -> str:
    if r.get("blenderbot"):
        return _format_blenderbot(r)
    c = r["config"]
    itemsize = DTYPE_SIZES[r["dtype"]].weight_bytes if r["dtype"] in DTYPE_SIZES else 2
    preset = (f"{r['closest_preset']} (exact)" if r["exact_preset"]
              else f"custom, closest preset {r['closest_preset']}")
    kind = r["kind"]
    if "part" in r:
        kind += f" (part {r['part']}" + (f", shard {r['shard']})" if r["shard"] is not None
                                         else ")")
    degree = str(r["mp"])
    if r["dp_shards_per_part"] and r["dp_shards_per_part"] > 1:
        degree += f" x {r['dp_shards_per_part']} FSDP shards per part"
    if r["cfg_model_parallel_size"] is not None:
        degree += f" (cfg says model_parallel_size={r['cfg_model_parallel_size']})"
    rows = [
        ("kind", kind),
        ("model", f"{r['model']}: {c['num_layers']} layers, d={c['embed_dim']}, "
                  f"{c['num_heads']} heads, ffn {c['ffn_dim']}, {c['max_positions']} positions"),
        ("preset", preset),
        ("parameters", f"{_count(r['parameters'])} "
                       f"({_size(r['parameters'] * itemsize)} at {r['dtype']})"),
        ("dtype", r["dtype"]),
        ("qkv", r["qkv"]),
        ("MP degree", degree),
        ("valid --mp", ", ".join(map(str, r["valid_mp"]))),
        ("size on disk", f"{_size(r['bytes_on_disk'])} in {r['files']} file(s)"),
    ]
    if r["training_state"]:
        rows.append(("training state", ", ".join(r["training_state"]) +
                     " (dropped by reshard)"))
    if r["assets"]:
        rows.append(("assets", ", ".join(r["assets"])))
    if "manifest" in r:
        m = r["manifest"]
        rows.append(("manifest", m if isinstance(m, str) else
                     f"written by reshard: mp{m['mp']}, {m['dtype']}, {m['parts']} "
                     f"part{'s' if m['parts'] != 1 else ''} "
                     f"(check with `reshard verify`)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join([r["path"]] + [f"  {k:<{width}}  {v}" for k, v in rows])


def _format_blenderbot(r: dict) -> str:
    c, g, h = r["config"], r["generation"], r["history"]
    rows = [
        ("kind", f"BlenderBot 1, {r['kind']}"),
        ("model", f"{r['model']}: {r['variant']}, {c['encoder_layers']} encoder + "
                  f"{c['decoder_layers']} decoder layers, d={c['embed_dim']}, "
                  f"{c['num_heads']} heads, ffn {c['ffn_dim']}, vocabulary {c['vocab_size']}, "
                  f"{c['max_positions']} positions"),
        ("preset", f"closest {r['closest_preset']}"),
        ("parameters", f"{_count(r['parameters'])}"),
        ("dtype", r["dtype"]),
        ("generation", f"{g['inference']}, beam {g['beam_size']}, min length "
                       f"{g['beam_min_length']}, n-gram blocking {g['beam_block_ngram']} / "
                       f"context {g['beam_context_block_ngram']}, length penalty "
                       f"{g['beam_length_penalty']}, {g['max_tokens']} tokens"),
        ("history", f"delimiter {h['delimiter']!r}, end token {'added' if h['add_end'] else 'not added'}, "
                    f"truncated to {h['truncate'] or 'no limit'}"),
        ("files", ", ".join(r["files"]) or "-"),
        ("size on disk", _size(r["bytes_on_disk"])),
        ("resharding", "not needed: it runs on one device (serve it with opt-serve "
                       "--model-file, chat with safe_interactive -mf)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([r["path"]] + [f"  {k:<{width}}  {v}" for k, v in rows])
