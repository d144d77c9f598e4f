"""Incremental detokenization with stop sequences, for one request. Pure Python, no torch.

The text so far always equals `decode(all generated ids)`, so whatever the tokenizer does across
token boundaries (byte-level merges, SentencePiece leading spaces) the streamed pieces add up to
the same text as decoding once at the end. Each step emits only the part of that text that can
no longer change or be cut:

- a trailing U+FFFD is held back: it is usually a multi-byte character whose other bytes are in
  tokens not yet generated;
- a suffix that could be the start of a stop sequence is held back until the next tokens show
  whether the stop sequence completes (then the text is cut before it) or not (then it is sent).

Decoding is windowed, so a step costs the same at token 2,000 as at token 20: the text of the
tokens before `_read` is settled and kept; each step decodes only the tokens from `_prefix` (the
previous window's start, kept as left context so that leading-space and merge rules see a
neighbour) to the end, and takes the part past the context's own text. When the window's text
does not begin with the context's text the tokenizer did something non-local across the boundary,
and that step decodes everything instead; if even the settled text changed, the stream stops
windowing for good.
"""

from __future__ import annotations

from collections.abc import Callable

_INCOMPLETE = "\ufffd"


class TextStream:
    """Turns one request's growing list of generated ids into text deltas."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop_sequences: tuple[str, ...] = (),
        *,
        min_new_tokens: int = 0,
        windowed: bool = True,
    ) -> None:
        self._decode = decode
        self._stops = stop_sequences
        self._min_new_tokens = min_new_tokens
        # Stop sequences completed inside the first min_new_tokens tokens do not count: a match
        # must end past the text those tokens made.
        self._min_text_len = 0
        self.text = ""  # everything emitted so far; the request's output text when it ends
        self._windowed = windowed
        self._settled = ""  # decode(ids[:_read]), no longer changed by later tokens
        self._prefix = 0  # left context of the window starts here
        self._read = 0  # the window's new tokens start here
        self._context = ""  # decode(ids[_prefix:_read]) on its own

    def push(self, token_ids: list[int], *, final: bool) -> tuple[str, bool]:
        """Take all generated ids so far (one more than last time); return the text to emit now
        and whether a stop sequence ended the output. With `final`, nothing is held back."""
        decoded = self._decoded(token_ids, final)
        stable = decoded if final else decoded.rstrip(_INCOMPLETE)
        start = len(self.text)

        if len(token_ids) <= self._min_new_tokens:
            self._min_text_len = len(stable)
        elif self._stops:
            cut = self._find_stop(stable, start)
            if cut is not None:
                return self._emit(stable[start:cut]), True

        end = len(stable) if final else len(stable) - self._held_back(stable, start)
        return self._emit(stable[start:end]), False

    def _decoded(self, token_ids: list[int], final: bool) -> str:
        """decode(token_ids), decoding only the window when the tokenizer allows it."""
        if not self._windowed:
            return self._decode(token_ids)
        window = self._decode(token_ids[self._prefix:])
        if window.startswith(self._context):
            decoded = self._settled + window[len(self._context):]
        elif window.endswith(_INCOMPLETE) and not final:
            # A byte-fallback decoder (SentencePiece) turns a run of byte tokens that does not
            # yet make whole characters into one U+FFFD per byte, the context's bytes included:
            # wait for the run to complete.
            return self._settled + _INCOMPLETE
        else:
            decoded = self._decode(token_ids)
            if not decoded.startswith(self._settled):
                self._windowed = False
                return decoded
        if len(decoded) > len(self._settled) and not decoded.endswith(_INCOMPLETE):
            # Every byte of the new tokens made whole characters: their text is settled.
            self._settled = decoded
            self._prefix, self._read = self._read, len(token_ids)
            self._context = self._decode(token_ids[self._prefix:self._read])
        return decoded

    def _emit(self, delta: str) -> str:
        self.text += delta
        return delta

    def _find_stop(self, text: str, start: int) -> int | None:
        """Where the earliest stop sequence begins, among matches that start in the unsent text
        and end past the min_new_tokens text."""
        hits = []
        for stop in self._stops:
            at = text.find(stop, max(start, self._min_text_len - len(stop) + 1))
            if at >= 0:
                hits.append(at)
        return min(hits, default=None)

    def _held_back(self, text: str, start: int) -> int:
        """Length of the longest unsent suffix of `text` that a stop sequence starts with (and
        does not end with: a complete one would have been found)."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text) - start), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
