"""The conversation log: one JSON line per turn or rating, exportable to ParlAI's format.

Each turn keeps what is needed to study or train from it later: the user's text, the reply,
every module's prompt and output, the search documents and the timings. A rating (`/good`,
`/bad <why>`) is its own line pointing at a turn, so the log is only ever appended to; BB3x was
trained from exactly this kind of organic feedback.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from agents.bb3 import Reply
from agents.memory import data_dir

BOT_ID = "BlenderBot3"


def default_log_path() -> Path:
    return data_dir() / "bb3-conversations.jsonl"


class ConversationLog:
    """Appends turns and ratings of one user's conversations to a JSONL file."""

    def __init__(self, path: str | os.PathLike, user: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.user = user
        self.conversation = uuid.uuid4().hex
        self.last_turn: str | None = None  # the last turn with a reply shown, for ratings

    def new_conversation(self) -> None:
        self.conversation = uuid.uuid4().hex
        self.last_turn = None

    def _append(self, record: dict) -> None:
        # One write per line, flushed at once: a crash loses at most the turn in progress.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def log_turn(self, message: str, reply: Reply) -> str:
        turn = uuid.uuid4().hex
        self._append({"type": "turn", "id": turn, "conversation": self.conversation,
                      "user": self.user, "time": time.time(), "message": message,
                      "reply": reply.to_dict()})
        self.last_turn = turn if reply.status == "ok" else None
        return turn

    def log_feedback(self, rating: str, reason: str | None = None) -> str:
        """Rate the last reply shown; raises LookupError when there is none."""
        if rating not in ("good", "bad"):
            raise ValueError("rating is 'good' or 'bad'")
        if self.last_turn is None:
            raise LookupError("no reply to rate yet")
        self._append({"type": "feedback", "turn": self.last_turn, "rating": rating,
                      "reason": reason or None, "time": time.time()})
        return self.last_turn


def read_log(path: str | os.PathLike) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError:
                    raise ValueError(f"{path}:{number}: not a JSON line") from None


def to_parlai(records: list[dict]) -> list[dict]:
    """Conversations in ParlAI's conversation format (what `parlai.utils.conversations` reads).

    One object per conversation: `dialog` is a list of [user act, bot act] pairs, each act
    `{"id", "text", "episode_done"}` plus this project's extras on the bot act (module outputs,
    search, memories, feedback). Turns whose reply was never shown (unsafe) are left out.
    """
    feedback = {r["turn"]: {"rating": r["rating"], "reason": r.get("reason")}
                for r in records if r.get("type") == "feedback"}
    conversations: dict[str, dict] = {}
    for r in records:
        if r.get("type") != "turn" or r["reply"]["status"] != "ok":
            continue
        conv = conversations.setdefault(r["conversation"], {
            "dialog": [], "context": [],
            "metadata": {"conversation_id": r["conversation"], "user": r["user"],
                         "start_time": r["time"]}})
        reply = r["reply"]
        bot = {"id": BOT_ID, "text": reply["text"], "episode_done": False,
               "modules": {k: v["output"] for k, v in reply["modules"].items()},
               "knowledge": reply["knowledge"], "search": reply["search"],
               "used_memory": reply["used_memory"], "new_memories": reply["new_memories"],
               "latency_s": reply["latency_s"]}
        if r["id"] in feedback:
            bot["feedback"] = feedback[r["id"]]
        conv["dialog"].append([{"id": r["user"], "text": r["message"], "episode_done": False},
                               bot])
    for conv in conversations.values():
        conv["dialog"][-1][-1]["episode_done"] = True
    return list(conversations.values())


def export_parlai(log_path: str | os.PathLike, out_path: str | os.PathLike) -> int:
    """Write the log's conversations as ParlAI JSONL; returns how many were written."""
    conversations = to_parlai(list(read_log(log_path)))
    with open(out_path, "w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps(conv, ensure_ascii=False) + "\n")
    return len(conversations)
