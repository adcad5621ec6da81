"""Shared test settings: CPU only, float32 matmuls at full precision."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# XLA:CPU already computes float32 dots in float32; this keeps it so if defaults change.
jax.config.update("jax_default_matmul_precision", "highest")

import tempfile  # noqa: E402

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
