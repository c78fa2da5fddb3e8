"""What runs inside a Ray job: the entrypoint starts Ray Train workers; each rank serves the job.

Worker side only: it imports the worker, the tunnel and the wire format, nothing of the control plane
(the executor that submits the job, :mod:`appliance.jobs.executors.ray`, is never imported here).

``python -m appliance.jobs.ray_worker --connect HOST:PORT --job ID --workers N``
runs :func:`main` as the Ray job's driver. It asks for nothing secret and
trains nothing itself: it runs a :class:`ray.train.torch.TorchTrainer` with N
workers (GPUs when the cluster has them, else CPUs with gloo). Every worker,
:func:`rank_main`, dials the control plane through the encrypted tunnel with
the ticket from its runtime environment, receives the start frame and runs
the same :func:`appliance.jobs.worker.serve` as a local worker. Ray Train has
already set up the process group, so the trainer averages gradients across
the ranks (:mod:`appliance.training.distributed`); rank 0 reports, and a rank
that fails reports its error and brings the others down with it.

Ray Train is given a private temp dir as its storage and nothing to store:
no metrics, no checkpoints and no data pass through Ray's objects or storage.
"""

from __future__ import annotations

import argparse
import base64
import os
import resource
import shutil
import sys
import tempfile

from appliance.jobs.tunnel import TICKET_ENV
from appliance.settings import parse_host_port


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
    """One Ray Train worker: dial the control plane as this rank and run the job."""
    import ray.train

    from appliance.jobs import tunnel
    from appliance.jobs.channel import Channel
    from appliance.jobs.worker import serve

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a core dump would be plaintext training data on disk
    rank = ray.train.get_context().get_world_rank()
    ticket = base64.b64decode(os.environ.pop(TICKET_ENV))
    conn = tunnel.connect(parse_host_port(config["connect"]), job_id=config["job"], rank=rank, ticket=ticket)
    code = serve(Channel(conn, primary=rank == 0))
    if code != 0:
        raise RuntimeError(f"rank {rank} failed (exit status {code}); its error went to the control plane")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
