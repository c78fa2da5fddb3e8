"""The output guard with the real scanner and the shipped policy, over whole and streamed responses."""

from __future__ import annotations

import pytest

from appliance.files.service import LockedScanner
from appliance.inference.guard import OutputGuard
from appliance.policy import load_default_policy
from serving.protocol import Choice, Delta, GenerationResult, Usage


@pytest.fixture(scope="module")
def scanner():
    from appliance.scanning import get_scanner

    return LockedScanner(get_scanner())


class FakeUpstream:
    """A stream of deltas as an engine produces them (the guard is what is under test)."""

    def __init__(self, pieces: list[str], index: int = 0) -> None:
        self.deltas = [Delta(index=index, text=p) for p in pieces] + [Delta(index=index, text="", finish_reason="stop")]
        self.usage = Usage(prompt_tokens=3, completion_tokens=len(pieces))
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self) -> Delta:
        if self.closed or not self.deltas:
            raise StopIteration
        return self.deltas.pop(0)

    def close(self) -> None:
        self.closed = True


def chop(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def run(guard: OutputGuard, pieces: list[str]) -> tuple[str, str | None, FakeUpstream]:
    upstream = FakeUpstream(pieces)
    deltas = list(guard.guard_stream(upstream))
    return "".join(d.text for d in deltas), deltas[-1].finish_reason, upstream


TEXT = ("Thanks for asking. The account manager can be reached at jane.doe@example.com during office hours, "
        "and the quarterly review is scheduled for next week as planned.")


def test_whole_response_email_redacted(scanner):
    guard = OutputGuard(scanner, load_default_policy())
    result = GenerationResult(model="m", choices=[Choice(index=0, text=TEXT, finish_reason="stop")],
                              usage=Usage(1, 1))
    out = guard.guard_result(result)
    assert "jane.doe@example.com" not in out.choices[0].text and "<EMAIL_ADDRESS>" in out.choices[0].text
    assert guard.report.redacted["EMAIL_ADDRESS"] == 1 and not guard.report.refused


@pytest.mark.parametrize("size", [1, 3, 7, 40])
def test_streamed_email_split_across_chunks_is_redacted(scanner, size):
    guard = OutputGuard(scanner, load_default_policy())
    text, finish, _ = run(guard, chop(TEXT, size))
    assert "jane.doe@example.com" not in text and "<EMAIL_ADDRESS>" in text
    assert text.replace("<EMAIL_ADDRESS>", "jane.doe@example.com") == TEXT
    assert finish == "stop"


def test_blocked_secret_ends_the_stream_with_content_filter(scanner):
    guard = OutputGuard(scanner, load_default_policy())
    secret = "Use the key AKIAIOSFODNN7EXAMPLE with region eu-west-1 " + "and more words " * 30
    text, finish, upstream = run(guard, chop(secret, 5))
    assert "AKIA" not in text and finish == "content_filter"
    assert guard.report.refused and guard.report.blocked["AWS_ACCESS_KEY_ID"] == 1
    assert upstream.closed  # generation stops once nothing more may be shown


def test_clean_text_passes_unchanged(scanner):
    guard = OutputGuard(scanner, load_default_policy())
    clean = "The meeting covered the roadmap, the budget and the hiring plan for the next quarter. " * 4
    text, finish, _ = run(guard, chop(clean, 9))
    assert text == clean and finish == "stop" and not guard.report.redacted


def test_allow_listed_values_pass_the_guard_whole_and_streamed(scanner):
    """A project's reviewed glossary reaches its models' answers: "Otto" is its service, Maria Lopez a person."""
    from appliance.policy import DEFAULT_POLICY_PATH, parse_policy

    default_text = DEFAULT_POLICY_PATH.read_text()
    listed = parse_policy(default_text + "\nallow_list: [Otto]\n")
    text = "Otto now handles refunds for the EU; Maria Lopez approved the change last week, as planned."
    plain_out, _ = OutputGuard(scanner, load_default_policy()).check(text)
    assert "Otto" not in plain_out and "Maria Lopez" not in plain_out  # without the glossary both look like people
    guard = OutputGuard(scanner, listed)
    out, refused = guard.check(text)
    assert out.startswith("Otto now handles") and "Maria Lopez" not in out and not refused
    streamed, finish, _ = run(OutputGuard(scanner, listed), chop(text, 7))
    assert streamed.startswith("Otto now handles") and "Maria Lopez" not in streamed and finish == "stop"
    assert guard.report.to_dict() == {"redacted": {"PERSON": 1}, "blocked": {}, "refused": False}
