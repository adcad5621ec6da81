"""MLM pretraining: `python launch/pretrain.py --config=configs/pretrain.py:smoke --workdir=out/smoke`.

Config overrides: `--config.total_steps=1000 --config.optimizer.lr=5e-4`, every model field too
(`--config.model.hidden_size=512`); `--print_config` prints the resolved config and exits.
Re-running with the same workdir resumes from its newest checkpoint, or reports the stored
results of a finished run. Several processes (multi-host GPU/TPU): the same command on every
host, with --coordinator_address/--num_processes/--process_id, or nothing more on TPU VMs, SLURM
and Open MPI, whose environment jax.distributed reads itself. Exit codes:
0 finished (now or before), 75 preempted after saving (re-run to resume), 3 invalid config,
4 unusable data, 5 non-finite loss, 6 checkpoints that cannot be resumed, 7 work directory not
writable (full disk), 1 anything else.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import pretrain as recipes  # noqa: E402
from launch import common  # noqa: E402

flags.adopt_module_key_flags(common)
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    common.config_help("pretraining", "pretrain.py", recipes.VARIANTS),
    lock_config=True,
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.run_job("run_pretraining", _CONFIG.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=common.parse_flags)
