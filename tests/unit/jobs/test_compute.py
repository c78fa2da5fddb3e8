"""A job's `compute` option: validated in full, every error naming its field and the fix."""

from __future__ import annotations

import pytest

from appliance.errors import InvalidRequestError
from appliance.jobs.service import validate_compute


def check(compute, *, executor="ray", max_workers=4, base_kind="llm", method="lora"):
    return validate_compute(compute, base_kind=base_kind, executor=executor, max_workers=max_workers, method=method)


def test_one_worker_is_stored_as_nothing_and_several_as_a_count():
    assert check(None) == {} and check({}) == {} and check({"workers": 1}) == {}
    assert check({"workers": 4}) == {"workers": 4}


def test_sharding_is_stored_unless_auto():
    assert check({"workers": 2, "sharding": "auto"}) == {"workers": 2}
    assert check({"workers": 2, "sharding": "fsdp"}) == {"workers": 2, "sharding": "fsdp"}
    assert check({"workers": 2, "sharding": "none"}, method="qlora") == {"workers": 2, "sharding": "none"}


@pytest.mark.parametrize(("compute", "kwargs", "param", "says"), [
    ("two", {}, "compute", '`compute` must be an object such as {"workers": 2}'),
    ({"workers": 0}, {}, "compute.workers", "must be a positive integer; got 0"),
    ({"workers": True}, {}, "compute.workers", "must be a positive integer; got True"),
    ({"workers": 5}, {}, "compute.workers", "at most 4 (APPLIANCE_RAY_MAX_WORKERS)"),
    ({"workers": 2}, {"executor": "local", "max_workers": 1}, "compute.workers", "APPLIANCE_EXECUTOR=ray"),
    ({"workers": 2}, {"base_kind": "diffusion"}, "compute.workers", "image jobs train in one worker"),
    ({"gpus": 1, "workers": "x"}, {}, "compute.gpus", "not a compute option"),
    ({"workers": 2, "sharding": "zero3"}, {}, "compute.sharding", "must be one of 'auto', 'none', 'fsdp'; got 'zero3'"),
    ({"workers": 2, "sharding": "fsdp"}, {"method": "qlora"}, "compute.sharding", "shards LoRA jobs only"),
    ({"sharding": "fsdp"}, {}, "compute.sharding", "needs several workers"),
    ({"workers": 2, "sharding": "jane@example.com"}, {}, "compute.sharding", "(not shown)"),
])
def test_bad_compute_is_refused_naming_the_field(compute, kwargs, param, says):
    with pytest.raises(InvalidRequestError) as info:
        check(compute, **kwargs)
    assert info.value.param == param and says in info.value.message


def test_all_problems_are_reported_at_once():
    with pytest.raises(InvalidRequestError) as info:
        check({"gpus": 1, "workers": "x"})
    assert "compute.gpus" in info.value.message and "got 'x'" in info.value.message


def test_a_worker_shards_as_the_plan_shown_at_creation_says_unless_the_job_chose():
    from appliance.jobs.planning import worker_sharding

    assert worker_sharding({"workers": 4, "plan": {"sharding": "fsdp"}}) == "fsdp"
    assert worker_sharding({"workers": 4, "sharding": "auto", "plan": {"sharding": "none"}}) == "none"
    assert worker_sharding({"workers": 4, "sharding": "none", "plan": {"sharding": "fsdp"}}) == "none"
    assert worker_sharding({"workers": 4}) == "auto"  # no plan (config not plannable): the worker decides
    assert worker_sharding(None) == "auto"
