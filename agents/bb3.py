"""The BlenderBot 3 agent: ParlAI's gen/opt_bb3 module pipeline over a completions API.

One turn: search decision (sdm), memory decision (mdm) and memory generation on the user's line
(mgm) go out together; then the search path (sgm -> raw search -> skm) and memory knowledge
(mkm) run side by side, contextual knowledge (ckm) when neither yields anything; one combined
response call; then mgm on the bot's own reply. ParlAI sends the same calls one after another
(6 round trips for chit-chat); here a chit-chat turn takes 4 and a search+memory turn 5.
Nothing is written to history or memory until the reply exists and passed the safety check,
so a failed call never leaves half a turn behind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from agents import prompts as P
from agents.client import CompletionsClient, RetryPolicy, ServiceError
from agents.memory import (MAX_OFFERED_MEMORIES, MemoryStore, default_memory_db, format_memory,
                           select_memories)
from agents.safety import (DEFAULT_CLASSIFIER_THRESHOLD, UNSAFE_INPUT_MESSAGE,
                           UNSAFE_REPLY_MESSAGE, SafetyChecker)
from agents.search.client import SearchClient
from agents.search.protocol import Document
from agents.tokens import TokenMeasure, load_tokenizer

DECISIONS = ("compute", "always", "never")
OPENING = "Opening"  # a first message that asks the bot to open from the partner's memories


@dataclass(frozen=True)
class AgentConfig:
    opt_server: str = "http://localhost:6010"
    raw_search_server: str | None = None  # no search at all without one
    search_decision: str = "compute"
    memory_decision: str = "compute"
    contextual_knowledge_decision: str = "compute"
    server_timeout_s: float = 60.0  # one completions request
    max_retry_api: int = 3
    search_timeout_s: float = 10.0
    search_results: int = P.MAX_SEARCH_DOCS
    knowledge_chunk_size: int = P.DEFAULT_CHUNK_WORDS
    max_prompt_len: int | None = None
    memory_db: str | None = None  # None: default_memory_db(); ":memory:" keeps nothing
    user: str = "default"
    persona: tuple[str, ...] = ()  # seeds for the bot's own memories (Person 2)
    user_facts: tuple[str, ...] = ()  # seeds for the partner's memories (Person 1)
    max_memories: int = MAX_OFFERED_MEMORIES
    # A shortcut ParlAI does not take: no memory-decision call while no memory is held.
    skip_memory_decision_without_memories: bool = False
    # ParlAI forgets its memories when a conversation ends ([DONE]); ours outlive it.
    forget_on_done: bool = False
    safety: str = "all"
    classifier_threshold: float = DEFAULT_CLASSIFIER_THRESHOLD
    reply_classifier_threshold: float | None = None  # None: classifier_threshold
    wipe_memory_on_unsafe: bool = False  # ParlAI's reset wipes memory; here only if asked
    tokenizer_dir: str | None = None  # folder with gpt2-vocab.json and gpt2-merges.txt
    api_key: str | None = None  # None: the user name, as ParlAI sends
    workers: int = 6  # enough for every call of one turn to be in flight at once

    def __post_init__(self):
        for name in ("search_decision", "memory_decision", "contextual_knowledge_decision"):
            if getattr(self, name) not in DECISIONS:
                raise ValueError(f"{name} must be one of {DECISIONS}, not {getattr(self, name)!r}")
        if self.max_retry_api < 0:
            raise ValueError("max_retry_api must be >= 0 (retries are always bounded)")
        if self.workers < 1 or self.search_results < 1 or self.knowledge_chunk_size < 1:
            raise ValueError("workers, search_results and knowledge_chunk_size must be >= 1")


@dataclass(frozen=True)
class ModuleCall:
    module: str  # sdm, mdm, mgm_user, sgm, skm, mkm, ckm, response, mgm_self, orm
    prompt: str
    raw: str | None  # what the server returned; None when the call failed
    output: str | None  # after ParlAI's cleaning
    error: str | None
    latency_s: float
    src_penalty_end_idx: int = -1
    unreachable: bool = False  # the server could not be connected to at all

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "output": self.output, "raw": self.raw,
                "error": self.error, "latency_s": round(self.latency_s, 4),
                "src_penalty_end_idx": self.src_penalty_end_idx}


@dataclass(frozen=True)
class SearchOutcome:
    calls: tuple[ModuleCall, ...] = ()
    query: str | None = None
    documents: tuple[Document, ...] = ()
    fact: str | None = None
    error: str | None = None
    latency_s: float = 0.0  # the search request alone


@dataclass(frozen=True)
class Reply:
    text: str  # the bot's line, or ParlAI's message when status is not "ok"
    status: str  # "ok", "unsafe_input" or "unsafe_reply"
    modules: Mapping[str, ModuleCall] = field(default_factory=dict)
    search: SearchOutcome | None = None
    knowledge: Mapping[str, str | None] = field(default_factory=dict)
    used_memory: str | None = None
    new_memories: tuple[str, ...] = ()
    safety_reasons: tuple[str, ...] = ()
    latency_s: float = 0.0

    def to_dict(self) -> dict:
        search = None
        if self.search is not None:
            search = {"query": self.search.query, "error": self.search.error,
                      "latency_s": round(self.search.latency_s, 4),
                      "documents": [d.to_json() for d in self.search.documents]}
        return {"text": self.text, "status": self.status,
                "modules": {k: v.to_dict() for k, v in self.modules.items()},
                "search": search, "knowledge": dict(self.knowledge),
                "used_memory": self.used_memory, "new_memories": list(self.new_memories),
                "safety_reasons": list(self.safety_reasons),
                "latency_s": round(self.latency_s, 4)}


class AgentError(RuntimeError):
    """The turn produced no reply (the response call failed); history and memory unchanged."""


class Agent:
    """A BB3 conversation with one partner; `respond` is one turn."""

    def __init__(self, config: AgentConfig = AgentConfig(), *,
                 client: CompletionsClient | None = None, search: SearchClient | None = None,
                 memory: MemoryStore | None = None, safety: SafetyChecker | None = None,
                 tokenizer: TokenMeasure | None = None):
        self.config = config
        self.client = client or CompletionsClient(
            config.opt_server, RetryPolicy(timeout_s=config.server_timeout_s,
                                           max_retries=config.max_retry_api),
            api_key=config.api_key or config.user, pool_size=config.workers)
        self.search_problem: str | None = None  # why search is off although a server was given
        if search is None and config.raw_search_server:
            try:
                search = SearchClient(config.raw_search_server,
                                      RetryPolicy(timeout_s=config.search_timeout_s,
                                                  max_retries=1))
            except ValueError as exc:  # as for a dead search server: go on without search
                self.search_problem = f"search is off: {exc}"
        self.search = search
        self.memory = memory or MemoryStore(config.memory_db or default_memory_db(), config.user)
        self.safety = safety or SafetyChecker(config.safety, config.classifier_threshold,
                                              config.reply_classifier_threshold)
        self.tokenizer = tokenizer or load_tokenizer(config.tokenizer_dir, config.opt_server,
                                                     config.api_key or config.user)
        self.budget = P.Budget(self.tokenizer.count, config.max_prompt_len,
                               self.tokenizer.floor, self.tokenizer.encode)
        self.memory.seed(config.persona, person=2)
        self.memory.seed(config.user_facts, person=1)
        self._pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="bb3")
        self._turn_lock = threading.Lock()  # one turn at a time per conversation
        self._history: tuple[str, ...] = ()

    @property
    def history(self) -> tuple[str, ...]:
        return self._history

    def reset(self, wipe_memory: bool = False) -> None:
        """A new conversation ([DONE]); long-term memory stays unless asked."""
        self._history = ()
        if wipe_memory:
            self.memory.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()
        if self.search is not None:
            self.search.close()
        self.memory.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one module call --------------------------------------------------------------------

    def _call(self, name: str, prompt: P.Prompt) -> ModuleCall:
        start = time.monotonic()
        try:
            raw = self.client.complete_payload(prompt.payload())
        except ServiceError as exc:
            return ModuleCall(name, prompt.text, None, None, str(exc), time.monotonic() - start,
                              prompt.src_penalty_end_idx, exc.unreachable)
        return ModuleCall(name, prompt.text, raw, P.clean_output(raw), None,
                          time.monotonic() - start, prompt.src_penalty_end_idx)

    def _search_path(self, history: tuple[str, ...]) -> SearchOutcome:
        sgm = self._call("sgm", P.search_query_prompt(history, self.budget))
        if not sgm.output:
            return SearchOutcome((sgm,), error=sgm.error or "empty search query")
        start = time.monotonic()
        try:
            docs = tuple(self.search.search(sgm.output, self.config.search_results))
        except ServiceError as exc:
            return SearchOutcome((sgm,), sgm.output, error=str(exc),
                                 latency_s=time.monotonic() - start)
        latency = time.monotonic() - start
        if not docs:
            return SearchOutcome((sgm,), sgm.output, error="no documents", latency_s=latency)
        skm = self._call("skm", P.search_knowledge_prompt(
            history, [(d.title, d.content) for d in docs], self.budget,
            self.config.knowledge_chunk_size))
        return SearchOutcome((sgm, skm), sgm.output, docs, skm.output or None, skm.error,
                             latency)

    # -- one turn ---------------------------------------------------------------------------

    def respond(self, text: str) -> Reply:
        text = " ".join(text.split())  # the prompt format is one line per turn
        if not text:
            raise ValueError("empty message")
        with self._turn_lock:
            start = time.monotonic()
            verdict = self.safety.check(text)
            if not verdict.safe:
                return Reply(UNSAFE_INPUT_MESSAGE, "unsafe_input",
                             safety_reasons=verdict.reasons,
                             latency_s=time.monotonic() - start)
            if text == OPENING and not self._history:
                return self._open(start)
            return self._turn(text, start)

    def open(self) -> Reply:
        """The bot's first line of a conversation, written from the partner's memories."""
        with self._turn_lock:
            return self._open(time.monotonic())

    def _knowledge(self, text: str, history: tuple[str, ...]):
        """Decisions, memory generation and knowledge for one user line.

        Returns (module calls, search outcome, knowledge lines, memories held). Everything that
        depends only on the user's line goes out at once; an "always" module needs no decision,
        so it starts at once too.
        """
        cfg, budget = self.config, self.budget
        memories = self.memory.all()
        offered = select_memories(text, memories, cfg.max_memories)
        futures: dict[str, Future] = {}

        def submit(name: str, prompt: P.Prompt) -> None:
            futures[name] = self._pool.submit(self._call, name, prompt)

        def submit_mkm() -> None:
            submit("mkm", P.memory_knowledge_prompt(history, [m.text for m in offered], budget))

        def output(name: str) -> str:
            return (futures[name].result().output or "") if name in futures else ""

        search_mode = cfg.search_decision if self.search is not None else "never"
        # ParlAI asks the memory decision every turn, memories or not; mkm needs some.
        memory_mode = cfg.memory_decision
        if not offered and (memory_mode == "always" or cfg.skip_memory_decision_without_memories):
            memory_mode = "never"
        knowledge_mode = cfg.contextual_knowledge_decision
        if search_mode == "compute":
            submit("sdm", P.search_decision_prompt(history, budget))
        if memory_mode == "compute":
            submit("mdm", P.memory_decision_prompt(
                history, [m.text for m in offered if m.person == 2],
                [m.text for m in offered if m.person == 1], budget))
        submit("mgm_user", P.memory_generation_prompt(text, budget))
        if memory_mode == "always":
            submit_mkm()
        if knowledge_mode == "always":
            submit("ckm", P.contextual_knowledge_prompt(history, budget))
        search_future = (self._pool.submit(self._search_path, history)
                         if search_mode == "always" else None)

        # A server that cannot be reached fails every call: say so now rather than after the
        # knowledge and response calls have each gone through their retries.
        first = futures[next(n for n in ("sdm", "mdm", "mgm_user") if n in futures)].result()
        if first.unreachable:
            raise AgentError(f"no reply: {first.error}")
        if search_mode == "compute" and P.wants_search(output("sdm")):
            search_future = self._pool.submit(self._search_path, history)
        if memory_mode == "compute" and P.wants_memory(output("mdm")) and offered:
            submit_mkm()

        search = search_future.result() if search_future else None
        # The memory chosen must be one we hold, word for word; anything else is dropped.
        used = output("mkm") if output("mkm") in {m.text for m in memories} else None
        fact = search.fact if search else None
        if "ckm" not in futures and knowledge_mode == "compute" and not fact and not used:
            submit("ckm", P.contextual_knowledge_prompt(history, budget))  # the fallback too
        knowledge = {"previous_topic": output("ckm") or None, "personal_fact": used,
                     "interesting_fact": fact}
        calls = {name: f.result() for name, f in futures.items()}
        calls.update((call.module, call) for call in (search.calls if search else ()))
        return calls, search, knowledge, used

    def _turn(self, text: str, start: float) -> Reply:
        history = self._history + (P.user_line(text),)
        calls, search, knowledge, used = self._knowledge(text, history)
        response = calls["response"] = self._call(
            "response", P.response_prompt(history, knowledge, self.budget))
        if not response.output:
            raise AgentError(f"no reply: {response.error or 'the model returned an empty line'}")
        verdict = self.safety.check(response.output, reply=True)
        if not verdict.safe:
            return self._unsafe_reply(calls, verdict.reasons, start)
        calls["mgm_self"] = self._call(
            "mgm_self", P.memory_generation_prompt(response.output, self.budget))

        # Commit: age the memories, then add this turn's (new ones start at 0 turns), the
        # bot's own first and then the partner's, as ParlAI's self_observe_memory does: the
        # memory prompts list them in that order.
        self.memory.record_turn(used)
        new = tuple(m for m in (format_memory(calls["mgm_self"].output, 2),
                                format_memory(calls["mgm_user"].output, 1))
                    if self.memory.add(m))
        self._history = history + (P.bot_line(response.output),)
        return Reply(response.output, "ok", calls, search, knowledge, used, new,
                     latency_s=time.monotonic() - start)

    def _open(self, start: float) -> Reply:
        partner = self.memory.texts(person=1)
        orm = self._call("orm", P.opening_prompt(partner, self.budget))
        if not orm.output:
            raise AgentError(f"no opening: {orm.error or 'the model returned an empty line'}")
        verdict = self.safety.check(orm.output, reply=True)
        if not verdict.safe:
            return self._unsafe_reply({"orm": orm}, verdict.reasons, start)
        self._history = (P.bot_line(orm.output),)
        return Reply(orm.output, "ok", {"orm": orm}, latency_s=time.monotonic() - start)

    def _unsafe_reply(self, calls: dict, reasons: tuple[str, ...], start: float) -> Reply:
        # ParlAI hides the reply and resets the agent; the long-term memory is kept unless the
        # user asked otherwise (nothing from this turn was stored).
        self.reset(wipe_memory=self.config.wipe_memory_on_unsafe)
        return Reply(UNSAFE_REPLY_MESSAGE, "unsafe_reply", calls, safety_reasons=reasons,
                     latency_s=time.monotonic() - start)
