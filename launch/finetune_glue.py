"""GLUE fine-tuning: every task and seed of the config, MNLI before the tasks chained to it.

  python launch/finetune_glue.py --config=configs/glue.py:m2_base_80m \
      --config.init_from=/path/to/m2-bert-80M --workdir=out/glue

`--config.init_from` is required (a pretraining workdir, a `final/` export, a released checkpoint;
`scratch` for a random initialisation). Offline on the shipped task:
--config=configs/glue.py:smoke --config.init_from=out/smoke/final.
Results: <workdir>/results.json (task scores, mean over seeds; the GLUE average) and one
results.json per task and seed. Re-running with the same workdir skips the finished (task, seed)
runs and resumes the others. `--print_config` prints the resolved config. Exit codes:
0 finished (now or before), 75 preempted after saving (re-run to resume), 3 invalid config,
4 unusable data, 5 non-finite loss, 6 checkpoints that cannot be resumed, 7 work directory not
writable (full disk), 1 anything else.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import glue as recipes  # noqa: E402
from launch import common  # noqa: E402

flags.adopt_module_key_flags(common)
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, common.config_help("GLUE", "glue.py", recipes.VARIANTS), lock_config=True
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.run_job("run_glue", _CONFIG.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=common.parse_flags)
