"""BB3 prompt formats, decoding payloads and output cleaning against the reference (bb3-agent.md,
completions-api.md), measured with a real byte-level BPE (the suite's own; metaseq's files for
the estimate, which is tuned to GPT-2's vocabulary)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents import prompts as P
from agents.tokens import bpe_tokenizer, estimate_tokenizer, estimate_tokens, load_tokenizer
from paths import ASSETS, real_assets



@pytest.fixture(scope="module")
def bpe():
    return bpe_tokenizer(ASSETS)


@pytest.fixture(scope="module")
def budget(bpe):
    return P.Budget(bpe.count)


HISTORY = ("Person 1: Hi! I just adopted a puppy.", "Person 2: Congrats! What breed is it?",
           "Person 1: A corgi. Who won the 2022 World Cup?")


def test_response_prompt_is_the_reference_example(budget):
    knowledge = {"personal_fact": "Person 1's Persona: I just adopted a puppy.",
                 "interesting_fact": "Argentina won the 2022 World Cup."}
    prompt = P.response_prompt(HISTORY, knowledge, budget)
    assert prompt.text == (
        "Person 1: Hi! I just adopted a puppy.\n"
        "Person 2: Congrats! What breed is it?\n"
        "Person 1: A corgi. Who won the 2022 World Cup?\n"
        "Personal Fact: Person 1's Persona: I just adopted a puppy.\n"
        "Interesting Fact: Argentina won the 2022 World Cup.\n"
        "Person 2:")


def test_knowledge_lines_keep_the_reference_order(budget):
    knowledge = {"interesting_fact": "C", "personal_fact": "B", "previous_topic": "A"}
    lines = P.response_prompt(HISTORY[-1:], knowledge, budget).text.split("\n")
    assert lines[1:] == ["Previous Topic: A", "Personal Fact: B", "Interesting Fact: C",
                         "Person 2:"]


def test_search_decision_payload_is_parlais_logged_request(budget):
    prompt = P.search_decision_prompt(("Person 1: Hi!",), budget)
    logged = json.loads(
        '{"prompt": "Person 1: Hi!\\nSearch Decision:", "min_tokens": 1, "max_tokens": 10, '
        '"best_of": 1, "top_p": -1.0, "stop": "\\n", "temperature": 1.0, "echo": false, '
        '"lambda_decay": -1, "omega_bound": 0.3, "alpha_presence": 0, "alpha_frequency": 0, '
        '"alpha_presence_src": 0, "alpha_frequency_src": 0, "alpha_src_penalty_end_idx": -1}')
    assert prompt.payload() == logged
    assert list(prompt.payload()) == list(logged)  # the same fields, nothing more


def test_every_module_prompt_shape(budget):
    assert P.search_decision_prompt(HISTORY, budget).text == (
        "Person 1: A corgi. Who won the 2022 World Cup?\nSearch Decision:")
    assert P.memory_decision_prompt(
        HISTORY, ["Person 2's Persona: I like dogs.", "Person 2's Persona: I am a nurse."],
        ["Person 1's Persona: I have a corgi."], budget).text == (
        "Personal Fact: Person 2's Persona: I like dogs. Person 2's Persona: I am a nurse.\n"
        "Personal Fact: Person 1's Persona: I have a corgi.\n"
        "Person 1: A corgi. Who won the 2022 World Cup?\nMemory Decision:")
    assert P.memory_generation_prompt("I am a vet.", budget).text == (
        "Person 1: I am a vet.\nMemory:")
    history = "\n".join(HISTORY)
    assert P.search_query_prompt(HISTORY, budget).text == history + "\nQuery:"
    assert P.contextual_knowledge_prompt(HISTORY, budget).text == history + "\nPrevious Topic:"
    memories = ["Person 1's Persona: I just adopted a puppy.", "Person 2's Persona: I like cats."]
    assert P.memory_knowledge_prompt(HISTORY, memories, budget).text == (
        "\n".join(memories) + "\n" + history + "\nPersonal Fact:")
    assert P.opening_prompt(memories[:1], budget).text == (
        "Person 1's Persona: I just adopted a puppy.\nOpening:")


def test_search_knowledge_shows_five_documents_of_100_words(budget):
    content = "\n".join(f"Sentence number {i} of the page." for i in range(60))  # 360 words
    docs = [(f"Title {i}", content) for i in range(7)]
    lines = P.search_knowledge_prompt(HISTORY, docs, budget).text.split("\n")
    shown = [line for line in lines if line.startswith("External Knowledge: ")]
    assert len(shown) == 5
    assert shown[0].startswith("External Knowledge: Title 0 | Sentence number 0 of the page. "
                               "Sentence number 1")
    assert len(shown[0].split(" | ", 1)[1].split()) == 100
    assert lines[5:] == [*HISTORY, "Interesting Fact:"]
    short = P.search_knowledge_prompt(HISTORY, docs[:1], budget, chunk_words=3)
    assert short.text.startswith("External Knowledge: Title 0 | Sentence number 0\n")


def test_decoding_follows_the_reference_table():
    greedy = {"top_p": -1.0, "lambda_decay": -1.0, "temperature": 1.0}
    table = {P.SDM: (1, 10, 0.0), P.MDM: (1, 10, 0.0), P.SGM: (1, 32, 0.0),
             P.MGM: (1, 32, 0.0), P.CKM: (1, 32, 0.5), P.MKM: (1, 32, 0.5),
             P.SKM: (1, 64, 0.5)}
    for module, (lo, hi, penalty) in table.items():
        payload = P.DECODING[module].payload("x")
        assert (payload["min_tokens"], payload["max_tokens"]) == (lo, hi), module
        assert {k: payload[k] for k in greedy} == greedy, module
        assert payload["alpha_presence"] == payload["alpha_frequency"] == penalty, module
        assert payload["alpha_presence_src"] == payload["alpha_frequency_src"] == 0, module
        assert (payload["stop"], payload["best_of"], payload["echo"]) == ("\n", 1, False)
    nucleus = {"top_p": 0.9, "lambda_decay": 0.9, "omega_bound": 0.3, "temperature": 1.0}
    srm = P.DECODING[P.SRM].payload("x", 7)
    assert {k: srm[k] for k in nucleus} == nucleus
    assert (srm["min_tokens"], srm["max_tokens"]) == (20, 128)
    assert srm["alpha_presence"] == srm["alpha_frequency"] == 0.5
    assert srm["alpha_presence_src"] == srm["alpha_frequency_src"] == 0.5
    assert srm["alpha_src_penalty_end_idx"] == 7
    orm = P.DECODING[P.ORM].payload("x")
    assert {k: orm[k] for k in nucleus} == nucleus
    assert (orm["min_tokens"], orm["max_tokens"], orm["alpha_presence"],
            orm["alpha_presence_src"]) == (1, 128, 0.0, 0.0)


def test_token_limits_are_the_reference_ones():
    assert P.TOKEN_LIMIT == {"sdm": 1912, "mdm": 1912, "sgm": 1912, "mgm": 1912, "vrm": 1912,
                             "ckm": 1812, "mkm": 1412, "skm": 1412, "orm": 1412, "srm": 1784,
                             "crm": 1880, "mrm": 1848}
    assert P.Budget(len, max_prompt_len=512).limit(P.SRM) == 512
    assert P.Budget(len, max_prompt_len=4096).limit(P.MKM) == 1412


def test_bpe_counts_metaseq_tokens():
    # "Person 1: Hi!\nSearch Decision:" is 9 BPE tokens; "\n" is metaseq id 50118.
    bpe = bpe_tokenizer(real_assets())
    assert bpe.count("Person 1: Hi!\nSearch Decision:") == 9
    assert bpe.count("Hello world") == 2


def test_metaseqs_files_are_the_published_ones():
    from assets import check

    assert check(real_assets()) == []  # both md5s


KNOWLEDGE = {"previous_topic": "puppies", "personal_fact": "Person 1's Persona: I have a corgi.",
             "interesting_fact": "Corgis are herding dogs."}


def test_src_penalty_ends_where_the_interesting_fact_starts(bpe):
    # ParlAI answers through its search-dialogue agent (combined conditioning), which stops
    # the context penalty at its own prefix, "Interesting Fact:" (opt_api_agent.py).
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(str(ASSETS / "gpt2-vocab.json"),
                                str(ASSETS / "gpt2-merges.txt"))
    budget = P.Budget(bpe.count, encode=bpe.encode)
    prompt = P.response_prompt(HISTORY, KNOWLEDGE, budget)
    tokens = tok.encode(prompt.text).tokens
    idx = prompt.src_penalty_end_idx
    assert tokens[idx - 1] == "Ċ" and "".join(tokens[idx:]).startswith("Interesting")
    assert prompt.text.split("\n")[-2].startswith("Interesting Fact:")
    # Without an interesting fact ParlAI finds no prefix: -1, knowledge or not.
    for knowledge in ({"previous_topic": "puppies"}, {"personal_fact": "I have a corgi."}, {}):
        assert P.response_prompt(HISTORY, knowledge, budget).src_penalty_end_idx == -1
    # ParlAI searches token ids: typed inside a line the prefix is " Interesting", not a match.
    typed = (*HISTORY[:-1], "Person 1: Interesting Fact: corgis are short.")
    assert P.response_prompt(typed, {}, budget).src_penalty_end_idx == -1


def test_parlai_end_idx_keeps_parlais_loop_bounds():
    # for i in reversed(range(len(ids) - n)): stop below n; a match ends at i (exclusive).
    assert P.parlai_end_idx([5, 1, 2, 9, 9, 9, 9], [1, 2]) == 1
    assert P.parlai_end_idx([5, 1, 2, 9, 1, 2, 9, 9, 9], [1, 2]) == 4  # the last one
    assert P.parlai_end_idx([1, 2, 9, 9, 9], [1, 2]) == 0
    assert P.parlai_end_idx([5, 1, 2, 9, 9], [1, 2]) == -1  # ends too near the end for ParlAI
    assert P.parlai_end_idx([1, 2], [1, 2]) == -1


def test_src_penalty_end_never_overshoots_without_the_bpe_files(bpe):
    # Without token ids the agent estimates; the index the server acts on must not come out
    # high, or the _src penalties would reach into the knowledge lines.
    estimate = estimate_tokenizer()
    history = (*HISTORY, "Person 2: ¿Qué tal? It's 10:30 — naïve café-goers' résumés…")
    budget = P.Budget(estimate.count, count_floor=estimate.floor)
    exact = P.Budget(bpe.count, encode=bpe.encode)
    idx = P.response_prompt(history, KNOWLEDGE, budget).src_penalty_end_idx
    assert 0 < idx <= P.response_prompt(history, KNOWLEDGE, exact).src_penalty_end_idx


def test_long_history_is_cut_from_the_oldest_line(budget):
    history = tuple(f"Person {1 + i % 2}: line {i} " + "word " * 30 for i in range(200))
    history += ("Person 1: the last thing I said",)
    prompt = P.search_query_prompt(history, budget)
    lines = prompt.text.split("\n")
    assert lines[-2:] == ["Person 1: the last thing I said", "Query:"]
    assert budget.count_tokens(prompt.text) < P.TOKEN_LIMIT[P.SGM]
    # Cut from the oldest only: what remains is a contiguous tail of the conversation.
    assert lines[:-1] == list(history[-(len(lines) - 1):])
    assert budget.count_tokens("\n".join([history[-len(lines)], *lines])) >= P.TOKEN_LIMIT[P.SGM]


def test_knowledge_is_dropped_from_the_earliest_once_history_is_one_line(bpe):
    budget = P.Budget(bpe.count, max_prompt_len=40)
    knowledge = {"previous_topic": "corgis " * 10, "personal_fact": "I have a dog.",
                 "interesting_fact": "Argentina won."}
    prompt = P.response_prompt(HISTORY, knowledge, budget)
    assert prompt.text == ("Person 1: A corgi. Who won the 2022 World Cup?\n"
                           "Personal Fact: I have a dog.\nInteresting Fact: Argentina won.\n"
                           "Person 2:")
    assert bpe.count(prompt.text) < 40


@pytest.mark.parametrize("raw, cleaned", [
    (" do not search", "do not search"),
    ("\n Argentina won.\n", "Argentina won."),
    (" I like that.\nPerson 1: and then", "I like that."),
    (" Person 2: hi there\nPerson 1: x", "hi there"),
    (" a: b: c\nmore", "c"),
    (" Time: 10:30", "Time: 10:30"),  # no newline left: colons stay
    ("", ""),
])
def test_output_cleaning_is_parlais(raw, cleaned):
    assert P.clean_output(raw) == cleaned


@given(st.text())
@settings(max_examples=200, deadline=None)
def test_cleaning_yields_one_clean_line(raw):
    cleaned = P.clean_output(raw)
    assert "\n" not in cleaned and cleaned == cleaned.strip()
    assert P.clean_output(cleaned) == cleaned


def test_decisions_parse_the_module_words():
    assert P.wants_search("search") and P.wants_search(" Search ")
    assert not P.wants_search("do not search")
    assert not P.wants_search("I love my corgi! What do you like?")  # chit-chat (#4858)
    assert P.wants_memory("access memory") and not P.wants_memory("do not access memory")


def test_estimate_stays_close_to_bpe():
    bpe = bpe_tokenizer(real_assets())
    text = "\n".join(HISTORY) + ("\nExternal Knowledge: The 2022 FIFA World Cup | The final "
                                 "was played at Lusail Stadium on 18 December 2022.")
    real, guess = bpe.count(text), estimate_tokens(text)
    assert real * 0.9 <= guess <= real * 1.5
    assert estimate_tokenizer().count(text) == guess
    with pytest.raises(FileNotFoundError):
        load_tokenizer(ASSETS / "missing")


@given(lines=st.lists(st.text(st.characters(blacklist_categories=("Cs",),
                                            blacklist_characters="\n"), max_size=40),
                      min_size=1, max_size=30),
       limit=st.integers(8, 300))
@settings(max_examples=100, deadline=None)
def test_cut_prompts_fit_and_keep_a_contiguous_tail(bpe, lines, limit):
    budget = P.Budget(bpe.count, max_prompt_len=limit)
    history = tuple(P.user_line(line) for line in lines)
    prompt = P.contextual_knowledge_prompt(history, budget)
    kept = prompt.text.split("\n")
    assert kept[-1] == "Previous Topic:" and len(kept) >= 2
    assert kept[:-1] == list(history[-(len(kept) - 1):])
    assert bpe.count(prompt.text) < limit or len(kept) == 2
