"""Incremental detokenization with stop strings, safe for characters split over tokens.

Torch-free. Contract: for any generated id sequence appended in any grouping, the concatenation
of every `DetokStep.text` returned by `append` plus `flush()` equals

    truncate(decode(tail + generated)[len(decode(tail)):], stop)

where `decode` is `tokenizer.decode(ids, skip_special_tokens)`, `tail` is the prompt's last
PROMPT_CONTEXT ids (up to SPLIT_SEARCH - 1 more when those start inside a character; no ids
without a prompt, which makes this truncate(decode(generated), stop)), and `truncate` cuts the
text at the stop-string occurrence that ends first (ties: the one that starts first), excluding
the stop string (with include_stop_str_in_output the text ends with it). That is the text the
generated ids add after the prompt, including the first word's leading space that
SentencePiece/Metaspace decoders strip at the start of a text (decoding the generated ids alone
loses it). Prompt text is never emitted. No U+FFFD is emitted for a
character whose bytes have not all arrived: it is held back until the next token completes it
(or until `flush`).

One exception: when the prompt ends inside a character (decode(tail) ends with U+FFFD) and
the generated ids complete it (decode(tail + generated) no longer starts with decode(tail)), the
character is emitted whole: the text is taken past decode(tail[:k]) instead, tail[:k] being the
tail up to its last complete character (at most SPLIT_SEARCH - 1 ids before its end).
`prompt_window` picks tail and k.

How (the prefix/read-offset window of vLLM):

    ids:   ... | prefix window  | pending tokens |
               ^prefix_offset   ^read_offset     ^len(ids)

`prefix_text` = decode(ids[prefix_offset:read_offset]) is cached; a step decodes the window
ids[prefix_offset:] and emits what goes past `prefix_text`; when that text ends with U+FFFD (an
incomplete character) it reads only up to the last of the final SPLIT_SEARCH token boundaries
where the text ends cleanly, and holds the rest. After emitting, the window slides: prefix = the
tokens just read (kept as is when they added no text, e.g. skipped special tokens). The prefix
gives the decoder context, e.g. SentencePiece's leading space that a decoder strips at the start
of a text. A prompt primes the window: ids starts as its tail, prefix = tail[:k], pending =
tail[k:] (like vLLM's prefix_offset = len(prompt) - 5, read_offset = len(prompt)); the rest of
the prompt is never held.

Complexity: one `append` decodes the window (prefix + pending tokens) at most 2 + SPLIT_SEARCH
times. For well-formed UTF-8 at most 3 tokens stay pending, so the window is
O(len(previous group) + len(token_ids) + PROMPT_CONTEXT + SPLIT_SEARCH) and a whole sequence
costs O(n) decode work; priming costs O(1) (see `prompt_window`). Only invalid bytes (no clean
boundary near the end) let the window grow, up to MAX_PENDING_TOKENS pending tokens; then the
text is emitted as decoded (U+FFFD included), and only such malformed UTF-8 can differ from the
contract: in the generated ids, or at both ends of the prompt's tail (then no window of it starts
and ends at a character and the tail is read as it decodes). Likewise with byte fallback
(<0xXX> tokens), a run of byte tokens that is not valid UTF-8 decodes to one U+FFFD per token,
valid bytes included; our stream may keep such a valid byte. Well-formed output is always exact.

The stop-string search costs O((len(new text) + L) * L) per stop string of length L and step
(the held-back text is shorter than L).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

REPLACEMENT_CHAR = "\ufffd"
# A character split over tokens starts within the last SPLIT_SEARCH tokens (UTF-8: <= 4 bytes).
SPLIT_SEARCH = 4
# Pending tokens with no clean boundary after which the text (invalid bytes) is emitted anyway.
MAX_PENDING_TOKENS = 16
# Prompt tokens that prime the window (vLLM's initial offset): context for the first word.
PROMPT_CONTEXT = 5


class Decoder(Protocol):
    """What the detokenizer needs from a tokenizer (engine.tokenizer.Tokenizer fits)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class DetokStep(NamedTuple):
    """The text released by one `append`, and whether a stop string was reached."""

    text: str
    stopped: bool


class StopMatcher:
    """Releases text that cannot be part of a stop string; holds back a possible stop prefix.

    Invariant: the held text is the longest suffix of all text seen that is a proper prefix of
    some stop string, so a stop occurrence always lies within held + new text. The text released
    at a stop ends before the stop string, or with it when include_stop (vLLM's
    include_stop_str_in_output)."""

    __slots__ = ("_stops", "_include_stop", "_held", "stopped")

    def __init__(self, stop: Sequence[str], include_stop: bool = False) -> None:
        self._stops = tuple(s for s in stop if s)
        self._include_stop = include_stop
        self._held = ""
        self.stopped = False

    def feed(self, text: str, match: bool = True) -> str:
        """Returns the text now safe to emit; sets `stopped` at the first stop string. With
        match=False (min_tokens not reached yet) stop strings are not looked for: the held
        text and `text` are released, and matching starts with the next text fed."""
        if self.stopped:
            return ""
        if not match:
            held, self._held = self._held, ""
            return held + text
        if not self._stops:
            return text
        buf = self._held + text
        found = self._first_stop(buf)
        if found is not None:
            self.stopped, self._held = True, ""
            return buf[:found[0] if self._include_stop else found[1]]
        keep = self._stop_prefix_len(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """No more text will come: the held text is ordinary text."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held

    def _first_stop(self, buf: str) -> tuple[int, int] | None:
        """(end, start) of the occurrence that ends first (ties: starts first), or None."""
        found = [(i + len(s), i) for s in self._stops if (i := buf.find(s)) >= 0]
        return min(found) if found else None

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest


def prompt_window(tokenizer: Decoder, prompt: Sequence[int],
                  skip_special_tokens: bool = True) -> tuple[list[int], int]:
    """(tail, k): the prompt's last ids that prime a detokenizer, and how many of them are read.

    tail = prompt[first:] with first = len(prompt) - PROMPT_CONTEXT, or up to SPLIT_SEARCH - 1
    less; k = len(tail), or up to SPLIT_SEARCH - 1 less (the bytes of an unfinished character);
    the first (end, then first, each from the largest) for which decode(prompt[first:end])
    neither starts nor ends with U+FFFD, i.e. starts and ends at a character boundary (with
    byte fallback, a run of byte tokens cut inside a character decodes to U+FFFD throughout).
    With none (invalid bytes near both ends): (prompt[-PROMPT_CONTEXT:], its length). Decodes
    at most PROMPT_CONTEXT + SPLIT_SEARCH - 1 ids at a time, at most SPLIT_SEARCH ** 2 times
    (once for most prompts)."""
    prompt = list(prompt[-(PROMPT_CONTEXT + SPLIT_SEARCH - 1):])
    num = len(prompt)
    first = max(num - PROMPT_CONTEXT, 0)
    for end in range(num, max(num - SPLIT_SEARCH + 1, 0) - 1, -1):
        for start in range(min(first, end), max(first - SPLIT_SEARCH + 1, 0) - 1, -1):
            text = tokenizer.decode(prompt[start:end], skip_special_tokens=skip_special_tokens)
            if not text.startswith(REPLACEMENT_CHAR) and not text.endswith(REPLACEMENT_CHAR):
                return prompt[start:], end - start
    return prompt[first:], num - first


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas (see the module contract).

    Not thread-safe: one instance per sequence, fed in order."""

    __slots__ = ("_tokenizer", "_skip_special", "_ids", "_prefix_offset", "_read_offset",
                 "_prefix_text", "_prompt_end", "_prompt_text", "_stop")

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = (),
                 skip_special_tokens: bool = True, *,
                 prompt_token_ids: Sequence[int] = (),
                 include_stop_str_in_output: bool = False) -> None:
        """prompt_token_ids: the request's prompt; only its tail is kept (at most
        PROMPT_CONTEXT + SPLIT_SEARCH - 1 ids), as context for decoding the generated ids: only
        text they add after the prompt is emitted (see the module contract).
        skip_special_tokens=False keeps special tokens' text (in the prompt's tail too, as
        context); include_stop_str_in_output: the text ends with the stop string matched."""
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""
        self._prompt_end = 0  # ids[:_prompt_end] are the prompt's tail: never read on their own
        # decode(tail) while prompt tokens are still pending (the prompt ends mid-character)
        self._prompt_text: str | None = None
        self._stop = StopMatcher(stop, include_stop_str_in_output)
        if prompt_token_ids:
            self._prime(prompt_token_ids)

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    def append(self, token_ids: Sequence[int], match_stops: bool = True) -> DetokStep:
        """Adds generated ids; returns the text they release and whether a stop string was hit.
        match_stops=False: stop strings are not looked for in the text these ids release
        (a request's first min_tokens tokens). After a stop, further calls return ("", True)."""
        if self._stop.stopped:
            return DetokStep("", True)
        self._ids.extend(token_ids)
        text = self._stop.feed(self._read(force=False), match_stops)
        return DetokStep(text, self._stop.stopped)

    def flush(self) -> str:
        """End of the sequence: releases held text (an incomplete character decodes as U+FFFD)."""
        if self._stop.stopped:
            return ""
        text = self._stop.feed(self._read(force=True))
        return text + self._stop.flush()

    def _prime(self, prompt: Sequence[int]) -> None:
        """Starts the window as the prompt's tail, read up to its last complete character."""
        self._ids, self._read_offset = prompt_window(self._tokenizer, prompt, self._skip_special)
        self._prompt_end = len(self._ids)
        self._prefix_text = self._decode(0, self._read_offset)
        if self._read_offset < len(self._ids):  # the prompt ends inside a character
            self._prompt_text = self._decode(0)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def _read(self, force: bool) -> str:
        """Text of the pending tokens up to the last complete character; "" if none."""
        num_ids = len(self._ids)
        if self._read_offset == num_ids:
            return ""
        window_text = self._decode(self._prefix_offset)
        if force or not window_text.endswith(REPLACEMENT_CHAR):
            return self._advance(num_ids, window_text)
        # incomplete character: read up to the last clean token boundary among the last few
        lowest = max(self._read_offset, self._prompt_end, num_ids - SPLIT_SEARCH - 1)
        for end in range(num_ids - 1, lowest, -1):
            text = self._decode(self._prefix_offset, end)
            if not text.endswith(REPLACEMENT_CHAR):
                return self._advance(end, text)
        if num_ids - self._read_offset >= MAX_PENDING_TOKENS:  # invalid bytes, not a split char
            return self._advance(num_ids, window_text)
        return ""

    def _advance(self, end: int, window_text: str) -> str:
        """Marks ids[:end] read, given window_text = decode(ids[prefix_offset:end])."""
        prompt_text, self._prompt_text = self._prompt_text, None
        if prompt_text is not None and window_text.startswith(prompt_text):
            new_text = window_text[len(prompt_text):]  # the prompt's U+FFFD stayed one
        else:
            new_text = window_text[len(self._prefix_text):]
        if new_text:  # slide: the tokens just read become the prefix
            self._prefix_offset = self._read_offset
            self._prefix_text = self._decode(self._prefix_offset, end)
        else:  # e.g. skipped special tokens: keep the visible prefix as context
            self._prefix_text = window_text
        self._read_offset = end
        return new_text
