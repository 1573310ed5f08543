"""`safe_interactive`: chat with BlenderBot 3 served by opt-serve (or metaseq's API).

    safe_interactive --opt-server http://localhost:6010 --raw-search-server http://localhost:8080

ParlAI's spelling works too (`--init-opt gen/opt_bb3`, underscores, servers without http://).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TextIO

from agents.bb3 import DECISIONS, Agent, AgentConfig, AgentError, Reply
from agents.convlog import ConversationLog, default_log_path, export_parlai
from agents.memory import default_memory_db
from agents.safety import SAFETY_MODES
from opt_serving.tokenizer import AssetError

PROMPT = "Enter Your Message: "
CHAT_DONE = "CHAT DONE\n\n[ Preparing new chat ... ]\n"  # ParlAI's, after [DONE]
# ParlAI options -mf takes on the command line, as ParlAI's own flags (the model's .opt
# otherwise; the gen/blenderbot recipe where the .opt is silent).
PARLAI_OPTIONS = (
    ("inference", str, "beam or greedy"), ("beam_size", int, "beams"),
    ("beam_min_length", int, "the earliest end is token N + 1"),
    ("beam_block_ngram", int, "n-gram blocking in the reply"),
    ("beam_context_block_ngram", int, "n-gram blocking against the history"),
    ("beam_length_penalty", float, "the rescoring exponent"),
    ("label_truncate", int, "reply tokens at most"),
    ("delimiter", str, "between turns"),
    ("history_add_global_end_token", str, "'end' appends the end token to the history"),
    ("text_truncate", int, "history tokens kept"))
BOT_PREFIX = "[BlenderBot3]: "
PRESETS = ("gen/opt_bb3",)
DEFAULT_RETRIES = AgentConfig.max_retry_api

_COMMANDS = """\
in the chat:
  [DONE]        end this conversation and start a new one (memories are kept unless
                --forget-on-done)
  [EXIT]        quit
  Opening       as the first message: the bot opens from what it remembers about you
  /memories     list what the bot remembers about you and itself
  /good         rate the last reply as good
  /bad <why>    rate the last reply as bad, and say why
"""


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _preset(text: str) -> str:
    name = text.removesuffix(".opt")
    if not any(name == p or name.endswith("/" + p.split("/")[-1]) for p in PRESETS):
        raise argparse.ArgumentTypeError(f"only the {', '.join(PRESETS)} preset is supported")
    return "gen/opt_bb3"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="safe_interactive", epilog=_COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Talk to BlenderBot 3 (ParlAI's gen/opt_bb3 pipeline) over a "
                    "metaseq-compatible completions API, with safety checks on both sides "
                    "and a long-term memory that survives restarts.")

    group = p.add_argument_group("servers")

    def flag(*names: str, **kwargs) -> None:
        action = group.add_argument(*names, **kwargs)
        # ParlAI spells its flags with underscores too (--search_decision); accept those
        # without listing them twice in --help.
        aliases = [n.replace("-", "_").replace("__", "--", 1) for n in names
                   if n.startswith("--") and "-" in n[2:]]
        if aliases:
            kwargs.update(dest=action.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            p.add_argument(*aliases, **kwargs)

    flag("-o", "--init-opt", type=_preset, default="gen/opt_bb3",
         help="ParlAI preset; only gen/opt_bb3 is implemented (default %(default)s)")
    flag("--opt-server", default=None,
         help="completions API base URL, e.g. opt-serve's (http:// is added when "
              f"missing; default {AgentConfig.opt_server})")
    flag("--raw-search-server", default=None,
         help="ParlAI-protocol search server URL, e.g. opt-search-server; none: no search")
    flag("--metaseq-server-timeout", type=float, default=AgentConfig.server_timeout_s,
         metavar="S",
         help="seconds one completions request may take, headers and body together "
              "(default %(default)s)")
    flag("--metaseq-max-retry-api", type=int, default=DEFAULT_RETRIES, metavar="N",
         help="retries of a failed request, with exponential backoff (ParlAI's -1, "
              "'forever', means the default here; default %(default)s)")
    flag("--search-timeout", type=float, default=AgentConfig.search_timeout_s, metavar="S",
         help="seconds one search request may take; a failed search only leaves the turn "
              "without documents (default %(default)s)")
    flag("--api-key", default=None, help="bearer token (default: the --user name)")
    group = p.add_argument_group("BlenderBot 1 (instead of BB3's servers)")
    flag("-mf", "--model-file", default=None, metavar="PATH",
         help="chat with a BlenderBot 1: a ParlAI model file, zoo:blender/... or an HF "
              "folder, run in this process (not with --opt-server)")
    flag("--datapath", default=None, metavar="DIR",
         help="ParlAI's data folder, where zoo: paths live (default $PARLAI_DATAPATH)")
    flag("--server", default=None, metavar="URL",
         help="with -mf: reach the model through opt-serve --model-file's chat route "
              "instead of loading it here")
    flag("--persona-file", default=None, metavar="FILE",
         help="with -mf: the bot's persona, one fact per line (also --persona TEXT)")
    for name, kind, what in PARLAI_OPTIONS:
        flag(f"--{name.replace('_', '-')}", type=kind, default=None, dest=name,
             help=f"with -mf: ParlAI's {name} ({what}; default: the model's .opt)")
    group = p.add_argument_group("pipeline")
    for name in ("search", "memory", "contextual-knowledge"):
        flag(f"--{name}-decision", choices=DECISIONS, default=AgentConfig.search_decision,
             help="compute (the decision module chooses), always or never (default "
                  "%(default)s)")
    flag("--forget-on-done", action="store_true",
         help="[DONE] also wipes this user's memories, as ParlAI's agent forgets them (by "
              "default long-term memory outlives a conversation)")
    flag("--skip-memory-decision-without-memories", action="store_true",
         help="no memory-decision call while no memory is held (ParlAI asks it every turn)")
    flag("--knowledge-chunk-size", type=int, default=AgentConfig.knowledge_chunk_size,
         metavar="WORDS",
         help="words of each search document shown to the knowledge module (default "
              "%(default)s)")
    flag("--max-prompt-len", type=int, default=None, metavar="TOKENS",
         help="cap on every module's prompt length (default: the module limits)")
    flag("--tokenizer-dir", default=None, metavar="DIR",
         help="folder with gpt2-vocab.json and gpt2-merges.txt for exact prompt lengths and "
              "token positions (default: the toolkit's assets from `opt-assets fetch`, else "
              "the server's POST /tokenize, else an estimate)")
    group = p.add_argument_group("memory and safety")
    flag("--user", default=AgentConfig.user,
         help="conversation partner: memories are per user (default %(default)s)")
    flag("--memory-db", default=None, metavar="PATH",
         help=f"SQLite memory file (default {default_memory_db()}; ':memory:' keeps nothing)")
    flag("--persona", action="append", default=[], metavar="TEXT",
         help="seed a fact about the bot (repeatable)")
    flag("--user-fact", action="append", default=[], metavar="TEXT",
         help="seed a fact about the user (repeatable)")
    flag("--safety", choices=SAFETY_MODES, default=AgentConfig.safety,
         help="check user messages and bot replies with a word list, a classifier, both, or "
              "nothing (default %(default)s)")
    flag("--classifier-threshold", type=float, default=AgentConfig.classifier_threshold,
         metavar="P", help="offensive-language probability from which a message is unsafe "
                           "(default %(default)s)")
    flag("--reply-classifier-threshold", type=float, default=None, metavar="P",
         help="the same for the bot's replies (default: --classifier-threshold); lower is "
              "stricter about what the bot may say")
    flag("--wipe-memory-on-unsafe", action="store_true",
         help="on an unsafe reply also forget the long-term memory (ParlAI's behaviour)")
    group = p.add_argument_group("session")
    flag("--script", metavar="FILE", help="read messages from FILE, one per line, and exit")
    flag("--debug-bb3", type=_bool, nargs="?", const=True, default=False,
         help="print every module's prompt, output and latency, and the turn's latency")
    flag("--log", default=None, metavar="PATH",
         help=f"conversation log, JSONL (default {default_log_path()})")
    flag("--no-log", action="store_true", help="keep no conversation log")
    flag("--export-parlai", metavar="OUT",
         help="convert the conversation log to ParlAI's conversation format and exit")
    return p


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    return AgentConfig(
        opt_server=args.opt_server or AgentConfig.opt_server,
        raw_search_server=args.raw_search_server,
        search_decision=args.search_decision, memory_decision=args.memory_decision,
        skip_memory_decision_without_memories=args.skip_memory_decision_without_memories,
        forget_on_done=args.forget_on_done,
        contextual_knowledge_decision=args.contextual_knowledge_decision,
        server_timeout_s=args.metaseq_server_timeout,
        max_retry_api=(args.metaseq_max_retry_api if args.metaseq_max_retry_api >= 0
                       else DEFAULT_RETRIES),
        search_timeout_s=args.search_timeout, knowledge_chunk_size=args.knowledge_chunk_size,
        max_prompt_len=args.max_prompt_len, memory_db=args.memory_db, user=args.user,
        persona=tuple(args.persona), user_facts=tuple(args.user_fact), safety=args.safety,
        classifier_threshold=args.classifier_threshold,
        reply_classifier_threshold=args.reply_classifier_threshold,
        wipe_memory_on_unsafe=args.wipe_memory_on_unsafe, tokenizer_dir=args.tokenizer_dir,
        api_key=args.api_key)


def print_debug(reply: Reply, err: TextIO) -> None:
    for name, call in reply.modules.items():
        print(f"[bb3] {name} ({call.latency_s:.2f}s)", file=err)
        for line in call.prompt.split("\n"):
            print(f"  | {line}", file=err)
        print(f"  -> {call.output!r}" if call.error is None else f"  !! {call.error}", file=err)
    if reply.search is not None:
        s = reply.search
        print(f"[bb3] search {s.query!r} ({s.latency_s:.2f}s): {len(s.documents)} documents"
              + (f", {s.error}" if s.error else ""), file=err)
    print(f"[bb3] turn latency {reply.latency_s:.2f}s", file=err, flush=True)


def _lines(script: str | None, out: TextIO) -> Iterator[str]:
    if script is None:
        while True:
            try:
                yield input(PROMPT)
            except EOFError:
                return
    with open(script, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                print(PROMPT + line, file=out)  # the transcript reads like a live session
                yield line


def _messages(script: str | None, out: TextIO) -> Iterator[str]:
    """The partner's messages, stripped, blank ones skipped, until [EXIT]: what ParlAI's
    interactive loops do for both bots (each handles [DONE] itself)."""
    for line in _lines(script, out):
        message = line.strip()
        if message == "[EXIT]":
            return
        if message:
            yield message


def chat(agent: Agent, messages: Iterator[str], log: ConversationLog | None, *, debug: bool,
         out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The read-respond loop; returns 1 when a turn failed, else 0."""
    failed = False
    for message in messages:  # stripped, non-blank, up to [EXIT] (``_messages``)
        if message == "[DONE]":
            agent.reset(wipe_memory=agent.config.forget_on_done)
            if log:
                log.new_conversation()
            print(CHAT_DONE, file=out)
            continue
        if message == "/memories":
            memories = agent.memory.all()
            for m in memories:
                print(f"  {m.text}  (unused for {m.turns_since_used} turns, used "
                      f"{m.times_used}x, {m.source})", file=out)
            print(f"[ {len(memories)} memories for user {agent.memory.user!r} ]", file=out)
            continue
        if message.split(maxsplit=1)[0] in ("/good", "/bad"):
            rating, _, reason = message.partition(" ")
            try:
                if log is None:
                    raise LookupError("no conversation log (--no-log)")
                log.log_feedback(rating[1:], reason.strip())
                print("[ Thanks, feedback recorded. ]", file=out)
            except LookupError as exc:
                print(f"[ Cannot rate: {exc}. ]", file=out)
            continue
        try:
            reply = agent.respond(message)
        except AgentError as exc:
            print(f"[ Error: {exc} ]", file=err, flush=True)
            failed = True
            continue
        if debug:
            print_debug(reply, err)
        if log:
            log.log_turn(message, reply)
        print(BOT_PREFIX + reply.text if reply.status == "ok" else reply.text, file=out,
              flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_path = args.log or default_log_path()
    if args.export_parlai:
        try:
            n = export_parlai(log_path, args.export_parlai)
        except (OSError, ValueError, KeyError) as exc:
            print(f"safe_interactive: cannot export {log_path}: {exc}", file=sys.stderr)
            return 1
        print(f"{n} conversations written to {args.export_parlai}")
        return 0
    if args.model_file is not None:
        if args.opt_server is not None:
            print("safe_interactive: -mf (BlenderBot 1) and --opt-server (BlenderBot 3) are "
                  "two different bots: pass one of them", file=sys.stderr)
            return 2
        from agents.blender1 import run

        return run(args, _messages(args.script, sys.stdout))
    if args.metaseq_max_retry_api < 0:
        print(f"safe_interactive: retries are bounded here; using {DEFAULT_RETRIES}",
              file=sys.stderr)
    try:
        config = config_from_args(args)
        agent = Agent(config)
    except (ValueError, OSError, AssetError) as exc:
        print(f"safe_interactive: {exc}", file=sys.stderr)
        return 2
    if agent.search_problem:
        print(f"safe_interactive: {agent.search_problem}", file=sys.stderr)
    log = None if args.no_log else ConversationLog(log_path, config.user)
    if args.debug_bb3:
        print(f"[bb3] tokenizer: {agent.tokenizer.source}; completions: {agent.client.url}; "
              f"search: {agent.search.url if agent.search else 'off'}", file=sys.stderr)
    try:
        return chat(agent, _messages(args.script, sys.stdout), log, debug=args.debug_bb3)
    except KeyboardInterrupt:
        return 130
    finally:
        agent.close()


if __name__ == "__main__":
    sys.exit(main())
