"""Stop criteria, fed token by token as the engine does."""


import pytest
from hypothesis import given, settings, strategies as st

from opt_serving.decoding.stopping import check, find_stop, releasable
from opt_serving.protocol import SamplingParams
from opt_serving.tokenizer import Tokenizer, locate_assets
from paths import ASSETS



def feed(c: SamplingParams, pieces, eos_at=None):
    """Generate ``pieces`` (bytes per token) until a stop; returns (status, text, released),
    released = the bytes a stream had sent before the end."""
    text, ends, released = b"", [], 0
    for i, piece in enumerate(pieces):
        if i == eos_at:
            return check(c, text, ends, eos=True), text, released
        text += piece
        ends.append(len(text))
        status = check(c, text, ends, eos=False)
        if status.stop:
            return status, text, released
        released = releasable(text, c.stop_bytes)
    raise AssertionError("never stopped")


def test_eos_stops_and_is_not_returned():
    c = SamplingParams(max_tokens=10)
    status, text, _ = feed(c, [b"Hi", b" there", b"<eos>"], eos_at=2)
    assert status == (True, "stop", 2, len(b"Hi there"))
    stop, reason = status[:2]  # TGI's (stop, finish_reason) pair comes first
    assert (stop, reason) == (True, "stop")


def test_max_tokens_stops_with_length():
    status, _, _ = feed(SamplingParams(max_tokens=3), [b"a", b"b", b"c", b"d"])
    assert status == (True, "length", 3, 3)
    assert check(SamplingParams(max_tokens=3), b"ab", [1, 2], eos=False).stop is False


def test_stop_sequence_across_tokens_is_cut_from_the_text():
    c = SamplingParams(max_tokens=50, stop=("\n\n",))
    status, text, released = feed(c, [b"Hello", b" wor", b"ld\n", b"\nQ", b"more"])
    assert status.finish_reason == "stop"
    assert text[:status.keep_bytes] == b"Hello world"
    assert status.keep_tokens == 3  # "ld\n" starts before the cut, "\nQ" does not
    assert released <= status.keep_bytes  # a stream never sent any of the stop text


def test_multi_token_stop_text_with_the_real_tokenizer():
    # metaseq #642: "Question:" stopped at the token "Question"; "\n\n" never stopped.
    tok = Tokenizer(locate_assets(assets_dir=ASSETS))
    ids = tok.encode("Yes, it is.\n\nQuestion: why")
    c = SamplingParams(max_tokens=50, stop=("Question:", "\n\n"))
    status, text, _ = feed(c, [tok.token_bytes(i) for i in ids])
    assert text[:status.keep_bytes].decode() == "Yes, it is."
    c = SamplingParams(max_tokens=50, stop=("Question:",))
    status, text, _ = feed(c, [tok.token_bytes(i) for i in ids])
    assert text[:status.keep_bytes].decode() == "Yes, it is.\n\n"


def test_min_tokens_ignores_stops_inside_the_first_tokens():
    c = SamplingParams(max_tokens=10, stop=("\n",), min_tokens=2)
    status, text, _ = feed(c, [b"\n", b"a", b"b\n", b"c"])
    assert text[:status.keep_bytes] == b"\nab" and status.keep_tokens == 3
    # A stop that begins in the first min_tokens tokens does not count either.
    c = SamplingParams(max_tokens=10, stop=("xy",), min_tokens=1)
    status, text, _ = feed(c, [b"x", b"y", b"zxy", b"q"])
    assert text[:status.keep_bytes] == b"xyz"


def test_earliest_ending_stop_wins():
    assert find_stop(b"abcd", [b"abcd", b"bc"], new_from=0) == 1
    assert find_stop(b"abcd", [b"cd", b"bcd"], new_from=0) == 1  # same end: longest
    assert find_stop(b"xxab", [b"ab"], new_from=3) == 2
    assert find_stop(b"abxx", [b"ab"], new_from=3) is None  # completed earlier: seen then


def test_releasable_holds_back_stop_prefixes_and_split_characters():
    assert releasable(b"hello wor", [b"world!"]) == len(b"hello ")
    assert releasable(b"hello", [b"\n\n"]) == 5
    assert releasable(b"ok\n", [b"\n\n"]) == 2
    emoji = "😀".encode()
    assert releasable(b"a" + emoji[:2], []) == 1
    assert releasable(b"a" + emoji, []) == 5


ALPHABET = st.sampled_from(["a", "b", "\n", "é", "😀", " "])


def reference_cut(text: bytes, stops, min_floor=0):
    """The first byte position where a stop sequence ends; the earliest start among those."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops
                  if end >= len(s) and end - len(s) >= min_floor and text[end - len(s):end] == s]
        if starts:
            return min(starts)
    return None


@settings(max_examples=300, deadline=None)
@given(chars=st.lists(ALPHABET, min_size=1, max_size=30),
       stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=3).filter(bool),
                      min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 200), max_size=12))
def test_stops_match_at_any_token_split(chars, stops, cuts):
    text = "".join(chars).encode()
    bounds = sorted({c % len(text) for c in cuts} - {0}) + [len(text)]
    pieces = [text[a:b] for a, b in zip([0] + bounds, bounds)]
    c = SamplingParams(max_tokens=len(pieces), stop=tuple(stops))
    status, seen, released = feed(c, pieces)
    expected = reference_cut(text, c.stop_bytes)
    if expected is None:
        assert status.finish_reason == "length" and status.keep_bytes == len(text)
    else:
        assert status.finish_reason == "stop" and status.keep_bytes == expected
        # The kept tokens are exactly those that start before the cut.
        starts = [len(b"".join(pieces[:i])) for i in range(len(pieces))]
        assert status.keep_tokens == sum(1 for s in starts if s < expected)
    assert released <= status.keep_bytes
    seen[:released].decode("utf-8")  # a stream only ever sent whole characters


def test_stop_bytes_encode_and_deduplicate():
    c = SamplingParams(max_tokens=5, stop=("\n", "\n", "é"), min_tokens=1)
    assert c.stop_bytes == (b"\n", "é".encode())


@pytest.mark.parametrize("pieces", [[b"ab"], [b"a", b"b"]])
def test_a_stop_at_the_very_start_leaves_empty_text(pieces):
    status, _, _ = feed(SamplingParams(max_tokens=5, stop=("ab",)), pieces)
    assert status == (True, "stop", 0, 0)
