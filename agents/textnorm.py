"""Word normalisation for memory deduplication and the TF-IDF memory cap.

ParlAI compares memories by their normalised token sets (lowercase, no punctuation, no filler
words, stemmed) and picks the memories offered to the memory-knowledge module by TF-IDF. Both
live here as pure functions so that they are testable without a store or a model. Stemming is
Porter's algorithm from `snowballstemmer`; TF-IDF is scikit-learn's `TfidfVectorizer`.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Sequence

import snowballstemmer

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


# A snowball stemmer keeps its word in instance state: one per thread.
_local = threading.local()


@functools.lru_cache(maxsize=16384)
def porter_stem(word: str) -> str:
    """Porter's stem of one lowercase word. Words of one or two letters stay as they are, as in
    Porter's reference implementation (snowball's port would turn "us" into "u")."""
    word = word.lower()
    if len(word) <= 2:
        return word
    stemmer = getattr(_local, "stemmer", None)
    if stemmer is None:
        stemmer = _local.stemmer = snowballstemmer.stemmer("porter")
    return stemmer.stemWord(word)


def tfidf_scores(query: str, documents: Sequence[str]) -> list[float]:
    """Cosine similarity between `query` and each document, IDF taken over the documents
    (scikit-learn's smooth IDF and L2-normalised rows, over `content_stems`)."""
    # scikit-learn costs a second to import: only a partner with more than 32 memories pays it.
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(analyzer=content_stems)
    try:
        docs = vectorizer.fit_transform(documents)
    except ValueError:  # no document has a content word: nothing to match
        return [0.0] * len(documents)
    # Rows are unit vectors, so the dot product is the cosine.  # (D, V) @ (V, 1) -> (D, 1)
    return [float(s) for s in (docs @ vectorizer.transform([query]).T).toarray()[:, 0]]


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
