"""Run the real ``appliance`` console script in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.timing import Deadline, scaled

APPLIANCE = Path(sys.executable).with_name("appliance")


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    from tests.conftest import database_url_for

    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update({"APPLIANCE_HOME": str(home)})
    url = database_url_for(home)
    if url:
        env["APPLIANCE_DATABASE_URL"] = url
    env.update(extra)
    return env


def run_cli(home: Path, *args: str, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(APPLIANCE), *args], env=cli_env(home, **extra_env), capture_output=True, text=True, timeout=scaled(120)
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"appliance {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


class Server:
    """``appliance serve`` in a subprocess, for tests of the real entry point."""

    def __init__(self, home: Path, port: int, argv: list[str] | None = None, cwd: Path | None = None, **env: str):
        self.home, self.port = home, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = home.parent / f"server-{port}.out"
        argv = argv or [str(APPLIANCE), "serve", "--port", str(port)]
        self._out = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, env=cli_env(home, **env), stdout=self._out, stderr=subprocess.STDOUT, cwd=cwd,
            start_new_session=True,
        )

    def wait_healthy(self, timeout: float = 120) -> None:
        import time

        import httpx

        deadline = Deadline(timeout)
        while deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not healthy after {deadline}:\n{self.output()}")

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()
