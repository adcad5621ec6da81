"""Tiny recipe configs and one finished pretraining run, shared by the training tests.

The session fixtures are registered in tests/conftest.py, so the run happens once (and the
subprocesses share one compilation cache) however many modules use them.
"""

import hashlib
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import glue as glue_recipes  # noqa: E402
from configs import pretrain as pretrain_recipes  # noqa: E402

# One layer of width 32 at length 32: a few seconds to compile, milliseconds a step.
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, hyena_filter_order=8,
            max_position_embeddings=32, long_conv_l_max=32)


def set_fields(c, **changes):
    """`c` with dotted fields set: set_fields(c, **{"checkpoint.every": 2})."""
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def pretrain_config(**changes):
    """configs/pretrain.py:smoke on the tiny model: 4 steps of 8 rows, a line every 2, an
    evaluation (one batch) and a synchronous checkpoint every 2."""
    c = pretrain_recipes.get_config("smoke")
    c.model.update(TINY)
    set_fields(c, global_batch_size=8, total_steps=4, log_every=2, eval_every=2, eval_steps=1,
               **{"checkpoint.every": 2, "checkpoint.async_save": False})
    return set_fields(c, **changes)


def glue_config(variant="smoke", **changes):
    """A GLUE recipe on the tiny model: at most 3 steps per run, 8 rows a step."""
    c = glue_recipes.get_config(variant)
    c.model.update(TINY)
    set_fields(c, max_steps=3, **{"checkpoint.async_save": False})
    for t in c.tasks.values():
        t.batch_size = 8
    return set_fields(c, **changes)


def write_corpus(path, n_docs: int, name: str) -> str:
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": f"{name} document {i}: rivers, stones and light"}) + "\n")
    return str(path)


def snapshot(directory) -> dict[str, str]:
    """Every file under `directory` with a hash of its bytes: proves nothing moved or changed."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="session")
def tiny_pretraining(tmp_path_factory):
    """(work directory, results) of a finished tiny pretraining run on local JSON-lines files,
    evaluated on a held-out file (`data.eval_source`). Tests only read it (or copy it)."""
    from m2jax.train.jobs import run_pretraining

    data = tmp_path_factory.mktemp("corpus")
    c = pretrain_config(**{
        "data.source": "files:" + write_corpus(data / "train.jsonl", 64, "train"),
        "data.eval_source": "files:" + write_corpus(data / "eval.jsonl", 16, "held-out"),
    })
    workdir = tmp_path_factory.mktemp("pretraining") / "run"
    results = run_pretraining(c, str(workdir))
    assert results["status"] == "completed"
    return str(workdir), results, c


# The suite is mostly XLA compiles of tiny programs: LLVM's optimisation passes are a fifth of
# each compile and buy nothing at these sizes (XLA's own HLO passes still run; no fast-math
# either way), and XLA:CPU's MLIR fusion emitters took about twice as long to compile a small
# program as its LLVM IR emitters (36-40 vs 17-19 ms; a tiny training run's process 19 -> 16 s,
# same losses). tests/conftest.py sets them for the test processes, subprocess_env for the rest.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


@pytest.fixture(scope="session")
def subprocess_env():
    """The environment for launches and drivers run as subprocesses: CPU, no device-count
    XLA_FLAGS of the parent (the drivers set their own), and the session's persistent compilation cache (tests/conftest.py; the runs compile
    the same tiny programs)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE_FLAGS)
    return env
