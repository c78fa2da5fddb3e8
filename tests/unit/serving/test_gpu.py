"""The embedded engine on a CUDA device (skipped without one)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from serving.protocol import parse_chat_request
from serving.transformers_engine import EngineConfig, TransformersEngine
from tests.unit.serving.conftest import BASE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def chat(model: str, **kw):
    return parse_chat_request({"model": model, "messages": [{"role": "user", "content": "Hi there"}],
                               "temperature": 0, "max_tokens": 10, **kw})


@pytest.mark.parametrize("compute", ["fused", "peft"])
def test_adapters_and_mixed_batches_on_cuda(tiny_parts, adapters, compute):
    model, tokenizer = tiny_parts
    cpu = TransformersEngine(copy.deepcopy(model), tokenizer, name=BASE)
    gpu = TransformersEngine(copy.deepcopy(model).to("cuda"), tokenizer, name=BASE,
                             config=EngineConfig(lora_compute=compute))
    try:
        models = [BASE, "ad0", "ad1", "ad2"]
        for eng in (cpu, gpu):
            for name in models[1:]:
                eng.load_adapter(name, adapters[name])
        assert all(p.device.type == "cuda" for p in gpu.model.parameters())
        reference = {m: gpu.generate(chat(m)).choices[0].text for m in models}
        assert reference == {m: cpu.generate(chat(m)).choices[0].text for m in models}
        sampled = gpu.generate(chat("ad0", temperature=1.0, seed=3)).choices[0].text
        assert sampled == gpu.generate(chat("ad0", temperature=1.0, seed=3)).choices[0].text

        results, errors = [], []
        barrier = threading.Barrier(8)

        def client(m: str) -> None:
            try:
                barrier.wait()
                results.append((m, gpu.generate(chat(m)).choices[0].text))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(m,)) for m in models * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors and all(text == reference[m] for m, text in results)
        assert gpu.stats["mixed_steps"] > 0
        gpu.unload_adapter("ad0")
        assert gpu.generate(chat(BASE)).choices[0].text == reference[BASE]
    finally:
        cpu.close()
        gpu.close()
