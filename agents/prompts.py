"""BB3 (gen/opt_bb3) prompt formats, per-module decoding and output cleaning.

The fine-tuned BB3 OPT models learned these exact formats: lines joined by "\\n", "Person 1" the
user and "Person 2" the bot, and a final "<prefix>:" with nothing after it (the model emits the
leading space). Everything here is a pure function of its inputs so that the formats can be
tested against the reference without a model or a server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agents.tokens import TokenCounter
from opt_serving.protocol import completion_body

SDM, MDM, MGM, SGM = "sdm", "mdm", "mgm", "sgm"
CKM, MKM, SKM, SRM, ORM = "ckm", "mkm", "skm", "srm", "orm"

FINAL_PREFIX = {
    SDM: "Search Decision", MDM: "Memory Decision", MGM: "Memory", SGM: "Query",
    CKM: "Previous Topic", MKM: "Personal Fact", SKM: "Interesting Fact", SRM: "Person 2",
    ORM: "Opening",
}
# A prompt must stay under these GPT-2 token counts (crm, mrm and vrm are the single-knowledge
# response modes; the combined mode used here sends one srm call).
TOKEN_LIMIT = {
    SDM: 1912, MDM: 1912, SGM: 1912, MGM: 1912, "vrm": 1912, CKM: 1812, MKM: 1412, SKM: 1412,
    ORM: 1412, SRM: 1784, "crm": 1880, "mrm": 1848,
}
MAX_SEARCH_DOCS = 5
DEFAULT_CHUNK_WORDS = 100  # --knowledge-chunk-size: words of each document shown to skm

KNOWLEDGE_PREFIX = {"previous_topic": "Previous Topic", "personal_fact": "Personal Fact",
                    "interesting_fact": "Interesting Fact"}


@dataclass(frozen=True)
class Decoding:
    """The decoding fields of one completions request (ParlAI's BB3 client sends all of them)."""

    # The defaults are ParlAI's own literals, types included: its bodies carry 0 and -1 as
    # JSON integers and -1.0 / 1.0 as floats, and ours are the same bytes.
    min_tokens: int
    max_tokens: int
    top_p: float = -1.0  # <= 0: greedy
    lambda_decay: float = -1  # factual nucleus off
    omega_bound: float = 0.3
    temperature: float = 1.0
    alpha_presence: float = 0
    alpha_frequency: float = 0
    alpha_presence_src: float = 0
    alpha_frequency_src: float = 0

    def payload(self, prompt: str, src_penalty_end_idx: int = -1) -> dict:
        return completion_body(
            prompt, min_tokens=self.min_tokens, max_tokens=self.max_tokens, best_of=1,
            top_p=self.top_p, stop="\n", temperature=self.temperature, echo=False,
            lambda_decay=self.lambda_decay, omega_bound=self.omega_bound,
            alpha_presence=self.alpha_presence, alpha_frequency=self.alpha_frequency,
            alpha_presence_src=self.alpha_presence_src,
            alpha_frequency_src=self.alpha_frequency_src,
            alpha_src_penalty_end_idx=src_penalty_end_idx)


def _greedy(max_tokens: int, penalty: float = 0) -> Decoding:
    return Decoding(1, max_tokens, alpha_presence=penalty, alpha_frequency=penalty)


def _factual_nucleus(min_tokens: int, penalty: float = 0) -> Decoding:
    return Decoding(min_tokens, 128, top_p=0.9, lambda_decay=0.9, omega_bound=0.3,
                    alpha_presence=penalty, alpha_frequency=penalty,
                    alpha_presence_src=penalty, alpha_frequency_src=penalty)


DECODING = {
    SDM: _greedy(10), MDM: _greedy(10), SGM: _greedy(32), MGM: _greedy(32),
    CKM: _greedy(32, 0.5), MKM: _greedy(32, 0.5), SKM: _greedy(64, 0.5),
    SRM: _factual_nucleus(20, 0.5), ORM: _factual_nucleus(1),
}


@dataclass(frozen=True)
class Prompt:
    module: str
    text: str
    # Response only: the prompt token index just before the knowledge lines. The server counts
    # the _src penalties on tokens before it, so copying a knowledge fact is not penalised.
    src_penalty_end_idx: int = -1

    def payload(self) -> dict:
        return DECODING[self.module].payload(self.text, self.src_penalty_end_idx)


@dataclass(frozen=True)
class Budget:
    """How prompts are measured and how long they may be (--max-prompt-len caps every limit)."""

    count_tokens: TokenCounter
    max_prompt_len: int | None = None
    # For token positions the server acts on: a count never above the server's own (None:
    # count_tokens is the server's BPE, exact).
    count_floor: TokenCounter | None = None
    # The server's token ids of a text (None when only an estimate is at hand).
    encode: Callable[[str], "tuple[int, ...] | None"] | None = None

    def limit(self, module: str) -> int:
        limit = TOKEN_LIMIT[module]
        return min(limit, self.max_prompt_len) if self.max_prompt_len else limit


def user_line(text: str) -> str:
    return f"Person 1: {text}"


def bot_line(text: str) -> str:
    return f"Person 2: {text}"


def _render(module: str, before: Sequence[str], history: Sequence[str],
            after: Sequence[str]) -> str:
    return "\n".join([*before, *history, *after, f"{FINAL_PREFIX[module]}:"])


def _fit(module: str, budget: Budget, before: Sequence[str], history: Sequence[str],
         after: Sequence[str] = ()) -> tuple[list[str], list[str], list[str]]:
    """Cut lines until the prompt is under the module's limit.

    The conversation is cut from its oldest line (the last user line always stays), then the
    knowledge lines are dropped from the earliest. If even that does not fit, the server's own
    left truncation takes over.
    """
    before, history, after = list(before), list(history), list(after)
    limit, count = budget.limit(module), budget.count_tokens

    def drop() -> str | None:
        if len(history) > 1:
            return history.pop(0)
        if before or after:
            return (before or after).pop(0)
        return None

    # "\n" is a token of its own between lines, so the sum of the lines' counts (one per line,
    # cached by the tokenizer) finds the cut without re-encoding the whole prompt per line; one
    # real count then confirms it (lines that start or end with spaces can merge differently).
    total = sum(count(line) + 1 for line in (*before, *history, *after))
    total += count(f"{FINAL_PREFIX[module]}:")
    while total >= limit and (line := drop()) is not None:
        total -= count(line) + 1
    while count(_render(module, before, history, after)) >= limit and drop() is not None:
        pass
    return before, history, after


def _prompt(module: str, budget: Budget, before: Sequence[str], history: Sequence[str],
            after: Sequence[str] = ()) -> Prompt:
    before, history, after = _fit(module, budget, before, history, after)
    return Prompt(module, _render(module, before, history, after))


def search_decision_prompt(history: Sequence[str], budget: Budget) -> Prompt:
    return _prompt(SDM, budget, (), history[-1:])


def memory_decision_prompt(history: Sequence[str], self_memories: Sequence[str],
                           partner_memories: Sequence[str], budget: Budget) -> Prompt:
    facts = [f"Personal Fact: {' '.join(group)}" for group in (self_memories, partner_memories)
             if group]
    return _prompt(MDM, budget, facts, history[-1:])


def memory_generation_prompt(text: str, budget: Budget) -> Prompt:
    # The bot's own reply is summarised as if Person 1 had said it: the module only knows
    # that shape (the caller rewrites the result to Person 2).
    return _prompt(MGM, budget, (), [user_line(text)])


def search_query_prompt(history: Sequence[str], budget: Budget) -> Prompt:
    return _prompt(SGM, budget, (), history)


def contextual_knowledge_prompt(history: Sequence[str], budget: Budget) -> Prompt:
    return _prompt(CKM, budget, (), history)


def memory_knowledge_prompt(history: Sequence[str], memories: Sequence[str],
                            budget: Budget) -> Prompt:
    return _prompt(MKM, budget, memories, history)


def first_words(content: str, n: int) -> str:
    """The first n words of a document; its newline-separated sentences joined by spaces."""
    return " ".join(content.split()[:n])


def document_line(title: str, content: str, chunk_words: int = DEFAULT_CHUNK_WORDS) -> str:
    return f"External Knowledge: {title} | {first_words(content, chunk_words)}"


def search_knowledge_prompt(history: Sequence[str], documents: Sequence[tuple[str, str]],
                            budget: Budget, chunk_words: int = DEFAULT_CHUNK_WORDS) -> Prompt:
    """`documents`: (title, content) pairs, best first; at most five are shown."""
    lines = [document_line(t, c, chunk_words) for t, c in documents[:MAX_SEARCH_DOCS]]
    return _prompt(SKM, budget, lines, history)


def knowledge_lines(knowledge: dict[str, str | None]) -> list[str]:
    """Previous Topic, Personal Fact, Interesting Fact: those present, in that order."""
    return [f"{prefix}: {knowledge[key]}" for key, prefix in KNOWLEDGE_PREFIX.items()
            if knowledge.get(key)]


# ParlAI answers with the search-dialogue agent whatever the knowledge ("combined"
# conditioning), so the context penalty stops where that agent's own prefix starts.
PENALTY_END_PREFIX = "Interesting Fact:"


def parlai_end_idx(ids: Sequence[int], prefix: Sequence[int]) -> int:
    """ParlAI's ``_get_alpha_src_penalty_end_idx`` (opt_api_agent.py), quirks included: the
    start of the last occurrence of ``prefix`` in ``ids`` that ends at least ``len(prefix)``
    tokens before the end, else -1."""
    n = len(prefix)
    for i in reversed(range(len(ids) - n)):
        if i < n:
            break
        if list(ids[i - n:i]) == list(prefix):
            return i - n
    return -1


def response_prompt(history: Sequence[str], knowledge: dict[str, str | None],
                    budget: Budget) -> Prompt:
    _, history, after = _fit(SRM, budget, (), history, knowledge_lines(knowledge))
    text = _render(SRM, (), history, after)
    return Prompt(SRM, text, _penalty_end(text, budget))


def _penalty_end(text: str, budget: Budget) -> int:
    """alpha_src_penalty_end_idx as ParlAI computes it, in the server's tokens of the prompt
    (without the leading </s>: opt_serving.decoding.sampling.source_tokens)."""
    ids = budget.encode(text) if budget.encode else None
    prefix = budget.encode(PENALTY_END_PREFIX) if ids is not None else None
    if ids is not None and prefix is not None:
        return parlai_end_idx(ids, prefix)
    # Only an estimate: the prefix starts a line, and BPE never merges across the "\n" before
    # it, so the tokens before it are those of the text before it, counted from below.
    start = text.rfind("\n" + PENALTY_END_PREFIX)
    if start < 0:
        return -1
    return (budget.count_floor or budget.count_tokens)(text[:start + 1])


def opening_prompt(partner_memories: Sequence[str], budget: Budget) -> Prompt:
    return _prompt(ORM, budget, partner_memories, ())


def clean_output(text: str) -> str:
    """ParlAI's cleaning of a module output.

    Strip newlines; if one remains inside, keep the first line and, of that, the part after its
    last colon (the model started a new "Speaker: ..." line); strip spaces.
    """
    cleaned = text.strip("\n")
    if "\n" in cleaned:
        cleaned = cleaned.split("\n")[0].split(":")[-1]
    return cleaned.strip()


def wants_search(decision: str) -> bool:
    # Anything else, chit-chat included (ParlAI #4858), means no search.
    return decision.strip().lower().startswith("search")


def wants_memory(decision: str) -> bool:
    return decision.strip().lower().startswith("access memory")
