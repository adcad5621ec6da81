"""The XLA-FFT long-conv block against the direct sum (shared cases in test_base.py)."""

import test_base


class TestXlaFft(test_base.LongConvBlockTestBase):
    IMPLEMENTATION = "xla_fft"


class TestXlaFftWithFilterSpectra(test_base.FilterSpectrumTestBase):
    IMPLEMENTATION = "xla_fft"


_SHARDED_GRAD = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from kernels.long_conv_block import ConvFilter, long_conv_block
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
x = jax.device_put(jnp.ones((4, 32, 24)), NamedSharding(mesh, P("data")))
g = ConvFilter(jnp.full((8, 32), 0.1), jnp.full((8, 32), 0.1), jnp.ones(8))
def loss(x, g, impl):
    x1, x2, v = jnp.split(jnp.swapaxes(x, 1, 2), 3, axis=1)
    return jnp.sum(long_conv_block(x1, x2, v, g, v, g, implementation=impl) ** 2)
for impl in ("auto", "xla_fft", "xla_dense_dft"):
    print(impl, float(jax.jit(jax.grad(loss), static_argnums=2)(x, g, impl).sum()))
"""


def test_gradients_under_data_parallel_sharding_on_cpu():
    # XLA:CPU's FFT rejects operands whose layout SPMD partitioning changed (RET_CHECK in
    # fft_thunk.cc); the block must keep its FFT operands batch-sharded in the default layout.
    # The dense DFT (matmuls only) computes the same gradients under the same sharding.
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-c", _SHARDED_GRAD], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    values = [float(line.split()[1]) for line in proc.stdout.splitlines()]
    assert len(values) == 3
    assert all(abs(value - values[1]) < 1e-3 * abs(values[1]) for value in values)
