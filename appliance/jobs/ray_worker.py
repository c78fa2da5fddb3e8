"""What runs inside a Ray job: the entrypoint starts Ray Train workers; each rank serves the job.

Worker side only: it imports the worker, the tunnel and the wire format, nothing of the control plane
(the executor that submits the job, :mod:`appliance.jobs.executors.ray`, is never imported here).

``python -m appliance.jobs.ray_worker --connect HOST:PORT --job ID --workers N``
runs :func:`main` as the Ray job's driver. It asks for nothing secret and
trains nothing itself: it runs a :class:`ray.train.torch.TorchTrainer` with N
workers (GPUs when the cluster has them, else CPUs with gloo). Every worker,
:func:`rank_main`:

1. derives the launch's ticket from the node key file and the nonce in its
   runtime environment (:func:`appliance.jobs.tunnel.derive_ticket`) and dials
   the control plane through the encrypted tunnel;
2. receives the start frame and starts the job's worker in a sandbox on its node
   at the level the control plane names (``APPLIANCE_WORKER_ISOLATION``, the same
   :func:`appliance.jobs.sandbox.spawn` as a local worker: own user and namespaces,
   a view of only the Python environment, the code and the base model, the dataset
   blobs as descriptors, the seccomp filter), or fails closed saying why;
3. says at which level it runs (an ``isolation`` event, every rank), then relays
   frames between the tunnel and the worker's pipes.

The sandboxed worker runs the same :func:`appliance.jobs.worker.serve` as a local
worker. With one rank it has no network at all. With several, the ranks' workers
must reach each other for the gradient collective, so each keeps its node's network
(its seccomp filter admits IP sockets) and they form their own process group at an
address rank 0 draws and Ray's group passes round; the trainer then averages gradients
across the ranks (:mod:`appliance.training.distributed`); rank 0 reports, and a rank
that fails reports its error and brings the others down with it. The node key, the
tunnel and Ray's own files stay outside the sandbox.

Ray Train is given a private temp dir as its storage and nothing to store:
no metrics, no checkpoints and no data pass through Ray's objects or storage.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile

from appliance.jobs.isolation import IsolationLevel
from appliance.jobs.tunnel import NODE_KEY_ENV, NONCE_ENV
from appliance.jobs.wire import FrameReader, write_frame
from appliance.settings import parse_host_port

#: The runtime-environment variable naming the level each rank's worker runs at (set by the executor).
ISOLATION_ENV = "APPLIANCE_WORKER_ISOLATION"


def main(argv: list[str]) -> int:
    """The Ray job's entrypoint; the exit status."""
    parser = argparse.ArgumentParser(prog="appliance.jobs.ray_worker")
    parser.add_argument("--connect", required=True, help="host:port of the control plane's worker gateway")
    parser.add_argument("--job", required=True, help="the fine-tuning job's id")
    parser.add_argument("--workers", type=int, default=1, help="data-parallel ranks")
    args = parser.parse_args(argv)

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init()
    use_gpu = bool(ray.cluster_resources().get("GPU"))
    storage = tempfile.mkdtemp(prefix="appliance-ray-train-")
    try:
        trainer = TorchTrainer(
            rank_main,
            train_loop_config={"connect": args.connect, "job": args.job},
            scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=use_gpu),
            run_config=RunConfig(name=args.job, storage_path=storage, failure_config=FailureConfig(max_failures=0)),
        )
        trainer.fit()
    except Exception as exc:  # the failing rank has reported its error to the control plane itself
        print(f"training failed: {type(exc).__name__}", flush=True)
        return 1
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return 0


def rank_main(config: dict) -> None:
    """One Ray Train worker: dial the control plane as this rank and run the job in a sandboxed worker."""
    import ray.train

    from appliance.jobs import tunnel

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a core dump would be plaintext training data on disk
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    key_file = os.environ.pop(NODE_KEY_ENV)
    ticket = tunnel.derive_ticket(tunnel.read_node_key(key_file), bytes.fromhex(os.environ.pop(NONCE_ENV)),
                                  config["job"])
    level = os.environ.pop(ISOLATION_ENV, IsolationLevel.SANDBOX.value)
    conn = tunnel.connect(parse_host_port(config["connect"]), job_id=config["job"], rank=rank, ticket=ticket)
    del ticket
    try:
        code = _run_rank(conn, rank, world, IsolationLevel(level), hide=[key_file, *_ray_dirs()])
    finally:
        conn.close()
    if code != 0:
        raise RuntimeError(f"rank {rank} failed (exit status {code}); its error went to the control plane")


def _run_rank(conn, rank: int, world: int, level: IsolationLevel, hide: list[str]) -> int:  # noqa: ANN001
    """Start this rank's sandboxed worker, tell the control plane where it runs, relay; its exit status."""
    from appliance.jobs.isolation import SandboxUnavailable
    from appliance.jobs.sandbox import spawn

    frame = conn.read()
    if frame is None or frame[0].get("type") != "start":
        return 2
    start = frame[0]
    group = _collective_address(rank) if world > 1 else None  # every rank takes part, before anything can fail
    datasets = start.get("datasets") or []
    sandboxed = level is IsolationLevel.SANDBOX
    try:
        worker = spawn("appliance.jobs.worker", isolation=level, hide=hide, network=world > 1,
                       reads=[start["model_dir"], *(e["path"] for e in (start.get("evaluators") or {}).values())]
                       if sandboxed else [],
                       files=[d["path"] for d in datasets if d.get("path")] if sandboxed else [])
    except SandboxUnavailable as exc:
        conn.write({"type": "error", "code": "worker_sandbox_unavailable", "param": None,
                    "message": f"could not start the worker of rank {rank} on its Ray node: {exc}"})
        return 1
    try:
        node = os.environ.get("MASTER_ADDR", "") if rank == 0 else ""
        where = "no network" if worker.network == "none" else "its node's network, shared with its peer ranks"
        conn.write({"type": "event", "level": "info" if sandboxed else "warn", "event_type": "isolation",
                    "message": f"Rank {rank} of {world}: the worker runs at isolation level {worker.isolation!r} "
                               f"on its Ray node, with {where}",
                    "data": {"rank": rank, "level": worker.isolation, "network": worker.network,
                             **({"node": node} if node else {})}})
        header = {**start, "primary": rank == 0, "network": worker.network, "isolation": worker.isolation,
                  "process_group": group and {**group, "rank": rank, "world": world}}
        header["datasets"] = worker.by_descriptor(datasets)
        del start, frame
        write_frame(worker.to_child, header)
        del header
        return _relay(conn, worker)
    finally:
        if worker.proc.poll() is None:
            os.killpg(worker.proc.pid, 9)
        worker.proc.wait()
        worker.cleanup()


def _relay(conn, worker) -> int:  # noqa: ANN001 - a tunnel, a SandboxedProcess
    """Frames from the tunnel to the worker's pipe (a background thread) and back, until the worker ends."""
    import threading

    lock = threading.Lock()  # the pipe to the worker is written and closed by one side at a time

    def close_down() -> None:
        with lock:
            if worker.to_child >= 0:
                try:
                    os.close(worker.to_child)
                except OSError:
                    pass
                worker.to_child = -1  # never closed twice (its number may be reused)

    def downstream() -> None:
        try:
            while (frame := conn.read()) is not None:
                with lock:
                    if worker.to_child < 0:
                        return
                    write_frame(worker.to_child, *frame)
        except Exception:  # noqa: BLE001 - the tunnel or the pipe closed
            pass
        finally:
            close_down()  # the control plane hung up: the worker sees its pipe close and exits

    threading.Thread(target=downstream, name="rank-downstream", daemon=True).start()
    reader = FrameReader(worker.from_child)
    while (frame := reader.read()) is not None:
        try:
            conn.write(*frame)
        except OSError:
            break
    code = worker.proc.wait()
    close_down()
    return code


def _collective_address(rank: int) -> dict[str, str | int]:
    """Where the sandboxed workers meet for their own process group: rank 0 draws a free port on its
    node, and Ray's process group (already set up between the ranks) passes it to every rank."""
    import socket

    import torch.distributed as dist

    box: list[object] = [None]
    if rank == 0:
        host = os.environ.get("MASTER_ADDR") or "127.0.0.1"
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
            box[0] = {"host": host, "port": probe.getsockname()[1], "backend": dist.get_backend()}
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def _ray_dirs() -> list[str]:
    """Ray's session and temp directories on this node (its sockets and logs): never in a worker's view."""
    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node  # noqa: SLF001
        return [str(p) for p in {node.get_session_dir_path(), node.get_temp_dir_path()} if p]
    except Exception:  # noqa: BLE001 - an older or newer Ray: the sandbox binds only the Python roots anyway
        return []


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
