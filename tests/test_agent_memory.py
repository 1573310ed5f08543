"""Long-term memory (ParlAI's rules, kept in SQLite across restarts) and the conversation log."""

from __future__ import annotations

import json
import sqlite3

import pytest

from agents.bb3 import ModuleCall, Reply
from agents.convlog import ConversationLog, export_parlai, read_log
from agents.memory import (MAX_OFFERED_MEMORIES, Memory, MemoryStore, format_memory,
                           is_duplicate, select_memories)
from agents.textnorm import porter_stem, tfidf_scores, token_set


def test_generated_memories_get_the_persona_prefix():
    assert format_memory(" I just adopted a puppy.", 1) == (
        "Person 1's Persona: I just adopted a puppy.")
    # The bot's own line went through mgm as "Person 1: ...": its memory is Person 2's.
    assert format_memory("I like Person 1's dog.", 2) == (
        "Person 2's Persona: I like Person 2's dog.")
    assert format_memory("Person 1's Persona: I am a vet.", 1) == "Person 1's Persona: I am a vet."


@pytest.mark.parametrize("output", ["no persona", "No persona.", "", "   ", None, "I am.",
                                    "__failed__"])
def test_empty_and_no_persona_outputs_are_rejected(output):
    assert format_memory(output, 1) is None


def test_deduplication_is_parlais_containment_rule():
    existing = ["Person 1's Persona: I have a dog."]
    # The existing memory's normalised tokens ({dog}) are contained in these candidates.
    assert is_duplicate("Person 1's Persona: I have dogs!", existing)
    assert is_duplicate("Person 1's Persona: I have two dogs named Max.", existing)
    assert not is_duplicate("Person 1's Persona: I like cats.", existing)
    # Containment runs one way: a vaguer candidate than an existing memory is new.
    assert not is_duplicate("Person 1's Persona: I walk.",
                            ["Person 1's Persona: I walk my dogs."])
    # Negations are not filler words.
    assert not is_duplicate("Person 1's Persona: I like dogs.",
                            ["Person 1's Persona: I do not like dogs."])
    assert token_set("I LOVED the Running, dogs!") == {"love", "run", "dog"}


def test_porter_stemmer_matches_porters_examples():
    pairs = {"caresses": "caress", "ponies": "poni", "cats": "cat", "agreed": "agre",
             "plastered": "plaster", "motoring": "motor", "hopping": "hop", "falling": "fall",
             "filing": "file", "happy": "happi", "relational": "relat", "rational": "ration",
             "generalizations": "gener", "oscillators": "oscil", "adjustable": "adjust",
             "electricity": "electr", "hopefulness": "hope", "replacement": "replac",
             "adoption": "adopt", "controll": "control", "roll": "roll",
             "us": "us", "go": "go"}  # two letters: left alone, as in Porter's own code
    assert {w: porter_stem(w) for w in pairs} == pairs


def test_tfidf_scores_follow_shared_rare_words():
    docs = ["I have a corgi named Max.", "I work as a nurse at night.",
            "My corgi likes long walks.", "I am learning to play the piano.", "I like pizza.",
            "It is what it is."]
    scores = tfidf_scores("How is your corgi doing on walks?", docs)
    # Two shared stems (corgi, walk) beat one; no shared content word scores 0; a document of
    # filler words only has no vector at all.
    assert scores[2] > scores[0] > 0
    assert scores[1] == scores[3] == scores[4] == scores[5] == 0
    assert tfidf_scores("corgi", ["the", "it is"]) == [0.0, 0.0]  # no vocabulary at all


def test_at_most_32_memories_are_offered_by_tfidf():
    memories = [Memory(f"Person 1's Persona: I collect stamps from country {i}.", 1, 0, 0, "mgm")
                for i in range(40)]
    memories[3] = Memory("Person 1's Persona: My corgi Max loves the beach.", 1, 0, 0, "mgm")
    chosen = select_memories("Did Max enjoy the beach?", memories)
    assert len(chosen) == MAX_OFFERED_MEMORIES == 32
    assert memories[3] in chosen
    assert chosen == sorted(chosen, key=memories.index)  # original order kept
    assert select_memories("anything", memories[:5]) == memories[:5]


def test_memories_survive_a_restart_per_user(tmp_path):
    db = tmp_path / "memory.sqlite"
    with MemoryStore(db, "alice") as store:
        assert store.add("Person 1's Persona: I have a corgi.")
        assert store.add("Person 2's Persona: I have a corgi.")  # the bot's own: other person
        assert not store.add("Person 1's Persona: I have a corgi named Max.")  # duplicate
        assert not store.add(None)
    with MemoryStore(db, "bob") as store:
        assert store.all() == []
        store.add("Person 1's Persona: I am a pilot.")
    with MemoryStore(db, "alice") as store:  # a new process would see the same rows
        assert store.texts() == ["Person 1's Persona: I have a corgi.",
                                 "Person 2's Persona: I have a corgi."]
        assert store.texts(person=2) == ["Person 2's Persona: I have a corgi."]
    rows = sqlite3.connect(db).execute("SELECT user, count(*) FROM memories GROUP BY user")
    assert dict(rows.fetchall()) == {"alice": 2, "bob": 1}


def test_usage_counters(tmp_path):
    with MemoryStore(tmp_path / "m.sqlite", "alice") as store:
        store.seed(["I have a corgi.", "I am a nurse."], person=1)
        store.record_turn(None)
        store.record_turn("Person 1's Persona: I am a nurse.")
        store.record_turn(None)
        state = {m.text: (m.turns_since_used, m.times_used) for m in store.all()}
    assert state == {"Person 1's Persona: I have a corgi.": (3, 0),
                     "Person 1's Persona: I am a nurse.": (1, 1)}


def test_persona_seeding_is_idempotent_across_runs(tmp_path):
    db = tmp_path / "m.sqlite"
    for _ in range(2):
        with MemoryStore(db, "alice") as store:
            store.seed(["I love hiking.", "Person 2's Persona: I am a chef."], person=2)
            store.seed(["I have a corgi."], person=1)
    with MemoryStore(db, "alice") as store:
        memories = {m.text: (m.person, m.source) for m in store.all()}
    assert memories == {"Person 2's Persona: I love hiking.": (2, "seed"),
                        "Person 2's Persona: I am a chef.": (2, "seed"),
                        "Person 1's Persona: I have a corgi.": (1, "seed")}


def test_two_stores_on_one_file_see_each_others_writes(tmp_path):
    db = tmp_path / "m.sqlite"
    with MemoryStore(db, "alice") as first, MemoryStore(db, "alice") as second:
        assert first.add("Person 1's Persona: I play chess.")
        assert not second.add("Person 1's Persona: I play chess every day.")
        assert second.texts() == ["Person 1's Persona: I play chess."]


def _reply(text: str, status: str = "ok") -> Reply:
    call = ModuleCall("response", "Person 1: hi\nPerson 2:", " " + text, text, None, 0.5, 3)
    return Reply(text, status, {"response": call}, knowledge={"previous_topic": "greetings"},
                 new_memories=("Person 1's Persona: I say hi.",), latency_s=1.25)


def test_log_exports_parlai_conversations_with_feedback(tmp_path):
    log_path, out = tmp_path / "log.jsonl", tmp_path / "parlai.jsonl"
    log = ConversationLog(log_path, "alice")
    with pytest.raises(LookupError):
        log.log_feedback("good")
    first = log.log_turn("Hi!", _reply("Hello there!"))
    log.log_feedback("bad", "too generic")
    log.log_turn("You are awful", _reply("[ Unsafe model reply ... ]", "unsafe_reply"))
    with pytest.raises(LookupError):  # that reply was never shown
        log.log_feedback("good")
    log.log_turn("Tell me more", _reply("About what?"))
    log.new_conversation()
    log.log_turn("New chat", _reply("Welcome back!"))
    log.log_feedback("good")

    records = list(read_log(log_path))
    assert [r["type"] for r in records] == ["turn", "feedback", "turn", "turn", "turn",
                                            "feedback"]
    turn = records[0]
    assert turn["reply"]["modules"]["response"]["prompt"] == "Person 1: hi\nPerson 2:"
    assert turn["reply"]["latency_s"] == 1.25 and records[1]["turn"] == first

    assert export_parlai(log_path, out) == 2
    conversations = [json.loads(line) for line in out.read_text().splitlines()]
    dialog = conversations[0]["dialog"]
    assert [[act["text"] for act in pair] for pair in dialog] == [
        ["Hi!", "Hello there!"], ["Tell me more", "About what?"]]
    assert [act["id"] for act in dialog[0]] == ["alice", "BlenderBot3"]
    assert dialog[0][1]["feedback"] == {"rating": "bad", "reason": "too generic"}
    assert [pair[1]["episode_done"] for pair in dialog] == [False, True]
    assert dialog[0][1]["modules"] == {"response": "Hello there!"}
    assert conversations[1]["dialog"][0][1]["feedback"] == {"rating": "good", "reason": None}
