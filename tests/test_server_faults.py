"""opt-serve under faults, in real processes: keys, disconnects, dead ranks, bad start-up,
a real allocation failure."""

import json
import os
import signal
import socket
import threading

import pytest
import requests

from opt_serving.distributed import RankEnv, free_port
from opt_serving.server.cli import main as serve_main
from opt_serving.demo_tokenizer import ByteTokenizer
from opt_serving.runtime.startup import ServeOptions, prepare
from opt_serving.tokenizer import default_assets_dir
from server_helpers import SERVER_ARGS, ServerProcess

KEY = {"Authorization": "Bearer s3cret"}
# Sampled, with EOS blocked: hundreds of steps at several ms each.
SLOW = {"prompt": [133, 812], "max_tokens": 400, "min_tokens": 400, "temperature": 1.0}


@pytest.fixture(scope="module")
def guarded(serve_checkpoints):
    """A server that wants an API key. (Timeouts and overload: tests/test_engine.py.)"""
    proc = ServerProcess("--checkpoint-folder", str(serve_checkpoints[1]), "--api-key",
                         "s3cret", *SERVER_ARGS)
    yield proc
    proc.stop()


def test_api_key_is_required_when_configured(guarded):
    body = {"prompt": "hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = guarded.post("/completions", body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert guarded.post("/completions", body, headers=KEY).status_code == 200
    assert guarded.post("/v1/completions", body, headers=KEY).status_code == 200
    assert guarded.get("/healthz").status_code == 200  # probes need no key


def test_a_client_that_disconnects_frees_its_slot(server):
    body = {"prompt": [133], "max_tokens": 500, "min_tokens": 500, "temperature": 1.0,
            "stream": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: ")
        assert server.metric("opt_serve_running_batch_size") == 1
    # The connection is closed: the next write fails and the engine drops the sequence.
    assert server.wait_for(lambda: server.metric("opt_serve_running_batch_size") == 0,
                           timeout=3)


@pytest.fixture(scope="module")
def mp2(serve_checkpoints):
    proc = ServerProcess("--checkpoint-folder", str(serve_checkpoints[2] / "reshard.pt"),
                         *SERVER_ARGS)
    yield proc
    proc.stop()


def test_mp2_gives_the_same_greedy_text_as_mp1(server, mp2):
    assert len(mp2.worker_pids) == 1 and mp2.get("/readyz").json()["world_size"] == 2
    for prompt in ("Hello, how are you?", [133, 812, 16, 10]):
        body = {"prompt": prompt, "max_tokens": 10, "min_tokens": 10, "temperature": 0}
        one, two = server.post("/completions", body), mp2.post("/completions", body)
        assert one.json()["choices"][0]["text"] == two.json()["choices"][0]["text"]


def test_under_torchrun_ranks_come_from_the_environment(server, serve_checkpoints):
    launcher = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()))
    proc = ServerProcess("--checkpoint-folder", str(serve_checkpoints[2]), *SERVER_ARGS,
                         launcher=launcher)
    try:
        assert "degree 2 (torchrun)" in proc.log()
        body = {"prompt": [133, 812, 16, 10], "max_tokens": 8, "min_tokens": 8,
                "temperature": 0}
        assert (proc.post("/completions", body).json()["choices"][0]["text"]
                == server.post("/completions", body).json()["choices"][0]["text"])
    finally:
        proc.stop()


def test_a_killed_worker_rank_fails_requests_and_stops_the_server(mp2):
    answer = {}

    def pending():
        try:
            answer["r"] = mp2.post("/completions", SLOW)
        except requests.ConnectionError as e:
            answer["r"] = e
    t = threading.Thread(target=pending)
    t.start()
    assert mp2.wait_for(lambda: mp2.metric("opt_serve_running_batch_size") == 1)
    os.kill(mp2.worker_pids[1], signal.SIGKILL)
    seen = []

    def not_ready() -> bool:
        try:
            ready = mp2.get("/readyz", timeout=2)
        except requests.ConnectionError:
            return True  # already gone: not ready either
        seen.append(ready)
        return ready.status_code == 503
    assert mp2.wait_for(not_ready, timeout=5)
    # Either /readyz said 503 with a reason (the dead rank or the failed collective), or the
    # server was already gone; never a 200 after the kill.
    assert all(s.status_code == 503 and s.json()["reason"] for s in seen[-1:]), seen
    t.join(15)
    r = answer["r"]
    # The pending request gets a JSON 503 while the server still answers, or its connection
    # is closed as the server exits: never a 200, never a hang.
    assert isinstance(r, requests.ConnectionError) or (
        r.status_code == 503 and "error" in r.json()), r
    assert mp2.proc.wait(15) == 3, mp2.log()


# -- bad input at start: one paragraph, exit 2 ---------------------------------------------------

def _start(capsys, *args) -> str:
    assert serve_main(["--port", "0", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("opt-serve: ") and err.count("\n") <= 12
    return " ".join(err.split())


def test_missing_checkpoint(capsys, tmp_path):
    assert "does not exist" in _start(capsys, "--checkpoint-folder", str(tmp_path / "nope"))
    assert "--checkpoint-folder" in _start(capsys)


def test_invalid_degree(capsys, serve_checkpoints):
    msg = _start(capsys, "--checkpoint-folder", str(serve_checkpoints[1]), "--mp", "3")
    assert "valid --mp values are 1, 2, 4, 8" in msg


def test_openai_vocabulary_is_refused(capsys, tmp_path, serve_checkpoints):
    vocab = {"!": 0, **{f"t{i}": i for i in range(1, 50257)}}
    (tmp_path / "gpt2-vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "gpt2-merges.txt").write_text("#version: 0.2\n")
    msg = _start(capsys, "--checkpoint-folder", str(serve_checkpoints[1]), "--assets",
                 str(tmp_path), "--demo-tokenizer")
    assert "OpenAI" in msg and "metaseq #128" in msg


def test_port_in_use(capsys, serve_checkpoints):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        msg = " ".join(_start(capsys, "--checkpoint-folder", str(serve_checkpoints[1]),
                              "--assets", "/nonexistent", "--port", port).split())
    assert f"127.0.0.1:{port}" in msg


@pytest.mark.skipif((default_assets_dir() / "gpt2-vocab.json").exists(),
                    reason="the toolkit's own tokenizer assets are installed")
def test_missing_assets_need_the_explicit_demo_tokenizer(capsys, tmp_path, serve_checkpoints):
    msg = _start(capsys, "--checkpoint-folder", str(serve_checkpoints[1]), "--assets",
                 str(tmp_path))
    assert "--demo-tokenizer" in msg and "opt-assets fetch" in msg
    options = ServeOptions(checkpoint=str(serve_checkpoints[1]), constants=__import__(
        "constants").DEFAULTS, host="127.0.0.1", port=0, assets=str(tmp_path),
        demo_tokenizer=True)
    _, tok = prepare(options, RankEnv(0, 1, 0, "127.0.0.1", 0, "single"))
    assert isinstance(tok, ByteTokenizer) and tok.decode(tok.encode("héllo")) == "héllo"


def test_out_of_memory_fails_only_that_batch(serve_checkpoints):
    """A real allocation failure: the server's address space is capped (prlimit) just above
    its current size, so a 500-token echo request's (T, V) logits cannot be allocated."""
    resource = pytest.importorskip("resource")
    proc = ServerProcess("--checkpoint-folder", str(serve_checkpoints[1]), *SERVER_ARGS)
    try:
        assert proc.post("/completions", {"prompt": "hi", "max_tokens": 3}).status_code == 200
        with open(f"/proc/{proc.proc.pid}/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
        resource.prlimit(proc.proc.pid, resource.RLIMIT_AS, (vm + (60 << 20),
                                                              resource.RLIM_INFINITY))
        big = {"prompt": list(range(100, 600)), "max_tokens": 0, "echo": True}
        r = proc.post("/completions", big)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "out_of_memory"
        r = proc.post("/completions", {"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and len(r.json()["choices"]) == 1
        assert proc.get("/readyz").status_code == 200
    finally:
        proc.stop()
