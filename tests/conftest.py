"""Shared test settings: CPU only, float32 matmuls at full precision."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the session, this process and every subprocess it starts
# (they inherit the environment): the tests compile the same tiny programs many times over (the
# same model in several tests, each launch of a resumed run). A fresh folder each session, so no
# test depends on an earlier one; removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="m2jax-tests-jax-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=_CACHE,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )

# Faster compiles (train_fixtures.FAST_COMPILE_FLAGS); subprocesses get them too.
from train_fixtures import FAST_COMPILE_FLAGS  # noqa: E402  (imports no jax)

if FAST_COMPILE_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # xdist workers inherit it
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

import jax  # noqa: E402

# XLA:CPU already computes float32 dots in float32; this keeps it so if defaults change.
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

# The training tests' session fixtures (one finished tiny pretraining run, one compilation cache
# for subprocess runs): registered here so that every module shares one instance of each.
from train_fixtures import subprocess_env, tiny_pretraining  # noqa: E402,F401


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_pytest_basetemp(tmp_path_factory):
    """tfds (`DatasetInfo.initialize_from_bucket`, run by `mock_data`) makes a `tmp*tfds` folder
    with `tempfile.mkdtemp` and never removes it; keep such leftovers under pytest's own temporary
    tree, which pytest prunes, instead of the system's /tmp."""
    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
    yield
    tempfile.tempdir = previous


# Files that take a minute or more of one worker (whole training runs in subprocesses, the
# notebook, launches), longest first, as measured on the 2-core machine: started first (pytest.ini
# keeps this order with `--no-loadscope-reorder`), so that two pytest-xdist workers finish
# together instead of one of them running a long file alone at the end.
LONG_FILES = (
    "test_training_runs.py",
    "test_launch.py",
    "test_notebook.py",
    "test_run_semantics.py",
    "test_kernels_benchmark.py",
    "test_embedder.py",
    "test_trainer.py",
    "test_recipes.py",
    "test_pallas_mosaic_tpu.py",
    "test_checkpointing.py",
)


# Files whose tests share a session fixture that takes a whole training run to build: one
# pytest-xdist work unit, so that one worker builds it once (with one unit per file, both workers
# built `tiny_pretraining`, about 20 s each).
SHARED_WORK_UNITS = {
    "test_run_semantics.py": "tiny_pretraining",
    "test_recipes.py": "tiny_pretraining",
}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: file order kept
    if config.pluginmanager.hasplugin("xdist"):
        # `--dist loadgroup` (pytest.ini) hands out one unit per group: the file, or its shared
        # unit.
        for item in items:
            own = str(item.path.relative_to(config.rootpath))
            item.add_marker(pytest.mark.xdist_group(SHARED_WORK_UNITS.get(item.path.name, own)))
