import pytest

from appliance.errors import RateLimitedError
from appliance.identity.auth import FailureLimiter


def test_origin_is_locked_after_max_failures_until_window_passes():
    now = [1000.0]
    limiter = FailureLimiter(max_failures=3, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        limiter.check("10.0.0.1")
        limiter.fail("10.0.0.1")
    with pytest.raises(RateLimitedError) as info:
        limiter.check("10.0.0.1")
    assert 1 <= info.value.retry_after_s <= 61
    limiter.check("10.0.0.2")  # other origins unaffected
    now[0] += 61
    limiter.check("10.0.0.1")  # window passed
