"""A deterministic synthetic instruction corpus with realistic length spread.

Chat records of small, checkable tasks (reverse, sort, count, uppercase,
repeat, list, arithmetic), some with a system prompt and some with two turns.
Input sizes are drawn from a log-normal distribution, so lengths span ~30 to
~600 tokens with a long tail, as real chat data does: that is what makes
padding expensive for a trainer that pads each batch to its longest example.
"""

from __future__ import annotations

import math
import random

WORDS = (
    "apple river stone cloud paper garden window silver orange market winter bridge candle forest "
    "engine violet harbor pencil meadow rocket basket thunder mirror planet lantern velvet island "
    "copper saddle breeze marble tunnel falcon meadow ribbon glacier compass anchor feather canyon"
).split()
SYSTEMS = ("You are a precise assistant.", "Answer exactly and briefly.", "You follow instructions carefully.")


def _size(rng: random.Random, median: float, cap: int) -> int:
    return max(1, min(cap, int(math.exp(rng.gauss(math.log(median), 0.9)))))


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(7)
    if kind == 0:
        words = [rng.choice(WORDS) for _ in range(_size(rng, 10, 150))]
        return "Reverse the order of these words: " + " ".join(words), " ".join(reversed(words))
    if kind == 1:
        numbers = [rng.randint(0, 999) for _ in range(_size(rng, 8, 120))]
        return "Sort these numbers from smallest to largest: " + ", ".join(map(str, numbers)), ", ".join(
            map(str, sorted(numbers))
        )
    if kind == 2:
        words = [rng.choice(WORDS) for _ in range(_size(rng, 12, 200))]
        return "How many words are in this text? " + " ".join(words), f"The text has {len(words)} words."
    if kind == 3:
        words = [rng.choice(WORDS) for _ in range(_size(rng, 10, 150))]
        return "Write this in capital letters: " + " ".join(words), " ".join(words).upper()
    if kind == 4:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        times = _size(rng, 3, 25)
        return f"Repeat the sentence '{sentence}' {times} times, one per line.", "\n".join([sentence] * times)
    if kind == 5:
        n = _size(rng, 5, 60)
        items = rng.sample(WORDS, k=min(n, len(WORDS))) if n <= len(WORDS) else [rng.choice(WORDS) for _ in range(n)]
        return f"List {len(items)} words, numbered.", "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
    a, b = rng.randint(0, 9999), rng.randint(0, 9999)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def instruction_corpus(n: int, seed: int = 0) -> list[dict]:
    """``n`` chat records, the same for the same ``(n, seed)``."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
        for _turn in range(1 if rng.random() < 0.8 else 2):
            question, answer = _task(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        records.append({"messages": messages})
    return records
