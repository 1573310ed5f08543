"""``LLM``: offline generation from Python, in the shape vLLM users know.

    from opt_serving import LLM
    with LLM("/data/bb3_30b/mp8") as llm:            # opt-serve's loading and TP workers
        outs = llm.generate(["Hello", [31414, 232]], max_tokens=16, temperature=0)
        outs[0].text, outs[0].token_ids

It runs the engine opt-serve runs (continuous batching, one tensor-parallel worker process
per part beyond the first), and ``generate`` takes the completions API's options under their
wire names (``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``n``,
``best_of``, ``logprobs``, ``echo``, the metaseq penalties), so it gives exactly the server's
results for the same options and seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.distributed as dist

from constants import DEFAULTS

from . import distributed
from .server.handles import chosen, choice
from .protocol import ChoiceResult, parse_request
from .server.serve import (ServeOptions, StartupError, prepare, spawn_workers, start_engine,
                           stop_workers)

Prompt = Union[str, Sequence[int]]


@dataclass(frozen=True)
class Completion:
    """One returned completion: its text and ids, and the whole choice as the API has it."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" or "length"
    prompt_index: int
    choice: ChoiceResult  # tokens, log-probs, offsets, top alternatives


class LLM:
    """Load ``checkpoint`` (a folder of model-parallel parts, as opt-serve takes) and generate.

    ``mp``: degree to run at (default: the number of parts); ``device`` / ``dtype`` as
    opt-serve's flags; ``kv_tokens``: KV-cache positions per rank; ``max_seq_len``: positions a
    sequence may use; ``assets``: folder of the tokenizer files."""

    def __init__(self, checkpoint: str, *, mp: int | None = None, device: str | None = None,
                 dtype: str | None = None, kv_tokens: int | None = None,
                 max_seq_len: int | None = None, assets: str | None = None,
                 demo_tokenizer: bool = False, log_level: str = "WARNING"):
        constants = DEFAULTS if max_seq_len is None else dataclasses.replace(
            DEFAULTS, max_seq_len=max_seq_len)
        options = ServeOptions(checkpoint=str(checkpoint), constants=constants,
                               host="127.0.0.1", port=0, assets=assets, kv_tokens=kv_tokens,
                               device=device, dtype=dtype, demo_tokenizer=demo_tokenizer, mp=mp)
        env = distributed.rank_env()
        if env.world_size > 1:
            raise StartupError("LLM runs in one process and spawns its own workers; under "
                               "torchrun or SLURM run opt-serve instead")
        self._threads = torch.get_num_threads()  # loading sets it per rank on a CPU
        plan, self.tokenizer = prepare(options, env)
        self.limits, self._workers = constants, []
        if plan.world_size > 1:
            self._workers, env = spawn_workers(plan, log_level)
        try:
            self.engine, _ = start_engine(plan, env, self.tokenizer)
        except BaseException:
            self._teardown()
            raise
        self.cfg, self.world_size = plan.cfg, plan.world_size

    def generate(self, prompts: Prompt | Sequence[Prompt], **options) -> list[Completion]:
        """Completions for ``prompts`` (texts or token-id lists, mixed as you like), ``n``
        per prompt in prompt order; ``options`` as in the completions API."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        request = parse_request({**options, "prompt": ids}, self.limits)
        if request.stream:
            raise ValueError("stream is for the HTTP API; generate returns whole completions")
        handle = self.engine.submit(request, ids)
        outs = []
        for r in chosen(handle.request, handle.result()):
            c = choice(self.tokenizer, handle.request, r)  # with echo, text has the prompt
            outs.append(Completion(c.text, r.generated, r.finish_reason, r.prompt_index, c))
        return outs

    def close(self) -> None:
        """Stop the engine and the worker processes (also on leaving a ``with`` block)."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
            self.engine = None
        self._teardown()

    def _teardown(self) -> None:
        stop_workers(self._workers)
        self._workers = []
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._threads)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
