"""When a sequence stops, and what of it is returned: pure functions, like early TGI's
StoppingCriteria.

Stop sequences match on the generated text at the byte level, across token boundaries
(metaseq #642 matched only a stop string's first token), and are cut from the returned text.
A match only counts where at least ``min_tokens`` tokens precede it. EOS ends a sequence
without being returned; ``max_tokens`` ends it with finish_reason "length".
"""

from __future__ import annotations

import bisect
from typing import NamedTuple, Sequence

from opt_serving.protocol import SamplingParams


class StopStatus(NamedTuple):
    stop: bool
    finish_reason: str | None  # "stop" (EOS or a stop sequence), "length", None while running
    keep_tokens: int  # generated tokens to return (EOS never is)
    keep_bytes: int  # bytes of the generated text to return


def find_stop(text: bytes | bytearray, stops: Sequence[bytes], new_from: int, floor: int = 0) -> int | None:
    """Start of the first stop sequence completed by the bytes from ``new_from`` on and
    starting at or after ``floor``: the earliest end wins, then the earliest start, so the
    answer does not depend on how the text was split into tokens."""
    found: tuple[int, int] | None = None  # (end, start)
    for s in stops:
        start = text.find(s, max(floor, new_from - len(s) + 1))
        if start >= 0 and (found is None or (start + len(s), start) < found):
            found = (start + len(s), start)
    return None if found is None else found[1]


def check(c: SamplingParams, text: bytes | bytearray, ends: Sequence[int],
          eos: bool) -> StopStatus:
    """Call after every generated token; ``c`` gives max_tokens, min_tokens and the stops.

    ``text``: bytes of the generated tokens so far, EOS excluded; ``ends[i]``: where token i
    ends in ``text`` (the newest last); ``eos``: the newest token was EOS (not in ``text``).
    """
    n = len(ends)
    if eos:
        return StopStatus(True, "stop", n, len(text))
    if c.stop and n >= c.min_tokens:
        stops = c.stop_bytes
        floor = ends[c.min_tokens - 1] if c.min_tokens > 0 else 0
        new_from = ends[-2] if n > 1 else 0
        cut = find_stop(text, stops, new_from, floor)
        if cut is not None:
            # Keep the tokens that start before the cut (token i > 0 starts at ends[i - 1]).
            keep = int(cut > 0) + bisect.bisect_left(ends, cut)
            return StopStatus(True, "stop", keep, cut)
    if n >= c.max_tokens:
        return StopStatus(True, "length", n, len(text))
    return StopStatus(False, None, n, len(text))


def _utf8_boundary(data: bytes, n: int) -> int:
    """The largest m <= n such that data[:m] does not end inside a UTF-8 character."""
    for back in range(1, min(4, n) + 1):
        lead = data[n - back]
        if lead & 0xC0 == 0x80:  # continuation byte: keep looking for the lead
            continue
        width = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else \
            4 if lead >> 3 == 0b11110 else 1
        return n - back if width > back else n
    return n


def releasable(text: bytes | bytearray, stops: Sequence[bytes]) -> int:
    """How many bytes of a running sequence's text a stream may send: everything but a tail
    that could still become a stop sequence or that ends inside a character."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return _utf8_boundary(text, len(text) - hold)
