"""The safety layer: the word-list matcher, the classifier, the modes, and safe_interactive's
handling of an unsafe user message (the bot never sees it)."""

from __future__ import annotations

import pytest

from agents.safety import (UNSAFE_INPUT_MESSAGE, UNSAFE_REPLY_MESSAGE, SafetyChecker,
                           word_variants)
from loopback import json_answer, safe_interactive
BENIGN = ["Hi! I just adopted a puppy.", "Who won the 2022 World Cup?",
          "Argentina won the 2022 World Cup.", "I love butter on toast.", "That was fatal.",
          "I am a potter.", "Scunthorpe is a town in England.", "I went to class today.",
          "What is your favorite hobby?", "I work as a therapist."]


@pytest.fixture(scope="module")
def everything():
    return SafetyChecker("all")


def test_parlais_messages():
    assert UNSAFE_INPUT_MESSAGE == "[ Sorry, could not process that message. Please try again. ]"
    assert UNSAFE_REPLY_MESSAGE == ("[ Unsafe model reply detected. Clearing agent history. "
                                    "Please try again. ]")


def test_string_matcher_catches_words_variants_and_leetspeak():
    matcher = SafetyChecker("string_matcher")
    for text in ["you are shit", "you assholes", "f*ck off", "sh1t happens",
                 "stop fucking around", "what a bitch"]:
        verdict = matcher.check(text)
        assert not verdict.safe and verdict.reasons[0].startswith("string_matcher"), text
    for text in BENIGN:
        assert matcher.check(text).safe, text


def test_variants_follow_english_spelling():
    variants = word_variants(["asshole", "fat", "kill"])
    assert {"assholes", "killers", "killing", "unkill"} <= variants
    assert "fates" not in variants and "fatal" not in variants and "fatter" not in variants


def test_classifier_catches_insults_the_word_list_misses():
    classifier = SafetyChecker("classifier")
    verdict = classifier.check("you are an idiot and everybody hates you")
    assert not verdict.safe and verdict.reasons[0].startswith("classifier: p=")
    assert SafetyChecker("string_matcher").check("you are an idiot and everybody hates you").safe
    for text in BENIGN:
        assert classifier.check(text).safe, text


def test_modes(everything):
    assert not everything.check("go fuck yourself").safe
    assert len(everything.check("you stupid fucking idiot").reasons) == 2
    assert SafetyChecker("none").check("go fuck yourself").safe
    with pytest.raises(ValueError, match="all, string_matcher, classifier, none"):
        SafetyChecker("strict")


def test_replies_can_be_held_to_a_stricter_threshold():
    checker = SafetyChecker("classifier", reply_threshold=0.5)
    # "I hate mondays" scores about 0.9: a blunt user message, but not what the bot should say.
    assert checker.check("I hate mondays").safe
    verdict = checker.check("I hate mondays", reply=True)
    assert not verdict.safe and verdict.reasons[0].startswith("classifier: p=0.9")
    assert SafetyChecker("classifier").check("I hate mondays", reply=True).safe


def test_unsafe_message_never_reaches_the_model(tmp_path, scripted):
    server = scripted(lambda r: json_answer({"error": {"message": "not now"}}, 503))
    script = tmp_path / "chat.txt"
    script.write_text("you are a fucking idiot\nyou are an idiot and everybody hates you\n"
                      "Hello, how are you?\n")
    result = safe_interactive("--script", str(script), "--opt-server", server.address,
                              "--memory-db", str(tmp_path / "m.sqlite"), "--log",
                              str(tmp_path / "log.jsonl"), "--metaseq-max-retry-api", "0",
                              cwd=tmp_path, timeout=60)
    lines = result.stdout.splitlines()
    # Both unsafe messages (one per checker) are refused with ParlAI's message...
    assert lines[:4] == ["Enter Your Message: you are a fucking idiot", UNSAFE_INPUT_MESSAGE,
                         "Enter Your Message: you are an idiot and everybody hates you",
                         UNSAFE_INPUT_MESSAGE]
    # ...and only the safe one reached the server.
    prompts = {r.json()["prompt"] for r in server.requests if r.path == "/completions"}
    assert prompts and all("Hello, how are you?" in p for p in prompts)
    assert not any("idiot" in p for p in prompts)
    assert result.returncode == 1 and "HTTP 503: not now" in result.stderr
