"""MLM pretraining: `python launch/pretrain.py --config=configs/pretrain.py:smoke --workdir=out/smoke`.

Config overrides: `--config.total_steps=1000 --config.optimizer.lr=5e-4`; every model field too
(`--config.model.overrides.long_conv_implementation=xla_monarch`). Re-running with the same workdir
resumes from its newest checkpoint. For several processes (multi-host GPU/TPU), start one
per host with --coordinator_address/--num_processes/--process_id, or rely on the cluster's
environment (SLURM, TPU pods), which jax.distributed reads itself.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from m2jax.recipes import run_pretraining  # noqa: E402
from launch.distributed_flags import init_distributed_from_flags, parse_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "pretraining config file", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "checkpoints, TensorBoard events, results.json", required=True
)


def main(argv: list[str]) -> None:
    del argv
    init_distributed_from_flags()
    logging.set_verbosity(logging.INFO)
    results = run_pretraining(_CONFIG.value, _WORKDIR.value)
    final = {k: v for k, v in (results["final_eval"] or {}).items() if k != "step"}
    print(
        f"done: {results['status']} at step {results['step']}; "
        + ", ".join(f"{k} {v:.4f}" for k, v in final.items()),
        flush=True,
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
