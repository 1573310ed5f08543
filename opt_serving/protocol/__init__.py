"""The completions wire format, in one torch-free package: ``options`` (the decoding options
and the table that drives their parsing), ``request`` (parsing and building bodies),
``results`` (what the engine returns per sequence), ``response`` (choices, metaseq's and
OpenAI's shapes, server-sent events, reading answers) and ``render`` (one request's results as
answers). opt-serve and ``LLM`` parse and render with it; the BB3 agent builds its bodies and
reads the answers with it."""

from .options import (MAX_INT, MAX_PENALTY, MAX_TEMPERATURE, MIN_TEMPERATURE, ROW_FIELDS,
                      SamplingParams, Spec, option, row_fields, specs, wire_names)
from .request import (KNOWN, UNSUPPORTED, CompletionRequest, HugeInt, Prompt, RequestError,
                      completion_body, error_body, known_fields, load_body, parse_body,
                      parse_options, parse_request, parse_tokenize, unknown_option_error)
from .response import (SSE_DONE, ChoiceResult, EngineError, build_choice, char_offsets,
                       first_text, logprobs_json, metaseq_response, new_request_id,
                       openai_response, sse, stream_chunk, stream_logprobs, timeout_error,
                       top_json, usage_json, without_marker)
from .results import Delta, SeqResult, TopK
from .render import METASEQ, OPENAI, Renderer, pick_best

__all__ = [
    "MAX_INT", "MAX_PENALTY", "MAX_TEMPERATURE", "MIN_TEMPERATURE", "ROW_FIELDS",
    "SamplingParams", "Spec", "option", "row_fields", "specs", "wire_names",
    "KNOWN", "UNSUPPORTED", "CompletionRequest", "HugeInt", "Prompt", "RequestError",
    "completion_body", "error_body", "known_fields", "load_body", "parse_body",
    "parse_options", "parse_request", "parse_tokenize", "unknown_option_error",
    "SSE_DONE", "ChoiceResult", "EngineError", "build_choice", "char_offsets", "first_text",
    "logprobs_json", "metaseq_response", "new_request_id", "openai_response", "sse",
    "stream_chunk", "stream_logprobs", "timeout_error", "top_json", "usage_json",
    "without_marker", "Delta", "SeqResult", "TopK", "METASEQ", "OPENAI", "Renderer",
    "pick_best",
]
