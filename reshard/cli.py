"""``reshard``: re-partition an OPT / BlenderBot-3 checkpoint for M GPUs, and inspect or verify one.

The work lives in ``reshard.core`` (resharding), ``reshard.inspect`` and ``reshard.verify``;
this module parses arguments, prints results and turns bad input into a one-paragraph error
(exit 2; ``verify`` exits 1 when it finds problems).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import textwrap
import threading

from opt_serving.checkpoint.errors import CheckpointError
from opt_serving.checkpoint.writer import is_disk_full
from opt_serving.config import DTYPES

from .core import Cancelled, reshard
from .inspect import format_report, inspect_path
from .verify import verify

EXIT_OK, EXIT_PROBLEMS, EXIT_BAD_INPUT = 0, 1, 2
SUBCOMMANDS = ("inspect", "verify")

DESCRIPTION = """\
Re-partition a metaseq OPT / BlenderBot-3 checkpoint into M model-parallel parts, streaming
tensor by tensor: memory stays within one to two of the model's largest tensors whatever its
size (measured 1.1-2x; under 3 GB for OPT-175B, whose embedding is 1.2 GB). INPUT is any of:
  - a consolidated file (fused qkv_proj, or separate q_proj/k_proj/v_proj as in BB3-30B's
    consolidated.pt),
  - model-parallel parts: files, a quoted glob, a folder, or metaseq's virtual
    <folder>/reshard.pt,
  - raw flattened FSDP shards (checkpoint_last-model_part-{r}-shard{d}.pt, with
    shard_metadata), given as a folder or a glob.
Any N -> M works, including M = 1 (consolidate).

Output: M files reshard-model_part-{r}.pt (r = 0 .. M-1) in --output-dir, by default a folder
beside the input: mp{M} next to a file or a folder named like mp8, <folder>-mp{M} next to any
other folder. Each is a full metaseq checkpoint
(model, cfg, optimizer_history, extra_state, args) holding rank r's slice: qkv_proj fused in
per-rank K,V,Q order ([K_r; V_r; Q_r], metaseq's layout), decoder.version kept, no
output_projection (tied to embed_tokens), cfg.model.model_parallel_size = M, training state
(last_optimizer_state, shard_metadata) dropped. Beside them: manifest.json (sha256 and size of
every part, the config, the degree, the source) and gpt2-vocab.json / gpt2-merges.txt when
they sit beside the input. Give metaseq or opt-serve the path <output-dir>/reshard.pt: that
file never exists, loaders append -model_part-{r} to it.

Nothing is half-written: parts are built in a hidden staging folder and renamed into place
at the end; the input is only read, and pickles are loaded without running any code.

subcommands:
  reshard inspect PATH... [--json]   what a file or folder holds (reads pickles, no weights)
  reshard verify DIR [--json]        check a resharded folder (exit 1 on problems)"""

EPILOG = """\
examples:
  reshard --mp 16 consolidated.pt                 # BB3-175B -> ./mp16/reshard-model_part-*.pt
  reshard --mp 8 /data/opt175b/ --output-dir /fast/opt175b-mp8 --dtype fp16
  reshard --mp 1 'mp8/reshard-model_part-*.pt'    # consolidate
  reshard --mp 2 old.pt --input-qkv concat:8      # a fused file of unknown row order
  reshard inspect consolidated.pt
  reshard verify mp16

exit status: 0 done, 1 verify found problems, 2 bad input (the message says which file and
what to do)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reshard", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="consolidated file, model-parallel parts, or FSDP shards (see above)")
    p.add_argument("--mp", type=int, required=True, metavar="M",
                   help="model-parallel degree to write: must divide the number of heads and "
                        "the vocabulary (50272 = 2^5 x 1571), e.g. 1, 2, 4, 8 for bb3-30b")
    p.add_argument("--output-dir", metavar="DIR",
                   help="where to write the parts (default: beside the input, see above)")
    p.add_argument("--dtype", choices=[*DTYPES, "keep"], default="keep",
                   help="dtype of the written weights (default keep: the input's; "
                        "decoder.version stays fp32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the contents of a non-empty --output-dir (swapped in only "
                        "once the new parts are complete)")
    p.add_argument("--input-qkv", metavar="{global,concat:N}",
                   help="row order of fused qkv_proj in a single file whose cfg says it was "
                        "trained at degree > 1: 'global' = metaseq's [K; V; Q], 'concat:N' = "
                        "N parts concatenated ([K_0; V_0; Q_0; K_1; ...]). Only asked for when "
                        "the file cannot tell")
    p.add_argument("--qkv-out", choices=("fused", "separate"), default="fused",
                   help="fused (default): metaseq's qkv_proj; separate: k_proj, v_proj, q_proj "
                        "as in Hugging Face exports (only with --mp 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def build_inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reshard inspect",
        description="Say what a checkpoint file or folder holds: its kind (consolidated with "
                    "fused or separate q,k,v; model-parallel parts; flattened FSDP shards), "
                    "the model config and its closest preset, parameter count, dtype, "
                    "model-parallel degree (and FSDP shards per part), the valid --mp values "
                    "and the size on disk. Only the pickles are read, never the weights.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="a file, a folder, a quoted glob, or <folder>/reshard.pt; each PATH "
                        "is reported on its own")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    return p


def build_verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reshard verify",
        description="Check a folder of model-parallel parts: every tensor present with the "
                    "shape its cfg needs at the folder's degree, replicated tensors (layer "
                    "norms, positions, row-parallel biases) identical in every part, and each "
                    "part's size and sha256 equal to manifest.json (written by reshard). "
                    "Exit status 0 when all holds, 1 with a list of problems otherwise.")
    p.add_argument("folder", metavar="DIR", help="the folder that holds reshard-model_part-*.pt")
    p.add_argument("--json", action="store_true", help="print {folder, ok, problems} as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def all_parsers() -> list[argparse.ArgumentParser]:
    """Every parser of this command (for the help-text test)."""
    return [build_parser(), build_inspect_parser(), build_verify_parser()]


def _run_reshard(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from opt_serving.blenderbot.files import is_blenderbot

    for path in args.inputs:
        if is_blenderbot(path):
            raise CheckpointError(path, "is a BlenderBot 1, which runs on one device: there is "
                                  "nothing to reshard", "serve it with `opt-serve --model-file "
                                  f"{path}` (see `reshard inspect {path}`)")
    # While it writes, a signal only asks it to stop: reshard stops between tensors (raising
    # in the middle of torch's zip writer would abort the process, leaving files behind).
    cancel, received = threading.Event(), []

    def defer(signum, frame):
        received.append(signum)
        cancel.set()
    try:
        with _handling((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), defer):
            result = reshard(inputs=args.inputs, mp=args.mp, output_dir=args.output_dir,
                             dtype=args.dtype, overwrite=args.overwrite,
                             input_qkv=args.input_qkv, qkv_out=args.qkv_out,
                             progress=not args.no_progress, cancel=cancel)
    except Cancelled:
        raise _Terminated(received[0]) from None
    print(result.summary())
    print(f"output: {result.output_dir}  (load it as {result.output_dir / 'reshard.pt'}; "
          f"check it with `reshard verify {result.output_dir}`)")
    return EXIT_OK


def _run_inspect(argv: list[str]) -> int:
    args = build_inspect_parser().parse_args(argv)
    reports = [inspect_path(path) for path in args.paths]
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        print("\n\n".join(format_report(r) for r in reports))
    return EXIT_OK


def _run_verify(argv: list[str]) -> int:
    args = build_verify_parser().parse_args(argv)
    problems = verify(args.folder, progress=not args.no_progress)
    if args.json:
        print(json.dumps({"folder": args.folder, "ok": not problems, "problems": problems},
                         indent=2))
    elif problems:
        print(f"{args.folder}: {len(problems)} problem(s):")
        for p in problems:
            print(textwrap.fill(p, width=100, initial_indent="  - ", subsequent_indent="    ",
                                break_long_words=False, break_on_hyphens=False))
    else:
        print(f"{args.folder}: OK (tensor shapes, replicated tensors and manifest checksums "
              "all match)")
    return EXIT_PROBLEMS if problems else EXIT_OK


def error_message(exc: BaseException) -> str:
    """One paragraph: which file, what is wrong, what to do."""
    if isinstance(exc, CheckpointError):
        return str(exc)
    if isinstance(exc, OSError):
        where = exc.filename or "a file"
        if is_disk_full(exc):
            return (f"{where} could not be written: the disk is full ({exc.strerror}). Free "
                    "space or choose another --output-dir; nothing was left behind.")
        return (f"{where}: {exc.strerror or exc}. Check that the path exists and that you may "
                "read it (and write the output folder).")
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return str(text)


class _Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP, raised like Ctrl-C so that the same clean-up runs."""


def _terminate(signum, frame):
    raise _Terminated(signum)


@contextlib.contextmanager
def _handling(signals: tuple, handler):
    """``handler`` for ``signals`` inside the block (main thread only: signal handlers cannot
    be set elsewhere, as when main() is called from a test's worker thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with _handling((signal.SIGTERM, signal.SIGHUP), _terminate):
        return _main(argv)


def _main(argv: list[str]) -> int:
    # No subcommand means "reshard": `reshard --mp 16 consolidated.pt` works as written. A
    # checkpoint literally named "inspect" or "verify" can be given as ./inspect.
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    run = {"inspect": _run_inspect, "verify": _run_verify}.get(command, _run_reshard)
    try:
        return run(argv[1:] if command else argv)
    except (CheckpointError, ValueError, KeyError, OSError) as e:
        print(f"reshard: error: {error_message(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError:
        print("reshard: error: out of memory. Close other programs or use a machine with more "
              "memory; nothing was left behind.", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RecursionError:
        print("reshard: error: the input is nested too deeply to read; nothing was left "
              "behind.", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:
        signum = e.args[0] if isinstance(e, _Terminated) else signal.SIGINT
        print(f"reshard: stopped by {signal.Signals(signum).name}; nothing was left behind",
              file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
