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


@pytest.fixture(scope="module")
def llm(serve_checkpoints):
    with LLM(str(serve_checkpoints[1]), device="cpu", dtype="fp32", kv_tokens=4096,
             max_seq_len=512, assets=str(ASSETS)) as llm:
        yield llm


@pytest.mark.parametrize("typo, nearest", [("max_tokenz", "max_tokens"),
                                           ("temprature", "temperature"),
                                           ("presence_penalti", "presence_penalty")])
def test_a_misspelt_option_is_a_type_error_naming_the_nearest(llm, typo, nearest):
    with pytest.raises(TypeError) as err:
        llm.generate("Hello", **{typo: 0})
    assert typo in str(err.value) and f"did you mean {nearest}?" in str(err.value)


@pytest.mark.parametrize("prompts", [None, 5, {"a": 1}, [], [[]], ["ok", None], [1.5],
                                     [True, 2], b"bytes"])
def test_a_prompt_of_the_wrong_type_says_what_a_prompt_may_be(llm, prompts):
    with pytest.raises(TypeError, match="a string, a list of token ids"):
        llm.generate(prompts, max_tokens=1)


def test_mixed_prompts_and_every_option_still_work(llm):
    outs = llm.generate(["Hi", (5, 6, 7)], max_tokens=3, min_tokens=3, temperature=0,
                        presence_penalty=0.5, repetition_penalty=1.2)
    assert [len(o.token_ids) for o in outs] == [3, 3]
    assert llm.limits.max_seq_len == 512


def test_missing_tokenizer_files_are_named_as_python_arguments(tmp_path, serve_checkpoints,
                                                               monkeypatch):
    import opt_serving.tokenizer as tk
    from opt_serving.runtime.startup import StartupError

    monkeypatch.setattr(tk, "default_assets_dir", lambda: tmp_path / "own")
    with pytest.raises(StartupError) as err:
        LLM(str(serve_checkpoints[1]), device="cpu", assets=str(tmp_path / "none"))
    msg = str(err.value)
    assert "opt-assets fetch" in msg and "assets=DIR" in msg and "demo_tokenizer=True" in msg
    assert "--" not in msg.replace("--mp", "")


UNGUARDED = '''
from opt_serving import LLM

llm = LLM({ckpt!r}, device="cpu", dtype="fp32", kv_tokens=4096, max_seq_len=512,
          assets={assets!r})
print(llm.generate("Hello", max_tokens=2, temperature=0)[0].token_ids)
llm.close()
'''


def test_an_unguarded_script_at_mp2_fails_at_once_showing_the_guard(tmp_path,
                                                                   serve_checkpoints):
    """A worker imports the script again; without a __main__ guard it would start workers of
    its own. It stops, and the parent says why instead of waiting for the rendezvous."""
    import subprocess
    import sys
    import time

    from opt_serving.testing.server_process import child_env

    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED.format(ckpt=str(serve_checkpoints[2]), assets=str(ASSETS)))
    started = time.monotonic()
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       env=child_env(), cwd=tmp_path, timeout=240)
    assert r.returncode != 0
    assert 'if __name__ == "__main__":' in r.stderr
    assert "worker rank 1" in r.stderr and "re-ran your script" in r.stderr
    assert "DistStoreError" not in r.stderr
    assert time.monotonic() - started < 200  # not the 600 s rendezvous timeout
    guarded = UNGUARDED.replace("\nllm = ", "\nif __name__ == '__main__':\n    llm = ")
    guarded = guarded.replace("\nprint(", "\n    print(").replace("\nllm.close", "\n    llm.close")
    guarded = guarded.replace("\n          assets=", "\n              assets=")
    script.write_text(guarded.format(ckpt=str(serve_checkpoints[2]), assets=str(ASSETS)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       env=child_env(), cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
