import random
from pathlib import Path

import pytest

from appliance.modelstore import build_tiny_causal_lm

WORDS = "the quick brown fox jumps over lazy dog hello world yes no red green blue sea sky".split()


def reverse_records(n: int, seed: int = 0) -> list[dict]:
    """Chat records teaching 'reverse the words': learnable by a tiny model in a few steps."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
        records.append(
            {
                "messages": [
                    {"role": "user", "content": "Reverse: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words))},
                ]
            }
        )
    return records


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "tiny-llama", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)


def make_spec(method: str = "lora", **hyperparameters):
    from appliance.training import TrainingSpec

    return TrainingSpec.from_method({"type": method, method: {"hyperparameters": hyperparameters}})


def write_adapter(files: dict[str, bytes], dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name, data in files.items():
        (dest / name).write_bytes(data)
    return dest
