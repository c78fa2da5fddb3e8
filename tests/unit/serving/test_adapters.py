"""Adapter validation: every broken adapter is refused with a message naming what is wrong."""

from __future__ import annotations

import pytest
import torch

from appliance.errors import InvalidRequestError
from serving.adapters import BaseModelShape, check_adapter_name, validate_adapter
from serving.errors import AdapterLoadError
from tests.unit.serving.conftest import make_lora, with_config, with_tensors


@pytest.fixture(scope="module")
def shape(tiny_parts):
    model, _ = tiny_parts
    return BaseModelShape.from_model(model, "tiny-llama", aliases=["/models/tiny-llama"])


@pytest.fixture(scope="module")
def good(adapters):
    return adapters["ad0"]


def test_valid_adapter_parses(shape, good):
    v = validate_adapter(good, shape, max_rank=8)
    assert v.rank == 4 and v.alpha == 8.0 and len(v.modules) == 2 * 7
    assert v.target_modules == tuple(sorted(v.target_modules))
    assert set(v.files) == {"adapter_config.json", "adapter_model.safetensors"}  # README dropped


def test_directory_source(shape, good, tmp_path):
    for name, data in good.items():
        (tmp_path / name).write_bytes(data)
    assert validate_adapter(tmp_path, shape, max_rank=8).rank == 4


def refuse(files, shape, needle, param=None, max_rank=8):
    with pytest.raises(AdapterLoadError) as err:
        validate_adapter(files, shape, max_rank=max_rank)
    assert needle in err.value.message, err.value.message
    if param:
        assert err.value.param == param
    assert err.value.code == "adapter_load_failed"


def test_missing_or_unreadable_files(shape, good):
    refuse({"adapter_model.safetensors": good["adapter_model.safetensors"]}, shape, "no adapter_config.json")
    refuse({"adapter_config.json": good["adapter_config.json"]}, shape, "no adapter_model.safetensors")
    refuse({"adapter_config.json": good["adapter_config.json"], "adapter_model.bin": b"x"}, shape, "pickle")
    refuse({**good, "adapter_config.json": b"{oops"}, shape, "not valid JSON")
    refuse({**good, "adapter_config.json": b"[1]"}, shape, "JSON object")
    refuse({**good, "adapter_model.safetensors": b"garbage"}, shape, "not a readable safetensors")


@pytest.mark.parametrize(("change", "needle", "param"), [
    ({"peft_type": "IA3"}, "only LoRA", "peft_type"),
    ({"r": 0}, "positive integer", "r"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save", "modules_to_save"),
    ({"use_dora": True}, "DoRA", "use_dora"),
    ({"bias": "all"}, "`bias`", "bias"),
    ({"base_model_name_or_path": "meta-llama/Llama-3-8B"}, "trained on base model 'meta-llama/Llama-3-8B'",
     "base_model_name_or_path"),
    ({"target_modules": ["q_proj", "nonexistent_proj"]}, "'nonexistent_proj' matches no linear layer",
     "target_modules"),
    ({"target_modules": ["q_proj"]}, "not in target_modules", None),
])
def test_config_rules(shape, good, change, needle, param):
    refuse(with_config(good, **change), shape, needle, param)


def test_rank_limit(shape, good):
    refuse(good, shape, "ranks up to 2", "r", max_rank=2)


def test_base_model_name_aliases_are_accepted(shape, good):
    for base in ("tiny-llama", "/models/tiny-llama", "/elsewhere/tiny-llama", None):
        assert validate_adapter(with_config(good, base_model_name_or_path=base), shape, max_rank=8)


def test_weights_rules(shape, good):
    def first_key(t, suffix):
        return next(k for k in sorted(t) if k.endswith(suffix))

    def nan(t):
        t[first_key(t, "lora_A.weight")] = torch.full_like(t[first_key(t, "lora_A.weight")], float("nan"))
        return t

    def wrong_shape(t):
        k = first_key(t, "lora_B.weight")
        t[k] = torch.zeros(t[k].shape[0] + 1, t[k].shape[1])
        return t

    def drop_b(t):
        del t[first_key(t, "lora_B.weight")]
        return t

    def extra(t):
        t["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
        return t

    refuse(with_tensors(good, nan), shape, "NaN")
    refuse(with_tensors(good, wrong_shape), shape, "another base model")
    refuse(with_tensors(good, drop_b), shape, "no lora_B")
    refuse(with_tensors(good, extra), shape, "not a LoRA A/B weight")

    def named(t):  # peft's in-memory key, with the adapter's name: vLLM refuses it
        k = first_key(t, "lora_A.weight")
        t[k.replace("lora_A.weight", "lora_A.default.weight")] = t.pop(k)
        return t

    refuse(with_tensors(good, named), shape, "carries the adapter name 'default'")


def test_lora_alpha_is_required_as_vllm_requires_it(shape, good):
    import json

    config = json.loads(good["adapter_config.json"])
    del config["lora_alpha"]
    refuse({**good, "adapter_config.json": json.dumps(config).encode()}, shape, "`lora_alpha` is missing",
           "lora_alpha")


def test_lora_on_lm_head_is_refused(tiny_parts, shape):
    model, _ = tiny_parts
    files = make_lora(model, seed=1, targets=["q_proj", "lm_head"])
    refuse(files, shape, "lm_head")


def test_adapter_names():
    assert check_adapter_name("ft:tiny:acme:support:abc-1") == "ft:tiny:acme:support:abc-1"
    for bad in ("", " x", "a b", "x" * 300, None):
        with pytest.raises(InvalidRequestError):
            check_adapter_name(bad)
    with pytest.raises(InvalidRequestError, match="base model's name"):
        check_adapter_name("base", "base")
