"""Multi-host start: `jax.distributed.initialize()` from the environment a launcher sets.

One process per host (or per GPU); every process runs the same command. Where the coordinator, process
count and process id come from, first match wins:

    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID     explicit (any launcher, tests)
    JAX_COORDINATOR_ADDRESS + JOB_COMPLETION_INDEX                  Kubernetes indexed Job (count from
                                                                    JAX_NUM_PROCESSES)
    SLURM_JOB_ID with SLURM_NTASKS > 1                             SLURM: jax's own cluster detection
                                                                    (coordinator = first node of the step)

Nothing set: a single process, and `initialize` does nothing. Optional JAX_LOCAL_DEVICE_IDS ("0,1")
restricts the devices this process uses.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax


class DistributedError(ValueError):
    """The launcher's environment is incomplete or inconsistent; the message names the variable."""


def settings(env: Mapping[str, str] | None = None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize` the environment asks for; {} = let jax detect
    the cluster (SLURM); None = single process."""
    env = os.environ if env is None else env
    addr = env.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        count = env.get("JAX_NUM_PROCESSES")
        pid = env.get("JAX_PROCESS_ID", env.get("JOB_COMPLETION_INDEX"))
        if count is None:
            raise DistributedError("JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES is not")
        if pid is None:
            raise DistributedError("JAX_COORDINATOR_ADDRESS is set but neither JAX_PROCESS_ID nor "
                                   "JOB_COMPLETION_INDEX is")
        try:
            count, pid = int(count), int(pid)
        except ValueError:
            raise DistributedError(f"JAX_NUM_PROCESSES={count!r} and the process id {pid!r} must be integers") \
                from None
        if not 0 <= pid < count:
            raise DistributedError(f"process id {pid} is outside [0, JAX_NUM_PROCESSES={count})")
        out = dict(coordinator_address=addr, num_processes=count, process_id=pid)
        local = env.get("JAX_LOCAL_DEVICE_IDS")
        if local:
            out["local_device_ids"] = [int(x) for x in local.split(",")]
        return out
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return {}
    return None


_initialized = False


def initialize(env: Mapping[str, str] | None = None) -> bool:
    """Join the multi-process runtime if the environment describes one (see the module docstring).

    Must run before anything touches devices. Returns True when this is one of several processes.
    Idempotent.
    """
    global _initialized
    if _initialized:
        return jax.process_count() > 1
    kw = settings(env)
    if kw is None:
        return False
    jax.distributed.initialize(**kw)
    _initialized = True
    return jax.process_count() > 1


def is_primary() -> bool:
    """Process 0: the one that writes logs and reports (orbax coordinates checkpoint writes itself)."""
    return jax.process_index() == 0
