"""Incremental detokenisation with stop strings: what one choice may emit so far.

Decoding token by token breaks multi-byte characters (byte-level BPE splits
'日' into three tokens) and a stop string may arrive split across tokens. The
:class:`TextTracker` decodes the whole completion each step and emits only text
that can no longer change: it holds back a trailing incomplete character and
the longest tail that could still grow into a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["TextTracker"]

_REPLACEMENT = "\ufffd"


class TextTracker:
    """Track one choice's generated tokens and the text already emitted.

    Args:
        decode: Token ids to text (special tokens skipped).
        stop: Stop strings; the output ends before the first one and never contains it.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self.token_ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already emitted
        self.text = ""

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return ``(new text to emit, hit a stop string)``."""
        self.token_ids.append(token_id)
        self.text = self._decode(self.token_ids)
        if self._stop:
            start = max(0, self.emitted - self._max_stop + 1)
            hits = [p for p in (self.text.find(s, start) for s in self._stop) if p >= 0]
            if hits:
                end = max(min(hits), self.emitted)
                return self._emit(end), True
        end = len(self.text)
        while end > self.emitted and self.text[end - 1] == _REPLACEMENT:
            end -= 1  # an incomplete UTF-8 sequence; the next token may complete it
        end -= self._stop_prefix_len(end)
        return self._emit(end), False

    def finish(self) -> str:
        """Flush what was held back (at end of sequence or length limit), less a cut-off character."""
        end = len(self.text)
        while end > self.emitted and self.text[end - 1] == _REPLACEMENT:
            end -= 1
        return self._emit(end)

    def _stop_prefix_len(self, end: int) -> int:
        # Longest k such that text[end-k:end] is a proper prefix of a stop string.
        for k in range(min(self._max_stop - 1, end - self.emitted), 0, -1):
            tail = self.text[end - k:end]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
