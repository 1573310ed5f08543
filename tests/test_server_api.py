"""opt-serve's wire contract against a real server process: routes, shapes, bad input."""

import json

import openai
import pytest
import requests

# ParlAI's BB3 client request body, byte for byte as logged from ParlAI 1.7.2.
PARLAI_BODY = b"""{"prompt": "Person 1: Hi!\\nSearch Decision:", "min_tokens": 1, "max_tokens": 10, "best_of": 1,
 "top_p": -1.0, "stop": "\\n", "temperature": 1.0, "echo": false, "lambda_decay": -1,
 "omega_bound": 0.3, "alpha_presence": 0, "alpha_frequency": 0, "alpha_presence_src": 0,
 "alpha_frequency_src": 0, "alpha_src_penalty_end_idx": -1}"""


def test_parlai_bb3_body_parses_and_answers(server):
    r = server.post("/completions", data=PARLAI_BODY,
                    headers={"Content-Type": "application/json",
                             "Authorization": "Bearer some-parlai-user"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 1
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert 1 <= len(lp["tokens"]) <= 10
    assert all(isinstance(x, float) for x in lp["token_logprobs"])
    assert len(lp["text_offset"]) == len(lp["tokens"])
    assert "\n" not in choice["text"] and choice["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("path", ["/completions", "/v1/engines/opt/completions",
                                  "/v2/engines/x/completions", "/engines/bb3/completions"])
def test_metaseq_routes(server, path):
    r = server.post(path, {"prompt": [[133, 812], [9, 10, 11]], "max_tokens": 3,
                           "temperature": 0, "n": 2, "best_of": 2})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 4  # prompts in order, n choices each
    assert all(c["logprobs"]["token_logprobs"] and c["finish_reason"] for c in choices)


@pytest.mark.parametrize("prompt,count", [("Hello there", 1), (["a", "b c", "d"], 3),
                                          ([133, 812, 16], 1), ([[133], [812, 16]], 2)])
def test_every_prompt_form(server, prompt, count):
    r = server.post("/completions", {"prompt": prompt, "max_tokens": 2, "seed": 1})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == count


def test_health_ready_models_metrics(server):
    assert server.get("/healthz").json() == {"status": "alive"}
    ready = server.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    models = server.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-8h"
    server.post("/completions", {"prompt": "x", "max_tokens": 2})
    assert server.metric("opt_serve_tokens_generated_total") >= 2
    for name in ("opt_serve_queue_depth", "opt_serve_running_batch_size",
                 "opt_serve_request_latency_seconds_count",
                 "opt_serve_time_to_first_token_seconds_count"):
        server.metric(name)


BAD = [
    (b"{not json", None, "JSON"),
    (b'{"prompt": "caf\xe9"}', None, "UTF-8"),
    (b"[1, 2]", None, "JSON object"),
    (json.dumps({"max_tokens": 3}).encode(), "prompt", "required"),
    (json.dumps({"prompt": ""}).encode(), "prompt", "empty"),
    (json.dumps({"prompt": []}).encode(), "prompt", "prompt"),
    (json.dumps({"prompt": 5}).encode(), "prompt", "prompt"),
    (json.dumps({"prompt": [["a"]]}).encode(), "prompt", "token id"),
    (json.dumps({"prompt": [{"text": "a"}]}).encode(), "prompt", "prompt"),
    (json.dumps({"prompt": [1, 99999999]}).encode(), "prompt", "dictionary"),
    (json.dumps({"prompt": "a", "temperature": -0.5}).encode(), "temperature", "between 0.0 and"),
    (json.dumps({"prompt": "a", "temperature": "hot"}).encode(), "temperature", "number"),
    (json.dumps({"prompt": "a", "n": 3, "best_of": 2}).encode(), "best_of", "at least n"),
    (json.dumps({"prompt": "a", "n": 17}).encode(), "n", "between"),
    (json.dumps({"prompt": "a", "max_tokens": 10 ** 9}).encode(), "max_tokens", "between"),
    (json.dumps({"prompt": "a", "max_tokens": "10"}).encode(), "max_tokens", "integer"),
    (json.dumps({"prompt": "a", "stop": [""]}).encode(), "stop", "stop"),
    (json.dumps({"prompt": "a", "echo": "yes"}).encode(), "echo", "true or false"),
]


@pytest.mark.parametrize("raw,param,words", BAD)
def test_bad_input_is_400_naming_the_field(server, raw, param, words):
    r = server.post("/completions", data=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert words in err["message"]


def test_body_over_limit_is_413_and_server_keeps_serving(server):
    big = b'{"prompt": "' + b"a" * (4 * 1024 * 1024 + 16) + b'"}'
    r = server.post("/v1/completions", data=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert server.post("/completions", {"prompt": "still here", "max_tokens": 2}).ok


def test_unknown_route_and_wrong_method_are_json(server):
    r = server.get("/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = server.get("/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_any_bearer_is_accepted_without_a_key(server):
    for header in ({}, {"Authorization": "Bearer alice"}, {"Authorization": "Basic xyz"}):
        assert server.post("/completions", {"prompt": "hi", "max_tokens": 1},
                           headers=header).status_code == 200


def test_truncated_prompt_is_reported(server):
    # 512 positions per sequence: 4 new tokens leave 512 - 4 - 1 = 507 for the prompt.
    prompt = [100 + i % 1000 for i in range(600)]
    r = server.post("/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.headers["X-Prompt-Truncated"] == "93"
    assert r.json()["choices"][0]["truncated_prompt_tokens"] == 93
    r = server.post("/completions", {"prompt": prompt[-507:], "max_tokens": 4, "temperature": 0})
    assert "X-Prompt-Truncated" not in r.headers


def test_openai_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="anything", max_retries=0)
    args = dict(model="tiny-8h", prompt="Hello", max_tokens=8, temperature=0.9, seed=42)
    done = client.completions.create(**args)
    assert done.choices[0].finish_reason == "length" and done.choices[0].index == 0
    assert done.usage.prompt_tokens == 1 and done.usage.completion_tokens == 8
    chunks = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    # echo + logprobs through the typed client: no null "</s>" entry on this route.
    echo = client.completions.create(model="tiny-8h", prompt="Hi there", max_tokens=2,
                                     echo=True, logprobs=2, temperature=0)
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text.startswith("Hi there")
    assert lp.tokens[:2] == ["Hi", " there"] and all(isinstance(x, float)
                                                      for x in lp.token_logprobs)
    assert len(lp.top_logprobs) == 4


def test_stream_cut_at_a_stop_sequence(server):
    body = {"prompt": [133, 812], "max_tokens": 12, "temperature": 0}
    full = server.post("/v1/completions", body).json()["choices"][0]["text"]
    stop = full[3:5]
    r = server.post("/v1/completions", {**body, "stream": True, "stop": stop})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == full[:full.find(stop)]
    assert chunks[-1]["finish_reason"] == "stop"


# -- POST /tokenize ---------------------------------------------------------------------------

def test_tokenize_answers_the_servers_own_ids(server, reference):
    _, tok = reference
    text = "Person 1: Hi!\r\nSearch Decision: café 😀"
    r = server.post("/tokenize", {"prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 512  # the server's --max-seq-len
    both = server.post("/tokenize", {"prompt": ["Hello", "Hello world"]}).json()
    assert both["tokens"] == [tok.encode("Hello"), tok.encode("Hello world")]


@pytest.mark.parametrize("raw,param", [
    (b'{"text": "hi"}', "prompt"), (b'{"prompt": [1, 2]}', "prompt"),
    (b'{"prompt": "a\\ud800"}', "prompt"), (b"[1]", None), (b"{bad", None),
])
def test_tokenize_errors_are_the_same_json(server, raw, param):
    r = server.post("/tokenize", data=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_streamed_logprobs_equal_the_whole_answers(server):
    body = {"prompt": "Hello there, café 😀", "max_tokens": 10, "min_tokens": 10,
            "temperature": 0, "logprobs": 2}
    whole = server.post("/v1/completions", body).json()["choices"][0]["logprobs"]
    streamed = {k: [] for k in whole}
    r = requests.post(server.url + "/v1/completions", json={**body, "stream": True},
                      stream=True, timeout=30)
    for line in r.iter_lines():
        if line.startswith(b"data: {"):
            lp = json.loads(line[6:])["choices"][0]["logprobs"]
            for k in streamed:
                streamed[k] += lp[k] if lp else []
    assert streamed == whole and len(whole["tokens"]) == 10
