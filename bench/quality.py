"""Benchmark: the dataset quality report beside the scan, on a generated JSONL file.

    .venv/bin/python bench/quality.py            # 4 MB, the demo model's tokenizer (SmolLM2), with the scan
    .venv/bin/python bench/quality.py --quick    # 256 KB, the tiny test tokenizer, quality pass only
    .venv/bin/python bench/quality.py --record   # also append the figures to bench/RESULTS.md

The file: chat records of 1-6 turns from a fixed vocabulary (English mostly, some German and French),
with 5 % exact copies and 5 % near copies of earlier records, and some role-order problems, so that
every part of the report has work to do.

Measured, JSONL bytes over wall time (CPU time printed too: the machine is shared):

* the quality pass alone (:class:`appliance.files.quality.QualityPass` on parsed records, in the
  intake's batches of 256, then its summary and sketch): the target is >= 1 MB/s on two cores;
* the whole intake pass as an upload runs it (:class:`appliance.files.pipeline.JsonlIntake`: parse,
  scan, policy, redaction, encryption), without and with the quality pass (which runs a batch behind
  the scan, in a thread of its own); the quality pass's share of the upload time is
  (with - without) / with, in wall time and in CPU time.

Each figure is the best of ``--repeat`` runs (3; the two intake variants alternate): on a machine
shared with other work the wall times are noisy, the CPU times much less so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.files.quality import QualityPass, TokenCounter  # noqa: E402
from appliance.scanning import parse_line  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BATCH = 256
TOKENIZERS = {"demo": "the demo model's (SmolLM2-135M-Instruct, read from its GGUF)",
              "tiny": "the tiny test model's (byte-level BPE, 512 tokens)", "none": "none (lengths in characters)"}
WORDS = {
    "en": ("the order invoice customer shipping refund account team support product service delivery "
           "payment warehouse update release version ticket request report question answer and of to is in "
           "that it for you with this are on be was have not what can").split(),
    "de": "der die und das ist nicht ich sie mit den ein eine zu auf für auch Bestellung Rechnung Kunde".split(),
    "fr": "le la les et est des une que pour dans pas vous qui sur sont avec commande facture client".split(),
}


def generate(target_bytes: int, seed: int = 20261204) -> bytes:
    """A JSONL file of about ``target_bytes``: chat records with copies, near copies and some problems."""
    rng = random.Random(seed)
    lines: list[str] = []
    records: list[dict] = []
    size = 0
    while size < target_bytes:
        roll = rng.random()
        if records and roll < 0.05:
            record = rng.choice(records)  # an exact copy
        elif records and roll < 0.10:
            source = rng.choice(records)  # a near copy: one word changed
            record = json.loads(json.dumps(source))
            last = record["messages"][-1]
            words = last["content"].split()
            words[rng.randrange(len(words))] = "changed"
            last["content"] = " ".join(words)
        else:
            lang = rng.choices(["en", "de", "fr"], [0.8, 0.1, 0.1])[0]
            turns = rng.randint(1, 3)
            messages = [{"role": "system", "content": "You answer customer questions briefly."}] \
                if rng.random() < 0.3 else []
            for _ in range(turns):
                for role in ("user", "assistant"):
                    n = rng.randint(8, 120)
                    messages.append({"role": role, "content": " ".join(rng.choice(WORDS[lang]) for _ in range(n))})
            if rng.random() < 0.02:
                messages.insert(-1, dict(messages[-2]))  # two user turns in a row
            record = {"messages": messages}
        records.append(record)
        line = json.dumps(record, ensure_ascii=False)
        lines.append(line)
        size += len(line.encode()) + 1
    return ("\n".join(lines) + "\n").encode()


def token_counter(which: str) -> TokenCounter | None:
    if which == "none":
        return None
    if which == "tiny":
        from appliance.modelstore.tiny import build_tiny_tokenizer

        return TokenCounter("tiny", build_tiny_tokenizer())
    from transformers import AutoTokenizer

    from appliance.modelstore.demo import demo_gguf_path

    path = demo_gguf_path()
    return TokenCounter("SmolLM2-135M-Instruct",
                        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True), 8192)


def quality_alone(data: bytes, tokens: TokenCounter | None) -> tuple[float, float, dict]:
    """(wall s, CPU s, summary) of the quality pass over ``data``'s records (parsing included)."""
    t0, c0 = time.perf_counter(), time.process_time()
    q = QualityPass(tokens=tokens)
    batch = []
    for i, raw in enumerate(data.splitlines()):
        record = parse_line(raw, i + 1)
        if record is not None:
            batch.append((i, record))
        if len(batch) >= BATCH:
            q.add(batch)
            batch = []
    q.add(batch)
    summary = q.summary()
    q.sketch()
    return time.perf_counter() - t0, time.process_time() - c0, summary


def intake(data: bytes, tokens: TokenCounter | None, scanner, policy, blobs, *, quality: bool) -> tuple[float, float]:
    """(wall s, CPU s) of the upload's intake pass over ``data`` in 1 MiB chunks, as the upload feeds it."""
    from appliance.files.pipeline import JsonlIntake

    t0, c0 = time.perf_counter(), time.process_time()
    writer = blobs.create(f"file-bench{int(quality)}", "bench", "file")
    q = QualityPass(tokens=tokens) if quality else None
    pipe = JsonlIntake(writer, scanner, policy, quality=q)
    for start in range(0, len(data), 1 << 20):
        pipe.feed(data[start:start + (1 << 20)])
    pipe.close()
    if q is not None:
        q.sketch()
    writer.abort()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 KB, tiny tokenizer, no scan")
    parser.add_argument("--mb", type=float, default=None, help="size of the generated file in MB [4]")
    parser.add_argument("--tokenizer", choices=["demo", "tiny", "none"], default=None, help="[demo; quick: tiny]")
    parser.add_argument("--no-scan", action="store_true", help="measure the quality pass only")
    parser.add_argument("--repeat", type=int, default=None, help="runs per figure, the best kept [3; quick: 1]")
    parser.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args(argv)
    size = int((args.mb or (0.25 if args.quick else 4.0)) * 1_000_000)
    which = args.tokenizer or ("tiny" if args.quick else "demo")
    scan = not (args.no_scan or args.quick)
    repeat = args.repeat or (1 if args.quick else 3)

    data = generate(size)
    mb = len(data) / 1_000_000
    tokens = token_counter(which)
    quality_alone(data[:data.rfind(b"\n", 0, 50_000) + 1], tokens)  # warm up (tokenizer caches, numpy)
    runs = [quality_alone(data, tokens) for _ in range(repeat)]
    wall, cpu, summary = min(r[0] for r in runs), min(r[1] for r in runs), runs[0][2]
    rate = mb / wall
    print(f"file: {mb:.2f} MB, {summary['records']} records; tokenizer: {which}; {os.cpu_count()} CPUs")
    print(f"quality pass alone: {wall:.2f} s wall ({rate:.2f} MB/s), {cpu:.2f} s CPU ({mb / cpu:.2f} MB per CPU s)")
    print(f"  found: {summary['exact_duplicates']['count']} exact, {summary['near_duplicates']['count']} near "
          f"duplicates; problems {({k: v['count'] for k, v in summary['problems'].items()})}; "
          f"languages {summary['languages']}; tokens {summary['tokens']}")
    result = {"mb": mb, "records": summary["records"], "tokenizer": which, "quality_s": wall, "quality_cpu_s": cpu,
              "quality_mb_s": rate}
    if scan:
        from appliance.crypto.envelope import FileKeyProvider
        from appliance.crypto.keyfile import create_keyring
        from appliance.policy import load_policy
        from appliance.scanning.engine import get_scanner
        from appliance.storage.blobs import BlobStore

        scanner, policy = get_scanner(), load_policy(REPO / "policies" / "default.yaml")
        scanner.scan([(0, "text", "warm up the pipeline, Jane Doe")])
        with tempfile.TemporaryDirectory() as tmp:
            create_keyring(Path(tmp) / "master.key")
            blobs = BlobStore(Path(tmp) / "blobs", FileKeyProvider(Path(tmp) / "master.key"))
            runs = {False: [], True: []}
            for _ in range(repeat):
                for quality in (False, True):
                    runs[quality].append(intake(data, tokens, scanner, policy, blobs, quality=quality))
        without, without_cpu = (min(r[i] for r in runs[False]) for i in (0, 1))
        with_q, with_cpu = (min(r[i] for r in runs[True]) for i in (0, 1))
        share, cpu_share = (with_q - without) / with_q, (with_cpu - without_cpu) / with_cpu
        print(f"upload intake pass without the quality pass: {without:.2f} s ({mb / without:.2f} MB/s), "
              f"{without_cpu:.2f} s CPU")
        print(f"upload intake pass with it: {with_q:.2f} s ({mb / with_q:.2f} MB/s), {with_cpu:.2f} s CPU")
        print(f"quality pass's share of the upload time: {share:.1%} wall, {cpu_share:.1%} CPU (the difference); "
              f"its own time alone over the upload's: {wall / with_q:.1%} wall, {cpu / with_cpu:.1%} CPU")
        result.update(without_s=without, with_s=with_q, without_cpu_s=without_cpu, with_cpu_s=with_cpu, share=share,
                      cpu_share=cpu_share, own_share=wall / with_q, own_cpu_share=cpu / with_cpu)
    print(json.dumps(result))
    if args.record:
        record(result)
    return 0 if rate >= 1.0 else 1


def record(r: dict) -> None:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## `bench/quality.py` — the dataset quality report beside the scan, {now} (issue 24)\n",
             f"Machine: {os.cpu_count()} cores, no GPU ({platform.machine()}, Python {platform.python_version()}), "
             "other work running in parallel. File: generated chat JSONL, "
             f"{r['mb']:.2f} MB, {r['records']} records (5 % exact and 5 % near copies); tokenizer: "
             f"{TOKENIZERS[r['tokenizer']]}.\n",
             "| | wall s | MB/s | CPU s | MB per CPU s |", "|---|---:|---:|---:|---:|",
             f"| quality pass alone (parse, tokens, lengths, duplicates, problems, languages, sketch) | "
             f"{r['quality_s']:.2f} | **{r['quality_mb_s']:.2f}** | {r['quality_cpu_s']:.2f} | "
             f"{r['mb'] / r['quality_cpu_s']:.2f} |"]
    if "with_s" in r:
        lines += [f"| upload intake pass without it (parse, scan, policy, redaction, encryption) | "
                  f"{r['without_s']:.2f} | {r['mb'] / r['without_s']:.2f} | {r['without_cpu_s']:.2f} | "
                  f"{r['mb'] / r['without_cpu_s']:.2f} |",
                  f"| upload intake pass with it | {r['with_s']:.2f} | {r['mb'] / r['with_s']:.2f} | "
                  f"{r['with_cpu_s']:.2f} | {r['mb'] / r['with_cpu_s']:.2f} |",
                  "", f"The quality pass's share of the upload time: **{r['share']:.1%}** wall, **{r['cpu_share']:.1%}** "
                  f"CPU (the difference); its own time alone over the upload's: {r['own_share']:.1%} wall, "
                  f"{r['own_cpu_share']:.1%} CPU."]
    with open(REPO / "bench" / "RESULTS.md", "a") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
