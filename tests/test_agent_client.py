"""The completions client and the agent when the server is down, slow, or answers badly.

Real sockets on 127.0.0.1: a port nobody listens on, and small HTTP servers (`scripted`, from
conftest) that are slow, answer HTML, or answer with error statuses. The success path against a
real model server is in test_agent_e2e.py.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

from agents import prompts as P
from agents.bb3 import Agent, AgentConfig, AgentError
from agents.client import (CompletionsClient, CompletionsError, RetryPolicy, completions_url,
                           normalise_url, parse_completion)
from agents.memory import MemoryStore
from loopback import free_port, safe_interactive

FAST = RetryPolicy(timeout_s=2.0, max_retries=2, backoff_s=0.05)
SDM = P.Prompt("sdm", "Person 1: Hi!\nSearch Decision:")


def test_urls_follow_parlais_spelling():
    assert normalise_url("localhost:6010") == "http://localhost:6010"
    assert completions_url("localhost:6010/") == "http://localhost:6010/completions"
    assert completions_url("https://h/v1/engines/x/completions") == (
        "https://h/v1/engines/x/completions")


def test_refused_connection_fails_within_seconds_naming_the_url():
    port = free_port()
    client = CompletionsClient(f"127.0.0.1:{port}")  # default retries and backoff
    start = time.monotonic()
    with pytest.raises(CompletionsError) as info:
        client.complete_payload(SDM.payload())
    assert time.monotonic() - start < 6
    message = str(info.value)
    assert f"http://127.0.0.1:{port}/completions" in message and "refused" in message
    assert info.value.unreachable and info.value.attempts == 4


def test_slow_server_times_out_and_stops(scripted):
    server = scripted(lambda r: (200, "application/json", "{}", 3.0))
    client = CompletionsClient(server.url, RetryPolicy(timeout_s=0.3, max_retries=1,
                                                       backoff_s=0.05))
    start = time.monotonic()
    with pytest.raises(CompletionsError, match=r"no answer within 0.3s"):
        client.complete_payload(SDM.payload())
    assert time.monotonic() - start < 2.0
    assert len(server.requests) == 2


def test_non_json_answers_are_retried_then_reported(scripted):
    server = scripted(lambda r: (200, "text/html", "<html>Bad Gateway</html>"))
    client = CompletionsClient(server.url, FAST)
    with pytest.raises(CompletionsError, match=r"non-JSON \(text/html\)") as info:
        client.complete_payload(SDM.payload())
    assert len(server.requests) == 3 and info.value.attempts == 3


def test_busy_server_is_retried_with_its_retry_after(scripted):
    error = json.dumps({"error": {"message": "queue full", "type": "server_error"}})
    server = scripted(lambda r: (503, "application/json", error, 0, {"Retry-After": "0.2"}))
    client = CompletionsClient(server.url, FAST)
    start = time.monotonic()
    with pytest.raises(CompletionsError, match="HTTP 503: queue full") as info:
        client.complete_payload(SDM.payload())
    assert len(server.requests) == 3 and info.value.status == 503
    assert time.monotonic() - start >= 0.4  # two waits of the server's 0.2 s, not 0.05 s


def test_bad_request_is_not_retried(scripted):
    error = json.dumps({"error": {"message": "prompt is empty", "param": "prompt",
                                  "type": "invalid_request_error"}})
    server = scripted(lambda r: (400, "application/json", error))
    with pytest.raises(CompletionsError, match="HTTP 400: prompt is empty") as info:
        CompletionsClient(server.url, FAST).complete_payload(SDM.payload())
    assert len(server.requests) == 1 and info.value.status == 400


def test_the_wire_request_is_parlais(scripted):
    server = scripted(lambda r: (401, "application/json", '{"error": {"message": "no"}}'))
    client = CompletionsClient(server.url.removeprefix("http://"), FAST, api_key="alice")
    with pytest.raises(CompletionsError):
        client.complete_payload(SDM.payload())
    sent = server.requests[0]
    assert (sent.method, sent.path) == ("POST", "/completions")
    assert sent.headers["Authorization"] == "Bearer alice"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.json() == SDM.payload()


def test_a_backing_off_call_does_not_hold_up_another(scripted):
    busy = scripted(lambda r: (503, "application/json", "{}"))
    refusing = scripted(lambda r: (400, "application/json", "{}"))
    slow_client = CompletionsClient(busy.url, RetryPolicy(max_retries=2, backoff_s=0.5))
    finished = {}

    def run(name, client):
        try:
            client.complete_payload(SDM.payload())
        except CompletionsError:
            finished[name] = time.monotonic()

    start = time.monotonic()
    threads = [threading.Thread(target=run, args=("busy", slow_client)),
               threading.Thread(target=run, args=("quick", CompletionsClient(refusing.url)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert finished["quick"] - start < 0.4 < 1.4 < finished["busy"] - start


def test_completion_parsing_follows_the_wire_contract():
    body = {"id": "x", "object": "text_completion", "created": 1, "model": "bb3",
            "choices": [{"text": " search", "logprobs": {"tokens": [" search"],
                                                         "token_logprobs": [-0.1],
                                                         "text_offset": [0],
                                                         "top_logprobs": None},
                         "finish_reason": "stop"}]}
    assert parse_completion(body) == " search"
    for bad in ({}, {"choices": []}, {"choices": [{"text": 3}]}, ["x"]):
        with pytest.raises(CompletionsError):
            parse_completion(bad, "http://h/completions")


def _agent(tmp_path, server: str, **overrides) -> Agent:
    config = AgentConfig(opt_server=server, memory_db=str(tmp_path / "memory.sqlite"),
                         user="alice", safety="none", max_retry_api=1, server_timeout_s=1.0,
                         user_facts=("I have a corgi.",), **overrides)
    return Agent(config)


def test_agent_with_server_down_fails_fast_and_changes_nothing(tmp_path):
    port = free_port()
    with _agent(tmp_path, f"127.0.0.1:{port}") as agent:
        start = time.monotonic()
        with pytest.raises(AgentError, match=f"127.0.0.1:{port}/completions.*refused"):
            agent.respond("Hi! I just adopted a puppy.")
        assert time.monotonic() - start < 3
        assert agent.history == ()
    with MemoryStore(tmp_path / "memory.sqlite", "alice") as store:
        assert [(m.text, m.turns_since_used) for m in store.all()] == [
            ("Person 1's Persona: I have a corgi.", 0)]


def test_agent_with_failing_server_keeps_history_and_memory(scripted, tmp_path):
    server = scripted(lambda r: (500, "application/json", '{"error": {"message": "oom"}}'))
    with _agent(tmp_path, server.url, search_decision="never") as agent:
        with pytest.raises(AgentError, match="HTTP 500: oom"):
            agent.respond("Hi!")
        assert agent.history == () and len(agent.memory.all()) == 1
    # The agent has no tokenizer files here: it asked the server's /tokenize first (once).
    assert [r.path for r in server.requests].count("/tokenize") == 1
    prompts = [r.json()["prompt"] for r in server.requests if r.path == "/completions"]
    # Chit-chat with a memory: mdm and mgm first, then ckm, then the response: 2 tries each.
    assert sorted(set(prompts), key=prompts.index)[-2:] == [
        "Person 1: Hi!\nPrevious Topic:", "Person 1: Hi!\nPerson 2:"]
    assert "Personal Fact: Person 1's Persona: I have a corgi.\nPerson 1: Hi!\n"\
           "Memory Decision:" in prompts
    assert "Person 1: Hi!\nMemory:" in prompts and len(prompts) == 8


def _cli(*args: str, cwd):
    return safe_interactive(*args, cwd=cwd, timeout=60, XDG_DATA_HOME=str(cwd / "xdg"))


def test_safe_interactive_script_reports_a_dead_server(tmp_path):
    port = free_port()
    script = tmp_path / "conversation.txt"
    script.write_text("Hello there\n[EXIT]\nnever read\n")
    result = _cli("--init-opt", "gen/opt_bb3", "--opt-server", f"localhost:{port}",
                  "--raw_search_server", "localhost:1", "--script", str(script),
                  "--safety", "none", "--metaseq-max-retry-api", "0", cwd=tmp_path)
    assert result.returncode == 1
    assert "Enter Your Message: Hello there" in result.stdout
    assert "never read" not in result.stdout
    assert f"http://localhost:{port}/completions" in result.stderr
    assert "connection refused" in result.stderr
    # The defaults went under XDG_DATA_HOME; the failed turn left no row and no log line.
    data = tmp_path / "xdg" / "opt-serving"
    rows = sqlite3.connect(data / "bb3-memory.sqlite").execute("SELECT count(*) FROM memories")
    assert rows.fetchone()[0] == 0
    assert not (data / "bb3-conversations.jsonl").exists()


def test_safe_interactive_rejects_other_presets_and_exports(tmp_path):
    result = _cli("--init-opt", "gen/blenderbot", cwd=tmp_path)
    assert result.returncode == 2 and "gen/opt_bb3" in result.stderr
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"type": "turn", "id": "t1", "conversation": "c1", "user": "bob",
                               "time": 1.0, "message": "Hi", "reply": {
                                   "text": "Hello!", "status": "ok", "modules": {},
                                   "search": None, "knowledge": {}, "used_memory": None,
                                   "new_memories": [], "latency_s": 0.1}}) + "\n")
    result = _cli("--log", str(log), "--export-parlai", str(tmp_path / "out.jsonl"),
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    exported = json.loads((tmp_path / "out.jsonl").read_text())
    assert exported["dialog"][0][0] == {"id": "bob", "text": "Hi", "episode_done": False}
