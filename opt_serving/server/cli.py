"""``opt-serve``: parse arguments, build ``ServeOptions`` and call ``serve.serve``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap

from constants import DEFAULTS, from_module
from opt_serving.runtime.sizing import CPU_SEQUENCES

EXIT_BAD_INPUT = 2

DESCRIPTION = """\
Serve an OPT / BlenderBot-3 checkpoint over HTTP with metaseq's completions API (and OpenAI's).

Finds the model-parallel parts in --checkpoint-folder (reshard-model_part-*.pt; metaseq's
virtual <folder>/reshard.pt path works too), starts one worker per part on this machine (one
GPU each when CUDA is there, CPU otherwise), loads each rank's part only, and serves HTTP from
rank 0. Under torchrun or srun (e.g. BB3-175B at MP16 on 2 nodes x 8 GPUs) run the same command
on every process: ranks come from the environment.

Routes:
{routes}

Tokenizer files (gpt2-vocab.json, gpt2-merges.txt) are taken from --assets DIR when given, else
the checkpoint folder, else the toolkit's assets folder (`opt-assets fetch`).

Continuous batching over a paged KV cache: --kv-tokens positions per rank (on a GPU sized from
free memory, as `opt-capacity` computes it; on a CPU a quarter of the available RAM, at most
{cpu_seqs} x --max-seq-len), cut into blocks of --kv-block-size positions; a sequence holds
blocks for the tokens it has. Each step decodes every running sequence and prefills prompt
chunks of up to --max-batch-tokens tokens. A sequence holds at most --max-seq-len positions (the
start-up log says the effective limit; a --max-seq-len the cache cannot hold is refused). A
request waits for room, and beyond --max-queued-requests waiting requests the answer is 429."""

EPILOG = """\
examples:
  opt-serve --checkpoint-folder /data/bb3_30b/mp8
  opt-serve --checkpoint-folder /data/bb3_30b/mp8/reshard.pt --host 0.0.0.0 --api-key "$KEY"
  torchrun --nnodes 2 --nproc-per-node 8 ... -m opt_serving.server.cli --checkpoint-folder DIR
  opt-serve --checkpoint-folder demo-out/bb3-tiny/mp2 --device cpu --kv-tokens 8192 \\
      --max-seq-len 512 --demo-tokenizer       # the model `opt-demo` made

exit status: 0 after SIGINT / SIGTERM, 2 for bad input at start, 3 when a rank dies or the
engine fails while serving (the server answers 503 and exits instead of hanging)."""


def build_parser() -> argparse.ArgumentParser:
    from .routes import routes_help

    description = DESCRIPTION.format(routes=routes_help(), cpu_seqs=CPU_SEQUENCES)
    p = argparse.ArgumentParser(prog="opt-serve", description=description, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint-folder", metavar="DIR",
                   help="folder (or <folder>/reshard.pt, or one file) of the checkpoint; "
                   "default: CHECKPOINT_FOLDER of --constants")
    p.add_argument("--model-file", metavar="PATH", help="serve a BlenderBot 1 instead: a "
                   "ParlAI model file, zoo:blender/blender_3B/model (under --datapath) or a "
                   "Hugging Face Blenderbot folder; routes /v1/completions, "
                   "/v1/chat/completions, /tokenize (prompt or messages), /v1/models and the "
                   "health and metrics routes, with ParlAI's option names")
    p.add_argument("--datapath", metavar="DIR", help="ParlAI's data folder, where zoo: paths "
                   "live (default $PARLAI_DATAPATH)")
    p.add_argument("--host", help=f"address to bind (default {DEFAULTS.default_host}; "
                   "0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, help=f"TCP port (default {DEFAULTS.default_port}; 0 "
                   "picks a free one, printed in the start-up line)")
    p.add_argument("--assets", metavar="DIR", help="folder with gpt2-vocab.json and "
                   "gpt2-merges.txt; it wins over files beside the checkpoint (default: the "
                   "checkpoint folder, else the toolkit's assets folder)")
    p.add_argument("--constants", metavar="MODULE", help="a metaseq-style constants module "
                   "(a .py path or a dotted name): MAX_SEQ_LEN, MAX_BATCH_TOKENS, DEFAULT_PORT, "
                   "MAX_BEAM, BATCH_SIZE, CHECKPOINT_FOLDER; flags win over it")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (also env "
                   "OPT_SERVE_API_KEY); without it any bearer is accepted, as ParlAI sends the "
                   "user name")
    p.add_argument("--max-queued-requests", type=int, metavar="N",
                   help=f"requests waiting for admission before 429 "
                   f"(default {DEFAULTS.max_queued_requests})")
    p.add_argument("--request-timeout", type=float, metavar="S", help="answer 504 and free "
                   f"its KV cache after S seconds (default {DEFAULTS.request_timeout_s:g})")
    p.add_argument("--worker-timeout", type=float, metavar="S", help="a collective waiting "
                   f"longer means a dead rank (default {DEFAULTS.worker_timeout_s:g})")
    p.add_argument("--read-timeout", type=float, metavar="S", help="a client must send each "
                   "request's headers and body within S seconds of its first byte or it is "
                   f"disconnected (default {DEFAULTS.client_read_timeout_s:g})")
    p.add_argument("--kv-tokens", type=int, metavar="N", help="KV-cache positions per rank "
                   "(paged: a sequence holds blocks for the tokens it has; default: from free "
                   "GPU memory, on a CPU a quarter of the available RAM, at most "
                   f"{CPU_SEQUENCES} x --max-seq-len and at least --max-batch-tokens); refused "
                   "at start when the device cannot hold it")
    p.add_argument("--kv-block-size", type=int, metavar="N", help="positions per KV-cache "
                   f"block (default {DEFAULTS.kv_block_size} on a GPU and a CPU: the prefix "
                   "cache's unit, and a tile of the GPU's paged-decode kernel)")
    p.add_argument("--no-prefix-cache", action="store_true", help="do not share cached KV "
                   "blocks between prompts that start the same way")
    p.add_argument("--max-seq-len", type=int, metavar="N", help="positions per sequence, "
                   f"prompt included (default {DEFAULTS.max_seq_len}, or the model's positions "
                   "when fewer); refused when the KV cache cannot hold one such sequence")
    p.add_argument("--max-batch-tokens", type=int, metavar="N", help="prompt tokens one step "
                   f"may prefill (default {DEFAULTS.max_batch_tokens} on a GPU and a CPU, "
                   "metaseq's: a 2,000-token prompt in one chunk, measured 1.26x faster than "
                   "in 512-token chunks on an H200)")
    p.add_argument("--max-batch-size", type=int, metavar="N",
                   help=f"most sequences decoded together (default {DEFAULTS.max_batch_size})")
    p.add_argument("--mp", type=int, metavar="M", help="model-parallel degree when spawning "
                   "(default: the number of parts; other valid degrees cut the parts on load)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                   help="default: fp16 on cuda; on a cpu bf16 when it has AMX or AVX-512 bf16 "
                   "(oneDNN's packed kernels: 1.6x fp32 at batch 1, 3.7x at batch 16, "
                   "measured), else fp32 (packed on x86 with AVX2: 1.1x at batch 1, 1.6x at "
                   "16)")
    p.add_argument("--threads", type=int, help="HTTP worker threads (at least 16; default: "
                   "min(--max-batch-size, 1024) + --max-queued-requests): each open request "
                   "holds one while it waits")
    p.add_argument("--model-name", help="name in responses and /v1/models (default: the "
                   "model preset's name)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="on a GPU, run every step "
                   "eagerly; by default decode-only steps replay CUDA graphs captured at start "
                   "for batches of 1, 2, 4, 8, then every 8 up to 256 (or --max-batch-size), "
                   "their capture time and memory logged (a CPU never uses graphs)")
    p.add_argument("--ready-file", metavar="PATH", help="once serving, write JSON {url, pid, "
                   "workers: {rank: pid}, world_size, model} to PATH (for supervisors and tests)")
    p.add_argument("--demo-tokenizer", action="store_true", help="when no tokenizer files are "
                   "found, use a byte-level stand-in (only for random demo models)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="what goes to stderr (default INFO)")
    return p


def _paragraph(message: str) -> str:
    # No breaks at hyphens or inside long words: flags and paths stay whole for copy-paste.
    return textwrap.fill(" ".join(message.split()), width=100, break_on_hyphens=False,
                         break_long_words=False)


def options_from_args(args: argparse.Namespace):
    """Flags over a --constants module over metaseq's defaults."""
    from opt_serving.runtime.startup import ServeOptions, StartupError

    constants = from_module(args.constants) if args.constants else DEFAULTS
    overrides = {k: v for k, v in {
        "max_queued_requests": args.max_queued_requests,
        "request_timeout_s": args.request_timeout, "worker_timeout_s": args.worker_timeout,
        "client_read_timeout_s": args.read_timeout,
        "max_seq_len": args.max_seq_len, "max_batch_tokens": args.max_batch_tokens,
        "max_batch_size": args.max_batch_size,
        "kv_block_size": args.kv_block_size}.items() if v is not None}
    constants = dataclasses.replace(constants, **overrides)
    checkpoint = args.checkpoint_folder or constants.checkpoint_folder
    if not checkpoint:
        raise StartupError("no checkpoint: pass --checkpoint-folder DIR (the folder of "
                           "reshard-model_part-*.pt files)")
    if args.kv_tokens is not None and args.kv_tokens < 1:
        raise StartupError(f"--kv-tokens {args.kv_tokens}: must be positive")
    return ServeOptions(
        checkpoint=checkpoint, constants=constants, host=args.host or constants.default_host,
        port=constants.default_port if args.port is None else args.port, assets=args.assets,
        api_key=args.api_key or os.environ.get("OPT_SERVE_API_KEY") or None,
        kv_tokens=args.kv_tokens, device=args.device, dtype=args.dtype,
        demo_tokenizer=args.demo_tokenizer, mp=args.mp, prefix_caching=not args.no_prefix_cache,
        **({} if args.threads is None else {"threads": args.threads}),
        model_name=args.model_name, ready_file=args.ready_file,
        cuda_graphs=not args.no_cuda_graphs,
        seq_len_given=constants.max_seq_len != DEFAULTS.max_seq_len or args.max_seq_len is not None)


def serve_model_file(args: argparse.Namespace) -> int:
    """``--model-file``: BlenderBot 1 (``server.blender``)."""
    from opt_serving.checkpoint.errors import CheckpointError
    from opt_serving.runtime.startup import configure_logging
    from .blender import BlenderServeOptions, serve_blenderbot

    if args.checkpoint_folder:
        print("opt-serve: --model-file (BlenderBot 1) and --checkpoint-folder (OPT) name two "
              "models: pass one of them", file=sys.stderr)
        return EXIT_BAD_INPUT
    constants = from_module(args.constants) if args.constants else DEFAULTS
    overrides = {k: v for k, v in {
        "max_queued_requests": args.max_queued_requests,
        "request_timeout_s": args.request_timeout, "client_read_timeout_s": args.read_timeout,
        "max_batch_size": args.max_batch_size}.items() if v is not None}
    options = BlenderServeOptions(
        model_file=args.model_file, datapath=args.datapath,
        constants=dataclasses.replace(constants, **overrides),
        host=args.host or constants.default_host,
        port=constants.default_port if args.port is None else args.port,
        api_key=args.api_key or os.environ.get("OPT_SERVE_API_KEY") or None,
        device=args.device, dtype=args.dtype, model_name=args.model_name,
        ready_file=args.ready_file, threads=args.threads)
    configure_logging(0, args.log_level)
    try:
        return serve_blenderbot(options)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"opt-serve: {_paragraph(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.model_file:
        return serve_model_file(args)
    from opt_serving.runtime.startup import StartupError
    from .serve import serve

    try:
        options = options_from_args(args)
    except (StartupError, ValueError, TypeError, OSError, ImportError) as e:
        print(f"opt-serve: {_paragraph(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return serve(options, log_level=args.log_level)
    except StartupError as e:
        print(f"opt-serve: {_paragraph(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (MemoryError, RecursionError) as e:  # while loading: never a traceback
        what = "out of memory" if isinstance(e, MemoryError) else "input nested too deeply"
        print(f"opt-serve: {what} while starting; check the checkpoint and the machine's "
              "free memory", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
