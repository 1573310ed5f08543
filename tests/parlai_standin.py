"""The deterministic stand-in servers the ParlAI fixtures were recorded against
(``shared/tools/parlai-bb3/fake_opt_server.py --stable`` and ``fake_search_server.py``),
as answer functions for ``loopback.ScriptedServer``: the same answer to the same request, so
our agent and ParlAI's can be driven through the same conversation.

Completions: answered by how the prompt ends ("Search Decision:" -> " search", ...), in
metaseq's response shape. Search: n canned documents about the query.
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qs

from loopback import Answerer, Request

FIXED = {"Query:": " corgi facts", "Memory:": " I have a corgi.", "Previous Topic:": " corgis",
         "Interesting Fact:": " Corgis are herding dogs."}


def reply_for(prompt: str, search: bool, memory: bool) -> str:
    p = prompt.rstrip(" ")
    if p.endswith("Search Decision:"):
        return " search" if search else " do not search"
    if p.endswith("Memory Decision:"):
        return " access memory" if memory else " do not access memory"
    for end, text in FIXED.items():
        if p.endswith(end):
            return text
    if p.endswith("Personal Fact:"):  # the first memory line of the prompt, as mkm must echo
        for line in p.split("\n"):
            if m := re.match(r"^(?:Personal Fact: )?(Person [12]'s Persona: .*)$", line):
                return " " + m.group(1)
        return " no persona"
    return " That is lovely. I like corgis a lot."


def completions(search: bool = True, memory: bool = True) -> Answerer:
    def answer(req: Request):
        if not req.path.endswith("/completions"):
            return 404, "application/json", json.dumps({"error": {"message": "not found"}})
        body = req.json()
        text = reply_for(body.get("prompt", ""), search, memory)
        tokens = re.findall(r"\s*\S+", text) or [text]
        offsets = [len("".join(tokens[:i])) for i in range(len(tokens))]
        choice = {"text": text, "logprobs": {"tokens": tokens, "token_logprobs": [-0.5] *
                                             len(tokens), "text_offset": offsets,
                                             "top_logprobs": None, "finish_reason": "length"}}
        return 200, "application/json", json.dumps({"id": "fake", "object": "text_completion",
                                                    "created": 0, "model": "/fake/opt",
                                                    "choices": [choice]})
    return answer


def search_answer(req: Request):
    form = {k: v[0] for k, v in parse_qs(req.body.decode()).items()}
    q, n = form.get("q", ""), int(form.get("n", 5) or 5)
    docs = [{"url": f"https://example.org/doc{i}", "title": f"Doc {i} about {q}",
             "content": f"Line one of doc {i} about {q}.\nCorgis are a herding breed from "
                        f"Wales. Fact {i}."} for i in range(n)]
    return 200, "application/json", json.dumps({"response": docs})
