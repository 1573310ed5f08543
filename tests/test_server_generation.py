"""What opt-serve generates, against the model run directly and HF transformers' OPT."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from opt_serving.runtime.generate import generate
from opt_serving.protocol import SamplingParams
from opt_serving.testing.hf_twin import hf_twin

PROMPT = "Person 1: Hi! How are you today?"


def greedy_ids(model, ids: list[int], steps: int) -> list[int]:
    """The library's generate on the same model in this process, no server."""
    (r,) = generate(model, [ids], SamplingParams(max_tokens=steps, min_tokens=steps,
                                                 temperature=0))
    return list(r.generated)


def test_greedy_equals_model_and_hf_transformers(server, reference):
    model, tok = reference
    ids = tok.encode(PROMPT)
    r = server.post("/completions", {"prompt": PROMPT, "max_tokens": 12, "min_tokens": 12,
                                     "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ours = greedy_ids(model, ids, 12)
    with torch.no_grad():
        prompt = torch.tensor([[2, *ids]])
        hf = hf_twin(model).generate(prompt, max_new_tokens=12, min_new_tokens=12,
                                     do_sample=False, pad_token_id=1)[0, prompt.shape[1]:]
    assert hf.tolist() == ours
    assert choice["logprobs"]["tokens"] == [tok.decode_token(i) for i in ours]
    assert choice["text"] == tok.decode(ours)


def test_echo_logprobs_are_teacher_forced(server, reference):
    model, tok = reference
    ids = tok.encode(PROMPT)
    # ParlAI's perplexity request: max_tokens 0, echo.
    r = server.post("/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True,
                                     "logprobs": 3})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"][0] == "</s>" and lp["token_logprobs"][0] is None
    assert lp["tokens"][1:] == [tok.decode_token(i) for i in ids]
    assert lp["text_offset"][:2] == [0, 0]
    with torch.no_grad():
        logits = model(torch.tensor([[2, *ids]]))[0, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), expected,
                               atol=1e-4, rtol=0)
    assert lp["top_logprobs"][0] is None
    assert all(len(t) == 3 for t in lp["top_logprobs"][1:])


def test_logprobs_top_k_contain_the_greedy_choice(server):
    r = server.post("/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                                     "logprobs": 4})
    lp = r.json()["choices"][0]["logprobs"]
    for token, score, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) <= 4 and max(top.values()) == pytest.approx(score)
        assert top[token] == pytest.approx(score)


def test_best_of_returns_the_n_most_likely_copies(server):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 11}
    every = server.post("/completions", {**body, "n": 4, "best_of": 4}).json()["choices"]
    best = server.post("/completions", {**body, "n": 2, "best_of": 4}).json()["choices"]
    totals = [sum(c["logprobs"]["token_logprobs"]) for c in every]
    ranked = sorted(range(4), key=lambda i: -totals[i])[:2]
    assert [c["text"] for c in best] == [every[i]["text"] for i in ranked]


def test_seed_makes_sampling_reproducible(server):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "top_p": 0.9}
    a = server.post("/completions", {**body, "seed": 5}).json()["choices"][0]["text"]
    b = server.post("/completions", {**body, "seed": 5}).json()["choices"][0]["text"]
    c = server.post("/completions", {**body, "seed": 6}).json()["choices"][0]["text"]
    assert a == b != c


def test_stop_sequence_matches_across_tokens_and_is_cut(server):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    full = server.post("/completions", body).json()["choices"][0]
    text, offsets = full["text"], full["logprobs"]["text_offset"]
    # A stop string that starts inside token 2 and ends inside token 3.
    stop = text[offsets[3] - 1:offsets[3] + 1]
    r = server.post("/completions", {**body, "stop": ["never-there", stop]}).json()["choices"][0]
    assert r["text"] == text[:text.find(stop)] and r["finish_reason"] == "stop"
    assert full["finish_reason"] == "length"


def _options(i: int) -> dict:
    """32 different requests: every option varies."""
    body = {"prompt": f"{PROMPT} Request {i}." if i % 4 else [133, 812 + i, 16],
            "max_tokens": 4 + i % 5, "seed": 1000 + i,
            "temperature": [0, 0.7, 1.0, 1.3][i % 4], "top_p": [1.0, 0.9, -1, 0.5][i // 8]}
    if i % 3 == 0:
        body["logprobs"] = 2
    if i % 5 == 0:
        body["echo"] = True
    if i % 7 == 0:
        body.update(n=2, best_of=3)
    if i % 6 == 1:
        body.update(alpha_frequency=0.5, alpha_presence=0.2, alpha_presence_src=0.3)
    if i % 8 == 3:
        body.update(lambda_decay=0.9, omega_bound=0.2, top_p=0.95)
    if i % 9 == 2:
        body.update(stop=["e", "\n"], min_tokens=2)
    return body


def _comparable(choices: list[dict]) -> list[tuple]:
    return [(c["text"], c["finish_reason"], tuple(c["logprobs"]["tokens"]),
             tuple(round(x, 3) if x is not None else None
                   for x in c["logprobs"]["token_logprobs"])) for c in choices]


def test_32_concurrent_requests_each_get_what_they_get_alone(server):
    bodies = [_options(i) for i in range(32)]
    steps = server.metric("opt_serve_steps_total")
    alone = [server.post("/completions", b) for b in bodies]
    assert all(r.status_code == 200 for r in alone), [r.text for r in alone if not r.ok]
    steps_alone, steps = server.metric("opt_serve_steps_total") - steps, \
        server.metric("opt_serve_steps_total")
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda b: server.post("/completions", b), bodies))
    # They really shared batches: far fewer engine steps than one request at a time.
    assert server.metric("opt_serve_steps_total") - steps < steps_alone / 2
    for i, (a, t) in enumerate(zip(alone, together)):
        assert t.status_code == 200, t.text
        assert _comparable(t.json()["choices"]) == _comparable(a.json()["choices"]), i
    assert server.metric("opt_serve_running_batch_size") == 0
