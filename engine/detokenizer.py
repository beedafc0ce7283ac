"""Incremental detokenization with stop strings, safe for characters split over tokens.

Torch-free. Contract: for any id sequence appended in any grouping, the concatenation of every
`DetokStep.text` returned by `append` plus `flush()` equals

    truncate(tokenizer.decode(all_ids, skip_special_tokens), stop)

where `truncate` cuts the text at the stop-string occurrence that ends first (ties: the one that
starts first), excluding the stop string. No U+FFFD is emitted for a character whose bytes have
not all arrived: it is held back until the next token completes it (or until `flush`).

How (the prefix/read-offset window of vLLM):

    ids:   ... | prefix window  | pending tokens |
               ^prefix_offset   ^read_offset     ^len(ids)

`prefix_text` = decode(ids[prefix_offset:read_offset]) is cached; a step decodes the window
ids[prefix_offset:] and emits what goes past `prefix_text`; when that text ends with U+FFFD (an
incomplete character) it reads only up to the last of the final SPLIT_SEARCH token boundaries
where the text ends cleanly, and holds the rest. After emitting, the window slides: prefix = the
tokens just read (kept as is when they added no text, e.g. skipped special tokens). The prefix
gives the decoder context, e.g. SentencePiece's leading space that a decoder strips at the start
of a text.

Complexity: one `append` decodes the window (prefix + pending tokens) at most 2 + SPLIT_SEARCH
times. For well-formed UTF-8 at most 3 tokens stay pending, so the window is
O(len(previous group) + len(token_ids) + 3) and a whole sequence costs O(n) decode work. Only
invalid bytes (no clean boundary near the end) let the window grow, up to MAX_PENDING_TOKENS
pending tokens; then the text is emitted as decoded (U+FFFD included), and only such malformed
UTF-8 can differ from the full decode. Likewise with byte fallback (<0xXX> tokens), a run of
byte tokens that is not valid UTF-8 decodes to one U+FFFD per token, valid bytes included; our
stream may keep such a valid byte. Well-formed output is always exact.

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
    some stop string, so a stop occurrence always lies within held + new text."""

    __slots__ = ("_stops", "_held", "stopped")

    def __init__(self, stop: Sequence[str]) -> None:
        self._stops = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Returns the text now safe to emit; sets `stopped` at the first stop string."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        cut = self._first_stop(buf)
        if cut is not None:
            self.stopped, self._held = True, ""
            return buf[:cut]
        keep = self._stop_prefix_len(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """No more text will come: the held text is ordinary text."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held

    def _first_stop(self, buf: str) -> int | None:
        """Start of the occurrence that ends first (ties: starts first), or None."""
        found = [(i + len(s), i) for s in self._stops if (i := buf.find(s)) >= 0]
        return min(found)[1] if found else None

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas (see the module contract).

    Not thread-safe: one instance per sequence, fed in order."""

    __slots__ = ("_tokenizer", "_skip_special", "_ids", "_prefix_offset", "_read_offset",
                 "_prefix_text", "_stop")

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = (),
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""
        self._stop = StopMatcher(stop)

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    def append(self, token_ids: Sequence[int]) -> DetokStep:
        """Adds generated ids; returns the text they release and whether a stop string was hit.
        After a stop, further calls return ("", True)."""
        if self._stop.stopped:
            return DetokStep("", True)
        self._ids.extend(token_ids)
        return DetokStep(self._stop.feed(self._read(force=False)), self._stop.stopped)

    def flush(self) -> str:
        """End of the sequence: releases held text (an incomplete character decodes as U+FFFD)."""
        if self._stop.stopped:
            return ""
        text = self._stop.feed(self._read(force=True))
        return text + self._stop.flush()

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
        for end in range(num_ids - 1, max(self._read_offset, num_ids - SPLIT_SEARCH - 1), -1):
            text = self._decode(self._prefix_offset, end)
            if not text.endswith(REPLACEMENT_CHAR):
                return self._advance(end, text)
        if num_ids - self._read_offset >= MAX_PENDING_TOKENS:  # invalid bytes, not a split char
            return self._advance(num_ids, window_text)
        return ""

    def _advance(self, end: int, window_text: str) -> str:
        """Marks ids[:end] read, given window_text = decode(ids[prefix_offset:end])."""
        new_text = window_text[len(self._prefix_text):]
        if new_text:  # slide: the tokens just read become the prefix
            self._prefix_offset = self._read_offset
            self._prefix_text = self._decode(self._prefix_offset, end)
        else:  # e.g. skipped special tokens: keep the visible prefix as context
            self._prefix_text = window_text
        self._read_offset = end
        return new_text
