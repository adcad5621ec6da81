"""GLUE fine-tuning: every task and seed of the config, MNLI before the tasks chained to it.

  python launch/finetune_glue.py --config=configs/glue.py:m2_base_80m \
      --config.init_from=/path/to/m2-bert-80M --workdir=out/glue

`--config.init_from` is required (a pretraining workdir, a `final/` export, a released checkpoint;
`scratch` for a random initialisation). Offline on the shipped task:
--config=configs/glue.py:smoke --config.init_from=out/smoke/final.
Results: <workdir>/results.json (task scores, mean over seeds; the GLUE average) and one
results.json per task and seed.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from m2jax.recipes import run_glue  # noqa: E402
from launch.distributed_flags import init_distributed_from_flags, parse_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "GLUE config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "one folder per task and seed", required=True)


def main(argv: list[str]) -> None:
    del argv
    init_distributed_from_flags()
    logging.set_verbosity(logging.INFO)
    results = run_glue(_CONFIG.value, _WORKDIR.value)
    print(
        "scores: " + ", ".join(f"{k} {v:.4f}" for k, v in results["task_scores"].items()),
        flush=True,
    )
    if "glue_average" in results:
        print(f"GLUE average {results['glue_average']:.4f}", flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
