"""``LLM``: offline generation from Python, in the shape vLLM users know.

    from opt_serving import LLM

    if __name__ == "__main__":                          # workers re-import this script
        with LLM("/data/bb3_30b/mp8") as llm:            # opt-serve's loading and TP workers
            outs = llm.generate(["Hello", [31414, 232]], max_tokens=16, temperature=0)
            outs[0].text, outs[0].token_ids

It runs the engine opt-serve runs (``runtime``: continuous batching, one tensor-parallel
worker process per part beyond the first), and ``generate`` takes the completions API's
options under their wire names (``max_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop``, ``n``, ``best_of``, ``logprobs``, ``echo``, the metaseq penalties), so it gives
exactly the server's results for the same options and seed. Nothing here imports the HTTP
server (Flask, waitress, Prometheus).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from constants import DEFAULTS

from . import distributed
from .protocol import (ChoiceResult, Prompt, Renderer, new_request_id, parse_request,
                       unknown_option_error, wire_names)
from .runtime.naming import python_name
from .runtime.startup import (ServeOptions, StartupError, prepare, refuse_unguarded_reentry,
                              spawn_workers, start_engine, stop_workers)

PROMPT_FORMS = ("a string, a list of token ids (ints), or a list of those (strings and id "
                "lists may be mixed)")


@dataclass(frozen=True)
class Completion:
    """One returned completion: its text and ids, and the whole choice as the API has it."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" or "length"
    prompt_index: int
    choice: ChoiceResult  # tokens, log-probs, offsets, top alternatives


def _is_ids(p) -> bool:
    return (isinstance(p, (list, tuple)) and len(p) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) for t in p))


def prompt_list(prompts) -> list[Prompt]:
    """``prompts`` as a list of prompts; TypeError saying what a prompt may be otherwise."""
    if isinstance(prompts, str) or _is_ids(prompts):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(
            isinstance(p, str) or _is_ids(p) for p in prompts):
        return list(prompts)
    shown = repr(prompts)
    raise TypeError(f"prompts must be {PROMPT_FORMS}; got {type(prompts).__name__} "
                    f"{shown[:60]}{'...' if len(shown) > 60 else ''}")


class LLM:
    """Load ``checkpoint`` (a folder of model-parallel parts, as opt-serve takes) and generate.
    A BlenderBot 1 (a ParlAI model file, a ``zoo:`` path, an HF Blenderbot folder) gives a
    ``blenderbot.llm.BlenderbotLLM`` instead, which takes ParlAI's options.

    ``mp``: degree to run at (default: the number of parts); ``device`` / ``dtype`` as
    opt-serve's flags; ``kv_tokens``: KV-cache positions per rank; ``max_seq_len``: positions a
    sequence may use; ``assets``: folder of the tokenizer files; ``demo_tokenizer``: a
    byte-level stand-in when none are found (random demo models only); ``cuda_graphs``: replay
    decode steps as CUDA graphs on a GPU (opt-serve's ``--no-cuda-graphs``). At ``mp`` > 1 it spawns
    worker processes, which import the calling script again: create the LLM under
    ``if __name__ == "__main__":``."""

    def __new__(cls, checkpoint: str = "", **kwargs):
        from .blenderbot.files import is_blenderbot

        if cls is LLM and is_blenderbot(checkpoint):
            from .blenderbot.llm import BlenderbotLLM

            return BlenderbotLLM(checkpoint, **kwargs)  # not an LLM: __init__ is not run
        return super().__new__(cls)

    def __init__(self, checkpoint: str, *, mp: int | None = None, device: str | None = None,
                 dtype: str | None = None, kv_tokens: int | None = None,
                 max_seq_len: int | None = None, assets: str | None = None,
                 demo_tokenizer: bool = False, cuda_graphs: bool = True,
                 log_level: str = "WARNING"):
        refuse_unguarded_reentry()
        constants = DEFAULTS if max_seq_len is None else dataclasses.replace(
            DEFAULTS, max_seq_len=max_seq_len)
        options = ServeOptions(checkpoint=str(checkpoint), constants=constants, assets=assets,
                               kv_tokens=kv_tokens, device=device, dtype=dtype,
                               demo_tokenizer=demo_tokenizer, mp=mp, cuda_graphs=cuda_graphs,
                               seq_len_given=max_seq_len is not None, naming=python_name)
        env = distributed.rank_env()
        if env.world_size > 1:
            raise StartupError("LLM runs in one process and spawns its own workers; under "
                               "torchrun or SLURM run opt-serve instead")
        self._threads = torch.get_num_threads()  # loading sets it per rank on a CPU
        self.engine = None
        plan, self.tokenizer = prepare(options, env)
        self._workers = []
        if plan.world_size > 1:
            self._workers, env = spawn_workers(plan, log_level)
        try:
            self.engine, loaded = start_engine(plan, env, self.tokenizer, self._workers)
        except BaseException:
            self._teardown()
            raise
        self.limits = loaded.limits  # max_seq_len: the effective per-sequence limit
        self.cfg, self.world_size = plan.cfg, plan.world_size

    def generate(self, prompts: Prompt | Sequence[Prompt], **options) -> list[Completion]:
        """Completions for ``prompts`` (texts or token-id lists, mixed as you like), ``n``
        per prompt in prompt order; ``options`` as in the completions API. A misspelt option
        is a TypeError naming the nearest one; a bad value a ValueError naming the option."""
        if options.get("stream"):
            raise ValueError("stream is for the HTTP API; generate returns whole completions")
        unknown = sorted(set(options) - wire_names() - {"stream"})
        if unknown:
            raise TypeError(unknown_option_error(unknown))
        if self.engine is None:
            raise RuntimeError("this LLM is closed")
        prompts = prompt_list(prompts)
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(self.tokenizer.encode_batch(texts) if texts else ())
        ids = [next(encoded) if isinstance(p, str) else list(p) for p in prompts]
        request = parse_request({**options, "prompt": ids}, self.limits)
        handle = self.engine.submit(request, ids)
        renderer = Renderer(self.tokenizer, handle.request, model=self.cfg.name,
                            request_id=new_request_id(), created=handle.created)
        outs = []
        for r in renderer.chosen(handle.result()):
            c = renderer.choice(r)  # with echo, text has the prompt
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
