"""The output guard: personal data and secrets in model responses, per the project's policy.

``redact`` and ``pseudonymize`` entities are replaced by ``<ENTITY_TYPE>`` (the
guard holds no dataset key to draw surrogates from); a ``block`` entity
withholds the rest of the response (``finish_reason: content_filter``). For
streams, text is held back until it can be judged: a tail of the pending text
(cut at whitespace) is kept until more arrives, so an entity split across
chunks is seen whole before any of it leaves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from appliance.policy import Policy, decide, redact_text
from appliance.scanning.findings import REPLACING_ACTIONS
from serving.protocol import Choice, Delta, GenerationResult

#: Pending characters that trigger a scan of a stream.
FLUSH_CHARS = 160
#: Characters always held back (to the last whitespace before them) while the stream goes on.
HOLD_CHARS = 48
#: Characters of already-emitted text given to the scanner as context.
CONTEXT_CHARS = 64


@dataclass
class GuardReport:
    """What the guard did to one response (for the audit log; never the text)."""

    redacted: Counter[str] = field(default_factory=Counter)
    blocked: Counter[str] = field(default_factory=Counter)

    @property
    def refused(self) -> bool:
        return bool(self.blocked)

    def to_dict(self) -> dict[str, Any]:
        return {"redacted": dict(self.redacted), "blocked": dict(self.blocked), "refused": self.refused}


class OutputGuard:
    """Scans responses with the intake scanner and applies a policy to them.

    Args:
        scanner: The shared intake scanner (thread-safe wrapper).
        policy: The project's policy.
    """

    def __init__(self, scanner: Any, policy: Policy) -> None:
        self.scanner = scanner
        self.policy = policy
        self.entities = policy.scanned_entities()
        self.report = GuardReport()

    def _judge(self, text: str, start: int) -> tuple[list[Any], list[Any]]:
        """Findings of ``text`` that end after ``start``: (redactions, blocks)."""
        if not text.strip() or not self.entities:
            return [], []
        found = self.scanner.scan([(0, "content", text)], entities=self.entities)
        decision = decide(found, self.policy, lambda _: text)  # the allow list is exempt here too
        kept = [f for f in decision.findings if f.end > start]
        # No dataset key here: pseudonymize becomes the placeholder, as redact does.
        return [f for f in kept if f.action in REPLACING_ACTIONS], [f for f in kept if f.action == "block"]

    def check(self, text: str) -> tuple[str, bool]:
        """``(safe text, refused)`` for a whole response."""
        redactions, blocks = self._judge(text, 0)
        if blocks:
            self.report.blocked.update(f.entity_type for f in blocks)
            return "", True
        self.report.redacted.update(f.entity_type for f in redactions)
        return redact_text(text, redactions), False

    def guard_result(self, result: GenerationResult) -> GenerationResult:
        choices = []
        for c in result.choices:
            text, refused = self.check(c.text)
            choices.append(Choice(index=c.index, text=text, finish_reason="content_filter" if refused
                                  else c.finish_reason))
        return replace(result, choices=choices)

    def guard_stream(self, stream: Any) -> GuardedStream:
        return GuardedStream(self, stream)


class GuardedStream(Iterator[Delta]):
    """Wraps a :class:`serving.engine.GenerationStream`, releasing only judged text."""

    def __init__(self, guard: OutputGuard, inner: Any) -> None:
        self.guard, self.inner = guard, inner
        self._pending: dict[int, str] = {}
        self._context: dict[int, str] = {}
        self._stopped: set[int] = set()
        self._out: list[Delta] = []
        self._exhausted = False

    @property
    def usage(self) -> Any:
        return getattr(self.inner, "usage", None)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def __iter__(self) -> GuardedStream:
        return self

    def _release(self, index: int, final: bool) -> None:
        pending = self._pending.get(index, "")
        if not pending:
            return
        cut = len(pending)
        if not final:
            cut = max(0, len(pending) - HOLD_CHARS)
            space = pending.rfind(" ", 0, cut + 1)
            cut = space + 1 if space >= 0 else 0
            if cut == 0:
                return
        context = self._context.get(index, "")
        text = context + pending
        redactions, blocks = self.guard._judge(text, len(context))
        shift = len(context)
        if not final:
            # Never split an entity at the cut: keep it whole for the next round.
            for f in [*redactions, *blocks]:
                if f.start - shift < cut < f.end - shift:
                    cut = max(0, f.start - shift)
        released = pending[:cut]
        in_release = [f for f in redactions if f.end - shift <= cut]
        if any(f.start - shift < cut for f in blocks):
            self.guard.report.blocked.update(f.entity_type for f in blocks)
            self._stopped.add(index)
            self._pending[index] = ""
            self._out.append(Delta(index=index, text="", finish_reason="content_filter"))
            return
        self.guard.report.redacted.update(f.entity_type for f in in_release)
        local = [replace(f, start=max(0, f.start - shift), end=f.end - shift) for f in in_release]
        safe = redact_text(released, local)
        self._context[index] = (context + released)[-CONTEXT_CHARS:]
        self._pending[index] = pending[cut:]
        if safe:
            self._out.append(Delta(index=index, text=safe))

    def __next__(self) -> Delta:
        while not self._out:
            if self._exhausted:
                raise StopIteration
            try:
                delta = next(self.inner)
            except StopIteration:
                self._exhausted = True
                for index in list(self._pending):
                    if index not in self._stopped:
                        self._release(index, final=True)
                continue
            if delta.index in self._stopped:
                continue
            self._pending[delta.index] = self._pending.get(delta.index, "") + delta.text
            if delta.finish_reason is not None:
                self._release(delta.index, final=True)
                if delta.index not in self._stopped:
                    self._out.append(Delta(index=delta.index, text="", finish_reason=delta.finish_reason))
                    self._pending.pop(delta.index, None)
            elif len(self._pending[delta.index]) >= FLUSH_CHARS:
                self._release(delta.index, final=False)
            if self._stopped and all(i in self._stopped for i in self._pending):
                self.close()  # nothing more may be shown: stop paying for generation
                self._exhausted = True
        return self._out.pop(0)
