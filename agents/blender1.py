"""A BlenderBot 1 conversation as ParlAI's ``safe_interactive -mf ... -t blended_skill_talk``
holds it: the persona lines (``your persona: ...``) open the first message, joined by a newline;
each message and each reply is a turn of the history; the safety layer checks the partner's
message (unsafe: ParlAI's "could not process" text, nothing added) and the bot's reply (unsafe:
ParlAI's "unsafe model reply" text, and the history is cleared, persona included, as ParlAI's
``agent.reset()`` clears it until the next [DONE]).

The model is reached through ``reply(turns) -> text``: in-process (``BlenderbotLLM``) or
opt-serve's ``/v1/chat/completions`` (``ChatClient``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from agents.safety import UNSAFE_INPUT_MESSAGE, UNSAFE_REPLY_MESSAGE, SafetyChecker
from opt_serving.checkpoint.errors import CheckpointError
from opt_serving.protocol.seq2seq import persona_text

BOT_PREFIX = "[TransformerGenerator]: "
Generate = Callable[[Sequence[str]], str]  # the conversation's turns -> the bot's reply


@dataclass(frozen=True)
class Turn:
    text: str  # the reply, or ParlAI's message when status is not "ok"
    status: str  # "ok", "unsafe_input" or "unsafe_reply"
    reasons: tuple[str, ...] = ()


class Blender1Chat:
    """One conversation; ``respond`` is one turn, ``reset`` a new chat ([DONE])."""

    def __init__(self, generate: Generate, *, persona: Sequence[str] = (),
                 safety: SafetyChecker | None = None):
        self.generate, self.persona = generate, persona_text(persona)
        self.safety = safety or SafetyChecker("none")
        self.turns: list[str] = []
        self._fresh = True  # the next message opens a chat: the persona goes before it

    def reset(self) -> None:
        self.turns, self._fresh = [], True

    def respond(self, message: str) -> Turn:
        verdict = self.safety.check(message)
        if not verdict.safe:
            return Turn(UNSAFE_INPUT_MESSAGE, "unsafe_input", verdict.reasons)
        text = f"{self.persona}\n{message}" if self._fresh and self.persona else message
        reply = self.generate([*self.turns, text])
        verdict = self.safety.check(reply, reply=True)
        if not verdict.safe:  # ParlAI resets the agent: the whole history goes
            self.turns, self._fresh = [], False
            return Turn(UNSAFE_REPLY_MESSAGE, "unsafe_reply", verdict.reasons)
        self.turns += [text, reply]
        self._fresh = False
        return Turn(reply, "ok")


def in_process(llm) -> Generate:
    """``reply(turns)`` on a ``blenderbot.llm.BlenderbotLLM``, with its model's options."""
    def generate(turns: Sequence[str]) -> str:
        (reply,) = llm.generate([llm.history_vector(turns)])
        return reply.text
    return generate


class ChatClient:
    """``reply(turns)`` through opt-serve's ``POST /v1/chat/completions`` (BlenderBot 1 mode):
    the turns alternate user / assistant, the first is the partner's."""

    def __init__(self, url: str, timeout_s: float = 120.0):
        self.url = (url if "://" in url else f"http://{url}").rstrip("/")
        self.timeout_s = timeout_s

    def __call__(self, turns: Sequence[str]) -> str:
        import requests

        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                    for i, t in enumerate(turns)]
        resp = requests.post(f"{self.url}/v1/chat/completions", json={"messages": messages},
                             timeout=self.timeout_s)
        if resp.status_code != 200:
            raise ChatError(f"{self.url} answered {resp.status_code}: {resp.text[:300]}")
        try:
            return resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ChatError(f"{self.url} answered 200 without a chat completion: "
                            f"{resp.text[:300]}") from None


class ChatError(RuntimeError):
    """The server gave no reply; the conversation is unchanged."""


def run(args, messages, out=None, err=None) -> int:
    """``safe_interactive -mf``: the read-respond loop of ParlAI's safe_interactive, with its
    [DONE] (a new chat, the persona again) and [EXIT]. Returns 0, 1 when a turn failed, or 2
    when the model could not be loaded."""
    import sys

    from agents.cli import CHAT_DONE, PARLAI_OPTIONS

    out, err = out or sys.stdout, err or sys.stderr
    persona = list(args.persona)
    try:
        if args.persona_file:
            with open(args.persona_file, encoding="utf-8") as f:
                persona += [line.strip() for line in f if line.strip()]
        safety = SafetyChecker(args.safety, args.classifier_threshold,
                               args.reply_classifier_threshold)
        if args.server:
            generate: Generate = ChatClient(args.server, args.metaseq_server_timeout)
        else:
            from opt_serving.blenderbot.llm import BlenderbotLLM


            opt = {name: getattr(args, name) for name, _, _ in PARLAI_OPTIONS
                   if getattr(args, name, None) is not None}
            generate = in_process(BlenderbotLLM(args.model_file, datapath=args.datapath,
                                                opt=opt))
    except (OSError, ValueError, CheckpointError) as exc:
        print(f"safe_interactive: {exc}", file=err)
        return 2
    chat = Blender1Chat(generate, persona=persona, safety=safety)
    failed = False
    for message in messages:  # stripped, non-blank, up to [EXIT] (``cli._messages``)
        if message == "[DONE]":
            chat.reset()
            print(CHAT_DONE, file=out)
            continue
        try:
            turn = chat.respond(message)
        except (ChatError, OSError) as exc:
            print(f"[ Error: {exc} ]", file=err, flush=True)
            failed = True
            continue
        print(BOT_PREFIX + turn.text if turn.status == "ok" else turn.text, file=out, flush=True)
    return 1 if failed else 0
