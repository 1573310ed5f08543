"""The offline API: ``from opt_serving import LLM`` greedy equals HF transformers' OPT at MP 1
and MP 2 (a spawned tensor-parallel worker), and a seeded sampled request gives exactly what
the running server answers."""

from __future__ import annotations

import pytest
import torch

from opt_serving import LLM
from opt_serving.testing.hf_twin import hf_twin
from paths import ASSETS

PROMPTS = ["Person 1: Hi! How are you today?", [5, 3093, 76, 12, 9]]


def hf_greedy(model, ids: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        prompt = torch.tensor([[2, *ids]])
        out = hf_twin(model).generate(prompt, max_new_tokens=steps, min_new_tokens=steps,
                                      do_sample=False, pad_token_id=1)
    return out[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("mp", [1, 2])
def test_llm_greedy_equals_hf_transformers(serve_checkpoints, reference, mp):
    model, tok = reference
    expected = [hf_greedy(model, tok.encode(p) if isinstance(p, str) else p, 10)
                for p in PROMPTS]
    with LLM(str(serve_checkpoints[mp]), device="cpu", dtype="fp32", kv_tokens=4096,
             max_seq_len=512, assets=str(ASSETS)) as llm:
        assert llm.world_size == mp
        outs = llm.generate(PROMPTS, max_tokens=10, min_tokens=10, temperature=0)
    assert [list(o.token_ids) for o in outs] == expected
    assert [o.text for o in outs] == [tok.decode(ids) for ids in expected]
    assert [o.prompt_index for o in outs] == [0, 1]


def test_llm_gives_the_servers_answer(serve_checkpoints, server):
    options = {"max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 11, "n": 2,
               "stop": ["\n"], "logprobs": 2}
    texts = ["Hello there", "Corgis are"]
    r = server.post("/completions", {"prompt": texts, **options})
    assert r.status_code == 200, r.text
    with LLM(str(serve_checkpoints[1]), device="cpu", dtype="fp32", kv_tokens=4096,
             max_seq_len=512, assets=str(ASSETS)) as llm:
        outs = llm.generate(texts, **options)
        with pytest.raises(ValueError, match="temperature"):
            llm.generate("x", temperature=-1)  # the API's validation, the same messages
    served = r.json()["choices"]
    assert [o.text for o in outs] == [c["text"] for c in served]
    for o, c in zip(outs, served):
        assert list(o.choice.token_logprobs) == pytest.approx(c["logprobs"]["token_logprobs"],
                                                              abs=1e-5)
    assert [o.finish_reason for o in outs] == [c["finish_reason"] for c in served]
