"""BB3's long-term memory, kept in SQLite so that it survives restarts and resets.

ParlAI keeps the memory dict in RAM and loses it on any reset (ParlAI #4932, #4776). Here every
conversation partner (`user`) has its own rows in one SQLite file; the bot's own memories
("Person 2's Persona: ...") are kept per partner too, as in ParlAI where both live in the same
conversation state. The rules are ParlAI's: the memory-generation output gets a persona prefix,
`no persona` and empty outputs are rejected, a candidate is rejected when the normalised token
set of an existing memory of the same person is contained in it, the memory chosen by the
memory-knowledge module goes back to 0 turns since use and all others age by one, and at most
32 memories (by TF-IDF match with the user's message) are offered to the modules.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agents.textnorm import token_set, top_k_by_tfidf

MAX_OFFERED_MEMORIES = 32
PERSONA_PREFIXES = {1: "Person 1's Persona: ", 2: "Person 2's Persona: "}
# What the memory-generation module says when a line holds nothing worth remembering, and the
# sentinels a failed or empty generation leaves behind.
_REJECTED = frozenset({"no persona", "", "none", "__failed__", "__silence__"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS memories (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    person INTEGER NOT NULL CHECK (person IN (1, 2)),
    text TEXT NOT NULL,
    turns_since_used INTEGER NOT NULL DEFAULT 0,
    times_used INTEGER NOT NULL DEFAULT 0,
    source TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (user, text)
);
"""


def data_dir() -> Path:
    """The agent's files (memory, conversation log) when no path is given: XDG data home."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                             "share")
    return Path(base) / "opt-serving"


def default_memory_db() -> Path:
    return data_dir() / "bb3-memory.sqlite"


@dataclass(frozen=True)
class Memory:
    text: str  # with its prefix: "Person 1's Persona: I have a corgi."
    person: int  # 1 = the user, 2 = the bot
    turns_since_used: int
    times_used: int
    source: str  # "mgm" (generated), "seed" (--persona / --user-fact)


def person_of(memory: str) -> int | None:
    for person, prefix in PERSONA_PREFIXES.items():
        if memory.startswith(prefix.rstrip()):
            return person
    return None


def strip_persona_prefix(memory: str) -> str:
    for prefix in PERSONA_PREFIXES.values():
        if memory.startswith(prefix.rstrip()):
            return memory[len(prefix.rstrip()):].strip()
    return memory.strip()


def format_memory(output: str | None, person: int) -> str | None:
    """The stored form of a memory-generation output, or None when it must be rejected.

    `person` 1 for a memory about the user, 2 for one about the bot. The bot's own line is sent
    to the memory generator as "Person 1: ..." (the module only knows that shape), so its
    output speaks of Person 1 and is rewritten to Person 2.
    """
    if output is None:
        return None
    text = strip_persona_prefix(output.strip())
    if person == 2:
        text = text.replace("Person 1", "Person 2")
    if text.lower().strip(" .!") in _REJECTED or not token_set(text):
        return None
    return PERSONA_PREFIXES[person] + text


def is_duplicate(candidate: str, existing: Iterable[str]) -> bool:
    """ParlAI's rule: an existing memory whose token set is contained in the candidate's."""
    cand = token_set(strip_persona_prefix(candidate))
    for memory in existing:
        tokens = token_set(strip_persona_prefix(memory))
        if tokens and tokens <= cand:
            return True
    return False


def select_memories(message: str, memories: Sequence[Memory],
                    k: int = MAX_OFFERED_MEMORIES) -> list[Memory]:
    """At most k memories, the ones closest to the user's message by TF-IDF."""
    keep = top_k_by_tfidf(message, [strip_persona_prefix(m.text) for m in memories], k)
    return [memories[i] for i in keep]


class MemoryStore:
    """The memories of one conversation partner in a SQLite file (":memory:" for none)."""

    def __init__(self, path: str | os.PathLike, user: str):
        if not user:
            raise ValueError("a memory store needs a user name")
        self.user = user
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # The agent may be driven from a thread other than the one that built it (a web
        # front-end, a thread pool); one lock serialises access instead.
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0,
                                     isolation_level=None)
        if self.path != ":memory:":
            # WAL lets a second safe_interactive (same file, another user) read while one writes.
            self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def all(self, person: int | None = None) -> list[Memory]:
        sql = ("SELECT text, person, turns_since_used, times_used, source FROM memories "
               "WHERE user = ?")
        args: tuple = (self.user,)
        if person is not None:
            sql += " AND person = ?"
            args += (person,)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY id", args).fetchall()
        return [Memory(*row) for row in rows]

    def texts(self, person: int | None = None) -> list[str]:
        return [m.text for m in self.all(person)]

    def add(self, memory: str | None, source: str = "mgm") -> bool:
        """Store a formatted memory unless empty or a duplicate; True when it was added."""
        if not memory:
            return False
        person = person_of(memory)
        if person is None:
            raise ValueError(f"not a persona memory: {memory!r}")
        with self._lock:
            # IMMEDIATE: the duplicate check and the insert must see the same rows even when
            # another process writes to the same file.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                existing = [r[0] for r in self._conn.execute(
                    "SELECT text FROM memories WHERE user = ? AND person = ?",
                    (self.user, person))]
                if is_duplicate(memory, existing):
                    self._conn.execute("ROLLBACK")
                    return False
                self._conn.execute(
                    "INSERT INTO memories (user, person, text, source, created_at) "
                    "VALUES (?, ?, ?, ?, ?)", (self.user, person, memory, source, time.time()))
                self._conn.execute("COMMIT")
                return True
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def seed(self, facts: Iterable[str], person: int) -> list[str]:
        """Seed persona facts (plain sentences or already prefixed); returns those added."""
        added = []
        for fact in facts:
            memory = fact if person_of(fact) else format_memory(fact, person)
            if self.add(memory, source="seed"):
                added.append(memory)
        return added

    def record_turn(self, used: str | None) -> None:
        """One completed turn: the used memory goes back to 0, every other one ages by 1."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(
                "UPDATE memories SET turns_since_used = turns_since_used + 1 "
                "WHERE user = ? AND text IS NOT ?", (self.user, used))
            if used is not None:
                self._conn.execute(
                    "UPDATE memories SET turns_since_used = 0, times_used = times_used + 1 "
                    "WHERE user = ? AND text = ?", (self.user, used))
            self._conn.execute("COMMIT")

    def clear(self) -> int:
        """Forget everything about this user (ParlAI's reset semantics); returns rows removed."""
        with self._lock:
            cur = self._conn.execute("DELETE FROM memories WHERE user = ?", (self.user,))
            return cur.rowcount
