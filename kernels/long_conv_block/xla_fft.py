"""The long-convolution block with XLA's real FFTs of length 2L (any L >= 1, any backend).

The convolution theorem with the default "backward" norm: ``irfft(rfft(x, N) * rfft(k, N), N)``
is the plain circular convolution of size N = 2L (spec 3.3). ``jnp.fft`` rejects bf16 inputs,
and the published runs kept this step in float32 anyway (spec section 8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.long_conv_block import base
from kernels.long_conv_block.base import ConvFilter

Array = jax.Array


def supports(seq_len: int, dtype: jnp.dtype) -> bool:
    """Every L >= 1 and every floating dtype."""
    del dtype
    return seq_len >= 1


def _conv(x_SxBxHxL: Array, k_SxHxN: Array) -> Array:
    l = x_SxBxHxL.shape[-1]
    n = 2 * l
    xhat = jnp.fft.rfft(x_SxBxHxL, n=n)
    khat = jnp.fft.rfft(k_SxHxN, n=n)[:, None]
    return jnp.fft.irfft(xhat * khat, n=n)[..., :l]


def long_conv_block(x1_BxHxL: Array, x2_BxHxL: Array, v_BxHxL: Array, gate: ConvFilter,
                    u_BxHxL: Array | None = None, residual: ConvFilter | None = None) -> Array:
    """`kernels.long_conv_block.long_conv_block` with XLA FFTs; shapes and dtypes as there."""
    return base.gated_block(_conv, x1_BxHxL, x2_BxHxL, v_BxHxL, gate, u_BxHxL, residual)
