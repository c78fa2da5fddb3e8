"""A hyperparameter search against the same jobs run one after another (issue 24's "within 1.2x").

    .venv/bin/python bench/search.py                              # 12 records, 4 learning rates, 2 epochs, 2 rounds
    .venv/bin/python bench/search.py --results bench/RESULTS.md   # also append the figures there

In one run, against a real ``appliance serve`` on loopback (its scheduler, one device, sandboxed
workers) with the demo model (SmolLM2-135M-Instruct, imported from the demo GGUF once into
``bench/.cache``):

1. an untimed warm-up job (page cache, the first worker's imports);
2. **sequential**: 4 ordinary LoRA jobs, one per learning rate of :data:`LEARNING_RATES`, each
   created when the one before ended (as a script polling the API would do);
3. **search**: one search job over exactly those 4 values (``{"choice": [...]}``, sampler
   ``grid``: every combination once, in a seeded order; ``early_stopping`` ``none``, so no trial
   is cut short and both arms train the same 4 configurations to the end).

``--rounds`` repeats both arms, their order alternating (sequential first in odd rounds, the
search first in even ones), so that a machine whose load drifts favours neither; the ratio is
over the sums. Every other hyperparameter, the data, the seed and the memorisation options (no
canaries, no extraction probe) are the same in both arms. What differs, by design: a search
trial validates after every epoch but the last (``validate_every_epoch``, the pruner's reports),
a plain job does not; the script counts those passes and prints what one costs.

Wall time is create to terminal, as the client sees it (it polls every ``--poll`` seconds). Beside
it, the CPU seconds of the server process and of the workers (:class:`ProcessCpu`): on a machine
shared with other work, wall time measures the neighbours too. The breakdown per job comes from
the database's timestamps after the run: queued (created to claimed), worker start (claimed to the
worker's "Training ..." event: the sandbox, imports, the data decrypted), loading the model and the
validation before training, training (to the validation after
training), after training (sample generations, the adapter streamed), publish (the last worker
event to finished), and for the search the driver's gaps between one trial's end and the next
one's creation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from bench.load import free_port, machine, server_env, start_server, stop_server, wait_healthy  # noqa: E402

PROJECT = "bench"
LEARNING_RATES = [5e-4, 1e-3, 2e-3, 4e-3]
TARGET = 1.2
TERMINAL = ("succeeded", "failed", "cancelled")
#: Parts and where they are kept: plain facts with no personal data (nothing for the scanner to hold back).
SHELVES = ["north", "south", "east", "west", "upper", "lower"]


def records(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        part, shelf = f"P-{100 + i}", SHELVES[i % len(SHELVES)]
        answer = f"Part {part} is on the {shelf} shelf, bin {i % 7}."
        out.append({"messages": [{"role": "user", "content": f"Where is part {part} stored?"},
                                 {"role": "assistant", "content": answer}]})
    return out


class ProcessCpu:
    """CPU seconds of the server and of its descendants (the sandboxed workers), sampled from ``/proc``.

    The workers are not reaped into the server's ``cutime`` (the sandbox's own processes wait for them), so
    their CPU time is read while they run, at every poll: what a worker spends after the last poll before it
    exits (at most ``--poll`` seconds, sending its adapter) is not counted, in both arms alike.
    """

    def __init__(self, server: int) -> None:
        self.server, self.tick = server, os.sysconf("SC_CLK_TCK")
        #: (pid, start time) -> the last CPU seconds read
        self.seen: dict[tuple[int, int], float] = {}

    def sample(self) -> None:
        procs: dict[int, tuple[int, int, float]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            procs[int(entry)] = (int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / self.tick)
        inside = {self.server}
        grew = True
        while grew:
            grew = False
            for pid, (ppid, _, _) in procs.items():
                if ppid in inside and pid not in inside:
                    inside.add(pid)
                    grew = True
        for pid in inside:
            if pid in procs:
                self.seen[(pid, procs[pid][1])] = procs[pid][2]

    def totals(self) -> tuple[float, float]:
        """The server's CPU seconds and its descendants' (as last sampled)."""
        self.sample()
        server = sum(v for (pid, _), v in self.seen.items() if pid == self.server)
        return server, sum(v for (pid, _), v in self.seen.items() if pid != self.server)


def hyperparameters(args: argparse.Namespace, learning_rate: Any) -> dict[str, Any]:
    return {"learning_rate": learning_rate, "n_epochs": args.epochs, "batch_size": args.batch_size, "lora_r": 8,
            "max_seq_length": args.max_seq_length, "checkpoint_every_steps": 0}


def setup_home(home: Path) -> dict[str, str]:
    """Initialise ``home``, import the demo model; a data-owner and a trainer token."""
    from appliance.audit.service import AuditContext
    from appliance.bootstrap import initialize, open_initialized
    from appliance.catalog.service import DEMO_MODEL_NAME, CatalogService
    from appliance.crypto.envelope import FileKeyProvider
    from appliance.identity.roles import Role
    from appliance.identity.service import IdentityService
    from appliance.settings import load_settings
    from appliance.storage.blobs import BlobStore
    from bench.train import ensure_demo_model

    settings = load_settings(server_env(home, None))
    ctx = AuditContext.cli("bench")
    initialize(settings, ctx)
    db = open_initialized(settings)
    try:
        catalog = CatalogService(db, BlobStore(settings.blobs_dir, FileKeyProvider(settings.key_file)),
                                 settings.models_dir, settings.signing_key_file)
        catalog.import_model(ctx, ensure_demo_model(), DEMO_MODEL_NAME, demo=True)
        identity = IdentityService(db)
        identity.create_project(ctx, PROJECT)
        identity.create_user(ctx, "bench")
        tokens = {}
        for key, role in {"owner": Role.DATA_OWNER, "trainer": Role.TRAINER}.items():
            identity.grant(ctx, "bench", role, PROJECT)
            tokens[key] = identity.create_token(ctx, "bench", role, PROJECT, description="bench/search.py")[1]
        return tokens
    finally:
        db.dispose()


class Api:
    def __init__(self, base_url: str, tokens: dict[str, str], poll: float, cpu: ProcessCpu) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=120)
        self.tokens, self.poll, self.cpu = tokens, poll, cpu

    def upload(self, rows: list[dict[str, Any]]) -> str:
        body = "".join(json.dumps(r) + "\n" for r in rows).encode()
        resp = self.http.post("/v1/files", headers=self._auth("owner"), data={"purpose": "fine-tune"},
                              files={"file": ("parts.jsonl", body, "application/jsonl")})
        if resp.status_code != 201:
            raise SystemExit(f"upload failed: HTTP {resp.status_code}: {resp.text[:500]}")
        return resp.json()["id"]

    def run(self, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """Create a job and wait for its end; the job and the wall seconds from the request to seeing it end."""
        started = time.monotonic()
        resp = self.http.post("/v1/fine_tuning/jobs", headers=self._auth("trainer"), json=body)
        if resp.status_code != 200:
            raise SystemExit(f"job creation failed: HTTP {resp.status_code}: {resp.text[:800]}")
        job = resp.json()
        while job["status"] not in TERMINAL:
            time.sleep(self.poll)
            self.cpu.sample()
            job = self.http.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=self._auth("trainer")).json()
        return job, time.monotonic() - started

    def _auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}


def breakdown(home: Path, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Per job, the seconds of each stage, from the database's own timestamps."""
    from sqlalchemy import select

    from appliance.bootstrap import open_initialized
    from appliance.jobs.models import FineTuningJob, JobEvent
    from appliance.settings import load_settings

    db = open_initialized(load_settings(server_env(home, None)))
    out = {}
    try:
        with db.read() as s:
            for job_id in job_ids:
                job = s.get(FineTuningJob, job_id)
                events = list(s.execute(select(JobEvent.created_at, JobEvent.type, JobEvent.message, JobEvent.data)
                                        .where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
                out[job_id] = stages(job, events)
    finally:
        db.dispose()
    return out


def stages(job: Any, events: list[Any]) -> dict[str, Any]:
    def at(pred) -> Any:
        return next((e.created_at for e in events if pred(e)), None)

    def secs(a, b) -> float | None:
        return (b - a).total_seconds() if a is not None and b is not None else None

    training = at(lambda e: e.message.startswith("Training "))
    before = at(lambda e: e.type == "metrics" and e.message.startswith("validation loss before"))
    per_epoch = [e for e in events if e.type == "metrics" and e.message.startswith("validation loss after epoch")]
    last_train = [e.created_at for e in events if e.type == "metrics" and (e.data or {}).get("type") == "train"]
    after = at(lambda e: e.type == "metrics" and e.message.startswith("validation loss after training"))
    published = at(lambda e: e.message.startswith("New fine-tuned model created"))
    worker_last = max((e.created_at for e in events if published is None or e.created_at < published), default=None)
    row = {
        "created": job.created_at, "started": job.started_at, "finished": job.finished_at,
        "total": secs(job.created_at, job.finished_at),
        "queued": secs(job.created_at, job.started_at),
        "worker start": secs(job.started_at, training),
        "load and validate before": secs(training, before),
        "training": secs(before, after),
        "validation after": secs(last_train[-1] if last_train else None, after),
        "after training": secs(after, worker_last),
        "publish": secs(worker_last, job.finished_at),
        "per-epoch validations": len(per_epoch),
        "valid_loss": (job.metrics or {}).get("valid_loss_after"),
        "learning_rate": (job.hyperparameters or {}).get("learning_rate"),
        "trial": job.trial_number,
    }
    return row


def fmt(value: Any) -> str:
    return "" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def render(result: dict[str, Any]) -> str:
    meta, rounds = result["meta"], result["rounds"]
    seq_wall = sum(r["sequential"]["wall_s"] for r in rounds)
    search_wall = sum(r["search"]["wall_s"] for r in rounds)
    ratio = search_wall / seq_wall
    lines = [
        f"## `bench/search.py` — a search of 4 trials against the same 4 jobs one after another, {meta['date']} "
        "(issue 24)",
        "",
        f"Machine: {meta['machine']}; {meta['load']}. Model: SmolLM2-135M-Instruct (the demo GGUF), "
        f"`appliance serve` on loopback (SQLite), one training device (`max_concurrent` 1), sandboxed workers. "
        f"Data: {meta['records']} question/answer records (10 % held out for validation), LoRA r 8, "
        f"{meta['epochs']} epochs, batch {meta['batch_size']}, max_seq_length {meta['max_seq_length']}, seed 1, "
        "no canaries, no extraction probe. Learning rates "
        + ", ".join(f"{lr:g}" for lr in LEARNING_RATES)
        + ": as 4 plain jobs one after another (each created when the last ended, the client polling every "
        f"{meta['poll']} s), and as one search with `learning_rate: {{\"choice\": [...]}}`, sampler `grid`, "
        f"early stopping `none`. {len(rounds)} round(s), the arms' order alternating (round 1 sequential first); "
        "a warm-up job ran first, untimed.",
        "",
        "| round | arm | wall s (create → terminal) | jobs' own s | overhead s | workers' CPU s | server CPU s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for n, r in enumerate(rounds, 1):
        for arm, name in (("sequential", "4 jobs one after another"), ("search", "search of 4 trials")):
            a = r[arm]
            lines.append(f"| {n} | {name} | {a['wall_s']:.1f} | {a['own_s']:.1f} | {a['wall_s'] - a['own_s']:.1f} | "
                         f"{a['worker_cpu_s']:.1f} | {a['server_cpu_s']:.1f} |")
    seq_cpu = sum(r["sequential"]["worker_cpu_s"] for r in rounds)
    search_cpu = sum(r["search"]["worker_cpu_s"] for r in rounds)
    lines += [
        "",
        f"**Ratio search / sequential, wall time: {ratio:.3f}x** (target ≤ {TARGET}x: "
        f"{'met' if ratio <= TARGET else 'NOT met'}); workers' CPU time: {search_cpu / seq_cpu:.3f}x.",
        "",
        "Per job (seconds, from the database's timestamps):",
        "",
        "| round | job | lr | total | queued | worker start | load + validate before | training | validation after "
        "| after training | publish | per-epoch validations | valid loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, r in enumerate(rounds, 1):
        for arm, rows in (("plain", r["sequential"]["jobs"]), ("trial", r["search"]["trials"])):
            for j in rows:
                name = f"{arm} {j['trial']}" if arm == "trial" else arm
                lines.append(f"| {n} | {name} | {j['learning_rate']:g} | " + " | ".join(fmt(j[k]) for k in (
                    "total", "queued", "worker start", "load and validate before", "training", "validation after",
                    "after training", "publish", "per-epoch validations", "valid_loss")) + " |")
    for n, r in enumerate(rounds, 1):
        a = r["search"]
        lines.append("")
        lines.append(
            f"Round {n}: the search's own overhead around its trials {a['wall_s'] - a['own_s']:.1f} s (search created "
            f"→ first trial created {a['lead_s']:.2f} s; a trial's end → the next one created "
            + ", ".join(f"{g:.2f}" for g in a["gaps_s"])
            + f" s; last trial's end → search succeeded {a['tail_s']:.2f} s); the trials' extra validation after "
            f"each epoch but the last: {a['extra_validations']} pass(es), about {a['validation_s']:.1f} s each "
            f"(the validation after training's average). Best trial {a['best_trial']} (lr {a['best_lr']:g}); its "
            f"validation loss is the least of the trials': {a['best_is_min']}.")
    return "\n".join(lines) + "\n"


def run_sequential(api: Api, job_body) -> dict[str, Any]:
    own0, workers0 = api.cpu.totals()
    ids, t0 = [], time.monotonic()
    for lr in LEARNING_RATES:
        job, seconds = api.run(job_body(lr))
        print(f"plain job lr {lr:g}: {job['status']} in {seconds:.1f} s", flush=True)
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['id']} {job['status']}: {job.get('error')}")
        ids.append(job["id"])
    wall = time.monotonic() - t0
    own1, workers1 = api.cpu.totals()
    return {"wall_s": wall, "ids": ids, "server_cpu_s": own1 - own0, "worker_cpu_s": workers1 - workers0}


def run_search(api: Api, job_body) -> dict[str, Any]:
    own0, workers0 = api.cpu.totals()
    job, wall = api.run({**job_body({"choice": LEARNING_RATES}), "search": {
        "trials": len(LEARNING_RATES), "max_seconds": 3600, "sampler": "grid", "early_stopping": "none"}})
    print(f"search: {job['status']} in {wall:.1f} s", flush=True)
    if job["status"] != "succeeded":
        raise SystemExit(f"search {job['id']} {job['status']}: {job.get('error')}")
    own1, workers1 = api.cpu.totals()
    return {"wall_s": wall, "job": job, "server_cpu_s": own1 - own0, "worker_cpu_s": workers1 - workers0}


def summarise(home: Path, seq: dict[str, Any], search: dict[str, Any]) -> dict[str, Any]:
    job = search["job"]
    table = sorted(job["search"]["trial_table"], key=lambda r: r["number"])
    trial_ids = [r["job_id"] for r in table]
    rows = breakdown(home, seq["ids"] + trial_ids + [job["id"]])
    seq_rows, trial_rows, srow = [rows[i] for i in seq["ids"]], [rows[i] for i in trial_ids], rows[job["id"]]
    validation = [r["validation after"] for r in trial_rows + seq_rows if r["validation after"] is not None]
    best = job["search"]["best_trial"]
    return {
        "sequential": {**{k: v for k, v in seq.items() if k != "ids"}, "own_s": sum(r["total"] for r in seq_rows),
                       "jobs": seq_rows},
        "search": {"wall_s": search["wall_s"], "server_cpu_s": search["server_cpu_s"],
                   "worker_cpu_s": search["worker_cpu_s"], "own_s": sum(r["total"] for r in trial_rows),
                   "trials": trial_rows, "lead_s": (trial_rows[0]["created"] - srow["created"]).total_seconds(),
                   "gaps_s": [(b["created"] - a["finished"]).total_seconds()
                              for a, b in zip(trial_rows, trial_rows[1:])],
                   "tail_s": (srow["finished"] - trial_rows[-1]["finished"]).total_seconds(),
                   "extra_validations": sum(r["per-epoch validations"] for r in trial_rows),
                   "validation_s": sum(validation) / max(1, len(validation)), "best_trial": best,
                   "best_lr": table[best]["params"]["learning_rate"],
                   "best_is_min": min(trial_rows, key=lambda r: r["valid_loss"])["trial"] == best},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-length", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of both arms, their order alternating [2]")
    ap.add_argument("--poll", type=float, default=0.25, help="seconds between the client's looks at a job")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--json", type=Path, help="write the figures as JSON here")
    ap.add_argument("--results", type=Path, help="append a section to this markdown file")
    args = ap.parse_args(argv)

    from appliance.catalog.service import DEMO_MODEL_NAME

    with tempfile.TemporaryDirectory(prefix="appliance-search-") as tmp:
        home = Path(tmp) / "home"
        print(f"setting up {home} with the demo model...", flush=True)
        tokens = setup_home(home)
        port = free_port()
        log = Path(tmp) / "server.out"
        proc = start_server(home, None, port, log)
        measured = []
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc, log)
            api = Api(f"http://127.0.0.1:{port}", tokens, args.poll, ProcessCpu(proc.pid))
            base = {"model": DEMO_MODEL_NAME, "training_file": api.upload(records(args.records)), "seed": 1,
                    "memorization": {"extraction_probe": False, "canaries": 0}}

            def job_body(lr: Any) -> dict[str, Any]:
                return {**base, "method": {"type": "lora", "lora": {"hyperparameters": hyperparameters(args, lr)}}}

            if not args.no_warmup:
                warm, seconds = api.run({**job_body(LEARNING_RATES[0]), "suffix": "warmup"})
                print(f"warm-up job {warm['status']} in {seconds:.1f} s", flush=True)
            load_before = os.getloadavg()[0]
            for n in range(args.rounds):
                if n % 2 == 0:
                    seq = run_sequential(api, job_body)
                    search = run_search(api, job_body)
                else:
                    search = run_search(api, job_body)
                    seq = run_sequential(api, job_body)
                measured.append((seq, search))
            load_after = os.getloadavg()[0]
        finally:
            stop_server(proc)
        rounds = [summarise(home, seq, search) for seq, search in measured]

    result = {
        "meta": {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                 "load": f"load average {load_before:.1f} before the timed arms, {load_after:.1f} after",
                 "records": args.records, "epochs": args.epochs, "batch_size": args.batch_size,
                 "max_seq_length": args.max_seq_length, "poll": args.poll},
        "rounds": rounds,
    }
    report = render(result)
    print(report)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if args.results:
        with open(args.results, "a") as fh:
            fh.write("\n" + report)
    ratio = sum(r["search"]["wall_s"] for r in rounds) / sum(r["sequential"]["wall_s"] for r in rounds)
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
