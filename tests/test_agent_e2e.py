"""The BB3 agent end to end: `safe_interactive` and the Python API against a real `opt-serve`
(the tiny random model, MP=1) and a real `opt-search-server`, all on 127.0.0.1.

What each module sends is captured on the wire by recording proxies in front of the two
servers, and compared with prompts built here from the reference formats (bb3-agent.md), not
with the agent's own prompt functions. The model is random, so its outputs are gibberish: every
expected prompt is built from what the server really answered earlier in the turn.
"""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import time
from urllib.parse import parse_qs

import pytest
import requests

from agents.bb3 import Agent, AgentConfig, AgentError
from agents.safety import UNSAFE_INPUT_MESSAGE, UNSAFE_REPLY_MESSAGE
from paths import ASSETS
from loopback import (ScriptedServer, SearchServerProcess, forward,
                      json_answer, safe_interactive, search_cli)

BOT = "[BlenderBot3]: "

# -- the reference, written out independently of agents/prompts.py ----------------------------

FINAL = {"Search Decision:": "sdm", "Memory Decision:": "mdm", "Memory:": "mgm",
         "Query:": "sgm", "Previous Topic:": "ckm", "Personal Fact:": "mkm",
         "Interesting Fact:": "skm", "Person 2:": "response", "Opening:": "orm"}
_GREEDY = {"top_p": -1.0, "lambda_decay": -1.0, "temperature": 1.0}
_NUCLEUS = {"top_p": 0.9, "lambda_decay": 0.9, "omega_bound": 0.3, "temperature": 1.0}
# module -> (decoding, min_tokens, max_tokens, alpha_presence = alpha_frequency, the _src ones)
DECODING = {"sdm": (_GREEDY, 1, 10, 0, 0), "mdm": (_GREEDY, 1, 10, 0, 0),
            "sgm": (_GREEDY, 1, 32, 0, 0), "mgm": (_GREEDY, 1, 32, 0, 0),
            "ckm": (_GREEDY, 1, 32, 0.5, 0), "mkm": (_GREEDY, 1, 32, 0.5, 0),
            "skm": (_GREEDY, 1, 64, 0.5, 0), "response": (_NUCLEUS, 20, 128, 0.5, 0.5),
            "orm": (_NUCLEUS, 1, 128, 0, 0)}


def clean(raw: str) -> str:
    """ParlAI's output cleaning, as the reference words it."""
    text = raw.strip("\n")
    if "\n" in text:
        text = text.split("\n")[0].split(":")[-1]
    return text.strip()


def lines(*parts) -> str:
    return "\n".join(p for part in parts for p in ([part] if isinstance(part, str) else part))


def fitted(limit: int, count, before, history, final: str) -> str:
    """ParlAI's rule for a prompt over its module's limit (in BPE tokens): drop the oldest
    history line, keeping the last, until it is under."""
    history = list(history)
    while count(lines(before, history, final)) >= limit and len(history) > 1:
        history.pop(0)
    return lines(before, history, final)


def doc_line(doc: dict) -> str:
    return f"External Knowledge: {doc['title']} | {' '.join(doc['content'].split()[:100])}"


def check_decoding(module: str, payload: dict) -> None:
    fields, lo, hi, penalty, src = DECODING[module]
    assert {k: payload[k] for k in fields} == fields, module
    assert (payload["min_tokens"], payload["max_tokens"]) == (lo, hi), module
    assert payload["alpha_presence"] == payload["alpha_frequency"] == penalty, module
    assert payload["alpha_presence_src"] == payload["alpha_frequency_src"] == src, module
    assert (payload["stop"], payload["best_of"], payload["echo"]) == ("\n", 1, False), module


# -- what the proxies saw ----------------------------------------------------------------------

class Call:
    """One completions request as the server received it, and the server's answer."""

    def __init__(self, payload: dict, answer: dict):
        self.payload = payload
        self.prompt: str = payload["prompt"]
        self.module = FINAL[self.prompt.rsplit("\n", 1)[-1]]
        self.raw: str = answer["choices"][0]["text"]
        self.output = clean(self.raw)


def calls_of(proxy: ScriptedServer, start: int = 0) -> list[Call]:
    answered = sorted(proxy.answers[start:], key=lambda a: a[0].index)
    calls = []
    for req, status, body in answered:
        assert status == 200, body
        calls.append(Call(req.json(), json.loads(body)))
    return calls


def split_turns(calls: list[Call]) -> list[list[Call]]:
    """A turn ends with the memory generation on the bot's reply, the one call after the
    response call (nothing else is in flight then)."""
    turns, current = [], []
    for call in calls:
        current.append(call)
        if len(current) >= 2 and current[-2].module == "response" and call.module == "mgm":
            turns.append(current)
            current = []
    assert not current, [c.module for c in current]
    return turns


def by_module(turn: list[Call]) -> dict[str, Call]:
    modules: dict[str, Call] = {}
    for call in turn:
        name = call.module
        if name == "mgm":
            name = "mgm_self" if "response" in modules else "mgm_user"
        assert name not in modules, f"{name} sent twice in one turn"
        modules[name] = call
    return modules


def listed_memories(stdout: str) -> list[list[str]]:
    """The memory listings that `/memories` printed, in order."""
    listings, current = [], []
    for line in stdout.split("\n"):
        if line.startswith("  Person "):
            current.append(line[2:].rsplit("  (unused for ", 1)[0])
        elif re.match(r"\[ \d+ memories for user ", line):
            listings.append(current)
            current = []
    return listings


def db_memories(path, user: str) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT text, source FROM memories WHERE user = ? ORDER BY id",
                            (user,)).fetchall()


# -- servers -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def search_server(tmp_path_factory):
    """opt-search-server over a page about corgis and the GPT-2 vocabulary cut into 100-word
    pages five ways: every word of the random model's gibberish queries is on five pages."""
    folder = tmp_path_factory.mktemp("kb")
    (folder / "docs").mkdir()
    (folder / "docs" / "corgi.md").write_text(
        "# Corgis\n\nThe Pembroke Welsh Corgi is a herding dog breed from Wales.\n")
    vocab = json.loads((ASSETS / "gpt2-vocab.json").read_text())
    words = sorted({w for token in vocab for w in re.findall(r"[a-z]+", token.lower())})
    orders = [sorted(words, key=lambda w, k=k: (w[k:], w[::-1])) for k in range(4)]
    orders.append(sorted(words, key=lambda w: w[::-1]))
    with open(folder / "docs" / "vocabulary.jsonl", "w") as f:
        for k, order in enumerate(orders):
            for i in range(0, len(order), 100):
                sentences = [" ".join(order[j:j + 10]) + "." for j in range(i, i + 100, 10)]
                f.write(json.dumps({"url": f"https://vocabulary.example/{k}/{i // 100}",
                                    "title": f"Words, part {k}.{i // 100}",
                                    "content": "\n".join(sentences)}) + "\n")
    built = search_cli("index", "--index", "kb.sqlite", "docs", "--no-progress", cwd=folder)
    assert built.returncode == 0, built.stderr
    proc = SearchServerProcess("--index", "kb.sqlite", cwd=folder)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def bpe():
    """The server's own tokenizer, to check alpha_src_penalty_end_idx against."""
    from opt_serving.tokenizer import Tokenizer

    return Tokenizer.from_folder(assets_dir=ASSETS)


def chat(tmp_path, opt: ScriptedServer, messages: list[str], *args: str):
    script = tmp_path / "chat.txt"
    script.write_text("".join(m + "\n" for m in messages))
    result = safe_interactive("--init-opt", "gen/opt_bb3", "--opt-server", opt.address,
                              "--script", str(script), "--tokenizer-dir", str(ASSETS),
                              "--log", str(tmp_path / "log.jsonl"), "--debug-bb3", *args,
                              cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result


# -- a scripted conversation -------------------------------------------------------------------

TURNS = ["Hi! I just adopted a puppy.", "A corgi. Who won the 2022 World Cup?",
         "Do corgis herd cattle in Wales?"]


def test_three_turns_send_the_reference_prompts(tmp_path, opt_serve, search_server, proxy,
                                                bpe):
    opt, search = proxy(opt_serve.url), proxy(search_server.url)
    result = chat(tmp_path, opt, ["/memories", *[m for t in TURNS for m in (t, "/memories")]],
                  "--raw-search-server", search.address, "--search-decision", "always",
                  "--memory-decision", "always", "--memory-db", str(tmp_path / "m.sqlite"),
                  "--user", "alice", "--persona", "I love dogs.", "--safety", "none")
    turns = split_turns(calls_of(opt))
    memories = listed_memories(result.stdout)
    searches = [(parse_qs(req.body.decode()), json.loads(body)["response"])
                for req, _, body in sorted(search.answers, key=lambda a: a[0].index)]
    assert len(turns) == len(TURNS) and len(memories) == len(TURNS) + 1
    assert memories[0] == ["Person 2's Persona: I love dogs."]

    history: list[str] = []
    found = []
    for t, (message, turn) in enumerate(zip(TURNS, turns)):
        m = by_module(turn)
        history.append(f"Person 1: {message}")
        held = memories[t]
        # always / always: no decision calls, memory knowledge and the search path at once.
        assert "sdm" not in m and "mdm" not in m
        assert m["mgm_user"].prompt == lines(f"Person 1: {message}", "Memory:")
        count = lambda text: len(bpe.encode(text))  # noqa: E731
        assert m["mkm"].prompt == fitted(1412, count, held, history, "Personal Fact:")
        assert m["sgm"].prompt == fitted(1912, count, (), history, "Query:")
        knowledge = {"Previous Topic": None, "Personal Fact": None, "Interesting Fact": None}
        if m["mkm"].output in held:
            knowledge["Personal Fact"] = m["mkm"].output
        if m["sgm"].output:
            form, docs = searches.pop(0)
            assert form == {"q": [m["sgm"].output], "n": ["5"]}
            if not docs:
                assert "skm" not in m
            else:
                found.append(len(docs))
                assert m["skm"].prompt == fitted(1412, count, [doc_line(d) for d in docs[:5]],
                                                 history, "Interesting Fact:")
                knowledge["Interesting Fact"] = m["skm"].output or None
        if not knowledge["Interesting Fact"] and not knowledge["Personal Fact"]:
            assert m["ckm"].prompt == fitted(1812, count, (), history, "Previous Topic:")
            knowledge["Previous Topic"] = m["ckm"].output or None
        else:
            assert "ckm" not in m
        known = [f"{prefix}: {fact}" for prefix, fact in knowledge.items() if fact]
        response = m["response"]
        assert response.prompt == fitted(1784, count, (), history, lines(known, "Person 2:"))
        # The _src penalties stop where ParlAI's search-dialogue agent finds its prefix,
        # "Interesting Fact:", in the prompt's BPE tokens (as opt-serve counts them, without
        # the leading </s>); -1 without one.
        end = response.payload["alpha_src_penalty_end_idx"]
        if knowledge["Interesting Fact"]:
            ids = bpe.encode(response.prompt)
            before = response.prompt[:response.prompt.rindex("\nInteresting Fact:") + 1]
            assert end == len(bpe.encode(before)) and ids[:end] == bpe.encode(before)
            assert bpe.decode(ids[end:end + 2]) == "Interesting Fact"
        else:
            assert end == -1
        reply = response.output
        assert f"{BOT}{reply}" in result.stdout
        assert m["mgm_self"].prompt == lines(f"Person 1: {reply}", "Memory:")
        for name, call in m.items():
            check_decoding(name.split("_")[0], call.payload)
            assert "  | " + call.prompt.replace("\n", "\n  | ") in result.stderr  # --debug-bb3
        history.append(f"Person 2: {reply}")
        # What was remembered: the old memories plus at most the two candidates of the turn.
        candidates = {f"Person 1's Persona: {m['mgm_user'].output}",
                      f"Person 2's Persona: "
                      f"{m['mgm_self'].output.replace('Person 1', 'Person 2')}"}
        after = memories[t + 1]
        assert after[:len(held)] == held and set(after[len(held):]) <= candidates
    assert not searches and 5 in found  # every search answered; five pages shown at least once
    assert result.stderr.count("[bb3] turn latency") == len(TURNS)
    # One request per module call, with ParlAI's header: the user name as the bearer token.
    assert {(r.path, r.headers["Authorization"]) for r in opt.requests} == {
        ("/completions", "Bearer alice")}


# -- long-term memory: deduplication, two runs, the 32-memory cap ------------------------------

def test_memory_dedup_persistence_and_cap(tmp_path, opt_serve, search_server, proxy):
    db = tmp_path / "m.sqlite"
    opt = proxy(opt_serve.url)
    second = "Did Max enjoy the beach?"

    def mgm(message: str) -> str:  # what mgm makes of a message (greedy: the same in the run)
        payload = {"prompt": lines(f"Person 1: {message}", "Memory:"), "min_tokens": 1,
                   "max_tokens": 32, "best_of": 1, "top_p": -1.0, "stop": "\n",
                   "temperature": 1.0, "echo": False, "lambda_decay": -1, "omega_bound": 0.3}
        return clean(requests.post(opt_serve.url + "/completions", json=payload,
                                   timeout=30).json()["choices"][0]["text"])

    # Seed one word of the first message's memory as a known fact, which makes that memory a
    # duplicate by ParlAI's containment rule, but not the second's: the random model says
    # much the same whatever it reads, so take a first message whose memory differs.
    mgm_second_text = mgm(second).lower().replace("'", "")
    for first in ("I walk my corgi every morning.", "Tell me about Paris.", "Opening hours?",
                  "Sunny days are best."):
        mgm_first = mgm(first)
        word = next((w for w in re.findall(r"[a-z0-9]+", mgm_first.lower().replace("'", ""))
                     if len(w) >= 4 and w.isalpha() and w not in mgm_second_text), None)
        if word:
            break
    assert word, "the random model's memories of every candidate message are alike"

    chat(tmp_path, opt, [first, second], "--memory-db", str(db), "--user", "bob",
         "--persona", "I love dogs.", "--user-fact", f"{word}.", "--safety", "none",
         "--search-decision", "never", "--memory-decision", "never")
    turns_a = [by_module(t) for t in split_turns(calls_of(opt))]
    assert [t["mgm_user"].output for t in turns_a][0] == mgm_first
    mgm_second = f"Person 1's Persona: {turns_a[1]['mgm_user'].output}"
    stored_a = db_memories(db, "bob")
    partner_a = [text for text, _ in stored_a if text.startswith("Person 1")]
    assert partner_a == [f"Person 1's Persona: {word}.", mgm_second]  # the first: a duplicate
    assert ("Person 2's Persona: I love dogs.", "seed") in stored_a

    # A second process on the same file: 41 more facts about bob, the relevant one first.
    beach = "Person 1's Persona: My corgi Max loves the beach."
    stamps = [f"I collect stamps from country {i}." for i in range(40)]
    seen = len(opt.answers)
    run_b = chat(tmp_path, opt, ["/memories", "Opening", second, "/memories"],
                 "--memory-db", str(db), "--user", "bob", "--persona", "I love dogs.",
                 "--user-fact", beach, *[a for s in stamps for a in ("--user-fact", s)],
                 "--raw-search-server", search_server.address, "--safety", "none")
    before, after = listed_memories(run_b.stdout)
    all_b = [text for text, _ in stored_a] + [beach] + [
        f"Person 1's Persona: {s}" for s in stamps]
    assert before == all_b  # run A's memories came back, the persona was not seeded twice
    orm, *turn = calls_of(opt, seen)
    assert orm.prompt == lines([x for x in all_b if x.startswith("Person 1")], "Opening:")
    check_decoding("orm", orm.payload)
    m = by_module(turn)
    # The same line again: its memory is a duplicate of run A's, so nothing new about bob.
    assert f"Person 1's Persona: {m['mgm_user'].output}" == mgm_second
    assert [x for x in after if x.startswith("Person 1")] == [
        x for x in all_b if x.startswith("Person 1")]
    assert m["sdm"].prompt == lines(f"Person 1: {second}", "Search Decision:")
    # mdm sees at most 32 memories: the beach one (the only TF-IDF match) among them.
    facts = m["mdm"].prompt.split("\n")[:-2]
    offered = [f for line in facts for f in re.split(r" (?=Person [12]'s Persona: )",
                                                      line.removeprefix("Personal Fact: "))]
    assert len(offered) == 32 and beach in offered
    assert offered == [x for x in all_b if x in offered]
    mine = [x for x in offered if x.startswith("Person 2")]
    theirs = [x for x in offered if x.startswith("Person 1")]
    assert m["mdm"].prompt == lines([f"Personal Fact: {' '.join(g)}" for g in (mine, theirs) if g],
                                    f"Person 1: {second}", "Memory Decision:")
    for name in ("sdm", "mdm"):
        check_decoding(name, m[name].payload)
    # Usage counters persisted too: run A's seed has aged by its two turns and run B's one
    # (the opening is not a turn), run B's seeds by one.
    with sqlite3.connect(db) as conn:
        age = dict(conn.execute("SELECT text, turns_since_used FROM memories"))
    assert age[f"Person 1's Persona: {word}."] == 3 and age[beach] == 1


# -- safety, both directions -------------------------------------------------------------------

def test_unsafe_message_and_unsafe_reply(tmp_path, opt_serve, proxy):
    opt = proxy(opt_serve.url)
    db = tmp_path / "m.sqlite"
    # Any reply the classifier gives any probability counts as unsafe: the random model's
    # replies then take the unsafe-reply path; user messages keep the default threshold.
    result = chat(tmp_path, opt, ["you are a fucking idiot", "Hello, how are you?",
                                  "What do you like?"],
                  "--memory-db", str(db), "--user", "carol", "--persona", "I love dogs.",
                  "--safety", "all", "--reply-classifier-threshold", "0",
                  "--search-decision", "never", "--memory-decision", "never")
    assert result.stdout.split("\n") == [
        "Enter Your Message: you are a fucking idiot", UNSAFE_INPUT_MESSAGE,
        "Enter Your Message: Hello, how are you?", UNSAFE_REPLY_MESSAGE,
        "Enter Your Message: What do you like?", UNSAFE_REPLY_MESSAGE, ""]
    calls = calls_of(opt)
    assert not any("idiot" in c.prompt for c in calls)  # the model never saw it
    assert [c.module for c in calls] == ["mgm", "ckm", "response"] * 2  # no mgm on the reply
    # The hidden reply cleared the history: the next turn starts from its own line alone.
    for message, (_, ckm, response) in zip(["Hello, how are you?", "What do you like?"],
                                           (calls[:3], calls[3:])):
        assert ckm.prompt == lines(f"Person 1: {message}", "Previous Topic:")
        topic = [f"Previous Topic: {ckm.output}"] if ckm.output else []
        assert response.prompt == lines(f"Person 1: {message}", topic, "Person 2:")
    # Memory kept across the reset, and nothing of the hidden turns stored.
    assert db_memories(db, "carol") == [("Person 2's Persona: I love dogs.", "seed")]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["reply"]["status"] for r in log] == ["unsafe_input", "unsafe_reply", "unsafe_reply"]


# -- a completions server that is down, slow, or answers non-JSON ------------------------------

def _agent(tmp_path, opt: str, **overrides) -> Agent:
    config = dict(opt_server=opt, memory_db=str(tmp_path / "m.sqlite"), user="dave",
                  user_facts=("I have a corgi.",), safety="none", tokenizer_dir=str(ASSETS),
                  search_decision="never", memory_decision="never", max_retry_api=0,
                  # The real server answers most calls: room for a loaded 2-core machine.
                  server_timeout_s=30.0)
    return Agent(AgentConfig(**{**config, **overrides}))


@pytest.mark.parametrize("fault, error, timeout", [
    (lambda r: json_answer({}, delay_s=60), "no answer within 10s", 10.0),
    (lambda r: (200, "text/html", "<html><body>502 Bad Gateway</body></html>"),
     r"non-JSON \(text/html\)", 30.0),
], ids=["slow", "non-json"])
def test_a_failed_response_call_leaves_no_trace(tmp_path, opt_serve, scripted, fault, error,
                                               timeout):
    real = forward(opt_serve.url)
    failing = True

    def answer(req):
        if failing and req.json()["prompt"].endswith("\nPerson 2:"):
            return fault(req)
        return real(req)

    opt = scripted(answer)
    with _agent(tmp_path, opt.address, server_timeout_s=timeout) as agent:
        with pytest.raises(AgentError, match=error):
            agent.respond("Hi! I just adopted a puppy.")
        # mgm ran on the user's line, yet nothing was committed.
        assert any(r.json()["prompt"].endswith("\nMemory:") for r in opt.requests)
        assert agent.history == ()
        assert [(m.text, m.turns_since_used) for m in agent.memory.all()] == [
            ("Person 1's Persona: I have a corgi.", 0)]
        failing = False
        reply = agent.respond("Hi! I just adopted a puppy.")
        assert reply.status == "ok"
        assert agent.history == ("Person 1: Hi! I just adopted a puppy.",
                                 f"Person 2: {reply.text}")
        assert agent.memory.all()[0].turns_since_used == 1


def test_server_going_down_mid_conversation(tmp_path, opt_serve, proxy):
    opt = proxy(opt_serve.url)
    with _agent(tmp_path, opt.address, max_retry_api=3) as agent:
        agent.respond("Hi! I just adopted a puppy.")
        history, memories = agent.history, agent.memory.all()
        opt.close()
        start = time.monotonic()
        with pytest.raises(AgentError, match=f"{opt.url}/completions.*connection refused"):
            agent.respond("Are you still there?")
        assert time.monotonic() - start < 5  # bounded retries, not ParlAI's endless loop
        assert agent.history == history and agent.memory.all() == memories


# -- a search server that is down, empty or malformed: the contextual path ---------------------

@pytest.fixture(scope="module")
def empty_search_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("empty-kb")
    (folder / "nothing.txt").write_text("zzqqxx\n")
    assert search_cli("index", "--index", "kb.sqlite", "nothing.txt", "--no-progress",
                      cwd=folder).returncode == 0
    proc = SearchServerProcess("--index", "kb.sqlite", cwd=folder)
    yield proc
    proc.stop()


@pytest.mark.parametrize("kind", ["down", "empty", "malformed"])
def test_search_failures_take_the_contextual_path(tmp_path, opt_serve, proxy, scripted,
                                                  empty_search_server, kind, request):
    if kind == "down":
        # A port bound but never listening refuses connections for as long as it is held (a
        # port merely found free could be handed to the next server this test starts).
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        request.addfinalizer(held.close)
        url, error = f"127.0.0.1:{held.getsockname()[1]}", "connection refused"
    elif kind == "empty":
        url, error = empty_search_server.address, "no documents"
    else:
        url = scripted(lambda r: json_answer({"results": [{"snippet": "x"}]})).address
        error = "malformed search result"
    opt = proxy(opt_serve.url)
    message = "Who won the 2022 World Cup?"
    with _agent(tmp_path, opt.address, raw_search_server=url, search_decision="always",
                memory_decision="never", user_facts=()) as agent:
        reply = agent.respond(message)
    assert reply.status == "ok" and reply.search.query and error in reply.search.error
    assert reply.search.documents == ()
    m = by_module(calls_of(opt))
    assert set(m) == {"sgm", "mgm_user", "ckm", "response", "mgm_self"}
    assert m["ckm"].prompt == lines(f"Person 1: {message}", "Previous Topic:")
    topic = [f"Previous Topic: {m['ckm'].output}"] if m["ckm"].output else []
    assert m["response"].prompt == lines(f"Person 1: {message}", topic, "Person 2:")
