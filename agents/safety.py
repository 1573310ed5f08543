"""The safety layer of safe_interactive: a word-list matcher and an offensive-language classifier.

ParlAI checks both the user's message and the bot's reply with a string matcher over an
LDNOOBW-derived list (with prefix/suffix variants) and a single-turn classifier. Both parts here
are maintained PyPI packages that work offline: `better-profanity` (its bundled word list, with
leetspeak variants) and `alt-profanity-check` (a linear SVM trained on offensive-language data,
shipped as a joblib model). Nothing is downloaded at run time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SAFETY_MODES = ("all", "string_matcher", "classifier", "none")
UNSAFE_INPUT_MESSAGE = "[ Sorry, could not process that message. Please try again. ]"
UNSAFE_REPLY_MESSAGE = ("[ Unsafe model reply detected. Clearing agent history. "
                        "Please try again. ]")

# The classifier's probabilities are high for merely negative sentences ("I hate mondays"
# scores 0.905), while insults and slurs score 0.99 and up: 0.95 separates the two.
DEFAULT_CLASSIFIER_THRESHOLD = 0.95

# ParlAI's variant affixes. The bundled list has short everyday words ("fat", "pot", "god") that
# affixes would turn into innocent ones ("fatal", "potter", "potting"): words of 3 letters only
# get plurals, prefixes need 4+ letters and derivational suffixes 5+.
_PREFIXES = ("de", "dis", "il", "im", "ir", "mis", "non", "over", "pre", "re", "un", "under")
_DERIVATIONAL = ("acy", "al", "ance", "ence", "dom", "ism", "ist", "ity", "ment", "ness",
                 "ship", "ate", "en", "ify", "ize", "ise", "able", "ible", "esque", "ful", "ic",
                 "ical", "ious", "ous", "ish", "ive", "less", "ly")
_MIN_PREFIX_BASE, _MIN_DERIVATION_BASE = 4, 5
_WORD = re.compile(r"[a-z0-9]+")


def _inflections(word: str) -> set[str]:
    """Plural, past, gerund and agent forms with English spelling rules (so that "fat" gives
    "fatter", not "fates" -> "fat")."""
    forms = {word + "s"}
    if word.endswith(("s", "x", "z", "ch", "sh")):
        forms.add(word + "es")
    if len(word) <= 3:
        return forms
    if word.endswith("e"):
        base, forms_e = word[:-1], {word + "d", word + "r", word + "rs"}
        return forms | forms_e | {base + "ing", base + "y"}
    vowels = "aeiou"
    if (len(word) >= 3 and word[-1] not in vowels + "wxy" and word[-2] in vowels
            and word[-3] not in vowels):
        base = word + word[-1]  # short consonant-vowel-consonant ending doubles: fat -> fatt
    else:
        base = word
    return forms | {base + suffix for suffix in ("ed", "ing", "er", "ers", "y")}


def word_variants(words: list[str]) -> frozenset[str]:
    variants: set[str] = set()
    for word in words:
        word = word.lower().strip()
        if not word or " " in word or not word.isalnum():
            continue  # phrases and leetspeak spellings are matched by better-profanity itself
        variants.add(word)
        variants |= _inflections(word)
        if len(word) >= _MIN_PREFIX_BASE:
            variants |= {prefix + word for prefix in _PREFIXES}
        if len(word) >= _MIN_DERIVATION_BASE:
            variants |= {word + suffix for suffix in _DERIVATIONAL}
    return frozenset(variants)


class StringMatcher:
    """better-profanity's bundled list, plus ParlAI-style affix variants of its words."""

    def __init__(self):
        from better_profanity import Profanity
        from better_profanity.utils import get_complete_path_of_file, read_wordlist

        self._profanity = Profanity()
        words = list(read_wordlist(get_complete_path_of_file("profanity_wordlist.txt")))
        self._variants = word_variants(words)

    def match(self, text: str) -> str | None:
        """The first offending word (or "phrase" when only the package's matcher fired)."""
        for word in _WORD.findall(text.lower()):
            if word in self._variants:
                return word
        if self._profanity.contains_profanity(text):
            return "phrase"
        return None


class OffensiveClassifier:
    """alt-profanity-check's classifier: probability that a single message is offensive."""

    def __init__(self, threshold: float = DEFAULT_CLASSIFIER_THRESHOLD):
        from profanity_check import predict_prob

        self._predict_prob = predict_prob
        self.threshold = threshold

    def probability(self, text: str) -> float:
        return float(self._predict_prob([text])[0])


@dataclass(frozen=True)
class Verdict:
    safe: bool
    reasons: tuple[str, ...] = ()


class SafetyChecker:
    """Checks one message at a time with the parts that `mode` selects.

    The bot's replies may be held to a stricter classifier threshold than the user's messages
    (`reply_threshold`; None: the same one): a deployment can refuse borderline output from
    the bot without refusing its users' blunt messages.
    """

    def __init__(self, mode: str = "all",
                 classifier_threshold: float = DEFAULT_CLASSIFIER_THRESHOLD,
                 reply_threshold: float | None = None):
        if mode not in SAFETY_MODES:
            raise ValueError(f"--safety must be one of {', '.join(SAFETY_MODES)}, not {mode!r}")
        self.mode = mode
        self._matcher = StringMatcher() if mode in ("all", "string_matcher") else None
        self._classifier = (OffensiveClassifier(classifier_threshold)
                            if mode in ("all", "classifier") else None)
        self.reply_threshold = classifier_threshold if reply_threshold is None else reply_threshold

    def check(self, text: str, *, reply: bool = False) -> Verdict:
        """`reply`: the text is the bot's, judged with the reply threshold."""
        reasons = []
        if self._matcher is not None:
            word = self._matcher.match(text)
            if word:
                reasons.append(f"string_matcher: {word}")
        if self._classifier is not None:
            p = self._classifier.probability(text)
            if p >= (self.reply_threshold if reply else self._classifier.threshold):
                reasons.append(f"classifier: p={p:.3f}")
        return Verdict(safe=not reasons, reasons=tuple(reasons))
