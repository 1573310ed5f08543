"""The request schema and the response bodies, without a server."""

import dataclasses
import json

import pytest

from constants import DEFAULTS, from_module
from opt_serving.protocol import (
    SSE_DONE, SamplingParams, ChoiceResult, RequestError, build_choice, metaseq_response, openai_response,
    parse_body, parse_request, stream_chunk)
from opt_serving.tokenizer import Tokenizer, locate_assets
from paths import ASSETS


# ParlAI's BB3 client (parlai 1.7.2), as logged, byte for byte.
PARLAI_BODY = (
    b'{"prompt": "Person 1: Hi!\\nSearch Decision:", "min_tokens": 1, "max_tokens": 10, '
    b'"best_of": 1,\n "top_p": -1.0, "stop": "\\n", "temperature": 1.0, "echo": false, '
    b'"lambda_decay": -1,\n "omega_bound": 0.3, "alpha_presence": 0, "alpha_frequency": 0, '
    b'"alpha_presence_src": 0,\n "alpha_frequency_src": 0, "alpha_src_penalty_end_idx": -1}')


def test_parlai_bb3_body_parses():
    req = parse_body(PARLAI_BODY)
    assert req.prompts == ("Person 1: Hi!\nSearch Decision:",)
    assert not req.stream and req.ignored == ()
    assert req.sampling == SamplingParams(
        max_tokens=10, n=1, best_of=1, echo=False, stop=("\n",), logprobs=None,
        temperature=1.0, top_p=-1.0, lambda_decay=-1.0, omega_bound=0.3, min_tokens=1)
    assert req.sampling.greedy
    # The same fields as requests' json= sends them (one line).
    assert parse_body(json.dumps(json.loads(PARLAI_BODY)).encode()) == req


def test_every_field_of_the_contract():
    req = parse_request({
        "prompt": [[5, 6], [7]], "max_tokens": 20, "min_tokens": 3, "temperature": 0.95,
        "top_p": 0.9, "top_k": 40, "n": 2, "best_of": 4, "logprobs": 5, "echo": True,
        "stop": ["\n\n", "Question:"], "seed": 1234, "lambda_decay": 0.9, "omega_bound": 0.25,
        "alpha_presence": 0.5, "alpha_frequency": 0.4, "alpha_presence_src": 0.3,
        "alpha_frequency_src": 0.2, "alpha_src_penalty_end_idx": 7, "model": "opt",
        "user": "me", "someday": 1})
    assert req.prompts == ((5, 6), (7,))
    assert req.sampling.num_logprobs == 5
    assert req.sampling == SamplingParams(
        max_tokens=20, n=2, best_of=4, logprobs=5, echo=True, stop=("\n\n", "Question:"),
        temperature=0.95, top_p=0.9, top_k=40, lambda_decay=0.9, omega_bound=0.25,
        alpha_presence=0.5, alpha_frequency=0.4, alpha_presence_src=0.3,
        alpha_frequency_src=0.2, alpha_src_penalty_end_idx=7, min_tokens=3, seed=1234)
    assert (req.model, req.user, req.ignored) == ("opt", "me", ("someday",))


@pytest.mark.parametrize("prompt, expected", [
    ("hi", ("hi",)),
    (["a", "b"], ("a", "b")),
    ([1, 2, 3], ((1, 2, 3),)),
    ([[1], [2, 3]], ((1,), (2, 3))),
])
def test_prompt_forms(prompt, expected):
    assert parse_request({"prompt": prompt}).prompts == expected


def test_defaults():
    req = parse_request({"prompt": "x"})
    assert req.sampling.max_tokens == DEFAULTS.default_max_tokens == 32  # not "until 2048" (#5)
    assert req.sampling == SamplingParams()  # n 1, best_of 1, no logprobs, echo or stop


def test_openai_penalty_names_map_onto_alphas():
    req = parse_request({"prompt": "x", "presence_penalty": 0.5, "frequency_penalty": 0.25})
    assert (req.sampling.alpha_presence, req.sampling.alpha_frequency) == (0.5, 0.25)
    with pytest.raises(RequestError) as err:
        parse_request({"prompt": "x", "presence_penalty": 0.5, "alpha_presence": 0.1})
    assert err.value.param == "presence_penalty"


def test_min_tokens_never_exceeds_max_tokens():
    req = parse_request({"prompt": "x", "max_tokens": 0, "echo": True, "min_tokens": 1})
    assert req.sampling.min_tokens == 0


@pytest.mark.parametrize("body, param, words", [
    ({}, "prompt", "required"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": []}, "prompt", "non-empty"),
    ({"prompt": [[]]}, "prompt", "empty"),
    ({"prompt": ["a", ""]}, "prompt", "prompt[1] is empty"),
    ({"prompt": ["a", [1]]}, "prompt", "mixes"),
    ({"prompt": [1, "a"]}, "prompt", "prompt[0] must be"),
    ({"prompt": [True, 2]}, "prompt", "prompt[0] must be"),
    ({"prompt": [[1, 2.5]]}, "prompt", "prompt[1] must be a token id"),
    ({"prompt": [50270]}, "prompt", "not in the dictionary"),
    ({"prompt": {"text": "a"}}, "prompt", "must be"),
    ({"prompt": "x", "temperature": -0.1}, "temperature", "between 0.0 and"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "finite number"),
    ({"prompt": "x", "top_p": 1.5}, "top_p", "and 1.0"),
    ({"prompt": "x", "n": 2, "best_of": 1}, "best_of", "at least n"),
    ({"prompt": "x", "n": 17}, "n", "between 1 and 16"),
    ({"prompt": "x", "best_of": 17}, "best_of", "between 1 and 16"),
    ({"prompt": "x", "max_tokens": 10**9}, "max_tokens", "between 0 and 2046"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "between"),
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens", "integer"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens", "integer"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "between 0 and 20"),
    ({"prompt": "x", "echo": "yes"}, "echo", "true or false"),
    ({"prompt": "x", "stop": ""}, "stop", "non-empty"),
    ({"prompt": "x", "stop": ["a", 3]}, "stop", "non-empty"),
    ({"prompt": "x", "stop": ["s"] * 17}, "stop", "at most 16"),
    ({"prompt": "x", "omega_bound": 2}, "omega_bound", "between"),
    ({"prompt": "x", "seed": "abc"}, "seed", "integer"),
    ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias", "not supported"),
    ({"prompt": "x", "stream": True, "best_of": 2}, "best_of", "streamed"),
    ({"prompt": ["x"] * 5, "best_of": 16}, "prompt", "sequences"),
    ({"prompt": "x", "model": 3}, "model", "string"),
])
def test_bad_requests_name_the_field(body, param, words):
    with pytest.raises(RequestError) as err:
        parse_request(body)
    assert err.value.param == param and words in err.value.message
    assert err.value.status == 400
    assert err.value.body() == {"error": {"message": err.value.message,
                                          "type": "invalid_request_error", "param": param,
                                          "code": None}}


@pytest.mark.parametrize("raw, words", [
    (b"not json", "not valid JSON"),
    (b'{"prompt": "\xff"}', "not valid UTF-8"),
    (b'{"prompt": "x", "temperature": NaN}', "NaN is not a number"),
    (b'[1, 2]', "JSON object"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_bad_bodies(raw, words):
    with pytest.raises(RequestError, match=words) as err:
        parse_body(raw)
    assert err.value.param is None


def test_body_size_limit():
    small = dataclasses.replace(DEFAULTS, max_body_bytes=64)
    with pytest.raises(RequestError, match="limit is 64") as err:
        parse_body(json.dumps({"prompt": "x" * 100}).encode(), small)
    assert err.value.code == "body_too_large"


def echo_choice(**kw) -> ChoiceResult:
    base = dict(text=" Hi there", tokens=("</s>", " Hi", " there"),
                token_logprobs=(None, -2.5, -0.5), text_offset=(0, 0, 3),
                top_logprobs=None, finish_reason="length", prompt_index=0, prompt_tokens=2,
                completion_tokens=1)
    return ChoiceResult(**{**base, **kw})


def test_metaseq_response_shape():
    body = metaseq_response([echo_choice(truncated_prompt_tokens=4)], model="opt-125m",
                            request_id="cmpl-1", created=7)
    assert json.loads(json.dumps(body, allow_nan=False)) == body
    assert {k: body[k] for k in ("id", "object", "created", "model")} == {
        "id": "cmpl-1", "object": "text_completion", "created": 7, "model": "opt-125m"}
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length" and "finish_reason" not in choice["logprobs"]
    assert choice["logprobs"] == {"tokens": ["</s>", " Hi", " there"],
                                  "token_logprobs": [None, -2.5, -0.5],
                                  "text_offset": [0, 0, 3], "top_logprobs": None}
    assert choice["truncated_prompt_tokens"] == 4
    assert "truncated_prompt_tokens" not in metaseq_response(
        [echo_choice()], model="m")["choices"][0]


def test_openai_response_shape_and_usage():
    tops = ({"a": -0.1}, {"b": -0.2}, {"c": -0.3})
    choices = [echo_choice(top_logprobs=tops), echo_choice(finish_reason="stop"),
               echo_choice(prompt_index=1, prompt_tokens=5, completion_tokens=3)]
    req = parse_request({"prompt": ["a", "b"], "n": 2, "logprobs": 1, "echo": True})
    body = openai_response(choices, request=req, model="m")
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    # OpenAI echoes the prompt only: metaseq's "</s>" marker and its null log-prob are gone.
    assert body["choices"][0]["logprobs"] == {
        "tokens": [" Hi", " there"], "token_logprobs": [-2.5, -0.5], "text_offset": [0, 3],
        "top_logprobs": [{"b": -0.2}, {"c": -0.3}]}
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    plain = openai_response(choices, request=parse_request({"prompt": "a"}), model="m")
    assert all(c["logprobs"] is None for c in plain["choices"])
    openai = pytest.importorskip("openai")
    for shaped in (body, plain):
        openai.types.Completion.model_validate(shaped)


def test_stream_chunks_are_server_sent_events():
    chunk = stream_chunk(request_id="cmpl-9", model="m", created=1, index=0, text=" Hi")
    assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
    event = json.loads(chunk[len(b"data: "):])
    assert event["choices"] == [{"text": " Hi", "index": 0, "logprobs": None,
                                 "finish_reason": None}]
    assert event["id"] == "cmpl-9" and event["object"] == "text_completion"
    last = json.loads(stream_chunk(request_id="cmpl-9", model="m", created=1, index=0, text="",
                                   finish_reason="stop")[6:])
    assert last["choices"][0]["finish_reason"] == "stop"
    assert SSE_DONE == b"data: [DONE]\n\n"
    # The client builds chunks without validation (finish_reason is null until the end, as
    # OpenAI's own stream); the final chunk validates strictly.
    openai = pytest.importorskip("openai")
    openai.types.Completion.model_validate(last)


def test_constants_from_a_metaseq_module_and_flags(tmp_path):
    module = tmp_path / "constants.py"
    module.write_text("import os\nMAX_SEQ_LEN = 1024\nBATCH_SIZE = 64\nMODEL_PARALLEL = 8\n"
                      "CHECKPOINT_FOLDER = os.path.join('/data', 'bb3')\n"
                      "REQUEST_TIMEOUT_S = 30\nLAUNCH_ARGS = ['--x']\n")
    limits = from_module(str(module))
    assert (limits.max_seq_len, limits.max_batch_size, limits.checkpoint_folder) == (
        1024, 64, "/data/bb3")
    assert limits.request_timeout_s == 30.0 and limits.default_port == DEFAULTS.default_port
    # A flag overrides either; the schema then reads the new limits.
    limits = dataclasses.replace(limits, max_beam=4)
    with pytest.raises(RequestError, match="between 1 and 4"):
        parse_request({"prompt": "x", "n": 5}, limits)
    with pytest.raises(RequestError, match="between 0 and 1022"):
        parse_request({"prompt": "x", "max_tokens": 1023}, limits)
    module.write_text("MAX_BEAM = '16'\n")
    with pytest.raises(TypeError, match="MAX_BEAM"):
        from_module(str(module))
    with pytest.raises(ValueError, match="max_seq_len"):
        dataclasses.replace(DEFAULTS, max_seq_len=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULTS.max_beam = 3


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(locate_assets(assets_dir=ASSETS))


def test_build_choice_echo_offsets_and_null_first_logprob(tok):
    prompt_text, generated_text = "Hi café", " ok!\n\nQ"
    prompt = [2, *tok.encode(prompt_text)]
    generated = tok.encode(generated_text)
    n_p, n_g = len(prompt) - 1, len(generated)
    top = [[(7, -0.5), (8, -1.5)]] * (n_p + n_g)
    c = build_choice(tok, prompt=prompt, generated=generated, echo=True,
                     prompt_logprobs=[-1.0] * n_p, generated_logprobs=[-0.25] * n_g,
                     prompt_top=top[:n_p], generated_top=top[n_p:], finish_reason="stop",
                     prompt_index=3, truncated=2, text_bytes=len(" ok!".encode()))
    assert c.text == "Hi café ok!"  # the stop text "\n\n" cut, "</s>" not part of the text
    assert c.tokens[0] == "</s>" and c.token_logprobs[0] is None and c.top_logprobs[0] is None
    assert c.token_logprobs[1:] == (-1.0,) * n_p + (-0.25,) * n_g
    assert c.top_logprobs[1] == {tok.decode_token(7): -0.5, tok.decode_token(8): -1.5}
    # ParlAI's perplexity reads the tokens at or after len(prompt text) as the label.
    label = [t for t, off in zip(c.tokens[1:], c.text_offset[1:]) if off >= len(prompt_text)]
    assert "".join(label) == generated_text
    assert c.text_offset[0] == 0 and c.text_offset[1:] == tuple(
        len(tok.decode(prompt[1:1 + i])) for i in range(n_p)) + tuple(
        len(prompt_text) + len(tok.decode(generated[:i])) for i in range(n_g))
    assert (c.prompt_tokens, c.completion_tokens, c.truncated_prompt_tokens) == (n_p, n_g, 2)


def test_build_choice_without_echo(tok):
    generated = tok.encode(" Paris.")
    c = build_choice(tok, prompt=[2, 5], generated=generated, echo=False, prompt_logprobs=[],
                     generated_logprobs=[-0.1] * len(generated), prompt_top=None,
                     generated_top=None, finish_reason="length", prompt_index=0)
    assert (c.text, c.tokens) == (" Paris.", tuple(tok.decode_token(i) for i in generated))
    assert c.text_offset == tuple(len(tok.decode(generated[:i])) for i in range(len(generated)))
    assert c.top_logprobs is None


def test_the_protocol_and_the_agent_import_without_torch():
    import subprocess
    import sys

    code = ("import sys; import opt_serving.protocol, agents.bb3, agents.cli; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_bodies_are_built_and_read_by_the_same_module():
    from opt_serving.protocol import completion_body, first_text

    body = completion_body("Hi", min_tokens=1, max_tokens=8, top_p=-1.0)
    assert list(body) == ["prompt", "min_tokens", "max_tokens", "top_p"]  # the order given
    assert parse_request(body).sampling.max_tokens == 8
    with pytest.raises(ValueError, match="top_kk"):
        completion_body("Hi", top_kk=3)
    assert first_text({"choices": [{"text": " yes"}]}) == " yes"
    with pytest.raises(ValueError, match="without choices"):
        first_text({"error": "x"})
