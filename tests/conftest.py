"""Shared test settings: CPU only, float32 matmuls at full precision."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# XLA:CPU already computes float32 dots in float32; this keeps it so if defaults change.
jax.config.update("jax_default_matmul_precision", "highest")
