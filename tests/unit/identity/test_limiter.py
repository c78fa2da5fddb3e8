import pytest

from appliance.errors import RateLimitedError
from appliance.identity.auth import FailureLimiter

ADDR = ("addr", "10.0.0.1")


def test_a_key_is_locked_after_max_failures_with_growing_back_off_and_forgotten_after_the_window():
    now = [1000.0]
    limiter = FailureLimiter(max_failures=3, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        limiter.check(ADDR)
        limiter.fail(ADDR)
    with pytest.raises(RateLimitedError) as info:
        limiter.check(ADDR)
    assert info.value.retry_after_s == 1
    limiter.check(("addr", "10.0.0.2"))  # other keys unaffected
    waits = []
    for _ in range(4):  # each further failure doubles the wait: 2, 4, 8, 16 s
        now[0] += limiter.retry_after(ADDR)
        limiter.check(ADDR)
        limiter.fail(ADDR)
        waits.append(limiter.retry_after(ADDR))
    assert waits == [2, 4, 8, 16]
    now[0] += 61  # a window without failures: forgotten
    limiter.check(ADDR)
    assert limiter.retry_after(ADDR) == 0


def test_back_off_is_capped_and_success_forgets_the_key():
    now = [0.0]
    limiter = FailureLimiter(max_failures=1, window_s=10_000, clock=lambda: now[0], max_backoff_s=30)
    for _ in range(12):
        limiter.fail(ADDR)
    assert limiter.retry_after(ADDR) == 30
    limiter.succeed(ADDR)
    assert limiter.retry_after(ADDR) == 0


def test_an_address_trying_many_accounts_is_held_back_later_than_one_account():
    limiter = FailureLimiter(max_failures=2, window_s=60)
    for _ in range(2):
        limiter.fail(("login", "olivia", "10.0.0.1"), ("login-addr", "10.0.0.1"))
    assert limiter.retry_after(("login", "olivia", "10.0.0.1")) > 0
    assert limiter.retry_after(("login-addr", "10.0.0.1")) == 0  # 5x the limit for spraying
    for _ in range(8):
        limiter.fail(("login-addr", "10.0.0.1"))
    assert limiter.retry_after(("login-addr", "10.0.0.1")) > 0
