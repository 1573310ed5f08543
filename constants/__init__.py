"""The completions service's constants: one frozen, documented object.

metaseq keeps these as module globals swapped by an environment variable. Here they are one
frozen dataclass; `opt-serve` flags override fields with ``dataclasses.replace`` and
``from_module`` reads a metaseq-style constants module for people migrating from
``metaseq-api-local``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import types
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServiceConstants:
    # -- metaseq's names (metaseq/service/constants.py) ------------------------------------------
    max_seq_len: int = 2048
    """Positions the model can attend to: prompt (with its leading </s>) plus generated tokens."""
    max_batch_tokens: int = 3072
    """Tokens one forward pass may prefill (prompts are chunked to it) and the KV-cache budget
    in tokens when it is not sized from free GPU memory."""
    max_batch_size: int = 2048
    """Upper bound on sequences decoded together (metaseq's BATCH_SIZE: "silly high because we
    batch by tokens"); the KV budget is the real limit."""
    default_port: int = 6010
    max_beam: int = 16
    """Largest `n` and `best_of` a request may ask for."""
    checkpoint_folder: str | None = None
    """metaseq's CHECKPOINT_FOLDER; `--checkpoint-folder` wins over it."""

    # -- ours: limits metaseq did not have (its defects 5 and 8) ---------------------------------
    default_host: str = "127.0.0.1"
    """Loopback unless `--host` says otherwise (metaseq bound 0.0.0.0)."""
    default_max_tokens: int = 32
    """Tokens generated when a request gives no `max_tokens` (metaseq generated up to 2048).
    32 covers every BB3 module except the 128-token replies, which always send max_tokens."""
    max_sequences: int = 64
    """Sequences one request may start: its prompts times `best_of`."""
    max_logprobs: int = 20
    """Largest `logprobs` (top-k alternatives per token), as vLLM's default."""
    max_stop_sequences: int = 16
    max_body_bytes: int = 4 * 1024 * 1024
    """Request body limit: 64 prompts of 2048 ids written as JSON fit with room to spare."""
    max_queued_requests: int = 128
    """Requests waiting for admission before new ones get 429 (TGI's default concurrency)."""
    kv_block_size: int = 16
    """Positions per block of the paged KV cache (vLLM's default): a sequence holds
    ceil(tokens / 16) blocks, and prompts share cached blocks of 16 tokens."""
    request_timeout_s: float = 300.0
    """A request not finished after this answers 504 and frees its slots."""
    worker_timeout_s: float = 60.0
    """A worker rank silent for this long is dead: /readyz turns 503 and the server exits."""
    client_read_timeout_s: float = 30.0
    """A client must send a request's headers and body within this many seconds of its first
    byte, or it is disconnected (clients that trickle bytes would otherwise hold connections)."""

    def __post_init__(self):
        positive = ("max_seq_len", "max_batch_tokens", "max_batch_size", "max_beam",
                    "default_max_tokens", "max_sequences", "max_body_bytes",
                    "max_queued_requests", "kv_block_size", "request_timeout_s", "worker_timeout_s",
                    "client_read_timeout_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.default_port < 65536:
            raise ValueError(f"default_port {self.default_port} is not a TCP port")
        if self.default_max_tokens > self.max_seq_len - 2:
            raise ValueError(f"default_max_tokens {self.default_max_tokens} leaves no room for a "
                             f"prompt in max_seq_len {self.max_seq_len}")


DEFAULTS = ServiceConstants()

# metaseq constants-module name -> field. Names metaseq has that a server here does not use
# (MODEL_PARALLEL, TOTAL_WORLD_SIZE: read from the checkpoint parts; LAUNCH_ARGS,
# INFERENCE_ARG_OVERRIDES, BPE_*: replaced by flags and the asset search) are ignored.
METASEQ_NAMES: types.MappingProxyType = types.MappingProxyType({
    "MAX_SEQ_LEN": "max_seq_len",
    "MAX_BATCH_TOKENS": "max_batch_tokens",
    "BATCH_SIZE": "max_batch_size",
    "DEFAULT_PORT": "default_port",
    "MAX_BEAM": "max_beam",
    "CHECKPOINT_FOLDER": "checkpoint_folder",
})


def _load(path_or_name: str) -> types.ModuleType:
    path = Path(path_or_name)
    if path.suffix == ".py" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"constants module {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"_metaseq_constants_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(path_or_name)


def from_module(path_or_name: str, base: ServiceConstants = DEFAULTS) -> ServiceConstants:
    """``base`` with the values a metaseq-style constants module sets (a .py path or a dotted
    module name). Only UPPER_CASE names in METASEQ_NAMES or matching a field are read."""
    module = _load(path_or_name)
    fields = {f.name for f in dataclasses.fields(ServiceConstants)}
    overrides = {}
    for name, value in vars(module).items():
        field = METASEQ_NAMES.get(name, name.lower())
        if not name.isupper() or field not in fields:
            continue
        default = getattr(DEFAULTS, field)
        expected = str if default is None else type(default)  # None only for paths
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is not None and (not isinstance(value, expected) or isinstance(value, bool)):
            raise TypeError(f"{path_or_name}: {name} = {value!r} should be "
                            f"{expected.__name__}")
        overrides[field] = value
    return dataclasses.replace(base, **overrides)
