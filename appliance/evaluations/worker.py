"""The evaluation worker: ``python -m appliance.evaluations.worker IN_FD OUT_FD``.

Started like the training worker (:mod:`appliance.jobs.sandbox`: no network, a scrubbed environment,
a view of only its base model, its CLIP evaluator for an image model, and its test file's blob), and
speaking the same frames. It receives the evaluation and the test file's data key on ``IN_FD``, then the
fine-tunes' adapter files as one stream; it decrypts the test file in memory, never onto disk. Text models
run :mod:`appliance.evaluations.task`, image models :mod:`appliance.evaluations.image_task`.
"""

from __future__ import annotations

import sys
import threading
import traceback
from typing import Any

from appliance.errors import ApplianceError
from appliance.evaluations.image_task import run_image_evaluation
from appliance.evaluations.task import run_evaluation
from appliance.jobs.channel import Channel, PipeTransport
from appliance.jobs.worker import _NO_ROUTE, load_records, network_probe


def serve(channel: Channel) -> int:
    """Read the start frame, run the evaluation and report how it ended; the exit status."""
    frame = channel.transport.read()
    if frame is None or frame[0].get("type") != "start":
        return 2
    start: dict[str, Any] = frame[0]
    try:
        adapters = channel.receive_resume() if start.get("resume_stream") else b""
        threading.Thread(target=channel.watch_control, daemon=True).start()
        probe = network_probe()
        isolated = probe["connect"] in _NO_ROUTE and probe["interfaces"] in (["lo"], [])
        channel.event("Network isolation verified: the worker has no route out" if isolated else
                      "Network isolation unavailable on this host: the worker relies on offline libraries only",
                      type="isolation", data={**probe, "level": start.get("isolation"), "isolated": isolated})
        [dataset] = start["datasets"]
        run = run_image_evaluation if start.get("kind") == "diffusion" else run_evaluation
        run(channel, start, load_records(dataset), adapters)
    except ApplianceError as exc:
        channel.send({"type": "error", "code": exc.code, "message": exc.message, "param": exc.param})
        return 1
    except BaseException as exc:  # noqa: BLE001 - reported, never with its message (it may quote data)
        frames = "".join(traceback.format_tb(exc.__traceback__))
        channel.send({"type": "error", "code": "worker_error",
                      "message": f"evaluation failed with {type(exc).__name__}", "trace": frames[-4000:]})
        return 1
    return 0


def main(argv: list[str]) -> int:
    return serve(Channel(PipeTransport(int(argv[1]), int(argv[2]))))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
