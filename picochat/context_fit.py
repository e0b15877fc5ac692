"""Fitting a chat conversation into the model's context, in time linear in its length.

The rule (Engine.fit_conversation) is: while the prompt is too long, drop the oldest user/assistant exchange; a
leading system message stays. Re-rendering the conversation after each drop made that quadratic (issue 20: 499
messages cost 0.65 s of CPU). Here every turn is tokenized once, the prompt length after k drops is a sum of
per-turn lengths (suffix sums), and the kept messages are rendered once at the end. The result is exactly the
re-rendering algorithm's (tests/test_conversation_fit.py keeps that algorithm as the specification).

The one turn whose tokens change when exchanges are dropped is the first: the system message is merged into the
first user message that remains (system + "\\n\\n" + user, tokenizer.SYSTEM_JOINER), and BPE tokens are not
additive across the join (".\\n\\n" can be one chunk of the split pattern). So the system message is cut once at the
last place where the split pattern always ends a chunk (forced_chunk_end); the tokens before the cut are counted
once, and each candidate first message re-encodes only the system message's short tail, the joiner and that user
message. Each user message is a candidate at most once, so the total stays linear; only a system message that
ends in a long run without any letter/digit boundary (e.g. thousands of spaces or emoji) makes each candidate
re-encode that run, and candidates that cannot fit by a lower bound are skipped without encoding anything.
"""

from __future__ import annotations

import unicodedata
from itertools import accumulate

from picochat.tokenizer import SYSTEM_JOINER, Tokenizer

FIXED_TOKENS = 2  # <|bos|> before the turns, <|assistant_start|> after them
TURN_MARKERS = 2  # <|user_start|> and <|user_end|> around a user turn's text


def forced_chunk_end(before: str, after: str) -> bool:
    """Whether the tokenizer's split pattern (tokenizer.SPLIT_PATTERN) always ends a chunk between the characters
    `before` and `after`, so that the tokens of the text up to `before` are the same whatever comes after.

    True when `before` is a letter and `after` is not, or `before` is a digit and `after` is not: the only
    alternatives of the pattern that can hold a letter (the contractions, letters with one optional leading
    non-letter) end with the run of letters, and the only one that holds a digit (1-2 digits) ends with the run of
    digits; none looks further ahead. The pattern matches forward only (no look-behind), so the text from `after`
    on is split the same too. Unassigned code points (category Cn) are never a boundary: the tokenizer's Unicode
    tables may be newer than Python's and know them as letters."""
    kind_before, kind_after = unicodedata.category(before), unicodedata.category(after)
    if kind_before == "Cn" or kind_after == "Cn":
        return False
    if kind_before[0] in "LN":
        return kind_after[0] != kind_before[0]
    return False


def last_forced_chunk_end(text: str, following: str) -> int:
    """The largest i such that text[:i] is tokenized the same alone as inside text + following + anything (0 if
    there is none): the end of text itself if forced_chunk_end(its last character, following[0])."""
    for i in range(len(text), 0, -1):
        after = text[i] if i < len(text) else following[0]
        if forced_chunk_end(text[i - 1], after):
            return i
    return 0


def fit_messages(tokenizer: Tokenizer, messages: list[dict], room: int) -> tuple[int, list[int]]:
    """(exchanges dropped from the front, the prompt of what is left) for the fewest drops that make the prompt at
    most `room` tokens. `messages` must prompt for a reply (end with a user message, an optional leading system
    message). If even the last user message alone is too long, that prompt is returned (longer than room): the
    caller says what is wrong. Errors in the conversation are raised as render_for_completion raises them."""
    turns = tokenizer.completion_turns(messages)
    if FIXED_TOKENS + sum(len(turn) for turn in turns) <= room:
        return 0, _prompt(tokenizer, turns)
    lengths = [len(turn) for turn in turns]
    after = [*accumulate(reversed(lengths))][::-1] + [0]  # after[t]: tokens of turns t, t+1, ...
    system = messages[0]["role"] == "system"
    most = (len(turns) - 1) // 2  # the last user message always stays
    if system:
        # turns[0] is system + first user; dropping k exchanges makes system + the user message of turn 2k.
        text = messages[0]["content"]
        cut = last_forced_chunk_end(text, SYSTEM_JOINER)
        head, tail = len(tokenizer.encode(text[:cut])), text[cut:] + SYSTEM_JOINER

    def fits(k: int) -> bool:
        """Whether the prompt is at most room tokens after dropping k exchanges."""
        if not system:
            return FIXED_TOKENS + after[2 * k] <= room
        rest = after[2 * k + 1]
        # The joined first turn has its markers, the head and at least one token for the joiner: if that is
        # already too long, no need to encode it.
        if FIXED_TOKENS + TURN_MARKERS + head + 1 + rest > room:
            return False
        first = TURN_MARKERS + head + len(tokenizer.encode(tail + messages[1 + 2 * k]["content"]))
        return FIXED_TOKENS + first + rest <= room

    drops = next((k for k in range(1, most + 1) if fits(k)), most)
    start = 1 + 2 * drops if system else 2 * drops
    kept = messages[:1] + messages[start:] if system else messages[start:]
    return drops, tokenizer.render_for_completion(kept)


def _prompt(tokenizer: Tokenizer, turns: list[list[int]]) -> list[int]:
    return [tokenizer.bos_token_id, *(token for turn in turns for token in turn),
            tokenizer.special_token_ids["<|assistant_start|>"]]  # fmt: skip
