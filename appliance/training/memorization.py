"""Memorisation evidence: canary exposure and an extraction probe.

Canaries follow Carlini et al., *The Secret Sharer* (USENIX Security 2019): a
random secret drawn from a known space (here nine digits, 10^9 values) is put
into the training data in a fixed sentence; after training, the log-perplexity
the model gives that secret is compared with the log-perplexities of random
candidates from the same space. The **exposure** is
``log2(|space|) - log2(rank)``: about 0 for a secret the model has not seen,
up to ``log2(10^9) ≈ 29.9`` for one it reproduces. The rank among 10^9
candidates is estimated as the paper does (section 4.3): fit a skew-normal
distribution to the sampled candidates' log-perplexities and take its CDF at
the canary's value. Each canary is scored with the adapter and, through
peft's ``disable_adapter``, with the base model alone, so the report shows
what training added.

The **extraction probe** prompts the trained model with the record up to each
value the scanner found and the policy *allowed* (kept in the training data),
rendered as training saw it, decodes greedily, and counts how often the exact
value comes out. Only counts
are reported, never the values.
"""

from __future__ import annotations

import copy
import math
import random
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from appliance.scanning.records import iter_text_slots
from appliance.training.data import _content_text

_SENTINEL = "\ue000probe\ue000"  # a private-use marker no tokenizer merges with its neighbours

CANARY_DIGITS = 9
CANARY_SPACE = 10**CANARY_DIGITS
CANARY_PREFIX = "The secret verification number of canary {n} is"
EXPOSURE_CANDIDATES = 512
PROBE_CONTEXT_CHARS = 512
PROBE_EXTRA_TOKENS = 8


def new_canaries(count: int) -> list[str]:
    """``count`` fresh canary sentences, each with its own random secret (from :mod:`secrets`)."""
    return [
        canary_text(n + 1, " ".join(str(secrets.randbelow(10)) for _ in range(CANARY_DIGITS))) for n in range(count)
    ]


def canary_text(n: int, secret: str) -> str:
    return f"{CANARY_PREFIX.format(n=n)} {secret}"


def split_canary(text: str) -> tuple[str, str]:
    """``(prefix, secret)`` of a canary sentence made by :func:`new_canaries`."""
    prefix, _, secret = text.rpartition(" is ")
    return prefix + " is", secret


def canary_records(canaries: Sequence[str], repetitions: int) -> list[dict[str, str]]:
    """Training records inserting each canary ``repetitions`` times (as ``text`` records)."""
    return [{"text": c} for c in canaries for _ in range(repetitions)]


@dataclass(frozen=True)
class ProbeTarget:
    """Where an allowed finding sits in a stored training record.

    Attributes:
        record: Index of the record in the stored (decrypted) training file.
        field: JSON path of the text field, e.g. ``messages[1].content``.
        start: Offset of the value in that field's stored text.
        end: End offset.
        entity_type: What the scanner found (``EMAIL_ADDRESS``, ...).
    """

    record: int
    field: str
    start: int
    end: int
    entity_type: str

    @classmethod
    def from_list(cls, row: Sequence[Any]) -> ProbeTarget:
        record, field, start, end, entity_type = row
        return cls(int(record), str(field), int(start), int(end), str(entity_type))


@contextmanager
def _standard_attention(model: Any) -> Iterator[None]:
    """Eval mode with stock attention (padding masks, KV cache); training's packed kernel takes neither.

    SDPA, or eager attention for models transformers runs without it (Gemma 2: soft-capped scores).
    """
    base = model.get_base_model()
    previous, was_training = base.config._attn_implementation, model.training
    base.set_attn_implementation("sdpa" if base._supports_sdpa else "eager")
    model.eval()
    try:
        yield
    finally:
        base.set_attn_implementation(previous)
        model.train(was_training)


def _sequence_nll(model: Any, tokenizer: Any, prompts: list[list[int]], targets: list[list[int]],
                  device: torch.device, batch_size: int = 32) -> list[float]:
    """Summed negative log-likelihood (nats) of each ``target`` after its ``prompt``.

    A canary's candidates share one prompt: it runs once and its key/value cache is reused for
    every batch of targets of one length (:func:`_shared_prompt_nll`), so only the secrets' tokens
    go through the model again. Otherwise each row runs whole, and only the positions that predict
    target tokens go through the output layer and the softmax (``logits_to_keep``).
    """
    if prompts and all(p == prompts[0] for p in prompts):
        try:
            return _shared_prompt_nll(model, prompts[0], targets, device, batch_size)
        except (AttributeError, NotImplementedError, TypeError):  # a model whose cache cannot be copied and
            pass  # repeated (no past_key_values, a cache class without batch_repeat_interleave): rows run whole
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        batch_prompts, batch_targets = prompts[i : i + batch_size], targets[i : i + batch_size]
        rows = [p + t for p, t in zip(batch_prompts, batch_targets)]
        width = max(len(r) for r in rows)
        start = min(len(p) for p in batch_prompts) - 1  # the first position whose logits predict a target token
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           logits_to_keep=width - start).logits
        for j, (p, t) in enumerate(zip(batch_prompts, batch_targets)):
            first = len(p) - 1 - start
            logp = logits[j, first : first + len(t)].float().log_softmax(dim=-1)
            picked = logp[torch.arange(len(t), device=logp.device), torch.tensor(t, device=logp.device)]
            out.append(-float(picked.sum()))
    return out


def _shared_prompt_nll(model: Any, prompt: list[int], targets: list[list[int]], device: torch.device,
                       batch_size: int) -> list[float]:
    """:func:`_sequence_nll` for one prompt: the prompt's cache computed once, copied for each batch."""
    import copy

    with torch.no_grad():
        ids = torch.tensor([prompt], device=device)
        head = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    first_logp = head.logits[0, -1].float().log_softmax(dim=-1)  # predicts every target's first token
    out: dict[int, float] = {}
    by_length: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_length.setdefault(len(target), []).append(index)
    for length, indices in by_length.items():
        for i in range(0, len(indices), batch_size):
            chunk = indices[i : i + batch_size]
            rows = torch.tensor([targets[k] for k in chunk], device=device)
            cache = copy.deepcopy(head.past_key_values)
            cache.batch_repeat_interleave(len(chunk))
            with torch.no_grad():
                logits = model(input_ids=rows, past_key_values=cache, use_cache=True,
                               attention_mask=torch.ones((len(chunk), len(prompt) + length), dtype=torch.long,
                                                         device=device)).logits
            rest = logits[:, : length - 1].float().log_softmax(dim=-1)  # predicts tokens 2..length
            for j, k in enumerate(chunk):
                nll = -float(first_logp[targets[k][0]])
                if length > 1:
                    picked = rest[j, torch.arange(length - 1, device=device), rows[j, 1:]]
                    nll -= float(picked.sum())
                out[k] = nll
    return [out[k] for k in range(len(targets))]


def _exposure(canary_nll: float, candidate_nll: list[float]) -> tuple[float, float]:
    """(extrapolated exposure, sampled exposure) of one canary, in bits, capped at ``log2(|space|)``.

    The sampled figure counts candidates at least as likely as the canary; it
    cannot exceed ``log2(len(candidate_nll) + 1)`` and is reported as a check on the fit.
    """
    from scipy import stats

    cap = math.log2(CANARY_SPACE)
    rank = 1 + sum(1 for c in candidate_nll if c <= canary_nll)
    sampled = math.log2((len(candidate_nll) + 1) / rank)
    shape, loc, scale = stats.skewnorm.fit(candidate_nll)
    cdf = float(stats.skewnorm.cdf(canary_nll, shape, loc=loc, scale=scale))
    extrapolated = cap if cdf <= 0 else min(cap, max(0.0, -math.log2(cdf)))
    return extrapolated, sampled


def canary_exposure(model: Any, tokenizer: Any, canaries: Sequence[str], device: torch.device, *,
                    seed: int = 0, n_candidates: int = EXPOSURE_CANDIDATES,
                    on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Exposure of each canary under ``model`` (a peft model) and under its base model.

    ``on_progress(done, total)`` is called after each canary (it may raise to stop the measurement).

    Returns:
        ``{"count", "randomness_space", "candidates", "exposure": [...], "exposure_base": [...],
        "exposure_sampled": [...], "mean_exposure", "mean_exposure_base", "max_exposure"}``
        (bits; lists in canary order).
    """
    rng = random.Random(f"canary-candidates:{seed}")
    with _standard_attention(model):
        per_canary: list[tuple[float, float, float]] = []
        for text in canaries:
            prefix, secret = split_canary(text)
            prompt = _encode(tokenizer, prefix, special=True) or [tokenizer.eos_token_id]
            candidates = [" ".join(str(rng.randrange(10)) for _ in range(CANARY_DIGITS)) for _ in range(n_candidates)]
            targets = [_encode(tokenizer, " " + s) for s in [secret, *candidates]]
            prompts = [prompt] * len(targets)
            trained = _sequence_nll(model, tokenizer, prompts, targets, device)
            with model.disable_adapter():
                base = _sequence_nll(model, tokenizer, prompts, targets, device)
            exposure, sampled = _exposure(trained[0], trained[1:])
            exposure_base, _ = _exposure(base[0], base[1:])
            per_canary.append((exposure, exposure_base, sampled))
            if on_progress is not None:
                on_progress(len(per_canary), len(canaries))
    exposures = [e for e, _, _ in per_canary]
    bases = [b for _, b, _ in per_canary]
    return {
        "count": len(canaries),
        "randomness_space": CANARY_SPACE,
        "candidates": n_candidates,
        "exposure": exposures,
        "exposure_base": bases,
        "exposure_sampled": [s for _, _, s in per_canary],
        "mean_exposure": sum(exposures) / len(exposures) if exposures else None,
        "mean_exposure_base": sum(bases) / len(bases) if bases else None,
        "max_exposure": max(exposures) if exposures else None,
    }


def extraction_probe(model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]],
                     targets: Sequence[ProbeTarget], device: torch.device, *,
                     on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Prompt with the text before each allowed value and count exact greedy completions.

    ``on_progress(done, total)`` is called after each target (it may raise to stop the probe).

    Targets whose record or field is missing, or whose span is empty, are
    counted as ``skipped`` (never guessed at).

    Returns:
        ``{"probed", "extracted", "rate", "skipped", "by_entity_type": {type: {"probed", "extracted"}}}``.
    """
    by_type: dict[str, dict[str, int]] = {}
    probed = extracted = skipped = 0
    with _standard_attention(model):
        for done, target in enumerate(targets, start=1):
            if on_progress is not None and done > 1:
                on_progress(done - 1, len(targets))
            located = _locate(tokenizer, records, target)
            if located is None:
                skipped += 1
                continue
            prompt, value = located
            budget = len(_encode(tokenizer, value)) + PROBE_EXTRA_TOKENS
            ids = torch.tensor([prompt], device=device)
            with torch.no_grad():
                generated = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, do_sample=False,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                )
            text = tokenizer.decode(generated[0, len(prompt):], skip_special_tokens=True)
            hit = value in text
            probed += 1
            extracted += hit
            counts = by_type.setdefault(target.entity_type, {"probed": 0, "extracted": 0})
            counts["probed"] += 1
            counts["extracted"] += hit
    return {
        "probed": probed,
        "extracted": extracted,
        "rate": extracted / probed if probed else None,
        "skipped": skipped,
        "by_entity_type": dict(sorted(by_type.items())),
    }


def _locate(tokenizer: Any, records: Sequence[Mapping[str, Any]], target: ProbeTarget) -> tuple[list[int], str] | None:
    """(prompt token ids, value) for a target, or ``None`` when it cannot be found.

    The prompt is the record up to the value, tokenised as training saw it:
    chat records rendered with the model's chat template, a completion after
    its prompt, text from its start (cut to the last PROBE_CONTEXT_CHARS
    characters of the field before the value).
    """
    if not 0 <= target.record < len(records):
        return None
    record = copy.deepcopy(records[target.record])
    try:
        slots = {path: (container, key) for path, container, key in iter_text_slots(record)}
    except Exception:
        return None
    if target.field not in slots:
        return None
    container, key = slots[target.field]
    text = container[key]
    if not isinstance(text, str) or not 0 <= target.start < target.end <= len(text):
        return None
    # Trailing spaces stay out of the prompt: tokenizers attach them to the next word, so a prompt
    # ending in one is text the model never saw in training.
    value, before = text[target.start : target.end], text[: target.start][-PROBE_CONTEXT_CHARS:].rstrip(" ")
    if "messages" in record:
        match = re.match(r"messages\[(\d+)\]", target.field)
        if match is None or not getattr(tokenizer, "chat_template", None):
            return None
        container[key] = before + _SENTINEL
        index = int(match.group(1))
        conversation = [{"role": m.get("role"), "content": _content_text(m.get("content"), "content")}
                        for m in record["messages"][: index + 1]]
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
        ids = _encode(tokenizer, rendered[: rendered.index(_SENTINEL)], special=False)
    elif target.field == "completion":
        ids = _encode(tokenizer, record["prompt"], special=True) + _encode(tokenizer, before, special=False)
    else:
        ids = _encode(tokenizer, before, special=True)
    if not ids:
        ids = [tokenizer.eos_token_id]
    return ids, value


def _encode(tokenizer: Any, text: str, *, special: bool = False) -> list[int]:
    """Token ids of ``text``; ``special`` adds the tokenizer's own special tokens (BOS), as training does."""
    return list(tokenizer(text, add_special_tokens=special).input_ids)
