"""The engine in-process: a scripted model runner and control group, an injected clock, no
sleeps. Timeout, cancel, out-of-memory and a dead rank each take milliseconds, and the Flask
app is driven over the same engine with its test client."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from constants import DEFAULTS
from opt_serving.config import VOCAB_SIZE
from opt_serving.server.app import Service, create_app
from opt_serving.decoding.scheduler import Scheduler
from opt_serving.protocol import EngineError, parse_request
from opt_serving.runtime.engine import Engine
from opt_serving.tokenizer import Tokenizer, locate_assets
from paths import ASSETS

WORD = 5  # the scripted model always prefers this token


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedRunner:
    """Logits with ``WORD`` on top at every position; ``on_step(n)`` runs before step n (from
    the engine's loop thread) and may raise, advance the clock or cancel a request."""

    def __init__(self):
        self.steps = 0
        self.on_step = lambda n: None

    def run(self, work):
        self.steps += 1
        self.on_step(self.steps)
        logits = torch.zeros(work.select.shape[0], VOCAB_SIZE)  # (S, V)
        logits[:, WORD] = 10.0
        return logits


class ScriptedControl:
    def __init__(self, world_size: int = 1):
        self.world_size = world_size
        self.fail: Exception | None = None

    def send_step(self, work):
        if self.fail is not None:
            raise self.fail

    def ping(self):
        if self.fail is not None:
            raise self.fail

    def send_shutdown(self):
        pass


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(locate_assets(assets_dir=ASSETS))


@pytest.fixture
def rig(tok):
    clock, runner, control = Clock(), ScriptedRunner(), ScriptedControl()

    def start(world_size: int = 1, seqs: int = 4, queued: int = 8) -> Engine:
        control.world_size = world_size
        return Engine(runner=runner, control=control, tokenizer=tok, request_timeout_s=10.0,
                      scheduler=Scheduler(num_blocks=64, block_size=16, max_seqs=seqs,
                                          max_queued=queued, step_tokens=256,
                                          max_seq_len=128),
                      clock=clock, ping_interval_s=1e9).start()
    engines = []
    yield clock, runner, control, lambda *a: engines.append(start(*a)) or engines[-1]
    for e in engines:
        e.shutdown()


def submit(engine, tok, **body):
    req = parse_request({"prompt": "Hello there", **body})
    return engine.submit(req, [tok.encode(p) for p in req.prompts])


def test_a_request_completes(rig, tok):
    _, runner, _, start = rig
    handle = submit(start(), tok, max_tokens=5, temperature=0)
    [result] = handle.result()
    assert result.generated == (WORD,) * 5 and result.finish_reason == "length"


def test_timeout_is_504_and_frees_the_slot(rig, tok):
    clock, runner, _, start = rig
    engine = start(1, 1)  # one sequence at a time: the next runs only if the first was freed

    def slow(n):  # the third step "takes" 11 s of the 10 s budget
        if n == 3:
            clock.now += 11
    runner.on_step = slow
    with pytest.raises(EngineError) as e:
        submit(engine, tok, max_tokens=100, temperature=0).result()
    assert e.value.status == 504
    runner.on_step = lambda n: None
    assert submit(engine, tok, max_tokens=2, temperature=0).result()[0].generated == (WORD,) * 2


def test_cancel_is_499_and_the_rest_go_on(rig, tok):
    _, runner, _, start = rig
    engine = start()
    handles = {}

    def cancel_first(n):
        if n == 3:
            engine.cancel(handles["gone"])
    runner.on_step = cancel_first
    handles["gone"] = submit(engine, tok, max_tokens=50, temperature=0)
    stays = submit(engine, tok, max_tokens=50, temperature=0)
    with pytest.raises(EngineError) as e:
        handles["gone"].result()
    assert e.value.status == 499
    assert len(stays.result()[0].generated) == 50


def test_out_of_memory_fails_the_batch_not_the_server(rig, tok):
    _, runner, _, start = rig
    engine = start()

    def oom(n):
        if n == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (scripted)")
    runner.on_step = oom
    with pytest.raises(EngineError) as e:
        submit(engine, tok, max_tokens=3).result()
    assert (e.value.status, e.value.code) == (503, "out_of_memory")
    assert engine.ready and engine.stats.batches_failed == 1
    assert len(submit(engine, tok, max_tokens=3).result()[0].generated) == 3


def test_a_dead_rank_fails_everything_and_stays_down(rig, tok):
    _, runner, control, start = rig
    engine = start(2)

    def kill(n):
        if n == 2:
            control.fail = RuntimeError("Connection reset by peer (rank 1)")
    runner.on_step = kill
    with pytest.raises(EngineError) as e:
        submit(engine, tok, max_tokens=20).result()
    assert e.value.status == 503 and "Connection reset" in str(e.value)
    assert not engine.ready and "rank 1" in engine.failure
    with pytest.raises(EngineError, match="not ready"):
        submit(engine, tok, max_tokens=1)


def test_routes_over_the_scripted_engine(rig, tok):
    _, _, control, start = rig
    engine = start()
    app = create_app(Service(engine=engine, tokenizer=tok, limits=DEFAULTS, model_name="t"))
    client = app.test_client()
    r = client.post("/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
    assert r.json["choices"][0]["text"] == tok.decode([WORD] * 3)
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "n": 99})
    assert r.status_code == 400 and r.json["error"]["param"] == "n"
    assert client.get("/readyz").status_code == 200
    engine.fail("scripted failure")
    assert client.get("/readyz").status_code == 503
    r = client.post("/completions", json={"prompt": "Hi"})
    assert r.status_code == 503 and r.json["error"]["code"] == "not_ready"


def test_overload_is_429_at_once_and_timeouts_are_504_over_http(rig, tok):
    """One running sequence and one queue place: a third request is refused at once with Retry-After;
    the running and the queued one time out as 504s when the clock passes their deadline."""
    clock, runner, _, start = rig
    engine = start(1, 1, 1)
    app = create_app(Service(engine=engine, tokenizer=tok, limits=DEFAULTS, model_name="t"))
    released = threading.Event()
    # Steps pace themselves (5 ms each) until released, so the running request (120 tokens)
    # is still running while the others arrive; the loop still takes requests between steps.
    runner.on_step = lambda n: released.wait(0.005)
    answers = {}

    def send(name):
        answers[name] = app.test_client().post(
            "/completions", json={"prompt": "Hi", "max_tokens": 120, "min_tokens": 120})
    threads = {name: threading.Thread(target=send, args=(name,)) for name in ("running", "queued")}
    threads["running"].start()
    assert wait_until(lambda: engine.stats.running_sequences == 1)
    threads["queued"].start()
    assert wait_until(lambda: engine.stats.queued_requests == 1)
    r = app.test_client().post("/completions", json={"prompt": "Hi", "max_tokens": 5})
    assert r.status_code == 429 and r.json["error"]["code"] == "queue_full"
    assert r.headers["Retry-After"]
    clock.now += 11  # both are past their 10 s budget at the loop's next look
    released.set()
    for t in threads.values():
        t.join(10)
    assert {k: a.status_code for k, a in answers.items()} == {"running": 504, "queued": 504}
    assert answers["queued"].json["error"]["code"] == "timeout"
    r = app.test_client().post("/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200 and engine.stats.running_sequences == 0


def wait_until(condition, timeout: float = 10.0) -> bool:
    """For conditions another thread makes true (the engine loop's stats)."""
    for _ in range(int(timeout / 0.001)):
        if condition():
            return True
        time.sleep(0.001)
    return False
