"""The dataset quality pass: counts, lengths, duplicates, shape problems, languages and leakage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from appliance.files.quality import (
    NEAR_THRESHOLD,
    QualityPass,
    TokenCounter,
    detect_language,
    leakage,
    load_sketch,
    minhash,
)

pytestmark = pytest.mark.no_database

SENTENCES = [
    "Our warehouse in the north ships every order within two working days of payment.",
    "A refund is issued to the original card once the returned parcel has been inspected.",
    "Support tickets about invoices are answered by the billing team before noon each day.",
    "The mobile application stores your preferences locally and syncs them when online.",
]


def chat(user: str, assistant: str, *extra: dict) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}, *extra]}


def run(records: list[dict], **kw) -> QualityPass:
    q = QualityPass(**kw)
    batch = list(enumerate(records))
    for k in range(0, len(batch), 3):  # several batches: state carries over
        q.add(batch[k:k + 3])
    return q


def test_exact_and_near_duplicates_are_counted_with_lines_and_no_text():
    records = [chat(f"Question {i}: {s}", "Noted.") for i, s in enumerate(SENTENCES)]
    records.append(chat(SENTENCES[0].upper(), "Noted."))  # line 1 without its "Question 0: ": near, not exact
    records.append(records[1])  # exact copy of line 2
    records.append(chat("  Question 1:   " + SENTENCES[1].upper(), "noted."))  # same text up to case and spacing
    records.append(chat(f"Question 9: {SENTENCES[2]}", "Noted!"))  # near copy of line 3
    report = run(records).summary()
    assert report["records"] == 8 and report["kinds"] == {"chat": 8}
    exact = report["exact_duplicates"]
    assert exact["count"] == 2 and exact["groups"] == 1
    assert exact["examples"] == [{"records": [1, 5, 6], "lines": [2, 6, 7], "count": 3}]
    near = report["near_duplicates"]
    assert near["count"] == 2
    assert near["examples"] == [{"records": [0, 4], "lines": [1, 5]}, {"records": [2, 7], "lines": [3, 8]}]
    assert {a["code"] for a in report["advice"]} >= {"exact_duplicates", "near_duplicates", "no_tokenizer"}
    dumped = json.dumps(report)
    assert "warehouse" not in dumped and "refund" not in dumped.lower()


def test_empty_one_sided_and_role_order_problems_name_their_lines():
    records = [
        chat("Hi", "Hello"),                                                        # 1: fine
        {"messages": [{"role": "assistant", "content": "Unprompted"}]},             # 2: one-sided, starts badly
        {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": ""}]},  # 3: empty
        chat("Q", "A", {"role": "user", "content": "and then?"}),                   # 4: ends on a user turn
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "c"}]},                      # 5: repeated role
        {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "be brief"},
                      {"role": "assistant", "content": "c"}]},                      # 6: system not first
        {"prompt": "", "completion": "an answer"},                                  # 7: no prompt
        {"text": ""},                                                               # 8: empty
        {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}]},                      # 9: an empty message
    ]
    problems = run(records).summary()["problems"]
    assert problems == {
        "empty_conversation": {"count": 2, "lines": [3, 8]},
        "empty_message": {"count": 1, "lines": [9]},
        "ends_without_answer": {"count": 1, "lines": [4]},
        "no_user_message": {"count": 2, "lines": [2, 7]},
        "repeated_role": {"count": 1, "lines": [5]},
        "starts_without_user": {"count": 1, "lines": [2]},
        "system_not_first": {"count": 1, "lines": [6]},
    }


@pytest.mark.parametrize(("text", "lang"), [
    ("The order was shipped to the customer and it is on the way.", "en"),
    ("Die Bestellung ist nicht angekommen und ich warte auf die Lieferung.", "de"),
    ("La commande est arrivée et le client est content pour une fois.", "fr"),
    ("El pedido no ha llegado y el cliente está esperando la respuesta.", "es"),
    ("Заказ был отправлен клиенту вчера вечером.", "ru"),
    ("注文は昨日発送されました。", "ja"),
    ("订单昨天已经发货了", "zh"),
    ("SELECT id FROM orders WHERE total > 10;", "und"),
    ("", "und"),
])
def test_language_detection(text, lang):
    assert detect_language(text) == lang


def test_language_mix_is_reported_with_advice():
    records = [chat("Where is my order? It is late and the box is not here.", "It is on the way.")] * 3 + \
        [chat("Wo ist meine Bestellung? Sie ist nicht da und ich warte.", "Sie ist auf dem Weg.")] * 2
    report = run(records).summary()
    assert report["languages"] == {"en": 3, "de": 2}
    assert any(a["code"] == "language_mix" for a in report["advice"])


class CharTokenizer:
    """A stand-in tokenizer: one token per character, two tokens of markup per chat message."""

    chat_template = "x"

    def __call__(self, texts, **_):
        return {"input_ids": [list(t) for t in texts]}

    def apply_chat_template(self, messages, tokenize=True):
        return [0, 1]


def test_tokens_lengths_and_max_seq_length():
    records = [chat("a" * 10, "b" * 10), chat("a" * 100, "b" * 100), {"text": "c" * 40}]
    report = run(records, tokens=TokenCounter("tiny", CharTokenizer(), context_length=4096),
                 max_seq_length=64).summary()
    assert report["tokenizer"] == "tiny" and report["length_unit"] == "tokens"
    assert report["tokens"] == (20 + 4) + (200 + 4) + 40
    assert report["lengths"]["max"] == 204 and report["lengths"]["min"] == 24
    assert report["over_max_seq_length"] == {"count": 1, "lines": [2]}
    assert sum(b["records"] for b in report["lengths"]["histogram"]) == 3
    assert not any(a["code"] == "no_tokenizer" for a in report["advice"])
    assert any(a["code"] == "over_max_seq_length" and "max_seq_length 64" in a["message"] for a in report["advice"])
    # the default limit is the jobs' auto cap, bounded by the model's context
    assert QualityPass(tokens=TokenCounter("t", CharTokenizer(), context_length=512)).max_seq_length == 512


def test_minhash_is_vectorised_per_record_and_estimates_similarity():
    docs = [s.encode() for s in SENTENCES] + [SENTENCES[0].replace("two", "three").encode(), b"", b"ab"]
    together = minhash(docs)
    one_by_one = np.concatenate([minhash([d]) for d in docs])
    assert together.shape == (len(docs), 64) and (together == one_by_one).all()
    agree = (together[0] == together[4]).mean()
    assert agree >= NEAR_THRESHOLD - 0.1 and (together[0] == together[1]).mean() < 0.2


def test_leakage_between_training_and_validation_sketches():
    train = run([chat(f"{i}: {s}", "ok") for i, s in enumerate(SENTENCES)])
    valid = run([chat(f"1: {SENTENCES[1]}", "ok"),                  # exact
                 chat(f"2: {SENTENCES[2]}", "okay"),                # near
                 chat("Something else entirely, about the weather today in the hills.", "ok")])
    report = leakage(load_sketch(train.sketch()), load_sketch(valid.sketch()))
    assert report["records"] == 3
    assert report["exact"] == {"count": 1, "examples": [[2, 1]]}
    assert report["near"]["count"] == 1 and report["near"]["examples"] == [[3, 2]]
    assert report["share"] == round(2 / 3, 4) and "2 of 3" in report["advice"]


def test_a_real_tokenizer_counts_as_transformers_does():
    from appliance.modelstore.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    texts = ["Where is my parcel?", "", "Zwei Wörter und ein Satz."]
    expected = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    counter = TokenCounter("tiny", tokenizer)
    assert counter.count(texts) == expected and counter.per_message > 0


def test_the_intake_runs_the_pass_a_batch_behind_in_order_on_what_it_stores():
    from appliance.files.pipeline import BATCH_RECORDS, JsonlIntake
    from appliance.policy import load_default_policy

    class Writer:
        def derive_secret(self, purpose):
            return b"k" * 32

        def write(self, data):
            pass

    class Scanner:
        def scan(self, units, entities=None):
            return []

    records = [chat(f"{i}: {SENTENCES[i % 4]}", "ok") for i in range(BATCH_RECORDS * 2 + 7)]
    data = b"".join(json.dumps(r).encode() + b"\n" + (b"\n" if i == 3 else b"") for i, r in enumerate(records))
    intake = JsonlIntake(Writer(), Scanner(), load_default_policy(), quality=QualityPass())
    for start in range(0, len(data), 4096):
        intake.feed(data[start:start + 4096])
    report = intake.close().quality
    direct = QualityPass()
    direct.add([(i + (i > 3), r) for i, r in enumerate(records)])  # the blank line after line 4 shifts lines
    assert report == direct.summary() and report["records"] == len(records)


def test_large_duplicate_groups_are_counted_exactly_and_the_largest_shown_first():
    records = [chat("hello", "hi")] * 30 + [chat("bye", "ciao")] * 3 + [chat(s, "ok") for s in SENTENCES]
    exact = run(records).summary()["exact_duplicates"]
    assert exact["count"] == 29 + 2 and exact["groups"] == 2
    assert exact["examples"][0] == {"records": [0, 1, 2, 3, 4], "lines": [1, 2, 3, 4, 5], "count": 30}
    assert exact["examples"][1] == {"records": [30, 31, 32], "lines": [31, 32, 33], "count": 3}
