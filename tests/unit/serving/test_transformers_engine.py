"""The embedded engine on a tiny seeded Llama with real peft adapters (no mocks)."""

from __future__ import annotations

import copy
import threading

import pytest

from appliance.errors import ConflictError, InvalidRequestError
from serving.errors import AdapterLoadError, AdapterNotFoundError
from serving.protocol import parse_chat_request, parse_completion_request
from serving.transformers_engine import EngineConfig, TransformersEngine
from tests.unit.serving.conftest import BASE, with_config, with_tensors

MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


def chat(model: str = BASE, **kw):
    body = {"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": 12, **kw}
    return parse_chat_request(body)


def text_of(engine, model: str = BASE, **kw) -> str:
    return engine.generate(chat(model, **kw)).choices[0].text


def test_chat_template_and_usage(engine, tiny_parts):
    _, tokenizer = tiny_parts
    prompt = engine.apply_chat_template(MESSAGES)
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nTell me a story" in prompt
    assert engine.apply_chat_template(chat().messages) == prompt  # parsed messages format the same
    result = engine.generate(chat(max_tokens=7))
    assert result.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert result.usage.completion_tokens == 7 and result.usage.total_tokens == result.usage.prompt_tokens + 7
    assert result.choices[0].finish_reason == "length" and result.model == BASE


def test_greedy_is_deterministic_and_seed_is_honoured(engine):
    assert text_of(engine) == text_of(engine)
    sampled = [text_of(engine, temperature=1.0, seed=s, max_tokens=10) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    many = engine.generate(chat(temperature=1.0, seed=5, n=3, max_tokens=8))
    assert [c.index for c in many.choices] == [0, 1, 2] and len({c.text for c in many.choices}) == 3
    assert many.usage.completion_tokens == 24


def test_stop_strings_across_token_boundaries(engine):
    full = text_of(engine, max_tokens=12)
    # A stop string that starts inside one token and ends inside a later one.
    stop = full[len(full) // 2 - 2: len(full) // 2 + 4]
    result = engine.generate(chat(stop=["never-appears", stop], max_tokens=12)).choices[0]
    assert result.finish_reason == "stop" and result.text == full[: full.index(stop)]
    deltas = list(engine.stream(chat(stop=stop, max_tokens=12)))
    assert "".join(d.text for d in deltas) == result.text and deltas[-1].finish_reason == "stop"


def test_stream_concatenates_to_the_whole_text_and_reports_usage(engine):
    whole = engine.generate(chat(max_tokens=10))
    stream = engine.stream(chat(max_tokens=10, stream=True))
    deltas = list(stream)
    assert len(deltas) > 1 and all(d.finish_reason is None for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == whole.choices[0].text
    assert deltas[-1].finish_reason == "length" and stream.usage == whole.usage
    assert stream.time_to_first_token_s > 0


def test_completions_with_several_prompts(engine):
    result = engine.generate(parse_completion_request(
        {"model": BASE, "prompt": ["Once upon", "In a galaxy"], "n": 2, "max_tokens": 5, "temperature": 0}))
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert result.choices[0].text == result.choices[1].text != result.choices[2].text
    assert result.usage.completion_tokens == 20


def test_context_limit_is_checked_against_the_prompt(engine):
    with pytest.raises(InvalidRequestError) as err:
        engine.generate(chat(max_tokens=250))
    assert err.value.param == "max_tokens" and "context is 256" in err.value.message
    with pytest.raises(InvalidRequestError) as err:
        engine.generate(chat(max_tokens=300))
    assert "at most the model's context length 256, got 300" in err.value.message


def test_load_switch_unload_keeps_the_base_model(engine, adapters):
    base_model = engine.model
    base_ids = {id(m) for m in base_model.modules() if type(m).__name__ == "Linear"}
    reference = text_of(engine)
    info = engine.load_adapter("ad0", adapters["ad0"])
    assert info.rank == 4 and info.resident and info.last_load_ms > 0
    engine.load_adapter("ad1", adapters["ad1"])
    out0, out1 = text_of(engine, "ad0"), text_of(engine, "ad1")
    assert len({reference, out0, out1}) == 3
    assert text_of(engine) == reference  # base requests see no adapter
    assert engine.has_adapter("ad0") and [a.name for a in engine.adapters()] == ["ad0", "ad1"]
    engine.unload_adapter("ad0")
    assert not engine.has_adapter("ad0") and text_of(engine, "ad1") == out1 and text_of(engine) == reference
    engine.load_adapter("ad0", adapters["ad0"])
    assert text_of(engine, "ad0") == out0
    # Same model object and the very same base Linear layers throughout (wrapped, never reloaded).
    assert engine.model is base_model
    assert base_ids <= {id(m) for m in base_model.modules() if type(m).__name__ == "Linear"}
    with pytest.raises(ConflictError):
        engine.load_adapter("ad0", adapters["ad1"])
    engine.load_adapter("ad0", adapters["ad1"], replace=True)
    assert text_of(engine, "ad0") == out1 and engine.adapters()[1].loads == 2


def test_unknown_adapter_is_not_found(engine):
    with pytest.raises(AdapterNotFoundError) as err:
        engine.generate(chat("no-such-adapter"))
    assert err.value.code == "model_not_found" and "'no-such-adapter'" in err.value.message
    with pytest.raises(AdapterNotFoundError):
        engine.unload_adapter("no-such-adapter")


def test_broken_adapter_is_refused_and_serving_continues(engine, adapters):
    engine.load_adapter("ad0", adapters["ad0"])
    before = (text_of(engine), text_of(engine, "ad0"))
    broken = {
        "modules": with_config(adapters["ad1"], modules_to_save=["lm_head"]),
        "shape": with_tensors(adapters["ad1"], lambda t: {k: v[:, :-1].contiguous() if "lora_A" in k else v
                                                          for k, v in t.items()}),
    }
    for name, files in broken.items():
        with pytest.raises(AdapterLoadError):
            engine.load_adapter(name, files)
        assert not engine.has_adapter(name)
    with pytest.raises(AdapterLoadError):  # replacing with a broken one keeps the old one
        engine.load_adapter("ad0", broken["shape"], replace=True)
    assert (text_of(engine), text_of(engine, "ad0")) == before


def test_lru_eviction_and_reload_through_the_source(tiny_parts, adapters):
    model, tokenizer = tiny_parts
    fetched: list[str] = []

    def source(name: str) -> dict[str, bytes]:
        fetched.append(name)
        return adapters[name]

    with TransformersEngine(copy.deepcopy(model), tokenizer, name=BASE, adapter_source=source,
                            config=EngineConfig(max_resident_adapters=2)) as engine:
        engine.load_adapter("ad0", adapters["ad0"])
        engine.load_adapter("ad1", adapters["ad1"])
        ref0 = text_of(engine, "ad0")  # ad0 is now the most recently used
        engine.load_adapter("ad2", adapters["ad2"])
        assert engine.resident_adapters() == ["ad0", "ad2"] and fetched == []
        assert {a.name: a.resident for a in engine.adapters()} == {"ad0": True, "ad1": False, "ad2": True}
        ref1 = text_of(engine, "ad1")  # reloaded on demand, evicting ad0
        assert fetched == ["ad1"] and engine.resident_adapters() == ["ad2", "ad1"]
        assert text_of(engine, "ad0") == ref0 and fetched == ["ad1", "ad0"]
        assert ref0 != ref1 and {a.name: a.loads for a in engine.adapters()}["ad0"] == 2
        engine.load_adapter("ad3")  # files=None: fetched through the source
        assert fetched[-1] == "ad3"

    def failing(name: str) -> dict[str, bytes]:
        raise OSError("decryption key unavailable")

    with TransformersEngine(copy.deepcopy(model), tokenizer, name=BASE, adapter_source=failing,
                            config=EngineConfig(max_resident_adapters=1)) as engine:
        engine.load_adapter("ad0", adapters["ad0"])
        engine.load_adapter("ad1", adapters["ad1"])
        with pytest.raises(AdapterLoadError, match="decryption key unavailable"):
            engine.generate(chat("ad0"))
        assert text_of(engine, "ad1") and engine.has_adapter("ad0")


def test_without_a_source_the_resident_bound_is_a_hard_limit(tiny_parts, adapters):
    model, tokenizer = tiny_parts
    with TransformersEngine(copy.deepcopy(model), tokenizer, name=BASE,
                            config=EngineConfig(max_resident_adapters=1)) as engine:
        engine.load_adapter("ad0", adapters["ad0"])
        with pytest.raises(ConflictError, match="max_resident_adapters"):
            engine.load_adapter("ad1", adapters["ad1"])


@pytest.mark.parametrize("compute", ["fused", "peft"])
def test_concurrent_requests_for_different_adapters_get_their_own_output(tiny_parts, adapters, compute):
    model, tokenizer = tiny_parts
    engine = TransformersEngine(copy.deepcopy(model), tokenizer, name=BASE,
                                config=EngineConfig(lora_compute=compute))
    for name in ("ad0", "ad1", "ad2"):
        engine.load_adapter(name, adapters[name])
    models = [BASE, "ad0", "ad1", "ad2"]
    reference = {m: text_of(engine, m, max_tokens=10) for m in models}
    assert len(set(reference.values())) == 4

    results: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def client(model: str) -> None:
        try:
            barrier.wait()
            for _ in range(2):
                results.append((model, text_of(engine, model, max_tokens=10)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(m,)) for m in models * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 16
    assert engine.stats["mixed_steps"] > 0  # some batches really did mix adapters
    engine.close()
    for model, text in results:
        assert text == reference[model], model


def test_loading_while_generating_and_unload_waits_for_the_request(engine, adapters):
    engine.load_adapter("ad0", adapters["ad0"])
    reference = text_of(engine, "ad0", max_tokens=40)
    stream = engine.stream(chat("ad0", max_tokens=40))
    first = next(stream)
    engine.load_adapter("ad1", adapters["ad1"])  # injected between two decode steps
    unloaded = threading.Event()
    t = threading.Thread(target=lambda: (engine.unload_adapter("ad0"), unloaded.set()))
    t.start()
    rest = list(stream)
    t.join(timeout=30)
    assert unloaded.is_set() and first.text + "".join(d.text for d in rest) == reference
    with pytest.raises(AdapterNotFoundError):
        engine.generate(chat("ad0"))


def test_closing_a_stream_cancels_the_request(engine):
    stream = engine.stream(chat(max_tokens=200))
    next(stream)
    stream.close()
    assert list(stream) == []
    assert text_of(engine, max_tokens=3)  # the worker moved on


def test_fused_lora_matches_peft_forward(tiny_parts, adapters):
    """Our fused LoRA kernels and peft's own forward give the same completions for each adapter."""
    model, tokenizer = tiny_parts
    outputs = {}
    for compute in ("fused", "peft"):
        with TransformersEngine(copy.deepcopy(model), tokenizer, name=BASE,
                                config=EngineConfig(lora_compute=compute)) as engine:
            for name in ("ad0", "ad1"):
                engine.load_adapter(name, adapters[name])
            outputs[compute] = [engine.generate(chat(m, max_tokens=16)).choices[0].text for m in (BASE, "ad0", "ad1")]
            result = engine.generate(parse_completion_request(
                {"model": "ad1", "prompt": ["Once upon", "a"], "max_tokens": 8, "temperature": 0}))
            outputs[compute].append([c.text for c in result.choices])
    assert outputs["fused"] == outputs["peft"]
    assert len(set(outputs["fused"][:3])) == 3


@pytest.mark.parametrize("prompt", ["Hi", "A much longer prompt than the chat one, to pad the cache " * 3])
def test_a_request_joins_a_running_batch(engine, adapters, prompt):
    """Whichever KV cache is shorter, the running batch's or the newcomer's, is padded; outputs do not change."""
    engine.load_adapter("ad0", adapters["ad0"])
    ref_long = text_of(engine, max_tokens=60)
    ref_short = engine.generate(parse_completion_request(
        {"model": "ad0", "prompt": prompt, "max_tokens": 5, "temperature": 0})).choices[0].text
    mixed_before = engine.stats["mixed_steps"]
    long = engine.stream(chat(max_tokens=60))
    first = next(long)
    short = engine.generate(parse_completion_request(
        {"model": "ad0", "prompt": prompt, "max_tokens": 5, "temperature": 0}))
    rest = list(long)
    assert short.choices[0].text == ref_short
    assert first.text + "".join(d.text for d in rest) == ref_long
    assert engine.stats["mixed_steps"] > mixed_before  # the two shared decode steps


def test_a_row_that_ends_with_eos_finishes_its_request(tiny_parts):
    """Regression: a row stopped by EOS must count as finished, or its request waits forever."""
    import copy as _copy
    import threading

    from serving.protocol import parse_chat_request
    from serving.transformers_engine import EngineConfig, TransformersEngine

    model, tokenizer = tiny_parts
    model = _copy.deepcopy(model)
    eos = tokenizer.eos_token_id
    calls = {"n": 0}

    def eos_after_three(_module, _inputs, output):
        calls["n"] += 1
        if calls["n"] > 3:  # prefill + two decode steps, then the model says it is done
            output[..., eos] += 1e4
        return output

    model.lm_head.register_forward_hook(eos_after_three)
    engine = TransformersEngine(model, tokenizer, name="tiny", config=EngineConfig(default_max_tokens=64))
    try:
        req = parse_chat_request({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 50, "temperature": 0})
        box = {}
        worker = threading.Thread(target=lambda: box.update(result=engine.generate(req)))
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), "the request never finished"
        result = box["result"]
        assert result.choices[0].finish_reason == "stop" and result.usage.completion_tokens == 4
        streamed = list(engine.stream(req))
        assert streamed[-1].finish_reason == "stop"
    finally:
        engine.close()
