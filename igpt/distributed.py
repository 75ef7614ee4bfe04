"""Multi-process start-up: one JAX process per host (or per GPU), all seeing one global mesh."""

from __future__ import annotations

import os

import jax


def initialize_from_env() -> bool:
    """Call `jax.distributed.initialize` when this process is one of several.

    Explicit: IGPT_COORDINATOR (host:port), IGPT_NUM_PROCESSES and IGPT_PROCESS_ID.
    Otherwise JAX's own cluster detection is used under SLURM with more than one task and on
    multi-host TPU slices. Returns True if the distributed runtime was started.
    """
    coordinator = os.environ.get("IGPT_COORDINATOR")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["IGPT_NUM_PROCESSES"]),
            process_id=int(os.environ["IGPT_PROCESS_ID"]),
        )
        return True
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if slurm_tasks > 1 or "," in tpu_hosts:
        jax.distributed.initialize()
        return True
    return False
