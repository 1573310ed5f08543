"""Word normalisation for memory deduplication and the TF-IDF memory cap.

ParlAI compares memories by their normalised token sets (lowercase, no punctuation, no filler
words, stemmed) and picks the memories offered to the memory-knowledge module by TF-IDF. Both
live here as pure functions so that they are testable without a store or a model. The stemmer
is Porter's 1980 algorithm, written out because no stemmer ships with the project's
dependencies.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

# The usual English stop-word list (NLTK's, apostrophes removed) minus the negations: "I do not
# like dogs" must not be taken for a duplicate of "I like dogs".
STOP_WORDS = frozenset("""
a about above after again against all am an and any are aren arent as at be because been before
being below between both but by can couldn couldnt d did didn didnt do does doesn doesnt doing
don dont down during each few for from further had hadn hadnt has hasn hasnt have haven havent
having he her here hers herself him himself his how i if im in into is isn isnt it its itself
ive just ll m ma me mightn more most mustn my myself needn now o of off on once only or other
our ours ourselves out over own re s same shan she shes should shouldn shouldve so some such t
than that thatll the their theirs them themselves then there these they this those through to
too under until up ve very was wasn wasnt we were weren what when where which while who whom
why will with won wouldn y you youd youll your youre yours yourself yourselves youve
""".split())

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lowercased alphanumeric words; apostrophes are dropped first so "don't" -> "dont"."""
    return _WORD.findall(text.lower().replace("'", "").replace("\u2019", ""))


def content_stems(text: str) -> list[str]:
    """Stems of the non-filler words of `text`, in order (repeats kept, for TF counts)."""
    return [porter_stem(w) for w in words(text) if w not in STOP_WORDS]


def token_set(text: str) -> frozenset[str]:
    return frozenset(content_stems(text))


# ---------------------------------------------------------------------------------------------
# Porter stemmer (M. F. Porter, "An algorithm for suffix stripping", 1980).


def _consonant(w: str, i: int) -> bool:
    c = w[i]
    if c in "aeiou":
        return False
    if c == "y":
        return i == 0 or not _consonant(w, i - 1)
    return True


def _measure(stem: str) -> int:
    """m in [C](VC){m}[V]: the number of vowel-consonant runs."""
    pattern = "".join("c" if _consonant(stem, i) else "v" for i in range(len(stem)))
    collapsed = re.sub(r"(.)\1+", r"\1", pattern)
    return collapsed.count("vc")


def _has_vowel(stem: str) -> bool:
    return any(not _consonant(stem, i) for i in range(len(stem)))


def _double_consonant(w: str) -> bool:
    return len(w) >= 2 and w[-1] == w[-2] and _consonant(w, len(w) - 1)


def _cvc(w: str) -> bool:
    return (len(w) >= 3 and _consonant(w, len(w) - 3) and not _consonant(w, len(w) - 2)
            and _consonant(w, len(w) - 1) and w[-1] not in "wxy")


_STEP2 = (("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"),
          ("izer", "ize"), ("abli", "able"), ("alli", "al"), ("entli", "ent"), ("eli", "e"),
          ("ousli", "ous"), ("ization", "ize"), ("ation", "ate"), ("ator", "ate"),
          ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"), ("ousness", "ous"),
          ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"))
_STEP3 = (("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"),
          ("ful", ""), ("ness", ""))
_STEP4 = ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion",
          "ou", "ism", "ate", "iti", "ous", "ive", "ize")


def _replace_longest(w: str, rules: Sequence[tuple[str, str]], min_measure: int) -> str:
    # Porter applies only the longest matching suffix of a step, and only if its condition holds.
    for suffix, repl in sorted(rules, key=lambda r: -len(r[0])):
        if w.endswith(suffix):
            stem = w[: -len(suffix)]
            return stem + repl if _measure(stem) > min_measure else w
    return w


def porter_stem(word: str) -> str:
    w = word.lower()
    if len(w) <= 2:
        return w
    # Step 1a: plurals.
    if w.endswith("sses") or w.endswith("ies"):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    # Step 1b: -eed, -ed, -ing.
    if w.endswith("eed"):
        if _measure(w[:-3]) > 0:
            w = w[:-1]
    else:
        for suffix in ("ed", "ing"):
            if w.endswith(suffix) and _has_vowel(w[: -len(suffix)]):
                w = w[: -len(suffix)]
                if w.endswith(("at", "bl", "iz")):
                    w += "e"
                elif _double_consonant(w) and w[-1] not in "lsz":
                    w = w[:-1]
                elif _measure(w) == 1 and _cvc(w):
                    w += "e"
                break
    # Step 1c: y -> i after a vowel-containing stem.
    if w.endswith("y") and _has_vowel(w[:-1]):
        w = w[:-1] + "i"
    w = _replace_longest(w, _STEP2, 0)
    w = _replace_longest(w, _STEP3, 0)
    # Step 4: strip a suffix when m > 1 (-ion only after s or t).
    for suffix in sorted(_STEP4, key=len, reverse=True):
        if w.endswith(suffix):
            stem = w[: -len(suffix)]
            if _measure(stem) > 1 and (suffix != "ion" or stem.endswith(("s", "t"))):
                w = stem
            break
    # Step 5: final -e and -ll.
    if w.endswith("e"):
        stem = w[:-1]
        m = _measure(stem)
        if m > 1 or (m == 1 and not _cvc(stem)):
            w = stem
    if w.endswith("ll") and _measure(w) > 1:
        w = w[:-1]
    return w


# ---------------------------------------------------------------------------------------------
# TF-IDF (scikit-learn's smooth idf and L2-normalised rows, written out: ~10 lines do not
# justify importing scikit-learn in the agent's start-up path).


def tfidf_scores(query: str, documents: Sequence[str]) -> list[float]:
    """Cosine similarity between `query` and each document, IDF taken over the documents."""
    docs = [Counter(content_stems(d)) for d in documents]
    n = len(docs)
    df = Counter(term for d in docs for term in d)
    idf = {t: math.log((1 + n) / (1 + c)) + 1.0 for t, c in df.items()}

    def vector(counts: Counter) -> dict[str, float]:
        vec = {t: c * idf[t] for t, c in counts.items() if t in idf}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        return {t: v / norm for t, v in vec.items()} if norm else {}

    q = vector(Counter(content_stems(query)))
    return [sum(w * q.get(t, 0.0) for t, w in vector(d).items()) for d in docs]


def top_k_by_tfidf(query: str, documents: Sequence[str], k: int) -> list[int]:
    """Indices of the k documents closest to `query`, returned in their original order.

    Ties (e.g. no overlap at all) keep the most recent documents, which are the likeliest to
    matter in an ongoing conversation.
    """
    if len(documents) <= k:
        return list(range(len(documents)))
    scores = tfidf_scores(query, documents)
    ranked = sorted(range(len(documents)), key=lambda i: (-scores[i], -i))
    return sorted(ranked[:k])
