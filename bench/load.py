"""Load benchmark: concurrent clients against a real ``appliance serve`` on loopback.

    .venv/bin/python bench/load.py                              # 50 clients for 60 s
    .venv/bin/python bench/load.py --seconds 5 --clients 10     # smoke run (make test runs one)
    .venv/bin/python bench/load.py --results bench/RESULTS.md   # also append the figures there

Sets up a fresh home in a temporary directory (``--home`` to choose it): project ``bench``, a tiny
randomly initialised Llama imported as ``tiny-llama``, and per client a data-owner, a trainer and a
consumer token. Starts ``python -m appliance serve`` on a free loopback port, warms it up (the first
upload loads the scanner, the first chat the model) and then runs ``--clients`` asyncio clients, each
with its own connection, for ``--seconds``. Every client loops over a weighted random mix of

- ``upload``: a small JSONL training file (``POST /v1/files``, scanned, encrypted, audited),
- ``list_jobs``: ``GET /v1/fine_tuning/jobs``,
- ``chat``: ``POST /v1/chat/completions`` on the tiny model, 8 tokens, greedy,

and records each request's latency. Reports per operation the count, errors, p50/p95/p99 latency and
throughput, then stops the server and verifies the audit chain. Exits 1 on any error (a non-2xx
answer, a transport error, a server that died, a chain that does not verify).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

#: Operation -> weight in each client's random mix.
MIX = {"upload": 2, "list_jobs": 4, "chat": 4}
MODEL = "tiny-llama"
PROJECT = "bench"


@dataclass
class OpStats:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.errors += 1
        if len(self.first_errors) < 3:
            self.first_errors.append(message[:300])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- set-up -------------------------------------------------------------------
def setup_home(home: Path, database_url: str | None, clients: int) -> list[dict[str, str]]:
    """Initialise ``home``, import the tiny model; one token per role per client."""
    from appliance.audit.service import AuditContext
    from appliance.bootstrap import initialize, open_initialized
    from appliance.catalog.service import CatalogService
    from appliance.crypto.envelope import FileKeyProvider
    from appliance.identity.roles import Role
    from appliance.identity.service import IdentityService
    from appliance.modelstore import build_tiny_causal_lm
    from appliance.settings import load_settings
    from appliance.storage.blobs import BlobStore

    settings = load_settings(server_env(home, database_url))
    ctx = AuditContext.cli("bench")
    initialize(settings, ctx)
    db = open_initialized(settings)
    try:
        catalog = CatalogService(db, BlobStore(settings.blobs_dir, FileKeyProvider(settings.key_file)),
                                 settings.models_dir, settings.signing_key_file)
        catalog.import_model(ctx, build_tiny_causal_lm(home.parent / "tiny-src", seed=0), MODEL)
        identity = IdentityService(db)
        identity.create_project(ctx, PROJECT)
        tokens = []
        roles = {"owner": Role.DATA_OWNER, "trainer": Role.TRAINER, "consumer": Role.CONSUMER}
        for i in range(clients):
            user = f"client{i:03d}"
            identity.create_user(ctx, user)
            for role in roles.values():
                identity.grant(ctx, user, role, PROJECT)
            tokens.append({key: identity.create_token(ctx, user, role, PROJECT, description="bench/load.py")[1]
                           for key, role in roles.items()})
        return tokens
    finally:
        db.dispose()


def server_env(home: Path, database_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["APPLIANCE_HOME"] = str(home)
    if database_url:
        env["APPLIANCE_DATABASE_URL"] = database_url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def start_server(home: Path, database_url: str | None, port: int, log: Path) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            env=server_env(home, database_url), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_healthy(base_url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- the operations -------------------------------------------------------------
def training_file(rng: random.Random) -> bytes:
    records = []
    for _ in range(3):
        a, b = rng.randrange(100), rng.randrange(100)
        records.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


async def upload(http: httpx.AsyncClient, tokens: dict[str, str], rng: random.Random) -> httpx.Response:
    return await http.post("/v1/files", headers={"Authorization": f"Bearer {tokens['owner']}"},
                           data={"purpose": "fine-tune"},
                           files={"file": ("bench.jsonl", training_file(rng), "application/jsonl")})


async def list_jobs(http: httpx.AsyncClient, tokens: dict[str, str], rng: random.Random) -> httpx.Response:
    return await http.get("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {tokens['trainer']}"})


async def chat(http: httpx.AsyncClient, tokens: dict[str, str], rng: random.Random) -> httpx.Response:
    resp = await http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {tokens['consumer']}"},
                           json={"model": MODEL, "max_tokens": 8, "temperature": 0,
                                 "messages": [{"role": "user", "content": f"Say hello to {rng.randrange(1000)}"}]})
    if resp.status_code == 200 and not resp.json().get("choices"):
        raise ValueError(f"chat answered without choices: {resp.text[:200]}")
    return resp


OPS = {"upload": upload, "list_jobs": list_jobs, "chat": chat}


async def client_loop(base_url: str, tokens: dict[str, str], deadline: float, seed: int,
                      stats: dict[str, OpStats]) -> None:
    rng = random.Random(seed)
    names, weights = list(MIX), list(MIX.values())
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        while time.monotonic() < deadline:
            name = rng.choices(names, weights)[0]
            started = time.perf_counter()
            try:
                resp = await OPS[name](http, tokens, rng)
            except (httpx.HTTPError, ValueError) as exc:
                stats[name].fail(f"{type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - started
            if resp.is_success:
                stats[name].latencies.append(elapsed)
            else:
                stats[name].fail(f"HTTP {resp.status_code}: {resp.text}")


async def run_load(base_url: str, tokens: list[dict[str, str]], seconds: float, seed: int) -> tuple[dict, float]:
    stats = {name: OpStats() for name in MIX}
    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(*(client_loop(base_url, t, deadline, seed + i, stats) for i, t in enumerate(tokens)))
    return stats, time.monotonic() - started


async def warm_up(base_url: str, tokens: dict[str, str]) -> dict[str, float]:
    """One request of each kind, timed: the scanner and the model load on first use."""
    times = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
        for name, op in OPS.items():
            started = time.perf_counter()
            resp = await op(http, tokens, random.Random(0))
            if not resp.is_success:
                raise SystemExit(f"warm-up {name} failed: HTTP {resp.status_code}: {resp.text[:500]}")
            times[name] = time.perf_counter() - started
    return times


# -- reporting ----------------------------------------------------------------
def summarise(stats: dict[str, OpStats], wall_s: float) -> dict[str, dict]:
    rows = {}
    for name, s in list(stats.items()) + [("all", OpStats(
            [x for s in stats.values() for x in s.latencies], sum(s.errors for s in stats.values())))]:
        ms = [x * 1000 for x in s.latencies]
        rows[name] = {"count": len(ms), "errors": s.errors, "p50_ms": pct(ms, 0.50), "p95_ms": pct(ms, 0.95),
                      "p99_ms": pct(ms, 0.99), "per_s": len(ms) / wall_s}
    return rows


def machine() -> str:
    mem = ""
    try:
        kb = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal:")).split()[1])
        mem = f", {kb / 1024 ** 2:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "no GPU"
    return f"{os.cpu_count()} cores{mem}, {gpu} ({platform.machine()}, Python {platform.python_version()})"


def render(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"## `bench/load.py` — {meta['date']}",
        "",
        f"Machine: {meta['machine']}. {meta['clients']} clients for {meta['seconds']:.0f} s against `appliance serve` "
        f"on loopback ({meta['database']}), mix {meta['mix']}, tiny model `{MODEL}`, seed {meta['seed']}. "
        f"Server start {meta['startup_s']:.1f} s; warm-up (first request) "
        + ", ".join(f"{k} {v:.2f} s" for k, v in meta["warm_up_s"].items()) + ".",
        "",
        "| operation | count | errors | p50 ms | p95 ms | p99 ms | per s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["ops"].items():
        lines.append(f"| {name} | {r['count']} | {r['errors']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {r['per_s']:.1f} |")
    lines += ["", f"Wall clock {meta['wall_s']:.1f} s. Audit chain after the run: {meta['audit']}."]
    for name, errors in result["first_errors"].items():
        lines += [f"First errors of {name}: " + "; ".join(errors)]
    return "\n".join(lines) + "\n"


def verify_audit(home: Path, database_url: str | None) -> tuple[bool, str]:
    from appliance.audit.service import verify_chain
    from appliance.bootstrap import open_initialized
    from appliance.settings import load_settings

    db = open_initialized(load_settings(server_env(home, database_url)))
    try:
        result = verify_chain(db)
    finally:
        db.dispose()
    if result.ok:
        return True, f"verified, {result.events} events"
    return False, f"BROKEN at seq {result.bad_seq}: {result.problem}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50, help="concurrent clients [50]")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long the clients run [60]")
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--home", type=Path, default=None, help="appliance home to create (default: a temporary one)")
    ap.add_argument("--database-url", default=None, help="APPLIANCE_DATABASE_URL of the server (default: SQLite)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--results", type=Path, default=None, help="append a section to this markdown file")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        ap.error(f"`--clients` must be >= 1 and `--seconds` > 0; got {args.clients} and {args.seconds}")

    with tempfile.TemporaryDirectory(prefix="appliance-load-") as tmp:
        home = args.home or Path(tmp) / "home"
        print(f"setting up {home}: tiny model, {args.clients * 3} tokens...", flush=True)
        tokens = setup_home(home, args.database_url, args.clients)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        log = home.parent / "load-server.out"
        proc = start_server(home, args.database_url, port, log)
        try:
            startup_s = wait_healthy(base_url, proc, log)
            warm = asyncio.run(warm_up(base_url, tokens[0]))
            print(f"server up in {startup_s:.1f} s; running {args.clients} clients for {args.seconds:.0f} s...",
                  flush=True)
            stats, wall_s = asyncio.run(run_load(base_url, tokens, args.seconds, args.seed))
            alive = proc.poll() is None
        finally:
            stop_server(proc)
        chain_ok, audit = verify_audit(home, args.database_url)
        if not alive:
            print(f"the server died during the run:\n{log.read_text()[-3000:]}", file=sys.stderr)

    result = {
        "meta": {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                 "clients": args.clients, "seconds": args.seconds, "wall_s": wall_s, "seed": args.seed,
                 "mix": ", ".join(f"{k} {v}" for k, v in MIX.items()), "startup_s": startup_s, "warm_up_s": warm,
                 "database": "PostgreSQL" if args.database_url else "SQLite", "audit": audit},
        "ops": summarise(stats, wall_s),
        "first_errors": {name: s.first_errors for name, s in stats.items() if s.first_errors},
    }
    report = render(result)
    print(report)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.results:
        with open(args.results, "a") as fh:
            fh.write("\n" + report)
    failed = result["ops"]["all"]["errors"] > 0 or not alive or not chain_ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
