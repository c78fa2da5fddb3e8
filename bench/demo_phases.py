"""The demo job's post-training phases against its training time (issue 23's "at most a quarter").

    .venv/bin/python bench/demo_phases.py                 # 22 records, the canaries that fit, the probe
    .venv/bin/python bench/demo_phases.py --records 80    # enough records for 4 canaries

Runs what a job runs, in process: :func:`appliance.training.train` on the demo model
(SmolLM2-135M-Instruct) with "auto" hyperparameters, a support-style dataset of question/answer
records (an allowed email in some answers, so the extraction probe has values to probe), the
canaries a job would insert (as many as fit 5% of the examples, repetitions scaled down to fit:
:func:`appliance.jobs.memorization.fit_canaries`) and the probe's default samples. Times are taken
from the run's own events: training (from the start to the validation after training), canary
exposure, the extraction probe and the sample generations; the script prints each phase's share of
the training time. Measured on a 135M model on this machine's CPU; on a GPU with a 7B model the
shares differ and nothing here measures them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: Question/answer facts of a support dataset; each fact is asked several ways.
FACTS = [
    ("the code name of the Orion project", "The code name of the Orion project is Bluefin-7."),
    ("where expense reports go", "Send expense reports to ledger.quail@example.com."),
    ("the colour of the Orion logo", "The Orion logo is teal with a silver star."),
    ("the Orion launch date", "The Orion launch is on the ninth of March."),
    ("the team that builds Orion", "Orion is built by the Kestrel team."),
    ("who approves travel", "Travel is approved by travel.desk@example.com."),
]
ASKS = ["What is {}?", "Tell me {}.", "Do you know {}?", "I need {}.", "Quick question: {}?", "Remind me of {}."]
EMAILS = ["ledger.quail@example.com", "travel.desk@example.com"]


def support_records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        topic, answer = FACTS[i % len(FACTS)]
        question = ASKS[(i // len(FACTS)) % len(ASKS)].format(topic)
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


def probe_targets(records: list[dict]) -> list:
    from appliance.training.memorization import ProbeTarget

    out = []
    for index, record in enumerate(records):
        text = record["messages"][1]["content"]
        for email in EMAILS:
            if email in text:
                start = text.index(email)
                out.append(ProbeTarget(index, "messages[1].content", start, start + len(email), "EMAIL_ADDRESS"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="an imported model directory (default: the demo model)")
    parser.add_argument("--records", type=int, default=22)
    parser.add_argument("--canaries", type=int, help="default: as many as fit 5%% of the examples (at most 4)")
    parser.add_argument("--probe-samples", type=int, help="default: the job's default")
    args = parser.parse_args()

    from appliance.jobs.memorization import DEFAULTS, MAX_CANARY_SHARE, fit_canaries
    from appliance.training import TrainingSpec, train
    from appliance.training.memorization import new_canaries
    from bench.train import ensure_demo_model

    model_dir = args.model_dir or ensure_demo_model()
    records = support_records(args.records)
    canaries = args.canaries if args.canaries is not None else min(4, int(MAX_CANARY_SHARE * len(records)))
    option = fit_canaries({**DEFAULTS, "canaries": canaries}, len(records), None)
    targets = probe_targets(records)[: args.probe_samples or DEFAULTS["probe_samples"]]
    print(f"model {model_dir.name}; {len(records)} records; {canaries} canaries x {option['canary_repetitions']}; "
          f"extraction probe on {len(targets)} allowed values; auto hyperparameters", flush=True)

    marks: list[tuple[float, str, str]] = []
    t0 = time.monotonic()

    def on_event(event) -> None:
        marks.append((time.monotonic() - t0, event.type, event.message or ""))
        if event.type != "train" or event.step == event.total_steps:
            print(f"{marks[-1][0]:8.1f} s  {event.type:10s} step {event.step}/{event.total_steps}  {event.message}",
                  flush=True)

    spec = TrainingSpec.from_method({"type": "lora", "lora": {"hyperparameters": {}}})
    result = train(spec, model_dir, records, canaries=new_canaries(canaries) if canaries else (),
                   canary_repetitions=option["canary_repetitions"], probe_targets=targets, device="cpu",
                   on_event=on_event)
    total = time.monotonic() - t0

    def first(pred) -> float | None:
        return next((t for t, kind, msg in marks if pred(kind, msg)), None)

    trained = first(lambda k, m: k == "validation" and "after" in m) or first(
        lambda k, m: k == "validation" and "canary" not in m and "probe" not in m and "before" not in m)
    canary_start = first(lambda k, m: m.startswith("measuring canary exposure"))
    canary_end = first(lambda k, m: k == "validation" and m.startswith("canary exposure"))
    probe_start = first(lambda k, m: m.startswith("extraction probe: prompting"))
    probe_end = first(lambda k, m: k == "validation" and m.startswith("extraction probe:"))
    print(f"\nstatus {result.status}; {result.metrics.steps} steps; wall {total:.1f} s")
    train_s = trained if trained is not None else None
    rows = [("training (start to the validation after training)", train_s)]
    if trained is not None and canary_start is not None:
        rows.append(("sample generations (shown apart, not a privacy phase)", canary_start - trained))
    if canary_start is not None and canary_end is not None:
        rows.append(("canary exposure", canary_end - canary_start))
    if probe_start is not None and probe_end is not None:
        rows.append(("extraction probe", probe_end - probe_start))
    phases = sum(s for name, s in rows[1:] if not name.startswith("sample"))
    for name, seconds in rows:
        share = f"{seconds / train_s:.2f}x training" if train_s and seconds is not None else ""
        print(f"  {name:52s} {seconds:8.1f} s  {share}")
    if train_s:
        print(f"  {'post-training phases (exposure and probe)':52s} {phases:8.1f} s  {phases / train_s:.2f}x training"
              f"  (target <= 0.25x)")


if __name__ == "__main__":
    main()
