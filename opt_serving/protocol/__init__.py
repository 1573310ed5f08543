"""The completions wire format, in one torch-free package: ``request`` (the decoding options,
parsing and building bodies) and ``response`` (choices, metaseq's and OpenAI's answer shapes,
server-sent events, reading answers). opt-serve parses and renders with it; the BB3 agent
builds its bodies and reads the answers with it."""

from .request import (KNOWN, MAX_INT, MAX_PENALTY, MAX_TEMPERATURE, MIN_TEMPERATURE,
                      ROW_FIELDS, UNSUPPORTED, CompletionRequest, Prompt, RequestError, SamplingParams,
                      completion_body, error_body, load_body, parse_body, parse_request,
                      parse_tokenize)
from .response import (SSE_DONE, ChoiceResult, EngineError, TopK, build_choice, char_offsets, first_text,
                       logprobs_json, metaseq_response, new_request_id, openai_response, sse,
                       stream_chunk, stream_logprobs, timeout_error, top_json, usage_json,
                       without_marker)

__all__ = [
    "KNOWN", "MAX_INT", "ROW_FIELDS", "EngineError", "timeout_error", "MAX_PENALTY", "MAX_TEMPERATURE", "MIN_TEMPERATURE", "UNSUPPORTED",
    "CompletionRequest", "Prompt", "RequestError", "SamplingParams", "completion_body",
    "error_body", "load_body", "parse_body", "parse_request", "parse_tokenize", "SSE_DONE",
    "ChoiceResult", "TopK", "build_choice", "char_offsets", "first_text", "logprobs_json",
    "metaseq_response", "new_request_id", "openai_response", "sse", "stream_chunk",
    "stream_logprobs", "top_json",
    "usage_json", "without_marker",
]
