"""Flags shared by the training launches: joining a multi-process (multi-host) run."""

from absl import flags

from m2jax.trainer import init_distributed

_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")


def init_distributed_from_flags() -> None:
    """jax.distributed.initialize from these flags, or from the cluster's environment."""
    init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
