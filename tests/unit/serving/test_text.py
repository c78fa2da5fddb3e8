"""Incremental detokenisation: whole characters only, stop strings split across tokens."""

from __future__ import annotations

import pytest

from serving.text import TextTracker


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def feed(tokenizer, text: str, stop=()):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tracker = TextTracker(lambda t: tokenizer.decode(t, skip_special_tokens=True), stop)
    pieces, stopped = [], False
    for i in ids:
        piece, stopped = tracker.add(i)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        pieces.append(tracker.finish())
    return pieces, stopped


def test_multibyte_characters_are_never_emitted_broken(tokenizer):
    text = "Grüße aus 日本語 ✓ café"
    # The byte-level BPE really does split these characters over several tokens.
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) > len(text.split())
    pieces, stopped = feed(tokenizer, text)
    assert not stopped and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_split_across_tokens_is_cut_and_never_leaked(tokenizer):
    text = "The answer is forty-two. END OF ANSWER and more"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stop = "D OF AN"  # starts and ends inside tokens
    assert not any(stop in tokenizer.decode([i]) for i in ids)
    pieces, stopped = feed(tokenizer, text, stop=[stop, "zzz"])
    assert stopped and "".join(pieces) == "The answer is forty-two. EN"
    # Nothing that could still become the stop string was emitted before it was complete.
    assert all("D OF" not in p for p in pieces)


def test_held_back_prefix_is_released_when_the_stop_does_not_complete(tokenizer):
    pieces, stopped = feed(tokenizer, "a b END c", stop=["ENDX"])
    assert not stopped and "".join(pieces) == "a b END c"


def test_stop_at_the_very_start_gives_empty_text(tokenizer):
    pieces, stopped = feed(tokenizer, "Hello world", stop=["Hel"])
    assert stopped and "".join(pieces) == ""
