"""The training worker: ``python -m appliance.jobs.worker IN_FD OUT_FD``.

Started by :mod:`appliance.jobs.sandbox` with no network, a scrubbed
environment and a private temp dir. It receives the job and its datasets'
data keys on ``IN_FD`` (and the checkpoint to resume from, streamed after
them: :mod:`appliance.jobs.streams`), decrypts the datasets in memory, trains, and sends
events, and checkpoints and the adapter as chunked streams, back on ``OUT_FD``. It writes nothing of
the data to disk. If the scheduler goes away (its pipe closes), it exits.

Under the Ray executor the Ray job's entrypoint is :mod:`appliance.jobs.ray_worker`: each rank
talks to the scheduler through an encrypted tunnel and starts this same worker, sandboxed on its node,
relaying the frames between the tunnel and its pipes.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import socket
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from appliance.crypto.stream import blob_context, decrypt_stream
from appliance.errors import ApplianceError
from appliance.jobs.channel import Channel, PipeTransport
from appliance.jobs.tasks import run_task


def network_probe() -> dict[str, Any]:
    """Try to open a connection out; report interfaces and the error.

    Interfaces come from ``/proc/net/dev`` (the worker's network namespace): listing them through
    a netlink socket is itself refused by the sandbox's seccomp filter.
    """
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()[2:]
        interfaces = sorted(line.split(":", 1)[0].strip() for line in lines if ":" in line)
    except OSError:
        interfaces = sorted(name for _, name in socket.if_nameindex())
    try:
        with socket.create_connection(("10.255.255.1", 9), timeout=1.5):
            outcome = "connected"
    except OSError as exc:
        outcome = errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__
    return {"interfaces": interfaces, "connect": outcome}


#: What a connection attempt out ends with in a worker that has no route out: no route in its own
#: network namespace, or no socket at all under the sandbox's seccomp filter.
_NO_ROUTE = ("ENETUNREACH", "EHOSTUNREACH", "EAFNOSUPPORT")


def load_bytes(spec: dict[str, Any]) -> bytes:
    """Decrypt one dataset blob into memory: from the descriptor the sandbox passed in, or by path."""
    key = base64.b64decode(spec["key"])
    buffer = bytearray()
    with (os.fdopen(spec["fd"], "rb") if "fd" in spec else open(spec["path"], "rb")) as fh:
        for chunk in decrypt_stream(key, blob_context(spec["object_id"], spec["project"]), fh):
            buffer += chunk
    return bytes(buffer)


def load_records(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Decrypt one JSONL dataset in memory and parse its records."""
    return [json.loads(line) for line in load_bytes(spec).decode("utf-8").splitlines() if line.strip()]


def run(channel: Channel, start: dict[str, Any], resume: bytes) -> None:
    level = start.get("isolation")  # the level it was launched at; None when started another way (systemd unit)
    if start.get("network") == "shared":
        # A Ray rank's worker of a multi-rank job: it must reach its peer ranks, so it kept its node's network.
        channel.event(f"Ray rank's worker at isolation level {level!r} with its node's network, shared with its "
                      "peer ranks for the gradient collective: the cluster's network policy applies and the "
                      "worker relies on offline libraries", level="warn", type="isolation",
                      data={"level": level, "network": "shared"})
    else:
        probe = network_probe()
        probe["level"] = level
        isolated = probe["connect"] in _NO_ROUTE and probe["interfaces"] in (["lo"], [])
        weaker = level not in (None, "sandbox")
        if not isolated:
            message = "Network isolation unavailable on this host: the worker relies on offline libraries only"
        elif level == "sandbox":
            message = ("Network isolation verified: the worker has no route out; it runs in the sandbox "
                       "(own namespaces and user, a view of only its own files, a seccomp filter)")
        elif weaker:
            message = (f"Network isolation verified: the worker has no route out; isolation level {level!r}, "
                       "weaker than the sandbox (APPLIANCE_WORKER_ISOLATION)")
        else:
            message = "Network isolation verified: the worker has no route out"
        channel.event(message, level="warn" if weaker or not isolated else "info", type="isolation", data=probe)
    if group := start.get("process_group"):
        join_process_group(group)
    load = load_bytes if start.get("model_kind") == "diffusion" else load_records
    datasets = {d["role"]: load(d) for d in start["datasets"]}
    run_task(channel, start, datasets, resume or None)


def join_process_group(group: dict[str, Any]) -> None:
    """Join the data-parallel ranks' process group (a Ray rank's worker; its rank picked the address)."""
    import torch.distributed as dist

    host = f"[{group['host']}]" if ":" in str(group["host"]) else group["host"]
    dist.init_process_group(group["backend"], init_method=f"tcp://{host}:{group['port']}",
                            rank=int(group["rank"]), world_size=int(group["world"]))


def serve(channel: Channel) -> int:
    """Read the start frame, run the job and report how it ended; the exit status."""
    frame = channel.transport.read()
    if frame is None or frame[0].get("type") != "start":
        return 2
    start, resume = frame
    channel.primary = start.get("primary", True)  # a Ray rank other than 0 reports only its errors
    try:
        if start.get("resume_stream"):
            resume = channel.receive_resume()  # before the control watcher starts reading the same link
        threading.Thread(target=channel.watch_control, daemon=True).start()
        run(channel, start, resume)
    except ApplianceError as exc:
        channel.send({"type": "error", "code": exc.code, "message": exc.message, "param": exc.param})
        return 1
    except BaseException as exc:  # noqa: BLE001 - reported, never with its message (it may quote data)
        frames = "".join(traceback.format_tb(exc.__traceback__))
        channel.send({"type": "error", "code": "worker_error",
                      "message": f"training failed with {type(exc).__name__}", "trace": frames[-4000:]})
        return 1
    return 0


def main(argv: list[str]) -> int:
    return serve(Channel(PipeTransport(int(argv[1]), int(argv[2]))))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
