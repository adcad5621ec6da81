"""Joining a multi-process (multi-host) run, and moving arrays between hosts.

One process per host runs the same launch with the same config and work directory. Each joins
the others through `jax.distributed.initialize`: from the three flags, or (none of them) from the
cluster's environment, which jax reads itself on TPU VMs (the pod's worker list), SLURM and
Open MPI. docs/training.md has the TPU pod recipe.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

# jax is imported where it is used: the launches check their flags with `check_distributed_args`
# at parse time, and a mistyped flag should not wait for jax to load.
if TYPE_CHECKING:
    import jax

# Environment variables of the launchers whose settings `jax.distributed.initialize()` reads
# itself (its cluster auto-detection).
CLUSTER_ENV_VARS = (
    "JAX_COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "TPU_WORKER_HOSTNAMES",
    "OMPI_COMM_WORLD_SIZE",
)


def check_distributed_args(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Raises ValueError naming the problem unless the three settings are all unset (one process,
    or the cluster environment) or all set and consistent."""
    given = {
        "coordinator_address": coordinator,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    missing = [f"--{name}" for name, value in given.items() if value is None]
    if len(missing) == len(given):
        return
    if missing:
        raise ValueError(
            f"{', '.join(missing)} missing: joining a multi-process run by flags needs all of "
            "--coordinator_address, --num_processes and --process_id (or none of them on "
            "SLURM, TPU pods or Open MPI, whose environment jax.distributed reads)"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator_address must be host:port, got {coordinator!r}")
    if num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process_id must be in [0, {num_processes}) for --num_processes={num_processes}, "
            f"got {process_id}"
        )


def init_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> bool:
    """`jax.distributed.initialize` when this is one of several processes (all three settings
    given, the usual cluster environment variables, or a Cloud TPU VM, where jax finds the
    pod's workers itself); a no-op for a single process. Returns whether it initialised."""
    check_distributed_args(coordinator, num_processes, process_id)
    import jax

    if coordinator is not None:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
        return True
    if any(v in os.environ for v in CLUSTER_ENV_VARS) or on_tpu_vm():
        jax.distributed.initialize()
        return True
    return False


def on_tpu_vm() -> bool:
    """Whether this machine has TPU chips (a Cloud TPU VM: one host of a slice or pod), found
    the way jax's own TPU initialisation finds them, without starting a backend."""
    try:
        from jax._src import hardware_utils  # private; absent or changed: not a TPU VM we know

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001
        return False


def gather_to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host) global array as one NumPy array on every host."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
