"""Multi-host start-up shared by `python -m train` and `python -m sample`.

Explicit flags (`--coordinator_address`, `--num_processes`, `--process_id`) win; otherwise JAX's
own cluster detection runs where a cluster is detectable (TPU pod slices, SLURM with more than
one task, ...); a plain single machine starts as one process. Must run before any other JAX call
touches the backend.
"""

from __future__ import annotations

import os

_CLUSTER_ENV = (
    # SLURM launches with several tasks; JAX reads the rest from the SLURM_* variables.
    ("SLURM_NTASKS", lambda v: int(v) > 1),
    # Multi-worker TPU VMs (pod slices) name their workers here.
    ("TPU_WORKER_HOSTNAMES", lambda v: "," in v),
    ("MEGASCALE_COORDINATOR_ADDRESS", bool),
)


def define_distributed_flags():
    """absl flags for an explicit multi-process launch; returns (address, count, index) holders."""
    from absl import flags

    address = flags.DEFINE_string(
        "coordinator_address", None,
        "host:port of process 0 for a multi-process run (default: JAX's cluster auto-detection "
        "on TPU pods and SLURM; one process otherwise).")
    count = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
    index = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
    return address, count, index


def detected_cluster() -> str | None:
    """The environment variable that shows a multi-host launch JAX can detect, or None."""
    for name, test in _CLUSTER_ENV:
        value = os.environ.get(name)
        if value:
            try:
                if test(value):
                    return name
            except ValueError:
                continue
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Start jax.distributed when asked or detected; True when this is a multi-process run."""
    explicit = (coordinator_address, num_processes, process_id)
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise ValueError(
                "--coordinator_address, --num_processes and --process_id go together: got "
                f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                f"process_id={process_id!r}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
        import jax

        # Also for one process: the explicit launch then runs the same start-up path (the
        # coordinator service, its port) as on a cluster.
        jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
        return num_processes > 1
    if detected_cluster() is None:
        return False
    import jax

    jax.distributed.initialize()
    return jax.process_count() > 1
