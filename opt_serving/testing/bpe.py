"""A byte-level BPE the test suite trains itself, written in metaseq's file format.

metaseq's ``gpt2-vocab.json`` / ``gpt2-merges.txt`` are not in this repository (a fresh clone
has no ``../shared``), yet the server, agent, schema and stopping tests need a real BPE: stop
strings spanning tokens, UTF-8 characters split across tokens, character offsets. So we train
one with HF ``tokenizers`` on a small fixed corpus and write it as metaseq's files are:

- fairseq's four specials at ids 0-3 (``<s> <pad> </s> <unk>``) and 50265 entries in all, so
  ``opt_serving.tokenizer.check_vocab`` accepts it;
- the rest of the 50265 ids filled with short letter runs (most starting a word) that merges
  reach, as GPT-2's entries are: a random model's output reads like word salad, and words
  cost one or two tokens, as with metaseq's vocabulary;
- the ids the toolkit knows from metaseq's vocabulary kept where metaseq has them: "." 4,
  "?" 116, "!" 328 (factual nucleus's sentence ends) and "\\n" 50118 (a stop token);
- a merges file with the ``#version: 0.2`` header.

``build(folder)`` is deterministic: the same corpus gives the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from opt_serving.config import DICT_SIZE
from opt_serving.tokenizer import MERGES_FILE, SPECIALS, VOCAB_FILE

VOCAB_TARGET = 3000  # merges learned from the corpus (metaseq's has 50000)
PINNED = {".": 4, "?": 116, "!": 328, "Ċ": 50118}  # byte-level "Ċ" is "\n"

_SENTENCES = """\
Hello! How are you doing today? I am doing well, thank you for asking.
I just adopted a puppy. She is a corgi and her name is Biscuit.
Who won the 2022 World Cup? Argentina won it after a penalty shoot-out.
Do you have any pets? I have two cats and a dog, and they get along fine.
What is your favorite food? I love pizza, pasta and a good cup of coffee.
The weather is lovely today, so we went for a long walk in the park.
My favorite book is about a sailor who crosses the ocean alone.
Corgis are herding dogs. They were bred to herd cattle in Wales.
I work as a nurse at the hospital, and I enjoy helping people.
Where do you live? I live in a small town near the mountains.
Person 1: Hi there! Person 2: Hello, nice to meet you.
Person 1's Persona: I have a corgi. Person 2's Persona: I like to read books.
Search Decision: search. Memory Decision: access memory. Query: corgi facts.
Interesting Fact: Corgis are herding dogs. Personal Fact: I have a corgi.
Previous Topic: corgis. Memory: I have a corgi. do not search. do not access memory.
The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.
Numbers like 1, 2, 3, 10, 42, 100 and 2048 appear in text all the time.
She said: "That's great news!" and he replied, "Isn't it?"
We're going to the beach tomorrow; they'll meet us there at noon.
Café, naïve, résumé and jalapeño carry accents; 日本語 and 中文 are words too.
Emoji such as 🐶 and 🎉 take four bytes each in UTF-8, and — dashes take three.
The model answers questions, writes stories and holds a conversation.
A completion server returns text, tokens, log-probabilities and offsets.
Stop sequences end the text early: a newline, a period, or a whole phrase.
Hi there! Hi, how is it going? Hey there, good to see you again.
Paris is the capital of France, and Berlin is the capital of Germany.
The capital city of Italy is Rome. London is a big city with many people.
Title: a page about dogs. Sentence number one of the page is short.
This is the first sentence of the page, and this is the second one.
There was a time when people would write letters to each other by hand.
What would you like to do this weekend? We could go to a movie or stay home.
They have been working on the project for a long time, but it is not done.
He said that he would come back later, after the game was over.
It was a cold day in the north, so we made a fire and read our books.
Can you tell me more about your family? My mother is a teacher.
Some of the most popular sports are soccer, tennis, basketball and running.
I think that music makes people happy, especially when they sing together.
Water boils at one hundred degrees, and ice melts when it gets warm.
The answer to your question is yes, but only if you ask me nicely.
Each part of the world has its own food, language, history and culture.
If you want to learn something new, find a good teacher and practice every day.
Which one do you want, the red one or the blue one? I want the green one.
"""


def corpus() -> list[str]:
    # Repeated, so that common pairs pass the trainer's frequency threshold.
    return _SENTENCES.splitlines() * 3


def _filler(n: int, taken: set[str]) -> list[tuple[str, str]]:
    """``n`` more entries shaped like metaseq's (short letter runs, most with the leading-space
    mark "Ġ"), each with the merge that makes it from a shorter entry, as a real BPE's are:
    (prefix, last letter). Shortest first, so every prefix is in the vocabulary before it."""
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    out: list[tuple[str, str]] = []
    have = set(taken)
    runs = [""]
    for _ in range(3):
        runs = [r + c for r in runs for c in letters]
        for run in runs:
            for token in (f"Ġ{run}", run):
                if token not in have and len(out) < n and len(token) > 1:
                    out.append((token[:-1], token[-1]))
                    have.add(token)
    for run in runs:  # plurals of three-letter runs
        if f"Ġ{run}s" not in have and len(out) < n:
            out.append((f"Ġ{run}", "s"))
            have.add(f"Ġ{run}s")
    assert len(out) == n, "not enough filler entries"
    return out


def build(folder: str | os.PathLike) -> Path:
    """Train and write gpt2-vocab.json + gpt2-merges.txt into ``folder``; returns it."""
    from tokenizers import ByteLevelBPETokenizer

    folder = Path(folder)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=VOCAB_TARGET, min_frequency=2,
                            show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = bpe.save_model(tmp)
        trained = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        merges = [ln for ln in Path(merges_file).read_text(encoding="utf-8").splitlines()
                  if ln and not ln.startswith("#version")]
    slots: list[str | None] = [None] * DICT_SIZE
    for i, token in enumerate(SPECIALS):
        slots[i] = token
    for token, i in PINNED.items():
        slots[i] = token
    free = (i for i, t in enumerate(slots) if t is None)
    for token in sorted(trained, key=trained.get):
        if token not in PINNED:
            slots[next(free)] = token
    rest = [i for i, t in enumerate(slots) if t is None]
    filler = _filler(len(rest), set(trained) | set(SPECIALS))
    for i, (prefix, last) in zip(rest, filler):
        slots[i] = prefix + last
    merges += [f"{prefix} {last}" for prefix, last in filler]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / VOCAB_FILE).write_text(json.dumps({t: i for i, t in enumerate(slots)},
                                                ensure_ascii=False), encoding="utf-8")
    (folder / MERGES_FILE).write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                      encoding="utf-8")
    return folder


def cached(root: str | os.PathLike | None = None) -> Path:
    """``build`` once per corpus and code version, under ``root`` (the temp folder)."""
    key = hashlib.sha256((_SENTENCES + Path(__file__).read_text()).encode()).hexdigest()[:16]
    folder = Path(root or tempfile.gettempdir()) / f"opt-serving-test-bpe-{key}"
    if not (folder / VOCAB_FILE).is_file() or not (folder / MERGES_FILE).is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        build(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process got there first
            for f in staging.iterdir():
                f.unlink()
            staging.rmdir()
    return folder
